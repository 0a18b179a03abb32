-- Settle one claimed webhook delivery: after an attempt, or to put it back without one.
-- Called only once the attempt is in the SQL record, so a crash before this repeats the
-- attempt (same webhook-id) rather than losing it.
--
-- KEYS[1]  {p}:whq                 zset    delivery ids by due time (ms)
-- KEYS[2]  {p}:wh:{id}             hash    url, type, result, at, attempts, ep, claim
-- Keys built here: {p}:whep:{ep}   zset    ids in flight to endpoint ep (this one leaves it)
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] delivery id
-- ARGV[3]  claim token (from claim_webhooks.lua)
-- ARGV[4]  "done" (delivered or dead-lettered: the record has it now) or "retry"
-- ARGV[5]  attempts made so far    ARGV[6] (retry) due again in this many ms (Redis' clock)
-- Returns 1, or 0 when the delivery is gone or was claimed again since (this claim had
-- outlived its in-flight time): the newer claim owns it then, and nothing is changed.
local prefix, id, token = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], id)
  return 0
end
local f = redis.call('HMGET', KEYS[2], 'claim', 'ep')
if f[1] ~= token then return 0 end
if f[2] then redis.call('ZREM', prefix .. 'whep:' .. f[2], id) end
if ARGV[4] == 'done' then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[1], id)
else
  redis.call('HSET', KEYS[2], 'attempts', ARGV[5])
  redis.call('HDEL', KEYS[2], 'claim')
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[6])), id)
end
return 1
