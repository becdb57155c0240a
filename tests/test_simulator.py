"""The simulator against the real anthropic SDK: if these pass, code tested on it meets real shapes.

Every test drives ``anthropic.Anthropic`` unmodified, in-process through ``Simulator.transport()``
or over loopback through ``Simulator.serve()``; none inspects the simulator's internals.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx2
import pytest

from flask_claude import tokens
from flask_claude.simulator import MESSAGE_OVERHEAD_TOKENS, Simulator, SimulatorServer, estimate_tokens

from .conftest import FakeClock

MODEL = "claude-sonnet-4-6"
KEY = "sk-test"


def transport_error(error: BaseException | None) -> BaseException | None:
    """The transport's error under a body read that failed: raw, or in the SDK's wrapper (builds of
    the SDK differ: some raise httpx's error as is, some as APIConnectionError/APITimeoutError from it)."""
    if isinstance(error, anthropic.APIConnectionError) and error.__cause__ is not None:
        return error.__cause__
    return error


@pytest.fixture(autouse=True)
def _no_anthropic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ANTHROPIC_"):
            monkeypatch.delenv(name)


@pytest.fixture
def sim() -> Simulator:
    return Simulator()


def sdk(sim: Simulator, **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key=KEY,
        base_url="http://simulator.local",
        max_retries=options.pop("max_retries", 0),
        http_client=anthropic.DefaultHttpxClient(transport=sim.transport()),
        **options,
    )


@pytest.fixture
def client(sim: Simulator) -> anthropic.Anthropic:
    return sdk(sim)


@pytest.fixture
def server(sim: Simulator) -> Iterator[SimulatorServer]:
    with sim.serve() as running:
        yield running


def text_of(message: Any) -> str:
    """The text of a reply (the simulator always answers with one text block)."""
    block = message.content[0]
    assert block.type == "text"
    return str(block.text)


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def ask(client: anthropic.Anthropic, text: str = "hello there", **kwargs: Any) -> anthropic.types.Message:
    kwargs.setdefault("model", MODEL)
    kwargs.setdefault("max_tokens", 200)
    return client.messages.create(messages=user(text), **kwargs)


def stream_text(client: anthropic.Anthropic, text: str = "hello there", **kwargs: Any) -> tuple[list[str], Any]:
    """Stream a reply; return the text deltas read and the final message (or the exception)."""
    pieces: list[str] = []
    try:
        with client.messages.stream(model=kwargs.pop("model", MODEL), max_tokens=200, messages=user(text)) as s:
            for piece in s.text_stream:
                pieces.append(piece)
            return pieces, s.get_final_message()
    except Exception as exc:
        return pieces, exc


# --------------------------------------------------------------------------- replies


def test_create_returns_a_message_with_usage_and_request_id(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=100, messages=user("echo: hello"))
    message = raw.parse()

    assert text_of(message) == "hello"
    assert (message.model, message.role, message.stop_reason) == (MODEL, "assistant", "end_turn")
    assert message.id.startswith("msg_")
    assert message.usage.input_tokens == estimate_tokens("echo: hello") + MESSAGE_OVERHEAD_TOKENS
    assert message.usage.output_tokens == estimate_tokens("hello")
    assert (message.usage.cache_creation_input_tokens, message.usage.cache_read_input_tokens) == (0, 0)
    assert raw.headers["content-type"] == "application/json"
    assert message._request_id == raw.headers["request-id"] and raw.headers["request-id"].startswith("req_sim_")


def test_replies_are_deterministic_per_prompt_and_seed(client: anthropic.Anthropic) -> None:
    first, again, other = ask(client, "a question"), ask(client, "a question"), ask(client, "another one")
    reseeded = ask(sdk(Simulator(seed=1)), "a question")

    assert text_of(first) == text_of(again) != text_of(other)
    assert text_of(reseeded) != text_of(first)
    assert first.usage.output_tokens == estimate_tokens(text_of(first)) > 5


def test_max_tokens_truncates_the_reply(client: anthropic.Anthropic) -> None:
    full = ask(client, "tell me a lot")
    cut = ask(client, "tell me a lot", max_tokens=3)

    assert full.usage.output_tokens > 3
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    assert text_of(full).startswith(text_of(cut))


def test_stop_sequences_end_the_reply(client: anthropic.Anthropic) -> None:
    message = ask(client, "echo: one two STOP three", stop_sequences=["STOP"])

    assert (text_of(message), message.stop_reason, message.stop_sequence) == ("one two ", "stop_sequence", "STOP")


def test_count_tokens_matches_the_input_usage_of_create(client: anthropic.Anthropic) -> None:
    messages: list[Any] = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": [{"type": "text", "text": "an answer"}]},
        {"role": "user", "content": "a follow-up question"},
    ]
    counted = client.messages.count_tokens(model=MODEL, system="be brief", messages=messages)
    created = client.messages.create(model=MODEL, max_tokens=50, system="be brief", messages=messages)

    expected = sum(map(estimate_tokens, ["be brief", "first question", "an answer", "a follow-up question"]))
    assert counted.input_tokens == created.usage.input_tokens == expected + 3 * MESSAGE_OVERHEAD_TOKENS


