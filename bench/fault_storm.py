"""The primary model overloaded: retries, fallback and the circuit breaker, with real time.

One process, one app per phase (so each phase starts with a closed breaker), each on the in-process
simulator with 20 ms latency for both models, driven by THREADS concurrent threads calling the
WSGI app directly. Settings: CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"],
CLAUDE_MAX_RETRIES=2, breaker defaults (CLAUDE_BREAKER_MIN_CALLS=5, _FAILURE_RATE=0.5,
_WINDOW=30 s, _COOLDOWN=30 s), storage memory://. Retry backoff sleeps are real (full jitter,
0.5 s then 1 s caps).

  baseline  the same route asking for claude-sonnet-4-6 directly, no faults
  phase 1   claude-opus-4-7 answers 529 to every other call (sim.fail(529, rate=0.5))
  phase 2   claude-opus-4-7 answers 529 to every call
  phase 2b  as phase 2 with CLAUDE_BREAKER_COOLDOWN=2 for ~7 s: what reaches the dead model after
            each cooldown (the half-open probe)

Events are captured with a loguru sink filtering on flask_claude.events.claude_fields(record); the
moment a breaker opened is taken when its circuit_opened event is emitted, and compared with the simulator's
receipt timestamps of the requests for the dead model (same clock, time.time()).

Run: /work/venv/bin/python bench/fault_storm.py  (about 40 s)
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

from _common import LoadMeter, machine_description, percentile, table, wait_for_quiet
from flask import Flask, request
from loguru import logger
from werkzeug.test import EnvironBuilder

from flask_claude import Claude, ai_feature, fallback_to
from flask_claude.events import claude_fields

PRIMARY, FALLBACK = "claude-opus-4-7", "claude-sonnet-4-6"
LATENCY = float(os.environ.get("BENCH_SIM_LATENCY", "0.02"))
THREADS = int(os.environ.get("BENCH_THREADS", "8"))
N = int(os.environ.get("BENCH_N", "400"))

claude = Claude()
events: list[tuple[float, dict[str, Any]]] = []


def capture(message: Any) -> None:
    events.append((time.time(), dict(claude_fields(message.record) or {})))


def make_app(name: str, log_path: str, **config: Any) -> Flask:
    app = Flask(name)
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=[PRIMARY, FALLBACK], CLAUDE_MAX_RETRIES=2,
                      CLAUDE_LOG_PATH=log_path, **config)
    claude.init_app(app)
    app.extensions["claude"].simulator.latency(LATENCY)

    @app.post("/ask")
    @ai_feature("ask", max_tokens=64)
    @fallback_to({"text": None, "notice": "paused"}, status=503)
    def ask() -> Any:
        model = request.args.get("model", PRIMARY)
        msg = claude.messages.create(model=model, max_tokens=64,
                                     messages=[{"role": "user", "content": "Summarize the incident report."}])
        return {"text": msg.content[0].text}

    return app


def call(app: Flask, environ: dict[str, Any], body: bytes) -> tuple[int, dict[str, str]]:
    env = dict(environ)
    env["wsgi.input"] = io.BytesIO(body)
    got: dict[str, Any] = {}

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        got["status"] = int(status.split()[0])
        got["headers"] = dict(headers)

    result = app(env, start_response)
    try:
        for _ in result:
            pass
    finally:
        getattr(result, "close", lambda: None)()
    return got["status"], got["headers"]


def load(app: Flask, *, n: int | None = None, seconds: float | None = None,
         model: str = PRIMARY) -> list[tuple[float, float, int, str | None]]:
    """THREADS threads post until n requests are done (or for ``seconds``); (start, latency_s, status, degraded)."""
    body = json.dumps({}).encode()
    builder = EnvironBuilder(path="/ask", method="POST", data=body, content_type="application/json",
                             query_string={"model": model}, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    environ = builder.get_environ()
    builder.close()
    results: list[tuple[float, float, int, str | None]] = []
    lock = threading.Lock()
    counter = [0]
    stop_at = time.monotonic() + seconds if seconds is not None else None

    def worker() -> None:
        while True:
            with lock:
                if n is not None and counter[0] >= n:
                    return
                counter[0] += 1
            if stop_at is not None and time.monotonic() >= stop_at:
                return
            started = time.time()
            t0 = time.perf_counter()
            status, headers = call(app, environ, body)
            elapsed = time.perf_counter() - t0
            with lock:
                results.append((started, elapsed, status, headers.get("X-Claude-Degraded")))

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def summarize(label: str, app: Flask, results: list[tuple[float, float, int, str | None]],
              since: float, wall: float) -> list[Any]:
    lat = [r[1] * 1000 for r in results]
    ok = sum(1 for r in results if r[2] == 200)
    mine = [f for t, f in events if t >= since]
    fallbacks = sum(1 for f in mine if f["event"] == "model_fallback")
    served_by_fallback = sum(1 for f in mine if f["event"] == "claude_api_call" and f.get("fallback_from"))
    retries = sum(int(f.get("retries") or 0) for f in mine if f["event"] in ("claude_api_call", "claude_api_error"))
    sim = app.extensions["claude"].simulator
    opened = [t for t, f in events if t >= since and f["event"] == "circuit_opened" and f["model"] == PRIMARY]
    primary = [r.timestamp for r in sim.requests_for(PRIMARY)]
    if opened:
        t_open = opened[0]
        cooldown = app.extensions["claude"].settings.breaker_cooldown
        after = [ts for ts in primary if t_open < ts < t_open + cooldown]
        breaker = (f"opened {t_open - since:.3f} s in, after {sum(1 for ts in primary if ts <= t_open)} "
                   f"primary attempts; {len(after)} reached it after opening and before the cooldown "
                   f"({cooldown:g} s) ended" + (f", received {', '.join(f'{(ts - t_open) * 1000:.1f}' for ts in after)}"
                                                f" ms after the circuit_opened event" if after else ""))
    else:
        breaker = "never opened"
    degraded = Counter(r[3] for r in results if r[3])
    return [label, len(results), f"{ok / len(results) * 100:.1f}%", f"{percentile(lat, 50):.1f}",
            f"{percentile(lat, 95):.1f}", f"{percentile(lat, 99):.1f}", f"{max(lat):.0f}", fallbacks,
            served_by_fallback, retries, len(primary), dict(degraded) or "-", f"{wall:.1f}", breaker]


def main() -> None:
    logger.remove()
    logger.add(capture, level="DEBUG", filter=lambda r: claude_fields(r) is not None, format="{message}")
    quiet = wait_for_quiet()
    meter = LoadMeter()
    tmp = tempfile.mkdtemp(prefix="bench-storm-")
    log_path = os.path.join(tmp, "claude.jsonl")
    rows = []
    notes = []

    # baseline: the fallback model directly, no faults
    app = make_app("storm_baseline", log_path)
    load(app, n=50, model=FALLBACK)  # warm-up
    since = time.time()
    t0 = time.monotonic()
    results = load(app, n=N, model=FALLBACK)
    rows.append(summarize(f"baseline: {FALLBACK} directly, no faults", app, results, since, time.monotonic() - t0))
    baseline_p95 = percentile([r[1] * 1000 for r in results], 95)

    # phase 1: the primary fails every other call
    app = make_app("storm_phase1", log_path)
    load(app, n=50, model=FALLBACK)  # warm-up on the healthy model only: the primary's breaker stays fresh
    app.extensions["claude"].simulator.clear_requests()
    app.extensions["claude"].simulator.fail(529, model=PRIMARY, rate=0.5)
    since = time.time()
    t0 = time.monotonic()
    results = load(app, n=N)
    rows.append(summarize("phase 1: primary 529 on 50%", app, results, since, time.monotonic() - t0))

    # phase 2: the primary fails every call
    app = make_app("storm_phase2", log_path)
    load(app, n=50, model=FALLBACK)
    app.extensions["claude"].simulator.clear_requests()
    app.extensions["claude"].simulator.fail(529, model=PRIMARY)
    since = time.time()
    t0 = time.monotonic()
    results = load(app, n=N)
    rows.append(summarize("phase 2: primary 529 on 100%", app, results, since, time.monotonic() - t0))
    phase2 = results
    opened2 = next((t for t, f in events if t >= since and f["event"] == "circuit_opened"), None)
    p95_2 = percentile([r[1] * 1000 for r in phase2], 95)
    if opened2 is not None:
        after_open = [r[1] * 1000 for r in phase2 if r[0] > opened2]
        notes.append(f"phase 2, requests started after the breaker opened ({len(after_open)}): p50 "
                     f"{percentile(after_open, 50):.1f} ms, p95 {percentile(after_open, 95):.1f} ms, p99 "
                     f"{percentile(after_open, 99):.1f} ms")
    notes.append(f"phase 2 p95 {p95_2:.1f} ms vs baseline p95 {baseline_p95:.1f} ms: "
                 f"{p95_2 - baseline_p95:+.1f} ms (target: within 10 ms)")
    # Same app, breaker still open (well inside its 30 s cooldown): alternate 100-request chunks of
    # "ask the dead primary" and "ask the fallback directly", so machine noise hits both alike.
    direct: list[float] = []
    via_open: list[float] = []
    t_steady = time.monotonic()
    for _ in range(4):
        via_open += [r[1] * 1000 for r in load(app, n=100)]
        direct += [r[1] * 1000 for r in load(app, n=100, model=FALLBACK)]
    if opened2 is not None and time.time() - opened2 >= 30:
        notes.append("WARNING: the steady-state chunks ran past the 30 s cooldown; a probe may be among them")
    steady_wall = time.monotonic() - t_steady
    notes.append(f"phase 2 steady state, same app, breaker open, interleaved 4 x 100 each ({steady_wall:.1f} s): "
                 f"primary requested -> fallback p50 {percentile(via_open, 50):.1f} / p95 "
                 f"{percentile(via_open, 95):.1f} / p99 {percentile(via_open, 99):.1f} ms; fallback requested "
                 f"directly p50 {percentile(direct, 50):.1f} / p95 {percentile(direct, 95):.1f} / p99 "
                 f"{percentile(direct, 99):.1f} ms; p95 difference "
                 f"{percentile(via_open, 95) - percentile(direct, 95):+.1f} ms")
    primary_after = [r.timestamp for r in app.extensions["claude"].simulator.requests_for(PRIMARY)
                     if opened2 is not None and r.timestamp > opened2]
    notes.append(f"phase 2 incl. steady state: {len(primary_after)} requests reached {PRIMARY} after its "
                 f"breaker opened")

    # phase 2b: short cooldown, to watch the half-open probes
    app = make_app("storm_phase2b", log_path, CLAUDE_BREAKER_COOLDOWN=2)
    load(app, n=50, model=FALLBACK)
    sim = app.extensions["claude"].simulator
    sim.clear_requests()
    sim.fail(529, model=PRIMARY)
    since = time.time()
    t0 = time.monotonic()
    results = load(app, seconds=7.0)
    rows.append(summarize("phase 2b: 100%, cooldown 2 s, 7 s", app, results, since, time.monotonic() - t0))
    opens = [t - since for t, f in events if t >= since and f["event"] == "circuit_opened"]
    first_open = since + opens[0] if opens else None
    primary = sorted(r.timestamp - since for r in sim.requests_for(PRIMARY))
    later = [round(ts, 2) for ts in primary if first_open is not None and ts > first_open - since]
    notes.append(f"phase 2b: circuit_opened at {', '.join(f'{t:.2f}' for t in opens)} s; primary requests "
                 f"after the first opening at {later} s (each should be one probe >= 2 s after the "
                 f"previous opening)")

    print(f"\n== fault storm: {THREADS} threads, {N} requests per phase, simulator latency "
          f"{LATENCY * 1000:.0f} ms on both models, CLAUDE_MAX_RETRIES=2, breaker defaults (min 5 calls, "
          f"50% failures, 30 s window, 30 s cooldown) unless stated ==")
    header = ["phase", "requests", "success", "p50 ms", "p95 ms", "p99 ms", "max ms", "fallback events",
              "served by fallback", "retries", "primary attempts", "degraded", "wall s", "breaker"]
    print(table([r[:-1] for r in rows], header[:-1]))
    for r in rows:
        print(f"{r[0]}: breaker {r[-1]}")
    for note in notes:
        print(note)
    print("\n== machine ==")
    print(machine_description())
    print(f"{quiet}; {meter.report()}")
    print(f"command: {sys.executable} bench/fault_storm.py  (BENCH_THREADS={THREADS} BENCH_N={N} "
          f"BENCH_SIM_LATENCY={LATENCY})")


if __name__ == "__main__":
    main()
