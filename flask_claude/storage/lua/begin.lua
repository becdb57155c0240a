-- The one storage step before a call (or before the view): admission, holds and breaker reads, all
-- or nothing.
-- KEYS: gates..., requests..., holds..., breakers...
-- ARGV: now, ng, nr, nh, nb, member, rid, hold_until, alert, optional_holds ('1'/'0'),
--       downgrade_line (1-based hold, 0: none), downgrade_at,
--       then per gate (limit, expires), per request (limit, window), per hold (limit, amount, alt_amount, expires).
-- Returns {ok, stage, failed, retry, newly, spent, busy, held, downgraded, fraction, remaining..., reset...,
--          open_until per breaker ('' = closed)}.
local now = tonumber(ARGV[1])
local ng, nr, nh, nb = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local member, rid, hold, alert = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local optional = ARGV[10] == '1'
local dg_line, dg_at = tonumber(ARGV[11]), tonumber(ARGV[12])
local first_arg = 13
local a = first_arg
for i = 1, ng do
  local limit, expires = tonumber(ARGV[a]), tonumber(ARGV[a + 1]); a = a + 2
  local state = redis.call('HMGET', KEYS[i], 'spent', 'exhausted')
  if tonumber(state[1] or '0') >= limit or tonumber(state[2] or '-1') == limit then
    return {0, 'gate', i - 1, tostring(math.max(0, expires - now)), 0, 0, 0}
  end
end
local remaining, resets = {}, {}
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
  resets[j] = window  -- until a slot frees: the oldest hit's end, or this one's when it is the first
  if count > 0 then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    resets[j] = math.max(0, tonumber(oldest[2]) + window - now)
  end
end
local hold_args = a
local held = 1
-- budget-aware step-down: past its fraction, the cheaper chain's worst case is held instead
local use_alt, fraction = 0, 0
if dg_line > 0 then
  local at = hold_args + 4 * (dg_line - 1)
  local dg_limit = tonumber(ARGV[at])
  fraction = tonumber(redis.call('HGET', KEYS[ng + nr + dg_line], 'spent') or '0') / math.max(dg_limit, 1)
  if fraction >= dg_at then use_alt = 1 end
end
local exists = {}
for k = 1, nh do
  local key = KEYS[ng + nr + k]
  local limit, expires = tonumber(ARGV[a]), tonumber(ARGV[a + 3])
  local amount = tonumber(ARGV[a + 1 + use_alt]); a = a + 4
  local spent, reserved, present = budget_state(key, now)
  exists[k] = present
  if spent + reserved + amount > limit then
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
a = first_arg + 2 * ng
for j = 1, nr do
  local key = KEYS[ng + j]
  local window = tonumber(ARGV[a + 1]); a = a + 2
  redis.call('ZADD', key, now, member)
  redis.call('EXPIRE', key, math.ceil(window) + 1)
end
a = hold_args
for k = 1, nh * held do
  local key = KEYS[ng + nr + k]
  local amount, expires = ARGV[a + 1 + use_alt], tonumber(ARGV[a + 3]); a = a + 4
  redis.call('HSET', key, 'r:' .. rid, amount .. ' ' .. hold)
  if not exists[k] then  -- a key still there keeps the expiry it was created with (the period's end)
    redis.call('PEXPIRE', key, ttl_ms(expires, now, 86400))
  end
end
local out = {1, '', -1, '0', 0, 0, 0, held, use_alt, tostring(fraction)}
for j = 1, nr do table.insert(out, remaining[j]) end
for j = 1, nr do table.insert(out, tostring(resets[j])) end
for m = 1, nb do
  table.insert(out, redis.call('HGET', KEYS[ng + nr + nh + m], 'open_until') or '')
end
return out
