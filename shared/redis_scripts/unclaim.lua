-- Return the requests of an abandoned claim to their pending buffer, at its head.
--
-- KEYS[1]  {p}:claim:{batch}:ids   list    the claimed request ids
-- KEYS[2]  {p}:claim:{batch}       hash    buf, count, bytes, at
-- KEYS[3]  {p}:claims              zset    batch ids of uncommitted claims
-- KEYS[4]  {p}:buffers             hash    buf -> bytes waiting
-- Keys built here: {p}:req:{id}, the buffer keys of _buffers.lua, and what bb_terminal
-- (_terminal.lua) writes for a request cancelled while claimed
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] batch id     ARGV[3] result TTL (s)
-- Returns the number of requests returned to the buffer. A request cancelled while claimed
-- (field cx) is finished "cancelled" instead, and queued in {p}:torecord: the claim never
-- reached SQL, so no batch will record it.
local prefix, batch, ttl = ARGV[1], ARGV[2], ARGV[3]
local buf = redis.call('HGET', KEYS[2], 'buf')
local returned, bytes = {}, 0
if buf then
  local ids = redis.call('LRANGE', KEYS[1], 0, -1)
  for i = 1, #ids do
    local req = prefix .. 'req:' .. ids[i]
    local f = redis.call('HMGET', req, 'state', 'batch', 'cbq', 'wh', 'cx')
    if f[1] == 'batched' and f[2] == batch then
      if f[5] then
        bb_terminal(prefix, ids[i], buf, f[3], f[4], 'cancelled', f[5], ttl, true)
      else
        redis.call('HSET', req, 'state', 'pending', 'batch', '')
        returned[#returned + 1] = ids[i]
        bytes = bytes + bb_weight(prefix, buf, ids[i])
      end
    end
  end
  -- They were the oldest in the buffer when claimed, so they go back at its head.
  bb_push_head(prefix, buf, returned)
  bb_account(prefix, buf, #returned, bytes)
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], batch)
bb_drop_intact(prefix, batch)
bb_flush(prefix)
return #returned
