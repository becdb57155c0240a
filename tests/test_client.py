"""The guarded client through the real anthropic SDK and the simulator: retries, fallback, breaker,
deadline, streams and cost."""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import pytest

from flask_claude import Claude, UnknownModel, UpstreamUnavailable
from flask_claude.simulator import Simulator
from flask_claude.testing import CallLog

from .conftest import SECRET_KEY, FakeClock, user_msg


def create(app: Any, **kwargs: Any) -> Any:
    params = {"max_tokens": 100, "messages": user_msg("Summarise the plot of Hamlet.")} | kwargs
    with app.app_context():
        return app.extensions["claude"].messages.create(**params)


def test_529_three_times_then_success_on_the_same_model(make_app, sim: Simulator, clock: FakeClock,
                                                        claude_log: CallLog) -> None:
    app = make_app()
    sim.fail(529, model="claude-opus-4-7", times=3)
    message = create(app, model="claude-opus-4-7")
    assert isinstance(message, anthropic.types.Message)
    assert message.model == "claude-opus-4-7"
    assert len(sim.requests_for("claude-opus-4-7")) == 4
    assert sim.requests_for("claude-sonnet-4-6") == []
    assert len(clock.sleeps) == 3
    [line] = claude_log.events("claude_api_call")
    assert line["retries"] == 3 and line["fallback_from"] is None and line["model"] == "claude-opus-4-7"
    assert line["output_tokens"] == message.usage.output_tokens > 0


def test_529_on_every_try_falls_back_to_the_next_model(make_app, sim: Simulator, claude_log: CallLog) -> None:
    app = make_app(CLAUDE_MAX_RETRIES=2, CLAUDE_BREAKER_MIN_CALLS=50)
    sim.fail(529, model="claude-opus-4-7")
    message = create(app, model="claude-opus-4-7")
    assert message.model == "claude-sonnet-4-6"
    assert len(sim.requests_for("claude-opus-4-7")) == 3
    [line] = claude_log.events("claude_api_call")
    assert line["fallback_from"] == "claude-opus-4-7"
    assert line["model"] == "claude-sonnet-4-6" and line["requested_model"] == "claude-opus-4-7"
    [fallback] = claude_log.events("model_fallback")
    assert fallback["from_model"] == "claude-opus-4-7" and fallback["to_model"] == "claude-sonnet-4-6"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_client_errors_are_neither_retried_nor_fall_back(make_app, sim: Simulator, clock: FakeClock,
                                                         claude_log: CallLog, status: int) -> None:
    app = make_app()
    sim.fail(status)
    with pytest.raises(UpstreamUnavailable) as info:
        create(app)
    assert len(sim.requests) == 1
    assert clock.sleeps == []
    [line] = claude_log.events("claude_api_error")
    assert line["status_code"] == status and line["our_bug"] is True
    assert "req_" not in str(info.value)  # no upstream request id in what a handler may show


def test_429_retry_after_is_capped(make_app, sim: Simulator, clock: FakeClock, claude_log: CallLog) -> None:
    app = make_app(CLAUDE_RETRY_AFTER_CAP=2.5)
    sim.fail(429, retry_after=3600, times=2)
    message = create(app)
    assert message.content[0].text
    assert len(clock.sleeps) == 2 and all(1.0 <= s <= 2.5 for s in clock.sleeps), clock.sleeps
    # 429 is retried on the same model and does not fall back by default
    assert {r.model for r in sim.requests} == {"claude-opus-4-7"}


def test_429_falls_back_only_when_configured(make_app, sim: Simulator) -> None:
    sim.fail(429, model="claude-opus-4-7")
    with pytest.raises(UpstreamUnavailable):
        create(make_app(CLAUDE_MAX_RETRIES=1))
    assert sim.requests_for("claude-sonnet-4-6") == []
    sim.clear_requests()
    message = create(make_app(CLAUDE_MAX_RETRIES=1, CLAUDE_FALLBACK_ON_RATE_LIMIT=True))
    assert message.model == "claude-sonnet-4-6"


def test_retry_after_ms_and_backoff_have_jitter(make_app, sim: Simulator, clock: FakeClock) -> None:
    app = make_app(CLAUDE_MAX_RETRIES=6, CLAUDE_BREAKER_MIN_CALLS=50)
    sim.fail(503, model="claude-opus-4-7", times=6)
    create(app)
    backoffs = clock.sleeps
    assert len(backoffs) == 6
    assert all(0 <= s <= min(8.0, 0.5 * 2**i) for i, s in enumerate(backoffs)), backoffs
    assert len(set(backoffs)) == 6  # jittered, not a fixed ladder


