"""The simulated API itself: one WSGI application holding the fault script, prompt cache, batches
and a log of the requests it received."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment

from werkzeug.wrappers import Request

from ..clock import Clock, SystemClock
from .accounting import PromptCache, output_tokens, prompt_tokens
from .batches import BatchStore, is_batch_path
from .faults import Endpoint, Fault, FaultScript, Shaping
from .ratelimit import RateLimit, RateLimiter
from .replies import ReplyRules, cut_reply, last_user_text, natural_text
from .server import SimulatorServer, make_loopback_server, serve_forever
from .transport import SimulatorTransport
from .wire import (
    READ_TIMEOUT_KEY,
    ConnectionDropped,
    InvalidRequest,
    NotFound,
    ReadTimedOut,
    Reply,
    Response,
    error_response,
    headers,
    json_bytes,
    split,
    status_line,
    stream_events,
    validate_count,
    validate_create,
)

#: Credentials never leave the simulator: these headers are masked in recorded requests.
_SECRET_HEADERS = frozenset({"x-api-key", "authorization", "proxy-authorization", "cookie"})
_MASK = "[redacted]"

_STREAM_ENDINGS = {"stream_error": "error", "drop_stream": "short", "end_stream": "short"}


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


class Simulator(FaultScript, ReplyRules):
    """The simulated API: a WSGI app plus a thread-safe script of faults, reply rules and a request log.

    One instance holds all state (faults, replies, prompt cache, batches, requests), so a test can
    script a failure, drive the code under test and then inspect exactly what reached the "API".
    Every time it reads or waits goes through ``clock`` (a :class:`flask_claude.clock.Clock`).
    """

    def __init__(self, *, seed: int = 0, batch_polls_until_done: int = 1, clock: Clock | None = None) -> None:
        if batch_polls_until_done < 0:
            raise ValueError("batch_polls_until_done must be >= 0")
        FaultScript.__init__(self)
        ReplyRules.__init__(self)
        self.seed = seed
        self.batch_polls_until_done = batch_polls_until_done
        self.clock: Clock = clock if clock is not None else SystemClock()
        self._lock = threading.RLock()
        self._requests: list[RecordedRequest] = []
        self._cache = PromptCache(self.clock)
        self._batches = BatchStore(self.clock, self._run_batch_request, self._new_id)
        self._counter = 0
        self._limiter = RateLimiter(self.clock)

    def rate_limit(self, *, requests: int | None = None, input_tokens: int | None = None,
                   output_tokens: int | None = None, window: float = 60.0, model: str | None = None) -> RateLimit:
        """Limit requests and tokens per ``window`` seconds (per model; ``model=None``: every model,
        each its own bucket), answering ``anthropic-ratelimit-*`` headers and 429s as the API does."""
        return self._limiter.add(RateLimit(requests, input_tokens, output_tokens, window, model))

    def clear_rate_limits(self) -> None:
        self._limiter.clear()

    def reset(self) -> None:
        """Back to a fresh simulator: no faults, requests, cache entries or batches, ids restart.

        Reply rules stay: like the seed they are set-up, often the app's own (``clear_replies()``).
        Each part is cleared under its own lock, never nested: ending a batch takes the batch lock,
        then this one for an id, so holding this one while clearing batches could deadlock.
        """
        self.clear_faults()
        self._cache.clear()
        self._batches.clear()
        with self._lock:
            self._requests.clear()
            self._counter = 0

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

    def transport(self) -> SimulatorTransport[Simulator]:
        """An httpx2 transport (sync and async) that calls this simulator in-process."""
        return SimulatorTransport(self)

    def serve(self, host: str = "127.0.0.1", port: int = 0, *, quiet: bool = True) -> SimulatorServer[Simulator]:
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
        except ReadTimedOut:
            raise
        except Exception:  # a bug here must still look like the API, not an HTML page
            response = error_response(500, "api_error", "Internal server error", request_id)
        start_response(status_line(response.status), response.headers)
        return response.body

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, request: Request, request_id: str) -> Response:
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
        elif is_batch_path(path):
            endpoint = "batches"
        else:
            return error_response(404, "not_found_error", f"Not found: {method} {path}", request_id)

        # Validation comes before the fault script, so a scripted fault is only used by a request
        # that would otherwise have succeeded.
        if malformed or (body is None and method == "POST" and endpoint != "batches"):
            return error_response(400, "invalid_request_error", "Request body is not valid JSON", request_id)
        try:
            if endpoint == "messages":
                validate_create(body)
            elif endpoint == "count_tokens":
                validate_count(body)
        except InvalidRequest as exc:
            return error_response(400, "invalid_request_error", str(exc), request_id)

        streaming = endpoint == "messages" and body.get("stream") is True
        fault = None if endpoint == "messages" else self._take_fault(endpoint, model, streaming)
        if fault is not None and fault.kind == "status":
            return error_response(fault.status, fault.error_type, fault.message, request_id, fault.retry_headers())

        if endpoint == "messages":
            # Limits are checked at the edge, before the fault script (a refused call meets no fault).
            admitted, limit_headers = self._limiter.admit(model, prompt_tokens(body), body["max_tokens"])
            if not admitted:
                return error_response(429, "rate_limit_error", "This request would exceed your rate limit.",
                                      request_id, limit_headers)
            fault = self._take_fault(endpoint, model, streaming)
            if fault is not None and fault.kind == "status":
                return error_response(fault.status, fault.error_type, fault.message, request_id,
                                      [*fault.retry_headers(), *limit_headers])
            reply = self._reply(body, truncate=fault is not None and fault.kind == "truncate")
            if limit_headers:
                limit_headers = self._limiter.give_back(model, body["max_tokens"] - reply.usage.output_tokens)
            if streaming:
                return self._with(self._stream_response(environ, reply, fault, request_id, shaping), limit_headers)
            return self._with(self._json(reply.message_json(), request_id, environ, shaping), limit_headers)
        if endpoint == "count_tokens":
            tokens = prompt_tokens(body) + self._pad_for(body.get("model"))
            return self._json({"input_tokens": tokens}, request_id, environ, shaping)
        try:
            answer = self._batches.handle(method, path, body, request.args, request.url_root,
                                          self.batch_polls_until_done)
        except InvalidRequest as exc:
            return error_response(400, "invalid_request_error", str(exc), request_id)
        except NotFound as exc:
            return error_response(404, "not_found_error", str(exc), request_id)
        if isinstance(answer, bytes):  # the results file, JSON lines
            return Response(200, headers(request_id, "application/binary", answer),
                            self._body(environ, [answer], shaping, drop=False))
        return self._json(answer, request_id, environ, shaping)

    def _record(self, request: Request, model: str | None, body: Any) -> None:
        recorded_headers = {k.lower(): (_MASK if k.lower() in _SECRET_HEADERS else v)
                            for k, v in request.headers.items()}
        recorded = RecordedRequest(
            method=request.method.upper(),
            path=request.path,
            query=dict(request.args.items()),
            model=model,
            body=body,
            headers=recorded_headers,
            timestamp=self.clock.time(),
        )
        with self._lock:
            self._requests.append(recorded)

    def _pause(self, environ: WSGIEnvironment, seconds: float) -> None:
        """Sleep like a network stall; in-process, stalls beyond the read timeout fail as on a socket."""
        limit = environ.get(READ_TIMEOUT_KEY)
        if limit is not None and seconds > limit:
            self.clock.sleep(limit)
            raise ReadTimedOut
        self.clock.sleep(seconds)

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            counter = self._counter
        # The pid keeps ids unique across workers that each run a simulator with the same seed.
        return prefix + hashlib.sha256(f"{self.seed}:{os.getpid()}:{prefix}:{counter}".encode()).hexdigest()[:24]

    # ------------------------------------------------------------------ replies

    def _reply(self, body: dict[str, Any], *, truncate: bool, service_tier: str = "standard") -> Reply:
        user = last_user_text(body["messages"])
        scripted = None if user.startswith("echo:") else self._scripted_text(body, user)
        text = natural_text(self.seed, user) if scripted is None else scripted
        text, stop_reason, stop_sequence = cut_reply(text, body["max_tokens"], body.get("stop_sequences") or [],
                                                     truncate=truncate)
        usage = self._cache.usage(body, output_tokens(text), service_tier)
        usage.input_tokens += self._pad_for(body.get("model"))
        return Reply(self._new_id("msg_sim_"), body["model"], text, stop_reason, stop_sequence, usage)

    def _run_batch_request(self, params: dict[str, Any]) -> dict[str, Any]:
        validate_create(params)
        if params.get("stream"):
            raise InvalidRequest("stream: streaming is not supported in batches")
        return self._reply(params, truncate=False, service_tier="batch").message_json()

    # ------------------------------------------------------------------ responses

    def _json(self, payload: Any, request_id: str, environ: WSGIEnvironment, shaping: Shaping) -> Response:
        data = json_bytes(payload)
        return Response(200, headers(request_id, "application/json", data),
                        self._body(environ, [data], shaping, drop=False))

    @staticmethod
    def _with(response: Response, extra: list[tuple[str, str]]) -> Response:
        response.headers.extend(extra)
        return response

    def _stream_response(
        self, environ: WSGIEnvironment, reply: Reply, fault: Fault | None, request_id: str, shaping: Shaping
    ) -> Response:
        """The reply as SSE, with a scripted stream failure cut in after ``after_deltas`` deltas."""
        ending = _STREAM_ENDINGS.get(fault.kind) if fault is not None else None
        if fault is not None and ending is not None:
            events = stream_events(reply, cut_after=fault.after_deltas, ending=ending,
                                   error=(fault.error_type, fault.message))
        else:
            events = stream_events(reply)
        response_headers = headers(request_id, "text/event-stream; charset=utf-8")
        response_headers.append(("cache-control", "no-cache"))
        drop = fault is not None and fault.kind == "drop_stream"
        return Response(200, response_headers, self._body(environ, events, shaping, drop=drop))

    def _body(self, environ: WSGIEnvironment, pieces: list[bytes], shaping: Shaping, *, drop: bool) -> Iterator[bytes]:
        """Yield the body lazily, trickled if asked, and cut the connection at the end if asked."""
        if shaping.trickle_delay:
            pieces = split(b"".join(pieces), shaping.trickle_chunks)
        for index, piece in enumerate(pieces):
            if index and shaping.trickle_delay:
                self._pause(environ, shaping.trickle_delay)
            yield piece
        if drop:
            raise ConnectionDropped("simulated dropped connection")


def run_server(
    host: str = "127.0.0.1", port: int = 8765, *, simulator: Simulator | None = None, quiet: bool = False,
    ready: Callable[[str], object] | None = None,
) -> None:
    """Serve the simulator in the foreground until interrupted (for a CLI or a sidecar process).

    ``ready`` is called with the server's URL once its socket is bound (``port=0`` picks a free port).
    """
    server = make_loopback_server(simulator or Simulator(), host, port, quiet)
    if ready is not None:
        ready(f"http://{host}:{server.server_address[1]}")
    serve_forever(server)