# --------------------------------------------------------------------------- reply rules

CLASSIFY = "Classify the sentiment. Answer with one word."


def test_a_reply_rule_answers_a_matching_system_prompt_with_realistic_usage(
    sim: Simulator, client: anthropic.Anthropic
) -> None:
    rule = sim.reply(CLASSIFY, "positive")

    labelled = ask(client, "I loved the new release.", system=CLASSIFY, max_tokens=20)
    with client.messages.stream(model=MODEL, max_tokens=20, system=CLASSIFY,
                                messages=user("I loved the new release.")) as stream:
        streamed = stream.get_final_message()
    unscripted = ask(client, "I loved the new release.", max_tokens=20)

    assert text_of(labelled) == text_of(streamed) == "positive"
    assert labelled.stop_reason == streamed.stop_reason == "end_turn"
    assert labelled.usage.output_tokens == estimate_tokens("positive") == 3
    assert labelled.usage.input_tokens == (estimate_tokens(CLASSIFY) + estimate_tokens("I loved the new release.")
                                           + MESSAGE_OVERHEAD_TOKENS)
    assert text_of(unscripted) != "positive" and unscripted.stop_reason == "max_tokens"  # canned prose, cut
    assert rule.matched == 2


def test_reply_rules_match_the_user_message_by_regex_call_functions_and_the_newest_wins(
    sim: Simulator, client: anthropic.Anthropic
) -> None:
    sim.reply(re.compile(r"\border #\d+"), lambda message: f"Order {message.split('#')[1]} ships today.")
    older = sim.reply("refund", "No refunds.")
    later = sim.reply("refund", "Refunds take a week.")
    sim.reply("refund", "Refunds take five days.", model="claude-opus-4-7")  # the newest, but for Opus only

    assert text_of(ask(client, "Where is order #42")) == "Order 42 ships today."
    assert text_of(ask(client, "Where is order 42")) != "Order 42 ships today."
    assert text_of(ask(client, "a refund please")) == "Refunds take a week."
    assert text_of(ask(client, "a refund please", model="claude-opus-4-7")) == "Refunds take five days."
    assert text_of(ask(client, "echo: a refund please")) == "a refund please"  # echo: is still echoed
    assert (older.matched, later.matched) == (0, 1)


def test_reply_rules_are_still_cut_by_max_tokens_and_stop_sequences_and_truncate_wins(
    sim: Simulator, client: anthropic.Anthropic
) -> None:
    sim.reply("long", "one two three four five six seven eight nine ten")

    assert ask(client, "long", max_tokens=3).stop_reason == "max_tokens"
    stopped = ask(client, "long", stop_sequences=["four"])
    assert (text_of(stopped), stopped.stop_reason, stopped.stop_sequence) == ("one two three ", "stop_sequence", "four")
    sim.truncate(times=1)
    assert ask(client, "long", max_tokens=40).usage.output_tokens == 40


