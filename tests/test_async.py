"""Async views and ``claude.async_messages`` through Flask's async support (asgiref), the real
``anthropic.AsyncAnthropic`` and the simulator: the same behaviour as sync views, ``asyncio.gather``
under budgets and ``max_calls``, cancellation, and nothing reused across event loops."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import anthropic
import pytest
from flask import Flask, request

from flask_claude import Claude, UpstreamUnavailable, ai_feature, budgeted, claude_called, fallback_to
from flask_claude.context import CallScope
from flask_claude.errors import CallLimitExceeded
from flask_claude.flags import StaticFlags
from flask_claude.simulator import Simulator
from flask_claude.testing import CallLog
from flask_claude.tokens import upper_bound_tokens

from .conftest import SECRET_KEY, FakeClock, free_port, user_msg

FALLBACK = {"answer": None, "notice": "paused"}
_apps = itertools.count()  # a storage prefix per app: two apps on one Redis never share a budget


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=time.time())  # anchored at the real now


def make(sim: Simulator, clock: FakeClock | None, *, storage_uri: str = "memory://", **config: Any) -> Flask:
    app = Flask("async_app")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"],
                      CLAUDE_MAX_RETRIES=1, CLAUDE_STORAGE_URI=storage_uri, CLAUDE_FLAGS=StaticFlags(),
                      CLAUDE_LOG_PATH="/dev/null", CLAUDE_STORAGE_PREFIX=f"t{next(_apps)}")
    app.config.update(config)
    claude = Claude(app, simulator=sim, **({"clock": clock} if clock is not None else {}))

    @claude.user_loader
    def user() -> str:
        return request.headers.get("X-Test-User", "alice")

    return app


def route(app: Flask, view: Callable[..., Any], *decorators: Callable[[Any], Any], path: str = "/ask") -> None:
    for decorator in reversed(decorators):
        view = decorator(view)
    app.add_url_rule(path, endpoint=path, view_func=view, methods=["POST"])


def outcome(response: Any) -> tuple[Any, ...]:
    return (response.status_code, response.get_json(), response.headers.get("X-Claude-Degraded"),
            response.headers.get("Retry-After"))


# --- the happy path ---------------------------------------------------------------------------------

@pytest.fixture(params=["memory", "redis"])
def storage(request: pytest.FixtureRequest) -> str:
    """Each test on both stores; on Redis every app gets its own key prefix (see ``make``)."""
    return "memory://" if request.param == "memory" else str(request.getfixturevalue("redis_url"))


def test_async_view_create_stream_and_count_tokens(storage: str, sim: Simulator, clock: FakeClock,
                                                   claude_log: CallLog) -> None:
    app = make(sim, clock, storage_uri=storage)

    async def ask() -> Any:
        claude = Claude()
        msg = await claude.async_messages.create(max_tokens=60, messages=user_msg("echo: hello async"))
        async with claude.async_messages.stream(max_tokens=60, messages=user_msg("Tell me a story.")) as stream:
            streamed = "".join([text async for text in stream.text_stream])
        raw = await claude.async_messages.create(max_tokens=30, stream=True, messages=user_msg("hi"))
        kinds = [event.type async for event in raw]
        counted = await claude.async_messages.count_tokens(messages=user_msg("How many tokens?"))
        assert isinstance(msg, anthropic.types.Message)
        return {"answer": msg.content[0].text, "streamed": streamed, "kinds": [kinds[0], kinds[-1]],
                "tokens": counted.input_tokens}

    route(app, ask, ai_feature("ask", max_tokens=100), budgeted(requests="10/minute", usd="1/day"),
          fallback_to(FALLBACK))
    signalled: list[dict[str, Any]] = []

    def on_call(sender: Any, **fields: Any) -> None:
        signalled.append(fields)

    with claude_called.connected_to(on_call, sender=app):
        response = app.test_client().post("/ask")
    assert len(signalled) == 3 and all(f["feature"] == "ask" for f in signalled)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["answer"] == "hello async" and body["streamed"] and body["tokens"] > 0
    assert body["kinds"] == ["message_start", "message_stop"]
    assert response.headers["RateLimit-Limit"] == "10" and "X-Claude-Degraded" not in response.headers
    lines = claude_log.events("claude_api_call")
    assert len(lines) == 3  # create, stream, raw stream: one line each (count_tokens is free)
    assert all(line["feature"] == "ask" and line["route"] == "/ask" and line["cost_usd"] > 0 for line in lines)
    assert {line["model"] for line in lines} == {"claude-opus-4-7"}


def test_async_retries_with_jitter_and_fallback(sim: Simulator, clock: FakeClock, claude_log: CallLog) -> None:
    app = make(sim, clock, CLAUDE_MAX_RETRIES=2, CLAUDE_BREAKER_MIN_CALLS=50, CLAUDE_RETRY_AFTER_CAP=2.5)
    sim.fail(529, model="claude-opus-4-7")
    sim.fail(429, model="claude-sonnet-4-6", retry_after=3600, times=1)

    async def ask() -> Any:
        msg = await Claude().async_messages.create(max_tokens=50, messages=user_msg("hi"))
        return {"model": msg.model}

    route(app, ask, ai_feature("ask"))
    assert app.test_client().post("/ask").get_json() == {"model": "claude-sonnet-4-6"}
    assert len(sim.requests_for("claude-opus-4-7")) == 3
    # two jittered backoffs on opus, then sonnet's retry-after of an hour capped at 2.5 s
    assert len(clock.sleeps) == 3 and clock.sleeps[2] <= 2.5 and len(set(clock.sleeps[:2])) == 2
    [line] = claude_log.events("claude_api_call")
    assert line["fallback_from"] == "claude-opus-4-7" and line["retries"] == 3
    assert [e["to_model"] for e in claude_log.events("model_fallback")] == ["claude-sonnet-4-6"]


# --- every degradation reason: an async view answers what the same sync view answers ---------------

def _hold_the_budget(app: Flask) -> None:
    """A worker that reserved the whole daily budget and died: the room is held, not spent."""
    state = app.extensions["claude"]
    state.budgets.begin(CallScope(feature="ask", user="ghost"), ["claude-opus-4-7"],
                        {"messages": user_msg("x" * 300)}, 440)  # ~$0.0114 of $0.012


CASES: dict[str, dict[str, Any]] = {
    "feature_disabled": {"setup": lambda app, sim: app.extensions["claude"].flags.set("ai-ask", False)},
    "budget_exhausted": {"config": {"CLAUDE_DAILY_BUDGET_USD": 0.0001}},
    "budget_busy": {"config": {"CLAUDE_DAILY_BUDGET_USD": 0.012}, "setup": lambda app, sim: _hold_the_budget(app)},
    "budget_exceeded": {"budget": {"usd": "0.0001/day"}},
    "rate_limited": {"budget": {"requests": "1/minute"}, "repeat": 2},
    "input_too_large": {"feature": {"max_input_chars": 5}},
    "upstream_unavailable": {"setup": lambda app, sim: sim.fail(529)},
    "upstream_429": {"setup": lambda app, sim: sim.fail(429, retry_after=7)},
    "incomplete_stream": {"setup": lambda app, sim: sim.end_stream(after_deltas=1), "stream": True},
    "deadline_exceeded": {"config": {"CLAUDE_DEADLINE": 0.3, "CLAUDE_MODELS": ["claude-haiku-4-5"]},
                          "setup": lambda app, sim: sim.trickle(0.05, chunks=40), "real_clock": True},
    "truncated": {"feature": {"require_complete": True}, "setup": lambda app, sim: sim.truncate()},
    "invalid_output": {"feature": {"validate": lambda message: False}},
    "max_calls_exceeded": {"feature": {"max_calls": 1}, "calls": 2},
    "unknown_model": {"params": {"model": "claude-nope-1"}},
    "storage_unavailable": {"storage": "dead-redis", "config": {"CLAUDE_STORAGE_FAILURE": "closed",
                                                                "CLAUDE_DAILY_BUDGET_USD": 5}},
    "config_error": {"params": {"model": "claude-sonnet-4-6", "task_budget": 1000}},
    "invalid_request": {"params": {"messages": user_msg("bad \ud800")}},
}
EXPECTED = {
    "feature_disabled": (503, "feature_disabled"), "budget_exhausted": (503, "budget_exhausted"),
    "budget_busy": (503, "budget_busy"), "budget_exceeded": (429, "budget_exceeded"),
    "rate_limited": (429, "rate_limited"), "input_too_large": (413, "input_too_large"),
    "upstream_unavailable": (503, "upstream_unavailable"), "upstream_429": (503, "upstream_unavailable"),
    "incomplete_stream": (503, "upstream_unavailable"), "deadline_exceeded": (503, "deadline_exceeded"),
    "truncated": (503, "truncated"), "invalid_output": (503, "invalid_output"),
    "max_calls_exceeded": (503, "max_calls_exceeded"), "unknown_model": (503, "unknown_model"),
    "storage_unavailable": (503, "storage_unavailable"), "config_error": (503, "config_error"),
    "invalid_request": (400, "invalid_request"),
}


def _run_case(name: str, kind: str, sim: Simulator, clock: FakeClock,
              storage: str) -> tuple[tuple[Any, ...], list[str]]:
    case = CASES[name]
    sim.reset()
    if case.get("storage") == "dead-redis":
        storage = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app = make(sim, None if case.get("real_clock") else clock, storage_uri=storage, CLAUDE_MAX_RETRIES=0,
               **case.get("config", {}))
    params = {"max_tokens": 50, "messages": user_msg("Summarise the plot of Hamlet.")} | case.get("params", {})
    calls = case.get("calls", 1)
    streaming = case.get("stream", False)

    def sync_view() -> Any:
        messages = Claude().messages
        for _ in range(calls):
            if streaming:
                with messages.stream(**params) as stream:
                    text = "".join(stream.text_stream)
            else:
                text = messages.create(**params).content[0].text
        return {"answer": text}

    async def async_view() -> Any:
        messages = Claude().async_messages
        for _ in range(calls):
            if streaming:
                async with messages.stream(**params) as stream:
                    text = "".join([t async for t in stream.text_stream])
            else:
                text = (await messages.create(**params)).content[0].text
        return {"answer": text}

    decorators = [ai_feature("ask", **case.get("feature", {}))]
    if "budget" in case:
        decorators.append(budgeted(**case["budget"]))
    decorators.append(fallback_to(FALLBACK))
    route(app, sync_view if kind == "sync" else async_view, *decorators)
    if "setup" in case:
        case["setup"](app, sim)
    for _ in range(case.get("repeat", 1)):
        response = app.test_client().post("/ask")
    assert "Traceback" not in response.get_data(as_text=True)
    assert SECRET_KEY not in response.get_data(as_text=True)
    return outcome(response), [r.model or "" for r in sim.requests]


@pytest.mark.parametrize("name", list(CASES))
def test_each_degradation_reason_is_the_same_for_async_and_sync_views(name: str, storage: str, sim: Simulator,
                                                                      clock: FakeClock) -> None:
    async_outcome, async_requests = _run_case(name, "async", sim, clock, storage)
    sync_outcome, sync_requests = _run_case(name, "sync", sim, clock, storage)
    assert async_outcome == sync_outcome
    assert async_requests == sync_requests  # the same attempts reached the "API"
    status, reason = EXPECTED[name]
    assert async_outcome[0] == status and async_outcome[2] == reason
    if name in ("budget_busy", "rate_limited", "budget_exceeded"):
        assert async_outcome[3] is not None
    if name == "upstream_429":
        assert async_outcome[3] == "7"


ORDERS = list(itertools.permutations(("feature", "budget", "fallback")))


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_stacking_order_does_not_matter_for_async_views(order: tuple[str, ...], sim: Simulator,
                                                       clock: FakeClock) -> None:
    app = make(sim, clock, CLAUDE_ADMISSION="before_view")  # a refused input still counts as a request
    decorators = {"feature": ai_feature("ask", max_input_chars=20), "budget": budgeted(requests="2/minute"),
                  "fallback": fallback_to(FALLBACK)}

    async def ask() -> Any:
        text = request.get_json()["text"]
        msg = await Claude().async_messages.create(max_tokens=50, messages=user_msg(text))
        return {"answer": msg.content[0].text}

    route(app, ask, *[decorators[name] for name in order])
    client = app.test_client()
    results = [outcome(client.post("/ask", json={"text": "echo: ok"}))[:3],
               outcome(client.post("/ask", json={"text": "x" * 30}))[:3],
               outcome(client.post("/ask", json={"text": "echo: ok"}))[:3]]
    assert [r[0] for r in results] == [200, 413, 429]
    assert results[0][1] == {"answer": "ok"}
    assert [r[2] for r in results] == [None, "input_too_large", "rate_limited"]


def test_an_async_fallback_callable_answers_the_degraded_request(sim: Simulator, clock: FakeClock) -> None:
    app = make(sim, clock, CLAUDE_MAX_RETRIES=0)
    sim.fail(529)

    async def plain_answer(name: str) -> Any:
        await asyncio.sleep(0)
        return {"answer": f"no AI for {name} right now"}

    async def ask(name: str) -> Any:
        msg = await Claude().async_messages.create(max_tokens=50, messages=user_msg(name))
        return {"answer": msg.content[0].text}

    app.add_url_rule("/ask/<name>", view_func=fallback_to(plain_answer)(ai_feature("ask")(ask)), methods=["POST"])
    response = app.test_client().post("/ask/bob")
    assert outcome(response)[:3] == (503, {"answer": "no AI for bob right now"}, "upstream_unavailable")


# --- asyncio.gather under budgets and max_calls ------------------------------------------------------

def _params(i: int) -> dict[str, Any]:
    return {"max_tokens": 200, "messages": user_msg(f"Write a poem about the number {i}.")}


def test_gather_of_five_under_a_budget_that_holds_three(storage: str, sim: Simulator, clock: FakeClock,
                                                        claude_log: CallLog) -> None:
    uri = storage
    per_call = upper_bound_tokens(_params(0)) + 200  # the hold of one call: input bound + max_tokens
    limit = per_call * 3 + per_call // 2
    app = make(sim, clock, storage_uri=uri, CLAUDE_BUDGET_WAIT=0, CLAUDE_MODELS=["claude-haiku-4-5"])
    sim.truncate()  # every reply uses its whole max_tokens: real spend close to the hold
    outcomes: list[str] = []

    async def fan_out() -> Any:
        messages = Claude().async_messages
        results = await asyncio.gather(*[messages.create(**_params(i)) for i in range(5)], return_exceptions=True)
        outcomes.extend("answered" if isinstance(r, anthropic.types.Message) else getattr(r, "reason", repr(r))
                        for r in results)
        return {"answered": sum(o == "answered" for o in outcomes)}

    route(app, fan_out, ai_feature("fan"), budgeted(tokens=f"{limit}/day"))
    response = app.test_client().post("/ask")
    assert response.status_code == 200 and response.get_json() == {"answered": 3}
    assert outcomes == ["answered"] * 3 + ["budget_busy"] * 2  # the first three reserved before any await
    lines = claude_log.events("claude_api_call")
    assert len(lines) == 3 and len({line["request_id"] for line in lines}) == 3  # a log line each
    spent = sum(line["input_tokens"] + line["output_tokens"] for line in lines)
    assert per_call * 2 < spent <= limit  # close to the holds, never past the budget
    assert len(sim.requests) == 3


def test_a_gathered_call_waits_for_room_its_sibling_gives_back(sim: Simulator, claude_log: CallLog) -> None:
    """The second call's wait is awaited: a blocking wait would stall the sibling it waits for."""
    per_call = upper_bound_tokens(_params(0)) + 200
    app = make(sim, None, CLAUDE_BUDGET_WAIT=5, CLAUDE_MODELS=["claude-haiku-4-5"])

    async def fan_out() -> Any:
        messages = Claude().async_messages
        started = time.monotonic()
        results = await asyncio.gather(*[messages.create(**_params(i)) for i in range(2)])
        return {"answered": len(results), "seconds": time.monotonic() - started}

    route(app, fan_out, ai_feature("fan"), budgeted(tokens=f"{per_call + per_call // 2}/day"))
    response = app.test_client().post("/ask")
    assert response.status_code == 200 and response.get_json()["answered"] == 2
    assert response.get_json()["seconds"] < 5  # well inside CLAUDE_BUDGET_WAIT: it got the room back
    assert len(claude_log.events("claude_api_call")) == 2


