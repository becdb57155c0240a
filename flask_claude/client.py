"""Guarded ``messages.create / stream / count_tokens``: the SDK's own signatures and return types.

One call, top to bottom (``GuardedMessages._prepare``, ``_reserve``, ``ChainRun`` and ``_finish``):
scope and call count -> history pruning, input checks -> ``max_tokens`` cap, prompt caching ->
reserve the worst case against every budget -> model chain with per-model breaker, bounded retries
and a total deadline -> cost from real usage -> settle the reservation -> one log line -> signals
and alerts -> output checks (truncation, refusal, ``validate=``).

Every decision lives here; ``aio.py`` (``claude.async_messages``) calls the same steps and only
awaits where this module blocks: the attempt, the retry wait and the wait for a busy budget.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anthropic
import httpx2

from . import telemetry
from .aiconfig import AIRun
from .context import CallScope, current_scope
from .errors import (
    CallLimitExceeded,
    ClaudeGuardError,
    ConfigError,
    InputTooLarge,
    InvalidOutput,
    InvalidRequest,
    TruncatedResponse,
    UpstreamUnavailable,
)
from .events import hash_text
from .hygiene import check_output, prune_history, with_auto_cache
from .pricing import TASK_BUDGET_BETA, TASK_BUDGET_MODELS
from .resilience import AttemptMark, Deadline, Failure, classify, current_attempt, current_deadline, model_chain
from .signals import circuit_opened, claude_called, model_fallback
from .tokens import estimate_input_tokens, estimate_tokens, prompt_chars

if TYPE_CHECKING:
    from .extension import ClaudeState

T = TypeVar("T")

# Failures after which the next model in the chain is tried (rate limits only when configured).
_FALLBACK_KINDS = frozenset({"server", "connection", "timeout", "circuit_open"})


@dataclass
class _Call:
    """Everything one guarded call learns on its way, for the log line at the end."""

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
    settles: bool = False  # ends in _finish/_fail, whose one storage step records the success and the rollup
    task_budget: int | None = None
    model: str = ""
    fallback_from: str | None = None
    retries: int = 0
    failure: Failure | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    span: telemetry.CallSpan = telemetry.NO_SPAN  # OpenTelemetry: the SDK's spans are its children
    ai_run: AIRun | None = None  # the LaunchDarkly AI Config tracker of this call (aiconfig.py)

    @classmethod
    def bare(cls, state: ClaudeState, scope: CallScope, model: str) -> _Call:
        """A call with no budget or cost of its own (count_tokens, batch endpoints): retries only."""
        return cls(params={}, scope=scope, chain=[model], requested_model=model,
                   deadline=Deadline.after(state.clock, state.settings.deadline), started=time.perf_counter(),
                   system_prompt_hash=None, max_tokens_requested=None)


def _system_hash(system: Any) -> str | None:
    if not system:
        return None
    text = system if isinstance(system, str) else json.dumps(system, sort_keys=True, default=str)
    return hash_text(text)


def _deadline(configured: float, timeout: Any) -> float:
    """A caller's ``timeout=`` (a number) shortens the call's total deadline; it never lengthens it."""
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        return min(configured, float(timeout))
    return configured


# What one attempt can raise that is the upstream's (or the network's) doing, not ours.
SEND_ERRORS = (anthropic.APIError, httpx2.HTTPError, json.JSONDecodeError)


def create_kwargs(call: _Call, model: str, timeout: httpx2.Timeout) -> tuple[bool, dict[str, Any]]:
    """One attempt's SDK arguments; True when the task budget sends it through the beta endpoint."""
    params = {**call.params, "model": model, "timeout": timeout}
    if call.task_budget is not None and model in TASK_BUDGET_MODELS:
        config = dict(params.pop("output_config", None) or {})
        config["task_budget"] = {"type": "tokens", "total": call.task_budget}
        params.update(output_config=config, betas=[TASK_BUDGET_BETA])
        return True, params
    return False, params


