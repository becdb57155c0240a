"""The store for one process: the same semantics as the Redis scripts, under one lock."""

from __future__ import annotations

import heapq
import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from .pacing import MemoryPacing
from .records import BREAKER_BUCKETS, KILL_SHARE, Begin, BreakerParams, Crossed, Line, Outcome, SettleDone
from .rollups import MemoryRollups


@dataclass(slots=True)
class _Budget:
    spent: int = 0
    expires_at: float = 0.0
    exhausted_at_limit: int | None = None
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # rid -> (amount, hold_until)
    reserved: int = 0  # the sum of the holds' amounts
    next_lapse: float = math.inf  # the earliest hold_until: before it no hold can have lapsed

    def hold(self, rid: str, amount: int, until: float) -> None:
        """A new hold: each step's ``rid`` is new (a top-up has its own)."""
        self.holds[rid] = (amount, until)
        self.reserved += amount
        self.next_lapse = min(self.next_lapse, until)

    def release(self, rid: str) -> None:
        entry = self.holds.pop(rid, None)
        if entry is not None:
            self.reserved -= entry[0]

    def live_reserved(self, now: float) -> int:
        """The holds still live; a lapsed one (a worker that died mid-call) is dropped here. The sum is
        kept as holds come and go, so a budget is scanned only when one of its holds may have lapsed."""
        if now >= self.next_lapse:
            for rid in [r for r, (_, until) in self.holds.items() if until <= now]:
                self.release(rid)
            self.next_lapse = min((until for _, until in self.holds.values()), default=math.inf)
        return self.reserved


@dataclass
class _Breaker:
    open_until: float | None = None
    probe_since: float | None = None
    buckets: dict[int, list[int]] = field(default_factory=dict)  # bucket -> [calls, failures]


class _Expiries:
    """When to look at an entry again, in coarse time buckets: eviction in amortised O(1) per entry.

    Redis drops keys by their TTL; memory must drop them itself, or a day of distinct users stays
    forever. Each entry is scheduled when created and looked at once when its time has come (a
    window still in use is scheduled again at its newest hit's end), so a call pays only for the
    entries that fell due, however many are live.
    """

    WIDTH = 60.0

    def __init__(self) -> None:
        self._buckets: dict[int, list[tuple[str, str]]] = {}
        self._heap: list[int] = []

    def at(self, when: float, kind: str, key: str) -> None:
        bucket = math.ceil(when / self.WIDTH)
        entries = self._buckets.get(bucket)
        if entries is None:
            entries = self._buckets[bucket] = []
            heapq.heappush(self._heap, bucket)
        entries.append((kind, key))

    def due_by(self, now: float) -> bool:
        """Whether any bucket fell due (the one check most steps need)."""
        return bool(self._heap) and self._heap[0] * self.WIDTH <= now

    def due(self, now: float) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while self._heap and self._heap[0] * self.WIDTH <= now:
            out += self._buckets.pop(heapq.heappop(self._heap))
        return out

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._buckets.values())


