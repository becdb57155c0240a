"""Pacing from the upstream's rate-limit headers and the concurrency cap, through the real SDK and the
simulator's rate limiter (real ``anthropic-ratelimit-*`` headers, real 429s), on both stores."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from flask_claude import RateLimitedUpstream, ai_feature
from flask_claude.pacing import Ask, parse_headers
from flask_claude.simulator import Simulator
from flask_claude.storage import make_store
from flask_claude.testing import CallLog

from .conftest import FakeClock, user_msg

OPUS, SONNET = "claude-opus-4-7", "claude-sonnet-4-6"


@pytest.fixture
def sim(clock: FakeClock) -> Simulator:
    """The simulator on the test's clock: its buckets refill as the fake clock moves."""
    return Simulator(clock=clock)


def create(app: Any, **kwargs: Any) -> Any:
    params = {"max_tokens": 100, "messages": user_msg("Summarise the plot of Hamlet.")} | kwargs
    with app.app_context():
        return app.extensions["claude"].messages.create(**params)


def test_headers_parse_into_quotas(sim: Simulator, clock: FakeClock) -> None:
    sim.rate_limit(requests=10, output_tokens=1000, window=60)
    client = anthropic.Anthropic(api_key="k", base_url="http://sim", max_retries=0,
                                 http_client=__import__("httpx2").Client(transport=sim.transport()))
    raw = client.messages.with_raw_response.create(model=OPUS, max_tokens=100, messages=user_msg("hi"))
    quotas = parse_headers(raw.headers, clock.time())
    assert set(quotas) == {"requests", "output-tokens"}  # "tokens" is the tighter of the two, not its own
    assert quotas["requests"].limit == 10 and quotas["requests"].remaining == 9
    assert quotas["requests"].reset_in == pytest.approx(6.0)  # one request refills in 60/10 s
    assert quotas["output-tokens"].remaining > 900  # pre-charged at max_tokens, the unused part given back


def test_wait_paces_instead_of_meeting_a_429(make_app, sim: Simulator, clock: FakeClock, storage_uri: str) -> None:
    limit = sim.rate_limit(requests=4, window=60, model=OPUS)
    app = make_app(CLAUDE_STORAGE_URI=storage_uri, CLAUDE_PACING_WAIT=60)
    for _ in range(6):
        assert create(app, model=OPUS).model == OPUS
    assert limit.limited == 0  # the upstream never had to refuse
    assert limit.admitted == 6
    assert clock.sleeps and all(s > 0 for s in clock.sleeps)  # the 5th and 6th waited for their turn


def test_off_meets_the_429s(make_app, sim: Simulator, clock: FakeClock) -> None:
    limit = sim.rate_limit(requests=4, window=60, model=OPUS)
    app = make_app(CLAUDE_PACING="off")
    for _ in range(6):
        assert create(app, model=OPUS).model == OPUS  # retried after the upstream's retry-after
    assert limit.limited >= 2


def test_fallback_goes_to_the_next_model(make_app, sim: Simulator, clock: FakeClock, claude_log: CallLog,
                                         storage_uri: str) -> None:
    limit = sim.rate_limit(requests=2, window=60, model=OPUS)
    app = make_app(CLAUDE_STORAGE_URI=storage_uri, CLAUDE_PACING="fallback")
    models = [create(app, model=OPUS).model for _ in range(4)]
    assert models == [OPUS, OPUS, SONNET, SONNET]
    assert limit.limited == 0 and clock.sleeps == []
    fallback = claude_log.events("model_fallback")[0]
    assert fallback["reason"] == "rate_limited_upstream" and fallback["attempts"] == 0


def test_a_wait_longer_than_allowed_degrades_with_429(make_app, sim: Simulator, clock: FakeClock,
                                                      claude_log: CallLog) -> None:
    limit = sim.rate_limit(requests=2, window=60)
    app = make_app(CLAUDE_PACING_WAIT=1, CLAUDE_MODELS=[OPUS])

    @app.route("/ask")
    @ai_feature("ask")
    def ask() -> Any:
        return {"text": app.extensions["claude"].messages.create(
            model=OPUS, max_tokens=50, messages=user_msg("hi")).content[0].text}

    client = app.test_client()
    assert client.get("/ask").status_code == 200
    assert client.get("/ask").status_code == 200
    response = client.get("/ask")
    assert response.status_code == 429
    assert response.headers["X-Claude-Degraded"] == "rate_limited_upstream"
    assert int(response.headers["Retry-After"]) >= 1
    assert limit.admitted == 2 and limit.limited == 0  # nothing was sent for the refused call
    assert claude_log.events("claude_api_error")[-1]["error_type"] == "rate_limited_upstream"
    with pytest.raises(RateLimitedUpstream):
        create(app, model=OPUS)


