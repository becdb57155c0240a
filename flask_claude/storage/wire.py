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

import socket
import threading
from collections.abc import Sequence
from typing import Any

from .. import process

Call = tuple[Any, Sequence[Any], Sequence[Any]]  # (redis-py Script, keys, args)


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


def pack(calls: Sequence[Call]) -> bytes:
    """The RESP of the EVALSHAs, in one buffer. The loop is inlined (no call per value): a request
    sends ~80 keys and arguments, and a function call each was a third of this client's time."""
    parts: list[bytes] = []
    append = parts.append
    for script, keys, args in calls:
        append(b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(keys) + len(args)))
        append(_bulk(script.sha))
        append(_bulk(len(keys)))
        for value in (*keys, *args):
            kind = type(value)
            data = value.encode() if kind is str else value if kind is bytes else str(value).encode()
            append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Conn:
    def __init__(self, address: tuple[str, int], timeout: float, auth: tuple[Any, ...], db: int) -> None:
        self.pid = process.pid()
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")
        setup = []
        if auth:
            setup.append([b"AUTH", *auth])
        if db:
            setup.append([b"SELECT", db])
        if setup:
            self.sock.sendall(b"".join(b"*%d\r\n" % len(c) + b"".join(_bulk(a) for a in c) for c in setup))
            for _ in setup:
                reply = self.read()
                if isinstance(reply, ReplyError):
                    self.close()
                    raise NotSent(f"Redis refused the connection's set-up: {reply}")

    def read(self) -> Any:
        line = self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by Redis")
        kind, rest = line[:1], line[1:-2]
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self.reader.read(size + 2)
            if len(data) != size + 2:
                raise ConnectionError("connection closed by Redis")
            return data[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self.read() for _ in range(size)]
        if kind == b"+":
            return rest
        if kind == b"-":
            return ReplyError(rest.decode("utf-8", "replace"))
        raise ConnectionError(f"unexpected reply from Redis: {line[:20]!r}")

    def close(self) -> None:
        try:
            self.reader.close()
            self.sock.close()
        except OSError:
            pass


class LeanScripts:
    """Runs a list of (script, keys, args) in one round trip; a reply or a ``ReplyError`` each."""

    def __init__(self, client: Any, timeout: float) -> None:
        kwargs = client.connection_pool.connection_kwargs
        self._client = client
        self._address = (str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379)))
        username, password = kwargs.get("username"), kwargs.get("password")
        self._auth: tuple[Any, ...] = ((username, password) if username else (password,)) if password else ()
        self._db = int(kwargs.get("db", 0) or 0)
        self._timeout = timeout
        self._local = threading.local()

    def _conn(self) -> _Conn:
        conn: _Conn | None = getattr(self._local, "conn", None)
        if conn is None or conn.pid != process.pid():  # a forked worker never shares its parent's socket
            try:
                conn = _Conn(self._address, self._timeout, self._auth, self._db)
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
            for script in {id(calls[i][0]): calls[i][0] for i in missing}.values():
                self._client.script_load(script.script)
            again = self._send([calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    def _send(self, calls: Sequence[Call]) -> list[Any]:
        conn = self._conn()
        try:
            conn.sock.sendall(pack(calls))
            return [conn.read() for _ in calls]
        except BaseException:
            conn.close()
            self._local.conn = None
            raise
