-- inference-guard: INCRBY that sets a TTL only when it creates the key.
--
-- KEYS[1]  the counter
-- ARGV[1]  amount (integer)
-- ARGV[2]  TTL in milliseconds for a new key (0: none)

local existed = redis.call('EXISTS', KEYS[1])
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[2])
if existed == 0 and ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return value
