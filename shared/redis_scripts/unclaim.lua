-- Return the requests of an abandoned claim to their pending buffer, keeping their age.
--
-- KEYS[1]  {p}:claim:{batch}:ids   list    the claimed request ids
-- KEYS[2]  {p}:claim:{batch}       hash    buf, count, bytes, at
-- KEYS[3]  {p}:claims              zset    batch ids of uncommitted claims
-- KEYS[4]  {p}:buffers             hash    buf -> bytes waiting
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] batch id
-- Returns the number of requests returned to the buffer.
local prefix, batch = ARGV[1], ARGV[2]
local buf = redis.call('HGET', KEYS[2], 'buf')
local returned = 0
if buf then
  local pending = prefix .. 'pending:' .. buf
  local ids = redis.call('LRANGE', KEYS[1], 0, -1)
  for i = 1, #ids do
    local req = prefix .. 'req:' .. ids[i]
    local f = redis.call('HMGET', req, 'state', 'batch', 'seq', 'size')
    if f[1] == 'batched' and f[2] == batch then
      redis.call('HSET', req, 'state', 'pending', 'batch', '')
      redis.call('ZADD', pending, f[3], ids[i])
      redis.call('HINCRBY', KEYS[4], buf, f[4])
      returned = returned + 1
    end
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], batch)
return returned
