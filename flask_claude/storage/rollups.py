"""The rollups' storage: per-minute and per-hour hashes and lifetime totals, on Redis or in memory.

What the fields mean and who reads them: flask_claude/rollups.py. Here only where they live, and
how they get there. In memory a call's increments are added at once (in-process, cheap). On Redis
they are coalesced in the worker: summed per minute bucket and field, then written at most once per
``CLAUDE_ROLLUP_FLUSH_INTERVAL`` by one script (``lua/rollup.lua``) riding on a round trip that
happens anyway (``RedisStore`` takes them along with the settlements written behind), by the
flusher thread when none comes, and by every ``flush()`` (readers, exit). Per call that saves the
~26 server-side commands (HINCRBY of each field into three hashes, two PEXPIREs) the settlement
script used to run; per interval the same commands run once over the sums.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import process
from .scripts import lua

MINUTE = 60
HOUR = 3600
DAY = 86400
GRACE_S = 3600  # a bucket outlives the retention by this much, so a reader at the edge still finds it
# Minute buckets an accumulation may span before it is due at once, whatever the interval: a clock
# that jumps (or a test's fake one) must not grow it without bound.
MAX_MINUTES = 16


@dataclass
class Snapshot:
    """Raw rollup hashes as read: minute -> fields, hour -> cost fields, lifetime totals, alert states."""

    minutes: dict[int, dict[str, int]] = field(default_factory=dict)
    hours: dict[int, dict[str, int]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    alerts: dict[str, str] = field(default_factory=dict)


def _decode_hash(raw: Mapping[Any, Any]) -> dict[str, int]:
    out = {}
    for k, v in raw.items():
        out[k.decode() if isinstance(k, bytes) else str(k)] = int(v)
    return out


def _add(into: dict[str, int], fields: Mapping[str, int]) -> None:
    for name, amount in fields.items():
        into[name] = into.get(name, 0) + amount


class RedisRollups:
    """The rollup half of ``RedisStore``: the worker's accumulation, key names, the readers.

    Increments wait here, summed per minute bucket (the hour and lifetime sums are made when they
    are sent), until they are due: ``flush_interval`` seconds after the first of them, or at once
    past ``MAX_MINUTES`` buckets. ``RedisStore`` takes them (``take``) into a round trip it makes
    anyway. A write that fails is dropped, not retried (a retry could double count a script a hung
    Redis still runs): monitoring counts are lost for that interval, budgets are not (they are
    settled per call). A forked worker starts empty: its parent writes what the parent counted.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self._client = store.client
        self._tag = store.tag
        self.retention = 2 * DAY
        self.flush_interval = 1.0  # CLAUDE_ROLLUP_FLUSH_INTERVAL, set by the app (rollups.AppRollups)
        self._script = self._client.register_script(lua("rollup"))
        self._transition = self._client.register_script(lua("rollup_transition"))
        self._lock = threading.Lock()
        self._minutes: dict[int, dict[str, int]] = {}  # minute bucket -> field -> summed increments
        self._since: float | None = None  # monotonic time of the oldest increment waiting; None: none wait
        self._pid = process.pid()

    def _key(self, name: str) -> str:
        return f"{self._tag}:roll:{name}"

    # --- the accumulation ---------------------------------------------------------------------

    def add(self, rollup: Mapping[str, int], now: float) -> None:
        """Count a call's increments into the minute of ``now`` (the app's clock); no I/O."""
        minute = math.floor(now / MINUTE)
        with self._lock:
            if self._pid != process.pid():  # inherited across a fork: the parent's to write, not ours
                self._minutes, self._since, self._pid = {}, None, process.pid()
            bucket = self._minutes.get(minute)
            if bucket is None:
                if self._since is None:
                    self._since = time.monotonic()
                bucket = self._minutes[minute] = {}
            for name, amount in rollup.items():
                bucket[name] = bucket.get(name, 0) + amount

    def write(self, rollup: Mapping[str, int], now: float) -> None:
        """``MemoryRollups.write``'s step: here it is summed and lands with the next rollup write."""
        self.add(rollup, now)

    def due_in(self) -> float | None:
        """Seconds until the increments waiting are due (0 or less: now); None when none wait."""
        since = self._since
        if since is None:
            return None
        if len(self._minutes) > MAX_MINUTES:
            return 0.0
        return since + self.flush_interval - time.monotonic()

    def take(self, *, force: bool = False) -> tuple[Any, list[str], list[Any]] | None:
        """The increments waiting, as one script call (script, keys, args), if due or ``force``d; they
        are no longer held here once taken. None when nothing is to be sent."""
        if self._since is None:  # the request path's usual answer, without the lock
            return None
        if not force:
            due = self.due_in()
            if due is None or due > 0:
                return None
        with self._lock:
            minutes, self._minutes, self._since = self._minutes, {}, None
            if self._pid != process.pid():
                self._pid = process.pid()
                return None
        if not minutes:
            return None
        keys, args = self._arguments(minutes)
        return self._script, keys, args

    def pending(self) -> dict[int, dict[str, int]]:
        """A copy of what waits to be written, per minute bucket (what a test checks a write took)."""
        with self._lock:
            return {m: dict(fields) for m, fields in self._minutes.items()}

    def _arguments(self, minutes: Mapping[int, Mapping[str, int]]) -> tuple[list[str], list[Any]]:
        """KEYS: every minute hash, every hour hash, the total; ARGV as ``lua/rollup.lua`` reads it.

        Expiries stay relative: each bucket's hash is PEXPIREd by the retention from this write.
        """
        if len(minutes) == 1:  # the usual case: one minute, so one hour, and the total is the same sums
            [(minute, fields)] = minutes.items()
            groups: list[tuple[str, bool, Mapping[str, int]]] = [
                (f"m:{minute}", True, fields), (f"h:{minute // 60}", True, fields), ("total", False, fields)]
        else:
            hours: dict[int, dict[str, int]] = {}
            total: dict[str, int] = {}
            groups = []
            for minute, fields in sorted(minutes.items()):
                groups.append((f"m:{minute}", True, fields))
                _add(hours.setdefault(minute // 60, {}), fields)  # floor(now / HOUR) == floor(now / MINUTE) // 60
                _add(total, fields)
            groups += [(f"h:{hour}", True, fields) for hour, fields in sorted(hours.items())]
            groups.append(("total", False, total))
        keys: list[str] = []
        args: list[Any] = [int((self.retention + GRACE_S) * 1000)]
        for name, expires, fields in groups:
            keys.append(self._key(name))
            args += [1 if expires else 0, len(fields)]
            for f, amount in fields.items():
                args += [f, amount]
        return keys, args

    # --- reading --------------------------------------------------------------------------------

    def read(self, minutes: Sequence[int] = (), hours: Sequence[int] = (), *, totals: bool = False) -> Snapshot:
        """One pipelined round trip, whatever is asked for (after this process's settlements and rollups
        waiting to be written, so what it shows includes its own latest calls)."""
        self._store.flush()
        pipe = self._client.pipeline(transaction=False)
        for m in minutes:
            pipe.hgetall(self._key(f"m:{m}"))
        for h in hours:
            pipe.hgetall(self._key(f"h:{h}"))
        if totals:
            pipe.hgetall(self._key("total"))
        pipe.hgetall(self._key("alerts"))
        res = self._store._call(pipe.execute)
        snap = Snapshot()
        i = 0
        for m in minutes:
            if res[i]:
                snap.minutes[m] = _decode_hash(res[i])
            i += 1
        for h in hours:
            if res[i]:
                snap.hours[h] = _decode_hash(res[i])
            i += 1
        if totals:
            snap.totals = _decode_hash(res[i])
            i += 1
        snap.alerts = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                       for k, v in res[i].items()}
        return snap

    def transition(self, name: str, firing: bool, value: str) -> bool:
        args = [name, "1" if firing else "0", value, int((self.retention + GRACE_S) * 1000)]
        return bool(self._store._call(self._transition, keys=[self._key("alerts")], args=args))


# --- memory -----------------------------------------------------------------------------------------


class MemoryRollups:
    """The same layout in one process, under its own lock; old minutes are dropped as new ones start.

    Written at once: in-process and cheap, nothing to coalesce (``flush_interval`` is not used)."""

    def __init__(self) -> None:
        self.flush_interval = 0.0
        self._lock = threading.Lock()
        self.retention = 2 * DAY
        self._minutes: dict[int, Counter[str]] = {}
        self._hours: dict[int, Counter[str]] = {}
        self._totals: Counter[str] = Counter()
        self._pending: dict[str, int] = {}  # increments of the current minute not yet folded in
        self._pending_at: tuple[int, int] = (-1, -1)  # (minute, hour) of the pending increments
        self._alerts: dict[str, str] = {}

    def write(self, rollup: Mapping[str, int], now: float) -> None:
        """Adds to one pending dict; minute, hour and totals get it folded in when a reader looks or
        the minute or hour changes: one addition per field on the request path instead of three."""
        minute = math.floor(now / MINUTE)
        hour = math.floor(now / HOUR)
        with self._lock:
            if minute != self._pending_at[0] or hour != self._pending_at[1]:
                self._fold()
                self._pending_at = (minute, hour)
                if minute not in self._minutes:
                    self._evict(now)
            pending = self._pending
            for name, amount in rollup.items():
                pending[name] = pending.get(name, 0) + amount

    def _fold(self) -> None:
        if not self._pending:
            return
        minute, hour = self._pending_at
        bucket = self._minutes.setdefault(minute, Counter())
        hourly = self._hours.setdefault(hour, Counter())
        for name, amount in self._pending.items():
            bucket[name] += amount
            hourly[name] += amount
            self._totals[name] += amount
        self._pending = {}

    def _evict(self, now: float) -> None:
        oldest = now - self.retention - GRACE_S
        for m in [m for m in self._minutes if (m + 1) * MINUTE < oldest]:
            del self._minutes[m]
        for h in [h for h in self._hours if (h + 1) * HOUR < oldest]:
            del self._hours[h]

    def read(self, minutes: Sequence[int] = (), hours: Sequence[int] = (), *, totals: bool = False) -> Snapshot:
        with self._lock:
            self._fold()
            return Snapshot(minutes={m: dict(self._minutes[m]) for m in minutes if m in self._minutes},
                            hours={h: dict(self._hours[h]) for h in hours if h in self._hours},
                            totals=dict(self._totals) if totals else {}, alerts=dict(self._alerts))

    def transition(self, name: str, firing: bool, value: str) -> bool:
        with self._lock:
            if firing:
                if name in self._alerts:
                    return False
                self._alerts[name] = value
                return True
            return self._alerts.pop(name, None) is not None
