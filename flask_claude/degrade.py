"""Degradation responses: what a user sees instead of a 500 when a guard or the upstream says no.

A response body is built only from our own fixed texts (``ClaudeGuardError.public_message``) or
the app's fallback: never from an exception's message, which may carry an upstream message, a
request id or a key.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from flask import Response, current_app, jsonify, make_response, request
from flask.views import View

from . import telemetry
from .context import current_scope
from .errors import ClaudeGuardError, InputTooLarge
from .signals import feature_degraded
from .state import state_for

if TYPE_CHECKING:
    from .context import CallScope
    from .decorators import ViewSpec
    from .extension import ClaudeState

DEGRADED_HEADER = "X-Claude-Degraded"


def public_body(exc: ClaudeGuardError) -> dict[str, str]:
    body = {"error": exc.reason, "message": exc.public_message}
    if isinstance(exc, InputTooLarge):
        # Our own message, built from our own numbers: it tells the caller the limit.
        body["message"] = str(exc)
    return body


def decorate(response: Response, exc: ClaudeGuardError, status: int | None = None) -> Response:
    response.status_code = status or exc.status
    response.headers[DEGRADED_HEADER] = exc.reason
    response.headers.update(exc.headers)
    if exc.retry_after is not None and response.status_code in (429, 503):
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return response


def handle_guard_error(exc: ClaudeGuardError) -> Response:
    """App-wide handler: a guarded call in an undecorated view still degrades instead of a 500."""
    state = state_for(required=False)
    status = state.settings.degraded_status if state is not None and exc.status == 503 else exc.status
    response = decorate(jsonify(public_body(exc)), exc, status)
    if state is not None:
        record_degradation(state, current_scope(), exc, response.status_code)
    return response


def record_degradation(state: ClaudeState, scope: CallScope, exc: ClaudeGuardError, status: int,
                       fallback_error: str | None = None) -> None:
    """One ``feature_degraded`` (or ``limit_exceeded``) event and signal, however the request degraded."""
    fields: dict[str, Any] = {"feature": scope.feature, "route": scope.route, "user": state.events.user(scope.user),
                              "reason": exc.reason, "status": status, "detail": str(exc)[:200]}
    if fallback_error:
        fields["fallback_error"] = fallback_error
    state.events.emit("feature_degraded" if exc.status != 429 else "limit_exceeded", fields, level="WARNING")
    state.rollups.degraded(scope.feature, exc.reason)  # one storage write, on a path that already failed
    feature_degraded.send(state.app, **fields)
    telemetry.degraded(exc.reason, scope.feature)  # on the request's span, when the app traces requests


class ResponseCache:
    """The last good response per (route, arguments, user), per process, bounded and expiring.

    The user is part of the key so a personalised answer is never served to someone else.
    """

    def __init__(self, max_entries: int = 2048) -> None:
        self._entries: OrderedDict[tuple[str, ...], tuple[float, int, list[tuple[str, str]], bytes]] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def put(self, key: tuple[str, ...], response: Response, now: float) -> None:
        headers = [(k, v) for k, v in response.headers.items() if k.lower() in ("content-type",)]
        with self._lock:
            self._entries[key] = (now, response.status_code, headers, response.get_data())
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def get(self, key: tuple[str, ...], now: float, ttl: float) -> Response | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or now - entry[0] > ttl:
            return None
        _, status, headers, body = entry
        return Response(body, status=status, headers=headers)


def _cache_key(scope: CallScope, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, ...]:
    return (scope.route or "", str(scope.user), request_fingerprint(args, kwargs))


def remember(state: ClaudeState, spec: ViewSpec, scope: CallScope, response: Response,
             args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if response.status_code < 300 and not response.is_streamed and not response.direct_passthrough:
        state.response_cache.put(_cache_key(scope, args, kwargs), response, state.clock.monotonic())


def _fallback_response(state: ClaudeState, spec: ViewSpec, scope: CallScope, args: tuple[Any, ...],
                       kwargs: dict[str, Any], exc_reason: str) -> Response | None:
    fallback = spec.fallback
    if fallback is None:
        return None
    # A kill switch turns the AI off, cached AI answers included (it may have been flipped for them).
    if fallback.cache and exc_reason != "feature_disabled":
        cached = state.response_cache.get(_cache_key(scope, args, kwargs), state.clock.monotonic(),
                                          fallback.cache_ttl)
        if cached is not None:
            return cached
    body = fallback.response
    if body is None:
        return None
    if isinstance(body, Response):
        return Response(body.get_data(), status=body.status_code, headers=list(body.headers.items()))
    if callable(body):  # a non-AI path of your own, sync or ``async def``
        return make_response(current_app.ensure_sync(body)(*args, **kwargs))
    if isinstance(body, (dict, list)):
        return jsonify(body)
    return make_response(body)


def degrade(state: ClaudeState, spec: ViewSpec, scope: CallScope, exc: ClaudeGuardError,
            args: tuple[Any, ...], kwargs: dict[str, Any]) -> Response:
    """The feature's fallback (or a short JSON error) with ``X-Claude-Degraded``; logged and signalled.

    Client-caused refusals (400 a request that cannot be sent, 413 input too large, 429 over a limit)
    keep their own status and clear message; everything else answers the fallback with
    ``fallback_to(status=...)``.
    """
    client_side = exc.status in (400, 413, 429)
    response: Response | None = None
    fallback_error: str | None = None
    if not client_side:
        try:
            response = _fallback_response(state, spec, scope, args, kwargs, exc.reason)
        except Exception as error:  # the non-AI path failed too: still no 500 and no traceback
            fallback_error = type(error).__name__
            response = None
    status = exc.status
    if response is not None and spec.fallback is not None and not client_side:
        status = spec.fallback.status
    elif not client_side:
        status = state.settings.degraded_status if exc.status == 503 else exc.status
    if response is None:
        response = jsonify(public_body(exc))
    decorate(response, exc, status)
    record_degradation(state, scope, exc, response.status_code, fallback_error)
    return response


def request_fingerprint(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """What "the same arguments" means for the response cache: URL arguments, query and body."""
    body = request.get_data(cache=True) if request.method in ("POST", "PUT", "PATCH") else b""
    args = tuple(a for a in args if not isinstance(a, View))  # a class-based view's ``self``
    return json.dumps([list(map(str, args)), {k: str(v) for k, v in sorted(kwargs.items())},
                       request.query_string.decode("latin-1"), body.decode("utf-8", "replace")])
