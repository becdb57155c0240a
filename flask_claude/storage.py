"""Shared counters for limits, budgets, alerts and breakers: memory (one process) or Redis (all workers).

Why not ``limits``' strategies for money: a fixed window counts a refused hit's cost (a refused
$0.60 call poisons a $1.00/day budget for the rest of the day), a moving window stores one entry
per unit (unusable for tokens or micro-dollars), windows start at the first hit instead of the
calendar day, and several limits are hit one after another rather than together. A budget here is
a *reservation*: every line of a call (user tokens, user USD, feature USD, global USD) is checked
and reserved in one atomic step (one Lua script on Redis, one lock in memory), or none is.
``limits`` still parses the limit strings and turns ``CLAUDE_STORAGE_URI`` into a Redis client
(``redis://``, ``redis+cluster://``, ``redis+sentinel://``), so its URI options and socket timeouts
work as documented there.

A guarded call costs two round trips however many limits apply: ``begin`` (the request's admission
if still pending, the reservation, and a read of the chain's breakers) and ``settle`` (the real
cost, alert thresholds, and the breaker's record of the success).

Units are integers (tokens, micro-dollars), so concurrent increments never round. Keys of one app
share the Redis hash tag ``{fc:<prefix>}``: a multi-key script must stay in one cluster slot.
"""

from __future__ import annotations

import atexit
import heapq
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .redis_wire import Call, LeanScripts, NotSent
from .redis_wire import usable as lean_usable

BREAKER_BUCKETS = 10  # the failure window is counted in this many time buckets: O(1) per record
# A refused call marks its budget exhausted (the automatic kill switch) only if its worst case is a
# typical share of the budget: one oversized request must not switch a feature off for everyone.
KILL_SHARE = 0.25


@dataclass(frozen=True)
class Line:
    """One counter a step touches: a request limit (sliding window) or a budget (calendar period)."""

    key: str
    limit: int
    amount: int
    expires_at: float  # budgets: end of the period; request limits: the window length in seconds
    name: str = ""


@dataclass(frozen=True)
class BreakerParams:
    min_calls: int
    failure_rate: float
    window: float
    cooldown: float


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Outcome:
    ok: bool
    stage: str = ""  # "gate" | "request" | "hold": which part refused
    failed: int = -1  # index of the refusing line in that part
    busy: bool = False  # a hold refused only because of others' live holds: room may come back soon
    retry_after: float = 0.0
    remaining: tuple[int, ...] = ()  # per request limit, after this request
    newly_exhausted: bool = False
    spent: int = 0
    breakers: dict[str, float | None] = field(default_factory=dict)  # model -> open_until (None: closed)
    held: bool = True  # False: optional holds found no room and were not taken


@dataclass(frozen=True)
class Crossed:
    key: str
    threshold: float
    spent: int
    limit: int


class StorageUnavailable(Exception):
    """The shared storage did not answer in time; ``CLAUDE_STORAGE_FAILURE`` decides what follows."""


class Store(Protocol):
    def begin(self, step: Begin, now: float) -> Outcome: ...

    def settle(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
               success: str | None = None, breaker: BreakerParams | None = None) -> list[Crossed]:
        """Replace the holds ``rids`` by the real amount; report alert thresholds crossed first here; record
        ``success`` on that model's breaker."""

    def usage(self, keys: Sequence[str], now: float) -> list[tuple[int, int]]:
        """(spent, reserved) for each budget key."""

    def put_record(self, key: str, value: str, ttl: float) -> None:
        """A small JSON record that must outlive a process (a batch's reservation)."""

    def get_record(self, key: str) -> str | None: ...

    def breaker_allow(self, key: str, now: float, cooldown: float) -> bool: ...

    def breaker_record(self, key: str, ok: bool, now: float, params: BreakerParams) -> bool: ...

    def breaker_state(self, key: str, now: float) -> str: ...


# --- memory ---------------------------------------------------------------------------------


