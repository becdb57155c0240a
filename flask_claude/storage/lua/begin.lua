-- The one storage step before a call (or before the view): admission, holds and breaker reads, all
-- or nothing.
-- KEYS: gates..., requests..., holds..., breakers...
-- ARGV: now, ng, nr, nh, nb, member, rid, hold_until, alert, optional_holds ('1'/'0'),
--       then per gate (limit, expires), per request (limit, window), per hold (limit, amount, expires).
-- Returns {ok, stage, failed, retry, newly, spent, busy, held, remaining..., open_until per breaker ('' = closed)}.
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
