-- Shared by the scripts below: prepended (after the constants BUCKETS and KILL_SHARE, which
-- storage/redis.py writes from storage/records.py) to begin.lua, settle.lua and breaker_record.lua.
-- Budgets: a hash per budget key: "spent", "exhausted" (the limit it was found spent at) and one
-- "r:<rid>" field per live hold ("amount until"). Breakers: a hash per model: "open_until",
-- "probe_since", and "c:<bucket>" / "f:<bucket>" call and failure counts.
-- A budget's spent, its live holds' sum, whether the key is still there (it then has its expiry:
-- every write that creates a budget key sets one) and the limit it was found spent at, from one
-- HGETALL; lapsed holds are dropped.
local byte, find, sub = string.byte, string.find, string.sub
-- Every live hold is read back by every step on its budget, so this loop runs once per call in
-- flight: a plain find and two subs per hold, ~15% cheaper than a pattern with captures.
local function budget_state(key, now)
  local spent, total, exhausted = 0, 0, -1
  local fields = redis.call('HGETALL', key)
  local left = #fields / 2
  for i = 1, #fields, 2 do
    local f = fields[i]
    if f == 'spent' then
      spent = tonumber(fields[i + 1])
    elseif f == 'exhausted' then
      exhausted = tonumber(fields[i + 1])
    elseif byte(f, 1) == 114 and byte(f, 2) == 58 then  -- "r:": a hold, "amount until"
      local v = fields[i + 1]
      local gap = find(v, ' ', 1, true)
      if tonumber(sub(v, gap + 1)) <= now then
        redis.call('HDEL', key, f)
        left = left - 1
      else
        total = total + tonumber(sub(v, 1, gap - 1))
      end
    end
  end
  return spent, total, left > 0, exhausted
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
