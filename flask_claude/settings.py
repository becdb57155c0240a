"""``CLAUDE_*`` config keys -> one validated, typed ``Settings`` object.

Everything a request needs is checked here, once, at ``init_app``: a wrong type or value raises
``ConfigError`` naming the key, so a typo fails the deploy instead of the first user's request.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

#: The words a switch is written with, in a setting, an environment variable or a flag (flags.py).
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS | {""}:
        return value.strip().lower() in TRUE_WORDS
    raise ConfigError(f"{key} must be a boolean (True/False), got {value!r}")


def _number(key: str, value: Any, *, minimum: float = 0.0, integer: bool = False,
            allow_zero: bool = True) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        raise ConfigError(f"{key} must be a {'whole ' if integer else ''}number, got {value!r}") from None
    if integer and isinstance(value, float) and value != int(value):
        raise ConfigError(f"{key} must be a whole number, got {value!r}")
    if number < minimum or (not allow_zero and number == 0):
        bound = f"greater than {minimum}" if not allow_zero else f"at least {minimum}"
        raise ConfigError(f"{key} must be {bound}, got {value!r}")
    return number


def _optional_str(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {type(value).__name__}")
    return value or None


def _models(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(m, str) and m for m in value):
        raise ConfigError(f"{key} must be a non-empty list of model ids, got {value!r}")
    return tuple(dict.fromkeys(value))


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return str(value)
    return parse


def _fractions(key: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} must be a list of fractions such as [0.5, 0.8, 1.0], got {value!r}")
    out = sorted({_number(key, v, allow_zero=False) for v in value})
    if any(v > 1.0 for v in out):
        raise ConfigError(f"{key} thresholds are fractions of the budget and must be <= 1.0, got {value!r}")
    return tuple(out)


def _mapping(key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a dict, got {type(value).__name__}")
    return dict(value)


def _usd_map(key: str, value: Any) -> dict[str, float]:
    return {str(k): _number(f"{key}[{k!r}]", v, allow_zero=True) for k, v in _mapping(key, value).items()}


def _optional_usd(key: str, value: Any) -> float | None:
    return None if value is None else _number(key, value)


def _callable_or_none(key: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise ConfigError(f"{key} must be a callable or None, got {value!r}")
    return value


def _optional(parse: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """``None`` (or ``""``, ``"none"``, ``"off"`` from the environment) switches the thing off."""
    def wrapped(key: str, value: Any) -> Any:
        off = value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off"))
        return None if off else parse(key, value)
    return wrapped


def _fraction(key: str, value: Any) -> float:
    number = _number(key, value, allow_zero=False)
    if number > 1:
        raise ConfigError(f"{key} must be a fraction in (0, 1], got {value!r}")
    return float(number)


def _prefix(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or (value.endswith("/") and value != "/"):
        raise ConfigError(f"{key} must be a URL path starting with '/' and not ending with one, such as "
                          f"'/claude', got {value!r}")
    return "" if value == "/" else value


def _any(key: str, value: Any) -> Any:
    return value


def _timezone(key: str, value: Any) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if not isinstance(value, str):
        raise ConfigError(f"{key} must be an IANA time zone name such as 'UTC', got {value!r}")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{key} is not a known time zone: {value!r}") from None
    return value


#: The storage URIs the store speaks: memory for one process, Redis (each deployment shape) for many.
REDIS_SCHEMES = ("redis", "rediss", "redis+unix", "unix", "redis+cluster", "redis+sentinel", "valkey", "valkeys",
                 "valkey+unix", "valkey+cluster", "valkey+sentinel")


def _storage_uri(key: str, value: Any) -> str:
    if not isinstance(value, str) or "://" not in value:
        raise ConfigError(f"{key} must be a storage URI such as 'memory://' or 'redis://host:6379', "
                          f"got {value!r}")
    scheme = value.split("://", 1)[0].lower()
    if scheme != "memory" and scheme not in REDIS_SCHEMES:
        raise ConfigError(f"{key} must be 'memory://' or a Redis URI ({', '.join(s + '://' for s in REDIS_SCHEMES)}); "
                          f"{scheme}:// is not supported")
    if scheme != "memory":
        import importlib.util

        if importlib.util.find_spec("valkey" if scheme.startswith("valkey") else "redis") is None:
            extra = "valkey" if scheme.startswith("valkey") else "redis"
            raise ConfigError(f"{key}={scheme}://... needs the {extra} client: "
                              f"pip install 'flask-claude[{extra}]'")
    return value


def _storage_options(key: str, value: Any) -> dict[str, Any]:
    """Handed to the Redis client as keyword arguments (TLS files, ``credential_provider``, keepalive,
    ``health_check_interval``, ``max_connections``), as Flask-Limiter's ``RATELIMIT_STORAGE_OPTIONS``."""
    options = _mapping(key, value)
    for name in options:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{key} keys must be the Redis client's keyword arguments, got {name!r}")
    return options


