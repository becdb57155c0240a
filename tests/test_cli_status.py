"""``flask claude status`` on a real Redis: what one worker did is what every worker's status shows."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.views import MethodView

from flask_claude import Claude, ai_feature
from flask_claude.flags import StaticFlags
from flask_claude.status import safe_uri

from .conftest import free_port

MODELS = ["claude-opus-4-7", "claude-sonnet-4-6"]


def status_app(storage_uri: str, *, log_path: Path | None = None, flags: StaticFlags | None = None,
               **config: Any) -> Flask:
    # One import name for every copy: the same app code run by several workers shares its Redis keys.
    app = Flask("status_app")
    app.config.update({
        "CLAUDE_SIMULATE": True, "CLAUDE_STORAGE_URI": storage_uri, "CLAUDE_MODELS": MODELS,
        "CLAUDE_DAILY_BUDGET_USD": 1.0, "CLAUDE_FEATURE_BUDGETS_USD": {"summarize": 0.5},
        "CLAUDE_BREAKER_MIN_CALLS": 2, "CLAUDE_BREAKER_COOLDOWN": 600, "CLAUDE_MAX_RETRIES": 0,
        "CLAUDE_LOG_PATH": str(log_path) if log_path else "/dev/null",
        "CLAUDE_FLAGS": flags if flags is not None else StaticFlags({"ai-translate": False}), **config})
    claude = Claude(app)

    @app.post("/summarize")
    @ai_feature("summarize", max_tokens=64)
    def summarize() -> dict[str, Any]:
        msg = claude.messages.create(messages=[{"role": "user", "content": "Summarise the cat on the mat."}])
        return {"text": msg.content[0].text}

    @app.post("/translate")
    @ai_feature("translate", models=["claude-haiku-4-5"])
    def translate() -> dict[str, Any]:
        return {}

    class Chat(MethodView):
        @ai_feature("chat", flag="chat-beta")
        def post(self) -> dict[str, Any]:
            return {}

    app.add_url_rule("/chat", view_func=Chat.as_view("chat"))
    return app


def status_of(app: Flask) -> tuple[int, dict[str, Any]]:
    result = app.test_cli_runner().invoke(args=["claude", "status", "--json"])
    assert "Traceback" not in result.output
    return result.exit_code, json.loads(result.output)


def test_status_shows_shared_flags_breakers_and_spend(redis_url: str, tmp_path: Path) -> None:
    log_path = tmp_path / "claude.jsonl"
    app = status_app(redis_url, log_path=log_path)
    state = app.extensions["claude"]
    client = app.test_client()
    for _ in range(2):
        assert client.post("/summarize").status_code == 200
    state.simulator.fail(529, model="claude-opus-4-7")  # opus overloaded: each call falls back to sonnet
    with app.app_context():
        for _ in range(2):
            state.messages.create(max_tokens=32, messages=[{"role": "user", "content": "Still there?"}])
    assert state.simulator.requests_for("claude-sonnet-4-6")

    code, status = status_of(app)
    assert code == 0
    assert status["storage"] == {"uri": redis_url, "shared": True, "ok": True, "error": None,
                                 "failure_policy": "open"}
    assert status["flags"]["global"] == {"flag": "ai-enabled", "enabled": True}
    features = status["features"]
    assert features["summarize"]["enabled"] is True and features["summarize"]["serving"] is True
    assert features["summarize"]["routes"] == ["POST /summarize"]
    assert features["translate"]["flag"] == "ai-translate" and features["translate"]["enabled"] is False
    assert features["chat"]["flag"] == "chat-beta" and features["chat"]["routes"] == ["POST /chat"]
    assert status["breakers"] == {"claude-opus-4-7": "open", "claude-sonnet-4-6": "closed",
                                  "claude-haiku-4-5": "closed"}

    budgets = {b["budget"]: b for b in status["budgets"]["items"]}
    total = budgets["global daily budget"]
    # The budget counts each call's cost rounded up to a micro-dollar. The log's cost_usd is rounded to
    # 8 places, so a cost that is a whole number of micro-dollars can read a hair above it there:
    # price the logged usage again, as the budget did, instead of rounding the rounded figure up.
    logged = [json.loads(line) for line in log_path.read_text().splitlines()]
    calls = [r for r in logged if r["event"] == "claude_api_call"]
    costs = [state.prices.cost(r["model"], r).usd for r in calls]
    assert len(costs) == 4 and costs == pytest.approx([r["cost_usd"] for r in calls], abs=1e-8)
    assert total["spent_usd"] == sum(math.ceil(c * 1_000_000) for c in costs) / 1_000_000 > 0
    assert total["limit_usd"] == 1.0 and total["reserved_usd"] == 0
    assert total["remaining_usd"] == round(1.0 - total["spent_usd"], 6)
    assert total["alerts_passed"] == [] and total["exhausted"] is False
    feature = budgets["feature summarize daily budget"]
    assert 0 < feature["spent_usd"] < total["spent_usd"] and feature["limit_usd"] == 0.5
    assert status["budgets"]["thresholds"] == [0.5, 0.8, 1.0]

    # Another worker: a separate app object and process state, the same Redis.
    other = status_app(redis_url)
    code, seen = status_of(other)
    assert code == 0
    assert seen["breakers"] == status["breakers"]
    assert seen["budgets"]["items"] == status["budgets"]["items"]
    assert seen["features"] == status["features"]

    text = other.test_cli_runner().invoke(args=["claude", "status"])
    assert text.exit_code == 0
    assert "claude-opus-4-7" in text.output and "OPEN" in text.output
    assert f"spent ${total['spent_usd']:.4f} of $1.00" in text.output
    assert "ai-translate" in text.output and "OFF" in text.output


def test_alerts_passed_and_global_switch(redis_url: str) -> None:
    flags = StaticFlags({"ai-enabled": False})
    app = status_app(redis_url, flags=flags, CLAUDE_BUDGET_ALERTS=[0.0001, 0.9])
    state = app.extensions["claude"]
    with app.app_context():
        state.messages.create(max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    code, status = status_of(app)
    assert code == 0
    assert status["flags"]["global"]["enabled"] is False
    assert status["features"]["summarize"] == {**status["features"]["summarize"], "enabled": True, "serving": False}
    [total] = [b for b in status["budgets"]["items"] if b["budget"] == "global daily budget"]
    assert total["alerts_passed"] == [0.0001]
    assert status["budgets"]["thresholds"] == [0.0001, 0.9]


def test_storage_outage_is_a_message_not_a_traceback() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = status_app(dead)
    code, status = status_of(app)
    assert code == 1
    assert status["storage"]["ok"] is False and "storage unavailable" in status["storage"]["error"]
    assert set(status["breakers"].values()) == {"unknown"}
    assert status["features"]["summarize"]["enabled"] is True  # flags do not live in the store

    result = app.test_cli_runner().invoke(args=["claude", "status"])
    assert result.exit_code == 1
    assert "storage unavailable" in result.output and "Traceback" not in result.output
    assert "Budgets today" in result.output and "unknown (storage unavailable)" in result.output


def test_memory_storage_says_it_is_per_process() -> None:
    app = status_app("memory://", CLAUDE_DAILY_BUDGET_USD=None)
    result = app.test_cli_runner().invoke(args=["claude", "status"])
    assert result.exit_code == 0, result.output
    assert "memory:// storage is per process" in result.output
    assert "no app-wide budget configured" not in result.output  # the feature budget is still there


def test_storage_uri_password_is_not_printed() -> None:
    assert safe_uri("redis://:s3cret@cache:6379/0") == "redis://***@cache:6379/0"
    assert safe_uri("redis+sentinel://user:pw@h1:26379,h2:26379/main") == "redis+sentinel://***@h1:26379,h2:26379/main"
    assert safe_uri("redis://cache:6379") == "redis://cache:6379"
    # a password holding "@" (and ":") is masked whole, and so is one in the query
    assert safe_uri("redis://app:p@ss:w@rd@cache:6379/0") == "redis://***@cache:6379/0"
    assert safe_uri("unix:///run/redis.sock?db=1&password=hunter2") == "unix:///run/redis.sock?db=1&password=***"


def test_check_warns_about_a_redis_that_keeps_nothing_and_fails_on_one_that_is_away(redis_url: str) -> None:
    app = status_app(redis_url)
    result = app.test_cli_runner().invoke(args=["claude", "check"])
    assert result.exit_code == 0 and "reachable: yes" in result.output
    assert "keeps nothing on disk" in result.output  # the test server runs with --save "" --appendonly no
    assert app.test_cli_runner().invoke(args=["claude", "check", "--strict"]).exit_code == 2
    import redis

    admin = redis.Redis.from_url(redis_url)
    admin.config_set("maxmemory-policy", "allkeys-lru")
    try:
        assert "may evict budget keys" in app.test_cli_runner().invoke(args=["claude", "check"]).output
    finally:
        admin.config_set("maxmemory-policy", "noeviction")
    away = status_app(f"redis://:pass@word@127.0.0.1:{free_port()}/0", CLAUDE_STORAGE_SOCKET_TIMEOUT=0.2)
    result = away.test_cli_runner().invoke(args=["claude", "check"])
    assert result.exit_code == 1 and "reachable: no" in result.output
    assert "pass" not in result.output and "word" not in result.output and "Traceback" not in result.output


def test_check_on_memory_says_it_is_one_process() -> None:
    result = status_app("memory://").test_cli_runner().invoke(args=["claude", "check"])
    assert result.exit_code == 0 and "one process" in result.output
