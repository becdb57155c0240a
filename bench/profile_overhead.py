"""Where flask-claude's per-request time goes: a step breakdown, a cProfile, and two growth curves.

1. Step breakdown: the steps of one guarded request (admission, flags, the "begin" storage step
   = admission + reservation + breaker read, settlement + breaker success, log line, signal, the
   SDK call itself...) are wrapped at run time in this process only (instance and module
   attributes; no file of flask_claude/ is changed) and timed, inclusive, over N requests of
   variants (b) memory and (c) Redis. Steps a checkout does not have are skipped (the script ran
   against 414aa1a, whose steps were admit/reserve/breaker.allow/breaker.record/settle, and
   against the two-round-trip storage of a00f12d and later).
   Then an exclusive accounting of (b) against (a): class-level wrappers (removed afterwards) that
   charge each function only its own time, so the rows add up to the request, and show that the
   SDK's own code is slower inside (b) than in (a) (no flask-claude line runs there).
2. cProfile of N requests of (b), the flask_claude functions by own time and by cumulative time.
3. The in-memory breaker's cost per record as its 30 s window fills (414aa1a kept one deque entry
   per call and re-counted the whole deque; since a00f12d it counts in BREAKER_BUCKETS time buckets).
4. The Redis breaker script's server time per ok / failed record as its window fills (414aa1a: one
   zset member per call, read back whole on a failure; since a00f12d: per-bucket counters in a hash,
   seeded here directly as the counts n calls spread over the window leave).

Run: /work/venv/bin/python bench/profile_overhead.py  (about 40 s)
"""

from __future__ import annotations

import cProfile
import functools
import io
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

from _common import LoadMeter, RedisServer, machine_description, percentile, table, wait_for_quiet
from loguru import logger
from overhead import Caller, app_a, app_guarded

import flask_claude.budget as fc_budget
import flask_claude.client as fc_client
import flask_claude.pipeline as fc_pipeline
from flask_claude.storage import BREAKER_BUCKETS, BreakerParams, MemoryStore, RedisStore

N = int(os.environ.get("BENCH_PROFILE_N", "1500"))

timings: dict[str, list[float]] = defaultdict(list)


def timed(name: str, fn: Any) -> Any:
    perf = time.perf_counter_ns

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = perf()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[name].append((perf() - t0) / 1000.0)
    return wrapper


def instrument(app: Any) -> None:
    """Wrap the steps of this app's pipeline (instance attributes shadow the class methods)."""
    state = app.extensions["claude"]
    for obj, attr, name in [
        (state.budgets, "admit", "2-3 admit (prepares gates + request limits; no storage since a00f12d)"),
        (state.budgets, "begin", "4 budgets.begin (worst case; admission+reservation+breaker read)"),
        (state.store, "begin", "   store.begin (the one storage step before the call)"),
        (state.budgets, "reserve", "4 reserve (414aa1a: worst case, all budgets)"),
        (state.budgets, "finish_admission", "4 finish_admission (views without a call)"),
        (state.budgets, "budget_lines", "   budget_lines (keys, periods; in admit+begin)"),
        (state.budgets, "settle", "4 settle (real cost, alerts, breaker success)"),
        (state.store, "settle", "   store.settle (the storage step after the call)"),
        (state.breaker, "allow", "4 breaker.allow (own round trip; 0/req when read in begin)"),
        (state.breaker, "record", "4 breaker.record (own round trip; 0/req when done in settle)"),
        (state.events, "emit", "4 log line (events.emit: json + loguru + write)"),
        (state.flags, "enabled", "2 flags.enabled (x2)"),
        (state.flags, "value", "   flags.value (budget flag, in admit+begin)"),
        (state.client.messages, "create", "4 SDK messages.create (incl. simulator)"),
        (state.prices, "cost", "4 prices.cost"),
        (state.prices, "worst_case_usd", "   prices.worst_case_usd (in begin)"),
    ]:
        if hasattr(obj, attr):
            setattr(obj, attr, timed(name, getattr(obj, attr)))


