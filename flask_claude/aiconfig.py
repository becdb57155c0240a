"""LaunchDarkly AI Configs: an AI feature's model, ``maxTokens`` and prompt served per user by LaunchDarkly,
and every guarded call measured back into it.

``ai_feature(name, ai_config="<key>")`` evaluates the AI Config once per request, in the pipeline's flags
step, for the same LaunchDarkly context as the feature's flags. Its on/off decides ``feature_disabled``, its
model becomes the first model of the chain (the configured fallbacks follow), its ``maxTokens`` lowers the
feature's cap (never raises it), and its messages are handed to the view as ``claude.ai_config``.

Each guarded call of the request then gets a tracker of its own (a LaunchDarkly "run": events of one call
share a ``runId``) that records duration, tokens, success or error and, for streams, time to first token
(``$ld:ai:*`` events), plus our cost in USD as the custom metric event ``flask-claude:cost-usd``, because
LaunchDarkly's ``TokenUsage`` has no cost and no cache tokens. Recording never fails a call: LaunchDarkly's
SDK queues events in memory and a failure here is logged once per process.

``launchdarkly-server-sdk-ai`` (import ``ldai``) is an optional dependency (extra ``launchdarkly-ai``),
imported on first use only.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loguru import logger

from .errors import ConfigError, FeatureDisabled
from .flags import LaunchDarklyFlags, UserContext

if TYPE_CHECKING:
    from .context import CallScope
    from .decorators import FeatureOptions
    from .extension import ClaudeState

__all__ = ["COST_EVENT", "AIRun", "FeatureAIConfig", "apply_ai_config"]

#: The custom event that carries a call's cost in USD (``metricValue``) to LaunchDarkly.
COST_EVENT = "flask-claude:cost-usd"

# Parameter names read as the output cap, LaunchDarkly's spelling first.
_MAX_TOKENS_PARAMETERS = ("maxTokens", "max_tokens")

_ai_clients: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_ai_clients_lock = threading.Lock()
_warned: dict[tuple[Any, ...], object] = {}


def _first(*key: Any) -> bool:
    """True the first time this process sees ``key``: one warning per process, not one per request."""
    token = object()
    return _warned.setdefault((os.getpid(), *key), token) is token


@dataclass(frozen=True)
class FeatureAIConfig:
    """The AI Config served for this request's user: what ``claude.ai_config`` returns in the view.

    ``source`` is ``"launchdarkly"`` when LaunchDarkly evaluated it (a key LaunchDarkly does not know
    also gives the default, with an empty ``variation_key``) and ``"default"`` when LaunchDarkly was not
    initialised, so the feature's default applied without asking it.
    """

    key: str
    enabled: bool
    model: str | None
    max_tokens: int | None
    messages: tuple[dict[str, str], ...] = ()
    variation_key: str = ""
    source: str = "launchdarkly"
    _tracker_factory: Callable[[], Any] | None = field(default=None, repr=False, compare=False)
    _client: Any = field(default=None, repr=False, compare=False)
    _context: Any = field(default=None, repr=False, compare=False)

    @property
    def system(self) -> str | None:
        """The system messages' text (joined by blank lines), for the Messages API's ``system=``."""
        parts = [m["content"] for m in self.messages if m["role"] == "system" and m["content"]]
        return "\n\n".join(parts) if parts else None

    @property
    def conversation(self) -> list[dict[str, str]]:
        """The user and assistant messages of the config: the Messages API takes the system prompt apart."""
        return [dict(m) for m in self.messages if m["role"] != "system"]

    def as_params(self, messages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """``system=`` and ``messages=`` for ``claude.messages.create(**config.as_params(messages), ...)``.

        The config's own user/assistant messages come first, then ``messages``. Model and ``max_tokens``
        are not included: the request already applies them to every guarded call.
        """
        params: dict[str, Any] = {"messages": [*self.conversation, *(messages or [])]}
        if self.system is not None:
            params["system"] = self.system
        return params


def _ldai() -> Any:
    try:
        import ldai
    except ImportError:
        raise ConfigError("ai_feature(ai_config=...) needs the LaunchDarkly AI SDK: "
                          "pip install 'flask-claude[launchdarkly-ai]'") from None
    return ldai


def _ai_client(client: Any) -> Any:
    """One ``LDAIClient`` per LaunchDarkly client (it reports itself to LaunchDarkly once, when built)."""
    with _ai_clients_lock:
        ai = _ai_clients.get(client)
        if ai is None:
            ai = _ai_clients[client] = _ldai().LDAIClient(client)
        return ai


def _max_tokens(model: Any, key: str) -> int | None:
    if model is None:
        return None
    for name in _MAX_TOKENS_PARAMETERS:
        value = model.get_parameter(name)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON from the LaunchDarkly UI may say 1024.0
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        if _first("max-tokens", key):
            logger.warning("AI Config {!r}: model parameter {} is not a positive whole number; the feature's "
                           "cap applies", key, name)
        return None
    return None


def _messages(raw: Any) -> tuple[dict[str, str], ...]:
    return tuple({"role": str(m.role), "content": str(m.content)} for m in raw or ())


def _token_meta(tracker: Any) -> dict[str, Any]:
    """The run's ids (runId, configKey, variationKey, version), read from the tracker's resumption token."""
    token = str(tracker.resumption_token)
    try:
        meta = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _render(template: str, variables: Mapping[str, Any]) -> str:
    import chevron  # ldai's own template engine, so a default renders exactly as a served config does

    return str(chevron.render(template, dict(variables)))


def evaluate(flags: Any, feature: FeatureOptions, user: UserContext, *, flag_default: bool,
             variables: Mapping[str, Any] | None = None) -> FeatureAIConfig:
    """The feature's AI Config for ``user``: from LaunchDarkly, or its default when LaunchDarkly cannot answer."""
    key = feature.ai_config
    assert key is not None
    if not isinstance(flags, LaunchDarklyFlags):
        raise ConfigError(f"ai_feature({feature.name!r}, ai_config={key!r}) needs the LaunchDarkly flag provider "
                          f"(CLAUDE_FLAGS='launchdarkly' or a LaunchDarklyFlags), not {type(flags).__name__}")
    ldai = _ldai()
    default = feature.ai_config_default
    if default is None:
        default = ldai.AICompletionConfigDefault(enabled=flag_default)
    elif not isinstance(default, ldai.AICompletionConfigDefault):
        raise ConfigError(f"ai_feature({feature.name!r}, ai_config_default=...) must be an "
                          f"ldai.AICompletionConfigDefault, got {type(default).__name__}")
    context = LaunchDarklyFlags.context(user)
    client = flags._ready_client()  # not initialised: the default, without an SDK warning per request
    if client is not None:
        try:
            served = _ai_client(client).completion_config(key, context, default, dict(variables or {}))
        except Exception as exc:  # like a flag, an AI Config lookup must never fail a request by itself
            if _first("error", key):
                logger.warning("LaunchDarkly AI Config {!r} could not be evaluated ({}); using its default",
                               key, type(exc).__name__)
        else:
            factory = served.create_tracker
            return FeatureAIConfig(
                key=key, enabled=bool(served.enabled), model=served.model.name if served.model else None,
                max_tokens=_max_tokens(served.model, key), messages=_messages(served.messages),
                variation_key=str(_token_meta(factory()).get("variationKey") or ""),
                _tracker_factory=factory, _client=client, _context=context)
    all_variables = {**(variables or {}), "ldctx": context.to_dict()}
    return FeatureAIConfig(
        key=key, enabled=bool(default.enabled), model=default.model.name if default.model else None,
        max_tokens=_max_tokens(default.model, key),
        messages=tuple({"role": m.role, "content": _render(m.content, all_variables)} for m in default.messages or ()),
        source="default")