class MemoryStore:
    """The same semantics as the Redis scripts, under one lock, for one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._budgets: dict[str, _Budget] = {}
        self._windows: dict[str, deque[float]] = {}
        self._window_length: dict[str, float] = {}
        self._alerts: dict[str, float] = {}
        self._breakers: dict[str, _Breaker] = {}
        self._records: dict[str, tuple[str, float]] = {}
        self._expiries = _Expiries()
        self._now = 0.0  # the latest time a caller gave: records expire on it (put_record has no clock)
        self.rollups = MemoryRollups()
        self.pacing = MemoryPacing()

    def size(self) -> int:
        """Entries held (budgets, windows, alert claims, records): what eviction keeps bounded."""
        with self._lock:
            return len(self._budgets) + len(self._windows) + len(self._alerts) + len(self._records)

    def _evict(self, now: float) -> None:
        """Drop what fell due: ended periods, empty windows, lapsed alert claims and records."""
        if now > self._now:
            self._now = now
        if not self._expiries.due_by(now):
            return
        for kind, key in self._expiries.due(now):
            if kind == "budget":
                budget = self._budgets.get(key)
                if budget is not None and budget.expires_at <= now:
                    del self._budgets[key]
            elif kind == "window":
                hits = self._windows.get(key)
                length = self._window_length.get(key, 0.0)
                if hits is not None:
                    while hits and hits[0] <= now - length:
                        hits.popleft()
                    if hits:
                        self._expiries.at(hits[-1] + length, "window", key)
                    else:
                        del self._windows[key], self._window_length[key]
            elif kind == "alert":
                if self._alerts.get(key, now + 1) <= now:
                    del self._alerts[key]
            elif kind == "record":
                record = self._records.get(key)
                if record is not None and record[1] <= now:
                    del self._records[key]

    def _budget(self, key: str, expires_at: float, now: float) -> _Budget:
        budget = self._budgets.get(key)
        if budget is None or budget.expires_at <= now:
            budget = self._budgets[key] = _Budget(expires_at=expires_at)
            self._expiries.at(expires_at, "budget", key)
        return budget

    def _window(self, key: str, length: float) -> deque[float]:
        hits = self._windows.get(key)
        if hits is None:
            hits = self._windows[key] = deque()
            self._window_length[key] = length
            self._expiries.at(self._now + length, "window", key)
        return hits

    def _claim_alert(self, key: str, threshold: str, until: float, now: float) -> bool:
        alert_key = f"{key}|{threshold}"
        if self._alerts.get(alert_key, 0) > now:
            return False
        self._alerts[alert_key] = until
        self._expiries.at(until, "alert", alert_key)
        return True

    def begin(self, step: Begin, now: float) -> Outcome:
        with self._lock:
            self._evict(now)
            for i, line in enumerate(step.gates):
                budget = self._budget(line.key, line.expires_at, now)
                if budget.spent >= line.limit or budget.exhausted_at_limit == line.limit:
                    return Outcome(False, "gate", i, retry_after=max(0.0, line.expires_at - now))
            remaining, resets = [], []
            for i, line in enumerate(step.requests):
                hits = self._window(line.key, line.window)
                while hits and hits[0] <= now - line.window:
                    hits.popleft()
                if len(hits) + 1 > line.limit:
                    return Outcome(False, "request", i, retry_after=max(0.0, hits[0] + line.window - now))
                remaining.append(line.limit - len(hits) - 1)
                resets.append(max(0.0, hits[0] + line.window - now) if hits else line.window)
            budgets = [self._budget(line.key, line.expires_at, now) for line in step.holds]
            amounts = [line.amount for line in step.holds]
            downgraded, fraction = False, 0.0
            if 0 <= step.downgrade_line < len(step.holds):
                line = step.holds[step.downgrade_line]
                fraction = budgets[step.downgrade_line].spent / line.limit if line.limit else 1.0
                if fraction >= step.downgrade_at:
                    downgraded, amounts = True, list(step.alt_amounts)
            held = True
            for i, (line, budget) in enumerate(zip(step.holds, budgets, strict=True)):
                amount = amounts[i]
                if budget.spent + budget.live_reserved(now) + amount > line.limit:
                    if step.optional_holds:
                        held = False
                        break
                    busy = budget.spent + amount <= line.limit
                    first = False
                    if not busy and amount <= KILL_SHARE * line.limit \
                            and budget.exhausted_at_limit != line.limit:
                        budget.exhausted_at_limit = line.limit
                        first = bool(step.exhausted_alert) and self._claim_alert(
                            line.key, step.exhausted_alert, line.expires_at, now)
                    retry = 1.0 if busy else max(0.0, line.expires_at - now)
                    return Outcome(False, "hold", i, busy=busy, retry_after=retry, newly_exhausted=first,
                                   spent=budget.spent)
            for line in step.requests:
                self._windows[line.key].append(now)
            if held:
                for amount, budget in zip(amounts, budgets, strict=True):
                    budget.hold(step.rid, amount, step.hold_until)
            breakers = {m: (b.open_until if (b := self._breakers.get(m)) else None) for m in step.breakers}
            return Outcome(ok=True, remaining=tuple(remaining), resets=tuple(resets), breakers=breakers, held=held,
                           downgraded=downgraded, fraction=fraction)

    def settle(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
               success: str | None = None, breaker: BreakerParams | None = None,
               rollup: dict[str, int] | None = None, seen_closed: bool = False) -> list[Crossed]:
        """``seen_closed`` saves Redis a read; here the breaker's state is at hand anyway."""
        crossed = []
        if rollup:
            self.rollups.write(rollup, now)
        with self._lock:
            self._evict(now)
            for line in lines:
                budget = self._budget(line.key, line.expires_at, now)
                before = budget.spent
                for rid in rids:
                    budget.release(rid)
                budget.spent += line.amount
                for threshold in thresholds:
                    mark = threshold * line.limit
                    if before < mark <= budget.spent and self._claim_alert(line.key, repr(threshold),
                                                                           line.expires_at, now):
                        crossed.append(Crossed(line.key, threshold, budget.spent, line.limit))
            if success is not None and breaker is not None:
                self._record(success, True, now, breaker)
        return crossed

    def settle_later(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
                     done: SettleDone, success: str | None = None, breaker: BreakerParams | None = None,
                     rollup: dict[str, int] | None = None, seen_closed: bool = False) -> None:
        """In memory a settlement costs a lock, not a round trip: done at once."""
        done(self.settle(lines, rids, thresholds, now, success=success, breaker=breaker, rollup=rollup), None)

    def flush(self) -> None:
        """Nothing waits in memory."""

    def usage(self, keys: Sequence[str], now: float) -> list[tuple[int, int]]:
        with self._lock:
            out = []
            for key in keys:
                budget = self._budgets.get(key)
                if budget is None or budget.expires_at <= now:
                    out.append((0, 0))
                else:
                    out.append((budget.spent, budget.live_reserved(now)))
            return out

    def put_record(self, key: str, value: str, ttl: float) -> None:
        with self._lock:
            self._records[key] = (value, self._now + ttl)
            self._expiries.at(self._now + ttl, "record", key)

    def get_record(self, key: str) -> str | None:
        with self._lock:
            record = self._records.get(key)
            return None if record is None or record[1] <= self._now else record[0]

    def breaker_allow(self, key: str, now: float, cooldown: float) -> bool:
        with self._lock:
            b = self._breakers.get(key)
            if b is None or b.open_until is None:
                return True
            if now < b.open_until:
                return False
            if b.probe_since is not None and now < b.probe_since + cooldown:
                return False
            b.probe_since = now  # half-open: this caller is the one probe
            return True

    def breaker_record(self, key: str, ok: bool, now: float, params: BreakerParams) -> bool:
        with self._lock:
            return self._record(key, ok, now, params)

    def _record(self, key: str, ok: bool, now: float, params: BreakerParams) -> bool:
        b = self._breakers.get(key)
        if b is None:
            b = self._breakers[key] = _Breaker()
        if b.open_until is not None:
            if b.probe_since is None:
                return False
            b.probe_since = None
            if ok:
                self._breakers[key] = _Breaker()
                return False
            b.open_until = now + params.cooldown
            return True
        width = params.window / BREAKER_BUCKETS
        bucket = math.floor(now / width)
        counts = b.buckets.setdefault(bucket, [0, 0])
        counts[0] += 1
        counts[1] += 0 if ok else 1
        if len(b.buckets) > BREAKER_BUCKETS:
            for old in [k for k in b.buckets if k <= bucket - BREAKER_BUCKETS]:
                del b.buckets[old]
        if ok:
            return False
        window = [b.buckets.get(i, (0, 0)) for i in range(bucket - BREAKER_BUCKETS + 1, bucket + 1)]
        calls = sum(c for c, _ in window)
        failures = sum(f for _, f in window)
        if calls >= params.min_calls and failures / calls >= params.failure_rate:
            self._breakers[key] = _Breaker(open_until=now + params.cooldown)
            return True
        return False

    def breaker_state(self, key: str, now: float) -> str:
        with self._lock:
            b = self._breakers.get(key)
            if b is None or b.open_until is None:
                return "closed"
            return "open" if now < b.open_until else "half_open"
