"""One guarded call's state and its attempt loop's decisions, without I/O: shared by both clients.

``Call`` carries a call from its preparation to its log line; ``ChainRun`` decides which model is
tried next, with which timeout, whether a failure is retried or falls back, and what the chain ends
with. ``client.py`` (blocking) and ``aio.py`` (awaiting) run the same decisions; only their I/O differs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anthropic
import httpx2

from . import telemetry
from .aiconfig import AIRun
from .context import CallScope
from .errors import (
    InvalidRequest,
    RateLimitedUpstream,
    UpstreamUnavailable,
)
from .events import hash_text
from .pricing import TASK_BUDGET_BETA, TASK_BUDGET_MODELS
from .resilience import (
    AttemptMark,
    Deadline,
    Failure,
    FailureKind,
    classify,
    current_attempt,
    current_deadline,
)
from .signals import model_fallback

if TYPE_CHECKING:
    from .extension import ClaudeState
    from .runner import CallRunner

_FALLBACK_KINDS = frozenset({FailureKind.SERVER, FailureKind.CONNECTION, FailureKind.TIMEOUT, FailureKind.CIRCUIT_OPEN})


@dataclass(slots=True)
class Call:
    """Everything one guarded call learns on its way, for the log line at the end. (Slotted: built and
    read a few dozen times on every request.)"""

    params: dict[str, Any]
    scope: CallScope
    chain: list[str]
    requested_model: str
    deadline: Deadline
    started: float
    system_prompt_hash: str | None
    max_tokens_requested: int | None
    reservation: Any = None
    breakers: dict[str, float | None] | None = None  # breaker states read with the reservation
    success_model: str | None = None  # recorded on its breaker by the settlement, not a round trip of its own
    success_seen_closed: bool = False  # its breaker was read closed with the reservation and not asked since
    settles: bool = False  # ends in _finish/_fail, whose one storage step records the success and the rollup
    task_budget: int | None = None
    model: str = ""
    fallback_from: str | None = None
    retries: int = 0
    failure: Failure | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    bounds: tuple[int, int] | None = None  # upper bound of input tokens: (what callers send, system + tools)
    cache_control: bool | None = None  # whether any block carries cache_control (input may be a cache write)
    plain_input: tuple[int, int, bool] | None = None  # tokens.plain_messages of the call's messages, if that shape
    span: telemetry.CallSpan = telemetry.NO_SPAN  # OpenTelemetry: the SDK's spans are its children
    ai_run: AIRun | None = None  # the LaunchDarkly AI Config tracker of this call (aiconfig.py)
    pacing: Any = None  # pacing.CallPacing: its waiter id, need and leases, once pacing asked for it

    @classmethod
    def bare(cls, state: ClaudeState, scope: CallScope, model: str) -> Call:
        """A call with no budget or cost of its own (count_tokens, batch endpoints): retries only."""
        return cls(params={}, scope=scope, chain=[model], requested_model=model,
                   deadline=Deadline.after(state.clock, state.settings.deadline), started=time.perf_counter(),
                   system_prompt_hash=None, max_tokens_requested=None)


def system_hash(system: Any) -> str | None:
    if not system:
        return None
    text = system if isinstance(system, str) else json.dumps(system, sort_keys=True, default=str)
    return hash_text(text)


def call_deadline(configured: float, timeout: Any) -> float:
    """A caller's ``timeout=`` (a number) shortens the call's total deadline; it never lengthens it."""
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        return min(configured, float(timeout))
    return configured


# What one attempt can raise that is the upstream's (or the network's) doing, not ours.
SEND_ERRORS = (anthropic.APIError, httpx2.HTTPError, json.JSONDecodeError)


def create_kwargs(call: Call, model: str, timeout: httpx2.Timeout) -> tuple[bool, dict[str, Any]]:
    """One attempt's SDK arguments; True when the task budget sends it through the beta endpoint."""
    params = {**call.params, "model": model, "timeout": timeout}
    if call.task_budget is not None and model in TASK_BUDGET_MODELS:
        config = dict(params.pop("output_config", None) or {})
        config["task_budget"] = {"type": "tokens", "total": call.task_budget}
        params.update(output_config=config, betas=[TASK_BUDGET_BETA])
        return True, params
    return False, params


