"""Refusal before the view, and the first call's hold taken in the same round trip.

The default admission (``CLAUDE_ADMISSION="before_view"``) checks a request's limits before its view
runs, so a refused request has no side effect. When the feature bounds its input, the first call's
worst case is nearly known by then: its hold rides on the admission's storage step, and the call
itself needs none (``Budgets.begin`` consumes the hold, or tops it up by the difference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from . import downgrade
from .context import CallScope
from .errors import ClaudeGuardError
from .storage import MICRO, Begin, StorageUnavailable

if TYPE_CHECKING:
    from .budget import Reservation
    from .extension import ClaudeState
    from .settings import Settings
    from .storage import Line, Outcome, Store


@dataclass
class PreHold:
    """The first call's hold, taken with the admission before the view (one round trip for both)."""

    reservation: Reservation
    breakers: dict[str, float | None] | None
    usd_micro: int
    tokens: int


class BeforeView:
    """``Budgets``' admission before the view (a mixin: the steps it takes are ``Budgets``')."""

    state: ClaudeState
    settings: Settings
    store: Store
    _exhausted_alert: str
    # feature -> (largest system/tools token bound, any cache_control, largest max_tokens) of its calls
    _overheads: dict[str, tuple[int, bool, int]]

    if TYPE_CHECKING:
        def finish_admission(self, scope: CallScope, breakers: tuple[str, ...] = ()) -> Outcome | None: ...

        def _templates(self, scope: CallScope, options: Any, now: float) -> tuple[list[Line], list[int], set[int]]: ...

        def reserve_worst(self, scope: CallScope, usd_micro: int, tokens: int, *, hold_seconds: float,
                          breakers: tuple[str, ...] = (), optional: bool = False, wait: bool = True,
                          step_down: downgrade.StepDown | None = None,
                          ) -> tuple[Reservation | None, dict[str, float | None] | None]: ...

        def settle(self, reservation: Reservation, usd: float, tokens: int, *, success: str | None = None,
                   rollup: dict[str, int] | None = None) -> None: ...

    def admit_before_view(self, scope: CallScope) -> None:
        """Check the request's limits before the view runs, so a refused request has no side effect.

        When the feature bounds its input (``max_input_chars`` / ``max_input_tokens``) the first
        call's worst case is nearly known here, so its hold is taken in the same round trip as the
        admission and the call itself needs none (``begin`` tops it up if the call turns out larger).
        The hold is sized from what the feature's earlier calls in this process added to the input
        (system prompt, tools, ``max_tokens``); a budget without room for it refuses the request here,
        before the view. Before the feature's first call is seen, the guess (the ``max_tokens`` cap)
        may be far above the real call, so then a budget without room only skips the hold.
        """
        bound = self._input_bound(scope)
        lines = self._templates(scope, scope.budgets, self.state.clock.time())[0]
        settings = self.settings
        configured = scope.models or settings.models
        first = scope.first_model or configured[0]
        if not lines:
            # Nothing to hold, so the first call makes no storage step of its own: the step that
            # admits the request reads the first model's breaker for it (one round trip, not two).
            outcome = self.finish_admission(scope, breakers=(first,))
            if outcome is not None:
                scope.memo["breakers"] = outcome.breakers
            return
        if bound is None:
            self.finish_admission(scope)
            return
        chain = list(dict.fromkeys([first, *configured]))
        cap = min(settings.max_tokens_cap, scope.max_tokens or settings.max_tokens_cap)
        learned = self._overheads.get(scope.feature or "")
        overhead, cached, seen_max = learned or (0, settings.auto_cache, cap)
        max_tokens = min(cap, seen_max)
        tokens = bound + overhead + max_tokens
        try:
            worst = self.state.prices.worst_case_usd(chain, bound + overhead, max_tokens, cache_write=cached)
        except ClaudeGuardError:  # an unpriced model: the call will be refused with its own message
            self.finish_admission(scope)
            return
        usd_micro = math.ceil(worst * MICRO)
        step_down = downgrade.plan(self.state.prices, chain, scope.downgrade_at, bound + overhead, max_tokens,
                                   cached=cached)
        reservation, breakers = self.reserve_worst(scope, usd_micro, tokens, hold_seconds=settings.deadline + 60.0,
                                                   breakers=tuple(chain[:1]), optional=learned is None,
                                                   step_down=step_down)
        if reservation is not None:
            held_usd = math.ceil(step_down.usd * MICRO) if reservation.downgraded_to and step_down else usd_micro
            scope.memo["prehold"] = PreHold(reservation, breakers, held_usd, tokens)

    def _read_breakers(self, models: tuple[str, ...]) -> dict[str, float | None] | None:
        """A step with nothing but the breakers' states: the call's one round trip on a route with no
        limit and no budget, the same fast path (and settlements written behind ride on it) as a
        reservation. Never refused: with storage down the call's ``breaker_allow`` decides."""
        now = self.state.clock.time()
        step = Begin(gates=[], requests=[], holds=[], member="", rid="", hold_until=now,
                     exhausted_alert=self._exhausted_alert, breakers=models)
        try:
            return self.store.begin(step, now).breakers
        except StorageUnavailable:
            return None

    def release_unused(self, scope: CallScope) -> None:
        """Give back a hold taken before the view that no call used (the view made no call, or failed)."""
        pre: PreHold | None = scope.memo.pop("prehold", None)
        if pre is not None:
            self.settle(pre.reservation, 0.0, 0)

    def _input_bound(self, scope: CallScope) -> int | None:
        """An upper bound of the tokens of what callers send, from the feature's declared input caps."""
        chars, tokens = scope.max_input_chars, scope.max_input_tokens
        if chars is None and tokens is None:
            return None
        # upper_bound_tokens: at most 2 tokens per character; the token cap's estimate is 3 chars a token
        bound = min(2 * chars if chars is not None else 6 * tokens,  # type: ignore[operator]
                    6 * tokens if tokens is not None else 2 * chars)  # type: ignore[operator]
        turns = scope.max_history_turns or 8
        return bound + 16 + 16 * turns

    def _learn_overhead(self, scope: CallScope, app_part: int, cached: bool, max_tokens: int) -> None:
        """What a feature's calls add to the user's input (system prompt, tools), whether they mark
        ``cache_control`` and the largest ``max_tokens`` they ask: the next admission's hold is sized
        from these, so a feature's hold matches its calls after the first one."""
        if scope.feature is None or (scope.max_input_chars is None and scope.max_input_tokens is None):
            return
        known = self._overheads.get(scope.feature, (0, False, 0))
        learned = (max(known[0], app_part), known[1] or cached, max(known[2], max_tokens))
        if learned != known:
            self._overheads[scope.feature] = learned

    def use_prehold(self, scope: CallScope, pre: PreHold, usd_micro: int, tokens: int, *, hold_seconds: float,
                    wait: bool, step_down: downgrade.StepDown | None,
                    ) -> tuple[Reservation | None, dict[str, float | None] | None]:
        """The request's first call takes the admission's hold: as it is when large enough (no round
        trip), else topped up by the difference (one), settled as one reservation either way."""
        if pre.reservation.downgraded_to and step_down is not None:
            usd_micro = math.ceil(step_down.usd * MICRO)  # the admission already stepped down
        if usd_micro <= pre.usd_micro and tokens <= pre.tokens:
            return pre.reservation, pre.breakers
        # The call needs more than the admission held: hold the difference, settle both as one.
        try:
            extra, _ = self.reserve_worst(scope, max(0, usd_micro - pre.usd_micro), max(0, tokens - pre.tokens),
                                          hold_seconds=hold_seconds, wait=wait)
        except ClaudeGuardError:
            self.settle(pre.reservation, 0.0, 0)  # refused: give the admission's hold back too
            raise
        held = pre.reservation
        if extra is None:  # storage down under the "open" policy: the admission's hold still stands
            return held, pre.breakers
        lines = [replace(h, amount=h.amount + e.amount) for h, e in zip(held.lines, extra.lines, strict=True)]
        return replace(held, lines=lines, topups=(*held.topups, extra.rid)), pre.breakers


