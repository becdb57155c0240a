"""Time to first token and time per streamed event: a guarded stream against a bare SDK stream.

Every variant streams the same reply from the in-process simulator at zero latency: a reply rule
answers the prompt with STREAM_WORDS words, which the simulator cuts into text deltas of three words
(``wire.deltas``), so one reply is ~250 ``content_block_delta`` events (the SDK's ``MessageStream``
adds a ``text`` event for each). The view has the shape of ``example_app``'s ``/chat``: it opens the
stream in the view (so a failure before the first token still degrades), and returns a
``stream_with_context`` response that writes each text delta as one SSE chunk, then closes the stream.

  (a)  bare route: ``anthropic.Anthropic(...).messages.stream(...)``, its ``text_stream``
  (b)  (a) with @ai_feature(max_input_chars), @budgeted(requests, tokens, usd), @fallback_to and
       ``claude.messages.stream(...)``, CLAUDE_STORAGE_URI=memory://, log to a file (overhead.py's
       app_guarded, with a streaming view)
  (c)  (b) on Redis
  (d)-(f) async, per stream in one event loop: a bare ``AsyncAnthropic().messages.stream`` vs
       ``claude.async_messages.stream`` on memory:// and on Redis (the simulator's async transport
       hands each chunk over from a worker thread, which dominates the per-event time of all three)

Each request is timed at the WSGI boundary, as a client on loopback would see it: from calling the
app to its first body chunk (the first text delta: time to first token, TTFT), from the first to the
last text chunk divided by the chunks between them (per event), and from the last text chunk to the
end of the body and ``close()`` (the tail: the stream's last events, its settlement and log line).
Variants run in rounds, each round in a rotated order after a warm-up; "added (paired)" is the
median over rounds of (variant's round median - (a)'s round median), as in overhead.py.

Then which calls the guarded stream adds per text delta (cProfile call counts, (b) minus (a)), and
the guard's own per-event work, measured on its own (the request-level figures cannot resolve
a microsecond per event on a shared machine): the guarded ``text_stream`` (its iterator, ``_observe``
and text check) over the events of one real stream against the SDK's ``text_stream`` loop it
replaces, and the deadline check ``_DeadlineStream`` makes per body chunk against a bare loop.

Run: .venv/bin/python bench/streams.py  (about 75 s on 2 cores, after waiting for a quiet machine)
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
from _common import ROOT, LoadMeter, RedisServer, machine_description, percentile, table, wait_for_quiet
from flask import Flask, Response, request, stream_with_context
from loguru import logger
from overhead import Caller

from flask_claude import Claude, ai_feature, budgeted, fallback_to
from flask_claude.simulator import Simulator

WARMUP = int(os.environ.get("BENCH_WARMUP", "20"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "25"))
BATCH = int(os.environ.get("BENCH_BATCH", "12"))
STREAM_WORDS = int(os.environ.get("BENCH_STREAM_WORDS", "750"))
MODEL = "claude-sonnet-4-6"
MAX_TOKENS = 4096
PROMPT = "Stream: tell the long story of the quarterly report."
_WORDS = ("steady", "growth", "in", "every", "region", "the", "quarter", "closed", "with", "margins",
          "above", "plan", "and", "a", "healthy", "pipeline")
REPLY = " ".join(_WORDS[i % len(_WORDS)] for i in range(STREAM_WORDS)) + "."


def script_reply(sim: Simulator) -> None:
    sim.reply("Stream:", REPLY)


def sse(text: str) -> bytes:
    return b"data: " + json.dumps({"text": text}).encode() + b"\n\n"


def sse_response(stream: Any) -> Response:
    """``example_app``'s ``/chat`` answer: each text delta one SSE chunk, the stream closed at the end."""

    def events() -> Iterator[bytes]:
        with stream:  # the MessageStream (entering the manager again would send a second request)
            for text in stream.text_stream:
                yield sse(text)

    response = Response(stream_with_context(events()), mimetype="text/event-stream")
    response.call_on_close(stream.close)
    return response


def app_bare(sim: Simulator) -> Flask:
    script_reply(sim)
    client = anthropic.Anthropic(api_key="x", base_url="http://sim", max_retries=0,
                                 http_client=anthropic.DefaultHttpxClient(transport=sim.transport()))
    app = Flask("bench_stream_a")

    @app.post("/chat")
    def chat() -> Any:
        stream = client.messages.stream(model=MODEL, max_tokens=MAX_TOKENS,
                                        messages=[{"role": "user", "content": request.json["text"]}]).__enter__()

        return sse_response(stream)

    return app


