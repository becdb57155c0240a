"""LaunchDarkly AI Configs, on the real SDKs: ``launchdarkly-server-sdk`` serving the config from ``TestData``,
``launchdarkly-server-sdk-ai`` evaluating and tracking it, and the SDK's events posted to a loopback server."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from flask import Flask, Response, request
from ldai import AICompletionConfigDefault, LDMessage, ModelConfig
from ldclient import LDClient
from ldclient.config import Config
from ldclient.integrations.test_data import TestData

from flask_claude import Claude, ConfigError, ai_feature, fallback_to
from flask_claude.aiconfig import COST_EVENT
from flask_claude.flags import LaunchDarklyFlags, StaticFlags
from flask_claude.simulator import Simulator
from flask_claude.testing import CallLog

from .conftest import FakeClock

CONFIG_KEY = "summarize-config"


class EventSink:
    """A loopback HTTP server standing in for LaunchDarkly's events service: it keeps every posted event."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self._changed = threading.Condition()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with sink._changed:
                    sink.paths.append(self.path)
                    sink.events.extend(json.loads(body))
                    sink._changed.notify_all()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def custom(self, key: str) -> list[dict[str, Any]]:
        with self._changed:
            return [e for e in self.events if e.get("kind") == "custom" and e.get("key") == key]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        """Wait until the posted events satisfy ``predicate`` (bounded: a missing event fails the test)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"events not received; got {[e.get('key') for e in self.events]}")
                self._changed.wait(left)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink() -> Iterator[EventSink]:
    server = EventSink()
    yield server
    server.close()


@pytest.fixture
def td() -> TestData:
    return TestData.data_source()


@pytest.fixture
def ld(td: TestData, sink: EventSink) -> Iterator[LDClient]:
    client = LDClient(Config("sdk-test", update_processor_class=td, events_uri=sink.uri, send_events=True,
                             diagnostic_opt_out=True), start_wait=0)
    yield client
    client.close()


def variation(key: str, model: str, max_tokens: int | None, system: str, *, enabled: bool = True) -> dict[str, Any]:
    """An AI Config variation as LaunchDarkly serves it: a JSON flag value with ``_ldMeta``."""
    parameters = {"maxTokens": max_tokens} if max_tokens is not None else {}
    return {"_ldMeta": {"enabled": enabled, "variationKey": key, "version": 3, "mode": "completion"},
            "model": {"name": model, "parameters": parameters},
            "provider": {"name": "anthropic"},
            "messages": [{"role": "system", "content": system}]}


def serve_config(td: TestData, *variations: dict[str, Any], fallthrough: int = 0,
                 pro: int | None = None) -> None:
    flag = td.flag(CONFIG_KEY).variations(*variations).fallthrough_variation(fallthrough)
    if pro is not None:
        flag = flag.if_match("plan", "pro").then_return(pro)
    td.update(flag)


def make_app(flags: Any, sim: Simulator, clock: FakeClock, *, feature: Callable[[Any], Any] | None = None,
             **config: Any) -> tuple[Flask, Claude]:
    app = Flask("aiconfig")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_FLAGS=flags, CLAUDE_MAX_RETRIES=0,
                      CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"], **config)
    claude = Claude(app, simulator=sim, clock=clock)

    @claude.user_loader
    def load_user() -> Any:
        return request.headers["X-User"], {"plan": request.headers.get("X-Plan", "free")}

    decorate = feature or (lambda view: ai_feature("summarize", ai_config=CONFIG_KEY, max_tokens=300,
                                                   ai_config_variables=lambda: {"tone": "brief"})(view))

    @app.post("/summarize")
    @fallback_to({"summary": None}, status=503)
    @decorate
    def summarize() -> Any:
        config = claude.ai_config
        msg = claude.messages.create(**config.as_params([{"role": "user", "content": "summarize this"}]))
        return {"model": msg.model, "system": config.system, "variation": config.variation_key,
                "source": config.source, "max_tokens": config.max_tokens}

    @app.post("/stream")
    @decorate
    def stream() -> Any:
        config = claude.ai_config
        with claude.messages.stream(**config.as_params([{"role": "user", "content": "stream this"}])) as s:
            text = "".join(s.text_stream)
        return {"text": text}

    return app, claude


def post(app: Flask, path: str, user: str, plan: str = "free") -> Response:
    return app.test_client().post(path, headers={"X-User": user, "X-Plan": plan})


def test_config_decides_on_off_model_max_tokens_and_prompt_per_context(
        td: TestData, ld: LDClient, sim: Simulator, clock: FakeClock) -> None:
    serve_config(td, variation("haiku-short", "claude-haiku-4-5", 120, "Summarize {{tone}} for {{ldctx.plan}}."),
                 variation("sonnet-long", "claude-sonnet-4-6", 1000, "Summarize in depth for {{ldctx.key}}."),
                 variation("off", "claude-haiku-4-5", 50, "unused", enabled=False), pro=1)
    app, _ = make_app(LaunchDarklyFlags(ld), sim, clock)

    free = post(app, "/summarize", "u-free").get_json()
    pro = post(app, "/summarize", "u-pro", "pro").get_json()
    assert free == {"model": "claude-haiku-4-5", "system": "Summarize brief for free.", "variation": "haiku-short",
                    "source": "launchdarkly", "max_tokens": 120}
    assert pro["model"] == "claude-sonnet-4-6" and pro["system"] == "Summarize in depth for u-pro."
    sent = [r.body for r in sim.requests]
    assert [b["model"] for b in sent] == ["claude-haiku-4-5", "claude-sonnet-4-6"]
    assert [b["system"] for b in sent] == ["Summarize brief for free.", "Summarize in depth for u-pro."]
    # maxTokens lowers the feature's cap (120 < 300) but never raises it (1000 > 300)
    assert [b["max_tokens"] for b in sent] == [120, 300]

    serve_config(td, variation("off", "claude-haiku-4-5", 50, "unused", enabled=False))  # flipped in LaunchDarkly
    off = post(app, "/summarize", "u-free")
    assert off.status_code == 503 and off.headers["X-Claude-Degraded"] == "feature_disabled"
    assert off.get_json() == {"summary": None}
    assert len(sim.requests) == 2  # nothing sent for a disabled config


def test_config_model_falls_back_along_the_feature_chain_and_must_be_priced(
        td: TestData, ld: LDClient, sim: Simulator, clock: FakeClock, claude_log: CallLog) -> None:
    serve_config(td, variation("haiku", "claude-haiku-4-5", None, "Be brief."))
    app, _ = make_app(LaunchDarklyFlags(ld), sim, clock)
    sim.fail(529, model="claude-haiku-4-5")
    assert post(app, "/summarize", "u1").get_json()["model"] == "claude-opus-4-7"
    assert [r.model for r in sim.requests] == ["claude-haiku-4-5", "claude-opus-4-7"]
    assert sim.requests[-1].body["max_tokens"] == 300  # no maxTokens in the config: the feature's cap

    serve_config(td, variation("typo", "claude-haiku-4-6-typo", 100, "Be brief."))
    typo = post(app, "/summarize", "u1")
    assert typo.headers["X-Claude-Degraded"] == "unknown_model"
    assert len(sim.requests) == 2


def test_tracker_and_cost_events_reach_launchdarkly_with_the_users_context(
        td: TestData, ld: LDClient, sim: Simulator, clock: FakeClock, sink: EventSink, claude_log: CallLog) -> None:
    serve_config(td, variation("haiku-short", "claude-haiku-4-5", 120, "Be brief."))
    app, _ = make_app(LaunchDarklyFlags(ld), sim, clock)

    assert post(app, "/summarize", "u-events").status_code == 200
    assert post(app, "/stream", "u-events").get_json()["text"]
    sim.fail(529)
    assert post(app, "/summarize", "u-events").headers["X-Claude-Degraded"] == "upstream_unavailable"
    ld.flush()
    sink.wait_for(lambda: len(sink.custom(COST_EVENT)) == 3 and len(sink.custom("$ld:ai:generation:error")) == 1
                  and len(sink.custom("$ld:ai:generation:success")) == 2)
    assert all(path == "/bulk" for path in sink.paths)

    calls = claude_log.events("claude_api_call")
    assert len(calls) == 2
    successes = sink.custom("$ld:ai:generation:success")
    errors = sink.custom("$ld:ai:generation:error")
    runs = [e["data"]["runId"] for e in successes + errors]
    assert len(set(runs)) == 3  # one LaunchDarkly run per guarded call
    for event in successes + errors:
        assert event["context"]["key"] == "u-events"
        assert event["data"]["configKey"] == CONFIG_KEY
        assert event["data"]["variationKey"] == "haiku-short"
        assert event["data"]["modelName"] == "claude-haiku-4-5"

    for name, field in (("$ld:ai:tokens:input", "input_tokens"), ("$ld:ai:tokens:output", "output_tokens")):
        values = sorted(e["metricValue"] for e in sink.custom(name))
        assert values == sorted(c[field] for c in calls)
    totals = sorted(e["metricValue"] for e in sink.custom("$ld:ai:tokens:total"))
    assert totals == sorted(c["input_tokens"] + c["output_tokens"] for c in calls)
    durations = sink.custom("$ld:ai:duration:total")
    assert len(durations) == 3 and all(isinstance(e["metricValue"], int) for e in durations)

    # time to first token: only the stream's run has one, and it is not after the stream's duration
    ttft = sink.custom("$ld:ai:tokens:ttf")
    assert len(ttft) == 1
    stream_run = ttft[0]["data"]["runId"]
    assert stream_run in runs[:2]
    stream_duration = next(e for e in durations if e["data"]["runId"] == stream_run)
    assert 0 <= ttft[0]["metricValue"] <= stream_duration["metricValue"]

    costs = {e["data"]["runId"]: e for e in sink.custom(COST_EVENT)}
    assert set(costs) == set(runs)
    assert all(e["context"]["key"] == "u-events" and e["data"]["configKey"] == CONFIG_KEY for e in costs.values())
    billed = sorted(e["metricValue"] for run, e in costs.items() if run in runs[:2])
    assert billed == pytest.approx(sorted(c["cost_usd"] for c in calls), rel=1e-6)
    assert all(value > 0 for value in billed)
    assert costs[errors[0]["data"]["runId"]]["metricValue"] == 0
    assert costs[errors[0]["data"]["runId"]]["data"]["modelName"] is None


def test_default_config_applies_when_launchdarkly_is_down(sim: Simulator, clock: FakeClock) -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on: LaunchDarkly is unreachable
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"

    def config() -> Config:
        return Config("sdk-test", base_uri=dead, stream_uri=dead, events_uri=dead, send_events=False,
                      diagnostic_opt_out=True)

    flags = LaunchDarklyFlags(config_factory=config, start_wait=0.2)
    default = AICompletionConfigDefault(
        enabled=True, model=ModelConfig("claude-haiku-4-5", parameters={"maxTokens": 80}),
        messages=[LDMessage("system", "Default prompt for {{ldctx.key}}, {{tone}}.")])
    app, _ = make_app(flags, sim, clock, feature=ai_feature("summarize", ai_config=CONFIG_KEY, max_tokens=300,
                                                            ai_config_default=default,
                                                            ai_config_variables=lambda: {"tone": "brief"}))
    try:
        body = post(app, "/summarize", "u-down").get_json()
        assert body == {"model": "claude-haiku-4-5", "system": "Default prompt for u-down, brief.", "variation": "",
                        "source": "default", "max_tokens": 80}
        assert sim.requests[-1].body["max_tokens"] == 80

        # Without a default of its own the feature follows CLAUDE_FLAG_DEFAULT: off here.
        app_off, _ = make_app(flags, sim, clock, CLAUDE_FLAG_DEFAULT=False)
        assert post(app_off, "/summarize", "u-down").headers["X-Claude-Degraded"] == "feature_disabled"
        # ... and on by default: the feature's own chain and cap, no prompt.
        app_on, _ = make_app(flags, sim, clock)
        assert post(app_on, "/summarize", "u-down").get_json() == {
            "model": "claude-opus-4-7", "system": None, "variation": "", "source": "default", "max_tokens": None}
        assert sim.requests[-1].body["max_tokens"] == 300
    finally:
        flags.close()


def test_ai_config_needs_the_launchdarkly_provider_and_clear_arguments(
        sim: Simulator, clock: FakeClock, claude_log: CallLog) -> None:
    app, claude = make_app(StaticFlags(), sim, clock)

    @app.post("/plain")
    @ai_feature("plain")
    def plain() -> Any:
        return {"system": claude.ai_config.system}

    response = post(app, "/summarize", "u1")
    assert response.headers["X-Claude-Degraded"] == "config_error"
    assert not sim.requests
    detail = claude_log.events("feature_degraded")[-1]["detail"]
    assert "ai_feature('summarize', ai_config='summarize-config')" in detail and "LaunchDarkly" in detail
    assert post(app, "/plain", "u1").headers["X-Claude-Degraded"] == "config_error"
    assert "only inside a view decorated with" in claude_log.events("feature_degraded")[-1]["detail"]

    with pytest.raises(ConfigError, match="model_flag"):
        ai_feature("x", ai_config="k", model_flag="m")
    with pytest.raises(ConfigError, match="need ai_config"):
        ai_feature("x", ai_config_default=AICompletionConfigDefault(enabled=True))
    with pytest.raises(ConfigError, match="AI Config key"):
        ai_feature("x", ai_config="")


def test_named_feature_flag_still_switches_an_ai_config_feature_off(
        td: TestData, ld: LDClient, sim: Simulator, clock: FakeClock) -> None:
    serve_config(td, variation("haiku", "claude-haiku-4-5", 100, "Be brief."))
    td.update(td.flag("ai-summarize").variation_for_all(False))
    app, _ = make_app(LaunchDarklyFlags(ld), sim, clock)
    assert post(app, "/summarize", "u1").status_code == 200  # the AI Config is the switch: ai-summarize unused
    named, _ = make_app(LaunchDarklyFlags(ld), sim, clock, feature=ai_feature(
        "summarize", ai_config=CONFIG_KEY, flag="ai-summarize"))
    assert post(named, "/summarize", "u1").headers["X-Claude-Degraded"] == "feature_disabled"


def test_async_view_streams_are_tracked_with_time_to_first_token(
        td: TestData, ld: LDClient, sim: Simulator, clock: FakeClock, sink: EventSink) -> None:
    serve_config(td, variation("sonnet", "claude-sonnet-4-6", 90, "Tell it as {{ldctx.plan}}."))
    app, claude = make_app(LaunchDarklyFlags(ld), sim, clock)

    @app.post("/async")
    @ai_feature("summarize", ai_config=CONFIG_KEY)
    async def ask_async() -> Any:
        config = claude.ai_config
        async with claude.async_messages.stream(**config.as_params([{"role": "user", "content": "a story"}])) as s:
            streamed = "".join([text async for text in s.text_stream])
        raw = await claude.async_messages.create(stream=True, **config.as_params([{"role": "user", "content": "hi"}]))
        kinds = [event.type async for event in raw]
        return {"streamed": bool(streamed), "last": kinds[-1]}

    assert post(app, "/async", "u-async", "pro").get_json() == {"streamed": True, "last": "message_stop"}
    assert [(r.body["model"], r.body["max_tokens"], r.body["system"]) for r in sim.requests] == \
        [("claude-sonnet-4-6", 90, "Tell it as pro.")] * 2
    ld.flush()
    sink.wait_for(lambda: len(sink.custom("$ld:ai:tokens:ttf")) == 2 and len(sink.custom(COST_EVENT)) == 2
                  and len(sink.custom("$ld:ai:generation:success")) == 2)
    ttft = sink.custom("$ld:ai:tokens:ttf")
    assert len({e["data"]["runId"] for e in ttft}) == 2
    assert all(e["context"]["key"] == "u-async" and e["data"]["variationKey"] == "sonnet" for e in ttft)
    assert all(e["metricValue"] > 0 for e in sink.custom(COST_EVENT))


def test_a_key_launchdarkly_does_not_know_serves_the_default(
        ld: LDClient, sim: Simulator, clock: FakeClock) -> None:
    default = AICompletionConfigDefault(enabled=True, model=ModelConfig("claude-sonnet-4-6"),
                                        messages=[LDMessage("system", "Fallback prompt for {{ldctx.plan}}.")])
    app, _ = make_app(LaunchDarklyFlags(ld), sim, clock, feature=ai_feature(
        "summarize", ai_config="no-such-config", max_tokens=200, ai_config_default=default))
    assert post(app, "/summarize", "u1", "pro").get_json() == {
        "model": "claude-sonnet-4-6", "system": "Fallback prompt for pro.", "variation": "",
        "source": "launchdarkly", "max_tokens": None}
    assert sim.requests[-1].body["max_tokens"] == 200
