"""``ai_feature``, ``budgeted``, ``fallback_to``: each attaches its part of one spec to the view.

The first of them to wrap a view installs the single wrapper that runs the pipeline; the others
find that wrapper and fill in their part of its spec. So the three can be stacked in any order with
the same behaviour, and each is usable alone. They find the extension through ``current_app`` at
request time (as Flask-Login's ``login_required`` does), so they work in blueprints, class-based
views and app factories.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from limits import RateLimitItem, parse_many

from .errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
_SPEC_ATTR = "__claude_spec__"


@dataclass
class FeatureOptions:
    name: str
    flag: str | None = None
    max_tokens: int | None = None
    models: tuple[str, ...] | None = None
    max_input_chars: int | None = None
    max_input_tokens: int | None = None
    require_complete: bool = False
    model_flag: str | None = None
    max_calls: int | None = None
    max_history_turns: int | None = None
    validate: Any = None
    ai_config: str | None = None  # a LaunchDarkly AI Config key: see aiconfig.py
    ai_config_default: Any = None  # an ldai.AICompletionConfigDefault, for when LaunchDarkly cannot answer
    ai_config_variables: Callable[[], Mapping[str, Any]] | None = None

    @property
    def flag_name(self) -> str:
        return self.flag or f"ai-{self.name}"


@dataclass
class BudgetOptions:
    requests: list[RateLimitItem] = field(default_factory=list)
    tokens: list[RateLimitItem] = field(default_factory=list)
    usd: list[tuple[float, str]] = field(default_factory=list)  # (amount, "day" | "hour" | ...)
    per: str | Callable[[], str] = "user"


@dataclass
class FallbackOptions:
    response: Any = None
    status: int = 503
    cache: bool = False
    cache_ttl: float = 300.0


@dataclass
class ViewSpec:
    feature: FeatureOptions | None = None
    budget: BudgetOptions | None = None
    fallback: FallbackOptions | None = None


def _spec_of(view: F) -> tuple[ViewSpec, F]:
    """The view's spec and its pipeline wrapper, creating both on first use."""
    spec: ViewSpec | None = getattr(view, _SPEC_ATTR, None)
    if spec is not None:
        return spec, view
    spec = ViewSpec()

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from flask import has_app_context

        from .pipeline import run

        if not has_app_context():  # e.g. a Quart view: see quart_support.py for why, and what works there
            raise ConfigError("flask-claude's decorators work on Flask apps only; on Quart, call "
                              "claude.async_messages in the view and answer the fallback yourself")
        return run(spec, view, args, kwargs)

    setattr(wrapper, _SPEC_ATTR, spec)
    return spec, wrapper  # type: ignore[return-value]


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive whole number, got {value!r}")
    return value


