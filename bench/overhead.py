"""Per-request overhead of flask-claude against a bare route and against Flask-Limiter, one run.

Every variant is the same WSGI app shape (POST /ask with a small JSON body), called directly as a
WSGI callable (no network), its Claude call answered by the in-process simulator with zero latency.

  (a)        bare route calling the anthropic SDK directly (the same simulator URL flask-claude's client
             uses: httpx validates a URL character by character, so a shorter one would be ~10 us cheaper)
  (b)        (a) + @ai_feature, @budgeted(requests, tokens, usd), @fallback_to, claude.messages.create,
             CLAUDE_STORAGE_URI=memory://, CLAUDE_DAILY_BUDGET_USD, log to a file (CLAUDE_LOG_PATH)
  (c)        (b) on Redis over loopback TCP (redis://127.0.0.1)
  (c-unix)   (b) on Redis over a unix socket (a second redis-server of our own, redis+unix://)
  (d-mem)    (a) + Flask-Limiter, one limit, memory://
  (d-redis)  (a) + Flask-Limiter, one limit, Redis over loopback TCP (the same server as (c))
  (d-unix)   (a) + Flask-Limiter, one limit, Redis over the unix socket (the same server as (c-unix))
  (e)-(g)    async, per call in one event loop: a bare AsyncAnthropic call vs claude.async_messages
             on memory:// and on Redis; then the time the two synchronous Redis steps block the loop

Variants run in rounds, each round in a rotated order, after a warm-up, so drift (CPU frequency,
the other core's load, growing in-memory windows) lands on all of them alike; "added (paired)" is
the median over rounds of (variant's round median - (a)'s round median), the figure least moved by
other load on the machine. loguru's default stderr handler is removed first (logger.remove()), as an
app that configures its own logging does (left in place it adds ~40 us per event: profile_overhead.py).

The unix socket URI is ``unix:///path?db=0`` for flask-claude (redis-py's spelling, taken since
7e465d7; an older checkout gets ``redis+unix://``) and ``redis+unix:///path?db=0`` for Flask-Limiter
(limits, which builds its client, refuses a bare ``unix://``).

Then Redis commands per request are counted two ways: server side with INFO commandstats (every
command, including those a Lua script runs), and client side by wrapping redis-py's Connection
(all of flask-claude's traffic goes through redis-py): send_packed_command (one call = one write to
the socket = one round trip; a pipeline is one), send_command and pack_commands (which commands each
round trip carried: a single command, or a pipeline's), read_response (replies read). The count ends with a
``store.flush()``, so what the counted requests left to be written behind (the last settlement,
the rollup sums a worker writes once per CLAUDE_ROLLUP_FLUSH_INTERVAL) is counted with them.

Run: .venv/bin/python bench/overhead.py  (about 2 minutes on 2 cores at the default BENCH_ROUNDS=30)
"""

from __future__ import annotations

import gc
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import anthropic
from _common import (
    LoadMeter,
    RedisServer,
    diff_stats,
    evalsha_usec,
    machine_description,
    percentile,
    table,
    wait_for_quiet,
)
from flask import Flask, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from loguru import logger
from werkzeug.test import EnvironBuilder

from flask_claude import Claude, ai_feature, budgeted, fallback_to
from flask_claude.extension import SIMULATOR_BASE_URL  # the bare SDK calls the URL flask-claude calls
from flask_claude.simulator import Simulator

WARMUP = int(os.environ.get("BENCH_WARMUP", "300"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "30"))
BATCH = int(os.environ.get("BENCH_BATCH", "80"))
COUNT_N = int(os.environ.get("BENCH_COUNT_N", "200"))
MODEL = "claude-sonnet-4-6"
PROMPT = "Summarize: the quarterly report shows steady growth in every region."
LIMITS = {"requests": "1000000/minute", "tokens": "1000000000/day", "usd": "1000000/day"}


def raw_view_factory(client: anthropic.Anthropic) -> Callable[[], Any]:
    def ask() -> Any:
        msg = client.messages.create(model=MODEL, max_tokens=64,
                                     messages=[{"role": "user", "content": request.json["text"]}])
        return {"text": msg.content[0].text}
    return ask


def bare_app(name: str, sim: Simulator) -> tuple[Flask, Callable[[], Any]]:
    client = anthropic.Anthropic(api_key="x", base_url=SIMULATOR_BASE_URL, max_retries=0,
                                 http_client=anthropic.DefaultHttpxClient(transport=sim.transport()))
    app = Flask(name)
    view = raw_view_factory(client)
    return app, view


