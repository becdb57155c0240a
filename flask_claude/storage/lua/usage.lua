-- What an operator reads: {spent, held} per budget key, lapsed holds dropped first.
-- KEYS: budget keys. ARGV: now.
local now = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
  local spent, held = budget_state(KEYS[i], now)
  table.insert(out, {spent, held})
end
return out
