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

Units are integers (tokens, micro-dollars), so concurrent increments never round.
Keys of one app share the Redis hash tag ``{fc:<prefix>}``: a multi-key script must stay in one
cluster slot.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Line:
    """One counter a step touches: a request limit (sliding window) or a budget (calendar period)."""

    key: str
    limit: int
    amount: int
    expires_at: float  # budgets: end of the period; request limits: the window length in seconds
    name: str = ""


@dataclass(frozen=True)
class Admission:
    ok: bool
    failed: int = -1  # index of the refusing line
    exhausted: bool = False  # a budget line (not a request line) refused
    retry_after: float = 0.0
    remaining: tuple[int, ...] = ()
    newly_exhausted: bool = False  # this refusal was the first to find the budget spent for good
    spent: int = 0


@dataclass(frozen=True)
class Crossed:
    key: str
    threshold: float
    spent: int
    limit: int


class StorageUnavailable(Exception):
    """The shared storage did not answer in time; ``CLAUDE_STORAGE_FAILURE`` decides what follows."""


class Store(Protocol):
    def admit(self, requests: Sequence[Line], budgets: Sequence[Line], member: str, now: float) -> Admission:
        """Refuse when a budget is spent or a request limit is full; else count the request in all."""

    def reserve(self, lines: Sequence[Line], rid: str, hold_until: float, now: float,
                exhausted_alert: str = "") -> Admission:
        """Reserve ``amount`` on every line, or nothing when any line lacks the room.

        A refusal that settled spend alone explains (not others' holds) marks the budget exhausted
        at its current limit, so admission refuses at once until the period ends or the limit is
        raised; the first such mark also claims the ``exhausted_alert`` threshold's alert.
        """

    def settle(self, lines: Sequence[Line], rid: str, thresholds: Sequence[float], now: float) -> list[Crossed]:
        """Replace the reservation by the real amount; report alert thresholds crossed first here."""

    def usage(self, keys: Sequence[str], now: float) -> list[tuple[int, int]]:
        """(spent, reserved) for each budget key."""

    def put_record(self, key: str, value: str, ttl: float) -> None:
        """A small JSON record that must outlive a process (a batch's reservation)."""

    def get_record(self, key: str) -> str | None: ...

    def breaker_allow(self, key: str, now: float, cooldown: float) -> bool: ...

    def breaker_record(self, key: str, ok: bool, now: float, min_calls: int, rate: float, window: float,
                       cooldown: float) -> bool: ...

    def breaker_state(self, key: str, now: float) -> str: ...


# --- memory ---------------------------------------------------------------------------------


@dataclass
class _Budget:
    spent: int = 0
    expires_at: float = 0.0
    exhausted_at_limit: int | None = None
    holds: dict[str, tuple[int, float]] | None = None  # rid -> (amount, hold_until)

    def live_reserved(self, now: float) -> int:
        if not self.holds:
            return 0
        for rid in [r for r, (_, until) in self.holds.items() if until <= now]:
            del self.holds[rid]  # a worker that died mid-call releases its hold here
        return sum(amount for amount, _ in self.holds.values())


