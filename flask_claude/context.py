"""The scope of a Claude call: which feature, route and user it is made for.

The pipeline puts one ``CallScope`` in ``flask.g`` for a decorated view; a call made anywhere else
(a plain route, a CLI command, a background job inside an app context) gets a scope with just the
route, so every call is still logged and attributed as far as it can be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flask import g, has_app_context, has_request_context, request

from .errors import InvalidRequest
from .state import quart_globals
from .storage import Admission


@dataclass
class CallScope:
    feature: str | None = None
    route: str | None = None
    user: str | None = None
    user_attributes: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    models: tuple[str, ...] | None = None
    first_model: str | None = None
    max_input_chars: int | None = None
    max_input_tokens: int | None = None
    require_complete: bool = False
    max_calls: int | None = None
    downgrade_at: float | None = None  # ai_feature(downgrade_at=...): see downgrade.py
    max_history_turns: int | None = None
    validate: Any = None
    budgets: Any = None
    calls: int = 0
    admission: Admission | None = None  # what the request's first storage step still has to check
    rate_headers: dict[str, str] = field(default_factory=dict)
    memo: dict[Any, Any] = field(default_factory=dict)
    ai_config: Any = None  # the request's LaunchDarkly AI Config (aiconfig.FeatureAIConfig), if the feature has one


def max_tokens_cap(scope: CallScope, app_cap: int) -> int:
    """The largest ``max_tokens`` a call of this scope may ask: the app's cap, or the feature's if lower."""
    return min(app_cap, scope.max_tokens or app_cap)


def clamp_max_tokens(requested: Any, cap: int) -> int:
    """A call's ``max_tokens``: the cap when not given, never above it; a value that is not a whole
    number is the caller's mistake (``InvalidRequest``), not a reason to guess."""
    if requested is None:
        return cap
    if isinstance(requested, bool) or not isinstance(requested, int):
        raise InvalidRequest(f"max_tokens must be a whole number, got {type(requested).__name__}")
    return min(requested, cap)


def current_scope() -> CallScope:
    if has_app_context():
        scope = g.get("claude_scope")
        if scope is not None:
            return scope  # type: ignore[no-any-return]
    if has_request_context():
        rule = request.url_rule
        return CallScope(route=rule.rule if rule is not None else request.path)
    quart = quart_globals()  # a Quart view: Quart's contexts are not Flask's
    if quart is not None and quart.has_request_context():
        rule = quart.request.url_rule
        return CallScope(route=rule.rule if rule is not None else quart.request.path)
    return CallScope()
