-- Cancel one request, whatever state it is in.
--
-- KEYS[1]  {p}:buffers             hash    buf -> bytes waiting
-- Keys built here: {p}:req:{id}, the buffer keys of _buffers.lua, and what bb_terminal
-- (_terminal.lua) writes
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] result TTL (s)     ARGV[3] request id
-- ARGV[4]  the cancelled Result's JSON
-- Returns {what, outcome}:
--   {'cancelled'}        it was pending: out of its buffer and finished now (and queued in
--                        {p}:torecord, since no batch will record it)
--   {'marked'}           it is batched: marked (field cx holds ARGV[4]); whatever ends its
--                        batch (result line, failure, requeue) ends it "cancelled" instead.
--                        A repeat keeps the first mark.
--   {'finished', outcome} it already had its outcome: nothing changed
--   {'unknown'}          no such request (never submitted, or its result expired)
local prefix, ttl, id = ARGV[1], ARGV[2], ARGV[3]
local req = prefix .. 'req:' .. id
local f = redis.call('HMGET', req, 'state', 'buf', 'cbq', 'wh', 'outcome')
if not f[1] then return {'unknown'} end
if f[1] == 'done' then return {'finished', f[5] or ''} end
if f[1] == 'pending' then
  -- Its id stays in the buffer's list until a claim drops it (see _buffers.lua).
  local buf = bb_buffer_name(prefix, f[2])
  bb_account(prefix, buf, -1, -bb_weight(prefix, buf, id))
  bb_terminal(prefix, id, buf, f[3], f[4], 'cancelled', ARGV[4], ttl, true)
  bb_trim_head(prefix, buf)
  bb_flush(prefix)
  return {'cancelled'}
end
redis.call('HSETNX', req, 'cx', ARGV[4])
return {'marked'}