def app_a(sim: Simulator) -> Flask:
    app, view = bare_app("bench_a", sim)
    app.post("/ask")(view)
    return app


def app_d(sim: Simulator, storage_uri: str, name: str) -> Flask:
    app, view = bare_app(name, sim)
    limiter = Limiter(get_remote_address, app=app, storage_uri=storage_uri)
    app.post("/ask")(limiter.limit("1000000/minute")(view))
    return app


def app_guarded(storage_uri: str, log_path: str, name: str, *, admission: str = "before_view",
                feature: dict[str, Any] | None = None, limits: dict[str, Any] | None = None,
                **config: Any) -> Flask:
    """The guarded route; by default its feature bounds its input, so the hold rides on the admission.
    ``limits`` replaces the three of ``@budgeted``; ``config`` adds to (or overrides) the app's."""
    app = Flask(name)
    app.config.update(
        CLAUDE_SIMULATE=True,
        CLAUDE_MODELS=[MODEL, "claude-haiku-4-5"],
        CLAUDE_STORAGE_URI=storage_uri,
        CLAUDE_DAILY_BUDGET_USD=1_000_000,
        CLAUDE_LOG_PATH=log_path,
        CLAUDE_ADMISSION=admission,
        CLAUDE_STORAGE_PREFIX=name,
    )
    app.config.update(config)
    claude = Claude()  # one per app: the round-trip benchmark builds several side by side
    claude.init_app(app)

    @app.post("/ask")
    @ai_feature("ask", max_tokens=64, **({"max_input_chars": 4000} if feature is None else feature))
    @budgeted(**(limits if limits is not None else LIMITS))
    @fallback_to({"text": None, "notice": "paused"}, status=503)
    def ask() -> Any:
        msg = claude.messages.create(model=MODEL, max_tokens=64,
                                     messages=[{"role": "user", "content": request.json["text"]}])
        return {"text": msg.content[0].text}

    return app


class Caller:
    """Calls a WSGI app with a prebuilt environ (a fresh body stream each time); counts statuses."""

    def __init__(self, app: Flask, path: str = "/ask", text: str = PROMPT) -> None:
        self.app = app
        self.body = json.dumps({"text": text}).encode()
        builder = EnvironBuilder(path=path, method="POST", data=self.body, content_type="application/json",
                                 environ_base={"REMOTE_ADDR": "127.0.0.1"})
        self.environ = builder.get_environ()
        builder.close()
        self.statuses: Counter[str] = Counter()

    def __call__(self) -> None:
        env = dict(self.environ)
        env["wsgi.input"] = io.BytesIO(self.body)
        status: list[str] = []

        def start_response(s: str, headers: Any, exc_info: Any = None) -> Any:
            status.append(s)
            return None

        result = self.app(env, start_response)
        try:
            for _ in result:
                pass
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        self.statuses[status[0].split()[0]] += 1


# --- client-side round-trip counting -------------------------------------------------------------

class RoundTrips:
    """Wraps redis-py's Connection.send_packed_command / send_command / pack_commands / read_response
    (class level: every connection, TCP or unix socket, of every client in this process)."""

    def __init__(self, names: dict[str, str]) -> None:
        import redis.connection as rc

        self.rc = rc
        self.names = names  # script sha -> name
        self.sends = 0
        self.reads = 0
        self.commands: list[str] = []
        self._orig = (rc.AbstractConnection.send_packed_command, rc.AbstractConnection.send_command,
                      rc.AbstractConnection.pack_commands, rc.AbstractConnection.read_response)

    def _name(self, args: Any) -> str:
        name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        name = name.upper()
        if name == "EVALSHA":
            sha = args[1].decode() if isinstance(args[1], bytes) else str(args[1])
            name = f"EVALSHA({self.names.get(sha, sha[:8])})"
        return name

    def __enter__(self) -> RoundTrips:
        spc, sc, pc, rr = self._orig
        me = self

        def send_packed_command(conn: Any, command: Any, check_health: bool = True) -> Any:
            me.sends += 1
            return spc(conn, command, check_health)

        def send_command(conn: Any, *args: Any, **kwargs: Any) -> Any:
            me.commands.append(me._name(args))
            return sc(conn, *args, **kwargs)

        def pack_commands(conn: Any, commands: Any) -> Any:  # a pipeline: its commands, one write
            commands = list(commands)
            runs: list[list[Any]] = []  # consecutive equal commands as one "NAME xN"
            for name in (me._name(args) for args in commands):
                if runs and runs[-1][0] == name:
                    runs[-1][1] += 1
                else:
                    runs.append([name, 1])
            names = [name if n == 1 else f"{name} x{n}" for name, n in runs]
            me.commands.append(names[0] if len(commands) == 1 else "[" + " + ".join(names) + "]")
            return pc(conn, commands)

        def read_response(conn: Any, *args: Any, **kwargs: Any) -> Any:
            me.reads += 1
            return rr(conn, *args, **kwargs)

        self.rc.AbstractConnection.send_packed_command = send_packed_command
        self.rc.AbstractConnection.send_command = send_command
        self.rc.AbstractConnection.pack_commands = pack_commands
        self.rc.AbstractConnection.read_response = read_response
        return self

    def __exit__(self, *exc: Any) -> None:
        (self.rc.AbstractConnection.send_packed_command, self.rc.AbstractConnection.send_command,
         self.rc.AbstractConnection.pack_commands, self.rc.AbstractConnection.read_response) = self._orig


