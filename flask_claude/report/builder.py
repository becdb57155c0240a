"""Reading the JSON log: ``--since``, tolerant numbers, and the one-pass aggregator (see ``report``)."""

from __future__ import annotations

import json
import math
import re
from array import array
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from .results import Latency, Report, Spender, Stats

#: ``--by`` values: the log field each one groups on.
GROUPINGS = ("feature", "model", "user", "route")

CALL_EVENTS = frozenset({"claude_api_call", "claude_api_error"})
DEGRADED_EVENTS = frozenset({"feature_degraded", "limit_exceeded"})

NANO = 1_000_000_000  # cost_usd is summed in integer nano-dollars
NONE_LABEL = "(none)"  # the group of calls made outside any @ai_feature / route / user

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


# --- --since ------------------------------------------------------------------------------------


def parse_since(value: str | None, *, now: datetime | None = None, tz: tzinfo = UTC) -> datetime | None:
    """``30m``, ``24h``, ``7d``, ``today``, an ISO date or datetime -> an aware datetime; ``all`` -> None.

    A date or datetime without an offset is read in ``tz`` (the app's budget time zone from the
    CLI), so ``--since 2026-11-22`` and ``--since today`` mean the same calendar day as the budget.
    """
    if value is None:
        return None
    text = value.strip()
    now = now or datetime.now(UTC)
    if text.lower() in ("", "all"):
        return None
    if text.lower() == "today":
        local = now.astimezone(tz)
        return local.replace(hour=0, minute=0, second=0, microsecond=0)
    match = _RELATIVE.match(text)
    if match:
        amount, unit = float(match.group(1)), match.group(2).lower()
        return now - timedelta(**{_UNITS[unit]: amount})
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{value!r} is not a duration (30m, 24h, 7d), 'today', 'all' or an ISO date/datetime "
                         "such as 2026-11-22 or 2026-11-22T08:00+00:00") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=tz)


def _parse_ts(raw: Any) -> datetime | None:
    if not isinstance(raw, str):
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# --- numbers from untrusted lines ------------------------------------------------------------------


