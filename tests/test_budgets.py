"""Request limits and budgets on memory and on a real Redis: reservations, alerts, rollover, outages."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from flask import Flask, request

from flask_claude import Claude, ai_feature, budgeted, fallback_to
from flask_claude.budget import MICRO, period_bounds
from flask_claude.context import CallScope
from flask_claude.flags import StaticFlags
from flask_claude.simulator import Simulator
from flask_claude.testing import CallLog

from .conftest import FakeClock, RedisServer, todays_noon_utc, wait_for


def budget_app(sim: Simulator, clock: FakeClock | None, storage_uri: str, *, budget: Any = None,
               flags: StaticFlags | None = None, feature: dict[str, Any] | None = None, **config: Any) -> Flask:
    app = Flask("budgets")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=["claude-haiku-4-5"], CLAUDE_STORAGE_URI=storage_uri,
                      CLAUDE_MAX_RETRIES=0, CLAUDE_FLAGS=flags or StaticFlags(), CLAUDE_LOG_PATH=os.devnull,
                      **config)
    claude = Claude(app, simulator=sim, **({"clock": clock} if clock else {}))

    @claude.user_loader
    def user() -> str:
        return request.headers.get("X-Test-User", "alice")

    view: Callable[..., Any]

    def ask() -> Any:
        msg = claude.messages.create(max_tokens=120, messages=[{"role": "user", "content": "Write a haiku on rain."}])
        return {"text": msg.content[0].text}

    view = fallback_to({"text": None, "notice": "paused"})(ai_feature("ask", **(feature or {}))(ask))
    if budget is not None:
        view = budget(view)
    app.add_url_rule("/ask", view_func=view, methods=["POST"])
    return app


def test_request_limit_refuses_with_headers_and_refusals_cost_nothing(storage_uri: str, sim: Simulator,
                                                                     clock: FakeClock) -> None:
    app = budget_app(sim, clock, storage_uri, budget=budgeted(requests="3/minute"))
    c = app.test_client()
    statuses = [c.post("/ask").status_code for _ in range(3)]
    refused = [c.post("/ask") for _ in range(5)]
    assert statuses == [200, 200, 200]
    assert {r.status_code for r in refused} == {429}
    first = refused[0]
    assert first.headers["X-Claude-Degraded"] == "rate_limited"
    assert 1 <= int(first.headers["Retry-After"]) <= 60
    assert first.headers["RateLimit-Limit"] == "3" and first.headers["RateLimit-Remaining"] == "0"
    assert len(sim.requests) == 3
    # another user has their own window
    assert c.post("/ask", headers={"X-Test-User": "bob"}).status_code == 200
    # a minute later the window is free again: the 5 refused requests were never counted
    clock.advance(61)
    assert [c.post("/ask").status_code for _ in range(4)] == [200, 200, 200, 429]


def test_user_usd_budget_refuses_before_sending(storage_uri: str, sim: Simulator, clock: FakeClock) -> None:
    app = budget_app(sim, clock, storage_uri, budget=budgeted(usd="0.003/day"))
    c = app.test_client()
    results = [c.post("/ask") for _ in range(30)]
    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code != 200]
    assert ok and refused
    assert {r.status_code for r in refused} == {429}
    assert refused[0].headers["X-Claude-Degraded"] == "budget_exceeded"
    assert len(sim.requests) == len(ok)  # a refused call sent nothing
    state = app.extensions["claude"]
    lines, _, _ = state.budgets.budget_lines(
        _scope(state, "alice", "ask"), app.view_functions["ask"].__claude_spec__.budget, usd=0, tokens=0,
        now=clock.time())
    [(spent, reserved)] = state.store.usage([lines[0].key], clock.time())
    assert reserved == 0 and 0 < spent <= 0.003 * MICRO


def _scope(state: Any, user: str, feature: str) -> CallScope:
    return CallScope(feature=feature, user=user)


def _concurrent_posts(app: Flask, total: int, workers: int) -> list[int]:
    def one(_: int) -> int:
        return app.test_client().post("/ask", headers={"X-Test-User": f"u{_ % 7}"}).status_code

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(total)))


def test_global_budget_never_overspent_under_concurrency(storage_uri: str, sim: Simulator,
                                                         claude_log: CallLog) -> None:
    sim.latency(0.005)
    budget = 0.02
    app = budget_app(sim, None, storage_uri, CLAUDE_DAILY_BUDGET_USD=budget)
    statuses = _concurrent_posts(app, total=160, workers=32)
    # Refusals under contention are transient (others' holds); once the holds settle, the last
    # bit of budget goes to whoever asks next, until no call's worst case fits any more.
    while app.test_client().post("/ask").status_code == 200:
        pass
    state = app.extensions["claude"]
    spent_logged = claude_log.spend_usd()
    [row] = state.budgets.usage_report()
    worst = state.prices.worst_case_usd(["claude-haiku-4-5"], 200, 120)
    print(f"\n[{storage_uri.split(':')[0]}] budget ${budget:.4f} settled ${row['spent_usd']:.6f} "
          f"logged ${spent_logged:.6f} ok={statuses.count(200)} refused={statuses.count(503)}")
    assert row["spent_usd"] <= budget
    assert spent_logged == pytest.approx(row["spent_usd"], abs=1e-5)
    assert row["reserved_usd"] == 0  # no leaked reservations
    assert budget - row["spent_usd"] < worst  # used to within one call's worst case
    assert statuses.count(503) > 0 and set(statuses) <= {200, 503}


def test_alerts_fire_once_each_then_auto_kill_then_resume(storage_uri: str, sim: Simulator, clock: FakeClock,
                                                          claude_log: CallLog) -> None:
    hooked: list[dict[str, Any]] = []
    flags = StaticFlags()
    app = budget_app(sim, clock, storage_uri, flags=flags, CLAUDE_DAILY_BUDGET_USD=0.004,
                     CLAUDE_ALERT_HOOK=hooked.append)
    statuses = _concurrent_posts(app, total=60, workers=8)
    while app.test_client().post("/ask").status_code == 200:
        pass
    alerts = claude_log.events("budget_alert")
    assert sorted(a["threshold"] for a in alerts) == [0.5, 0.8, 1.0]
    assert sorted(a["threshold"] for a in hooked) == [0.5, 0.8, 1.0]
    assert alerts[-1]["limit"] == 0.004 and alerts[-1]["spent"] <= 0.004
    assert 503 in statuses
    blocked = app.test_client().post("/ask")
    assert blocked.status_code == 503 and blocked.headers["X-Claude-Degraded"] == "budget_exhausted"
    assert blocked.get_json() == {"text": None, "notice": "paused"}
    # an operator raises the budget through the number flag: the next request runs
    flags.set("ai-daily-budget-usd", 1.0)
    assert app.test_client().post("/ask").status_code == 200
    again = _concurrent_posts(app, total=20, workers=4)
    assert again.count(200) == 20
    assert len([a for a in claude_log.events("budget_alert") if a["limit"] == 0.004]) == len(alerts)


def test_calendar_day_rollover_resets_budgets(storage_uri: str, sim: Simulator, clock: FakeClock) -> None:
    midnight = todays_noon_utc() + 12 * 3600  # the coming midnight, UTC (the default budget timezone)
    clock.now = midnight - 30
    app = budget_app(sim, clock, storage_uri, budget=budgeted(usd="0.002/day", tokens="100000/day"))
    c = app.test_client()
    before = [c.post("/ask").status_code for _ in range(20)]
    assert 429 in before
    clock.advance(31)  # 00:00:01 the next day
    assert c.post("/ask").status_code == 200


@pytest.mark.parametrize("skew_days", [-365, 365])
def test_redis_expiries_are_relative_to_the_apps_clock(redis_url: str, redis_server: RedisServer, sim: Simulator,
                                                       clock: FakeClock, skew_days: int) -> None:
    """A host whose clock is a year off Redis's (or a test's fake clock) keeps every key alive.

    Each key's time to live must be the time left in its period (or window) on the app's own clock
    plus the grace, whatever Redis's clock says: no expiry may come from an absolute app-side time.
    """
    clock.now += skew_days * 86400
    app = budget_app(sim, clock, redis_url, budget=budgeted(requests="5/minute", usd="0.002/day"),
                     CLAUDE_DAILY_BUDGET_USD=1.0, CLAUDE_BUDGET_ALERTS=[0.0001, 1.0])
    c = app.test_client()
    assert [c.post("/ask").status_code for _ in range(2)] == [200, 200]
    ttls = {key.decode(): redis_server.client.pttl(key) for key in redis_server.client.keys("*")}
    budgets = {k: t for k, t in ttls.items() if ":usd:" in k and "|alert|" not in k}
    alerts = {k: t for k, t in ttls.items() if "|alert|" in k}
    windows = {k: t for k, t in ttls.items() if ":req:" in k}
    assert budgets and alerts and windows, ttls
    left_ms = (todays_noon_utc() + 12 * 3600 - todays_noon_utc()) * 1000  # noon to midnight, on the app's clock
    for ttl in budgets.values():  # the period's time left plus one day of grace
        assert left_ms + 86_400_000 - 5_000 <= ttl <= left_ms + 86_400_000 + 1_000
    for ttl in alerts.values():  # an alert's claim lasts to the period's end plus a second
        assert left_ms - 5_000 <= ttl <= left_ms + 1_000
    for ttl in windows.values():  # a request window lasts its length plus a second
        assert 0 < ttl <= 61_000


def test_timezone_days_and_periods() -> None:
    ny = ZoneInfo("America/New_York")
    now = datetime(2026, 11, 23, 3, 0, tzinfo=UTC).timestamp()  # 22:00 on the 22nd in New York
    pid, end = period_bounds("day", 1, now, ny)
    assert pid == "2026-11-22"
    assert end == datetime(2026, 11, 23, 5, 0, tzinfo=UTC).timestamp()
    assert period_bounds("month", 1, now, ZoneInfo("UTC"))[0] == "2026-11"
    _, hour_end = period_bounds("hour", 1, now, ZoneInfo("UTC"))
    assert hour_end - now == 3600


def test_leaked_reservation_of_a_dead_worker_is_released(storage_uri: str, sim: Simulator,
                                                         clock: FakeClock) -> None:
    app = budget_app(sim, clock, storage_uri, CLAUDE_DAILY_BUDGET_USD=0.002, CLAUDE_DEADLINE=10)
    state = app.extensions["claude"]
    scope = CallScope(feature="ask", user="ghost")
    params = {"messages": [{"role": "user", "content": "x" * 300}]}
    held, _ = state.budgets.begin(scope, ["claude-haiku-4-5"], params, 300)  # the worker "dies" here
    assert held is not None
    busy = app.test_client().post("/ask")
    # the room is held, not spent: "busy" with a short Retry-After, after waiting CLAUDE_BUDGET_WAIT
    assert busy.headers.get("X-Claude-Degraded") == "budget_busy" and busy.headers["Retry-After"] == "1"
    assert 1.5 <= sum(clock.sleeps) <= 2.5
    clock.advance(10 + 31)  # past the deadline and the grace period
    assert app.test_client().post("/ask").status_code == 200


@pytest.mark.redis  # starts a redis-server of its own
@pytest.mark.parametrize("policy", ["open", "closed"])
def test_redis_outage_follows_the_policy_without_500_or_hang(policy: str, sim: Simulator,
                                                            claude_log: CallLog) -> None:
    server = RedisServer()
    try:
        app = budget_app(sim, None, server.url, budget=budgeted(requests="100/minute", usd="1/day"),
                         CLAUDE_DAILY_BUDGET_USD=5, CLAUDE_STORAGE_FAILURE=policy,
                         CLAUDE_STORAGE_SOCKET_TIMEOUT=0.25)
        c = app.test_client()
        assert c.post("/ask").status_code == 200
        os.kill(server.process.pid, signal.SIGSTOP)  # hung, not refused: sockets wait for the timeout
        try:
            started = time.monotonic()
            hung = c.post("/ask")
            hung_elapsed = time.monotonic() - started
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()  # now refused outright
        started = time.monotonic()
        down = c.post("/ask")
        down_elapsed = time.monotonic() - started
    finally:
        server.stop()
    for response in (hung, down):
        if policy == "open":
            assert response.status_code == 200 and "X-Claude-Degraded" not in response.headers
        else:
            assert response.status_code == 503
            assert response.headers["X-Claude-Degraded"] == "storage_unavailable"
            assert response.get_json() == {"text": None, "notice": "paused"}
    # each storage step waits at most the socket timeout (a few steps per request)
    assert hung_elapsed < 2.0, hung_elapsed
    assert down_elapsed < 2.0, down_elapsed
    if policy == "open":
        assert claude_log.events("storage_unavailable")


def test_breaker_state_is_shared_between_apps_on_one_redis(redis_url: str, clock: FakeClock) -> None:
    """Two apps on one Redis stand for two workers: one opens the breaker, the other skips the model."""
    sims = [Simulator(), Simulator()]
    apps = []
    for i, s in enumerate(sims):
        app = Flask(f"worker{i}")
        app.import_name = "shared_app"  # the key prefix: both "workers" run the same app
        app.config.update(CLAUDE_SIMULATE=True, CLAUDE_STORAGE_URI=redis_url, CLAUDE_MAX_RETRIES=0,
                          CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"], CLAUDE_BREAKER_MIN_CALLS=3)
        Claude(app, simulator=s, clock=clock)
        apps.append(app)
    sims[0].fail(529, model="claude-opus-4-7")

    def call(app: Flask) -> str:
        with app.app_context():
            return str(app.extensions["claude"].messages.create(
                max_tokens=10, messages=[{"role": "user", "content": "hi"}]).model)

    assert [call(apps[0]) for _ in range(3)] == ["claude-sonnet-4-6"] * 3
    assert call(apps[1]) == "claude-sonnet-4-6"
    assert sims[1].requests_for("claude-opus-4-7") == []
    assert apps[1].extensions["claude"].breaker.state("claude-opus-4-7", clock.time()) == "open"


def test_threads_share_one_request_window(storage_uri: str, sim: Simulator) -> None:
    app = budget_app(sim, None, storage_uri, budget=budgeted(requests="10/minute"))
    barrier = threading.Barrier(8)
    results: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        client = app.test_client()
        barrier.wait()
        for _ in range(5):
            code = client.post("/ask").status_code
            with lock:
                results.append(code)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(200) == 10 and results.count(429) == 30


def test_raw_user_keys_never_reach_logs_alerts_or_redis_keys(redis_url: str, redis_server: RedisServer,
                                                              sim: Simulator, claude_log: CallLog) -> None:
    app = budget_app(sim, None, redis_url, budget=budgeted(requests="50/minute", usd="0.002/day"),
                     CLAUDE_DAILY_BUDGET_USD=0.01)
    c = app.test_client()
    for _ in range(30):
        c.post("/ask", headers={"X-Test-User": "ann@example.com"})
    text = json.dumps(claude_log.records)
    assert "ann@example.com" not in text
    assert claude_log.events("limit_exceeded") or claude_log.events("feature_degraded")
    assert all("user:" not in a["budget"] or "ann" not in a["budget"] for a in claude_log.events("budget_alert"))
    keys = [k.decode() for k in redis_server.client.keys("*")]
    assert keys and not any("ann" in k for k in keys)
    # per-user budgets refuse quietly: only app-wide budgets raise alerts
    assert all(a["budget"].startswith(("global", "feature")) for a in claude_log.events("budget_alert"))


@pytest.mark.parametrize(("admission", "feature", "trips"), [
    ("before_view", {"max_input_chars": 2000}, 1),  # admission + the call's hold; the settlement rides along
    ("before_view", {}, 2),  # admission before the view, then the call's hold
    ("with_first_call", {}, 1),  # admission with the call's hold
])
def test_synchronous_round_trips_per_guarded_request(redis_url: str, redis_server: RedisServer, sim: Simulator,
                                                     admission: str, feature: dict[str, Any], trips: int) -> None:
    """Counted by Redis itself (reads of client sockets): the settlement is written behind, in the
    same round trip as the next request's admission, so a single-call request waits for ``trips``."""
    app = budget_app(sim, None, redis_url, budget=budgeted(requests="100/minute", tokens="1000000/day",
                                                           usd="5/day"), CLAUDE_DAILY_BUDGET_USD=50,
                     CLAUDE_FEATURE_BUDGETS_USD={"ask": 10}, CLAUDE_ADMISSION=admission, feature=feature,
                     CLAUDE_SETTLE_DELAY=30,  # no flusher during the count: only what requests wait for
                     CLAUDE_ALERT_EVAL_INTERVAL=3600)  # nor the ops alerts' read, every 5 s by default
    c = app.test_client()
    for _ in range(3):  # warm-up: sockets open, both scripts loaded (a settlement is first sent a request later)
        assert c.post("/ask").status_code == 200

    def reads() -> int:
        return int(redis_server.client.info("stats")["total_reads_processed"])

    before = reads()
    for _ in range(10):
        assert c.post("/ask").status_code == 200
    # - 1: the INFO read itself. The count is the server's: a flusher thread of an earlier test's app
    # may add a read, never one per request.
    assert 10 * trips <= reads() - before - 1 <= 10 * trips + 1
    state = app.extensions["claude"]
    usage = {item["budget"]: item for item in state.budgets.usage_report()}  # flushes what is waiting
    assert usage["global daily budget"]["reserved_usd"] == 0
    assert usage["global daily budget"]["spent_usd"] > 0


