"""A breaker for the shared storage itself: while Redis is down, stop asking it.

Without it every guarded request waits one socket timeout per storage step (admission, breaker
read, settlement) while Redis hangs, so a stopped Redis turns 200 requests/s into 10, even with
``CLAUDE_STORAGE_FAILURE="open"``. A step fails here only after the store retried a closed
connection once on a fresh one (``redis.py``), so a Redis restart or a killed connection is not an
outage. After a failure the guard answers ``StorageUnavailable`` at once while one probe at a time
(in a background thread, so no request waits for it) asks storage on the path requests take: the
first probe comes within ``FIRST_PROBE_S``, later ones back off to ``retry_interval``, jittered, so
a Redis that is back in a moment is used again in a moment. One ``storage_unavailable`` event marks
an episode's start and one ``storage_recovered`` its end, instead of a line per request.

What the app spent while storage was away is not lost: settlements are not skipped here but handed
to the store, which keeps them and sends them with the first round trip that works (the probe's, or
a request's); each is applied at most once.
A call's monitoring rollups are still summed in the worker meanwhile (bounded by minute buckets,
``rollups.py``) and ride on the first round trip that works; a rollup write that fails is dropped,
not retried (a retry could count twice what a hung Redis still applies).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..clock import Clock
from .records import Begin, BreakerParams, Crossed, Line, Outcome, SettleDone, StorageUnavailable, Store

Notify = Callable[[str, dict[str, Any]], None]

FIRST_PROBE_S = 0.05  # the first probe after a failure; each later one waits twice as long, up to the interval


class OutageGuard:
    """A ``Store`` that fails fast while the store it wraps is known to be down."""

    def __init__(self, inner: Store, *, clock: Clock, retry_interval: float, notify: Notify | None = None,
                 policy: str = "open") -> None:
        self.inner = inner
        self._clock = clock
        self._interval = retry_interval
        self._notify = notify
        self._policy = policy
        self._lock = threading.Lock()
        self._down_since: float | None = None  # monotonic time of the episode's first failure
        self._retry_at = 0.0
        self._probing_since: float | None = None
        self._skipped = 0
        self._failures = 0  # probes that failed this episode: the next waits longer

    @property
    def healthy(self) -> bool:
        return self._down_since is None

    # --- the breaker --------------------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._down_since is not None:
            self._skip()
        try:
            return fn(*args, **kwargs)
        except StorageUnavailable as exc:
            self._failed(str(exc))
            raise

    def _skip(self) -> None:
        """Storage is down: answer at once, and start a probe in the background when one is due."""
        now = self._clock.monotonic()
        start_probe = False
        with self._lock:
            if self._down_since is None:
                return
            self._skipped += 1
            # a probe thread lost to a fork (or hung past every timeout) must not block the next one
            stale = self._probing_since is not None and now - self._probing_since > 4 * self._interval + 5
            if now >= self._retry_at and (self._probing_since is None or stale):
                self._probing_since = now
                start_probe = True
        if start_probe:
            threading.Thread(target=self._probe, name="flask-claude-storage-probe", daemon=True).start()
        raise StorageUnavailable("storage is down (skipped until it answers again)")

    def _probe(self) -> None:
        try:
            ping = getattr(self.inner, "ping", None)
            if ping is not None:
                ping()
        except StorageUnavailable:
            with self._lock:
                self._probing_since = None
                self._failures += 1
                self._retry_at = self._clock.monotonic() + self._jittered()
            return
        with self._lock:
            down_since, skipped = self._down_since, self._skipped
            self._down_since, self._probing_since, self._skipped, self._failures = None, None, 0, 0
        if down_since is not None and self._notify is not None:
            self._notify("storage_recovered", {"down_s": round(self._clock.monotonic() - down_since, 3),
                                               "skipped_steps": skipped})

    def _failed(self, error: str) -> None:
        now = self._clock.monotonic()
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = now
            self._retry_at = now + self._jittered()
        if first and self._notify is not None:
            self._notify("storage_unavailable", {"error_type": error, "policy": self._policy,
                                                 "retry_in_s": round(self._retry_at - now, 3)})

    def _jittered(self) -> float:
        """Soon after a failure (a restart is back in a moment), then backing off to the interval;
        jittered, so workers that lost Redis together do not all probe it at the same instant."""
        wait = min(self._interval, FIRST_PROBE_S * 2.0 ** self._failures)
        return wait * (0.5 + random.random())

    # --- the Store protocol, each step through the breaker -------------------------------------

    def begin(self, step: Begin, now: float) -> Outcome:
        return self._call(self.inner.begin, step, now)  # type: ignore[no-any-return]

    def settle(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
               success: str | None = None, breaker: BreakerParams | None = None,
               rollup: dict[str, int] | None = None, seen_closed: bool = False) -> list[Crossed]:
        return self._call(self.inner.settle, lines, rids, thresholds, now,  # type: ignore[no-any-return]
                          success=success, breaker=breaker, rollup=rollup, seen_closed=seen_closed)

    def settle_later(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
                     done: SettleDone, success: str | None = None, breaker: BreakerParams | None = None,
                     rollup: dict[str, int] | None = None, seen_closed: bool = False) -> None:
        """Never skipped: the store keeps a settlement until a round trip works (a call was paid for)."""
        self.inner.settle_later(lines, rids, thresholds, now, done, success=success, breaker=breaker,
                                rollup=rollup, seen_closed=seen_closed)

    @property
    def rollups(self) -> Any:
        return _GuardedRollups(self, self.inner.rollups)

    def flush(self) -> None:
        if self._down_since is None:
            self.inner.flush()

    def usage(self, keys: Sequence[str], now: float) -> list[tuple[int, int]]:
        return self._call(self.inner.usage, keys, now)  # type: ignore[no-any-return]

    def put_record(self, key: str, value: str, ttl: float) -> None:
        self._call(self.inner.put_record, key, value, ttl)

    def get_record(self, key: str) -> str | None:
        return self._call(self.inner.get_record, key)  # type: ignore[no-any-return]

    def breaker_allow(self, key: str, now: float, cooldown: float) -> bool:
        return self._call(self.inner.breaker_allow, key, now, cooldown)  # type: ignore[no-any-return]

    def breaker_record(self, key: str, ok: bool, now: float, params: BreakerParams) -> bool:
        return self._call(self.inner.breaker_record, key, ok, now, params)  # type: ignore[no-any-return]

    def breaker_state(self, key: str, now: float) -> str:
        return self._call(self.inner.breaker_state, key, now)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        # Backend-specific extras (the Redis client for ``flask claude status``) pass through.
        return getattr(self.inner, name)


class _GuardedRollups:
    """The wrapped store's rollups, read and written through the same breaker: an alert evaluation
    or a dashboard read during an outage answers at once instead of waiting a socket timeout."""

    def __init__(self, guard: OutageGuard, inner: Any) -> None:
        self._guard = guard
        self._inner = inner

    def read(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard._call(self._inner.read, *args, **kwargs)

    def transition(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard._call(self._inner.transition, *args, **kwargs)

    def write(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard._call(self._inner.write, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)  # add, due_in, take, pending (no I/O), retention

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._inner, name, value)  # retention, flush_interval: set once at start
