-- A process's first step: the app's data-loss marker (functions.lua), set to ARGV[1] when there is none.
-- KEYS: the marker.
local e = redis.call('GET', KEYS[1])
if not e then
  redis.call('SET', KEYS[1], ARGV[1])
  e = ARGV[1]
end
return e