def test_max_calls_counts_every_gathered_call(sim: Simulator, clock: FakeClock, claude_log: CallLog) -> None:
    app = make(sim, clock)
    seen: dict[str, Any] = {}

    async def fan_out() -> Any:
        messages = Claude().async_messages
        results = await asyncio.gather(*[messages.create(**_params(i)) for i in range(5)], return_exceptions=True)
        seen["results"] = results
        return {"ok": True}

    route(app, fan_out, ai_feature("fan", max_calls=3))
    assert app.test_client().post("/ask").status_code == 200
    results = seen["results"]
    assert sum(isinstance(r, anthropic.types.Message) for r in results) == 3
    assert sum(isinstance(r, CallLimitExceeded) for r in results) == 2
    assert len(claude_log.events("max_calls_exceeded")) == 2
    assert len(claude_log.events("claude_api_call")) == 3 and len(sim.requests) == 3


# --- cancellation settles what was billed and releases the hold ------------------------------------

def test_a_cancelled_call_releases_its_hold(storage: str, sim: Simulator, claude_log: CallLog) -> None:
    uri = storage
    app = make(sim, None, storage_uri=uri, CLAUDE_DAILY_BUDGET_USD=5)
    sim.latency(0.3)

    async def impatient() -> Any:
        try:
            await asyncio.wait_for(Claude().async_messages.create(**_params(1)), timeout=0.05)
        except TimeoutError:
            return {"gave_up": True}
        return {"gave_up": False}

    route(app, impatient, ai_feature("ask"))
    assert app.test_client().post("/ask").get_json() == {"gave_up": True}
    with app.app_context():
        [budget] = app.extensions["claude"].budgets.usage_report()
    assert budget["reserved_usd"] == 0 and budget["spent_usd"] == 0
    [error] = claude_log.events("claude_api_error")
    assert error["error_type"] == "cancelled" and "our_bug" not in error


