"""The Redis client's side of a connection: when to retry it, and what the server says of itself."""

from __future__ import annotations

from typing import Any

# A failed connection is retried at once, then after these waits (seconds): a restarted Redis
# refuses connections for a moment, and a step that waits it out skips no limit.
RESTART_WAITS = (0.0, 0.1, 0.25)


def reconnect_retry() -> Any:
    """redis-py's ``Retry`` with ``RESTART_WAITS`` between attempts, on connection errors only
    (redis-py is an optional extra: imported here, not at the module's top)."""
    import redis
    from redis.backoff import AbstractBackoff
    from redis.retry import Retry

    class RestartBackoff(AbstractBackoff):
        def compute(self, failures: int) -> float:
            return RESTART_WAITS[min(failures, len(RESTART_WAITS)) - 1]

    return Retry(RestartBackoff(), len(RESTART_WAITS), supported_errors=(redis.exceptions.ConnectionError,))


def config_of(*replies: Any) -> dict[str, str] | None:
    """``CONFIG GET`` replies as one dict; None where the server refuses CONFIG (many managed ones do)."""
    out: dict[str, str] = {}
    for reply in replies:
        if isinstance(reply, Exception) or not isinstance(reply, (list, dict)):
            return None
        items = list(reply.items()) if isinstance(reply, dict) else list(zip(reply[::2], reply[1::2], strict=True))
        for name, value in items:
            out[text(name)] = text(value)
    return out


def persists(config: dict[str, str]) -> bool:
    return config.get("appendonly") == "yes" or bool(config.get("save", "").strip())


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