def script_names(guarded: Flask, limited: Flask) -> dict[str, str]:
    names = {}
    store = guarded.extensions["claude"].store
    # RedisStore's registered scripts: _begin/_settle/_allow/_record since a00f12d (one "begin" script
    # for admission + reservation + breaker read, one "settle" for settlement + breaker success);
    # _admit/_reserve before it. Whichever this checkout has are named.
    for attr, label in (("_begin", "begin"), ("_settle", "settle"), ("_allow", "breaker_allow"),
                        ("_record", "breaker_record"), ("_epoch_script", "epoch"), ("_restore", "restore"),
                        ("_usage", "usage"), ("_admit", "admit"), ("_reserve", "reserve")):
        script = getattr(store, attr, None)
        if script is not None and hasattr(script, "sha"):
            names[script.sha] = label
    # The worker's summed rollups, written once per CLAUDE_ROLLUP_FLUSH_INTERVAL (since rollup-coalesce).
    rollup_script = getattr(getattr(store, "rollups", None), "_script", None)
    if rollup_script is not None and hasattr(rollup_script, "sha"):
        names[rollup_script.sha] = "rollup"
    storage = limited.extensions["limiter"]
    for limiter in (storage if isinstance(storage, set) else [storage]):
        lim_storage = getattr(limiter, "_storage", None) or getattr(limiter, "storage", None)
        for attr in dir(lim_storage):
            if attr.startswith("lua_"):
                names[getattr(lim_storage, attr).sha] = f"limits.{attr}"
    return names


def main() -> None:
    logger.remove()  # loguru's default stderr handler; (b+stderr) puts an equivalent back per batch
    tmp = tempfile.mkdtemp(prefix="bench-overhead-")
    log_path = os.path.join(tmp, "claude.jsonl")
    redis_server = RedisServer()
    try:
        unix_server = RedisServer(unix=True)
        try:
            run(redis_server, unix_server, log_path)
        finally:
            unix_server.stop()
    finally:
        redis_server.stop()


def _unix_app(unix_server: RedisServer, log_path: str) -> Flask:
    """The guarded route on the unix socket, as ``unix://`` (the spelling flask-claude documents); a
    checkout older than 7e465d7 takes only limits' ``redis+unix://``."""
    from limits.errors import ConfigurationError

    try:
        return app_guarded(unix_server.unix_url, log_path, "bench_c_unix")
    except ConfigurationError:
        print(f"(c-unix): this flask-claude refuses {unix_server.unix_url}; measured on {unix_server.url}")
        return app_guarded(unix_server.url, log_path, "bench_c_unix")