def test_a_stream_cancelled_mid_way_is_billed_for_what_arrived(storage: str, sim: Simulator,
                                                               claude_log: CallLog) -> None:
    uri = storage
    app = make(sim, None, storage_uri=uri, CLAUDE_DAILY_BUDGET_USD=5)
    sim.trickle(0.05, chunks=30)  # 1.5 s of body
    received: list[str] = []

    async def consume(first_text: asyncio.Event) -> None:
        async with Claude().async_messages.stream(**_params(2)) as stream:
            async for text in stream.text_stream:
                received.append(text)
                first_text.set()

    async def impatient() -> Any:
        first_text = asyncio.Event()
        task = asyncio.create_task(consume(first_text))
        await first_text.wait()
        task.cancel()  # the client went away
        try:
            await task
        except asyncio.CancelledError:
            return {"gave_up": True}
        return {"gave_up": False}

    route(app, impatient, ai_feature("ask"))
    assert app.test_client().post("/ask").get_json() == {"gave_up": True}
    assert received, "some text arrived before the cancellation"
    [line] = claude_log.events("claude_api_call")
    assert line["stop_reason"] == "client_disconnected" and line["output_tokens"] >= 1 and line["cost_usd"] > 0
    with app.app_context():
        [budget] = app.extensions["claude"].budgets.usage_report()
    assert budget["reserved_usd"] == 0 and budget["spent_usd"] == pytest.approx(line["cost_usd"], abs=2e-6)


