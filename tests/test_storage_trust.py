"""Storage that can be trusted: a closed connection is reopened, a settlement lands once, a Redis that
lost its data is noticed and the spend put back, and a step's Redis work does not grow with the calls
in flight. Each case runs against a real redis-server of its own (restarted, flushed, its clients
killed), with ``RedisStore`` and the outage guard exactly as the extension builds them."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from flask_claude.clock import SystemClock
from flask_claude.storage import Begin, Line, OutageGuard, RedisStore, StorageUnavailable

from .conftest import RedisServer, free_port, todays_noon_utc, wait_for

pytestmark = pytest.mark.redis  # every case runs a redis-server

NOW = todays_noon_utc()
DAY_END = NOW + 12 * 3600


class RestartableRedis:
    """A redis-server that keeps its data in a dump file of its own, so it can be stopped with
    ``SHUTDOWN SAVE`` and started again on the same port from that dump (a restart with data kept)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.dir = tempfile.mkdtemp(prefix="fc-restart-")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.socket = f"{self.dir}/redis.sock"
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no",
             "--unixsocket", self.socket, "--unixsocketperm", "700"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        if not wait_for(lambda: _answers(client), timeout=10):
            raise RuntimeError("redis-server did not start")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1.0)

    def restart(self) -> None:
        """``SHUTDOWN SAVE``, then the same server again from its dump."""
        assert self.process is not None
        try:
            self.client().shutdown(save=True)
        except redis.exceptions.ConnectionError:
            pass  # the server closes the connection as it stops
        self.process.wait(timeout=10)
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


@pytest.fixture
def server() -> Iterator[RestartableRedis]:
    s = RestartableRedis()
    yield s
    s.stop()


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        with self._lock:
            self.seen.append((event, fields))

    def names(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self.seen]


def make_store(url: str, events: Events | None = None, **kw: Any) -> RedisStore:
    return RedisStore(url, prefix="trust", socket_timeout=1.0, notify=events, **{"settle_delay": 30, **kw})


def guarded(store: RedisStore, events: Events) -> OutageGuard:
    return OutageGuard(store, clock=SystemClock(), retry_interval=2.0, notify=events, policy="open")


def budget(key: str, limit: int, amount: int) -> Line:
    return Line(key, limit, amount, DAY_END, name=key)


def per_minute(key: str, limit: int) -> Line:
    return Line(key, limit, 1, name=f"{limit}/minute", window=60.0)


def hold(store: Any, rid: str, *lines: Line, now: float = NOW, until: float = NOW + 60) -> Any:
    return store.begin(Begin(holds=lines, rid=rid, member=rid, hold_until=until), now)


def admit(store: Any, member: str, limit: Line, now: float = NOW) -> bool:
    return bool(store.begin(Begin(requests=[limit], member=member), now).ok)


# --- a closed connection is reopened, not an outage ---------------------------------------------------