class MemoryStore:
    """The same semantics as the Redis scripts, under one lock, for one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._budgets: dict[str, _Budget] = {}
        self._windows: dict[str, deque[float]] = {}
        self._alerts: dict[str, float] = {}
        self._breakers: dict[str, dict[str, Any]] = {}
        self._records: dict[str, str] = {}

    def _budget(self, key: str, expires_at: float, now: float) -> _Budget:
        budget = self._budgets.get(key)
        if budget is None or budget.expires_at <= now:
            budget = self._budgets[key] = _Budget(expires_at=expires_at, holds={})
        return budget

    def admit(self, requests: Sequence[Line], budgets: Sequence[Line], member: str, now: float) -> Admission:
        with self._lock:
            for i, line in enumerate(budgets):
                budget = self._budget(line.key, line.expires_at, now)
                if budget.spent >= line.limit or budget.exhausted_at_limit == line.limit:
                    return Admission(False, i, exhausted=True, retry_after=max(0.0, line.expires_at - now))
            remaining = []
            for i, line in enumerate(requests):
                hits = self._windows.setdefault(line.key, deque())
                while hits and hits[0] <= now - line.expires_at:
                    hits.popleft()
                if len(hits) + 1 > line.limit:
                    return Admission(False, i, retry_after=max(0.0, hits[0] + line.expires_at - now))
                remaining.append(line.limit - len(hits) - 1)
            for line in requests:
                self._windows[line.key].append(now)
            return Admission(True, remaining=tuple(remaining))

    def reserve(self, lines: Sequence[Line], rid: str, hold_until: float, now: float,
                exhausted_alert: str = "") -> Admission:
        with self._lock:
            budgets = [self._budget(line.key, line.expires_at, now) for line in lines]
            for i, (line, budget) in enumerate(zip(lines, budgets, strict=True)):
                if budget.spent + budget.live_reserved(now) + line.amount > line.limit:
                    first = False
                    if budget.spent + line.amount > line.limit and budget.exhausted_at_limit != line.limit:
                        budget.exhausted_at_limit = line.limit
                        alert_key = f"{line.key}|{exhausted_alert}"
                        if exhausted_alert and self._alerts.get(alert_key, 0) <= now:
                            self._alerts[alert_key] = line.expires_at
                            first = True
                    return Admission(False, i, exhausted=True, retry_after=max(0.0, line.expires_at - now),
                                     newly_exhausted=first, spent=budget.spent)
            for line, budget in zip(lines, budgets, strict=True):
                assert budget.holds is not None
                budget.holds[rid] = (line.amount, hold_until)
            return Admission(True)

    def settle(self, lines: Sequence[Line], rid: str, thresholds: Sequence[float], now: float) -> list[Crossed]:
        crossed = []
        with self._lock:
            for line in lines:
                budget = self._budget(line.key, line.expires_at, now)
                before = budget.spent
                if budget.holds:
                    budget.holds.pop(rid, None)
                budget.spent += line.amount
                for threshold in thresholds:
                    mark = threshold * line.limit
                    alert_key = f"{line.key}|{threshold!r}"
                    if before < mark <= budget.spent and self._alerts.get(alert_key, 0) <= now:
                        self._alerts[alert_key] = line.expires_at
                        crossed.append(Crossed(line.key, threshold, budget.spent, line.limit))
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
            self._records[key] = value

    def get_record(self, key: str) -> str | None:
        with self._lock:
            return self._records.get(key)

    def breaker_allow(self, key: str, now: float, cooldown: float) -> bool:
        with self._lock:
            state = self._breakers.get(key)
            if not state or state.get("open_until") is None:
                return True
            if now < state["open_until"]:
                return False
            probe = state.get("probe_since")
            if probe is not None and now < probe + cooldown:
                return False
            state["probe_since"] = now
            return True

    def breaker_record(self, key: str, ok: bool, now: float, min_calls: int, rate: float, window: float,
                       cooldown: float) -> bool:
        with self._lock:
            state = self._breakers.setdefault(key, {"outcomes": deque(), "open_until": None, "probe_since": None})
            if state["open_until"] is not None:
                if state["probe_since"] is None:
                    return False
                state["probe_since"] = None
                if ok:
                    state["open_until"] = None
                    state["outcomes"].clear()
                    return False
                state["open_until"] = now + cooldown
                return True
            outcomes: deque[tuple[float, bool]] = state["outcomes"]
            outcomes.append((now, ok))
            while outcomes and outcomes[0][0] < now - window:
                outcomes.popleft()
            failures = sum(1 for _, good in outcomes if not good)
            if not ok and len(outcomes) >= min_calls and failures / len(outcomes) >= rate:
                state["open_until"] = now + cooldown
                outcomes.clear()
                return True
            return False

    def breaker_state(self, key: str, now: float) -> str:
        with self._lock:
            state = self._breakers.get(key)
            if not state or state["open_until"] is None:
                return "closed"
            return "open" if now < state["open_until"] else "half_open"


# --- Redis ----------------------------------------------------------------------------------

# Budgets: a hash per budget key: "spent" and one "r:<rid>" field per live hold ("amount until").
_LUA_COMMON = """
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
"""

# KEYS: budget keys..., request keys...; ARGV: now, nb, nr, member, then per budget (limit, expires_at),
# then per request (limit, window)
_LUA_ADMIT = _LUA_COMMON + """
local now = tonumber(ARGV[1]); local nb = tonumber(ARGV[2]); local nr = tonumber(ARGV[3]); local member = ARGV[4]
local a = 5
for i = 1, nb do
  local limit = tonumber(ARGV[a]); local expires = tonumber(ARGV[a + 1]); a = a + 2
  local state = redis.call('HMGET', KEYS[i], 'spent', 'exhausted')
  local spent = tonumber(state[1] or '0')
  if spent >= limit or tonumber(state[2] or '-1') == limit then
    return {0, i - 1, 1, tostring(math.max(0, expires - now))}
  end
