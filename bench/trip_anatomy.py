"""Where one Redis round trip's time goes, inside the benchmark and out of it.

1. Inside ``overhead.py``'s guarded route on Redis: the lean client's ``send()`` system call, the wait
   for the reply and the packing, timed around those calls in this process only (module attributes
   patched at run time; nothing in flask_claude/ changes), and Redis's own time per script from
   SLOWLOG (every command logged while it runs).
2. The same ``send()`` of ~1.4 KB in a tight loop, where Redis never goes idle between trips.
3. What a round trip does to the code after it: the guarded route on ``memory://`` with one extra
   round trip in a ``before_request`` hook (none; our client with the spin off; with it on; redis-py
   PING), and the time of the view's ``messages.create`` (the same code in every variant) measured
   inside the view.

Run: .venv/bin/python bench/trip_anatomy.py  (~40 s)
"""

from __future__ import annotations

import gc
import os
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import redis
from _common import RedisServer, machine_description, table
from loguru import logger
from overhead import Caller, app_guarded

import flask_claude.client as fc_client
from flask_claude.storage import wire

N = int(os.environ.get("BENCH_N", "3000"))


def median_us(xs: list[float]) -> float:
    return statistics.median(xs) * 1e6


def inside(server: RedisServer, log: str) -> list[list[str]]:
    app = app_guarded(server.url, log, "anatomy")
    call = Caller(app)
    times: dict[str, list[float]] = {"send": [], "read": [], "pack": []}
    send, read, pack = wire._Conn.send, wire._Conn.read, wire.pack

    def timed(name: str, fn: Any) -> Any:
        def run(*args: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                times[name].append(time.perf_counter() - t0)
        return run

    wire._Conn.send, wire._Conn.read, wire.pack = timed("send", send), timed("read", read), timed("pack", pack)
    try:
        for _ in range(500):
            call()
        for xs in times.values():
            xs.clear()
        server.client.config_set("slowlog-log-slower-than", 0)
        server.client.config_set("slowlog-max-len", 4 * N)
        server.client.slowlog_reset()
        gc.disable()
        for _ in range(N):
            call()
        gc.enable()
        entries = server.client.slowlog_get(4 * N)
        server.client.config_set("slowlog-log-slower-than", 10000)
    finally:
        wire._Conn.send, wire._Conn.read, wire.pack = send, read, pack
    store = app.extensions["claude"].store.inner
    names = {store._begin.sha.encode(): "begin", store._settle.sha.encode(): "settle"}
    by_script: dict[str, list[int]] = {"begin": [], "settle": []}
    for entry in entries:
        command = entry["command"] if isinstance(entry["command"], bytes) else entry["command"].encode()
        for sha, name in names.items():
            if sha in command:
                by_script[name].append(entry["duration"])
    return [["send() of the pipelined settle + begin", f"{median_us(times['send']):.1f}"],
            ["waiting for and reading both replies", f"{median_us(times['read']):.1f}"],
            ["packing them", f"{median_us(times['pack']):.1f}"],
            ["Redis's time in begin (SLOWLOG)", f"{statistics.median(by_script['begin']):.0f}"],
            ["Redis's time in the settlement (SLOWLOG)", f"{statistics.median(by_script['settle']):.0f}"]]


def tight(server: RedisServer) -> list[list[str]]:
    payload = b"x" * 1400
    command = b"*2\r\n$4\r\nECHO\r\n$%d\r\n%s\r\n" % (len(payload), payload)
    want = len(b"$1400\r\n") + 1400 + 2
    rows = []
    for spin in (False, True):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(not spin)
        sends, waits = [], []
        for _ in range(N):
            t0 = time.perf_counter()
            sock.sendall(command)
            t1 = time.perf_counter()
            got = 0
            while got < want:
                try:
                    got += len(sock.recv(65536))
                except BlockingIOError:
                    continue
            waits.append(time.perf_counter() - t1)
            sends.append(t1 - t0)
        sock.close()
        how = "asking again and again (spin)" if spin else "sleeping in recv()"
        rows += [[f"send() of 1.4 KB, waiting by {how}", f"{median_us(sends):.1f}"],
                 [f"the reply, waiting by {how}", f"{median_us(waits):.1f}"]]
    return rows


def after_a_trip(server: RedisServer, log: str) -> list[list[str]]:
    inner: dict[str, list[float]] = {}
    current = [""]
    create = fc_client.GuardedMessages.create

    def timed_create(self: Any, **params: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return create(self, **params)
        finally:
            inner.setdefault(current[0], []).append(time.perf_counter() - t0)

    echo = server.client.register_script("return 1")
    echo(keys=[], args=[])
    frame = wire.Frame(echo, [], [], 0)
    plain = redis.Redis(port=server.port, socket_timeout=1.0)
    lean_off, lean_on = wire.LeanScripts(server.client, 1.0, 0.0), wire.LeanScripts(server.client, 1.0, 0.0005)
    hooks: dict[str, Any] = {
        "no round trip": None,
        "our client, spin off": lambda: lean_off.run([(frame, (), [])]),
        "our client, spin 0.5 ms": lambda: lean_on.run([(frame, (), [])]),
        "redis-py PING": plain.ping,
    }
    callers = {}
    for label, hook in hooks.items():
        app = app_guarded("memory://", log, f"after_{len(callers)}")
        if hook is not None:
            app.before_request(lambda hook=hook: (hook(), None)[1])
        callers[label] = Caller(app)
    whole: dict[str, list[float]] = {k: [] for k in callers}
    fc_client.GuardedMessages.create = timed_create  # type: ignore[method-assign]
    try:
        for _ in range(300):
            for label, call in callers.items():
                current[0] = label
                call()
        inner.clear()
        gc.disable()
        for _ in range(N // 2):
            for label, call in callers.items():
                current[0] = label
                t0 = time.perf_counter()
                call()
                whole[label].append(time.perf_counter() - t0)
        gc.enable()
    finally:
        fc_client.GuardedMessages.create = create  # type: ignore[method-assign]
    return [[label, f"{median_us(whole[label]):.0f}", f"{median_us(inner[label]):.0f}"] for label in callers]


def main() -> None:
    logger.remove()
    log = os.path.join(tempfile.mkdtemp(prefix="bench-anatomy-"), "calls.jsonl")
    server = RedisServer()
    try:
        print(f"== 1. one guarded request's round trip inside the benchmark ({N} requests, medians) ==")
        print(table(inside(server, log), ["part", "us"]))
        print(f"\n== 2. the same send() in a tight loop ({N} trips, medians) ==")
        print(table(tight(server), ["part", "us"]))
        print(f"\n== 3. one extra round trip before the view, guarded route on memory:// ({N // 2} requests each, "
              "interleaved, medians) ==")
        print(table(after_a_trip(server, log), ["round trip before the view", "request us",
                                                "messages.create inside the view us"]))
        print()
        print(machine_description(server.version()))
        print(f"command: {sys.executable} bench/trip_anatomy.py  (BENCH_N={N})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