def ai_feature(name: str, *, flag: str | None = None, max_tokens: int | None = None,
               models: list[str] | tuple[str, ...] | None = None, max_input_chars: int | None = None,
               max_input_tokens: int | None = None, require_complete: bool = False,
               model_flag: str | None = None, max_calls: int | None = None,
               max_history_turns: int | None = None, validate: Any = None, ai_config: str | None = None,
               ai_config_default: Any = None,
               ai_config_variables: Callable[[], Mapping[str, Any]] | None = None) -> Callable[[F], F]:
    """Mark a view as the AI feature ``name``: kill switch (flag ``ai-<name>``), attribution, caps.

    ``models`` is this feature's fallback chain (default ``CLAUDE_MODELS``); ``model_flag`` names a
    string flag whose value picks the first model per user (rolling out a new model version);
    ``require_complete`` turns a ``max_tokens`` stop into a degradation. ``ai_config`` names a LaunchDarkly
    AI Config that serves the feature's on/off, first model, ``maxTokens`` and prompt per user
    (``ai_config_default`` when LaunchDarkly cannot answer, ``ai_config_variables()`` for its templates).
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("ai_feature() needs a feature name such as 'summarize'")
    if ai_config is not None and (not isinstance(ai_config, str) or not ai_config):
        raise ConfigError(f"ai_feature({name!r}, ai_config=...) must be an AI Config key, got {ai_config!r}")
    if ai_config and model_flag:
        raise ConfigError(f"ai_feature({name!r}) takes ai_config or model_flag, not both: each picks the model")
    if (ai_config_default is not None or ai_config_variables is not None) and not ai_config:
        raise ConfigError(f"ai_feature({name!r}): ai_config_default and ai_config_variables need ai_config")
    if ai_config_variables is not None and not callable(ai_config_variables):
        raise ConfigError(f"ai_feature({name!r}, ai_config_variables=...) must be a callable returning a dict")
    options = FeatureOptions(
        name=name, flag=flag, max_tokens=_positive_int("max_tokens", max_tokens),
        models=tuple(models) if models else None,
        max_input_chars=_positive_int("max_input_chars", max_input_chars),
        max_input_tokens=_positive_int("max_input_tokens", max_input_tokens),
        require_complete=bool(require_complete), model_flag=model_flag,
        max_calls=_positive_int("max_calls", max_calls),
        max_history_turns=_positive_int("max_history_turns", max_history_turns), validate=validate,
        ai_config=ai_config, ai_config_default=ai_config_default, ai_config_variables=ai_config_variables)

    def decorate(view: F) -> F:
        spec, wrapper = _spec_of(view)
        spec.feature = options
        return wrapper

    return decorate


_USD_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": 86400 * 31}


def _parse_usd(value: str | float) -> list[tuple[float, str]]:
    """``"1.00/day;20/month"`` -> [(1.0, "day"), (20.0, "month")]; a bare number means per day."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(float(value), "day")]
    out = []
    for part in str(value).split(";"):
        amount, _, period = part.strip().partition("/")
        period = (period.strip() or "day").removeprefix("1 ").strip().rstrip("s")
        try:
            usd = float(amount.strip().lstrip("$"))
        except ValueError:
            raise ConfigError(f"budgeted(usd=...) must look like '1.00/day', got {value!r}") from None
        if usd < 0 or period not in _USD_PERIODS:
            raise ConfigError(f"budgeted(usd=...) must look like '1.00/day' with a period among "
                              f"{', '.join(_USD_PERIODS)}, got {value!r}")
        out.append((usd, period))
    return out


def _parse_limits(name: str, value: str | None) -> list[RateLimitItem]:
    if value is None:
        return []
    try:
        items = list(parse_many(value))
    except ValueError:
        raise ConfigError(f"budgeted({name}=...) must be a limits string such as '20/minute' or "
                          f"'20/minute;500/day', got {value!r}") from None
    if any(item.amount < 1 for item in items):
        raise ConfigError(f"budgeted({name}=...) limits must allow at least 1, got {value!r}; "
                          "to switch a feature off, use its flag")
    return items


def budgeted(*, requests: str | None = None, tokens: str | None = None, usd: str | float | None = None,
             per: str | Callable[[], str] = "user") -> Callable[[F], F]:
    """Per-user (or per-feature, global, custom key) request limits and token and dollar budgets."""
    if per not in ("user", "feature", "global") and not callable(per):
        raise ConfigError(f"budgeted(per=...) must be 'user', 'feature', 'global' or a callable, got {per!r}")
    options = BudgetOptions(requests=_parse_limits("requests", requests), tokens=_parse_limits("tokens", tokens),
                            usd=_parse_usd(usd) if usd is not None else [], per=per)

    def decorate(view: F) -> F:
        spec, wrapper = _spec_of(view)
        spec.budget = options
        return wrapper

    return decorate


def fallback_to(response_or_callable: Any = None, *, status: int = 503, cache: bool = False,
                cache_ttl: float = 300.0) -> Callable[[F], F]:
    """What the route answers when it degrades: a static body, a non-AI callable, or the cache.

    A callable gets the view's arguments. With ``cache=True`` the last good response of this route
    for the same arguments and user is served while fresher than ``cache_ttl`` seconds.
    """
    if not isinstance(status, int) or not 200 <= status <= 599:
        raise ConfigError(f"fallback_to(status=...) must be an HTTP status, got {status!r}")
    if response_or_callable is None and not cache:
        raise ConfigError("fallback_to() needs a response, a callable, or cache=True")
    options = FallbackOptions(response=response_or_callable, status=status, cache=cache,
                              cache_ttl=float(cache_ttl))

    def decorate(view: F) -> F:
        spec, wrapper = _spec_of(view)
        spec.fallback = options
        return wrapper

    return decorate
