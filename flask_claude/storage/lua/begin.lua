-- The one storage step before a call (or before the view): admission, holds and breaker reads, all
-- or nothing.
-- KEYS: gates..., requests..., holds..., breakers..., the app's data-loss marker (functions.lua)
-- ARGV: what stays the same for a plan first (storage/redis.py packs it once):
--         ng, nr, nh, nb, alert, optional_holds ('1'/'0'), downgrade_line (1-based hold, 0: none),
--         downgrade_at, per gate (limit, expires), per request (limit, window, the window's key expiry in
--         whole seconds), per hold (limit, expires);
--       then this step's own: now, member, rid, hold_until, amounts (one per hold), alt_amounts (one per
--       hold), per request limit the start of its window (now - window); last, the marker's value this
--       process knows and the one it proposes when there is none.
-- Numbers go to redis.call as the strings Python sent where it can: Redis formats a Lua number
-- argument with snprintf("%.17g"), ~5% of this script's time.
-- Returns {'lost', marker} when the app's data was lost (nothing applied), else {ok, stage, failed,
--          retry, newly, spent, busy, held, downgraded, fraction, remaining..., reset..., open_until per
--          breaker ('' = closed)}.
local lost = epoch_changed(KEYS[#KEYS], ARGV[#ARGV - 1], ARGV[#ARGV])
if lost then return {'lost', lost} end
local ng, nr, nh, nb = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local alert, optional = ARGV[5], ARGV[6] == '1'
local dg_line, dg_at = tonumber(ARGV[7]), tonumber(ARGV[8])
local gate_args, request_args, hold_args = 9, 9 + 2 * ng, 9 + 2 * ng + 3 * nr
local own = hold_args + 2 * nh
local now = tonumber(ARGV[own])
local member, rid, hold_until = ARGV[own + 1], ARGV[own + 2], ARGV[own + 3]
local amounts = own + 4  -- amounts[k] = ARGV[amounts + k - 1], alt amounts nh further
local starts = amounts + 2 * nh  -- request limit j's window start: ARGV[starts + j - 1]

-- A budget read once per step: an app-wide budget is both a gate and a hold (read once for both).
local states = {}
local function state_of(key)
  local s = states[key]
  if s == nil then
    local spent, reserved, present, exhausted, lapse, mine = budget_state(key, now, rid)
    s = {spent, reserved, present, exhausted, lapse, mine}
    states[key] = s
  end
  return s
end
local held_keys = {}
for k = 1, nh do held_keys[KEYS[ng + nr + k]] = true end

-- A second run of this step (see below) already passed the gates: another worker's spend since must
-- not refuse the request its first run admitted.
local rerun = nh > 0 and rid ~= '' and state_of(KEYS[ng + nr + 1])[6]
for i = 1, ng * (rerun and 0 or 1) do
  local limit, expires = tonumber(ARGV[gate_args + 2 * i - 2]), tonumber(ARGV[gate_args + 2 * i - 1])
  local spent, exhausted
  if held_keys[KEYS[i]] then
    local s = state_of(KEYS[i]); spent, exhausted = s[1], s[4]
  else
    local state = redis.call('HMGET', KEYS[i], 'spent', 'exhausted')
    spent, exhausted = tonumber(state[1] or '0'), tonumber(state[2] or '-1')
  end
  if spent >= limit or exhausted == limit then
    return {0, 'gate', i - 1, tostring(math.max(0, expires - now)), 0, 0, 0}
  end
end
-- A step can run twice: the client sends it again on a fresh connection when the first one closed,
-- which may be after Redis ran it (the reply was lost). So this request is added to each window
-- with NX (a second run finds it there and is not counted again), and its holds are found by rid.
local remaining, resets, added = {}, {}, {}
local function take_back()  -- refused after the windows: this request counts in none of them
  for j = 1, #added do redis.call('ZREM', added[j], member) end
end
for j = 1, nr do
  local key = KEYS[ng + j]
  local limit, window = tonumber(ARGV[request_args + 3 * j - 3]), tonumber(ARGV[request_args + 3 * j - 2])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[starts + j - 1])
  local new = redis.call('ZADD', key, 'NX', ARGV[own], member) == 1
  if new then table.insert(added, key) end
  local count = redis.call('ZCARD', key)  -- this request included
  if new and count > limit then
    take_back()
    local oldest = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES')
    return {0, 'request', j - 1, tostring(math.max(0, tonumber(oldest[2]) + window - now)), 0, 0, 0}
  end
  remaining[j] = math.max(0, limit - count)
  resets[j] = window  -- until a slot frees: the oldest hit's end, or this one's when it is the only one
  if count > 1 then
    local oldest = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES')
    resets[j] = math.max(0, tonumber(oldest[2]) + window - now)
  end
end
local held = 1
-- budget-aware step-down: past its fraction, the cheaper chain's worst case is held instead
local alt, fraction = 0, 0
if dg_line > 0 then
  local dg_limit = tonumber(ARGV[hold_args + 2 * dg_line - 2])
  fraction = state_of(KEYS[ng + nr + dg_line])[1] / math.max(dg_limit, 1)
  if fraction >= dg_at then alt = nh end
end
for k = 1, nh do
  local key = KEYS[ng + nr + k]
  local limit, expires = tonumber(ARGV[hold_args + 2 * k - 2]), tonumber(ARGV[hold_args + 2 * k - 1])
  local amount = tonumber(ARGV[amounts + alt + k - 1])
  local s = state_of(key)
  local spent, reserved = s[1], s[2]
  if not s[6] and spent + reserved + amount > limit then  -- (s[6]: held by this step's first run)
    if optional then held = 0; break end
    take_back()
    if spent + amount <= limit then
      return {0, 'hold', k - 1, '1', 0, spent, 1}
    end
    local first = 0
    if amount <= KILL_SHARE * limit and s[4] ~= limit then
      redis.call('HSET', key, 'exhausted', limit)
      redis.call('PEXPIRE', key, ttl_ms(expires, now, 86400))
      if claim_alert(key, alert, expires, now) then first = 1 end
    end
    return {0, 'hold', k - 1, tostring(math.max(0, expires - now)), first, spent, 0}
  end
end
for j = 1, nr do
  redis.call('EXPIRE', KEYS[ng + j], ARGV[request_args + 3 * j - 1])
end
for k = 1, nh * held do
  local key = KEYS[ng + nr + k]
  local expires = tonumber(ARGV[hold_args + 2 * k - 1])
  if not states[key][6] then
    hold(key, rid, ARGV[amounts + alt + k - 1], states[key][2], hold_until, states[key][5], expires, now)
  end
  if not states[key][3] then  -- a key still there keeps the expiry it was created with (the period's end)
    redis.call('PEXPIRE', key, ttl_ms(expires, now, 86400))
  end
end
local out = {1, '', -1, '0', 0, 0, 0, held, alt > 0 and 1 or 0, tostring(fraction)}
for j = 1, nr do table.insert(out, remaining[j]) end
for j = 1, nr do table.insert(out, tostring(resets[j])) end
for m = 1, nb do
  table.insert(out, redis.call('HGET', KEYS[ng + nr + nh + m], 'open_until') or '')
end
return out
