"""An offline Anthropic Messages API that speaks the real wire format.

Guards around Claude calls (budgets, retries, deadlines, circuit breakers) are only as good as the
failures they were tested against, and the real API cannot be asked to be overloaded on cue. This
module answers the requests the official ``anthropic`` SDK sends, byte for byte in the shapes the SDK
parses, so the SDK runs unmodified against it, and it can be scripted to fail in the ways the real
service fails: error statuses with ``retry-after``, slow or trickling bodies, a mid-stream
``event: error`` and a connection dropped in the middle of a stream.

The core is one WSGI application (:class:`Simulator`). Two ways to reach it:

* in-process, ``Simulator.transport()`` -- an ``httpx2`` transport for
  ``anthropic.DefaultHttpxClient(transport=...)``; no sockets, fast enough for unit tests;
* over loopback, ``Simulator.serve()`` -- a threaded werkzeug server, for code that must open real
  connections (other processes, ``gunicorn``, benchmarks), and ``run_server`` / ``main`` for a CLI.

Replies are deterministic: the same request gets the same text and token counts, so tests can pin
numbers. Token counts are a documented estimate (:func:`estimate_tokens`), not the real tokenizer.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http
import io
import json
import math
import os
import random
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from types import TracebackType
from typing import Any, Literal, Protocol, Self
from wsgiref.types import StartResponse, WSGIEnvironment

import httpx2
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request

__all__ = [
    "Clock",
    "Fault",
    "RecordedRequest",
    "Simulator",
    "SimulatorServer",
    "SimulatorTransport",
    "SystemClock",
    "estimate_tokens",
    "main",
    "run_server",
]

#: Tokens added for every message on top of its content: role markers cost tokens on the real API
#: too, and a constant keeps "more messages, more tokens" true even for one-word turns.
MESSAGE_OVERHEAD_TOKENS = 3

#: An image is counted as a fixed size (about a 1092x1092 picture at width*height/750) rather than by
#: the length of its base64 data, which would make every image look like a whole book.
IMAGE_TOKENS = 1600

_TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_DEFAULT_MESSAGES = {
    "invalid_request_error": "Invalid request",
    "authentication_error": "invalid x-api-key",
    "billing_error": "Your credit balance is too low",
    "permission_error": "Your API key does not have permission to use the specified resource.",
    "not_found_error": "Not found",
    "timeout_error": "Request timed out",
    "conflict_error": "Conflict",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit",
    "api_error": "Internal server error",
    "overloaded_error": "Overloaded",
}

#: Credentials never leave the simulator: these headers are masked in recorded requests.
_SECRET_HEADERS = frozenset({"x-api-key", "authorization", "proxy-authorization", "cookie"})
_MASK = "[redacted]"

_WORDS = (
    "answer", "batch", "budget", "cache", "careful", "clear", "context", "cost", "detail",
    "deadline", "draft", "every", "field", "first", "guard", "helpful", "idea", "input", "latency",
    "limit", "model", "measure", "metric", "next", "note", "output", "plain", "policy", "prompt",
    "queue", "quota", "reply", "report", "request", "result", "route", "safe", "short", "signal",
    "simple", "small", "steady", "stream", "summary", "system", "the", "token", "trace", "useful",
    "value", "window", "worker", "with", "within", "and", "for", "a", "this", "that", "each",
)  # fmt: skip


def estimate_tokens(text: str) -> int:
    """Estimate the tokens of ``text`` as ``ceil(len(text) / 4)``, at least 1.

    Four characters per token is the usual rule of thumb for English; what matters here is that the
    estimate is cheap, deterministic and shared by every endpoint, so ``count_tokens`` and the usage
    of ``create`` agree and tests can compute expected numbers by hand.
    """
    return max(1, math.ceil(len(text) / 4))


class Clock(Protocol):
    """Time as the simulator sees it; inject a fake one to test timeouts without waiting."""

    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """Real time: the simulator stands in for the network, so by default delays are real."""

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


FaultKind = Literal["status", "stream_error", "drop_stream", "truncate"]
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


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the simulator received it, with credentials masked."""

    method: str
    path: str
    query: dict[str, str]
    model: str | None
    body: Any
    headers: dict[str, str]
    timestamp: float

    @property
    def stream(self) -> bool:
        return isinstance(self.body, dict) and self.body.get("stream") is True


@dataclass
class _Shaping:
    """Delays for one model (or all); ``None`` means "not set here, use the all-models value"."""

    latency: float | None = None
    trickle_delay: float | None = None
    trickle_chunks: int = 20


@dataclass
class _Usage:
    input_tokens: int
    output_tokens: int
    cache_creation_5m: int = 0
    cache_creation_1h: int = 0
    cache_read: int = 0
    service_tier: str = "standard"

    def as_json(self, *, output_tokens: int | None = None) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens if output_tokens is None else output_tokens,
            "cache_creation_input_tokens": self.cache_creation_5m + self.cache_creation_1h,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.cache_creation_5m,
                "ephemeral_1h_input_tokens": self.cache_creation_1h,
            },
            "service_tier": self.service_tier,
        }