def test_reply_rules_survive_reset_until_cleared_and_bad_patterns_are_refused(
    sim: Simulator, client: anthropic.Anthropic
) -> None:
    rule = sim.reply("ping", "pong")
    sim.reset()
    assert sim.replies == [rule] and text_of(ask(client, "ping")) == "pong"
    sim.clear_replies()
    assert sim.replies == [] and text_of(ask(client, "ping")) != "pong"
    with pytest.raises(ValueError, match="pattern"):
        sim.reply("", "anything")
    with pytest.raises(ValueError, match="text"):
        sim.reply("ping", 42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- streaming


def test_stream_helper_gives_the_same_text_and_usage_as_create(client: anthropic.Anthropic) -> None:
    created = ask(client)
    pieces, final = stream_text(client)

    assert len(pieces) > 1 and "".join(pieces) == text_of(created)
    assert text_of(final) == text_of(created)
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == created.usage.input_tokens
    assert final.usage.output_tokens == created.usage.output_tokens


def test_create_stream_true_sends_the_named_event_sequence(client: anthropic.Anthropic) -> None:
    events = list(client.messages.create(model=MODEL, max_tokens=200, messages=user("hello there"), stream=True))
    kinds = [event.type for event in events]

    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"} and len(kinds) > 6
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and delta.type == "message_delta"
    assert start.message.usage.output_tokens == 1 and start.message.stop_reason is None
    assert delta.usage.output_tokens == ask(client).usage.output_tokens
    assert delta.delta.stop_reason == "end_turn"


# --------------------------------------------------------------------------- batches


def test_batch_create_poll_and_results_end_to_end() -> None:
    sim = Simulator(batch_polls_until_done=2)
    client = sdk(sim)
    batch = client.messages.batches.create(
        requests=[
            {"custom_id": "ok", "params": {"model": MODEL, "max_tokens": 50, "messages": user("echo: batched")}},
            {"custom_id": "bad", "params": {"model": MODEL, "messages": user("no max_tokens")}},  # type: ignore[typeddict-item]
        ]
    )
    assert batch.id.startswith("msgbatch_") and batch.type == "message_batch"
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert batch.request_counts.processing == 2 and batch.ended_at is None

    polled = client.messages.batches.retrieve(batch.id)
    assert polled.processing_status == "in_progress"
    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended" and ended.ended_at is not None
    assert (ended.request_counts.succeeded, ended.request_counts.errored, ended.request_counts.processing) == (1, 1, 0)
    assert ended.results_url and ended.results_url.endswith(f"/v1/messages/batches/{batch.id}/results")

    results = {line.custom_id: line.result for line in client.messages.batches.results(batch.id)}
    ok, bad = results["ok"], results["bad"]
    assert ok.type == "succeeded" and text_of(ok.message) == "batched"
    assert ok.message.usage.service_tier == "batch"
    assert bad.type == "errored" and bad.error.error.type == "invalid_request_error"
    assert [b.id for b in client.messages.batches.list()] == [batch.id]


def test_batch_cancel_ends_with_every_request_canceled(client: anthropic.Anthropic) -> None:
    batch = client.messages.batches.create(
        requests=[{"custom_id": "a", "params": {"model": MODEL, "max_tokens": 5, "messages": user("hi")}}]
    )
    assert client.messages.batches.cancel(batch.id).processing_status == "canceling"

    ended = client.messages.batches.retrieve(batch.id)
    assert ended.processing_status == "ended" and ended.request_counts.canceled == 1
    assert [line.result.type for line in client.messages.batches.results(batch.id)] == ["canceled"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve("msgbatch_unknown")


# --------------------------------------------------------------------------- status faults


def test_fail_529_is_an_overloaded_error_with_retry_after_headers(sim: Simulator, client: anthropic.Anthropic) -> None:
    sim.fail(529, retry_after=7, retry_after_ms=7000)

    with pytest.raises(anthropic.OverloadedError) as caught:
        ask(client)

    error = caught.value
    assert error.status_code == 529 and error.type == "overloaded_error"
    assert error.response.headers["retry-after"] == "7"
    assert error.response.headers["retry-after-ms"] == "7000"
    assert error.request_id and error.request_id.startswith("req_sim_")
    assert error.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": error.request_id,
    }


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
        (413, anthropic.APIStatusError, "request_too_large"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (503, anthropic.InternalServerError, "api_error"),
        (504, anthropic.InternalServerError, "timeout_error"),
    ],
)
def test_each_status_gets_the_api_error_type(
    sim: Simulator, client: anthropic.Anthropic, status: int, error_class: type[Exception], error_type: str
) -> None:
    sim.fail(status, times=1)

    with pytest.raises(error_class) as caught:
        ask(client)

    assert isinstance(caught.value, anthropic.APIStatusError)
    assert caught.value.status_code == status and caught.value.type == error_type


