"""``Claude``: the extension object, and ``ClaudeState``, everything one app needs at request time.

Per-app state lives in ``app.extensions["claude"]`` and never on the ``Claude`` object, so one
``Claude()`` serves several apps (factories, tests) without one app's settings leaking into another;
the object itself only keeps code the app registered on it (``user_loader``) and constructor
overrides. docs/ARCHITECTURE.md shows how a request flows through the objects built here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
from flask import Flask

from . import telemetry
from .aiconfig import FeatureAIConfig
from .aio import AsyncGuardedMessages
from .alerts import OpsAlerts
from .budget import Budgets
from .cli import claude_cli
from .client import GuardedMessages
from .clock import Clock, SystemClock
from .context import current_scope
from .dashboard import register_dashboard
from .decorators import ai_feature, budgeted, fallback_to
from .degrade import ResponseCache, handle_guard_error
from .errors import ClaudeGuardError, ConfigError
from .events import EventLog
from .flags import make_provider
from .pacing import Pacer
from .pricing import PriceTable
from .prometheus import metrics_response
from .quart_support import handle_guard_error as handle_on_quart
from .resilience import CircuitBreaker, DeadlineTransport, RetryPolicy
from .rollups import AppRollups
from .runner import CallRunner
from .settings import Settings, load_settings
from .simulator import Simulator
from .state import EXTENSION_KEY, current_app_or_none, is_quart_app, state_for
from .storage import BreakerParams, MemoryStore, OutageGuard, Store, make_store

SIMULATOR_BASE_URL = "http://simulator.flask-claude.invalid"

# Constructor arguments that are objects rather than settings (tests and advanced wiring).
_OBJECT_OVERRIDES = ("simulator", "http_transport", "clock")


def _network_transport() -> httpx2.HTTPTransport:
    """The SDK's own connection limits (1,000 connections), not httpx's default of 100: a Claude
    call lasts seconds, so one process easily has more than 100 in flight (a gthread or gevent
    worker), and the 101st would wait for a connection, not for Claude."""
    return httpx2.HTTPTransport(limits=anthropic.DEFAULT_CONNECTION_LIMITS)


class ClaudeState:
    """One app's settings and live objects: the SDK client, breaker, price table, event log."""

    def __init__(self, app: Flask, settings: Settings, extension: Claude, *, simulator: Any = None,
                 http_transport: httpx2.BaseTransport | None = None, clock: Clock | None = None) -> None:
        self.app = app
        self.settings = settings
        self.extension = extension
        self.uses_flask_login: bool | None = None  # whether the app has a LoginManager, seen at its first request
        self.clock: Clock = clock or SystemClock()
        self.prices = PriceTable(settings.prices, clock=self.clock)  # a call is priced at its own time
        self.prices.check(settings.models)  # an unpriced model fails the deploy, not a request

        if settings.simulate or simulator is not None:
            self.simulator = simulator if simulator is not None else Simulator()
            inner: httpx2.BaseTransport = self.simulator.transport()
            api_key: str = "sk-simulator-no-real-key"
            base_url: str | None = settings.base_url or SIMULATOR_BASE_URL
            if settings.base_url:  # a loopback simulator server (`flask claude simulate`)
                inner = http_transport or _network_transport()
        else:
            if not settings.api_key:
                raise ConfigError(
                    "No Anthropic API key: set CLAUDE_API_KEY (or the ANTHROPIC_API_KEY environment "
                    "variable), or set CLAUDE_SIMULATE=True to run on the offline simulator in "
                    "development and tests.")
            self.simulator = None
            inner = http_transport or _network_transport()
            api_key, base_url = settings.api_key, settings.base_url
        # What the async client (``aio.py``) builds one SDK client per event loop from: the same key and
        # URL, and a transport that is loop-free (the in-process simulator's) or None for a network pool.
        self.sdk_options: dict[str, Any] = {"api_key": api_key, "base_url": base_url}
        self.async_transport: httpx2.AsyncBaseTransport | None = (
            inner if isinstance(inner, httpx2.AsyncBaseTransport) else None)
        # Retries are ours (resilience.py says why), so the SDK's are off.
        self.client = anthropic.Anthropic(
            api_key=api_key, base_url=base_url, max_retries=0,
            http_client=anthropic.DefaultHttpxClient(transport=DeadlineTransport(inner)))
        if hasattr(self.client, "open_telemetry"):  # the SDK traces itself (2.14): content follows ours
            self.client = self.client.with_options(
                open_telemetry=telemetry.sdk_options(self.client.open_telemetry, settings.log_content))

        self.retry_policy = RetryPolicy(max_retries=settings.max_retries,
                                        retry_after_cap=settings.retry_after_cap)
        # Limits, budgets, alert de-duplication and breaker state share one store.
        store = make_store(settings.storage_uri, prefix=settings.storage_prefix,
                           socket_timeout=settings.storage_socket_timeout, settle_delay=settings.settle_delay,
                           options=settings.storage_options, notify=self._storage_event)
        if not isinstance(store, MemoryStore):  # a shared store can fail: stop asking it while it is down
            store = OutageGuard(store, clock=self.clock, retry_interval=settings.storage_retry_interval,
                                policy=settings.storage_failure, notify=self._storage_event)
        self.store: Store = store
        self.breaker = CircuitBreaker(self.store, BreakerParams(
            min_calls=settings.breaker_min_calls, failure_rate=settings.breaker_failure_rate,
            window=settings.breaker_window, cooldown=settings.breaker_cooldown))
        # The same salt in every worker and across key rotations: user hashes join across log lines.
        salt = settings.hash_salt or str(app.config.get("SECRET_KEY") or "") or settings.storage_prefix
        self.user_salt = hashlib.sha256(salt.encode()).hexdigest()[:16]
        self.events = EventLog(path=settings.log_path, secrets=(settings.api_key or "",),
                               hash_users=settings.hash_users, log_content=settings.log_content,
                               salt=self.user_salt)
        self.runner = CallRunner(self)  # the steps of a guarded call, shared by every client
        self.messages = GuardedMessages(self)
        self.async_messages = AsyncGuardedMessages(self)
        self.flags = make_provider(settings.flags, sdk_key=settings.launchdarkly_sdk_key,
                                   start_wait=settings.launchdarkly_start_wait, global_flag=settings.global_flag)
        self.response_cache = ResponseCache()
        self.budgets = Budgets(self, self.store)
        self.rollups = AppRollups(self)  # per-minute numbers every worker shares (rollups.py)
        self.pacer = Pacer(self)  # pacing from the upstream's rate-limit headers (pacing.py)
        self.ops_alerts = OpsAlerts(self)

    def _storage_event(self, event: str, fields: dict[str, Any]) -> None:
        first = fields.pop("noticed_first", False)
        level = "ERROR" if event in ("storage_unavailable", "storage_data_lost") else "WARNING"
        self.events.emit(event, fields, level=level)
        if event == "storage_data_lost" and first:  # one page per loss, from the worker that found it
            self.ops_alerts.page("storage_data_lost", fields.get("restored_usd"))