@dataclass
class _Budget:
    spent: int = 0
    expires_at: float = 0.0
    exhausted_at_limit: int | None = None
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # rid -> (amount, hold_until)

    def live_reserved(self, now: float) -> int:
        for rid in [r for r, (_, until) in self.holds.items() if until <= now]:
            del self.holds[rid]  # a worker that died mid-call releases its hold here
        return sum(amount for amount, _ in self.holds.values())


@dataclass
class _Breaker:
    open_until: float | None = None
    probe_since: float | None = None
    buckets: dict[int, list[int]] = field(default_factory=dict)  # bucket -> [calls, failures]


class _Expiries:
    """When to look at an entry again, in coarse time buckets: eviction in amortised O(1) per entry.

    Redis drops keys by their TTL; memory must drop them itself, or a day of distinct users stays
    forever. Each entry is scheduled when created and looked at once when its time has come (a
    window still in use is scheduled again at its newest hit's end), so a call pays only for the
    entries that fell due, however many are live.
    """

    WIDTH = 60.0

    def __init__(self) -> None:
        self._buckets: dict[int, list[tuple[str, str]]] = {}
        self._heap: list[int] = []

    def at(self, when: float, kind: str, key: str) -> None:
        bucket = math.ceil(when / self.WIDTH)
        entries = self._buckets.get(bucket)
        if entries is None:
            entries = self._buckets[bucket] = []
            heapq.heappush(self._heap, bucket)
        entries.append((kind, key))

    def due(self, now: float) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while self._heap and self._heap[0] * self.WIDTH <= now:
            out += self._buckets.pop(heapq.heappop(self._heap))
        return out

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._buckets.values())


