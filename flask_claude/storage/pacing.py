"""Where pacing lives: per model, token buckets fed by the upstream's headers, concurrency leases and
their queue; on Redis (``lua/pace.lua``, ``lua/pace_observe.lua``) or in memory.

What the numbers mean is ``flask_claude/pacing.py``. Admission is one synchronous step (it must be
fresh); what a response reports, a lease given back and a waiter leaving are written behind: they
ride in the same round trip as the settlements waiting in this process (``RedisStore.later``), which
every admission sends first, so a worker's next admission always sees its own latest records.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from .scripts import lua

DEFAULT_WINDOW = 60.0  # the API's limits are per minute: the refill rate when headers cannot tell it
QUEUE_HEARTBEAT = 2.0  # a queued waiter that stops asking for this long leaves the queue


@dataclass(frozen=True)
class Quota:
    """One dimension as the upstream last reported it."""

    limit: int
    remaining: int
    reset_in: float  # seconds until the bucket is full again, on our clock

    def rate(self, previous: float | None, weight: float) -> tuple[float, float]:
        """Refill per second and the estimate's weight: what is missing over the time to full.

        The most precise estimate is the one with most missing (``remaining`` is floored and
        ``reset`` may be rounded), so a new one replaces the last only when it is at least as deep.
        Before any, the API's per-minute window.
        """
        missing = self.limit - self.remaining - 1  # ``remaining`` is floored: up to 1 more is missing
        if self.reset_in > 0.05 and missing >= 1 and missing >= weight:
            return missing / self.reset_in, float(missing)
        if previous:
            return previous, weight
        return self.limit / DEFAULT_WINDOW, 0.0


@dataclass(frozen=True)
class Ask:
    """One admission question to the store: may ``waiter`` call ``model`` now, with this need?"""

    model: str
    waiter: str
    need: dict[str, int]
    max_wait: float  # a turn further away than this is not taken
    cap: int | None  # concurrency cap, None: no lease
    lease_ttl: float
    pace: bool  # False: only the concurrency cap applies (CLAUDE_PACING="off")


@dataclass(frozen=True)
class Answer:
    granted: bool
    wait: float = 0.0  # granted: wait this long, then send; refused: how long until it would fit
    position: int = 0  # > 0: queued for a lease, this many ahead of the free ones (ask again)
    known: bool = True  # False: let through before any report (its own report settles the doubt)

STATE_TTL_MS = 600_000  # a model not called for ten minutes forgets what it was told


def _need_items(ask: Ask) -> list[tuple[str, int]]:
    return [(d, n) for d, n in ask.need.items() if n > 0]


# --- memory ------------------------------------------------------------------------------------


@dataclass
class _Dim:
    limit: int
    level: float
    at: float
    rate: float
    weight: float = 0.0  # how much was missing when the rate was estimated (Quota.rate)

    def now(self, now: float) -> float:
        return min(float(self.limit), self.level + self.rate * max(0.0, now - self.at))


@dataclass
class _Model:
    dims: dict[str, _Dim] = field(default_factory=dict)
    leases: dict[str, float] = field(default_factory=dict)  # waiter -> lapses at
    queue: dict[str, tuple[int, float]] = field(default_factory=dict)  # waiter -> (ticket, heartbeat until)
    ticket: int = 0
    unknown: dict[str, float] = field(default_factory=dict)  # let through before any report, per dimension


class MemoryPacing:
    """The same steps as the scripts, in one process under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, _Model] = {}

    def admit(self, ask: Ask, now: float) -> Answer:
        with self._lock:
            m = self._models.setdefault(ask.model, _Model())
            cap = ask.cap or 0
            if cap > 0:
                m.leases = {w: t for w, t in m.leases.items() if t > now}
                m.queue = {w: q for w, q in m.queue.items() if q[1] > now}
                if ask.waiter not in m.leases:
                    free = cap - len(m.leases)
                    order = sorted(m.queue, key=lambda w: m.queue[w][0])
                    ahead = order.index(ask.waiter) if ask.waiter in m.queue else len(order)
                    if ahead >= free:
                        if ask.waiter not in m.queue:
                            m.ticket += 1
                            m.queue[ask.waiter] = (m.ticket, now + QUEUE_HEARTBEAT)
                        else:
                            m.queue[ask.waiter] = (m.queue[ask.waiter][0], now + QUEUE_HEARTBEAT)
                        return Answer(False, 0.0, max(1, ahead - max(free, 0) + 1))
            wait = 0.0
            levels: dict[str, float] = {}
            if ask.pace:
                for d, need in _need_items(ask):
                    dim = m.dims.get(d)
                    if dim is None:
                        continue
                    level = dim.now(now)
                    if need > level:
                        wait = max(wait, (need - level) / dim.rate)
                    levels[d] = level - need
                if not levels:  # nothing known yet: the call goes, counted for the first report
                    for d, need in _need_items(ask):
                        m.unknown[d] = m.unknown.get(d, 0.0) + need
                if wait > ask.max_wait:
                    m.queue.pop(ask.waiter, None)
                    return Answer(False, wait)
                for d, level in levels.items():
                    m.dims[d].level, m.dims[d].at = level, now
            if cap > 0:
                m.queue.pop(ask.waiter, None)
                m.leases[ask.waiter] = now + ask.lease_ttl
            return Answer(True, wait, known=bool(levels) or not ask.pace)

    def observe(self, model: str, quotas: dict[str, Quota], now: float, counted: dict[str, int] | None = None) -> None:
        with self._lock:
            m = self._models.setdefault(model, _Model())
            for d, quota in quotas.items():
                if counted and counted.get(d):
                    m.unknown[d] = m.unknown.get(d, 0.0) - counted[d]
                dim = m.dims.get(d)
                if dim is not None and dim.limit != quota.limit:
                    dim = None  # a new limit: what was learnt of the old one no longer holds
                rate, weight = quota.rate(dim.rate if dim else None, dim.weight if dim else -1.0)
                if dim is None:  # the first report: calls let through before it may not be counted in it
                    level = float(quota.remaining) - max(0.0, m.unknown.get(d, 0.0))
                else:
                    level = min(dim.now(now), float(quota.remaining))
                m.dims[d] = _Dim(quota.limit, level, now, rate, weight)

    def credit(self, model: str, amounts: dict[str, int]) -> None:
        with self._lock:
            m = self._models.get(model)
            if m is None:
                return
            for d, amount in amounts.items():
                dim = m.dims.get(d)
                if dim is not None:
                    dim.level = min(float(dim.limit), dim.level + amount)
    def release(self, model: str, waiter: str) -> None:
        with self._lock:
            m = self._models.get(model)
            if m is not None:
                m.leases.pop(waiter, None)

    def leave(self, model: str, waiter: str) -> None:
        with self._lock:
            m = self._models.get(model)
            if m is not None:
                m.queue.pop(waiter, None)

    def snapshot(self, models: list[str], now: float) -> dict[str, dict[str, Any]]:
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for model in models:
                m = self._models.get(model)
                if m is None:
                    continue
                out[model] = {
                    "limits": {d: {"limit": dim.limit, "remaining": round(dim.now(now), 1),
                                   "rate_per_s": round(dim.rate, 4)} for d, dim in m.dims.items()},
                    "leases": sum(1 for t in m.leases.values() if t > now),
                    "queued": sum(1 for q in m.queue.values() if q[1] > now),
                }
            return out


