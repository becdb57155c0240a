-- A worker's coalesced rollup increments (flask_claude/rollups.py names the fields; storage/rollups.py
-- sums them per minute bucket and sends them at most once per CLAUDE_ROLLUP_FLUSH_INTERVAL).
-- KEYS: the hashes to add to: minute buckets, hour buckets, the lifetime total.
-- ARGV: ttl_ms, then per key in KEYS' order: expires (1: PEXPIRE it by ttl_ms after adding, 0: never
--       expires), n, field1, amount1, ..., fieldn, amountn.
-- Expiries are relative (PEXPIRE), so neither the app's clock nor a test's fake one deletes a bucket early.
local ttl = ARGV[1]
local p = 2
for k = 1, #KEYS do
  local expires, n = ARGV[p], tonumber(ARGV[p + 1])
  p = p + 2
  for i = p, p + 2 * n - 1, 2 do
    redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1])
  end
  p = p + 2 * n
  if expires == '1' then
    redis.call('PEXPIRE', KEYS[k], ttl)
  end
end
return 0