def test_trickling_body_ends_at_the_deadline(make_app, sim: Simulator, claude_log: CallLog) -> None:
    app = make_app(use_clock=False, CLAUDE_DEADLINE=0.6, CLAUDE_MODELS=["claude-haiku-4-5"])
    sim.trickle(0.1, chunks=40)  # 4 s of body, each read well inside any per-read timeout
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable) as info:
        create(app)
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 1.0, elapsed
    assert info.value.reason == "deadline_exceeded"
    [line] = claude_log.events("claude_api_error")
    assert line["error_type"] == "deadline_exceeded"


def test_breaker_opens_and_skips_the_dead_model_until_cooldown(make_app, sim: Simulator, clock: FakeClock,
                                                               claude_log: CallLog, storage_uri: str) -> None:
    """On Redis too: a call whose breaker was read open (then granted the probe) records its success
    by reading the breaker's state, so the probe's success closes the circuit."""
    app = make_app(CLAUDE_MAX_RETRIES=1, CLAUDE_BREAKER_MIN_CALLS=4, CLAUDE_BREAKER_COOLDOWN=30,
                   CLAUDE_STORAGE_URI=storage_uri, CLAUDE_DAILY_BUDGET_USD=100)
    sim.fail(529, model="claude-opus-4-7")
    for _ in range(2):
        assert create(app).model == "claude-sonnet-4-6"
    assert len(sim.requests_for("claude-opus-4-7")) == 4
    assert [e["model"] for e in claude_log.events("circuit_opened")] == ["claude-opus-4-7"]

    for _ in range(5):  # open: nothing is sent to the dead model
        assert create(app).model == "claude-sonnet-4-6"
        clock.advance(5)
    assert len(sim.requests_for("claude-opus-4-7")) == 4

    clock.advance(10)  # past the cooldown: one probe, which fails and re-opens
    assert create(app).model == "claude-sonnet-4-6"
    assert len(sim.requests_for("claude-opus-4-7")) == 5
    assert create(app).model == "claude-sonnet-4-6"
    assert len(sim.requests_for("claude-opus-4-7")) == 5

    sim.reset()  # the model recovers; after the next cooldown the probe closes the circuit
    clock.advance(31)
    assert create(app).model == "claude-opus-4-7"
    assert create(app).model == "claude-opus-4-7"
    assert app.extensions["claude"].breaker.state("claude-opus-4-7", clock.time()) == "closed"


def _stream_text(app: Any) -> str:
    with app.app_context(), app.extensions["claude"].messages.stream(
            model="claude-sonnet-4-6", max_tokens=300, messages=user_msg("Tell me a long story.")) as stream:
        return "".join(stream.text_stream)


def test_stream_completes_and_is_billed(make_app, claude_log: CallLog) -> None:
    app = make_app()
    text = _stream_text(app)
    assert text
    [line] = claude_log.events("claude_api_call")
    assert line["output_tokens"] > 0 and line["cost_usd"] > 0 and line["stop_reason"] in ("end_turn", "max_tokens")


@pytest.mark.parametrize("fault", ["stream_error", "drop_stream"])
def test_mid_stream_failure_is_billed_for_what_was_streamed(make_app, sim: Simulator, claude_log: CallLog,
                                                            fault: str) -> None:
    app = make_app()
    getattr(sim, fault)(after_deltas=3)
    received: list[str] = []
    with pytest.raises(UpstreamUnavailable), app.app_context(), app.extensions["claude"].messages.stream(
            model="claude-sonnet-4-6", max_tokens=300, messages=user_msg("Tell me a long story.")) as stream:
        for chunk in stream.text_stream:
            received.append(chunk)
    assert received, "some text arrived before the failure"
    [line] = claude_log.events("claude_api_error")
    assert line["input_tokens"] > 0
    assert line["output_tokens"] >= 1
    expected = (line["input_tokens"] * 3 + line["output_tokens"] * 15) / 1e6
    assert line["cost_usd"] == pytest.approx(expected)
    assert line["error_type"] in ("overloaded_error", "RemoteProtocolError")