def run(redis_server: RedisServer, unix_server: RedisServer, log_path: str) -> None:
    sim = Simulator()
    apps = {
        "(a) bare SDK route": app_a(sim),
        "(b) flask-claude, memory": app_guarded("memory://", log_path, "bench_b"),
        "(c) flask-claude, redis://": app_guarded(redis_server.url, log_path, "bench_c"),
        "(c-unix) flask-claude, unix socket": _unix_app(unix_server, log_path),
        "(d-mem) Flask-Limiter, memory": app_d(sim, "memory://", "bench_d_mem"),
        "(d-redis) Flask-Limiter, redis://": app_d(sim, redis_server.url, "bench_d_redis"),
        "(d-unix) Flask-Limiter, unix socket": app_d(sim, unix_server.url, "bench_d_unix"),
    }
    keys = list(apps)
    b_key, c_key, cunix_key, dmem_key, dredis_key, dunix_key = keys[1:]
    callers = {k: Caller(app) for k, app in apps.items()}
    sims = [sim, *(apps[k].extensions["claude"].simulator for k in (b_key, c_key, cunix_key))]

    def batch(key: str, n: int, samples: list[float] | None) -> None:
        caller = callers[key]
        perf = time.perf_counter_ns
        for _ in range(n):
            t0 = perf()
            caller()
            if samples is not None:
                samples.append((perf() - t0) / 1000.0)
        for s in sims:
            s.clear_requests()  # the simulator's request log would otherwise grow all run long

    quiet = wait_for_quiet()
    meter = LoadMeter([redis_server.process.pid, unix_server.process.pid])
    started = time.monotonic()
    for key in keys:
        batch(key, WARMUP, None)
    samples: dict[str, list[float]] = {k: [] for k in keys}
    round_medians: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(ROUNDS):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            before = len(samples[key])
            gc.collect()
            batch(key, BATCH, samples[key])
            round_medians[key].append(percentile(samples[key][before:], 50))
    elapsed = time.monotonic() - started
    load_report = meter.report()

    base_med = percentile(samples[keys[0]], 50)
    base_p99 = percentile(samples[keys[0]], 99)
    rows = []
    paired: dict[str, float] = {}
    for key in keys:
        med, p99 = percentile(samples[key], 50), percentile(samples[key], 99)
        paired[key] = percentile([m - b for m, b in zip(round_medians[key], round_medians[keys[0]], strict=True)], 50)
        rows.append([key, f"{med:.0f}", f"{p99:.0f}", f"{med - base_med:+.0f}", f"{paired[key]:+.0f}",
                     f"{p99 - base_p99:+.0f}", f"{med / base_med:.2f}x", dict(callers[key].statuses)])
    print(f"\n== per-request time through the WSGI app, simulator at zero latency "
          f"({ROUNDS} rounds x {BATCH} requests per variant after {WARMUP} warm-up; {elapsed:.0f} s) ==")
    print(table(rows, ["variant", "median us", "p99 us", "added med", "added (paired)", "added p99",
                       "ratio (med)", "statuses"]))
    print(f"\n(b) adds {paired[b_key]:.0f} us over (a) (paired); (d-mem) adds {paired[dmem_key]:.0f} us: "
          f"(b) costs {paired[b_key] / paired[dmem_key]:.1f}x Flask-Limiter-on-memory's overhead. "
          f"On Redis over TCP: (c) {paired[c_key]:.0f} us vs (d-redis) {paired[dredis_key]:.0f} us; "
          f"over a unix socket: (c-unix) {paired[cunix_key]:.0f} us vs (d-unix) {paired[dunix_key]:.0f} us.")

    # --- Redis commands per request -------------------------------------------------------------
    names = script_names(apps[c_key], apps[dredis_key])
    print(f"\n== Redis commands per request ({COUNT_N} requests each, after the timing run) ==")
    servers = {c_key: redis_server, dredis_key: redis_server, cunix_key: unix_server, dunix_key: unix_server}
    for key in (c_key, dredis_key, cunix_key, dunix_key):
        caller, server = callers[key], servers[key]
        stats_before = server.commandstats()
        usec_before = evalsha_usec(server.client)
        store = getattr(apps[key].extensions.get("claude"), "store", None)
        with RoundTrips(names) as trips:
            for _ in range(COUNT_N):
                caller()
            if store is not None:  # what these requests left written behind counts with them
                store.flush()
        stats_after = server.commandstats()
        usec = evalsha_usec(server.client) - usec_before
        delta = diff_stats(stats_before, stats_after)
        total = sum(delta.values())
        per_cmd = ", ".join(f"{k} {v / COUNT_N:g}" for k, v in delta.items())
        print(f"\n{key}:")
        print(f"  server side, INFO commandstats: {total / COUNT_N:g} commands/request in all "
              f"(including those run inside Lua scripts): {per_cmd}")
        print(f"  server time in scripts (EVALSHA usec, their commands included): {usec / COUNT_N:.1f} us/request")
        sent = Counter(trips.commands)
        print(f"  client side, wrapped redis-py Connection: "
              f"{trips.sends / COUNT_N:g} round trips/request (socket writes), "
              f"{trips.reads / COUNT_N:g} replies read/request")
        print("  round trips by command: " + ", ".join(f"{k} x{v / COUNT_N:g}" for k, v in sent.items()))
    # One request's sequence, in order, for the record.
    for key in (c_key, dredis_key, cunix_key, dunix_key):
        with RoundTrips(names) as trips:
            callers[key]()
        print(f"  one request of {key.split()[0]}: " + " -> ".join(trips.commands))

    rollup_cost(apps[b_key], apps[c_key])
    async_rows(redis_server, log_path)

    print("\n== machine ==")
    print(machine_description(redis_server.version()))
    print(f"unix socket: flask-claude {apps[cunix_key].config['CLAUDE_STORAGE_URI']}, Flask-Limiter {unix_server.url}")
    print(f"{quiet}; timing run: {load_report}")
    print(f"command: {sys.executable} bench/overhead.py  (BENCH_ROUNDS={ROUNDS} BENCH_BATCH={BATCH} "
          f"BENCH_WARMUP={WARMUP})")
    print(f"\nratio of added time, flask-claude / Flask-Limiter (one limit), paired medians: "
          f"memory {paired[b_key] / paired[dmem_key]:.2f}, redis:// {paired[c_key] / paired[dredis_key]:.2f}, "
          f"unix {paired[cunix_key] / paired[dunix_key]:.2f}  (added us, ours/theirs: memory "
          f"{paired[b_key]:.0f}/{paired[dmem_key]:.0f}, redis:// {paired[c_key]:.0f}/{paired[dredis_key]:.0f}, "
          f"unix {paired[cunix_key]:.0f}/{paired[dunix_key]:.0f})")


