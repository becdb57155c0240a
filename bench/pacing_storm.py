"""A queue instead of a 429 storm: 4 gunicorn workers x 16 threads, 64 client threads, one rate-limited
upstream, with CLAUDE_PACING off, wait and fallback.

The upstream is the loopback simulator (``Simulator().serve()``, one for every worker), limited per
model to 120 requests and 40,000 output tokens per *window*; the window is 10 s instead of a minute
(``sim.rate_limit(..., window=10)``: the same token buckets, six times faster), so each mode runs
in BENCH_SECONDS (30 s) instead of minutes. Every response carries the real ``anthropic-ratelimit-*``
headers; a call over the limit gets a 429 ``rate_limit_error`` with ``retry-after``. The simulator
answers after BENCH_SIM_LATENCY (0.5 s), 429s included. Each call asks for max_tokens 300 (the API
pre-charges output at max_tokens: 120 x 300 = 36,000 < 40,000, so requests are the binding limit).
Models [claude-opus-4-7, claude-sonnet-4-6], each with its own buckets; storage: our own Redis.

Reported per mode: upstream 429s (counted by the simulator) against all upstream calls, successful
calls per window against the limit (steady state: responses completed after the first window,
whose full bucket is a one-off burst), p50/p95 latency of every client request, degraded responses.

Run: .venv/bin/python bench/pacing_storm.py  (about 2 minutes)
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

from _common import Gunicorn, LoadMeter, RedisServer, machine_description, percentile, table, wait_for_quiet

from flask_claude.simulator import Simulator

WINDOW = float(os.environ.get("BENCH_WINDOW", "10"))
REQUESTS, OUTPUT_TOKENS = 120, 40_000
SECONDS = float(os.environ.get("BENCH_SECONDS", "30"))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "64"))
LATENCY = float(os.environ.get("BENCH_SIM_LATENCY", "0.5"))
MODES = os.environ.get("BENCH_MODES", "off,wait,fallback").split(",")
PRIMARY = "claude-opus-4-7"


def drive(base: str, seconds: float) -> list[tuple[float, float, int, str, str]]:
    """CLIENTS threads POST /ask back to back for ``seconds``: (start, end, status, model, degraded)."""
    port = int(base.rsplit(":", 1)[1])
    results: list[tuple[float, float, int, str, str]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            try:
                conn.request("POST", "/ask", body=b"{}", headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
                model = json.loads(body).get("model", "") if resp.status == 200 else ""
                mine.append((t0, time.monotonic(), resp.status, model, resp.getheader("X-Claude-Degraded") or ""))
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                mine.append((t0, time.monotonic(), 0, "", "connection"))
        conn.close()
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_mode(mode: str, sim: Simulator, url: str, redis: RedisServer, tmp: str) -> list[Any]:
    redis.client.flushall()
    limit = sim.rate_limit(requests=REQUESTS, output_tokens=OUTPUT_TOKENS, window=WINDOW)  # fresh, full buckets
    sim.clear_requests()
    env = {"BENCH_SIM_URL": url, "BENCH_REDIS_URL": redis.url, "BENCH_PACING": mode,
           "BENCH_LOG_PATH": os.path.join(tmp, f"{mode}.jsonl"), "BENCH_TMP": tmp, "BENCH_PACING_WAIT": str(WINDOW)}
    server = Gunicorn("pacing_app:create_app()", env, workers=4, threads=16)
    try:
        limit.limited = limit.admitted = 0
        limit.limited_by_model.clear()
        limit.limited_at.clear()
        wall_start = time.time()
        sim.clear_requests()
        started = time.monotonic()
        results = drive(server.base, SECONDS)
    finally:
        server.stop()
    upstream = limit.admitted + limit.limited
    by_model = Counter(r.model for r in sim.requests)
    ok = [r for r in results if r[2] == 200]
    steady = [r for r in ok if r[1] - started >= WINDOW]
    steady_windows = (max(r[1] for r in results) - started - WINDOW) / WINDOW
    per_window = len(steady) / steady_windows
    primary_steady = sum(1 for r in steady if r[3] == PRIMARY) / steady_windows
    latencies = [r[1] - r[0] for r in results]
    degraded = Counter(r[4] for r in results if r[2] != 200)
    late = sum(1 for t in limit.limited_at if t - wall_start >= WINDOW)
    return [mode, len(results), upstream, f"{limit.limited} ({late})", f"{100 * limit.limited / max(1, upstream):.1f}%",
            len(ok), f"{per_window:.1f}", f"{primary_steady:.1f} ({100 * primary_steady / REQUESTS:.0f}%)",
            f"{percentile(latencies, 50):.2f}", f"{percentile(latencies, 95):.2f}", f"{max(latencies):.2f}",
            ", ".join(f"{k or '-'} {v}" for k, v in sorted(degraded.items())) or "0",
            ", ".join(f"{m.split('-')[1]} {n} ({limit.limited_by_model.get(m, 0)} 429s)"
                      for m, n in sorted(by_model.items()))]


def main() -> None:
    quiet = wait_for_quiet()
    redis = RedisServer()
    sim = Simulator()
    sim.latency(LATENCY)
    server = sim.serve()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            meter = LoadMeter([redis.process.pid])
            for mode in MODES:
                rows.append(run_mode(mode, sim, server.url, redis, tmp))
                print(f"  {mode}: done", file=sys.stderr)
            load = meter.report()
        header = ["CLAUDE_PACING", "client requests", "upstream calls", "upstream 429s (after 1st window)", "429 share",
                  "200 OK", "OK per window (steady)", f"{PRIMARY} OK per window (vs {REQUESTS})",
                  "p50 s", "p95 s", "max s", "not 200 (X-Claude-Degraded)", "upstream calls by model"]
        print(machine_description(redis.version()))
        print(f"{quiet}; {load}")
        print(f"limits per model: {REQUESTS} requests and {OUTPUT_TOKENS:,} output tokens per {WINDOW:g} s window "
              f"(a minute played {60 / WINDOW:g}x faster); {CLIENTS} client threads, 4 gunicorn workers x 16 "
              f"threads, {SECONDS:g} s per mode, simulator latency {LATENCY:g} s, max_tokens 300")
        print()
        print(table(rows, header))
    finally:
        server.shutdown()
        redis.stop()


if __name__ == "__main__":
    main()
