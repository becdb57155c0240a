"""Shared per-minute rollups of every Claude call: what alerts, metrics, the dashboard and ``status`` read.

Why rollups in the app's storage rather than per-process counters: on gunicorn each worker sees a
quarter of the traffic, and a second host none of it. Counting into the same store the budgets
live in (memory or Redis) gives every reader (any worker, any host, the CLI) the same numbers.

Layout. A call adds integer increments to *fields* named ``<metric>|<feature>|<model>`` (feature
``-`` outside an ``ai_feature``), so cardinality is features x models x a fixed set of metrics;
nothing per user. The same increments go to three places in one step:

- ``roll:m:<minute>``: a hash per UTC minute (``floor(now / 60)``), kept ``CLAUDE_ROLLUP_RETENTION``;
  alert windows and the dashboard's charts read these, so a window can be any whole number of
  seconds from 60 up;
- ``roll:h:<hour>``: the same per hour, for the cost spike's trailing 24 hours and the dashboard's
  day (25 reads instead of 1,440);
- ``roll:total``: lifetime totals that never expire, so Prometheus counters only ever go up.

Metrics: ``c`` calls, ``e:<error_type>`` calls that ended in ``claude_api_error``, ``f`` answered by
a fallback model, ``r`` retries, ``ti``/``to``/``tcr``/``tcw`` tokens (input, output, cache read,
cache creation), ``u`` cost in micro-dollars, ``l:<i>`` latency histogram counts over
``LATENCY_BUCKETS`` (``i == len`` is +Inf) and ``ls`` their sum in microseconds, ``hi:<i>``/``ho:<i>``
token histograms over ``TOKEN_BUCKETS`` (input counts cache tokens too, as OpenTelemetry's
``gen_ai.usage.input_tokens`` does for Anthropic), ``d:<reason>`` degraded responses (model ``-``).

Writing. In memory a call's increments are added at once. On Redis they are coalesced per worker:
summed per minute bucket and field in the process (``storage/rollups.py``), and written at most once
per ``CLAUDE_ROLLUP_FLUSH_INTERVAL`` (1 s) as one script that adds the sums to each minute's and
hour's hash and the total (an accumulation that spans a minute boundary writes both minutes). That
write rides on a round trip the worker makes anyway (the next request's, with the settlements
written behind), or the settlements' flusher thread sends it when no request comes: never an extra
round trip on the request path, and ~26 server-side commands a call no longer costs. Expiries are
relative (``PEXPIRE``), so neither the app's clock nor a test's fake clock can delete a bucket early.

Freshness, and what can be lost. A reader sees its own process's calls at once: every read (the
dashboard and its JSON, the Prometheus collector, the ops alerts, ``collect_status``) first flushes
what this process holds. Other workers' and hosts' calls (and so everything ``flask claude status``,
a process of its own, shows) appear within the flush interval (plus ``CLAUDE_SETTLE_DELAY``). A
clean exit (``store.flush()``, the ``atexit`` hook a gunicorn worker's graceful stop runs) writes
everything. A worker that dies hard (SIGKILL, OOM) or a write that fails (storage away) loses at
most one interval of that worker's monitoring counts (the log lines still have them); budgets are
unaffected: each call is settled on its own.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .storage import MICRO as MICRO  # re-exported: the units the readers of rollups use
from .storage import StorageUnavailable
from .storage.rollups import DAY as DAY
from .storage.rollups import GRACE_S, MemoryRollups, RedisRollups, Snapshot  # noqa: F401
from .storage.rollups import HOUR as HOUR
from .storage.rollups import MINUTE as MINUTE

# OpenTelemetry GenAI semantic conventions: gen_ai.client.operation.duration / gen_ai.client.token.usage.
LATENCY_BUCKETS: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                                      40.96, 81.92)
TOKEN_BUCKETS: tuple[int, ...] = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                                  16777216, 67108864)
NO_FEATURE = "-"


def _clean(value: str | None, default: str = NO_FEATURE) -> str:
    """Field parts must not contain the separator; error types and reasons are short enums."""
    return (value or default).replace("|", "/")[:80]


def field_name(metric: str, feature: str | None, model: str | None) -> str:
    return f"{metric}|{_clean(feature)}|{_clean(model)}"


def split_field(name: str) -> tuple[str, str, str]:
    metric, rest = name.split("|", 1)
    feature, model = rest.rsplit("|", 1)
    return metric, feature, model


def to_micro(usd: float) -> int:
    """A call's cost in whole micro-dollars, to the nearest: what the rollups and metrics count."""
    return round(usd * MICRO)


_SUFFIXES: dict[tuple[str | None, str | None], str] = {}


