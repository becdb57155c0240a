"""Guarded ``messages.create / stream / count_tokens``: the SDK's own signatures and return types.

The steps of a call (prepare, reserve, the attempt loop, finish or fail) are ``runner.CallRunner``'s,
shared with ``aio.py`` (``claude.async_messages``), which only awaits where this module blocks: the
attempt, the retry wait and the wait for a busy budget.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import httpx2
from anthropic.types import Message, MessageTokensCount

from .batches import GuardedBatches
from .calls import Call, create_kwargs
from .context import current_scope
from .streams import GuardedMessageStream, GuardedStreamManager

if TYPE_CHECKING:
    from .extension import ClaudeState

T = TypeVar("T")


class GuardedMessages:
    """``claude.messages``: what the SDK's ``client.messages`` does, inside the guard rails."""

    def __init__(self, state: ClaudeState) -> None:
        self._state = state
        self._runner = state.runner
        self.batches = GuardedBatches(state.runner)

    # --- public API -------------------------------------------------------------------------

    @overload
    def create(self, *, stream: Literal[True], **params: Any) -> GuardedMessageStream: ...

    @overload
    def create(self, *, stream: Literal[False] = ..., **params: Any) -> Message: ...

    def create(self, **params: Any) -> Any:
        """``client.messages.create(...)`` guarded; ``stream=True`` returns a guarded raw stream."""
        streaming = bool(params.get("stream"))
        call = self._runner.begin(params, streaming=streaming)
        try:
            result = self._runner.run_chain(call, lambda model, timeout: self._send_create(call, model, timeout))
        except BaseException as exc:
            self._runner.fail(call, exc)
            raise self._runner.as_guard_error(call, exc) from None
        if streaming:
            return GuardedMessageStream(self._runner, call, result, manager=None)
        self._runner.finish(call, usage=result.usage, stop_reason=result.stop_reason,
                     request_id=getattr(result, "_request_id", None), message=result)
        return result

    def stream(self, **params: Any) -> GuardedStreamManager:
        """``client.messages.stream(...)`` guarded: use it as ``with claude.messages.stream(...) as s``."""
        return GuardedStreamManager(self._runner, params)

    def count_tokens(self, **params: Any) -> MessageTokensCount:
        """Free upstream, so no budget or cost: only retries, fallback-free, within the deadline."""
        model = params.get("model") or self._state.settings.models[0]
        call = Call.bare(self._state, current_scope(), model)
        try:
            counted: MessageTokensCount = self._runner.run_chain(
                call, lambda m, timeout: self._state.client.messages.count_tokens(
                    **{**params, "model": m, "timeout": timeout}))
            return counted
        except BaseException as exc:
            raise self._runner.as_guard_error(call, exc) from None

    def _send_create(self, call: Call, model: str, timeout: httpx2.Timeout) -> Any:
        beta, params = create_kwargs(call, model, timeout)
        client = self._state.client
        endpoint: Any = client.beta.messages if beta else client.messages  # beta overloads do not type **params
        return endpoint.create(**params)
