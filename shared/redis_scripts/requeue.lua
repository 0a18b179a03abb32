-- Put requests of a finished batch back into their pending buffer for another attempt.
--
-- KEYS[1]  {p}:buffers             hash    buf -> bytes waiting
-- Keys built here: {p}:req:{id}, {p}:pending:{buf}, {p}:counters (retries:{buf} +1 per
-- request sent round again), and what bb_terminal (_terminal.lua) writes for a request
-- cancelled while batched
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] batch id the requests must still belong to
-- ARGV[3]  "1" to count this as an attempt, "0" when the provider never saw the batch
-- ARGV[4]  result TTL (s)          ARGV[5..] request ids
-- Returns {number requeued, then pairs (request id, cancelled Result JSON)} for requests
-- that were cancelled while batched: those end "cancelled" instead of going round. A
-- request already requeued or finished is left alone, so collecting the same batch twice
-- cannot requeue anything twice.
local prefix, batch, counts, ttl = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
local out = {0}
for i = 5, #ARGV do
  local id = ARGV[i]
  local req = prefix .. 'req:' .. id
  local f = redis.call('HMGET', req, 'state', 'batch', 'seq', 'size', 'buf', 'cbq', 'wh', 'cx')
  if f[1] == 'batched' and f[2] == batch then
    if f[8] then
      bb_terminal(prefix, id, f[5], f[6], f[7], 'cancelled', f[8], ttl, false)
      out[#out + 1] = id
      out[#out + 1] = f[8]
    else
      redis.call('HSET', req, 'state', 'pending', 'batch', '')
      if counts then redis.call('HINCRBY', req, 'attempts', 1) end
      redis.call('ZADD', prefix .. 'pending:' .. f[5], f[3], id)
      redis.call('HINCRBY', KEYS[1], f[5], f[4])
      redis.call('HINCRBY', prefix .. 'counters', 'retries:' .. f[5], 1)
      out[1] = out[1] + 1
    end
  end
end
bb_flush(prefix)
return out
