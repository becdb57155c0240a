"""Flag providers: where the kill switches and rollouts of AI features come from.

Every provider answers the same two questions (``enabled`` and ``value``) so the request pipeline never
cares whether a flag lives in a dict, an environment variable or LaunchDarkly. All of them share one
rule: a provider that cannot answer returns the caller's default instead of raising, because a flag
lookup must never be the reason a request fails.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import ldclient
import ldclient.config
from ldclient import Context
from ldclient.integrations import Files
from loguru import logger

from . import process
from .errors import ConfigError
from .settings import FALSE_WORDS, TRUE_WORDS

__all__ = [
    "ANONYMOUS_KEY",
    "EnvFlags",
    "FlagProvider",
    "LaunchDarklyFlags",
    "StaticFlags",
    "UserContext",
    "flag_name",
    "make_provider",
]

#: The context key LaunchDarkly sees for a user without a key: an empty key is an invalid context
#: (the SDK would return the default for everyone), so anonymous users share this one.
ANONYMOUS_KEY = "anonymous"

_TRUE = TRUE_WORDS
_FALSE = FALSE_WORDS
# The kill switch is named for what it does when set, so "on" means AI is *off*.
_KILL_ENGAGED = TRUE_WORDS | {"killed", "disabled"}
_KILL_RELEASED = FALSE_WORDS | {""}
# Attributes that would silently change who the context is, not describe them.
_IDENTITY_ATTRIBUTES = frozenset({"key", "kind", "anonymous", "_meta"})


@dataclass(frozen=True)
class UserContext:
    """Who a flag is evaluated for; ``attributes`` feed targeting rules such as ``plan == "pro"``."""

    key: str | None
    attributes: Mapping[str, Any] = field(default_factory=dict)


class FlagProvider(Protocol):
    def enabled(self, flag: str, user: UserContext | None, default: bool) -> bool: ...

    def value(self, flag: str, user: UserContext | None, default: Any) -> Any: ...


def flag_name(feature: str) -> str:
    """The flag that switches the AI feature ``feature`` on and off."""
    return f"ai-{feature}"


def _parse_bool(raw: Any) -> bool | None:
    """A flag value read as a switch, or None when it is not one (the caller then uses its default)."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        word = raw.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    return None


