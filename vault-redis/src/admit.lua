-- vaultgate: admit one request for a chain of keys, all or nothing
-- (docs/redis.md#the-admission-script).
--
-- KEYS, five per key of the chain (the key first, then its ancestors):
--   requests this minute, this UTC day, this UTC month, tokens this minute,
--   the max_parallel slots (a sorted set: member = slot, score = expiry).
-- ARGV: now (replica clock, unix ms), shadow (1/0), slot member, slot
--   expiry (unix ms), grace (ms), end of the minute, the day, the month;
--   then five per key: requests per minute, per day, per month, tokens per
--   minute, max_parallel (0 = no limit).
-- Returns: counted (1/0), the max_parallel of the first full key (0: none
--   full), slots taken (1/0), then five counts per key read before this
--   request: minute, day, month, tokens, live slots.
local now = tonumber(ARGV[1])
local shadow = ARGV[2] == '1'
local member = ARGV[3]
local slot_expiry = tonumber(ARGV[4])
local grace = tonumber(ARGV[5])
-- Expiries are relative to the replica's clock (PEXPIRE, not PEXPIREAT):
-- Redis's own clock never decides when a window's counter goes.
local ttls = { tonumber(ARGV[6]) - now + grace, tonumber(ARGV[7]) - now + grace, tonumber(ARGV[8]) - now + grace }
local n = #KEYS / 5
local out = { 0, 0, 0 }
local fits = true
local any_parallel = false
for i = 0, n - 1 do
  local k, a = i * 5, 8 + i * 5
  for w = 1, 4 do
    local limit = tonumber(ARGV[a + w])
    local c = 0
    if limit > 0 then
      c = tonumber(redis.call('GET', KEYS[k + w]) or '0')
      if w < 4 then
        if c + 1 > limit then fits = false end
      elseif c >= limit then
        fits = false
      end
    end
    out[#out + 1] = c
  end
  local max = tonumber(ARGV[a + 5])
  local live = 0
  if max > 0 then
    any_parallel = true
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', now)
    live = redis.call('ZCARD', KEYS[k + 5])
    if live >= max and out[2] == 0 then out[2] = max end
  end
  out[#out + 1] = live
end
local full = out[2] > 0
if fits and not (full and not shadow) then
  out[1] = 1
  for i = 0, n - 1 do
    local k, a = i * 5, 8 + i * 5
    for w = 1, 3 do
      if tonumber(ARGV[a + w]) > 0 then
        redis.call('INCR', KEYS[k + w])
        redis.call('PEXPIRE', KEYS[k + w], ttls[w])
      end
    end
  end
end
if any_parallel and not full and (out[1] == 1 or shadow) then
  out[3] = 1
  for i = 0, n - 1 do
    if tonumber(ARGV[8 + i * 5 + 5]) > 0 then
      redis.call('ZADD', KEYS[i * 5 + 5], slot_expiry, member)
      redis.call('PEXPIRE', KEYS[i * 5 + 5], slot_expiry - now + grace)
    end
  end
end
return out
