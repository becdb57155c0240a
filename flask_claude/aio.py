"""``claude.async_messages``: the guarded client for ``async def`` views, on ``anthropic.AsyncAnthropic``.

Only the I/O is here. Every decision (caps, the chain and its fallbacks, retry delays, the breaker,
reservations and settlement, the log line, output checks) is ``client.py``'s, called the same way
the sync client calls it; what differs is that an attempt is awaited and a wait is ``await``-ed.

Two things are particular to async code:

* **One SDK client per event loop.** Flask runs each ``async def`` view in a new event loop
  (asgiref), and an httpx connection pool belongs to the loop that opened it: reused on the next
  loop it fails ("attached to a different loop", "Event loop is closed"). ``LoopClients`` builds an
  ``AsyncAnthropic`` the first time a loop asks and closes it (its connections included) while that
  loop shuts down, through an async generator the loop finalises in ``shutdown_asyncgens`` (which
  ``asyncio.run``, asgiref and ASGI servers all call). Under Quart or an ASGI server the loop lives
  as long as the process, and so does its client.
* **Storage stays synchronous.** A reservation or settlement is one storage round trip (memory, or
  one Redis script: ``bench/overhead.py`` measures it), short enough to
  run on the loop; what must not block the loop is waiting, so a busy budget is waited for with
  ``await`` (``Budgets.begin(wait=False)`` refuses at once and this module retries).
"""

from __future__ import annotations

import asyncio
import random
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import anthropic
import httpx2
from anthropic.types import Message, MessageTokensCount

from .calls import SEND_ERRORS, Call, ChainRun, create_kwargs
from .clock import asleep
from .context import current_scope
from .errors import BudgetExceeded, ConfigError
from .resilience import AsyncDeadlineTransport
from .streams import StreamAccount

if TYPE_CHECKING:
    from .extension import ClaudeState
    from .runner import CallRunner

T = TypeVar("T")


class LoopClients:
    """One ``AsyncAnthropic`` per running event loop, closed when that loop shuts down."""

    def __init__(self, factory: Callable[[], anthropic.AsyncAnthropic]) -> None:
        self._factory = factory
        self._clients: dict[asyncio.AbstractEventLoop, anthropic.AsyncAnthropic] = {}
        self._closers: dict[asyncio.AbstractEventLoop, AsyncIterator[None]] = {}
        self._lock = threading.Lock()  # gthread workers: one loop per request thread, one registry
        self.opened = 0
        self.closed = 0

    @property
    def live(self) -> int:
        """Clients whose loop has not shut down yet (tests check nothing outlives its loop)."""
        return len(self._clients)

    async def get(self) -> anthropic.AsyncAnthropic:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is not None:
            return client
        client = self._factory()
        closer = self._close_at_shutdown(loop, client)
        # Run it to its ``yield``: from now on the loop tracks it and finalises it at shutdown.
        await closer.__anext__()  # no suspension before its ``yield``: no other task of this loop ran
        with self._lock:
            self._forget_closed_loops()
            self._clients[loop] = client
            self._closers[loop] = closer
            self.opened += 1
        return client

    async def _close_at_shutdown(self, loop: asyncio.AbstractEventLoop,
                                 client: anthropic.AsyncAnthropic) -> AsyncIterator[None]:
        try:
            yield
        finally:
            with self._lock:
                self._clients.pop(loop, None)
                self._closers.pop(loop, None)
            await client.close()
            with self._lock:
                self.closed += 1

    def _forget_closed_loops(self) -> None:
        """A loop closed without ``shutdown_asyncgens`` (rare): drop its client rather than keep it."""
        for loop in [lp for lp in list(self._clients) if lp.is_closed()]:
            self._clients.pop(loop, None)
            self._closers.pop(loop, None)