class Claude:
    """The flask-claude extension: ``Claude(app)`` or ``claude = Claude(); claude.init_app(app)``.

    Keyword arguments override the app's ``CLAUDE_*`` config for every app this object serves, by
    the setting's lower-case name (``Claude(app, models=[...], daily_budget_usd=5)``).
    """

    def __init__(self, app: Flask | None = None, **overrides: Any) -> None:
        self._objects = {k: overrides.pop(k) for k in _OBJECT_OVERRIDES if k in overrides}
        self._overrides = overrides
        self._user_loader: Callable[[], Any] | None = None
        self._dashboard_access: Callable[[], Any] | None = None
        self._app: Flask | None = None
        if app is not None:
            self._app = app  # lets scripts outside an app context use the only app there is
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        settings = load_settings(app.config, self._overrides)
        app.extensions[EXTENSION_KEY] = ClaudeState(app, settings, self, **self._objects)
        if is_quart_app(app):
            app.register_error_handler(ClaudeGuardError, handle_on_quart)
        else:
            app.register_error_handler(ClaudeGuardError, handle_guard_error)
            if not app.extensions.get("claude_ops_hook"):
                app.extensions["claude_ops_hook"] = True
                app.after_request(_evaluate_ops_alerts)
        if settings.dashboard:
            register_dashboard(app, self, settings.dashboard_prefix)
        if "claude" not in app.cli.commands:
            app.cli.add_command(claude_cli)

    # --- the per-app state, found the Flask-Login way -------------------------------------------

    def state(self, app: Flask | None = None) -> ClaudeState:
        """The state of ``app``, else of the current app, else of the app given to ``Claude(app)``."""
        if app is None:
            # a script outside any app context: the only app there is
            app = current_app_or_none() or self._app
        return state_for(app)

    @property
    def messages(self) -> GuardedMessages:
        return self.state().messages

    @property
    def async_messages(self) -> AsyncGuardedMessages:
        """``await claude.async_messages.create(...)``: the guarded client for ``async def`` views."""
        return self.state().async_messages

    @property
    def settings(self) -> Settings:
        return self.state().settings

    @property
    def ai_config(self) -> FeatureAIConfig:
        """The LaunchDarkly AI Config served for this request's user (``ai_feature(..., ai_config=...)``)."""
        config = current_scope().ai_config
        if config is None:
            raise ConfigError("claude.ai_config is set only inside a view decorated with "
                              "ai_feature(..., ai_config='<key>')")
        return config  # type: ignore[no-any-return]

    @property
    def simulator(self) -> Any:
        """The app's simulator when it runs on one (``CLAUDE_SIMULATE``), else None."""
        return self.state().simulator

    # The decorators, also importable from ``flask_claude``; they find the app via current_app.
    ai_feature = staticmethod(ai_feature)
    budgeted = staticmethod(budgeted)
    fallback_to = staticmethod(fallback_to)

    def dashboard_access(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Register who may see the ops dashboard: ``fn()`` runs in the request; truthy lets it in.

        Without one the dashboard answers 403 to everyone (it shows spend, errors and flag states).
        """
        self._dashboard_access = fn
        return fn

    def metrics_view(self) -> Any:
        """A Flask view answering the Prometheus text format: ``app.get("/metrics")(claude.metrics_view)``."""
        return metrics_response(self.state())

    def user_loader(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Register how the current user's key is found: return a string, or ``(key, attributes)``."""
        self._user_loader = fn
        return fn


def _evaluate_ops_alerts(response: Any) -> Any:
    """After each request: the ops alerts, at most every ``CLAUDE_OPS_ALERTS["eval_interval"]`` s per process."""
    state = state_for(required=False)
    if state is not None:
        state.ops_alerts.maybe_evaluate()
    return response