@pytest.mark.parametrize(("limited", "feature"), [(True, {"max_input_chars": 2000}), (True, {}), (False, {})])
def test_without_a_budget_a_request_costs_one_round_trip(redis_url: str, redis_server: RedisServer, sim: Simulator,
                                                         limited: bool, feature: dict[str, Any]) -> None:
    """No budget to hold on: the admission before the view reads the first model's breaker, so the
    call needs no step of its own (it made a second round trip, breaker_allow, before); with no
    limit either, the call reads it in a step of its own, which the last settlement rides on."""
    app = budget_app(sim, None, redis_url, budget=budgeted(requests="100/minute") if limited else None,
                     feature=feature, CLAUDE_SETTLE_DELAY=30, CLAUDE_ALERT_EVAL_INTERVAL=3600)
    c = app.test_client()
    for _ in range(3):
        assert c.post("/ask").status_code == 200
    before = int(redis_server.client.info("stats")["total_reads_processed"])
    for _ in range(10):
        assert c.post("/ask").status_code == 200
    assert 10 <= int(redis_server.client.info("stats")["total_reads_processed"]) - before - 1 <= 11
    # The breaker read is real: once the model's breaker is open, the call is not sent to it.
    state = app.extensions["claude"]
    model = state.settings.models[0]
    sim.fail(529, model=model)
    for _ in range(40):  # the 13 successes above are in the breaker's window too
        c.post("/ask")
        if state.breaker.state(model, state.clock.time()) == "open":
            break
    assert state.breaker.state(model, state.clock.time()) == "open"
    to_model = len(sim.requests_for(model))
    assert c.post("/ask").headers.get("X-Claude-Degraded") == "upstream_unavailable"
    assert len(sim.requests_for(model)) == to_model