def _suffix(feature: str | None, model: str | None) -> str:
    """``|<feature>|<model>``, built once per pair: every call names eight to ten fields with it."""
    suffix = _SUFFIXES.get((feature, model))
    if suffix is None:
        if len(_SUFFIXES) >= 4096:
            _SUFFIXES.clear()
        suffix = _SUFFIXES[(feature, model)] = f"|{_clean(feature)}|{_clean(model)}"
    return suffix


def call_fields(*, feature: str | None, model: str | None, error_type: str | None, fallback: bool,
                retries: int, input_tokens: int, output_tokens: int, cache_read: int, cache_creation: int,
                cost_usd: float, latency_s: float | None) -> dict[str, int]:
    """The increments one call (a ``claude_api_call`` or ``claude_api_error`` line) adds (zeros left out).

    A batch result has no latency of its own (``None``): it is counted everywhere but the latency histogram.
    """
    sfx = _suffix(feature, model)
    fields: dict[str, int] = {"c" + sfx: 1}
    if error_type is not None:
        fields[f"e:{_clean(error_type, 'error')}{sfx}"] = 1
    if fallback:
        fields["f" + sfx] = 1
    for metric, amount in (("r", retries), ("ti", input_tokens), ("to", output_tokens), ("tcr", cache_read),
                           ("tcw", cache_creation), ("u", to_micro(cost_usd))):
        if amount:
            fields[metric + sfx] = amount
    if latency_s is not None:
        fields[f"l:{bisect.bisect_left(LATENCY_BUCKETS, latency_s)}{sfx}"] = 1
        latency_us = round(latency_s * MICRO)
        if latency_us:
            fields["ls" + sfx] = latency_us
    total_input = input_tokens + cache_read + cache_creation
    fields[f"hi:{bisect.bisect_left(TOKEN_BUCKETS, total_input)}{sfx}"] = 1
    fields[f"ho:{bisect.bisect_left(TOKEN_BUCKETS, output_tokens)}{sfx}"] = 1
    return fields


def degraded_fields(feature: str | None, reason: str) -> dict[str, int]:
    return {field_name(f"d:{_clean(reason, 'unknown')}", feature, None): 1}


# --- reading: windows, series, percentiles -----------------------------------------------------------


