"""OpenTelemetry: one span per guarded call around the SDK's own spans, and the GenAI client metrics,
read back from the OpenTelemetry SDK's in-memory exporter and reader (the real SDK, the real anthropic
SDK's tracing, the simulator behind it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, request
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from flask_claude import Claude, ai_feature, fallback_to
from flask_claude.events import hash_text
from flask_claude.simulator import Simulator
from flask_claude.testing import CallLog

from .conftest import FakeClock, user_msg

SDK_SPAN = "anthropic.messages.create"
PROMPT = "Summarise the plot of Hamlet."

# The global providers can be set once per process: this module sets them, and stops the exporter
# at its end so the rest of the session does not pile spans up in memory.
_exporter = InMemorySpanExporter()
_reader = InMemoryMetricReader(preferred_temporality={Histogram: AggregationTemporality.DELTA})


@pytest.fixture(scope="module", autouse=True)
def _providers() -> Iterator[None]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_exporter))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[_reader]))
    yield
    _exporter.shutdown()


class Telemetry:
    def __init__(self) -> None:
        self._points: list[tuple[str, Any]] = []
        _exporter.clear()
        _reader.get_metrics_data()  # drain: the reader reports deltas since its last collection

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in _exporter.get_finished_spans() if name is None or s.name == name]

    def ours(self) -> ReadableSpan:
        [span] = [s for s in self.spans() if s.instrumentation_scope.name == "flask_claude"]
        return span

    def points(self, metric: str) -> list[Any]:
        """Every data point of ``metric`` since the test began (each collection reports a delta)."""
        data = _reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    self._points.extend((m.name, p) for p in m.data.data_points)
        return [p for name, p in self._points if name == metric]


@pytest.fixture
def otel() -> Telemetry:
    return Telemetry()


def create(app: Any, **kwargs: Any) -> Any:
    params = {"max_tokens": 100, "messages": user_msg(PROMPT)} | kwargs
    with app.app_context():
        return app.extensions["claude"].messages.create(**params)


def view_app(sim: Simulator, clock: FakeClock, tmp_path: Any, **config: Any) -> Flask:
    app = Flask("otel")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"],
                      CLAUDE_LOG_PATH=str(tmp_path / "claude.jsonl"), **config)
    claude = Claude(app, simulator=sim, clock=clock)
    claude.user_loader(lambda: request.headers.get("X-User"))

    @app.post("/ask")
    @ai_feature("ask")
    @fallback_to({"answer": None}, status=503)
    def ask() -> Any:
        msg = claude.messages.create(model="claude-opus-4-7", max_tokens=100, messages=user_msg(PROMPT))
        return {"answer": msg.content[0].text}

    return app


def test_one_span_per_call_parent_of_the_sdks_span_for_each_attempt(sim: Simulator, clock: FakeClock, tmp_path: Any,
                                                                     otel: Telemetry, claude_log: CallLog) -> None:
    app = view_app(sim, clock, tmp_path)
    sim.fail(529, model="claude-opus-4-7", times=2)
    assert app.test_client().post("/ask", headers={"X-User": "alice@example.com"}).status_code == 200
    ours = otel.ours()
    assert ours.name == "chat claude-opus-4-7" and ours.kind is SpanKind.INTERNAL
    attempts = otel.spans(SDK_SPAN)
    assert len(attempts) == 3 == len(sim.requests_for("claude-opus-4-7"))
    assert all(s.parent is not None and s.parent.span_id == ours.context.span_id for s in attempts)
    assert all(s.context.trace_id == ours.context.trace_id for s in attempts)
    assert [s.attributes.get("error.type") for s in attempts] == ["overloaded_error", "overloaded_error", None]
    [line] = claude_log.events("claude_api_call")
    a = ours.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.request.model"] == "claude-opus-4-7" == a["gen_ai.response.model"]
    assert a["gen_ai.usage.input_tokens"] == line["input_tokens"] > 0
    assert a["gen_ai.usage.output_tokens"] == line["output_tokens"] > 0
    assert a["flask_claude.cost_usd"] == pytest.approx(line["cost_usd"]) and line["cost_usd"] > 0
    assert a["flask_claude.retries"] == 2 == line["retries"]
    assert a["flask_claude.feature"] == "ask" and a["flask_claude.route"] == "/ask"
    assert a["flask_claude.user"] == line["user"] == hash_text("alice@example.com",
                                                               salt=app.extensions["claude"].user_salt)
    assert tuple(a["flask_claude.fallback_chain"]) == ("claude-opus-4-7", "claude-sonnet-4-6")
    assert "error.type" not in a and ours.status.status_code is not StatusCode.ERROR
    retries = [e for e in ours.events if e.name == "flask_claude.retry"]
    assert [(e.attributes["flask_claude.attempt"], e.attributes["error.type"]) for e in retries] == \
        [(1, "overloaded_error"), (2, "overloaded_error")]
    assert not any("alice" in json.dumps(dict(s.attributes or {}), default=str) for s in otel.spans())


def test_fallback_is_an_event_and_the_answering_model_the_response_model(make_app, sim: Simulator,
                                                                        otel: Telemetry) -> None:
    app = make_app(CLAUDE_MAX_RETRIES=1, CLAUDE_BREAKER_MIN_CALLS=50)
    sim.fail(529, model="claude-opus-4-7")
    assert create(app, model="claude-opus-4-7").model == "claude-sonnet-4-6"
    ours = otel.ours()
    assert ours.name == "chat claude-opus-4-7"
    assert ours.attributes["gen_ai.request.model"] == "claude-opus-4-7"
    assert ours.attributes["gen_ai.response.model"] == "claude-sonnet-4-6"
    assert ours.attributes["flask_claude.fallback_from"] == "claude-opus-4-7"
    [fallback] = [e for e in ours.events if e.name == "flask_claude.fallback"]
    assert dict(fallback.attributes) == {"flask_claude.from_model": "claude-opus-4-7",
                                         "flask_claude.to_model": "claude-sonnet-4-6", "error.type": "overloaded_error"}
    models = [s.attributes["gen_ai.request.model"] for s in otel.spans(SDK_SPAN)]
    assert models == ["claude-opus-4-7", "claude-opus-4-7", "claude-sonnet-4-6"]
    assert all(s.parent.span_id == ours.context.span_id for s in otel.spans(SDK_SPAN))  # type: ignore[union-attr]


def test_input_tokens_count_cache_reads_and_writes_as_the_convention_requires(make_app, otel: Telemetry,
                                                                               claude_log: CallLog) -> None:
    app = make_app()
    system = [{"type": "text", "text": "You are a careful assistant. " * 200, "cache_control": {"type": "ephemeral"}}]
    create(app, model="claude-haiku-4-5", system=system)
    create(app, model="claude-haiku-4-5", system=system)
    spans = otel.spans("chat claude-haiku-4-5")
    assert len(spans) == 2
    for span, line in zip(spans, claude_log.events("claude_api_call"), strict=True):
        a = span.attributes
        assert a["gen_ai.usage.input_tokens"] == (line["input_tokens"] + line["cache_read_input_tokens"]
                                                  + line["cache_creation_input_tokens"])
        assert a["gen_ai.usage.cache_read.input_tokens"] == line["cache_read_input_tokens"]
        assert a["gen_ai.usage.cache_creation.input_tokens"] == line["cache_creation_input_tokens"]
    assert spans[0].attributes["gen_ai.usage.cache_creation.input_tokens"] > 0
    assert spans[1].attributes["gen_ai.usage.cache_read.input_tokens"] > 0
    tokens = otel.points("gen_ai.client.token.usage")
    inputs = sum(p.sum for p in tokens if p.attributes["gen_ai.token.type"] == "input")
    assert inputs == sum(s.attributes["gen_ai.usage.input_tokens"] for s in spans)


def test_metrics_count_each_guarded_call_once_whatever_its_attempts(make_app, sim: Simulator,
                                                                    otel: Telemetry) -> None:
    app = make_app()
    sim.fail(529, model="claude-opus-4-7", times=2)
    create(app, model="claude-opus-4-7")
    create(app, model="claude-opus-4-7")
    [duration] = otel.points("gen_ai.client.operation.duration")
    assert duration.count == 2  # two calls, four attempts
    assert duration.attributes["gen_ai.response.model"] == "claude-opus-4-7"
    assert duration.attributes["gen_ai.provider.name"] == "anthropic" and "error.type" not in duration.attributes
    tokens = {p.attributes["gen_ai.token.type"]: p for p in otel.points("gen_ai.client.token.usage")}
    assert set(tokens) == {"input", "output"} and tokens["input"].count == tokens["output"].count == 2
    spans = otel.spans("chat claude-opus-4-7")
    assert tokens["output"].sum == sum(s.attributes["gen_ai.usage.output_tokens"] for s in spans) > 0


def test_a_failed_call_carries_its_error_and_degradation_reason(sim: Simulator, clock: FakeClock, tmp_path: Any,
                                                                otel: Telemetry) -> None:
    app = view_app(sim, clock, tmp_path, CLAUDE_MAX_RETRIES=0)
    sim.fail(529)
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("POST /ask") as request_span:  # what Flask instrumentation would open
        response = app.test_client().post("/ask", headers={"X-User": "bob"})
    assert response.status_code == 503 and response.headers["X-Claude-Degraded"] == "upstream_unavailable"
    ours = otel.ours()
    assert ours.status.status_code is StatusCode.ERROR
    assert ours.attributes["error.type"] == "overloaded_error"
    assert ours.attributes["flask_claude.degradation_reason"] == "upstream_unavailable"
    assert "gen_ai.response.model" not in ours.attributes and "gen_ai.usage.input_tokens" not in ours.attributes
    assert ours.parent is not None and ours.parent.span_id == request_span.get_span_context().span_id
    [outer] = otel.spans("POST /ask")
    assert outer.attributes["flask_claude.degradation_reason"] == "upstream_unavailable"
    [degraded] = [e for e in outer.events if e.name == "flask_claude.degraded"]
    assert degraded.attributes["flask_claude.feature"] == "ask"
    [duration] = otel.points("gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] == "overloaded_error" and duration.count == 1
    assert otel.points("gen_ai.client.token.usage") == []  # nothing billed, nothing counted


def test_a_degradation_without_a_call_is_on_the_request_span(sim: Simulator, clock: FakeClock, tmp_path: Any,
                                                             otel: Telemetry) -> None:
    app = view_app(sim, clock, tmp_path)
    app.extensions["claude"].flags.set("ai-ask", False)
    with trace.get_tracer("test").start_as_current_span("POST /ask"):
        response = app.test_client().post("/ask")
    assert response.headers["X-Claude-Degraded"] == "feature_disabled"
    assert [s.name for s in otel.spans()] == ["POST /ask"]
    assert otel.spans()[0].attributes["flask_claude.degradation_reason"] == "feature_disabled"


def test_a_stream_is_one_span_ended_when_the_stream_is(make_app, otel: Telemetry, claude_log: CallLog) -> None:
    app = make_app()
    with app.app_context(), app.extensions["claude"].messages.stream(
            model="claude-sonnet-4-6", max_tokens=200, messages=user_msg("Tell me a story.")) as stream:
        assert otel.spans("chat claude-sonnet-4-6") == []  # still open while the stream is read
        text = "".join(stream.text_stream)
    assert text
    ours = otel.ours()
    [sdk] = otel.spans(SDK_SPAN)
    assert sdk.parent is not None and sdk.parent.span_id == ours.context.span_id
    [line] = claude_log.events("claude_api_call")
    assert ours.attributes["gen_ai.request.stream"] is True
    assert ours.attributes["gen_ai.usage.output_tokens"] == line["output_tokens"] > 0
    assert tuple(ours.attributes["gen_ai.response.finish_reasons"]) == (line["stop_reason"],)


def _content_attributes(span: ReadableSpan) -> dict[str, Any]:
    return {k: v for k, v in (span.attributes or {}).items()
            if k in ("gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions")}


def test_no_content_on_any_span_unless_claude_log_content(make_app, otel: Telemetry,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK's own variable asks for content; our setting says no, and wins.
    monkeypatch.setenv("ANTHROPIC_OPEN_TELEMETRY_TRACES_CONTENT_MODE", "content")
    app = make_app()
    assert app.extensions["claude"].client.open_telemetry["traces"]["content_mode"] == "metadata_only"
    create(app)
    assert otel.spans(SDK_SPAN)
    for span in otel.spans():
        assert _content_attributes(span) == {}
        assert PROMPT not in json.dumps(dict(span.attributes or {}), default=str)


def test_with_claude_log_content_the_sdks_spans_carry_it_and_ours_still_not(make_app, otel: Telemetry) -> None:
    app = make_app(CLAUDE_LOG_CONTENT=True)
    assert app.extensions["claude"].client.open_telemetry["traces"]["content_mode"] == "content"
    create(app)
    [sdk] = otel.spans(SDK_SPAN)
    assert PROMPT in json.dumps(_content_attributes(sdk), default=str)
    assert _content_attributes(otel.ours()) == {}


def test_the_sdks_other_options_from_the_environment_are_kept(make_app, otel: Telemetry,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_OPEN_TELEMETRY_PROPAGATION", "false")
    monkeypatch.setenv("ANTHROPIC_OPEN_TELEMETRY_TRACES_MAX_CONTENT_BYTES", "1234")
    app = make_app(CLAUDE_LOG_CONTENT=True)
    options = app.extensions["claude"].client.open_telemetry
    assert options["propagation"] is False and options["traces"]["max_content_bytes"] == 1234
    assert options["traces"]["content_mode"] == "content"


def test_without_a_configured_provider_the_hooks_cost_nothing_and_record_nothing(tmp_path: Any) -> None:
    """An app that never sets up OpenTelemetry (the API comes with anthropic, the SDK does not)."""
    script = """
import json, os
from flask import Flask
from flask_claude import Claude, telemetry
app = Flask("plain")
app.config.update(CLAUDE_SIMULATE=True, CLAUDE_LOG_PATH=os.environ["TEST_LOG_PATH"])
Claude(app)
with app.app_context():
    msg = app.extensions["claude"].messages.create(max_tokens=20, messages=[{"role": "user", "content": "hi"}])
span = telemetry.start_call(operation="chat", chain=["claude-sonnet-4-6"], max_tokens=1, feature=None,
                            route=None, user="u", salt="s")
print(json.dumps({"answered": bool(msg.content), "attaches": type(span.current()).__name__}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ANTHROPIC_", "CLAUDE_"))}
    env["TEST_LOG_PATH"] = str(tmp_path / "x.jsonl")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"answered": True, "attaches": "nullcontext"}  # an invalid span: no context switch
