"""The ops dashboard: closed by default, the shared numbers as HTML and JSON, and a real Chromium's view."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request

from flask_claude import Claude, ai_feature, budgeted, fallback_to
from flask_claude.flags import StaticFlags
from flask_claude.rollups import to_micro
from flask_claude.simulator import Simulator

from .conftest import FakeClock, serving
from .test_browser import page  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["claude-opus-4-7", "claude-sonnet-4-6"]


def dash_app(storage_uri: str, sim: Simulator, clock: FakeClock | None, log_path: Path, *,
             access: Callable[[], Any] | None = None, **config: Any) -> Flask:
    app = Flask("dash_app")
    app.config.update({"CLAUDE_SIMULATE": True, "CLAUDE_STORAGE_URI": storage_uri, "CLAUDE_MODELS": MODELS,
                       "CLAUDE_MAX_RETRIES": 0, "CLAUDE_LOG_PATH": str(log_path), "CLAUDE_DASHBOARD": True,
                       "CLAUDE_DAILY_BUDGET_USD": 2.0, "CLAUDE_FEATURE_BUDGETS_USD": {"chat": 0.5},
                       "CLAUDE_FLAGS": StaticFlags({"ai-translate": False}), "CLAUDE_BREAKER_MIN_CALLS": 3,
                       "CLAUDE_BREAKER_COOLDOWN": 3600, "CLAUDE_ALERT_WINDOW": 120, "CLAUDE_ALERT_MIN_CALLS": 5,
                       **config})
    claude = Claude(app, simulator=sim, **({"clock": clock} if clock else {}))
    if access is not None:
        claude.dashboard_access(access)

    def view(name: str, models: list[str] | None = None, **budget: Any) -> None:
        @ai_feature(name, max_tokens=120, models=models)
        @budgeted(**budget)
        @fallback_to({"text": None})
        def run() -> Any:
            msg = claude.messages.create(messages=[{"role": "user", "content": f"{name}: the release notes"}])
            return {"text": msg.content[0].text}

        app.add_url_rule(f"/{name}", name, run, methods=["POST"])

    view("summarize", requests="1000/minute")
    view("classify", models=["claude-haiku-4-5"], usd="1/day")
    view("chat")
    view("translate")
    return app


def lines(path: Path, *names: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] in names]


def test_closed_unless_enabled_and_let_in(sim: Simulator, clock: FakeClock, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    off = dash_app("memory://", sim, clock, log, CLAUDE_DASHBOARD=False)
    assert off.test_client().get("/claude/").status_code == 404
    nobody = dash_app("memory://", sim, clock, log)  # enabled, no access callable: closed to everyone
    for path in ("/claude/", "/claude/api/summary", "/claude/?fragment=1"):
        response = nobody.test_client().get(path)
        assert response.status_code == 403 and b"dashboard_access" in response.data
    refused = dash_app("memory://", sim, clock, log, access=lambda: request.headers.get("X-Ops") == "yes")
    assert refused.test_client().get("/claude/api/summary").status_code == 403
    assert refused.test_client().get("/claude/api/summary", headers={"X-Ops": "yes"}).status_code == 200
    moved = dash_app("memory://", sim, clock, log, access=lambda: True, CLAUDE_DASHBOARD_PREFIX="/ops/ai")
    assert moved.test_client().get("/ops/ai/").status_code == 200
    assert moved.test_client().get("/claude/").status_code == 404


def _traffic(app: Flask, sim: Simulator) -> None:
    client = app.test_client()
    for _ in range(6):
        assert client.post("/summarize").status_code == 200
        assert client.post("/classify").status_code == 200
    sim.fail(529, model="claude-opus-4-7")  # the storm: opus fails, sonnet answers, opus's breaker opens
    for _ in range(5):
        assert client.post("/summarize").status_code == 200
    sim.fail(529)
    assert client.post("/chat").headers["X-Claude-Degraded"] == "upstream_unavailable"
    sim.reset()
    assert client.post("/translate").headers["X-Claude-Degraded"] == "feature_disabled"


def test_two_processes_on_one_redis_show_the_same_numbers_as_the_log(redis_url: str, sim: Simulator,
                                                                     clock: FakeClock, tmp_path: Path) -> None:
    clock.now = time.time()
    log = tmp_path / "calls.jsonl"
    worker = dash_app(redis_url, sim, clock, log, access=lambda: True)
    _traffic(worker, sim)
    other = dash_app(redis_url, sim, clock, tmp_path / "other.jsonl", access=lambda: True)
    worker.extensions["claude"].ops_alerts.evaluate()  # settle the shared alert state first: 1 error in 18 fires

    seen = [app.test_client().get("/claude/api/summary").get_json() for app in (worker, other)]
    assert seen[0] == seen[1]
    summary = seen[0]
    calls = lines(log, "claude_api_call", "claude_api_error")
    day = summary["ops"]["last_24h"]
    assert day["calls"] == len(calls) == 18
    assert day["errors"] == len(lines(log, "claude_api_error")) == 1
    assert round(day["cost_usd"] * 1_000_000) == sum(to_micro(e["cost_usd"]) for e in calls)
    assert day["degraded"] == {"feature_disabled": 1, "upstream_unavailable": 1}
    assert summary["breakers"]["claude-opus-4-7"] == "open"
    assert [a["alert"] for a in summary["ops"]["alerts"]["firing"]] == ["error_rate"]
    assert summary["features"]["translate"]["enabled"] is False
    assert [b["budget"] for b in summary["budgets"]["items"]] == ["global daily budget", "feature chat daily budget"]
    points = [p for p in summary["ops"]["last_hour"] if p["calls"]]
    assert len(summary["ops"]["last_hour"]) == 60 and sum(p["calls"] for p in points) == 18
    assert points[-1]["latency_p95_s"] is not None
    page_html = worker.test_client().get("/claude/").get_data(as_text=True)
    assert 'id="latency-chart"' in page_html and "<circle" in page_html and "http" not in page_html.split(
        "<script>")[0].replace('xmlns="http', "")  # nothing fetched from elsewhere


@pytest.fixture
def served(redis_url: str, sim: Simulator, clock: FakeClock, tmp_path: Path) -> Iterator[tuple[str, Flask]]:
    app = dash_app(redis_url, sim, clock, tmp_path / "calls.jsonl",
                   access=lambda: request.cookies.get("ops") == "let-me-in")
    with serving(app) as base:
        yield base, app


def _an_hour_of_traffic(app: Flask, sim: Simulator, clock: FakeClock) -> None:
    """A day of light traffic, then the last half hour minute by minute: a 529 storm on Opus from
    12 minutes ago (fallbacks, its breaker opens), and every model failing some calls for the last 3."""
    client = app.test_client()
    now = time.time()
    for hours_ago in range(23, 0, -1):
        clock.now = now - hours_ago * 3600
        for path in ("/summarize", "/classify", "/chat")[: 1 + hours_ago % 3]:
            client.post(path)
    for minutes_ago in range(30, -1, -1):
        clock.now = now - minutes_ago * 60
        sim.latency(0.004 + 0.003 * (minutes_ago % 5))
        if minutes_ago == 12:
            sim.fail(529, model="claude-opus-4-7", rate=0.5)
        if minutes_ago == 3:
            sim.fail(529, rate=0.2)
        for path in ("/summarize", "/summarize", "/classify", "/chat"):
            client.post(path)
    sim.reset()
    client.post("/translate")
    clock.now = now


def test_the_dashboard_in_chromium(page: Any, served: tuple[str, Flask], sim: Simulator,  # noqa: F811
                                   clock: FakeClock, tmp_path: Path) -> None:
    url, app = served
    _an_hour_of_traffic(app, sim, clock)
    stranger = page.context.browser.new_context()  # a visitor without the cookie the app asks for
    try:
        refused = stranger.new_page().goto(url + "/claude/")
        assert refused is not None and refused.status == 403
    finally:
        stranger.close()

    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.context.add_cookies([{"name": "ops", "value": "let-me-in", "url": url}])
    response = page.goto(url + "/claude/")
    assert response is not None and response.status == 200
    assert page.locator("#latency-chart circle").count() > 10  # a point per minute with calls
    assert page.locator("#spend-chart rect.spend-bar").count() > 20
    assert "open" in page.text_content("#breakers")
    assert "error_rate" in page.text_content("#alerts-firing")
    page.evaluate("window.claudeDashboardRefresh()")
    page.wait_for_function("document.getElementById('updated').textContent.startsWith('updated')", timeout=10_000)
    assert page.locator("#latency-chart circle").count() > 10
    page.set_viewport_size({"width": 1280, "height": 1100})
    # UPDATE_SCREENSHOTS=1 refreshes docs/operations.md's picture; otherwise it goes to the test's temporary directory.
    target = ROOT / "docs" / "dashboard.png" if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path / "dashboard.png"
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000
    assert errors == []
    assert math.isfinite(float(page.locator("#latency-chart circle").first.get_attribute("cy")))


def test_the_example_app_lets_local_operators_in(make_example: Callable[..., Flask]) -> None:
    app = make_example()
    assert app.test_client().get("/claude/").status_code == 200
    remote = app.test_client().get("/claude/api/summary", environ_base={"REMOTE_ADDR": "203.0.113.9"})
    assert remote.status_code == 403