def _client_factory(state: ClaudeState) -> Callable[[], anthropic.AsyncAnthropic]:
    shared = state.async_transport
    tls: list[ssl.SSLContext] = []

    def build() -> anthropic.AsyncAnthropic:
        inner: httpx2.AsyncBaseTransport
        if shared is not None:
            inner = shared  # the in-process simulator: no sockets, no loop of its own
        else:
            if not tls:  # loading the CA store takes milliseconds: once per app, not per loop
                tls.append(httpx2.create_ssl_context())
            inner = httpx2.AsyncHTTPTransport(verify=tls[0], limits=anthropic.DEFAULT_CONNECTION_LIMITS)
        return anthropic.AsyncAnthropic(
            **state.sdk_options, max_retries=0,
            http_client=anthropic.DefaultAsyncHttpxClient(transport=AsyncDeadlineTransport(inner)))

    return build


class AsyncGuardedMessages:
    """``claude.async_messages``: ``await create(...)``, ``async with stream(...)``, ``await count_tokens(...)``."""

    def __init__(self, state: ClaudeState) -> None:
        self._state = state
        self.clients = LoopClients(_client_factory(state))

    @property
    def _core(self) -> CallRunner:
        return self._state.runner

    # --- public API -------------------------------------------------------------------------

    @overload
    async def create(self, *, stream: Literal[True], **params: Any) -> AsyncGuardedMessageStream: ...

    @overload
    async def create(self, *, stream: Literal[False] = ..., **params: Any) -> Message: ...

    async def create(self, **params: Any) -> Any:
        """``AsyncAnthropic().messages.create(...)`` guarded; ``stream=True`` gives a guarded async stream."""
        core = self._core
        streaming = bool(params.get("stream"))
        call = core.prepare(params, streaming=streaming)  # counted before the first await
        await self._reserve(call)
        core.start_span(call, streaming=streaming)
        try:
            client = await self.clients.get()
            result = await self._run_chain(call, lambda model, timeout: self._send_create(client, call, model,
                                                                                          timeout))
        except BaseException as exc:  # a cancelled task too: its hold is released and the call logged
            core.fail(call, exc)
            raise core.as_guard_error(call, exc) from None
        if streaming:
            return AsyncGuardedMessageStream(core, call, result, manager=None)
        core.finish(call, usage=result.usage, stop_reason=result.stop_reason,
                     request_id=getattr(result, "_request_id", None), message=result)
        return result

    def stream(self, **params: Any) -> AsyncGuardedStreamManager:
        """``async with claude.async_messages.stream(...) as stream``: the request happens on enter."""
        return AsyncGuardedStreamManager(self, params)

    async def count_tokens(self, **params: Any) -> MessageTokensCount:
        """Free upstream, so no budget or cost: only retries and the deadline."""
        core = self._core
        model = params.get("model") or self._state.settings.models[0]
        call = Call.bare(self._state, current_scope(), model)
        try:
            client = await self.clients.get()
            counted: MessageTokensCount = await self._run_chain(call, lambda m, timeout: client.messages.count_tokens(
                **{**params, "model": m, "timeout": timeout}))
            return counted
        except BaseException as exc:
            raise core.as_guard_error(call, exc) from None

    # --- the I/O of a call ------------------------------------------------------------------

    @staticmethod
    async def _send_create(client: anthropic.AsyncAnthropic, call: Call, model: str,
                           timeout: httpx2.Timeout) -> Any:
        beta, kwargs = create_kwargs(call, model, timeout)
        endpoint: Any = client.beta.messages if beta else client.messages
        return await endpoint.create(**kwargs)

    async def _reserve(self, call: Call) -> None:
        """``CallRunner.reserve``, waiting for a busy budget with ``await``.

        Under ``asyncio.gather`` the room a call waits for is held by its siblings on this same loop:
        a blocking wait would stall exactly the calls that would give it back.
        """
        core, clock = self._core, self._state.clock
        until = clock.monotonic() + self._state.settings.budget_wait
        pause = 0.02
        while True:
            try:
                core.reserve(call, wait=False)
                return
            except BudgetExceeded as exc:
                if exc.reason != "budget_busy" or clock.monotonic() + pause >= until:
                    raise
            await asleep(clock, pause * (0.5 + random.random()))
            pause = min(pause * 2, 0.25)

    async def _run_chain(self, call: Call, send: Callable[[str, httpx2.Timeout], Awaitable[T]]) -> T:
        """``CallRunner.run_chain`` with the attempt and the wait awaited."""
        chain = ChainRun(self._core, call)
        while (timeout := chain.next_attempt()) is not None:
            if (pause := chain.admit()) is not None:  # pacing: wait for the turn, or ask again
                if pause > 0:
                    await asleep(self._state.clock, pause)
                continue
            tokens = chain.enter_attempt()
            delay: float | None = None
            try:
                with call.span.current():
                    result = await send(call.model, timeout)
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
                await asleep(self._state.clock, delay)
        raise chain.error()


