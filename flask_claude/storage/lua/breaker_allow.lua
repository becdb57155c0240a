-- False (0) while a model's breaker is open; after the cooldown, exactly one caller gets the probe.
-- KEYS: breaker key. ARGV: now, cooldown.
local now = tonumber(ARGV[1]); local cooldown = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'open_until', 'probe_since')
if not state[1] then return 1 end
if now < tonumber(state[1]) then return 0 end
if state[2] and now < tonumber(state[2]) + cooldown then return 0 end
redis.call('HSET', KEYS[1], 'probe_since', ARGV[1])
return 1