def _concurrency(key: str, value: Any) -> int | dict[str, int] | None:
    """One cap for every model, or a dict model -> cap (a model not in it is unlimited)."""
    if isinstance(value, Mapping):
        return {str(m): _number(f"{key}[{m!r}]", v, integer=True, minimum=1) for m, v in value.items()}
    return _optional(lambda k, v: _number(k, v, integer=True, minimum=1))(key, value)  # type: ignore[no-any-return]


def _setting(default: Any, parse: Callable[..., Any], env: str | None = None) -> Any:
    return field(default=default, metadata={"parse": parse, "env": env})


@dataclass(frozen=True)
class Settings:
    """Every ``CLAUDE_<NAME>`` key, as the attribute ``<name>`` lower-cased.

    The field list is the settings reference: docs/reference.md documents the same keys (a test
    holds the two together).
    """

    api_key: str | None = _setting(None, _optional_str, env="ANTHROPIC_API_KEY")
    base_url: str | None = _setting(None, _optional_str, env="ANTHROPIC_BASE_URL")
    simulate: bool = _setting(False, _bool)
    models: tuple[str, ...] = _setting(("claude-sonnet-4-6",), _models)
    max_tokens_cap: int = _setting(1024, lambda k, v: _number(k, v, integer=True, minimum=1))
    max_retries: int = _setting(4, lambda k, v: _number(k, v, integer=True))
    retry_after_cap: float = _setting(20.0, _number)
    deadline: float = _setting(60.0, lambda k, v: _number(k, v, allow_zero=False))
    connect_timeout: float = _setting(5.0, lambda k, v: _number(k, v, allow_zero=False))
    attempt_timeout: float = _setting(30.0, lambda k, v: _number(k, v, allow_zero=False))
    stream_deadline: float = _setting(600.0, lambda k, v: _number(k, v, allow_zero=False))
    admission: str = _setting("before_view", _choice("before_view", "with_first_call"))
    fallback_on_rate_limit: bool = _setting(False, _bool)
    pacing: str = _setting("wait", _choice("wait", "fallback", "off"))
    pacing_wait: float = _setting(10.0, _number)
    max_concurrency: int | dict[str, int] | None = _setting(None, _concurrency)
    prices: dict[str, Any] = _setting(None, _mapping)
    auto_cache: bool = _setting(True, _bool)
    log_path: str | None = _setting(None, _optional_str)
    log_content: bool = _setting(False, _bool)
    hash_users: bool = _setting(True, _bool)
    storage_uri: str = _setting("memory://", _storage_uri)
    storage_prefix: str = _setting("flask-claude", lambda k, v: _optional_str(k, v) or "flask-claude")
    hash_salt: str | None = _setting(None, _optional_str)
    storage_failure: str = _setting("open", _choice("open", "closed"))
    storage_socket_timeout: float = _setting(0.5, lambda k, v: _number(k, v, allow_zero=False))
    storage_retry_interval: float = _setting(2.0, lambda k, v: _number(k, v, allow_zero=False))
    storage_options: dict[str, Any] = _setting(None, _storage_options)
    settle_delay: float = _setting(0.05, lambda k, v: _number(k, v, allow_zero=False))
    breaker_min_calls: int = _setting(5, lambda k, v: _number(k, v, integer=True, minimum=1))
    breaker_failure_rate: float = _setting(0.5, lambda k, v: _number(k, v, allow_zero=False))
    breaker_window: float = _setting(30.0, lambda k, v: _number(k, v, allow_zero=False))
    breaker_cooldown: float = _setting(30.0, lambda k, v: _number(k, v, allow_zero=False))
    flags: Any = _setting("static", _any)
    global_flag: str = _setting("ai-enabled", lambda k, v: _optional_str(k, v) or "ai-enabled")
    flag_default: bool = _setting(True, _bool)
    launchdarkly_sdk_key: str | None = _setting(None, _optional_str, env="LAUNCHDARKLY_SDK_KEY")
    launchdarkly_start_wait: float = _setting(2.0, _number)
    daily_budget_usd: float | None = _setting(None, _optional_usd)
    feature_budgets_usd: dict[str, float] = _setting(None, _usd_map)
    budget_alerts: tuple[float, ...] = _setting((0.5, 0.8, 1.0), _fractions)
    budget_timezone: str = _setting("UTC", _timezone)
    budget_flag: str | None = _setting("ai-daily-budget-usd", _optional_str)
    budget_wait: float = _setting(2.0, _number)
    alert_hook: Callable[..., Any] | None = _setting(None, _callable_or_none)
    degraded_status: int = _setting(503, lambda k, v: _number(k, v, integer=True, minimum=400))
    rollup_retention: float = _setting(172800.0, lambda k, v: _number(k, v, minimum=3600))
    rollup_flush_interval: float = _setting(1.0, lambda k, v: _number(k, v))
    alert_window: float | None = _setting(300.0, _optional(lambda k, v: _number(k, v, minimum=60)))
    alert_error_rate: float | None = _setting(0.05, _optional(_fraction))
    alert_min_calls: int | None = _setting(20, _optional(lambda k, v: _number(k, v, integer=True, minimum=1)))
    alert_latency_p95: float | None = _setting(10.0, _optional(lambda k, v: _number(k, v, allow_zero=False)))
    alert_cost_spike: float | None = _setting(3.0, _optional(lambda k, v: _number(k, v, allow_zero=False)))
    alert_cost_spike_min_usd: float | None = _setting(1.0, _optional(_number))
    alert_eval_interval: float = _setting(5.0, lambda k, v: _number(k, v, allow_zero=False))
    dashboard: bool = _setting(False, _bool)
    dashboard_prefix: str = _setting("/claude", _prefix)

    def __post_init__(self) -> None:
        if self.alert_window is not None and self.alert_window > self.rollup_retention:
            raise ConfigError(f"CLAUDE_OPS_ALERTS['window'] ({self.alert_window:g} s) must not exceed "
                              f"CLAUDE_ROLLUP_RETENTION ({self.rollup_retention:g} s), which it is read from")
        if self.rollup_flush_interval > 60:  # past a minute, the alerts' shortest window would miss counts
            raise ConfigError(f"CLAUDE_ROLLUP_FLUSH_INTERVAL must be at most 60 s (the shortest alert window), "
                              f"got {self.rollup_flush_interval:g}")
        if self.breaker_failure_rate > 1:
            raise ConfigError("CLAUDE_BREAKER['failure_rate'] must be a fraction <= 1, "
                              f"got {self.breaker_failure_rate}")
        if not isinstance(self.flags, str) and not all(
            callable(getattr(self.flags, name, None)) for name in ("enabled", "value")
        ):
            raise ConfigError("CLAUDE_FLAGS must be 'launchdarkly', 'env', 'static' or an object with "
                              f"enabled() and value() methods, got {self.flags!r}")
        if isinstance(self.flags, str) and self.flags not in ("launchdarkly", "env", "static"):
            raise ConfigError(f"CLAUDE_FLAGS must be 'launchdarkly', 'env' or 'static', got {self.flags!r}")


