"""What a simulated call costs: token counts of a prompt and prompt caching.

``count_tokens`` and the usage of ``create`` both come from :func:`prompt_segments`, so they always
agree, and tests can compute expected numbers by hand from :func:`estimate_tokens`: the same
estimate the client sizes input caps with (``flask_claude.tokens``), so the simulator reports what
the rest of the package would predict, and budget reservations (``tokens.upper_bound_tokens``,
two characters a token) still hold more than any simulated call uses.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from typing import Any

from ..clock import Clock
from ..tokens import CHARS_PER_TOKEN, estimate_tokens

#: Tokens added for every message on top of its content: role markers cost tokens on the real API
#: too, and a constant keeps "more messages, more tokens" true even for one-word turns.
MESSAGE_OVERHEAD_TOKENS = 3

#: An image is counted as a fixed size (about a 1092x1092 picture at width*height/750) rather than by
#: the length of its base64 data, which would make every image look like a whole book.
IMAGE_TOKENS = 1600

_TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}


def max_text_chars(tokens: int) -> int:
    """The longest text :func:`estimate_tokens` counts as ``tokens``: where a reply hits ``max_tokens``."""
    return tokens * CHARS_PER_TOKEN


def output_tokens(text: str) -> int:
    """A reply's output tokens: its text's estimate, and at least 1 (ending the turn is a token too)."""
    return max(1, estimate_tokens(text))


@dataclass
class Usage:
    """The ``usage`` object of a reply, with the cache writes kept apart by TTL."""

    input_tokens: int
    output_tokens: int
    cache_creation_5m: int = 0
    cache_creation_1h: int = 0
    cache_read: int = 0
    service_tier: str = "standard"

    def as_json(self, *, output_tokens: int | None = None) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens if output_tokens is None else output_tokens,
            "cache_creation_input_tokens": self.cache_creation_5m + self.cache_creation_1h,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.cache_creation_5m,
                "ephemeral_1h_input_tokens": self.cache_creation_1h,
            },
            "service_tier": self.service_tier,
        }

    def delta_json(self) -> dict[str, Any]:
        """The cumulative usage a stream's ``message_delta`` carries (no breakdown, no tier)."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": self.cache_creation_5m + self.cache_creation_1h,
            "cache_read_input_tokens": self.cache_read,
        }


@dataclass
class Segment:
    """A cacheable unit of the prompt (a tool, a system block or a message block)."""

    tokens: int
    fingerprint: str
    cache_control: dict[str, Any] | None


def _block_text(block: Any) -> str:
    """The text a content block contributes to the token estimate."""
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return json.dumps(block, sort_keys=True)
    if block.get("type") == "text":
        return str(block.get("text", ""))
    if block.get("type") == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return "".join(_block_text(item) for item in content)
        return "" if content is None else str(content)
    return json.dumps({k: v for k, v in block.items() if k != "cache_control"}, sort_keys=True)


def _block_tokens(block: Any) -> int:
    if isinstance(block, dict) and block.get("type") == "image":
        return IMAGE_TOKENS
    return estimate_tokens(_block_text(block))


def _cache_control(block: Any) -> dict[str, Any] | None:
    if isinstance(block, dict) and isinstance(block.get("cache_control"), dict):
        control: dict[str, Any] = block["cache_control"]
        return control
    return None


def _fingerprint(value: Any) -> str:
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k != "cache_control"}
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def prompt_segments(body: dict[str, Any]) -> list[Segment]:
    """Cut the prompt into cacheable segments in the API's cache order: tools, system, messages.

    Tokens (see :func:`estimate_tokens`): a text block counts its text, a tool or any other block
    its JSON, an image :data:`IMAGE_TOKENS`; the first block of every message adds
    :data:`MESSAGE_OVERHEAD_TOKENS`.
    """
    segments: list[Segment] = []
    for tool in body.get("tools") or []:
        segments.append(Segment(estimate_tokens(_fingerprint(tool)), _fingerprint(tool), _cache_control(tool)))
    system = body.get("system")
    if isinstance(system, str) and system:
        segments.append(Segment(estimate_tokens(system), _fingerprint(system), None))
    elif isinstance(system, list):
        for block in system:
            segments.append(Segment(_block_tokens(block), _fingerprint(block), _cache_control(block)))
    for message in body.get("messages") or []:
        content = message.get("content")
        blocks = [content] if isinstance(content, str) else list(content or [])
        role = str(message.get("role"))
        if not blocks:
            segments.append(Segment(MESSAGE_OVERHEAD_TOKENS, role, None))
        for index, block in enumerate(blocks):
            overhead = MESSAGE_OVERHEAD_TOKENS if index == 0 else 0
            segments.append(
                Segment(_block_tokens(block) + overhead, role + _fingerprint(block), _cache_control(block))
            )
    # Top-level ``cache_control`` ("automatic caching") puts the breakpoint on the last block.
    top = body.get("cache_control")
    if isinstance(top, dict) and segments and segments[-1].cache_control is None:
        segments[-1].cache_control = top
    return segments


def prompt_tokens(body: dict[str, Any]) -> int:
    """The whole prompt's tokens, as ``count_tokens`` answers them (before any padding)."""
    return sum(segment.tokens for segment in prompt_segments(body))


class PromptCache:
    """The API's prompt cache: marked prefixes, per model, each alive until its TTL runs out."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, float] = {}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def usage(self, body: dict[str, Any], output_tokens: int, service_tier: str) -> Usage:
        """Input usage with prompt caching.

        Each ``cache_control`` marks a prefix. The longest marked prefix already cached (same model,
        same content, not expired) is read; the marked prefixes after it are written, each at its
        own TTL. ``input_tokens`` is what is left. The API's minimum cacheable length is ignored so
        small test prompts cache too.
        """
        segments = prompt_segments(body)
        total = sum(s.tokens for s in segments)
        breakpoints: list[tuple[str, int, str]] = []
        digest = hashlib.sha256(str(body["model"]).encode())
        running = 0
        for segment in segments:
            digest.update(b"\x00" + segment.fingerprint.encode())
            running += segment.tokens
            if segment.cache_control is not None:
                ttl = "1h" if segment.cache_control.get("ttl") == "1h" else "5m"
                breakpoints.append((digest.hexdigest(), running, ttl))
        usage = Usage(input_tokens=total, output_tokens=output_tokens, service_tier=service_tier)
        if not breakpoints:
            return usage
        now = self.clock.time()
        with self._lock:
            hit = -1
            for index in range(len(breakpoints) - 1, -1, -1):
                expiry = self._entries.get(breakpoints[index][0])
                if expiry is not None and expiry > now:
                    hit = index
                    break
            previous = breakpoints[hit][1] if hit >= 0 else 0
            usage.cache_read = previous
            for index, (key, tokens, ttl) in enumerate(breakpoints):
                if index > hit:
                    if ttl == "1h":
                        usage.cache_creation_1h += tokens - previous
                    else:
                        usage.cache_creation_5m += tokens - previous
                    previous = tokens
                self._entries[key] = now + _TTL_SECONDS[ttl]  # written, or refreshed by the read
        usage.input_tokens = total - usage.cache_read - usage.cache_creation_5m - usage.cache_creation_1h
        return usage
