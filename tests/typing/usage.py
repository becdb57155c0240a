"""Checked by mypy in scripts/test (never run): the guarded client keeps the SDK's types."""

from __future__ import annotations

from typing import assert_type

from anthropic.types import Message, MessageTokensCount

from flask_claude import Claude, FlagProvider, StaticFlags
from flask_claude.aio import AsyncGuardedMessageStream
from flask_claude.streams import GuardedMessageStream

claude = Claude()
assert_type(claude.messages.create(model="claude-sonnet-4-6", max_tokens=64, messages=[]), Message)
assert_type(claude.messages.create(max_tokens=64, messages=[], stream=True), GuardedMessageStream)
assert_type(claude.messages.count_tokens(messages=[]), MessageTokensCount)
provider: FlagProvider = StaticFlags({"ai-enabled": True})


async def in_an_async_view() -> None:
    assert_type(await claude.async_messages.create(max_tokens=64, messages=[]), Message)
    assert_type(await claude.async_messages.create(messages=[], stream=True), AsyncGuardedMessageStream)
    assert_type(await claude.async_messages.count_tokens(messages=[]), MessageTokensCount)