def test_an_async_stream_that_ends_without_message_stop_fails(sim: Simulator, clock: FakeClock,
                                                              claude_log: CallLog) -> None:
    app = make(sim, clock)
    sim.end_stream(after_deltas=2)
    seen: dict[str, Any] = {}

    async def chat() -> Any:
        received: list[str] = []
        try:
            async with Claude().async_messages.stream(**_params(3)) as stream:
                async for text in stream.text_stream:
                    received.append(text)
        except UpstreamUnavailable:
            seen["received"] = received
            return {"failed": True}
        return {"failed": False}

    route(app, chat, ai_feature("chat"))
    assert app.test_client().post("/ask").get_json() == {"failed": True}
    assert len(seen["received"]) == 2
    [line] = claude_log.events("claude_api_error")
    assert line["error_type"] == "incomplete_stream" and line["output_tokens"] >= 2


def test_an_async_stream_trickling_past_its_deadline_is_cut_mid_way(clock: FakeClock, claude_log: CallLog) -> None:
    # As the sync one (test_client.py): the body's chunks arrive 0.3 s apart on the app's fake clock.
    sim = Simulator(clock=clock)
    sim.trickle(0.3, chunks=20)  # 6 s of body against a 1 s deadline
    app = make(sim, clock, CLAUDE_STREAM_DEADLINE=1.0, CLAUDE_MAX_RETRIES=0)
    story = " ".join(f"word{i}" for i in range(300))
    seen: dict[str, Any] = {}

    async def chat() -> Any:
        received: list[str] = []
        try:
            async with Claude().async_messages.stream(max_tokens=1000, messages=user_msg(f"echo: {story}")) as stream:
                async for text in stream.text_stream:
                    received.append(text)
        except UpstreamUnavailable:
            seen["received"] = "".join(received)
            return {"failed": True}
        return {"failed": False}

    route(app, chat, ai_feature("chat"))
    assert app.test_client().post("/ask").get_json() == {"failed": True}
    assert 0 < len(seen["received"]) < len(story) / 2  # text arrived, then the body was cut early
    [line] = claude_log.events("claude_api_error")
    assert line["error_type"] == "deadline_exceeded" and line["output_tokens"] >= 2