class ChainRun:
    """The attempt loop's decisions, without its I/O: which model next, with which timeout, whether a
    failure is retried (after how long) or falls back, and what the caller is told in the end.

    The sync client drives it with blocking sends and ``clock.sleep``, the async one with ``await``;
    neither makes a decision of its own.
    """

    def __init__(self, owner: GuardedMessages, call: _Call) -> None:
        self.owner = owner
        self.state = owner._state
        self.call = call
        self.index = 0
        self.attempt = 0
        self.done = False
        self.last_exc: BaseException | None = None
        self.mark: AttemptMark | None = None

    def next_attempt(self) -> httpx2.Timeout | None:
        """The timeout of the next attempt on ``call.model``, or None when the chain is over."""
        call, state = self.call, self.state
        while not self.done:
            model = call.model = call.chain[self.index]
            # A closed breaker read with the reservation needs no round trip of its own.
            known_closed = self.attempt == 0 and call.breakers is not None and \
                model in call.breakers and call.breakers[model] is None
            if not known_closed and not state.breaker.allow(model, state.clock.time()):
                self._model_failed(Failure("circuit_open", None, "circuit_open"))
                continue
            remaining = call.deadline.remaining()
            if remaining <= 0:
                self._model_failed(Failure("deadline", None, "deadline_exceeded"))
                continue
            # Each read waits at most CLAUDE_ATTEMPT_TIMEOUT: a hung model leaves time for a retry or
            # the next model; the deadline still bounds the whole call, trickling bodies included.
            read = min(state.settings.attempt_timeout, remaining)
            return httpx2.Timeout(read, connect=min(state.settings.connect_timeout, read))
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
        failure = classify(exc)
        self.owner._record_outcome(call.model, ok=not failure.counts_against_model)  # a hang is the model's
        if call.deadline.expired and failure.kind == "timeout":
            failure = Failure("deadline", None, "deadline_exceeded")
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
        self.call.failure = Failure("invalid_request", None, "invalid_request")
        self.call.extra["detail"] = type(exc).__name__
        raise InvalidRequest(f"the request could not be built: {type(exc).__name__}") from None

    def succeeded(self) -> None:
        call = self.call
        if call.reservation is not None or call.settles:
            call.success_model = call.model  # recorded on its breaker by the settlement
        else:
            self.owner._record_outcome(call.model, ok=True)
        if self.index > 0:
            call.fallback_from = call.chain[0]

    def _model_failed(self, failure: Failure) -> None:
        """The current model is done: fall back to the next one, or end the chain."""
        call, state = self.call, self.state
        call.failure = failure
        falls_back = failure.kind in _FALLBACK_KINDS or (
            failure.kind == "rate_limited" and state.settings.fallback_on_rate_limit)
        if not falls_back or self.index == len(call.chain) - 1 or call.deadline.expired:
            self.done = True
            return
        model, next_model = call.chain[self.index], call.chain[self.index + 1]
        call.fallback_from = call.chain[0]
        fields: dict[str, Any] = {"feature": call.scope.feature, "route": call.scope.route, "from_model": model,
                                  "to_model": next_model, "reason": failure.error_type,
                                  "status_code": failure.status_code,
                                  # requests this call sent to from_model, all failed (0: skipped, its circuit was open)
                                  "attempts": self.attempt if failure.kind == "circuit_open" else self.attempt + 1}
        if failure.kind != "circuit_open" or self.attempt > 0 or self.owner._log_skip(model):  # throttle pure skips
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


def _usage_dict(usage: Any) -> dict[str, Any]:
    if usage is None:
        return {}
    if isinstance(usage, Mapping):
        return dict(usage)
    dump = getattr(usage, "model_dump", None)
    return dump() if callable(dump) else dict(vars(usage))


