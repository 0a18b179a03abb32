-- Cancel one request, whatever state it is in.
--
-- KEYS[1]  {p}:buffers             hash    buf -> bytes waiting
-- Keys built here: {p}:req:{id}, {p}:pending:{buf}, and what bb_terminal (_terminal.lua)
-- writes
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
local f = redis.call('HMGET', req, 'state', 'buf', 'size', 'cbq', 'wh', 'outcome')
if not f[1] then return {'unknown'} end
if f[1] == 'done' then return {'finished', f[6] or ''} end
if f[1] == 'pending' then
  redis.call('ZREM', prefix .. 'pending:' .. f[2], id)
  redis.call('HINCRBY', KEYS[1], f[2], -tonumber(f[3] or '0'))
  bb_terminal(prefix, id, f[2], f[4], f[5], 'cancelled', ARGV[4], ttl, true)
  bb_flush(prefix)
  return {'cancelled'}
end
redis.call('HSETNX', req, 'cx', ARGV[4])
return {'marked'}
