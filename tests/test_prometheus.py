"""The Prometheus exposition, parsed with prometheus-client's own parser, against the log of the same run."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from flask_claude import Claude, ai_feature, budgeted, fallback_to
from flask_claude.flags import StaticFlags
from flask_claude.rollups import to_micro
from flask_claude.simulator import Simulator

from .conftest import FakeClock


def samples(text: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def total(found: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(s.value for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def metrics_app(storage_uri: str, sim: Simulator, clock: FakeClock, log_path: Path) -> Flask:
    app = Flask("metrics_app")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_STORAGE_URI=storage_uri, CLAUDE_LOG_PATH=str(log_path),
                      CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"], CLAUDE_MAX_RETRIES=0,
                      CLAUDE_DAILY_BUDGET_USD=5.0, CLAUDE_FLAGS=StaticFlags(), CLAUDE_BREAKER_MIN_CALLS=2)
    claude = Claude(app, simulator=sim, clock=clock)
    app.get("/metrics")(claude.metrics_view)  # the documented one-liner

    @app.post("/ask")
    @ai_feature("ask", max_tokens=80)
    @budgeted(requests="1000/minute")
    @fallback_to({"text": None})
    def ask() -> Any:
        msg = claude.messages.create(messages=[{"role": "user", "content": "Name three rivers."}])
        return {"text": msg.content[0].text}

    @app.post("/plain")
    def plain() -> Any:  # a guarded call outside any feature
        msg = claude.messages.create(max_tokens=30, messages=[{"role": "user", "content": "hello"}])
        return {"text": msg.content[0].text}

    return app


def test_metrics_agree_with_the_log(storage_uri: str, sim: Simulator, clock: FakeClock, tmp_path: Path) -> None:
    clock.now = time.time()
    log_path = tmp_path / "calls.jsonl"
    app = metrics_app(storage_uri, sim, clock, log_path)
    client = app.test_client()
    for _ in range(4):
        assert client.post("/ask").status_code == 200
    assert client.post("/plain").status_code == 200
    sim.fail(529, model="claude-opus-4-7")  # opus down: fallbacks, then its breaker opens
    for _ in range(6):
        assert client.post("/ask").status_code == 200
    sim.fail(529)
    assert client.post("/ask").headers["X-Claude-Degraded"] == "upstream_unavailable"
    sim.reset()

    response = client.get("/metrics")
    assert response.status_code == 200 and response.content_type.startswith("text/plain")
    found = samples(response.get_data(as_text=True))
    lines = log_lines(log_path)
    calls = [e for e in lines if e["event"] == "claude_api_call"]
    errors = [e for e in lines if e["event"] == "claude_api_error"]
    both = calls + errors

    assert total(found, "flask_claude_calls_total", outcome="ok") == len(calls) == 11
    assert total(found, "flask_claude_calls_total", outcome="error") == len(errors) == 1
    assert total(found, "gen_ai_client_operation_duration_seconds_count") == len(both)
    assert total(found, "gen_ai_client_operation_duration_seconds_bucket", le="+Inf") == len(both)
    # To the micro-dollar: each call counts its cost rounded to a whole micro-dollar.
    cost = total(found, "flask_claude_cost_usd_total")
    assert round(cost * 1_000_000) == sum(to_micro(e["cost_usd"]) for e in both)
    assert math.isclose(cost, sum(e["cost_usd"] for e in both), abs_tol=1e-6 * len(both))
    assert total(found, "flask_claude_cost_usd_total", feature="-") == calls[4]["cost_usd"]  # the /plain call
    for model in ("claude-opus-4-7", "claude-sonnet-4-6"):
        assert total(found, "flask_claude_calls_total", gen_ai_request_model=model) == \
            len([e for e in both if e["model"] == model])
    assert total(found, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == \
        sum(e["output_tokens"] for e in both)
    assert total(found, "gen_ai_client_token_usage_sum", gen_ai_token_type="input") == sum(
        e["input_tokens"] + e["cache_read_input_tokens"] + e["cache_creation_input_tokens"] for e in both)
    assert total(found, "gen_ai_client_token_usage_count", gen_ai_token_type="input") == len(both)
    assert total(found, "flask_claude_fallbacks_total") == len([e for e in both if e["fallback_from"]]) > 0
    degraded = [e for e in lines if e["event"] == "feature_degraded"]
    assert total(found, "flask_claude_degraded_total", reason="upstream_unavailable", feature="ask") == \
        len(degraded) == 1
    assert total(found, "flask_claude_breaker_open", model="claude-opus-4-7") == 1
    assert total(found, "flask_claude_breaker_open", model="claude-sonnet-4-6") == 0
    assert total(found, "flask_claude_budget_remaining_usd", budget="global daily budget") == \
        round(5.0 - sum(math.ceil(e["cost_usd"] * 1_000_000) for e in both) / 1_000_000, 6)
    assert {s.labels["alert"]: s.value for s in found["flask_claude_alert_firing"]} == {
        "error_rate": 0, "latency_p95": 0, "cost_spike": 0}
    assert total(found, "flask_claude_storage_up") == 1
    # Histogram buckets are cumulative and the boundaries are OpenTelemetry's.
    buckets = [s for s in found["gen_ai_client_operation_duration_seconds_bucket"]
               if s.labels["feature"] == "ask" and s.labels["gen_ai_request_model"] == "claude-sonnet-4-6"]
    assert [s.labels["le"] for s in buckets][:3] == ["0.01", "0.02", "0.04"]
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)


def test_storage_outage_is_a_metric_not_a_500(sim: Simulator, clock: FakeClock, tmp_path: Path) -> None:
    from .conftest import free_port

    app = metrics_app(f"redis://127.0.0.1:{free_port()}/0", sim, clock, tmp_path / "calls.jsonl")
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert total(samples(response.get_data(as_text=True)), "flask_claude_storage_up") == 0
