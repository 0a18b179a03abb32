-- Give the requests of a batch their terminal outcome and deliver each result, once.
--
-- KEYS[1]  {p}:buffers             hash    (unused here; kept so every finishing script
--                                          declares the same first key)
-- Keys built here: {p}:req:{id}, and what bb_terminal (_terminal.lua) writes
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] result TTL (s)
-- ARGV[3]  the batch id the requests must still belong to
-- ARGV[4..] triples: request id, outcome, result JSON
-- Returns {number finished by this call, then pairs (request id, result JSON)} for requests
-- that ended "cancelled" instead of the outcome given: they were cancelled while batched
-- (field cx) after the caller looked, and end with the result stored at cancel time; the
-- caller records those. A request that already has an outcome, or has moved to another
-- batch, is skipped: that is what makes delivery exactly once.
local prefix, ttl, batch = ARGV[1], ARGV[2], ARGV[3]
local out = {0}
for i = 4, #ARGV, 3 do
  local id = ARGV[i]
  local req = prefix .. 'req:' .. id
  local f = redis.call('HMGET', req, 'state', 'batch', 'cbq', 'buf', 'wh', 'cx', 'enq')
  if f[1] == 'batched' and f[2] == batch then
    local outcome, result = ARGV[i + 1], ARGV[i + 2]
    if f[6] and outcome ~= 'cancelled' then
      outcome, result = 'cancelled', f[6]
      out[#out + 1] = id
      out[#out + 1] = result
    end
    bb_terminal(prefix, id, bb_buffer_name(prefix, f[4]), f[3], f[5], outcome, result, ttl, false,
                f[7] or false)
    out[1] = out[1] + 1
  end
end
bb_drop_intact(prefix, batch)
bb_flush(prefix)
return out
