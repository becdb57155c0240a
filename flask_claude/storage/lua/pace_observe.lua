-- Record what a response says is left of each dimension: a header only lowers the level (pacing.py).
-- KEYS: pace hash.  ARGV: now, ttl_ms, default window, n, n x (dimension, limit, remaining, reset_in, counted)
-- ``counted``: what the reporting call took while let through unknown (the upstream counted it: no
-- longer in doubt). A first report also takes off what was let through unknown (``u:``, pace.lua), counted or not.
-- The refill rate is what is missing over the time to full; the deepest estimate wins (Quota.rate).
local now = tonumber(ARGV[1]); local window = tonumber(ARGV[3]); local n = tonumber(ARGV[4])
for i = 0, n - 1 do
  local d = ARGV[5 + 5 * i]; local limit = tonumber(ARGV[6 + 5 * i])
  local remaining = tonumber(ARGV[7 + 5 * i]); local reset_in = tonumber(ARGV[8 + 5 * i])
  if tonumber(ARGV[9 + 5 * i]) > 0 then redis.call('HINCRBYFLOAT', KEYS[1], 'u:' .. d, -tonumber(ARGV[9 + 5 * i])) end
  local known = tonumber(redis.call('HGET', KEYS[1], 'L:' .. d)) == limit
  local old, weight, level, at = nil, -1, nil, nil
  if known then
    old = tonumber(redis.call('HGET', KEYS[1], 'q:' .. d))
    weight = tonumber(redis.call('HGET', KEYS[1], 'w:' .. d)) or 0
    level = tonumber(redis.call('HGET', KEYS[1], 'v:' .. d))
    at = tonumber(redis.call('HGET', KEYS[1], 't:' .. d))
  end
  local missing = limit - remaining - 1
  local rate = old
  if reset_in > 0.05 and missing >= 1 and missing >= weight then
    rate = missing / reset_in; weight = missing
  elseif not old then
    rate = limit / window; weight = 0
  end
  if level then
    level = math.min(limit, level + old * math.max(0, now - at), remaining)
  else
    -- The first report: calls let through before it may not be counted in it yet.
    level = remaining - math.max(0, tonumber(redis.call('HGET', KEYS[1], 'u:' .. d)) or 0)
  end
  redis.call('HSET', KEYS[1], 'L:' .. d, limit, 'q:' .. d, string.format('%.6f', rate), 'w:' .. d, weight,
             'v:' .. d, string.format('%.6f', level), 't:' .. d, string.format('%.6f', now))
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0