@dataclass
class _Reply:
    message_id: str
    model: str
    text: str
    stop_reason: str
    stop_sequence: str | None
    usage: _Usage

    def message_json(self) -> dict[str, Any]:
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": self.text}],
            "stop_reason": self.stop_reason,
            "stop_sequence": self.stop_sequence,
            "usage": self.usage.as_json(),
        }


@dataclass
class _Segment:
    """A cacheable unit of the prompt (a tool, a system block or a message block)."""

    tokens: int
    fingerprint: str
    cache_control: dict[str, Any] | None


@dataclass
class _Batch:
    id: str
    created_at: float
    requests: list[dict[str, Any]]
    polls: int = 0
    status: Literal["in_progress", "canceling", "ended"] = "in_progress"
    cancel_initiated_at: float | None = None
    ended_at: float | None = None
    results: list[dict[str, Any]] | None = None
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class _Response:
    status: int
    headers: list[tuple[str, str]]
    body: Iterable[bytes]


class _ConnectionDropped(ConnectionAbortedError):
    """Raised from a body iterator to cut the connection.

    A ``ConnectionError`` because werkzeug's server treats those as a vanished peer: it stops
    writing without the closing chunk and without logging a traceback, which is exactly a dropped
    connection as the client sees it. The transport turns it into ``httpx2.RemoteProtocolError``.
    """


class _ReadTimedOut(Exception):
    """Raised when an in-process response stalls longer than the client's read timeout."""


class _InvalidRequest(Exception):
    pass


#: The transport passes the client's read timeout in the WSGI environ under this key, so that waits
#: longer than it fail as they would on a socket. Absent in server mode, where sockets do it.
_READ_TIMEOUT_KEY = "flask_claude.simulator.read_timeout"

_NO_COUNTS = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}

_BATCH_PATH = re.compile(r"^/v1/messages/batches/(?P<id>[^/]+)(?P<rest>/results|/cancel)?$")


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _json_bytes(data) + b"\n\n"


def _rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat().replace("+00:00", "Z")


def _status_line(status: int) -> str:
    if status == 529:
        return "529 Overloaded"
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def _split(data: bytes, pieces: int) -> list[bytes]:
    size = max(1, math.ceil(len(data) / max(1, pieces)))
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def _block_text(block: Any) -> str:
    """The text a content block contributes to the token estimate."""
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return json.dumps(block, sort_keys=True)
    if block.get("type") == "text":
        return str(block.get("text", ""))
    if block.get("type") == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return "".join(_block_text(item) for item in content)
        return "" if content is None else str(content)
    return json.dumps({k: v for k, v in block.items() if k != "cache_control"}, sort_keys=True)


def _block_tokens(block: Any) -> int:
    if isinstance(block, dict) and block.get("type") == "image":
        return IMAGE_TOKENS
    return estimate_tokens(_block_text(block))


def _cache_control(block: Any) -> dict[str, Any] | None:
    if isinstance(block, dict) and isinstance(block.get("cache_control"), dict):
        return block["cache_control"]
    return None


def _fingerprint(value: Any) -> str:
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k != "cache_control"}
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _segments(body: dict[str, Any]) -> list[_Segment]:
    """Cut the prompt into cacheable segments in the API's cache order: tools, system, messages.

    Tokens (see :func:`estimate_tokens`): a text block counts its text, a tool or any other block
    its JSON, an image :data:`IMAGE_TOKENS`; the first block of every message adds
    :data:`MESSAGE_OVERHEAD_TOKENS`.
    """
    segments: list[_Segment] = []
    for tool in body.get("tools") or []:
        segments.append(_Segment(estimate_tokens(_fingerprint(tool)), _fingerprint(tool), _cache_control(tool)))
    system = body.get("system")
    if isinstance(system, str) and system:
        segments.append(_Segment(estimate_tokens(system), _fingerprint(system), None))
    elif isinstance(system, list):
        for block in system:
            segments.append(_Segment(_block_tokens(block), _fingerprint(block), _cache_control(block)))
    for message in body.get("messages") or []:
        content = message.get("content")
        blocks = [content] if isinstance(content, str) else list(content or [])
        role = str(message.get("role"))
        if not blocks:
            segments.append(_Segment(MESSAGE_OVERHEAD_TOKENS, role, None))
        for index, block in enumerate(blocks):
            overhead = MESSAGE_OVERHEAD_TOKENS if index == 0 else 0
            segments.append(
                _Segment(_block_tokens(block) + overhead, role + _fingerprint(block), _cache_control(block))
            )
    # Top-level ``cache_control`` ("automatic caching") puts the breakpoint on the last block.
    top = body.get("cache_control")
    if isinstance(top, dict) and segments and segments[-1].cache_control is None:
        segments[-1].cache_control = top
    return segments


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "".join(
                str(b.get("text", "")) for b in content or [] if isinstance(b, dict) and b.get("type") == "text"
            )
    return ""