def test_one_oversized_request_does_not_switch_the_budget_off(storage_uri: str, sim: Simulator,
                                                              claude_log: CallLog) -> None:
    app = budget_app(sim, None, storage_uri, CLAUDE_DAILY_BUDGET_USD=0.05)
    state = app.extensions["claude"]
    with app.test_request_context("/"):
        from flask import g

        g.claude_scope = CallScope(feature="ask", user="mallory")
        with pytest.raises(Exception, match="no room"):
            state.messages.create(max_tokens=100, messages=[{"role": "user", "content": "x" * 200_000}])
    assert app.test_client().post("/ask").status_code == 200  # everyone else still gets answers
    assert not [a for a in claude_log.events("budget_alert") if a["threshold"] == 1.0]


@pytest.mark.redis  # starts a redis-server of its own
def test_redis_errors_other_than_connection_follow_the_policy(sim: Simulator) -> None:
    server = RedisServer()
    try:
        for policy, expected in (("open", 200), ("closed", 503)):
            server.flush()
            app = budget_app(sim, None, server.url, budget=budgeted(requests="100/minute"),
                             CLAUDE_DAILY_BUDGET_USD=5, CLAUDE_STORAGE_FAILURE=policy)
            # a replica refuses writes with READONLY, as during a sentinel failover
            server.client.execute_command("REPLICAOF", "127.0.0.1", "1")
            try:
                response = app.test_client().post("/ask")
            finally:
                server.client.execute_command("REPLICAOF", "NO", "ONE")
            assert response.status_code == expected, (policy, response.status_code)
    finally:
        server.stop()


