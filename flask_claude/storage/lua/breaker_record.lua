-- One attempt's outcome on a model's breaker; 1 when this record opened it.
-- KEYS: breaker key. ARGV: now, ok ('1'/'0'), min_calls, rate, window, cooldown.
return record_outcome(KEYS[1], ARGV[2] == '1', tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4]),
                      tonumber(ARGV[5]), tonumber(ARGV[6]))
