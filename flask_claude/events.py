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
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from loguru import logger

from . import process

# Field order of the ``claude_api_call`` line; documented in docs/reference.md (names follow the
# OpenTelemetry GenAI conventions where one exists, e.g. gen_ai.usage.input_tokens).
CALL_FIELDS = (
    "ts", "event", "request_id", "feature", "route", "user", "model", "requested_model", "fallback_from",
    "input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens",
    "latency_ms", "retries", "stop_reason", "cost_usd", "system_prompt_hash",
)

# Fields whose values flask-claude itself produces (ids, model names, hashes, enums): scrubbing them
# would cost seven regexes per field per line and could only ever find nothing.
_OUR_FIELDS = frozenset({
    "ts", "event", "request_id", "feature", "route", "model", "requested_model", "fallback_from", "stop_reason",
    "system_prompt_hash", "error_type", "batch_id", "from_model", "to_model", "reason", "unit", "policy",
    "user",  # already hashed, or scrubbed by EventLog.user
    "prompt", "response",  # scrubbed by EventLog.content on the text as written: never again on its JSON form
    "budget",  # names built from hashed subjects
})

# ... except the few of them whose values come from the upstream (a response header, an error body).
# The API's ids and enums have a known shape, so these are checked against it (one ``fullmatch``,
# cheaper than scrubbing) and logged as "[invalid]" otherwise: a proxy at CLAUDE_BASE_URL or a
# misbehaving upstream cannot put an email, a key or a log-forging newline into a field every line
# carries and that nobody thinks of as text.
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")  # overloaded_error, end_turn, RemoteProtocolError
_SHAPED: dict[str, re.Pattern[str]] = {
    "request_id": re.compile(r"req_[A-Za-z0-9_]{1,100}"),
    "batch_id": re.compile(r"msgbatch_[A-Za-z0-9_]{1,100}"),
    "stop_reason": _WORD,
    "error_type": _WORD,
    "reason": _WORD,
}
_TRUSTED = _OUR_FIELDS - _SHAPED.keys()  # ours and built here: logged as they are

# Phone numbers: a run of digit groups joined by single separators (space, dot, dash, slash, no-break
# spaces) or parentheses, starting where no word, number, email or amount continues, and ending
# before anything that is not a further group (so "0133." at the end of a sentence is the number
# and its full stop). Whether such a run is a phone, a date, a version or an amount is decided by
# ``_phone_or_not`` below, on the whole run: a run that is kept is kept whole, never re-read in parts.
_SEP = r"[ .\-/\u00a0\u202f]"
_GROUP = r"(?:\(\d{1,5}\)|\d+)"
_PHONE_RUN = re.compile(
    r"(?<![\w@#$€£¥])(?<!\d[.,:/\-])"  # not inside a word, a number (1.2.3, 1,234, 12:30), an email or an amount
    rf"\+?{_GROUP}(?:(?:{_SEP}|(?<=\))|(?=\()){_GROUP})*"
)
_DATE = re.compile(r"\d{4}([\-./])\d{1,2}\1\d{1,2}|\d{1,2}([\-./])\d{1,2}\2\d{2,4}")
_DIGITS = re.compile(r"\d+")


def _phone_or_not(match: re.Match[str]) -> str:
    """``[phone]`` for a run that is a phone number in some national or international format, else the run.

    With a leading ``+``: 8 to 15 digits (E.164). Without: 7 to 15 digits, and not an ISO or
    day-month-year date, not a decimal, version or IPv4 address (dots only, with a one-digit group,
    two groups, or four of 0-255), not thousands (dots only, groups of three), not a range like 2019-2021 (two
    groups are a phone only as 555-0133, 98765 43210, or with a leading trunk 0 or parentheses), and
    a bare run of digits only from 10 digits on.
    """
    run = match.group()
    end = match.end()
    text = match.string
    if text.startswith(":", end) and text[end + 1:end + 2].isdigit():
        # The last group is the hour of a time ("2026-11-30 04:28"): judge the run before it.
        cut = max(run.rfind(c) for c in " .-/\u00a0\u202f")
        return run if cut <= 0 else _phone_or_not_run(run[:cut]) + run[cut:]
    return _phone_or_not_run(run)


