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
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import anthropic
import httpx2

from .clock import Clock
from .storage import BreakerParams, StorageUnavailable

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 529})


class FailureKind(StrEnum):
    """What kind of failure ended an attempt (or a call): the policy decides on this, never on text.

    A ``StrEnum``, so a kind compares equal to its string and logs as it.
    """

    RATE_LIMITED = "rate_limited"  # 429
    SERVER = "server"  # 5xx, 529, a 200 whose body is not JSON
    CONNECTION = "connection"
    TIMEOUT = "timeout"
    CLIENT = "client"  # a 4xx: our request was wrong
    STREAM = "stream"  # an ``event: error`` mid-stream, a dropped or cut body
    CIRCUIT_OPEN = "circuit_open"  # the model was skipped: its breaker is open
    DEADLINE = "deadline"  # the call's total deadline ran out
    INVALID_REQUEST = "invalid_request"  # the SDK could not build the request
    CANCELLED = "cancelled"  # the task was cancelled mid-call


_RETRYABLE = frozenset({FailureKind.RATE_LIMITED, FailureKind.SERVER, FailureKind.CONNECTION, FailureKind.TIMEOUT})
_MODEL_FAULTS = frozenset({FailureKind.SERVER, FailureKind.CONNECTION, FailureKind.TIMEOUT, FailureKind.STREAM})


@dataclass(frozen=True)
class Failure:
    """What went wrong with one attempt, in the terms the policy decides on."""

    kind: FailureKind
    status_code: int | None
    error_type: str
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        return self.kind in _RETRYABLE

    @property
    def counts_against_model(self) -> bool:
        """Only the model's own ill health opens its breaker: not our bad request, not rate limits."""
        return self.kind in _MODEL_FAULTS


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
            return Failure(FailureKind.STREAM, status, str(error_type))
        headers = getattr(exc.response, "headers", None)
        if status == 429:
            return Failure(FailureKind.RATE_LIMITED, status, str(error_type), _retry_after(headers))
        if status in RETRYABLE_STATUS or status >= 500:
            return Failure(FailureKind.SERVER, status, str(error_type), _retry_after(headers))
        return Failure(FailureKind.CLIENT, status, str(error_type))
    if isinstance(exc, anthropic.APITimeoutError):
        return Failure(FailureKind.TIMEOUT, None, "timeout")
    if isinstance(exc, anthropic.APIConnectionError):
        return Failure(FailureKind.CONNECTION, None, "connection_error")
    if isinstance(exc, httpx2.TimeoutException):
        return Failure(FailureKind.TIMEOUT, None, "timeout")
    if isinstance(exc, httpx2.HTTPError):
        return Failure(FailureKind.STREAM, None, type(exc).__name__)
    if isinstance(exc, json.JSONDecodeError):  # a 200 whose body is not JSON
        return Failure(FailureKind.SERVER, 200, "invalid_response")
    return Failure(FailureKind.CLIENT, None, type(exc).__name__)


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
        return min(self.max_delay, self.base_delay * 2.0**retry_number) * rand


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


class AttemptMark:
    """Set by the transport when an attempt's request reaches it: an exception raised before that
    is a request the SDK could not build (unencodable text, a bad argument), never an upstream fault."""

    __slots__ = ("headers", "sent")

    def __init__(self) -> None:
        self.sent = False
        self.headers: Any = None  # the response's headers, for pacing (pacing.py)


current_attempt: ContextVar[AttemptMark | None] = ContextVar("flask_claude_attempt", default=None)


class _DeadlineStream(httpx2.SyncByteStream):
    """Ends a body that keeps trickling past the deadline (the SDK's timeout is per read)."""

    def __init__(self, inner: Any, deadline: Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def __iter__(self) -> Iterator[bytes]:
        # ``Deadline.expired`` inlined: per chunk one clock read and a compare, not three calls around it.
        deadline = self._deadline
        now = deadline.clock.monotonic
        for chunk in self._inner:
            if now() >= deadline.at:
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
        mark = current_attempt.get()
        if mark is not None:
            mark.sent = True
        deadline = current_deadline.get()
        if deadline is not None and deadline.expired:
            raise httpx2.ConnectTimeout("flask-claude deadline exceeded before sending", request=request)
        response = self.inner.handle_request(request)
        if mark is not None:
            mark.headers = response.headers
        if deadline is None:
            return response
        # The same response, its body read under the deadline: a new Response would parse the headers again.
        response.stream = _DeadlineStream(response.stream, deadline)
        return response

    def close(self) -> None:
        self.inner.close()


class _AsyncDeadlineStream(httpx2.AsyncByteStream):
    """``_DeadlineStream`` for the async client."""

    def __init__(self, inner: Any, deadline: Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    async def __aiter__(self) -> AsyncIterator[bytes]:
        deadline = self._deadline
        now = deadline.clock.monotonic  # as ``_DeadlineStream``: one clock read and a compare per chunk
        async for chunk in self._inner:
            if now() >= deadline.at:
                raise httpx2.ReadTimeout("flask-claude deadline exceeded while reading the response")
            yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()


class AsyncDeadlineTransport(httpx2.AsyncBaseTransport):
    """``DeadlineTransport`` for the async client: the same deadline and "was it sent" mark."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        mark = current_attempt.get()
        if mark is not None:
            mark.sent = True
        deadline = current_deadline.get()
        if deadline is not None and deadline.expired:
            raise httpx2.ConnectTimeout("flask-claude deadline exceeded before sending", request=request)
        response = await self.inner.handle_async_request(request)
        if mark is not None:
            mark.headers = response.headers
        if deadline is None:
            return response
        # The same response, its body read under the deadline: a new Response would parse the headers again.
        response.stream = _AsyncDeadlineStream(response.stream, deadline)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- circuit breaker -------------------------------------------------------------------------


class CircuitBreaker:
    """Per-model breaker whose state lives in the app's store (``storage/``).

    On ``memory://`` it is this process's; on Redis every worker and host skips a dead model
    together. A storage outage never blocks a call: the breaker then lets calls through.
    """

    def __init__(self, store: Any, params: BreakerParams) -> None:
        self.store = store
        self.params = params

    def allow(self, model: str, now: float) -> bool:
        """False while open; after the cooldown grants exactly one probe (half-open)."""
        try:
            return bool(self.store.breaker_allow(model, now, self.params.cooldown))
        except StorageUnavailable:
            return True

    def record(self, model: str, ok: bool, now: float) -> bool:
        """Record an attempt's outcome; True when this record opened the circuit."""
        try:
            return bool(self.store.breaker_record(model, ok, now, self.params))
        except StorageUnavailable:
            return False

    def state(self, model: str, now: float) -> str:
        try:
            return str(self.store.breaker_state(model, now))
        except StorageUnavailable:
            return "unknown"


def model_chain(requested: str | None, configured: tuple[str, ...]) -> list[str]:
    """The requested model first, then the configured fallbacks, each once."""
    chain = [requested] if requested else []
    chain += [m for m in configured if m not in chain]
    return chain
