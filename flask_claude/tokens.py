"""Local token estimates: input caps and budget reservations must not cost a network round trip.

Claude's tokenizer averages about 3.5-4 characters per token on English text; we count one token
per 3 characters (rounded up), which over-estimates for prose and stays safe for budget
reservations. A caller that needs the exact figure uses ``claude.messages.count_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

CHARS_PER_TOKEN = 3


def estimate_tokens(text: str) -> int:
    """The one token estimate of the package: input caps, cache-size checks and the simulator's usage."""
    return -(-len(text) // CHARS_PER_TOKEN) if text else 0


def _texts(content: Any) -> Iterator[str]:
    if content is None:
        return
    if isinstance(content, str):
        yield content
        return
    if isinstance(content, Mapping):
        for key in ("text", "content", "input", "thinking", "source"):
            value = content.get(key)
            if isinstance(value, str):
                yield value
            elif isinstance(value, (list, Mapping)):
                if key == "input" or key == "source":
                    yield json.dumps(value, default=str)
                else:
                    yield from _texts(value)
        return
    if isinstance(content, (list, tuple)):
        for item in content:
            yield from _texts(item)
        return
    yield str(content)


def prompt_texts(params: Mapping[str, Any]) -> Iterator[str]:
    """Every piece of caller-supplied text in a Messages request: system, messages and tools."""
    yield from _texts(params.get("system"))
    for message in params.get("messages") or ():
        if isinstance(message, Mapping):
            yield from _texts(message.get("content"))
    for tool in params.get("tools") or ():
        yield json.dumps(tool, default=str)


def prompt_chars(params: Mapping[str, Any]) -> int:
    return sum(len(t) for t in prompt_texts(params))


def estimate_input_tokens(params: Mapping[str, Any]) -> int:
    """An upper-leaning estimate of input tokens, with a small per-message framing overhead."""
    framing = 8 + 4 * len(params.get("messages") or ())
    return framing + sum(estimate_tokens(t) for t in prompt_texts(params))


# Content we cannot size locally: an image is at most about 1,600 tokens after the API resizes it;
# a document's pages are unknown here, so its bound is a generous page count. A call that costs
# more than its hold is still counted in full and logged as ``reservation_exceeded``.
IMAGE_TOKENS_BOUND = 2_000
DOCUMENT_TOKENS_BOUND = 30_000


def _media_blocks(value: Any) -> Iterator[str]:
    if isinstance(value, Mapping):
        kind = value.get("type")
        if kind in ("image", "document"):
            yield str(kind)
        for item in value.values():
            if isinstance(item, (Mapping, list, tuple)):
                yield from _media_blocks(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _media_blocks(item)


def upper_bound_tokens(params: Mapping[str, Any]) -> int:
    """A bound no tokenizer should exceed, for budget reservations: spend must never pass a budget.

    ASCII text averages about 4 characters a token; we count 2. Other scripts (CJK, emoji) can
    take more than one token per character; we count 2 per character. Images and documents count
    their bounds above.
    """
    total = 16 + 8 * len(params.get("messages") or ())
    for kind in _media_blocks(params.get("messages")):
        total += IMAGE_TOKENS_BOUND if kind == "image" else DOCUMENT_TOKENS_BOUND
    for text in prompt_texts(params):
        non_ascii = sum(1 for ch in text if ord(ch) > 127) if not text.isascii() else 0
        total += -(-(len(text) - non_ascii) // 2) + 2 * non_ascii
    return total


def upper_bound_split(params: Mapping[str, Any]) -> tuple[int, int]:
    """``upper_bound_tokens`` in its two parts, from one pass each over what they hold: what callers
    send (``messages``, with the request's framing) and what the app adds (``system``, ``tools``)."""
    user = upper_bound_tokens({"messages": params.get("messages") or ()})
    app_part = upper_bound_tokens({"system": params.get("system"), "tools": params.get("tools")}) - 16
    return user, app_part


def text_bound(text: str) -> int:
    """``upper_bound_tokens``' count for one text: half its ASCII characters (rounded up), two per other."""
    if text.isascii():
        return -(-len(text) // 2)
    non_ascii = sum(1 for ch in text if ord(ch) > 127)
    return -(-(len(text) - non_ascii) // 2) + 2 * non_ascii


def plain_messages(messages: Any) -> tuple[int, int, bool] | None:
    """(characters, token bound, any ``cache_control``) of ``messages`` when each is a plain
    ``{"role", "content": str}`` dict, the shape of most requests; None for any other shape.

    The same numbers as ``prompt_chars`` and ``upper_bound_split``'s first part, from one pass
    without generators: a guarded call measures its input on every request.
    """
    if type(messages) is not list:
        return None
    chars = 0
    bound = 16 + 8 * len(messages)
    cache = False
    for message in messages:
        if type(message) is not dict:
            return None
        content = message.get("content")
        if type(content) is not str:
            return None
        chars += len(content)
        bound += text_bound(content)
        if "cache_control" in message:
            cache = True
    return chars, bound, cache