def test_concurrency_leases_queue_in_order_and_lapse(storage_uri: str, clock: FakeClock) -> None:
    """A lease nobody gives back (its worker was killed) lapses; waiters are served first come first."""
    store = make_store(storage_uri, prefix="pace-test", socket_timeout=1.0)
    pacing = store.pacing

    def ask(waiter: str) -> Ask:
        return Ask(OPUS, waiter, {"requests": 1}, max_wait=5.0, cap=1, lease_ttl=30.0, pace=True)

    now = clock.time()
    assert pacing.admit(ask("dead-worker"), now).granted  # never released
    first = pacing.admit(ask("a"), now)
    second = pacing.admit(ask("b"), now + 0.1)
    assert not first.granted and first.position == 1
    assert not second.granted and second.position == 2
    assert not pacing.admit(ask("b"), now + 0.5).granted  # still leased, and "a" is ahead
    for t in range(1, 30):  # both keep asking (a waiter that stops asking leaves the queue)
        assert not pacing.admit(ask("a"), now + t).granted and not pacing.admit(ask("b"), now + t).granted
    later = now + 30.5  # the lease lapsed; "b" asks first but "a" came first
    assert not pacing.admit(ask("b"), later).granted
    assert pacing.admit(ask("a"), later).granted
    pacing.release(OPUS, "a")
    store.flush()
    assert pacing.admit(ask("b"), later + 0.1).granted
    snap = pacing.snapshot([OPUS], later + 0.2)
    assert snap[OPUS]["leases"] == 1 and snap[OPUS]["queued"] == 0


def test_max_concurrency_queues_calls_above_it(make_app, sim: Simulator, clock: FakeClock, storage_uri: str) -> None:
    """A cap of 1 with a lease held elsewhere: the call waits its turn, then goes once the lease lapses."""
    app = make_app(CLAUDE_STORAGE_URI=storage_uri, CLAUDE_MAX_CONCURRENCY={OPUS: 1}, CLAUDE_PACING="off",
                   CLAUDE_PACING_WAIT=60, CLAUDE_DEADLINE=30)
    state = app.extensions["claude"]
    other = Ask(OPUS, "other-worker", {"requests": 1}, max_wait=0, cap=1, lease_ttl=3.0, pace=False)
    assert state.store.pacing.admit(other, clock.time()).granted
    assert create(app, model=OPUS).model == OPUS
    assert sum(clock.sleeps) >= 3.0  # queued until the other worker's lease lapsed
    state.store.flush()
    assert state.store.pacing.snapshot([OPUS], clock.time()).get(OPUS, {}).get("leases", 0) == 0  # back at settle


def test_status_and_metrics_show_the_pacing_state(make_app, sim: Simulator, clock: FakeClock) -> None:
    from flask_claude.status import collect_status, render_status

    sim.rate_limit(requests=50, output_tokens=20_000, window=60, model=OPUS)
    app = make_app(CLAUDE_MAX_CONCURRENCY=4)
    create(app, model=OPUS)
    state = app.extensions["claude"]
    with app.app_context():
        status = collect_status(state, app)
    entry = status["pacing"]["models"][OPUS]
    assert entry["limits"]["requests"]["limit"] == 50 and entry["limits"]["requests"]["remaining"] == 49
    assert entry["leases"] == 0 and entry["queued"] == 0
    assert "claude-opus-4-7: output-tokens" in render_status(status)
    from flask_claude.dashboard import _pacing

    assert "<td>claude-opus-4-7</td><td>output-tokens" in _pacing(status["pacing"])  # the dashboard's card

    from prometheus_client import CollectorRegistry, generate_latest

    from flask_claude.prometheus import ClaudeCollector

    registry = CollectorRegistry()
    registry.register(ClaudeCollector(app))
    text = generate_latest(registry).decode()
    assert 'flask_claude_ratelimit_remaining{dimension="requests",model="claude-opus-4-7"} 49.0' in text
    assert 'flask_claude_pacing_leases{model="claude-opus-4-7"} 0.0' in text


