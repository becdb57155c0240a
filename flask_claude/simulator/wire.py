"""The Messages API's wire shapes: JSON bodies, SSE events, error bodies and request validation.

Everything here is a pure function of its arguments (no simulator state), so what the SDK parses
is defined in one place and the rest of the simulator deals in Python objects.
"""

from __future__ import annotations

import http
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .accounting import Usage

ERROR_TYPES = {
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

DEFAULT_MESSAGES = {
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

#: The transport passes the client's read timeout in the WSGI environ under this key, so that waits
#: longer than it fail as they would on a socket. Absent in server mode, where sockets do it.
READ_TIMEOUT_KEY = "flask_claude.simulator.read_timeout"


class ConnectionDropped(ConnectionAbortedError):
    """Raised from a body iterator to cut the connection.

    A ``ConnectionError`` because werkzeug's server treats those as a vanished peer: it stops
    writing without the closing chunk and without logging a traceback, which is exactly a dropped
    connection as the client sees it. The transport turns it into ``httpx2.RemoteProtocolError``.
    """


class ReadTimedOut(Exception):
    """Raised when an in-process response stalls longer than the client's read timeout."""


class InvalidRequest(Exception):
    """A request the real API answers with 400 ``invalid_request_error``; the message is the API's."""


class NotFound(Exception):
    """A path or object the real API answers with 404 ``not_found_error``."""


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: Iterable[bytes]


@dataclass
class Reply:
    """One assistant reply, before it is cut into a JSON body or an SSE stream."""

    message_id: str
    model: str
    text: str
    stop_reason: str
    stop_sequence: str | None
    usage: Usage

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


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"


def rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat().replace("+00:00", "Z")


def status_line(status: int) -> str:
    if status == 529:
        return "529 Overloaded"
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


def split(data: bytes, pieces: int) -> list[bytes]:
    size = max(1, math.ceil(len(data) / max(1, pieces)))
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def headers(request_id: str, content_type: str, data: bytes | None = None) -> list[tuple[str, str]]:
    """The API's response headers; with ``data`` (a body known in full) its ``content-length`` too."""
    found = [("content-type", content_type), ("request-id", request_id)]
    if data is not None:
        found.append(("content-length", str(len(data))))
    return found


def error_response(
    status: int, error_type: str, message: str, request_id: str, extra_headers: Sequence[tuple[str, str]] = ()
) -> Response:
    """The API's error body; never trickled or delayed beyond the headers, as the API's are not."""
    payload = {"type": "error", "error": {"type": error_type, "message": message}, "request_id": request_id}
    data = json_bytes(payload)
    return Response(status, [*headers(request_id, "application/json", data), *extra_headers], [data])


def deltas(text: str, words_per_delta: int = 3) -> list[str]:
    """Cut the reply into text deltas of a few words each, whitespace kept, so they rejoin exactly."""
    words = re.findall(r"\s*\S+\s*", text)
    if "".join(words) != text:
        words = [text] if text else []
    return ["".join(words[i : i + words_per_delta]) for i in range(0, len(words), words_per_delta)]


def stream_events(reply: Reply, *, cut_after: int | None = None, ending: str = "complete",
                  error: tuple[str, str] | None = None) -> list[bytes]:
    """The SSE sequence the SDK's ``MessageStream`` accumulates.

    ``cut_after`` stops after that many text deltas; ``ending`` is how the stream then ends:
    ``"complete"`` (block stop, message delta, message stop), ``"error"`` (an ``event: error`` with
    ``error`` = (type, message)) or ``"short"`` (nothing more: a body that just ends).
    """
    start_message = {
        **reply.message_json(),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": reply.usage.as_json(output_tokens=1),
    }
    block_start = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    events = [  # the API's order, ping included: clients must skip events they do not know
        sse("message_start", {"type": "message_start", "message": start_message}),
        sse("ping", {"type": "ping"}),
        sse("content_block_start", block_start),
    ]
    for piece in deltas(reply.text)[:cut_after]:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}
        events.append(sse("content_block_delta", delta))
    if ending == "error":
        error_type, message = error or ("api_error", "Internal server error")
        events.append(sse("error", {"type": "error", "error": {"type": error_type, "message": message}}))
    elif ending == "complete":
        stop = {"stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence}
        events += [
            sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse("message_delta", {"type": "message_delta", "delta": stop, "usage": reply.usage.delta_json()}),
            sse("message_stop", {"type": "message_stop"}),
        ]
    return events


# --- request validation: refuse what the real API refuses most often, so 400 handling gets exercised


def validate_create(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    for name in ("model", "messages", "max_tokens"):
        if name not in body:
            raise InvalidRequest(f"{name}: Field required")
    if not isinstance(body["model"], str) or not body["model"]:
        raise InvalidRequest("model: Input should be a non-empty string")
    max_tokens = body["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequest("max_tokens: Input should be an integer greater than or equal to 1")
    _validate_messages(body["messages"])
    return body


def validate_count(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    for name in ("model", "messages"):
        if name not in body:
            raise InvalidRequest(f"{name}: Field required")
    _validate_messages(body["messages"])
    return body


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: at least one message is required")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise InvalidRequest(f"messages.{index}.role: Input should be 'user' or 'assistant'")
        if not isinstance(message.get("content"), (str, list)):
            raise InvalidRequest(f"messages.{index}.content: Field required")
