"""The example app's async route: two Claude calls at once from an ``async def`` view."""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask

from flask_claude.testing import CallLog


def test_analyze_fans_out_two_calls(make_example: Callable[..., Flask], claude_log: CallLog) -> None:
    app = make_example(CLAUDE_MAX_RETRIES=0)
    client = app.test_client()
    response = client.post("/analyze", json={"text": "Our new release cut page load times in half."})
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["summary"] and body["label"] in ("positive", "negative", "neutral", "unknown")
    lines = claude_log.events("claude_api_call")
    assert len(lines) == 2 and {line["feature"] for line in lines} == {"analyze"}
    assert len({line["request_id"] for line in lines}) == 2
    # two sequential async requests: each ran in its own event loop with its own SDK client, both closed
    assert client.post("/analyze", json={"text": "Second request."}).status_code == 200
    clients = app.extensions["claude"].async_messages.clients
    assert clients.opened == clients.closed == 2 and clients.live == 0


def test_analyze_degrades_like_any_route(make_example: Callable[..., Flask], claude_log: CallLog) -> None:
    app = make_example(CLAUDE_MAX_RETRIES=0)
    app.extensions["claude"].simulator.fail(529)
    response = app.test_client().post("/analyze", json={"text": "hello"})
    assert response.status_code == 503 and response.headers["X-Claude-Degraded"] == "upstream_unavailable"
    assert response.get_json()["label"] == "unknown"
    bad = app.test_client().post("/analyze", json={"nope": 1})
    assert bad.status_code == 400