def test_abandoned_stream_is_billed_on_close(make_app, claude_log: CallLog) -> None:
    app = make_app()
    with app.app_context(), app.extensions["claude"].messages.stream(
            model="claude-sonnet-4-6", max_tokens=300, messages=user_msg("Tell me a long story.")) as stream:
        next(iter(stream.text_stream))
    [line] = claude_log.events("claude_api_call")
    assert line["stop_reason"] == "client_disconnected" and line["cost_usd"] > 0


def test_create_stream_true_is_guarded_too(make_app, claude_log: CallLog) -> None:
    app = make_app()
    with app.app_context():
        stream = app.extensions["claude"].messages.create(
            model="claude-haiku-4-5", max_tokens=50, stream=True, messages=user_msg("hi"))
        kinds = [event.type for event in stream]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert claude_log.events("claude_api_call")[0]["model"] == "claude-haiku-4-5"


def test_max_tokens_is_clamped_and_the_clamp_logged(make_app, sim: Simulator, claude_log: CallLog) -> None:
    app = make_app(CLAUDE_MAX_TOKENS_CAP=64)
    create(app, max_tokens=5000)
    assert sim.requests[-1].body["max_tokens"] == 64
    assert claude_log.events("claude_api_call")[0]["max_tokens_clamped_from"] == 5000


def test_count_tokens_goes_through_the_guard(make_app) -> None:
    app = make_app()
    with app.app_context():
        counted = app.extensions["claude"].messages.count_tokens(
            model="claude-sonnet-4-6", messages=user_msg("How many tokens is this?"))
    assert counted.input_tokens > 0


def test_unknown_model_at_call_time_is_refused_with_the_known_list(make_app, sim: Simulator) -> None:
    app = make_app()
    with pytest.raises(UnknownModel) as info:
        create(app, model="claude-sonnet-latest")
    assert "claude-haiku-4-5" in str(info.value)
    assert sim.requests == []


def test_cache_write_then_read_is_costed_at_cache_prices(make_app, claude_log: CallLog) -> None:
    app = make_app()
    system = [{"type": "text", "text": "You are a careful assistant. " * 200, "cache_control": {"type": "ephemeral"}}]
    create(app, model="claude-haiku-4-5", system=system)
    create(app, model="claude-haiku-4-5", system=system)
    first, second = claude_log.events("claude_api_call")
    assert first["cache_creation_input_tokens"] > 0 and first["cache_read_input_tokens"] == 0
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    for line, write, read in ((first, first["cache_creation_input_tokens"], 0),
                              (second, 0, second["cache_read_input_tokens"])):
        expected = (line["input_tokens"] * 1.0 + line["output_tokens"] * 5.0 + write * 1.25 + read * 0.10) / 1e6
        assert line["cost_usd"] == pytest.approx(expected, abs=1e-8)
    assert first["system_prompt_hash"] == second["system_prompt_hash"] and len(first["system_prompt_hash"]) == 16


def test_real_network_path_never_logs_the_key(tmp_path: Any, sim: Simulator) -> None:
    """The production wiring (HTTP transport, bearer key) against the loopback simulator."""
    from flask import Flask

    log_path = tmp_path / "prod.jsonl"
    with sim.serve() as server:
        app = Flask("prod_like")
        app.config.update(CLAUDE_API_KEY=SECRET_KEY, CLAUDE_BASE_URL=server.url, CLAUDE_LOG_PATH=str(log_path),
                          CLAUDE_MODELS=["claude-haiku-4-5"], CLAUDE_MAX_RETRIES=0, CLAUDE_LOG_CONTENT=True)
        Claude(app)
        create(app, model="claude-haiku-4-5",
               messages=user_msg(f"my key is {SECRET_KEY}, mail me at ann@example.com"))
        sim.fail(401)
        with pytest.raises(UpstreamUnavailable):
            create(app, model="claude-haiku-4-5")
    text = log_path.read_text()
    assert SECRET_KEY not in text
    assert "ann@example.com" not in text and "[email]" in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["event"] for line in lines] == ["claude_api_call", "claude_api_error"]
    assert lines[0]["request_id"].startswith("req_")
    assert all(SECRET_KEY not in json.dumps(r.headers) for r in sim.requests)