def test_fail_times_is_used_up_and_then_requests_succeed(sim: Simulator, client: anthropic.Anthropic) -> None:
    fault = sim.fail(529, times=2)

    outcomes = []
    for _ in range(3):
        try:
            ask(client)
            outcomes.append("ok")
        except anthropic.OverloadedError:
            outcomes.append("529")

    assert outcomes == ["529", "529", "ok"]
    assert fault.fired == 2 and fault.remaining == 0 and sim.faults == []


def test_fail_rate_half_fails_exactly_every_other_request(sim: Simulator, client: anthropic.Anthropic) -> None:
    sim.fail(503, rate=0.5)

    outcomes = []
    for _ in range(10):
        try:
            ask(client)
            outcomes.append(True)
        except anthropic.InternalServerError:
            outcomes.append(False)

    assert outcomes == [False, True] * 5


def test_fail_rate_holds_under_concurrent_requests(sim: Simulator, client: anthropic.Anthropic) -> None:
    sim.fail(529, rate=0.25)

    def attempt(_: int) -> bool:
        try:
            ask(client)
            return True
        except anthropic.OverloadedError:
            return False

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(attempt, range(40)))

    assert outcomes.count(False) == 10 and len(sim.requests) == 40


def test_faults_can_target_one_model_and_the_sdk_retry_honours_retry_after_ms(sim: Simulator) -> None:
    sim.fail(529, model="claude-opus-4-7", times=1, retry_after_ms=1)
    client = sdk(sim, max_retries=1)

    assert ask(client, model=MODEL).stop_reason == "end_turn"  # other model: untouched, fault kept
    raw = client.messages.with_raw_response.create(model="claude-opus-4-7", max_tokens=10, messages=user("hi"))

    assert raw.retries_taken == 1 and raw.parse().model == "claude-opus-4-7"
    assert [r.model for r in sim.requests] == [MODEL, "claude-opus-4-7", "claude-opus-4-7"]


def test_status_faults_leave_count_tokens_alone_unless_asked(sim: Simulator, client: anthropic.Anthropic) -> None:
    fault = sim.fail(529, times=1)
    assert client.messages.count_tokens(model=MODEL, messages=user("hi")).input_tokens > 0
    assert fault.fired == 0

    sim.fail(429, endpoint="count_tokens", times=1)
    with pytest.raises(anthropic.RateLimitError):
        client.messages.count_tokens(model=MODEL, messages=user("hi"))


# --------------------------------------------------------------------------- stream faults


def test_stream_error_is_a_200_api_status_error_of_type_overloaded(sim: Simulator, client: anthropic.Anthropic) -> None:
    full, _ = stream_text(client)
    sim.stream_error(after_deltas=2, times=1)

    pieces, error = stream_text(client)

    assert type(error) is anthropic.APIStatusError  # not OverloadedError: the status was already 200
    assert error.status_code == 200 and error.type == "overloaded_error"
    assert error.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert pieces == full[:2]


def test_drop_stream_raises_remote_protocol_error_mid_read(sim: Simulator, client: anthropic.Anthropic) -> None:
    fault = sim.drop_stream(after_deltas=1, times=1)
    assert ask(client).stop_reason == "end_turn"  # non-streaming requests pass and keep the fault
    assert fault.fired == 0

    pieces, error = stream_text(client)

    assert isinstance(transport_error(error), httpx2.RemoteProtocolError) and len(pieces) == 1
    events = client.messages.create(model=MODEL, max_tokens=200, messages=user("hello there"), stream=True)
    assert [e.type for e in events][-1] == "message_stop"  # used up


def test_drop_stream_on_create_stream_true(sim: Simulator, client: anthropic.Anthropic) -> None:
    sim.drop_stream(after_deltas=2)
    seen: list[str] = []

    with pytest.raises((httpx2.RemoteProtocolError, anthropic.APIConnectionError)) as raised:
        for event in client.messages.create(model=MODEL, max_tokens=200, messages=user("hi"), stream=True):
            seen.append(event.type)
    assert isinstance(transport_error(raised.value), httpx2.RemoteProtocolError)

    assert seen == ["message_start", "content_block_start", "content_block_delta", "content_block_delta"]