def test_settings_refuse_a_wrong_pacing(make_app) -> None:
    from flask_claude.errors import ConfigError

    with pytest.raises(ConfigError, match="CLAUDE_PACING"):
        make_app(CLAUDE_PACING="sometimes")
    with pytest.raises(ConfigError, match="CLAUDE_MAX_CONCURRENCY"):
        make_app(CLAUDE_MAX_CONCURRENCY={OPUS: 0})


def test_calls_let_through_before_the_first_report_are_not_forgotten(storage_uri: str, clock: FakeClock) -> None:
    """Two calls go before anything is known; the first report (from one of them) may not count the
    other yet, so it is taken off what the report says is left."""
    from flask_claude.pacing import Quota

    store = make_store(storage_uri, prefix="pace-unknown", socket_timeout=1.0)
    pacing = store.pacing
    now = clock.time()
    need = {"requests": 1}
    first = pacing.admit(Ask(OPUS, "a", need, 0.0, None, 30.0, True), now)
    second = pacing.admit(Ask(OPUS, "b", need, 0.0, None, 30.0, True), now)
    assert first.granted and not first.known and second.granted and not second.known
    # "a"'s reply: 3 left of 4 (the upstream counted "a" only); "b" is still in doubt
    pacing.observe(OPUS, {"requests": Quota(4, 3, 15.0)}, now, counted=need)
    store.flush()
    assert pacing.snapshot([OPUS], now)[OPUS]["limits"]["requests"]["remaining"] == 2
    for waiter in "cd":  # the two left
        answer = pacing.admit(Ask(OPUS, waiter, need, 0.0, None, 30.0, True), now)
        assert answer.granted and answer.known
    refused = pacing.admit(Ask(OPUS, "e", need, 0.0, None, 30.0, True), now)
    # one missing at 4 a minute (the report was too full to tell the rate: the API's minute)
    assert not refused.granted and refused.wait == pytest.approx(15.0, rel=0.01)


def test_async_calls_wait_their_turn_too(make_app, sim: Simulator, clock: FakeClock) -> None:
    from flask_claude import Claude

    limit = sim.rate_limit(requests=4, window=60, model=OPUS)
    app = make_app(CLAUDE_PACING_WAIT=60)

    @app.post("/ask")
    @ai_feature("ask")
    async def ask() -> Any:
        models = [(await Claude().async_messages.create(model=OPUS, max_tokens=50, messages=user_msg("hi"))).model
                  for _ in range(5)]
        return {"models": models}

    assert app.test_client().post("/ask").get_json() == {"models": [OPUS] * 5}
    assert limit.limited == 0 and limit.admitted == 5
    assert clock.sleeps and max(clock.sleeps) > 1  # the fifth awaited its turn on the injected clock


def test_far_from_the_limit_a_call_asks_no_turn(make_app, sim: Simulator, redis_url: str,
                                                redis_server: Any) -> None:
    """Counted by Redis (reads of client sockets): while the last report leaves plenty, pacing costs no
    round trip (as with pacing off); near the limit every call asks the shared schedule again."""

    def reads() -> int:
        return int(redis_server.client.info("stats")["total_reads_processed"])

    def trips(pacing: str, prefix: str) -> int:
        app = make_app(CLAUDE_STORAGE_URI=redis_url, CLAUDE_PACING=pacing, CLAUDE_STORAGE_PREFIX=prefix,
                       CLAUDE_SETTLE_DELAY=30, CLAUDE_ALERT_EVAL_INTERVAL=3600)
        for _ in range(2):  # the model's first report
            create(app, model=OPUS)
        before = reads()
        for _ in range(5):
            create(app, model=OPUS)
        counted = reads() - before - 1  # - 1: the INFO read itself
        app.extensions["claude"].store.close()  # its background reads must not count in the next app's
        return counted

    sim.rate_limit(requests=1000, output_tokens=1_000_000, window=60, model=OPUS)
    plenty_off, plenty_wait = trips("off", "plenty-off"), trips("wait", "plenty-wait")
    # One step per call: the reservation (its settlement rides along). The count is the server's, so a
    # flusher thread of an earlier test's app may add one read: at most one more, never one per call.
    assert 5 <= plenty_off <= 6 and 5 <= plenty_wait <= 6
    sim.clear_rate_limits()
    sim.rate_limit(requests=12, window=60, model=OPUS)
    assert trips("wait", "near-wait") >= 10  # the reservation and at least one ask for a turn per call
