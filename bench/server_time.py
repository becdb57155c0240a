"""Redis's own time per guarded request with 1, 100 and 1,000 calls in flight on one budget.

A call in flight is a hold that stays live (taken with a ``hold_until`` an hour away, never settled),
as a long Claude call's is. For each count N, N such holds are taken on one budget key through
``RedisStore.begin``, then requests are measured on that same key: a ``begin`` (a new hold) and its
``settle`` (``RedisStore.settle``, the step ``settle_later`` writes behind), the pair every guarded
call costs. Redis's time comes from ``INFO commandstats`` on a redis-server this script starts:

- ``EVALSHA usec``: the scripts' whole time, the commands they run included (the store sends
  nothing but scripts here, so this is everything the requests cost the server);
- inner commands: the commands the scripts ran, counted and timed on their own (their time is
  part of the EVALSHA figure; Redis times each call in whole microseconds, so sums of ~1 us commands
  are coarse).

Then, with ``SLOWLOG`` logging every command (a pass of its own, so its cost stays out of the
figures above), the median time of one ``begin`` and of one ``settle`` script.

Two request shapes, each on stores of their own (one key prefix per N):

  one budget     the step holds and settles one line, the budget the N calls hold on;
  guarded route  the shape ``overhead.py``'s guarded route sends: the app-wide daily budget as a gate
                 and a hold, a per-minute request limit, the user's token and USD budgets, a breaker
                 read; settled with three alert thresholds and the breaker's success. The N calls in
                 flight are other users' (their own two budgets and the app-wide one), so they share
                 only the app-wide budget with the measured requests.

The counts are interleaved (each round every N once, in a rotated order), so drift lands on all of
them alike; the figure is the median over rounds of each round's usec per request.

Run: .venv/bin/python bench/server_time.py  (~20 s; BENCH_ROUNDS, BENCH_PAIRS per round and count,
BENCH_IN_FLIGHT, e.g. "1,100,1000")
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from _common import RedisServer, machine_description, table, wait_for_quiet

from flask_claude.storage import Begin, BreakerParams, Line, RedisStore

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "10"))
PAIRS = int(os.environ.get("BENCH_PAIRS", "200"))
IN_FLIGHT = [int(n) for n in os.environ.get("BENCH_IN_FLIGHT", "1,100,1000").split(",")]
SLOWLOG_PAIRS = 200
MODEL = "claude-sonnet-4-6"
BREAKER = BreakerParams(min_calls=5, failure_rate=0.5, window=30.0, cooldown=30.0)
BIG = 10**15  # limits nobody reaches: every step is admitted


@dataclass
class Shape:
    """How to take a call in flight, and one measured request's two steps, on a store."""

    label: str
    in_flight: Callable[[RedisStore, int, float, float], None]  # store, i, now, day_end
    begin: Callable[[RedisStore, str, float, float], Any]  # store, rid, now, day_end
    settle: Callable[[RedisStore, str, float, float], Any]


def _budget(key: str, amount: int, day_end: float) -> Line:
    return Line(key, BIG, amount, day_end, name=key)


def _one_budget() -> Shape:
    key = "usd:global:day"

    def in_flight(store: RedisStore, i: int, now: float, day_end: float) -> None:
        step = Begin(holds=[_budget(key, 10_000, day_end)], rid=f"live{i}", member=f"live{i}", hold_until=now + 3600)
        assert store.begin(step, now).ok

    def begin(store: RedisStore, rid: str, now: float, day_end: float) -> Any:
        step = Begin(holds=[_budget(key, 10_000, day_end)], rid=rid, member=rid, hold_until=now + 60)
        assert store.begin(step, now).ok

    def settle(store: RedisStore, rid: str, now: float, day_end: float) -> Any:
        store.settle([_budget(key, 1_234, day_end)], [rid], (), now)

    return Shape("one budget", in_flight, begin, settle)


