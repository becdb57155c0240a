"""The fault script: scripted failures, delays and prompt padding, checked on every request.

A test scripts a failure (``sim.fail(529, times=2)``), drives the code under test, then asks the
returned :class:`Fault` how often it fired. The script is thread-safe: the loopback server answers
several connections at once.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from .wire import DEFAULT_MESSAGES, ERROR_TYPES

FaultKind = Literal["status", "stream_error", "drop_stream", "end_stream", "truncate"]
Endpoint = Literal["messages", "count_tokens", "batches", "any"]


@dataclass
class Fault:
    """One scripted failure; returned by the scripting methods so a test can ask how often it fired."""

    kind: FaultKind
    model: str | None = None
    times: int | None = None
    rate: Fraction | None = None
    status: int = 200
    error_type: str = "overloaded_error"
    message: str = "Overloaded"
    retry_after: float | None = None
    retry_after_ms: int | None = None
    should_retry: bool | None = None
    endpoint: Endpoint = "messages"
    after_deltas: int = 2
    seen: int = 0
    fired: int = 0

    @property
    def remaining(self) -> int | None:
        """How many more times it fires, ``None`` when unlimited."""
        return None if self.times is None else max(0, self.times - self.fired)

    def _matches(self, endpoint: Endpoint, model: str | None, streaming: bool) -> bool:
        if self.model is not None and self.model != model:
            return False
        if self.kind == "status":
            return self.endpoint == "any" or self.endpoint == endpoint
        if endpoint != "messages":
            return False
        return self.kind == "truncate" or streaming

    def _decide(self) -> bool:
        """Count one matching request and say whether the fault fires on it.

        A rate fires on the requests where ``ceil(n * rate)`` steps up, so ``rate=0.5`` fails the
        1st, 3rd, 5th... request: an exact, repeatable fraction instead of a random one.
        """
        n = self.seen
        self.seen += 1
        if self.rate is None:
            return True
        return math.ceil((n + 1) * self.rate) > math.ceil(n * self.rate)

    def retry_headers(self) -> list[tuple[str, str]]:
        """The headers the SDK's retry loop obeys, as scripted."""
        extra: list[tuple[str, str]] = []
        if self.retry_after is not None:
            value = self.retry_after
            extra.append(("retry-after", str(int(value)) if float(value).is_integer() else str(value)))
        if self.retry_after_ms is not None:
            extra.append(("retry-after-ms", str(self.retry_after_ms)))
        if self.should_retry is not None:
            extra.append(("x-should-retry", "true" if self.should_retry else "false"))
        return extra


@dataclass
class Shaping:
    """Delays for one model (or all); ``None`` means "not set here, use the all-models value"."""

    latency: float | None = None
    trickle_delay: float | None = None
    trickle_chunks: int = 20


def _check_times(times: int | None) -> int | None:
    if times is not None and times < 1:
        raise ValueError("times must be >= 1 (or None for no limit)")
    return times


def _check_rate(rate: float | None) -> Fraction | None:
    if rate is None:
        return None
    if not 0 < rate <= 1:
        raise ValueError("rate must be in (0, 1]")
    # Exact arithmetic: with floats, 30 * 0.1 is a hair above 3 and would fire one time too many.
    return Fraction(rate).limit_denominator(1_000_000)