class AsyncGuardedStreamManager:
    """``async with claude.async_messages.stream(...) as stream``: request, retries and fallback on enter."""

    def __init__(self, owner: AsyncGuardedMessages, params: dict[str, Any]) -> None:
        self._owner = owner
        self._params = params
        self._stream: AsyncGuardedMessageStream | None = None

    async def __aenter__(self) -> AsyncGuardedMessageStream:
        owner = self._owner
        core = owner._core
        if "task_budget" in self._params:
            raise ConfigError("task_budget works with claude.async_messages.create(); streams do not take it yet")
        call = core.prepare(self._params, streaming=True)
        await owner._reserve(call)
        core.start_span(call, streaming=True)
        try:
            client = await owner.clients.get()

            async def send(model: str, timeout: httpx2.Timeout) -> tuple[Any, Any]:
                manager = client.messages.stream(**{**call.params, "model": model, "timeout": timeout})
                return manager, await manager.__aenter__()

            manager, inner = await owner._run_chain(call, send)
        except BaseException as exc:
            core.fail(call, exc)
            raise core.as_guard_error(call, exc) from None
        self._stream = AsyncGuardedMessageStream(core, call, inner, manager=manager)
        return self._stream

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._stream is not None:
            await self._stream.close()


class AsyncGuardedMessageStream(StreamAccount):
    """Wraps the SDK's ``AsyncMessageStream`` (or raw ``AsyncStream``): ``async for``, ``text_stream``."""

    def __init__(self, owner: CallRunner, call: Call, inner: Any, *, manager: Any) -> None:
        super().__init__(owner, call, inner, manager=manager)
        self.text_stream: AsyncIterator[str] = self._text_stream()

    async def __aiter__(self) -> AsyncIterator[Any]:
        observe = self._observe
        try:
            async for event in self._inner:
                observe(event)
                yield event
        except (anthropic.APIError, httpx2.HTTPError) as exc:
            raise self._broken(exc) from None
        except BaseException:
            # Cancelled (the client went away, a ``wait_for`` ran out) or the consumer stopped early:
            # bill what arrived now, whether or not ``close()`` is reached.
            if not self._finished:
                self._settle(abandoned=True)
            raise
        self._ended()

    async def _text_stream(self) -> AsyncIterator[str]:
        async for event in self:  # as ``GuardedMessageStream._text_stream``
            if getattr(event, "type", None) == "content_block_delta" and event.delta.type == "text_delta":
                yield str(event.delta.text)

    # --- the SDK's AsyncMessageStream surface ------------------------------------------------

    async def until_done(self) -> None:
        async for _ in self:
            pass

    async def get_final_message(self) -> Any:
        await self.until_done()
        return await self._inner.get_final_message()

    async def get_final_text(self) -> str:
        await self.until_done()
        return str(await self._inner.get_final_text())

    async def close(self) -> None:
        """Release the connection; a stream closed before its end is billed for what arrived."""
        try:
            if not self._finished:
                self._settle(abandoned=True)  # first: a cancellation while closing must not skip the bill
        finally:
            if self._manager is not None:
                await self._manager.__aexit__(None, None, None)
            else:
                await self._inner.close()

    async def __aenter__(self) -> AsyncGuardedMessageStream:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
