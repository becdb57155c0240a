"""Request limits, token and dollar budgets as reservations, alerts, and the shared breaker.

Which lines a call touches (``storage.Line``): the user's (or feature's, or a custom key's) request
limits at admission; at each Claude call the worst case of the call against the budgets of
``@budgeted`` (tokens, USD), the feature's ``CLAUDE_FEATURE_BUDGETS_USD`` and the global
``CLAUDE_DAILY_BUDGET_USD`` (or the ``ai-daily-budget-usd`` number flag, so it changes without a
deploy). After the call the reservation is replaced by the real cost. Budget periods are calendar
periods in ``CLAUDE_BUDGET_TIMEZONE``.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from . import budget_alerts, downgrade, process
from .before_view import BeforeView
from .context import CallScope
from .errors import BudgetExceeded, LimitExceeded, StorageDown
from .events import hash_text
from .flags import UserContext
from .hygiene import has_cache_control
from .kept_spend import KeptSpend
from .periods import PeriodCache, granularity, period_bounds  # noqa: F401  (period_bounds: re-exported)
from .storage import MICRO, Admission, Begin, Crossed, Line, Outcome, StorageUnavailable, Store
from .tokens import upper_bound_split

if TYPE_CHECKING:
    from .decorators import BudgetOptions
    from .extension import ClaudeState


_ids = itertools.count()
_ID_PREFIX = os.urandom(4).hex()


_id_head: list[Any] = [0, ""]  # (pid, the ids' prefix for it): rebuilt in a forked worker


def _new_id() -> str:
    """Unique across workers (the pid) and cheap: ``uuid4`` costs a system call per call."""
    pid = process.pid()
    if pid != _id_head[0]:
        _id_head[0], _id_head[1] = pid, f"{_ID_PREFIX}{pid:x}-"
    return f"{_id_head[1]}{next(_ids):x}"


@dataclass
class Reservation:
    rid: str
    lines: list[Line]
    usd_lines: list[int]  # indexes of lines counted in micro-dollars (others are tokens)
    app_wide: list[int] = field(default_factory=list)  # indexes of the global and feature budgets
    topups: tuple[str, ...] = ()  # holds added when a call needed more than its admission held
    downgraded_to: list[str] | None = None  # the cheaper chain the storage step chose (downgrade.py)
    fraction: float = 0.0  # the deciding budget's spent / limit when it chose

    @property
    def rids(self) -> tuple[str, ...]:
        return (self.rid, *self.topups)


_PLAN_CACHE = 10_000  # subjects whose budget keys and names are kept built between their requests


@dataclass(slots=True)
class _Plan:
    """A scope's budgets (amounts 0) and request limits: what ``_plan`` builds once and shares."""

    options: Any
    lines: list[Line]
    usd_idx: list[int]
    app_wide: set[int]
    in_usd: list[bool]
    admission: Admission | None  # shared by the subject's requests: never mutated
    valid_until: float


