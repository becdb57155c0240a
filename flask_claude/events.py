"""Log events: one flat JSON object per line through loguru, with secrets and PII scrubbed.

Each event is a loguru record in the loguru idiom: the event name as the message and every field
bound flat in ``record["extra"]`` (``extra["event"]``, ``extra["feature"]``, ``extra["cost_usd"]``...),
so an app's own sinks, filters and formatters read them like any bound field. Operators grep and
``jq`` our own lines at 3 AM, so our sink writes the event's fields at the top level of one JSON
object instead of loguru's ``{"text", "record": {...}}`` envelope. The library
never touches loguru on import: ``Claude.init_app`` adds one sink per destination (the app opting
in), and a file destination is written with one ``O_APPEND`` ``write()`` per line so several
gunicorn workers can share it without interleaving lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from loguru import logger

# Field order of the ``claude_api_call`` line; documented in README.md (names follow the
# OpenTelemetry GenAI conventions where one exists, e.g. gen_ai.usage.input_tokens).
CALL_FIELDS = (
    "ts", "event", "request_id", "feature", "route", "user", "model", "requested_model", "fallback_from",
    "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
    "latency_ms", "retries", "stop_reason", "cost_usd", "system_prompt_hash",
)
ERROR_FIELDS = (*CALL_FIELDS, "error_type", "status_code")

# Fields whose values flask-claude itself produces (ids, model names, hashes, enums): scrubbing them
# would cost seven regexes per field per line and could only ever find nothing.
_OUR_FIELDS = frozenset({
    "ts", "event", "request_id", "feature", "route", "model", "requested_model", "fallback_from", "stop_reason",
    "system_prompt_hash", "error_type", "batch_id", "from_model", "to_model", "reason", "unit", "policy",
    "user",  # already hashed, or scrubbed by EventLog.user
    "budget",  # names built from hashed subjects
})

_SCRUBBERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}"), "[api-key]"),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"), "[api-key]"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=\-]{8,}"), r"\1 [token]"),
    (re.compile(r"(?i)\b(x-api-key|api[_-]?key|authorization)(\"?\s*[:=]\s*\"?)[^\s\",}]{6,}"), r"\1\2[secret]"),
    (re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"), "[email]"),
    (re.compile(r"\b(?:\d[ \-]?){12,18}\d\b"), "[card]"),
    (re.compile(r"(?<![\w.])\+?\d{1,3}[ .\-]?\(?\d{2,4}\)?[ .\-]?\d{3,4}[ .\-]?\d{3,4}(?![\w.])"), "[phone]"),
)


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove API keys, bearer tokens, emails, card and phone numbers from ``text``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[api-key]")
    for pattern, replacement in _SCRUBBERS:
        text = pattern.sub(replacement, text)
    return text


def _scrub_value(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, Mapping):
        return {k: _scrub_value(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub_value(v, secrets) for v in value]
    return value


def hash_text(text: str, *, salt: str = "") -> str:
    """A short stable digest: joins log lines about the same user or prompt without storing either."""
    return hashlib.sha256((salt + text).encode("utf-8", "surrogatepass")).hexdigest()[:16]


class _FileWriter:
    """Appends whole lines with one ``os.write`` each, so processes sharing a file never interleave."""

    def __init__(self, path: str) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.path = path
        self._fd: int | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        data = line.encode("utf-8")
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                # Reopen after a fork so each worker has its own descriptor.
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                self._pid = os.getpid()
            os.write(self._fd, data)


_sinks: dict[str, list[int]] = {}  # destination -> [loguru handler id, number of EventLogs using it]
_sinks_lock = threading.Lock()


_released: list[str] = []  # destinations whose EventLog was collected, handled at the next install


def _release_sink(destination: str) -> None:
    """Called by the garbage collector, at any point of any thread: so only note it, take no lock."""
    _released.append(destination)


def _drain_released() -> None:
    """Remove handlers no app uses any more, so they do not pile up (called with ``_sinks_lock`` held)."""
    while _released:
        destination = _released.pop()
        entry = _sinks.get(destination)
        if entry is None:
            continue
        entry[1] -= 1
        if entry[1] <= 0:
            del _sinks[destination]
            logger.remove(entry[0])


def _install_sink(destination: str) -> None:
    """One loguru sink per destination, shared by every app that logs there (no duplicate lines)."""
    with _sinks_lock:
        _drain_released()
        if destination in _sinks:
            _sinks[destination][1] += 1
            return
        write: Callable[[str], Any]
        if destination == "-":
            def write(line: str) -> None:
                sys.stderr.write(line)
                sys.stderr.flush()
        else:
            write = _FileWriter(destination).write

        def sink(message: Any) -> None:
            fields = message.record["extra"]["claude_sink"].fields
            write(json.dumps(fields, default=str, ensure_ascii=False) + "\n")

        def only_ours(record: Mapping[str, Any]) -> bool:
            return record["extra"].get("claude_sink") == destination

        _sinks[destination] = [logger.add(sink, level="INFO", format="{message}", filter=only_ours, catch=True), 1]


class _Route(str):
    """``extra["claude_sink"]``: the destination our sink filters on, carrying the event's own fields.

    The fields are also bound flat in ``extra`` for the app's sinks, mixed there with whatever the app
    bound or contextualized itself; our line must hold exactly ours, in our order, without a second
    copy in ``extra`` that every ``serialize=True`` sink would print. As a ``str`` it serializes as
    the destination alone.
    """

    __slots__ = ("fields",)
    fields: dict[str, Any]


def claude_fields(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The fields of a flask-claude event (our JSON line's object), or None for any other loguru record."""
    route = record["extra"].get("claude_sink")
    return route.fields if isinstance(route, _Route) else None


class EventLog:
    """Writes this app's events; the app's secrets are known here so they never reach a line."""

    def __init__(self, *, path: str | None, secrets: tuple[str, ...], hash_users: bool,
                 log_content: bool, salt: str) -> None:
        self.destination = path or "-"
        self.secrets = tuple(s for s in secrets if s)
        self.hash_users = hash_users
        self.log_content = log_content
        self.salt = salt
        _install_sink(self.destination)
        weakref.finalize(self, _release_sink, self.destination)

    def user(self, key: str | None) -> str | None:
        if key is None:
            return None
        return hash_text(str(key), salt=self.salt) if self.hash_users else scrub(str(key), self.secrets)

    def content(self, text: str | None) -> str | None:
        """Prompt or reply text, only when the app opted in with ``CLAUDE_LOG_CONTENT``, scrubbed."""
        if not self.log_content or text is None:
            return None
        return scrub(text, self.secrets)

    def emit(self, event: str, fields: Mapping[str, Any], *, level: str = "INFO") -> dict[str, Any]:
        record: dict[str, Any] = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                                  "event": event}
        for key, value in fields.items():
            if key in record:
                continue
            if key not in _OUR_FIELDS and isinstance(value, (str, Mapping, list, tuple)):
                value = _scrub_value(value, self.secrets)  # numbers and None need no scrubbing
            record[key] = value
        route = _Route(self.destination)
        route.fields = record
        # The message is the fixed event name: untrusted text is bound, never formatted.
        logger.bind(**record, claude_sink=route).log(level, event)
        return record