#: Tuning knobs kept together under one key each, ``CLAUDE_BREAKER = {"min_calls": 5, ...}``: a user
#: holds two keys in their head instead of eleven. Each member is a ``Settings`` field; its old flat
#: key (``CLAUDE_BREAKER_MIN_CALLS``) still works for one release, with a DeprecationWarning.
GROUPS: dict[str, dict[str, str]] = {
    "CLAUDE_BREAKER": {"min_calls": "breaker_min_calls", "failure_rate": "breaker_failure_rate",
                       "window": "breaker_window", "cooldown": "breaker_cooldown"},
    "CLAUDE_OPS_ALERTS": {"window": "alert_window", "error_rate": "alert_error_rate",
                          "min_calls": "alert_min_calls", "latency_p95": "alert_latency_p95",
                          "cost_spike": "alert_cost_spike", "cost_spike_min_usd": "alert_cost_spike_min_usd",
                          "eval_interval": "alert_eval_interval"},
}
_GROUP_OF = {name: (group, member) for group, members in GROUPS.items() for member, name in members.items()}

#: Every key a user sets: the groups, and each field not in a group as ``CLAUDE_<NAME>``.
SETTING_KEYS = tuple([*(f"CLAUDE_{f.name.upper()}" for f in fields(Settings) if f.name not in _GROUP_OF), *GROUPS])