end
local remaining = {}
for j = 1, nr do
  local key = KEYS[nb + j]
  local limit = tonumber(ARGV[a]); local window = tonumber(ARGV[a + 1]); a = a + 2
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if count + 1 > limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    return {0, j - 1, 0, tostring(math.max(0, tonumber(oldest[2]) + window - now))}
  end
  remaining[j] = limit - count - 1
end
a = 5 + 2 * nb
for j = 1, nr do
  local key = KEYS[nb + j]
  local window = tonumber(ARGV[a + 1]); a = a + 2
  redis.call('ZADD', key, now, member)
  redis.call('EXPIRE', key, math.ceil(window) + 1)
end
return {1, -1, 0, '0', unpack(remaining)}
"""

# KEYS: budget keys; ARGV: now, rid, hold_until, exhausted_alert, then per key (limit, amount, expires_at)
_LUA_RESERVE = _LUA_COMMON + """
local now = tonumber(ARGV[1]); local rid = ARGV[2]; local hold = ARGV[3]; local alert = ARGV[4]
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 + 3 * i]); local amount = tonumber(ARGV[3 + 3 * i])
  local expires = tonumber(ARGV[4 + 3 * i])
  local spent = tonumber(redis.call('HGET', KEYS[i], 'spent') or '0')
  if spent + live_reserved(KEYS[i], now) + amount > limit then
    local first = 0
    if spent + amount > limit and tonumber(redis.call('HGET', KEYS[i], 'exhausted') or '-1') ~= limit then
      redis.call('HSET', KEYS[i], 'exhausted', limit)
      redis.call('EXPIREAT', KEYS[i], math.ceil(expires) + 86400)
      local claimed = alert ~= '' and
        redis.call('SET', KEYS[i] .. '|alert|' .. alert, '1', 'NX', 'EXAT', math.ceil(expires) + 1)
      if claimed then
        first = 1
      end
    end
    return {0, i - 1, tostring(math.max(0, expires - now)), first, spent}
  end
end
for i = 1, #KEYS do
  local amount = ARGV[3 + 3 * i]; local expires = tonumber(ARGV[4 + 3 * i])
  redis.call('HSET', KEYS[i], 'r:' .. rid, amount .. ' ' .. hold)
  redis.call('EXPIREAT', KEYS[i], math.ceil(expires) + 86400)