def test_a_callers_timeout_shortens_the_deadline(make_app, sim: Simulator) -> None:
    app = make_app(use_clock=False, CLAUDE_DEADLINE=30, CLAUDE_MODELS=["claude-haiku-4-5"])
    sim.trickle(0.1, chunks=40)
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable):
        create(app, timeout=0.4)
    assert time.monotonic() - started < 0.9


def test_a_hung_model_times_out_per_attempt_counts_against_it_and_falls_back(tmp_path: Any,
                                                                             clock: FakeClock,
                                                                             claude_log: CallLog) -> None:
    from flask import Flask

    sim = Simulator(clock=clock)  # the simulator's waits run on the same fake clock
    sim.latency(1000, model="claude-opus-4-7")
    app = Flask("hung")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"],
                      CLAUDE_MAX_RETRIES=0, CLAUDE_ATTEMPT_TIMEOUT=10, CLAUDE_DEADLINE=60,
                      CLAUDE_BREAKER_MIN_CALLS=2, CLAUDE_LOG_PATH=str(tmp_path / "x.jsonl"))
    Claude(app, simulator=sim, clock=clock)
    for _ in range(2):
        assert create(app).model == "claude-sonnet-4-6"
    assert [e["model"] for e in claude_log.events("circuit_opened")] == ["claude-opus-4-7"]
    before = len(sim.requests_for("claude-opus-4-7"))
    assert create(app).model == "claude-sonnet-4-6"
    assert len(sim.requests_for("claude-opus-4-7")) == before  # skipped while open


# --- a request the SDK cannot build degrades with 400 invalid_request, never a 500 -----------------

_UNSENDABLE = {
    "lone surrogate in messages": {"messages": user_msg("bad \ud800 text")},
    "lone surrogate in system": {"system": "You are \udc00 helpful.", "messages": user_msg("hi")},
    "unserialisable object in params": {"messages": user_msg("hi"), "metadata": {"user_id": object()}},
}


@pytest.mark.parametrize("kind", ["create", "stream"])
@pytest.mark.parametrize("case", list(_UNSENDABLE))
def test_a_request_that_cannot_be_built_degrades_with_400_invalid_request(make_app, sim: Simulator,
                                                                          claude_log: CallLog, kind: str,
                                                                          case: str) -> None:
    from flask_claude import ai_feature, fallback_to

    app = make_app(CLAUDE_DAILY_BUDGET_USD=5.0)
    params = {"max_tokens": 50, **_UNSENDABLE[case]}

    @app.post("/ask")
    @ai_feature("ask")
    @fallback_to({"answer": None}, status=200)  # a fallback must not hide the caller's bad request
    def ask() -> Any:
        messages = app.extensions["claude"].messages
        if kind == "create":
            return {"answer": messages.create(**params).content[0].text}
        with messages.stream(**params) as stream:
            return {"answer": "".join(stream.text_stream)}

    response = app.test_client().post("/ask")
    assert response.status_code == 400
    assert response.headers["X-Claude-Degraded"] == "invalid_request"
    assert response.get_json() == {"error": "invalid_request",
                                   "message": "The request contains text or values that cannot be "
                                              "processed."}
    assert sim.requests == []  # nothing left the process
    [error] = claude_log.events("claude_api_error")
    assert error["error_type"] == "invalid_request" and error["cost_usd"] == 0.0
    assert error["detail"] in ("UnicodeEncodeError", "TypeError")
    assert "our_bug" not in error
    [degraded] = claude_log.events("feature_degraded")
    assert degraded["reason"] == "invalid_request" and degraded["status"] == 400
    with app.app_context():
        [budget] = app.extensions["claude"].budgets.usage_report()
    assert budget["reserved_usd"] == 0 and budget["spent_usd"] == 0  # the hold was released
    # not held against the model, not retried, no fallback
    assert claude_log.events("model_fallback") == []
    with app.app_context():
        assert app.extensions["claude"].breaker.state("claude-opus-4-7", 0.0) == "closed"


def test_an_unbuildable_request_outside_a_decorated_view_is_a_400_too(make_app, sim: Simulator) -> None:
    app = make_app()

    @app.post("/plain")
    def plain() -> Any:
        app.extensions["claude"].messages.count_tokens(model="claude-sonnet-4-6", messages=user_msg("\ud800"))
        return {}

    response = app.test_client().post("/plain")
    assert response.status_code == 400 and response.headers["X-Claude-Degraded"] == "invalid_request"
    assert sim.requests == []