# --- nothing bound to one event loop is reused on the next ------------------------------------------

class KeepAliveServer:
    """The simulator behind hypercorn, which keeps HTTP/1.1 connections open (werkzeug's server closes
    each one after its response, which would hide a connection pool outliving its event loop)."""

    def __init__(self, sim: Simulator) -> None:
        import socket
        import threading

        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        started = threading.Event()

        async def main() -> None:
            self._stop, self._loop = asyncio.Event(), asyncio.get_running_loop()
            config = Config()
            config.bind = [f"127.0.0.1:{self.port}"]
            config.loglevel = "WARNING"
            started.set()
            await serve(sim, config, mode="wsgi", shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self._thread.start()
        started.wait(5)
        deadline = time.monotonic() + 5
        while True:  # until it accepts connections, bounded
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def client_connections(self) -> int:
        """Established connections from this machine to the server (client side), from /proc/net/tcp."""
        with open("/proc/net/tcp") as table:
            rows = [line.split() for line in table.readlines()[1:]]
        return sum(1 for row in rows if row[2] == f"0100007F:{self.port:04X}" and row[3] == "01")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


def test_a_shared_async_client_breaks_on_the_next_loop_and_leaks(sim: Simulator) -> None:
    """What the per-loop clients avoid, shown on the bare SDK: the trap is real on this stack."""
    server = KeepAliveServer(sim)
    try:
        shared = anthropic.AsyncAnthropic(api_key="x", base_url=server.url, max_retries=0)

        async def call() -> None:
            await shared.messages.create(model="claude-haiku-4-5", max_tokens=20, messages=user_msg("hi"))

        asyncio.run(call())
        assert server.client_connections() == 1  # left open by a loop that is gone
        with pytest.raises(anthropic.APIConnectionError):
            asyncio.run(call())  # its pooled connection belongs to the dead loop
    finally:
        server.stop()


def test_sequential_async_requests_reuse_nothing_from_a_dead_loop(storage: str, sim: Simulator) -> None:
    """Over real keep-alive connections: one SDK client (and connection pool) per request's loop,
    closed with its connections while that loop shuts down, so the next request starts clean."""
    server = KeepAliveServer(sim)
    try:
        app = make(sim, None, storage_uri=storage, CLAUDE_BASE_URL=server.url, CLAUDE_DAILY_BUDGET_USD=5)

        async def ask() -> Any:
            messages = Claude().async_messages
            replies = await asyncio.gather(*[messages.create(**_params(i)) for i in range(2)])
            async with messages.stream(**_params(9)) as stream:
                await stream.until_done()
            return {"models": [r.model for r in replies]}

        route(app, ask, ai_feature("ask"), budgeted(usd="1/day"))
        client = app.test_client()
        for _ in range(3):
            response = client.post("/ask")
            assert response.status_code == 200, response.get_data(as_text=True)
            assert server.client_connections() == 0  # none outlived the request's loop
    finally:
        server.stop()
    clients = app.extensions["claude"].async_messages.clients
    assert clients.opened == 3 and clients.closed == 3 and clients.live == 0  # one per loop, each closed
    assert len(sim.requests) == 9
