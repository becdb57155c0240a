"""What operators read from the shared rollups: the alert window, the last hour by minute, the day by hour.

One function feeds ``flask claude status``, the dashboard and its JSON, so the three can never
disagree, and every worker and host (all reading the same storage) shows the same numbers.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .rollups import DAY, HOUR, MICRO, MINUTE, Stats, split_field, window_hours, window_minutes, window_stats

if TYPE_CHECKING:
    from .extension import ClaudeState


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="minutes")


def ops_summary(state: ClaudeState, now: float | None = None, *, series: bool = True) -> dict[str, Any]:
    """Raises ``storage.StorageUnavailable`` when the rollups cannot be read."""
    settings = state.settings
    now = state.clock.time() if now is None else now
    window_s = settings.alert_window or 300.0
    window = window_minutes(now, window_s)
    current = math.floor(now / MINUTE)
    hour_minutes = list(range(current - 59, current + 1)) if series else []
    day = window_hours(now, DAY)
    minutes = sorted({m for m, _ in window} | set(hour_minutes))
    snap = state.rollups.read(minutes, [h for h, _ in day])

    day_stats = window_stats(snap, day, hourly=True)
    features = sorted({split_field(name)[1] for fields in snap.hours.values() for name in fields})
    by_feature = {}
    for feature in features:
        s = window_stats(snap, day, hourly=True, feature=feature)
        by_feature[feature] = {"calls": round(s.calls, 3), "errors": round(s.errors, 3),
                               "cost_usd": round(s.cost_micro / MICRO, 6), "fallbacks": round(s.fallbacks, 3),
                               "degraded": {k: round(v, 3) for k, v in sorted(s.degraded.items())}}
    out: dict[str, Any] = {
        "window": {"seconds": window_s, **window_stats(snap, window).as_dict()},
        "last_24h": {**day_stats.as_dict(), "by_feature": by_feature},
        "alerts": {"firing": _firing(snap.alerts), "thresholds": {
            "error_rate": settings.alert_error_rate, "latency_p95_s": settings.alert_latency_p95,
            "cost_spike": settings.alert_cost_spike, "cost_spike_min_usd": settings.alert_cost_spike_min_usd,
            "min_calls": settings.alert_min_calls, "window_s": settings.alert_window}},
    }
    if series:
        out["last_hour"] = [_point(m * MINUTE, window_stats(snap, [(m, 1.0)])) for m in hour_minutes]
        first_hour = math.floor((now - DAY) / HOUR) + 1
        out["spend_by_hour"] = [
            {"t": _iso(h * HOUR), "usd": {f: round(window_stats(snap, [(h, 1.0)], hourly=True, feature=f).cost_micro
                                                   / MICRO, 6) for f in features}}
            for h in range(first_hour, math.floor(now / HOUR) + 1)]
    return out


def _point(start: float, stats: Stats) -> dict[str, Any]:
    d = stats.as_dict()
    return {"t": _iso(start), **{k: d[k] for k in ("calls", "errors", "error_rate", "cost_usd", "fallbacks",
                                                   "latency_p50_s", "latency_p95_s", "latency_p99_s")}}


def _firing(states: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for name, raw in sorted(states.items()):
        alert, _, feature = name.partition("|")
        try:
            detail = json.loads(raw)
        except ValueError:
            detail = {}
        out.append({"alert": alert, "feature": feature or None, **detail})
    return out