#: Settings that no longer do anything: accepted with a DeprecationWarning for one release.
DEPRECATED = {
    "CLAUDE_STORAGE_SPIN": "has no effect any more: Redis is reached through redis-py, and nothing busy-waits",
}
#: Flat keys now members of a group: still read, with a DeprecationWarning, for one release.
MOVED = {f"CLAUDE_{name.upper()}": (group, member) for name, (group, member) in _GROUP_OF.items()}


def _group(key: str, value: Any) -> dict[str, Any]:
    """A group's dict: only its own members, each checked with its field's rule afterwards."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a dict of {', '.join(GROUPS[key])}, got {type(value).__name__}")
    unknown = sorted(str(m) for m in value if m not in GROUPS[key])
    if unknown:
        raise ConfigError(f"{key} has unknown member(s) {', '.join(unknown)}; known: {', '.join(GROUPS[key])}")
    return dict(value)


def load_settings(config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Build ``Settings`` from a Flask config, constructor overrides and the environment.

    Precedence: ``Claude(app, models=[...])`` overrides, then ``app.config["CLAUDE_MODELS"]``, then
    the environment variable named for a few keys (``ANTHROPIC_API_KEY``...), then the default.
    An unknown ``CLAUDE_*`` key is refused: a misspelt budget key must not silently mean "no budget".
    """
    environ = os.environ if environ is None else environ
    overrides = dict(overrides or {})
    by_name = {f.name: f for f in fields(Settings)}
    for key, why in DEPRECATED.items():
        name = key.removeprefix("CLAUDE_").lower()
        if key in config or name in overrides:
            warnings.warn(f"{key} {why}; remove it", DeprecationWarning, stacklevel=3)
            overrides.pop(name, None)
    grouped = {group: _group(group, overrides.pop(group.removeprefix("CLAUDE_").lower(), None)
                             if group.removeprefix("CLAUDE_").lower() in overrides else config.get(group))
               for group in GROUPS}
    for key, (group, member) in MOVED.items():
        name = key.removeprefix("CLAUDE_").lower()
        if key in config or name in overrides:
            warnings.warn(f"{key} is deprecated: set {group} = {{{member!r}: ...}} instead", DeprecationWarning,
                          stacklevel=3)
    unknown_override = sorted(set(overrides) - set(by_name))
    if unknown_override:
        raise ConfigError(f"Unknown Claude() argument(s): {', '.join(unknown_override)}")
    unknown = sorted(k for k in config if k.startswith("CLAUDE_") and k not in SETTING_KEYS and k not in DEPRECATED
                     and k not in MOVED)
    if unknown:
        raise ConfigError(f"Unknown setting(s): {', '.join(unknown)}. Known settings: {', '.join(SETTING_KEYS)}")

    values: dict[str, Any] = {}
    for name, f in by_name.items():
        key = f"CLAUDE_{name.upper()}"
        group, member = _GROUP_OF.get(name, ("", ""))
        if name in overrides:
            raw = overrides[name]
        elif group and member in grouped[group]:
            key, raw = f"{group}[{member!r}]", grouped[group][member]
        elif key in config:
            raw = config[key]
        elif f.metadata["env"] and environ.get(f.metadata["env"]):
            raw = environ[f.metadata["env"]]
        else:
            raw = f.default
        values[name] = f.metadata["parse"](key, raw)
    return Settings(**values)