class _Once:
    """Remembers which warnings this process already logged, so an outage logs one line, not one per request.

    Keys include the pid: a boolean would be copied into every forked worker, which would then stay silent.
    ``dict.setdefault`` is atomic in CPython, so no lock is needed (a lock held during a fork would be
    inherited locked by the child).
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[Any, ...], object] = {}

    def first(self, *key: Any) -> bool:
        token = object()
        return self._seen.setdefault(key, token) is token

    def seen(self, *key: Any) -> bool:
        return key in self._seen


class StaticFlags:
    """Flags held in a dict, for tests, development, and apps that flip switches from their own admin code.

    The provider keeps its own dict in ``values``: mutate it or call ``set``; the next call sees the change.
    """

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self.values: dict[str, Any] = dict(values or {})
        self._lock = threading.RLock()

    def set(self, flag: str, value: Any) -> None:
        with self._lock:
            self.values[flag] = value

    def enabled(self, flag: str, user: UserContext | None, default: bool) -> bool:
        with self._lock:
            raw = self.values.get(flag, default)
        parsed = _parse_bool(raw)
        return default if parsed is None else parsed

    def value(self, flag: str, user: UserContext | None, default: Any) -> Any:
        with self._lock:
            return self.values.get(flag, default)


class EnvFlags:
    """Flags from environment variables, read on every call so an operator's change acts on the next request.

    Flag ``ai-summarize`` is read from ``CLAUDE_FLAG_AI_SUMMARIZE`` (upper-cased, every non-alphanumeric
    character turned into ``_``); ``on/true/1/yes`` and ``off/false/0/no`` (any case) are understood, any
    other value or an unset variable gives the caller's default.

    The global flag (``global_flag``, default ``ai-enabled``) also honours ``AI_KILL_SWITCH``. The variable
    names a kill switch, so its values say whether the switch is *engaged*:

    * ``on``, ``true``, ``1``, ``yes``, ``killed``, ``disabled``: engaged, AI is OFF, whatever
      ``CLAUDE_FLAG_AI_ENABLED`` says;
    * ``off``, ``false``, ``0``, ``no``, empty or unset: not engaged; ``CLAUDE_FLAG_AI_ENABLED`` (for
      instance ``off``) and then the caller's default decide.

    Any other value is treated as not engaged and logged once. This deliberately differs from the
    JavaScript idiom ``AI_ENABLED = process.env.AI_KILL_SWITCH !== "off"``, which disables AI when the
    variable is merely unset.
    """

    KILL_SWITCH_VAR = "AI_KILL_SWITCH"

    def __init__(self, environ: Mapping[str, str] | None = None, *, global_flag: str = "ai-enabled") -> None:
        self._environ = environ
        self.global_flag = global_flag
        self._once = _Once()

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def variable(flag: str) -> str:
        """The environment variable that holds ``flag`` (a regex per flag read otherwise)."""
        return "CLAUDE_FLAG_" + re.sub(r"[^A-Za-z0-9]", "_", flag).upper()

    def _env(self) -> Mapping[str, str]:
        # Looked up at call time, not bound in __init__, so tests and operators can swap os.environ.
        return os.environ if self._environ is None else self._environ

    def kill_switch_engaged(self) -> bool:
        raw = self._env().get(self.KILL_SWITCH_VAR)
        if raw is None:
            return False
        word = raw.strip().lower()
        if word in _KILL_ENGAGED:
            return True
        if word not in _KILL_RELEASED and self._once.first(os.getpid(), "kill", word):
            logger.warning("{} has an unrecognised value; the kill switch is NOT engaged "
                           "(use on/true/1/yes/killed/disabled to engage it)", self.KILL_SWITCH_VAR)
        return False

    def enabled(self, flag: str, user: UserContext | None, default: bool) -> bool:
        if flag == self.global_flag and self.kill_switch_engaged():
            return False
        raw = self._env().get(self.variable(flag))
        if raw is None or not raw.strip():
            return default
        parsed = _parse_bool(raw)
        if parsed is None:
            if self._once.first(os.getpid(), "bool", flag):
                logger.warning("{} is not on/off/true/false/1/0/yes/no; using the default for flag {!r}",
                               self.variable(flag), flag)
            return default
        return parsed

    def value(self, flag: str, user: UserContext | None, default: Any) -> Any:
        """The variable parsed as JSON when it is JSON (numbers, true/false, quoted strings), else the raw text."""
        if flag == self.global_flag and self.kill_switch_engaged():
            return False
        raw = self._env().get(self.variable(flag))
        if raw is None:
            return default
        try:
            return json.loads(raw)
        except ValueError:
            return raw


class LaunchDarklyFlags:
    """Flags from LaunchDarkly through the official server SDK (``ldclient``).

    Pre-fork servers: the SDK runs on background threads, which a forked child does not inherit. So a
    client built from ``sdk_key`` (or ``config_factory``) is created lazily, on first use in each process,
    and rebuilt when the pid changes; a client handed in is re-initialised with ``client.postfork()``
    instead (gunicorn ``--preload`` then needs no ``post_fork`` hook of its own).

    When LaunchDarkly is unreachable the first use waits at most ``start_wait`` seconds, then every
    evaluation returns the caller's default and one warning is logged per process, not one per request.
    Evaluations are skipped (not sent to the SDK) until the client has data, which also keeps the SDK from
    logging its own warning on every call.
    """

    def __init__(self, client: ldclient.LDClient | None = None, *, sdk_key: str | None = None,
                 start_wait: float = 2.0,
                 config_factory: Callable[[], ldclient.config.Config] | None = None,
                 getpid: Callable[[], int] = process.pid) -> None:
        if client is not None and (sdk_key is not None or config_factory is not None):
            raise ConfigError("LaunchDarklyFlags takes either a client or an SDK key/config factory, not both")
        if client is None and not sdk_key and config_factory is None:
            raise ConfigError("LaunchDarklyFlags needs a client, an SDK key (CLAUDE_LAUNCHDARKLY_SDK_KEY) "
                              "or a config factory")
        self._sdk_key = sdk_key
        self._config_factory = config_factory
        self._start_wait = start_wait
        self._getpid = getpid
        self._owned = client is None
        self._client: ldclient.LDClient | None = client
        # The pid the current client is valid in; None until an owned client is built.
        self._pid: int | None = getpid() if client is not None else None
        self._locks: dict[int, threading.Lock] = {}
        self._once = _Once()
        self._closed = False

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, auto_update: bool = True, poll_interval: float = 0.25,
                  start_wait: float = 1.0) -> LaunchDarklyFlags:
        """Flags from a local LaunchDarkly flag file (JSON with ``flagValues`` and/or ``flags``), for development.

        With ``auto_update`` the SDK reloads the file when its modification time changes. Without the
        optional ``watchdog`` package (not a dependency) it polls the mtime every ``poll_interval`` seconds,
        so editing the file flips flags within about that long. Replace the file atomically (write a copy,
        then rename): a poll that catches a half-written file keeps the old flags and will not retry until
        the mtime changes again.
        """
        source = Files.new_data_source(paths=[os.fspath(path)], auto_update=auto_update,
                                       poll_interval=poll_interval)

        def config() -> ldclient.config.Config:
            return ldclient.config.Config("local-flag-file", update_processor_class=source, send_events=False,
                                          diagnostic_opt_out=True)

        return cls(config_factory=config, start_wait=start_wait)

    # -- the client of this process ---------------------------------------------------------------

    def _build(self) -> ldclient.LDClient:
        if self._config_factory is not None:
            config = self._config_factory()
        else:
            assert self._sdk_key is not None
            config = ldclient.config.Config(self._sdk_key)
        return ldclient.LDClient(config, start_wait=self._start_wait)

    def _current(self) -> ldclient.LDClient | None:
        """The client usable in this process: built on first use, re-initialised or rebuilt after a fork."""
        pid = self._getpid()
        client = self._client
        if client is not None and self._pid == pid:
            return client
        if self._closed:
            return None
        # One lock per pid: a lock held by another thread at fork time stays locked forever in the child.
        with self._locks.setdefault(pid, threading.Lock()):
            if self._client is not None and self._pid == pid:
                return self._client
            try:
                if self._owned:
                    # An inherited client is dropped, not closed: closing would join threads that do not
                    # exist in this process.
                    self._client = self._build()
                else:
                    assert self._client is not None
                    self._client.postfork(start_wait=self._start_wait)
            except Exception as exc:
                if self._once.first(pid, "build"):
                    logger.warning("LaunchDarkly client could not start ({}); flags use their defaults",
                                   type(exc).__name__)
                return None
            self._pid = pid
            return self._client

    def _ready_client(self) -> ldclient.LDClient | None:
        client = self._current()
        if client is None:
            return None
        pid = self._getpid()
        if not client.is_initialized():
            if self._once.first(pid, "not-ready"):
                logger.warning("LaunchDarkly is not initialised (unreachable or no data after {}s); every flag "
                               "returns its default until it connects", self._start_wait)
            return None
        if self._once.seen(pid, "not-ready") and self._once.first(pid, "recovered"):
            logger.info("LaunchDarkly is initialised; flags are live again")
        return client

    @staticmethod
    def context(user: UserContext | None) -> Context:
        """The LaunchDarkly context for ``user``; users without a key share one anonymous context."""
        if user is None or not user.key:
            builder = Context.builder(ANONYMOUS_KEY).kind("user").anonymous(True)
        else:
            builder = Context.builder(user.key).kind("user")
        for name, attribute in (user.attributes if user is not None else {}).items():
            if name not in _IDENTITY_ATTRIBUTES:
                builder.try_set(name, attribute)
        return builder.build()

    # -- FlagProvider -------------------------------------------------------------------------------

    def value(self, flag: str, user: UserContext | None, default: Any) -> Any:
        client = self._ready_client()
        if client is None:
            return default
        try:
            return client.variation(flag, self.context(user), default)
        except Exception as exc:  # the SDK catches its own errors; a flag must still never fail a request
            if self._once.first(self._getpid(), "error", flag):
                logger.warning("LaunchDarkly evaluation of {!r} failed ({}); using the default",
                               flag, type(exc).__name__)
            return default

    def enabled(self, flag: str, user: UserContext | None, default: bool) -> bool:
        result = self.value(flag, user, default)
        if isinstance(result, bool):
            return result
        if self._once.first(self._getpid(), "non-bool", flag):
            logger.warning("LaunchDarkly flag {!r} is not a boolean flag ({}); using the default",
                           flag, type(result).__name__)
        return default

    def close(self) -> None:
        """Stop the client this provider built; a client handed in belongs to the caller and stays open."""
        self._closed = True
        client, pid = self._client, self._pid
        if self._owned:
            self._client = None
            if client is not None and pid == self._getpid():
                client.close()  # type: ignore[no-untyped-call]  # the LaunchDarkly SDK is untyped


def make_provider(setting: Any, *, sdk_key: str | None, start_wait: float,
                  global_flag: str = "ai-enabled") -> FlagProvider:
    """The provider named by ``CLAUDE_FLAGS``: ``static``, ``env``, ``launchdarkly`` or a provider object."""
    if isinstance(setting, str):
        name = setting.strip().lower()
        if name == "static":
            return StaticFlags()
        if name == "env":
            return EnvFlags(global_flag=global_flag)
        if name == "launchdarkly":
            if not sdk_key:
                raise ConfigError("CLAUDE_FLAGS='launchdarkly' needs CLAUDE_LAUNCHDARKLY_SDK_KEY")
            return LaunchDarklyFlags(sdk_key=sdk_key, start_wait=start_wait)
        raise ConfigError(f"CLAUDE_FLAGS must be 'launchdarkly', 'env' or 'static', got {setting!r}")
    if all(callable(getattr(setting, method, None)) for method in ("enabled", "value")):
        provider: FlagProvider = setting
        return provider
    raise ConfigError("CLAUDE_FLAGS must be 'launchdarkly', 'env', 'static' or an object with enabled() and "
                      f"value() methods, got {setting!r}")
