"""Shared counters for limits, budgets, alerts and breakers: memory (one process) or Redis (all workers).

Why not ``limits``' strategies for money: a fixed window counts a refused hit's cost (a refused
$0.60 call poisons a $1.00/day budget for the rest of the day), a moving window stores one entry
per unit (unusable for tokens or micro-dollars), windows start at the first hit instead of the
calendar day, and several limits are hit one after another rather than together. A budget here is
a *reservation*: every line of a call (user tokens, user USD, feature USD, global USD) is checked
and reserved in one atomic step (one Lua script on Redis, one lock in memory), or none is.
``limits`` still parses the limit strings and turns ``CLAUDE_STORAGE_URI`` into a Redis client
(``redis://``, ``redis+cluster://``, ``redis+sentinel://``), so its URI options and socket timeouts
work as documented there.

A request waits for one round trip when its feature bounds its input: ``begin`` (the admission,
the first call's hold, a read of the chain's breakers); ``settle`` (the real cost, alert thresholds,
the breaker's success) is written behind and rides on a later round trip, and so do the monitoring
rollups, summed per worker and written at most once per ``CLAUDE_ROLLUP_FLUSH_INTERVAL``. The layout:

- ``records.py``: what a step takes and returns, and the ``Store`` protocol a backend implements;
- ``memory.py``: one process; ``redis.py``: every worker and host (redis-py), each step one script
  in ``lua/``; ``connection.py``: the client's retries and what the server says of its persistence;
  ``ledger.py``: this process's spend per budget, put back after a data loss; ``guard.py``: the
  breaker for storage itself; ``rollups.py`` and ``pacing.py``: where the monitoring rollups and the
  pacing state live. docs/ARCHITECTURE.md has the whole map.

Units are integers (tokens, micro-dollars), so concurrent increments never round. Keys of one app
share the Redis hash tag ``{fc:<prefix>}``: a multi-key script must stay in one cluster slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .guard import OutageGuard
from .memory import MemoryStore
from .records import (
    BREAKER_BUCKETS,
    KILL_SHARE,
    MICRO,
    Admission,
    Begin,
    BreakerParams,
    Crossed,
    Line,
    Outcome,
    SettleDone,
    StorageUnavailable,
    Store,
)
from .redis import RedisStore, flush_all

__all__ = ["BREAKER_BUCKETS", "KILL_SHARE", "MICRO", "Admission", "Begin", "BreakerParams", "Crossed", "Line",
           "MemoryStore", "OutageGuard", "Outcome", "RedisStore", "SettleDone", "StorageUnavailable", "Store",
           "flush_all", "make_store"]


def make_store(uri: str, *, prefix: str, socket_timeout: float, settle_delay: float = 0.05,
               options: dict[str, Any] | None = None,
               notify: Callable[[str, dict[str, Any]], None] | None = None) -> Store:
    """The store ``CLAUDE_STORAGE_URI`` names; ``options`` go to the Redis client as they are."""
    if uri.startswith("memory://"):
        return MemoryStore()
    return RedisStore(uri, prefix=prefix, socket_timeout=socket_timeout, settle_delay=settle_delay,
                      options=options, notify=notify)
