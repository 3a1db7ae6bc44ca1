-- inference-guard: append one request's evidence to a detector's log and read
-- what the other workers appended since this worker's last exchange (one key,
-- so one slot on a cluster).
--
-- KEYS[1]  the log: a stream of entries, one field 'e' each
-- ARGV[1]  the entry (origin tag + framed evidence)
-- ARGV[2]  the caller's cursor: the last entry id it has read ('' : none yet)
-- ARGV[3]  entries kept (exact MAXLEN: the log never holds more)
-- ARGV[4]  TTL in milliseconds, renewed by every append
-- ARGV[5]  most entries returned
--
-- Returns { new cursor, entry, entry, ... }: the entries after the cursor and
-- before this one, oldest first (a new reader gets the last ARGV[5] of them).
-- The cursor moves to this entry when everything up to it was returned, else
-- to the last entry returned, so a reader that lags catches up call by call.

local id = redis.call('XADD', KEYS[1], 'MAXLEN', tonumber(ARGV[3]), '*', 'e', ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
local count = tonumber(ARGV[5])
local got
local cursor = id
if ARGV[2] == '' then
  local rev = redis.call('XREVRANGE', KEYS[1], '(' .. id, '-', 'COUNT', count)
  got = {}
  for i = #rev, 1, -1 do got[#got + 1] = rev[i] end
else
  got = redis.call('XRANGE', KEYS[1], '(' .. ARGV[2], id, 'COUNT', count + 1)
  if #got > count and got[#got][1] ~= id then
    got[#got] = nil
    cursor = got[#got][1]
  end
end
local out = { cursor }
for i = 1, #got do
  local entry = got[i]
  if entry[1] ~= id then out[#out + 1] = entry[2][2] end
end
return out
