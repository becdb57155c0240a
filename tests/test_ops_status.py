"""``flask claude status`` reads the shared rollups: what one worker did, every worker's status shows."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flask import Flask

from flask_claude.simulator import Simulator

from .conftest import FakeClock
from .test_ops_alerts import drive, events, ops_app


def status_of(app: Flask, *args: str) -> tuple[int, Any]:
    result = app.test_cli_runner().invoke(args=["claude", "status", *args])
    assert "Traceback" not in result.output
    return result.exit_code, (json.loads(result.output) if "--json" in args else result.output)


def test_status_shows_the_rollups_every_worker_shares(redis_url: str, sim: Simulator, clock: FakeClock,
                                                      tmp_path: Path) -> None:
    clock.now = time.time()
    log_path = tmp_path / "calls.jsonl"
    worker = ops_app("status_ops_app", redis_url, sim, clock, log_path, CLAUDE_ALERT_MIN_CALLS=5)
    client = worker.test_client()
    drive(client, clock, 6, step=2.0)
    sim.fail(529, rate=0.5)
    drive(client, clock, 6, step=2.0)
    sim.reset()
    calls = events(log_path, "claude_api_call")
    errors = events(log_path, "claude_api_error")
    assert len(errors) == 3

    worker.extensions["claude"].store.flush()  # what its flusher does within CLAUDE_SETTLE_DELAY (50 ms)
    other = ops_app("status_ops_app", redis_url, sim, clock, tmp_path / "other.jsonl")  # another process
    code, status = status_of(other, "--json")
    assert code == 0
    ops = status["ops"]
    assert ops["window"]["seconds"] == 60
    day = ops["last_24h"]
    assert day["calls"] == len(calls) + len(errors) == 12
    assert day["errors"] == 3 and day["errors_by_type"] == {"overloaded_error": 3}
    assert day["cost_usd"] == round(sum(e["cost_usd"] for e in calls + errors), 6)
    assert day["degraded"] == {"upstream_unavailable": 3}
    assert day["by_feature"]["free"]["calls"] == 12
    assert [a["alert"] for a in ops["alerts"]["firing"]] == ["error_rate"]
    assert ops["window"]["calls"] > 0 and ops["window"]["latency_p95_s"] is not None
    assert "last_hour" not in ops  # the CLI leaves the chart series to the dashboard

    _, own = status_of(worker, "--json")
    for summary in (own["ops"], ops):
        summary["alerts"].pop("thresholds")  # the two apps were configured differently; the numbers are shared
    assert own["ops"] == ops

    code, text = status_of(other)
    assert code == 0
    assert "Calls (all workers), last 24 h: 12 calls, 3 errors (25%)" in text
    assert "Alerts firing: error_rate" in text
    assert "free: 12 calls, 3 errors" in text and "degraded: upstream_unavailable 3" in text
