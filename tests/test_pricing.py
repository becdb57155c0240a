"""Cost from usage against hand-computed figures, for every priced model."""

from __future__ import annotations

import pytest
from anthropic.types import Usage

from flask_claude import ConfigError, UnknownModel
from flask_claude.pricing import DEFAULT_PRICES, PriceTable

# (model, input, output, 5m write, 1h write, cache read) in USD per million tokens, from REFERENCE.md
HAND = [
    ("claude-opus-4-8", 5, 25, 6.25, 10, 0.50),
    ("claude-opus-4-7", 5, 25, 6.25, 10, 0.50),
    ("claude-opus-4-6", 5, 25, 6.25, 10, 0.50),
    ("claude-opus-4-5", 5, 25, 6.25, 10, 0.50),
    ("claude-sonnet-4-6", 3, 15, 3.75, 6, 0.30),
    ("claude-sonnet-4-5", 3, 15, 3.75, 6, 0.30),
    ("claude-haiku-4-5", 1, 5, 1.25, 2, 0.10),
]


def test_every_default_model_is_covered() -> None:
    assert {row[0] for row in HAND} == set(DEFAULT_PRICES)


@pytest.mark.parametrize(("model", "inp", "out", "w5", "w1", "read"), HAND)
def test_cost_with_cache_read_and_write(model: str, inp: float, out: float, w5: float, w1: float,
                                        read: float) -> None:
    usage = Usage(input_tokens=1200, output_tokens=350, cache_read_input_tokens=8000,
                  cache_creation_input_tokens=3000,
                  cache_creation={"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 1000})
    expected = (1200 * inp + 350 * out + 2000 * w5 + 1000 * w1 + 8000 * read) / 1_000_000
    cost = PriceTable().cost(model, usage)
    assert cost.usd == pytest.approx(expected, rel=1e-12)
    assert PriceTable().cost(model, usage, batch=True).usd == pytest.approx(expected / 2, rel=1e-12)


def test_cache_write_without_breakdown_is_five_minute() -> None:
    usage = {"input_tokens": 10, "output_tokens": 0, "cache_creation_input_tokens": 1000}
    assert PriceTable().cost("claude-sonnet-4-6", usage).usd == pytest.approx((10 * 3 + 1000 * 3.75) / 1e6)


def test_batch_service_tier_is_half_price() -> None:
    usage = Usage(input_tokens=1000, output_tokens=1000, service_tier="batch")
    assert PriceTable().cost("claude-haiku-4-5", usage).usd == pytest.approx((1000 + 5000) / 1e6 / 2)


def test_dated_ids_use_the_family_price_and_unknown_models_are_refused() -> None:
    table = PriceTable()
    assert table.price("claude-sonnet-4-5-20250929") == table.price("claude-sonnet-4-5")
    with pytest.raises(UnknownModel, match="claude-haiku-4-5"):
        table.cost("claude-sonnet-latest", {"input_tokens": 1, "output_tokens": 1})


def test_overrides_change_one_rate_and_add_models() -> None:
    table = PriceTable({"claude-opus-4-7": {"cache_read": 1.0}, "claude-future-5": {"input": 2, "output": 10}})
    assert table.price("claude-opus-4-7").cache_read == 1.0 and table.price("claude-opus-4-7").input == 5
    future = table.price("claude-future-5")
    assert (future.input, future.output, future.cache_read) == (2, 10, pytest.approx(0.2))
    with pytest.raises(ConfigError, match="claude-x"):
        PriceTable({"claude-x": {"input": 1, "outptu": 2}})


def test_worst_case_uses_the_dearest_model_and_rate() -> None:
    worst = PriceTable().worst_case_usd(["claude-haiku-4-5", "claude-opus-4-7"], 1000, 500)
    assert worst == pytest.approx((1000 * 10 + 500 * 25) / 1e6)