class FaultScript:
    """The scripting half of :class:`~flask_claude.simulator.Simulator` (which inherits it)."""

    def __init__(self) -> None:
        self._script_lock = threading.RLock()
        self._faults: list[Fault] = []
        self._shaping: dict[str | None, Shaping] = {}
        self._padding: dict[str | None, int] = {}

    def fail(
        self,
        status: int = 529,
        *,
        model: str | None = None,
        times: int | None = None,
        rate: float | None = None,
        retry_after: float | None = None,
        retry_after_ms: int | None = None,
        message: str | None = None,
        error_type: str | None = None,
        should_retry: bool | None = None,
        endpoint: Endpoint = "messages",
    ) -> Fault:
        """Answer ``status`` with the API's error body: ``times`` times, on a ``rate`` of requests, or
        forever when both are ``None``.

        Only ``POST /v1/messages`` is affected unless ``endpoint`` says otherwise, so a scripted
        overload is not used up by a ``count_tokens`` pre-flight the caller happens to make.
        ``retry_after`` / ``retry_after_ms`` / ``should_retry`` set the ``retry-after``,
        ``retry-after-ms`` and ``x-should-retry`` headers the SDK's retry loop obeys.
        """
        if not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        kind = error_type or ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        fault = Fault(
            kind="status",
            model=model,
            times=_check_times(times),
            rate=_check_rate(rate),
            status=status,
            error_type=kind,
            message=message or DEFAULT_MESSAGES.get(kind, "Error"),
            retry_after=retry_after,
            retry_after_ms=retry_after_ms,
            should_retry=should_retry,
            endpoint=endpoint,
        )
        return self._add_fault(fault)

    def stream_error(
        self,
        *,
        model: str | None = None,
        after_deltas: int = 2,
        error_type: str = "overloaded_error",
        message: str | None = None,
        times: int | None = None,
        rate: float | None = None,
    ) -> Fault:
        """Make streaming replies fail after ``after_deltas`` text deltas with ``event: error``.

        The status is already 200 by then, which is why the SDK raises a plain ``APIStatusError``
        with ``status_code == 200`` and never retries it: the case callers most often mishandle.
        Non-streaming requests are not affected and do not use the fault up.
        """
        return self._stream_fault("stream_error", model, after_deltas, times, rate, error_type=error_type,
                                  message=message or DEFAULT_MESSAGES.get(error_type, "Error"))

    def drop_stream(
        self,
        *,
        model: str | None = None,
        after_deltas: int = 2,
        times: int | None = None,
        rate: float | None = None,
    ) -> Fault:
        """Cut the connection of streaming replies after ``after_deltas`` text deltas.

        The client sees ``httpx2.RemoteProtocolError`` while reading the body, in both modes (raw, or as
        the ``__cause__`` of the ``APIConnectionError`` some SDK builds raise from it).
        Non-streaming requests are not affected and do not use the fault up.
        """
        return self._stream_fault("drop_stream", model, after_deltas, times, rate)

    def end_stream(
        self,
        *,
        model: str | None = None,
        after_deltas: int = 2,
        times: int | None = None,
        rate: float | None = None,
    ) -> Fault:
        """End streaming replies cleanly after ``after_deltas`` text deltas, without ``message_delta``
        or ``message_stop``: a proxy or load balancer that closes a chunked body properly mid-reply.

        No exception reaches the client (the body is well formed, just short), so only a client that
        checks for ``message_stop`` knows the reply is incomplete. Non-streaming requests are not
        affected and do not use the fault up.
        """
        return self._stream_fault("end_stream", model, after_deltas, times, rate)

    def truncate(self, *, model: str | None = None, times: int | None = None, rate: float | None = None) -> Fault:
        """Make replies use up their whole budget: ``stop_reason`` "max_tokens" and
        ``output_tokens == max_tokens``, the worst case a cost guard has to expect."""
        return self._add_fault(Fault(kind="truncate", model=model, times=_check_times(times), rate=_check_rate(rate)))

    def latency(self, seconds: float, *, model: str | None = None) -> None:
        """Wait ``seconds`` before the response headers (every endpoint; ``0`` turns it off).

        A model's own setting replaces the all-models one rather than adding to it. In-process, a
        wait longer than the client's read timeout raises ``httpx2.ReadTimeout`` after that timeout,
        as a socket would; over loopback the real socket does it.
        """
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        with self._script_lock:
            self._shaping.setdefault(model, Shaping()).latency = seconds

    def trickle(self, chunk_delay: float, *, model: str | None = None, chunks: int = 20) -> None:
        """Send response bodies in ``chunks`` pieces with ``chunk_delay`` seconds between them.

        This is the case a per-read timeout cannot catch: every read is quick, the whole body is
        slow. SSE bodies are cut into pieces regardless of event boundaries, as TCP would. A model's
        own setting replaces the all-models one. In-process, a gap longer than the client's read
        timeout raises ``httpx2.ReadTimeout`` mid-body. ``chunk_delay=0`` turns it off.
        """
        if chunk_delay < 0 or chunks < 1:
            raise ValueError("chunk_delay must be >= 0 and chunks >= 1")
        with self._script_lock:
            shaping = self._shaping.setdefault(model, Shaping())
            shaping.trickle_delay = chunk_delay
            shaping.trickle_chunks = chunks

    def pad_prompt(self, tokens: int, *, model: str | None = None) -> None:
        """Count ``tokens`` more (uncached) input tokens on every request, as if the prompt were longer.

        Long-prompt price bands (``claude-haiku-5-5`` above 100,000 prompt tokens) can then be reached
        without sending megabytes. The client cannot see the padding, so its reservation is sized for
        the text it sent: a padded call past its hold is logged as ``reservation_exceeded``, as a real
        under-estimate would be. A model's own padding replaces the all-models one; 0 removes it.
        """
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be a whole number >= 0, got {tokens!r}")
        with self._script_lock:
            if tokens:
                self._padding[model] = tokens
            else:
                self._padding.pop(model, None)

    def clear_faults(self) -> None:
        """Forget every scripted fault, latency, trickle and prompt padding."""
        with self._script_lock:
            self._faults.clear()
            self._shaping.clear()
            self._padding.clear()

    @property
    def faults(self) -> list[Fault]:
        """The faults still scripted, in the order they are checked."""
        with self._script_lock:
            return list(self._faults)

    # --- what the request handler asks

    def _pad_for(self, model: Any) -> int:
        with self._script_lock:
            own = self._padding.get(model) if isinstance(model, str) else None
            return own if own is not None else self._padding.get(None, 0)

    def _shaping_for(self, model: str | None) -> Shaping:
        """The delays for ``model``: its own settings where it has them, the all-models ones elsewhere."""
        with self._script_lock:
            default = self._shaping.get(None) or Shaping()
            own = (self._shaping.get(model) if model is not None else None) or Shaping()
            trickle = own if own.trickle_delay is not None else default
            return Shaping(
                latency=own.latency if own.latency is not None else (default.latency or 0.0),
                trickle_delay=trickle.trickle_delay or 0.0,
                trickle_chunks=trickle.trickle_chunks,
            )

    def _stream_fault(self, kind: FaultKind, model: str | None, after_deltas: int, times: int | None,
                      rate: float | None, **details: Any) -> Fault:
        """A fault of streaming replies after ``after_deltas`` text deltas (non-streaming calls pass)."""
        return self._add_fault(Fault(kind=kind, model=model, times=_check_times(times), rate=_check_rate(rate),
                                     after_deltas=max(0, after_deltas), **details))

    def _add_fault(self, fault: Fault) -> Fault:
        with self._script_lock:
            self._faults.append(fault)
        return fault

    def _take_fault(self, endpoint: Endpoint, model: str | None, streaming: bool) -> Fault | None:
        with self._script_lock:
            for fault in self._faults:
                if not fault._matches(endpoint, model, streaming) or not fault._decide():
                    continue
                fault.fired += 1
                if fault.times is not None and fault.fired >= fault.times:
                    self._faults.remove(fault)
                return fault
        return None