def test_admission_before_view_keeps_refused_requests_out_of_the_view(sim: Simulator, clock: FakeClock) -> None:
    ran: list[int] = []
    app = Flask("before_view")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_FLAGS=StaticFlags(), CLAUDE_ADMISSION="before_view",
                      CLAUDE_LOG_PATH=os.devnull)
    claude = Claude(app, simulator=sim, clock=clock)

    @app.post("/write")
    @ai_feature("write")
    @budgeted(requests="1/minute")
    def write() -> str:
        ran.append(1)  # a side effect before any Claude call
        claude.messages.create(max_tokens=5, messages=[{"role": "user", "content": "x"}])
        return "ok"

    assert [app.test_client().post("/write").status_code for _ in range(3)] == [200, 429, 429]
    assert len(ran) == 1


def test_refusal_before_the_view_is_the_default(storage_uri: str, sim: Simulator, clock: FakeClock) -> None:
    """Neither a request over its limit nor one whose budget is spent runs any of the view's code."""
    ran: list[str] = []
    app = Flask("default_admission")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_FLAGS=StaticFlags(), CLAUDE_LOG_PATH=os.devnull,
                      CLAUDE_STORAGE_URI=storage_uri, CLAUDE_MODELS=["claude-haiku-4-5"],
                      CLAUDE_FEATURE_BUDGETS_USD={"spend": 0.005})
    claude = Claude(app, simulator=sim, clock=clock)

    @app.post("/write")
    @ai_feature("write")
    @budgeted(requests="1/minute")
    def write() -> str:
        ran.append("write")  # a side effect before any Claude call
        claude.messages.create(max_tokens=5, messages=[{"role": "user", "content": "x"}])
        return "ok"

    @app.post("/spend")
    @ai_feature("spend", max_input_chars=200)
    def spend() -> str:
        ran.append("spend")
        claude.messages.create(max_tokens=200, messages=[{"role": "user", "content": "y" * 150}])
        return "ok"

    c = app.test_client()
    assert [c.post("/write").status_code for _ in range(3)] == [200, 429, 429]
    assert ran == ["write"]
    statuses = [c.post("/spend").status_code for _ in range(40)]
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    refused = statuses.count(503)
    assert ran.count("spend") == len(statuses) - refused  # refused requests never entered the view