class GuardedMessages:
    """``claude.messages``: what the SDK's ``client.messages`` does, inside the guard rails."""

    def __init__(self, state: ClaudeState) -> None:
        from .batches import GuardedBatches

        self._state = state
        self.batches = GuardedBatches(self)
        self._skip_logged_until: dict[str, float] = {}  # model -> when to log "skipped, circuit open" again

    # --- public API -------------------------------------------------------------------------

    def create(self, **params: Any) -> Any:
        """``client.messages.create(...)`` guarded; ``stream=True`` returns a guarded raw stream."""
        streaming = bool(params.get("stream"))
        call = self._begin(params, streaming=streaming)
        try:
            result = self._run_chain(call, lambda model, timeout: self._send_create(call, model, timeout))
        except BaseException as exc:
            self._fail(call, exc)
            raise self._as_guard_error(call, exc) from None
        if streaming:
            return GuardedMessageStream(self, call, result, manager=None)
        self._finish(call, usage=result.usage, stop_reason=result.stop_reason,
                     request_id=getattr(result, "_request_id", None), message=result)
        return result

    def stream(self, **params: Any) -> GuardedStreamManager:
        """``client.messages.stream(...)`` guarded: use it as ``with claude.messages.stream(...) as s``."""
        return GuardedStreamManager(self, params)

    def count_tokens(self, **params: Any) -> Any:
        """Free upstream, so no budget or cost: only retries, fallback-free, within the deadline."""
        model = params.get("model") or self._state.settings.models[0]
        call = _Call.bare(self._state, current_scope(), model)
        try:
            return self._run_chain(call, lambda m, timeout: self._state.client.messages.count_tokens(
                **{**params, "model": m, "timeout": timeout}))
        except BaseException as exc:
            raise self._as_guard_error(call, exc) from None

    def _send_create(self, call: _Call, model: str, timeout: httpx2.Timeout) -> Any:
        beta, params = create_kwargs(call, model, timeout)
        client = self._state.client
        endpoint: Any = client.beta.messages if beta else client.messages  # beta overloads do not type **params
        return endpoint.create(**params)

    # --- the steps of a call ------------------------------------------------------------------

    def _begin(self, params: Mapping[str, Any], *, streaming: bool = False) -> _Call:
        call = self._prepare(params, streaming=streaming)
        self._reserve(call)
        self._start_span(call, streaming=streaming)
        return call

    def _start_span(self, call: _Call, *, streaming: bool) -> None:
        """The call's OpenTelemetry span and AI Config run, once it is reserved (a refused call starts neither)."""
        state, scope = self._state, call.scope
        call.span = telemetry.start_call(operation="chat", chain=call.chain, max_tokens=call.params["max_tokens"],
                                         feature=scope.feature, route=scope.route, user=scope.user,
                                         salt=state.user_salt, streaming=streaming)
        call.ai_run = AIRun.start(scope.ai_config, call.started)

    def _prepare(self, params: Mapping[str, Any], *, streaming: bool = False) -> _Call:
        """Every decision about a call that needs no I/O: count it, pick the chain, check and cap it.

        Both clients run it before their first ``await``/block, so ``max_calls`` counts every call of
        an ``asyncio.gather`` in the order they start.
        """
        state = self._state
        settings = state.settings
        scope = current_scope()
        scope.calls += 1
        if scope.max_calls is not None and scope.calls > scope.max_calls:
            # A runaway agent loop is the most common cost incident: stop it at the cap.
            fields = {"feature": scope.feature, "route": scope.route, "max_calls": scope.max_calls,
                      "user": state.events.user(scope.user)}
            state.events.emit("max_calls_exceeded", fields, level="ERROR")
            raise CallLimitExceeded(f"more than {scope.max_calls} Claude calls in one request")

        # Which models, in which order; every one must have a price before anything is sent.
        configured = scope.models or settings.models
        # A rollout flag (``ai_feature(model_flag=...)``) outranks the code's ``model=``: that is its job.
        requested = scope.first_model or params.get("model") or configured[0]
        chain = model_chain(requested, configured)
        state.prices.check(chain)
        params = dict(params)
        task_budget = params.pop("task_budget", None)
        if task_budget is not None:
            if requested not in TASK_BUDGET_MODELS:
                raise ConfigError(f"task_budget is not supported by {requested!r}; models that take it: "
                                  f"{', '.join(sorted(TASK_BUDGET_MODELS))}")
            if isinstance(task_budget, bool) or not isinstance(task_budget, int) or task_budget < 1:
                raise ConfigError(f"task_budget must be a positive number of tokens, got {task_budget!r}")

        # Bound the conversation, then check the input, before any money or network is spent.
        if scope.max_history_turns is not None and isinstance(params.get("messages"), list):
            params["messages"] = prune_history(params["messages"], max_turns=scope.max_history_turns)
        # Caps count what callers send (messages), not the app's own system prompt or tools.
        user_input = {"messages": params.get("messages")}
        if scope.max_input_chars is not None:
            chars = prompt_chars(user_input)
            if chars > scope.max_input_chars:
                raise InputTooLarge(
                    f"The input is {chars} characters; this feature accepts at most {scope.max_input_chars}.")
        if scope.max_input_tokens is not None:
            user_tokens = estimate_input_tokens(user_input)
            if user_tokens > scope.max_input_tokens:
                raise InputTooLarge(f"The input is about {user_tokens} tokens; this feature accepts at most "
                                    f"{scope.max_input_tokens}.")
        if settings.auto_cache:
            params = with_auto_cache(params)

        # max_tokens: clamp to the app's and the feature's cap (logged), never refuse a request for it.
        cap = min(settings.max_tokens_cap, scope.max_tokens or settings.max_tokens_cap)
        requested_max = params.get("max_tokens")
        if requested_max is not None and (isinstance(requested_max, bool) or not isinstance(requested_max, int)):
            raise InvalidRequest(f"max_tokens must be a whole number, got {type(requested_max).__name__}")
        max_tokens = cap if requested_max is None else min(requested_max, cap)
        call = _Call(params={**params, "max_tokens": max_tokens}, scope=scope, chain=chain,
                     requested_model=requested,
                     deadline=Deadline.after(state.clock, _deadline(
                         settings.stream_deadline if streaming else settings.deadline, params.get("timeout"))),
                     started=time.perf_counter(),
                     system_prompt_hash=_system_hash(params.get("system")),
                     max_tokens_requested=requested_max, settles=True)
        call.task_budget = task_budget
        if requested_max is not None and requested_max > cap:
            call.extra["max_tokens_clamped_from"] = requested_max
        call.params.pop("model", None)
        call.params.pop("timeout", None)
        return call

    def _reserve(self, call: _Call, *, wait: bool = True) -> None:
        """Reserve the worst case against every budget that applies, or refuse having reserved nothing."""
        call.reservation, call.breakers = self._state.budgets.begin(
            call.scope, call.chain, call.params, call.params["max_tokens"],
            call_seconds=call.deadline.remaining(), wait=wait)

    def _run_chain(self, call: _Call, send: Callable[[str, httpx2.Timeout], T]) -> T:
        """Try each model in turn: bounded retries per model, the breaker and the deadline for all."""
        chain = ChainRun(self, call)
        while (timeout := chain.next_attempt()) is not None:
            tokens = chain.enter_attempt()
            delay: float | None = None
            try:
                with call.span.current():
                    result = send(call.model, timeout)
            except SEND_ERRORS as exc:
                delay = chain.failed(exc)
            except Exception as exc:
                chain.unbuildable(exc)
                raise
            else:
                chain.succeeded()
                return result
            finally:
                chain.exit_attempt(tokens)
            if delay is not None:
                self._state.clock.sleep(delay)
        raise chain.error()

    def _log_skip(self, model: str) -> bool:
        """While a breaker is open every call skips its model: log that every few seconds, not per call."""
        now = time.monotonic()
        if now < self._skip_logged_until.get(model, 0.0):
            return False
        self._skip_logged_until[model] = now + 5.0
        return True

    def _record_outcome(self, model: str, *, ok: bool) -> None:
        state = self._state
        if state.breaker.record(model, ok, state.clock.time()):
            fields: dict[str, Any] = {"model": model, "cooldown_s": state.settings.breaker_cooldown}
            state.events.emit("circuit_opened", fields, level="ERROR")
            circuit_opened.send(state.app, **fields)

    def _base_fields(self, call: _Call) -> dict[str, Any]:
        events = self._state.events
        return {
            "feature": call.scope.feature,
            "route": call.scope.route,
            "user": events.user(call.scope.user),
            "model": call.model,
            "requested_model": call.requested_model,
            "fallback_from": call.fallback_from,
            "latency_ms": round((time.perf_counter() - call.started) * 1000, 1),
            "retries": call.retries,
            "system_prompt_hash": call.system_prompt_hash,
        }

    def _finish(self, call: _Call, *, usage: Any, stop_reason: str | None, request_id: str | None,
                message: Any = None, error: Failure | None = None, reply_text: str | None = None,
                batch: bool = False, enforce_complete: bool = True) -> None:
        """Cost from real usage, settle, log once, signal; then refuse a truncated reply if asked."""
        state = self._state
        cost = state.prices.cost(call.model, usage, batch=batch)
        base = self._base_fields(call)
        rollup = state.rollups.call_fields(call, base, cost, error)
        if call.reservation is not None:
            state.budgets.settle(call.reservation, cost.usd, cost.input_tokens + cost.cache_read_input_tokens
                                 + cost.cache_creation_input_tokens + cost.output_tokens,
                                 success=call.success_model, rollup=rollup)
        else:
            state.rollups.write(rollup, success=call.success_model)
        call.scope.spend_usd += cost.usd
        fields = {
            "request_id": request_id,
            **base,
            "input_tokens": cost.input_tokens,
            "output_tokens": cost.output_tokens,
            "cache_read_input_tokens": cost.cache_read_input_tokens,
            "cache_creation_input_tokens": cost.cache_creation_input_tokens,
            "stop_reason": stop_reason,
            "cost_usd": round(cost.usd, 8),
            **call.extra,
        }
        if state.events.log_content:
            fields["prompt"] = state.events.content(call.params.get("messages"))  # scrubbed, then encoded
            if reply_text is None and message is not None:
                reply_text = "".join(getattr(b, "text", "") for b in getattr(message, "content", []) or [])
            fields["response"] = state.events.content(reply_text)
        if error is None:
            state.events.emit("claude_api_call", fields)
        else:
            fields.update(error_type=error.error_type, status_code=error.status_code)
            state.events.emit("claude_api_error", fields, level="ERROR")
        call.span.finish(model=call.model, retries=call.retries, fallback_from=call.fallback_from, cost=cost,
                         stop_reason=stop_reason, error_type=error.error_type if error is not None else None)
        if call.ai_run is not None:
            call.ai_run.finish(model=call.model, cost=cost, error=error is not None)
        if claude_called.receivers:
            claude_called.send(state.app, **fields)
        if enforce_complete and error is None:
            self._check_output(call, stop_reason, message)

    def _check_output(self, call: _Call, stop_reason: str | None, message: Any) -> None:
        """Output validation before anything reaches a user: truncation, refusals, ``validate=``."""
        scope = call.scope
        if stop_reason == "max_tokens" and scope.require_complete:
            raise TruncatedResponse("The reply hit max_tokens and this feature requires complete output.")
        reason: str | None = None
        detail: str | None = None
        if stop_reason in ("refusal", "model_context_window_exceeded"):
            reason = "refusal" if stop_reason == "refusal" else "context_window_exceeded"
            detail = f"stop_reason {stop_reason}"
        elif scope.validate is not None and message is not None:
            detail = check_output(scope.validate, message)
            reason = "invalid_output" if detail else None
        if reason is None:
            return
        state = self._state
        state.events.emit("invalid_output", {"feature": scope.feature, "route": scope.route, "model": call.model,
                                             "reason": reason, "detail": detail}, level="WARNING")
        if reason == "invalid_output" or scope.require_complete:
            raise InvalidOutput(f"the reply failed validation: {reason}", reason=reason)

    def _fail(self, call: _Call, exc: BaseException) -> None:
        """A call that got no reply: release the reservation, log the error once."""
        state = self._state
        if isinstance(exc, asyncio.CancelledError):  # the task was cancelled (client gone, wait_for)
            failure: Failure | None = Failure("cancelled", None, "cancelled")
        else:
            failure = call.failure or (classify(exc) if not isinstance(exc, ClaudeGuardError) else None)
        error_type = failure.error_type if failure else type(exc).__name__
        base = self._base_fields(call)
        rollup = state.rollups.failed_call_fields(call, base, error_type)
        if call.reservation is not None:
            state.budgets.settle(call.reservation, 0.0, 0, rollup=rollup)
        else:  # no hold to release: the rollup is this failure's one extra storage step
            state.rollups.write(rollup)
        fields = {"request_id": getattr(exc, "request_id", None), **base,
                  "input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0,
                  "cache_creation_input_tokens": 0, "stop_reason": None, "cost_usd": 0.0,
                  "error_type": error_type,
                  "status_code": failure.status_code if failure else None, **call.extra}
        if failure is not None and failure.kind == "client":
            fields["our_bug"] = True  # a 4xx from upstream means we sent a bad request
        state.events.emit("claude_api_error", fields, level="ERROR")
        call.span.finish(model=None, retries=call.retries, fallback_from=call.fallback_from,
                         error_type=fields["error_type"],
                         degradation_reason=getattr(self._as_guard_error(call, exc), "reason", None))
        if call.ai_run is not None:
            call.ai_run.fail()

    def _as_guard_error(self, call: _Call, exc: BaseException) -> BaseException:
        if isinstance(exc, ClaudeGuardError):
            return exc
        if not isinstance(exc, SEND_ERRORS):
            return exc  # our caller's bug (a wrong argument): let it surface as itself
        failure = call.failure or classify(exc)
        reason = "deadline_exceeded" if failure.kind == "deadline" else "upstream_unavailable"
        retry_after: float | None = None
        if failure.kind == "rate_limited":
            # Pass the upstream's back-off on (capped), so well-behaved clients do not hammer a rate limit.
            policy = self._state.retry_policy
            wait = failure.retry_after if failure.retry_after is not None else policy.max_delay
            retry_after = min(policy.retry_after_cap, wait)
        return UpstreamUnavailable(f"Claude call failed: {failure.error_type}", reason=reason,
                                   retry_after=retry_after)