def app_guarded(storage_uri: str, log_path: str, name: str) -> Flask:
    """overhead.py's guarded route (same settings and decorators), its view streaming like /chat."""
    app = Flask(name)
    app.config.update(
        CLAUDE_SIMULATE=True,
        CLAUDE_MODELS=[MODEL, "claude-haiku-4-5"],
        CLAUDE_STORAGE_URI=storage_uri,
        CLAUDE_DAILY_BUDGET_USD=1_000_000,
        CLAUDE_LOG_PATH=log_path,
        CLAUDE_STORAGE_PREFIX=name,
        CLAUDE_MAX_TOKENS_CAP=MAX_TOKENS,  # the default 1024 would cut the reply short of (a)'s
    )
    claude = Claude()
    claude.init_app(app)
    script_reply(app.extensions["claude"].simulator)

    @app.post("/chat")
    @ai_feature("chat", max_tokens=MAX_TOKENS, max_input_chars=4000)
    @budgeted(requests="1000000/minute", tokens="1000000000/day", usd="1000000/day")
    @fallback_to({"text": None, "notice": "paused"}, status=503)
    def chat() -> Any:
        stream = claude.messages.stream(model=MODEL, max_tokens=MAX_TOKENS,
                                        messages=[{"role": "user", "content": request.json["text"]}]).__enter__()

        return sse_response(stream)

    return app


class StreamCaller(Caller):
    """overhead.py's ``Caller`` on ``/chat``, timing the body: first chunk, last chunk, end."""

    def __init__(self, app: Flask) -> None:
        super().__init__(app, path="/chat", text=PROMPT)
        self.chunks: Counter[int] = Counter()

    def __call__(self) -> tuple[float, float, float, float]:
        """(TTFT, per event, tail, total) in microseconds."""
        env = dict(self.environ)
        env["wsgi.input"] = io.BytesIO(self.body)
        status: list[str] = []

        def start_response(s: str, headers: Any, exc_info: Any = None) -> Any:
            status.append(s)
            return None

        perf = time.perf_counter_ns
        t0 = perf()
        result = self.app(env, start_response)
        first = last = 0
        n = 0
        try:
            for chunk in result:
                if chunk:
                    last = perf()
                    if not n:
                        first = last
                    n += 1
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        end = perf()
        self.statuses[status[0].split()[0]] += 1
        self.chunks[n] += 1
        per_event = (last - first) / max(1, n - 1)
        return (first - t0) / 1000.0, per_event / 1000.0, (end - last) / 1000.0, (end - t0) / 1000.0


METRICS = ("TTFT", "per event", "tail", "total")


def main() -> None:
    logger.remove()  # as overhead.py: an app that configures its own logging
    tmp = tempfile.mkdtemp(prefix="bench-streams-")
    log_path = os.path.join(tmp, "claude.jsonl")
    redis_server = RedisServer()
    try:
        run(redis_server, log_path)
    finally:
        redis_server.stop()


def paired(medians: dict[str, dict[str, list[float]]], key: str, base: str, metric: str) -> float:
    return percentile([m - b for m, b in zip(medians[key][metric], medians[base][metric], strict=True)], 50)