def _reserved(app: Flask) -> int:
    state = app.extensions["claude"]
    return sum(item["reserved_usd"] > 0 for item in state.budgets.usage_report())


def test_a_hold_taken_before_the_view_is_topped_up_or_given_back(storage_uri: str, sim: Simulator,
                                                                 clock: FakeClock, claude_log: CallLog) -> None:
    """With an input bound the first call's hold rides on the admission; nothing leaks either way."""
    app = Flask("prehold")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_FLAGS=StaticFlags(), CLAUDE_LOG_PATH=os.devnull,
                      CLAUDE_STORAGE_URI=storage_uri, CLAUDE_MODELS=["claude-haiku-4-5"],
                      CLAUDE_DAILY_BUDGET_USD=5.0)
    claude = Claude(app, simulator=sim, clock=clock)
    log = claude_log

    @app.post("/ask/<mode>")
    @ai_feature("ask", max_input_chars=100)
    def ask(mode: str) -> str:
        if mode == "none":
            return "no call"
        if mode == "boom":
            raise RuntimeError("the view failed before its call")
        # a system prompt far larger than the input bound: the admission's hold cannot cover it
        system = "Answer briefly. " * (2000 if mode == "big" else 1)
        claude.messages.create(max_tokens=50, system=system, messages=[{"role": "user", "content": "hi"}])
        return "ok"

    c = app.test_client()
    for mode in ("small", "big", "none", "small", "big"):
        assert c.post(f"/ask/{mode}").status_code == 200, mode
        assert _reserved(app) == 0, mode  # every hold settled or given back
    assert c.post("/ask/boom").status_code == 500  # the app's own bug: Flask's answer, but no hold left behind
    assert _reserved(app) == 0
    spent = app.extensions["claude"].budgets.usage_report()[0]["spent_usd"]
    logged = sum(line["cost_usd"] for line in log.events("claude_api_call"))
    assert spent == pytest.approx(logged, abs=4e-6)  # micro-dollar rounding per call
    assert not log.events("reservation_exceeded")


