"""Time as a dependency, so tests move it instead of waiting for it."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def time(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock; the only one production uses.

    ``monotonic`` and ``time`` are the ``time`` module's own functions, not methods wrapping them:
    a request reads the clock a dozen times, and each wrapper is a Python frame more.
    """

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        """The async client's wait: yields the event loop instead of blocking it."""
        if seconds > 0:
            await asyncio.sleep(seconds)


async def asleep(clock: Clock, seconds: float) -> None:
    """Wait on ``clock`` from async code: a clock without ``asleep`` (a test's fake) moves at once."""
    native = getattr(clock, "asleep", None)
    if native is not None:
        await native(seconds)
    else:
        clock.sleep(seconds)
        await asyncio.sleep(0)  # still let the loop's other tasks run, as a real wait would


def utc_now(clock: Clock) -> datetime:
    return datetime.fromtimestamp(clock.time(), tz=UTC)
