"""Pytest fixtures for apps that use flask-claude (loaded automatically as a pytest plugin).

Your test suite provides an ``app`` fixture (as with pytest-flask) configured with
``CLAUDE_SIMULATE=True``; these fixtures then script the simulator, flip flags and read the call
log of that app::

    def test_summary_degrades(app, client, claude_sim, claude_log):
        claude_sim.fail(529)
        assert client.post("/summarize", json={"text": "hi"}).headers["X-Claude-Degraded"]
        assert claude_log.events("claude_api_error")
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger

from .events import claude_fields
from .state import state_for


class CallLog:
    """Every flask-claude event written while the fixture is active, as dicts (the JSON line's fields)."""

    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def _sink(self, message: Any) -> None:
        with self._lock:
            self._records.append(dict(claude_fields(message.record) or {}))

    @property
    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._records)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records if name is None or r["event"] == name]

    def spend_usd(self) -> float:
        """Total cost of the calls logged so far."""
        return sum(float(r.get("cost_usd") or 0) for r in self.records
                   if r["event"] in ("claude_api_call", "claude_api_error"))

    def clear(self) -> None:
        with self._lock:
            self._records.clear()


@pytest.fixture
def claude_log() -> Iterator[CallLog]:
    """Captures flask-claude's log events in memory (loguru is invisible to ``caplog``)."""
    log = CallLog()
    sink_id = logger.add(log._sink, level="DEBUG", format="{message}",
                         filter=lambda record: claude_fields(record) is not None)
    try:
        yield log
    finally:
        logger.remove(sink_id)


@pytest.fixture
def claude_sim(app: Any) -> Any:
    """The simulator behind ``app`` (needs ``CLAUDE_SIMULATE=True``); faults are reset afterwards.

    Reply rules the app set up (``sim.reply(...)`` in its factory) are kept; the ones a test adds or
    removes are put back as they were afterwards.
    """
    state = state_for(app)
    if state.simulator is None:
        pytest.fail("claude_sim needs an app configured with CLAUDE_SIMULATE=True")
    sim = state.simulator
    rules = sim.replies
    sim.reset()
    yield sim
    sim.reset()
    sim.replies = rules


@pytest.fixture
def claude_flags(app: Any) -> Any:
    """The app's flag provider (``StaticFlags`` by default): ``claude_flags.set("ai-summarize", False)``."""
    return state_for(app).flags
