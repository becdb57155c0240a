"""The simulator's rate limits: requests and tokens per window, as token buckets, like the API's.

The API limits requests, input tokens and output tokens per minute per model class with a token
bucket (capacity refills continuously), pre-charges output tokens at ``max_tokens`` and gives back
what the reply did not use. It answers every call with ``anthropic-ratelimit-*`` headers (limit,
remaining, and ``reset``: the RFC 3339 time the bucket is full again) and a call over a limit with a
429 ``rate_limit_error`` and ``retry-after``. The window is a parameter so a benchmark can play a
minute in ten seconds (``window=10``): the limits are then per ten seconds.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from ..clock import Clock
from .wire import rfc3339

# Header names per dimension, as the API spells them.
DIMENSIONS = ("requests", "input-tokens", "output-tokens")


@dataclass
class _Bucket:
    limit: int
    level: float
    at: float

    def refill(self, now: float, rate: float) -> None:
        self.level = min(float(self.limit), self.level + rate * max(0.0, now - self.at))
        self.at = now


@dataclass
class RateLimit:
    """One model's (or every model's) limits per ``window`` seconds; ``None`` leaves a dimension free."""

    requests: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    window: float = 60.0
    model: str | None = None
    limited: int = 0  # 429s answered, for a test or a benchmark to read
    admitted: int = 0
    limited_by_model: dict[str | None, int] = field(default_factory=dict)
    limited_at: list[float] = field(default_factory=list)  # when each 429 was answered (the clock's time)
    _buckets: dict[tuple[str | None, str], _Bucket] = field(default_factory=dict)

    def limits(self) -> dict[str, int]:
        found = {"requests": self.requests, "input-tokens": self.input_tokens, "output-tokens": self.output_tokens}
        return {name: limit for name, limit in found.items() if limit is not None}


class RateLimiter:
    """Every configured limit, thread-safe (the loopback server answers several connections at once)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._limits: list[RateLimit] = []

    def add(self, limit: RateLimit) -> RateLimit:
        if limit.window <= 0:
            raise ValueError("window must be > 0 seconds")
        for name, value in limit.limits().items():
            if value < 1:
                raise ValueError(f"the {name} limit must be >= 1")
        with self._lock:
            self._limits = [x for x in self._limits if x.model != limit.model] + [limit]
        return limit

    def clear(self) -> None:
        with self._lock:
            self._limits.clear()

    def _for(self, model: str | None) -> RateLimit | None:
        exact = [x for x in self._limits if x.model is not None and x.model == model]
        anyone = [x for x in self._limits if x.model is None]
        found = exact or anyone
        return found[0] if found else None

    def _bucket(self, limit: RateLimit, model: str | None, name: str, now: float) -> _Bucket:
        key = (model, name)
        bucket = limit._buckets.get(key)
        cap = limit.limits()[name]
        if bucket is None:
            bucket = limit._buckets[key] = _Bucket(cap, float(cap), now)
        bucket.refill(now, cap / limit.window)
        return bucket

    def admit(self, model: str | None, input_tokens: int, max_tokens: int) -> tuple[bool, list[tuple[str, str]]]:
        """Charge one call (output at ``max_tokens``) or refuse it: (admitted, the headers to send)."""
        need = {"requests": 1, "input-tokens": input_tokens, "output-tokens": max_tokens}
        with self._lock:
            limit = self._for(model)
            if limit is None:
                return True, []
            now = self._clock.time()
            buckets = {name: self._bucket(limit, model, name, now) for name in limit.limits()}
            short = [name for name, b in buckets.items() if b.level < need[name]]
            if short:
                limit.limited += 1
                limit.limited_by_model[model] = limit.limited_by_model.get(model, 0) + 1
                limit.limited_at.append(now)
                wait = max((need[n] - buckets[n].level) / (buckets[n].limit / limit.window) for n in short)
                return False, [*self._headers(limit, buckets, now), ("retry-after", str(max(1, math.ceil(wait))))]
            for name, bucket in buckets.items():
                bucket.level -= need[name]
            limit.admitted += 1
            return True, self._headers(limit, buckets, now)

    def give_back(self, model: str | None, unused_output: int) -> list[tuple[str, str]]:
        """The reply used fewer output tokens than ``max_tokens``: return the rest, and the headers after."""
        with self._lock:
            limit = self._for(model)
            if limit is None:
                return []
            now = self._clock.time()
            buckets = {name: self._bucket(limit, model, name, now) for name in limit.limits()}
            if "output-tokens" in buckets and unused_output > 0:
                out = buckets["output-tokens"]
                out.level = min(float(out.limit), out.level + unused_output)
            return self._headers(limit, buckets, now)

    @staticmethod
    def _headers(limit: RateLimit, buckets: dict[str, _Bucket], now: float) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for name, b in buckets.items():
            full_in = (b.limit - b.level) / (b.limit / limit.window)
            found += [(f"anthropic-ratelimit-{name}-limit", str(b.limit)),
                      (f"anthropic-ratelimit-{name}-remaining", str(max(0, math.floor(b.level)))),
                      (f"anthropic-ratelimit-{name}-reset", rfc3339(now + full_in) or "")]
        tokens = [buckets[n] for n in ("input-tokens", "output-tokens") if n in buckets]
        if tokens:  # the most restrictive token limit in effect, as the API sends it
            tight = min(tokens, key=lambda b: b.level / b.limit)
            full_in = (tight.limit - tight.level) / (tight.limit / limit.window)
            found += [("anthropic-ratelimit-tokens-limit", str(tight.limit)),
                      ("anthropic-ratelimit-tokens-remaining", str(max(0, math.floor(tight.level)))),
                      ("anthropic-ratelimit-tokens-reset", rfc3339(now + full_in) or "")]
        return found