def test_end_stream_ends_the_body_cleanly_without_message_stop(sim: Simulator, client: anthropic.Anthropic) -> None:
    fault = sim.end_stream(after_deltas=2, times=1)
    events = [e.type for e in client.messages.create(model=MODEL, max_tokens=200, messages=user("hi"), stream=True)]
    assert events == ["message_start", "content_block_start", "content_block_delta", "content_block_delta"]
    assert fault.fired == 1
    events = [e.type for e in client.messages.create(model=MODEL, max_tokens=200, messages=user("hi"), stream=True)]
    assert events[-1] == "message_stop"  # used up


def test_truncate_uses_the_whole_max_tokens(sim: Simulator, client: anthropic.Anthropic) -> None:
    sim.truncate(times=2)

    message = ask(client, "echo: short", max_tokens=40)
    _, streamed = stream_text(client, "echo: short")

    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 40
    assert streamed.stop_reason == "max_tokens" and streamed.usage.output_tokens == 200
    assert ask(client, "echo: short").stop_reason == "end_turn"


# --------------------------------------------------------------------------- prompt caching


SYSTEM = "You are a careful assistant. " * 20
PREFIX_TOKENS = estimate_tokens(SYSTEM)


def cached_system(ttl: str | None = None) -> list[Any]:
    cache_control: dict[str, Any] = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return [{"type": "text", "text": SYSTEM, "cache_control": cache_control}]


def test_cache_creation_then_read(client: anthropic.Anthropic) -> None:
    prefix = PREFIX_TOKENS
    remainder = estimate_tokens("hello there") + MESSAGE_OVERHEAD_TOKENS

    first = ask(client, system=cached_system()).usage
    second = ask(client, system=cached_system()).usage
    _, streamed = stream_text(client)  # no cache_control: nothing cached, nothing read

    assert (first.cache_creation_input_tokens, first.cache_read_input_tokens, first.input_tokens) == (
        prefix,
        0,
        remainder,
    )
    assert first.cache_creation and first.cache_creation.ephemeral_5m_input_tokens == prefix
    assert (second.cache_creation_input_tokens, second.cache_read_input_tokens, second.input_tokens) == (
        0,
        prefix,
        remainder,
    )
    assert streamed.usage.cache_read_input_tokens == 0


def test_cache_1h_ttl_is_reported_apart_and_entries_expire() -> None:
    clock = FakeClock()
    client = sdk(Simulator(clock=clock))

    hour = ask(client, system=cached_system("1h")).usage
    assert hour.cache_creation and hour.cache_creation.ephemeral_1h_input_tokens == hour.cache_creation_input_tokens
    assert hour.cache_creation.ephemeral_5m_input_tokens == 0

    ask(client, system=cached_system())
    clock.now += 301
    assert ask(client, system=cached_system()).usage.cache_creation_input_tokens == PREFIX_TOKENS  # 5 min are up
    assert ask(client, system=cached_system("1h")).usage.cache_read_input_tokens == PREFIX_TOKENS  # 1 h is not


def test_cache_is_per_model_and_streams_report_it_in_message_start(client: anthropic.Anthropic) -> None:
    ask(client, system=cached_system())
    other = ask(client, system=cached_system(), model="claude-haiku-4-5").usage
    events = list(
        client.messages.create(model=MODEL, max_tokens=50, system=cached_system(), messages=user("hi"), stream=True)
    )

    assert (other.cache_creation_input_tokens, other.cache_read_input_tokens) == (PREFIX_TOKENS, 0)
    start = events[0]
    assert start.type == "message_start" and start.message.usage.cache_read_input_tokens == PREFIX_TOKENS


# --------------------------------------------------------------------------- latency and trickle


def test_latency_longer_than_the_read_timeout_times_out_without_waiting() -> None:
    clock = FakeClock()
    sim = Simulator(clock=clock)
    client = sdk(sim, timeout=2.0)
    sim.latency(5)

    with pytest.raises(anthropic.APITimeoutError):
        ask(client)

    sim.latency(1.5)
    assert ask(client).stop_reason == "end_turn"
    assert clock.sleeps == [2.0, 1.5]


