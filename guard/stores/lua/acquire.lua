-- inference-guard: atomic multi-limit rate check (GCRA and sliding window).
--
-- Same arithmetic as guard/stores/_ratemath.py; keep the two in step.
-- Time is the Redis server's TIME, so every worker and replica sharing this
-- Redis agrees on it (their own clocks are never used).
--
-- KEYS[i]          state key of limit i
-- ARGV[1]          cost (integer >= 0)
-- ARGV[2]          lease (integer >= 0): extra units to take for the caller to
--                  spend locally (guard/stores/lease.py); 0 for a plain check
-- ARGV[3i .. 3i+2] for limit i: kind, a, b
--     kind "g" (GCRA):           a = emission interval (s), b = burst
--     kind "w" (sliding window): a = period (s),            b = limit
--
-- Returns 5 values per limit: allowed (1/0), remaining, retry_after,
-- reset_after, capacity; then the lease granted (0 or ARGV[2]). Floats are
-- returned as strings (Lua numbers would be truncated to integers). The cost
-- is consumed from every limit only when every limit admits it; a refused
-- request writes nothing, and every limit then reports its state as it stands.
--
-- The lease is granted only with an admitted request, and only when every
-- limit would still hold at least half its capacity after cost + lease are
-- taken: a bucket below half full is checked request by request, exactly.
-- The states returned are those of the cost alone (the leased units are the
-- caller's, still available to it).

if redis.replicate_commands then
  redis.replicate_commands()  -- Redis < 5: TIME before writes needs effects replication
end

local EPS = 1e-9
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cost = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])

local function fmt(x)
  return string.format('%.17g', x)
end

local function gcra(key, interval, cap, cost)
  local tat = tonumber(redis.call('GET', key))
  local base = now
  if tat ~= nil and tat > now then
    base = tat
  end
  local avail = cap - (base - now) / interval
  if cost <= avail + EPS then
    local new_tat = base + cost * interval
    local rem = math.max(0, math.floor(avail - cost + EPS))
    local write = nil
    local ttl = math.ceil((new_tat - now) * 1000)
    if new_tat > now and ttl > 0 then
      write = {'SET', key, fmt(new_tat), 'PX', ttl}
    end
    return {1, rem, '0', fmt(new_tat - now), cap}, write
  end
  local need = math.min(cost, cap)
  local retry = math.max(0, (need - avail) * interval)
  return {0, math.max(0, math.floor(avail + EPS)), fmt(retry), fmt(base - now), cap}, nil
end

local function window_reset(cur, prev, frac, period)
  if cur > 0 then
    return (2 - frac) * period
  end
  if prev > 0 then
    return (1 - frac) * period
  end
  return 0
end

local function window(key, period, cap, cost)
  local index = math.floor(now / period)
  local cur, prev = 0, 0
  local stored = redis.call('HMGET', key, 'w', 'c', 'p')
  local w = tonumber(stored[1])
  if w ~= nil then
    if w == index then
      cur, prev = tonumber(stored[2]) or 0, tonumber(stored[3]) or 0
    elseif w == index - 1 then
      prev = tonumber(stored[2]) or 0
    end
  end
  local frac = now / period - index
  local est = prev * (1 - frac) + cur
  if est + cost <= cap + EPS then
    cur = cur + cost
    local ttl = math.ceil(((index + 2) * period - now) * 1000)
    local write = {'HSET', key, 'w', fmt(index), 'c', fmt(cur), 'p', fmt(prev)}
    local rem = math.max(0, math.floor(cap - est - cost + EPS))
    return {1, rem, '0', fmt(window_reset(cur, prev, frac, period)), cap}, write, ttl
  end
  local need = math.min(cost, cap)
  local retry
  if est + need <= cap + EPS then
    retry = 0
  elseif cur + need <= cap then
    retry = (1 - (cap - cur - need) / prev - frac) * period
  else
    retry = (1 - frac) * period + (1 - (cap - need) / cur) * period
  end
  local rem = math.max(0, math.floor(cap - est + EPS))
  return {0, rem, fmt(math.max(0, retry)), fmt(window_reset(cur, prev, frac, period)), cap}, nil
end

local out = {}
local writes = {}
local all_allowed = true
for i = 1, #KEYS do
  local kind = ARGV[3 * i]
  local a = tonumber(ARGV[3 * i + 1])
  local b = tonumber(ARGV[3 * i + 2])
  local res, write, ttl
  if kind == 'g' then
    res, write = gcra(KEYS[i], a, b, cost)
  elseif kind == 'w' then
    res, write, ttl = window(KEYS[i], a, b, cost)
  else
    return redis.error_reply('unknown limit kind ' .. tostring(kind))
  end
  if res[1] == 0 then
    all_allowed = false
  end
  if write ~= nil then
    writes[#writes + 1] = {write, ttl, KEYS[i]}
  end
  for j = 1, 5 do
    out[#out + 1] = res[j]
  end
end

if all_allowed then
  local granted = 0
  if lease > 0 then
    -- the same check for cost + lease, with half of every limit kept back
    local leased = {}
    granted = lease
    for i = 1, #KEYS do
      local kind = ARGV[3 * i]
      local a = tonumber(ARGV[3 * i + 1])
      local b = tonumber(ARGV[3 * i + 2])
      local res, write, ttl
      if kind == 'g' then
        res, write = gcra(KEYS[i], a, b, cost + lease)
      else
        res, write, ttl = window(KEYS[i], a, b, cost + lease)
      end
      if res[1] == 0 or res[2] < b / 2 then
        granted = 0
        break
      end
      if write ~= nil then
        leased[#leased + 1] = {write, ttl, KEYS[i]}
      end
    end
    if granted > 0 then
      writes = leased
    end
  end
  for _, item in ipairs(writes) do
    redis.call(unpack(item[1]))
    if item[2] ~= nil then
      redis.call('PEXPIRE', item[3], item[2])
    end
  end
  out[#out + 1] = granted
  return out
end

-- refused: limits that would have admitted it report their state untouched
for i = 1, #KEYS do
  if out[5 * i - 4] == 1 then
    local a = tonumber(ARGV[3 * i + 1])
    local b = tonumber(ARGV[3 * i + 2])
    local res
    if ARGV[3 * i] == 'g' then
      res = gcra(KEYS[i], a, b, 0)
    else
      res = window(KEYS[i], a, b, 0)
    end
    for j = 1, 5 do
      out[5 * i - 5 + j] = res[j]
    end
  end
end
out[#out + 1] = 0
return out
