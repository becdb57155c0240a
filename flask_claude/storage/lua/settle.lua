-- Replace a call's holds by its real amounts, claim the alert thresholds crossed, record the success
-- on the model's breaker. (The call's rollup increments are not here: the worker sums them and
-- rollup.lua writes the sums, at most once per CLAUDE_ROLLUP_FLUSH_INTERVAL.)
-- KEYS: budget keys..., [the success model's breaker key]
-- ARGV: now, rids (space-separated), nt, thresholds..., nl, per line (limit, amount, expires),
--       [min_calls, rate, window, cooldown when recording].
-- Returns {{line index, threshold, spent}...} for each threshold first crossed here.
local now = tonumber(ARGV[1]); local nt = tonumber(ARGV[3])
local nl = tonumber(ARGV[4 + nt])
local base = 4 + nt
local crossed = {}
for i = 1, nl do
  local limit = tonumber(ARGV[base + 3 * i - 2]); local amount = tonumber(ARGV[base + 3 * i - 1])
  local expires = tonumber(ARGV[base + 3 * i])
  for rid in string.gmatch(ARGV[2], '%S+') do redis.call('HDEL', KEYS[i], 'r:' .. rid) end
  local spent = redis.call('HINCRBY', KEYS[i], 'spent', amount)
  local before = spent - amount
  if before == 0 then  -- the key may be new: otherwise it has the expiry it was created with
    redis.call('PEXPIRE', KEYS[i], ttl_ms(expires, now, 86400))
  end
  for t = 1, nt do
    local mark = tonumber(ARGV[3 + t]) * limit
    if before < mark and mark <= spent and claim_alert(KEYS[i], ARGV[3 + t], expires, now) then
      table.insert(crossed, {i - 1, ARGV[3 + t], spent})
    end
  end
end
if #KEYS > nl then
  local p = base + 3 * nl
  record_outcome(KEYS[nl + 1], true, now, tonumber(ARGV[p + 1]), tonumber(ARGV[p + 2]), tonumber(ARGV[p + 3]),
                 tonumber(ARGV[p + 4]))
end
return crossed