class GuardedStreamManager:
    """``with claude.messages.stream(...) as stream``: the request and retries happen on enter."""

    def __init__(self, owner: GuardedMessages, params: Mapping[str, Any]) -> None:
        self._owner = owner
        self._params = params
        self._stream: GuardedMessageStream | None = None

    def __enter__(self) -> GuardedMessageStream:
        owner = self._owner
        if "task_budget" in self._params:
            raise ConfigError("task_budget works with claude.messages.create(); streams do not take it yet")
        call = owner._begin(self._params, streaming=True)
        client = owner._state.client

        def send(model: str, timeout: httpx2.Timeout) -> tuple[Any, Any]:
            manager = client.messages.stream(**{**call.params, "model": model, "timeout": timeout})
            return manager, manager.__enter__()

        try:
            manager, inner = owner._run_chain(call, send)
        except BaseException as exc:
            owner._fail(call, exc)
            raise owner._as_guard_error(call, exc) from None
        self._stream = GuardedMessageStream(owner, call, inner, manager=manager)
        return self._stream

    def __exit__(self, *exc_info: Any) -> None:
        if self._stream is not None:
            self._stream.close()


class StreamAccount:
    """What a guarded stream knows and decides, sync or async: usage and text as they arrive, whether it
    ended whole (``message_stop``), and the bill however it ended.

    A mid-stream ``event: error`` (an ``APIStatusError`` with status 200), a dropped connection (a raw
    ``httpx2.RemoteProtocolError``) and a body that ends before ``message_stop`` become
    ``UpstreamUnavailable``; a stream the client walked away from (or a cancelled task) is billed on
    close. Output tokens of an unfinished stream are the larger of the last reported count and an
    estimate of the text received.
    """

    def __init__(self, owner: GuardedMessages, call: _Call, inner: Any, *, manager: Any) -> None:
        self._owner = owner
        self._call = call
        self._inner = inner
        self._manager = manager
        self._usage: dict[str, Any] = {}
        self._stop_reason: str | None = None
        self._text: list[str] = []
        self._completed = False
        self._stopped = False  # ``message_stop`` arrived: the only sign that a stream is whole
        self._finished = False

    def _observe(self, event: Any) -> None:
        kind = getattr(event, "type", None)
        if kind == "message_start":
            self._usage = _usage_dict(event.message.usage)
        elif kind == "message_delta":
            for key, value in _usage_dict(event.usage).items():
                if value is not None:
                    self._usage[key] = value
            self._stop_reason = event.delta.stop_reason
        elif kind == "message_stop":
            self._stopped = True
        elif kind == "content_block_delta" and getattr(event.delta, "type", None) == "text_delta":
            self._text.append(event.delta.text)
        if kind == "content_block_delta" and self._call.ai_run is not None:
            self._call.ai_run.first_token()  # LaunchDarkly's time to first token (once per run)

    @staticmethod
    def _text_of(event: Any) -> str | None:
        if getattr(event, "type", None) == "content_block_delta" and event.delta.type == "text_delta":
            return str(event.delta.text)
        return None

    def _broken(self, exc: BaseException) -> UpstreamUnavailable:
        """The body failed mid-way (an SDK or transport error)."""
        failure = classify(exc)
        if self._call.deadline.expired and failure.kind == "timeout":
            failure = Failure("deadline", None, "deadline_exceeded")  # our limit, not the model's fault
        return self._failed(failure)

    def _ended(self) -> None:
        """The body ended: whole only if ``message_stop`` arrived."""
        if not self._stopped:
            # A body that ended cleanly before ``message_stop`` is a cut reply, not a short one.
            raise self._failed(Failure("stream", None, "incomplete_stream"))
        self._completed = True
        self._settle()

    def _failed(self, failure: Failure) -> UpstreamUnavailable:
        """Bill what arrived, hold the failure against the model, and tell the view."""
        self._call.success_model = None  # the stream's start was fine; its end was not
        self._owner._record_outcome(self._call.model, ok=not failure.counts_against_model)
        self._settle(error=failure)
        return UpstreamUnavailable(f"stream failed: {failure.error_type}")

    @property
    def current_message_snapshot(self) -> Any:
        return self._inner.current_message_snapshot

    @property
    def request_id(self) -> str | None:
        response = getattr(self._inner, "response", None)
        return response.headers.get("request-id") if response is not None else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _settle(self, *, error: Failure | None = None, abandoned: bool = False) -> None:
        if self._finished:
            return
        self._finished = True
        usage = dict(self._usage)
        text = "".join(self._text)
        if not self._completed:
            usage["output_tokens"] = max(int(usage.get("output_tokens") or 0), estimate_tokens(text))
        stop_reason = self._stop_reason if self._completed else ("client_disconnected" if abandoned else None)
        self._owner._finish(self._call, usage=usage, stop_reason=stop_reason, request_id=self.request_id,
                            error=error, reply_text=text, enforce_complete=False)