# --- async: claude.async_messages vs a bare AsyncAnthropic call -------------------------------------

ASYNC_ROUNDS = int(os.environ.get("BENCH_ASYNC_ROUNDS", "20"))
ASYNC_BATCH = int(os.environ.get("BENCH_ASYNC_BATCH", "60"))


def async_rows(redis_server: RedisServer, log_path: str) -> None:
    """Per call, inside one running event loop (an ASGI server's, or one request's under Flask):

    (e) a bare ``AsyncAnthropic().messages.create`` on the simulator's transport;
    (f) ``claude.async_messages.create`` on memory:// (global budget reserved and settled, log line);
    (g) the same on Redis, whose two round trips per call are synchronous redis-py calls on the loop.

    Then how long the storage steps block the loop: the reservation and the settlement on Redis, timed
    one by one (redis-py is synchronous; the async client runs them on the loop, see aio.py).
    """
    import asyncio

    sim = Simulator()
    bare = anthropic.AsyncAnthropic(api_key="x", base_url=SIMULATOR_BASE_URL, max_retries=0,
                                    http_client=anthropic.DefaultAsyncHttpxClient(transport=sim.transport()))
    apps = {"(f)": app_guarded("memory://", log_path, "bench_f"),
            "(g)": app_guarded(redis_server.url, log_path, "bench_g")}
    params = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": PROMPT}]}

    def call_for(key: str) -> Callable[[], Any]:
        if key == "(e)":
            return lambda: bare.messages.create(**params)
        messages = apps[key].extensions["claude"].async_messages
        return lambda: messages.create(**params)

    keys = ["(e)", "(f)", "(g)"]
    labels = {"(e)": "(e) bare AsyncAnthropic", "(f)": "(f) claude.async_messages, memory",
              "(g)": "(g) claude.async_messages, redis"}

    async def batch(call: Callable[[], Any], n: int, out: list[float] | None) -> None:
        perf = time.perf_counter_ns
        for _ in range(n):
            t0 = perf()
            await call()
            if out is not None:
                out.append((perf() - t0) / 1000.0)

    async def main_async() -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        calls = {k: call_for(k) for k in keys}
        for key in keys:
            await batch(calls[key], WARMUP // 3, None)
        samples: dict[str, list[float]] = {k: [] for k in keys}
        medians: dict[str, list[float]] = {k: [] for k in keys}
        for r in range(ASYNC_ROUNDS):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                before = len(samples[key])
                gc.collect()
                await batch(calls[key], ASYNC_BATCH, samples[key])
                medians[key].append(percentile(samples[key][before:], 50))
                sim.clear_requests()
                for app in apps.values():
                    app.extensions["claude"].simulator.clear_requests()
        return samples, medians

    started = time.monotonic()
    with apps["(f)"].app_context():  # one context for the whole run: asyncio.run copies it into its tasks
        samples, medians = asyncio.run(main_async())
    elapsed = time.monotonic() - started
    rows = []
    for key in keys:
        paired = percentile([m - b for m, b in zip(medians[key], medians["(e)"], strict=True)], 50)
        rows.append([labels[key], f"{percentile(samples[key], 50):.0f}", f"{percentile(samples[key], 99):.0f}",
                     f"{paired:+.0f}"])
    print(f"\n== async: per call inside one event loop, simulator at zero latency ({ASYNC_ROUNDS} rounds x "
          f"{ASYNC_BATCH} calls per variant; {elapsed:.0f} s) ==")
    print(table(rows, ["variant", "median us", "p99 us", "added (paired)"]))
    # The storage steps run on the loop, blocking it: how long each takes on Redis (loopback).
    from flask_claude.context import CallScope

    state = apps["(g)"].extensions["claude"]
    scope = CallScope(feature="ask")
    reserve: list[float] = []
    settle: list[float] = []
    for _ in range(COUNT_N * 5):
        t0 = time.perf_counter_ns()
        held, _ = state.budgets.begin(scope, [MODEL], params, 64, wait=False)
        t1 = time.perf_counter_ns()
        state.budgets.settle(held, 0.0001, 100, success=MODEL)
        t2 = time.perf_counter_ns()
        reserve.append((t1 - t0) / 1000.0)
        settle.append((t2 - t1) / 1000.0)
    print(f"the loop is blocked by the two synchronous Redis steps of a guarded call ({len(reserve)} each): "
          f"reserve median {percentile(reserve, 50):.0f} us, p99 {percentile(reserve, 99):.0f} us; "
          f"settle median {percentile(settle, 50):.0f} us, p99 {percentile(settle, 99):.0f} us")


def rollup_cost(memory_app: Flask, redis_app: Flask) -> None:
    """What the shared rollups add to a request: adding a call's increments at its settlement (memory:
    into the store at once; Redis: summed in the worker, the sums written once per
    CLAUDE_ROLLUP_FLUSH_INTERVAL by the flusher thread or the next round trip, so "added" is what the
    request path pays), building those increments in Python, and the periodic alert evaluation's read.

    Measured directly on the store, interleaved (with, without, with, ...) so drift lands on both:
    the request-level figures above move by more than this from run to run.
    """
    from flask_claude.rollups import call_fields
    from flask_claude.storage import Line

    n = int(os.environ.get("BENCH_ROLLUP_N", "3000"))
    fields = call_fields(feature="ask", model=MODEL, error_type=None, fallback=False, retries=0, input_tokens=40,
                         output_tokens=64, cache_read=0, cache_creation=0, cost_usd=0.00108, latency_s=0.004)
    print(f"\n== the rollups' added time ({n} settlement steps each, interleaved; a call's rollup is "
          f"{len(fields)} fields in 3 hashes) ==")
    rows = []
    for label, app in (("memory://", memory_app), ("redis", redis_app)):
        state = app.extensions["claude"]
        store, params = state.store, state.breaker.params
        now = time.time()
        lines = [Line(f"bench:rollup:{i}", 10**12, 1000, now + 86400, f"line {i}") for i in range(4)]
        plain: list[float] = []
        rolled: list[float] = []
        perf = time.perf_counter_ns
        for i in range(n):
            for rollup, out in ((None, plain), (fields, rolled)) if i % 2 else ((fields, rolled), (None, plain)):
                t0 = perf()
                store.settle(lines, [f"r{i}"], (0.5, 0.8, 1.0), now, success=MODEL, breaker=params, rollup=rollup)
                out.append((perf() - t0) / 1000.0)
        built: list[float] = []
        for _ in range(n):
            t0 = perf()
            call_fields(feature="ask", model=MODEL, error_type=None, fallback=False, retries=0, input_tokens=40,
                        output_tokens=64, cache_read=0, cache_creation=0, cost_usd=0.00108, latency_s=0.004)
            built.append((perf() - t0) / 1000.0)
        evals: list[float] = []
        for _ in range(200):
            t0 = perf()
            state.ops_alerts.checks()
            evals.append((perf() - t0) / 1000.0)
        rows.append([label, f"{percentile(plain, 50):.1f}", f"{percentile(rolled, 50):.1f}",
                     f"{percentile(rolled, 50) - percentile(plain, 50):+.1f}", f"{percentile(built, 50):.1f}",
                     f"{percentile(evals, 50):.0f}"])
    print(table(rows, ["store", "settle us", "settle+rollup us", "added us", "build fields us",
                       "alert read us (every 5 s/process)"]))


if __name__ == "__main__":
    main()
