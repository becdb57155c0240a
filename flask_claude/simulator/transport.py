"""The in-process way in: an ``httpx2`` transport that calls the simulator's WSGI app directly.

No sockets, so unit tests are fast, yet the client still sees a network's failures: a stall past
its read timeout raises ``httpx2.ReadTimeout`` and a dropped stream ``httpx2.RemoteProtocolError``.
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from types import TracebackType
from typing import Any, Generic
from wsgiref.types import WSGIEnvironment

import httpx2

from .server import App
from .wire import READ_TIMEOUT_KEY, ConnectionDropped, ReadTimedOut


class _SimByteStream(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """The WSGI body handed to httpx2 unread, turning simulated network failures into httpx2's own."""

    def __init__(self, chunks: Iterable[bytes], request: httpx2.Request) -> None:
        self._chunks = chunks
        self._request = request
        # A cancelled async reader leaves its ``next()`` running in a worker thread; closing the body
        # must wait for it, or the generator is closed while it executes.
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[bytes]:
        with _network_errors(self._request):
            yield from self._chunks

    def _next(self, iterator: Iterator[bytes], done: object) -> object:
        with self._lock:
            return next(iterator, done)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        iterator = iter(self._chunks)
        done = object()
        while True:
            with _network_errors(self._request):
                chunk = await asyncio.to_thread(self._next, iterator, done)
            if chunk is done:
                return
            assert isinstance(chunk, bytes)
            yield chunk

    def close(self) -> None:
        with self._lock:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)


class _network_errors:
    """Map the simulator's stand-ins to the exceptions a real httpx2 connection raises."""

    def __init__(self, request: httpx2.Request) -> None:
        self._request = request

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, ConnectionDropped):
            raise httpx2.RemoteProtocolError(
                "peer closed connection without sending complete message body (incomplete chunked read)",
                request=self._request,
            ) from None
        if isinstance(exc, ReadTimedOut):
            raise httpx2.ReadTimeout("The read operation timed out", request=self._request) from None


class SimulatorTransport(httpx2.BaseTransport, httpx2.AsyncBaseTransport, Generic[App]):
    """Calls the simulator's WSGI app in-process.

    Unlike ``httpx2.WSGITransport`` it passes the client's read timeout in (so a stall longer than it
    raises ``httpx2.ReadTimeout``) and maps a dropped stream to ``httpx2.RemoteProtocolError``. The
    async side runs the app in a worker thread so delays do not block the event loop.
    """

    def __init__(self, simulator: App) -> None:
        self.simulator = simulator

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        return self._call_app(request)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        await request.aread()
        return await asyncio.to_thread(self._call_app, request)

    def _call_app(self, request: httpx2.Request) -> httpx2.Response:
        environ = _environ(request)
        seen: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen["status"], seen["headers"] = status, headers
            return lambda data: None

        with _network_errors(request):
            body = self.simulator(environ, start_response)
        status = int(seen["status"].split()[0])
        return httpx2.Response(status, headers=seen["headers"], stream=_SimByteStream(body, request))


def _environ(request: httpx2.Request) -> WSGIEnvironment:
    url = request.url
    port = url.port or {"http": 80, "https": 443}.get(url.scheme, 80)
    environ: WSGIEnvironment = {
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": url.scheme,
        "wsgi.input": io.BytesIO(request.content),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": url.path,
        "QUERY_STRING": url.query.decode("ascii"),
        "SERVER_NAME": url.host,
        "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": str(len(request.content)),
    }
    for key, value in request.headers.raw:
        name = key.decode("latin-1").upper().replace("-", "_")
        if name not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            name = "HTTP_" + name
        environ[name] = value.decode("latin-1")
    timeout = request.extensions.get("timeout", {}).get("read")
    if timeout is not None:
        environ[READ_TIMEOUT_KEY] = float(timeout)
    return environ
