"""Calendar periods for budgets: a day starts at midnight in ``CLAUDE_BUDGET_TIMEZONE``, not 24 h after
the first call; shorter periods are aligned to the clock."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from limits import RateLimitItem


def period_bounds(granularity: str, multiples: int, now: float, tz: ZoneInfo) -> tuple[str, float]:
    """The calendar period containing ``now``: an id for keys and the moment it ends."""
    local = datetime.fromtimestamp(now, tz)
    if granularity in ("day", "month", "year") and multiples == 1:
        if granularity == "day":
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
            end = start + timedelta(days=1)
            return start.strftime("%Y-%m-%d"), end.timestamp()
        if granularity == "month":
            start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            end = (start + timedelta(days=32)).replace(day=1)
            return start.strftime("%Y-%m"), end.timestamp()
        start = local.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y"), start.replace(year=start.year + 1).timestamp()
    # Sub-day periods (and "2 days") are aligned to the clock in the configured zone.
    seconds = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": 86400 * 31,
               "year": 86400 * 366}[granularity] * multiples
    utc_offset = local.utcoffset()
    offset = utc_offset.total_seconds() if utc_offset is not None else 0.0
    index = math.floor((now + offset) / seconds)
    return f"{granularity[0]}{multiples}:{index}", (index + 1) * seconds - offset


def granularity(item: RateLimitItem) -> str:
    return str(item.GRANULARITY.name)


class PeriodCache:
    """``period_bounds``, computed once per period: it sits on every call's path."""

    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz
        self._periods: dict[tuple[str, int], tuple[str, float, float]] = {}

    def bounds(self, granularity: str, multiples: int, now: float) -> tuple[str, float]:
        cached = self._periods.get((granularity, multiples))
        if cached is not None and cached[2] <= now < cached[1]:
            return cached[0], cached[1]
        pid, end = period_bounds(granularity, multiples, now, self.tz)
        self._periods[(granularity, multiples)] = (pid, end, now)
        return pid, end