def _guarded_route() -> Shape:
    app_wide = "usd:global:day"
    thresholds = (0.5, 0.8, 1.0)

    def holds(user: str, day_end: float, tokens: int, usd: int) -> list[Line]:
        return [_budget(f"tok:ask:{user}:day", tokens, day_end), _budget(f"usd:ask:{user}:day", usd, day_end),
                _budget(app_wide, usd, day_end)]

    def step(user: str, rid: str, now: float, until: float, day_end: float) -> Begin:
        return Begin(gates=[_budget(app_wide, 0, day_end)], requests=[Line(f"req:ask:{user}", BIG, 1, window=60.0)],
                     holds=holds(user, day_end, 4_064, 13_000), member=rid, rid=rid, hold_until=until,
                     exhausted_alert="1.0", breakers=[MODEL])

    def in_flight(store: RedisStore, i: int, now: float, day_end: float) -> None:
        assert store.begin(step(f"other{i}", f"live{i}", now, now + 3600, day_end), now).ok

    def begin(store: RedisStore, rid: str, now: float, day_end: float) -> Any:
        assert store.begin(step("me", rid, now, now + 60, day_end), now).ok

    def settle(store: RedisStore, rid: str, now: float, day_end: float) -> Any:
        store.settle(holds("me", day_end, 104, 1_080), [rid], thresholds, now, success=MODEL, breaker=BREAKER,
                     seen_closed=True)

    return Shape("guarded route", in_flight, begin, settle)


def _stats(client: Any) -> dict[str, tuple[int, int]]:
    """``INFO commandstats`` as {command: (calls, usec)}, the stats queries themselves left out."""
    out = {}
    for name, fields in client.info("commandstats").items():
        command = name.removeprefix("cmdstat_")
        if command in ("info", "config", "slowlog"):
            continue
        out[command] = (int(fields["calls"]), int(fields["usec"]))
    return out


def main() -> None:
    server = RedisServer()
    try:
        run(server)
    finally:
        server.stop()