def _validate_create(body: Any) -> dict[str, Any]:
    """Refuse what the real API refuses most often, so callers' 400 handling gets exercised."""
    if not isinstance(body, dict):
        raise _InvalidRequest("Request body must be a JSON object")
    for name in ("model", "messages", "max_tokens"):
        if name not in body:
            raise _InvalidRequest(f"{name}: Field required")
    if not isinstance(body["model"], str) or not body["model"]:
        raise _InvalidRequest("model: Input should be a non-empty string")
    max_tokens = body["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _InvalidRequest("max_tokens: Input should be an integer greater than or equal to 1")
    _validate_messages(body["messages"])
    return body


def _validate_count(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _InvalidRequest("Request body must be a JSON object")
    for name in ("model", "messages"):
        if name not in body:
            raise _InvalidRequest(f"{name}: Field required")
    _validate_messages(body["messages"])
    return body


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _InvalidRequest("messages: at least one message is required")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise _InvalidRequest(f"messages.{index}.role: Input should be 'user' or 'assistant'")
        if not isinstance(message.get("content"), (str, list)):
            raise _InvalidRequest(f"messages.{index}.content: Field required")


class Simulator:
    """The simulated API: a WSGI app plus a thread-safe script of faults and a request log.

    One instance holds all state (faults, prompt cache, batches, recorded requests), so a test can
    script a failure, drive the code under test and then inspect exactly what reached the "API".
    """

    def __init__(self, *, seed: int = 0, batch_polls_until_done: int = 1, clock: Clock | None = None) -> None:
        if batch_polls_until_done < 0:
            raise ValueError("batch_polls_until_done must be >= 0")
        self.seed = seed
        self.batch_polls_until_done = batch_polls_until_done
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._lock = threading.RLock()
        self._faults: list[Fault] = []
        self._shaping: dict[str | None, _Shaping] = {}
        self._requests: list[RecordedRequest] = []
        self._cache: dict[str, float] = {}
        self._batches: dict[str, _Batch] = {}
        self._padding: dict[str | None, int] = {}
        self._counter = 0

    # ------------------------------------------------------------------ fault script

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
        kind = error_type or _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        fault = Fault(
            kind="status",
            model=model,
            times=_check_times(times),
            rate=_check_rate(rate),
            status=status,
            error_type=kind,
            message=message or _DEFAULT_MESSAGES.get(kind, "Error"),
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
        fault = Fault(
            kind="stream_error",
            model=model,
            times=_check_times(times),
            rate=_check_rate(rate),
            error_type=error_type,
            message=message or _DEFAULT_MESSAGES.get(error_type, "Error"),
            after_deltas=max(0, after_deltas),
        )
        return self._add_fault(fault)

    def drop_stream(
        self,
        *,
        model: str | None = None,
        after_deltas: int = 2,
        times: int | None = None,
        rate: float | None = None,
    ) -> Fault:
        """Cut the connection of streaming replies after ``after_deltas`` text deltas.

        The client sees a raw ``httpx2.RemoteProtocolError`` while reading the body, in both modes.
        Non-streaming requests are not affected and do not use the fault up.
        """
        fault = Fault(
            kind="drop_stream",
            model=model,
            times=_check_times(times),
            rate=_check_rate(rate),
            after_deltas=max(0, after_deltas),
        )
        return self._add_fault(fault)

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
        with self._lock:
            self._shaping.setdefault(model, _Shaping()).latency = seconds

    def trickle(self, chunk_delay: float, *, model: str | None = None, chunks: int = 20) -> None:
        """Send response bodies in ``chunks`` pieces with ``chunk_delay`` seconds between them.

        This is the case a per-read timeout cannot catch: every read is quick, the whole body is
        slow. SSE bodies are cut into pieces regardless of event boundaries, as TCP would. A model's
        own setting replaces the all-models one. In-process, a gap longer than the client's read
        timeout raises ``httpx2.ReadTimeout`` mid-body. ``chunk_delay=0`` turns it off.
        """
        if chunk_delay < 0 or chunks < 1:
            raise ValueError("chunk_delay must be >= 0 and chunks >= 1")
        with self._lock:
            shaping = self._shaping.setdefault(model, _Shaping())
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
        with self._lock:
            if tokens:
                self._padding[model] = tokens
            else:
                self._padding.pop(model, None)

    def _pad_for(self, model: Any) -> int:
        with self._lock:
            own = self._padding.get(model) if isinstance(model, str) else None
            return own if own is not None else self._padding.get(None, 0)

    def clear_faults(self) -> None:
        """Forget every scripted fault, latency, trickle and prompt padding."""
        with self._lock:
            self._faults.clear()
            self._shaping.clear()
            self._padding.clear()

    def reset(self) -> None:
        """Back to a fresh simulator: no faults, requests, cache entries or batches, ids restart."""
        with self._lock:
            self.clear_faults()
            self._requests.clear()
            self._cache.clear()
            self._batches.clear()
            self._counter = 0

    @property
    def faults(self) -> list[Fault]:
        """The faults still scripted, in the order they are checked."""
        with self._lock:
            return list(self._faults)

    # ------------------------------------------------------------------ request log

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, model: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self._requests if r.model == model]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # ------------------------------------------------------------------ ways in

    def transport(self) -> SimulatorTransport:
        """An httpx2 transport (sync and async) that calls this simulator in-process."""
        return SimulatorTransport(self)

    def serve(self, host: str = "127.0.0.1", port: int = 0, *, quiet: bool = True) -> SimulatorServer:
        """Start a threaded loopback server in a daemon thread; ``port=0`` picks a free port."""
        return SimulatorServer(self, host=host, port=port, quiet=quiet)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return self.wsgi_app(environ, start_response)

    def wsgi_app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """The WSGI entry point.

        Headers are started before returning (after any latency) and the body is a lazy iterator,
        so trickles and drops happen while the client reads, as on a network.
        """
        request_id = self._new_id("req_sim_")
        try:
            response = self._dispatch(Request(environ), request_id)
        except _ReadTimedOut:
            raise
        except Exception:  # a bug here must still look like the API, not an HTML page
            response = self._error(500, "api_error", "Internal server error", request_id)
        start_response(_status_line(response.status), response.headers)
        return response.body

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, request: Request, request_id: str) -> _Response:
        environ = request.environ
        method = request.method.upper()
        path = request.path
        raw = request.get_data(cache=False) if method in ("POST", "PUT", "PATCH") else b""
        body: Any = None
        malformed = False
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                malformed = True
        model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
        self._record(request, model, body if not malformed else raw.decode("utf-8", "replace"))

        shaping = self._shaping_for(model)
        if shaping.latency:
            self._pause(environ, shaping.latency)

        endpoint: Endpoint
        if path == "/v1/messages" and method == "POST":
            endpoint = "messages"
        elif path == "/v1/messages/count_tokens" and method == "POST":
            endpoint = "count_tokens"
        elif path == "/v1/messages/batches" or _BATCH_PATH.match(path):
            endpoint = "batches"
        else:
            return self._error(404, "not_found_error", f"Not found: {method} {path}", request_id)

        # Validation comes before the fault script, so a scripted fault is only used by a request
        # that would otherwise have succeeded.
        if malformed or (body is None and method == "POST" and endpoint != "batches"):
            return self._error(400, "invalid_request_error", "Request body is not valid JSON", request_id)
        try:
            if endpoint == "messages":
                _validate_create(body)
            elif endpoint == "count_tokens":
                _validate_count(body)
        except _InvalidRequest as exc:
            return self._error(400, "invalid_request_error", str(exc), request_id)

        streaming = endpoint == "messages" and body.get("stream") is True
        fault = self._take_fault(endpoint, model, streaming)
        if fault is not None and fault.kind == "status":
            return self._fault_response(fault, request_id)

        if endpoint == "messages":
            reply = self._reply(body, truncate=fault is not None and fault.kind == "truncate")
            if streaming:
                return self._stream_response(environ, reply, fault, request_id, shaping)
            return self._json(200, reply.message_json(), request_id, environ, shaping)
        if endpoint == "count_tokens":
            tokens = sum(segment.tokens for segment in _segments(body)) + self._pad_for(body.get("model"))
            return self._json(200, {"input_tokens": tokens}, request_id, environ, shaping)
        try:
            return self._batches_endpoint(request, method, path, body, request_id, shaping)
        except _InvalidRequest as exc:
            return self._error(400, "invalid_request_error", str(exc), request_id)

    def _record(self, request: Request, model: str | None, body: Any) -> None:
        headers = {k.lower(): (_MASK if k.lower() in _SECRET_HEADERS else v) for k, v in request.headers.items()}
        recorded = RecordedRequest(
            method=request.method.upper(),
            path=request.path,
            query=dict(request.args.items()),
            model=model,
            body=body,
            headers=headers,
            timestamp=self.clock.time(),
        )
        with self._lock:
            self._requests.append(recorded)

    def _shaping_for(self, model: str | None) -> _Shaping:
        """The delays for ``model``: its own settings where it has them, the all-models ones elsewhere."""
        with self._lock:
            default = self._shaping.get(None) or _Shaping()
            own = (self._shaping.get(model) if model is not None else None) or _Shaping()
            trickle = own if own.trickle_delay is not None else default
            return _Shaping(
                latency=own.latency if own.latency is not None else (default.latency or 0.0),
                trickle_delay=trickle.trickle_delay or 0.0,
                trickle_chunks=trickle.trickle_chunks,
            )

    def _add_fault(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def _take_fault(self, endpoint: Endpoint, model: str | None, streaming: bool) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if not fault._matches(endpoint, model, streaming) or not fault._decide():
                    continue
                fault.fired += 1
                if fault.times is not None and fault.fired >= fault.times:
                    self._faults.remove(fault)
                return fault
        return None

    def _pause(self, environ: WSGIEnvironment, seconds: float) -> None:
        """Sleep like a network stall; in-process, stalls beyond the read timeout fail as on a socket."""
        limit = environ.get(_READ_TIMEOUT_KEY)
        if limit is not None and seconds > limit:
            self.clock.sleep(limit)
            raise _ReadTimedOut
        self.clock.sleep(seconds)

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            counter = self._counter
        # The pid keeps ids unique across workers that each run a simulator with the same seed.
        return prefix + hashlib.sha256(f"{self.seed}:{os.getpid()}:{prefix}:{counter}".encode()).hexdigest()[:24]

    # ------------------------------------------------------------------ replies

    def _reply(self, body: dict[str, Any], *, truncate: bool, service_tier: str = "standard") -> _Reply:
        max_tokens: int = body["max_tokens"]
        text = self._natural_text(_last_user_text(body["messages"]))
        stop_reason, stop_sequence = "end_turn", None
        limit = max_tokens * 4  # the longest text estimate_tokens counts as max_tokens
        if truncate:
            while len(text) < limit:
                text = f"{text} {text}" if text else "token"
        else:
            cut = [
                (text.find(s), s) for s in body.get("stop_sequences") or [] if isinstance(s, str) and s and s in text
            ]
            if cut:
                index, stop_sequence = min(cut)
                text, stop_reason = text[:index], "stop_sequence"
        if len(text) > limit:
            text, stop_reason, stop_sequence = text[:limit], "max_tokens", None
        usage = self._usage(body, estimate_tokens(text), service_tier)
        return _Reply(self._new_id("msg_sim_"), body["model"], text, stop_reason, stop_sequence, usage)

    def _natural_text(self, prompt: str) -> str:
        """Deterministic prose from the prompt; ``echo:`` replies the rest verbatim for exact tests."""
        if prompt.startswith("echo:"):
            rest = prompt[len("echo:") :]
            return rest[1:] if rest.startswith(" ") else rest
        rng = random.Random(hashlib.sha256(f"{self.seed}\x00{prompt}".encode()).digest())
        sentences = []
        for _ in range(rng.randint(2, 4)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 12))]
            sentences.append(" ".join(words).capitalize() + ".")
        return " ".join(sentences)

    def _cached_usage(self, body: dict[str, Any], output_tokens: int, service_tier: str) -> _Usage:
        """Input usage with prompt caching.

        Each ``cache_control`` marks a prefix. The longest marked prefix already cached (same model,
        same content, not expired) is read; the marked prefixes after it are written, each at its
        own TTL. ``input_tokens`` is what is left. The API's minimum cacheable length is ignored so
        small test prompts cache too.
        """
        segments = _segments(body)
        total = sum(s.tokens for s in segments)
        breakpoints: list[tuple[str, int, str]] = []
        digest = hashlib.sha256(str(body["model"]).encode())
        running = 0
        for segment in segments:
            digest.update(b"\x00" + segment.fingerprint.encode())
            running += segment.tokens
            if segment.cache_control is not None:
                ttl = "1h" if segment.cache_control.get("ttl") == "1h" else "5m"
                breakpoints.append((digest.hexdigest(), running, ttl))
        usage = _Usage(input_tokens=total, output_tokens=output_tokens, service_tier=service_tier)
        if not breakpoints:
            return usage
        now = self.clock.time()
        with self._lock:
            hit = -1
            for index in range(len(breakpoints) - 1, -1, -1):
                expiry = self._cache.get(breakpoints[index][0])
                if expiry is not None and expiry > now:
                    hit = index
                    break
            previous = breakpoints[hit][1] if hit >= 0 else 0
            usage.cache_read = previous
            for index, (key, tokens, ttl) in enumerate(breakpoints):
                if index > hit:
                    if ttl == "1h":
                        usage.cache_creation_1h += tokens - previous
                    else:
                        usage.cache_creation_5m += tokens - previous
                    previous = tokens
                self._cache[key] = now + _TTL_SECONDS[ttl]  # written, or refreshed by the read
        usage.input_tokens = total - usage.cache_read - usage.cache_creation_5m - usage.cache_creation_1h
        return usage

    def _usage(self, body: dict[str, Any], output_tokens: int, service_tier: str) -> _Usage:
        usage = self._cached_usage(body, output_tokens, service_tier)
        usage.input_tokens += self._pad_for(body.get("model"))
        return usage

    # ------------------------------------------------------------------ responses

    def _headers(self, request_id: str, content_type: str) -> list[tuple[str, str]]:
        return [("content-type", content_type), ("request-id", request_id)]

    def _json(
        self, status: int, payload: Any, request_id: str, environ: WSGIEnvironment, shaping: _Shaping
    ) -> _Response:
        data = _json_bytes(payload)
        headers = self._headers(request_id, "application/json")
        headers.append(("content-length", str(len(data))))
        return _Response(status, headers, self._body(environ, [data], shaping, drop=False))

    def _error(
        self,
        status: int,
        error_type: str,
        message: str,
        request_id: str,
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> _Response:
        payload = {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}
        data = _json_bytes(payload)
        headers = self._headers(request_id, "application/json")
        headers.append(("content-length", str(len(data))))
        headers.extend(extra_headers)
        return _Response(status, headers, [data])

    def _fault_response(self, fault: Fault, request_id: str) -> _Response:
        extra: list[tuple[str, str]] = []
        if fault.retry_after is not None:
            value = fault.retry_after
            extra.append(("retry-after", str(int(value)) if float(value).is_integer() else str(value)))
        if fault.retry_after_ms is not None:
            extra.append(("retry-after-ms", str(fault.retry_after_ms)))
        if fault.should_retry is not None:
            extra.append(("x-should-retry", "true" if fault.should_retry else "false"))
        return self._error(fault.status, fault.error_type, fault.message, request_id, extra)

    def _stream_response(
        self, environ: WSGIEnvironment, reply: _Reply, fault: Fault | None, request_id: str, shaping: _Shaping
    ) -> _Response:
        """The SSE sequence the SDK's ``MessageStream`` accumulates, with an optional failure cut in."""
        usage = reply.usage
        start_message = {
            **reply.message_json(),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage.as_json(output_tokens=1),
        }
        block_start = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        events = [  # the API's order, ping included: clients must skip events they do not know
            _sse("message_start", {"type": "message_start", "message": start_message}),
            _sse("ping", {"type": "ping"}),
            _sse("content_block_start", block_start),
        ]
        deltas = _deltas(reply.text)
        cut = fault.after_deltas if fault is not None and fault.kind in ("stream_error", "drop_stream") else None
        for piece in deltas[:cut]:
            delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
            events.append(_sse("content_block_delta", delta))
        drop = False
        if fault is not None and fault.kind == "stream_error":
            error = {"type": "error", "error": {"type": fault.error_type, "message": fault.message}}
            events.append(_sse("error", error))
        elif fault is not None and fault.kind == "drop_stream":
            drop = True
        else:
            final_usage = {
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cache_creation_input_tokens": usage.cache_creation_5m + usage.cache_creation_1h,
                "cache_read_input_tokens": usage.cache_read,
            }
            stop = {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence}
            events += [
                _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
                _sse("message_delta", {"type": "message_delta", "delta": stop, "usage": final_usage}),
                _sse("message_stop", {"type": "message_stop"}),
            ]
        headers = self._headers(request_id, "text/event-stream; charset=utf-8")
        headers.append(("cache-control", "no-cache"))
        return _Response(200, headers, self._body(environ, events, shaping, drop=drop))

    def _body(self, environ: WSGIEnvironment, pieces: list[bytes], shaping: _Shaping, *, drop: bool) -> Iterator[bytes]:
        """Yield the body lazily, trickled if asked, and cut the connection at the end if asked."""
        if shaping.trickle_delay:
            pieces = _split(b"".join(pieces), shaping.trickle_chunks)
        for index, piece in enumerate(pieces):
            if index and shaping.trickle_delay:
                self._pause(environ, shaping.trickle_delay)
            yield piece
        if drop:
            raise _ConnectionDropped("simulated dropped connection")

    # ------------------------------------------------------------------ batches

    def _batches_endpoint(
        self, request: Request, method: str, path: str, body: Any, request_id: str, shaping: _Shaping
    ) -> _Response:
        environ = request.environ
        if path == "/v1/messages/batches":
            if method == "POST":
                batch = self._create_batch(body)
                return self._json(200, self._batch_json(batch, request), request_id, environ, shaping)
            if method == "GET":
                return self._json(200, self._list_batches(request), request_id, environ, shaping)
            return self._error(404, "not_found_error", f"Not found: {method} {path}", request_id)
        match = _BATCH_PATH.match(path)
        assert match is not None
        batch_id, rest = match["id"], match["rest"]
        with self._lock:
            found = self._batches.get(batch_id)
            if found is None:
                return self._error(404, "not_found_error", f"message batch {batch_id!r} not found", request_id)
            batch = found
            if rest is None and method == "GET":
                batch.polls += 1
                if batch.polls >= self.batch_polls_until_done:
                    self._end_batch(batch)
                payload: Any = self._batch_json(batch, request)
            elif rest is None and method == "DELETE":
                if batch.status != "ended":
                    raise _InvalidRequest("A batch can only be deleted once it has ended; cancel it first")
                del self._batches[batch_id]
                payload = {"id": batch_id, "type": "message_batch_deleted"}
            elif rest == "/cancel" and method == "POST":
                if batch.status == "in_progress":
                    batch.status = "canceling"
                    batch.cancel_initiated_at = self.clock.time()
                payload = self._batch_json(batch, request)
            elif rest == "/results" and method == "GET":
                if batch.results is None:
                    raise _InvalidRequest(f"Batch {batch_id} is still processing; no results yet")
                data = b"".join(_json_bytes(line) + b"\n" for line in batch.results)
                headers = self._headers(request_id, "application/binary")
                headers.append(("content-length", str(len(data))))
                return _Response(200, headers, self._body(environ, [data], shaping, drop=False))
            else:
                return self._error(404, "not_found_error", f"Not found: {method} {path}", request_id)
        return self._json(200, payload, request_id, environ, shaping)

    def _create_batch(self, body: Any) -> _Batch:
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            raise _InvalidRequest("requests: at least one request is required")
        seen: set[str] = set()
        for index, item in enumerate(requests):
            if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
                raise _InvalidRequest(f"requests.{index}.custom_id: Field required")
            if not isinstance(item.get("params"), dict):
                raise _InvalidRequest(f"requests.{index}.params: Field required")
            if item["custom_id"] in seen:
                raise _InvalidRequest(f"requests.{index}.custom_id: duplicate custom_id {item['custom_id']!r}")
            seen.add(item["custom_id"])
        batch = _Batch(id=self._new_id("msgbatch_sim_"), created_at=self.clock.time(), requests=requests)
        with self._lock:
            self._batches[batch.id] = batch
            if self.batch_polls_until_done == 0:
                self._end_batch(batch)
        return batch

    def _end_batch(self, batch: _Batch) -> None:
        """Run every request of the batch (or cancel them all) and freeze the results."""
        if batch.status == "ended":
            return
        results: list[dict[str, Any]] = []
        counts = dict(_NO_COUNTS)
        for item in batch.requests:
            if batch.status == "canceling":
                result: dict[str, Any] = {"type": "canceled"}
            else:
                try:
                    params = _validate_create(item["params"])
                    if params.get("stream"):
                        raise _InvalidRequest("stream: streaming is not supported in batches")
                    reply = self._reply(params, truncate=False, service_tier="batch")
                    result = {"type": "succeeded", "message": reply.message_json()}
                except _InvalidRequest as exc:
                    error = {"type": "invalid_request_error", "message": str(exc)}
                    result = {"type": "errored", "error": {"type": "error", "error": error, "request_id": None}}
            counts[result["type"]] += 1
            results.append({"custom_id": item["custom_id"], "result": result})
        batch.results, batch.counts = results, counts
        batch.status, batch.ended_at = "ended", self.clock.time()

    def _batch_json(self, batch: _Batch, request: Request) -> dict[str, Any]:
        counts = batch.counts or {**_NO_COUNTS, "processing": len(batch.requests)}
        results_url = None
        if batch.status == "ended":
            # Absolute like the real API's; built from the request (host and any SCRIPT_NAME mount)
            # so the SDK fetches it through the same transport or server.
            results_url = f"{request.url_root}v1/messages/batches/{batch.id}/results"
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status,
            "request_counts": dict(counts),
            "created_at": _rfc3339(batch.created_at),
            "expires_at": _rfc3339(batch.created_at + 24 * 3600),
            "ended_at": _rfc3339(batch.ended_at),
            "archived_at": None,
            "cancel_initiated_at": _rfc3339(batch.cancel_initiated_at),
            "results_url": results_url,
        }

    def _list_batches(self, request: Request) -> dict[str, Any]:
        try:
            limit = int(request.args.get("limit", "20"))
        except ValueError:
            raise _InvalidRequest("limit: Input should be a valid integer") from None
        if not 1 <= limit <= 1000:
            raise _InvalidRequest("limit: Input should be between 1 and 1000")
        with self._lock:
            batches = list(reversed(self._batches.values()))  # most recent first, like the API
            ids = [b.id for b in batches]
            after, before = request.args.get("after_id"), request.args.get("before_id")
            if after in ids:
                batches = batches[ids.index(after) + 1 :]
                page = batches[:limit]
                has_more = len(batches) > limit
            elif before in ids:
                batches = batches[: ids.index(before)]
                page = batches[-limit:]
                has_more = len(batches) > limit
            else:
                page = batches[:limit]
                has_more = len(batches) > limit
            data = [self._batch_json(b, request) for b in page]
        return {
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }


def _deltas(text: str, words_per_delta: int = 3) -> list[str]:
    """Cut the reply into text deltas of a few words each, whitespace kept, so they rejoin exactly."""
    words = re.findall(r"\s*\S+\s*", text)
    if "".join(words) != text:
        words = [text] if text else []
    return ["".join(words[i : i + words_per_delta]) for i in range(0, len(words), words_per_delta)]


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


class _SimByteStream(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """The WSGI body handed to httpx2 unread, turning simulated network failures into httpx2's own."""

    def __init__(self, chunks: Iterable[bytes], request: httpx2.Request) -> None:
        self._chunks = chunks
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        with _network_errors(self._request):
            yield from self._chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        iterator = iter(self._chunks)
        done = object()
        while True:
            with _network_errors(self._request):
                chunk = await asyncio.to_thread(next, iterator, done)
            if chunk is done:
                return
            assert isinstance(chunk, bytes)
            yield chunk

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    async def aclose(self) -> None:
        self.close()


class _network_errors:
    """Map the simulator's stand-ins to the exceptions a real httpx2 connection raises."""

    def __init__(self, request: httpx2.Request) -> None:
        self._request = request

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, _ConnectionDropped):
            raise httpx2.RemoteProtocolError(
                "peer closed connection without sending complete message body (incomplete chunked read)",
                request=self._request,
            ) from None
        if isinstance(exc, _ReadTimedOut):
            raise httpx2.ReadTimeout("The read operation timed out", request=self._request) from None


