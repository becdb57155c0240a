"""``flask claude report``: spend, latency and token use, aggregated from the JSON log in one pass.

The log is the only record that outlives every worker and every Redis flush, so the report reads
the file and nothing else. It streams: one line is parsed, folded into counters and dropped, so a
log of millions of lines needs memory for the counters, not for the records.

Choices that matter at 3 AM:

* Latency percentiles are exact. Each group keeps its latencies in a compact ``array('d')``
  (8 bytes a call; 8 MB per million calls and per grouping) and sorts it once at the end, one group
  at a time, so the transient peak is one sorted copy of the largest group. A sketch (t-digest,
  reservoir) would be smaller but makes "the p99 in the report is not the p99" a question nobody
  should have to ask during an incident.
* Money is summed in integer nano-dollars: ``cost_usd`` is written rounded to 8 decimals, so the
  integer sum is exact and a million additions do not drift; tests compare totals exactly.
* A line that is not a JSON object with an ``event`` (a truncated write, a stray ``print``, a line
  from another logger) is counted and skipped, never fatal: a report that dies on line 812,331 is
  no report.
"""

from __future__ import annotations

import json
import math
import re
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

__all__ = [
    "GROUPINGS",
    "Latency",
    "Report",
    "ReportBuilder",
    "Spender",
    "Stats",
    "build_report",
    "parse_since",
    "render_text",
]

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


# --- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    """Exact percentiles (linear interpolation between closest ranks) of ``latency_ms``."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None


@dataclass(frozen=True)
class Stats:
    """One group's (or the whole window's) numbers; ``calls`` counts successes and errors.

    By model, a call that fell back counts for every model it tried: the model that answered (or
    failed last) has its line, and each model before it one failed call (``failed_over``, from its
    ``model_fallback`` event), so an Opus-only outage shows on Opus and not as Sonnet's. The totals
    count each call once, so by model the groups' ``calls`` add up to more than the total.
    """

    calls: int
    errors: int
    spend_usd: float
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int
    latency: Latency
    fallback_calls: int  # calls answered by a model other than the first of the chain (answered only)
    degraded: int  # feature_degraded + limit_exceeded events attributed to this group
    failed_over: int = 0  # by model: calls that failed on this model and went on to the next one

    @property
    def ok(self) -> int:
        return self.calls - self.errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    @property
    def total_input_tokens(self) -> int:
        return self.input_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens

    @property
    def tokens(self) -> int:
        return self.total_input_tokens + self.output_tokens

    @property
    def cache_hit_ratio(self) -> float:
        """Share of input tokens read from the prompt cache (billed at a tenth of the price)."""
        total = self.total_input_tokens
        return self.cache_read_input_tokens / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(ok=self.ok, error_rate=self.error_rate, tokens=self.tokens,
                   cache_hit_ratio=self.cache_hit_ratio)
        return out


@dataclass(frozen=True)
class Spender:
    user: str
    spend_usd: float
    calls: int