# --- Redis -------------------------------------------------------------------------------------


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisPacing:
    """The pacing half of ``RedisStore``: key names, the scripts' arguments, the readers."""

    def __init__(self, store: Any) -> None:
        self._store = store
        client = store.client
        self._admit = client.register_script(lua("pace"))
        self._observe = client.register_script(lua("pace_observe"))
        self._credit = client.register_script(lua("pace_credit"))
        self._release = client.register_script(
            "redis.call('ZREM', KEYS[1], ARGV[1]) redis.call('ZREM', KEYS[2], ARGV[1]) return 0")

    def _keys(self, model: str) -> list[str]:
        tag = self._store.tag
        return [f"{tag}:pace:{model}", f"{tag}:lease:{model}", f"{tag}:paceq:{model}", f"{tag}:paceqs:{model}",
                f"{tag}:paceqt:{model}"]

    def admit(self, ask: Ask, now: float) -> Answer:
        items = _need_items(ask)
        args: list[Any] = [repr(now), ask.waiter, repr(ask.max_wait), ask.cap or 0, repr(ask.lease_ttl),
                           repr(QUEUE_HEARTBEAT), "1" if ask.pace else "0", len(items)]
        for d, need in items:
            args += [d, need]
        res = self._store._admit_now((self._admit, self._keys(ask.model), args))
        return Answer(bool(int(res[0])), float(_decode(res[1])), int(res[2]), bool(int(res[3])))

    def observe(self, model: str, quotas: dict[str, Quota], now: float, counted: dict[str, int] | None = None) -> None:
        args: list[Any] = [repr(now), STATE_TTL_MS, repr(DEFAULT_WINDOW), len(quotas)]
        for d, q in quotas.items():
            args += [d, q.limit, q.remaining, repr(q.reset_in), (counted or {}).get(d, 0)]
        self._store.later(self._observe, self._keys(model)[:1], args)

    def credit(self, model: str, amounts: dict[str, int]) -> None:
        args: list[Any] = [len(amounts)]
        for d, amount in amounts.items():
            args += [d, amount]
        self._store.later(self._credit, self._keys(model)[:1], args)

    def release(self, model: str, waiter: str) -> None:
        keys = self._keys(model)
        self._store.later(self._release, [keys[1], keys[3]], [waiter])

    def leave(self, model: str, waiter: str) -> None:
        keys = self._keys(model)
        self._store.later(self._release, [keys[2], keys[3]], [waiter])

    def snapshot(self, models: list[str], now: float) -> dict[str, dict[str, Any]]:
        self._store.flush()
        client = self._store.client
        pipe = client.pipeline(transaction=False)
        for model in models:
            keys = self._keys(model)
            pipe.hgetall(keys[0])
            pipe.zcount(keys[1], f"({now!r}", "+inf")
            pipe.zcount(keys[3], f"({now!r}", "+inf")
        res = self._store._call(pipe.execute)
        out: dict[str, dict[str, Any]] = {}
        for i, model in enumerate(models):
            raw = {_decode(k): _decode(v) for k, v in res[3 * i].items()}
            limits: dict[str, dict[str, Any]] = {}
            for name in raw:
                if name.startswith("L:"):
                    d = name[2:]
                    limit, rate = int(raw[name]), float(raw[f"q:{d}"])
                    level = min(limit, float(raw[f"v:{d}"]) + rate * max(0.0, now - float(raw[f"t:{d}"])))
                    limits[d] = {"limit": limit, "remaining": round(level, 1), "rate_per_s": round(rate, 4)}
            if limits or res[3 * i + 1] or res[3 * i + 2]:
                out[model] = {"limits": limits, "leases": int(res[3 * i + 1]), "queued": int(res[3 * i + 2])}
        return out
