"""The example app, end to end through the Flask test client, on the in-process simulator.

Flags come from a temporary copy of ``example_app/flags.json`` read by the real LaunchDarkly SDK's
file data source, so these tests also check that editing the flag file switches a feature off.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from .conftest import wait_for

ENV_TO_CLEAR = ("REDIS_URL", "EXAMPLE_FLAGS_FILE", "AI_KILL_SWITCH", "TRUSTED_PROXIES")


@pytest.fixture
def app(make_example: Callable[..., Flask]) -> Flask:
    # One attempt per model: the tests that script failures should not wait for real backoff.
    return make_example(CLAUDE_MAX_RETRIES=0)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def write_flags(path: Path, values: dict[str, Any]) -> None:
    """Replace the flag file atomically, as the SDK's file source requires, and make sure its mtime moves."""
    old = path.stat().st_mtime_ns
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"flagValues": values}))
    os.replace(tmp, path)
    if path.stat().st_mtime_ns <= old:  # a coarse filesystem clock: the poller must see a change
        os.utime(path, ns=(old + 1_000_000_000, old + 1_000_000_000))


def sse_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event, data)`` pairs of a server-sent event stream; unnamed events are "message"."""
    events = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", ""
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[len("event:"):].strip()
            elif line.startswith("data:"):
                data += line[len("data:"):].strip()
        events.append((name, json.loads(data) if data else {}))
    return events


def log_lines(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "claude-calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_runs_on_the_simulator_without_a_key_and_says_so(make_example: Callable[..., Flask],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    app = make_example()
    assert app.extensions["claude"].simulator is not None
    err = capsys.readouterr().err
    assert err.count("offline simulator") == 1


def test_summarize_answers_and_logs_the_call(client: FlaskClient, tmp_path: Path) -> None:
    response = client.post("/summarize", json={"text": "The release cut page load times in half. " * 5})
    assert response.status_code == 200
    assert "X-Claude-Degraded" not in response.headers
    body = response.get_json()
    assert isinstance(body["summary"], str) and body["summary"]
    assert body["model"] == "claude-opus-5-5"
    calls = [line for line in log_lines(tmp_path) if line["event"] == "claude_api_call"]
    assert calls and calls[-1]["feature"] == "summarize" and calls[-1]["cost_usd"] > 0


@pytest.mark.parametrize("payload", [{}, {"text": 42}, {"text": "   "}, ["text"], None])
def test_summarize_bad_request_is_a_clear_400(client: FlaskClient, payload: Any) -> None:
    response = (client.post("/summarize", data="not json", content_type="text/plain") if payload is None
                else client.post("/summarize", json=payload))
    assert response.status_code == 400
    assert response.get_json()["error"] == "bad_request"


def test_summarize_input_too_large_is_413_with_the_limit(client: FlaskClient, app: Flask) -> None:
    response = client.post("/summarize", json={"text": "x" * 25_000})
    assert response.status_code == 413
    assert response.headers["X-Claude-Degraded"] == "input_too_large"
    assert "20000" in response.get_json()["message"]
    assert app.extensions["claude"].simulator.requests == []  # refused before any call


def test_flag_file_edit_switches_summarize_off(client: FlaskClient, app: Flask, flags_file: Path) -> None:
    first = {"text": "A paragraph about quarterly results."}
    assert client.post("/summarize", json=first).status_code == 200

    values = json.loads(flags_file.read_text())["flagValues"]
    write_flags(flags_file, {**values, "ai-summarize": False})
    flags = app.extensions["claude"].flags
    assert wait_for(lambda: flags.enabled("ai-summarize", None, True) is False, timeout=10), \
        "flag file change not seen"

    response = client.post("/summarize", json={"text": "Another paragraph."})
    assert response.status_code == 503
    assert response.headers["X-Claude-Degraded"] == "feature_disabled"
    assert response.get_json() == {"summary": None, "notice": "Summaries are paused; try again soon."}

    # A kill switch turns cached AI answers off too: the same request as before gets the fallback.
    cached = client.post("/summarize", json=first)
    assert cached.headers["X-Claude-Degraded"] == "feature_disabled"
    assert cached.get_json()["summary"] is None


def test_summarize_degrades_when_claude_is_down(client: FlaskClient, app: Flask) -> None:
    sim = app.extensions["claude"].simulator
    sim.fail(529)
    response = client.post("/summarize", json={"text": "Nobody has asked this before."})
    assert response.status_code == 503
    assert response.headers["X-Claude-Degraded"] == "upstream_unavailable"
    assert response.get_json()["summary"] is None
    assert "Overloaded" not in response.get_data(as_text=True)
    assert {r.model for r in sim.requests} == {"claude-opus-5-5", "claude-sonnet-5-5"}  # fell back first


def test_classify_answers_a_label_or_degrades(client: FlaskClient) -> None:
    # The simulator's "echo:" prompt makes it reply with the rest verbatim.
    label = client.post("/classify", json={"text": "echo: Positive."})
    assert label.status_code == 200 and label.get_json() == {"label": "positive"}

    invalid = client.post("/classify", json={"text": "echo: probably fine, I guess"})
    assert invalid.status_code == 503
    assert invalid.headers["X-Claude-Degraded"] == "invalid_output"
    assert invalid.get_json() == {"label": "unknown"}

    # Ordinary text gets simulator prose: longer than max_tokens=20, so require_complete degrades it,
    # or, if it fits, it is not a label.
    prose = client.post("/classify", json={"text": "I loved the new release."})
    assert prose.headers["X-Claude-Degraded"] in ("truncated", "invalid_output")
    assert prose.get_json() == {"label": "unknown"}


def test_chat_streams_server_sent_events(client: FlaskClient) -> None:
    response = client.post("/chat", json={"messages": [{"role": "user", "content": "Tell me about budgets."}]})
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    events = sse_events(response.get_data(as_text=True))
    chunks = [data["text"] for name, data in events if name == "message"]
    assert len(chunks) >= 3 and "".join(chunks).strip()
    assert events[-1][0] == "done"


def test_chat_keeps_the_last_20_messages(client: FlaskClient, app: Flask) -> None:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(25)]
    response = client.post("/chat", json={"messages": messages})
    assert sse_events(response.get_data(as_text=True))[-1][0] == "done"
    sent = app.extensions["claude"].simulator.requests[-1].body["messages"]
    assert len(sent) <= 20 and sent[0]["role"] == "user" and sent[-1]["content"] == "turn 24"


def test_chat_mid_stream_failure_is_a_generic_error_event(client: FlaskClient, app: Flask) -> None:
    app.extensions["claude"].simulator.stream_error(after_deltas=2, message="secret upstream detail")
    response = client.post("/chat", json={"messages": [{"role": "user", "content": "Hello there."}]})
    body = response.get_data(as_text=True)
    events = sse_events(body)
    assert [name for name, _ in events][-1] == "error"
    assert any(name == "message" for name, _ in events)  # the text before the failure arrived
    assert "secret upstream detail" not in body and "overloaded" not in body.lower()


def test_chat_fails_before_streaming_degrades_to_json(client: FlaskClient, app: Flask) -> None:
    app.extensions["claude"].simulator.fail(529)
    response = client.post("/chat", json={"messages": [{"role": "user", "content": "Hello?"}]})
    assert response.status_code == 503
    assert response.headers["X-Claude-Degraded"] == "upstream_unavailable"
    assert response.get_json()["error"] == "chat_unavailable"


@pytest.mark.parametrize("payload", [{}, {"messages": []}, {"messages": "hi"},
                                     {"messages": [{"role": "system", "content": "x"}]},
                                     {"messages": [{"role": "user", "content": 3}]}])
def test_chat_bad_request_is_a_clear_400(client: FlaskClient, payload: Any) -> None:
    response = client.post("/chat", json=payload)
    assert response.status_code == 400 and response.get_json()["error"] == "bad_request"


def test_index_page_has_the_controls(client: FlaskClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    for element_id in ("text", "summarize-btn", "classify-btn", "chat-btn", "result", "degraded", "chat-output"):
        assert f'id="{element_id}"' in html
    assert "<script src" not in html and "<link" not in html  # self-contained


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.get_data(as_text=True) == "ok"


@pytest.mark.parametrize("proxies, distinct", [("0", 1), ("1", 2)])
def test_client_address_comes_from_x_forwarded_for_only_behind_trusted_proxies(
        make_example: Callable[..., Flask], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        proxies: str, distinct: int) -> None:
    monkeypatch.setenv("TRUSTED_PROXIES", proxies)
    client = make_example().test_client()
    for address in ("203.0.113.1", "203.0.113.2"):
        client.post("/classify", json={"text": "echo: neutral"}, headers={"X-Forwarded-For": address})
    users = {line["user"] for line in log_lines(tmp_path) if line["event"] == "claude_api_call"}
    assert len(users) == distinct
