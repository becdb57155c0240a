"""Blinker signals for hooks, and the default user key from Flask-Login."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask_login import LoginManager, UserMixin, login_user

from flask_claude import (
    Claude,
    ai_feature,
    budgeted,
    circuit_opened,
    claude_called,
    fallback_to,
    feature_degraded,
    model_fallback,
)
from flask_claude.flags import StaticFlags
from flask_claude.simulator import Simulator
from flask_claude.testing import CallLog

from .conftest import FakeClock


def test_signals_are_sent_with_the_app_as_sender(sim: Simulator, clock: FakeClock) -> None:
    app = Flask("signals")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_FLAGS=StaticFlags(), CLAUDE_MAX_RETRIES=0,
                      CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"], CLAUDE_BREAKER_MIN_CALLS=1)
    claude = Claude(app, simulator=sim, clock=clock)

    @app.post("/go")
    @ai_feature("go")
    @fallback_to({"ok": False})
    def go() -> Any:
        return {"model": claude.messages.create(max_tokens=10, messages=[{"role": "user", "content": "x"}]).model}

    received: list[tuple[str, Any, dict[str, Any]]] = []

    def listener(name: str) -> Any:
        def receive(sender: Any, **fields: Any) -> None:
            received.append((name, sender, fields))
        return receive

    handlers = {s: listener(n) for s, n in ((claude_called, "called"), (model_fallback, "fallback"),
                                           (circuit_opened, "opened"), (feature_degraded, "degraded"))}
    for signal, handler in handlers.items():
        signal.connect(handler, app)
    sim.fail(529, model="claude-opus-4-7")
    assert app.test_client().post("/go").get_json() == {"model": "claude-sonnet-4-6"}
    sim.fail(529)
    assert app.test_client().post("/go").get_json() == {"ok": False}
    names = [name for name, _, _ in received]
    assert {"called", "fallback", "opened", "degraded"} <= set(names)
    assert all(sender is app for _, sender, _ in received)
    degraded = next(fields for name, _, fields in received if name == "degraded")
    assert degraded["reason"] == "upstream_unavailable"


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


def test_flask_login_user_is_the_default_key(sim: Simulator, clock: FakeClock, claude_log: CallLog) -> None:
    app = Flask("login")
    app.secret_key = "test-secret"
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_FLAGS=StaticFlags(), CLAUDE_HASH_USERS=False)
    LoginManager(app).user_loader(User)
    claude = Claude(app, simulator=sim, clock=clock)

    @app.post("/login/<name>")
    def login(name: str) -> str:
        login_user(User(name))
        return "ok"

    @app.post("/ask")
    @ai_feature("ask")
    @budgeted(requests="2/minute")
    def ask() -> str:
        claude.messages.create(max_tokens=5, messages=[{"role": "user", "content": "x"}])
        return "ok"

    alice, bob = app.test_client(), app.test_client()
    alice.post("/login/alice")
    bob.post("/login/bob")
    assert [alice.post("/ask").status_code for _ in range(3)] == [200, 200, 429]
    assert bob.post("/ask").status_code == 200  # same address, another user: another window
    users = [e["user"] for e in claude_log.events("claude_api_call")]
    assert users == ["user:alice", "user:alice", "user:bob"]
