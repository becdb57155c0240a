-- May a waiter call this model now? The concurrency lease first, then the token buckets (pacing.py).
-- KEYS: pace hash, leases zset, queue zset (score: ticket), queue heartbeats zset, ticket counter
-- ARGV: now, waiter, max_wait, cap (0: none), lease_ttl, heartbeat_ttl, pace (1/0), n, n x (dimension, need)
-- Returns {granted 1/0, wait (string), queue position, 1 when the buckets were known (0: let through unknown)}.
local now = tonumber(ARGV[1]); local waiter = ARGV[2]; local max_wait = tonumber(ARGV[3])
local cap = tonumber(ARGV[4]); local lease_ttl = tonumber(ARGV[5]); local hb_ttl = tonumber(ARGV[6])
local pace = ARGV[7] == '1'; local n = tonumber(ARGV[8])
local leased = false
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
  for _, w in ipairs(gone) do redis.call('ZREM', KEYS[3], w) end
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  leased = redis.call('ZSCORE', KEYS[2], waiter) ~= false
  if not leased then
    local free = cap - redis.call('ZCARD', KEYS[2])
    local rank = redis.call('ZRANK', KEYS[3], waiter)
    local ahead = rank or redis.call('ZCARD', KEYS[3])
    if ahead >= free then
      if not rank then redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[5]), waiter) end
      redis.call('ZADD', KEYS[4], now + hb_ttl, waiter)
      local ms = math.ceil(hb_ttl * 1000) + 60000
      redis.call('PEXPIRE', KEYS[3], ms); redis.call('PEXPIRE', KEYS[4], ms); redis.call('PEXPIRE', KEYS[5], ms)
      return {0, '0', math.max(1, ahead - math.max(free, 0) + 1), 1}
    end
  end
end
local wait = 0
local levels = {}
local known = 1
if pace then
  for i = 0, n - 1 do
    local d = ARGV[9 + 2 * i]; local need = tonumber(ARGV[10 + 2 * i])
    local limit = tonumber(redis.call('HGET', KEYS[1], 'L:' .. d))
    if limit and need > 0 then
      local rate = tonumber(redis.call('HGET', KEYS[1], 'q:' .. d))
      local level = tonumber(redis.call('HGET', KEYS[1], 'v:' .. d))
      local at = tonumber(redis.call('HGET', KEYS[1], 't:' .. d))
      level = math.min(limit, level + rate * math.max(0, now - at))
      if need > level then wait = math.max(wait, (need - level) / rate) end
      levels[d] = level - need
    end
  end
  if next(levels) == nil then
    known = 0
    -- Nothing known yet: the call goes, and is counted so the first report does not forget it.
    for i = 0, n - 1 do redis.call('HINCRBYFLOAT', KEYS[1], 'u:' .. ARGV[9 + 2 * i], ARGV[10 + 2 * i]) end
    redis.call('PEXPIRE', KEYS[1], 600000)
  end
  if wait > max_wait then
    redis.call('ZREM', KEYS[3], waiter); redis.call('ZREM', KEYS[4], waiter)
    return {0, string.format('%.6f', wait), 0, 1}
  end
  for d, level in pairs(levels) do
    redis.call('HSET', KEYS[1], 'v:' .. d, string.format('%.6f', level), 't:' .. d, string.format('%.6f', now))
  end
end
if cap > 0 then
  redis.call('ZREM', KEYS[3], waiter); redis.call('ZREM', KEYS[4], waiter)
  redis.call('ZADD', KEYS[2], now + lease_ttl, waiter)
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease_ttl * 1000) + 1000)
end
return {1, string.format('%.6f', wait), 0, known}
