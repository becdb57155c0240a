"""Retry policy, total deadline, and the per-model circuit breaker.

Why our own retry loop instead of the SDK's (which we switch off with ``max_retries=0``): the SDK
honours ``retry-after`` without an upper bound (``retry-after: 3600`` sleeps an hour), has no total
deadline (its ``timeout`` is per read), jitters only 0-25% (synchronised clients still stampede),
and does not tell a caller how many retries a failed call took. Each of those is a line of the
production checklist, so the policy lives here, small and explicit.
"""

from __future__ import annotations

import json
import random
import threading
from collections import deque
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import anthropic
import httpx2

from .clock import Clock

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 529})


@dataclass(frozen=True)
class Failure:
    """What went wrong with one attempt, in the terms the policy decides on."""

    kind: str  # "rate_limited" | "server" | "connection" | "timeout" | "client" | "stream"
    status_code: int | None
    error_type: str
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        return self.kind in ("rate_limited", "server", "connection", "timeout")

    @property
    def counts_against_model(self) -> bool:
        """Only the model's own ill health opens its breaker: not our bad request, not rate limits."""
        return self.kind in ("server", "connection", "timeout", "stream")


def _retry_after(headers: Any) -> float | None:
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue
        if value >= 0:
            return value
    return None


def classify(exc: BaseException) -> Failure:
    """Map an SDK or transport exception to a ``Failure``; order matters (529 is an InternalServerError)."""
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        error_type = getattr(exc, "type", None) or type(exc).__name__
        if status == 200:  # an ``event: error`` in the middle of a stream
            return Failure("stream", status, str(error_type))
        headers = getattr(exc.response, "headers", None)
        if status == 429:
            return Failure("rate_limited", status, str(error_type), _retry_after(headers))
        if status in RETRYABLE_STATUS or status >= 500:
            return Failure("server", status, str(error_type), _retry_after(headers))
        return Failure("client", status, str(error_type))
    if isinstance(exc, anthropic.APITimeoutError):
        return Failure("timeout", None, "timeout")
    if isinstance(exc, anthropic.APIConnectionError):
        return Failure("connection", None, "connection_error")
    if isinstance(exc, httpx2.TimeoutException):
        return Failure("timeout", None, "timeout")
    if isinstance(exc, httpx2.HTTPError):
        return Failure("stream", None, type(exc).__name__)
    if isinstance(exc, json.JSONDecodeError):  # a 200 whose body is not JSON
        return Failure("server", 200, "invalid_response")
    return Failure("client", None, type(exc).__name__)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    retry_after_cap: float
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, retry_number: int, failure: Failure, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry ``retry_number`` (0-based).

        Full jitter (uniform in [0, backoff]) spreads a burst of failed clients over the whole
        interval. A server's ``retry-after`` is honoured up to the cap, plus up to 20% jitter so
        every worker told "10 s" does not come back in the same millisecond.
        """
        rand = (rng or random).random()
        if failure.retry_after is not None:
            return min(self.retry_after_cap, failure.retry_after * (1 + 0.2 * rand))
        backoff = min(self.max_delay, self.base_delay * 2**retry_number)
        return min(self.retry_after_cap, backoff * rand) if self.retry_after_cap else backoff * rand


@dataclass
class Deadline:
    """The end of a whole call, every attempt and sleep included, on the injected clock."""

    clock: Clock
    at: float

    @classmethod
    def after(cls, clock: Clock, seconds: float) -> Deadline:
        return cls(clock, clock.monotonic() + seconds)

    def remaining(self) -> float:
        return self.at - self.clock.monotonic()

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0


# The deadline of the call being made on this thread; the transport binds it to each response.
current_deadline: ContextVar[Deadline | None] = ContextVar("flask_claude_deadline", default=None)


class _DeadlineStream(httpx2.SyncByteStream):
    """Ends a body that keeps trickling past the deadline (the SDK's timeout is per read)."""

    def __init__(self, inner: Any, deadline: Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            if self._deadline.expired:
                raise httpx2.ReadTimeout("flask-claude deadline exceeded while reading the response")
            yield chunk

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


class DeadlineTransport(httpx2.BaseTransport):
    """Wraps the real transport (network or simulator) and enforces the current call's deadline."""

    def __init__(self, inner: httpx2.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        deadline = current_deadline.get()
        if deadline is not None and deadline.expired:
            raise httpx2.ConnectTimeout("flask-claude deadline exceeded before sending", request=request)
        response = self.inner.handle_request(request)
        if deadline is None:
            return response
        return httpx2.Response(status_code=response.status_code, headers=response.headers,
                               stream=_DeadlineStream(response.stream, deadline),
                               extensions=response.extensions, request=request)

    def close(self) -> None:
        self.inner.close()


# --- circuit breaker -------------------------------------------------------------------------


class BreakerStore(Protocol):
    """Where breaker state lives: this process (memory) or shared storage (every worker agrees)."""

    def allow(self, model: str, now: float) -> bool:
        """False while open; after the cooldown grants exactly one probe."""

    def record(self, model: str, ok: bool, now: float) -> bool:
        """Record an attempt's outcome; True when this record opened the circuit."""

    def state(self, model: str, now: float) -> str:
        """"closed", "open" or "half_open"."""


@dataclass
class BreakerConfig:
    min_calls: int = 5
    failure_rate: float = 0.5
    window: float = 30.0
    cooldown: float = 30.0


@dataclass
class _ModelCircuit:
    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)
    open_until: float | None = None
    probe_since: float | None = None  # a probe that never reports back expires after a cooldown


class MemoryBreakerStore:
    """Breaker state for one process; ``budget.py`` provides the shared-storage equivalent."""

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self._circuits: dict[str, _ModelCircuit] = {}
        self._lock = threading.Lock()

    def _circuit(self, model: str) -> _ModelCircuit:
        return self._circuits.setdefault(model, _ModelCircuit())

    def allow(self, model: str, now: float) -> bool:
        with self._lock:
            c = self._circuit(model)
            if c.open_until is None:
                return True
            if now < c.open_until:
                return False
            if c.probe_since is not None and now < c.probe_since + self.config.cooldown:
                return False
            c.probe_since = now  # half-open: this caller is the one probe
            return True

    def record(self, model: str, ok: bool, now: float) -> bool:
        cfg = self.config
        with self._lock:
            c = self._circuit(model)
            if c.open_until is not None:
                if c.probe_since is not None:
                    c.probe_since = None
                    if ok:
                        c.open_until = None
                        c.outcomes.clear()
                        return False
                    c.open_until = now + cfg.cooldown
                    return True
                return False
            c.outcomes.append((now, ok))
            while c.outcomes and c.outcomes[0][0] < now - cfg.window:
                c.outcomes.popleft()
            calls = len(c.outcomes)
            failures = sum(1 for _, good in c.outcomes if not good)
            if not ok and calls >= cfg.min_calls and failures / calls >= cfg.failure_rate:
                c.open_until = now + cfg.cooldown
                c.outcomes.clear()
                return True
            return False

    def state(self, model: str, now: float) -> str:
        with self._lock:
            c = self._circuit(model)
            if c.open_until is None:
                return "closed"
            return "open" if now < c.open_until else "half_open"


def model_chain(requested: str | None, configured: tuple[str, ...]) -> list[str]:
    """The requested model first, then the configured fallbacks, each once."""
    chain = [requested] if requested else []
    chain += [m for m in configured if m not in chain]
    return chain
