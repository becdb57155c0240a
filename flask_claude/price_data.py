"""Prices as data: the records, the shape of one entry, and the packaged table (``prices.json``).

Prices change, newer model families break the "cache read = 0.1 x input" rule, one model (Haiku
5.5) is priced by prompt length, and a price can change during a model's life. So every rate is a
number in ``prices.json`` (package data, one readable file) that ``CLAUDE_PRICES`` can override per
model in the same shape, never arithmetic in code. A model without a price is refused: counting it
as $0 would let it slip past every budget.

Shape of one model's entry (the data file and ``CLAUDE_PRICES`` alike)::

    {"prices": [                                  # periods, oldest first
        {"input": 2, "output": 10, "cache_write_5m": 2.5, "cache_write_1h": 4, "cache_read": 0.2,
         "bands": [{"above": 100000, "input": ..., "output": ...}]},   # optional prompt-length bands
        {"from": "2026-10-07", "cache_read": 0.1},                       # a change; other rates carry over
    ]}

A call's *prompt* is ``input + cache_read + cache_creation`` tokens; a band applies to a call whose
prompt is strictly above the band's ``above``, to every token of that call (output included). A
period is in force from its ``from`` (UTC) until the next period's. The flat shape of earlier
versions (``{"input": 3, "output": 15}``) is still accepted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime
from importlib import resources
from typing import Any

from .errors import ConfigError

BATCH_DISCOUNT = 0.5
_PER_TOKEN = 1e-6  # table values are USD per million tokens

# A new model given without cache prices gets the usual multipliers rather than free caching.
_WRITE_5M, _WRITE_1H, _READ = 1.25, 2.0, 0.1


@dataclass(frozen=True)
class Price:
    """USD per million tokens for each kind of token a call can be billed for (one band of one period)."""

    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float
    batch_discount: float = BATCH_DISCOUNT


_RATE_FIELDS = tuple(f.name for f in fields(Price))


@dataclass(frozen=True)
class Band:
    """Rates for calls whose prompt is strictly above ``above`` tokens (0 for the first band)."""

    above: int
    price: Price


@dataclass(frozen=True)
class Period:
    """The bands in force from ``start`` (epoch seconds, UTC; ``None`` = since the model existed)."""

    start: float | None
    bands: tuple[Band, ...]

    def band_for(self, prompt_tokens: int) -> Band:
        chosen = self.bands[0]
        for band in self.bands[1:]:
            if prompt_tokens > band.above:
                chosen = band
        return chosen

    def reachable(self, prompt_bound: int) -> tuple[Band, ...]:
        """Every band a call whose prompt is at most ``prompt_bound`` tokens could land in."""
        return tuple(b for i, b in enumerate(self.bands) if i == 0 or prompt_bound > b.above)


@dataclass(frozen=True)
class ModelPrices:
    """One model's price history and where it came from."""

    model: str
    periods: tuple[Period, ...]
    name: str | None = None
    status: str = "active"
    released: str | None = None
    retired_on: str | None = None
    aliases: tuple[str, ...] = ()
    source: str | None = None
    checked: str | None = None
    notes: str | None = None
    overridden: bool = field(default=False, compare=False)

    @property
    def retired(self) -> bool:
        return self.status == "retired"

    def period_at(self, at: float) -> Period:
        """The period in force at ``at``; a time before the first dated period uses the first."""
        chosen = self.periods[0]
        for period in self.periods[1:]:
            if period.start is not None and period.start <= at:
                chosen = period
        return chosen

    def as_dict(self) -> dict[str, Any]:
        """The entry in the data file's shape (for ``flask claude prices --json``)."""
        out: dict[str, Any] = {"name": self.name, "status": self.status, "released": self.released,
                               "retired_on": self.retired_on, "aliases": list(self.aliases),
                               "source": self.source, "checked": self.checked, "notes": self.notes,
                               "overridden": self.overridden, "prices": []}
        for period in self.periods:
            first: dict[str, Any] = dict(_rates(period.bands[0].price))
            if period.start is not None:
                first = {"from": _iso(period.start), **first}
            if len(period.bands) > 1:
                first["bands"] = [{"above": b.above, **_rates(b.price)} for b in period.bands[1:]]
            out["prices"].append(first)
        return {k: v for k, v in out.items() if v is not None}