def test_memory_store_stays_bounded_by_the_live_entries(sim: Simulator, clock: FakeClock) -> None:
    """100,000 distinct users over two days: ended periods and idle windows are dropped as time passes."""
    from flask_claude.storage import MemoryStore

    app = budget_app(sim, clock, "memory://", CLAUDE_DAILY_BUDGET_USD=1000.0)
    state = app.extensions["claude"]
    store = state.store
    assert isinstance(store, MemoryStore)
    view = budgeted(requests="10/minute", usd="1/day", tokens="100000/day")(lambda: None)
    budget_options = view.__claude_spec__.budget  # type: ignore[attr-defined]
    users, span = 100_000, 2 * 86400.0
    midnight = todays_noon_utc() + 12 * 3600
    clock.now = midnight - 86400  # the start of a day: the first half of the users fall in it
    sizes: dict[str, int] = {}
    for i in range(users):
        clock.now = midnight - 86400 + i * span / users
        scope = CallScope(feature="ask", user=f"user-{i}")
        scope.budgets = budget_options
        state.budgets.admit(scope, budget_options)
        reservation, _ = state.budgets.reserve_worst(scope, 500, 200, hold_seconds=90)
        assert reservation is not None
        state.budgets.settle(reservation, 0.0001, 120)
        if i == users // 2 - 1:
            sizes["end of day 1"] = store.size()
    sizes["end of day 2"] = store.size()
    per_day = users // 2
    # each user of the current day keeps a token and a USD budget; windows last a minute (about 35 users)
    live = 2 * per_day + 2  # + the global budget and its feature-wide line
    for when, size in sizes.items():
        assert size <= live + 200, (when, size, live)
    # and the entries really are the current day's: the day before is gone
    clock.advance(86400 + 120)
    late = CallScope(feature="ask", user="late")
    late.budgets = budget_options
    state.budgets.admit(late, budget_options)
    state.budgets.reserve_worst(late, 500, 200, hold_seconds=90)
    assert store.size() < 10


