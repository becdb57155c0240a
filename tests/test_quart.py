"""flask-claude on Quart: ``claude.async_messages`` in Quart views (the real SDK on the simulator),
the guard-error handler, streaming to the client, and the decorators refusing clearly."""

from __future__ import annotations

import asyncio
from typing import Any

from quart import Quart

from flask_claude import Claude, ai_feature
from flask_claude.testing import CallLog


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_quart_example_summarizes_degrades_and_streams(tmp_path: Any, claude_log: CallLog) -> None:
    from quart_example import create_app

    app = create_app({"CLAUDE_LOG_PATH": str(tmp_path / "calls.jsonl"), "CLAUDE_MAX_RETRIES": 0,
                      "CLAUDE_BREAKER_MIN_CALLS": 100})
    sim = app.extensions["claude"].simulator

    async def scenario() -> dict[str, Any]:
        sim.reset()
        client = app.test_client()
        ok = await client.post("/summarize", json={"text": "Quart runs on asyncio."})
        sim.fail(529)
        down = await client.post("/summarize", json={"text": "again"})
        chat_down = await client.post("/chat", json={"text": "hi"})
        sim.reset()
        chat = await client.post("/chat", json={"text": "Tell me a story."})
        sim.end_stream(after_deltas=2)
        cut = await client.post("/chat", json={"text": "Tell me a story."})
        bad = await client.post("/summarize", json={"nope": 1})
        return {"ok": (ok.status_code, await ok.get_json()),
                "down": (down.status_code, down.headers.get("X-Claude-Degraded"), await down.get_json()),
                "chat_down": (chat_down.status_code, chat_down.headers.get("X-Claude-Degraded")),
                "chat": await chat.get_data(as_text=True), "cut": await cut.get_data(as_text=True),
                "bad": bad.status_code}

    # Two runs: two event loops, as two ASGI server lifetimes; nothing of the first is reused.
    for _ in range(2):
        claude_log.clear()
        out = run(scenario())
        assert out["ok"][0] == 200 and out["ok"][1]["summary"]
        assert out["down"] == (503, "upstream_unavailable",
                               {"summary": None, "notice": "Summaries are paused; try again soon."})
        assert out["chat_down"] == (503, "upstream_unavailable")
        assert out["chat"].count("data: {\"text\"") > 2 and out["chat"].rstrip().endswith("data: {}")
        assert "event: error" in out["cut"]
        assert out["bad"] == 400
        calls = claude_log.events("claude_api_call")
        assert len(calls) == 2 and all(c["route"] in ("/summarize", "/chat") and c["cost_usd"] > 0 for c in calls)
        [cut] = [e for e in claude_log.events("claude_api_error") if e["error_type"] == "incomplete_stream"]
        assert cut["route"] == "/chat" and cut["output_tokens"] >= 1
    clients = app.extensions["claude"].async_messages.clients
    assert clients.opened == clients.closed == 2 and clients.live == 0


def test_a_guard_error_left_unhandled_answers_json_with_the_reason(tmp_path: Any, claude_log: CallLog) -> None:
    app = Quart("plain_quart")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_LOG_PATH=str(tmp_path / "x.jsonl"), CLAUDE_MAX_RETRIES=0)
    claude = Claude()
    claude.init_app(app)  # the factory pattern: the app is found through Quart's context

    @app.post("/ask")
    async def ask() -> Any:
        msg = await claude.async_messages.create(max_tokens=20, messages=[{"role": "user", "content": "hi"}])
        return {"text": msg.content[0].text}

    @ai_feature("decorated")
    async def decorated() -> Any:
        return {}

    app.add_url_rule("/decorated", view_func=decorated, methods=["POST"])

    async def scenario() -> tuple[Any, ...]:
        client = app.test_client()
        app.extensions["claude"].simulator.fail(429, retry_after=5)
        limited = await client.post("/ask")
        refused = await client.post("/decorated")
        return (limited.status_code, limited.headers.get("X-Claude-Degraded"), limited.headers.get("Retry-After"),
                await limited.get_json(), refused.status_code, (await refused.get_json())["error"])

    limited = run(scenario())
    assert limited[:4] == (503, "upstream_unavailable", "5",
                           {"error": "upstream_unavailable",
                            "message": "The AI service is temporarily unavailable; try again soon."})
    assert limited[4:] == (500, "config_error")  # the decorators say they are Flask-only
    [degraded] = claude_log.events("feature_degraded")[:1]
    assert degraded["route"] == "/ask" and degraded["reason"] == "upstream_unavailable"