def instrument_modules() -> None:
    """Module-level steps, each wrapped only where this checkout still has it there."""
    import flask_claude.runner as fc_runner

    for module, attr, name in (
        (fc_pipeline, "run", "whole pipeline.run"),
        (fc_pipeline, "resolve_user", "1 resolve_user"),
        (fc_pipeline, "make_response", "4 make_response (view's dict -> Response)"),
        (fc_client, "with_auto_cache", "4 with_auto_cache"),
        (fc_runner, "with_auto_cache", "4 with_auto_cache"),
        (fc_client, "estimate_input_tokens", "4 estimate_input_tokens"),
        (fc_runner, "upper_bound_split", "   upper_bound_split (in reserve)"),
        (fc_runner, "plain_messages", "   plain_messages (in prepare)"),
        (fc_budget, "upper_bound_tokens", "   upper_bound_tokens (in begin)"),
        (fc_budget, "_new_id", "   _new_id (hold id + window member)"),
        (fc_budget, "has_cache_control", "   has_cache_control (in begin)"),
    ):
        if hasattr(module, attr):
            setattr(module, attr, timed(name, getattr(module, attr)))
    if hasattr(fc_budget, "uuid"):
        fc_budget.uuid.uuid4 = timed("   uuid4 (every caller in the process)", fc_budget.uuid.uuid4)
    # A module-level signal the client looks up at call time (one object shared by all apps).
    signal = getattr(fc_client, "claude_called", None) or fc_runner.claude_called
    signal.send = timed("4 claude_called.send (blinker)", signal.send)  # type: ignore[method-assign]