def _rates(price: Price) -> dict[str, float]:
    return {name: getattr(price, name) for name in _RATE_FIELDS}


def _iso(ts: float) -> str:
    moment = datetime.fromtimestamp(ts, tz=UTC)
    return moment.date().isoformat() if moment.time() == datetime.min.time() else moment.isoformat()


# --- parsing: one parser for the package's data file and for CLAUDE_PRICES -----------------------

_META = ("name", "status", "released", "retired_on", "aliases", "source", "checked", "notes")
_STATUSES = ("active", "legacy", "deprecated", "retired")


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{key} must be a non-negative number, got {value!r}")
    return float(value)


def _start(key: str, value: Any) -> float:
    """A period start: ``YYYY-MM-DD`` (midnight UTC) or an ISO datetime (UTC when it has no zone)."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ConfigError(f"{key} must be a date such as '2026-10-07' or an ISO datetime, got {value!r}") from None
    else:
        raise ConfigError(f"{key} must be a date such as '2026-10-07' (UTC), got {value!r}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _price(key: str, spec: Mapping[str, Any], base: Price | None, default_discount: float) -> Price:
    """Rates from ``spec``; missing ones come from ``base``, or for a first price from the multipliers."""
    values = {name: _number(f"{key}[{name!r}]", spec[name]) for name in _RATE_FIELDS if name in spec}
    if base is not None:
        return replace(base, **values)
    if not {"input", "output"} <= set(values):
        raise ConfigError(f"{key} is a new price: give at least 'input' and 'output' (USD per million tokens)")
    inp = values["input"]
    return Price(input=inp, output=values["output"],
                 cache_write_5m=values.get("cache_write_5m", inp * _WRITE_5M),
                 cache_write_1h=values.get("cache_write_1h", inp * _WRITE_1H),
                 cache_read=values.get("cache_read", inp * _READ),
                 batch_discount=values.get("batch_discount", default_discount))


def _bands(key: str, raw: Any, default_discount: float) -> tuple[Band, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{key} must be a list such as [{{'above': 100000, 'input': 0.5, 'output': 2.5}}]")
    out: list[Band] = []
    for index, spec in enumerate(raw):
        bkey = f"{key}[{index}]"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{bkey} must be a dict with 'above' and the band's rates")
        unknown = set(spec) - {"above", *_RATE_FIELDS}
        if unknown:
            raise ConfigError(f"{bkey} has unknown field(s) {sorted(unknown)}; "
                              f"known: above, {', '.join(_RATE_FIELDS)}")
        above = spec.get("above")
        if isinstance(above, bool) or not isinstance(above, int) or above <= 0:
            raise ConfigError(f"{bkey}['above'] must be a whole number of prompt tokens > 0, got {above!r}")
        out.append(Band(above, _price(bkey, spec, None, default_discount)))
    if [b.above for b in out] != sorted({b.above for b in out}):
        raise ConfigError(f"{key} thresholds must be distinct and increasing, got {[b.above for b in out]}")
    return tuple(out)


def _period(key: str, spec: Any, previous: Period | None, default_discount: float) -> Period:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key} must be a dict of rates (USD per million tokens), optionally with 'from' and 'bands'")
    unknown = set(spec) - {"from", "bands", *_RATE_FIELDS}
    if unknown:
        raise ConfigError(f"{key} has unknown field(s) {sorted(unknown)}; "
                          f"known: from, bands, {', '.join(_RATE_FIELDS)}")
    start = _start(f"{key}['from']", spec["from"]) if spec.get("from") is not None else None
    if previous is not None and start is None:
        raise ConfigError(f"{key} follows another price, so it needs 'from' (the UTC date it takes effect)")
    if previous is not None and previous.start is not None and start is not None and start <= previous.start:
        raise ConfigError(f"{key}['from'] must be later than the price before it")
    base = _price(key, spec, previous.bands[0].price if previous else None, default_discount)
    if "bands" in spec:
        upper = _bands(f"{key}['bands']", spec["bands"], default_discount)
    else:
        upper = previous.bands[1:] if previous else ()
    return Period(start, (Band(0, base), *upper))


def _meta(key: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _META:
        if name not in spec:
            continue
        value = spec[name]
        if name == "aliases":
            if not isinstance(value, list) or not all(isinstance(a, str) and a for a in value):
                raise ConfigError(f"{key}['aliases'] must be a list of model ids")
            out[name] = tuple(value)
        elif value is not None and not isinstance(value, str):
            raise ConfigError(f"{key}[{name!r}] must be a string, got {value!r}")
        else:
            out[name] = value
    if out.get("status", "active") not in _STATUSES:
        raise ConfigError(f"{key}['status'] must be one of {', '.join(_STATUSES)}, got {out['status']!r}")
    return out


def parse_entry(model: str, spec: Any, base: ModelPrices | None = None, *, key: str | None = None,
                default_discount: float = BATCH_DISCOUNT) -> ModelPrices:
    """One model's prices from the data file's shape, the flat shape, or a ``Price``.

    With ``base`` (the packaged entry of the same model) a flat spec changes only the rates it names,
    in the first band of every period; ``prices`` replaces the history.
    """
    key = key or f"CLAUDE_PRICES[{model!r}]"
    if isinstance(spec, Price):
        spec = _rates(spec)
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key} must be a dict such as {{'input': 3, 'output': 15}} (USD per million tokens) "
                          "or {'prices': [...]} with dated periods")
    unknown = set(spec) - {"prices", "bands", *_RATE_FIELDS, *_META}
    if unknown:
        raise ConfigError(f"{key} has unknown field(s) {sorted(unknown)}; known: prices, bands, "
                          f"{', '.join(_RATE_FIELDS)}, {', '.join(_META)}")
    meta = _meta(key, spec)
    flat = {k: spec[k] for k in ("bands", *_RATE_FIELDS) if k in spec}
    if "prices" in spec:
        if flat:
            raise ConfigError(f"{key}: give either 'prices' (a list of periods) or flat rates, not both")
        raw = spec["prices"]
        if not isinstance(raw, list) or not raw:
            raise ConfigError(f"{key}['prices'] must be a non-empty list of periods")
        periods: list[Period] = []
        for index, item in enumerate(raw):
            periods.append(_period(f"{key}['prices'][{index}]", item, periods[-1] if periods else None,
                                   default_discount))
    elif base is not None:
        periods = []
        for old in base.periods:
            first = _price(key, flat, old.bands[0].price, default_discount)
            upper = _bands(f"{key}['bands']", flat["bands"], default_discount) if "bands" in flat else old.bands[1:]
            periods.append(Period(old.start, (Band(0, first), *upper)))
    else:
        periods = [_period(key, flat, None, default_discount)]
    if base is not None:
        kept = {name: getattr(base, name) for name in _META}
        kept.update(meta)
        meta = kept
    return ModelPrices(model=model, periods=tuple(periods), **meta)


def _load_defaults() -> tuple[dict[str, Any], dict[str, ModelPrices]]:
    raw = json.loads(resources.files(__package__).joinpath("prices.json").read_text(encoding="utf-8"))
    discount = float(raw.get("batch_discount", BATCH_DISCOUNT))
    table = {model: parse_entry(model, spec, key=f"prices.json[{model!r}]", default_discount=discount)
             for model, spec in raw["models"].items()}
    info = {k: v for k, v in raw.items() if k != "models"}
    return info, table


#: ``checked`` (date the table was verified), ``sources`` and ``about`` from the data file.
PRICES_INFO: Mapping[str, Any]
#: Every packaged model id -> its prices (aliases and dated ids resolve through ``PriceTable``).
DEFAULT_PRICES: Mapping[str, ModelPrices]
PRICES_INFO, DEFAULT_PRICES = _load_defaults()
