-- inference-guard: SET a quarantine key and index it by expiry, for the gauge of
-- clients quarantined now (guard_quarantined_clients), read with ZCOUNT.
--
-- KEYS[1]  the quarantine key
-- KEYS[2]  the index: a sorted set of quarantine keys scored by expiry (ms, server time)
-- ARGV[1]  value
-- ARGV[2]  TTL in milliseconds (0: none)
--
-- Members whose expiry has passed are removed here, so the index holds the live
-- quarantines plus at most those that expired since the last one was set.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  redis.call('ZADD', KEYS[2], now + ttl, KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], '+inf', KEYS[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
return 1