def test_trickle_is_streamed_lazily_while_the_client_reads() -> None:
    clock = FakeClock()
    sim = Simulator(clock=clock)
    sim.trickle(0.5, chunks=4)
    sleeps_seen_per_chunk = []

    with httpx2.Client(transport=sim.transport(), base_url="http://simulator.local") as http:
        body = {"model": MODEL, "max_tokens": 100, "messages": user("hello there")}
        with http.stream("POST", "/v1/messages", json=body) as response:
            for _ in response.iter_raw():
                sleeps_seen_per_chunk.append(len(clock.sleeps))

    assert sleeps_seen_per_chunk == [0, 1, 2, 3]


def test_trickle_takes_real_time_past_a_per_read_timeout(sim: Simulator) -> None:
    sim.trickle(0.01, chunks=6)
    client = sdk(sim, timeout=0.5)

    started = time.monotonic()
    ask(client)
    _, final = stream_text(client)

    assert time.monotonic() - started >= 0.1  # 2 bodies x 5 gaps x 10 ms, each gap under the timeout
    assert final.stop_reason == "end_turn"


def test_a_trickle_gap_beyond_the_read_timeout_fails_mid_stream() -> None:
    sim = Simulator(clock=FakeClock())
    sim.trickle(3, chunks=5)

    _, error = stream_text(sdk(sim, timeout=1.0))

    assert isinstance(transport_error(error), httpx2.ReadTimeout)


# --------------------------------------------------------------------------- raw HTTP


@pytest.fixture
def http(sim: Simulator) -> Iterator[httpx2.Client]:
    with httpx2.Client(transport=sim.transport(), base_url="http://simulator.local") as raw:
        yield raw


def test_unknown_path_is_a_404_in_the_api_error_shape(http: httpx2.Client) -> None:
    response = http.get("/v1/nothing-here")

    assert response.status_code == 404
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    assert body["request_id"] == response.headers["request-id"]


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        json.dumps({"model": MODEL, "messages": user("hi")}).encode(),
        json.dumps({"max_tokens": 5, "messages": user("hi")}).encode(),
        json.dumps({"model": MODEL, "max_tokens": 5}).encode(),
        json.dumps({"model": MODEL, "max_tokens": 0, "messages": user("hi")}).encode(),
    ],
)
def test_malformed_create_is_a_400_invalid_request(http: httpx2.Client, content: bytes) -> None:
    response = http.post("/v1/messages", content=content, headers={"content-type": "application/json"})

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# --------------------------------------------------------------------------- recorded requests


def test_recorded_requests_hold_bodies_but_never_the_key(sim: Simulator, client: anthropic.Anthropic) -> None:
    ask(client, "first", model="claude-haiku-4-5")
    stream_text(client, "second")
    with httpx2.Client(transport=sim.transport()) as http:
        http.post("http://simulator.local/v1/messages", json={"model": "x"}, headers={"x-api-key": KEY})

    recorded = sim.requests
    assert [(r.method, r.path, r.model) for r in recorded] == [
        ("POST", "/v1/messages", "claude-haiku-4-5"),
        ("POST", "/v1/messages", MODEL),
        ("POST", "/v1/messages", "x"),
    ]
    assert recorded[0].body["messages"] == user("first") and recorded[1].stream
    assert recorded[0].headers["authorization"] == "[redacted]"
    assert recorded[2].headers["x-api-key"] == "[redacted]"
    assert KEY not in repr(recorded)
    assert [r.model for r in sim.requests_for(MODEL)] == [MODEL]

    sim.clear_requests()
    assert sim.requests == []


def test_reset_clears_faults_requests_and_cache(sim: Simulator, client: anthropic.Anthropic) -> None:
    ask(client, system=cached_system())
    sim.fail(529)
    sim.latency(1)

    sim.reset()

    assert sim.requests == [] and sim.faults == []
    assert ask(client, system=cached_system()).usage.cache_creation_input_tokens == PREFIX_TOKENS


def test_estimate_tokens_is_the_packages_a_third_of_the_characters_rounded_up() -> None:
    assert estimate_tokens is tokens.estimate_tokens  # one estimate: the simulator's usage is the client's
    assert [estimate_tokens(t) for t in ("", "a", "abc", "abcd", "x" * 400)] == [0, 1, 1, 2, 134]
    assert estimate_tokens("y" * 4001) == math.ceil(4001 / 3)


# --------------------------------------------------------------------------- loopback server


