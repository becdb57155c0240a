"""Reading a request's JSON body without a 500, whatever the client sent.

``request.get_json(silent=True)`` is not silent about everything: a body nested a few thousand
levels deep raises ``RecursionError`` from the parser, and a body that parses can still hold a
lone surrogate (``"\\ud800"``), which no UTF-8 encoder (the SDK's included) accepts. Both are the
client's mistake and must answer 400, not 500 with a traceback in the server log.
"""

from __future__ import annotations

from types import CodeType, TracebackType
from typing import Any

from flask import current_app, request
from werkzeug.wrappers.request import Request as _WerkzeugRequest

from .errors import InvalidRequest

# The parser's entry points: an error raised below one of these came from the request body.
_PARSING_CODE: set[CodeType] = {_WerkzeugRequest.get_json.__code__}
_MISSING = object()


def request_json(*, force: bool = False, silent: bool = False) -> Any:
    """The request's JSON body, or ``InvalidRequest`` (400 ``invalid_request``) when it cannot be one.

    Refused: a body that is not ``application/json`` (unless ``force``), not UTF-8 (RFC 8259),
    not JSON, nested deeper than the parser can go, or holding text that cannot be encoded as
    UTF-8 (a lone surrogate). With ``silent=True`` those answer ``None`` instead, as
    ``request.get_json(silent=True)`` means to. The body is parsed once per request and cached.
    """
    if not (force or request.is_json):
        if silent:
            return None
        raise InvalidRequest("the request body is not application/json")
    try:
        return _parsed()
    except InvalidRequest:
        if silent:
            return None
        raise


def _parsed() -> Any:
    cached = getattr(request, "_claude_json", _MISSING)
    if isinstance(cached, InvalidRequest):
        raise cached
    if cached is not _MISSING:
        return cached
    try:
        value = current_app.json.loads(request.get_data(cache=True).decode("utf-8"))
        _check_text(value)
    except (ValueError, RecursionError) as exc:  # UnicodeError is a ValueError
        error = InvalidRequest(f"the request body is not usable JSON: {type(exc).__name__}")
        request._claude_json = error  # type: ignore[attr-defined]
        raise error from None
    request._claude_json = value  # type: ignore[attr-defined]
    return value



def _check_text(value: Any) -> None:
    """Raise ``UnicodeEncodeError`` if any string (key or value) is not encodable as UTF-8.

    Iterative: the parser already bounded the depth, but a walk of our own should not recurse.
    Valid surrogate pairs were joined by the parser, so only lone surrogates fail here.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                item.encode("utf-8")
        elif isinstance(item, dict):
            for key, child in item.items():
                if not key.isascii():
                    key.encode("utf-8")
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def from_request_body(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while Flask/werkzeug parsed the request body (``request.json``,
    ``request.get_json``): then it is the client's malformed body, not the view's bug."""
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code in _PARSING_CODE:
            return True
        tb = tb.tb_next
    return False