class GuardedMessageStream(StreamAccount):
    """Wraps the SDK's ``MessageStream`` (or raw ``Stream``) to bill what was streamed, however it ends."""

    def __init__(self, owner: GuardedMessages, call: _Call, inner: Any, *, manager: Any) -> None:
        super().__init__(owner, call, inner, manager=manager)
        self.text_stream: Iterator[str] = self._text_stream()

    def __iter__(self) -> Iterator[Any]:
        try:
            for event in self._inner:
                self._observe(event)
                yield event
        except (anthropic.APIError, httpx2.HTTPError) as exc:
            raise self._broken(exc) from None
        self._ended()

    def _text_stream(self) -> Iterator[str]:
        for event in self:
            text = self._text_of(event)
            if text is not None:
                yield text

    # --- the SDK's MessageStream surface -----------------------------------------------------

    def until_done(self) -> None:
        for _ in self:
            pass

    def get_final_message(self) -> Any:
        self.until_done()
        return self._inner.get_final_message()

    def get_final_text(self) -> str:
        self.until_done()
        return str(self._inner.get_final_text())

    def close(self) -> None:
        """Release the connection; a stream closed before its end is billed for what arrived."""
        try:
            if self._manager is not None:
                self._manager.__exit__(None, None, None)
            else:
                self._inner.close()
        finally:
            if not self._finished:
                self._settle(abandoned=True)

    def __enter__(self) -> GuardedMessageStream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
