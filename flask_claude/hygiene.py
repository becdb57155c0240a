"""Request hygiene: prompt caching, history pruning, untrusted content, and output checks.

Each function answers a line of the production checklists: cache stable prefixes, bound the
conversation, keep user-supplied text apart from instructions, validate output before showing it.
"""

from __future__ import annotations

import html
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from .tokens import estimate_tokens, prompt_texts

CACHE_MIN_TOKENS = 1024  # below this the API does not cache a prefix (Sonnet/Opus minimum)


def has_cache_control(value: Any) -> bool:
    """Whether any block of a request (or part of one) carries ``cache_control``."""
    if isinstance(value, Mapping):
        return "cache_control" in value or any(has_cache_control(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(has_cache_control(v) for v in value)
    return False


def with_auto_cache(params: dict[str, Any], *, min_tokens: int = CACHE_MIN_TOKENS) -> dict[str, Any]:
    """Mark a long system prompt as a cache breakpoint, once, unless the caller placed their own.

    The token count is a local estimate (no ``count_tokens`` round trip per call); marking a prompt
    a little under the API's minimum is harmless, the API then simply does not cache it.
    """
    system = params.get("system")
    if not system or has_cache_control(params.get("system")) or has_cache_control(params.get("messages")) \
            or has_cache_control(params.get("tools")) or "cache_control" in params:
        return params
    if sum(estimate_tokens(t) for t in prompt_texts({"system": system})) < min_tokens:
        return params
    if isinstance(system, str):
        blocks: list[Any] = [{"type": "text", "text": system}]
    else:
        blocks = [dict(b) if isinstance(b, Mapping) else b for b in system]
    if not blocks or not isinstance(blocks[-1], dict):
        return params
    blocks[-1] = {**blocks[-1], "cache_control": {"type": "ephemeral"}}
    return {**params, "system": blocks}


def _content_blocks(message: Mapping[str, Any]) -> list[Any]:
    content = message.get("content")
    return content if isinstance(content, list) else []


def _block_types(message: Mapping[str, Any]) -> set[Any]:
    return {b.get("type") for b in _content_blocks(message) if isinstance(b, Mapping)}


def _message_tokens(message: Mapping[str, Any]) -> int:
    return 4 + sum(estimate_tokens(t) for t in prompt_texts({"messages": [message]}))


def prune_history(messages: Sequence[Mapping[str, Any]], *, max_turns: int | None = None,
                  max_tokens: int | None = None) -> list[Mapping[str, Any]]:
    """Keep the newest messages within ``max_turns`` messages and ``max_tokens`` (estimated).

    The kept history never starts with an assistant turn (the API refuses it) and never separates
    an assistant ``tool_use`` from the user ``tool_result`` that answers it: a cut that would land
    inside such a pair moves forward past it. The newest message is always kept.
    """
    if max_turns is not None and max_turns < 1:
        raise ValueError("prune_history: max_turns must be at least 1")
    items = list(messages)
    if not items:
        return []
    start = len(items) - 1  # the newest message always stays
    used = _message_tokens(items[start])
    while start > 0:
        candidate = items[start - 1]
        if max_turns is not None and len(items) - (start - 1) > max_turns:
            break
        cost = _message_tokens(candidate)
        if max_tokens is not None and used + cost > max_tokens:
            break
        used += cost
        start -= 1
    # Move the cut forward until the kept history is valid.
    while start < len(items) - 1:
        first = items[start]
        if first.get("role") != "user":
            start += 1
            continue
        if "tool_result" in _block_types(first):
            start += 1  # its tool_use was cut off
            continue
        break
    return items[start:]


def user_content(text: str, *, tag: str = "user_content") -> str:
    """Wrap untrusted text in a tagged block the text itself cannot close.

    Angle brackets and ampersands in the text are escaped, so ``</user_content>`` inside it is
    just characters; a random nonce in the tag makes the real boundary unguessable as well. Tell the
    model in the system prompt that text inside the tag is data, not instructions.
    """
    if not tag.replace("_", "").replace("-", "").isalnum():
        raise ValueError("user_content: the tag must be letters, digits, '-' or '_'")
    nonce = secrets.token_hex(4)
    return f'<{tag} id="{nonce}">\n{html.escape(text, quote=False)}\n</{tag} id="{nonce}">'


def check_output(validate: Any, message: Any) -> str | None:
    """Run a feature's ``validate=``: None when the reply is acceptable, else the reason why not.

    ``validate`` is a pydantic model class (the reply text must parse as JSON of that model) or a
    callable taking the SDK ``Message`` and returning truthy/None for good, False for bad, or
    raising ``ValueError`` with the reason.
    """
    text = "".join(getattr(block, "text", "") for block in getattr(message, "content", None) or [])
    validate_json = getattr(validate, "model_validate_json", None)
    if callable(validate_json):
        try:
            validate_json(text)
        except Exception as exc:  # pydantic.ValidationError, without importing pydantic
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return None
    try:
        verdict = validate(message)
    except Exception as exc:  # a validator that breaks on a strange reply has rejected it
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return "validator returned False" if verdict is False else None
