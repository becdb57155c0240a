"""The scope of a Claude call: which feature, route and user it is made for.

The pipeline puts one ``CallScope`` in ``flask.g`` for a decorated view; a call made anywhere else
(a plain route, a CLI command, a background job inside an app context) gets a scope with just the
route, so every call is still logged and attributed as far as it can be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flask import g, has_app_context, has_request_context, request


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
    max_history_turns: int | None = None
    validate: Any = None
    budgets: Any = None
    calls: int = 0
    spend_usd: float = 0.0
    admission: Any = None  # (app-wide budgets, request limits) still to check: see Budgets.admit
    rate_headers: dict[str, str] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)
    ai_config: Any = None  # the request's LaunchDarkly AI Config (aiconfig.FeatureAIConfig), if the feature has one


def current_scope() -> CallScope:
    if has_app_context():
        scope = g.get("claude_scope")
        if scope is not None:
            return scope
    if has_request_context():
        rule = request.url_rule
        return CallScope(route=rule.rule if rule is not None else request.path)
    from .quart_support import quart_globals

    quart = quart_globals()  # a Quart view: Quart's contexts are not Flask's
    if quart is not None and quart.has_request_context():
        rule = quart.request.url_rule
        return CallScope(route=rule.rule if rule is not None else quart.request.path)
    return CallScope()