class SimulatorTransport(httpx2.BaseTransport, httpx2.AsyncBaseTransport):
    """Calls the simulator's WSGI app in-process.

    Unlike ``httpx2.WSGITransport`` it passes the client's read timeout in (so a stall longer than it
    raises ``httpx2.ReadTimeout``) and maps a dropped stream to ``httpx2.RemoteProtocolError``. The
    async side runs the app in a worker thread so delays do not block the event loop.
    """

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        return self._call_app(request)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        await request.aread()
        return await asyncio.to_thread(self._call_app, request)

    def _call_app(self, request: httpx2.Request) -> httpx2.Response:
        environ = _environ(request)
        seen: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen["status"], seen["headers"] = status, headers
            return lambda data: None

        with _network_errors(request):
            body = self.simulator(environ, start_response)
        status = int(seen["status"].split()[0])
        return httpx2.Response(status, headers=seen["headers"], stream=_SimByteStream(body, request))


def _environ(request: httpx2.Request) -> WSGIEnvironment:
    url = request.url
    port = url.port or {"http": 80, "https": 443}.get(url.scheme, 80)
    environ: WSGIEnvironment = {
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": url.scheme,
        "wsgi.input": io.BytesIO(request.content),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": url.path,
        "QUERY_STRING": url.query.decode("ascii"),
        "SERVER_NAME": url.host,
        "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": str(len(request.content)),
    }
    for key, value in request.headers.raw:
        name = key.decode("latin-1").upper().replace("-", "_")
        if name not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name = "HTTP_" + name
        environ[name] = value.decode("latin-1")
    timeout = request.extensions.get("timeout", {}).get("read")
    if timeout is not None:
        environ[_READ_TIMEOUT_KEY] = float(timeout)
    return environ


