"""What one process settled on each budget this period: put back after the app's data is lost.

Why in the process: after a ``FLUSHALL``, a restart without persistence or a failover to an empty
replica, Redis no longer knows the day's spend, and no key in Redis can say it. Every worker knows
its own share, so the workers together restore the period (``RedisStore._recover``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .records import Line

MAX_LEDGER = 10_000  # budget keys whose settled spend this period a process remembers for a restore


@dataclass(slots=True)
class Spent:
    """What this process settled on one budget this period: put back if the data is lost."""

    line: Line
    thresholds: Sequence[float]
    amount: int = 0


@dataclass
class Ledger:
    entries: dict[str, Spent] = field(default_factory=dict)
    untracked: int = 0  # settlements on budgets past MAX_LEDGER (per-user ones only)

    def add(self, lines: Sequence[Line], thresholds: Sequence[float], now: float) -> None:
        for line in lines:
            if line.expires_at <= now:
                continue
            entry = self.entries.get(line.key)
            if entry is None or entry.line.expires_at != line.expires_at:
                if len(self.entries) >= MAX_LEDGER:
                    self.entries = {k: e for k, e in self.entries.items() if e.line.expires_at > now}
                app_wide = line.key.startswith(("usd:global:", "usd:feature:"))
                if len(self.entries) >= MAX_LEDGER and not app_wide:
                    self.untracked += 1
                    continue
                entry = self.entries[line.key] = Spent(line, thresholds)
            entry.amount += line.amount

    def live(self, now: float) -> list[Spent]:
        return [e for e in self.entries.values() if e.line.expires_at > now and e.amount > 0]
