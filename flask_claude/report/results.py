"""What a report found: the numbers of a window, of each group, and of the events around the calls."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Latency:
    """Exact percentiles (linear interpolation between closest ranks) of ``latency_ms``."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None


@dataclass(frozen=True)
class Stats:
    """One group's (or the whole window's) numbers; ``calls`` counts successes and errors.

    By model, a call that fell back counts for every model it tried: the model that answered (or
    failed last) has its line, and each model before it one failed call (``failed_over``, from its
    ``model_fallback`` event), so an Opus-only outage shows on Opus and not as Sonnet's. The totals
    count each call once, so by model the groups' ``calls`` add up to more than the total.
    """

    calls: int
    errors: int
    spend_usd: float
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int
    latency: Latency
    fallback_calls: int  # calls answered by a model other than the first of the chain (answered only)
    degraded: int  # feature_degraded + limit_exceeded events attributed to this group
    failed_over: int = 0  # by model: calls that failed on this model and went on to the next one

    @property
    def ok(self) -> int:
        return self.calls - self.errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    @property
    def total_input_tokens(self) -> int:
        return self.input_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens

    @property
    def tokens(self) -> int:
        return self.total_input_tokens + self.output_tokens

    @property
    def cache_hit_ratio(self) -> float:
        """Share of input tokens read from the prompt cache (billed at a tenth of the price)."""
        total = self.total_input_tokens
        return self.cache_read_input_tokens / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(ok=self.ok, error_rate=self.error_rate, tokens=self.tokens,
                   cache_hit_ratio=self.cache_hit_ratio)
        return out


@dataclass(frozen=True)
class Spender:
    user: str
    spend_usd: float
    calls: int


@dataclass
class Report:
    """Everything ``flask claude report`` prints; ``to_json`` is the machine-readable form."""

    by: str
    since: datetime | None
    first_ts: datetime | None
    last_ts: datetime | None
    lines_read: int
    malformed: int  # not JSON, not an object, or no "event"
    outside_window: int  # dated before ``since``
    undated: int  # no parseable "ts" (kept without --since, dropped with it)
    total: Stats
    groups: dict[str, Stats]  # by spend, highest first
    top_users: list[Spender]
    fallback_events: int
    fallback_pairs: dict[str, int]  # "from -> to": model_fallback events
    degraded_by_reason: dict[str, int]
    feature_degraded: int
    limit_exceeded: int
    circuits_opened: dict[str, int]
    budget_alerts: dict[str, int]  # "budget @ threshold" -> times, by budget, thresholds ascending
    storage_unavailable: int
    events: dict[str, int]
    tokens_by_route: dict[str, int]  # all tokens (in, cache, out), highest first
    source: str | None = None
    malformed_examples: list[int] = field(default_factory=list)  # 1-based line numbers of the first ten

    @property
    def degraded(self) -> int:
        return self.feature_degraded + self.limit_exceeded

    def to_dict(self) -> dict[str, Any]:
        def iso(moment: Any) -> str | None:
            return moment.isoformat() if moment is not None else None

        return {
            "source": self.source,
            "by": self.by,
            "since": iso(self.since),
            "time_range": {"first": iso(self.first_ts), "last": iso(self.last_ts)},
            "lines": {"read": self.lines_read, "malformed": self.malformed,
                      "malformed_line_numbers": self.malformed_examples,
                      "outside_window": self.outside_window, "undated": self.undated},
            "totals": self.total.to_dict(),
            "groups": {name: stats.to_dict() for name, stats in self.groups.items()},
            "top_users": [asdict(s) for s in self.top_users],
            "fallbacks": {"events": self.fallback_events, "calls_served_by_fallback": self.total.fallback_calls,
                          "by_pair": self.fallback_pairs},
            "degraded": {"total": self.degraded, "feature_degraded": self.feature_degraded,
                         "limit_exceeded": self.limit_exceeded, "by_reason": self.degraded_by_reason},
            "circuits_opened": self.circuits_opened,
            "budget_alerts": self.budget_alerts,
            "storage_unavailable": self.storage_unavailable,
            "tokens_by_route": self.tokens_by_route,
            "events": self.events,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


