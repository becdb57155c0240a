"""A guarded stream: every event counted, billed for what arrived however it ends.

A stream is complete only when ``message_stop`` arrived; an ``event: error``, a dropped connection
or a body that ends early is a failed stream (billed, ``UpstreamUnavailable`` to the view), and one
the caller abandons is billed as ``client_disconnected``. ``StreamAccount`` holds what both the
blocking stream here and ``aio.py``'s async one count.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import anthropic
import httpx2

from .calls import Call, usage_dict
from .errors import (
    ConfigError,
    UpstreamUnavailable,
)
from .resilience import (
    Failure,
    FailureKind,
    classify,
)
from .tokens import estimate_tokens

if TYPE_CHECKING:
    from .runner import CallRunner

class GuardedStreamManager:
    """``with claude.messages.stream(...) as stream``: the request and retries happen on enter."""

    def __init__(self, owner: CallRunner, params: Mapping[str, Any]) -> None:
        self._owner = owner
        self._params = params
        self._stream: GuardedMessageStream | None = None

    def __enter__(self) -> GuardedMessageStream:
        owner = self._owner
        if "task_budget" in self._params:
            raise ConfigError("task_budget works with claude.messages.create(); streams do not take it yet")
        call = owner.begin(self._params, streaming=True)
        client = owner.state.client

        def send(model: str, timeout: httpx2.Timeout) -> tuple[Any, Any]:
            manager = client.messages.stream(**{**call.params, "model": model, "timeout": timeout})
            return manager, manager.__enter__()

        try:
            manager, inner = owner.run_chain(call, send)
        except BaseException as exc:
            owner.fail(call, exc)
            raise owner.as_guard_error(call, exc) from None
        self._stream = GuardedMessageStream(owner, call, inner, manager=manager)
        return self._stream

    def __exit__(self, *exc_info: Any) -> None:
        if self._stream is not None:
            self._stream.close()


class StreamAccount:
    """What a guarded stream knows and decides, sync or async: usage and text as they arrive, whether it
    ended whole (``message_stop``), and the bill however it ended.

    A mid-stream ``event: error`` (an ``APIStatusError`` with status 200), a dropped connection
    (``httpx2.RemoteProtocolError``, raw or wrapped by the SDK) and a body that ends before
    ``message_stop`` become ``UpstreamUnavailable``; a stream the client walked away from (or a
    cancelled task) is billed on close. Output tokens of an unfinished stream are the larger of the
    last reported count and an estimate of the text received.
    """

    def __init__(self, owner: CallRunner, call: Call, inner: Any, *, manager: Any) -> None:
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
        self._ai_run = call.ai_run  # told of the first token, then dropped: no lookup on later events

    def _observe(self, event: Any) -> None:
        """Count one event; the only per-event work a guarded stream adds (``bench/streams.py`` times it).

        Tested in the order events come: a text delta (and, from a ``MessageStream``, the ``text`` event
        the SDK derives from it) is nearly every event; the usage events come once each.
        """
        kind = getattr(event, "type", None)
        if kind == "content_block_delta":
            delta = event.delta
            if delta.type == "text_delta":
                self._text.append(delta.text)
            if self._ai_run is not None:
                self._ai_run.first_token()  # LaunchDarkly's time to first token
                self._ai_run = None
        elif kind == "text":
            return
        elif kind == "message_start":
            self._usage = usage_dict(event.message.usage)
        elif kind == "message_delta":
            for key, value in usage_dict(event.usage).items():
                if value is not None:
                    self._usage[key] = value
            self._stop_reason = event.delta.stop_reason
        elif kind == "message_stop":
            self._stopped = True

    def _broken(self, exc: BaseException) -> UpstreamUnavailable:
        """The body failed mid-way (an SDK or transport error)."""
        cause = exc.__cause__
        if isinstance(exc, anthropic.APIConnectionError) and isinstance(cause, httpx2.HTTPError):
            # Some SDK builds wrap a body cut mid-stream in APIConnectionError: the stream broke after
            # it began, which is the transport error's own kind (a stream failure), not a failed connect.
            exc = cause
        failure = classify(exc)
        if self._call.deadline.expired and failure.kind == FailureKind.TIMEOUT:
            failure = Failure(FailureKind.DEADLINE, None, "deadline_exceeded")  # our limit, not the model's fault
        return self._failed(failure)

    def _ended(self) -> None:
        """The body ended: whole only if ``message_stop`` arrived."""
        if not self._stopped:
            # A body that ended cleanly before ``message_stop`` is a cut reply, not a short one.
            raise self._failed(Failure(FailureKind.STREAM, None, "incomplete_stream"))
        self._completed = True
        self._settle()

    def _failed(self, failure: Failure) -> UpstreamUnavailable:
        """Bill what arrived, hold the failure against the model, and tell the view."""
        self._call.success_model = None  # the stream's start was fine; its end was not
        self._owner.record_outcome(self._call.model, ok=not failure.counts_against_model)
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
        self._owner.finish(self._call, usage=usage, stop_reason=stop_reason, request_id=self.request_id,
                            error=error, reply_text=text, enforce_complete=False)


class GuardedMessageStream(StreamAccount):
    """Wraps the SDK's ``MessageStream`` (or raw ``Stream``) to bill what was streamed, however it ends."""

    def __init__(self, owner: CallRunner, call: Call, inner: Any, *, manager: Any) -> None:
        super().__init__(owner, call, inner, manager=manager)
        self.text_stream: Iterator[str] = self._text_stream()

    def __iter__(self) -> Iterator[Any]:
        observe = self._observe
        try:
            for event in self._inner:
                observe(event)
                yield event
        except (anthropic.APIError, httpx2.HTTPError) as exc:
            raise self._broken(exc) from None
        except BaseException:
            # The consumer stopped early (the generator closed: a ``break``, a response generator
            # Flask closed when the client went away) or something was thrown into it: bill what
            # arrived now, whether or not ``close()`` is reached, as the async stream does.
            if not self._finished:
                self._settle(abandoned=True)
            raise
        self._ended()

    def _text_stream(self) -> Iterator[str]:
        for event in self:  # a text delta's text, whatever the stream's kind (no helper: a call per event)
            if getattr(event, "type", None) == "content_block_delta" and event.delta.type == "text_delta":
                yield str(event.delta.text)

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
            if not self._finished:
                self._settle(abandoned=True)  # first, as the async stream: an interrupt while closing skips no bill
        finally:
            if self._manager is not None:
                self._manager.__exit__(None, None, None)
            else:
                self._inner.close()

    def __enter__(self) -> GuardedMessageStream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
