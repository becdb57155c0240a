"""ai_feature(downgrade_at=...): near its budget a user is served by the cheaper model, not refused."""

from __future__ import annotations

import os
from typing import Any

import pytest
from flask import Flask, request

from flask_claude import Claude, ai_feature, budgeted
from flask_claude.flags import StaticFlags
from flask_claude.simulator import Simulator
from flask_claude.testing import CallLog

from .conftest import FakeClock

DEAR, CHEAP = "claude-opus-4-7", "claude-haiku-4-5"


def downgrade_app(sim: Simulator, clock: FakeClock, storage_uri: str, *, budget: Any, **feature: Any) -> Flask:
    app = Flask("downgrade")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=[DEAR, CHEAP], CLAUDE_STORAGE_URI=storage_uri,
                      CLAUDE_MAX_RETRIES=0, CLAUDE_FLAGS=StaticFlags(), CLAUDE_LOG_PATH=os.devnull)
    claude = Claude(app, simulator=sim, clock=clock)

    @claude.user_loader
    def user() -> str:
        return request.headers.get("X-User", "alice")

    @app.post("/ask")
    @ai_feature("ask", downgrade_at=0.5, **feature)
    @budget
    def ask() -> Any:
        msg = claude.messages.create(max_tokens=200, messages=[{"role": "user", "content": "Write a haiku."}])
        return {"model": msg.model}

    return app


@pytest.mark.parametrize("feature", [{}, {"max_input_chars": 500}], ids=["at the call", "with the admission"])
def test_the_chain_steps_down_past_the_fraction_and_not_before(storage_uri: str, sim: Simulator, clock: FakeClock,
                                                               claude_log: CallLog, feature: dict[str, Any]) -> None:
    app = downgrade_app(sim, clock, storage_uri, budget=budgeted(usd="0.05/day"), **feature)
    c = app.test_client()
    models, spent = [], []
    for _ in range(40):
        response = c.post("/ask")
        if response.status_code != 200:
            break
        models.append(response.get_json()["model"])
        spent.append(claude_log.spend_usd())
    # Opus while less than half the user's budget was spent before the call, Haiku from then on
    for i, model in enumerate(models):
        before = spent[i - 1] if i else 0.0
        assert model == (DEAR if before < 0.025 else CHEAP), (i, before, model)
    assert DEAR in models and CHEAP in models
    events = claude_log.events("model_downgraded")
    assert len(events) == models.count(CHEAP)
    assert all(e["from_model"] == DEAR and e["to_model"] == CHEAP and e["fraction"] >= 0.5 for e in events)
    assert claude_log.spend_usd() <= 0.05  # never past the budget
    # more calls fit than Opus alone would have allowed: the point of stepping down
    assert len(models) > sum(1 for m in models if m == DEAR) + 1


def test_another_user_is_not_stepped_down(storage_uri: str, sim: Simulator, clock: FakeClock,
                                          claude_log: CallLog) -> None:
    app = downgrade_app(sim, clock, storage_uri, budget=budgeted(usd="0.05/day"))
    c = app.test_client()
    while c.post("/ask").get_json()["model"] == DEAR:
        pass
    assert c.post("/ask", headers={"X-User": "bob"}).get_json()["model"] == DEAR


def test_a_bad_fraction_fails_at_decoration() -> None:
    from flask_claude.errors import ConfigError

    with pytest.raises(ConfigError, match="downgrade_at"):
        ai_feature("x", downgrade_at=1.5)