class _RequestHandler(WSGIRequestHandler):
    """werkzeug's handler, silent about each request when the server is quiet (tests)."""

    quiet = True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if not self.quiet:
            super().log_request(code, size)


def _make_server(simulator: Simulator, host: str, port: int, quiet: bool) -> BaseWSGIServer:
    handler = type("_SimulatorRequestHandler", (_RequestHandler,), {"quiet": quiet})
    return make_server(host, port, simulator, threaded=True, request_handler=handler)


class SimulatorServer:
    """A loopback server running the simulator in a daemon thread; stops on ``shutdown()``/exit."""

    def __init__(self, simulator: Simulator, *, host: str = "127.0.0.1", port: int = 0, quiet: bool = True) -> None:
        self.simulator = simulator
        self._server = _make_server(simulator, host, port, quiet)
        self.host = host
        self.port: int = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}" if ":" not in host else f"http://[{host}]:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="claude-simulator", daemon=True
        )
        self._thread.start()

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()


def run_server(
    host: str = "127.0.0.1", port: int = 8765, *, simulator: Simulator | None = None, quiet: bool = False
) -> None:
    """Serve the simulator in the foreground until interrupted (for a CLI or a sidecar process)."""
    _serve_forever(_make_server(simulator or Simulator(), host, port, quiet))


def _serve_forever(server: BaseWSGIServer) -> None:
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flask_claude.simulator [--port N] [--fail 529 --fail-rate 0.2] [--latency 0.5]``."""
    parser = argparse.ArgumentParser(prog="flask_claude.simulator", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-polls", type=int, default=1, help="retrieves before a batch ends")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before response headers")
    parser.add_argument("--fail", type=int, metavar="STATUS", help="answer this error status ...")
    parser.add_argument("--fail-rate", type=float, help="... to this fraction of requests (default: all)")
    parser.add_argument("--quiet", action="store_true", help="do not log each request")
    args = parser.parse_args(argv)
    simulator = Simulator(seed=args.seed, batch_polls_until_done=args.batch_polls)
    if args.latency:
        simulator.latency(args.latency)
    if args.fail:
        simulator.fail(args.fail, rate=args.fail_rate)
    server = _make_server(simulator, args.host, args.port, args.quiet)
    print(f"Anthropic API simulator on http://{args.host}:{server.server_address[1]} (Ctrl+C to stop)", flush=True)
    _serve_forever(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