class MemoryStore:
    """The same semantics as the Redis scripts, under one lock, for one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._budgets: dict[str, _Budget] = {}
        self._windows: dict[str, deque[float]] = {}
        self._window_length: dict[str, float] = {}
        self._alerts: dict[str, float] = {}
        self._breakers: dict[str, _Breaker] = {}
        self._records: dict[str, tuple[str, float]] = {}
        self._expiries = _Expiries()
        self._now = 0.0  # the latest time a caller gave: records expire on it (put_record has no clock)

    def size(self) -> int:
        """Entries held (budgets, windows, alert claims, records): what eviction keeps bounded."""
        with self._lock:
            return len(self._budgets) + len(self._windows) + len(self._alerts) + len(self._records)

    def _evict(self, now: float) -> None:
        """Drop what fell due: ended periods, empty windows, lapsed alert claims and records."""
        self._now = max(self._now, now)
        for kind, key in self._expiries.due(now):
            if kind == "budget":
                budget = self._budgets.get(key)
                if budget is not None and budget.expires_at <= now:
                    del self._budgets[key]
            elif kind == "window":
                hits = self._windows.get(key)
                length = self._window_length.get(key, 0.0)
                if hits is not None:
                    while hits and hits[0] <= now - length:
                        hits.popleft()
                    if hits:
                        self._expiries.at(hits[-1] + length, "window", key)
                    else:
                        del self._windows[key], self._window_length[key]
            elif kind == "alert":
                if self._alerts.get(key, now + 1) <= now:
                    del self._alerts[key]
            elif kind == "record":
                record = self._records.get(key)
                if record is not None and record[1] <= now:
                    del self._records[key]

    def _budget(self, key: str, expires_at: float, now: float) -> _Budget:
        budget = self._budgets.get(key)
        if budget is None or budget.expires_at <= now:
            budget = self._budgets[key] = _Budget(expires_at=expires_at)
            self._expiries.at(expires_at, "budget", key)
        return budget

    def _window(self, key: str, length: float) -> deque[float]:
        hits = self._windows.get(key)
        if hits is None:
            hits = self._windows[key] = deque()
            self._window_length[key] = length
            self._expiries.at(self._now + length, "window", key)
        return hits

    def _claim_alert(self, key: str, threshold: str, until: float, now: float) -> bool:
        alert_key = f"{key}|{threshold}"
        if self._alerts.get(alert_key, 0) > now:
            return False
        self._alerts[alert_key] = until
        self._expiries.at(until, "alert", alert_key)
        return True

    def begin(self, step: Begin, now: float) -> Outcome:
        with self._lock:
            self._evict(now)
            for i, line in enumerate(step.gates):
                budget = self._budget(line.key, line.expires_at, now)
                if budget.spent >= line.limit or budget.exhausted_at_limit == line.limit:
                    return Outcome(False, "gate", i, retry_after=max(0.0, line.expires_at - now))
            remaining = []
            for i, line in enumerate(step.requests):
                hits = self._window(line.key, line.expires_at)
                while hits and hits[0] <= now - line.expires_at:
                    hits.popleft()
                if len(hits) + 1 > line.limit:
                    return Outcome(False, "request", i, retry_after=max(0.0, hits[0] + line.expires_at - now))
                remaining.append(line.limit - len(hits) - 1)
            budgets = [self._budget(line.key, line.expires_at, now) for line in step.holds]
            held = True
            for i, (line, budget) in enumerate(zip(step.holds, budgets, strict=True)):
                if budget.spent + budget.live_reserved(now) + line.amount > line.limit:
                    if step.optional_holds:
                        held = False
                        break
                    busy = budget.spent + line.amount <= line.limit
                    first = False
                    if not busy and line.amount <= KILL_SHARE * line.limit \
                            and budget.exhausted_at_limit != line.limit:
                        budget.exhausted_at_limit = line.limit
                        first = bool(step.exhausted_alert) and self._claim_alert(
                            line.key, step.exhausted_alert, line.expires_at, now)
                    retry = 1.0 if busy else max(0.0, line.expires_at - now)
                    return Outcome(False, "hold", i, busy=busy, retry_after=retry, newly_exhausted=first,
                                   spent=budget.spent)
            for line in step.requests:
                self._windows[line.key].append(now)
            for line, budget in zip(step.holds, budgets, strict=True):
                if held:
                    budget.holds[step.rid] = (line.amount, step.hold_until)
            breakers = {m: (b.open_until if (b := self._breakers.get(m)) else None) for m in step.breakers}
            return Outcome(True, remaining=tuple(remaining), breakers=breakers, held=held)

    def settle(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
               success: str | None = None, breaker: BreakerParams | None = None) -> list[Crossed]:
        crossed = []
        with self._lock:
            self._evict(now)
            for line in lines:
                budget = self._budget(line.key, line.expires_at, now)
                before = budget.spent
                for rid in rids:
                    budget.holds.pop(rid, None)
                budget.spent += line.amount
                for threshold in thresholds:
                    mark = threshold * line.limit
                    if before < mark <= budget.spent and self._claim_alert(line.key, repr(threshold),
                                                                           line.expires_at, now):
                        crossed.append(Crossed(line.key, threshold, budget.spent, line.limit))
            if success is not None and breaker is not None:
                self._record(success, True, now, breaker)
        return crossed

    def usage(self, keys: Sequence[str], now: float) -> list[tuple[int, int]]:
        with self._lock:
            out = []
            for key in keys:
                budget = self._budgets.get(key)
                if budget is None or budget.expires_at <= now:
                    out.append((0, 0))
                else:
                    out.append((budget.spent, budget.live_reserved(now)))
            return out

    def put_record(self, key: str, value: str, ttl: float) -> None:
        with self._lock:
            self._records[key] = (value, self._now + ttl)
            self._expiries.at(self._now + ttl, "record", key)

    def get_record(self, key: str) -> str | None:
        with self._lock:
            record = self._records.get(key)
            return None if record is None or record[1] <= self._now else record[0]

    def breaker_allow(self, key: str, now: float, cooldown: float) -> bool:
        with self._lock:
            b = self._breakers.get(key)
            if b is None or b.open_until is None:
                return True
            if now < b.open_until:
                return False
            if b.probe_since is not None and now < b.probe_since + cooldown:
                return False
            b.probe_since = now  # half-open: this caller is the one probe
            return True

    def breaker_record(self, key: str, ok: bool, now: float, params: BreakerParams) -> bool:
        with self._lock:
            return self._record(key, ok, now, params)

    def _record(self, key: str, ok: bool, now: float, params: BreakerParams) -> bool:
        b = self._breakers.setdefault(key, _Breaker())
        if b.open_until is not None:
            if b.probe_since is None:
                return False
            b.probe_since = None
            if ok:
                self._breakers[key] = _Breaker()
                return False
            b.open_until = now + params.cooldown
            return True
        width = params.window / BREAKER_BUCKETS
        bucket = math.floor(now / width)
        counts = b.buckets.setdefault(bucket, [0, 0])
        counts[0] += 1
        counts[1] += 0 if ok else 1
        if len(b.buckets) > BREAKER_BUCKETS:
            for old in [k for k in b.buckets if k <= bucket - BREAKER_BUCKETS]:
                del b.buckets[old]
        if ok:
            return False
        window = [b.buckets.get(i, (0, 0)) for i in range(bucket - BREAKER_BUCKETS + 1, bucket + 1)]
        calls = sum(c for c, _ in window)
        failures = sum(f for _, f in window)
        if calls >= params.min_calls and failures / calls >= params.failure_rate:
            self._breakers[key] = _Breaker(open_until=now + params.cooldown)
            return True
        return False

    def breaker_state(self, key: str, now: float) -> str:
        with self._lock:
            b = self._breakers.get(key)
            if b is None or b.open_until is None:
                return "closed"
            return "open" if now < b.open_until else "half_open"


# --- Redis ----------------------------------------------------------------------------------

# Budgets: a hash per budget key: "spent", "exhausted" (the limit it was found spent at) and one
# "r:<rid>" field per live hold ("amount until"). Breakers: a hash per model: "open_until",
# "probe_since", and "c:<bucket>" / "f:<bucket>" call and failure counts.
_LUA_FUNCTIONS = """
local function live_reserved(key, now)
  local total = 0
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    local f = fields[i]
    if string.sub(f, 1, 2) == 'r:' then
      local amount, untl = string.match(fields[i + 1], '(%-?%d+) (%S+)')
      if tonumber(untl) <= now then
        redis.call('HDEL', key, f)
      else
        total = total + tonumber(amount)
      end
    end
  end
  return total
