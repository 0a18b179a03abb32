-- Put requests of a finished batch back into their pending buffer for another attempt.
--
-- KEYS[1]  {p}:buffers             hash    buf -> bytes waiting
-- Keys built here: {p}:req:{id}, the buffer keys of _buffers.lua, {p}:counters
-- (retries:{buf} +1 per request sent round again), and what bb_terminal (_terminal.lua)
-- writes for a request cancelled while batched
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] batch id the requests must still belong to
-- ARGV[3]  "1" to count this as an attempt, "0" when the provider never saw the batch
-- ARGV[4]  result TTL (s)          ARGV[5..] request ids
-- Returns {number requeued, then pairs (request id, cancelled Result JSON)} for requests
-- that were cancelled while batched: those end "cancelled" instead of going round. A
-- request already requeued or finished is left alone, so collecting the same batch twice
-- cannot requeue anything twice. Requeued requests go to the head of their buffer: they
-- are older than anything waiting there.
local prefix, batch, counts, ttl = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
local out = {0}
local by_buf, bytes_by_buf, order = {}, {}, {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local req = prefix .. 'req:' .. id
  local f = redis.call('HMGET', req, 'state', 'batch', 'buf', 'cbq', 'wh', 'cx')
  if f[1] == 'batched' and f[2] == batch then
    local buf = bb_buffer_name(prefix, f[3])
    if f[6] then
      bb_terminal(prefix, id, buf, f[4], f[5], 'cancelled', f[6], ttl, false)
      out[#out + 1] = id
      out[#out + 1] = f[6]
    else
      redis.call('HSET', req, 'state', 'pending', 'batch', '')
      if counts then redis.call('HINCRBY', req, 'attempts', 1) end
      if not by_buf[buf] then
        by_buf[buf], bytes_by_buf[buf] = {}, 0
        order[#order + 1] = buf
      end
      local ids = by_buf[buf]
      ids[#ids + 1] = id
      bytes_by_buf[buf] = bytes_by_buf[buf] + bb_weight(prefix, buf, id)
      out[1] = out[1] + 1
    end
  end
end
for _, buf in ipairs(order) do
  bb_push_head(prefix, buf, by_buf[buf])
  bb_account(prefix, buf, #by_buf[buf], bytes_by_buf[buf])
  bb_count('retries:' .. buf, #by_buf[buf])
end
bb_drop_intact(prefix, batch)
bb_flush(prefix)
return out
