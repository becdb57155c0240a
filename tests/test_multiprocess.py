"""Claims about many processes, checked with real gunicorn workers sharing a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from flask_claude.pricing import PriceTable

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


class Gunicorn:
    def __init__(self, env: dict[str, str], workers: int = 4) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--worker-class", "gthread",
             "--threads", "8", "--bind", f"127.0.0.1:{self.port}", "--log-level", "warning",
             "tests.gunicorn_app:create_app()"],
            cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while True:  # ready when every worker can answer; bounded
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError("gunicorn did not start") from None
                time.sleep(0.05)

    def post(self, path: str) -> int:
        request = urllib.request.Request(f"{self.base}{path}", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def gunicorn(redis_url: str, tmp_path: Path) -> Iterator[Any]:
    servers: list[Gunicorn] = []

    def start(**env: str) -> Gunicorn:
        server = Gunicorn({"TEST_REDIS_URL": redis_url, "TEST_LOG_PATH": str(tmp_path / "calls.jsonl"), **env})
        servers.append(server)
        return server

    start.log_path = tmp_path / "calls.jsonl"  # type: ignore[attr-defined]
    yield start
    for server in servers:
        server.stop()


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_four_workers_200_concurrent_requests_exactly_10_pass(gunicorn: Any) -> None:
    server = gunicorn()
    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(lambda _: server.post("/limited"), range(200)))
    counts = Counter(statuses)
    print(f"\n4 workers, 200 concurrent requests against 10/minute: {dict(counts)}")
    assert counts == {200: 10, 429: 190}
    calls = [e for e in _events(gunicorn.log_path) if e["event"] == "claude_api_call"]
    assert len(calls) == 10


def test_four_workers_64_concurrent_calls_never_overspend_the_global_budget(gunicorn: Any) -> None:
    budget = 0.03
    server = gunicorn(TEST_BUDGET_USD=str(budget), TEST_SIM_LATENCY="0.02")
    with ThreadPoolExecutor(max_workers=64) as pool:
        statuses = list(pool.map(lambda _: server.post("/spend"), range(256)))
    while server.post("/spend") == 200:  # let the last bit of budget be spent
        pass
    events = _events(gunicorn.log_path)
    spent = sum(e["cost_usd"] for e in events if e["event"] in ("claude_api_call", "claude_api_error"))
    worst = PriceTable().worst_case_usd(["claude-haiku-4-5"], 64, 120)
    print(f"\nbudget ${budget:.4f}  settled ${spent:.6f}  unused ${budget - spent:.6f}  "
          f"one call's worst case ${worst:.6f}  ok={statuses.count(200)} degraded={statuses.count(503)}")
    assert spent <= budget
    assert budget - spent < worst
    alerts = Counter(e["threshold"] for e in events if e["event"] == "budget_alert")
    assert alerts == {0.5: 1, 0.8: 1, 1.0: 1}
    degraded = [e for e in events if e["event"] == "feature_degraded"]
    assert degraded and {e["reason"] for e in degraded} == {"budget_exhausted"}


def test_a_settlement_written_behind_lands_when_the_worker_stops_right_after(gunicorn: Any, redis_url: str) -> None:
    """The settlement waits for a later round trip; a worker stopped cleanly writes it on its way out."""
    import datetime
    import math

    import redis

    server = gunicorn(TEST_BUDGET_USD="5", TEST_CLAUDE_SETTLE_DELAY="60")  # no flusher before the stop
    assert server.post("/spend") == 200
    server.stop()  # SIGTERM right after the response: gunicorn's graceful exit
    assert server.process.returncode == 0
    day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    client = redis.Redis.from_url(redis_url)
    spent = int(client.hget(f"{{fc:flask-claude}}:usd:global:day:{day}", "spent") or 0)
    [line] = [json.loads(x) for x in gunicorn.log_path.read_text().splitlines()
              if json.loads(x)["event"] == "claude_api_call"]
    assert spent == math.ceil(line["cost_usd"] * 1_000_000) > 0  # budgets count whole micro-dollars, rounded up
    fields = client.hgetall(f"{{fc:flask-claude}}:usd:global:day:{day}")
    # the hold was replaced by the cost, not left to lapse: nothing held, the call's id marked settled
    assert int(fields[b"held"]) == 0 and [v for k, v in fields.items() if k.startswith(b"r:")] == [b"-"]


def test_the_rollups_a_worker_summed_land_complete_when_it_stops_right_after(gunicorn: Any, redis_url: str) -> None:
    """Each worker sums its calls' rollups and writes them at most once per interval; a clean stop
    (gunicorn's graceful exit runs the atexit flush) writes what every worker still holds."""
    import redis

    from flask_claude.rollups import split_field, to_micro

    server = gunicorn(TEST_CLAUDE_SETTLE_DELAY="60", TEST_CLAUDE_ROLLUP_FLUSH_INTERVAL="60")  # nothing due
    with ThreadPoolExecutor(max_workers=8) as pool:  # several workers get some
        assert list(pool.map(lambda _: server.post("/spend"), range(24))) == [200] * 24
    server.stop()
    assert server.process.returncode == 0
    lines = [e for e in _events(gunicorn.log_path) if e["event"] == "claude_api_call"]
    assert len(lines) == 24
    client = redis.Redis.from_url(redis_url)
    sums: Counter[str] = Counter()
    for name, amount in client.hgetall("{fc:flask-claude}:roll:total").items():
        metric, feature, _ = split_field(name.decode())
        if feature == "spend":
            sums[metric] += int(amount)
    assert sums["c"] == 24
    assert sums["u"] == sum(to_micro(e["cost_usd"]) for e in lines) > 0
    assert sums["ti"] == sum(e["input_tokens"] for e in lines)
    assert sums["to"] == sum(e["output_tokens"] for e in lines)
    minutes = Counter[str]()
    for key in client.scan_iter("{fc:flask-claude}:roll:m:*"):
        minutes.update({k.decode(): int(v) for k, v in client.hgetall(key).items()})
    assert minutes["c|spend|claude-haiku-4-5"] == 24  # the minute buckets too, whichever minute(s) the calls fell in