@dataclass
class Report:
    """Everything ``flask claude report`` prints; ``to_json`` is the machine-readable form."""

    by: str
    since: datetime | None
    first_ts: datetime | None
    last_ts: datetime | None
    lines_read: int
    malformed: int  # not JSON, not an object, or no "event"
    outside_window: int  # dated before ``since``
    undated: int  # no parseable "ts" (kept without --since, dropped with it)
    total: Stats
    groups: dict[str, Stats]  # by spend, highest first
    top_users: list[Spender]
    fallback_events: int
    fallback_pairs: dict[str, int]  # "from -> to": model_fallback events
    degraded_by_reason: dict[str, int]
    feature_degraded: int
    limit_exceeded: int
    circuits_opened: dict[str, int]
    budget_alerts: dict[str, int]  # "budget @ threshold" -> times, by budget, thresholds ascending
    storage_unavailable: int
    events: dict[str, int]
    tokens_by_route: dict[str, int]  # all tokens (in, cache, out), highest first
    source: str | None = None
    malformed_examples: list[int] = field(default_factory=list)  # 1-based line numbers of the first ten

    @property
    def degraded(self) -> int:
        return self.feature_degraded + self.limit_exceeded

    def to_dict(self) -> dict[str, Any]:
        iso = (lambda d: d.isoformat() if d is not None else None)  # noqa: E731
        return {
            "source": self.source,
            "by": self.by,
            "since": iso(self.since),
            "time_range": {"first": iso(self.first_ts), "last": iso(self.last_ts)},
            "lines": {"read": self.lines_read, "malformed": self.malformed,
                      "malformed_line_numbers": self.malformed_examples,
                      "outside_window": self.outside_window, "undated": self.undated},
            "totals": self.total.to_dict(),
            "groups": {name: stats.to_dict() for name, stats in self.groups.items()},
            "top_users": [asdict(s) for s in self.top_users],
            "fallbacks": {"events": self.fallback_events, "calls_served_by_fallback": self.total.fallback_calls,
                          "by_pair": self.fallback_pairs},
            "degraded": {"total": self.degraded, "feature_degraded": self.feature_degraded,
                         "limit_exceeded": self.limit_exceeded, "by_reason": self.degraded_by_reason},
            "circuits_opened": self.circuits_opened,
            "budget_alerts": self.budget_alerts,
            "storage_unavailable": self.storage_unavailable,
            "tokens_by_route": self.tokens_by_route,
            "events": self.events,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


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


# --- text -----------------------------------------------------------------------------------------------


def _usd(value: float) -> str:
    return f"${value:,.2f}" if abs(value) >= 100 else f"${value:,.4f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:,.0f}"


def _count(value: int) -> str:
    if value >= 10_000_000:
        return f"{value / 1_000_000:,.1f}M"
    if value >= 100_000:
        return f"{value / 1000:,.0f}k"
    return f"{value:,}"


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render_text(report: Report, *, rows: int = 10) -> str:
    """One screen: what it cost, how fast, who and what burns tokens, what went wrong."""
    t = report.total
    out: list[str] = []
    head = "flask-claude report" + (f": {report.source}" if report.source else "")
    out.append(head)
    window = f"since {_when(report.since)}" if report.since else "whole log"
    out.append(f"Window   {window}; records {_when(report.first_ts)} -> {_when(report.last_ts)}")
    skipped = [f"{_n(report.lines_read, 'line')} read"]
    if report.malformed:
        first = ", ".join(map(str, report.malformed_examples[:3])) + (", ..." if report.malformed > 3 else "")
        skipped.append(f"{report.malformed:,} malformed skipped (line {first})")
    if report.outside_window:
        skipped.append(f"{report.outside_window:,} before the window")
    if report.undated:
        skipped.append(f"{report.undated:,} without a timestamp" + (" (skipped)" if report.since else ""))
    out.append("Lines    " + "; ".join(skipped))
    out.append("")
    if not t.calls and not report.events:
        out.append("No Claude calls in this window." + (" Try --since all." if report.outside_window else ""))
        return "\n".join(out) + "\n"

    out.append(f"Spend    {_usd(t.spend_usd)} over {_n(t.calls, 'call')} ({t.ok:,} ok, {t.errors:,} failed: "
               f"{t.error_rate:.2%} error rate)")
    out.append(f"Latency  p50 {_ms(t.latency.p50)} ms   p95 {_ms(t.latency.p95)} ms   p99 {_ms(t.latency.p99)} ms"
               f"   ({t.latency.count:,} timed)")
    out.append(f"Tokens   in {_count(t.total_input_tokens)} (cache hit {t.cache_hit_ratio:.1%})"
               f"   out {_count(t.output_tokens)}")
    routes = [(r, n) for r, n in report.tokens_by_route.items() if n]
    if routes:
        top_route, top_tokens = routes[0]
        share = top_tokens / t.tokens if t.tokens else 0.0
        out.append(f"Most tokens: route {top_route} ({_count(top_tokens)} tokens, {share:.0%} of all)")
    out.append("")

    name_w = max([len(report.by), *(len(_cut(n, 28)) for n in list(report.groups)[:rows])]) + 2
    out.append(f"{'by ' + report.by:<{name_w + 3}}{'spend':>11} {'share':>6} {'calls':>8} {'err%':>6} "
               f"{'p50 ms':>8} {'p95 ms':>8} {'tok in':>8} {'tok out':>8} {'cache':>6}")
    for name, g in list(report.groups.items())[:rows]:
        share = g.spend_usd / t.spend_usd if t.spend_usd else 0.0
        out.append(f"   {_cut(name, 28):<{name_w}}{_usd(g.spend_usd):>11} {share:>6.1%} {g.calls:>8,} "
                   f"{g.error_rate:>6.1%} {_ms(g.latency.p50):>8} {_ms(g.latency.p95):>8} "
                   f"{_count(g.total_input_tokens):>8} {_count(g.output_tokens):>8} {g.cache_hit_ratio:>6.0%}")
    if len(report.groups) > rows:
        rest = list(report.groups.values())[rows:]
        out.append(f"   ... {len(rest):,} more {report.by}s: {_usd(sum(g.spend_usd for g in rest))}, "
                   f"{sum(g.calls for g in rest):,} calls (--json for all)")
    failed_over = sum(g.failed_over for g in report.groups.values())
    if failed_over:
        out.append(f"   calls and err% include {_n(failed_over, 'call')} that failed over to the next model "
                   "(counted once in the totals)")
    out.append("")

    if report.top_users:
        spenders = ", ".join(f"{_cut(s.user, 20)} {_usd(s.spend_usd)} ({s.calls:,})" for s in report.top_users)
        out.append(f"Top spenders  {spenders}")
    pairs = ", ".join(f"{pair} x{n}" for pair, n in list(report.fallback_pairs.items())[:3])
    out.append(f"Fallbacks     {_n(report.fallback_events, 'model_fallback event')}, "
               f"{_n(t.fallback_calls, 'call')} answered by a fallback model" + (f" ({pairs})" if pairs else ""))
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in report.degraded_by_reason.items())
    out.append(f"Degraded      {_n(report.degraded, 'response')}" + (f": {reasons}" if reasons else ""))
    if report.circuits_opened:
        out.append("Circuits      " + ", ".join(f"{m} opened x{n}" for m, n in report.circuits_opened.items()))
    if report.budget_alerts:
        out.append("Budget alerts " + ", ".join(f"{a}" + (f" x{n}" if n > 1 else "")
                                               for a, n in report.budget_alerts.items()))
    if report.storage_unavailable:
        out.append(f"Storage       unavailable {report.storage_unavailable:,} times (limits ran on the "
                   "CLAUDE_STORAGE_FAILURE policy)")
    return "\n".join(out) + "\n"
