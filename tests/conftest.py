"""Shared fixtures: apps on the real SDK talking to the simulator, a movable clock, log capture."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from loguru import logger

from flask_claude import Claude
from flask_claude.simulator import Simulator

# A key shaped like a real one: no log line in the whole run may contain it.
SECRET_KEY = "sk-ant-api03-TESTSECRETdoNotLogMe0123456789abcdef"


def todays_noon_utc() -> float:
    """Noon (UTC) of the real current day: a fake clock's start that follows the calendar.

    Anchored at the real date so that nothing (Redis's own clock above all) sees a time long past or
    far ahead; at noon so that a test moving the clock by minutes or hours never crosses a midnight
    by accident. A test that wants a midnight computes it from here.
    """
    day = 86_400
    return (time.time() // day) * day + day / 2


class FakeClock:
    """A clock tests move by hand; ``sleep`` advances it and remembers what was asked."""

    def __init__(self, start: float | None = None) -> None:
        self.now = todays_noon_utc() if start is None else start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("ANTHROPIC_", "CLAUDE_", "LAUNCHDARKLY_")) or name == "AI_KILL_SWITCH":
            monkeypatch.delenv(name, raising=False)


_all_lines: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _no_key_in_any_log() -> Iterator[None]:
    """Every loguru record of the session, checked at the end for the API key."""
    sink = logger.add(lambda m: _all_lines.append(str(m) + repr(m.record["extra"])), level="DEBUG")
    yield
    logger.remove(sink)
    leaked = [line for line in _all_lines if SECRET_KEY in line]
    assert not leaked, f"API key in {len(leaked)} log line(s)"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def now_clock(clock: FakeClock) -> FakeClock:
    """The fake clock at the real minute's start + 1 s: rollup keys expire on Redis's own clock."""
    clock.now = math.floor(time.time() / 60) * 60 + 1.0
    return clock


@pytest.fixture
def sim() -> Simulator:
    return Simulator()


@pytest.fixture
def make_app(tmp_path: Any, sim: Simulator, clock: FakeClock) -> Callable[..., Flask]:
    """A Flask app on the simulator (in-process transport) with the fake clock and a log file."""

    def factory(*, use_clock: bool = True, **config: Any) -> Flask:
        app = Flask(f"test_app_{len(config)}")
        app.config.update(CLAUDE_SIMULATE=True, CLAUDE_LOG_PATH=str(tmp_path / "claude.jsonl"),
                          CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"])
        app.config.update({k if k.startswith("CLAUDE_") else f"CLAUDE_{k.upper()}": v for k, v in config.items()})
        Claude(app, simulator=sim, **({"clock": clock} if use_clock else {}))
        return app

    return factory


def user_msg(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# --- tiers: what a test needs besides Python, as markers ---------------------------------------------------
#
# ``pytest`` alone runs the fast tier (no service: memory storage, the in-process simulator);
# ``scripts/test`` (CI) runs every tier: ``-m ""``. A test is marked by the fixtures it uses, by its
# parameter ("redis", "cluster"), or explicitly when it starts a server of its own.

SERVICE_FIXTURES = {"redis_server": "redis", "redis_url": "redis", "redis_cluster": "cluster",
                    "gunicorn": "multiprocess"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        needs = {marker for fixture, marker in SERVICE_FIXTURES.items()
                 if fixture in getattr(item, "fixturenames", ())}
        callspec = getattr(item, "callspec", None)
        if callspec is not None:
            needs |= {value for value in callspec.params.values() if value in ("redis", "cluster")}
        if "cluster" in needs or "multiprocess" in needs:
            needs.add("redis")
        if item.path.name == "test_browser.py":
            needs.add("browser")
        for marker in sorted(needs):
            item.add_marker(marker)


# --- a real redis-server per test session (CI installs one; a missing one fails, never skips) -------------

def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server process of our own on a free loopback port, stopped at the end."""

    def __init__(self) -> None:
        import shutil
        import subprocess
        import time as _time

        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: the storage tests need a real Redis "
                        "(apt-get install redis-server; .ci/run installs it)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=0.2)
        deadline = _time.monotonic() + 10
        while True:  # wait for the condition (accepting connections), bounded
            try:
                if client.ping():
                    break
            except redis.exceptions.ConnectionError:
                if _time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                _time.sleep(0.02)
        self.client = client

    def flush(self) -> None:
        from flask_claude.storage import flush_all
        from flask_claude.storage.redis import close_all

        flush_all()  # settlements an earlier test's app wrote behind land now, not in the next test's data
        close_all()  # and the earlier tests' stores do not take the flush for a data loss to repair
        self.client.flushall()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flush()
    return redis_server.url


@pytest.fixture(params=["memory", "redis"])
def storage_uri(request: pytest.FixtureRequest) -> str:
    """Run a test on both stores: the semantics must be the same."""
    if request.param == "memory":
        return "memory://"
    server: RedisServer = request.getfixturevalue("redis_server")
    server.flush()
    return server.url


# --- the example app (tests/test_example_app.py and tests/test_browser.py) -------------------------

EXAMPLE_ENV_TO_CLEAR = ("REDIS_URL", "EXAMPLE_FLAGS_FILE", "AI_KILL_SWITCH", "TRUSTED_PROXIES")


@pytest.fixture
def flags_file(tmp_path: Path) -> Path:
    import shutil

    from example_app import DEFAULT_FLAGS_FILE

    path = tmp_path / "flags.json"
    shutil.copy(DEFAULT_FLAGS_FILE, path)
    return path


@pytest.fixture
def make_example(tmp_path: Path, flags_file: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Flask]]:
    for name in list(os.environ):
        if name.startswith(("ANTHROPIC_", "CLAUDE_", "LAUNCHDARKLY_")) or name in EXAMPLE_ENV_TO_CLEAR:
            monkeypatch.delenv(name, raising=False)
    apps: list[Flask] = []

    def factory(**config: Any) -> Flask:
        from example_app import create_app

        app = create_app({"EXAMPLE_FLAGS_FILE": str(flags_file),
                          "CLAUDE_LOG_PATH": str(tmp_path / "claude-calls.jsonl"), **config})
        app.testing = True
        apps.append(app)
        return app

    yield factory
    for app in apps:  # stop each flag file poller
        app.extensions["claude"].flags.close()




def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes: synchronisation without a fixed sleep."""
    import time as _time

    deadline = _time.monotonic() + timeout
    while _time.monotonic() < deadline:
        if condition():
            return True
        _time.sleep(0.02)
    return condition()


@contextlib.contextmanager
def serving(app: Flask) -> Iterator[str]:
    """``app`` on a threaded loopback server for a browser or an HTTP client; its base URL."""
    import threading

    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)
