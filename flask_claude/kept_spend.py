"""Spend settled while the shared storage was down, kept in the process until it answers again.

Without it a five-second Redis outage under ``CLAUDE_STORAGE_FAILURE="open"`` would silently allow a
budget's worth of extra spend for the rest of the period: the calls were paid for, but no budget
heard of them. Kept per budget key (so it stays as small as the budgets touched during the outage),
at most ``MAX_KEPT_BUDGETS`` keys; past that the rest is counted as lost and said so.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .storage import MICRO, Crossed, Line, StorageUnavailable, Store

MAX_KEPT_BUDGETS = 10_000  # budget keys whose outage-time spend a process keeps for later


@dataclass
class Kept:
    line: Line
    usd: bool
    app_wide: bool
    amount: int = 0


class KeptSpend:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[str, Kept] = {}
        self._lost = 0  # micro-dollars past MAX_KEPT_BUDGETS

    def __bool__(self) -> bool:
        return bool(self._kept)

    def keep(self, lines: list[Line], usd_lines: list[int], app_wide: list[int]) -> None:
        with self._lock:
            for i, line in enumerate(lines):
                kept = self._kept.get(line.key)
                if kept is None:
                    if len(self._kept) >= MAX_KEPT_BUDGETS:
                        self._lost += line.amount if i in usd_lines else 0
                        continue
                    self._kept[line.key] = kept = Kept(line, i in usd_lines, i in app_wide)
                kept.amount += line.amount

    def take(self) -> tuple[dict[str, Kept], int]:
        with self._lock:
            kept, self._kept = self._kept, {}
            lost, self._lost = self._lost, 0
        return kept, lost

    def replay(self, store: Store, thresholds: Sequence[float], now: float,
               ) -> tuple[dict[str, Any], list[Crossed], list[Line], list[int], list[int]] | None:
        """Add what was kept to the budgets (one storage step); None when storage failed again.

        Returns the ``spend_replayed`` fields, the thresholds crossed, and the lines replayed with
        which are in USD and which app-wide, for the caller's alerts.
        """
        kept, lost = self.take()
        live = [k for k in kept.values() if k.line.expires_at > now]  # an ended period enforces nothing
        lines = [Line(k.line.key, k.line.limit, k.amount, k.line.expires_at, k.line.name) for k in live]
        try:
            crossed = store.settle(lines, (), thresholds, now) if lines else []
        except StorageUnavailable:
            self.put_back(kept, lost)
            return None
        # every call adds its cost to each of its USD budgets: the largest is the outage's spend
        # when an app-wide budget is set (all calls touch it)
        fields = {"budgets": len(lines), "usd": round(max([k.amount for k in live if k.usd], default=0) / MICRO, 6),
                  "lost_usd": round(lost / MICRO, 6)}
        return (fields, crossed, lines, [i for i, k in enumerate(live) if k.usd],
                [i for i, k in enumerate(live) if k.app_wide])

    def put_back(self, kept: dict[str, Kept], lost: int) -> None:
        """Storage failed again while replaying: keep it all for the next time."""
        with self._lock:
            for key, k in kept.items():
                self._kept.setdefault(key, Kept(k.line, k.usd, k.app_wide)).amount += k.amount
            self._lost += lost