end

-- Expiries are relative (the time left on the app's clock), never EXPIREAT: an absolute time from
-- the app host's clock deletes keys at once when that clock is behind Redis's (or a test's is).
local function ttl_ms(expires, now, grace_s)
  return math.max(1, math.floor((expires - now + grace_s) * 1000))
end

local function claim_alert(key, threshold, expires, now)
  if threshold == '' then return false end
  return redis.call('SET', key .. '|alert|' .. threshold, '1', 'NX', 'PX', ttl_ms(expires, now, 1)) ~= false
end

local function record_outcome(key, ok, now, min_calls, rate, window, cooldown)
  local state = redis.call('HMGET', key, 'open_until', 'probe_since')
  if state[1] then
    if not state[2] then return 0 end
    if ok then redis.call('DEL', key); return 0 end
    redis.call('HDEL', key, 'probe_since')
    redis.call('HSET', key, 'open_until', tostring(now + cooldown))
    return 1
  end
  local width = window / BUCKETS
  local b = math.floor(now / width)
  redis.call('HINCRBY', key, 'c:' .. b, 1)
  if not ok then redis.call('HINCRBY', key, 'f:' .. b, 1) end
  redis.call('HDEL', key, 'c:' .. (b - BUCKETS), 'f:' .. (b - BUCKETS))
  redis.call('EXPIRE', key, math.ceil(window + cooldown) + 60)
  if ok then return 0 end
  local fields = {}
  for i = b - BUCKETS + 1, b do
    table.insert(fields, 'c:' .. i); table.insert(fields, 'f:' .. i)
  end
  local values = redis.call('HMGET', key, unpack(fields))
  local calls, failures = 0, 0
  for i = 1, #values, 2 do
    calls = calls + tonumber(values[i] or '0'); failures = failures + tonumber(values[i + 1] or '0')
  end
  if calls >= min_calls and failures / calls >= rate then
    redis.call('DEL', key)
    redis.call('HSET', key, 'open_until', tostring(now + cooldown))
    redis.call('EXPIRE', key, math.ceil(cooldown) + 3600)
    return 1
  end
  return 0
end
""".replace("BUCKETS", str(BREAKER_BUCKETS)).replace("KILL_SHARE", repr(KILL_SHARE))

# KEYS: gates, requests, holds, breakers. ARGV: now, ng, nr, nh, nb, member, rid, hold_until,
# alert, optional_holds ('1'/'0'), then per gate (limit, expires), per request (limit, window),
# per hold (limit, amount, expires).
# Returns {ok, stage, failed, retry, newly, spent, busy, held, remaining..., open_until per breaker ('' = closed)}.
_LUA_BEGIN = _LUA_FUNCTIONS + """
local now = tonumber(ARGV[1])
local ng, nr, nh, nb = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local member, rid, hold, alert = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local optional = ARGV[10] == '1'
local a = 11
for i = 1, ng do
  local limit, expires = tonumber(ARGV[a]), tonumber(ARGV[a + 1]); a = a + 2
  local state = redis.call('HMGET', KEYS[i], 'spent', 'exhausted')
  if tonumber(state[1] or '0') >= limit or tonumber(state[2] or '-1') == limit then
    return {0, 'gate', i - 1, tostring(math.max(0, expires - now)), 0, 0, 0}
  end
end
local remaining = {}
for j = 1, nr do
  local key = KEYS[ng + j]
  local limit, window = tonumber(ARGV[a]), tonumber(ARGV[a + 1]); a = a + 2
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if count + 1 > limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    return {0, 'request', j - 1, tostring(math.max(0, tonumber(oldest[2]) + window - now)), 0, 0, 0}
  end
  remaining[j] = limit - count - 1
end
local hold_args = a
local held = 1
for k = 1, nh do
  local key = KEYS[ng + nr + k]
  local limit, amount, expires = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]); a = a + 3
  local spent = tonumber(redis.call('HGET', key, 'spent') or '0')
  if spent + live_reserved(key, now) + amount > limit then
    if optional then held = 0; break end
    if spent + amount <= limit then
      return {0, 'hold', k - 1, '1', 0, spent, 1}
    end
    local first = 0
    if amount <= KILL_SHARE * limit and tonumber(redis.call('HGET', key, 'exhausted') or '-1') ~= limit then
      redis.call('HSET', key, 'exhausted', limit)
      redis.call('PEXPIRE', key, ttl_ms(expires, now, 86400))
      if claim_alert(key, alert, expires, now) then first = 1 end
    end
    return {0, 'hold', k - 1, tostring(math.max(0, expires - now)), first, spent, 0}
  end