def run(server: RedisServer) -> None:
    client = server.client
    quiet = wait_for_quiet()
    started = time.monotonic()
    serial = [0]
    shapes = [_one_budget(), _guarded_route()]
    day_end = time.time() + 12 * 3600
    stores: dict[tuple[str, int], RedisStore] = {}
    for s, shape in enumerate(shapes):
        for n in IN_FLIGHT:
            store = stores[shape.label, n] = RedisStore(server.url, prefix=f"st{s}n{n}", socket_timeout=5.0,
                                                        settle_delay=30)
            now = time.time()
            for i in range(n):
                shape.in_flight(store, i, now, day_end)

    def pairs(shape: Shape, store: RedisStore, count: int) -> None:
        for _ in range(count):
            serial[0] += 1
            rid = f"m{serial[0]}"
            now = time.time()
            shape.begin(store, rid, now, day_end)
            shape.settle(store, rid, now, day_end)

    # usec per request from commandstats, interleaved rounds
    per_request: dict[tuple[str, int], list[float]] = {k: [] for k in stores}
    inner_calls: dict[tuple[str, int], list[float]] = {k: [] for k in stores}
    inner_usec: dict[tuple[str, int], list[float]] = {k: [] for k in stores}
    for shape in shapes:
        for n in IN_FLIGHT:
            pairs(shape, stores[shape.label, n], PAIRS)  # warm-up: scripts loaded, caches warm
    for r in range(ROUNDS):
        for shape in shapes:
            order = IN_FLIGHT[r % len(IN_FLIGHT):] + IN_FLIGHT[:r % len(IN_FLIGHT)]
            for n in order:
                client.config_resetstat()
                pairs(shape, stores[shape.label, n], PAIRS)
                stats = _stats(client)
                evalsha = stats.pop("evalsha", (0, 0))
                assert evalsha[0] == 2 * PAIRS, evalsha
                per_request[shape.label, n].append(evalsha[1] / PAIRS)
                inner_calls[shape.label, n].append(sum(c for c, _ in stats.values()) / PAIRS)
                inner_usec[shape.label, n].append(sum(u for _, u in stats.values()) / PAIRS)

    # one begin and one settle each, from SLOWLOG (every command logged, in a pass of its own)
    split: dict[tuple[str, int], tuple[float, float]] = {}
    client.config_set("slowlog-max-len", str(4 * SLOWLOG_PAIRS))
    try:
        for shape in shapes:
            for n in IN_FLIGHT:
                store = stores[shape.label, n]
                client.slowlog_reset()
                client.config_set("slowlog-log-slower-than", "0")
                pairs(shape, store, SLOWLOG_PAIRS)
                client.config_set("slowlog-log-slower-than", "10000")
                entries = client.slowlog_get(4 * SLOWLOG_PAIRS)
                by_sha: dict[bytes, list[int]] = {}
                for entry in entries:
                    command = entry["command"]
                    words = command.split() if isinstance(command, bytes) else command
                    if words and words[0].upper() == b"EVALSHA":
                        by_sha.setdefault(words[1], []).append(int(entry["duration"]))
                begin_sha, settle_sha = store._begin.sha.encode(), store._settle.sha.encode()
                split[shape.label, n] = (statistics.median(by_sha.get(begin_sha, [0])),
                                         statistics.median(by_sha.get(settle_sha, [0])))
    finally:
        client.config_set("slowlog-log-slower-than", "10000")
        client.slowlog_reset()
    elapsed = time.monotonic() - started

    print(f"== Redis server time per guarded request (begin + settle), N calls in flight on one budget "
          f"({ROUNDS} rounds x {PAIRS} requests per N, interleaved; {elapsed:.0f} s) ==")
    ratios = []
    for shape in shapes:
        rows = []
        for n in IN_FLIGHT:
            key = (shape.label, n)
            rows.append([f"{n:,}", f"{statistics.median(per_request[key]):.1f}",
                         f"{min(per_request[key]):.1f}-{max(per_request[key]):.1f}",
                         f"{split[key][0]:.0f}", f"{split[key][1]:.0f}",
                         f"{statistics.median(inner_calls[key]):g}", f"{statistics.median(inner_usec[key]):.1f}"])
        print(f"\n{shape.label}:")
        print(table(rows, ["in flight", "EVALSHA usec/request", "range over rounds", "begin us (slowlog)",
                           "settle us (slowlog)", "inner commands/request", "their usec/request"]))
        if 1 in IN_FLIGHT and 1000 in IN_FLIGHT:
            ratio = statistics.median(per_request[shape.label, 1000]) / statistics.median(per_request[shape.label, 1])
            ratios.append(f"{shape.label} {ratio:.2f}")

    # what stays on the shared budget: live holds, and each settled call's mark (kept SETTLED_MEMORY_S)
    print("\nthe app-wide budget key at the end (live holds + the settled marks of the requests above):")
    rows = []
    for (label, n), store in stores.items():
        key = store._k("usd:global:day")
        fields, timeline = client.hlen(key), client.zcard(f"{key}|t")
        memory = (client.memory_usage(key) or 0) + (client.memory_usage(f"{key}|t") or 0)
        rows.append([label, f"{n:,}", fields, timeline, f"{memory:,}", f"{memory / max(1, timeline):.0f}"])
    print(table(rows, ["shape", "in flight", "hash fields", "timeline entries", "bytes (hash + timeline)",
                       "bytes per entry"]))

    print("\n== machine ==")
    print(machine_description(server.version()))
    print(quiet)
    print(f"command: {sys.executable} bench/server_time.py  (BENCH_ROUNDS={ROUNDS} BENCH_PAIRS={PAIRS} "
          f"BENCH_IN_FLIGHT={','.join(map(str, IN_FLIGHT))})")
    if ratios:
        print(f"\nserver time per request, 1,000 calls in flight / 1: {', '.join(ratios)}")


if __name__ == "__main__":
    main()
