-- Give back what a call's turn took and the upstream did not use (output tokens under max_tokens).
-- KEYS: pace hash.  ARGV: n, n x (dimension, amount).  The level never passes the limit.
for i = 0, tonumber(ARGV[1]) - 1 do
  local d = ARGV[2 + 2 * i]; local amount = tonumber(ARGV[3 + 2 * i])
  local limit = tonumber(redis.call('HGET', KEYS[1], 'L:' .. d))
  if limit then
    local level = tonumber(redis.call('HGET', KEYS[1], 'v:' .. d))
    redis.call('HSET', KEYS[1], 'v:' .. d, string.format('%.6f', math.min(limit, level + amount)))
  end
end
return 0
