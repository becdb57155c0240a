"""The app the multi-process tests run under real gunicorn workers, configured by environment."""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from flask_claude import Claude, ai_feature, budgeted, fallback_to
from flask_claude.flags import StaticFlags

claude = Claude()


def create_app() -> Flask:
    app = Flask("gunicorn_test_app")
    app.config.update(
        CLAUDE_SIMULATE=True,
        CLAUDE_MODELS=["claude-haiku-4-5"],
        CLAUDE_STORAGE_URI=os.environ["TEST_REDIS_URL"],
        CLAUDE_LOG_PATH=os.environ["TEST_LOG_PATH"],
        CLAUDE_DAILY_BUDGET_USD=float(os.environ["TEST_BUDGET_USD"]) if os.environ.get("TEST_BUDGET_USD") else None,
        CLAUDE_MAX_RETRIES=0,
        CLAUDE_FLAGS=StaticFlags(),
    )
    if os.environ.get("TEST_SIM_URL"):  # one loopback simulator the test scripts for every worker
        app.config["CLAUDE_BASE_URL"] = os.environ["TEST_SIM_URL"]
    # Any other setting: TEST_CLAUDE_ALERT_WINDOW=60 sets CLAUDE_ALERT_WINDOW (strings are parsed as config).
    app.config.update({k[len("TEST_"):]: v for k, v in os.environ.items() if k.startswith("TEST_CLAUDE_")})
    claude.init_app(app)
    latency = float(os.environ.get("TEST_SIM_LATENCY", "0"))
    if latency:
        app.extensions["claude"].simulator.latency(latency)

    app.get("/metrics")(claude.metrics_view)

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    @app.post("/limited")
    @ai_feature("limited")
    @budgeted(requests="10/minute")
    @fallback_to({"text": None})
    def limited() -> Any:
        msg = claude.messages.create(max_tokens=20, messages=[{"role": "user", "content": "hi"}])
        return {"text": msg.content[0].text}

    @app.post("/spend")
    @ai_feature("spend")
    @fallback_to({"text": None})
    def spend() -> Any:
        msg = claude.messages.create(max_tokens=120, messages=[{"role": "user", "content": "Write a haiku."}])
        return {"text": msg.content[0].text}

    return app
