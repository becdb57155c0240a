"""One guarded call's steps, shared by every way of making one: ``claude.messages`` (client.py),
``claude.async_messages`` (aio.py), the guarded streams (streams.py) and batches (batches.py).

prepare (no I/O: count, chain, caps, input checks) -> reserve (budgets, in one storage step with the
admission and the breaker reads) -> the attempt loop (``calls.ChainRun``'s decisions; the callers do
the I/O, blocking or awaiting) -> finish (cost, settlement, one log line, span, signals, output
checks) or fail (release, one error line). ``as_guard_error`` says what the view is told.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import httpx2

from . import telemetry
from .aiconfig import AIRun
from .calls import SEND_ERRORS, Call, ChainRun, call_deadline, system_hash
from .context import clamp_max_tokens, current_scope, max_tokens_cap
from .errors import (
    CallLimitExceeded,
    ClaudeGuardError,
    ConfigError,
    InputTooLarge,
    InvalidOutput,
    TruncatedResponse,
    UpstreamUnavailable,
)
from .hygiene import check_output, has_cache_control, prune_history, with_auto_cache
from .pricing import TASK_BUDGET_MODELS
from .resilience import (
    Deadline,
    Failure,
    FailureKind,
    classify,
    model_chain,
)
from .signals import circuit_opened, claude_called
from .tokens import estimate_input_tokens, plain_messages, prompt_chars, text_bound, upper_bound_split

if TYPE_CHECKING:
    from .extension import ClaudeState

T = TypeVar("T")




class CallRunner:
    """The steps of a guarded call; the clients call them, only their I/O differs."""

    def __init__(self, state: ClaudeState) -> None:
        self.state = state
        self._skip_logged_until: dict[str, float] = {}  # model -> when to log "skipped, circuit open" again
        self._chains: dict[tuple[str, tuple[str, ...]], list[str]] = {}  # (requested, configured) -> chain

    def _chain(self, requested: str, configured: tuple[str, ...]) -> list[str]:
        """The call's model chain, every model priced (checked once per chain, not per call)."""
        key = (requested, tuple(configured))
        chain = self._chains.get(key)
        if chain is None:
            chain = model_chain(requested, configured)
            self.state.prices.check(chain)  # an unpriced model raises, and is not remembered
            if len(self._chains) < 1024:
                self._chains[key] = chain
        return list(chain)

    def begin(self, params: Mapping[str, Any], *, streaming: bool = False) -> Call:
        call = self.prepare(params, streaming=streaming)
        self.reserve(call)
        self.start_span(call, streaming=streaming)
        return call

    def start_span(self, call: Call, *, streaming: bool) -> None:
        """The call's OpenTelemetry span and AI Config run, once it is reserved (a refused call starts neither)."""
        state, scope = self.state, call.scope
        call.span = telemetry.start_call(operation="chat", chain=call.chain, max_tokens=call.params["max_tokens"],
                                         feature=scope.feature, route=scope.route, user=scope.user,
                                         salt=state.user_salt, streaming=streaming)
        call.ai_run = AIRun.start(scope.ai_config, call.started)

    def prepare(self, params: Mapping[str, Any], *, streaming: bool = False) -> Call:
        """Every decision about a call that needs no I/O: count it, pick the chain, check and cap it.

        Both clients run it before their first ``await``/block, so ``max_calls`` counts every call of
        an ``asyncio.gather`` in the order they start.
        """
        state = self.state
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
        chain = self._chain(requested, configured)
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
        plain = plain_messages(user_input["messages"])  # the common shape, measured in one pass
        if scope.max_input_chars is not None:
            chars = plain[0] if plain is not None else prompt_chars(user_input)
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
        cap = max_tokens_cap(scope, settings.max_tokens_cap)
        requested_max = params.get("max_tokens")
        max_tokens = clamp_max_tokens(requested_max, cap)
        call = Call(params={**params, "max_tokens": max_tokens}, scope=scope, chain=chain,
                     requested_model=requested,
                     deadline=Deadline.after(state.clock, call_deadline(
                         settings.stream_deadline if streaming else settings.deadline, params.get("timeout"))),
                     started=time.perf_counter(),
                     system_prompt_hash=system_hash(params.get("system")),
                     max_tokens_requested=requested_max, settles=True)
        call.task_budget = task_budget
        call.plain_input = plain
        if requested_max is not None and requested_max > cap:
            call.extra["max_tokens_clamped_from"] = requested_max
        call.params.pop("model", None)
        call.params.pop("timeout", None)
        return call

    def reserve(self, call: Call, *, wait: bool = True) -> None:
        """Reserve the worst case against every budget that applies, or refuse having reserved nothing."""
        state = self.state
        if call.bounds is None:  # once per call: the reservation, its top-ups and pacing read it
            params, plain = call.params, call.plain_input
            system = params.get("system")
            if plain is not None and params.get("tools") is None and (system is None or type(system) is str):
                call.bounds = (plain[1], text_bound(system) if system else 0)
                call.cache_control = plain[2] or "cache_control" in params
            else:
                call.bounds = upper_bound_split(params)
                call.cache_control = has_cache_control(params)
        call.reservation, call.breakers = state.budgets.begin(
            call.scope, call.chain, call.params, call.params["max_tokens"],
            call_seconds=call.deadline.remaining(), wait=wait, bounds=call.bounds, cached=call.cache_control)
        lower = call.reservation.downgraded_to if call.reservation is not None else None
        if lower and lower != call.chain:  # its budget is nearly spent: start at the cheaper model (downgrade.py)
            scope = call.scope
            state.events.emit("model_downgraded", {
                "feature": scope.feature, "route": scope.route, "user": state.events.user(scope.user),
                "from_model": call.chain[0], "to_model": lower[0], "fraction": round(call.reservation.fraction, 4),
                "downgrade_at": scope.downgrade_at}, level="WARNING")
            call.chain = list(lower)

    def run_chain(self, call: Call, send: Callable[[str, httpx2.Timeout], T]) -> T:
        """Try each model in turn: bounded retries per model, the breaker and the deadline for all."""
        chain = ChainRun(self, call)
        while (timeout := chain.next_attempt()) is not None:
            if (pause := chain.admit()) is not None:  # pacing: wait for the turn, or ask again
                if pause > 0:
                    self.state.clock.sleep(pause)
                continue
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
                self.state.clock.sleep(delay)
        raise chain.error()

    def log_skip(self, model: str) -> bool:
        """While a breaker is open every call skips its model: log that every few seconds, not per call."""
        now = self.state.clock.monotonic()
        if now < self._skip_logged_until.get(model, 0.0):
            return False
        self._skip_logged_until[model] = now + 5.0
        return True

    def record_outcome(self, model: str, *, ok: bool) -> None:
        state = self.state
        if state.breaker.record(model, ok, state.clock.time()):
            fields: dict[str, Any] = {"model": model, "cooldown_s": state.settings.breaker_cooldown}
            state.events.emit("circuit_opened", fields, level="ERROR")
            circuit_opened.send(state.app, **fields)

    def base_fields(self, call: Call) -> dict[str, Any]:
        events = self.state.events
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

    def finish(self, call: Call, *, usage: Any, stop_reason: str | None, request_id: str | None,
                message: Any = None, error: Failure | None = None, reply_text: str | None = None,
                batch: bool = False, enforce_complete: bool = True) -> None:
        """Cost from real usage, settle, log once, signal; then refuse a truncated reply if asked."""
        state = self.state
        cost = state.prices.cost(call.model, usage, batch=batch)
        base = self.base_fields(call)
        rollup = state.rollups.call_fields(call, base, cost, error)
        if call.reservation is not None:
            state.budgets.settle(call.reservation, cost.usd, cost.input_tokens + cost.cache_read_input_tokens
                                 + cost.cache_creation_input_tokens + cost.output_tokens,
                                 success=call.success_model, rollup=rollup, seen_closed=call.success_seen_closed)
        else:
            state.rollups.write(rollup, success=call.success_model)
        state.pacer.done(call, output_tokens=cost.output_tokens)
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
            self.check_output(call, stop_reason, message)

    def check_output(self, call: Call, stop_reason: str | None, message: Any) -> None:
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
        state = self.state
        state.events.emit("invalid_output", {"feature": scope.feature, "route": scope.route, "model": call.model,
                                             "reason": reason, "detail": detail}, level="WARNING")
        if reason == "invalid_output" or scope.require_complete:
            raise InvalidOutput(f"the reply failed validation: {reason}", reason=reason)

    def fail(self, call: Call, exc: BaseException) -> None:
        """A call that got no reply: release the reservation, log the error once."""
        state = self.state
        if isinstance(exc, asyncio.CancelledError):  # the task was cancelled (client gone, wait_for)
            failure: Failure | None = Failure(FailureKind.CANCELLED, None, "cancelled")
        else:
            failure = call.failure or (classify(exc) if not isinstance(exc, ClaudeGuardError) else None)
        error_type = failure.error_type if failure else type(exc).__name__
        base = self.base_fields(call)
        rollup = state.rollups.failed_call_fields(call, base, error_type)
        if call.reservation is not None:
            state.budgets.settle(call.reservation, 0.0, 0, rollup=rollup)
        else:  # no hold to release: the rollup is this failure's one extra storage step
            state.rollups.write(rollup)
        state.pacer.done(call)
        fields = {"request_id": getattr(exc, "request_id", None), **base,
                  "input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0,
                  "cache_creation_input_tokens": 0, "stop_reason": None, "cost_usd": 0.0,
                  "error_type": error_type,
                  "status_code": failure.status_code if failure else None, **call.extra}
        if failure is not None and failure.kind == FailureKind.CLIENT:
            fields["our_bug"] = True  # a 4xx from upstream means we sent a bad request
        state.events.emit("claude_api_error", fields, level="ERROR")
        call.span.finish(model=None, retries=call.retries, fallback_from=call.fallback_from,
                         error_type=fields["error_type"],
                         degradation_reason=getattr(self.as_guard_error(call, exc), "reason", None))
        if call.ai_run is not None:
            call.ai_run.fail()

    def as_guard_error(self, call: Call, exc: BaseException) -> BaseException:
        if isinstance(exc, ClaudeGuardError):
            return exc
        if not isinstance(exc, SEND_ERRORS):
            return exc  # our caller's bug (a wrong argument): let it surface as itself
        failure = call.failure or classify(exc)
        reason = "deadline_exceeded" if failure.kind == FailureKind.DEADLINE else "upstream_unavailable"
        retry_after: float | None = None
        if failure.kind == FailureKind.RATE_LIMITED:
            # Pass the upstream's back-off on (capped), so well-behaved clients do not hammer a rate limit.
            policy = self.state.retry_policy
            wait = failure.retry_after if failure.retry_after is not None else policy.max_delay
            retry_after = min(policy.retry_after_cap, wait)
        return UpstreamUnavailable(f"Claude call failed: {failure.error_type}", reason=reason,
                                   retry_after=retry_after)