def run(redis_server: RedisServer, log_path: str) -> None:
    sim = Simulator()
    apps = {
        "(a) bare SDK stream": app_bare(sim),
        "(b) flask-claude, memory": app_guarded("memory://", log_path, "bench_stream_b"),
        "(c) flask-claude, redis": app_guarded(redis_server.url, log_path, "bench_stream_c"),
    }
    keys = list(apps)
    callers = {k: StreamCaller(app) for k, app in apps.items()}
    sims = [sim, *(app.extensions["claude"].simulator for app in list(apps.values())[1:])]

    def batch(key: str, n: int, out: dict[str, list[float]] | None) -> None:
        caller = callers[key]
        for _ in range(n):
            sample = caller()
            if out is not None:
                for metric, value in zip(METRICS, sample, strict=True):
                    out[metric].append(value)
        for s in sims:
            s.clear_requests()

    quiet = wait_for_quiet()
    meter = LoadMeter([redis_server.process.pid])
    started = time.monotonic()
    for key in keys:
        batch(key, WARMUP, None)
    samples: dict[str, dict[str, list[float]]] = {k: {m: [] for m in METRICS} for k in keys}
    medians: dict[str, dict[str, list[float]]] = {k: {m: [] for m in METRICS} for k in keys}
    for r in range(ROUNDS):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            this: dict[str, list[float]] = {m: [] for m in METRICS}
            gc.collect()
            batch(key, BATCH, this)
            for metric in METRICS:
                samples[key][metric] += this[metric]
                medians[key][metric].append(percentile(this[metric], 50))
    elapsed = time.monotonic() - started
    load_report = meter.report()

    events = {k: dict(c.chunks) for k, c in callers.items()}
    base = keys[0]
    rows = []
    for key in keys:
        row: list[Any] = [key]
        for metric in METRICS:
            digits = 2 if metric == "per event" else 0
            row.append(f"{percentile(samples[key][metric], 50):.{digits}f}")
            if key != base:
                row[-1] += f" ({paired(medians, key, base, metric):+.{digits}f})"
        row += [dict(callers[key].statuses), ", ".join(f"{n} x{c}" for n, c in events[key].items())]
        rows.append(row)
    print(f"\n== one streamed reply through the WSGI app, simulator at zero latency ({ROUNDS} rounds x {BATCH} "
          f"streams per variant after {WARMUP} warm-up; {elapsed:.0f} s) ==")
    print("median us, and in brackets the added time over (a), paired: median over rounds of the round medians' "
          "difference")
    print(table(rows, ["variant", "TTFT", "per event", "tail", "total", "statuses", "text chunks x streams"]))

    calls_per_delta(callers[keys[0]], callers[keys[1]])
    async_results = async_rows(redis_server, log_path)
    micro = guard_per_event(apps[keys[1]])

    print("\n== machine ==")
    print(machine_description(redis_server.version()))
    print(f"{quiet}; timing run: {load_report}")
    print(f"command: {sys.executable} bench/streams.py  (BENCH_ROUNDS={ROUNDS} BENCH_BATCH={BATCH} "
          f"BENCH_WARMUP={WARMUP} BENCH_STREAM_WORDS={STREAM_WORDS} BENCH_ASYNC_ROUNDS={ASYNC_ROUNDS} "
          f"BENCH_ASYNC_BATCH={ASYNC_BATCH} BENCH_MICRO_N={MICRO_N})")
    b, c = keys[1], keys[2]
    print(f"\nadded over a bare SDK stream (paired medians): TTFT memory {paired(medians, b, base, 'TTFT'):+.0f} us, "
          f"redis {paired(medians, c, base, 'TTFT'):+.0f} us; per event memory "
          f"{paired(medians, b, base, 'per event'):+.2f} us, redis {paired(medians, c, base, 'per event'):+.2f} us "
          f"(of {percentile(samples[base]['per event'], 50):.1f} us); async TTFT {async_results[0]:+.0f} us, "
          f"per event {async_results[1]:+.2f} us; the guard's own work per text delta {micro:.2f} us")


# --- async: claude.async_messages.stream vs a bare AsyncAnthropic stream ------------------------------

ASYNC_ROUNDS = int(os.environ.get("BENCH_ASYNC_ROUNDS", "15"))
ASYNC_BATCH = int(os.environ.get("BENCH_ASYNC_BATCH", "6"))


