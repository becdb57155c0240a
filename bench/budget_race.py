"""Concurrency against a small global budget: reservations (flask-claude) vs count-after-the-call.

gunicorn, 4 gthread workers x 16 threads, on one Redis; 64 client threads post as fast as they can
(REQUESTS in all) to a route whose Claude call the simulator answers after LATENCY seconds. The
budget is a few cents, so it runs out part-way through. Same load, same model, same prompt, same
latency, twice: bench/race_app.py in ``reserve`` mode (flask-claude, CLAUDE_DAILY_BUDGET_USD) and in
``naive`` mode (GET spent < budget, call, INCRBYFLOAT the real cost), implemented only in bench/.

Settled spend is the sum of ``cost_usd`` over the shared JSON log of all workers.

Run: /work/venv/bin/python bench/budget_race.py  (about 30 s)
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import Gunicorn, LoadMeter, RedisServer, machine_description, percentile, table, wait_for_quiet

BUDGET_USD = float(os.environ.get("BENCH_BUDGET_USD", "0.05"))
LATENCY = float(os.environ.get("BENCH_SIM_LATENCY", "0.05"))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "64"))
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "1500"))
WORKERS = 4
THREADS = 16


def post(base: str) -> tuple[int, int | None]:
    """(status, Retry-After seconds or None)."""
    req = urllib.request.Request(f"{base}/spend", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            response.read()
            return int(response.status), None
    except urllib.error.HTTPError as exc:
        exc.read()
        retry_after = exc.headers.get("Retry-After")
        return int(exc.code), int(retry_after) if retry_after and retry_after.isdigit() else None
    except OSError:
        return -1, None


@functools.cache
def worst_case() -> float:
    """One call's reserved worst case: the input bound plus max_tokens at the model's dearest rates."""
    from race_app import MAX_TOKENS, MODEL, PROMPT

    from flask_claude.pricing import PriceTable
    from flask_claude.tokens import upper_bound_tokens

    bound = upper_bound_tokens({"messages": [{"role": "user", "content": PROMPT}]})
    return PriceTable().worst_case_usd([MODEL], bound, MAX_TOKENS)


def _ts(event: dict[str, Any]) -> float:
    ts = event.get("ts")
    if isinstance(ts, (int, float)):
        return float(ts)
    from datetime import datetime

    return datetime.fromisoformat(str(ts)).timestamp() if ts else 0.0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run_mode(mode: str, redis_server: RedisServer, tmp: Path) -> dict[str, Any]:
    redis_server.client.flushall()
    log_path = tmp / f"{mode}.jsonl"
    server = Gunicorn("race_app:create_app()", {
        "BENCH_MODE": mode, "BENCH_REDIS_URL": redis_server.url, "BENCH_LOG_PATH": str(log_path),
        "BENCH_BUDGET_USD": repr(BUDGET_USD), "BENCH_SIM_LATENCY": repr(LATENCY), "BENCH_TMP": str(tmp),
    }, workers=WORKERS, threads=THREADS)
    try:
        remaining = iter(range(REQUESTS))
        lock = threading.Lock()
        statuses: Counter[int] = Counter()
        retry_after: list[int] = []
        latency: dict[int, list[float]] = {}

        def client() -> None:
            while True:
                with lock:
                    if next(remaining, None) is None:
                        return
                t0 = time.perf_counter()
                status, wait = post(server.base)
                elapsed_ms = (time.perf_counter() - t0) * 1000
                with lock:
                    statuses[status] += 1
                    latency.setdefault(status, []).append(elapsed_ms)
                    if wait is not None:
                        retry_after.append(wait)

        quiet = wait_for_quiet()
        meter = LoadMeter([redis_server.process.pid, server.process.pid, *_children(server.process.pid)])
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            for future in [pool.submit(client) for _ in range(CLIENTS)]:
                future.result()
        elapsed = time.monotonic() - started
        load_report = meter.report()
        burst_lines = len(log_path.read_text().splitlines()) if log_path.exists() else 0
        # Drain: once every hold has settled, one client alone, until the first refusal (bounded).
        time.sleep(LATENCY * 4 + 0.5)
        drained = 0
        while drained < 100 and post(server.base)[0] == 200:
            drained += 1
    finally:
        server.stop()
    events = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    burst_spent = sum(float(e["cost_usd"]) for e in events[:burst_lines]
                      if e["event"] in ("claude_api_call", "claude_api_error"))
    calls = [e for e in events if e["event"] in ("claude_api_call", "claude_api_error")]
    spent = sum(float(e["cost_usd"]) for e in calls)
    costs = sorted(float(e["cost_usd"]) for e in calls if e["event"] == "claude_api_call")
    degraded = Counter(e.get("reason") for e in events if e["event"] == "feature_degraded")
    refusals = [e for e in events if e["event"] in ("feature_degraded", "refused")]
    # Settled spend as of each refusal (log order by timestamp): was there room for one worst case?
    settled = sorted((_ts(e), float(e["cost_usd"])) for e in calls)
    times = [t for t, _ in settled]
    cumulative = list(itertools.accumulate(c for _, c in settled))
    early = 0
    for e in refusals:
        i = bisect.bisect_left(times, _ts(e))  # calls logged strictly before the refusal
        if BUDGET_USD - (cumulative[i - 1] if i else 0.0) >= worst_case():
            early += 1
    return {"mode": mode, "spent": spent, "burst_spent": burst_spent, "drained": drained, "calls": len(calls),
            "statuses": statuses, "elapsed": elapsed,
            "cost_per_call": costs[len(costs) // 2] if costs else 0.0, "degraded": degraded,
            "early": early, "retry_after": retry_after, "latency": latency, "quiet": quiet, "load": load_report,
            "alerts": Counter(e.get("threshold") for e in events if e["event"] == "budget_alert")}


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-race-"))
    redis_server = RedisServer()
    try:
        results = [run_mode("reserve", redis_server, tmp), run_mode("naive", redis_server, tmp)]
        version = redis_server.version()
    finally:
        redis_server.stop()

    from flask_claude.pricing import PriceTable

    sys.path.insert(0, str(Path(__file__).parent))
    from race_app import MAX_TOKENS, MODEL, PROMPT

    from flask_claude.tokens import upper_bound_tokens

    worst = PriceTable().worst_case_usd([MODEL], upper_bound_tokens(
        {"messages": [{"role": "user", "content": PROMPT}]}), MAX_TOKENS)

    print(f"\n== {CLIENTS} concurrent clients, {REQUESTS} requests, gunicorn {WORKERS} gthread workers x "
          f"{THREADS} threads, one Redis, simulator latency {LATENCY * 1000:.0f} ms, global budget "
          f"${BUDGET_USD:.4f} ==")
    rows = []
    for r in results:
        overspend = max(0.0, r["spent"] - BUDGET_USD)
        label = ("reservation (flask-claude)" if r["mode"] == "reserve"
                 else "naive: GET < budget, call, INCRBYFLOAT after")
        rows.append([label, f"${BUDGET_USD:.6f}", f"${r['burst_spent']:.6f}", r["drained"],
                     f"${r['spent']:.6f}", f"${overspend:.6f}",
                     f"{overspend / BUDGET_USD * 100:.1f}%", f"{r['spent'] / BUDGET_USD * 100:.1f}%",
                     r["calls"], r["statuses"].get(200, 0), r["statuses"].get(503, 0),
                     r["early"], sum(v for k, v in r["statuses"].items() if k not in (200, 503)),
                     f"{r['elapsed']:.1f}"])
    print(table(rows, ["mode", "budget", "spend after burst", "drain ok", "settled spend", "overspend", "over %",
                       "utilisation", "calls billed", "burst 200", "burst 503", "refused with room", "other",
                       "burst wall s"]))
    print("(drain ok: after the burst, with every hold settled, requests sent one at a time until the first "
          "refusal; settled spend, overspend, utilisation and calls are after the drain)")
    print("(refused with room: refusals logged while the spend settled so far left room for at least one more "
          "worst-case call, i.e. refused because of other calls' in-flight holds; log timestamps, ms resolution)")
    for r in results:
        ra = sorted(r["retry_after"])
        if ra:
            print(f"{r['mode']}: Retry-After on 503 refusals: min {ra[0]} s, median {ra[len(ra) // 2]} s, "
                  f"max {ra[-1]} s ({len(ra)} refusals with the header)")
    for r in results:
        parts = [f"{code}: p50 {percentile(v, 50):.0f} / p95 {percentile(v, 95):.0f} / max {max(v):.0f} ms "
                 f"({len(v)})" for code, v in sorted(r["latency"].items())]
        print(f"{r['mode']}: burst latency by status: " + "; ".join(parts))
    per_call = results[0]["cost_per_call"] or results[1]["cost_per_call"]
    print(f"\none call: real cost ${per_call:.6f} (median), reserved worst case ${worst:.6f} "
          f"({MODEL}, max_tokens={MAX_TOKENS})")
    reserve = results[0]
    print(f"reservation mode: unused budget ${BUDGET_USD - reserve['spent']:.6f} "
          f"(= {(BUDGET_USD - reserve['spent']) / worst:.2f} x one call's worst case; the last calls are "
          f"refused when the room left is below their worst case); degraded reasons "
          f"{dict(reserve['degraded'])}; budget alerts by threshold {dict(reserve['alerts'])}")
    naive = results[1]
    print(f"naive mode: {naive['calls'] - round(BUDGET_USD / per_call) if per_call else 0} calls past the "
          f"budget's worth (~{BUDGET_USD / per_call:.0f} calls fit), overspend "
          f"{max(0.0, naive['spent'] - BUDGET_USD) / per_call:.1f} calls' cost" if per_call else "")

    print("\n== machine ==")
    print(machine_description(version))
    for r in results:
        print(f"{r['mode']} burst: {r['quiet']}; {r['load']}")
    print(f"command: {sys.executable} bench/budget_race.py  (BENCH_BUDGET_USD={BUDGET_USD} "
          f"BENCH_SIM_LATENCY={LATENCY} BENCH_CLIENTS={CLIENTS} BENCH_REQUESTS={REQUESTS})")


if __name__ == "__main__":
    main()