def _phone_or_not_run(run: str) -> str:
    groups = _DIGITS.findall(run)
    digits = sum(map(len, groups))
    if run[0] == "+":
        return "[phone]" if 8 <= digits <= 15 else run
    if not 7 <= digits <= 15 or _DATE.fullmatch(run):
        return run
    if len(groups) == 1:
        return "[phone]" if digits >= 10 else run
    separators = {c for c in run if not c.isdigit()}
    if separators == {"."} and (len(groups) == 2 or any(len(g) < 2 for g in groups[1:])
                                or all(len(g) == 3 for g in groups[1:])
                                or (len(groups) == 4 and all(len(g) <= 3 and int(g) <= 255 for g in groups))):
        return run
    if len(groups) == 2 and "(" not in run and not groups[0].startswith("0") \
            and (len(groups[0]), len(groups[1])) not in ((3, 4), (5, 5)):
        return run
    return "[phone]"


# Each scrubber with the text it cannot match without (looked up in the lower-cased text, or "0-9"
# for a digit): a pattern whose hint is absent is skipped, so plain prose costs a few substring
# checks instead of seven regex passes.
_SCRUBBERS: tuple[tuple[tuple[str, ...], re.Pattern[str], Any], ...] = (
    (("sk-",), re.compile(r"sk-ant-[A-Za-z0-9_\-]{8,}"), "[api-key]"),
    (("sk-",), re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"), "[api-key]"),
    # A token or value does not end in a full stop, comma or bracket: the sentence around it keeps them.
    (("bearer",), re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=\-]{7,}[A-Za-z0-9_~+/=\-]"), r"\1 [token]"),
    (("key", "authorization"),
     re.compile(r"(?i)\b(x-api-key|api[_-]?key|authorization)(\"?\s*[:=]\s*\"?)"
                r"(?:(?:basic|bearer|digest|token|negotiate)\s+)?[^\s\",}]{5,}[^\s\",};:.!?)>\]]"), r"\1\2[secret]"),
    # Emails, Unicode letters included (josé@example.fr, 用户@例子.广告, user@xn--bcher-kva.de); the
    # lookbehind starts a match only at the start of a run, so a long word without "@" is read once.
    (("@",), re.compile(r"(?<![\w.%+\-])[\w.%+\-]+(?:'[\w.%+\-]+)*@"
                        r"[\w\-]+(?:\.[\w\-]+)*\.(?:[^\W\d_]{2,}|xn--[\w\-]+)"), "[email]"),
    (("0-9",), re.compile(r"\b(?:\d[ \-]?){12,18}\d\b"), "[card]"),
    (("0-9",), _PHONE_RUN, _phone_or_not),
)
_ANY_DIGIT = re.compile(r"\d")


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove API keys, bearer tokens, emails, card and phone numbers from ``text``.

    Give it the text as written, not JSON-encoded: in JSON a newline is the two characters ``\\n``
    (so the number after it looks like the tail of a word) and "é" is ``\\u00e9``.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[api-key]")
    folded = text.lower()
    digits = _ANY_DIGIT.search(text) is not None
    for hints, pattern, replacement in _SCRUBBERS:
        if digits if hints[0] == "0-9" else any(hint in folded for hint in hints):
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


def _scrub_content(value: Any, secrets: tuple[str, ...]) -> Any:
    """Like ``_scrub_value``, for request content: SDK objects (a ``TextBlock`` passed back as history)
    are dumped first, anything else is scrubbed as its ``str``, so no text reaches ``json.dumps`` unread."""
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, Mapping):
        return {k: _scrub_content(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub_content(v, secrets) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _scrub_content(dump(), secrets)
    return scrub(str(value), secrets)


def hash_text(text: str, *, salt: str = "") -> str:
    """A short stable digest: joins log lines about the same user or prompt without storing either."""
    return hashlib.sha256((salt + text).encode("utf-8", "surrogatepass")).hexdigest()[:16]


_PLAIN = frozenset({int, float, bool, type(None)})
# Built once: json.dumps with options builds an encoder per call. Compact, like orjson's lines.
_encode = json.JSONEncoder(default=str, ensure_ascii=False, separators=(",", ":")).encode
# orjson encodes a call's line several times faster than the standard encoder (bench/log_line.py,
# bench/RESULTS.md). Types it has its own form for (dataclasses, datetimes,
# subclasses) are passed to ``str`` as the standard encoder's ``default`` would.
_ORJSON_OPTIONS = (orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE | orjson.OPT_PASSTHROUGH_DATACLASS
                   | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS)


def _line(record: Mapping[str, Any]) -> bytes:
    """One JSON line, UTF-8. orjson refuses a lone surrogate or an integer past 64 bits: such a line
    is made by the standard encoder, the surrogate escaped, so the line is never lost."""
    try:
        return orjson.dumps(record, default=str, option=_ORJSON_OPTIONS)
    except (TypeError, orjson.JSONEncodeError):
        return (_encode(record) + "\n").encode("utf-8", "backslashreplace")


_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def _timestamp() -> str:
    """``datetime.now(UTC).isoformat(timespec="milliseconds")``, formatting the date part once a second."""
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second[1] = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S.%%03d+00:00")
        _second[0] = whole
    return _second[1] % ((now - whole) * 1000)  # type: ignore[no-any-return]  # %d truncates, as int() did


class _FileWriter:
    """Appends whole lines with one ``os.write`` each, so processes sharing a file never interleave."""

    def __init__(self, path: str) -> None:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.path = path
        self._fd: int | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._fd is None or self._pid != process.pid():
                # Reopen after a fork so each worker has its own descriptor.
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                self._pid = process.pid()
            os.write(self._fd, data)


_writers: dict[str, Callable[[bytes], None]] = {}  # destination -> its writer, shared by every EventLog there
_writers_lock = threading.Lock()


def _stderr(data: bytes) -> None:
    sys.stderr.write(data.decode("utf-8", "replace"))
    sys.stderr.flush()


def _writer(destination: str) -> Callable[[bytes], None]:
    """Our JSON line goes to its file with one ``os.write``, not through a loguru sink.

    Measured on the request path (bench/ablate_overhead.py), a loguru sink's formatting and dispatch
    cost more than the line itself, and a sink is a handler the library would add to the app's
    logger. The event still reaches loguru (``EventLog.emit``), fields flat in ``extra``, for every
    sink the app adds; with none, loguru returns at once.
    """
    with _writers_lock:
        write = _writers.get(destination)
        if write is None:
            write = _writers[destination] = _stderr if destination == "-" else _FileWriter(destination).write
        return write


class _Route(str):
    """``extra["claude_sink"]``: marks a record as a flask-claude event (its destination), carrying the
    event's own fields for ``claude_fields``.

    The fields are also bound flat in ``extra`` for the app's sinks, mixed there with whatever the app
    bound or contextualized itself; ``claude_fields`` gives exactly ours, in our order, without a
    second copy in ``extra`` that every ``serialize=True`` sink would print. As a ``str`` it
    serializes as the destination alone.
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
        self._write = _writer(self.destination)
        self._users: dict[str, str] = {}  # user key -> as logged

    def user(self, key: str | None) -> str | None:
        if key is None:
            return None
        key = str(key)
        shown = self._users.get(key)
        if shown is None:  # a sha256 or seven scrubbers per line otherwise, for the same few active users
            if len(self._users) >= 10_000:
                self._users.clear()
            shown = self._users[key] = hash_text(key, salt=self.salt) if self.hash_users else scrub(key, self.secrets)
        return shown

    def content(self, value: Any) -> str | None:
        """Prompt or reply, only when the app opted in with ``CLAUDE_LOG_CONTENT``, scrubbed.

        A string is scrubbed as is; anything else (a call's ``messages``) is scrubbed string by
        string, then JSON-encoded: scrubbing must read the text as written, never its JSON form.
        """
        if not self.log_content or value is None:
            return None
        if isinstance(value, str):
            return scrub(value, self.secrets)
        return json.dumps(_scrub_content(value, self.secrets), default=str)

    def emit(self, event: str, fields: Mapping[str, Any], *, level: str = "INFO") -> dict[str, Any]:
        ts = _timestamp()
        record: dict[str, Any] = {"ts": ts, "event": event}
        record.update(fields)
        record["ts"], record["event"] = ts, event  # never a field's: ours, first in the line
        secrets = self.secrets
        # Only the fields that may need work are looked at: ours that carry no upstream text need none.
        for key in fields.keys() - _TRUSTED:
            value = record[key]
            kind = type(value)
            if kind in _PLAIN:
                continue  # numbers and None need no scrubbing
            shape = _SHAPED.get(key)
            if shape is not None:
                if kind is str and shape.fullmatch(value) is None:
                    record[key] = "[invalid]"
            elif isinstance(value, (str, Mapping, list, tuple)):
                record[key] = _scrub_value(value, secrets)
        try:
            self._write(_line(record))
        except OSError:
            pass  # a full disk or a closed stderr must not fail the request; loguru's sinks still get it
        core = getattr(logger, "_core", None)
        if core is not None and not getattr(core, "handlers", True):
            return record  # loguru has no sink at all (the app removed its default one): nothing to hand over
        route = _Route(self.destination)
        route.fields = record
        # The message is the fixed event name: untrusted text is bound, never formatted. The fields go
        # in as ``log`` keyword arguments (loguru puts them in ``extra``), not through ``bind``.
        logger.log(level, event, **record, claude_sink=route)
        return record
