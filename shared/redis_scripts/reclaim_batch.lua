-- Take requests found pending again back into the committed batch that owns them.
--
-- A Redis that lost its last writes (AOF tail, failover) can forget a claim whose batch SQL
-- has already committed: the requests are back in their buffer and would be packed, and
-- billed, a second time. This moves them back to "batched" under that batch.
--
-- KEYS[1]  {p}:buffers             hash    buf -> bytes waiting
-- Keys built here: {p}:req:{id} (hash), {p}:pending:{buf} (zset)
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] batch id     ARGV[3..] request ids
-- Only a request that is pending is moved; one claimed by another batch meanwhile, finished
-- or gone is left alone. Returns the ids moved.
local prefix, batch = ARGV[1], ARGV[2]
local moved = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local req = prefix .. 'req:' .. id
  local f = redis.call('HMGET', req, 'state', 'buf', 'size')
  if f[1] == 'pending' then
    if redis.call('ZREM', prefix .. 'pending:' .. f[2], id) == 1 then
      redis.call('HINCRBY', KEYS[1], f[2], -tonumber(f[3] or '0'))
    end
    redis.call('HSET', req, 'state', 'batched', 'batch', batch)
    moved[#moved + 1] = id
  end
end
return moved
