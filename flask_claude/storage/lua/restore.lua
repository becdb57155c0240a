-- Put back the spend one process settled this period, after the app's data was lost (functions.lua,
-- epoch_changed). Every worker restores its own share once, so together they restore the day. The
-- alert thresholds the restored spend passes are claimed, not announced: they were sent before.
-- KEYS: budget keys..., the app's data-loss marker
-- ARGV: restore id, now, nt, thresholds..., per key (amount, limit, expires), the marker's value this
--       process knows (the new one) and the one it proposes.
-- Returns {'lost', marker} when the data was lost again, else 0. Each budget is put back once per
-- restore id: a restore sent again (its reply never came), whatever batch it is in, skips it.
local lost = epoch_changed(KEYS[#KEYS], ARGV[#ARGV - 1], ARGV[#ARGV])
if lost then return {'lost', lost} end
local now, nt = tonumber(ARGV[2]), tonumber(ARGV[3])
local p = 4 + nt
for i = 1, #KEYS - 1 do
  local amount, limit, expires = tonumber(ARGV[p]), tonumber(ARGV[p + 1]), tonumber(ARGV[p + 2])
  p = p + 3
  local done = KEYS[#KEYS] .. ':restored:' .. ARGV[1] .. ':' .. KEYS[i]
  if redis.call('SET', done, '1', 'NX', 'PX', ttl_ms(expires, now, 86400)) then
    local state = redis.call('HMGET', KEYS[i], 'spent', 'held')
    local before, spent = settle_line(KEYS[i], {}, {state[1], state[2], false}, amount, expires, now)
    for t = 1, nt do
      local mark = tonumber(ARGV[3 + t]) * limit
      if before < mark and mark <= spent then claim_alert(KEYS[i], ARGV[3 + t], expires, now) end
    end
  end
end
return 0
