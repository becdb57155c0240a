"""The store contract: the same cases on memory, on one redis-server and on a 3-master Redis Cluster.

Each case drives the ``Store`` protocol directly (storage/records.py), with times the test chooses,
so the semantics the budgets, limits, alerts and breakers rely on are pinned for every backend. The
cluster is started here on loopback (``--cluster-enabled yes``, ``redis-cli --cluster create``), as
docs/operations.md promises ``redis+cluster://``; every key of one app shares a hash tag, so each script
runs on one node.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flask_claude.storage import Begin, BreakerParams, Line, MemoryStore, RedisStore, StorageUnavailable, Store

from .conftest import RedisServer, todays_noon_utc

NOW = todays_noon_utc()
DAY_END = NOW + 12 * 3600
BREAKER = BreakerParams(min_calls=2, failure_rate=0.5, window=30.0, cooldown=10.0)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    import random
    import socket

    while True:
        port = random.randint(20000, 45000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


class RedisCluster:
    """Three masters on free loopback ports, joined with ``redis-cli --cluster create``."""

    def __init__(self) -> None:
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            pytest.fail("redis-server and redis-cli are needed for the cluster contract tests")
        self.dir = tempfile.mkdtemp(prefix="fc-cluster-")
        self.ports = [_cluster_port() for _ in range(3)]
        self.processes = [subprocess.Popen(
            [binary, "--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", os.path.join(self.dir, f"nodes-{p}.conf"), "--save", "", "--appendonly", "no",
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in self.ports]
        deadline = time.monotonic() + 20
        while not all(self._ping(p) for p in self.ports):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("cluster nodes did not start")
            time.sleep(0.02)
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=30)
        while not all(self._info(p).get("cluster_state") == "ok" for p in self.ports):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    @staticmethod
    def _ping(port: int) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=port, socket_timeout=0.2).ping())
        except redis.exceptions.ConnectionError:
            return False

    @staticmethod
    def _info(port: int) -> dict[str, str]:
        import redis

        raw = redis.Redis(port=port, socket_timeout=0.5).execute_command("CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.strip().splitlines() if ":" in line)

    def flush(self) -> None:
        import redis

        from flask_claude.storage.redis import close_all

        close_all()  # the earlier tests' stores must not take this flush for a data loss

        for port in self.ports:
            redis.Redis(port=port, socket_timeout=0.5).flushall()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["memory", "redis", "cluster"])
def make(request: pytest.FixtureRequest) -> Iterator[Callable[[], Store]]:
    """A factory: two stores made by it stand for two workers sharing one backend."""
    memory: list[MemoryStore] = []
    if request.param == "memory":
        yield lambda: memory[0] if memory else memory.append(MemoryStore()) or memory[0]  # one process
        return
    if request.param == "redis":
        server: Any = request.getfixturevalue("redis_server")
    else:
        server = request.getfixturevalue("redis_cluster")
    server.flush()
    stores: list[RedisStore] = []

    def factory() -> Store:
        store = RedisStore(server.url, prefix="contract", socket_timeout=1.0, settle_delay=30)
        stores.append(store)
        return store

    yield factory
    for store in stores:
        store.flush()


def budget(key: str, limit: int, amount: int, expires: float = DAY_END) -> Line:
    return Line(key, limit, amount, expires, name=key)


def hold(store: Store, rid: str, *lines: Line, now: float = NOW, until: float = NOW + 60, **kw: Any) -> Any:
    return store.begin(Begin(holds=lines, rid=rid, member=rid, hold_until=until, **kw), now)


def test_a_reservation_is_all_or_nothing_across_lines(make: Callable[[], Store]) -> None:
    store = make()
    assert hold(store, "a", budget("user", 100, 60), budget("global", 1000, 60)).ok
    refused = hold(store, "b", budget("user", 100, 60), budget("global", 1000, 60))
    assert not refused.ok and refused.stage == "hold" and refused.failed == 0 and refused.busy
    # the refused step reserved nothing on the line that had room
    assert store.usage(["user", "global"], NOW) == [(0, 60), (0, 60)]


def test_settle_replaces_the_hold_by_the_real_amount(make: Callable[[], Store]) -> None:
    worker, other = make(), make()
    assert hold(worker, "a", budget("user", 100, 60)).ok
    worker.settle([budget("user", 100, 7)], ["a"], (), NOW + 1)
    assert other.usage(["user"], NOW + 1) == [(7, 0)]
    assert hold(other, "b", budget("user", 100, 90)).ok  # 7 spent + 90 held <= 100


def test_settle_later_lands_and_reports_crossed_thresholds(make: Callable[[], Store]) -> None:
    worker, other = make(), make()
    assert hold(worker, "a", budget("global", 100, 60)).ok
    seen: list[Any] = []
    worker.settle_later([budget("global", 100, 55)], ["a"], (0.5,), NOW + 1, lambda c, f: seen.append((c, f)))
    worker.flush()
    [(crossed, failure)] = seen
    assert failure is None and [(c.threshold, c.spent) for c in crossed] == [(0.5, 55)]
    assert other.usage(["global"], NOW + 1) == [(55, 0)]


def test_rollups_of_two_workers_land_in_their_own_minutes_once_flushed(make: Callable[[], Store]) -> None:
    """Whenever a backend writes a call's rollup (at once in memory, summed per worker on Redis), after
    ``flush`` every worker reads the same sums, each increment in the minute and hour of its own time."""
    worker, other = make(), make()
    minute = math.floor(NOW / 60)  # NOW is noon: NOW + 59 and NOW + 61 straddle a minute, in one hour
    for store, t, rollup in ((worker, NOW + 59, {"c|a|m": 1, "u|a|m": 10}),
                             (worker, NOW + 61, {"c|a|m": 1, "u|a|m": 5}),
                             (other, NOW + 62, {"c|a|m": 2})):
        store.settle_later([], [], (), t, lambda crossed, failure: None, rollup=rollup)
    worker.flush()
    other.flush()
    snap = other.rollups.read([minute, minute + 1], [minute // 60], totals=True)
    assert snap.minutes == {minute: {"c|a|m": 1, "u|a|m": 10}, minute + 1: {"c|a|m": 3, "u|a|m": 5}}
    assert snap.hours == {minute // 60: {"c|a|m": 4, "u|a|m": 15}}
    assert snap.totals == {"c|a|m": 4, "u|a|m": 15}


def test_holds_lapse_and_periods_end(make: Callable[[], Store]) -> None:
    store = make()
    assert hold(store, "dead-worker", budget("user", 100, 80), until=NOW + 30).ok
    assert not hold(store, "b", budget("user", 100, 80), now=NOW + 10).ok  # still held
    assert hold(store, "c", budget("user", 100, 80), now=NOW + 31, until=NOW + 90).ok  # the lapsed hold is gone
    store.settle([budget("user", 100, 80)], ["c"], (), NOW + 32)
    assert not hold(store, "d", budget("user", 100, 80), now=NOW + 33).ok  # spent this period
    tomorrow = DAY_END + 1  # budget keys carry their period's id: a new day is a new, empty key
    assert hold(store, "e", budget("user:next-day", 100, 80, expires=DAY_END + 86400), now=tomorrow,
                until=tomorrow + 60).ok


def test_request_windows_slide(make: Callable[[], Store]) -> None:
    store = make()
    window = Line("req", 2, 1, window=60.0)
    for i, t in enumerate((NOW, NOW + 10)):
        assert store.begin(Begin(requests=[window], member=f"m{i}"), t).ok
    refused = store.begin(Begin(requests=[window], member="m2"), NOW + 20)
    assert not refused.ok and refused.stage == "request" and 39 <= refused.retry_after <= 41
    assert store.begin(Begin(requests=[window], member="m3"), NOW + 61).ok  # the first hit left the window


def test_an_alert_threshold_is_claimed_once_across_workers(make: Callable[[], Store]) -> None:
    first, second = make(), make()
    claims = []
    for store, rid in ((first, "a"), (second, "b"), (first, "c")):
        assert hold(store, rid, budget("global", 100, 30)).ok
        claims += store.settle([budget("global", 100, 30)], [rid], (0.5, 0.8), NOW + 1)
    assert sorted((c.threshold, c.spent) for c in claims) == [(0.5, 60), (0.8, 90)]


def test_the_breaker_opens_probes_once_half_open_and_closes(make: Callable[[], Store]) -> None:
    worker, other = make(), make()
    assert not worker.breaker_record("opus", False, NOW, BREAKER)
    assert worker.breaker_record("opus", False, NOW + 1, BREAKER)  # 2 of 2 failed: opens
    assert other.breaker_state("opus", NOW + 2) == "open"
    assert not other.breaker_allow("opus", NOW + 2, BREAKER.cooldown)
    # after the cooldown exactly one caller gets the probe
    assert other.breaker_state("opus", NOW + 12) == "half_open"
    assert other.breaker_allow("opus", NOW + 12, BREAKER.cooldown)
    assert not worker.breaker_allow("opus", NOW + 12.5, BREAKER.cooldown)
    # a failed probe opens it again for a cooldown; a successful one closes it
    assert worker.breaker_record("opus", False, NOW + 13, BREAKER)
    assert not worker.breaker_allow("opus", NOW + 14, BREAKER.cooldown)
    assert worker.breaker_allow("opus", NOW + 24, BREAKER.cooldown)
    assert not worker.breaker_record("opus", True, NOW + 24.5, BREAKER)
    assert other.breaker_state("opus", NOW + 25) == "closed"
    assert other.breaker_allow("opus", NOW + 25, BREAKER.cooldown)


def test_an_app_wide_budget_is_one_read_as_gate_and_hold(make: Callable[[], Store]) -> None:
    """The gate (kill state) and the hold of one key read together: live holds count for the hold,
    not for the gate; spent alone at the limit refuses at the gate."""
    store, other = make(), make()
    gate = budget("global", 100, 0)
    assert hold(other, "x", budget("global", 100, 70)).ok  # another worker's live hold
    refused = hold(store, "a", budget("global", 100, 40), gates=[gate])
    assert not refused.ok and refused.stage == "hold" and refused.busy  # room would come back
    assert hold(store, "b", budget("global", 100, 30), gates=[gate]).ok
    other.settle([budget("global", 100, 70)], ["x"], (), NOW + 1)
    store.settle([budget("global", 100, 30)], ["b"], (), NOW + 1)
    assert store.usage(["global"], NOW + 1) == [(100, 0)]
    shut = hold(store, "c", budget("global", 100, 1), gates=[gate], now=NOW + 2)
    assert not shut.ok and shut.stage == "gate" and shut.failed == 0


def test_a_success_read_closed_never_closes_an_open_breaker(make: Callable[[], Store]) -> None:
    """A success on a breaker the call's first step read closed is recorded without reading its state
    again; when another worker opened it meanwhile, it stays open and goes half-open as before."""
    worker, other = make(), make()
    assert worker.begin(Begin(breakers=("opus",), member="m", rid="r"), NOW).breakers == {"opus": None}
    assert not other.breaker_record("opus", False, NOW + 1, BREAKER)
    assert other.breaker_record("opus", False, NOW + 2, BREAKER)  # opens
    worker.settle([], [], (), NOW + 3, success="opus", breaker=BREAKER, seen_closed=True)
    assert other.breaker_state("opus", NOW + 4) == "open"
    assert not other.breaker_allow("opus", NOW + 4, BREAKER.cooldown)
    assert other.breaker_state("opus", NOW + 13) == "half_open"
    assert other.breaker_allow("opus", NOW + 13, BREAKER.cooldown)
    # the probe's success (not read closed) closes it
    other.settle([], [], (), NOW + 14, success="opus", breaker=BREAKER)
    assert worker.breaker_state("opus", NOW + 15) == "closed"


def test_a_success_read_closed_keeps_an_open_breakers_expiry(redis_server: RedisServer) -> None:
    """Redis only: the success's bucket write never shortens the open state's expiry (an hour past
    the cooldown) to a closed breaker's (its window)."""
    redis_server.flush()
    store = RedisStore(redis_server.url, prefix="contract", socket_timeout=1.0, settle_delay=30)
    assert not store.breaker_record("opus", False, NOW, BREAKER)
    assert store.breaker_record("opus", False, NOW + 1, BREAKER)
    key = store._b("opus")
    before = redis_server.client.pttl(key)
    store.settle([], [], (), NOW + 2, success="opus", breaker=BREAKER, seen_closed=True)
    assert redis_server.client.pttl(key) > before - 5000 > (BREAKER.window + BREAKER.cooldown + 60) * 1000
    # on a closed breaker the first success of a bucket gives a key with no expiry one
    store.settle([], [], (), NOW + 2, success="sonnet", breaker=BREAKER, seen_closed=True)
    assert 0 < redis_server.client.pttl(store._b("sonnet")) <= (BREAKER.window + BREAKER.cooldown + 60) * 1000