_TIMEOUTS: dict[tuple[float, float], httpx2.Timeout] = {}


def _timeout(read: float, connect: float) -> httpx2.Timeout:
    """An attempt's ``httpx2.Timeout`` for the configured values, built once (a value, never changed)."""
    timeout = _TIMEOUTS.get((read, connect))
    if timeout is None:
        timeout = _TIMEOUTS[(read, connect)] = httpx2.Timeout(read, connect=min(connect, read))
    return timeout


class ChainRun:
    """The attempt loop's decisions, without its I/O: which model next, with which timeout, whether a
    failure is retried (after how long) or falls back, and what the caller is told in the end.

    The sync client drives it with blocking sends and ``clock.sleep``, the async one with ``await``;
    neither makes a decision of its own.
    """

    def __init__(self, owner: CallRunner, call: Call) -> None:
        self.owner = owner
        self.state = owner.state
        self.call = call
        self.index = 0
        self.attempt = 0
        self.done = False
        self.last_exc: BaseException | None = None
        self.mark: AttemptMark | None = None
        self._admitted: tuple[int, int] | None = None  # (model index, attempt) the pacer let through

    def admit(self) -> float | None:
        """Pacing (``pacing.py``) before an attempt: None to send now, else seconds to wait and then
        ask ``next_attempt`` again (the turn was taken: it then sends; queued: it asks again)."""
        call = self.call
        key = (self.index, self.attempt)
        if self._admitted == key:
            return None
        decision = self.state.pacer.decide(call, call.model, last=self.index == len(call.chain) - 1)
        if decision.action == "go":
            self._admitted = key
            return decision.wait or None
        if decision.action == "again":
            return decision.wait
        failure = Failure(FailureKind.RATE_LIMITED, None, "rate_limited_upstream")
        if decision.action == "fallback":
            self._model_failed(failure, paced=True)
            return 0.0
        call.failure = failure
        self.done = True
        raise RateLimitedUpstream(f"no room at {call.model} within the pacing wait",
                                  retry_after=max(1.0, decision.wait))

    def next_attempt(self) -> httpx2.Timeout | None:
        """The timeout of the next attempt on ``call.model``, or None when the chain is over."""
        call, state = self.call, self.state
        while not self.done:
            model = call.model = call.chain[self.index]
            # A closed breaker read with the reservation needs no round trip of its own.
            known_closed = self.attempt == 0 and call.breakers is not None and \
                model in call.breakers and call.breakers[model] is None
            if not known_closed and not state.breaker.allow(model, state.clock.time()):
                self._model_failed(Failure(FailureKind.CIRCUIT_OPEN, None, "circuit_open"))
                continue
            remaining = call.deadline.remaining()
            if remaining <= 0:
                self._model_failed(Failure(FailureKind.DEADLINE, None, "deadline_exceeded"))
                continue
            # Each read waits at most CLAUDE_ATTEMPT_TIMEOUT: a hung model leaves time for a retry or
            # the next model; the deadline still bounds the whole call, trickling bodies included.
            settings = state.settings
            read = min(settings.attempt_timeout, remaining)
            if read == settings.attempt_timeout:  # the usual case: the same timeout every attempt
                return _timeout(read, settings.connect_timeout)
            return httpx2.Timeout(read, connect=min(settings.connect_timeout, read))
        return None

    def enter_attempt(self) -> tuple[Any, Any]:
        """Bind the call's deadline and a fresh "was it sent" mark to this attempt (the transports read them)."""
        self.mark = AttemptMark()
        return current_deadline.set(self.call.deadline), current_attempt.set(self.mark)

    @staticmethod
    def exit_attempt(tokens: tuple[Any, Any]) -> None:
        current_attempt.reset(tokens[1])
        current_deadline.reset(tokens[0])

    def failed(self, exc: BaseException) -> float | None:
        """An attempt failed upstream: seconds to wait before retrying the same model, or None to go on."""
        call, policy = self.call, self.state.retry_policy
        self.last_exc = exc
        self._observe()
        failure = classify(exc)
        self.owner.record_outcome(call.model, ok=not failure.counts_against_model)  # a hang is the model's
        if call.deadline.expired and failure.kind == FailureKind.TIMEOUT:
            failure = Failure(FailureKind.DEADLINE, None, "deadline_exceeded")
        if failure.retryable and self.attempt < policy.max_retries:
            delay = policy.delay(self.attempt, failure)
            if delay < call.deadline.remaining():  # a retry that could not start before the deadline is not made
                call.retries += 1
                call.span.retry(call.model, self.attempt, failure.error_type, delay)
                self.attempt += 1
                return delay
        self._model_failed(failure)
        return None

    def unbuildable(self, exc: Exception) -> None:
        """An exception that is not the upstream's: before the request was sent, an ``InvalidRequest``."""
        if self.mark is not None and self.mark.sent:
            return  # raised after sending: the caller's code or ours, let it surface as itself
        # The SDK could not build the request (a lone surrogate, an unserialisable value, an argument it
        # rejects): nothing left, the model is not at fault, and a retry would fail alike.
        self.call.failure = Failure(FailureKind.INVALID_REQUEST, None, "invalid_request")
        self.call.extra["detail"] = type(exc).__name__
        raise InvalidRequest(f"the request could not be built: {type(exc).__name__}") from None

    def _observe(self) -> None:
        if self.mark is not None and self.mark.headers is not None and self.call.settles:
            self.state.pacer.observe(self.call, self.call.model, self.mark.headers)

    def succeeded(self) -> None:
        call = self.call
        self._observe()
        if call.reservation is not None or call.settles:
            call.success_model = call.model  # recorded on its breaker by the settlement
            # The first attempt on a model read closed made no breaker_allow (no probe to close):
            call.success_seen_closed = self.attempt == 0 and call.breakers is not None and \
                call.breakers.get(call.model, 0.0) is None
        else:
            self.owner.record_outcome(call.model, ok=True)
        if self.index > 0:
            call.fallback_from = call.chain[0]

    def _model_failed(self, failure: Failure, *, paced: bool = False) -> None:
        """The current model is done: fall back to the next one, or end the chain."""
        call, state = self.call, self.state
        call.failure = failure
        falls_back = paced or failure.kind in _FALLBACK_KINDS or (
            failure.kind == FailureKind.RATE_LIMITED and state.settings.fallback_on_rate_limit)
        if not falls_back or self.index == len(call.chain) - 1 or call.deadline.expired:
            self.done = True
            return
        model, next_model = call.chain[self.index], call.chain[self.index + 1]
        skipped = failure.kind == FailureKind.CIRCUIT_OPEN or paced
        call.fallback_from = call.chain[0]
        fields: dict[str, Any] = {"feature": call.scope.feature, "route": call.scope.route, "from_model": model,
                                  "to_model": next_model, "reason": failure.error_type,
                                  "status_code": failure.status_code,
                                  # requests this call sent to from_model, all failed (0: skipped, its circuit was open)
                                  "attempts": self.attempt if skipped else self.attempt + 1}
        if not skipped or self.attempt > 0 or self.owner.log_skip(model):  # throttle pure skips
            state.events.emit("model_fallback", fields, level="WARNING")
        model_fallback.send(state.app, **fields)
        call.span.fallback(model, next_model, failure.error_type)
        self.index += 1
        self.attempt = 0

    def error(self) -> BaseException:
        """What the chain ends with: the last upstream error (turned into a guard error by the caller)."""
        if self.last_exc is not None:
            return self.last_exc
        return UpstreamUnavailable("no model in the chain could be reached", reason="upstream_unavailable")


def usage_dict(usage: Any) -> dict[str, Any]:
    if usage is None:
        return {}
    if isinstance(usage, Mapping):
        return dict(usage)
    dump = getattr(usage, "model_dump", None)
    return dump() if callable(dump) else dict(vars(usage))
