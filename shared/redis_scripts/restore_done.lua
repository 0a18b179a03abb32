-- Re-apply outcomes the record (SQL) holds but Redis lost: the reconciler's finish.
--
-- KEYS[1]  {p}:buffers             hash    buf -> bytes waiting (a request found pending again)
-- Keys built here: {p}:req:{id} (hash), {p}:bodies:{buf} (hash), {p}:pending:{buf} (zset),
--                  {p}:cb:{queue} (stream)
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] result TTL (s)
-- ARGV[3]  the batch id the record finished these requests in
-- ARGV[4..] quadruples: request id, outcome, result JSON, callback queue (from the record)
-- Per request, by what Redis still has:
--   no hash at all          -> a done hash is rebuilt and the result XADDed to the record's queue
--   batched under ARGV[3]   -> finished exactly as finish.lua does
--   pending                 -> its claim was lost: out of its buffer, then finished
--   done, or in another batch -> left alone (already delivered, or moved on)
-- Returns the ids finished by this call. The hash write and the XADD are in one script, so
-- they reach the AOF as one entry and survive or vanish together: a delivery is never
-- present without its "done" (which is what makes a repeat skip it).
local prefix, ttl, batch = ARGV[1], ARGV[2], ARGV[3]
local finished = {}
for i = 4, #ARGV, 4 do
  local id, outcome, result, record_cbq = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local req = prefix .. 'req:' .. id
  local f = redis.call('HMGET', req, 'state', 'batch', 'cbq', 'buf', 'size')
  local cbq = f[3]
  local ok = false
  if not f[1] then
    ok, cbq = true, record_cbq
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
    redis.call('HSET', req, 'state', 'done', 'outcome', outcome, 'result', result)
    if f[4] then redis.call('HDEL', prefix .. 'bodies:' .. f[4], id) end
    redis.call('EXPIRE', req, ttl)
    if cbq and cbq ~= '' then
      redis.call('XADD', prefix .. 'cb:' .. cbq, '*', 'result', result)
    end
    finished[#finished + 1] = id
  end
end
return finished
