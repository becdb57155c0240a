"""Decorators, pipeline and flags end to end: Flask test client -> pipeline -> real SDK -> simulator."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest
from flask import Blueprint, Flask, request
from flask.views import MethodView
from ldclient import Config, LDClient
from ldclient.integrations.test_data import TestData

from flask_claude import Claude, ai_feature, budgeted, fallback_to
from flask_claude.flags import EnvFlags, LaunchDarklyFlags, StaticFlags
from flask_claude.simulator import Simulator
from flask_claude.testing import CallLog

from .conftest import SECRET_KEY, FakeClock

FALLBACK = {"summary": None, "notice": "Summaries are paused; try again soon."}


def _summarize_view() -> Any:
    text = request.get_json()["text"]
    msg = Claude().messages.create(model="claude-opus-4-7", max_tokens=400,
                                         messages=[{"role": "user", "content": text}])
    return {"summary": msg.content[0].text}


def build_app(sim: Simulator, clock: FakeClock, flags: Any, order: tuple[str, ...] = ("feature", "budget", "fallback"),
              **config: Any) -> Flask:
    app = Flask("features")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"],
                      CLAUDE_MAX_RETRIES=1, CLAUDE_FLAGS=flags, **config)
    Claude(app, simulator=sim, clock=clock)
    decorators = {
        "feature": ai_feature("summarize", max_input_chars=2000, require_complete=True),
        "budget": budgeted(requests="1000/minute"),
        "fallback": fallback_to(FALLBACK, status=503),
    }
    view = _summarize_view
    for name in reversed(order):
        view = decorators[name](view)
    app.add_url_rule("/summarize", view_func=view, methods=["POST"])
    return app


def post(app: Flask, text: str = "Summarise: the cat sat on the mat.") -> Any:
    return app.test_client().post("/summarize", json={"text": text})


ORDERS = list(itertools.permutations(("feature", "budget", "fallback")))
CASES = ["flag_off", "storm_529", "upstream_400", "input_too_large", "truncated"]


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_every_stacking_order_degrades_the_same(order: tuple[str, ...], sim: Simulator, clock: FakeClock,
                                                claude_log: CallLog) -> None:
    flags = StaticFlags()
    app = build_app(sim, clock, flags, order)
    outcomes = {}
    for case in CASES:
        sim.reset()
        flags.set("ai-summarize", case != "flag_off")
        text = "Summarise: the cat sat on the mat."
        if case == "storm_529":
            sim.fail(529)
        elif case == "upstream_400":
            sim.fail(400, message="messages: roles must alternate")
        elif case == "input_too_large":
            text = "x" * 5000
        elif case == "truncated":
            sim.truncate()
        claude_log.clear()
        response = post(app, text)
        body = response.get_data(as_text=True)
        for secret in ("req_sim", "roles must alternate", "Overloaded", SECRET_KEY, "Traceback"):
            assert secret not in body, (case, body)
        [event] = claude_log.events("feature_degraded")
        outcomes[case] = (response.status_code, response.get_json(), response.headers["X-Claude-Degraded"],
                          event["reason"])
    assert outcomes == {
        "flag_off": (503, FALLBACK, "feature_disabled", "feature_disabled"),
        "storm_529": (503, FALLBACK, "upstream_unavailable", "upstream_unavailable"),
        "upstream_400": (503, FALLBACK, "upstream_unavailable", "upstream_unavailable"),
        "input_too_large": (413, {"error": "input_too_large",
                                  "message": "The input is 5000 characters; this feature accepts at most 2000."},
                            "input_too_large", "input_too_large"),
        "truncated": (503, FALLBACK, "truncated", "truncated"),
    }


def test_input_too_large_never_reaches_upstream(sim: Simulator, clock: FakeClock) -> None:
    app = build_app(sim, clock, StaticFlags())
    response = post(app, "y" * 2_000_000)
    assert response.status_code == 413
    assert sim.requests == []


def _flip_and_check(app: Flask, set_flag: Any, claude_log: CallLog) -> None:
    assert post(app).status_code == 200
    set_flag(False)
    off = post(app)
    assert (off.status_code, off.get_json(), off.headers["X-Claude-Degraded"]) == (503, FALLBACK, "feature_disabled")
    set_flag(True)
    on = post(app)
    assert on.status_code == 200 and on.get_json()["summary"]
    assert "X-Claude-Degraded" not in on.headers


def test_launchdarkly_testdata_flip_acts_on_the_next_request(sim: Simulator, clock: FakeClock,
                                                             claude_log: CallLog) -> None:
    td = TestData.data_source()
    td.update(td.flag("ai-summarize").variation_for_all(True))
    client = LDClient(Config("any-key", update_processor_class=td, send_events=False, diagnostic_opt_out=True),
                      start_wait=0)
    try:
        app = build_app(sim, clock, LaunchDarklyFlags(client=client))
        _flip_and_check(app, lambda on: td.update(td.flag("ai-summarize").variation_for_all(on)), claude_log)
        # the global switch kills every feature
        td.update(td.flag("ai-enabled").variation_for_all(False))
        assert post(app).headers["X-Claude-Degraded"] == "feature_disabled"
    finally:
        client.close()


def test_env_flags_flip_without_restart(sim: Simulator, clock: FakeClock, claude_log: CallLog,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    app = build_app(sim, clock, "env")

    def set_flag(on: bool) -> None:
        monkeypatch.setenv("CLAUDE_FLAG_AI_SUMMARIZE", "on" if on else "off")

    _flip_and_check(app, set_flag, claude_log)
    monkeypatch.setenv("AI_KILL_SWITCH", "on")
    assert post(app).headers["X-Claude-Degraded"] == "feature_disabled"
    monkeypatch.delenv("AI_KILL_SWITCH")
    assert post(app).status_code == 200
    assert isinstance(app.extensions["claude"].flags, EnvFlags)


def test_static_flags_flip_at_runtime(sim: Simulator, clock: FakeClock, claude_log: CallLog) -> None:
    flags = StaticFlags({"ai-summarize": True})
    app = build_app(sim, clock, flags)
    _flip_and_check(app, lambda on: flags.set("ai-summarize", on), claude_log)


def test_unreachable_launchdarkly_starts_fast_and_uses_the_default(sim: Simulator, clock: FakeClock,
                                                                   unreachable_ld_config: Any) -> None:
    started = time.monotonic()
    flags = LaunchDarklyFlags(sdk_key="sdk-unreachable", start_wait=0.5, config_factory=unreachable_ld_config)
    app = build_app(sim, clock, flags)
    first = post(app)
    second = post(app)
    elapsed = time.monotonic() - started
    flags.close()
    assert first.status_code == 200 and second.status_code == 200
    assert elapsed < 0.5 + 2.0, elapsed


@pytest.fixture
def unreachable_ld_config() -> Any:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"

    def factory() -> Config:
        return Config("sdk-unreachable", base_uri=url, stream_uri=url, events_uri=url, send_events=False,
                      diagnostic_opt_out=True)

    return factory


def test_launchdarkly_targets_by_user_attributes_and_picks_the_model(sim: Simulator, clock: FakeClock) -> None:
    td = TestData.data_source()
    td.update(td.flag("ai-summarize").variation_for_all(True))
    td.update(td.flag("summarize-model").variations("claude-sonnet-4-6", "claude-haiku-4-5")
              .fallthrough_variation(0).if_match("plan", "pro").then_return(1))
    client = LDClient(Config("any-key", update_processor_class=td, send_events=False, diagnostic_opt_out=True),
                      start_wait=0)
    app = Flask("targeting")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_FLAGS=LaunchDarklyFlags(client=client),
                      CLAUDE_MODELS=["claude-sonnet-4-6"])
    claude = Claude(app, simulator=sim, clock=clock)

    @claude.user_loader
    def load_user() -> Any:
        return request.headers["X-Test-User"], {"plan": request.headers["X-Test-Plan"]}

    @app.post("/ask")
    @ai_feature("summarize", model_flag="summarize-model")
    def ask() -> Any:
        msg = claude.messages.create(max_tokens=50, messages=[{"role": "user", "content": "hi"}])
        return {"model": msg.model}

    c = app.test_client()
    pro = c.post("/ask", headers={"X-Test-User": "u1", "X-Test-Plan": "pro"}).get_json()
    free = c.post("/ask", headers={"X-Test-User": "u2", "X-Test-Plan": "free"}).get_json()
    client.close()
    assert (pro["model"], free["model"]) == ("claude-haiku-4-5", "claude-sonnet-4-6")


def test_fallback_callable_gets_the_view_arguments(sim: Simulator, clock: FakeClock) -> None:
    app = Flask("callable")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MAX_RETRIES=0)
    claude = Claude(app, simulator=sim, clock=clock)

    def plain(doc_id: int) -> Any:
        return {"summary": f"first paragraph of {doc_id}", "ai": False}

    @app.get("/docs/<int:doc_id>/summary")
    @fallback_to(plain)
    @ai_feature("docs")
    def summary(doc_id: int) -> Any:
        msg = claude.messages.create(max_tokens=50, messages=[{"role": "user", "content": f"doc {doc_id}"}])
        return {"summary": msg.content[0].text, "ai": True}

    sim.fail(529)
    response = app.test_client().get("/docs/7/summary")
    assert response.status_code == 503
    assert response.get_json() == {"summary": "first paragraph of 7", "ai": False}


def _cached_app(sim: Simulator, clock: FakeClock) -> Flask:
    """``/summarize`` with ``fallback_to(cache=True, cache_ttl=60)``, on the fake clock."""
    app = Flask("cached")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MAX_RETRIES=0)
    claude = Claude(app, simulator=sim, clock=clock)

    @app.post("/summarize")
    @ai_feature("summarize")
    @fallback_to(FALLBACK, cache=True, cache_ttl=60)
    def summarize() -> Any:
        msg = claude.messages.create(max_tokens=50, messages=[{"role": "user", "content": request.json["text"]}])
        return {"summary": msg.content[0].text}

    return app


def test_fallback_cache_serves_the_last_good_response_while_fresh(sim: Simulator, clock: FakeClock) -> None:
    c = _cached_app(sim, clock).test_client()
    good = c.post("/summarize", json={"text": "alpha"}).get_json()
    sim.fail(529)
    cached = c.post("/summarize", json={"text": "alpha"})
    other = c.post("/summarize", json={"text": "beta"})
    assert cached.get_json() == good and cached.headers["X-Claude-Degraded"] == "upstream_unavailable"
    assert other.get_json() == FALLBACK


def test_fallback_cache_expires_on_the_injected_clock(sim: Simulator, clock: FakeClock) -> None:
    """The cache's TTL is read on the app's clock: moving it past ``cache_ttl`` expires the entry."""
    c = _cached_app(sim, clock).test_client()
    good = c.post("/summarize", json={"text": "alpha"}).get_json()
    sim.fail(529)
    clock.advance(59)
    assert c.post("/summarize", json={"text": "alpha"}).get_json() == good  # still fresh at 59 s
    clock.advance(2)
    stale = c.post("/summarize", json={"text": "alpha"})
    assert stale.get_json() == FALLBACK and stale.headers["X-Claude-Degraded"] == "upstream_unavailable"


def test_fallback_that_raises_still_degrades_cleanly(sim: Simulator, clock: FakeClock) -> None:
    app = Flask("broken_fallback")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MAX_RETRIES=0)
    claude = Claude(app, simulator=sim, clock=clock)

    def broken() -> Any:
        raise RuntimeError("database down too")

    @app.get("/x")
    @ai_feature("x")
    @fallback_to(broken)
    def x() -> Any:
        return claude.messages.create(max_tokens=5, messages=[{"role": "user", "content": "x"}]).content[0].text

    sim.fail(500)
    response = app.test_client().get("/x")
    assert response.status_code == 503 and response.headers["X-Claude-Degraded"] == "upstream_unavailable"
    assert "database down" not in response.get_data(as_text=True)


def test_blueprint_and_class_based_views(sim: Simulator, clock: FakeClock, claude_log: CallLog) -> None:
    claude = Claude()
    bp = Blueprint("ai", __name__, url_prefix="/ai")

    @bp.post("/echo")
    @ai_feature("echo")
    @fallback_to("echo is off")
    def echo() -> Any:
        return claude.messages.create(max_tokens=50, messages=[{"role": "user", "content": "echo: hello"}]) \
            .content[0].text

    class Classify(MethodView):
        decorators = [ai_feature("classify", models=["claude-haiku-4-5"]), fallback_to({"label": "unknown"})]

        def post(self) -> Any:
            msg = claude.messages.create(max_tokens=20, messages=[{"role": "user", "content": "classify me"}])
            return {"label": msg.content[0].text[:10], "model": msg.model}

    flags = StaticFlags()
    app = Flask("bp")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_FLAGS=flags)
    claude._objects.update(simulator=sim, clock=clock)
    claude.init_app(app)
    app.register_blueprint(bp)
    app.add_url_rule("/classify", view_func=Classify.as_view("classify"))
    c = app.test_client()
    assert c.post("/ai/echo").get_data(as_text=True) == "hello"
    assert c.post("/classify").get_json()["model"] == "claude-haiku-4-5"
    flags.set("ai-echo", False)
    flags.set("ai-classify", False)
    off = c.post("/ai/echo")
    assert (off.status_code, off.get_data(as_text=True)) == (503, "echo is off")
    assert c.post("/classify").get_json() == {"label": "unknown"}
    calls = claude_log.events("claude_api_call")
    assert [(e["feature"], e["route"]) for e in calls] == [("echo", "/ai/echo"), ("classify", "/classify")]


def test_undecorated_route_still_degrades_instead_of_500(make_app, sim: Simulator) -> None:
    app = make_app(CLAUDE_MAX_RETRIES=0)

    @app.get("/plain")
    def plain() -> Any:
        return app.extensions["claude"].messages.create(
            max_tokens=5, messages=[{"role": "user", "content": "x"}]).content[0].text

    sim.fail(529)
    response = app.test_client().get("/plain")
    assert response.status_code == 503 and response.headers["X-Claude-Degraded"] == "upstream_unavailable"
    assert json.loads(response.get_data())["error"] == "upstream_unavailable"


def test_two_apps_from_one_factory_keep_flags_and_caps_apart(sim: Simulator, clock: FakeClock) -> None:
    claude = Claude(simulator=sim, clock=clock)

    def create_app(cap: int, flags: StaticFlags) -> Flask:
        app = Flask(f"factory{cap}")
        app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MAX_TOKENS_CAP=cap, CLAUDE_FLAGS=flags)
        claude.init_app(app)

        @app.post("/go")
        @ai_feature("go")
        def go() -> Any:
            claude.messages.create(max_tokens=4000, messages=[{"role": "user", "content": "go"}])
            return "ok"

        return app

    flags_a, flags_b = StaticFlags(), StaticFlags({"ai-go": False})
    app_a, app_b = create_app(111, flags_a), create_app(222, flags_b)
    assert app_a.test_client().post("/go").status_code == 200
    assert app_b.test_client().post("/go").status_code == 503
    flags_b.set("ai-go", True)
    assert app_b.test_client().post("/go").status_code == 200
    assert [r.body["max_tokens"] for r in sim.requests] == [111, 222]


def test_user_key_is_never_taken_from_a_client_header(sim: Simulator, clock: FakeClock,
                                                      claude_log: CallLog) -> None:
    app = Flask("users")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_HASH_USERS=False)
    claude = Claude(app, simulator=sim, clock=clock)

    @app.get("/who")
    @ai_feature("who")
    def who() -> Any:
        claude.messages.create(max_tokens=5, messages=[{"role": "user", "content": "x"}])
        return "ok"

    app.test_client().get("/who", headers={"X-Forwarded-For": "6.6.6.6", "X-User-Id": "admin"},
                          environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert claude_log.events("claude_api_call")[0]["user"] == "10.1.2.3"


def test_model_flag_outranks_the_code_model_and_plain_routes_use_the_degraded_status(
        sim: Simulator, clock: FakeClock) -> None:
    flags = StaticFlags({"summarize-model": "claude-haiku-4-5"})
    app = Flask("flag_model")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_FLAGS=flags, CLAUDE_MAX_RETRIES=0, CLAUDE_DEGRADED_STATUS=502)
    claude = Claude(app, simulator=sim, clock=clock)

    @app.post("/s")
    @ai_feature("summarize", model_flag="summarize-model")
    def s() -> Any:
        return {"model": claude.messages.create(model="claude-opus-4-7", max_tokens=20,
                                                messages=[{"role": "user", "content": "x"}]).model}

    @app.get("/plain")
    def plain() -> Any:
        return claude.messages.create(max_tokens=5, messages=[{"role": "user", "content": "x"}]).content[0].text

    assert app.test_client().post("/s").get_json() == {"model": "claude-haiku-4-5"}
    flags.set("summarize-model", "")
    assert app.test_client().post("/s").get_json() == {"model": "claude-opus-4-7"}
    sim.fail(529)
    assert app.test_client().get("/plain").status_code == 502


def test_async_views_are_guarded_like_sync_views(sim: Simulator, clock: FakeClock, claude_log: CallLog) -> None:
    """``async def`` views run through ``ensure_sync``: the same answer, degradation and header."""
    flags = StaticFlags()
    app = Flask("async_views")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=["claude-opus-4-7", "claude-sonnet-4-6"],
                      CLAUDE_MAX_RETRIES=0, CLAUDE_FLAGS=flags)
    Claude(app, simulator=sim, clock=clock)

    @app.post("/summarize")
    @fallback_to(FALLBACK, status=503)
    @ai_feature("summarize", max_input_chars=2000)
    @budgeted(requests="2/minute")
    async def summarize() -> Any:
        return _summarize_view()

    c = app.test_client()
    ok = c.post("/summarize", json={"text": "Summarise: the cat sat on the mat."})
    assert ok.status_code == 200 and ok.get_json()["summary"]
    assert len(claude_log.events("claude_api_call")) == 1
    flags.set("ai-summarize", False)
    off = c.post("/summarize", json={"text": "x"})
    assert off.status_code == 503 and off.headers["X-Claude-Degraded"] == "feature_disabled"
    assert off.get_json() == FALLBACK
    flags.set("ai-summarize", True)
    assert c.post("/summarize", json={"text": "again"}).status_code == 200
    limited = c.post("/summarize", json={"text": "over the limit"})
    assert limited.status_code == 429 and limited.headers["X-Claude-Degraded"] == "rate_limited"
