"""The loopback way in: a threaded werkzeug server, for code that must open real connections
(other processes, ``gunicorn``, benchmarks, ``flask claude simulate``)."""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Generic, Self, TypeVar
from wsgiref.types import WSGIApplication

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

#: The app a server runs: a :class:`~flask_claude.simulator.Simulator`, typed as such for its callers.
App = TypeVar("App", bound=WSGIApplication)


class _RequestHandler(WSGIRequestHandler):
    """werkzeug's handler, silent about each request when the server is quiet (tests)."""

    quiet = True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if not self.quiet:
            super().log_request(code, size)


def make_loopback_server(app: WSGIApplication, host: str, port: int, quiet: bool) -> BaseWSGIServer:
    handler = type("_SimulatorRequestHandler", (_RequestHandler,), {"quiet": quiet})
    return make_server(host, port, app, threaded=True, request_handler=handler)


def serve_forever(server: BaseWSGIServer) -> None:
    """Serve in the foreground until interrupted (a CLI or a sidecar process), then close the socket."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


class SimulatorServer(Generic[App]):
    """A loopback server running the simulator in a daemon thread; stops on ``shutdown()``/exit."""

    def __init__(self, simulator: App, *, host: str = "127.0.0.1", port: int = 0,
                 quiet: bool = True) -> None:
        self.simulator = simulator
        self._server = make_loopback_server(simulator, host, port, quiet)
        self.host = host
        self.port: int = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}" if ":" not in host else f"http://[{host}]:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="claude-simulator", daemon=True
        )
        self._thread.start()

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.shutdown()
