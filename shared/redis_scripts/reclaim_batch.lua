-- Take requests found pending again back into the committed batch that owns them.
--
-- A Redis that lost its last writes (AOF tail, failover) can forget a claim whose batch SQL
-- has already committed: the requests are back in their buffer and would be packed, and
-- billed, a second time. This moves them back to "batched" under that batch.
--
-- KEYS[1]  {p}:buffers             hash    buf -> bytes waiting
-- Keys built here: {p}:req:{id} (hash), the buffer keys of _buffers.lua
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] batch id     ARGV[3..] request ids
-- Only a request that is pending is moved; one claimed by another batch meanwhile, finished
-- or gone is left alone. Returns the ids moved.
local prefix, batch = ARGV[1], ARGV[2]
local moved = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local req = prefix .. 'req:' .. id
  local f = redis.call('HMGET', req, 'state', 'buf')
  if f[1] == 'pending' then
    local buf = bb_buffer_name(prefix, f[2])
    bb_account(prefix, buf, -1, -bb_weight(prefix, buf, id))
    redis.call('HSET', req, 'state', 'batched', 'batch', batch)
    bb_trim_head(prefix, buf)
    moved[#moved + 1] = id
  end
end
return moved
