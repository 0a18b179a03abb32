-- Record requests and append each to its (provider, model) pending buffer, atomically.
--
-- KEYS[1]  {p}:buffers             hash    buf -> bytes of JSONL waiting in that buffer
-- Keys built here (one Redis, not a cluster):
--          {p}:req:{id}            hash    the request record (small fields: stays a listpack)
--          {p}:bodies:{buf}        hash    request id -> body JSON, one hash per buffer: a
--                                          single HSET per call stores a whole chunk
--          {p}:idem:{key}          string  idempotency key -> request id
--          {p}:pending:{buf}       zset    request ids scored by enqueue sequence (FIFO)
--          {p}:seq                 string  the enqueue sequence counter
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] now (ms)     ARGV[3] idempotency TTL (s)
-- ARGV[4..] 7 values per request: id, buf, line size, idempotency key ('' for none),
--          body JSON, callback queue, metadata JSON
-- Returns a flat array: number of buffers touched B, then B pairs (buf, count after), then
-- pairs (1-based request position, existing id) for requests whose idempotency key was taken.
local prefix, now, ttl = ARGV[1], ARGV[2], ARGV[3]
-- One sequence range per call keeps buffers first-in first-out even within a millisecond.
local seq = redis.call('INCRBY', prefix .. 'seq', (#ARGV - 3) / 7) - (#ARGV - 3) / 7
local by_buf, bodies_by_buf, bytes_by_buf, order = {}, {}, {}, {}
local repeats = {}
local position = 0
for i = 4, #ARGV, 7 do
  position = position + 1
  local id, buf, size, idem = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local existing = false
  if idem ~= '' then
    local idem_key = prefix .. 'idem:' .. idem
    existing = redis.call('GET', idem_key)
    if not existing then redis.call('SET', idem_key, id, 'EX', ttl) end
  end
  if existing then
    repeats[#repeats + 1] = position
    repeats[#repeats + 1] = existing
  else
    local req = prefix .. 'req:' .. id
    redis.call('HSET', req, 'state', 'pending', 'enq', now, 'seq', seq + position,
               'size', size, 'buf', buf)
    if ARGV[i + 5] ~= '' then redis.call('HSET', req, 'cbq', ARGV[i + 5]) end
    if ARGV[i + 6] ~= '' then redis.call('HSET', req, 'meta', ARGV[i + 6]) end
    local members, bodies = by_buf[buf], bodies_by_buf[buf]
    if not members then
      members, bodies = {}, {}
      by_buf[buf], bodies_by_buf[buf] = members, bodies
      bytes_by_buf[buf] = 0
      order[#order + 1] = buf
    end
    members[#members + 1] = seq + position
    members[#members + 1] = id
    bodies[#bodies + 1] = id
    bodies[#bodies + 1] = ARGV[i + 4]
    bytes_by_buf[buf] = bytes_by_buf[buf] + tonumber(size)
  end
end
local out = {#order}
for _, buf in ipairs(order) do
  local members, bodies = by_buf[buf], bodies_by_buf[buf]
  local pending = prefix .. 'pending:' .. buf
  -- unpack() is bounded by Lua's C stack, so add in chunks.
  for j = 1, #members, 1000 do
    redis.call('ZADD', pending, unpack(members, j, math.min(j + 999, #members)))
    redis.call('HSET', prefix .. 'bodies:' .. buf, unpack(bodies, j, math.min(j + 999, #bodies)))
  end
  redis.call('HINCRBY', KEYS[1], buf, bytes_by_buf[buf])
  out[#out + 1] = buf
  out[#out + 1] = redis.call('ZCARD', pending)
end
for _, value in ipairs(repeats) do out[#out + 1] = value end
return out