end
return {1, -1, '0'}
"""

# KEYS: budget keys; ARGV: now, rid, nthresholds, thresholds..., then per key (limit, amount, expires_at)
_LUA_SETTLE = """
local now = tonumber(ARGV[1]); local rid = ARGV[2]; local nt = tonumber(ARGV[3])
local base = 3 + nt
local crossed = {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[base + 3 * i - 2]); local amount = tonumber(ARGV[base + 3 * i - 1])
  local expires = tonumber(ARGV[base + 3 * i])
  redis.call('HDEL', KEYS[i], 'r:' .. rid)
  local spent = redis.call('HINCRBY', KEYS[i], 'spent', amount)
  redis.call('EXPIREAT', KEYS[i], math.ceil(expires) + 86400)
  local before = spent - amount
  for t = 1, nt do
    local mark = tonumber(ARGV[3 + t]) * limit
    if before < mark and mark <= spent then
      if redis.call('SET', KEYS[i] .. '|alert|' .. ARGV[3 + t], '1', 'NX', 'EXAT', math.ceil(expires) + 1) then
        table.insert(crossed, {i - 1, ARGV[3 + t], spent})
      end
    end
  end
end
return crossed
"""

_LUA_BREAKER_ALLOW = """
local now = tonumber(ARGV[1]); local cooldown = tonumber(ARGV[2])
local open_until = redis.call('HGET', KEYS[1], 'open_until')
if not open_until then return 1 end
if now < tonumber(open_until) then return 0 end
local probe = redis.call('HGET', KEYS[1], 'probe_since')
if probe and now < tonumber(probe) + cooldown then return 0 end
redis.call('HSET', KEYS[1], 'probe_since', ARGV[1])
return 1
"""

# KEYS: state hash, outcomes zset; ARGV: now, ok, min_calls, rate, window, cooldown, member
_LUA_BREAKER_RECORD = """
local now = tonumber(ARGV[1]); local ok = ARGV[2] == '1'
local min_calls = tonumber(ARGV[3]); local rate = tonumber(ARGV[4])
local window = tonumber(ARGV[5]); local cooldown = tonumber(ARGV[6])
local open_until = redis.call('HGET', KEYS[1], 'open_until')
if open_until then
  if not redis.call('HGET', KEYS[1], 'probe_since') then return 0 end
  redis.call('HDEL', KEYS[1], 'probe_since')
  if ok then
    redis.call('HDEL', KEYS[1], 'open_until'); redis.call('DEL', KEYS[2]); return 0
  end
  redis.call('HSET', KEYS[1], 'open_until', tostring(now + cooldown)); return 1
end
redis.call('ZADD', KEYS[2], now, (ok and 'ok:' or 'fail:') .. ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. tostring(now - window))
redis.call('EXPIRE', KEYS[2], math.ceil(window) + 1)
if ok then return 0 end
local all = redis.call('ZRANGE', KEYS[2], 0, -1)
local failures = 0
for _, m in ipairs(all) do if string.sub(m, 1, 5) == 'fail:' then failures = failures + 1 end end
if #all >= min_calls and failures / #all >= rate then
  redis.call('HSET', KEYS[1], 'open_until', tostring(now + cooldown))
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""