def test_killed_connections_are_reopened_and_every_thread_keeps_its_limit(server: RestartableRedis) -> None:
    """``CLIENT KILL TYPE normal`` drops every pooled connection: each thread's next step reconnects
    once and counts, so the limit holds and no outage is ever entered."""
    events = Events()
    store = guarded(make_store(server.url, events), events)
    limit = per_minute("req:user", 5)
    barrier = threading.Barrier(8)
    admitted: list[bool] = []

    def worker(i: int) -> None:
        barrier.wait()  # every thread holds a pooled connection of its own before the kill
        admitted.append(admit(store, f"warm-{i}", per_minute(f"req:warm-{i}", 100)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert admitted == [True] * 8
    killed = server.client().client_kill_filter(_type="normal", skipme=False)
    assert killed >= 2  # the pool's connections (and the one that asked)
    results = [admit(store, f"m{i}", limit) for i in range(8)]
    assert results == [True] * 5 + [False] * 3
    assert "storage_unavailable" not in events.names() and store.healthy


def test_a_restart_with_data_kept_keeps_limits_and_is_no_outage(server: RestartableRedis) -> None:
    events = Events()
    store = guarded(make_store(server.url, events), events)
    limit = per_minute("req:user", 5)
    assert [admit(store, f"a{i}", limit) for i in range(3)] == [True] * 3
    assert hold(store, "h1", budget("usd:global:day", 1000, 400)).ok
    store.settle_later([budget("usd:global:day", 1000, 250)], ["h1"], (), NOW + 1, lambda c, f: None)
    store.flush()
    server.restart()  # SHUTDOWN SAVE and back from the dump: the pooled connections are all dead now
    assert [admit(store, f"b{i}", limit) for i in range(4)] == [True, True, False, False]
    assert store.usage(["usd:global:day"], NOW + 2) == [(250, 0)]
    assert "storage_unavailable" not in events.names()
    assert "storage_data_lost" not in events.names()  # the data came back with it


# --- a settlement lands, once ---------------------------------------------------------------------------


def test_a_settlement_sent_twice_counts_once(redis_server: RedisServer) -> None:
    redis_server.flush()
    store = make_store(redis_server.url)
    assert hold(store, "c1", budget("usd:u", 1000, 300), budget("tok:u", 10_000, 2000)).ok
    lines = [budget("usd:u", 1000, 120), budget("tok:u", 10_000, 900)]
    store.settle(lines, ["c1"], (), NOW + 1)
    assert store.settle(lines, ["c1"], (), NOW + 2) == []  # a copy: a retry whose first send landed
    assert store.usage(["usd:u", "tok:u"], NOW + 3) == [(120, 0), (900, 0)]
    # a call whose hold lapsed (or was never taken) is still counted, once
    store.settle([budget("usd:u", 1000, 5)], ["never-held"], (), NOW + 4)
    store.settle([budget("usd:u", 1000, 5)], ["never-held"], (), NOW + 5)
    assert store.usage(["usd:u"], NOW + 6) == [(125, 0)]


def test_a_settlement_with_top_ups_releases_every_hold(redis_server: RedisServer) -> None:
    redis_server.flush()
    store = make_store(redis_server.url)
    assert hold(store, "c1", budget("usd:u", 1000, 300)).ok
    assert hold(store, "c1-top", budget("usd:u", 1000, 200)).ok
    assert store.usage(["usd:u"], NOW) == [(0, 500)]
    store.settle([budget("usd:u", 1000, 410)], ["c1", "c1-top"], (), NOW + 1)
    assert store.usage(["usd:u"], NOW + 1) == [(410, 0)]


def test_settlements_made_while_redis_is_down_land_once_it_is_back(server: RestartableRedis) -> None:
    """Nothing is skipped or only warned about: the store keeps what it could not send, the guard's
    probe (the path requests take) carries it, and each hold is released by its own settlement."""
    events = Events()
    store = guarded(make_store(server.url, events), events)
    assert hold(store, "c1", budget("usd:global:day", 1000, 300)).ok
    assert hold(store, "c2", budget("usd:global:day", 1000, 300)).ok
    server.restart()  # first a restart: the pool's connections are dead, the data is kept
    assert server.process is not None
    server.process.terminate()
    server.process.wait(timeout=10)
    landed: list[Any] = []
    store.settle_later([budget("usd:global:day", 1000, 110)], ["c1"], (), NOW + 1, lambda c, f: landed.append(f))
    store.settle_later([budget("usd:global:day", 1000, 90)], ["c2"], (), NOW + 1, lambda c, f: landed.append(f))
    store.flush()  # fails: Redis is away
    with pytest.raises(StorageUnavailable):
        hold(store, "c3", budget("usd:global:day", 1000, 10))
    assert landed == [] and not store.healthy
    server.start()  # back from the dump written by the restart above: the holds are still there
    assert wait_for(lambda: _probe_once(store), timeout=10)
    assert landed == [None, None]
    assert store.usage(["usd:global:day"], NOW + 2) == [(200, 0)]  # no orphan hold left
    assert events.names().count("storage_unavailable") == 1


def _probe_once(store: OutageGuard) -> bool:
    """A request arriving while storage is down starts the probe; this stands for one."""
    try:
        hold(store, "probe-trigger", budget("usd:other", 10**9, 0))
    except StorageUnavailable:
        return False
    return True


# --- data lost: noticed, spend put back, no alert twice ----------------------------------------------------


def test_a_flushed_redis_gets_every_workers_spend_back_and_no_alert_twice(redis_server: RedisServer) -> None:
    redis_server.flush()
    events_a, events_b = Events(), Events()
    a, b = make_store(redis_server.url, events_a), make_store(redis_server.url, events_b)
    day = budget("usd:global:day", 1000, 0)
    for store, rid, amount in ((a, "a1", 300), (b, "b1", 250), (a, "a2", 200)):
        assert hold(store, rid, budget(day.key, 1000, amount)).ok
        crossed = store.settle([budget(day.key, 1000, amount)], [rid], (0.5, 0.8), NOW + 1)
        if rid == "b1":
            assert [c.threshold for c in crossed] == [0.5]  # 550 of 1000: announced once, here
    assert hold(a, "a3", budget(day.key, 1000, 100)).ok  # in flight when the data goes
    redis_server.client.flushall()
    # each worker's next step notices, puts its own share back first, then counts
    assert hold(b, "b2", budget(day.key, 1000, 10)).ok
    assert b.usage([day.key], NOW + 2) == [(250, 10)]  # b's share; a has not stepped since
    assert hold(a, "a4", budget(day.key, 1000, 200)).ok
    assert a.usage([day.key], NOW + 2) == [(750, 210)]  # both shares: the day's 750 (a3's hold went)
    assert not hold(b, "b3", budget(day.key, 1000, 100)).ok  # 750 + 210 + 100 > 1000
    crossed = a.settle([budget(day.key, 1000, 40)], ["a3"], (0.5, 0.8), NOW + 3)  # 790: no 0.5 again
    assert crossed == []
    crossed = a.settle([budget(day.key, 1000, 60)], ["a4"], (0.5, 0.8), NOW + 3)  # 850: 0.8, a first
    assert [c.threshold for c in crossed] == [0.8]
    b.settle([budget(day.key, 1000, 5)], ["b2"], (0.5, 0.8), NOW + 3)
    assert events_a.names().count("storage_data_lost") == 1 and events_b.names().count("storage_data_lost") == 1
    assert a.usage([day.key], NOW + 4) == [(855, 0)]
    # a second loss is noticed again, and each share (now larger) put back again
    redis_server.client.flushall()
    assert hold(a, "a5", budget(day.key, 1000, 1)).ok and hold(b, "b5", budget(day.key, 1000, 1)).ok
    assert a.usage([day.key], NOW + 5) == [(855, 2)]


def test_no_data_loss_is_seen_without_one(redis_server: RedisServer) -> None:
    redis_server.flush()
    events = Events()
    store = make_store(redis_server.url, events)
    for i in range(3):
        assert hold(store, f"c{i}", budget("usd:u", 1000, 10)).ok
        store.settle([budget("usd:u", 1000, 5)], [f"c{i}"], (), NOW + 1)
    assert "storage_data_lost" not in events.names()
    assert events.names().count("storage_not_persistent") == 1  # the test server keeps nothing on disk


# --- a step's Redis work does not grow with the calls in flight -------------------------------------------


def _commands(client: redis.Redis) -> int:
    """Commands Redis ran (scripts' own calls included), EVALSHA and the stats query itself excluded."""
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_evalsha", "cmdstat_info"))


def test_a_steps_redis_work_is_the_same_with_one_or_a_thousand_calls_in_flight(redis_server: RedisServer) -> None:
    redis_server.flush()
    store = make_store(redis_server.url)
    client = redis_server.client

    def step_cost(rid: str, now: float) -> tuple[int, int]:
        client.config_resetstat()
        assert hold(store, rid, budget("usd:global:day", 10**12, 10), now=now, until=now + 90).ok
        begin = _commands(client)
        client.config_resetstat()
        store.settle([budget("usd:global:day", 10**12, 3)], [rid], (), now)
        return begin, _commands(client)

    hold(store, "warm", budget("usd:global:day", 10**12, 10))  # the first contact and script loads
    store.settle([budget("usd:global:day", 10**12, 1)], ["warm"], (), NOW)
    one = step_cost("alone", NOW + 1)
    for i in range(1000):
        assert hold(store, f"f{i}", budget("usd:global:day", 10**12, 10), now=NOW + 2, until=NOW + 600).ok
    many = step_cost("among-1000", NOW + 3)
    assert many == one
    # lapsed holds are dropped a batch at a time, each once: the budget is whole again
    assert store.usage(["usd:global:day"], NOW + 700) == [(7, 0)]


def test_one_worker_alone_notices_every_loss_and_is_the_one_to_page(redis_server: RedisServer) -> None:
    """The worker that finds the marker gone pages (``noticed_first``); the others only log. A loss of
    the marker this very worker set is noticed too."""
    redis_server.flush()
    events_a, events_b = Events(), Events()
    a, b = make_store(redis_server.url, events_a), make_store(redis_server.url, events_b)
    for store, rid in ((a, "a1"), (b, "b1")):
        assert hold(store, rid, budget("usd:global:day", 1000, 100)).ok
        store.settle([budget("usd:global:day", 1000, 100)], [rid], (), NOW + 1)
    for _ in range(2):  # twice: the second time the marker that goes is the one ``a`` set
        redis_server.client.flushall()
        assert hold(a, f"a-{_}", budget("usd:global:day", 1000, 1)).ok
        assert hold(b, f"b-{_}", budget("usd:global:day", 1000, 1)).ok
    lost_a = [f for name, f in events_a.seen if name == "storage_data_lost"]
    lost_b = [f for name, f in events_b.seen if name == "storage_data_lost"]
    assert [f["noticed_first"] for f in lost_a] == [True, True]
    assert [f["noticed_first"] for f in lost_b] == [False, False]
    assert a.usage(["usd:global:day"], NOW + 2) == [(200, 2)]


def test_a_data_loss_pages_once_and_the_apps_budget_is_whole_again(redis_url: str, claude_log: Any) -> None:
    """Two apps on one Redis stand for two workers: a FLUSHALL is one ``ops_alert`` (the worker that
    noticed first), a ``storage_data_lost`` line per worker, and the day's spend is back."""
    from flask import Flask

    from flask_claude import Claude, ai_feature, budgeted

    def worker() -> tuple[Flask, Claude]:
        app = Flask("trust_worker")
        app.config.update(CLAUDE_SIMULATE=True, CLAUDE_STORAGE_URI=redis_url, CLAUDE_DAILY_BUDGET_USD=5,
                          CLAUDE_LOG_PATH="/dev/null", CLAUDE_MODELS=["claude-sonnet-4-6"])
        claude = Claude(app)

        @app.post("/ask")
        @ai_feature("ask", max_tokens=64, max_input_chars=200)
        @budgeted(requests="100/minute")
        def ask() -> dict[str, Any]:
            msg = claude.messages.create(messages=[{"role": "user", "content": "Say hello."}])
            return {"text": msg.content[0].text}

        return app, claude

    (one, _), (two, _) = worker(), worker()
    for app in (one, two, one):
        assert app.test_client().post("/ask").status_code == 200
    for app in (one, two):
        app.extensions["claude"].store.flush()
    spent_before = {i["budget"]: i["spent_usd"] for i in one.extensions["claude"].budgets.usage_report()}
    assert spent_before["global daily budget"] > 0
    redis.Redis.from_url(redis_url).flushall()
    for app in (one, two):
        assert app.test_client().post("/ask").status_code == 200
        app.extensions["claude"].store.flush()
    pages = [e for e in claude_log.events("ops_alert") if e["alert"] == "storage_data_lost"]
    assert len(pages) == 1 and pages[0]["state"] == "firing"
    assert len(claude_log.events("storage_data_lost")) == 2
    spent = {i["budget"]: i["spent_usd"] for i in one.extensions["claude"].budgets.usage_report()}
    assert spent["global daily budget"] == pytest.approx(claude_log.spend_usd(), abs=1e-5 * 5)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_guarded_request_costs_one_round_trip_on_tcp_and_on_a_unix_socket(server: RestartableRedis,
                                                                           transport: str) -> None:
    """Every deployment shape takes the same path (raw EVALSHA in a redis-py pipeline): no
    ``SCRIPT EXISTS`` before each script, so one read by Redis per request with an input bound."""
    from flask import Flask

    from flask_claude import Claude, ai_feature, budgeted

    uri = server.url if transport == "tcp" else f"unix://{server.socket}?db=0"
    app = Flask("trip_count")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_STORAGE_URI=uri, CLAUDE_DAILY_BUDGET_USD=5,
                      CLAUDE_LOG_PATH="/dev/null", CLAUDE_MODELS=["claude-sonnet-4-6"], CLAUDE_SETTLE_DELAY=30,
                      CLAUDE_ALERT_EVAL_INTERVAL=3600)
    claude = Claude(app)

    @app.post("/ask")
    @ai_feature("ask", max_tokens=64, max_input_chars=200)
    @budgeted(requests="1000/minute", usd="1/day")
    def ask() -> dict[str, Any]:
        msg = claude.messages.create(messages=[{"role": "user", "content": "Say hello."}])
        return {"text": msg.content[0].text}

    c = app.test_client()
    for _ in range(3):  # the first contact, the scripts loaded
        assert c.post("/ask").status_code == 200
    client = server.client()
    before = int(client.info("stats")["total_reads_processed"])
    for _ in range(10):
        assert c.post("/ask").status_code == 200
    assert 10 <= int(client.info("stats")["total_reads_processed"]) - before - 1 <= 11


def test_a_step_run_twice_counts_once(redis_server: RedisServer) -> None:
    """The client sends a step again on a fresh connection when the first one closed, possibly after
    Redis ran it (the reply was lost): the second run finds its own request and holds."""
    redis_server.flush()
    store = make_store(redis_server.url)
    step = Begin(requests=[per_minute("req:u", 2)], holds=[budget("usd:u", 1000, 300)], member="m1", rid="c1",
                 hold_until=NOW + 60)
    first, again = store.begin(step, NOW), store.begin(step, NOW)
    assert first.ok and again.ok and first.remaining == again.remaining == (1,)
    assert store.usage(["usd:u"], NOW) == [(0, 300)]  # held once
    assert admit(store, "m2", per_minute("req:u", 2))  # the window counted the request once: room for one more
    assert not admit(store, "m3", per_minute("req:u", 2))
    # a refused step counts nowhere: not in the window it passed before the budget refused it
    refused = store.begin(Begin(requests=[per_minute("req:v", 5)], holds=[budget("usd:u", 1000, 800)],
                                member="m4", rid="c4", hold_until=NOW + 60), NOW)
    assert not refused.ok and refused.stage == "hold"
    assert store.begin(Begin(requests=[per_minute("req:v", 5)], member="m5"), NOW).remaining == (4,)


def test_an_idle_worker_puts_its_share_back_without_a_request(redis_server: RedisServer) -> None:
    """A worker that gets no request after a loss still restores its share (it watches the marker
    while it has spend to put back), so the busy worker does not spend against half a budget."""
    redis_server.flush()
    events_idle = Events()
    busy, idle = make_store(redis_server.url), make_store(redis_server.url, events_idle)
    for store, rid in ((busy, "b1"), (idle, "i1")):
        assert hold(store, rid, budget("usd:global:day", 1000, 400)).ok
        store.settle([budget("usd:global:day", 1000, 400)], [rid], (), NOW + 1)
    redis_server.client.flushall()
    assert hold(busy, "b2", budget("usd:global:day", 1000, 1)).ok  # the busy worker restores its 400
    assert wait_for(lambda: busy.usage(["usd:global:day"], NOW + 2) == [(800, 1)], timeout=10)
    assert events_idle.names().count("storage_data_lost") == 1


def test_a_copy_of_a_late_settlement_still_counts_once(redis_server: RedisServer) -> None:
    """A settlement that lands after its hold's time (replayed after an outage) keeps its mark for
    15 minutes, so a copy of it (its reply was lost) that comes after another step counts nothing."""
    redis_server.flush()
    worker, other = make_store(redis_server.url), make_store(redis_server.url)
    assert hold(worker, "c1", budget("usd:u", 1000, 300), until=NOW + 60).ok
    worker.settle([budget("usd:u", 1000, 120)], ["c1"], (), NOW + 100)  # after the hold lapsed
    assert hold(other, "o1", budget("usd:u", 1000, 1), now=NOW + 101, until=NOW + 200).ok  # drops what lapsed
    assert worker.settle([budget("usd:u", 1000, 120)], ["c1"], (), NOW + 102) == []
    assert other.usage(["usd:u"], NOW + 103) == [(120, 1)]


def test_an_idle_workers_settlements_land_when_redis_is_back_without_a_request(server: RestartableRedis) -> None:
    """Nothing else comes (no request, so no probe): the flusher keeps trying, backing off."""
    store = make_store(server.url, settle_delay=0.01)
    assert hold(store, "c1", budget("usd:global:day", 1000, 300)).ok
    assert server.process is not None
    server.process.terminate()
    server.process.wait(timeout=10)
    landed: list[Any] = []
    store.settle_later([budget("usd:global:day", 1000, 110)], ["c1"], (), NOW + 1, lambda c, f: landed.append(f))
    assert not wait_for(lambda: bool(landed), timeout=0.5)  # Redis is away: kept, not dropped
    server.start()
    assert wait_for(lambda: landed == [None], timeout=15)
    assert make_store(server.url).usage(["usd:global:day"], NOW + 2) == [(110, 0)]


def test_a_forked_worker_restores_its_own_share_and_not_its_parents(redis_server: RedisServer) -> None:
    """A store used before a fork (gunicorn --preload and a warm-up call): the child starts with no
    ledger, nothing waiting and a proposal of its own, so after a loss parent and child each put back
    exactly what they settled."""
    import os

    redis_server.flush()
    store = make_store(redis_server.url)
    assert hold(store, "p1", budget("usd:global:day", 1000, 100)).ok
    store.settle([budget("usd:global:day", 1000, 100)], ["p1"], (), NOW + 1)
    pid = os.fork()
    if pid == 0:  # the child: settle its own 10, then restore only that after the loss
        code = 1
        try:
            assert hold(store, "k1", budget("usd:global:day", 1000, 10)).ok
            store.settle([budget("usd:global:day", 1000, 10)], ["k1"], (), NOW + 1)
            redis.Redis.from_url(redis_server.url).flushall()
            assert hold(store, "k2", budget("usd:global:day", 1000, 1)).ok  # restores 10, not 110
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert hold(store, "p2", budget("usd:global:day", 1000, 1)).ok  # the parent restores its 100
    assert store.usage(["usd:global:day"], NOW + 2) == [(110, 2)]