@pytest.mark.redis  # starts a redis-server of its own
def test_a_hung_redis_costs_one_timeout_per_episode_and_its_spend_is_replayed(sim: Simulator,
                                                                             claude_log: CallLog) -> None:
    """SIGSTOP: after the first request the guard stops asking Redis; SIGCONT: the spend comes back."""
    server = RedisServer()
    try:
        app = budget_app(sim, None, server.url, budget=budgeted(usd="1/day"), CLAUDE_DAILY_BUDGET_USD=5,
                         CLAUDE_STORAGE_SOCKET_TIMEOUT=0.25, CLAUDE_STORAGE_RETRY_INTERVAL=0.2)
        state = app.extensions["claude"]
        c = app.test_client()
        assert c.post("/ask").status_code == 200
        before = claude_log.spend_usd()
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            elapsed = []
            for _ in range(30):
                started = time.monotonic()
                assert c.post("/ask").status_code == 200
                elapsed.append(time.monotonic() - started)
            during = claude_log.spend_usd() - before
            started = time.monotonic()
            state.ops_alerts.evaluate()  # reads the rollups: through the same breaker, no socket wait
            assert time.monotonic() - started < 0.2
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        # the first request waits one socket timeout; the others never wait for Redis at all
        assert 0.2 <= elapsed[0] < 1.0, elapsed[0]
        later = sorted(elapsed[1:])
        assert later[len(later) // 2] < 0.05 and later[-1] < 0.2, later
        assert len(claude_log.events("storage_unavailable")) == 1  # once per episode, not per request
        assert not claude_log.events("settle_failed")
        # back: a background probe notices, and the next storage step adds what was spent meanwhile
        assert wait_for(lambda: c.post("/ask").status_code == 200 and state.store.healthy, timeout=10)
        assert c.post("/ask").status_code == 200
        assert len(claude_log.events("storage_recovered")) == 1
        # the settlements kept meanwhile landed with the first round trips that worked (a reply Redis
        # owed from before the stop may land some of them first), each once
        assert claude_log.events("spend_replayed") and during > 0
        usage = {item["budget"]: item["spent_usd"] for item in state.budgets.usage_report()}
        assert usage["global daily budget"] == pytest.approx(claude_log.spend_usd(), abs=1e-5 * 40)
    finally:
        server.stop()


def test_ratelimit_reset_is_the_time_until_a_slot_frees(storage_uri: str, sim: Simulator, clock: FakeClock) -> None:
    """``RateLimit-Reset`` on an admitted request: when its window's oldest hit leaves, not the window."""
    app = budget_app(sim, clock, storage_uri, budget=budgeted(requests="3/minute"))
    c = app.test_client()
    first = c.post("/ask")
    assert first.headers["RateLimit-Reset"] == "60" and first.headers["RateLimit-Remaining"] == "2"
    clock.advance(20)
    second = c.post("/ask")
    assert second.headers["RateLimit-Reset"] == "40" and second.headers["RateLimit-Remaining"] == "1"
    clock.advance(15)
    third = c.post("/ask")
    assert third.headers["RateLimit-Reset"] == "25" and third.headers["RateLimit-Remaining"] == "0"
