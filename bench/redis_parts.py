"""What each guard costs on Redis: the guarded route of ``overhead.py`` with one part taken away by
configuration (no patching), side by side in one process, interleaved, paired medians.

``overhead.py`` says how far flask-claude's Redis path is from Flask-Limiter's one limit; this says
where the difference is, in the units a design change would remove: the app-wide daily budget (what a
per-worker lease of it could save at most), one per-user budget line (what merging a user's token
and dollar budgets into one hash could save at most), the exact sliding request window, and all the
budgets at once (what is left is the round trip, the breaker read and the log line).

BENCH_STORAGE=memory runs the same variants on ``memory://`` (Flask-Limiter's too), to tell what is
Redis's part of each.

Run: .venv/bin/python bench/redis_parts.py  (~1 minute; BENCH_STORAGE=memory for the memory:// rows)
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _common import LoadMeter, RedisServer, machine_description, percentile, table, wait_for_quiet
from flask import Flask, request
from loguru import logger
from overhead import MODEL, Caller, app_a, app_d

from flask_claude import Claude, ai_feature, budgeted, fallback_to
from flask_claude.simulator import Simulator

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "30"))
BATCH = int(os.environ.get("BENCH_BATCH", "60"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "200"))
STORAGE = os.environ.get("BENCH_STORAGE", "redis")


def guarded(storage_uri: str, log_path: str, name: str, *, daily: bool = True,
            limits: dict[str, Any] | None = None) -> Flask:
    app = Flask(name)
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=[MODEL, "claude-haiku-4-5"],
                      CLAUDE_STORAGE_URI=storage_uri, CLAUDE_LOG_PATH=log_path, CLAUDE_STORAGE_PREFIX=name)
    if daily:
        app.config["CLAUDE_DAILY_BUDGET_USD"] = 1_000_000
    claude = Claude()
    claude.init_app(app)
    limits = {"requests": "1000000/minute", "tokens": "1000000000/day", "usd": "1000000/day"} \
        if limits is None else limits

    @app.post("/ask")
    @ai_feature("ask", max_tokens=64, max_input_chars=4000)
    @budgeted(**limits)
    @fallback_to({"text": None, "notice": "paused"}, status=503)
    def ask() -> Any:
        msg = claude.messages.create(model=MODEL, max_tokens=64,
                                     messages=[{"role": "user", "content": request.json["text"]}])
        return {"text": msg.content[0].text}

    return app


def main() -> None:
    logger.remove()
    tmp = tempfile.mkdtemp(prefix="bench-redis-parts-")
    log = os.path.join(tmp, "calls.jsonl")
    server = RedisServer()
    try:
        sim = Simulator()
        url = server.url if STORAGE == "redis" else "memory://"
        apps: dict[str, Flask] = {
            "bare SDK route": app_a(sim),
            f"Flask-Limiter, one limit, {STORAGE}": app_d(sim, url, "fl"),
            "flask-claude, everything on (overhead.py's (c))": guarded(url, log, "full"),
            "  no app-wide daily budget": guarded(url, log, "nodaily", daily=False),
            "  no per-user usd budget (tokens only)": guarded(
                url, log, "nousd", limits={"requests": "1000000/minute", "tokens": "1000000000/day"}),
            "  no request limit": guarded(url, log, "noreq", limits={"tokens": "1000000000/day", "usd": "1000000/day"}),
            "  no budgets at all (request limit only)": guarded(
                url, log, "reqonly", daily=False, limits={"requests": "1000000/minute"}),
            "  nothing in storage but the breaker read": guarded(url, log, "none", daily=False, limits={}),
        }
        callers: dict[str, Callable[[], None]] = {k: Caller(app) for k, app in apps.items()}
        sims = [sim] + [a.extensions["claude"].simulator for a in apps.values() if "claude" in a.extensions]
        quiet = wait_for_quiet()
        meter = LoadMeter([server.process.pid])
        keys = list(callers)
        for key in keys:
            for _ in range(WARMUP):
                callers[key]()
        medians: dict[str, list[float]] = {k: [] for k in keys}
        perf = time.perf_counter_ns
        for r in range(ROUNDS):
            for key in keys[r % len(keys):] + keys[:r % len(keys)]:
                gc.collect()
                call, samples = callers[key], []
                for _ in range(BATCH):
                    t0 = perf()
                    call()
                    samples.append((perf() - t0) / 1000.0)
                medians[key].append(percentile(samples, 50))
                for s in sims:
                    s.clear_requests()
        bare = medians[keys[0]]
        full = medians[keys[2]]
        rows = []
        for key in keys[1:]:
            add = percentile([m - b for m, b in zip(medians[key], bare, strict=True)], 50)
            saved = percentile([f - m for f, m in zip(full, medians[key], strict=True)], 50)
            rows.append([key, f"{percentile(medians[key], 50):.0f}", f"{add:+.0f}",
                         "" if key == keys[2] or key == keys[1] else f"{saved:+.0f}"])
        print(f"== added time per request on {url}, paired medians ({ROUNDS} rounds x {BATCH}) ==")
        print(table(rows, ["variant", "median us", "added us", "saved vs everything on"]))
        print(f"\n{quiet}; during the run: {meter.report()}")
        print(machine_description(server.version()))
        print(f"command: {sys.executable} bench/redis_parts.py  (BENCH_STORAGE={STORAGE} BENCH_ROUNDS={ROUNDS} "
              f"BENCH_BATCH={BATCH})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
