"""What a storage step takes and gives back, and the protocol each backend implements.

Units are integers (tokens, micro-dollars), so concurrent increments never round. See
docs/ARCHITECTURE.md for which step runs when and how many round trips a request costs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

MICRO = 1_000_000  # USD are counted in integer micro-dollars: concurrent increments never round
BREAKER_BUCKETS = 10  # the failure window is counted in this many time buckets: O(1) per record
# A refused call marks its budget exhausted (the automatic kill switch) only if its worst case is a
# typical share of the budget: one oversized request must not switch a feature off for everyone.
KILL_SHARE = 0.25


# The records a request builds several of are plain slotted dataclasses: a frozen one's constructor
# costs four times as much (object.__setattr__ per field), and nothing hashes or shares them mutably.
@dataclass(slots=True)
class Line:
    """One counter a step touches: a budget (a calendar period) or a request limit (a sliding window)."""

    key: str
    limit: int
    amount: int
    expires_at: float = 0.0  # budgets: the end of the period (0 for a request limit)
    name: str = ""
    window: float = 0.0  # request limits: the sliding window's length in seconds (0 for a budget)


@dataclass(slots=True)
class Admission:
    """What a request's admission still has to check: the app-wide budgets' kill state and its
    request limits (``Budgets.admit`` builds it; the first storage step of the request takes it)."""

    gates: list[Line] = field(default_factory=list)
    requests: list[Line] = field(default_factory=list)


@dataclass(frozen=True)
class BreakerParams:
    min_calls: int
    failure_rate: float
    window: float
    cooldown: float


@dataclass(slots=True)
class Begin:
    """What a call's first storage step does, all or nothing."""

    gates: Sequence[Line] = ()  # app-wide budgets: refuse when spent (the automatic kill switch)
    requests: Sequence[Line] = ()  # request limits to count this request against
    holds: Sequence[Line] = ()  # budgets to hold the call's worst case on
    member: str = ""  # this request's entry in the request-limit windows
    rid: str = ""  # the hold's id, for settle
    hold_until: float = 0.0
    exhausted_alert: str = ""  # the alert threshold claimed by the first "spent for good" refusal
    breakers: Sequence[str] = ()  # models whose breaker state to read
    optional_holds: bool = False  # no room for the holds: admit anyway and hold nothing (a guess, not a call)
    # Budget-aware step-down: when holds[downgrade_line] is spent past downgrade_at of its limit, hold
    # alt_amounts (the cheaper chain's worst case, one per hold) instead of the holds' amounts.
    downgrade_line: int = -1
    downgrade_at: float = 0.0
    alt_amounts: Sequence[int] = ()


@dataclass(slots=True)
class Outcome:
    ok: bool
    stage: str = ""  # "gate" | "request" | "hold": which part refused
    failed: int = -1  # index of the refusing line in that part
    busy: bool = False  # a hold refused only because of others' live holds: room may come back soon
    retry_after: float = 0.0
    remaining: tuple[int, ...] = ()  # per request limit, after this request
    resets: tuple[float, ...] = ()  # per request limit: seconds until its oldest hit leaves the window
    newly_exhausted: bool = False
    spent: int = 0
    breakers: dict[str, float | None] = field(default_factory=dict)  # model -> open_until (None: closed)
    held: bool = True  # False: optional holds found no room and were not taken
    downgraded: bool = False  # the downgrade line was past its fraction: alt_amounts were held
    fraction: float = 0.0  # that line's spent / limit when decided


@dataclass(slots=True)
class Crossed:
    key: str
    threshold: float
    spent: int
    limit: int


class StorageUnavailable(Exception):
    """The shared storage did not answer in time; ``CLAUDE_STORAGE_FAILURE`` decides what follows."""


# (crossed, failure): called once a settlement landed (failure None), or with "not_sent" when the store
# gave it back unsent (more waited on a storage away than it keeps).
SettleDone = Callable[[list[Crossed] | None, str | None], None]


class BudgetStore(Protocol):
    """Request limits and budgets: admit and hold before a call, settle after it."""

    def begin(self, step: Begin, now: float) -> Outcome: ...

    def settle(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
               success: str | None = None, breaker: BreakerParams | None = None,
               rollup: dict[str, int] | None = None, seen_closed: bool = False) -> list[Crossed]:
        """Replace the holds ``rids`` by the real amount; report alert thresholds crossed first here; record
        ``success`` on that model's breaker (``seen_closed``: the call's first step read it closed and no
        probe was asked for since, so its state need not be read again); add the call's ``rollup``
        increments (rollups.py), at once or summed with others and written by a later step or ``flush``."""

    def settle_later(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
                     done: SettleDone, success: str | None = None, breaker: BreakerParams | None = None,
                     rollup: dict[str, int] | None = None, seen_closed: bool = False) -> None:
        """``settle`` whenever the backend sends it best (at once in memory, written behind on Redis);
        ``done(crossed, failure)`` is called once it landed or failed."""

    def flush(self) -> None:
        """Send every settlement and rollup increment still waiting (before a read that must include
        them, and at exit)."""

    def usage(self, keys: Sequence[str], now: float) -> list[tuple[int, int]]:
        """(spent, reserved) for each budget key."""


class RecordStore(Protocol):
    """Small JSON records that must outlive a process (a batch's reservation)."""

    def put_record(self, key: str, value: str, ttl: float) -> None: ...

    def get_record(self, key: str) -> str | None: ...


class BreakerStore(Protocol):
    """Per-model circuit breakers every worker shares."""

    def breaker_allow(self, key: str, now: float, cooldown: float) -> bool: ...

    def breaker_record(self, key: str, ok: bool, now: float, params: BreakerParams) -> bool: ...

    def breaker_state(self, key: str, now: float) -> str: ...


class Store(BudgetStore, RecordStore, BreakerStore, Protocol):
    """What a backend implements (memory.py, redis.py; guard.py wraps one); ``rollups`` is where the
    monitoring rollups live on it (rollups.py in this package)."""

    @property
    def rollups(self) -> Any: ...