end
a = 11 + 2 * ng
for j = 1, nr do
  local key = KEYS[ng + j]
  local window = tonumber(ARGV[a + 1]); a = a + 2
  redis.call('ZADD', key, now, member)
  redis.call('EXPIRE', key, math.ceil(window) + 1)
end
a = hold_args
for k = 1, nh * held do
  local key = KEYS[ng + nr + k]
  local amount, expires = ARGV[a + 1], tonumber(ARGV[a + 2]); a = a + 3
  redis.call('HSET', key, 'r:' .. rid, amount .. ' ' .. hold)
  redis.call('PEXPIRE', key, ttl_ms(expires, now, 86400))
end
local out = {1, '', -1, '0', 0, 0, 0, held}
for j = 1, nr do table.insert(out, remaining[j]) end
for m = 1, nb do
  table.insert(out, redis.call('HGET', KEYS[ng + nr + nh + m], 'open_until') or '')
end
return out
""".replace("KILL_SHARE", repr(KILL_SHARE))

# KEYS: budget keys, then the success model's breaker key if any. ARGV: now, rids (space-separated), nt, thresholds...,
# nl, per line (limit, amount, expires), then (min_calls, rate, window, cooldown) when recording.
_LUA_SETTLE = _LUA_FUNCTIONS + """
local now = tonumber(ARGV[1]); local nt = tonumber(ARGV[3])
local nl = tonumber(ARGV[4 + nt])
local base = 4 + nt
local crossed = {}
for i = 1, nl do
  local limit = tonumber(ARGV[base + 3 * i - 2]); local amount = tonumber(ARGV[base + 3 * i - 1])
  local expires = tonumber(ARGV[base + 3 * i])
  for rid in string.gmatch(ARGV[2], '%S+') do redis.call('HDEL', KEYS[i], 'r:' .. rid) end
  local spent = redis.call('HINCRBY', KEYS[i], 'spent', amount)
  redis.call('PEXPIRE', KEYS[i], ttl_ms(expires, now, 86400))
  local before = spent - amount
  for t = 1, nt do
    local mark = tonumber(ARGV[3 + t]) * limit
    if before < mark and mark <= spent and claim_alert(KEYS[i], ARGV[3 + t], expires, now) then
      table.insert(crossed, {i - 1, ARGV[3 + t], spent})
    end
  end
