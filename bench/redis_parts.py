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

import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from _common import (
    LoadMeter,
    RedisServer,
    machine_description,
    paired,
    percentile,
    round_medians,
    table,
    wait_for_quiet,
)
from flask import Flask
from loguru import logger
from overhead import LIMITS, Caller, app_a, app_d, app_guarded

from flask_claude.simulator import Simulator

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "30"))
BATCH = int(os.environ.get("BENCH_BATCH", "60"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "200"))
STORAGE = os.environ.get("BENCH_STORAGE", "redis")


def guarded(storage_uri: str, log_path: str, name: str, *, daily: bool = True,
            limits: dict[str, Any] | None = None) -> Flask:
    """``overhead.py``'s guarded route, with other limits and the app-wide budget on or off."""
    config: dict[str, Any] = {} if daily else {"CLAUDE_DAILY_BUDGET_USD": None}
    return app_guarded(storage_uri, log_path, name, limits=limits, **config)


def without(*names: str) -> dict[str, Any]:
    return {k: v for k, v in LIMITS.items() if k not in names}


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
            "  no per-user usd budget (tokens only)": guarded(url, log, "nousd", limits=without("usd")),
            "  no request limit": guarded(url, log, "noreq", limits=without("requests")),
            "  no budgets at all (request limit only)": guarded(url, log, "reqonly", daily=False,
                                                                limits=without("tokens", "usd")),
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
        medians = round_medians(callers, ROUNDS, BATCH, collect=True,
                                after_batch=lambda: [s.clear_requests() for s in sims])
        rows = []
        for key in keys[1:]:
            saved = "" if key in keys[1:3] else f"{paired(medians, keys[2], key):+.0f}"
            rows.append([key, f"{percentile(medians[key], 50):.0f}", f"{paired(medians, key, keys[0]):+.0f}", saved])
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
