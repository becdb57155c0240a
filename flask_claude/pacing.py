"""Pacing from the upstream's rate-limit headers, and a concurrency cap per model across workers.

Why: every worker used to learn about the organisation's limit only by hitting a 429 and backing off
alone, so 4 workers x 32 threads made a storm of 429s and retries. The API tells every caller where
it stands (``anthropic-ratelimit-{requests,input-tokens,output-tokens}-{limit,remaining,reset}``);
each response's values are recorded in the shared store per model, and before a call the store is
asked whether what is left holds this call (1 request, its input bound, its ``max_tokens``).

The fair order is a schedule, not a poll: the store keeps, per model and dimension, a token bucket
(level, refill rate from ``limit``/``remaining``/``reset``). A call that does not fit *takes its turn
anyway*: its need is debited (the level goes below zero) and it is told how long until the refill
covers it; the next call is scheduled behind it. Arrival order at the store is the order of service,
across every worker, in one atomic step and without polling. A turn further away than the call may
wait is not taken (nothing is debited): ``CLAUDE_PACING`` then falls back or degrades.

Before a model's first report nothing is known and calls go, counted; the first report takes them
off what it says is left (some were perhaps counted in it already: the error is on the safe side).
A header only ever lowers the shared level (``min``): the store's level also counts calls in flight
that the upstream had not seen when it answered; the refill, not the headers, raises it again.

Concurrency (``CLAUDE_MAX_CONCURRENCY``) is a lease per call and model, in a sorted set whose scores
are expiry times, so a worker killed mid-call gives its leases back when they lapse. Calls above the
cap queue by ticket (first come, first served) and ask again after a short jittered pause.

The storage side (one atomic step each, a Lua script on Redis) lives in ``storage/pacing.py``.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .storage import StorageUnavailable
from .storage.pacing import DEFAULT_WINDOW, QUEUE_HEARTBEAT, Answer, Ask, Quota  # noqa: F401  (re-exported)
from .tokens import upper_bound_tokens

if TYPE_CHECKING:
    from .calls import Call
    from .extension import ClaudeState

#: The dimensions paced, as the headers spell them; ``tokens`` stands in only when neither is sent.
DIMENSIONS = ("requests", "input-tokens", "output-tokens")
LEASE_SLACK = 5.0  # a lease outlives its call's deadline by this much before it lapses
POLL_MIN, POLL_MAX = 0.02, 0.25
WATCH_INTERVAL = 1.0  # with pacing off (or far from the limit), a worker records a model's levels at most this often
# Far from a limit a call goes without asking the shared schedule (``Pacer._ample``): when every
# dimension of the model's last report, at most AMPLE_FRESH s old, keeps AMPLE_SHARE of its limit
# and room for AMPLE_CALLS more such calls after what this process sent since.
AMPLE_SHARE = 0.2
AMPLE_CALLS = 10
AMPLE_FRESH = 5.0


_PREFIX = "anthropic-ratelimit-"


def parse_headers(headers: Mapping[str, str] | Any, now: float) -> dict[str, Quota]:
    """``anthropic-ratelimit-*`` headers -> quotas per dimension (``now`` is our wall clock).

    One pass over the headers, not a lookup per name: an httpx lookup scans them all, and this runs
    on every reply (bench/RESULTS.md).
    """
    if headers is None:
        return {}
    items = headers.multi_items() if hasattr(headers, "multi_items") else headers.items()
    seen: dict[str, dict[str, str]] = {}
    for key, value in items:
        if len(key) > 20 and key[:20].lower() == _PREFIX:
            name, _, part = key[20:].lower().rpartition("-")
            seen.setdefault(name, {})[part] = value
    if not seen:
        return {}
    out: dict[str, Quota] = {}
    for name in (*DIMENSIONS, "tokens"):
        parts = seen.get(name)
        if parts is None:
            continue
        limit, remaining, reset = parts.get("limit"), parts.get("remaining"), parts.get("reset")
        if limit is None or remaining is None:
            continue
        try:
            lim, rem = int(limit), int(remaining)
            reset_in = _reset_in(reset, now)
        except (TypeError, ValueError):
            continue  # a malformed header is ignored, never an error of the call
        if lim > 0:
            out[name] = Quota(lim, max(0, min(rem, lim)), reset_in)
    if "tokens" in out:
        combined = out.pop("tokens")
        if "input-tokens" not in out and "output-tokens" not in out:
            out["tokens"] = combined
    return out


def _reset_in(reset: str | None, now: float) -> float:
    if not reset:
        return 0.0
    at = datetime.fromisoformat(reset.replace("Z", "+00:00")).timestamp()
    return max(0.0, min(at - now, 3600.0))


@dataclass
class CallPacing:
    """One call's pacing marks: its waiter id, its need, the leases it holds."""

    waiter: str = field(default_factory=lambda: uuid.uuid4().hex)
    need: dict[str, int] | None = None
    leases: list[str] = field(default_factory=list)  # models leased
    debited: str | None = None  # the model whose buckets the last turn taken was debited from
    unknown: str | None = None  # the model that let this call through before knowing anything
    queued: dict[str, float] = field(default_factory=dict)  # model -> monotonic time it began to queue
    waited: float = 0.0


