"""Prometheus metrics read from the shared rollups at scrape time (``pip install flask-claude[prometheus]``).

Why a collector over the rollups instead of prometheus-client's counters in each process: under
gunicorn every worker would count only its own calls, and scraping through the load balancer would
show whichever worker answered (multiprocess mode fixes that per host, with a directory of mmap
files, a ``child_exit`` hook and an environment variable set before import). The rollups already
hold every worker's and every host's calls in one place, so any worker answering ``/metrics``
reports the same totals: scrape one target per app (or all of them: they agree), never sum them.

Names follow the OpenTelemetry GenAI conventions where one exists (``gen_ai.client.token.usage``,
``gen_ai.client.operation.duration``, with their bucket boundaries), and ``flask_claude_*`` otherwise.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .alerts import ALERTS
from .errors import ConfigError
from .rollups import LATENCY_BUCKETS, MICRO, TOKEN_BUCKETS, split_field
from .state import state_for
from .storage import StorageUnavailable

if TYPE_CHECKING:
    from flask import Response

    from .extension import ClaudeState

MODEL = "gen_ai_request_model"
TOKEN_TYPE = "gen_ai_token_type"


def _import() -> Any:
    try:
        import prometheus_client
    except ImportError:  # pragma: no cover - the extra is documented
        raise ConfigError("Prometheus metrics need prometheus-client: pip install 'flask-claude[prometheus]'") from None
    return prometheus_client


class ClaudeCollector:
    """A prometheus-client collector for one app: ``REGISTRY.register(ClaudeCollector(app))`` works too."""

    def __init__(self, app_or_state: Any) -> None:
        self._state = state_for(app_or_state) if hasattr(app_or_state, "extensions") else app_or_state

    def describe(self) -> list[Any]:
        return []  # read at scrape time: nothing to describe ahead

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        state = self._state
        up = GaugeMetricFamily("flask_claude_storage_up", "1 when the shared storage answered this scrape")
        try:
            snap = state.rollups.read(totals=True)
        except StorageUnavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        per: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)  # (feature, model) -> metric -> value
        for name, amount in snap.totals.items():
            metric, feature, model = split_field(name)
            per[(feature, model)][metric] = per[(feature, model)].get(metric, 0) + amount

        duration = HistogramMetricFamily("gen_ai_client_operation_duration_seconds",
                                         "Duration of Claude calls, retries and fallbacks included",
                                         labels=[MODEL, "feature"])
        tokens = HistogramMetricFamily("gen_ai_client_token_usage",
                                       "Tokens per Claude call (input counts cache reads and writes)",
                                       labels=[MODEL, TOKEN_TYPE, "feature"])
        token_total = CounterMetricFamily("flask_claude_tokens", "Tokens billed, by kind",
                                          labels=[MODEL, TOKEN_TYPE, "feature"])
        cost = CounterMetricFamily("flask_claude_cost_usd", "Cost of Claude calls in USD (whole micro-dollars)",
                                   labels=[MODEL, "feature"])
        calls = CounterMetricFamily("flask_claude_calls", "Claude calls by outcome (error: claude_api_error)",
                                    labels=["outcome", MODEL, "feature"])
        errors = CounterMetricFamily("flask_claude_errors", "Failed Claude calls by error type",
                                     labels=["error_type", MODEL, "feature"])
        fallbacks = CounterMetricFamily("flask_claude_fallbacks", "Calls that went past the first model",
                                        labels=[MODEL, "feature"])
        retries = CounterMetricFamily("flask_claude_retries", "Retries made", labels=[MODEL, "feature"])
        degraded = CounterMetricFamily("flask_claude_degraded", "Degraded responses by reason",
                                       labels=["reason", "feature"])
        for (feature, model), m in sorted(per.items()):
            degraded_reasons = {k[2:]: v for k, v in m.items() if k.startswith("d:")}
            for reason, count in sorted(degraded_reasons.items()):
                degraded.add_metric([reason, feature], count)
            n = m.get("c", 0)
            if not n:
                continue
            failed = sum(v for k, v in m.items() if k.startswith("e:"))
            calls.add_metric(["ok", model, feature], n - failed)
            calls.add_metric(["error", model, feature], failed)
            for key in sorted(k for k in m if k.startswith("e:")):
                errors.add_metric([key[2:], model, feature], m[key])
            cost.add_metric([model, feature], m.get("u", 0) / MICRO)
            fallbacks.add_metric([model, feature], m.get("f", 0))
            retries.add_metric([model, feature], m.get("r", 0))
            duration.add_metric([model, feature], _buckets(m, "l:", LATENCY_BUCKETS), m.get("ls", 0) / MICRO)
            input_sum = m.get("ti", 0) + m.get("tcr", 0) + m.get("tcw", 0)
            tokens.add_metric([model, "input", feature], _buckets(m, "hi:", TOKEN_BUCKETS), input_sum)
            tokens.add_metric([model, "output", feature], _buckets(m, "ho:", TOKEN_BUCKETS), m.get("to", 0))
            for kind, key in (("input", "ti"), ("output", "to"), ("cache_read", "tcr"), ("cache_creation", "tcw")):
                token_total.add_metric([model, kind, feature], m.get(key, 0))
        yield from (duration, tokens, token_total, cost, calls, errors, fallbacks, retries, degraded)
        yield from self._live(state, snap.alerts, sorted({model for _, model in per if model != "-"}))

    @staticmethod
    def _live(state: ClaudeState, alert_states: dict[str, str], seen_models: list[str]) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        firing = GaugeMetricFamily("flask_claude_alert_firing", "1 while an ops alert's episode is open",
                                   labels=["alert"])
        for alert in ALERTS:
            firing.add_metric([alert], 1 if f"{alert}|" in alert_states else 0)
        yield firing
        now = state.clock.time()
        breaker = GaugeMetricFamily("flask_claude_breaker_open", "1 while a model's circuit is open or half-open",
                                    labels=["model"])
        for model in dict.fromkeys([*state.settings.models, *seen_models]):
            breaker.add_metric([model], 0 if state.breaker.state(model, now) == "closed" else 1)
        yield breaker
        remaining = GaugeMetricFamily("flask_claude_budget_remaining_usd",
                                      "What is left of each app-wide budget this period", labels=["budget"])
        try:
            for item in state.budgets.usage_report(now):
                remaining.add_metric([item["budget"]], item["remaining_usd"])
        except StorageUnavailable:
            pass
        yield remaining
        yield from _pacing(state, list(dict.fromkeys([*state.settings.models, *seen_models])))


def _pacing(state: ClaudeState, models: list[str]) -> Iterator[Any]:
    """What each model's rate limit has left (as the shared pacing state sees it now), leases, queue."""
    from prometheus_client.core import GaugeMetricFamily

    remaining = GaugeMetricFamily("flask_claude_ratelimit_remaining",
                                  "What the upstream's rate limit has left now, per model and dimension (below 0: "
                                  "turns already handed out)", labels=["model", "dimension"])
    leases = GaugeMetricFamily("flask_claude_pacing_leases", "Calls in flight holding a concurrency lease",
                               labels=["model"])
    queued = GaugeMetricFamily("flask_claude_pacing_queued", "Calls queued for a concurrency lease",
                               labels=["model"])
    for model, entry in state.pacer.snapshot(models).items():
        for dimension, values in entry["limits"].items():
            remaining.add_metric([model, dimension], values["remaining"])
        leases.add_metric([model], entry["leases"])
        queued.add_metric([model], entry["queued"])
    yield from (remaining, leases, queued)


def _buckets(m: dict[str, int], prefix: str, bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs from the rollup's per-bucket counts, +Inf last."""
    out: list[tuple[str, float]] = []
    running = 0
    for i, bound in enumerate(bounds):
        running += m.get(f"{prefix}{i}", 0)
        out.append((repr(float(bound)), running))
    running += m.get(f"{prefix}{len(bounds)}", 0)
    out.append(("+Inf", running))
    return out


def metrics_response(state: ClaudeState) -> Response:
    """The Prometheus text exposition of one app, for ``claude.metrics_view``."""
    from flask import Response

    prometheus_client = _import()
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(ClaudeCollector(state))
    return Response(prometheus_client.generate_latest(registry), mimetype=None,
                    content_type=prometheus_client.CONTENT_TYPE_LATEST)
