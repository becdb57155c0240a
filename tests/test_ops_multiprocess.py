"""Ops alerts, metrics and the dashboard under 4 real gunicorn workers sharing a real Redis."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from flask_claude.simulator import Simulator, SimulatorServer

from .conftest import wait_for
from .test_multiprocess import Gunicorn, gunicorn  # noqa: F401  (the fixture)
from .test_prometheus import samples, total

ALERT_ENV = {"TEST_CLAUDE_ALERT_WINDOW": "60", "TEST_CLAUDE_ALERT_MIN_CALLS": "20",
             "TEST_CLAUDE_ALERT_EVAL_INTERVAL": "0.2"}


@pytest.fixture
def sim_server() -> Iterator[SimulatorServer]:
    server = Simulator().serve()
    yield server
    server.shutdown()


def _events(path: Path, name: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == name]


def _burst(server: Gunicorn, n: int, path: str = "/spend") -> list[int]:
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda _: server.post(path), range(n)))


def test_error_rate_alert_fires_once_across_four_workers_and_resolves(gunicorn: Any,  # noqa: F811
                                                                      sim_server: SimulatorServer) -> None:
    server = gunicorn(TEST_SIM_URL=sim_server.url, **ALERT_ENV)
    log = gunicorn.log_path
    sim_server.simulator.fail(529, rate=0.1)  # every tenth call fails upstream, whichever worker makes it

    def firing() -> bool:
        _burst(server, 20)
        return any(e["state"] == "firing" for e in _events(log, "ops_alert"))

    assert wait_for(firing, timeout=15)
    sim_server.simulator.reset()

    def resolved() -> bool:
        _burst(server, 40)
        return any(e["state"] == "resolved" for e in _events(log, "ops_alert"))

    assert wait_for(resolved, timeout=15)
    alerts = [(e["alert"], e["state"]) for e in _events(log, "ops_alert")]
    print(f"\n4 workers: {len(_events(log, 'claude_api_call'))} calls, "
          f"{len(_events(log, 'claude_api_error'))} errors, alerts {alerts}")
    assert alerts == [("error_rate", "firing"), ("error_rate", "resolved")]
    [fired] = [e for e in _events(log, "ops_alert") if e["state"] == "firing"]
    assert fired["value"] > 0.05 and fired["window_s"] == 60


def test_latency_injection_fires_latency_p95_once(gunicorn: Any, sim_server: SimulatorServer) -> None:  # noqa: F811
    server = gunicorn(TEST_SIM_URL=sim_server.url, TEST_CLAUDE_ALERT_LATENCY_P95="0.1", **ALERT_ENV)
    assert set(_burst(server, 20)) == {200}
    sim_server.simulator.latency(0.2)

    def firing() -> bool:
        _burst(server, 4)
        return bool(_events(gunicorn.log_path, "ops_alert"))

    assert wait_for(firing, timeout=15)
    _burst(server, 4)
    alerts = [(e["alert"], e["state"]) for e in _events(gunicorn.log_path, "ops_alert")]
    assert alerts == [("latency_p95", "firing")]


def test_every_worker_scrapes_the_same_totals_and_they_match_the_log(gunicorn: Any,  # noqa: F811
                                                                    sim_server: SimulatorServer) -> None:
    server = gunicorn(TEST_SIM_URL=sim_server.url, TEST_CLAUDE_ALERT_WINDOW="None")
    sim_server.simulator.fail(529, rate=0.1)
    _burst(server, 60)
    logged = len(_events(gunicorn.log_path, "claude_api_call")) + len(_events(gunicorn.log_path, "claude_api_error"))

    def scrape() -> str:
        with urllib.request.urlopen(f"{server.base}/metrics", timeout=5) as response:
            return str(response.read().decode())

    # The worker that answers a scrape writes its own rollups first; each other worker writes the sums
    # of its calls within CLAUDE_ROLLUP_FLUSH_INTERVAL (1 s) + CLAUDE_SETTLE_DELAY of its first unwritten
    # call (its flusher thread, no request coming): poll until every worker's have landed.
    assert wait_for(lambda: sum(total(samples(scrape()), "flask_claude_calls_total", outcome=o)
                                for o in ("ok", "error")) == logged, timeout=10)
    pages = set()
    for _ in range(12):  # several connections: gunicorn hands them to different workers
        with urllib.request.urlopen(f"{server.base}/metrics", timeout=5) as response:
            pages.add(response.read().decode())
    assert len(pages) == 1  # whichever worker answers, the same numbers: no double counting
    found = samples(pages.pop())
    calls = _events(gunicorn.log_path, "claude_api_call")
    errors = _events(gunicorn.log_path, "claude_api_error")
    assert total(found, "flask_claude_calls_total", outcome="ok") == len(calls)
    assert total(found, "flask_claude_calls_total", outcome="error") == len(errors) == 6
    cost_micro = round(total(found, "flask_claude_cost_usd_total") * 1_000_000)
    assert cost_micro == sum(round(e["cost_usd"] * 1_000_000) for e in calls + errors)


def test_quiet_traffic_pages_nobody_and_a_burst_of_spend_fires_one_cost_spike(
        gunicorn: Any, sim_server: SimulatorServer) -> None:  # noqa: F811
    server = gunicorn(TEST_SIM_URL=sim_server.url, TEST_CLAUDE_ALERT_COST_SPIKE_MIN_USD="0.002", **ALERT_ENV)
    log = gunicorn.log_path
    assert _burst(server, 3) == [200] * 3  # a fraction of a cent: under the floor
    assert _events(log, "ops_alert") == []

    def spiking() -> bool:
        _burst(server, 16)
        return bool(_events(log, "ops_alert"))

    assert wait_for(spiking, timeout=15)
    _burst(server, 16)
    alerts = _events(log, "ops_alert")
    assert [(e["alert"], e["state"]) for e in alerts] == [("cost_spike", "firing")]
    assert alerts[0]["value"] > alerts[0]["threshold"] >= 0.002
