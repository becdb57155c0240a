"""Redis round trips per single-call request, for each admission mode, side by side in one run.

The same guarded route as bench/overhead.py ((c): @ai_feature, three limits, a reservation across
three budgets, settlement) on a private redis-server, in three shapes:

  before_view, input bound    the default mode; the feature declares max_input_chars, so the first
                              call's hold rides on the admission before the view
  before_view, no bound       the default mode without an input bound: admission, then the call's hold
  with_first_call             the opt-in mode: admission checked with the first call's hold

Counted two ways, as in overhead.py: client side (redis-py socket writes, one per round trip) and
server side (INFO commandstats, every command including those inside the Lua scripts), a
``store.flush()`` at the end included (what the requests left written behind counts with them). Also the
median added time per request over a bare SDK route, interleaved, for a first idea of the cost of
each trip (bench/overhead.py is the reference for overhead).

Run: .venv/bin/python bench/round_trips.py  (about 20 s on 2 cores)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import Counter
from typing import Any

from _common import RedisServer, diff_stats, machine_description, paired, round_medians, table
from flask import Flask
from loguru import logger
from overhead import Caller, RoundTrips, app_a, app_guarded

from flask_claude.simulator import Simulator

MODEL = "claude-sonnet-4-6"
COUNT_N = int(os.environ.get("BENCH_COUNT_N", "200"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "20"))
BATCH = int(os.environ.get("BENCH_BATCH", "50"))

MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "before_view, input bound (default)": ("before_view", {"max_input_chars": 4000}),
    "before_view, no bound (default)": ("before_view", {}),
    "with_first_call (opt-in)": ("with_first_call", {}),
}


def main() -> None:
    logger.remove()
    log_path = os.path.join(tempfile.mkdtemp(prefix="bench-trips-"), "claude.jsonl")
    server = RedisServer()
    try:
        run(server, log_path)
    finally:
        server.stop()


def run(server: RedisServer, log_path: str) -> None:
    apps = {label: app_guarded(server.url, log_path, f"bench_{i}", admission=admission, feature=feature)
            for i, (label, (admission, feature)) in enumerate(MODES.items())}
    callers = {label: Caller(app) for label, app in apps.items()}
    bare = Caller(app_a(Simulator()))
    for caller in [bare, *callers.values()]:
        for _ in range(100):
            caller()

    rows = []
    for label, caller in callers.items():
        names = _names(apps[label])
        before = server.commandstats()
        with RoundTrips(names) as trips:
            for _ in range(COUNT_N):
                caller()
            apps[label].extensions["claude"].store.flush()  # what they left written behind counts with them
        delta = diff_stats(before, server.commandstats())
        sent = Counter(trips.commands)
        rows.append([label, f"{trips.sends / COUNT_N:g}", f"{sum(delta.values()) / COUNT_N:g}",
                     ", ".join(f"{k} x{v / COUNT_N:g}" for k, v in sent.items()), dict(caller.statuses)])
    print(f"\n== Redis round trips per single-call request ({COUNT_N} requests per mode) ==")
    print(table(rows, ["admission mode", "round trips/req (client)", "commands/req (server, incl. Lua)",
                       "round trips by script", "statuses"]))

    # added time per request over the bare route, interleaved rounds
    started = time.monotonic()
    medians = round_medians({"bare": bare, **callers}, ROUNDS, BATCH)
    added = [[k, f"{paired(medians, k, 'bare'):+.0f}"] for k in callers]
    print(f"\n== added time per request over a bare SDK route, paired medians ({ROUNDS} rounds x {BATCH}; "
          f"{time.monotonic() - started:.0f} s) ==")
    print(table(added, ["admission mode", "added us (Redis)"]))
    print("\n== machine ==")
    print(machine_description(server.version()))
    print(f"command: {sys.executable} bench/round_trips.py")


def _names(app: Flask) -> dict[str, str]:
    store = app.extensions["claude"].store
    names = {getattr(store, attr).sha: label for attr, label in
             (("_begin", "begin"), ("_settle", "settle"), ("_allow", "breaker_allow"), ("_record", "breaker_record"))}
    rollup_script = getattr(store.rollups, "_script", None)  # the summed rollups (since rollup-coalesce)
    if rollup_script is not None:
        names[rollup_script.sha] = "rollup"
    return names


if __name__ == "__main__":
    main()