# --- a stream is complete only when message_stop arrived --------------------------------------------

@pytest.mark.parametrize("how", ["stream", "create_stream_true"])
def test_a_stream_that_ends_without_message_stop_is_a_failed_stream(make_app, sim: Simulator, claude_log: CallLog,
                                                                    how: str) -> None:
    app = make_app()
    sim.end_stream(after_deltas=2)
    received: list[str] = []
    messages = app.extensions["claude"].messages
    with pytest.raises(UpstreamUnavailable), app.app_context():
        if how == "stream":
            with messages.stream(model="claude-sonnet-4-6", max_tokens=300,
                                 messages=user_msg("Tell me a long story.")) as stream:
                received.extend(stream.text_stream)
        else:
            for event in messages.create(model="claude-sonnet-4-6", max_tokens=300, stream=True,
                                         messages=user_msg("Tell me a long story.")):
                if event.type == "content_block_delta":
                    received.append(event.delta.text)
    assert len(received) == 2  # both deltas reached the view before the body ended
    assert claude_log.events("claude_api_call") == []  # not a success
    [line] = claude_log.events("claude_api_error")
    assert line["error_type"] == "incomplete_stream" and line["stop_reason"] is None
    # billed for what arrived: at least the estimate of the two deltas' text, not the 1 of message_start
    from flask_claude.tokens import estimate_tokens

    assert line["output_tokens"] >= max(2, estimate_tokens("".join(received)))
    assert line["cost_usd"] == pytest.approx((line["input_tokens"] * 3 + line["output_tokens"] * 15) / 1e6)


def test_an_incomplete_stream_counts_against_the_models_breaker(make_app, sim: Simulator, clock: FakeClock,
                                                                 claude_log: CallLog) -> None:
    # A stream's outcome is recorded once, at its end: two cut streams are 2 failures of 2 calls.
    app = make_app(CLAUDE_BREAKER_MIN_CALLS=2, CLAUDE_MODELS=["claude-sonnet-4-6"])
    for _ in range(2):
        sim.end_stream(after_deltas=1)
        with pytest.raises(UpstreamUnavailable), app.app_context(), app.extensions["claude"].messages.stream(
                model="claude-sonnet-4-6", max_tokens=100, messages=user_msg("hi")) as stream:
            stream.until_done()
    assert [e["model"] for e in claude_log.events("circuit_opened")] == ["claude-sonnet-4-6"]


def test_a_stream_trickling_past_its_deadline_is_cut_mid_way_and_billed(tmp_path: Any, clock: FakeClock,
                                                                        claude_log: CallLog) -> None:
    # The deadline is checked as each body chunk arrives (a per-read timeout never fires on a trickle);
    # the simulator's pauses run on the app's fake clock, so the body's chunks arrive 0.3 s apart.
    from flask import Flask

    from flask_claude.tokens import estimate_tokens

    sim = Simulator(clock=clock)
    sim.trickle(0.3, chunks=20)  # 6 s of body against a 1 s deadline
    app = Flask("stream_deadline")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=["claude-sonnet-4-6"], CLAUDE_MAX_RETRIES=0,
                      CLAUDE_STREAM_DEADLINE=1.0, CLAUDE_BREAKER_MIN_CALLS=2,
                      CLAUDE_LOG_PATH=str(tmp_path / "x.jsonl"))
    Claude(app, simulator=sim, clock=clock)
    story = " ".join(f"word{i}" for i in range(300))
    for _ in range(2):
        received: list[str] = []
        with pytest.raises(UpstreamUnavailable), app.app_context(), app.extensions["claude"].messages.stream(
                model="claude-sonnet-4-6", max_tokens=1000, messages=user_msg(f"echo: {story}")) as stream:
            received.extend(stream.text_stream)
        assert 0 < len("".join(received)) < len(story) / 2  # text arrived, then the body was cut early
    lines = claude_log.events("claude_api_error")
    assert [line["error_type"] for line in lines] == ["deadline_exceeded"] * 2
    assert lines[-1]["output_tokens"] >= estimate_tokens("".join(received))  # billed for what arrived
    assert claude_log.events("circuit_opened") == []  # our deadline, not the model's fault


# --- an upstream 429 that outlasts the retries degrades with the upstream's Retry-After, capped ------

