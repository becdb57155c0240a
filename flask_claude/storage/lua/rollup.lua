-- A call's rollup increments (flask_claude/rollups.py names them), prepended to settle.lua and run
-- alone for a step with nothing else to settle. The caller appends KEYS minute, hour, total and ARGV
-- ttl_ms, field1, amount1, ..., fieldN, amountN, N; N = 0 (and no keys) when a step has no rollup.
-- ``roll_keys`` tells the rest of the script how many KEYS were ours.
local roll_keys = 0
do
  local roll_n = tonumber(ARGV[#ARGV])
  if roll_n and roll_n > 0 then
    roll_keys = 3
    local minute_key, hour_key, total_key = KEYS[#KEYS - 2], KEYS[#KEYS - 1], KEYS[#KEYS]
    local first = #ARGV - 2 * roll_n
    local ttl = ARGV[first - 1]
    for i = first, #ARGV - 1, 2 do
      local f, amount = ARGV[i], ARGV[i + 1]
      redis.call('HINCRBY', minute_key, f, amount)
      redis.call('HINCRBY', total_key, f, amount)
      redis.call('HINCRBY', hour_key, f, amount)
    end
    redis.call('PEXPIRE', minute_key, ttl)
    redis.call('PEXPIRE', hour_key, ttl)
  end
end
