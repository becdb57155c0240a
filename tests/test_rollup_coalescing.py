"""On Redis a worker sums its calls' rollup increments and writes them at most once per interval.

What Redis ran is counted by Redis itself: keyspace notifications announce every HINCRBY and PEXPIRE
on a rollup hash, those inside our scripts included, so "one write" means each field of each hash
was incremented once for all the calls of the interval.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py

from flask_claude.rollups import GRACE_S, split_field, to_micro
from flask_claude.simulator import Simulator
from flask_claude.storage import flush_all
from flask_claude.storage.rollups import MAX_MINUTES

from .conftest import FakeClock, RedisServer, wait_for
from .test_ops_alerts import events, ops_app

TAG = "{fc:flask-claude}"
SENTINEL = "rollup-test-sentinel"


def roll_key(name: str) -> str:
    return f"{TAG}:roll:{name}"


class RollupWrites:
    """HINCRBY and PEXPIRE on rollup hashes, in the order Redis ran them (keyspace notifications)."""

    def __init__(self, url: str) -> None:
        self.client = redis_py.Redis.from_url(url)
        self.client.config_set("notify-keyspace-events", "Egh")  # key events: hash commands, generic (expire)
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe("__keyevent@*__:hincrby", "__keyevent@*__:expire")
        self._drain_until_sentinel()  # subscribed: from here on nothing is missed

    def _drain_until_sentinel(self) -> Counter[tuple[str, str]]:
        """Every event so far: a write to a sentinel key marks the end (events arrive in order)."""
        self.client.hincrby(SENTINEL, "n", 1)
        seen: Counter[tuple[str, str]] = Counter()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.5)
            if message is None or message["type"] != "pmessage":
                continue
            key = message["data"].decode()
            if key == SENTINEL:
                return seen
            if ":roll:" in key:
                seen[(message["channel"].decode().rsplit(":", 1)[1], key)] += 1
        raise AssertionError("the sentinel's notification never came")

    def since_last(self) -> Counter[tuple[str, str]]:
        """(event, key) -> how many times Redis ran it on a rollup hash since the last call."""
        return self._drain_until_sentinel()

    def close(self) -> None:
        self.pubsub.close()
        self.client.config_set("notify-keyspace-events", "")
        self.client.close()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "calls.jsonl"


@pytest.fixture
def rollup_writes(redis_url: str) -> Iterator[RollupWrites]:
    writes = RollupWrites(redis_url)
    yield writes
    writes.close()


def _metric_sums(fields: dict[str, int], feature: str | None = None) -> Counter[str]:
    out: Counter[str] = Counter()
    for name, amount in fields.items():
        metric, feat, _ = split_field(name)
        if feature is None or feat == feature:
            out[metric] += amount
    return out


def _decoded(raw: dict[bytes, bytes]) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in raw.items()}


def test_calls_within_one_interval_make_one_rollup_write_with_the_per_call_sums(
        redis_url: str, rollup_writes: RollupWrites, sim: Simulator, now_clock: FakeClock, log_path: Path) -> None:
    app = ops_app("coalesce_app", redis_url, sim, now_clock, log_path, CLAUDE_ALERT_WINDOW=None,
                  CLAUDE_ROLLUP_FLUSH_INTERVAL=60)
    client = app.test_client()
    store = app.extensions["claude"].store
    for _ in range(6):  # twelve calls in one minute, one interval: a budgeted feature and a free one
        assert client.post("/ask").status_code == 200
        assert client.post("/free").status_code == 200
        now_clock.advance(1.0)
    assert rollup_writes.since_last() == Counter()  # nothing written yet: the interval has not passed
    [(minute, waiting)] = store.rollups.pending().items()
    assert minute == math.floor(now_clock.now / 60)

    store.flush()  # what a reader or a clean exit does
    writes = rollup_writes.since_last()
    m, h, total = roll_key(f"m:{minute}"), roll_key(f"h:{minute // 60}"), roll_key("total")
    # One write: every field once into each of the three hashes, each expiring hash expired once.
    assert writes == Counter({("hincrby", m): len(waiting), ("hincrby", h): len(waiting),
                              ("hincrby", total): len(waiting), ("expire", m): 1, ("expire", h): 1})
    assert store.rollups.pending() == {}

    # The sums are what the calls' log lines add up to.
    lines = events(log_path, "claude_api_call")
    assert len(lines) == 12 and not events(log_path, "claude_api_error")
    stored = {name: _decoded(store.client.hgetall(key)) for name, key in (("m", m), ("h", h), ("total", total))}
    assert stored["m"] == stored["h"] == stored["total"] == waiting
    for feature in ("ask", "free"):
        mine = [e for e in lines if e["feature"] == feature]
        sums = _metric_sums(stored["total"], feature)
        assert sums["c"] == len(mine) == 6
        assert sums["u"] == sum(to_micro(e["cost_usd"]) for e in mine) > 0
        assert sums["ti"] == sum(e["input_tokens"] for e in mine) > 0
        assert sums["to"] == sum(e["output_tokens"] for e in mine) > 0
        assert sum(v for k, v in sums.items() if k.startswith("l:")) == 6  # each call in one latency bucket


def test_a_due_rollup_write_rides_on_the_next_requests_round_trip(
        redis_url: str, redis_server: Any, sim: Simulator, now_clock: FakeClock, log_path: Path) -> None:
    """Due, the sums go out with the next round trip the worker makes anyway (with the settlements
    written behind, on its next ``begin``): a budgeted call still waits for its two round trips."""
    app = ops_app("ride_app", redis_url, sim, now_clock, log_path, CLAUDE_ALERT_WINDOW=None,
                  CLAUDE_SETTLE_DELAY=30, CLAUDE_ROLLUP_FLUSH_INTERVAL=0.2)  # the flusher waits 30 s: not it
    client = app.test_client()
    store = app.extensions["claude"].store
    field = "c|ask|claude-haiku-4-5"
    for _ in range(3):  # warm up: sockets open, every script loaded
        assert client.post("/ask").status_code == 200
    store.flush()
    assert int(redis_server.client.hget(roll_key("total"), field)) == 3

    def reads() -> int:
        return int(redis_server.client.info("stats")["total_reads_processed"])

    assert client.post("/ask").status_code == 200
    assert wait_for(lambda: (store.rollups.due_in() or 1.0) <= 0)  # the interval has passed, no write yet
    assert int(redis_server.client.hget(roll_key("total"), field)) == 3
    before = reads()
    assert client.post("/ask").status_code == 200
    assert reads() - before - 1 == 2  # - 1: the INFO read itself; admission and hold, as without a rollup
    assert int(redis_server.client.hget(roll_key("total"), field)) == 4  # the 4th call's, with the 5th's trip
    [waiting] = store.rollups.pending().values()
    assert waiting[field] == 1  # the 5th call's waits for its own interval


def test_with_no_request_the_flusher_thread_writes_a_due_rollup(
        redis_url: str, redis_server: Any, sim: Simulator, now_clock: FakeClock, log_path: Path) -> None:
    app = ops_app("flusher_app", redis_url, sim, now_clock, log_path, CLAUDE_ALERT_WINDOW=None,
                  CLAUDE_ROLLUP_FLUSH_INTERVAL=0.2)
    client = app.test_client()
    for _ in range(3):
        assert client.post("/free").status_code == 200
    store = app.extensions["claude"].store
    total = roll_key("total")
    assert wait_for(lambda: int(redis_server.client.hget(total, "c|free|claude-haiku-4-5") or 0) == 3)
    assert store.rollups.pending() == {}


def test_an_accumulation_across_a_minute_boundary_writes_each_minute_to_its_own_hash(
        redis_url: str, rollup_writes: RollupWrites, redis_server: Any, sim: Simulator, clock: FakeClock,
        log_path: Path) -> None:
    clock.now = math.floor(time.time() / 60) * 60 + 59.0  # one second before a minute ends (real date)
    app = ops_app("boundary_app", redis_url, sim, clock, log_path, CLAUDE_ALERT_WINDOW=None,
                  CLAUDE_ROLLUP_FLUSH_INTERVAL=60)
    client = app.test_client()
    store = app.extensions["claude"].store
    first = math.floor(clock.now / 60)
    assert client.post("/free").status_code == 200
    clock.advance(2.0)  # into the next minute, within the same interval
    assert client.post("/free").status_code == 200
    assert client.post("/free").status_code == 200
    waiting = store.rollups.pending()
    assert sorted(waiting) == [first, first + 1]

    store.flush()
    writes = rollup_writes.since_last()
    field = "c|free|claude-haiku-4-5"
    minutes = {m: _decoded(redis_server.client.hgetall(roll_key(f"m:{m}"))) for m in (first, first + 1)}
    assert minutes[first] == waiting[first] and minutes[first][field] == 1
    assert minutes[first + 1] == waiting[first + 1] and minutes[first + 1][field] == 2
    hours: dict[int, Counter[str]] = {}
    for m, fields in waiting.items():
        hours.setdefault(m // 60, Counter()).update(fields)  # two hours when the boundary is also an hour's
    for hour, fields in hours.items():
        assert _decoded(redis_server.client.hgetall(roll_key(f"h:{hour}"))) == dict(fields)
    assert int(redis_server.client.hget(roll_key("total"), field)) == 3
    # Still one write: each minute's fields once into its own hash, each hash expired once.
    for m in (first, first + 1):
        assert writes[("hincrby", roll_key(f"m:{m}"))] == len(waiting[m])
        assert writes[("expire", roll_key(f"m:{m}"))] == 1
    assert writes[("hincrby", roll_key("total"))] == len(set(waiting[first]) | set(waiting[first + 1]))
    # Expiries are relative: the retention from the write, on Redis's clock, whatever the app's says.
    retention_ms = (app.extensions["claude"].settings.rollup_retention + GRACE_S) * 1000
    for m in (first, first + 1):
        assert retention_ms - 60_000 < redis_server.client.pttl(roll_key(f"m:{m}")) <= retention_ms
    assert redis_server.client.pttl(roll_key("total")) == -1  # lifetime totals never expire


def test_a_jumping_clock_cannot_grow_the_accumulation_past_a_bound(
        redis_url: str, redis_server: Any, sim: Simulator, now_clock: FakeClock, log_path: Path) -> None:
    """Minutes are summed separately, so many minutes in one interval (a clock that jumps, as this
    fake one does) make the sums due at once: they ride on the next round trip."""
    app = ops_app("jump_app", redis_url, sim, now_clock, log_path, CLAUDE_ALERT_WINDOW=None,
                  CLAUDE_ROLLUP_FLUSH_INTERVAL=60)
    client = app.test_client()
    store = app.extensions["claude"].store
    most = 0
    for _ in range(3 * MAX_MINUTES):
        assert client.post("/ask").status_code == 200  # each request's admission is a round trip to ride on
        most = max(most, len(store.rollups.pending()))
        now_clock.advance(60.0)
    assert most <= MAX_MINUTES + 1
    written = int(redis_server.client.hget(roll_key("total"), "c|ask|claude-haiku-4-5") or 0)
    assert written >= 3 * MAX_MINUTES - (MAX_MINUTES + 1)  # without any flush: the sums went out when due


@pytest.mark.redis  # starts a redis-server of its own
def test_rollups_waiting_when_redis_goes_away_are_dropped_and_requests_still_pass(
        sim: Simulator, now_clock: FakeClock, log_path: Path) -> None:
    server = RedisServer()
    try:
        app = ops_app("outage_app", server.url, sim, now_clock, log_path, CLAUDE_ALERT_WINDOW=None,
                      CLAUDE_ROLLUP_FLUSH_INTERVAL=60, CLAUDE_STORAGE_SOCKET_TIMEOUT=0.25)
        client = app.test_client()
        store = app.extensions["claude"].store
        for _ in range(3):
            assert client.post("/free").status_code == 200
        assert sum(_metric_sums(f)["c"] for f in store.rollups.pending().values()) == 3
        server.stop()
        for _ in range(5):  # storage away (CLAUDE_STORAGE_FAILURE="open"): served, and still counted
            assert client.post("/free").status_code == 200
        assert sum(_metric_sums(f)["c"] for f in store.rollups.pending().values()) == 8
        flush_all()  # the write (a clean exit's, or the flusher's once due) fails: dropped, not raised
        assert store.rollups.pending() == {}
        assert client.post("/free").status_code == 200
    finally:
        server.stop()
