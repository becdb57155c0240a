"""An offline Anthropic Messages API that speaks the real wire format.

Guards around Claude calls (budgets, retries, deadlines, circuit breakers) are only as good as the
failures they were tested against, and the real API cannot be asked to be overloaded on cue. This
package answers the requests the official ``anthropic`` SDK sends, byte for byte in the shapes the SDK
parses, so the SDK runs unmodified against it, and it can be scripted to fail in the ways the real
service fails: error statuses with ``retry-after``, slow or trickling bodies, a mid-stream
``event: error`` and a connection dropped in the middle of a stream.

The core is one WSGI application (:class:`Simulator`, ``app.py``). Two ways to reach it:

* in-process, ``Simulator.transport()`` -- an ``httpx2`` transport for
  ``anthropic.DefaultHttpxClient(transport=...)``; no sockets, fast enough for unit tests
  (``transport.py``);
* over loopback, ``Simulator.serve()`` -- a threaded werkzeug server, for code that must open real
  connections (other processes, ``gunicorn``, benchmarks), and ``run_server`` for the
  ``flask claude simulate`` command (``server.py``).

The rest: the fault script (``faults.py``), token and prompt-cache accounting (``accounting.py``),
the wire shapes (``wire.py``), the batch endpoints (``batches.py``) and the reply text
and reply rules (``replies.py``). Replies are deterministic: the same request gets the same text and token counts,
so tests can pin numbers. Token counts are a documented estimate (:func:`estimate_tokens`), not the
real tokenizer.
"""

from __future__ import annotations

from ..clock import Clock, SystemClock
from ..tokens import estimate_tokens
from .accounting import IMAGE_TOKENS, MESSAGE_OVERHEAD_TOKENS
from .app import RecordedRequest, Simulator, run_server
from .faults import Fault
from .replies import ReplyRule
from .server import SimulatorServer
from .transport import SimulatorTransport

__all__ = [
    "IMAGE_TOKENS",
    "MESSAGE_OVERHEAD_TOKENS",
    "Clock",
    "Fault",
    "RecordedRequest",
    "ReplyRule",
    "Simulator",
    "SimulatorServer",
    "SimulatorTransport",
    "SystemClock",
    "estimate_tokens",
    "run_server",
]
