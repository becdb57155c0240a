-- Replace a call's holds by its real amounts, once; claim the alert thresholds crossed; record the
-- success on the model's breaker. (The call's rollup increments are not here: the worker sums them
-- and rollup.lua writes the sums, at most once per flush interval.)
-- KEYS: budget keys..., [the success model's breaker key], the app's data-loss marker
-- ARGV: what stays the same for a plan first (storage/redis.py packs it once):
--         nt, thresholds..., nl, per line (limit, expires), then when recording a success:
--         min_calls, rate, window, cooldown;
--       then this step's own: now, rids (space-separated: the call's hold, then its top-ups),
--       seen_closed ('1': the call's first step read the breaker closed), amounts (one per line),
--       the marker's value this process knows and the one it proposes.
-- Returns {'lost', marker} when the app's data was lost (nothing applied); {'dup'} when this call was
-- settled already (a copy: nothing applied); else {{line index, threshold, spent}...} for each
-- threshold first crossed here.
local lost = epoch_changed(KEYS[#KEYS], ARGV[#ARGV - 1], ARGV[#ARGV])
if lost then return {'lost', lost} end
local nt = tonumber(ARGV[1])
local nl = tonumber(ARGV[2 + nt])
local lines = 2 + nt  -- line i: limit ARGV[lines + 2i - 1], expires ARGV[lines + 2i]
local record = #KEYS - 1 > nl
local own = lines + 2 * nl + 1 + (record and 4 or 0)
local now = tonumber(ARGV[own])
local rids = {}
for rid in string.gmatch(ARGV[own + 1], '%S+') do table.insert(rids, rid) end
-- each line's {spent, held, the call's hold field: its amount, false, or '-' when settled already}
local states = {}
for i = 1, nl do
  states[i] = redis.call('HMGET', KEYS[i], 'spent', 'held', 'r:' .. (rids[1] or ''))
  if states[i][3] == '-' then return {'dup'} end  -- a copy of a settlement that landed: apply nothing
end
local crossed = {}
for i = 1, nl do
  local limit, expires = tonumber(ARGV[lines + 2 * i - 1]), tonumber(ARGV[lines + 2 * i])
  local before, spent = settle_line(KEYS[i], rids, states[i], tonumber(ARGV[own + 2 + i]), expires, now)
  for t = 1, nt do
    local mark = tonumber(ARGV[1 + t]) * limit
    if before < mark and mark <= spent and claim_alert(KEYS[i], ARGV[1 + t], expires, now) then
      table.insert(crossed, {i - 1, ARGV[1 + t], spent})
    end
  end
end
if record then
  local p = lines + 2 * nl
  record_outcome(KEYS[nl + 1], true, now, tonumber(ARGV[p + 1]), tonumber(ARGV[p + 2]), tonumber(ARGV[p + 3]),
                 tonumber(ARGV[p + 4]), ARGV[own + 2] == '1')
end
return crossed
