"""The app bench/budget_race.py runs under gunicorn, in one of two modes (env BENCH_MODE).

reserve: flask-claude as documented. CLAUDE_DAILY_BUDGET_USD on Redis; each call reserves its worst
         case before it is sent and settles the real cost after (flask_claude/budget.py).
naive:   what many apps do, implemented here only, for comparison: GET the spend counter from Redis,
         refuse when ``spent >= budget``, else call the (same) simulator through the SDK and
         ``INCRBYFLOAT`` the real cost afterwards. Same model, same prompt, same latency.

Both write one JSON line per call with ``cost_usd`` to BENCH_LOG_PATH (one O_APPEND write per line),
so the bench sums settled spend the same way for both.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from flask import Flask
from loguru import logger

MODEL = "claude-sonnet-4-6"
MAX_TOKENS = 200
PROMPT = "Write a short poem about budgets and the careful people who keep them."


def create_app() -> Flask:
    logger.remove()  # the app configures logging; flask-claude's own sink writes the JSON lines
    mode = os.environ["BENCH_MODE"]
    return _reserve_app() if mode == "reserve" else _naive_app()


def _reserve_app() -> Flask:
    from flask_claude import Claude, ai_feature, fallback_to

    app = Flask("race_reserve")
    app.config.update(
        CLAUDE_SIMULATE=True,
        CLAUDE_MODELS=[MODEL],
        CLAUDE_STORAGE_URI=os.environ["BENCH_REDIS_URL"],
        CLAUDE_LOG_PATH=os.environ["BENCH_LOG_PATH"],
        CLAUDE_DAILY_BUDGET_USD=float(os.environ["BENCH_BUDGET_USD"]),
        CLAUDE_MAX_RETRIES=0,
    )
    claude = Claude(app)
    app.extensions["claude"].simulator.latency(float(os.environ["BENCH_SIM_LATENCY"]))

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    @app.post("/spend")
    @ai_feature("spend")
    @fallback_to({"text": None, "notice": "paused"}, status=503)
    def spend() -> Any:
        msg = claude.messages.create(model=MODEL, max_tokens=MAX_TOKENS,
                                     messages=[{"role": "user", "content": PROMPT}])
        return {"text": msg.content[0].text}

    return app


def _naive_app() -> Flask:
    import anthropic
    import redis

    from flask_claude.pricing import PriceTable
    from flask_claude.simulator import Simulator

    app = Flask("race_naive")
    sim = Simulator()
    sim.latency(float(os.environ["BENCH_SIM_LATENCY"]))
    client = anthropic.Anthropic(api_key="x", base_url="http://sim", max_retries=0,
                                 http_client=anthropic.DefaultHttpxClient(transport=sim.transport()))
    store = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"], socket_timeout=2.0)
    budget = float(os.environ["BENCH_BUDGET_USD"])
    prices = PriceTable()
    log_fd = os.open(os.environ["BENCH_LOG_PATH"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    key = "naive:spent"

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    @app.post("/spend")
    def spend() -> Any:
        spent = float(store.get(key) or 0.0)
        if spent >= budget:  # check...
            os.write(log_fd, (json.dumps({"event": "refused", "ts": time.time(), "cost_usd": 0.0}) + "\n").encode())
            return {"text": None, "notice": "paused"}, 503
        msg = client.messages.create(model=MODEL, max_tokens=MAX_TOKENS,
                                     messages=[{"role": "user", "content": PROMPT}])
        cost = prices.cost(MODEL, msg.usage).usd
        store.incrbyfloat(key, cost)  # ...then count after the call
        os.write(log_fd, (json.dumps({"event": "claude_api_call", "ts": time.time(), "cost_usd": round(cost, 8)})
                            + "\n").encode())
        return {"text": msg.content[0].text}

    return app
