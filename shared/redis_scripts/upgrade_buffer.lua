-- Bring one pending buffer kept by an older batchbridge to the current layout, atomically.
--
-- Before: {p}:pending:{buf} was a sorted set of request ids scored by an enqueue sequence,
-- and each request hash named its buffer ("buf") and kept "seq" and "size".
-- After (_buffers.lua): the ids in a list, oldest first; {p}:npending counts the requests
-- waiting; the buffer has a number ({p}:bufno, {p}:bufname) that request hashes keep instead
-- of its name. Hashes of requests no longer waiting keep the name: bb_buffer_name reads both.
-- KEYS     none (keys built here: {p}:pending:{buf}, {p}:req:{id}, and those above)
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] buf
-- Returns the number of ids moved; 0, changing nothing, for a buffer already a list.
local prefix, buf = ARGV[1], ARGV[2]
local key = prefix .. 'pending:' .. buf
if redis.call('TYPE', key)['ok'] ~= 'zset' then return 0 end
local ids = redis.call('ZRANGE', key, 0, -1)
local number = bb_buffer_number(prefix, buf)
redis.call('DEL', key)
local waiting = 0
for i = 1, #ids do
  local req = prefix .. 'req:' .. ids[i]
  if redis.call('HGET', req, 'state') == 'pending' then
    waiting = waiting + 1
    redis.call('HSET', req, 'buf', number)
    redis.call('HDEL', req, 'seq', 'size')
  end
end
-- unpack() is bounded by Lua's C stack, so push in chunks.
for i = 1, #ids, 1000 do
  redis.call('RPUSH', key, unpack(ids, i, math.min(i + 999, #ids)))
end
redis.call('HSET', prefix .. 'npending', buf, waiting)
bb_trim_head(prefix, buf)
return #ids
