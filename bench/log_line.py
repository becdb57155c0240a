"""What one ``claude_api_call`` log line costs on the request's hot path: ``EventLog.emit``, per call.

Three set-ups, each in rounds, in one process; the fastest round's mean is printed (the figure least
moved by other load on a shared machine), then the median round's:

  ours only        our own sink (flat JSON line to a file), loguru's default handler removed
  + user filter    also a user's sink whose filter says no (``record["extra"].get("event") == "x"``)
  + user json      also a user's ``logger.add(file, serialize=True)`` that takes every record

Run against two commits in turn to compare them (a snapshot keeps other sessions' edits out):

  SHA=53fb9ac; mkdir -p /tmp/fc-snap/$SHA && git archive $SHA flask_claude | tar -x -C /tmp/fc-snap/$SHA
  PYTHONPATH=/tmp/fc-snap/$SHA .venv/bin/python bench/log_line.py
  .venv/bin/python bench/log_line.py                     # the working tree

Sizes: BENCH_ROUNDS (default 15), BENCH_N (calls per round, default 2000).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable

from loguru import logger

import flask_claude
from flask_claude.events import EventLog

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "15"))
N = int(os.environ.get("BENCH_N", "2000"))

FIELDS = {"request_id": "req_sim_abcdef0123456789abcdef01", "feature": "ask", "route": "/ask",
          "user": "0123456789abcdef", "model": "claude-sonnet-4-6", "requested_model": "claude-sonnet-4-6",
          "fallback_from": None, "latency_ms": 1.2, "retries": 0, "system_prompt_hash": None,
          "input_tokens": 20, "output_tokens": 30, "cache_read_input_tokens": 0,
          "cache_creation_input_tokens": 0, "stop_reason": "end_turn", "cost_usd": 0.0001}


def per_call_us(fn: Callable[[], object]) -> tuple[float, float]:
    rounds = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(N):
            fn()
        rounds.append((time.perf_counter() - t0) / N * 1e6)
    return min(rounds), statistics.median(rounds)


def main() -> None:
    logger.remove()
    tmp = tempfile.mkdtemp(prefix="bench-logline-")
    log = EventLog(path=os.path.join(tmp, "claude.jsonl"), secrets=("sk-x",), hash_users=True,
                   log_content=False, salt="s")

    def emit() -> None:
        log.emit("claude_api_call", FIELDS)

    for _ in range(2000):
        emit()  # warm-up
    rows = [("ours only", per_call_us(emit))]
    no = logger.add(lambda m: None, filter=lambda r: r["extra"].get("event") == "x", level="INFO")
    rows.append(("+ user filter (says no)", per_call_us(emit)))
    logger.remove(no)
    user = logger.add(os.path.join(tmp, "app.log"), serialize=True, level="INFO")
    rows.append(("+ user serialize=True sink", per_call_us(emit)))
    logger.remove(user)
    print(f"flask_claude from {os.path.dirname(flask_claude.__file__)}; {ROUNDS} rounds x {N} calls, "
          "us per emit: fastest round, median round")
    for label, (best, median) in rows:
        print(f"  {label:28s} {best:7.2f} {median:7.2f}")


if __name__ == "__main__":
    main()
