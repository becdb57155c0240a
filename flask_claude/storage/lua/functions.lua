-- Shared by the scripts below: prepended (after the constants BUCKETS and KILL_SHARE, which
-- storage/redis.py writes from storage/records.py) to begin.lua, settle.lua, restore.lua, usage.lua
-- and breaker_record.lua.
--
-- Budgets: a hash per budget key K: "spent", "held" (the sum of its live holds), "exhausted" (the
-- limit it was found spent at), "lapse" (no entry of K|t lapses before it; absent while K|t is empty)
-- and one "r:<rid>" field per hold: its amount while it is live, "-" once settled. The settled mark
-- makes a settlement count once however often it is sent (a retry after a lost reply, a replay
-- after an outage). K|t is a sorted set of those rids scored by when they lapse (a hold: its
-- hold_until; a settled mark: SETTLED_MEMORY_S after settling, or its hold's lapse if later). A step reads spent, held and lapse
-- in one HMGET and looks into K|t only once something may have lapsed, so its Redis time does not
-- grow with the calls in flight; each entry is dropped once (O(1) per step, amortised).
-- Breakers: a hash per model: "open_until", "probe_since", and "c:<bucket>" / "f:<bucket>" call
-- and failure counts.
-- Lapsed entries are dropped LAPSE_BATCH at a time, at most LAPSE_ROUNDS batches a step (the rest by
-- the next steps; until then the budget only looks fuller, never emptier).
local LAPSE_BATCH, LAPSE_ROUNDS = 256, 8
local SETTLED_MEMORY_S = 900  -- how long a settled call's id is remembered at least

-- Expiries are relative (the time left on the app's clock), never EXPIREAT: an absolute time from
-- the app host's clock deletes keys at once when that clock is behind Redis's (or a test's is).
local function ttl_ms(expires, now, grace_s)
  return math.max(1, math.floor((expires - now + grace_s) * 1000))
end

-- The app's data-loss marker (the last key of begin, settle and restore): a value set once and never
-- expiring. A step from a process that knew another value is not applied: the data it would count
-- on is gone (FLUSHALL, a restart without persistence, a failover to an empty replica), and that
-- process first puts back the spend it knows (restore.lua). Returns false, or the marker's value.
local function epoch_changed(key, known, proposed)
  local e = redis.call('GET', key)
  if e == known then return false end
  if not e then
    redis.call('SET', key, proposed)
    e = proposed
  end
  return e
end

-- Drop what lapsed from K|t and its hold amounts from "held"; then "lapse" is the earliest entry left.
local function drop_lapsed(key, now)
  local timeline = key .. '|t'
  for _ = 1, LAPSE_ROUNDS do
    local due = redis.call('ZRANGEBYSCORE', timeline, '-inf', now, 'LIMIT', 0, LAPSE_BATCH)
    if #due == 0 then break end
    local freed, fields = 0, {}
    for i = 1, #due do
      local f = 'r:' .. due[i]
      local v = redis.call('HGET', key, f)
      if v and v ~= '-' then freed = freed + tonumber(v) end
      fields[i] = f
    end
    redis.call('HDEL', key, unpack(fields))
    redis.call('ZREM', timeline, unpack(due))
    if freed > 0 then redis.call('HINCRBY', key, 'held', -freed) end
    if #due < LAPSE_BATCH then break end
  end
  local first = redis.call('ZRANGE', timeline, 0, 0, 'WITHSCORES')
  if #first == 0 then redis.call('HDEL', key, 'lapse') else redis.call('HSET', key, 'lapse', first[2]) end
end

-- A budget's spent, its live holds' sum, whether the key is there (it then has its expiry: every
-- write that creates a budget key sets one), the limit it was found spent at, "lapse", and (with a
-- ``rid``) that hold's field: a step sent again after a reply that never came finds its own hold.
local function budget_state(key, now, rid)
  local fields = {'spent', 'held', 'exhausted', 'lapse', 'r:' .. (rid or '')}
  local s = redis.call('HMGET', key, unpack(fields))
  local lapse = s[4]
  if lapse and tonumber(lapse) <= now then
    drop_lapsed(key, now)
    s = redis.call('HMGET', key, unpack(fields))
    lapse = s[4]
  end
  return tonumber(s[1] or '0'), tonumber(s[2] or '0'), (s[1] or s[2] or s[3]) ~= false,
         tonumber(s[3] or '-1'), lapse and tonumber(lapse) or false, rid ~= nil and rid ~= '' and s[5]
end

-- A new entry on K|t; ``lapse`` is K's as budget_state read it (false: K|t is empty or missing, so
-- this entry makes it, and it gets K's expiry: the period's end and a day).
local function timeline_add(key, score, rid, lapse, expires, now)
  local timeline = key .. '|t'
  redis.call('ZADD', timeline, score, rid)
  if not lapse then
    redis.call('PEXPIRE', timeline, ttl_ms(expires, now, 86400))
    redis.call('HSET', key, 'lapse', score)
  elseif tonumber(score) < lapse then
    redis.call('HSET', key, 'lapse', score)
  end
end

-- ``held`` is the sum budget_state read: the script runs alone, so one HSET writes both fields.
local function hold(key, rid, amount, held, lapses_at, lapse, expires, now)
  redis.call('HSET', key, 'r:' .. rid, amount, 'held', held + tonumber(amount))
  timeline_add(key, lapses_at, rid, lapse, expires, now)
end

-- Replace the holds ``rids`` (the call's own first, then its top-ups) by ``amount`` spent, and mark
-- the call settled. ``state`` is the line's {spent, held, the call's own hold field} as the caller
-- read it in one HMGET (the field: its amount, or false when it lapsed or was never taken).
-- Returns the spent before and after.
local function settle_line(key, rids, state, amount, expires, now)
  local first, first_value = rids[1], state[3]
  local spent, held = tonumber(state[1] or '0'), tonumber(state[2] or '0')
  local freed = first_value and tonumber(first_value) or 0
  for i = 2, #rids do  -- top-ups: rare
    local v = redis.call('HGET', key, 'r:' .. rids[i])
    if v and v ~= '-' then freed = freed + tonumber(v) end
    redis.call('HDEL', key, 'r:' .. rids[i])
    redis.call('ZREM', key .. '|t', rids[i])
  end
  if #rids > 1 and redis.call('EXISTS', key .. '|t') == 0 then redis.call('HDEL', key, 'lapse') end
  local before = spent
  spent = spent + amount
  -- the script runs alone: spent, held and the settled mark in one write
  if first then
    redis.call('HSET', key, 'spent', spent, 'held', held - freed, 'r:' .. first, '-')
    -- The mark stays SETTLED_MEMORY_S at least, and never less than its hold would have: a copy
    -- of a settlement whose reply was lost may come back after an outage, long after the hold.
    if first_value then  -- its hold's entry is on K|t: GT only ever lengthens it (Redis 6.2+)
      redis.call('ZADD', key .. '|t', 'GT', now + SETTLED_MEMORY_S, first)
    else
      local lapse = redis.call('HGET', key, 'lapse')
      timeline_add(key, now + SETTLED_MEMORY_S, first, lapse and tonumber(lapse) or false, expires, now)
    end
  else
    redis.call('HSET', key, 'spent', spent, 'held', held - freed)
  end
  if before == 0 and redis.call('PTTL', key) < 0 then  -- a new key: give it the period's expiry
    redis.call('PEXPIRE', key, ttl_ms(expires, now, 86400))
  end
  return before, spent
end

local function claim_alert(key, threshold, expires, now)
  if threshold == '' then return false end
  return redis.call('SET', key .. '|alert|' .. threshold, '1', 'NX', 'PX', ttl_ms(expires, now, 1)) ~= false
end

-- ``seen_closed``: a success on a breaker the call's first step read closed. The state is not read
-- again (one command instead of two on every call): had it opened meanwhile, the success is counted
-- in the open breaker's hash, where nothing reads it (opening and a probe's success both start the
-- counts over), and the expiry below is only ever lengthened, never cut short under an open state.
local function record_outcome(key, ok, now, min_calls, rate, window, cooldown, seen_closed)
  if not seen_closed then
    local state = redis.call('HMGET', key, 'open_until', 'probe_since')
    if state[1] then
      if not state[2] then return 0 end
      if ok then redis.call('DEL', key); return 0 end
      redis.call('HDEL', key, 'probe_since')
      redis.call('HSET', key, 'open_until', tostring(now + cooldown))
      return 1
    end
  end
  local width = window / BUCKETS
  local b = math.floor(now / width)
  local first = redis.call('HINCRBY', key, 'c:' .. b, '1') == 1
  if not ok then redis.call('HINCRBY', key, 'f:' .. b, '1') end
  if first then  -- a new bucket (or key): drop the one that left the window and keep the key alive
    redis.call('HDEL', key, 'c:' .. (b - BUCKETS), 'f:' .. (b - BUCKETS))
    local ttl = (math.ceil(window + cooldown) + 60) * 1000
    if not seen_closed or redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
  end
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
