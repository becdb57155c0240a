"""OpenTelemetry for guarded calls: one span per call around the SDK's own spans, and the GenAI metrics.

The anthropic SDK (2.14) already opens one CLIENT span per SDK call (``anthropic.messages.create``,
``anthropic/_tracing.py``) with what the request and the response say. Our retries and fallbacks
happen outside the SDK (its ``max_retries`` is 0), so each attempt is one SDK span. What only we know
is the call as the app sees it: the model chain, the waits between attempts, which model finally
answered, the cost, the feature and user, whether it became a degradation. One span per guarded call
carries that, and is current while each attempt runs, so the SDK's spans are its children.

Its kind is INTERNAL: the SDK's span is the CLIENT span of the remote call, and a CLIENT span around
CLIENT spans would count each remote call twice in service graphs and latency-by-peer views.

The SDK records no metrics (no meter anywhere in it), so ``gen_ai.client.token.usage`` and
``gen_ai.client.operation.duration`` are recorded here, once per guarded call (not per attempt).

The hooks do no I/O (exporting is the app's span processor's job) and never raise into a call: the
same hooks serve the sync client and an async one. Without ``opentelemetry-api`` every hook is a
no-op; with the API but no SDK configured, spans are non-recording and only the cheap part runs.
No prompt or reply text ever goes on our span: with ``CLAUDE_LOG_CONTENT`` the SDK's own spans carry
it (``sdk_options`` switches their content mode to follow the setting).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType
from typing import Any, Protocol

from .events import hash_text

try:
    from opentelemetry import context as _context
    from opentelemetry import metrics as _metrics
    from opentelemetry import trace as _trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
    _PROVIDERS_FROM_ENV = any(name in os.environ for name in ("OTEL_PYTHON_TRACER_PROVIDER",
                                                               "OTEL_PYTHON_METER_PROVIDER"))
    try:
        from opentelemetry.metrics import _internal as _metrics_internal
        from opentelemetry.metrics._internal import _ProxyMeterProvider
        _UNSET_METER_PROVIDERS: tuple[type, ...] = (_ProxyMeterProvider, _metrics.NoOpMeterProvider)
    except ImportError:  # pragma: no cover - the proxy's home in opentelemetry-api 1.x
        _metrics_internal = None  # type: ignore[assignment]
        _UNSET_METER_PROVIDERS = (_metrics.NoOpMeterProvider,)
except ImportError:  # pragma: no cover - anthropic >= 2.14 depends on opentelemetry-api
    _trace = None  # type: ignore[assignment]

SCOPE = "flask_claude"
PROVIDER = "anthropic"

# Bucket boundaries the GenAI semantic conventions advise for the two client metrics.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)

_NOT_ACTIVE: AbstractContextManager[None] = nullcontext()


class Usage(Protocol):
    """What ``pricing.Cost`` gives: the bill of one call, split by token kind."""

    @property
    def usd(self) -> float: ...
    @property
    def input_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def cache_read_input_tokens(self) -> int: ...
    @property
    def cache_creation_input_tokens(self) -> int: ...


class CallSpan:
    """The hooks a guarded call calls; this base is the no-op used when OpenTelemetry is absent."""

    __slots__ = ()

    def current(self) -> AbstractContextManager[None]:
        """Makes the call's span current around one attempt, so the SDK's span is its child."""
        return _NOT_ACTIVE

    def retry(self, model: str, attempt: int, error_type: str, delay: float) -> None:
        """An attempt failed and the same model is tried again after ``delay`` seconds."""

    def fallback(self, from_model: str, to_model: str, error_type: str) -> None:
        """``from_model`` failed for good; the next model of the chain is tried."""

    def finish(self, *, model: str | None, retries: int, fallback_from: str | None = None,
               cost: Usage | None = None, stop_reason: str | None = None, error_type: str | None = None,
               degradation_reason: str | None = None) -> None:
        """The call is over: ``model`` answered (None when none did), billed ``cost``; ends the span once."""


NO_SPAN = CallSpan()


class _Activation:
    """``context.attach``/``detach`` of one span: what ``trace.use_span`` does, without its generator."""

    __slots__ = ("_ctx", "_token")

    def __init__(self, span: Any) -> None:
        self._ctx = _trace.set_span_in_context(span)
        self._token: object = None

    def __enter__(self) -> None:
        self._token = _context.attach(self._ctx)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _context.detach(self._token)  # type: ignore[arg-type]


class _OtelCallSpan(CallSpan):
    __slots__ = ("_attrs", "_ended", "_recording", "_span", "_started", "_valid")

    def __init__(self, span: Any, metric_attrs: dict[str, Any]) -> None:
        self._span = span
        self._recording = span.is_recording()
        # A sampled-out span still carries the trace: the SDK's spans must see it to be sampled out too.
        self._valid = span.get_span_context().is_valid
        self._attrs = metric_attrs
        self._started = time.perf_counter()
        self._ended = False

    def current(self) -> AbstractContextManager[None]:
        return _Activation(self._span) if self._valid else _NOT_ACTIVE

    def retry(self, model: str, attempt: int, error_type: str, delay: float) -> None:
        if self._recording:
            self._span.add_event("flask_claude.retry", {
                "gen_ai.request.model": model, "flask_claude.attempt": attempt + 1, "error.type": error_type,
                "flask_claude.retry_delay_s": float(delay)})

    def fallback(self, from_model: str, to_model: str, error_type: str) -> None:
        if self._recording:
            self._span.add_event("flask_claude.fallback", {
                "flask_claude.from_model": from_model, "flask_claude.to_model": to_model, "error.type": error_type})

    def finish(self, *, model: str | None, retries: int, fallback_from: str | None = None,
               cost: Usage | None = None, stop_reason: str | None = None, error_type: str | None = None,
               degradation_reason: str | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        try:
            self._record(model, retries, fallback_from, cost, stop_reason, error_type, degradation_reason)
        except Exception:  # telemetry must never fail a call that was paid for
            pass
        finally:
            self._span.end()

    def _record(self, model: str | None, retries: int, fallback_from: str | None, cost: Usage | None,
                stop_reason: str | None, error_type: str | None, degradation_reason: str | None) -> None:
        attrs = self._attrs
        if model is not None:
            attrs["gen_ai.response.model"] = model
        if error_type is not None:
            attrs["error.type"] = error_type
        _duration.record(time.perf_counter() - self._started, attrs)
        # Input as the conventions require for Anthropic: uncached + cache read + cache creation.
        input_tokens = output_tokens = 0
        if cost is not None:
            input_tokens = cost.input_tokens + cost.cache_read_input_tokens + cost.cache_creation_input_tokens
            output_tokens = cost.output_tokens
            if input_tokens or output_tokens:
                _tokens.record(input_tokens, {**attrs, "gen_ai.token.type": "input"})
                _tokens.record(output_tokens, {**attrs, "gen_ai.token.type": "output"})
        if not self._recording:
            return
        span = self._span
        if model is not None:
            span.set_attribute("gen_ai.response.model", model)
        span.set_attribute("flask_claude.retries", retries)
        if fallback_from is not None:
            span.set_attribute("flask_claude.fallback_from", fallback_from)
        if cost is not None:
            span.set_attributes({
                "gen_ai.usage.input_tokens": input_tokens,
                "gen_ai.usage.output_tokens": output_tokens,
                "gen_ai.usage.cache_read.input_tokens": cost.cache_read_input_tokens,
                "gen_ai.usage.cache_creation.input_tokens": cost.cache_creation_input_tokens,
                "flask_claude.cost_usd": float(cost.usd),
            })
        if stop_reason is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [stop_reason])
        if degradation_reason is not None:
            span.set_attribute("flask_claude.degradation_reason", degradation_reason)
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR))


def start_call(*, operation: str, chain: Sequence[str], max_tokens: int | None, feature: str | None,
               route: str | None, user: str | None, salt: str, streaming: bool = False) -> CallSpan:
    """Opens the span of one guarded call, named ``"{operation} {first model of the chain}"``.

    ``user`` is the raw user key: only its salted hash (the one our log lines use) reaches the span.
    """
    if _trace is None or not _configured():
        return NO_SPAN
    try:
        requested = chain[0]
        attrs: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER,
                                 "gen_ai.request.model": requested}
        span = _tracer.start_span(f"{operation} {requested}", kind=SpanKind.INTERNAL, attributes=attrs)
        metric_attrs = dict(attrs)
        if feature is not None:
            metric_attrs["flask_claude.feature"] = feature  # bounded: one value per decorated feature
        if span.is_recording():
            extra: dict[str, Any] = {"flask_claude.fallback_chain": list(chain)}
            if max_tokens is not None:
                extra["gen_ai.request.max_tokens"] = max_tokens
            if feature is not None:
                extra["flask_claude.feature"] = feature
            if route is not None:
                extra["flask_claude.route"] = route
            if user is not None:
                extra["flask_claude.user"] = hash_text(str(user), salt=salt)
            if streaming:
                extra["gen_ai.request.stream"] = True
            span.set_attributes(extra)
        return _OtelCallSpan(span, metric_attrs)
    except Exception:
        return NO_SPAN


def _configured() -> bool:
    """Whether the app set a tracer or meter provider: until it does, the API's proxies record
    nothing, and a span and three histogram records per call would cost time for nothing.

    The API's own getters read ``os.environ`` on every call while no provider is set (an exception
    raised and caught inside each lookup), so the globals they fill are looked at first; the
    environment's provider variables are read once, at import.
    """
    if getattr(_trace, "_TRACER_PROVIDER", False) is None and \
            getattr(_metrics_internal, "_METER_PROVIDER", False) is None and not _PROVIDERS_FROM_ENV:
        return False
    tracer_provider = _trace.get_tracer_provider()
    if not isinstance(tracer_provider, (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider)):
        return True
    meter_provider = _metrics.get_meter_provider()
    return not isinstance(meter_provider, _UNSET_METER_PROVIDERS)


def degraded(reason: str, feature: str | None) -> None:
    """A request degraded: say why on the app's current span (its request span, when Flask is traced).

    Degradations without a call (kill switch, budget, limits) have no call span of ours; the request's
    span is where an operator looking at a slow or odd request will look.
    """
    if _trace is None:
        return
    span = _trace.get_current_span()
    if span.is_recording():
        span.set_attribute("flask_claude.degradation_reason", reason)
        attrs: dict[str, Any] = {"flask_claude.degradation_reason": reason}
        if feature is not None:
            attrs["flask_claude.feature"] = feature
        span.add_event("flask_claude.degraded", attrs)


def sdk_options(resolved: Mapping[str, Any], log_content: bool) -> Any:
    """The SDK client's ``open_telemetry`` option with its content mode following ``CLAUDE_LOG_CONTENT``.

    ``resolved`` is ``client.open_telemetry`` (what the environment said when the client was made):
    everything else in it (enabled, propagation, tracer provider, max content bytes) is kept.
    """
    traces = dict(resolved.get("traces") or {})
    traces["content_mode"] = "content" if log_content else "metadata_only"
    return {**resolved, "traces": traces}


if _trace is not None:
    # Proxies: they follow a tracer or meter provider the app sets later, at no cost until then.
    _tracer = _trace.get_tracer(SCOPE)
    _meter = _metrics.get_meter(SCOPE)
    _tokens = _meter.create_histogram(
        "gen_ai.client.token.usage", unit="{token}", description="Tokens used by a guarded Claude call",
        explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
    _duration = _meter.create_histogram(
        "gen_ai.client.operation.duration", unit="s",
        description="Duration of a guarded Claude call, retries and fallbacks included",
        explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
