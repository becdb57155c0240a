"""A small Flask app that calls Claude through flask-claude: summarize, classify, and a streamed chat.

Run it with ``flask --app example_app run``. Without ``ANTHROPIC_API_KEY`` it answers from the
offline simulator (canned text, no network, no cost; a reply rule gives the classify prompt a label,
see :func:`simulated_sentiment`); with a key it calls the real API.

Everything is read from the environment at ``create_app()`` time, never at import time:

==========================  ====================================================================
``ANTHROPIC_API_KEY``       the real API; unset means the offline simulator (``CLAUDE_SIMULATE``)
``REDIS_URL``               shared limits and budgets for several workers (default ``memory://``)
``CLAUDE_DAILY_BUDGET_USD`` the app-wide daily budget (default 5.0)
``CLAUDE_LOG_PATH``         the JSON call log (default ``claude-calls.jsonl`` in the working dir)
``EXAMPLE_FLAGS_FILE``      the local LaunchDarkly flag file (default ``example_app/flags.json``)
``LAUNCHDARKLY_SDK_KEY``    real LaunchDarkly instead of the flag file
``TRUSTED_PROXIES``         how many reverse proxies sit in front (default 0), see below
``CLAUDE_*``                any other flask-claude setting, e.g. ``CLAUDE_BASE_URL``
==========================  ====================================================================
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from flask_claude import ConfigError
from flask_claude.flags import LaunchDarklyFlags
from flask_claude.settings import GROUPS, SETTING_KEYS

from .views import CLASSIFY_SYSTEM, bp, claude

DEFAULT_FLAGS_FILE = Path(__file__).with_name("flags.json")


def page_oncall(alert: dict[str, Any]) -> None:
    """``CLAUDE_ALERT_HOOK``: called once per budget and threshold crossed (50%, 80%, 100% by default),
    and once when an ops alert (error rate, p95 latency, cost spike) starts firing and once when it resolves.

    Wire this to your pager or chat; an exception here is logged and never fails the request.
    """
    if "alert" in alert:
        print(f"OPS ALERT {alert['state'].upper()}: {alert['alert']} = {alert['value']} "
              f"(threshold {alert['threshold']}, last {alert['window_s']:g} s)", file=sys.stderr, flush=True)
        return
    print(f"BUDGET ALERT: {alert['budget']} passed {alert['threshold']:.0%} "
          f"({alert['spent']} of {alert['limit']} {alert['unit']})", file=sys.stderr, flush=True)


_POSITIVE = ("good", "great", "love", "like", "fast", "excellent", "happy", "nice", "better", "best", "thank")
_NEGATIVE = ("bad", "hate", "slow", "broken", "terrible", "awful", "worse", "worst", "angry", "disappoint", "fail")


def simulated_sentiment(text: str) -> str:
    """The offline simulator's answer to the classify prompt: a guess from a few word stems.

    The simulator's canned prose is no label, so without this reply rule /classify would always
    degrade there. A real model reads the text; this is only so the button works without a key.
    """
    words = re.findall(r"[a-z]+", text.lower())
    score = (sum(w.startswith(_POSITIVE) for w in words) - sum(w.startswith(_NEGATIVE) for w in words))
    return "positive" if score > 0 else "negative" if score < 0 else "neutral"


def config_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The app's settings: our defaults, then the environment."""
    config: dict[str, Any] = {
        # The app-wide fallback chain; /summarize and /classify pick their own models.
        "CLAUDE_MODELS": ["claude-sonnet-5-5", "claude-haiku-5-5"],
        "CLAUDE_DAILY_BUDGET_USD": environ.get("CLAUDE_DAILY_BUDGET_USD", "5.0"),
        # No single feature may burn the whole day's budget.
        "CLAUDE_FEATURE_BUDGETS_USD": {"chat": 2.0},
        "CLAUDE_STORAGE_URI": environ.get("REDIS_URL") or "memory://",
        "CLAUDE_LOG_PATH": environ.get("CLAUDE_LOG_PATH", "claude-calls.jsonl"),
        "CLAUDE_ALERT_HOOK": page_oncall,
        # The ops dashboard at /claude/ (views.local_operators_only decides who gets in).
        "CLAUDE_DASHBOARD": True,
        "EXAMPLE_FLAGS_FILE": environ.get("EXAMPLE_FLAGS_FILE", str(DEFAULT_FLAGS_FILE)),
    }
    # Any CLAUDE_* setting in the environment wins (CLAUDE_BASE_URL, CLAUDE_MAX_RETRIES, ...); a grouped
    # one is JSON: CLAUDE_OPS_ALERTS='{"window": 60}'.
    for key, value in environ.items():
        if key in GROUPS:
            try:
                config[key] = json.loads(value)
            except ValueError:
                raise ConfigError(f"{key} must be a JSON object, e.g. {key}='{{\"window\": 60}}'") from None
        elif key in SETTING_KEYS:
            config[key] = value
    return config


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The app factory; ``config`` overrides the environment (tests pass a temporary flag file here)."""
    app = Flask(__name__)
    app.config.update(config_from_env(os.environ))
    app.config.update(config or {})

    # No key anywhere: run on the offline simulator instead of failing at startup.
    if not (app.config.get("CLAUDE_API_KEY") or os.environ.get("ANTHROPIC_API_KEY")):
        app.config.setdefault("CLAUDE_SIMULATE", True)

    # Flags: real LaunchDarkly when there is an SDK key, else a local LaunchDarkly flag file read by
    # the real SDK. Edit the file (replace it atomically) and the next request sees the change.
    if "CLAUDE_FLAGS" not in app.config:
        if app.config.get("CLAUDE_LAUNCHDARKLY_SDK_KEY") or os.environ.get("LAUNCHDARKLY_SDK_KEY"):
            app.config["CLAUDE_FLAGS"] = "launchdarkly"
        else:
            flags_file = Path(app.config["EXAMPLE_FLAGS_FILE"])
            if not flags_file.is_file():
                raise FileNotFoundError(f"EXAMPLE_FLAGS_FILE {str(flags_file)!r} does not exist")
            app.config["CLAUDE_FLAGS"] = LaunchDarklyFlags.from_file(flags_file)

    claude.init_app(app)
    app.register_blueprint(bp)

    # Limits and budgets are per user, and without a login the user is the client's address. Behind
    # a reverse proxy every request comes from the proxy, so trust exactly as many X-Forwarded-For
    # hops as there are proxies (more would let clients pick their own address, and so their limits).
    proxies = int(os.environ.get("TRUSTED_PROXIES", "0"))
    if proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)  # type: ignore[method-assign]

    settings = claude.state(app).settings
    if settings.simulate:
        # A reply rule: the classify prompt gets a label (and /analyze's label too), here and from
        # `flask --app example_app claude simulate`, which serves this app's simulator.
        claude.state(app).simulator.reply(CLASSIFY_SYSTEM, simulated_sentiment)
        why = "CLAUDE_SIMULATE is on" if settings.api_key else "no ANTHROPIC_API_KEY"
        print(f"example_app: {why}, so Claude calls go to the offline simulator "
              f"({settings.base_url or 'in-process'}); replies are canned text (a reply rule gives "
              "/classify a label), nothing is billed, and the log prices calls at list price.",
              file=sys.stderr, flush=True)
    return app