@dataclass(frozen=True)
class Decision:
    """What the attempt loop does before sending: go (after ``wait``), ask again after ``wait``,
    fall back to the next model, or degrade."""

    action: str  # "go" | "again" | "fallback" | "degrade"
    wait: float = 0.0


GO = Decision("go")


class Pacer:
    """The app's pacing: asks the store, records what the upstream says, gives leases back."""

    def __init__(self, state: ClaudeState) -> None:
        self.state = state
        settings = state.settings
        self.mode = settings.pacing
        self.max_wait = settings.pacing_wait
        self.caps = settings.max_concurrency
        # model -> (its replies carry rate-limit headers, until when this is believed): a model whose
        # replies carry none (a proxy strips them, the simulator without limits) costs no round trip.
        self._headers_seen: dict[str, tuple[bool, float]] = {}
        self._watched_until: dict[str, float] = {}  # model -> when a reply's levels are recorded again (pacing off)
        # model -> (what its last reply said is left, when, what this process sent since): far from the
        # limit a call needs no turn from the shared schedule (no round trip); near it, every call asks.
        self._last: dict[str, tuple[dict[str, Quota], float, dict[str, int]]] = {}

    def cap(self, model: str) -> int | None:
        if isinstance(self.caps, dict):
            return self.caps.get(model)
        return self.caps

    def _store(self) -> Any:
        store = self.state.store
        if not getattr(store, "healthy", True):
            return None  # an outage: pacing is best effort, the call goes on
        return getattr(store, "pacing", None)

    def decide(self, call: Call, model: str, *, last: bool) -> Decision:
        """May ``model`` take this call now? Else wait how long, fall back, or degrade."""
        cap = self.cap(model)
        if (self.mode == "off" and cap is None) or not call.settles:
            return GO
        if cap is None:
            seen = self._headers_seen.get(model)
            if seen is not None and not seen[0] and self.state.clock.monotonic() < seen[1]:
                return GO
        store = self._store()
        if store is None:
            return GO
        marks = call.pacing
        if marks is None:
            marks = call.pacing = CallPacing()
        if marks.need is None:
            bound = sum(call.bounds) if call.bounds is not None else upper_bound_tokens(call.params)
            marks.need = {"requests": 1, "input-tokens": bound,
                          "output-tokens": int(call.params.get("max_tokens") or 0)}
            marks.need["tokens"] = marks.need["input-tokens"] + marks.need["output-tokens"]
        if cap is None and self._ample(model, marks.need):
            return GO
        clock = self.state.clock
        remaining = call.deadline.remaining()
        fallback = self.mode == "fallback" and not last
        allowed = 0.0 if fallback else max(0.0, min(self.max_wait - marks.waited, remaining / 2))
        ask = Ask(model, marks.waiter, marks.need, allowed, cap, remaining + LEASE_SLACK, self.mode != "off")
        try:
            answer = store.admit(ask, clock.time())
        except StorageUnavailable:
            return GO
        if answer.granted:
            if cap is not None and model not in marks.leases:
                marks.leases.append(model)
            marks.debited = model if ask.pace else None
            marks.unknown = None if answer.known else model
            marks.queued.pop(model, None)
            marks.waited += answer.wait
            return Decision("go", answer.wait)
        if answer.position > 0:  # queued for a lease
            since = marks.queued.setdefault(model, clock.monotonic())
            if fallback or clock.monotonic() - since >= allowed:
                self._leave(store, model, marks)
                return Decision("fallback" if fallback else "degrade", 1.0)
            pause = min(POLL_MAX, POLL_MIN * answer.position) * (0.5 + random.random())
            return Decision("again", pause)
        return Decision("fallback" if fallback else "degrade", answer.wait)

    def _ample(self, model: str, need: dict[str, int]) -> bool:
        """Whether the model's last report leaves so much that this call needs no turn: every
        dimension keeps ``AMPLE_SHARE`` of its limit and ``AMPLE_CALLS`` such calls after what this
        process sent since the report. The shared schedule orders calls near a limit; far from
        it, asking would cost every call a round trip for a certain yes. A report older than
        ``AMPLE_FRESH`` seconds is not trusted (every call then asks until the next one)."""
        last = self._last.get(model)
        if last is None:
            return False
        quotas, at, sent = last
        if self.state.clock.monotonic() - at > AMPLE_FRESH:
            return False
        for dim, quota in quotas.items():
            want = need.get(dim, 0)
            left = quota.remaining - sent.get(dim, 0) - want
            if left < AMPLE_SHARE * quota.limit or left < AMPLE_CALLS * want:
                return False
        for dim in quotas:
            sent[dim] = sent.get(dim, 0) + need.get(dim, 0)
        return True

    def _leave(self, store: Any, model: str, marks: CallPacing) -> None:
        marks.queued.pop(model, None)
        try:
            store.leave(model, marks.waiter)
        except StorageUnavailable:
            pass

    def observe(self, call: Call, model: str, headers: Any) -> None:
        """Record what a response (a 429 too) says is left, written behind with the settlement."""
        if headers is None:
            return
        clock = self.state.clock
        watch_only = self.mode == "off" and self.cap(model) is None
        if watch_only and clock.monotonic() < self._watched_until.get(model, 0.0):
            return
        seen = self._headers_seen.get(model)
        if seen is not None and not seen[0] and clock.monotonic() < seen[1]:
            return  # this model's replies carry no rate-limit headers (a proxy, the simulator): look again later
        store = self._store()
        if store is None:
            return
        quotas = parse_headers(headers, clock.time())
        self._headers_seen[model] = (bool(quotas), clock.monotonic() + (600.0 if quotas else 60.0))
        if watch_only:
            # Nothing is paced: the levels are only shown (status, metrics, dashboard), so one
            # report a second per worker keeps them live without a storage write per reply.
            self._watched_until[model] = clock.monotonic() + WATCH_INTERVAL
        if not quotas:
            return
        now = clock.monotonic()
        self._last[model] = (quotas, now, {})
        if not watch_only and self.cap(model) is None and self._ample(model, {}):
            # Far from the limit nobody waits on the shared levels: keep them live (status, metrics,
            # other workers' first turns) with one write a second, not one per reply.
            if now < self._watched_until.get(model, 0.0):
                return
            self._watched_until[model] = now + WATCH_INTERVAL
        marks = call.pacing
        counted = None
        if marks is not None and marks.unknown == model and marks.need is not None:
            counted, marks.unknown = marks.need, None  # the upstream has counted this one
        try:
            store.observe(model, quotas, self.state.clock.time(), counted)
        except StorageUnavailable:
            pass

    def done(self, call: Call, output_tokens: int | None = None) -> None:
        """The call settled: its leases go back, it leaves any queue, and the output tokens its reply
        did not use go back to the model's bucket, as the upstream gives them back (written behind)."""
        marks = call.pacing
        if marks is None:
            return
        unused = 0
        if output_tokens is not None and marks.debited == call.model and marks.need is not None:
            unused = max(0, marks.need["output-tokens"] - output_tokens)
        if not (marks.leases or marks.queued or unused):
            return
        store = self._store()
        if store is None:
            return
        try:
            if unused:
                store.credit(call.model, {"output-tokens": unused, "tokens": unused})
            for model in marks.leases:
                store.release(model, marks.waiter)
            for model in list(marks.queued):
                store.leave(model, marks.waiter)
        except StorageUnavailable:
            pass
        marks.leases.clear()
        marks.queued.clear()

    def snapshot(self, models: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
        """Per model: each dimension's limit and level now, leases in use, calls queued (status, metrics)."""
        store = self._store()
        if store is None or not models:
            return {}
        try:
            return dict(store.snapshot(list(models), self.state.clock.time()))
        except StorageUnavailable:
            return {}