def async_rows(redis_server: RedisServer, log_path: str) -> tuple[float, float]:
    """Per stream inside one running event loop, timed around the ``async with`` and ``text_stream``.

    Returns the added TTFT and per-event time of memory:// over the bare stream (paired medians).
    """
    sim = Simulator()
    script_reply(sim)
    bare = anthropic.AsyncAnthropic(api_key="x", base_url="http://sim", max_retries=0,
                                    http_client=anthropic.DefaultAsyncHttpxClient(transport=sim.transport()))
    apps = {"(e)": app_guarded("memory://", log_path, "bench_stream_e"),
            "(f)": app_guarded(redis_server.url, log_path, "bench_stream_f")}
    params: dict[str, Any] = {"model": MODEL, "max_tokens": MAX_TOKENS,
                              "messages": [{"role": "user", "content": PROMPT}]}
    keys = ["(d)", "(e)", "(f)"]
    labels = {"(d)": "(d) bare AsyncAnthropic stream", "(e)": "(e) claude.async_messages.stream, memory",
              "(f)": "(f) claude.async_messages.stream, redis"}

    def opener(key: str) -> Callable[[], Any]:
        if key == "(d)":
            return lambda: bare.messages.stream(**params)
        messages = apps[key].extensions["claude"].async_messages
        return lambda: messages.stream(**params)

    async def one(open_stream: Callable[[], Any]) -> tuple[float, float, float, float]:
        perf = time.perf_counter_ns
        t0 = perf()
        first = last = 0
        n = 0
        async with open_stream() as stream:
            async for text in stream.text_stream:
                if text:
                    last = perf()
                    if not n:
                        first = last
                    n += 1
        end = perf()
        return ((first - t0) / 1000.0, (last - first) / max(1, n - 1) / 1000.0, (end - last) / 1000.0,
                (end - t0) / 1000.0)

    async def main_async() -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[float]]]]:
        openers = {k: opener(k) for k in keys}
        for key in keys:
            for _ in range(max(1, WARMUP // 2)):
                await one(openers[key])
        samples: dict[str, dict[str, list[float]]] = {k: {m: [] for m in METRICS} for k in keys}
        medians: dict[str, dict[str, list[float]]] = {k: {m: [] for m in METRICS} for k in keys}
        for r in range(ASYNC_ROUNDS):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                this: dict[str, list[float]] = {m: [] for m in METRICS}
                gc.collect()
                for _ in range(ASYNC_BATCH):
                    for metric, value in zip(METRICS, await one(openers[key]), strict=True):
                        this[metric].append(value)
                for metric in METRICS:
                    samples[key][metric] += this[metric]
                    medians[key][metric].append(percentile(this[metric], 50))
                sim.clear_requests()
                for app in apps.values():
                    app.extensions["claude"].simulator.clear_requests()
        return samples, medians

    started = time.monotonic()
    with apps["(e)"].app_context():  # one context for the whole run: asyncio.run copies it into its tasks
        samples, medians = asyncio.run(main_async())
    elapsed = time.monotonic() - started
    rows = []
    for key in keys:
        row: list[Any] = [labels[key]]
        for metric in METRICS:
            digits = 2 if metric == "per event" else 0
            row.append(f"{percentile(samples[key][metric], 50):.{digits}f}")
            if key != "(d)":
                row[-1] += f" ({paired(medians, key, '(d)', metric):+.{digits}f})"
        rows.append(row)
    print(f"\n== async: one stream inside one event loop, simulator at zero latency ({ASYNC_ROUNDS} rounds x "
          f"{ASYNC_BATCH} streams per variant; {elapsed:.0f} s) ==")
    print("median us (added over (d), paired); the simulator's async transport reads each chunk in a worker "
          "thread (asyncio.to_thread), the same for all three")
    print(table(rows, ["variant", "TTFT", "per event", "tail", "total"]))
    return paired(medians, "(e)", "(d)", "TTFT"), paired(medians, "(e)", "(d)", "per event")


# --- which calls a guarded stream adds per text delta -----------------------------------------------

def calls_per_delta(bare: StreamCaller, guarded: StreamCaller, streams: int = 10) -> None:
    """cProfile's call counts over the body of (a) and of (b), from the second text chunk to the 241st:
    the functions (b) calls more (or less) often, per text delta (at least once per ten deltas). What the guard
    does per event, listed; the two views' ``events`` generators are the same code at two lines."""
    import cProfile
    import pstats

    def counts(caller: StreamCaller) -> Counter[str]:
        profile = cProfile.Profile()
        for _ in range(streams):
            env = dict(caller.environ)
            env["wsgi.input"] = io.BytesIO(caller.body)
            result = caller.app(env, lambda status, headers, exc_info=None: None)
            body = iter(result)
            next(body)
            profile.enable()
            for _ in range(240):
                next(body)
            profile.disable()
            for _ in body:
                pass
            result.close()
        stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
        return Counter({f"{path.split('site-packages/')[-1].replace(str(ROOT) + '/', '')}:{line}({name})": calls[1]
                        for (path, line, name), calls in stats.items()})

    a, b = counts(bare), counts(guarded)
    added = {k: (b[k] - a[k]) / (240 * streams) for k in set(a) | set(b) if abs(b[k] - a[k]) >= 24 * streams}
    print("\n== calls (b) makes per text delta beyond (a)'s (cProfile call counts over 240 deltas x "
          f"{streams} streams) ==")
    for name, per in sorted(added.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {per:+.2f}  {name}")


# --- the guard's own work per event, on its own ---------------------------------------------------

MICRO_N = int(os.environ.get("BENCH_MICRO_N", "200"))


def guard_per_event(app: Flask) -> float:
    """What a guarded stream adds per text delta, on its own, against the SDK's loop over the same events.

    (1) ``text_stream``: the events of one real guarded stream (recorded from the SDK's ``MessageStream``,
    a ``text`` event after each ``content_block_delta``) are fed again through that stream's own
    ``text_stream`` (``GuardedMessageStream.__iter__`` + ``_observe`` + the text check; its text list
    emptied between passes), against the loop the SDK's ``MessageStream.text_stream`` runs over them
    (``for e in events: if e.type == "text": yield e.text``), which the guarded one replaces.
    (2) the deadline check: one body chunk per SSE event (as the simulator sends them) through a
    ``_DeadlineStream`` holding a real ``Deadline`` on the system clock, against a bare loop.
    Interleaved passes, medians over MICRO_N passes. Returns (1) + (2) per text delta, in us.
    """
    from flask_claude.clock import SystemClock
    from flask_claude.resilience import Deadline, _DeadlineStream
    from flask_claude.streams import GuardedMessageStream

    state = app.extensions["claude"]
    with app.app_context(), state.messages.stream(model=MODEL, max_tokens=MAX_TOKENS,
                                                  messages=[{"role": "user", "content": PROMPT}]) as stream:
        assert isinstance(stream, GuardedMessageStream)
        recorded = list(stream)
    assert stream._finished  # settled: feeding it again below bills nothing
    stream._inner = recorded
    kinds = Counter(getattr(e, "type", "?") for e in recorded)
    deltas = kinds["content_block_delta"]
    chunks = [b"x" * 80] * (len(recorded) - kinds["text"] + 1)  # the SSE events, ping included
    deadline = Deadline.after(SystemClock(), 3600.0)

    def sdk_text_stream() -> Iterator[str]:
        for event in recorded:
            if event.type == "text":
                yield event.text

    perf = time.perf_counter_ns
    times: dict[str, list[float]] = {k: [] for k in ("sdk", "guarded", "bare chunks", "deadline chunks")}
    for _ in range(MICRO_N):
        t0 = perf()
        for _text in sdk_text_stream():
            pass
        t1 = perf()
        stream._text.clear()
        for _text in stream._text_stream():
            pass
        t2 = perf()
        for _chunk in chunks:
            pass
        t3 = perf()
        for _chunk in _DeadlineStream(chunks, deadline):
            pass
        t4 = perf()
        times["sdk"].append((t1 - t0) / deltas)
        times["guarded"].append((t2 - t1) / deltas)
        times["bare chunks"].append((t3 - t2) / len(chunks))
        times["deadline chunks"].append((t4 - t3) / len(chunks))
    med = {k: percentile(v, 50) for k, v in times.items()}
    stream_added = med["guarded"] - med["sdk"]
    chunk_added = med["deadline chunks"] - med["bare chunks"]
    per_delta = stream_added + chunk_added * len(chunks) / deltas
    print(f"\n== the guard's own work per text delta ({len(recorded)} SDK events of one stream: "
          f"{', '.join(f'{k} {v}' for k, v in kinds.items())}; {len(chunks)} body chunks; {MICRO_N} passes) ==")
    print(table([
        ["text_stream (per text delta: 2 SDK events)", f"{med['guarded']:.0f}", f"{med['sdk']:.0f}",
         f"{stream_added:+.0f}"],
        ["_DeadlineStream (per body chunk)", f"{med['deadline chunks']:.0f}", f"{med['bare chunks']:.0f}",
         f"{chunk_added:+.0f}"],
    ], ["step", "guarded ns", "bare ns", "added ns"]))
    print(f"added per text delta: {per_delta:.0f} ns")
    return per_delta / 1000.0


if __name__ == "__main__":
    main()
