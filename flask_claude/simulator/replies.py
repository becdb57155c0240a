"""What the simulator answers: deterministic prose from the prompt, cut the way the API cuts replies.

The same prompt (and seed) always gets the same text, so tests can pin token counts; a prompt
starting with ``echo:`` is answered with the rest verbatim, for tests that need exact text.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from .accounting import max_text_chars

_WORDS = (
    "answer", "batch", "budget", "cache", "careful", "clear", "context", "cost", "detail",
    "deadline", "draft", "every", "field", "first", "guard", "helpful", "idea", "input", "latency",
    "limit", "model", "measure", "metric", "next", "note", "output", "plain", "policy", "prompt",
    "queue", "quota", "reply", "report", "request", "result", "route", "safe", "short", "signal",
    "simple", "small", "steady", "stream", "summary", "system", "the", "token", "trace", "useful",
    "value", "window", "worker", "with", "within", "and", "for", "a", "this", "that", "each",
)  # fmt: skip


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text of the last user turn: what the reply is derived from."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "".join(
                str(b.get("text", "")) for b in content or [] if isinstance(b, dict) and b.get("type") == "text"
            )
    return ""


def natural_text(seed: int, prompt: str) -> str:
    """Deterministic prose from the prompt; ``echo:`` replies the rest verbatim for exact tests."""
    if prompt.startswith("echo:"):
        rest = prompt[len("echo:") :]
        return rest[1:] if rest.startswith(" ") else rest
    rng = random.Random(hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest())
    sentences = []
    for _ in range(rng.randint(2, 4)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 12))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def cut_reply(
    text: str, max_tokens: int, stop_sequences: Sequence[Any], *, truncate: bool
) -> tuple[str, str, str | None]:
    """Apply stop sequences and ``max_tokens`` to ``text``: ``(text, stop_reason, stop_sequence)``.

    ``truncate`` (the scripted fault) pads the reply until it fills ``max_tokens``, the worst case a
    cost guard has to expect.
    """
    stop_reason, stop_sequence = "end_turn", None
    limit = max_text_chars(max_tokens)
    if truncate:
        while len(text) < limit:
            text = f"{text} {text}" if text else "token"
    else:
        cut = [(text.find(s), s) for s in stop_sequences if isinstance(s, str) and s and s in text]
        if cut:
            index, stop_sequence = min(cut)
            text, stop_reason = text[:index], "stop_sequence"
    if len(text) > limit:
        text, stop_reason, stop_sequence = text[:limit], "max_tokens", None
    return text, stop_reason, stop_sequence