@pytest.mark.parametrize(("upstream", "cap", "expected"), [(7, 20.0, "7"), (3600, 12.5, "13"), (None, 20.0, "8")])
def test_a_rate_limited_chain_degrades_with_retry_after(make_app, sim: Simulator, claude_log: CallLog,
                                                        upstream: float | None, cap: float, expected: str) -> None:
    from flask_claude import ai_feature, fallback_to

    app = make_app(CLAUDE_MAX_RETRIES=1, CLAUDE_RETRY_AFTER_CAP=cap)
    sim.fail(429, retry_after=upstream)

    @app.post("/ask")
    @ai_feature("ask")
    @fallback_to({"answer": None})
    def ask() -> Any:
        return {"answer": app.extensions["claude"].messages.create(
            max_tokens=50, messages=user_msg("hi")).content[0].text}

    @app.post("/plain")  # an undecorated view answers the same header
    def plain() -> Any:
        app.extensions["claude"].messages.create(max_tokens=50, messages=user_msg("hi"))
        return {}

    response = app.test_client().post("/ask")
    assert response.status_code == 503 and response.headers["X-Claude-Degraded"] == "upstream_unavailable"
    assert response.headers["Retry-After"] == expected
    [error] = claude_log.events("claude_api_error")
    assert error["status_code"] == 429

    response = app.test_client().post("/plain")
    assert response.status_code == 503 and response.headers["Retry-After"] == expected


def test_a_chain_ending_on_a_server_error_has_no_retry_after(make_app, sim: Simulator) -> None:
    app = make_app(CLAUDE_MAX_RETRIES=0)
    sim.fail(529, retry_after=5)

    @app.post("/plain")
    def plain() -> Any:
        app.extensions["claude"].messages.create(max_tokens=50, messages=user_msg("hi"))
        return {}

    response = app.test_client().post("/plain")
    assert response.status_code == 503 and "Retry-After" not in response.headers


def test_one_process_keeps_more_than_a_hundred_calls_in_flight() -> None:
    """httpx's default pool holds 100 connections: a 101st call would wait for a connection, not for
    Claude. The client is built with the SDK's limits (1,000), so 150 slow calls are all in flight."""
    import threading

    from flask import Flask

    from flask_claude import Claude
    from flask_claude.simulator import Simulator

    from .conftest import serving

    sim = Simulator()
    sim.latency(1.0)
    lock, gauge = threading.Lock(), {"now": 0, "most": 0}

    def counting(environ: Any, start_response: Any) -> Any:
        with lock:
            gauge["now"] += 1
            gauge["most"] = max(gauge["most"], gauge["now"])
        try:
            return list(sim(environ, start_response))
        finally:
            with lock:
                gauge["now"] -= 1

    with serving(counting) as url:  # type: ignore[arg-type]
        app = Flask("many_in_flight")
        app.config.update(CLAUDE_SIMULATE=True, CLAUDE_BASE_URL=url, CLAUDE_LOG_PATH="/dev/null",
                          CLAUDE_MAX_RETRIES=0, CLAUDE_MODELS=["claude-sonnet-4-6"])
        claude = Claude(app)

        @app.post("/ask")
        def ask() -> dict[str, Any]:
            claude.messages.create(max_tokens=16, messages=[{"role": "user", "content": "hi"}])
            return {}

        statuses: list[int] = []
        threads = [threading.Thread(target=lambda: statuses.append(app.test_client().post("/ask").status_code))
                   for _ in range(150)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert statuses == [200] * 150
    assert gauge["most"] > 100, gauge


def test_a_stream_abandoned_mid_iteration_is_billed_without_close(make_app, claude_log: CallLog) -> None:
    """The consumer breaks out of the loop and drops the stream without ``close()``: what arrived is
    billed when the iteration ends, as on the async stream (test_async.py), not lost."""
    app = make_app()
    with app.app_context():
        stream = app.extensions["claude"].messages.create(
            model="claude-sonnet-4-6", max_tokens=300, messages=user_msg("Tell me a long story."), stream=True)
        for event in stream:
            if getattr(event, "type", None) == "content_block_delta":
                break  # the generator is closed here; the stream is never closed
        [line] = claude_log.events("claude_api_call")
        assert line["stop_reason"] == "client_disconnected" and line["output_tokens"] >= 1 and line["cost_usd"] > 0
        stream.close()  # closing later bills nothing twice
    assert len(claude_log.events("claude_api_call")) == 1
