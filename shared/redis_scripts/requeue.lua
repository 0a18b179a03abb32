-- Put requests of a finished batch back into their pending buffer for another attempt.
--
-- KEYS[1]  {p}:buffers             hash    buf -> bytes waiting
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] batch id the requests must still belong to
-- ARGV[3]  "1" to count this as an attempt, "0" when the provider never saw the batch
-- ARGV[4..] request ids
-- Returns the number requeued; a request already requeued or finished is left alone, so
-- collecting the same batch twice cannot requeue anything twice.
local prefix, batch, counts = ARGV[1], ARGV[2], ARGV[3] == '1'
local requeued = 0
for i = 4, #ARGV do
  local req = prefix .. 'req:' .. ARGV[i]
  local f = redis.call('HMGET', req, 'state', 'batch', 'seq', 'size', 'buf')
  if f[1] == 'batched' and f[2] == batch then
    redis.call('HSET', req, 'state', 'pending', 'batch', '')
    if counts then redis.call('HINCRBY', req, 'attempts', 1) end
    redis.call('ZADD', prefix .. 'pending:' .. f[5], f[3], ARGV[i])
    redis.call('HINCRBY', KEYS[1], f[5], f[4])
    requeued = requeued + 1
  end
end
return requeued