def apply_ai_config(state: ClaudeState, feature: FeatureOptions, user: UserContext, scope: CallScope) -> None:
    """The pipeline's AI Config step: on/off, first model, ``maxTokens`` and the prompt, kept on the scope."""
    variables = feature.ai_config_variables() if feature.ai_config_variables is not None else None
    config = evaluate(state.flags, feature, user, flag_default=state.settings.flag_default, variables=variables)
    scope.ai_config = config
    if not config.enabled:
        raise FeatureDisabled(f"AI Config {config.key!r} is disabled")
    if config.model:
        state.prices.check([config.model])  # an unpriced model must not cost $0 or reach upstream
        scope.first_model = config.model
    if config.max_tokens is not None:
        scope.max_tokens = min(config.max_tokens, scope.max_tokens or config.max_tokens)


class AIRun:
    """One guarded call, measured into LaunchDarkly: one tracker, so its events share a ``runId``."""

    def __init__(self, config: FeatureAIConfig, tracker: Any, started: float) -> None:
        self._config = config
        self._tracker = tracker
        self._started = started
        self._first_token = False
        self._done = False

    @classmethod
    def start(cls, config: FeatureAIConfig | None, started: float) -> AIRun | None:
        """A run for a call under an AI Config served by LaunchDarkly; None otherwise (nothing to report)."""
        if config is None or config._tracker_factory is None:
            return None
        try:
            return cls(config, config._tracker_factory(), started)
        except Exception as exc:
            _report_failure(exc)
            return None

    def _elapsed_ms(self) -> int:
        return max(0, round((time.perf_counter() - self._started) * 1000))

    def first_token(self) -> None:
        """The first content of a stream arrived: LaunchDarkly's time to first token."""
        if self._first_token:
            return
        self._first_token = True
        try:
            self._tracker.track_time_to_first_token(self._elapsed_ms())
        except Exception as exc:
            _report_failure(exc)

    def finish(self, *, model: str, cost: Any, error: bool) -> None:
        """A call that got a reply (a broken stream included): duration, tokens, outcome and cost."""
        if self._done:
            return
        self._done = True
        try:
            tracker = self._tracker
            tracker.track_duration(self._elapsed_ms())
            prompt = cost.input_tokens + cost.cache_read_input_tokens + cost.cache_creation_input_tokens
            tracker.track_tokens(_ldai().tracker.TokenUsage(total=prompt + cost.output_tokens, input=prompt,
                                                            output=cost.output_tokens))
            tracker.track_error() if error else tracker.track_success()
            self._track_cost(model, float(cost.usd))
        except Exception as exc:
            _report_failure(exc)

    def fail(self) -> None:
        """A call that got no reply: duration and error, and a cost of $0 so cost per call stays comparable."""
        if self._done:
            return
        self._done = True
        try:
            self._tracker.track_duration(self._elapsed_ms())
            self._tracker.track_error()
            self._track_cost(None, 0.0)
        except Exception as exc:
            _report_failure(exc)

    def _track_cost(self, model: str | None, usd: float) -> None:
        meta = _token_meta(self._tracker)
        data = {"runId": meta.get("runId"), "configKey": self._config.key,
                "variationKey": meta.get("variationKey") or "", "version": meta.get("version"),
                "modelName": model}
        self._config._client.track(COST_EVENT, self._config._context, data, usd)


def _report_failure(exc: Exception) -> None:
    if _first("track", type(exc).__name__):
        logger.warning("LaunchDarkly AI Config metrics could not be recorded ({}); calls are unaffected",
                       type(exc).__name__)
