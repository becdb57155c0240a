"""Cost from usage against hand-typed figures for every priced model; bands, effective dates, reservations."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from anthropic.types import Usage
from flask import Flask

from flask_claude import BudgetExceeded, Claude, ConfigError, UnknownModel
from flask_claude.pricing import DEFAULT_PRICES, PRICES_INFO, PriceTable
from flask_claude.simulator import Simulator
from flask_claude.testing import CallLog
from flask_claude.tokens import upper_bound_tokens

from .conftest import FakeClock

# (model, band lower edge, input, output, 5m write, 1h write, cache read) in USD per million tokens, typed
# from the sources in prices.json (Anthropic's pricing and model pages, checked 2026-11-30), not read from it.
HAND = [
    ("claude-fable-5-2", 0, 8, 40, 10, 16, 0.20),
    ("claude-fable-5-1", 0, 10, 50, 12.50, 20, 0.25),
    ("claude-mythos-5-1", 0, 10, 50, 12.50, 20, 0.25),
    ("claude-opus-5-5", 0, 4, 20, 5, 8, 0.20),
    ("claude-sonnet-5-5", 0, 2, 10, 2.50, 4, 0.20),
    ("claude-haiku-5-5", 0, 0.10, 0.50, 0.125, 0.20, 0.01),
    ("claude-haiku-5-5", 100_000, 0.50, 2.50, 0.625, 1.00, 0.05),
    ("claude-opus-5", 0, 5, 25, 6.25, 10, 0.50),
    ("claude-sonnet-5", 0, 2, 10, 2.50, 4, 0.20),
    ("claude-fable-5", 0, 10, 50, 12.50, 20, 1.00),
    ("claude-mythos-5", 0, 10, 50, 12.50, 20, 1.00),
    ("claude-opus-4-8", 0, 5, 25, 6.25, 10, 0.50),
    ("claude-opus-4-7", 0, 5, 25, 6.25, 10, 0.50),
    ("claude-opus-4-6", 0, 5, 25, 6.25, 10, 0.50),
    ("claude-opus-4-5", 0, 5, 25, 6.25, 10, 0.50),
    ("claude-sonnet-4-6", 0, 3, 15, 3.75, 6, 0.30),
    ("claude-sonnet-4-5", 0, 3, 15, 3.75, 6, 0.30),
    ("claude-sonnet-4-5", 200_000, 6, 22.50, 7.50, 12, 0.60),
    ("claude-haiku-4-5", 0, 1, 5, 1.25, 2, 0.10),
    ("claude-opus-4-1", 0, 15, 75, 18.75, 30, 1.50),
    ("claude-opus-4-0", 0, 15, 75, 18.75, 30, 1.50),
    ("claude-sonnet-4-0", 0, 3, 15, 3.75, 6, 0.30),
    ("claude-sonnet-4-0", 200_000, 6, 22.50, 7.50, 12, 0.60),
    ("claude-3-7-sonnet-latest", 0, 3, 15, 3.75, 6, 0.30),
    ("claude-3-5-haiku-latest", 0, 0.80, 4, 1, 1.6, 0.08),
    ("claude-3-haiku-20240307", 0, 0.25, 1.25, 0.30, 0.50, 0.03),
    ("claude-3-opus-latest", 0, 15, 75, 18.75, 30, 1.50),
]

# All five token kinds. The small prompt (12,200 tokens) sits in every first band; the large one (220,000
# tokens, counting cache reads and writes) above every band edge in the table.
SMALL = {"input": 1200, "output": 350, "read": 8000, "w5": 2000, "w1": 1000}
LARGE = {"input": 150_000, "output": 4000, "read": 40_000, "w5": 20_000, "w1": 10_000}


def usage(t: dict[str, int], **extra: Any) -> Usage:
    return Usage(input_tokens=t["input"], output_tokens=t["output"], cache_read_input_tokens=t["read"],
                 cache_creation_input_tokens=t["w5"] + t["w1"],
                 cache_creation={"ephemeral_5m_input_tokens": t["w5"], "ephemeral_1h_input_tokens": t["w1"]},
                 **extra)


def by_hand(t: dict[str, int], inp: float, out: float, w5: float, w1: float, read: float) -> float:
    return (t["input"] * inp + t["output"] * out + t["w5"] * w5 + t["w1"] * w1 + t["read"] * read) / 1_000_000


def test_every_model_in_the_table_is_checked_by_hand_and_has_a_source() -> None:
    assert {row[0] for row in HAND} == set(DEFAULT_PRICES)
    for model, entry in DEFAULT_PRICES.items():
        assert entry.source and entry.source.startswith("https://"), model
        assert entry.checked == PRICES_INFO["checked"], model
        bands = {row[1] for row in HAND if row[0] == model}
        assert bands == {b.above for b in entry.periods[-1].bands}, model
    assert {m for m, e in DEFAULT_PRICES.items() if e.retired} >= {"claude-opus-4-1", "claude-3-haiku-20240307"}


@pytest.mark.parametrize(("model", "above", "inp", "out", "w5", "w1", "read"), HAND,
                         ids=[f"{r[0]}>{r[1]}" for r in HAND])
def test_cost_with_all_five_token_kinds(model: str, above: int, inp: float, out: float, w5: float, w1: float,
                                        read: float) -> None:
    banded = any(r[0] == model and r[1] for r in HAND)
    # A one-band model costs the same rates at any prompt size; a two-band one is checked in each band.
    cases = [LARGE] if above else ([SMALL] if banded else [SMALL, LARGE])
    table = PriceTable()
    for tokens in cases:
        expected = by_hand(tokens, inp, out, w5, w1, read)
        assert abs(table.cost(model, usage(tokens)).usd - expected) < 1e-9
        assert abs(table.cost(model, usage(tokens), batch=True).usd - expected / 2) < 1e-9


def test_aliases_and_dated_ids_price_as_their_model() -> None:
    table = PriceTable()
    for entry in DEFAULT_PRICES.values():
        for alias in entry.aliases:
            assert table.entry(alias) is entry
    assert table.price("claude-sonnet-4-5-20250929") == table.price("claude-sonnet-4-5")
    assert table.price("claude-haiku-5-5-20261007") == table.price("claude-haiku-5-5")
    with pytest.raises(UnknownModel, match="claude-haiku-5-5"):
        table.cost("claude-sonnet-latest", {"input_tokens": 1, "output_tokens": 1})


@pytest.mark.parametrize(("prompt", "rates"), [
    (100_000, (0.10, 0.50, 0.125, 0.20, 0.01)),
    (100_001, (0.50, 2.50, 0.625, 1.00, 0.05)),
])
def test_haiku_band_edge_counts_cache_reads_and_writes(prompt: int, rates: tuple[float, ...]) -> None:
    # The prompt is input + cache read + cache write: 100,000 is the last token of the first band.
    tokens = {"input": prompt - 70_000, "output": 900, "read": 50_000, "w5": 15_000, "w1": 5_000}
    cost = PriceTable().cost("claude-haiku-5-5", usage(tokens)).usd
    assert abs(cost - by_hand(tokens, *rates)) < 1e-9


def test_cache_write_without_breakdown_is_five_minute() -> None:
    usage = {"input_tokens": 10, "output_tokens": 0, "cache_creation_input_tokens": 1000}
    assert PriceTable().cost("claude-sonnet-4-6", usage).usd == pytest.approx((10 * 3 + 1000 * 3.75) / 1e6)


def test_batch_service_tier_is_half_price_in_either_band() -> None:
    table = PriceTable()
    assert table.cost("claude-haiku-4-5", Usage(input_tokens=1000, output_tokens=1000, service_tier="batch")).usd \
        == pytest.approx((1000 + 5000) / 1e6 / 2)
    long = {"input": 120_000, "output": 1000, "read": 0, "w5": 0, "w1": 0}
    assert abs(table.cost("claude-haiku-5-5", usage(long, service_tier="batch")).usd
               - by_hand(long, 0.50, 2.50, 0, 0, 0) / 2) < 1e-9


# --- effective dates -------------------------------------------------------------------------------

SONNET_CUT = {"prices": [
    {"input": 2, "output": 10, "cache_write_5m": 2.5, "cache_write_1h": 4, "cache_read": 0.20},
    {"from": "2026-10-07", "cache_read": 0.10},
]}


def test_an_effective_dated_change_prices_before_and_after_differently() -> None:
    table = PriceTable({"claude-sonnet-5-5": SONNET_CUT})
    change = datetime(2026, 10, 7, tzinfo=UTC).timestamp()
    tokens = dict(SMALL)
    before = table.cost("claude-sonnet-5-5", usage(tokens), at=change - 1).usd
    after = table.cost("claude-sonnet-5-5", usage(tokens), at=change).usd
    assert abs(before - by_hand(tokens, 2, 10, 2.5, 4, 0.20)) < 1e-9
    assert abs(after - by_hand(tokens, 2, 10, 2.5, 4, 0.10)) < 1e-9
    # The default table does not apply the unconfirmed cut.
    assert PriceTable().price("claude-sonnet-5-5", at=change + 86_400).cache_read == 0.20


def test_dated_bands_carry_over_and_can_change() -> None:
    table = PriceTable({"claude-haiku-5-5": {"prices": [
        {"input": 0.1, "output": 0.5, "bands": [{"above": 100_000, "input": 0.5, "output": 2.5}]},
        {"from": "2030-01-01T12:00:00", "output": 0.4},
        {"from": "2031-01-01", "bands": [{"above": 50_000, "input": 0.3, "output": 1.5}]},
    ]}})
    t2030 = datetime(2030, 1, 1, 12, tzinfo=UTC).timestamp()
    t2031 = datetime(2031, 1, 1, tzinfo=UTC).timestamp()
    assert table.price("claude-haiku-5-5", at=t2030 - 1).output == 0.5
    assert table.price("claude-haiku-5-5", at=t2030).output == 0.4
    assert table.price("claude-haiku-5-5", at=t2030, prompt_tokens=100_001).output == 2.5
    assert table.price("claude-haiku-5-5", at=t2031, prompt_tokens=60_000).output == 1.5
    assert table.price("claude-haiku-5-5", at=t2031, prompt_tokens=100_001).output == 1.5


def test_a_call_is_priced_at_the_price_in_force_on_the_apps_clock(tmp_path: Any, sim: Simulator) -> None:
    now = datetime.now(UTC)
    change = (now + timedelta(days=1)).date()
    clock = FakeClock(now.timestamp())
    app = Flask("dated")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=["claude-sonnet-5-5"],
                      CLAUDE_LOG_PATH=str(tmp_path / "claude.jsonl"), CLAUDE_PRICES={"claude-sonnet-5-5": {"prices": [
                          {"input": 2, "output": 10},
                          {"from": change.isoformat(), "input": 1, "output": 5}]}})
    claude = Claude(app, simulator=sim, clock=clock)
    messages = [{"role": "user", "content": "echo: same words, same tokens"}]
    with app.test_request_context():
        claude.messages.create(max_tokens=50, messages=messages)
        clock.advance(2 * 86_400)
        claude.messages.create(max_tokens=50, messages=messages)
    calls = [json.loads(line) for line in (tmp_path / "claude.jsonl").read_text().splitlines()]
    calls = [c for c in calls if c["event"] == "claude_api_call"]
    assert calls[0]["input_tokens"] == calls[1]["input_tokens"]
    first, second = (c["input_tokens"] * r[0] / 1e6 + c["output_tokens"] * r[1] / 1e6
                     for c, r in zip(calls, [(2, 10), (1, 5)], strict=True))
    assert [c["cost_usd"] for c in calls] == [round(first, 8), round(second, 8)]
    assert calls[0]["cost_usd"] == pytest.approx(2 * calls[1]["cost_usd"])


# --- overrides -------------------------------------------------------------------------------------


def test_overrides_change_one_rate_and_add_models() -> None:
    table = PriceTable({"claude-opus-4-7": {"cache_read": 1.0}, "claude-future-6": {"input": 2, "output": 10}})
    assert table.price("claude-opus-4-7").cache_read == 1.0 and table.price("claude-opus-4-7").input == 5
    future = table.price("claude-future-6")
    assert (future.input, future.output, future.cache_read) == (2, 10, pytest.approx(0.2))
    assert table.entry("claude-opus-4-7").overridden and not table.entry("claude-opus-4-8").overridden
    # A flat override of a banded model changes the first band; the upper band stays.
    banded = PriceTable({"claude-haiku-5-5": {"input": 0.2}})
    assert banded.price("claude-haiku-5-5").input == 0.2
    assert banded.price("claude-haiku-5-5", prompt_tokens=200_000).input == 0.5


@pytest.mark.parametrize(("spec", "message"), [
    ({"input": 1, "outptu": 2}, "outptu"),
    ({"input": -1, "output": 2}, "non-negative"),
    ({"input": 1}, "at least 'input' and 'output'"),
    ({"prices": [{"input": 1, "output": 2}, {"input": 3}]}, "needs 'from'"),
    ({"prices": [{"input": 1, "output": 2}, {"from": "next week", "input": 3}]}, "date"),
    ({"prices": [{"input": 1, "output": 2}, {"from": "2030-01-02", "input": 3}, {"from": "2030-01-01", "input": 4}]},
     "later than"),
    ({"input": 1, "output": 2, "bands": [{"above": 0, "input": 1, "output": 2}]}, "above"),
    ({"input": 1, "output": 2, "prices": []}, "not both"),
    ("cheap", "must be a dict"),
])
def test_bad_overrides_fail_naming_the_model(spec: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        PriceTable({"claude-x": spec})
    assert "claude-x" in str(info.value)


# --- reservations ----------------------------------------------------------------------------------


def test_worst_case_uses_the_dearest_model_and_rate() -> None:
    worst = PriceTable().worst_case_usd(["claude-haiku-4-5", "claude-opus-4-7"], 1000, 500)
    assert worst == pytest.approx((1000 * 10 + 500 * 25) / 1e6)


@pytest.mark.parametrize("bound", [100_001, 100_500, 250_000])
def test_worst_case_never_under_holds_a_call_in_the_upper_band(bound: int) -> None:
    table = PriceTable()
    worst = table.worst_case_usd(["claude-haiku-5-5"], bound, 2000, cache_write=True)
    # Any call whose prompt is within the bound: here the dearest split, all of it a 1h cache write.
    landed = table.cost("claude-haiku-5-5", {"input_tokens": 0, "output_tokens": 2000,
                                             "cache_creation_input_tokens": bound,
                                             "cache_creation": {"ephemeral_1h_input_tokens": bound}}).usd
    assert worst >= landed
    first_band_only = (bound * 0.20 + 2000 * 0.50) / 1e6
    assert landed > first_band_only  # what a band-blind reservation would have held
    assert table.worst_case_usd(["claude-haiku-5-5"], 100_000, 2000, cache_write=False) == pytest.approx(
        (100_000 * 0.10 + 2000 * 0.50) / 1e6)


def _haiku_app(sim: Simulator, clock: FakeClock, budget_usd: float) -> tuple[Flask, Claude]:
    app = Flask("haiku_band")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=["claude-haiku-5-5"], CLAUDE_LOG_PATH=os.devnull,
                      CLAUDE_DAILY_BUDGET_USD=budget_usd, CLAUDE_MAX_RETRIES=0)
    return app, Claude(app, simulator=sim, clock=clock)


LONG_PROMPT = "long context " * 30_000  # ~97,500 simulator tokens of text; the client's bound is ~195,000


def test_a_reservation_for_a_long_prompt_holds_the_upper_band(sim: Simulator, claude_log: CallLog) -> None:
    clock = FakeClock(datetime.now(UTC).timestamp())
    params = {"max_tokens": 64, "messages": [{"role": "user", "content": LONG_PROMPT}]}
    sim.pad_prompt(5_000)  # past 100,000 upstream; the client's bound (text only) is still far above that
    bound = upper_bound_tokens(params)
    lower_only = (bound * 0.10 + 64 * 0.50) / 1e6
    upper = (bound * 0.50 + 64 * 2.50) / 1e6
    # A budget a band-blind hold fits into, but the upper band's worst case does not: refused before sending.
    app, claude = _haiku_app(sim, clock, budget_usd=(lower_only + upper) / 2)
    with app.test_request_context(), pytest.raises(BudgetExceeded):
        claude.messages.create(**params)
    assert sim.requests == []
    # With room for the upper band, the call lands there and costs no more than was held.
    app, claude = _haiku_app(sim, clock, budget_usd=1.0)
    with app.test_request_context():
        reply = claude.messages.create(**params)
    prompt = reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0)
    assert prompt > 100_000
    call = claude_log.events("claude_api_call")[-1]
    assert call["cost_usd"] == round((reply.usage.input_tokens * 0.50 + reply.usage.output_tokens * 2.50) / 1e6, 8)
    assert call["cost_usd"] <= upper
    assert claude_log.events("reservation_exceeded") == []


def test_simulator_padding_reaches_usage_and_count_tokens(sim: Simulator, make_app: Any) -> None:
    app = make_app(CLAUDE_MODELS=["claude-haiku-5-5"])
    claude = app.extensions["claude"].extension
    sim.pad_prompt(100_000, model="claude-haiku-5-5")
    with app.test_request_context():
        reply = claude.messages.create(max_tokens=16, messages=[{"role": "user", "content": "echo: hi"}])
        counted = claude.messages.count_tokens(messages=[{"role": "user", "content": "echo: hi"}])
    assert reply.usage.input_tokens > 100_000 and counted.input_tokens == reply.usage.input_tokens
    sim.pad_prompt(0, model="claude-haiku-5-5")
    with app.test_request_context():
        reply = claude.messages.create(max_tokens=16, messages=[{"role": "user", "content": "echo: hi"}])
    assert reply.usage.input_tokens < 100


# --- flask claude prices ---------------------------------------------------------------------------


def test_prices_cli_lists_bands_sources_and_overrides(make_app: Any) -> None:
    app = make_app(CLAUDE_PRICES={"claude-sonnet-5-5": SONNET_CUT})
    runner = app.test_cli_runner()
    text = runner.invoke(args=["claude", "prices"])
    assert text.exit_code == 0, text.output
    assert "claude-haiku-5-5" in text.output and "prompt over 100,000 tokens" in text.output
    assert f"checked {PRICES_INFO['checked']}" in text.output
    assert "claude-opus-4-1  (retired)" in text.output
    one = runner.invoke(args=["claude", "prices", "--model", "claude-sonnet-5-5", "--json"])
    assert one.exit_code == 0, one.output
    data = json.loads(one.output)
    entry = data["models"]["claude-sonnet-5-5"]
    assert entry["overridden"] is True
    assert [p.get("from") for p in entry["prices"]] == [None, "2026-10-07"]
    assert [p["cache_read"] for p in entry["prices"]] == [0.2, 0.1]
    assert data["sources"]["pricing"].startswith("https://platform.claude.com/")
    dated = json.loads(runner.invoke(args=["claude", "prices", "--model", "claude-haiku-4-5-20251001",
                                           "--json"]).output)
    assert list(dated["models"]) == ["claude-haiku-4-5"]
    bad = runner.invoke(args=["claude", "prices", "--model", "claude-nope"])
    assert bad.exit_code == 2 and "no price for 'claude-nope'" in bad.output and "Traceback" not in bad.output


def test_report_over_an_old_log_sums_what_was_logged_not_todays_prices(tmp_path: Any) -> None:
    # Two calls logged under an older price (sonnet-5-5 input at $3/MTok, and a retired model): the report
    # adds the logged cost_usd and never re-prices tokens with the current table.
    log = tmp_path / "old.jsonl"
    lines = [{"ts": "2026-09-30T10:00:00+00:00", "event": "claude_api_call", "feature": "f", "route": "/f",
              "user": "u", "model": model, "requested_model": model, "input_tokens": 1_000_000,
              "output_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0,
              "latency_ms": 10.0, "retries": 0, "stop_reason": "end_turn", "cost_usd": usd}
             for model, usd in (("claude-sonnet-5-5", 3.0), ("claude-opus-4-1", 15.0))]
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    app = Flask("old_log")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_LOG_PATH=str(log), CLAUDE_MODELS=["claude-sonnet-5-5"])
    Claude(app)
    result = app.test_cli_runner().invoke(args=["claude", "report", "--since", "all", "--by", "model", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["totals"]["spend_usd"] == pytest.approx(18.0)
    assert data["groups"]["claude-sonnet-5-5"]["spend_usd"] == pytest.approx(3.0)  # today's table: $2


def test_a_batch_is_priced_when_it_was_submitted(tmp_path: Any, sim: Simulator, claude_log: CallLog) -> None:
    now = datetime.now(UTC)
    clock = FakeClock(now.timestamp())
    app = Flask("dated_batch")
    app.config.update(CLAUDE_SIMULATE=True, CLAUDE_MODELS=["claude-haiku-5-5"], CLAUDE_LOG_PATH=os.devnull,
                      CLAUDE_PRICES={"claude-haiku-5-5": {"prices": [
                          {"input": 0.1, "output": 0.5},
                          {"from": (now + timedelta(days=1)).date().isoformat(), "input": 1, "output": 5}]}})
    Claude(app, simulator=sim, clock=clock)
    requests = [{"custom_id": "r0", "params": {"max_tokens": 40, "messages": [{"role": "user", "content": "hi"}]}}]
    with app.app_context():
        batches = app.extensions["claude"].messages.batches
        batch = batches.create(requests=requests)
        clock.advance(2 * 86_400)  # the price changes while the batch runs
        while batches.retrieve(batch.id).processing_status != "ended":
            pass
        [result] = list(batches.results(batch.id))
    usage = result.result.message.usage
    [line] = [e for e in claude_log.events("claude_api_call") if e.get("batch_id") == batch.id]
    assert line["cost_usd"] == round((usage.input_tokens * 0.1 + usage.output_tokens * 0.5) / 1e6 / 2, 8)