class RedisStore:
    """The shared store: every operation is one Lua script, so one round trip and atomic."""

    def __init__(self, uri: str, *, prefix: str, socket_timeout: float) -> None:
        from limits.storage import storage_from_string

        options: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout}
        if uri.startswith(("redis+sentinel", "valkey+sentinel")):
            options = {"socket_timeout": socket_timeout}
        self._limits_storage = storage_from_string(uri, **options)
        self.client: Any = self._limits_storage.storage  # type: ignore[union-attr]
        self.tag = f"{{fc:{prefix}}}"
        self._admit = self.client.register_script(_LUA_ADMIT)
        self._reserve = self.client.register_script(_LUA_RESERVE)
        self._settle = self.client.register_script(_LUA_SETTLE)
        self._allow = self.client.register_script(_LUA_BREAKER_ALLOW)
        self._record = self.client.register_script(_LUA_BREAKER_RECORD)

    def _k(self, key: str) -> str:
        return f"{self.tag}:{key}"

    def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        import redis

        try:
            return script(keys=keys, args=args)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StorageUnavailable(type(exc).__name__) from exc

    def admit(self, requests: Sequence[Line], budgets: Sequence[Line], member: str, now: float) -> Admission:
        keys = [self._k(b.key) for b in budgets] + [self._k(r.key) for r in requests]
        args: list[Any] = [repr(now), len(budgets), len(requests), member]
        for b in budgets:
            args += [b.limit, repr(b.expires_at)]
        for r in requests:
            args += [r.limit, repr(r.expires_at)]
        res = self._run(self._admit, keys, args)
        ok, failed, exhausted, retry = int(res[0]), int(res[1]), int(res[2]), float(res[3])
        return Admission(bool(ok), failed, exhausted=bool(exhausted), retry_after=retry,
                         remaining=tuple(int(x) for x in res[4:]))

    def reserve(self, lines: Sequence[Line], rid: str, hold_until: float, now: float,
                exhausted_alert: str = "") -> Admission:
        args: list[Any] = [repr(now), rid, repr(hold_until), exhausted_alert]
        for line in lines:
            args += [line.limit, line.amount, repr(line.expires_at)]
        res = self._run(self._reserve, [self._k(line.key) for line in lines], args)
        return Admission(bool(int(res[0])), int(res[1]), exhausted=True, retry_after=float(res[2]),
                         newly_exhausted=len(res) > 3 and bool(int(res[3])),
                         spent=int(res[4]) if len(res) > 4 else 0)

    def settle(self, lines: Sequence[Line], rid: str, thresholds: Sequence[float], now: float) -> list[Crossed]:
        args: list[Any] = [repr(now), rid, len(thresholds), *(repr(t) for t in thresholds)]
        for line in lines:
            args += [line.limit, line.amount, repr(line.expires_at)]
        res = self._run(self._settle, [self._k(line.key) for line in lines], args)
        return [Crossed(lines[int(i)].key, float(t), int(spent), lines[int(i)].limit) for i, t, spent in res]

    def usage(self, keys: Sequence[str], now: float) -> list[tuple[int, int]]:
        import redis

        out = []
        try:
            for key in keys:
                fields = self.client.hgetall(self._k(key))
                spent = int(fields.get(b"spent", 0))
                reserved = 0
                for field, value in fields.items():
                    if field.startswith(b"r:"):
                        amount, until = value.split()
                        if float(until) > now:
                            reserved += int(amount)
                out.append((spent, reserved))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StorageUnavailable(type(exc).__name__) from exc
        return out

    def put_record(self, key: str, value: str, ttl: float) -> None:
        import redis

        try:
            self.client.set(self._k(f"record:{key}"), value, ex=max(1, math.ceil(ttl)))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StorageUnavailable(type(exc).__name__) from exc

    def get_record(self, key: str) -> str | None:
        import redis

        try:
            value = self.client.get(self._k(f"record:{key}"))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StorageUnavailable(type(exc).__name__) from exc
        return None if value is None else value.decode()

    def breaker_allow(self, key: str, now: float, cooldown: float) -> bool:
        return bool(self._run(self._allow, [self._k(f"breaker:{key}")], [repr(now), repr(cooldown)]))

    def breaker_record(self, key: str, ok: bool, now: float, min_calls: int, rate: float, window: float,
                       cooldown: float) -> bool:
        import uuid

        keys = [self._k(f"breaker:{key}"), self._k(f"breaker:{key}:outcomes")]
        args = [repr(now), "1" if ok else "0", min_calls, repr(rate), repr(window), repr(cooldown), uuid.uuid4().hex]
        return bool(self._run(self._record, keys, args))

    def breaker_state(self, key: str, now: float) -> str:
        import redis

        try:
            open_until = self.client.hget(self._k(f"breaker:{key}"), "open_until")
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StorageUnavailable(type(exc).__name__) from exc
        if open_until is None:
            return "closed"
        return "open" if now < float(open_until) else "half_open"


def make_store(uri: str, *, prefix: str, socket_timeout: float) -> Store:
    if uri.startswith("memory://"):
        return MemoryStore()
    return RedisStore(uri, prefix=prefix, socket_timeout=socket_timeout)
