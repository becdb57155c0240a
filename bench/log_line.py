"""What one ``claude_api_call`` log line costs on the request's hot path: ``EventLog.emit``, per call.

Three set-ups, in one process:

  ours only        our own sink (flat JSON line to a file), loguru's default handler removed
  + user filter    also a user's sink whose filter says no (``record["extra"].get("event") == "x"``)
  + user json      also a user's ``logger.add(file, serialize=True)`` that takes every record

To compare with another commit's ``events.py`` (it imports nothing of flask_claude, so it loads on
its own), name it in BENCH_BEFORE: both run in the same process, in alternating rounds, so the load of
a shared machine lands on both alike:

  git show 53fb9ac:flask_claude/events.py > /tmp/events_before.py
  BENCH_BEFORE=/tmp/events_before.py .venv/bin/python bench/log_line.py

Printed per set-up: the fastest round's mean (the figure least moved by other load) and the median
round's, in microseconds per emit. Sizes: BENCH_ROUNDS (default 21), BENCH_N (calls per round, 1000).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

from flask_claude import events as events_now

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "21"))
N = int(os.environ.get("BENCH_N", "1000"))

FIELDS = {"request_id": "req_sim_abcdef0123456789abcdef01", "feature": "ask", "route": "/ask",
          "user": "0123456789abcdef", "model": "claude-sonnet-4-6", "requested_model": "claude-sonnet-4-6",
          "fallback_from": None, "latency_ms": 1.2, "retries": 0, "system_prompt_hash": None,
          "input_tokens": 20, "output_tokens": 30, "cache_read_input_tokens": 0,
          "cache_creation_input_tokens": 0, "stop_reason": "end_turn", "cost_usd": 0.0001}


def load(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("events_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rounds(variants: dict[str, Callable[[], object]]) -> dict[str, tuple[float, float]]:
    """Each variant N calls per round, the variants alternating within every round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(N):
                fn()
            times[name].append((time.perf_counter() - t0) / N * 1e6)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def main() -> None:
    logger.remove()
    tmp = tempfile.mkdtemp(prefix="bench-logline-")
    modules = {"now": events_now}
    if before := os.environ.get("BENCH_BEFORE"):
        modules = {"before": load(before), **modules}
    emitters: dict[str, Callable[[], object]] = {}
    for name, module in modules.items():
        log = module.EventLog(path=os.path.join(tmp, f"{name}.jsonl"), secrets=("sk-x",), hash_users=True,
                              log_content=False, salt="s")
        emitters[name] = lambda log=log: log.emit("claude_api_call", FIELDS)
    for fn in emitters.values():
        for _ in range(2000):
            fn()  # warm-up
    results = [("ours only", rounds(emitters))]
    no = logger.add(lambda m: None, filter=lambda r: r["extra"].get("event") == "x", level="INFO")
    results.append(("+ user filter (says no)", rounds(emitters)))
    logger.remove(no)
    user = logger.add(os.path.join(tmp, "app.log"), serialize=True, level="INFO")
    results.append(("+ user serialize=True sink", rounds(emitters)))
    logger.remove(user)
    print(f"{ROUNDS} rounds x {N} emits; us per emit, fastest round / median round"
          + ("; 'before' is " + before if before else ""))
    for label, by_name in results:
        cells = "   ".join(f"{name} {best:6.2f} / {median:6.2f}" for name, (best, median) in by_name.items())
        print(f"  {label:28s} {cells}")


if __name__ == "__main__":
    main()