def test_server_mode_create_stream_and_batches(sim: Simulator, server: SimulatorServer) -> None:
    client = anthropic.Anthropic(api_key=KEY, base_url=server.url, max_retries=0)

    assert server.url == f"http://127.0.0.1:{server.port}" and server.port > 0
    created = ask(client, "echo: over the wire")
    pieces, final = stream_text(client, "echo: over the wire and back again")
    batch = client.messages.batches.create(
        requests=[{"custom_id": "a", "params": {"model": MODEL, "max_tokens": 20, "messages": user("echo: b")}}]
    )
    results = list(client.messages.batches.results(batch.id))  # results_url points back at the server

    assert text_of(created) == "over the wire" and created._request_id
    assert "".join(pieces) == text_of(final) == "over the wire and back again"
    assert final.usage.output_tokens == estimate_tokens("over the wire and back again")
    assert results[0].result.type == "succeeded" and text_of(results[0].result.message) == "b"
    assert KEY not in repr(sim.requests)


def test_server_mode_faults(sim: Simulator, server: SimulatorServer) -> None:
    client = anthropic.Anthropic(api_key=KEY, base_url=server.url, max_retries=0)
    sim.fail(529, times=1, retry_after=2)
    sim.drop_stream(after_deltas=2, times=1)
    sim.stream_error(after_deltas=1, times=1)

    with pytest.raises(anthropic.OverloadedError) as overloaded:
        ask(client)
    dropped_pieces, dropped = stream_text(client)
    errored_pieces, errored = stream_text(client)

    assert overloaded.value.response.headers["retry-after"] == "2"
    assert isinstance(transport_error(dropped), httpx2.RemoteProtocolError) and len(dropped_pieces) == 2
    assert isinstance(errored, anthropic.APIStatusError) and errored.status_code == 200
    assert errored.type == "overloaded_error" and len(errored_pieces) == 1
    assert stream_text(client)[1].stop_reason == "end_turn"


# --------------------------------------------------------------------------- async


def test_the_transport_also_serves_the_async_client(sim: Simulator) -> None:
    async def scenario() -> tuple[str, Exception | None]:
        client = anthropic.AsyncAnthropic(
            api_key=KEY,
            base_url="http://simulator.local",
            max_retries=0,
            http_client=anthropic.DefaultAsyncHttpxClient(transport=sim.transport()),
        )
        message = await client.messages.create(model=MODEL, max_tokens=20, messages=user("echo: async"))
        sim.drop_stream(times=1)
        try:
            async with client.messages.stream(model=MODEL, max_tokens=200, messages=user("hi")) as stream:
                async for _ in stream.text_stream:
                    pass
        except (httpx2.RemoteProtocolError, anthropic.APIConnectionError) as exc:
            return text_of(message), exc
        return text_of(message), None

    text, error = asyncio.run(scenario())

    assert text == "async" and isinstance(transport_error(error), httpx2.RemoteProtocolError)


# --------------------------------------------------------------------------- the pytest plugin


USER_SUITE = '''
import anthropic
import pytest
from flask import Flask

from flask_claude import Claude

@pytest.fixture(scope="module")
def app():
    app = Flask("user_app")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_FLAGS="static", CLAUDE_LOG_PATH="/dev/null")
    Claude(app)
    app.extensions["claude"].simulator.reply("capital of France", "Paris.")  # the app's own set-up
    return app

def ask(app, text):
    with app.app_context():
        message = app.extensions["claude"].messages.create(
            model="claude-haiku-4-5", max_tokens=20, messages=[{"role": "user", "content": text}])
    return message.content[0].text

def test_one_overrides_and_adds(app, claude_sim):
    claude_sim.reply("capital of France", "Lyon.")
    claude_sim.reply("ping", "pong")
    assert (ask(app, "The capital of France?"), ask(app, "ping")) == ("Lyon.", "pong")

def test_two_sees_the_apps_rules_only(app, claude_sim):
    assert ask(app, "The capital of France?") == "Paris."
    assert ask(app, "ping") != "pong"
    assert [rule.text for rule in claude_sim.replies] == ["Paris."]
'''


def test_the_claude_sim_fixture_keeps_the_apps_reply_rules_and_removes_a_tests(tmp_path: Any) -> None:
    """A user's suite, run by pytest with the flask-claude plugin: one shared app, two tests."""
    (tmp_path / "test_user_app.py").write_text(USER_SUITE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user_app.py"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
