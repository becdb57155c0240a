"""The request pipeline of a decorated view, top to bottom (docs/guide.md: "How degradation works").

docs/ARCHITECTURE.md walks through it, the modules each step calls and where to add things.

1. scope: the feature spec and the user's key (``user_loader``, Flask-Login, or the remote address)
2. flags: the global switch, the feature's flag, the model flag or the LaunchDarkly AI Config (aiconfig.py)
3. admission: the request limits and the app-wide budgets' kill state, before the view by default
4. the view (sync or ``async def``), whose Claude calls are guarded by ``client.py`` under this scope
5. any guard error or upstream failure -> the feature's degradation response
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anthropic
import httpx2
from flask import Response, current_app, g, request

from .aiconfig import apply_ai_config
from .body import from_request_body
from .context import CallScope
from .degrade import degrade, remember
from .errors import ClaudeGuardError, FeatureDisabled, InvalidRequest, UpstreamUnavailable
from .flags import UserContext
from .state import state_for

if TYPE_CHECKING:
    from .decorators import ViewSpec
    from .extension import ClaudeState


def run(spec: ViewSpec, view: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Response:
    # The objects behind Flask's public proxies, looked up once here rather than at every use. Outside
    # a request, Flask's own "Working outside of request context" error.
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    req = request._get_current_object()  # type: ignore[attr-defined]
    state = state_for(app)
    feature = spec.feature
    rule = req.url_rule
    scope = CallScope(feature=feature.name if feature else None,
                      route=rule.rule if rule is not None else req.path)
    try:
        # 1. who is asking
        user = resolve_user(state, req)
        scope.user, scope.user_attributes = user.key, dict(user.attributes)
        if feature is not None:
            scope.max_tokens = feature.max_tokens
            scope.models = feature.models
            scope.max_input_chars = feature.max_input_chars
            scope.max_input_tokens = feature.max_input_tokens
            scope.require_complete = feature.require_complete
            scope.max_calls = feature.max_calls
            scope.downgrade_at = feature.downgrade_at
            scope.max_history_turns = feature.max_history_turns
            scope.validate = feature.validate

        # 2. flags: global switch, then the feature's own, then the budget's auto-kill
        settings = state.settings
        if not state.flags.enabled(settings.global_flag, user, settings.flag_default):
            raise FeatureDisabled(f"global flag {settings.global_flag!r} is off")
        if feature is not None:
            # An AI Config is the feature's switch in LaunchDarkly; its boolean flag then applies only if named.
            if (feature.ai_config is None or feature.flag) and \
                    not state.flags.enabled(feature.flag_name, user, settings.flag_default):
                raise FeatureDisabled(f"flag {feature.flag_name!r} is off")
            if feature.ai_config is not None:
                apply_ai_config(state, feature, user, scope)
            if feature.model_flag:
                first = state.flags.value(feature.model_flag, user, None)
                if isinstance(first, str) and first:
                    state.prices.price(first)  # a typo in a flag must not cost $0 or reach upstream
                    scope.first_model = first
        # 3. the request limits and the app-wide budgets' kill state. By default they are checked
        # before the view runs, so a refused request has no side effect; a feature that bounds its
        # input also holds its first call's worst case in that same round trip. The opt-in
        # "with_first_call" checks them with the first call's reservation instead (or right after a
        # view that made no call): one round trip fewer, for views without side effects.
        scope.budgets = spec.budget
        state.budgets.admit(scope, spec.budget)
        g.claude_scope = scope
        if settings.admission == "before_view":
            state.budgets.admit_before_view(scope)

        # 4. the view, its Claude calls guarded under this scope (an ``async def`` view too)
        try:
            response: Response = app.make_response((app.ensure_sync(view) if spec.is_async else view)(*args, **kwargs))
            if scope.admission is not None:
                state.budgets.finish_admission(scope)
        finally:
            state.budgets.release_unused(scope)
    except ClaudeGuardError as exc:
        return degrade(state, spec, scope, exc, args, kwargs)
    except (anthropic.APIError, httpx2.HTTPError) as exc:
        # The view used a raw SDK client; still no 500 and no upstream text in the body.
        return degrade(state, spec, scope, UpstreamUnavailable(type(exc).__name__), args, kwargs)
    except (RecursionError, ValueError) as exc:
        if not from_request_body(exc):
            raise  # the view's own bug: not ours to hide
        # request.json on a hostile body (nested too deep to parse): the client's mistake, a 400.
        return degrade(state, spec, scope, InvalidRequest(type(exc).__name__), args, kwargs)
    if spec.fallback is not None and spec.fallback.cache:
        remember(state, spec, scope, response, args, kwargs)
    if scope.rate_headers:
        headers = response.headers
        if _RATE_NAMES.isdisjoint(headers.keys(lower=True)):
            for name, value in scope.rate_headers.items():
                headers.add(name, value)  # ``update`` searches and validates each name
        else:
            headers.update(scope.rate_headers)
    return response


_RATE_NAMES = frozenset({"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"})


def resolve_user(state: ClaudeState, req: Any = None) -> UserContext:
    """The user's key: ``user_loader``, else Flask-Login's current user, else the remote address.

    Never a client-supplied header: that would let anyone pick whose limits they spend.
    """
    loader = state.extension._user_loader
    if loader is not None:
        value = loader()
        if isinstance(value, UserContext):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            return UserContext(None if value[0] is None else str(value[0]), dict(value[1] or {}))
        if isinstance(value, dict):
            attrs = dict(value)
            key = attrs.pop("key", None)
            return UserContext(None if key is None else str(key), attrs)
        if value is not None:
            return UserContext(str(value))
    if state.uses_flask_login is None:  # looked up once: an attribute miss on the app raises inside hasattr
        state.uses_flask_login = hasattr(state.app, "login_manager")
    if state.uses_flask_login:
        login_user = _flask_login_user()
        if login_user is not None:
            return UserContext(login_user)
    return UserContext((req if req is not None else request).remote_addr or "anonymous")


def _flask_login_user() -> str | None:
    try:
        from flask_login import current_user
    except ImportError:
        return None
    if getattr(current_user, "is_authenticated", False):
        ident = current_user.get_id()
        return None if ident is None else f"user:{ident}"
    return None
