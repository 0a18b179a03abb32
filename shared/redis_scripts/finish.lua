-- Give requests their terminal outcome and put each result on its callback queue, once.
--
-- KEYS[1]  {p}:buffers             hash    buf -> bytes waiting (for cancelling pending requests)
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] result TTL (s)
-- ARGV[3]  required batch id, or '' to require state "pending" (a cancel from the buffer)
-- ARGV[4..] triples: request id, outcome, result JSON
-- Returns the ids that were finished by this call. A request that already has an outcome,
-- or that has moved to another batch, is skipped: that is what makes delivery exactly once.
local prefix, ttl, batch = ARGV[1], ARGV[2], ARGV[3]
local finished = {}
for i = 4, #ARGV, 3 do
  local id = ARGV[i]
  local req = prefix .. 'req:' .. id
  local f = redis.call('HMGET', req, 'state', 'batch', 'cbq', 'buf', 'size')
  local ok
  if batch == '' then ok = f[1] == 'pending' else ok = f[1] == 'batched' and f[2] == batch end
  if ok then
    if f[1] == 'pending' then
      redis.call('ZREM', prefix .. 'pending:' .. f[4], id)
      redis.call('HINCRBY', KEYS[1], f[4], -tonumber(f[5]))
    end
    redis.call('HSET', req, 'state', 'done', 'outcome', ARGV[i + 1], 'result', ARGV[i + 2])
    redis.call('HDEL', prefix .. 'bodies:' .. f[4], id)
    redis.call('EXPIRE', req, ttl)
    if f[3] and f[3] ~= '' then
      redis.call('XADD', prefix .. 'cb:' .. f[3], '*', 'result', ARGV[i + 2])
    end
    finished[#finished + 1] = id
  end
end
return finished
