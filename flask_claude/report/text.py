"""``render_text``: one screen of a ``Report``, for an operator's terminal."""

from __future__ import annotations

from datetime import UTC, datetime

from .results import Report


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
