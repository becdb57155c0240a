"""Where flask-claude's added time goes on ``memory://``: the same guarded route with one part at a time
switched off (patched out in this process only), interleaved with a bare SDK route, paired medians.

A profiler spreads the cost thin; taking a part away shows what it costs on the request path, cache
and allocation effects included (the log line costs several times its isolated micro-benchmark).

Run: .venv/bin/python bench/ablate_overhead.py  (from the repository root or bench/; ~2 minutes)
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from _common import machine_description, percentile, table
from loguru import logger
from overhead import Caller, app_a, app_guarded

import flask_claude.budget as budget
import flask_claude.events as events
from flask_claude import telemetry
from flask_claude.before_view import BeforeView
from flask_claude.simulator import Simulator

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "15"))
BATCH = int(os.environ.get("BENCH_BATCH", "60"))


@contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    original = obj.__dict__[name]
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


def added(callers: dict[str, Callable[[], None]]) -> float:
    """The guarded route's median added time over the bare one, paired per round."""
    medians: dict[str, list[float]] = {k: [] for k in callers}
    for _ in range(ROUNDS):
        for key, call in callers.items():
            gc.collect()
            samples = []
            for _ in range(BATCH):
                t0 = time.perf_counter_ns()
                call()
                samples.append((time.perf_counter_ns() - t0) / 1000)
            medians[key].append(percentile(samples, 50))
    return percentile([g - b for g, b in zip(medians["guarded"], medians["bare"], strict=True)], 50)


def main() -> None:
    logger.remove()
    tmp = tempfile.mkdtemp(prefix="bench-ablate-")
    callers = {"bare": Caller(app_a(Simulator())),
               "guarded": Caller(app_guarded("memory://", os.path.join(tmp, "calls.jsonl"), "ablate"))}
    for call in callers.values():
        for _ in range(300):
            call()
    fd = os.open(os.path.join(tmp, "direct.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def direct_line(self: Any, event: str, fields: Any, level: str = "INFO") -> dict[str, Any]:
        import json

        record = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event, **fields}
        os.write(fd, (json.dumps(record, default=str, ensure_ascii=False) + "\n").encode())
        return record

    variants: list[tuple[str, Any]] = [
        ("everything on", None),
        ("no log line at all", (events.EventLog, "emit", lambda self, event, fields, level="INFO": dict(fields))),
        ("our JSON line written directly, not through loguru", (events.EventLog, "emit", direct_line)),
        ("no OpenTelemetry span (already a no-op without a provider)",
         (telemetry, "start_call", lambda **kw: telemetry.NO_SPAN)),
        ("no budget steps (admission, hold, settlement)", None),
    ]
    rows = []
    for label, patch in variants:
        if label.startswith("no budget steps"):
            with patched(budget.Budgets, "settle", lambda self, *a, **k: None), \
                    patched(BeforeView, "admit_before_view", lambda self, scope: None), \
                    patched(budget.Budgets, "begin", lambda self, *a, **k: (None, None)):
                rows.append([label, f"{added(callers):+.0f}"])
        elif patch is None:
            rows.append([label, f"{added(callers):+.0f}"])
        else:
            with patched(*patch):
                rows.append([label, f"{added(callers):+.0f}"])
    print(f"\n== added time per request over a bare SDK route, memory://, paired medians "
          f"({ROUNDS} rounds x {BATCH}) ==")
    print(table(rows, ["variant", "added us"]))
    print("\n== machine ==")
    print(machine_description(None))
    print(f"command: {sys.executable} bench/ablate_overhead.py")


if __name__ == "__main__":
    main()
