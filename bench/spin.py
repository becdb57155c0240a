"""What ``CLAUDE_STORAGE_SPIN`` buys and costs: the guarded route of ``overhead.py`` on Redis, with the
spin off (sleep at once for Redis's reply) and at its default, side by side.

1. Latency, one process: the two apps interleaved in one process (paired medians over a bare SDK
   route), as ``overhead.py`` measures; the machine otherwise idle, which is when a sleeping
   worker's CPU halts and a reply wakes it.
2. Throughput under saturation: ``BENCH_PROCS`` processes (twice the cores by default) each call
   their own app in a loop for ``BENCH_SECONDS``, all spinning or none; requests completed per second
   in all. A spinning worker holds a core another worker could use, unless replies are slow enough
   (a busy machine) that the spin turns itself off: this says which wins.

Run: .venv/bin/python bench/spin.py  (~1 minute)
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import time
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
from loguru import logger
from overhead import Caller, app_a, app_guarded

from flask_claude.simulator import Simulator

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "30"))
BATCH = int(os.environ.get("BENCH_BATCH", "60"))
PROCS = int(os.environ.get("BENCH_PROCS", str(2 * (os.cpu_count() or 1))))
SECONDS = float(os.environ.get("BENCH_SECONDS", "8"))
DEFAULT_SPIN = 0.0005


def guarded(url: str, log: str, name: str, spin: float) -> Any:
    return app_guarded(url, log, name, CLAUDE_STORAGE_SPIN=spin)


def latency(url: str, log: str) -> list[list[str]]:
    callers = {"bare SDK route": Caller(app_a(Simulator())),
               "spin off (0)": Caller(guarded(url, log, "spin_off", 0.0)),
               f"spin {DEFAULT_SPIN * 1e6:.0f} us (default)": Caller(guarded(url, log, "spin_on", DEFAULT_SPIN))}
    keys = list(callers)
    for key in keys:
        for _ in range(200):
            callers[key]()
    medians = round_medians(callers, ROUNDS, BATCH, collect=True)
    return [[k, f"{percentile(medians[k], 50):.0f}", f"{paired(medians, k, keys[0]):+.0f}"] for k in keys[1:]]


def _worker(url: str, log: str, spin: float, start: Any, counts: Any, index: int) -> None:
    logger.remove()
    caller = Caller(guarded(url, log, f"tp{index}", spin))
    for _ in range(100):
        caller()
    start.wait()
    n, until = 0, time.monotonic() + SECONDS
    while time.monotonic() < until:
        caller()
        n += 1
    counts[index] = n


def throughput(url: str, log: str, spin: float) -> float:
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    counts = ctx.Array("q", PROCS)
    procs = [ctx.Process(target=_worker, args=(url, log, spin, start, counts, i)) for i in range(PROCS)]
    for p in procs:
        p.start()
    time.sleep(2.0)  # the workers warm up; a ready barrier would need one more primitive for nothing
    start.set()
    for p in procs:
        p.join()
    return sum(counts) / SECONDS


def main() -> None:
    logger.remove()
    tmp = tempfile.mkdtemp(prefix="bench-spin-")
    log = os.path.join(tmp, "calls.jsonl")
    server = RedisServer()
    try:
        quiet = wait_for_quiet()
        meter = LoadMeter([server.process.pid])
        rows = latency(server.url, log)
        load = meter.report()  # the throughput part below is all forked workers: the meter would call them others
        print(f"== one process, machine otherwise idle: added time over a bare SDK route, Redis, paired medians "
              f"({ROUNDS} rounds x {BATCH}) ==")
        print(table(rows, ["variant", "median us", "added us"]))
        tp = []
        for label, spin in (("spin off (0)", 0.0), (f"spin {DEFAULT_SPIN * 1e6:.0f} us (default)", DEFAULT_SPIN),
                            ("spin off (0), again", 0.0), (f"spin {DEFAULT_SPIN * 1e6:.0f} us, again", DEFAULT_SPIN)):
            tp.append([label, f"{throughput(server.url, log, spin):.0f}"])
        print(f"\n== {PROCS} processes on {os.cpu_count()} cores, each calling its own app in a loop "
              f"for {SECONDS:.0f} s ==")
        print(table(tp, ["variant", "requests/s, all processes"]))
        print(f"\n{quiet}; during the latency part: {load}")
        print(machine_description(server.version()))
        print(f"command: {sys.executable} bench/spin.py  (BENCH_ROUNDS={ROUNDS} BENCH_PROCS={PROCS} "
              f"BENCH_SECONDS={SECONDS:.0f})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
