-- Re-apply outcomes the record (SQL) holds but Redis lost: the reconciler's finish.
--
-- KEYS[1]  {p}:buffers             hash    buf -> bytes waiting (a request found pending again)
-- Keys built here: {p}:req:{id} (hash), the buffer keys of _buffers.lua, and what
--                  bb_terminal (_terminal.lua) writes
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] result TTL (s)
-- ARGV[3]  the batch id the record finished these requests in
-- ARGV[4..] quintuples: request id, outcome, result JSON, callback queue and webhook URL
--          (from the record; the URL is '' when the record already has the delivery)
-- Per request, by what Redis still has:
--   no hash at all          -> a done hash is rebuilt and the result delivered again
--   batched under ARGV[3]   -> finished exactly as finish.lua does
--   pending                 -> its claim was lost: out of its buffer, then finished
--   done, or in another batch -> left alone (already delivered, or moved on)
-- Returns the ids finished by this call.
local prefix, ttl, batch = ARGV[1], ARGV[2], ARGV[3]
local finished = {}
for i = 4, #ARGV, 5 do
  local id, outcome, result = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local req = prefix .. 'req:' .. id
  local f = redis.call('HMGET', req, 'state', 'batch', 'cbq', 'buf', 'wh')
  local cbq, wh, buf = f[3], f[5], bb_buffer_name(prefix, f[4])
  local ok = false
  if not f[1] then
    ok, cbq, wh = true, ARGV[i + 3], ARGV[i + 4]
    redis.call('HSET', req, 'batch', batch, 'restored', '1')
    if cbq ~= '' then redis.call('HSET', req, 'cbq', cbq) end
  elseif f[1] == 'batched' and f[2] == batch then
    ok = true
  elseif f[1] == 'pending' then
    ok = true
    bb_account(prefix, buf, -1, -bb_weight(prefix, buf, id))
    redis.call('HSET', req, 'batch', batch)
  end
  if ok then
    if ARGV[i + 4] == '' then wh = '' end
    bb_terminal(prefix, id, buf, cbq, wh, outcome, result, ttl, false)
    if f[1] == 'pending' then bb_trim_head(prefix, buf) end
    finished[#finished + 1] = id
  end
end
bb_drop_intact(prefix, batch)
bb_flush(prefix)
return finished
