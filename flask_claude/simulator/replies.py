"""What the simulator answers: deterministic prose from the prompt, cut the way the API cuts replies.

The same prompt (and seed) always gets the same text, so tests can pin token counts; a prompt
starting with ``echo:`` is answered with the rest verbatim, for tests that need exact text; and reply
rules (``sim.reply(pattern, text)``) script the answer to a kind of prompt, so a feature that checks
its output (a label, JSON) works on the simulator without its callers writing ``echo:`` prompts.
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


def system_text(system: Any) -> str:
    """The system prompt's text, whether a string or a list of text blocks."""
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "".join(str(b.get("text", "")) for b in system if isinstance(b, dict) and b.get("type") == "text")
    return ""


@dataclass
class ReplyRule:
    """A scripted answer: a request whose last user message or system prompt matches gets ``text``.

    ``pattern`` is a substring, or a compiled regular expression (``re.compile``) searched for. ``text``
    is the reply, or a function of the last user message that returns it. ``matched`` counts uses.
    """

    pattern: str | re.Pattern[str]
    text: str | Callable[[str], str]
    model: str | None = None
    matched: int = 0

    def _matches(self, model: str, user: str, system: str) -> bool:
        if self.model is not None and self.model != model:
            return False
        if isinstance(self.pattern, str):
            return self.pattern in user or self.pattern in system
        return self.pattern.search(user) is not None or self.pattern.search(system) is not None


class ReplyRules:
    """The reply-scripting half of :class:`~flask_claude.simulator.Simulator` (which inherits it).

    Rules are set-up, like the seed: ``reset()`` keeps them, ``clear_replies()`` drops them.
    """

    def __init__(self) -> None:
        self._rules_lock = threading.Lock()
        self._rules: list[ReplyRule] = []

    def reply(self, pattern: str | re.Pattern[str], text: str | Callable[[str], str], *,
              model: str | None = None) -> ReplyRule:
        """Answer requests whose last user message or system prompt contains ``pattern`` with ``text``.

        The reply is otherwise a normal one: usage counted from the prompt and the text, stop reason
        ``end_turn`` (``max_tokens`` and stop sequences still cut it, and ``truncate()`` still wins).
        The newest matching rule answers, so a test can override a rule its app set up; a prompt
        starting with ``echo:`` is still echoed.
        """
        if not isinstance(pattern, re.Pattern) and not (isinstance(pattern, str) and pattern):
            raise ValueError("pattern must be a non-empty string or a compiled regular expression")
        if not isinstance(text, str) and not callable(text):
            raise ValueError("text must be a string or a function of the user's message")
        rule = ReplyRule(pattern, text, model)
        with self._rules_lock:
            self._rules.append(rule)
        return rule

    @property
    def replies(self) -> list[ReplyRule]:
        """The reply rules, oldest first (the newest that matches answers)."""
        with self._rules_lock:
            return list(self._rules)

    @replies.setter
    def replies(self, rules: Sequence[ReplyRule]) -> None:
        """Put back a set of rules read earlier (``claude_sim`` does, around each test)."""
        with self._rules_lock:
            self._rules = list(rules)

    def clear_replies(self) -> None:
        with self._rules_lock:
            self._rules.clear()

    def _scripted_text(self, body: dict[str, Any], user: str) -> str | None:
        system = system_text(body.get("system"))
        with self._rules_lock:
            for rule in reversed(self._rules):
                if rule._matches(str(body.get("model")), user, system):
                    rule.matched += 1
                    break
            else:
                return None
        return rule.text if isinstance(rule.text, str) else str(rule.text(user))


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
