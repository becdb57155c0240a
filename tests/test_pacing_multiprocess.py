"""A concurrency lease held by a gunicorn worker killed mid-call (kill -9) lapses on its own: checked
at the lease's expiry time on the injected timeline, not by waiting for it."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import redis as redis_py

from flask_claude.pacing import Ask
from flask_claude.storage import make_store

from .test_multiprocess import Gunicorn, gunicorn  # noqa: F401 (the fixture)

MODEL = "claude-haiku-4-5"
LEASES = "{fc:flask-claude}:lease:" + MODEL


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_a_killed_workers_lease_lapses(gunicorn: Any, redis_url: str) -> None:  # noqa: F811
    server: Gunicorn = gunicorn(TEST_CLAUDE_MAX_CONCURRENCY="1", TEST_CLAUDE_DEADLINE="3", TEST_SIM_LATENCY="2")
    client = redis_py.Redis.from_url(redis_url)
    def call() -> None:
        try:
            server.post("/spend")
        except OSError:
            pass  # its worker is killed mid-call: the connection is reset

    threading.Thread(target=call, daemon=True).start()
    deadline = time.monotonic() + 5
    while client.zcard(LEASES) == 0:  # wait for the condition (the call holds its lease), bounded
        assert time.monotonic() < deadline, "the call never took a lease"
        time.sleep(0.01)
    for worker in _children(server.process.pid):  # whichever holds the call dies mid-call: no give-back
        os.kill(worker, signal.SIGKILL)
    [(_member, lapses_at)] = client.zrange(LEASES, 0, -1, withscores=True)
    assert client.pttl(LEASES) > 0  # a relative expiry: the key itself goes too
    store = make_store(redis_url, prefix="flask-claude", socket_timeout=1.0)
    ask = Ask(MODEL, "next-call", {"requests": 1}, max_wait=0.0, cap=1, lease_ttl=10.0, pace=False)
    assert not store.pacing.admit(ask, lapses_at - 1).granted  # still held while it could be alive
    assert store.pacing.admit(ask, lapses_at + 0.01).granted  # then it lapses: the room is back
    assert client.zrange(LEASES, 0, -1) == [b"next-call"]