def test_a_malformed_step_loses_no_settlement_waiting(redis_server: RedisServer) -> None:
    """Redis only: a step that cannot be sent (step-down amounts for the wrong number of holds) raises
    before it takes the settlements waiting to ride along: they land with the next step."""
    redis_server.flush()
    store = RedisStore(redis_server.url, prefix="contract", socket_timeout=1.0, settle_delay=30)
    assert hold(store, "a", budget("user", 100, 40)).ok
    done: list[Any] = []
    store.settle_later([budget("user", 100, 25)], ["a"], (), NOW + 1, lambda c, f: done.append(f))
    with pytest.raises(ValueError, match="step-down amounts"):
        hold(store, "b", budget("user", 100, 10), downgrade_line=0, alt_amounts=[])
    assert done == []  # still waiting, not dropped
    store.flush()
    assert done == [None] and store.usage(["user"], NOW + 2) == [(25, 0)]


def test_records_outlive_the_process_that_wrote_them(make: Callable[[], Store]) -> None:
    first, second = make(), make()
    first.put_record("batch:1", '{"state": "submitted"}', 3600)
    assert second.get_record("batch:1") == '{"state": "submitted"}'
    assert second.get_record("batch:2") is None


@pytest.mark.parametrize("backend", ["redis", "cluster"])
def test_a_stopped_server_is_storage_unavailable_not_a_hang(backend: str) -> None:
    """Each step fails within the socket timeout as ``StorageUnavailable``, whatever the backend."""
    if backend == "redis":
        server: Any = RedisServer()
        pids = [server.process.pid]
    else:
        server = RedisCluster()
        pids = [p.pid for p in server.processes]
    try:
        store = RedisStore(server.url, prefix="contract", socket_timeout=0.3, settle_delay=30)
        assert hold(store, "a", budget("user", 100, 10)).ok
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            for step in (lambda: hold(store, "b", budget("user", 100, 10)),
                         lambda: store.usage(["user"], NOW),
                         lambda: store.breaker_allow("opus", NOW, 10.0)):
                started = time.monotonic()
                with pytest.raises(StorageUnavailable):
                    step()
                assert time.monotonic() - started < 3.0
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
    finally:
        server.stop()