def breakdown(label: str, caller: Caller, base: Caller) -> None:
    timings.clear()
    for _ in range(200):  # warm-up, discarded
        caller()
    timings.clear()
    total: list[float] = []
    for _ in range(N):
        t0 = time.perf_counter_ns()
        caller()
        total.append((time.perf_counter_ns() - t0) / 1000.0)
    base_t: list[float] = []
    for _ in range(N // 2):
        t0 = time.perf_counter_ns()
        base()
        base_t.append((time.perf_counter_ns() - t0) / 1000.0)
    rows = []
    for name in sorted(timings, key=lambda k: (k.lstrip()[0] if k[0] != " " else "~", k)):
        values = timings[name]
        calls = len(values) / N
        per_req = sum(values) / N
        rows.append([name, f"{calls:g}", f"{percentile(values, 50):.1f}", f"{per_req:.1f}"])
    print(f"\n-- {label}: {N} requests; whole request median {percentile(total, 50):.0f} us, "
          f"mean {sum(total) / N:.0f} us; bare route (a) median {percentile(base_t, 50):.0f} us, "
          f"mean {sum(base_t) / len(base_t):.0f} us --")
    print(table(rows, ["step (inclusive; indented = nested in another row)", "calls/req", "median us/call",
                       "mean us/req"]))


def exclusive_accounting(tmp: str) -> None:
    """(a) and (b) interleaved in 4 rounds; each wrapped function is charged its own time only."""
    import anthropic.resources.messages.messages as sdk_messages

    import flask_claude.events as fc_events
    import flask_claude.pricing as fc_pricing
    import flask_claude.resilience as fc_resilience
    import flask_claude.simulator as fc_simulator
    from flask_claude.simulator import Simulator

    spent: dict[str, list[tuple[float, float]]] = defaultdict(list)
    stack: list[int] = []
    perf = time.perf_counter_ns
    originals: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, attr: str, name: str) -> None:
        fn = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        if fn is None:
            return  # a step this checkout does not have (the code moved on since the script was written)
        originals.append((owner, attr, fn))

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = perf()
            stack.append(0)
            try:
                return fn(*args, **kwargs)
            finally:
                children = stack.pop()
                total = perf() - t0
                spent[name].append((total / 1000.0, (total - children) / 1000.0))
                if stack:
                    stack[-1] += total
        setattr(owner, attr, wrapper)

    wrap(sdk_messages.Messages, "create", "anthropic SDK Messages.create (own code, not its transport)")
    wrap(fc_simulator.SimulatorTransport, "handle_request", "simulator transport (the fake API)")
    wrap(fc_resilience.DeadlineTransport, "handle_request", "DeadlineTransport.handle_request")
    wrap(fc_pipeline, "run", "pipeline.run (own: scope, flags; the view's body, as in (a))")
    wrap(fc_pipeline, "make_response", "make_response (in (a) Flask makes it, outside the rows)")
    wrap(fc_pipeline, "resolve_user", "resolve_user")
    for attr in ("create", "_begin", "_run_chain", "_finish"):
        wrap(fc_client.GuardedMessages, attr, f"GuardedMessages.{attr} (own)")
    for attr in ("admit", "begin", "reserve", "settle"):
        if attr in fc_budget.Budgets.__dict__:
            wrap(fc_budget.Budgets, attr, f"Budgets.{attr}")
    wrap(fc_events.EventLog, "emit", "EventLog.emit (the log line)")
    wrap(fc_pricing.PriceTable, "cost", "PriceTable.cost")
    try:
        callers = {"a": Caller(app_a(Simulator())),
                   "b": Caller(app_guarded("memory://", os.path.join(tmp, "claude.jsonl"), "acct_b"))}
        for caller in callers.values():
            for _ in range(200):
                caller()
        totals: dict[str, list[float]] = {"a": [], "b": []}
        rows_by: dict[str, dict[str, list[tuple[float, float]]]] = {"a": defaultdict(list), "b": defaultdict(list)}
        for _ in range(4):
            for label, caller in callers.items():
                spent.clear()
                for _ in range(N // 4):
                    t0 = perf()
                    caller()
                    totals[label].append((perf() - t0) / 1000.0)
                for name, values in spent.items():
                    rows_by[label][name].extend(values)
                if "claude" in caller.app.extensions:
                    caller.app.extensions["claude"].simulator.clear_requests()
    finally:
        for owner, attr, fn in reversed(originals):
            setattr(owner, attr, fn)
    n = {k: len(v) for k, v in totals.items()}
    names = sorted(set(rows_by["a"]) | set(rows_by["b"]),
                   key=lambda k: -sum(e for _, e in rows_by["b"].get(k, [])))
    rows = []
    for name in names:
        a_own = sum(e for _, e in rows_by["a"].get(name, [])) / n["a"]
        b_own = sum(e for _, e in rows_by["b"].get(name, [])) / n["b"]
        rows.append([name, f"{a_own:.1f}" if name in rows_by["a"] else "-", f"{b_own:.1f}", f"{b_own - a_own:+.1f}"])
    mean_a, mean_b = sum(totals["a"]) / n["a"], sum(totals["b"]) / n["b"]
    rows.append(["whole request (mean)", f"{mean_a:.0f}", f"{mean_b:.0f}", f"{mean_b - mean_a:+.0f}"])
    print(f"\n-- exclusive accounting: {N} requests each of (a) and (b) on memory://, interleaved; own time per "
          "request (mean us), largest in (b) first; what is not in a row is Flask/Werkzeug and the wrappers --")
    print(table(rows, ["function (own time only)", "(a) us/req", "(b) us/req", "(b) - (a)"]))


def cprofile(caller: Caller) -> None:
    for _ in range(200):
        caller()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(N):
        caller()
    prof.disable()
    for sort, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out).strip_dirs().sort_stats(sort)
        stats.print_stats(r"storage|budget|client|pipeline|events|resilience|flags|hygiene|tokens|pricing|"
                          r"decorators|degrade|context|extension", 25)
        text = out.getvalue()
        body = text[text.find("   ncalls"):]
        print(f"\n-- cProfile of {N} requests of (b), flask_claude functions by {title} "
              f"(times in s for all {N}; divide by {N} for per request) --")
        print(body.rstrip())