end
if #KEYS > nl then
  local p = base + 3 * nl
  record_outcome(KEYS[nl + 1], true, now, tonumber(ARGV[p + 1]), tonumber(ARGV[p + 2]), tonumber(ARGV[p + 3]),
                 tonumber(ARGV[p + 4]))
end
return crossed
"""

_LUA_BREAKER_ALLOW = """
local now = tonumber(ARGV[1]); local cooldown = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'open_until', 'probe_since')
if not state[1] then return 1 end
if now < tonumber(state[1]) then return 0 end
if state[2] and now < tonumber(state[2]) + cooldown then return 0 end
redis.call('HSET', KEYS[1], 'probe_since', ARGV[1])
return 1
"""

_LUA_BREAKER_RECORD = _LUA_FUNCTIONS + """
return record_outcome(KEYS[1], ARGV[2] == '1', tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4]),
                      tonumber(ARGV[5]), tonumber(ARGV[6]))
"""


MAX_PENDING = 256  # settlements waiting at most: past this one is sent at once

SettleDone = Callable[[list[Crossed] | None, str | None], None]  # (crossed, failure: "not_sent" | "uncertain")


@dataclass
class _Pending:
    keys: list[str]
    args: list[Any]
    lines: Sequence[Line]
    done: SettleDone
    since: float


class RedisStore:
    """The shared store: every operation is one Lua script, so one round trip and atomic.

    A settlement is written behind (``settle_later``): it rides in the same round trip as the next
    ``begin`` of this process, or is sent by a flusher thread within ``settle_delay`` seconds when
    no request comes, and at exit. Until it lands its hold stays, so a budget only looks fuller
    (never emptier) for those milliseconds.
    """

    def __init__(self, uri: str, *, prefix: str, socket_timeout: float, settle_delay: float = 0.05) -> None:
        import redis
        from limits.storage import storage_from_string

        options: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
        if uri.startswith(("redis+sentinel", "valkey+sentinel")):
            options = {"socket_timeout": socket_timeout}
        self._limits_storage = storage_from_string(uri, **options)
        self.client: Any = self._limits_storage.storage  # type: ignore[union-attr]
        self.tag = f"{{fc:{prefix}}}"
        # Any Redis error (OOM, READONLY during a failover, CLUSTERDOWN, a non-Redis peer) is an outage
        # for CLAUDE_STORAGE_FAILURE to decide, never a 500.
        self._errors = (redis.exceptions.RedisError, OSError)
        self._begin = self.client.register_script(_LUA_BEGIN)
        self._settle = self.client.register_script(_LUA_SETTLE)
        self._allow = self.client.register_script(_LUA_BREAKER_ALLOW)
        self._record = self.client.register_script(_LUA_BREAKER_RECORD)
        self._lean = LeanScripts(self.client, socket_timeout) if lean_usable(self.client) else None
        self._settle_delay = settle_delay
        self._pending: list[_Pending] = []
        self._pending_lock = threading.Lock()
        self._flush_wakeup = threading.Event()
        self._flusher: tuple[int, threading.Thread] | None = None
        _STORES.add(self)

    def _k(self, key: str) -> str:
        return f"{self.tag}:{key}"

    def _b(self, model: str) -> str:
        return f"{self.tag}:breaker:{model}"

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise StorageUnavailable(type(exc).__name__) from exc

    # --- scripts, several per round trip ------------------------------------------------------

    def _run(self, calls: Sequence[Call]) -> list[Any]:
        """Run scripts in one round trip: a reply each, or the exception that command raised."""
        if self._lean is not None:
            return self._lean.run(calls)
        pipe = self.client.pipeline(transaction=False)
        for script, keys, args in calls:
            script(keys=keys, args=args, client=pipe)
        return list(pipe.execute(raise_on_error=False))

    def _run_with_pending(self, call: Call | None) -> Any:
        """``call`` (if any) in the same round trip as every settlement waiting to be written."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        calls: list[Call] = [(self._settle, p.keys, p.args) for p in pending]
        if call is not None:
            calls.append(call)
        if not calls:
            return None
        try:
            replies = self._run(calls)
        except self._errors as exc:
            # Sent or not? A failure to connect or write means not; a reply that never came may
            # still be applied when a hung Redis resumes, so it is not replayed (no double count).
            sent = not isinstance(exc, NotSent | redis_connection_errors())
            for p in pending:
                p.done(None, "uncertain" if sent else "not_sent")
            raise StorageUnavailable(type(exc).__name__) from exc
        for p, reply in zip(pending, replies, strict=False):
            if isinstance(reply, Exception):
                p.done(None, "not_sent")  # an error reply: the script did not run
            else:
                p.done(self._crossed(p.lines, reply), None)
        if call is None:
            return None
        reply = replies[-1]
        if isinstance(reply, Exception):
            raise StorageUnavailable(type(reply).__name__) from reply
        return reply

    def flush(self) -> None:
        """Write every settlement still waiting (exit, a status read, or a test that looks at Redis)."""
        try:
            self._run_with_pending(None)
        except StorageUnavailable:
            pass  # each one's ``done`` was told

    def _flush_soon(self) -> None:
        """A flusher thread per process (a forked worker starts its own) for quiet moments."""
        pid = os.getpid()
        if self._flusher is None or self._flusher[0] != pid or not self._flusher[1].is_alive():
            thread = threading.Thread(target=self._flush_loop, name="flask-claude-settle", daemon=True)
            self._flusher = (pid, thread)
            thread.start()
        self._flush_wakeup.set()

    def _flush_loop(self) -> None:
        while True:
            self._flush_wakeup.wait()
            self._flush_wakeup.clear()
            time.sleep(self._settle_delay)  # a request that comes meanwhile takes them along for free
            self.flush()

    def begin(self, step: Begin, now: float) -> Outcome:
        keys = ([self._k(line.key) for line in (*step.gates, *step.requests, *step.holds)]
                + [self._b(m) for m in step.breakers])
        args: list[Any] = [repr(now), len(step.gates), len(step.requests), len(step.holds), len(step.breakers),
                           step.member, step.rid, repr(step.hold_until), step.exhausted_alert,
                           "1" if step.optional_holds else "0"]
        for line in step.gates:
            args += [line.limit, repr(line.expires_at)]
        for line in step.requests:
            args += [line.limit, repr(line.expires_at)]
        for line in step.holds:
            args += [line.limit, line.amount, repr(line.expires_at)]
        res = self._run_with_pending((self._begin, keys, args))
        ok = bool(int(res[0]))
        stage = res[1].decode() if isinstance(res[1], bytes) else str(res[1])
        if not ok:
            return Outcome(False, stage, int(res[2]), busy=bool(int(res[6])), retry_after=float(res[3]),
                           newly_exhausted=bool(int(res[4])), spent=int(res[5]))
        nr = len(step.requests)
        remaining = tuple(int(x) for x in res[8:8 + nr])
        opens = res[8 + nr:]
        breakers = {m: (float(v) if v not in (b"", "") else None) for m, v in zip(step.breakers, opens, strict=True)}
        return Outcome(True, remaining=remaining, breakers=breakers, held=bool(int(res[7])))

    def settle(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
               success: str | None = None, breaker: BreakerParams | None = None) -> list[Crossed]:
        keys, args = self._settle_call(lines, rids, thresholds, now, success, breaker)
        return self._crossed(lines, self._call(self._settle, keys=keys, args=args))

    def settle_later(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
                     done: SettleDone, success: str | None = None, breaker: BreakerParams | None = None) -> None:
        """``settle``, written behind: ``done(crossed, failure)`` is called once it was sent."""
        keys, args = self._settle_call(lines, rids, thresholds, now, success, breaker)
        with self._pending_lock:
            self._pending.append(_Pending(keys, args, lines, done, time.monotonic()))
            full = len(self._pending) >= MAX_PENDING
        if full:
            self.flush()
        else:
            self._flush_soon()

    def _crossed(self, lines: Sequence[Line], res: Any) -> list[Crossed]:
        return [Crossed(lines[int(i)].key, float(t), int(spent), lines[int(i)].limit) for i, t, spent in res]

    def _settle_call(self, lines: Sequence[Line], rids: Sequence[str], thresholds: Sequence[float], now: float,
                     success: str | None, breaker: BreakerParams | None) -> tuple[list[str], list[Any]]:
        keys = [self._k(line.key) for line in lines]
        args: list[Any] = [repr(now), " ".join(rids), len(thresholds), *(repr(t) for t in thresholds), len(lines)]
        for line in lines:
            args += [line.limit, line.amount, repr(line.expires_at)]
        if success is not None and breaker is not None:
            keys.append(self._b(success))
            args += [breaker.min_calls, repr(breaker.failure_rate), repr(breaker.window), repr(breaker.cooldown)]
        return keys, args

    def ping(self) -> None:
        """A cheap check that storage answers again (the outage guard's probe)."""
        self._call(self.client.ping)

    def usage(self, keys: Sequence[str], now: float) -> list[tuple[int, int]]:
        out = []
        for key in keys:
            fields = self._call(self.client.hgetall, self._k(key))
            reserved = 0
            for name, value in fields.items():
                if name.startswith(b"r:"):
                    amount, until = value.split()
                    if float(until) > now:
                        reserved += int(amount)
            out.append((int(fields.get(b"spent", 0)), reserved))
        return out

    def put_record(self, key: str, value: str, ttl: float) -> None:
        self._call(self.client.set, self._k(f"record:{key}"), value, ex=max(1, math.ceil(ttl)))

    def get_record(self, key: str) -> str | None:
        value = self._call(self.client.get, self._k(f"record:{key}"))
        return None if value is None else value.decode()

    def breaker_allow(self, key: str, now: float, cooldown: float) -> bool:
        return bool(self._call(self._allow, keys=[self._b(key)], args=[repr(now), repr(cooldown)]))

    def breaker_record(self, key: str, ok: bool, now: float, params: BreakerParams) -> bool:
        args = [repr(now), "1" if ok else "0", params.min_calls, repr(params.failure_rate), repr(params.window),
                repr(params.cooldown)]
        return bool(self._call(self._record, keys=[self._b(key)], args=args))

    def breaker_state(self, key: str, now: float) -> str:
        open_until = self._call(self.client.hget, self._b(key), "open_until")
        if open_until is None:
            return "closed"
        return "open" if now < float(open_until) else "half_open"


_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    """A worker stopping cleanly (gunicorn's graceful exit, ``sys.exit``) writes what is waiting."""
    for store in list(_STORES):
        store.flush()


def redis_connection_errors() -> type[BaseException]:
    import redis

    return redis.exceptions.ConnectionError


def make_store(uri: str, *, prefix: str, socket_timeout: float, settle_delay: float = 0.05) -> Store:
    if uri.startswith("memory://"):
        return MemoryStore()
    return RedisStore(uri, prefix=prefix, socket_timeout=socket_timeout, settle_delay=settle_delay)
