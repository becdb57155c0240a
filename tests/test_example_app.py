"""The example app, end to end through the Flask test client, on the in-process simulator.

Flags come from a temporary copy of ``example_app/flags.json`` read by the real LaunchDarkly SDK's
file data source, so these tests also check that editing the flag file switches a feature off.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic
import httpx2
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


def test_classify_answers_a_label_or_degrades(app: Flask, client: FlaskClient) -> None:
    # On the simulator the example sets a reply rule for its classify prompt: a first click works.
    for text, expected in (("I loved the new release.", "positive"), ("It is slow and broken.", "negative"),
                           ("The meeting is at noon.", "neutral")):
        answered = client.post("/classify", json={"text": text})
        assert answered.status_code == 200 and "X-Claude-Degraded" not in answered.headers
        assert answered.get_json() == {"label": expected}

    # The simulator's "echo:" prompt makes it reply with the rest verbatim, rule or not.
    label = client.post("/classify", json={"text": "echo: Positive."})
    assert label.status_code == 200 and label.get_json() == {"label": "positive"}

    invalid = client.post("/classify", json={"text": "echo: probably fine, I guess"})
    assert invalid.status_code == 503
    assert invalid.headers["X-Claude-Degraded"] == "invalid_output"
    assert invalid.get_json() == {"label": "unknown"}

    # A reply cut at max_tokens: require_complete degrades it rather than judging half an answer.
    app.extensions["claude"].simulator.truncate(times=1)
    cut = client.post("/classify", json={"text": "I loved the new release."})
    assert cut.status_code == 503 and cut.headers["X-Claude-Degraded"] == "truncated"
    assert cut.get_json() == {"label": "unknown"}


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


ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def simulator_process(*args: str, log_dir: Path) -> Iterator[str]:
    """A loopback simulator in its own process (``--port 0``); yields its URL, read from its first line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_", "LAUNCHDARKLY_"))}
    env["CLAUDE_LOG_PATH"] = str(log_dir / "simulator-process.jsonl")
    process = subprocess.Popen([sys.executable, "-m", *args, "--port", "0", "--quiet"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # printed once the socket is bound: no waiting on a timer
        found = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert found, f"no URL in the simulator's first line: {line!r}"
        yield found.group(0)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_tour_storm_on_flask_claude_simulate_keeps_the_apps_reply_rules(
    make_example: Callable[..., Flask], tmp_path: Path
) -> None:
    """Tour step 3: `flask --app example_app claude simulate` serves the example's own simulator, reply
    rule included, so /classify still answers a label over the wire while Opus is failed."""
    command = ("flask", "--app", "example_app", "claude", "simulate",
               "--fail", "529", "--fail-model", "claude-opus-5-5")
    with simulator_process(*command, log_dir=tmp_path) as url:
        app = make_example(CLAUDE_BASE_URL=url, CLAUDE_SIMULATE=True, CLAUDE_MAX_RETRIES=0)
        client = app.test_client()
        label = client.post("/classify", json={"text": "I loved the new release."})
        summary = client.post("/summarize", json={"text": "Our release cut page load times in half."})
    assert label.status_code == 200 and label.get_json() == {"label": "positive"}
    assert summary.status_code == 200 and summary.get_json()["model"] == "claude-sonnet-5-5"  # Opus failed over
    assert app.extensions["claude"].simulator.requests == []  # nothing answered in-process


def test_python_m_flask_claude_simulator_is_the_same_command(tmp_path: Path) -> None:
    with simulator_process("flask_claude.simulator", "--fail", "529", "--fail-rate", "0.5", log_dir=tmp_path) as url:
        sdk = anthropic.Anthropic(api_key="sk-simulator", base_url=url, max_retries=0)
        with pytest.raises(anthropic.OverloadedError):
            sdk.messages.create(model="claude-haiku-5-5", max_tokens=20, messages=[{"role": "user", "content": "a"}])
        reply = sdk.messages.create(model="claude-haiku-5-5", max_tokens=20,
                                    messages=[{"role": "user", "content": "echo: b"}])
        unknown = httpx2.get(url + "/v1/nothing")
    assert reply.content[0].type == "text" and reply.content[0].text == "b"
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
