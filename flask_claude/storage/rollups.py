"""The rollups' storage: per-minute and per-hour hashes and lifetime totals, on Redis or in memory.

What the fields mean and who reads them: flask_claude/rollups.py. Here only where they live; on
Redis the increments ride on the settlement script (``lua/rollup.lua`` is prepended to it).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .scripts import lua

MINUTE = 60
HOUR = 3600
DAY = 86400
GRACE_S = 3600  # a bucket outlives the retention by this much, so a reader at the edge still finds it


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


class RedisRollups:
    """The rollup half of ``RedisStore``: key names, the settle-script arguments, the readers."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._client = store.client
        self._tag = store.tag
        self.retention = 2 * DAY
        self._write = self._client.register_script(lua("rollup") + "\nreturn 0\n")
        self._transition = self._client.register_script(lua("rollup_transition"))

    def _key(self, name: str) -> str:
        return f"{self._tag}:roll:{name}"

    def extend(self, keys: list[str], args: list[Any], rollup: Mapping[str, int] | None, now: float) -> None:
        """Append a rollup to a script's KEYS/ARGV (always the trailing count, 0 for none)."""
        if not rollup:
            args.append(0)
            return
        keys += [self._key(f"m:{math.floor(now / MINUTE)}"), self._key(f"h:{math.floor(now / HOUR)}"),
                 self._key("total")]
        args.append(int((self.retention + GRACE_S) * 1000))
        for name, amount in rollup.items():
            args += [name, amount]
        args.append(len(rollup))

    def write(self, rollup: Mapping[str, int], now: float) -> None:
        keys: list[str] = []
        args: list[Any] = []
        self.extend(keys, args, rollup, now)
        self._store._call(self._write, keys=keys, args=args)

    def read(self, minutes: Sequence[int] = (), hours: Sequence[int] = (), *, totals: bool = False) -> Snapshot:
        """One pipelined round trip, whatever is asked for (after this process's settlements written
        behind, so what it shows includes its own latest calls)."""
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
    """The same layout in one process, under its own lock; old minutes are dropped as new ones start."""

    def __init__(self) -> None:
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
