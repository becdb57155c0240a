-- Record what a response says is left of each dimension: a header only lowers the level (pacing.py).
-- KEYS: pace hash.  ARGV: now, ttl_ms, default window, n, n x (dimension, limit, remaining, reset_in)
-- The refill rate is what is missing over the time to full, when that says enough (Quota.rate).
local now = tonumber(ARGV[1]); local window = tonumber(ARGV[3]); local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  local d = ARGV[5 + 4 * i]; local limit = tonumber(ARGV[6 + 4 * i])
  local remaining = tonumber(ARGV[7 + 4 * i]); local reset_in = tonumber(ARGV[8 + 4 * i])
  local old = tonumber(redis.call('HGET', KEYS[1], 'q:' .. d))
  local missing = limit - remaining - 1
  local rate
  if reset_in > 0.05 and missing >= 0.05 * limit then rate = missing / reset_in
  elseif old then rate = old
  else rate = limit / window end
  local level = tonumber(redis.call('HGET', KEYS[1], 'v:' .. d))
  if level then
    local at = tonumber(redis.call('HGET', KEYS[1], 't:' .. d))
    level = math.min(limit, level + old * math.max(0, now - at), remaining)
  else
    level = remaining
  end
  redis.call('HSET', KEYS[1], 'L:' .. d, limit, 'q:' .. d, string.format('%.6f', rate),
             'v:' .. d, string.format('%.6f', level), 't:' .. d, string.format('%.6f', now))
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0
