-- An alert episode's shared state. KEYS: the alerts hash. ARGV: field, '1' (firing) or '0', value, ttl_ms.
-- Returns 1 when this caller made the transition (and so is the one to announce it).
if ARGV[2] == '1' then
  local claimed = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return claimed
end
return redis.call('HDEL', KEYS[1], ARGV[1])
