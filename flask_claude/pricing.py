"""The cost of one usage record, and the price table an app bills with (packaged prices plus
``CLAUDE_PRICES``). The data and its shape: ``price_data.py`` and ``prices.json``."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .clock import Clock
from .errors import ConfigError, UnknownModel
from .price_data import (  # noqa: F401  (re-exported: the public names of the price table)
    _PER_TOKEN,
    BATCH_DISCOUNT,
    DEFAULT_PRICES,
    PRICES_INFO,
    Band,
    ModelPrices,
    Period,
    Price,
    parse_entry,
)

# Models that accept a task budget (beta ``task-budgets-2026-03-13``): data, like the prices.
TASK_BUDGET_MODELS = frozenset({"claude-opus-4-7", "claude-opus-4-8"})
TASK_BUDGET_BETA = "task-budgets-2026-03-13"

_DATED = re.compile(r"^(?P<base>.+)-\d{8}$")


@dataclass(slots=True)
class Cost:
    """One call's bill, split so the log can say where the money went."""

    usd: float
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int


def _get(usage: Any, name: str) -> Any:
    if type(usage) is dict or isinstance(usage, Mapping):
        return usage.get(name)
    return getattr(usage, name, None)


class _UsageView:
    """An SDK ``Usage`` (or any object with the fields as attributes) read with ``.get``."""

    __slots__ = ("_usage",)

    def __init__(self, usage: Any) -> None:
        self._usage = usage

    def get(self, name: str) -> Any:
        return getattr(self._usage, name, None)


class PriceTable:
    """The packaged prices merged with the app's ``CLAUDE_PRICES`` overrides.

    ``clock`` is the app's clock: a call is priced at the price in force when it is made.
    """

    def __init__(self, overrides: Mapping[str, Any] | None = None, *, clock: Clock | None = None) -> None:
        self._clock = clock
        self._prices: dict[str, ModelPrices] = dict(DEFAULT_PRICES)
        self._aliases: dict[str, str] = {}
        # (chain, input bound, max_tokens, batch, cache write) -> (worst USD, valid from, valid until):
        # every call and admission asks it, mostly with the same few arguments.
        self._worst: dict[tuple[Any, ...], tuple[float, float, float]] = {}
        self._entries: dict[str, ModelPrices] = {}  # model id as asked -> its entry (aliases, dated ids)
        for model, entry in DEFAULT_PRICES.items():
            for alias in entry.aliases:
                self._aliases[alias] = model
        for model, spec in (overrides or {}).items():
            if not isinstance(model, str) or not model:
                raise ConfigError(f"CLAUDE_PRICES keys must be model ids, got {model!r}")
            entry = parse_entry(model, spec, self._lookup(model))
            self._prices[model] = replace(entry, overridden=True)

    def _now(self) -> float:
        return self._clock.time() if self._clock is not None else time.time()

    def _lookup(self, model: str) -> ModelPrices | None:
        entry = self._prices.get(model) or self._prices.get(self._aliases.get(model, ""))
        if entry is None:
            match = _DATED.match(model)
            if match:
                base = match["base"]
                entry = self._prices.get(base) or self._prices.get(self._aliases.get(base, ""))
        return entry

    @property
    def known_models(self) -> list[str]:
        return sorted(self._prices)

    def entry(self, model: str) -> ModelPrices:
        """``model``'s price history; an alias or dated id (``claude-sonnet-4-5-20250929``) resolves to its model."""
        entry = self._entries.get(model)
        if entry is not None:
            return entry
        entry = self._lookup(model)
        if entry is not None:
            self._entries[model] = entry  # model ids are few; every call looks its chain up
            return entry
        if entry is None:
            current = sorted(m for m, e in self._prices.items() if not e.retired)
            raise UnknownModel(
                f"Model {model!r} has no price, so its cost cannot be counted against budgets. "
                f"Use a priced model id ({', '.join(current)}) or add its price to CLAUDE_PRICES.",
                reason="unknown_model",
            )
        return entry

    def entries(self) -> list[ModelPrices]:
        return [self._prices[m] for m in self.known_models]

    def price(self, model: str, *, at: float | None = None, prompt_tokens: int = 0) -> Price:
        """The rates for a call to ``model`` made at ``at`` (default: now) with a prompt of ``prompt_tokens``."""
        period = self.entry(model).period_at(self._now() if at is None else at)
        return period.band_for(prompt_tokens).price

    def check(self, models: Iterable[str]) -> None:
        for model in models:
            self.entry(model)

    def cost(self, model: str, usage: Any, *, batch: bool = False, at: float | None = None) -> Cost:
        """USD for a usage record (an SDK ``Usage`` or a dict of the same fields) of a call made at ``at``."""
        get: Callable[[str], Any]
        if type(usage) is dict or isinstance(usage, Mapping):
            get = usage.get
        else:  # an SDK ``Usage`` (or any object with the fields as attributes)
            get = _UsageView(usage).get
        input_tokens = int(get("input_tokens") or 0)
        output_tokens = int(get("output_tokens") or 0)
        cache_read = int(get("cache_read_input_tokens") or 0)
        cache_creation = int(get("cache_creation_input_tokens") or 0)
        price = self.price(model, at=at, prompt_tokens=input_tokens + cache_read + cache_creation)
        breakdown = get("cache_creation") if cache_creation else None
        write_1h = int(_get(breakdown, "ephemeral_1h_input_tokens") or 0) if breakdown is not None else 0
        write_5m = cache_creation - write_1h if cache_creation >= write_1h else 0
        usd = _PER_TOKEN * (
            input_tokens * price.input
            + output_tokens * price.output
            + write_5m * price.cache_write_5m
            + write_1h * price.cache_write_1h
            + cache_read * price.cache_read
        )
        if batch or get("service_tier") == "batch":
            usd *= price.batch_discount
        return Cost(usd=usd, input_tokens=input_tokens, output_tokens=output_tokens,
                    cache_read_input_tokens=cache_read, cache_creation_input_tokens=cache_creation)

    def worst_case_usd(self, models: Iterable[str], input_tokens: int, max_tokens: int,
                       *, batch: bool = False, cache_write: bool = True, at: float | None = None) -> float:
        """An upper bound for one call across a model chain: what a budget must hold back.

        ``input_tokens`` bounds the whole prompt, so every band that bound could reach is priced and
        the dearest kept: a call that lands in a long-prompt band is never under-held. With
        ``cache_write`` (the request carries ``cache_control``) input is priced at the dearest of
        input and cache-write rates, since the prompt may be written to the cache.
        """
        when = self._now() if at is None else at
        key = (tuple(models), input_tokens, max_tokens, batch, cache_write)
        cached = self._worst.get(key)
        if cached is not None and cached[1] <= when < cached[2]:
            return cached[0]
        worst = 0.0
        since, until = float("-inf"), float("inf")  # while every model's prices in force stay the same
        for model in key[0]:
            entry = self.entry(model)
            for period in entry.periods:
                if period.start is not None:
                    if period.start <= when:
                        since = max(since, period.start)
                    else:
                        until = min(until, period.start)
            for band in entry.period_at(when).reachable(input_tokens):
                p = band.price
                input_rate = max(p.input, p.cache_write_5m, p.cache_write_1h) if cache_write else p.input
                usd = _PER_TOKEN * (input_tokens * input_rate + max_tokens * p.output)
                if batch:
                    usd *= p.batch_discount
                worst = max(worst, usd)
        if len(self._worst) >= 4096:
            self._worst.clear()  # a call's bound varies with its prompt: the same few keys repeat, not all
        self._worst[key] = (worst, since, until)
        return worst
