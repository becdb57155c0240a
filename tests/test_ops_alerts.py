"""Shared rollups and the ops alerts read from them, on both stores, with the clock moved by hand."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_claude import Claude, ConfigError, ai_feature, budgeted, fallback_to, ops_alert
from flask_claude.flags import StaticFlags
from flask_claude.rollups import LATENCY_BUCKETS, MICRO, histogram_quantile, split_field, to_micro, window_minutes
from flask_claude.simulator import Simulator

from .conftest import FakeClock

ONE_MODEL = ["claude-haiku-4-5"]


def ops_app(name: str, storage_uri: str, sim: Simulator, clock: FakeClock, log_path: Path, **config: Any) -> Flask:
    """An app with two features: one budgeted per user (a reservation), one with no budget at all."""
    app = Flask(name)
    app.config.update({"CLAUDE_SIMULATE": True, "CLAUDE_STORAGE_URI": storage_uri, "CLAUDE_MODELS": ONE_MODEL,
                       "CLAUDE_MAX_RETRIES": 0, "CLAUDE_LOG_PATH": str(log_path), "CLAUDE_FLAGS": StaticFlags(),
                       "CLAUDE_ALERT_WINDOW": 60, **config})
    claude = Claude(app, simulator=sim, clock=clock)

    @app.post("/ask")
    @ai_feature("ask", max_tokens=64)
    @budgeted(usd="100/day", requests="100000/minute")
    @fallback_to({"text": None})
    def ask() -> Any:
        msg = claude.messages.create(messages=[{"role": "user", "content": "Write a haiku about the sea."}])
        return {"text": msg.content[0].text}

    @app.post("/free")
    @ai_feature("free", max_tokens=64)
    def free() -> Any:
        msg = claude.messages.create(messages=[{"role": "user", "content": "Write a haiku about the hills."}])
        return {"text": msg.content[0].text}

    @app.get("/plain")
    def plain() -> str:
        return "ok"

    return app


def events(path: Path, name: str | None = None) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in lines if name is None or e["event"] == name]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "ops.jsonl"


def test_rollups_agree_with_the_log(storage_uri: str, sim: Simulator, now_clock: FakeClock, log_path: Path) -> None:
    app = ops_app("rollup_app", storage_uri, sim, now_clock, log_path,
                  CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"])
    client = app.test_client()
    for _ in range(3):
        assert client.post("/ask").status_code == 200
        assert client.post("/free").status_code == 200
    sim.fail(529, model="claude-opus-4-7", times=2)  # two calls answered by the fallback model
    assert client.post("/ask").status_code == 200
    assert client.post("/free").status_code == 200
    sim.fail(529)  # every model down: two calls end in claude_api_error, two responses degrade
    assert client.post("/ask").headers["X-Claude-Degraded"] == "upstream_unavailable"
    assert client.post("/free").headers["X-Claude-Degraded"] == "upstream_unavailable"
    sim.reset()
    app.extensions["claude"].flags.set("ai-free", False)
    assert client.post("/free").headers["X-Claude-Degraded"] == "feature_disabled"

    lines = events(log_path)
    calls = [e for e in lines if e["event"] in ("claude_api_call", "claude_api_error")]
    state = app.extensions["claude"]
    snap = state.rollups.read(totals=True)
    totals: Counter[str] = Counter()
    by_feature: Counter[tuple[str, str]] = Counter()
    for name, amount in snap.totals.items():
        metric, feature, _ = split_field(name)
        totals[metric.split(":")[0] if metric[:2] in ("e:", "d:", "l:") else metric] += amount
        by_feature[(metric, feature)] += amount
    assert totals["c"] == len(calls) == 10
    assert totals["e"] == len([e for e in calls if e["event"] == "claude_api_error"]) == 2
    assert totals["f"] == len([e for e in calls if e["fallback_from"]]) == 4  # the two failures tried a fallback too
    assert totals["u"] == sum(to_micro(e["cost_usd"]) for e in calls) > 0
    assert abs(totals["u"] / MICRO - sum(e["cost_usd"] for e in calls)) < 1e-6 * len(calls)
    assert totals["ti"] == sum(e["input_tokens"] for e in calls)
    assert totals["to"] == sum(e["output_tokens"] for e in calls)
    assert totals["l"] == len(calls)  # every call lands in one latency bucket
    assert by_feature[("c", "ask")] == 5 and by_feature[("c", "free")] == 5
    degraded = Counter(e["reason"] for e in lines if e["event"] in ("feature_degraded", "limit_exceeded"))
    rolled: Counter[str] = Counter()
    for (metric, _), amount in by_feature.items():
        if metric.startswith("d:"):
            rolled[metric[2:]] += amount
    assert rolled == degraded
    assert degraded == {"upstream_unavailable": 2, "feature_disabled": 1}

    # The same numbers from the minute buckets (what alerts, the dashboard and status read).
    minute = state.rollups.read([math.floor(now_clock.now / 60)]).minutes
    assert sum(v for k, v in next(iter(minute.values())).items() if k.startswith("c|")) == 10


def test_redis_rollup_rides_on_the_settlement(redis_url: str, redis_server: Any, sim: Simulator,
                                              now_clock: FakeClock, log_path: Path) -> None:
    """The rollup adds no round trip: counted by Redis (reads of client sockets), a budgeted call waits
    for its admission and its hold, an unbudgeted one for its breaker read; both settlements are
    written behind, riding on a later round trip, and the rollups are summed in the worker until a
    read (here) or their interval writes them (tests/test_rollup_coalescing.py)."""
    app = ops_app("roundtrip_app", redis_url, sim, now_clock, log_path, CLAUDE_ALERT_WINDOW=None,
                  CLAUDE_SETTLE_DELAY=30)
    client = app.test_client()
    store = app.extensions["claude"].store

    def reads() -> int:
        return int(redis_server.client.info("stats")["total_reads_processed"])

    for _ in range(3):  # warm up: sockets open, every script loaded
        client.post("/ask")
        client.post("/free")
    before = reads()
    assert client.post("/ask").status_code == 200
    budgeted_trips = reads() - before - 1  # - 1: the INFO read itself
    before = reads()
    assert client.post("/free").status_code == 200
    free_trips = reads() - before - 1
    assert budgeted_trips == 2  # admission before the view, then the call's hold (settlement rides along)
    assert free_trips == 1  # the breaker read; the success record and rollup are written behind
    [total] = [v for k, v in store.rollups.read(totals=True).totals.items() if k == "c|free|claude-haiku-4-5"]
    assert total == 4


def drive(client: Any, clock: FakeClock, n: int, path: str = "/free", step: float = 1.0) -> list[int]:
    """A steady stream of requests, ``step`` seconds apart."""
    statuses = []
    for _ in range(n):
        statuses.append(client.post(path).status_code)
        clock.advance(step)
    return statuses


def test_error_rate_fires_once_across_two_workers_and_resolves(storage_uri: str, sim: Simulator,
                                                                now_clock: FakeClock, log_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    hooked: list[dict[str, Any]] = []
    config = {"CLAUDE_ALERT_HOOK": hooked.append}
    worker_a = ops_app("ops_app", storage_uri, sim, now_clock, log_path, **config)
    worker_b = ops_app("ops_app", storage_uri, sim, now_clock, log_path, **config)
    if storage_uri.startswith("memory"):
        # Two apps on memory:// would each have their own counts: share one store, as Redis does.
        worker_b.extensions["claude"].store.rollups = worker_a.extensions["claude"].store.rollups
    a, b = worker_a.test_client(), worker_b.test_client()

    def on_alert(sender: Flask, **fields: Any) -> None:
        seen.append(fields)

    ops_alert.connect(on_alert)
    try:
        assert drive(a, now_clock, 10) == [200] * 10  # healthy: nothing
        sim.fail(529, rate=0.1)  # 10% of calls fail upstream
        start = now_clock.now
        for _ in range(25):
            drive(a, now_clock, 1, step=0.5)
            drive(b, now_clock, 1, step=0.5)
        firing = [e for e in events(log_path, "ops_alert") if e["state"] == "firing"]
        assert [e["alert"] for e in firing] == ["error_rate"]
        alert = firing[0]
        assert alert["threshold"] == 0.05 and alert["window_s"] == 60 and alert["feature"] is None
        assert alert["value"] > 0.05
        assert now_clock.now - start <= 60  # within one window of the failures starting
        errors = len(events(log_path, "claude_api_error"))
        assert errors >= 2
        sim.reset()  # upstream recovers; the window slides past the failures
        drive(a, now_clock, 60, step=1.0)
        drive(b, now_clock, 30, step=1.0)
    finally:
        ops_alert.disconnect(on_alert)
    alerts = events(log_path, "ops_alert")
    assert [(e["alert"], e["state"]) for e in alerts] == [("error_rate", "firing"), ("error_rate", "resolved")]
    assert alerts[1]["value"] <= 0.05
    assert [(f["alert"], f["state"]) for f in seen] == [("error_rate", "firing"), ("error_rate", "resolved")]
    assert [h["alert"] for h in hooked] == ["error_rate", "error_rate"]


def test_a_firing_alert_resolves_only_well_under_its_threshold(sim: Simulator, now_clock: FakeClock,
                                                                log_path: Path) -> None:
    """Workers' counts land up to a flush interval apart, so a rate at the threshold wobbles around it:
    an alert resolves once the rate is under 80% of the threshold, not at the first dip under it."""
    app = ops_app("hysteresis_app", "memory://", sim, now_clock, log_path, CLAUDE_ALERT_MIN_CALLS=20,
                  CLAUDE_ALERT_EVAL_INTERVAL=0.1)  # every request (0.5 s apart on the test's clock)
    client = app.test_client()
    sim.fail(529, times=2)
    drive(client, now_clock, 20, step=0.5)  # 2 errors in 20 calls: 10%
    states = [e["state"] for e in events(log_path, "ops_alert")]
    assert states == ["firing"]
    drive(client, now_clock, 24, step=0.5)  # down through 5% (40 calls) to 4.5% (44): under it, not well under
    assert [e["state"] for e in events(log_path, "ops_alert")] == ["firing"]
    drive(client, now_clock, 10, step=0.5)  # 2 in 54: 3.7%, under 80% of 5%
    alerts = events(log_path, "ops_alert")
    assert [e["state"] for e in alerts] == ["firing", "resolved"]
    assert alerts[1]["value"] <= 0.8 * 0.05


def test_latency_p95_fires(storage_uri: str, sim: Simulator, now_clock: FakeClock, log_path: Path) -> None:
    app = ops_app("latency_app", storage_uri, sim, now_clock, log_path, CLAUDE_ALERT_LATENCY_P95=0.05,
                  CLAUDE_ALERT_MIN_CALLS=10)
    client = app.test_client()
    drive(client, now_clock, 10)
    assert events(log_path, "ops_alert") == []
    sim.latency(0.09)
    drive(client, now_clock, 12)
    [alert] = events(log_path, "ops_alert")
    assert (alert["alert"], alert["state"]) == ("latency_p95", "firing")
    assert alert["value"] > 0.05 and alert["threshold"] == 0.05


def test_cost_spike_fires_on_a_burst_not_on_steady_spend(storage_uri: str, sim: Simulator, now_clock: FakeClock,
                                                         log_path: Path) -> None:
    probe_log = log_path.with_name("probe.jsonl")
    probe = ops_app("probe_app", "memory://", sim, now_clock, probe_log)
    probe.test_client().post("/free")
    one_call = events(probe_log, "claude_api_call")[0]["cost_usd"]
    # A floor of 2.5 calls' cost: a lone call never pages; steady traffic of a call every 10 minutes
    # for a day never passes 3x the average window either.
    app = ops_app("spike_app", storage_uri, sim, now_clock, log_path, CLAUDE_ALERT_WINDOW=300,
                  CLAUDE_ALERT_COST_SPIKE_MIN_USD=2.5 * one_call)
    client = app.test_client()
    drive(client, now_clock, 144, step=600.0)
    assert events(log_path, "ops_alert") == []
    drive(client, now_clock, 10, step=5.0)  # ten calls in a minute: 20x the day's average window
    [alert] = events(log_path, "ops_alert")
    assert (alert["alert"], alert["state"]) == ("cost_spike", "firing")
    assert alert["value"] > alert["threshold"] >= 2.5 * one_call - 1e-9
    drive(client, now_clock, 2, step=600.0)  # back to the old pace: the burst leaves the window
    assert [(e["alert"], e["state"]) for e in events(log_path, "ops_alert")] == [
        ("cost_spike", "firing"), ("cost_spike", "resolved")]


def test_a_fresh_apps_first_burst_counts(sim: Simulator, now_clock: FakeClock, log_path: Path) -> None:
    app = ops_app("fresh_app", "memory://", sim, now_clock, log_path, CLAUDE_ALERT_COST_SPIKE_MIN_USD=0.0001)
    drive(app.test_client(), now_clock, 5, step=6.0)
    assert [(e["alert"], e["state"]) for e in events(log_path, "ops_alert")] == [("cost_spike", "firing")]


def test_quiet_traffic_and_none_settings_fire_nothing(sim: Simulator, now_clock: FakeClock, log_path: Path) -> None:
    app = ops_app("quiet_app", "memory://", sim, now_clock, log_path, CLAUDE_ALERT_WINDOW=300)
    drive(app.test_client(), now_clock, 200, step=30.0)  # defaults: $1 floor, 10 s p95, 5% errors
    assert events(log_path, "ops_alert") == []

    off = ops_app("off_app", "memory://", sim, now_clock, log_path, CLAUDE_ALERT_ERROR_RATE=None,
                  CLAUDE_ALERT_LATENCY_P95=None, CLAUDE_ALERT_COST_SPIKE=None)
    assert off.extensions["claude"].ops_alerts.enabled is False
    sim.fail(529)
    drive(off.test_client(), now_clock, 40)
    assert events(log_path, "ops_alert") == []


def test_evaluation_is_throttled_per_process(redis_server: Any, sim: Simulator, now_clock: FakeClock,
                                            log_path: Path) -> None:
    redis_server.flush()
    app = ops_app("throttle_app", redis_server.url, sim, now_clock, log_path, CLAUDE_ALERT_EVAL_INTERVAL=5,
                  CLAUDE_ALERT_COST_SPIKE=None)
    client = app.test_client()
    redis_server.client.config_resetstat()
    drive(client, now_clock, 20, path="/plain", step=1.0)
    stats = redis_server.client.info("commandstats")
    # An evaluation reads the window's two minute buckets and the alert states: 3 HGETALL, at t = 0, 5, 10, 15.
    assert stats["cmdstat_hgetall"]["calls"] == 4 * 3


@pytest.mark.parametrize(("key", "value"), [("CLAUDE_ALERT_WINDOW", 30), ("CLAUDE_ALERT_ERROR_RATE", 1.5),
                                            ("CLAUDE_ALERT_MIN_CALLS", 0), ("CLAUDE_DASHBOARD_PREFIX", "claude"),
                                            ("CLAUDE_ROLLUP_RETENTION", 60)])
def test_bad_alert_settings_are_refused(make_app: Callable[..., Flask], key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        make_app(**{key: value})


def test_window_and_quantile_arithmetic() -> None:
    # A 300 s window at 10 s past a minute: the current minute, four whole ones, 5/6 of the oldest.
    buckets = window_minutes(600.0 * 60 + 10, 300)
    assert [m for m, _ in buckets] == list(range(595, 601))
    assert buckets[0][1] == pytest.approx(50 / 60) and all(w == 1.0 for _, w in buckets[1:])
    counts = [0.0] * (len(LATENCY_BUCKETS) + 1)
    counts[10] = 100  # every call between 5.12 and 10.24 s
    assert histogram_quantile(0.5, counts) == pytest.approx(5.12 + 0.5 * 5.12)
    counts[-1] = 100
    assert histogram_quantile(0.99, counts) == LATENCY_BUCKETS[-1]
    assert histogram_quantile(0.5, [0.0] * 15) is None


def test_batch_results_are_counted_once(storage_uri: str, sim: Simulator, now_clock: FakeClock,
                                        log_path: Path) -> None:
    app = ops_app("batch_app", storage_uri, sim, now_clock, log_path, CLAUDE_DAILY_BUDGET_USD=1.0)
    requests = [{"custom_id": f"r{i}", "params": {"model": "claude-haiku-4-5", "max_tokens": 50,
                                                  "messages": [{"role": "user", "content": f"item {i}"}]}}
                for i in range(3)]
    state = app.extensions["claude"]
    with app.app_context():
        batch = state.messages.batches.create(requests=requests)
        while state.messages.batches.retrieve(batch.id).processing_status != "ended":
            pass
        list(state.messages.batches.results(batch.id))
        list(state.messages.batches.results(batch.id))  # read again: nothing counted twice
    lines = [e for e in events(log_path, "claude_api_call") if e.get("batch_id") == batch.id]
    totals = state.rollups.read(totals=True).totals
    assert totals["c|-|claude-haiku-4-5"] == len(lines) == 3
    # Each call to the nearest micro-dollar, priced from its logged usage (the log's 8-place cost_usd can
    # sit a hair off a half micro-dollar: haiku's batch input is half a micro-dollar a token).
    costs = [state.prices.cost(e["model"], e, batch=True).usd for e in lines]
    assert costs == pytest.approx([e["cost_usd"] for e in lines], abs=1e-8)
    assert totals["u|-|claude-haiku-4-5"] == sum(to_micro(c) for c in costs)
    assert not any(k.startswith("l:") for k in totals)  # no latency of their own: not in the histogram
