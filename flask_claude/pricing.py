"""Prices as data, and the cost of one usage record.

Prices change and newer model families break the "cache read = 0.1 x input" rule, so every rate is
a number in ``DEFAULT_PRICES`` that ``CLAUDE_PRICES`` can override per model, never arithmetic in
code. A model without a price is refused: counting it as $0 would let it slip past every budget.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import ConfigError, UnknownModel

BATCH_DISCOUNT = 0.5
_PER_TOKEN = 1e-6  # table values are USD per million tokens


@dataclass(frozen=True)
class Price:
    """USD per million tokens for each kind of token a call can be billed for."""

    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    batch_discount: float = BATCH_DISCOUNT


_OPUS = Price(input=5.0, output=25.0, cache_write_5m=6.25, cache_write_1h=10.0, cache_read=0.50)
_SONNET = Price(input=3.0, output=15.0, cache_write_5m=3.75, cache_write_1h=6.0, cache_read=0.30)
_HAIKU = Price(input=1.0, output=5.0, cache_write_5m=1.25, cache_write_1h=2.0, cache_read=0.10)

# Official list prices, November 2026.
DEFAULT_PRICES: Mapping[str, Price] = {
    "claude-opus-4-8": _OPUS,
    "claude-opus-4-7": _OPUS,
    "claude-opus-4-6": _OPUS,
    "claude-opus-4-5": _OPUS,
    "claude-sonnet-4-6": _SONNET,
    "claude-sonnet-4-5": _SONNET,
    "claude-haiku-4-5": _HAIKU,
}

# Models that accept a task budget (beta ``task-budgets-2026-03-13``): data, like the prices.
TASK_BUDGET_MODELS = frozenset({"claude-opus-4-7", "claude-opus-4-8"})
TASK_BUDGET_BETA = "task-budgets-2026-03-13"

_DATED = re.compile(r"^(?P<base>.+)-\d{8}$")


@dataclass(frozen=True)
class Cost:
    """One call's bill, split so the log can say where the money went."""

    usd: float
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int


def _get(usage: Any, name: str) -> Any:
    if isinstance(usage, Mapping):
        return usage.get(name)
    return getattr(usage, name, None)


class PriceTable:
    """The defaults merged with the app's ``CLAUDE_PRICES`` overrides."""

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        self._prices: dict[str, Price] = dict(DEFAULT_PRICES)
        for model, spec in (overrides or {}).items():
            self._prices[model] = self._parse_override(model, spec)

    @staticmethod
    def _parse_override(model: str, spec: Any) -> Price:
        key = f"CLAUDE_PRICES[{model!r}]"
        if isinstance(spec, Price):
            return spec
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{key} must be a dict such as {{'input': 3, 'output': 15}} (USD per million tokens)")
        names = {f.name for f in fields(Price)}
        unknown = set(spec) - names
        if unknown:
            raise ConfigError(f"{key} has unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
        base = DEFAULT_PRICES.get(model)
        if base is None and not {"input", "output"} <= set(spec):
            raise ConfigError(f"{key} is a new model: give at least 'input' and 'output' prices")
        values: dict[str, float] = {}
        for name, value in spec.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{key}[{name!r}] must be a non-negative number, got {value!r}")
            values[name] = float(value)
        if base is None:
            # A new model without cache prices gets the usual multipliers rather than free caching.
            inp = values["input"]
            base = Price(input=inp, output=values["output"], cache_write_5m=inp * 1.25,
                         cache_write_1h=inp * 2, cache_read=inp * 0.1)
        return replace(base, **values)

    @property
    def known_models(self) -> list[str]:
        return sorted(self._prices)

    def price(self, model: str) -> Price:
        """The price of ``model``; a dated id (``claude-sonnet-4-5-20250929``) uses its family's price."""
        price = self._prices.get(model)
        if price is None:
            match = _DATED.match(model)
            if match:
                price = self._prices.get(match["base"])
        if price is None:
            raise UnknownModel(
                f"Model {model!r} has no price, so its cost cannot be counted against budgets. "
                f"Use a pinned model id ({', '.join(self.known_models)}) or add its price to CLAUDE_PRICES.",
                reason="unknown_model",
            )
        return price

    def check(self, models: Iterable[str]) -> None:
        for model in models:
            self.price(model)

    def cost(self, model: str, usage: Any, *, batch: bool = False) -> Cost:
        """USD for a usage record (an SDK ``Usage`` or a dict of the same fields)."""
        price = self.price(model)
        input_tokens = int(_get(usage, "input_tokens") or 0)
        output_tokens = int(_get(usage, "output_tokens") or 0)
        cache_read = int(_get(usage, "cache_read_input_tokens") or 0)
        cache_creation = int(_get(usage, "cache_creation_input_tokens") or 0)
        breakdown = _get(usage, "cache_creation")
        write_1h = int(_get(breakdown, "ephemeral_1h_input_tokens") or 0) if breakdown is not None else 0
        write_5m = cache_creation - write_1h if cache_creation >= write_1h else 0
        usd = _PER_TOKEN * (
            input_tokens * price.input
            + output_tokens * price.output
            + write_5m * price.cache_write_5m
            + write_1h * price.cache_write_1h
            + cache_read * price.cache_read
        )
        if batch or _get(usage, "service_tier") == "batch":
            usd *= price.batch_discount
        return Cost(usd=usd, input_tokens=input_tokens, output_tokens=output_tokens,
                    cache_read_input_tokens=cache_read, cache_creation_input_tokens=cache_creation)

    def worst_case_usd(self, models: Iterable[str], input_tokens: int, max_tokens: int,
                       *, batch: bool = False, cache_write: bool = True) -> float:
        """An upper bound for one call across a model chain: what a budget must hold back.

        With ``cache_write`` (the request carries ``cache_control``) input is priced at the dearest
        of input and cache-write rates, since the prompt may be written to the cache.
        """
        worst = 0.0
        for model in models:
            p = self.price(model)
            input_rate = max(p.input, p.cache_write_5m, p.cache_write_1h) if cache_write else p.input
            usd = _PER_TOKEN * (input_tokens * input_rate + max_tokens * p.output)
            if batch:
                usd *= p.batch_discount
            worst = max(worst, usd)
        return worst
