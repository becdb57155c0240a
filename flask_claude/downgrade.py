"""Budget-aware model step-down: spend less before refusing.

``ai_feature(downgrade_at=0.8)``: once the budget that applies to a call (the user's USD budget,
else the feature's daily budget, else the global one) is spent past that fraction, the call's chain
starts at its next cheaper model. The decision is taken inside the same atomic storage step as the
reservation (storage/lua/begin.lua), against the spend every worker shares, and the hold is the
cheaper chain's worst case: a user near their budget is served by the cheaper model instead of
being refused because the dearest model's worst case no longer fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .storage import Line

if TYPE_CHECKING:
    from .pricing import PriceTable


@dataclass(frozen=True)
class StepDown:
    """The cheaper chain a call falls to, and its worst case to hold instead."""

    chain: list[str]
    usd: float
    at: float


def plan(prices: PriceTable, chain: list[str], at: float | None, input_tokens: int, max_tokens: int, *,
         cached: bool) -> StepDown | None:
    """The chain from the first model cheaper (for this call's worst case) than the first, if any."""
    if at is None or len(chain) < 2:
        return None
    first = prices.worst_case_usd(chain[:1], input_tokens, max_tokens, cache_write=cached)
    for i, model in enumerate(chain[1:], start=1):
        if prices.worst_case_usd([model], input_tokens, max_tokens, cache_write=cached) < first:
            rest = chain[i:]
            return StepDown(rest, prices.worst_case_usd(rest, input_tokens, max_tokens, cache_write=cached), at)
    return None


def deciding_line(lines: list[Line], usd_idx: list[int], app_wide: set[int]) -> int:
    """Which budget decides: the user's USD budget, else the feature's, else the global; -1: none."""
    user = [i for i in usd_idx if i not in app_wide]
    if user:
        return user[0]
    for prefix in ("usd:feature:", "usd:global:"):
        for i in usd_idx:
            if lines[i].key.startswith(prefix):
                return i
    return -1
