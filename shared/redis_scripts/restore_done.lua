-- Re-apply outcomes the record (SQL) holds but Redis lost: the reconciler's finish.
--
-- KEYS[1]  {p}:buffers             hash    buf -> bytes waiting (a request found pending again)
-- Keys built here: {p}:req:{id} (hash), {p}:pending:{buf} (zset), and what bb_terminal
--                  (_terminal.lua) writes
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
  local f = redis.call('HMGET', req, 'state', 'batch', 'cbq', 'buf', 'size', 'wh')
  local cbq, wh = f[3], f[6]
  local ok = false
  if not f[1] then
    ok, cbq, wh = true, ARGV[i + 3], ARGV[i + 4]
    redis.call('HSET', req, 'batch', batch, 'restored', '1')
    if cbq ~= '' then redis.call('HSET', req, 'cbq', cbq) end
  elseif f[1] == 'batched' and f[2] == batch then
    ok = true
  elseif f[1] == 'pending' then
    ok = true
    redis.call('ZREM', prefix .. 'pending:' .. f[4], id)
    redis.call('HINCRBY', KEYS[1], f[4], -tonumber(f[5] or '0'))
    redis.call('HSET', req, 'batch', batch)
  end
  if ok then
    if ARGV[i + 4] == '' then wh = '' end
    bb_terminal(prefix, id, f[4], cbq, wh, outcome, result, ttl, false)
    finished[#finished + 1] = id
  end
end
bb_flush(prefix)
return finished