@dataclass
class Stats:
    """A window's numbers (fractional when the oldest bucket is only partly inside the window)."""

    calls: float = 0.0
    errors: float = 0.0
    fallbacks: float = 0.0
    retries: float = 0.0
    cost_micro: float = 0.0
    latency: list[float] = field(default_factory=lambda: [0.0] * (len(LATENCY_BUCKETS) + 1))
    errors_by_type: dict[str, float] = field(default_factory=dict)
    degraded: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)

    def add(self, fields: Mapping[str, int], weight: float = 1.0, feature: str | None = None) -> None:
        for name, amount in fields.items():
            metric, feat, _ = split_field(name)
            if feature is not None and feat != feature:
                continue
            value = amount * weight
            if metric == "c":
                self.calls += value
            elif metric.startswith("e:"):
                self.errors += value
                self.errors_by_type[metric[2:]] = self.errors_by_type.get(metric[2:], 0.0) + value
            elif metric == "f":
                self.fallbacks += value
            elif metric == "r":
                self.retries += value
            elif metric == "u":
                self.cost_micro += value
            elif metric.startswith("l:"):
                self.latency[int(metric[2:])] += value
            elif metric.startswith("d:"):
                self.degraded[metric[2:]] = self.degraded.get(metric[2:], 0.0) + value
            elif metric in ("ti", "to", "tcr", "tcw"):
                self.tokens[metric] = self.tokens.get(metric, 0.0) + value

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.calls if self.calls > 0 else None

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(q, self.latency)

    def as_dict(self) -> dict[str, Any]:
        return {"calls": round(self.calls, 3), "errors": round(self.errors, 3),
                "error_rate": None if self.error_rate is None else round(self.error_rate, 4),
                "fallbacks": round(self.fallbacks, 3), "retries": round(self.retries, 3),
                "cost_usd": round(self.cost_micro / MICRO, 6),
                "latency_p50_s": _r(self.quantile(0.5)), "latency_p95_s": _r(self.quantile(0.95)),
                "latency_p99_s": _r(self.quantile(0.99)),
                "errors_by_type": {k: round(v, 3) for k, v in sorted(self.errors_by_type.items())},
                "degraded": {k: round(v, 3) for k, v in sorted(self.degraded.items())}}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def histogram_quantile(q: float, counts: Sequence[float]) -> float | None:
    """Prometheus' estimate: linear inside the bucket holding the rank; +Inf answers the last bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0.0
    for i, count in enumerate(counts):
        if count <= 0:
            continue
        if cumulative + count >= rank:
            if i >= len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            lower = LATENCY_BUCKETS[i - 1] if i > 0 else 0.0
            upper = LATENCY_BUCKETS[i]
            return lower + (upper - lower) * max(0.0, rank - cumulative) / count
        cumulative += count
    return LATENCY_BUCKETS[-1]


def window_minutes(now: float, window_s: float) -> list[tuple[int, float]]:
    """The minute buckets of the window ``[now - window_s, now]`` and each one's weight.

    Buckets wholly inside count fully (the current, partial minute too: all of it is recent); the
    oldest counts by the share of it still inside, as a sliding-window counter does, so a window
    slides smoothly instead of dropping a whole minute at once.
    """
    return _window(now, window_s, MINUTE)


def window_hours(now: float, window_s: float) -> list[tuple[int, float]]:
    return _window(now, window_s, HOUR)


def _window(now: float, window_s: float, width: int) -> list[tuple[int, float]]:
    start = now - window_s
    first = math.floor(start / width)
    last = math.floor(now / width)
    out = []
    for b in range(first, last + 1):
        weight = 1.0 if b * width >= start else ((b + 1) * width - start) / width
        if weight > 0:
            out.append((b, weight))
    return out


def window_stats(snapshot: Snapshot, buckets: Iterable[tuple[int, float]], *, hourly: bool = False,
                 feature: str | None = None) -> Stats:
    stats = Stats()
    source = snapshot.hours if hourly else snapshot.minutes
    for b, weight in buckets:
        fields = source.get(b)
        if fields:
            stats.add(fields, weight, feature)
    return stats


def hourly_cost_micro(snapshot: Snapshot, buckets: Iterable[tuple[int, float]]) -> float:
    total = 0.0
    for h, weight in buckets:
        total += sum(v for k, v in snapshot.hours.get(h, {}).items() if k.startswith("u|")) * weight
    return total


# --- one app's view: what its calls write, what its readers ask ---------------------------------------


def _ignore(crossed: Any, failure: str | None) -> None:
    """A rollup has no alerts to raise, and a lost one is only numbers (the log line has them)."""


class AppRollups:
    """Builds a call's increments and writes those that have no settlement to ride on.

    A write never fails a request: on a storage outage the numbers are lost (the log line still
    has them), as the breaker's own records are.
    """

    def __init__(self, state: Any) -> None:
        self.state = state
        self.store = state.store
        self.store.rollups.retention = state.settings.rollup_retention
        self.store.rollups.flush_interval = state.settings.rollup_flush_interval

    @staticmethod
    def call_fields(call: Any, base: Mapping[str, Any], cost: Any, error: Any = None) -> dict[str, int]:
        latency_ms = base.get("latency_ms")
        return call_fields(feature=base.get("feature"), model=base.get("model"),
                           error_type=None if error is None else error.error_type,
                           fallback=base.get("fallback_from") is not None, retries=int(base.get("retries") or 0),
                           input_tokens=cost.input_tokens, output_tokens=cost.output_tokens,
                           cache_read=cost.cache_read_input_tokens, cache_creation=cost.cache_creation_input_tokens,
                           cost_usd=cost.usd, latency_s=(latency_ms or 0.0) / 1000)

    @staticmethod
    def failed_call_fields(call: Any, base: Mapping[str, Any], error_type: str) -> dict[str, int]:
        return call_fields(feature=base.get("feature"), model=base.get("model"), error_type=error_type,
                           fallback=base.get("fallback_from") is not None, retries=int(base.get("retries") or 0),
                           input_tokens=0, output_tokens=0, cache_read=0, cache_creation=0, cost_usd=0.0,
                           latency_s=(base.get("latency_ms") or 0.0) / 1000)

    def write(self, rollup: Mapping[str, int] | None, *, success: str | None = None) -> None:
        """A call with no reservation to settle: its rollup (summed with the others on Redis, so no
        step of its own), and a model's success on its breaker when there is one (written behind)."""
        if not rollup and success is None:
            return
        breaker = self.state.breaker.params if success is not None else None
        try:  # written behind, like a settlement: it rides on the next round trip
            self.store.settle_later((), (), (), self.state.clock.time(), _ignore, success=success, breaker=breaker,
                                    rollup=dict(rollup) if rollup else None)
        except StorageUnavailable:
            pass

    def degraded(self, feature: str | None, reason: str) -> None:
        """A degraded response: counted like a call's rollup (on Redis summed, so no write of its own)."""
        self.write(degraded_fields(feature, reason))

    def read(self, minutes: Sequence[int] = (), hours: Sequence[int] = (), *, totals: bool = False) -> Snapshot:
        """Raises ``storage.StorageUnavailable`` on an outage: readers decide what to show."""
        return self.store.rollups.read(minutes, hours, totals=totals)  # type: ignore[no-any-return]
