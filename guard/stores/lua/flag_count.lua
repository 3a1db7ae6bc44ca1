-- inference-guard: how many quarantine keys are live, from the index flag.lua keeps.
--
-- KEYS[1]  the index (sorted set of quarantine keys scored by expiry, ms, server time)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
