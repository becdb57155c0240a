"""EVALSHA on a socket of our own, several scripts per round trip: the hot path to a plain Redis.

Every guarded request runs one or two of our Lua scripts. Through redis-py each costs ~160 us of
Python before the network (command packing, pool checkout, retry layers, reply callbacks), more
than the script itself; and a settlement written behind is worth only as much as its ride on the
next request's round trip. So for a plain ``redis://`` server (TCP, no TLS, no cluster, no
sentinel) the scripts go through this small RESP client: one socket per thread (and per process:
a forked worker opens its own), commands packed in one buffer and sent in one write, replies read
in order. Anything else (TLS, a unix socket, cluster, sentinel) keeps redis-py for everything.

A script Redis does not know yet (``NOSCRIPT``: a restarted or flushed server) is loaded through
redis-py and run again; it never ran, so running it again is safe.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from .. import process


class Frame:
    """An EVALSHA's fixed part, packed once: the script, its keys and the arguments that stay the
    same for a budget plan (the scripts take those first). A request then packs only its own few
    arguments (the time, ids, amounts) after it: encoding ~60 keys and arguments per request cost
    ~20 us on the request path (bench/RESULTS.md)."""

    __slots__ = ("args", "head", "keys", "n_own", "script")

    def __init__(self, script: Any, keys: Sequence[Any], args: Sequence[Any], n_own: int) -> None:
        self.script = script
        self.keys = list(keys)
        self.args = list(args)
        self.n_own = n_own  # how many arguments each call adds after ``args``
        self.head = (b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(self.keys) + len(self.args) + n_own)
                     + _bulk(script.sha) + _bulk(len(self.keys))
                     + b"".join(_bulk(v) for v in (*self.keys, *self.args)))

    @property
    def sha(self) -> str:
        return str(self.script.sha)


# (redis-py Script, keys, args), or (Frame, (), the call's own arguments)
Call = tuple[Any, Sequence[Any], Sequence[Any]]


def expand(call: Call) -> Call:
    """The plain (script, keys, args) of a call, for redis-py (pipelines, cluster, sentinel)."""
    head, _, args = call
    if type(head) is Frame:
        return head.script, head.keys, [*head.args, *args]
    return call


def script_of(call: Call) -> Any:
    head = call[0]
    return head.script if type(head) is Frame else head


class ReplyError(Exception):
    """A ``-ERR ...`` reply to one command of a pipeline (the others may have succeeded)."""


class NotSent(ConnectionError):
    """The commands never left this process (no connection, or Redis refused its set-up)."""


def usable(client: Any) -> bool:
    """Whether ``client`` is a plain TCP ``redis.Redis`` that this path can talk to directly."""
    import redis

    pool = getattr(client, "connection_pool", None)
    return type(client) is redis.Redis and pool is not None and pool.connection_class is redis.connection.Connection


def _bulk(value: Any) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


_SHAS: dict[str, bytes] = {}


def pack(calls: Sequence[Call]) -> bytes:
    """The RESP of the EVALSHAs, in one buffer. The loop is inlined (no call per value)."""
    parts: list[bytes] = []
    append = parts.append
    for head, keys, args in calls:
        if type(head) is Frame:
            if len(args) != head.n_own:
                raise ValueError(f"a frame of {head.n_own} own arguments was given {len(args)}")
            append(head.head)
            values: Sequence[Any] = args
        else:
            sha = _SHAS.get(head.sha)
            if sha is None:
                sha = _SHAS[head.sha] = _bulk(head.sha)
            append(b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(keys) + len(args)))
            append(sha)
            append(_bulk(len(keys)))
            values = (*keys, *args)
        for value in values:
            kind = type(value)
            data = value.encode() if kind is str else value if kind is bytes else str(value).encode()
            append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Short(Exception):
    """The buffer ends inside a reply: read more."""


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One RESP reply from ``buf`` at ``pos``: (value, the position after it), or ``_Short``."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Short
    kind = buf[pos]
    if kind == 58:  # ":"
        return int(buf[pos + 1:end]), end + 2
    if kind == 36:  # "$"
        size = int(buf[pos + 1:end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            raise _Short
        return buf[end + 2:stop], stop + 2
    if kind == 42:  # "*"
        size = int(buf[pos + 1:end])
        if size < 0:
            return None, end + 2
        items = []
        pos = end + 2
        for _ in range(size):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 43:  # "+"
        return buf[pos + 1:end], end + 2
    if kind == 45:  # "-"
        return ReplyError(buf[pos + 1:end].decode("utf-8", "replace")), end + 2
    raise ConnectionError(f"unexpected reply from Redis: {buf[pos:pos + 20]!r}")


class _Conn:
    """One socket to Redis. With ``spin`` > 0 the socket is non-blocking and a reply is waited for
    on the CPU for up to ``spin`` seconds before sleeping (``_recv``)."""

    def __init__(self, address: tuple[str, int], timeout: float, auth: tuple[Any, ...], db: int,
                 spin: float = 0.0) -> None:
        self.pid = process.pid()
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""  # what was received and not parsed yet
        self.timeout = timeout
        self.spin = 0.0  # the set-up below reads in the socket's own timeout mode
        self.typical = 0.0  # how long replies took to come lately (a moving average, seconds)
        self._poll: Any = None
        setup = []
        if auth:
            setup.append([b"AUTH", *auth])
        if db:
            setup.append([b"SELECT", db])
        if setup:
            self.sock.sendall(b"".join(b"*%d\r\n" % len(c) + b"".join(_bulk(a) for a in c) for c in setup))
            for reply in self.read(len(setup)):
                if isinstance(reply, ReplyError):
                    self.close()
                    raise NotSent(f"Redis refused the connection's set-up: {reply}")
        if spin > 0:
            self.sock.setblocking(False)
            if hasattr(select, "poll"):  # not on Windows, where select() has no descriptor limit
                self._poll = select.poll()
                self._poll.register(self.sock, select.POLLIN)
            self.spin = spin

    def read(self, n: int) -> list[Any]:
        """The next ``n`` replies. Parsed from one buffer (a reply usually comes in one ``recv``): a
        line-by-line file reader cost a microsecond per element. Anything unreadable is a
        ``ConnectionError`` (the connection is out of step and is dropped)."""
        out: list[Any] = []
        buf, pos = self.buf, 0
        while len(out) < n:
            try:
                value, pos = _parse(buf, pos)
            except (ValueError, IndexError) as exc:
                raise ConnectionError(f"unreadable reply from Redis: {type(exc).__name__}") from None
            except _Short:
                data = self._recv() if self.spin else self.sock.recv(65536)
                if not data:
                    raise ConnectionError("connection closed by Redis") from None
                buf = buf[pos:] + data
                pos = 0
                continue
            out.append(value)
        self.buf = buf[pos:]
        return out

    def send(self, data: bytes) -> None:
        if not self.spin:
            self.sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                if not select.select([], [self.sock], [], self.timeout)[1]:
                    raise TimeoutError("timed out writing to Redis") from None

    def _recv(self) -> bytes:
        """The next bytes from Redis, asked for again and again for up to ``spin`` seconds before
        sleeping until they come. Why: a reply takes ~50-400 us; a worker that sleeps that long
        gives its CPU up, and on a virtual machine the halt, the wake-up and the caches found cold
        afterwards cost ~100 us per round trip more than the CPU spent spinning (bench/RESULTS.md).
        Only while replies come within the spin: a distant or busy Redis is slept on at once (its
        round trips would cost the spin's CPU and save nothing) until replies are quick again."""
        sock = self.sock
        try:
            return sock.recv(65536)
        except BlockingIOError:
            pass
        clock = time.perf_counter
        start = clock()
        if self.typical < self.spin:
            until = start + self.spin
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    if clock() < until:
                        continue
                    break
                self.typical += (clock() - start - self.typical) * 0.125
                return data
        while True:
            if self._poll is not None:
                ready = bool(self._poll.poll(self.timeout * 1000))
            else:
                ready = bool(select.select([sock], [], [], self.timeout)[0])
            if not ready:
                raise TimeoutError("timed out reading from Redis")
            try:
                data = sock.recv(65536)
            except BlockingIOError:  # a spurious wake-up
                continue
            # The wait measured here includes the wake-up: spinning resumes only once the round
            # trip itself is quick again.
            self.typical += (clock() - start - self.typical) * 0.125
            return data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class LeanScripts:
    """Runs a list of (script, keys, args) in one round trip; a reply or a ``ReplyError`` each."""

    def __init__(self, client: Any, timeout: float, spin: float = 0.0) -> None:
        kwargs = client.connection_pool.connection_kwargs
        self._client = client
        self._address = (str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379)))
        username, password = kwargs.get("username"), kwargs.get("password")
        self._auth: tuple[Any, ...] = ((username, password) if username else (password,)) if password else ()
        self._db = int(kwargs.get("db", 0) or 0)
        self._timeout = timeout
        # CLAUDE_STORAGE_SPIN. Not under gevent or eventlet: their sockets yield to other greenlets
        # while waiting, and a spin would hold every greenlet of the worker instead.
        self._spin = spin if socket.socket.__module__ in ("socket", "_socket") else 0.0
        self._local = threading.local()

    def _conn(self) -> _Conn:
        conn: _Conn | None = getattr(self._local, "conn", None)
        if conn is None or conn.pid != process.pid():  # a forked worker never shares its parent's socket
            try:
                conn = _Conn(self._address, self._timeout, self._auth, self._db, self._spin)
            except NotSent:
                raise
            except OSError as exc:
                raise NotSent(f"{type(exc).__name__}: {exc}") from exc
            self._local.conn = conn
        return conn

    def run(self, calls: Sequence[Call]) -> list[Any]:
        """Socket errors raise (``OSError``/``ConnectionError``) and drop the socket; a reply error
        is returned in its command's place."""
        replies = self._send(calls)
        missing = [i for i, r in enumerate(replies) if isinstance(r, ReplyError) and str(r).startswith("NOSCRIPT")]
        if missing:
            scripts = (script_of(calls[i]) for i in missing)
            for script in {id(script): script for script in scripts}.values():
                self._client.script_load(script.script)
            again = self._send([calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    def _send(self, calls: Sequence[Call]) -> list[Any]:
        data = pack(calls)  # before any I/O: a call that cannot be packed has sent nothing
        conn = self._conn()
        try:
            conn.send(data)
            return conn.read(len(calls))
        except BaseException:
            conn.close()
            self._local.conn = None
            raise