class Budgets(BeforeView):
    """One app's limits and budgets on its store (memory or Redis)."""

    def __init__(self, state: ClaudeState, store: Store) -> None:
        self.state = state
        self.store = store
        self.settings = state.settings
        self.periods = PeriodCache(ZoneInfo(self.settings.budget_timezone))
        self.kept = KeptSpend()  # spend settled while storage was down, replayed when it is back
        # feature -> (largest system/tools token bound, any cache_control, largest max_tokens) of its calls
        self._overheads: dict[str, tuple[int, bool, int]] = {}
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._exhausted_alert = repr(1.0) if 1.0 in self.settings.budget_alerts else ""
        self._user_subjects: dict[str, str] = {}  # user key -> its salted hash (sha256 per request otherwise)

    # --- keys -----------------------------------------------------------------------------

    def _subject(self, scope: CallScope, options: BudgetOptions | None) -> str:
        per = options.per if options is not None else "user"
        memo_key = ("subject", per if isinstance(per, str) else id(per))
        subject = scope.memo.get(memo_key)
        if subject is None:
            subject = scope.memo[memo_key] = self._compute_subject(scope, per)
        return str(subject)

    def _compute_subject(self, scope: CallScope, per: Any) -> str:
        if callable(per):
            return f"key:{hash_text(str(per()), salt=self.state.user_salt)}"
        if per == "feature":
            return f"feature:{scope.feature}"
        if per == "global":
            return "global"
        # Never the raw key: storage keys, budget names and alerts carry a salted hash of it.
        user = str(scope.user)
        subject = self._user_subjects.get(user)
        if subject is None:
            if len(self._user_subjects) >= _PLAN_CACHE:
                self._user_subjects.clear()
            subject = self._user_subjects[user] = f"user:{hash_text(user, salt=self.state.user_salt)}"
        return subject

    def _global_limit_usd(self, scope: CallScope) -> float | None:
        limit = self.settings.daily_budget_usd
        if self.settings.budget_flag:
            value = self.state.flags.value(self.settings.budget_flag, UserContext(scope.user), None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
                limit = float(value)
        return limit

    def budget_lines(self, scope: CallScope, options: BudgetOptions | None, *, usd: int, tokens: int,
                     now: float) -> tuple[list[Line], list[int], set[int]]:
        """Every budget a call of this scope counts against; which are in USD; which are app-wide."""
        plan = self._plan(scope, options, now)
        lines = [Line(t.key, t.limit, usd if in_usd else tokens, t.expires_at, t.name)
                 for t, in_usd in zip(plan.lines, plan.in_usd, strict=True)]
        return lines, plan.usd_idx, plan.app_wide

    def _templates(self, scope: CallScope, options: BudgetOptions | None,
                   now: float) -> tuple[list[Line], list[int], set[int]]:
        plan = self._plan(scope, options, now)
        return plan.lines, plan.usd_idx, plan.app_wide

    def _plan(self, scope: CallScope, options: BudgetOptions | None, now: float) -> _Plan:
        """The budgets and request limits of a scope: built once per (view, subject, period), shared by
        that subject's requests until a period ends, and memoised on the request for its calls."""
        memo_key = ("budgets", id(options))
        plan: _Plan | None = scope.memo.get(memo_key)
        if plan is not None and now < plan.valid_until:
            return plan
        feature = scope.feature or "-"
        subject = self._subject(scope, options) if options is not None else ""
        key = (id(options), feature, subject, self._global_limit_usd(scope))
        plan = self._plans.get(key)
        if plan is None or now >= plan.valid_until or plan.options is not options:
            if len(self._plans) >= _PLAN_CACHE:
                self._plans.clear()  # many subjects: start over rather than track recency per request
            plan = self._plans[key] = self._build_plan(scope, options, feature, subject, key[3], now)
        scope.memo[memo_key] = plan
        return plan

    def _build_plan(self, scope: CallScope, options: BudgetOptions | None, feature: str, subject: str,
                    global_limit: float | None, now: float) -> _Plan:
        lines: list[Line] = []
        usd_idx: list[int] = []
        app_wide: set[int] = set()
        requests: list[Line] = []
        if options is not None:
            for item in options.tokens:
                pid, end = self.periods.bounds(granularity(item), item.multiples, now)
                lines.append(Line(f"tok:{feature}:{subject}:{item}:{pid}", item.amount, 0, end,
                                  name=f"{subject} tokens {item}"))
            for amount, period in options.usd:
                pid, end = self.periods.bounds(period, 1, now)
                usd_idx.append(len(lines))
                lines.append(Line(f"usd:{feature}:{subject}:{period}:{pid}", round(amount * MICRO), 0, end,
                                  name=f"{subject} usd {amount}/{period}"))
            requests = [Line(f"req:{feature}:{subject}:{item}", item.amount, 1, name=str(item),
                             window=float(item.get_expiry())) for item in options.requests]
        pid, end = self.periods.bounds("day", 1, now)
        feature_limit = self.settings.feature_budgets_usd.get(scope.feature or "")
        if feature_limit is not None:
            usd_idx.append(len(lines))
            app_wide.add(len(lines))
            lines.append(Line(f"usd:feature:{feature}:day:{pid}", round(feature_limit * MICRO), 0, end,
                              name=f"feature {feature} daily budget"))
        if global_limit is not None:
            usd_idx.append(len(lines))
            app_wide.add(len(lines))
            lines.append(Line(f"usd:global:day:{pid}", round(global_limit * MICRO), 0, end,
                              name="global daily budget"))
        gates = [lines[i] for i in sorted(app_wide)]
        return _Plan(options=options, lines=lines, usd_idx=usd_idx, app_wide=app_wide,
                     in_usd=[i in usd_idx for i in range(len(lines))],
                     admission=Admission(gates, requests) if gates or requests else None,
                     valid_until=min([line.expires_at for line in lines], default=float("inf")))

    # --- pipeline steps 2-3: admission, done with the first call's reservation --------------

    def admit(self, scope: CallScope, options: BudgetOptions | None) -> None:
        """Prepare the request's admission: the app-wide budgets' kill state and its request limits.

        Nothing is sent yet: ``admit_before_view`` (the default) or the first Claude call of the
        request checks them in one atomic step; ``finish_admission`` checks them after a view that
        made no call.
        """
        scope.admission = self._plan(scope, options, self.state.clock.time()).admission

    def finish_admission(self, scope: CallScope, breakers: tuple[str, ...] = ()) -> Outcome | None:
        """A view that made no Claude call is still counted against (and refused by) its limits.
        ``breakers`` are read in the same step (the outcome has their states)."""
        if scope.admission is None:
            return None
        return self._begin(scope, holds=[], usd_idx=[], app_wide=set(), rid="", hold_seconds=0.0,
                           breakers=breakers)

    # --- each Claude call: reserve (with admission and the breakers), settle ----------------

    def begin(self, scope: CallScope, chain: list[str], params: Any, max_tokens: int, *,
              call_seconds: float | None = None, wait: bool = True,
              bounds: tuple[int, int] | None = None,
              cached: bool | None = None) -> tuple[Reservation | None, dict[str, float | None] | None]:
        """Hold one call's worst case (input bound + ``max_tokens`` at the dearest model's prices).

        The same round trip admits the request (if not yet done) and reads the chain's breakers,
        so the call needs no other storage step before it is sent. A hold taken with the admission
        (``admit_before_view``) serves the request's first call with no round trip at all when it is
        large enough, and is topped up by the difference when it is not.
        """
        user_part, app_part = bounds if bounds is not None else upper_bound_split(params)
        input_bound = user_part + app_part
        cached = has_cache_control(params) if cached is None else cached
        self._learn_overhead(scope, app_part, cached, max_tokens)
        worst_usd = self.state.prices.worst_case_usd(chain, input_bound, max_tokens, cache_write=cached)
        usd_micro, tokens = math.ceil(worst_usd * MICRO), input_bound + max_tokens
        hold_seconds = (call_seconds or self.settings.deadline) + 30.0
        step_down = downgrade.plan(self.state.prices, chain, scope.downgrade_at, input_bound, max_tokens,
                                   cached=cached)
        pre = scope.memo.pop("prehold", None)
        if pre is not None:
            return self.use_prehold(scope, pre, usd_micro, tokens, hold_seconds=hold_seconds, wait=wait,
                                    step_down=step_down)
        # Only the first model's breaker: a fallback model's is read (breaker_allow) when it is needed.
        # With nothing to hold, the admission before the view read it already.
        first = tuple(chain[:1])
        read: dict[str, float | None] | None = scope.memo.pop("breakers", None)
        reservation, breakers = self.reserve_worst(scope, usd_micro, tokens, hold_seconds=hold_seconds,
                                                   breakers=() if read is not None else first, wait=wait,
                                                   step_down=step_down)
        if read is not None:
            return reservation, read
        if breakers is None:  # no step was needed (no budget, no limit): read the breaker on its own
            breakers = self._read_breakers(first)
        return reservation, breakers

    def reserve_worst(self, scope: CallScope, usd_micro: int, tokens: int, *, hold_seconds: float,
                      breakers: tuple[str, ...] = (), optional: bool = False, wait: bool = True,
                      step_down: downgrade.StepDown | None = None,
                      ) -> tuple[Reservation | None, dict[str, float | None] | None]:
        """Hold ``usd_micro`` and ``tokens`` on every budget of ``scope`` in one step, or refuse.

        A hold lapses after ``hold_seconds``: a worker that died mid-call gives its room back.
        An ``optional`` hold is a guess made before the call is known: when the budgets have no
        room for it the step still admits the request (no refusal, no kill) and holds nothing.
        ``wait=False`` refuses a busy budget at once (``budget_busy``): the async client waits for
        room itself, with ``await``, since a blocking wait would stall the calls it waits for.
        """
        now = self.state.clock.time()
        lines, usd_idx, app_wide = self.budget_lines(scope, scope.budgets, usd=usd_micro, tokens=tokens, now=now)
        if not lines and scope.admission is None:
            return None, None
        rid = _new_id()
        alt: list[Line] = []
        line = downgrade.deciding_line(lines, usd_idx, app_wide) if step_down is not None else -1
        if step_down is not None and line >= 0:
            alt = self.budget_lines(scope, scope.budgets, usd=math.ceil(step_down.usd * MICRO), tokens=tokens,
                                    now=now)[0]
        outcome = self._begin(scope, holds=lines, usd_idx=usd_idx, app_wide=app_wide, rid=rid,
                                       hold_seconds=hold_seconds, breakers=breakers, optional=optional, wait=wait,
                                       lower=(line, step_down.at if step_down else 0.0, [a.amount for a in alt]))
        breaker_snapshot = outcome.breakers if outcome is not None else None
        if not lines or (outcome is not None and not outcome.held):  # an optional hold that found no room
            return None, breaker_snapshot
        # Storage down under "open": no hold was taken, but the call's settlement is still kept and
        # added to the budgets when storage is back, so it gets a reservation all the same.
        if outcome is not None and outcome.downgraded and step_down is not None:
            return (Reservation(rid, alt, usd_idx, sorted(app_wide), downgraded_to=step_down.chain,
                                fraction=outcome.fraction), breaker_snapshot)
        return Reservation(rid, lines, usd_idx, sorted(app_wide)), breaker_snapshot

    def _begin(self, scope: CallScope, *, holds: list[Line], usd_idx: list[int], app_wide: set[int], rid: str,
               hold_seconds: float, breakers: tuple[str, ...], optional: bool = False,
               wait: bool = True,
               lower: tuple[int, float, list[int]] = (-1, 0.0, [])) -> Outcome | None:
        """One atomic step (None: storage down under the "open" policy); while in-flight holds (not
        spend) fill a budget, wait briefly for room.

        Holds are worst cases, often several times a call's real cost, so under a burst a budget
        can look full while most of it is still unspent: such a refusal is "busy", not "exhausted",
        and is retried for up to ``CLAUDE_BUDGET_WAIT`` seconds before the caller is told to retry.
        """
        admission = scope.admission or Admission()
        gates, requests = admission.gates, admission.requests
        clock = self.state.clock
        waited_until = clock.monotonic() + (self.settings.budget_wait if wait else 0.0)
        pause = 0.02
        while True:
            now = clock.time()
            step = Begin(gates=gates, requests=requests, holds=holds, member=_new_id(), rid=rid,
                         hold_until=now + hold_seconds, exhausted_alert=self._exhausted_alert,
                         breakers=breakers, optional_holds=optional, downgrade_line=lower[0],
                         downgrade_at=lower[1], alt_amounts=lower[2])
            result: Outcome | None = self._guarded(lambda step=step, now=now: self.store.begin(step, now))
            if result is None:  # storage down, policy "open": serve without limits
                scope.admission = None
                return None
            if result.ok or not (result.busy and clock.monotonic() + pause < waited_until):
                break
            clock.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 0.25)
        if not result.ok:
            self._refuse(result, gates, requests, holds, usd_idx, app_wide)
        scope.admission = None
        if requests:
            tightest = 0 if len(requests) == 1 else min(range(len(requests)), key=lambda i: result.remaining[i])
            scope.rate_headers = {"RateLimit-Limit": str(requests[tightest].limit),
                                  "RateLimit-Remaining": str(result.remaining[tightest]),
                                  "RateLimit-Reset": str(math.ceil(result.resets[tightest]))}
        return result

    def _refuse(self, result: Outcome, gates: list[Line], requests: list[Line], holds: list[Line],
                usd_idx: list[int], app_wide: set[int]) -> None:
        if result.stage == "gate":
            raise BudgetExceeded(f"{gates[result.failed].name} is used up", reason="budget_exhausted",
                                 retry_after=result.retry_after).with_status(503)
        if result.stage == "request":
            item = requests[result.failed]
            exc = LimitExceeded(f"request limit {item.name} reached", retry_after=result.retry_after)
            exc.headers = {"RateLimit-Limit": str(item.limit), "RateLimit-Remaining": "0",
                           "RateLimit-Reset": str(max(1, math.ceil(result.retry_after)))}
            raise exc
        line = holds[result.failed]
        if result.newly_exhausted and result.failed in app_wide:
            self._alert(line, 1.0, result.spent, result.failed in usd_idx)
        reason = "budget_busy" if result.busy else ("budget_exhausted" if result.failed in app_wide else None)
        error = BudgetExceeded(f"{line.name} has no room for this call", reason=reason,
                               retry_after=result.retry_after)
        raise error.with_status(503) if result.failed in app_wide else error

    def settle(self, reservation: Reservation, usd: float, tokens: int, *, success: str | None = None,
               rollup: dict[str, int] | None = None, seen_closed: bool = False) -> None:
        """Replace the hold by the real cost (and record the model's success on its breaker and the
        call's rollup increments, in the same step)."""
        now = self.state.clock.time()
        usd_micro = math.ceil(usd * MICRO)
        usd_lines = reservation.usd_lines
        actual: list[Line] = []
        over: list[tuple[str, int]] = []
        for i, line in enumerate(reservation.lines):
            amount = usd_micro if i in usd_lines else tokens
            if amount > line.amount:
                over.append((line.name, amount - line.amount))
            actual.append(Line(line.key, line.limit, amount, line.expires_at, line.name))
        if over:  # the bound was wrong for this request (e.g. content we cannot size locally): say so
            self.state.events.emit("reservation_exceeded", {"budgets": [name for name, _ in over],
                                                            "excess": [amount for _, amount in over]},
                                   level="WARNING")
        self._replay_if_back()

        def done(crossed: list[Crossed] | None, failure: str | None) -> None:
            if failure == "not_sent":  # more settlements waited on a storage away than a store keeps
                self._keep(actual, reservation)
            else:
                self._raise_alerts(crossed or [], actual, reservation)

        try:  # on Redis written behind and kept until it lands (storage/redis.py)
            self.store.settle_later(actual, reservation.rids, self.settings.budget_alerts, now, done,
                                    success=success, breaker=self.state.breaker.params, rollup=rollup,
                                    seen_closed=seen_closed)
        except StorageUnavailable:
            # The call happened and was paid for: never fail the response now. The spend is kept
            # here and added to the budgets when storage is back; the holds lapse on their own.
            self._keep(actual, reservation)

    def _raise_alerts(self, crossed: list[Crossed], lines: list[Line], reservation: Reservation) -> None:
        for alert in crossed:
            index = next(i for i, li in enumerate(lines) if li.key == alert.key)
            if index in reservation.app_wide:  # per-user budgets refuse quietly; they are not pager news
                self._alert(lines[index], alert.threshold, alert.spent, index in reservation.usd_lines)

    # --- spend made while storage was down --------------------------------------------------

    def _keep(self, lines: list[Line], reservation: Reservation) -> None:
        self.kept.keep(lines, reservation.usd_lines, reservation.app_wide)

    def _replay_if_back(self) -> None:
        """Storage answers again: add what was spent meanwhile, so an outage is not free money."""
        if not self.kept or not getattr(self.store, "healthy", True):
            return
        replayed = self.kept.replay(self.store, self.settings.budget_alerts, self.state.clock.time())
        if replayed is not None:
            fields, crossed, lines, usd_lines, app_wide = replayed
            self.state.events.emit("spend_replayed", fields, level="WARNING")
            self._raise_alerts(crossed, lines, Reservation("", lines, usd_lines, app_wide))

    def _alert(self, line: Line, threshold: float, spent: int, unit_usd: bool) -> None:
        budget_alerts.announce(self.state, line, threshold, spent, unit_usd)

    # --- a storage outage -----------------------------------------------------------------

    def _guarded(self, step: Any) -> Any:
        """A storage step under ``CLAUDE_STORAGE_FAILURE``; the outage itself is logged once per
        episode by the store's guard (``storage/guard.py``), not here per request."""
        self._replay_if_back()
        try:
            return step()
        except StorageUnavailable as exc:
            if self.settings.storage_failure == "closed":
                raise StorageDown(f"storage unavailable: {exc}") from None
            return None

    def usage_report(self, now: float | None = None) -> list[dict[str, Any]]:
        """Today's app-wide budgets: for ``flask claude status``."""
        now = self.state.clock.time() if now is None else now
        self.store.flush()  # settlements written behind count in what an operator reads
        out = []
        features = list(self.settings.feature_budgets_usd)
        for feature in [None, *features]:
            lines, _, app_wide = self.budget_lines(CallScope(feature=feature), None, usd=0, tokens=0, now=now)
            for i in sorted(app_wide):
                line = lines[i]
                if feature is not None and line.key.startswith("usd:global"):
                    continue
                [(spent, reserved)] = self.store.usage([line.key], now)
                out.append({"budget": line.name, "limit_usd": line.limit / MICRO, "spent_usd": spent / MICRO,
                            "reserved_usd": reserved / MICRO,
                            "remaining_usd": max(0, line.limit - spent - reserved) / MICRO,
                            "alerts_passed": [t for t in self.settings.budget_alerts
                                              if spent >= t * line.limit]})
        return out

