"""The app bench/pacing_storm.py runs under gunicorn: one route, one Claude call, every worker on the
same loopback simulator (BENCH_SIM_URL, rate limited by the bench) and the same Redis.

CLAUDE_PACING comes from BENCH_PACING ("off", "wait", "fallback"); the rest is fixed: models
[claude-opus-4-7, claude-sonnet-4-6], max_tokens 300, retries at their defaults (4, retry-after
honoured up to 20 s), deadline 30 s, CLAUDE_PACING_WAIT 10 s.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask
from loguru import logger

MODELS = ["claude-opus-4-7", "claude-sonnet-4-6"]
MAX_TOKENS = 300
PROMPT = "Write a short poem about queues and the patient people who wait in them."


def create_app() -> Flask:
    from flask_claude import Claude, ai_feature

    logger.remove()  # flask-claude's own sink writes the JSON lines to CLAUDE_LOG_PATH
    app = Flask("pacing_bench")
    app.config.update(
        CLAUDE_SIMULATE=True,
        CLAUDE_BASE_URL=os.environ["BENCH_SIM_URL"],
        CLAUDE_MODELS=MODELS,
        CLAUDE_STORAGE_URI=os.environ["BENCH_REDIS_URL"],
        CLAUDE_LOG_PATH=os.environ["BENCH_LOG_PATH"],
        CLAUDE_PACING=os.environ["BENCH_PACING"],
        CLAUDE_PACING_WAIT=float(os.environ.get("BENCH_PACING_WAIT", "10")),
        CLAUDE_DEADLINE=30.0,
        CLAUDE_BREAKER_MIN_CALLS=10_000,  # 429s never open a breaker anyway; keep the comparison about pacing
    )
    claude = Claude(app)

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    @app.post("/ask")
    @ai_feature("ask")
    def ask() -> Any:
        msg = claude.messages.create(model=MODELS[0], max_tokens=MAX_TOKENS,
                                     messages=[{"role": "user", "content": PROMPT}])
        return {"model": msg.model, "text": msg.content[0].text[:40]}

    return app
