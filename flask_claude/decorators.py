"""``ai_feature``, ``budgeted``, ``fallback_to``: each attaches its part of one spec to the view.

The first of them to wrap a view installs the single wrapper that runs the pipeline; the others
find that wrapper and fill in their part of its spec. So the three can be stacked in any order with
the same behaviour, and each is usable alone. They find the extension through ``current_app`` at
request time (as Flask-Login's ``login_required`` does), so they work in blueprints, class-based
views and app factories.

They are typed with ``ParamSpec``: a decorated view keeps its parameters for the type checker, and
returns the Flask ``Response`` the pipeline built (the view's own return value, or the fallback).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec

from flask import has_app_context
from limits import RateLimitItem, parse_many

from .errors import ConfigError
from .pipeline import run

if TYPE_CHECKING:
    from flask import Response

P = ParamSpec("P")
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
    downgrade_at: float | None = None  # fraction of the applicable budget past which the chain steps down

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
    is_async: bool = False  # an ``async def`` view: run through ``app.ensure_sync`` (sync views are called as is)


def _spec_of(view: Callable[P, Any]) -> tuple[ViewSpec, Callable[P, Response]]:
    """The view's spec and its pipeline wrapper, creating both on first use."""
    spec: ViewSpec | None = getattr(view, _SPEC_ATTR, None)
    if spec is not None:
        return spec, view  # already the wrapper: another of the three decorators came first
    spec = ViewSpec(is_async=inspect.iscoroutinefunction(view))

    @functools.wraps(view)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Response:
        if not has_app_context():  # e.g. a Quart view: see quart_support.py for why, and what works there
            raise ConfigError("flask-claude's decorators work on Flask apps only; on Quart, call "
                              "claude.async_messages in the view and answer the fallback yourself")
        return run(spec, view, args, kwargs)

    setattr(wrapper, _SPEC_ATTR, spec)
    return spec, wrapper


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
               ai_config_default: Any = None, ai_config_variables: Callable[[], Mapping[str, Any]] | None = None,
               downgrade_at: float | None = None) -> Callable[[Callable[P, Any]], Callable[P, Response]]:
    """Mark a view as the AI feature ``name``: kill switch, attribution, caps and output checks.

    Every option is checked here, at import time, so a typo fails the deploy and not a request.
    docs/guide.md ("The decorators") has the same table with examples.

    :param name: the feature's name: the ``feature`` field of every log line, metric and budget key.
    :param flag: the feature's on/off flag (default ``ai-<name>``); off degrades with ``feature_disabled``.
    :param max_tokens: cap for every call of the feature (default ``CLAUDE_MAX_TOKENS_CAP``); a larger
        request is clamped and logged as ``max_tokens_clamped_from``, a call without one gets it.
    :param models: the feature's model chain, first model then fallbacks (default ``CLAUDE_MODELS``).
    :param max_input_chars: characters of a call's ``messages`` (what callers send, not the system
        prompt or tools); more answers 413 ``input_too_large`` before any call. Bounding the input
        also lets the admission hold the first call's worst case in the same round trip.
    :param max_input_tokens: the same on a local estimate (3 characters a token).
    :param require_complete: a reply that stopped at ``max_tokens`` degrades with ``truncated``, a
        ``refusal`` or context-window stop with its own reason, instead of reaching the user.
    :param model_flag: a string flag whose value is the first model, per user (rolling out a new
        model version); it outranks the code's ``model=``. An unpriced value degrades ``unknown_model``.
    :param max_calls: more than this many Claude calls in one request degrades with
        ``max_calls_exceeded`` (a runaway agent loop is the most common cost incident).
    :param max_history_turns: keep only the newest N messages of every call (``prune_history``).
    :param validate: a pydantic model class the reply text must parse as, or a callable taking the
        ``Message`` (return ``False`` or raise ``ValueError`` to reject); a rejected reply degrades
        with ``invalid_output``. Checked on non-streaming calls only.
    :param ai_config: a LaunchDarkly AI Config key (``aiconfig.py``): per user, the feature's on/off,
        first model, ``maxTokens`` and prompt (``claude.ai_config`` in the view); not with ``model_flag``.
    :param ai_config_default: an ``ldai.AICompletionConfigDefault`` for when LaunchDarkly cannot answer.
    :param ai_config_variables: a callable, run in the request, returning the variables of the
        config's message templates.
    :param downgrade_at: a fraction in (0, 1]: once the budget that applies to a call (the user's USD
        budget, else the feature's, else the global) is spent past it, the call's chain starts at its
        next cheaper model (``downgrade.py``; logged as ``model_downgraded``).
    :raises ConfigError: an option of the wrong type or range.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("ai_feature() needs a feature name such as 'summarize'")
    if downgrade_at is not None and (isinstance(downgrade_at, bool) or not isinstance(downgrade_at, (int, float))
                                     or not 0 < downgrade_at <= 1):
        raise ConfigError(f"ai_feature({name!r}, downgrade_at=...) must be a fraction in (0, 1], got {downgrade_at!r}")
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
        ai_config=ai_config, ai_config_default=ai_config_default, ai_config_variables=ai_config_variables,
        downgrade_at=None if downgrade_at is None else float(downgrade_at))

    def decorate(view: Callable[P, Any]) -> Callable[P, Response]:
        spec, wrapper = _spec_of(view)
        spec.feature = options
        return wrapper

    return decorate


# The periods a dollar budget can have; their lengths and calendar bounds are ``budget.period_bounds``'s.
_USD_PERIODS = ("second", "minute", "hour", "day", "month")


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
             per: str | Callable[[], str] = "user") -> Callable[[Callable[P, Any]], Callable[P, Response]]:
    """Request limits and token and dollar budgets, per user (or per feature, global, a custom key).

    A budget is a reservation: each call holds its worst case (input bound + ``max_tokens`` at the
    dearest model of its chain) and settles to the real cost, so concurrent calls never pass it.

    :param requests: request limits as a ``limits`` string (``"20/minute;500/day"``, sliding window);
        over it the route answers 429 ``rate_limited`` with ``Retry-After`` and ``RateLimit-*`` headers.
    :param tokens: token budgets (``"200000/day"``), calendar periods in ``CLAUDE_BUDGET_TIMEZONE``.
    :param usd: dollar budgets (``"1.00/day;20/month"``; a bare number means per day; periods
        second, minute, hour, day, month).
    :param per: whose limits: ``"user"`` (the default, from ``user_loader``), ``"feature"``,
        ``"global"``, or a callable returning a key (hashed before it reaches storage or a log).
    :raises ConfigError: a limit string that does not parse, or a limit below 1.
    """
    if per not in ("user", "feature", "global") and not callable(per):
        raise ConfigError(f"budgeted(per=...) must be 'user', 'feature', 'global' or a callable, got {per!r}")
    options = BudgetOptions(requests=_parse_limits("requests", requests), tokens=_parse_limits("tokens", tokens),
                            usd=_parse_usd(usd) if usd is not None else [], per=per)

    def decorate(view: Callable[P, Any]) -> Callable[P, Response]:
        spec, wrapper = _spec_of(view)
        spec.budget = options
        return wrapper

    return decorate


def fallback_to(response_or_callable: Any = None, *, status: int = 503, cache: bool = False,
                cache_ttl: float = 300.0) -> Callable[[Callable[P, Any]], Callable[P, Response]]:
    """What the route answers when it degrades: a static body, a non-AI callable, or the cache.

    Client-caused refusals (400, 413, 429) keep their own status and message; every other
    degradation answers this, with ``X-Claude-Degraded: <reason>``.

    :param response_or_callable: a dict or list (sent as JSON), a string or ``Response`` (sent as
        is), or a callable that gets the view's arguments (your non-AI path; may be ``async def``).
    :param status: the HTTP status of the fallback answer (default 503).
    :param cache: serve the last good (2xx, non-streamed) response of this route for the same
        arguments, query, body and user, before the static body; per process. Not served when the
        feature's flag is off: a kill switch turns cached AI answers off too.
    :param cache_ttl: how many seconds a cached response stays servable (on the app's clock).
    :raises ConfigError: a status outside 200-599, or neither a response nor ``cache=True``.
    """
    if not isinstance(status, int) or not 200 <= status <= 599:
        raise ConfigError(f"fallback_to(status=...) must be an HTTP status, got {status!r}")
    if response_or_callable is None and not cache:
        raise ConfigError("fallback_to() needs a response, a callable, or cache=True")
    options = FallbackOptions(response=response_or_callable, status=status, cache=cache,
                              cache_ttl=float(cache_ttl))

    def decorate(view: Callable[P, Any]) -> Callable[P, Response]:
        spec, wrapper = _spec_of(view)
        spec.fallback = options
        return wrapper

    return decorate
