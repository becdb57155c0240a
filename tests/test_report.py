"""``flask claude report``: exact totals from a synthetic log with known answers, and from real calls."""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_claude import Claude, UpstreamUnavailable, ai_feature
from flask_claude.report import build_report, parse_since, render_text

T0 = datetime(2026, 1, 10, tzinfo=UTC)
PLUS_TWO = timezone(timedelta(hours=2))
FEATURES = ["summarize", "translate", "chat", None]
MODELS = ["claude-opus-4-7", "claude-sonnet-4-6", "claude-haiku-4-5"]
USERS = [f"u{n}" for n in range(7)]
N_CALLS = 3000

MALFORMED = [
    "this is not json",
    '{"ts": "2026-01-10T00:00:00+00:00", "event": "claude_api_call", "cost_usd": 99.0, "lat',  # truncated
    "[1, 2, 3]",
    '{"ts": "2026-01-10T00:00:00+00:00", "cost_usd": 99.0}',  # no event
    "42",
    '"claude_api_call"',
    '{"event": 5, "cost_usd": 99.0}',
    '{"event": "", "cost_usd": 99.0}',
    "[" * 100_000,  # nesting deep enough to exhaust the parser's recursion
    "\udcff{garbage",
]


@dataclass
class Expected:
    """What the report must say, computed the slow obvious way from the records themselves."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    degraded: list[dict[str, Any]] = field(default_factory=list)
    other: list[dict[str, Any]] = field(default_factory=list)


def _ts(i: int) -> str:
    moment = T0 + timedelta(minutes=i)
    # Every third record is written in +02:00: comparisons must be by instant, not by string.
    return (moment.astimezone(PLUS_TWO) if i % 3 == 0 else moment).isoformat(timespec="milliseconds")


def synthetic_log(path: Path) -> Expected:
    expected = Expected()
    lines: list[str] = []
    for i in range(N_CALLS):
        feature = FEATURES[i % len(FEATURES)]
        error = i % 10 == 0
        fallback = not error and i % 25 == 1
        model = "claude-sonnet-4-6" if fallback else MODELS[i % len(MODELS)]
        cost_micro = 0 if error and i % 20 != 0 else (i % 97 + 1) * 10  # some errors bill partial usage
        record: dict[str, Any] = {
            "ts": _ts(i), "event": "claude_api_error" if error else "claude_api_call",
            "request_id": f"req_{i}", "feature": feature, "route": f"/{feature}" if feature else None,
            "user": USERS[i % len(USERS)], "model": model,
            "requested_model": "claude-opus-4-7" if fallback else model,
            "fallback_from": "claude-opus-4-7" if fallback else None,
            "latency_ms": float(i % 1000 + 1) + (0.5 if i % 2 else 0.0),
            "retries": i % 3, "system_prompt_hash": None,
            "input_tokens": 100 + i % 50, "output_tokens": 20 + i % 30,
            "cache_read_input_tokens": 200 if i % 3 == 0 else 0,
            "cache_creation_input_tokens": 50 if i % 7 == 0 else 0,
            "stop_reason": None if error else "end_turn", "cost_usd": cost_micro / 1_000_000,
        }
        if error:
            record.update(error_type="overloaded_error", status_code=529)
        record["_i"], record["_micro"] = i, cost_micro
        expected.calls.append(record)
        if fallback:
            expected.other.append({"ts": _ts(i), "event": "model_fallback", "feature": feature,
                                   "route": record["route"], "from_model": "claude-opus-4-7",
                                   "to_model": "claude-sonnet-4-6", "reason": "overloaded_error",
                                   "status_code": 529, "_i": i})
    for j in range(52):
        i = j * 57
        event, reason = (("limit_exceeded", "rate_limited") if j < 12 else
                         ("feature_degraded", "feature_disabled") if j < 27 else
                         ("feature_degraded", "upstream_unavailable"))
        feature = FEATURES[j % 3]
        expected.degraded.append({"ts": _ts(i), "event": event, "feature": feature, "route": f"/{feature}",
                                  "user": USERS[j % len(USERS)], "reason": reason, "status": 503, "_i": i})
    expected.other += [
        {"ts": _ts(100), "event": "circuit_opened", "model": "claude-opus-4-7", "cooldown_s": 30, "_i": 100},
        {"ts": _ts(2100), "event": "circuit_opened", "model": "claude-opus-4-7", "cooldown_s": 30, "_i": 2100},
        {"ts": _ts(2200), "event": "budget_alert", "budget": "global daily budget", "threshold": 0.5,
         "spent": 25.0, "limit": 50.0, "unit": "usd", "_i": 2200},
    ]
    for record in [*expected.calls, *expected.degraded, *expected.other]:
        lines.append(json.dumps({k: v for k, v in record.items() if not k.startswith("_")}))
    random.Random(7).shuffle(lines)  # the log of many workers is only roughly in order
    lines[500:500] = MALFORMED[:5]
    lines[1500:1500] = ["", "   "]  # blank lines are not records and not malformed
    lines += MALFORMED[5:]
    lines.append(MALFORMED[1])  # a write cut off at the end of the file, no newline
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogateescape")
    return expected


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, Expected]:
    path = tmp_path / "claude.jsonl"
    return path, synthetic_log(path)


def _lines(path: Path) -> Iterator[bytes]:
    """A one-shot generator: the report must not need to read its input twice."""
    with path.open("rb") as fh:
        yield from fh


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _expect_stats(calls: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [c["latency_ms"] for c in calls]
    inp = sum(c["input_tokens"] for c in calls)
    read = sum(c["cache_read_input_tokens"] for c in calls)
    create = sum(c["cache_creation_input_tokens"] for c in calls)
    return {"calls": len(calls), "errors": sum(c["event"] == "claude_api_error" for c in calls),
            "spend_usd": sum(c["_micro"] for c in calls) / 1_000_000, "input_tokens": inp,
            "output_tokens": sum(c["output_tokens"] for c in calls), "cache_read_input_tokens": read,
            "cache_creation_input_tokens": create, "cache_hit_ratio": read / (inp + read + create),
            "p50": _percentile(latencies, 50), "p95": _percentile(latencies, 95), "p99": _percentile(latencies, 99)}


def _check(stats: Any, want: dict[str, Any]) -> None:
    assert stats.calls == want["calls"]
    assert stats.errors == want["errors"]
    assert stats.spend_usd == want["spend_usd"]  # exact: summed in integer nano-dollars
    assert stats.error_rate == pytest.approx(want["errors"] / want["calls"])
    for key in ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        assert getattr(stats, key) == want[key], key
    assert stats.cache_hit_ratio == pytest.approx(want["cache_hit_ratio"])
    for q in ("p50", "p95", "p99"):
        assert getattr(stats.latency, q) == pytest.approx(want[q], abs=0.01), q


def test_totals_groups_and_malformed_lines_are_exact(log: tuple[Path, Expected]) -> None:
    path, expected = log
    report = build_report(_lines(path), since=None, by="feature")

    _check(report.total, _expect_stats(expected.calls))
    assert report.total.spend_usd > 0 and report.total.errors == N_CALLS // 10
    by_feature: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for call in expected.calls:
        by_feature[call["feature"] or "(none)"].append(call)
    assert set(report.groups) == set(by_feature)
    for name, calls in by_feature.items():
        _check(report.groups[name], _expect_stats(calls))
    spends = [g.spend_usd for g in report.groups.values()]
    assert spends == sorted(spends, reverse=True)

    assert report.malformed == len(MALFORMED) + 1
    assert report.lines_read == len(expected.calls) + len(expected.degraded) + len(expected.other) + report.malformed
    assert report.undated == 0 and report.outside_window == 0

    fallbacks = [c for c in expected.calls if c["fallback_from"]]
    assert report.fallback_events == len(fallbacks) > 0
    assert report.total.fallback_calls == len(fallbacks)
    assert report.fallback_pairs == {"claude-opus-4-7 -> claude-sonnet-4-6": len(fallbacks)}
    assert report.degraded_by_reason == {"rate_limited": 12, "feature_disabled": 15, "upstream_unavailable": 25}
    assert (report.limit_exceeded, report.feature_degraded, report.degraded) == (12, 40, 52)
    assert sum(g.degraded for g in report.groups.values()) == 52
    assert report.circuits_opened == {"claude-opus-4-7": 2}
    assert report.budget_alerts == {"global daily budget @ 50%": 1}

    user_spend: Counter[str] = Counter()
    for call in expected.calls:
        user_spend[call["user"]] += call["_micro"]
    top = sorted(user_spend.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert [(s.user, s.spend_usd) for s in report.top_users] == [(u, m / 1_000_000) for u, m in top]

    assert report.first_ts == T0
    assert report.last_ts == T0 + timedelta(minutes=N_CALLS - 1)
    route_tokens = Counter[str]()
    for call in expected.calls:
        route_tokens[call["route"] or "(none)"] += (call["input_tokens"] + call["output_tokens"]
                                                    + call["cache_read_input_tokens"]
                                                    + call["cache_creation_input_tokens"])
    assert report.tokens_by_route == dict(route_tokens.most_common())


@pytest.mark.parametrize("by", ["model", "user", "route"])
def test_other_groupings(log: tuple[Path, Expected], by: str) -> None:
    path, expected = log
    report = build_report(_lines(path), since=None, by=by)
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for call in expected.calls:
        grouped[call[by] or "(none)"].append(call)
    assert set(report.groups) == set(grouped)
    failed_over = Counter(r["from_model"] for r in expected.other if r["event"] == "model_fallback")
    for name, calls in grouped.items():
        want = _expect_stats(calls)
        if by == "model":  # each model_fallback is a failed call of the model it fell back from
            want["calls"] += failed_over[name]
            want["errors"] += failed_over[name]
        _check(report.groups[name], want)
        assert report.groups[name].failed_over == (failed_over[name] if by == "model" else 0)
    if by == "model":  # degradations carry no model: they are counted in total, in no model's row
        assert sum(g.degraded for g in report.groups.values()) == 0
        assert report.groups["claude-sonnet-4-6"].fallback_calls == report.total.fallback_calls
        assert failed_over["claude-opus-4-7"] > 0
        assert sum(g.calls for g in report.groups.values()) == report.total.calls + failed_over.total()


def test_since_filters_on_the_instant(log: tuple[Path, Expected]) -> None:
    path, expected = log
    since = T0 + timedelta(minutes=1500)
    report = build_report(_lines(path), since=since, by="feature")
    inside = [c for c in expected.calls if c["_i"] >= 1500]
    _check(report.total, _expect_stats(inside))
    before = sum(r["_i"] < 1500 for r in [*expected.calls, *expected.degraded, *expected.other])
    assert report.outside_window == before
    assert report.first_ts == since
    assert report.circuits_opened == {"claude-opus-4-7": 1}
    assert report.malformed == len(MALFORMED) + 1  # malformed lines are counted in any window

    # The same instant written with another offset selects the same records.
    same = build_report(_lines(path), since=since.astimezone(timezone(timedelta(hours=-5))), by="feature")
    assert same.total == report.total


def test_parse_since() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now=now) == now - timedelta(minutes=30)
    assert parse_since("24h", now=now) == now - timedelta(hours=24)
    assert parse_since("7d", now=now) == now - timedelta(days=7)
    assert parse_since("2026-02-27", now=now) == datetime(2026, 2, 27, tzinfo=UTC)
    assert parse_since("2026-02-27T08:30:00+02:00", now=now) == datetime(2026, 2, 27, 6, 30, tzinfo=UTC)
    assert parse_since("today", now=now) == datetime(2026, 3, 1, tzinfo=UTC)
    assert parse_since("all", now=now) is None
    for bad in ("yesterday", "24", "h24", "2026-13-01"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_since(bad, now=now)


def test_undated_records_are_kept_without_a_window_and_dropped_with_one() -> None:
    lines = ['{"event": "claude_api_call", "cost_usd": 0.5, "latency_ms": 10}',
             '{"ts": "not a time", "event": "claude_api_call", "cost_usd": 0.25, "latency_ms": 20}',
             '{"ts": "2026-01-10T00:00:00Z", "event": "claude_api_call", "cost_usd": 1.0, "latency_ms": "slow",'
             ' "input_tokens": "many", "output_tokens": null}']
    everything = build_report(lines, since=None, by="feature")
    assert (everything.total.calls, everything.total.spend_usd, everything.undated) == (3, 1.75, 2)
    assert everything.total.latency.count == 2 and everything.total.input_tokens == 0
    windowed = build_report(lines, since=T0 - timedelta(days=1), by="feature")
    assert (windowed.total.calls, windowed.total.spend_usd, windowed.undated) == (1, 1.0, 2)


def test_empty_input_renders() -> None:
    report = build_report([], since=None, by="feature")
    assert report.total.calls == 0 and report.total.latency.p50 is None
    assert "No Claude calls" in render_text(report)
    assert json.loads(report.to_json())["totals"]["calls"] == 0


# --- the CLI -----------------------------------------------------------------------------------------


def cli_app(log_path: Path | None) -> Flask:
    app = Flask("report_cli")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"])
    if log_path is not None:
        app.config["CLAUDE_LOG_PATH"] = str(log_path)
    Claude(app)
    return app


def test_cli_json_matches_the_log(log: tuple[Path, Expected]) -> None:
    path, expected = log
    runner = cli_app(path).test_cli_runner()
    result = runner.invoke(args=["claude", "report", "--since", "all", "--json"])  # default: CLAUDE_LOG_PATH
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    want = _expect_stats(expected.calls)
    totals = data["totals"]
    assert totals["spend_usd"] == want["spend_usd"]
    assert (totals["calls"], totals["errors"]) == (want["calls"], want["errors"])
    assert totals["error_rate"] == pytest.approx(0.1)
    assert totals["latency"]["p95"] == pytest.approx(want["p95"], abs=0.01)
    assert data["lines"]["malformed"] == len(MALFORMED) + 1
    assert data["source"] == str(path) and data["by"] == "feature"
    assert data["degraded"]["by_reason"]["upstream_unavailable"] == 25
    assert len(data["top_users"]) == 5

    result = runner.invoke(args=["claude", "report", "--log", str(path), "--since", "2026-01-11T01:00:00+00:00",
                                 "--by", "model", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    inside = [c for c in expected.calls if c["_i"] >= 1500]
    assert data["totals"]["spend_usd"] == _expect_stats(inside)["spend_usd"]
    assert set(data["groups"]) == set(MODELS)


def test_cli_text_is_one_screen(log: tuple[Path, Expected]) -> None:
    path, expected = log
    result = cli_app(path).test_cli_runner().invoke(args=["claude", "report", "--since", "all"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert len(text.splitlines()) <= 40
    spend = _expect_stats(expected.calls)["spend_usd"]
    assert f"${spend:,.4f}" in text
    assert "p95" in text and "by feature" in text
    top_route, top_tokens = next(iter(build_report(_lines(path), by="route").tokens_by_route.items()))
    assert top_tokens > 100_000 and f"Most tokens: route {top_route} ({top_tokens / 1000:.0f}k tokens" in text
    assert f"{len(MALFORMED) + 1} malformed" in text

    # The default window is the last 24 hours; this log is older, and the report says so.
    result = cli_app(path).test_cli_runner().invoke(args=["claude", "report"])
    assert result.exit_code == 0, result.output
    assert "No Claude calls in this window. Try --since all." in result.output


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    result = cli_app(None).test_cli_runner().invoke(args=["claude", "report"])
    assert result.exit_code == 2 and "No log file to read" in result.output and "--log PATH" in result.output

    missing = tmp_path / "nowhere.jsonl"
    result = cli_app(missing).test_cli_runner().invoke(args=["claude", "report"])
    assert result.exit_code == 1 and "does not exist" in result.output and "CLAUDE_LOG_PATH" in result.output
    assert "Traceback" not in result.output

    result = cli_app(None).test_cli_runner().invoke(args=["claude", "report", "--log", str(tmp_path)])
    assert result.exit_code == 1 and "is a directory" in result.output

    (tmp_path / "x.jsonl").write_text("")
    result = cli_app(None).test_cli_runner().invoke(args=["claude", "report", "--log", str(tmp_path / "x.jsonl"),
                                                          "--since", "last tuesday"])
    assert result.exit_code == 2 and "--since" in result.output and "30m, 24h, 7d" in result.output


# --- real lines, written by the extension through the simulator ----------------------------------------------


def test_report_of_real_calls_equals_the_sum_of_cost_usd(tmp_path: Path) -> None:
    log_path = tmp_path / "real.jsonl"
    app = Flask("report_real")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_LOG_PATH=str(log_path), CLAUDE_MAX_RETRIES=0,
                      CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"], CLAUDE_BREAKER_MIN_CALLS=50)
    Claude(app)
    state = app.extensions["claude"]

    @app.post("/summarize")
    @ai_feature("summarize", max_tokens=64)
    def summarize() -> dict[str, Any]:
        msg = state.messages.create(messages=[{"role": "user", "content": "Summarise: the cat sat on the mat."}])
        return {"text": msg.content[0].text}

    client = app.test_client()
    for _ in range(4):
        assert client.post("/summarize").status_code == 200
    with app.app_context():
        for n in range(3):
            state.messages.create(model="claude-sonnet-4-6", max_tokens=40 + n,
                                  messages=[{"role": "user", "content": f"Question number {n}?"}])
        state.simulator.fail(529, model="claude-opus-4-7", times=1)  # one fallback to sonnet
        state.messages.create(max_tokens=30, messages=[{"role": "user", "content": "Fall back, please."}])
        state.simulator.fail(529)  # every model down: an error line
        with pytest.raises(Exception, match="overloaded"):
            state.messages.create(max_tokens=30, messages=[{"role": "user", "content": "Nobody home?"}])
        state.simulator.clear_faults()
    state.simulator.fail(529)
    assert client.post("/summarize").status_code == 503  # degraded, logged as feature_degraded
    state.simulator.clear_faults()

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    calls = [r for r in records if r["event"] in ("claude_api_call", "claude_api_error")]
    report = build_report(log_path.read_text().splitlines(), since=datetime.now(UTC) - timedelta(hours=1),
                          by="feature")
    assert report.malformed == 0
    assert report.total.calls == len(calls) == 10
    assert report.total.spend_usd == pytest.approx(sum(r["cost_usd"] for r in calls), abs=1e-9)
    assert report.total.spend_usd > 0
    assert report.total.errors == sum(r["event"] == "claude_api_error" for r in calls) == 2
    assert report.groups["summarize"].calls == 5 and report.groups["(none)"].calls == 5
    assert report.total.output_tokens == sum(r["output_tokens"] for r in calls)
    assert report.total.latency.count == 10
    # answered by a fallback model: the one fallback; the two calls that failed everywhere were not answered
    assert report.fallback_events >= 1 and report.total.fallback_calls == 1
    assert report.degraded_by_reason.get("upstream_unavailable") == 1

    result = app.test_cli_runner().invoke(args=["claude", "report", "--json", "--since", "1h"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["totals"]["spend_usd"] == report.total.spend_usd


# --- attribution, from real runs: an Opus-only outage, and budget alerts ----------------------------------------


def test_an_opus_only_outage_shows_on_opus(tmp_path: Path) -> None:
    """The README's 529 storm: ``flask claude simulate --fail 529 --fail-model claude-opus-4-7``, with the app on it.

    By model, Opus's failed attempts are Opus's errors (they used to count as nothing, Opus showing 0%
    errors during its own outage); "answered by a fallback model" counts answered calls only.
    """
    from flask_claude.simulator import Simulator

    from .conftest import FakeClock

    log_path = tmp_path / "outage.jsonl"
    sim = Simulator()
    with sim.serve() as server:
        app = Flask("report_outage")
        app.config.update(CLAUDE_SIMULATE=True, CLAUDE_BASE_URL=server.url, CLAUDE_LOG_PATH=str(log_path),
                          CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"], CLAUDE_MAX_RETRIES=1)
        Claude(app, clock=FakeClock())  # retry waits pass on the fake clock
        state = app.extensions["claude"]

        def ask(n: int) -> Any:
            with app.app_context():
                return state.messages.create(max_tokens=32, messages=[{"role": "user", "content": f"Question {n}?"}])

        assert [ask(n).model for n in range(3)] == ["claude-opus-4-7"] * 3  # healthy
        sim.fail(529, model="claude-opus-4-7")  # what --fail 529 --fail-model claude-opus-4-7 scripts
        assert {ask(n).model for n in range(3, 11)} == {"claude-sonnet-4-6"}  # 8 answered by Sonnet
        opus_attempts = len(sim.requests_for("claude-opus-4-7")) - 3
        sim.fail(529)  # then everything: two calls that no model answers
        for n in range(11, 13):
            with pytest.raises(UpstreamUnavailable):
                ask(n)

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    report = build_report(log_path.read_text().splitlines(), by="model")
    opus, sonnet = report.groups["claude-opus-4-7"], report.groups["claude-sonnet-4-6"]

    # Opus: its 3 answers, and one failed call for every call that tried it during the outage (the
    # breaker opened after a few, and calls that skipped Opus did not call it: no error of Opus's).
    tried = [r for r in records if r["event"] == "model_fallback" and r["attempts"] > 0]
    assert 1 <= len(tried) < 8 and report.circuits_opened == {"claude-opus-4-7": 1}
    assert all(r["from_model"] == "claude-opus-4-7" for r in tried)
    assert {r["reason"] for r in tried} <= {"overloaded_error", "circuit_open"}  # circuit_open: opened mid-retries
    assert sum(r["attempts"] for r in tried) == opus_attempts  # each request Opus failed, logged against it
    assert (opus.calls, opus.errors, opus.failed_over) == (3 + len(tried), len(tried), len(tried))
    assert opus.error_rate == pytest.approx(len(tried) / (3 + len(tried))) and opus.error_rate > 0
    assert opus.spend_usd > 0 and opus.latency.count == 3  # a failed attempt bills nothing and has no latency
    # Sonnet: 8 answers, then the 2 calls that failed on every model (the last model tried is Sonnet).
    assert (sonnet.calls, sonnet.errors, sonnet.failed_over) == (10, 2, 0)
    assert sonnet.fallback_calls == report.total.fallback_calls == 8  # answered ones only, not the 2 failures
    # The totals count each call once, whatever the grouping.
    by_feature = build_report(log_path.read_text().splitlines(), by="feature")
    assert (report.total.calls, report.total.errors) == (by_feature.total.calls, by_feature.total.errors) == (13, 2)

    text = render_text(report)
    assert "8 calls answered by a fallback model" in text
    opus_row = next(line for line in text.splitlines() if line.strip().startswith("claude-opus-4-7"))
    assert f"{opus.error_rate:.1%}" in opus_row
    assert f"include {len(tried)} call{'' if len(tried) == 1 else 's'} that failed over to the next model" in text


def test_budget_alerts_are_listed_in_threshold_order(make_app: Any, tmp_path: Path) -> None:
    """Alerts from a real run over a small budget; read back in any line order (several workers' lines
    interleave), they are listed per budget as 50%, 80%, 100%, never 100%, 50%, 80%."""
    app = make_app(CLAUDE_MODELS=["claude-haiku-4-5"], CLAUDE_DAILY_BUDGET_USD=0.002, CLAUDE_MAX_RETRIES=0)
    state = app.extensions["claude"]
    with app.app_context():
        for n in range(60):
            try:
                state.messages.create(max_tokens=20, messages=[{"role": "user", "content": f"Label this: {n}"}])
            except Exception:
                break  # the budget is spent: refused
    lines = (tmp_path / "claude.jsonl").read_text().splitlines()
    alerts = [json.loads(line) for line in lines if '"budget_alert"' in line]
    assert sorted(a["threshold"] for a in alerts) == [0.5, 0.8, 1.0]
    for order in (lines, lines[::-1], sorted(lines)):
        report = build_report(order, by="feature")
        budget = alerts[0]["budget"]
        assert list(report.budget_alerts) == [f"{budget} @ 50%", f"{budget} @ 80%", f"{budget} @ 100%"]
        assert f"Budget alerts {budget} @ 50%, {budget} @ 80%, {budget} @ 100%" in render_text(report)
