"""Operational alerts (error rate, p95 latency, cost spike), evaluated from the shared rollups.

Why on the request path and not in a thread: a background thread started before gunicorn forks
is lost in the workers, and one per worker would need its own lifecycle. Instead, a request that
finds this process's last evaluation older than ``CLAUDE_OPS_ALERTS["eval_interval"]`` seconds (5) reads
the window's buckets and the shared alert states in one round trip and decides. Every worker
reads the same rollups, so they agree on the condition; the episode's state is one field of a
shared hash, set with ``HSETNX`` and cleared with ``HDEL``, so exactly one worker announces
``firing`` and exactly one ``resolved``, as budget alerts are de-duplicated. An app that gets no
request evaluates nothing, which is also when nothing changes; a job can call ``evaluate()``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .rollups import DAY, MICRO, hourly_cost_micro, window_hours, window_minutes, window_stats
from .signals import ops_alert
from .storage import StorageUnavailable

if TYPE_CHECKING:
    from .extension import ClaudeState

ALERTS = ("error_rate", "latency_p95", "cost_spike")


# A firing alert resolves only once its value is back under this share of the threshold (or traffic
# falls under CLAUDE_OPS_ALERTS["min_calls"]). Why: each worker's rollups land up to a flush interval late, so
# a value near the threshold can dip under it and come back when another worker's counts arrive; an
# alert that resolved at the first dip would page again a second later.
RESOLVE_AT = 0.8


@dataclass(frozen=True)
class Check:
    alert: str
    firing: bool
    value: float | None
    threshold: float
    calls: float
    clear: bool = True  # far enough under the threshold (or too little traffic) to resolve if firing


class OpsAlerts:
    def __init__(self, state: ClaudeState) -> None:
        self.state = state
        self.settings = state.settings
        self._next = 0.0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        s = self.settings
        return s.alert_window is not None and any(
            (s.alert_error_rate is not None and s.alert_min_calls is not None,
             s.alert_latency_p95 is not None and s.alert_min_calls is not None,
             s.alert_cost_spike is not None and s.alert_cost_spike_min_usd is not None))

    def maybe_evaluate(self) -> None:
        """Called after every request of the app: evaluates at most every few seconds per process."""
        now = self.state.clock.monotonic()
        if now < self._next or not self.enabled or not self._lock.acquire(blocking=False):
            return
        try:
            self._next = now + self.settings.alert_eval_interval
            self.evaluate()
        except Exception as exc:  # monitoring must never fail the request it rides on
            self.state.events.emit("ops_alert_failed", {"error_type": type(exc).__name__}, level="ERROR")
        finally:
            self._lock.release()

    def checks(self, now: float | None = None) -> tuple[list[Check], dict[str, str]]:
        """Each enabled alert's condition now, and the shared episode states (field -> JSON)."""
        s = self.settings
        now = self.state.clock.time() if now is None else now
        window = s.alert_window
        if window is None:
            return [], {}
        minutes = window_minutes(now, window)
        spike_on = s.alert_cost_spike is not None and s.alert_cost_spike_min_usd is not None
        hours = window_hours(now, DAY) if spike_on else []
        try:
            snap = self.state.rollups.read([m for m, _ in minutes], [h for h, _ in hours])
        except StorageUnavailable:
            return [], {}
        stats = window_stats(snap, minutes)
        out: list[Check] = []
        enough = s.alert_min_calls is not None and stats.calls >= s.alert_min_calls
        if s.alert_error_rate is not None and s.alert_min_calls is not None:
            rate = stats.error_rate
            out.append(Check("error_rate", bool(enough and rate is not None and rate > s.alert_error_rate),
                             None if rate is None else round(rate, 4), s.alert_error_rate, stats.calls,
                             not enough or rate is None or rate <= RESOLVE_AT * s.alert_error_rate))
        if s.alert_latency_p95 is not None and s.alert_min_calls is not None:
            p95 = stats.quantile(0.95)
            out.append(Check("latency_p95", bool(enough and p95 is not None and p95 > s.alert_latency_p95),
                             None if p95 is None else round(p95, 4), s.alert_latency_p95, stats.calls,
                             not enough or p95 is None or p95 <= RESOLVE_AT * s.alert_latency_p95))
        if spike_on:
            assert s.alert_cost_spike is not None and s.alert_cost_spike_min_usd is not None
            spend = stats.cost_micro / MICRO
            average = hourly_cost_micro(snap, hours) / MICRO / (DAY / window)
            threshold = max(s.alert_cost_spike * average, s.alert_cost_spike_min_usd)
            out.append(Check("cost_spike", spend > threshold and spend > 0, round(spend, 6), round(threshold, 6),
                             stats.calls, spend <= RESOLVE_AT * threshold))
        return out, snap.alerts

    def evaluate(self, now: float | None = None) -> list[dict[str, Any]]:
        """Announce every alert whose episode starts or ends now; returns the events sent."""
        checks, states = self.checks(now)
        sent: list[dict[str, Any]] = []
        for check in checks:
            name = f"{check.alert}|"
            active = name in states
            if check.firing == active or (active and not check.clear):
                continue
            value = json.dumps({"value": check.value, "threshold": check.threshold})
            try:
                won = self.state.rollups.store.rollups.transition(name, check.firing, value)
            except StorageUnavailable:
                return sent
            if won:
                sent.append(self._announce(check))
        return sent

    def page(self, alert: str, value: float | None) -> dict[str, Any]:
        """An event that is its own episode (``storage_data_lost``): announced as firing, once, by the
        worker that noticed it first (the store decides which); nothing resolves it but an operator."""
        return self._announce(Check(alert=alert, firing=True, value=value, threshold=0.0, calls=0.0))

    def _announce(self, check: Check) -> dict[str, Any]:
        fields: dict[str, Any] = {"alert": check.alert, "state": "firing" if check.firing else "resolved",
                                  "value": check.value, "threshold": check.threshold,
                                  "window_s": self.settings.alert_window, "feature": None,
                                  "calls": round(check.calls, 3)}
        state = self.state
        state.events.emit("ops_alert", fields, level="ERROR" if check.firing else "INFO")
        ops_alert.send(state.app, **fields)
        hook = self.settings.alert_hook
        if hook is not None:
            try:
                hook(fields)
            except Exception as exc:  # an alert hook failing must not fail the request it rides on
                state.events.emit("alert_hook_failed", {"error_type": type(exc).__name__}, level="ERROR")
        return fields