def _int(value: Any) -> int:
    """A token count, or 0: a hand-edited or foreign line must not crash or poison the totals."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return 0


def _nano(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0
    return round(value * NANO)


def _latency(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _label(value: Any) -> str:
    return NONE_LABEL if value is None or value == "" else str(value)


# --- the streaming aggregator -----------------------------------------------------------------------


class _Acc:
    """Running sums of one group; only the latencies grow with the number of calls (8 bytes each)."""

    __slots__ = ("cache_creation", "cache_read", "calls", "degraded", "errors", "failed_over", "fallback_calls",
                 "input", "latencies", "output", "spend")

    def __init__(self) -> None:
        self.calls = self.errors = self.spend = self.input = self.output = 0
        self.cache_read = self.cache_creation = self.fallback_calls = self.degraded = self.failed_over = 0
        self.latencies = array("d")

    def stats(self, latencies: array[float] | None = None) -> Stats:
        # A call that failed over is one of this model's calls, and a failed one.
        return Stats(calls=self.calls + self.failed_over, errors=self.errors + self.failed_over,
                     spend_usd=self.spend / NANO, input_tokens=self.input,
                     output_tokens=self.output, cache_read_input_tokens=self.cache_read,
                     cache_creation_input_tokens=self.cache_creation,
                     latency=_percentiles(self.latencies if latencies is None else latencies),
                     fallback_calls=self.fallback_calls, degraded=self.degraded, failed_over=self.failed_over)


def _percentiles(values: array[float]) -> Latency:
    n = len(values)
    if not n:
        return Latency(0, None, None, None)
    ordered = sorted(values)  # the transient peak: one list of floats the size of this group

    def at(q: float) -> float:
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo), 3)

    return Latency(n, at(0.50), at(0.95), at(0.99))


def _key(value: Any) -> str:
    """A group key: the field itself when it is the usual non-empty string (the fast path)."""
    return value if type(value) is str and value else _label(value)


_decode = json.JSONDecoder().decode
_MAX_COST = 1e12  # also rejects NaN and infinities, which fail every comparison


class ReportBuilder:
    """Feed it lines (``feed``) in any number of chunks, then ``result()``; holds counters, not records.

    Each call line updates only its group; the totals are the sum of the groups, taken at the end,
    so the hot path does half the work. The type checks use ``type(x) is int`` fast paths with the
    tolerant ``_int``/``_nano``/``_latency`` as the fallback for odd lines.
    """

    def __init__(self, *, since: datetime | None = None, by: str = "feature", top: int = 5) -> None:
        if by not in GROUPINGS:
            raise ValueError(f"by must be one of {', '.join(GROUPINGS)}, got {by!r}")
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        self.since = since
        self.by = by
        self.top = top
        self.line_no = self.lines_read = self.malformed = self.outside_window = self.undated = 0
        self.malformed_examples: list[int] = []
        self.first_ts: datetime | None = None
        self.last_ts: datetime | None = None
        self.degraded = 0
        self.groups: dict[str, _Acc] = {}
        self.users: dict[str, list[int]] = {}  # user -> [spend nano, calls]
        self.route_tokens: dict[str, int] = {}
        self.events: Counter[str] = Counter()
        self.fallback_pairs: Counter[str] = Counter()
        self.degraded_reasons: Counter[str] = Counter()
        self.circuits: Counter[str] = Counter()
        self.alerts: Counter[tuple[str, float, str]] = Counter()  # (budget, threshold, "50%") -> times

    def _bad(self) -> None:
        self.malformed += 1
        if len(self.malformed_examples) < 10:
            self.malformed_examples.append(self.line_no)

    def feed(self, line: str | bytes) -> None:
        self.line_no += 1
        if not line.strip():
            return  # a blank line (a trailing newline, a hand-edited file) is not a record
        self.lines_read += 1
        try:
            record = _decode(line.decode("utf-8") if isinstance(line, bytes) else line)
        except (ValueError, RecursionError):  # not JSON, bad UTF-8, a truncated write, absurd nesting
            self._bad()
            return
        if type(record) is not dict:
            self._bad()
            return
        event = record.get("event")
        if type(event) is not str or not event:
            self._bad()
            return
        ts = _parse_ts(record.get("ts"))
        if ts is None:
            self.undated += 1
            if self.since is not None:
                return  # cannot tell whether it is in the window; counted, not guessed
        else:
            if self.since is not None and ts < self.since:
                self.outside_window += 1
                return
            if self.first_ts is None or ts < self.first_ts:
                self.first_ts = ts
            if self.last_ts is None or ts > self.last_ts:
                self.last_ts = ts
        self.events[event] += 1
        if event in CALL_EVENTS:
            self._call(record, event == "claude_api_error")
        elif event in DEGRADED_EVENTS:
            self.degraded_reasons[_label(record.get("reason"))] += 1
            self.degraded += 1
            if self.by in record:  # a degradation has no model: counted in the total only
                self._group(_key(record.get(self.by))).degraded += 1
        elif event == "model_fallback":
            self.fallback_pairs[f"{_label(record.get('from_model'))} -> {_label(record.get('to_model'))}"] += 1
            # By model, the model that failed gets the failure (not the one that answered); a model
            # skipped because its circuit was open was not called, so it gets nothing.
            if self.by == "model":
                attempts = record.get("attempts")
                tried = attempts > 0 if type(attempts) is int else record.get("reason") != "circuit_open"
                if tried:
                    self._group(_key(record.get("from_model"))).failed_over += 1
        elif event == "circuit_opened":
            self.circuits[_label(record.get("model"))] += 1
        elif event == "budget_alert":
            threshold = record.get("threshold")
            value = float(threshold) if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) \
                else math.inf
            if not math.isfinite(value):
                value = math.inf
            mark = f"{value:.0%}" if value != math.inf else _label(threshold)
            # Ordered by budget, then by the threshold's value: 50% before 80% before 100%.
            self.alerts[(_label(record.get("budget")), value, mark)] += 1

    def _group(self, key: str) -> _Acc:
        acc = self.groups.get(key)
        if acc is None:
            acc = self.groups[key] = _Acc()
        return acc

    def _call(self, record: dict[str, Any], error: bool) -> None:
        get = record.get
        cost = get("cost_usd")
        spend = round(cost * NANO) if type(cost) is float and -_MAX_COST < cost < _MAX_COST else _nano(cost)
        inp = v if type(v := get("input_tokens")) is int else _int(v)
        out = v if type(v := get("output_tokens")) is int else _int(v)
        cread = v if type(v := get("cache_read_input_tokens")) is int else _int(v)
        ccreate = v if type(v := get("cache_creation_input_tokens")) is int else _int(v)

        acc = self._group(_key(get(self.by)))
        acc.calls += 1
        if error:
            acc.errors += 1
        acc.spend += spend
        acc.input += inp
        acc.output += out
        acc.cache_read += cread
        acc.cache_creation += ccreate
        if not error and get("fallback_from"):  # answered by a fallback model; a failed call was not answered
            acc.fallback_calls += 1
        latency = get("latency_ms")
        if type(latency) is not float or not 0.0 <= latency < math.inf:
            latency = _latency(latency)
        if latency is not None:
            acc.latencies.append(latency)

        user_key = _key(get("user"))
        user = self.users.get(user_key)
        if user is None:
            user = self.users[user_key] = [0, 0]
        user[0] += spend
        user[1] += 1
        route = _key(get("route"))
        self.route_tokens[route] = self.route_tokens.get(route, 0) + inp + out + cread + ccreate

    def _total(self) -> Stats:
        total = _Acc()
        latencies = array("d")
        for acc in self.groups.values():
            for name in ("calls", "errors", "spend", "input", "output", "cache_read", "cache_creation",
                         "fallback_calls"):
                setattr(total, name, getattr(total, name) + getattr(acc, name))
            latencies.extend(acc.latencies)
        total.degraded = self.degraded
        return total.stats(latencies)

    def result(self, *, source: str | None = None) -> Report:
        """The report; call it once, at the end."""
        total = self._total()
        ordered = sorted(self.groups.items(), key=lambda kv: (-kv[1].spend, -kv[1].calls, kv[0]))
        groups = {}
        for name, acc in ordered:
            groups[name] = acc.stats()
            acc.latencies = array("d")  # free each group's latencies before sorting the next
        spenders = sorted(((u, s, c) for u, (s, c) in self.users.items() if u != NONE_LABEL),
                          key=lambda t: (-t[1], -t[2], t[0]))[: self.top]
        routes = sorted(self.route_tokens.items(), key=lambda kv: (-kv[1], kv[0]))
        return Report(
            by=self.by, since=self.since, first_ts=self.first_ts, last_ts=self.last_ts,
            lines_read=self.lines_read, malformed=self.malformed, outside_window=self.outside_window,
            undated=self.undated, total=total, groups=groups,
            top_users=[Spender(u, s / NANO, c) for u, s, c in spenders],
            fallback_events=self.events["model_fallback"], fallback_pairs=dict(self.fallback_pairs.most_common()),
            degraded_by_reason=dict(self.degraded_reasons.most_common()),
            feature_degraded=self.events["feature_degraded"], limit_exceeded=self.events["limit_exceeded"],
            circuits_opened=dict(self.circuits.most_common()),
            budget_alerts={f"{budget} @ {mark}": n for (budget, _, mark), n in sorted(self.alerts.items())},
            storage_unavailable=self.events["storage_unavailable"], events=dict(self.events.most_common()),
            tokens_by_route=dict(routes), source=source, malformed_examples=list(self.malformed_examples))


def build_report(lines: Iterable[str | bytes], *, since: datetime | None = None, by: str = "feature",
                 source: str | None = None) -> Report:
    """One pass over ``lines`` (an open file is fine: it is read line by line, never whole)."""
    builder = ReportBuilder(since=since, by=by)
    for line in lines:
        builder.feed(line)
    return builder.result(source=source)