def log_line_parts() -> None:
    """What one claude_api_call line costs, part by part (the largest flask-claude step above)."""
    import json
    from datetime import UTC, datetime

    from flask_claude import events as fc_events
    from flask_claude.budget import period_bounds
    from flask_claude.events import _SCRUBBERS, EventLog, _scrub_value, scrub

    ours: frozenset[str] = getattr(fc_events, "_OUR_FIELDS", frozenset())

    record = {"ts": "2026-11-22T01:02:03.000+00:00", "event": "claude_api_call",
              "request_id": "req_sim_abcdef0123456789abcdef01", "feature": "ask", "route": "/ask",
              "user": "0123456789abcdef", "model": "claude-sonnet-4-6", "requested_model": "claude-sonnet-4-6",
              "fallback_from": None, "input_tokens": 20, "output_tokens": 30, "cache_read_input_tokens": 0,
              "cache_creation_input_tokens": 0, "latency_ms": 1.2, "retries": 0, "stop_reason": "end_turn",
              "cost_usd": 0.0001, "system_prompt_hash": None}
    fields = {k: v for k, v in record.items() if k not in ("ts", "event")}
    log = EventLog(path=os.path.join(tempfile.mkdtemp(prefix="bench-log-"), "x.jsonl"), secrets=("sk-x",),
                   hash_users=True, log_content=False, salt="s")
    fd = os.open(os.path.join(tempfile.mkdtemp(prefix="bench-log-"), "y.jsonl"),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    line = (json.dumps(record) + "\n").encode()
    from zoneinfo import ZoneInfo

    utc = ZoneInfo("UTC")
    now = time.time()
    parts = [
        ("EventLog.emit('claude_api_call', fields): the whole step", lambda: log.emit("claude_api_call", fields)),
        ("  _scrub_value on every field (414aa1a: 10 strings x 7 regexes)",
         lambda: {k: _scrub_value(v, ("sk-x",)) for k, v in record.items()}),
        (f"  the fields emit() still scrubs ({sum(1 for k, v in record.items() if k not in ours and v is not None)}"
         " not ours/None; since d2ea3b4)",
         lambda: {k: (v if k in ours or v is None else _scrub_value(v, ("sk-x",))) for k, v in record.items()}),
        ("    scrub('claude-sonnet-4-6'): one short string", lambda: scrub("claude-sonnet-4-6")),
        ("  logger.bind(...).log(...) with one sink whose filter says no",
         lambda: logger.bind(**record, claude_sink="nowhere").log("INFO", "x")),
        ("  json.dumps(record)", lambda: json.dumps(record, default=str, ensure_ascii=False)),
        ("  datetime.now(UTC).isoformat()", lambda: datetime.now(UTC).isoformat(timespec="milliseconds")),
        ("  os.write(O_APPEND) of the line", lambda: os.write(fd, line)),
        ("period_bounds('day') (3 per budget_lines, 2 budget_lines per call)",
         lambda: period_bounds("day", 1, now, utc)),
    ]
    devnull = open(os.devnull, "w")
    default_handler = logger.add(devnull, level="DEBUG")  # what loguru's handler 0 does, minus the terminal
    n = 3000
    t0 = time.perf_counter()
    for _ in range(n):
        log.emit("claude_api_call", fields)
    with_default = (time.perf_counter() - t0) / n * 1e6
    logger.remove(default_handler)
    devnull.close()
    rows = []
    for label, fn in parts:
        for _ in range(200):
            fn()
        n = 3000
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rows.append([label, f"{(time.perf_counter() - t0) / n * 1e6:.1f}"])
    for _hints, pattern, replacement in _SCRUBBERS:
        text = "req_sim_abcdef0123456789abcdef01"
        n = 5000
        t0 = time.perf_counter()
        for _ in range(n):
            pattern.sub(replacement, text)
        per = (time.perf_counter() - t0) / n * 1e6
        rows.append([f"    regex {pattern.pattern[:44]} on a request id", f"{per:.2f}"])
    os.close(fd)
    rows.insert(1, ["  the same with loguru's default handler left installed (to /dev/null)", f"{with_default:.1f}"])
    print("\n-- one log line, part by part --")
    print(table(rows, ["part", "us per call"]))


PARAMS = BreakerParams(min_calls=5, failure_rate=0.5, window=30.0, cooldown=30.0)


def memory_breaker_curve() -> None:
    print("\n-- MemoryStore.breaker_record cost vs calls already in its 30 s window "
          f"({BREAKER_BUCKETS} time buckets) --")
    rows = []
    for n in (0, 1_000, 3_000, 10_000, 30_000):
        store = MemoryStore()
        start = time.time()
        for i in range(n):  # spread over the window, as n calls in 30 s would be
            store.breaker_record("m", True, start - PARAMS.window + PARAMS.window * (i + 1) / (n + 1), PARAMS)
        now = start
        t0 = time.perf_counter()
        for _ in range(100):
            store.breaker_record("m", True, now, PARAMS)
        ok_per = (time.perf_counter() - t0) / 100 * 1e6
        # failures: a few, so the failure rate stays under 50% once n >= 10 (the circuit stays closed)
        t0 = time.perf_counter()
        for _ in range(4):
            store.breaker_record("m", False, now, PARAMS)
        fail_per = (time.perf_counter() - t0) / 4 * 1e6
        rows.append([f"{n}", f"{n / 30:.0f} req/s", f"{ok_per:.1f}", f"{fail_per:.1f}"])
    print(table(rows, ["calls in window", "= sustained rate", "ok: us per record (under the store lock)",
                       "failure: us per record"]))


def redis_breaker_curve(redis_server: RedisServer) -> None:
    print("\n-- RedisStore.breaker_record: server time per call vs calls in the window "
          f"(per-bucket counters, {BREAKER_BUCKETS} buckets, in the breaker's hash) --")
    store = RedisStore(redis_server.url, prefix="bench_curve", socket_timeout=2.0)
    rows = []
    width = PARAMS.window / BREAKER_BUCKETS
    for n in (0, 1_000, 10_000, 30_000):
        redis_server.client.flushall()
        now = time.time()
        bucket = int(now // width)
        key = f"{store.tag}:breaker:m"
        if n:  # the counters n successful calls spread over the window leave (what n EVALSHAs would write)
            redis_server.client.hset(key, mapping={f"c:{b}": n // BREAKER_BUCKETS
                                                   for b in range(bucket - BREAKER_BUCKETS + 1, bucket + 1)})
        redis_server.client.config_resetstat()
        for _ in range(20):
            store.breaker_record("m", True, now, PARAMS)
        ok_us = redis_server.client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
        # failures: keep the failure rate under 50% (when n > 0) so the circuit does not open
        redis_server.client.config_resetstat()
        for _ in range(5):
            store.breaker_record("m", False, now, PARAMS)
        fail_us = redis_server.client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]
        rows.append([f"{n}", f"{ok_us:.0f}", f"{fail_us:.0f}"])
    print(table(rows, ["calls in window", "ok: us/call (server)", "failure: us/call (server)"]))
    print("(server time from INFO commandstats usec_per_call of EVALSHA; Redis runs one script at a time)")


def main() -> None:
    logger.remove()
    tmp = tempfile.mkdtemp(prefix="bench-profile-")
    redis_server = RedisServer()
    try:
        from flask_claude.simulator import Simulator

        quiet = wait_for_quiet()
        meter = LoadMeter([redis_server.process.pid])
        print("== where (b)'s added time goes ==")
        exclusive_accounting(tmp)
        instrument_modules()
        base = Caller(app_a(Simulator()))
        mem = app_guarded("memory://", os.path.join(tmp, "claude.jsonl"), "prof_b")
        red = app_guarded(redis_server.url, os.path.join(tmp, "claude.jsonl"), "prof_c")
        instrument(mem)
        instrument(red)
        print("\n== step breakdown (run-time wrappers in this process only) ==")
        breakdown("(b) flask-claude on memory://", Caller(mem), base)
        breakdown("(c) flask-claude on Redis", Caller(red), base)
        cprofile(Caller(app_guarded("memory://", os.path.join(tmp, "claude.jsonl"), "prof_b2")))
        log_line_parts()
        memory_breaker_curve()
        redis_breaker_curve(redis_server)
        print("\n== machine ==")
        print(machine_description(redis_server.version()))
        print(f"{quiet}; {meter.report()}")
        print(f"command: {sys.executable} bench/profile_overhead.py  (BENCH_PROFILE_N={N})")
    finally:
        redis_server.stop()


if __name__ == "__main__":
    main()
