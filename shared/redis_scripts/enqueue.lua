-- Record requests and append each to its (provider, model) pending buffer, atomically.
--
-- KEYS[1]  {p}:buffers             hash    buf -> bytes waiting in that buffer (JSONL lines
--                                          plus metadata)
-- Keys built here (one Redis, not a cluster):
--          {p}:req:{id}            hash    the request record (small fields: stays a listpack)
--          {p}:bodies:{buf}        hash    request id -> body JSON, one hash per buffer: a
--                                          single HSET per call stores a whole chunk
--          {p}:idem:{key}          string  idempotency key -> "{request id}/{digest}", the
--                                          digest naming the request the key was used for
--          {p}:pending:{buf}       zset    request ids scored by enqueue sequence (FIFO)
--          {p}:seq                 string  the enqueue sequence counter
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] unused (enqueue times are the Redis server's
--          clock, so producers on many hosts agree)      ARGV[3] idempotency TTL (s)
-- ARGV[4..] 9 values per request: id, buf, size (line + metadata bytes), idempotency key
--          ('' for none), body JSON, callback queue, metadata JSON, request digest, webhook
--          URL
-- Returns a flat array: number of buffers touched B, then B pairs (buf, count after), then
-- pairs (1-based request position, existing id) for requests whose idempotency key was taken
-- by the identical request (or whose keyed id, derived from key and digest, is already here). If any key is taken by a different request (another digest),
-- nothing at all is written and the reply is {-1, position, existing id} for the first one.
local prefix, ttl = ARGV[1], ARGV[3]
local clock = redis.call('TIME')
local now = clock[1] .. string.format('%03d', math.floor(tonumber(clock[2]) / 1000))
local n = (#ARGV - 3) / 9
-- Pass 1 (reads only): what each idempotency key already stands for. A key first used
-- earlier in this call stands for that request.
local existing, first_use = {}, {}
local position = 0
for i = 4, #ARGV, 9 do
  position = position + 1
  local idem = ARGV[i + 3]
  if idem ~= '' then
    local digest = ARGV[i + 7]
    local earlier = first_use[idem]
    local held_id, held_digest
    if earlier then
      held_id, held_digest = earlier[1], earlier[2]
    else
      local value = redis.call('GET', prefix .. 'idem:' .. idem)
      if value then
        local sep = string.find(value, '/', 1, true)
        -- A value without a digest (written before digests were kept) matches any request.
        if sep then
          held_id, held_digest = string.sub(value, 1, sep - 1), string.sub(value, sep + 1)
        else
          held_id, held_digest = value, digest
        end
      elseif redis.call('EXISTS', prefix .. 'req:' .. ARGV[i]) == 1 then
        -- The key is gone (its TTL passed, or Redis lost it) but its request is still here:
        -- a keyed request's id is derived from key and digest, so this is that request.
        held_id, held_digest = ARGV[i], digest
      else
        first_use[idem] = {ARGV[i], digest}
      end
    end
    if held_id then
      if held_digest ~= digest then return {-1, position, held_id} end
      existing[position] = held_id
    end
  end
end
-- Pass 2: write. One sequence range per call keeps buffers first-in first-out even within a
-- millisecond.
local seq = redis.call('INCRBY', prefix .. 'seq', n) - n
local by_buf, bodies_by_buf, bytes_by_buf, order = {}, {}, {}, {}
local repeats = {}
position = 0
for i = 4, #ARGV, 9 do
  position = position + 1
  local id, buf, size, idem = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local held = existing[position]
  if held then
    repeats[#repeats + 1] = position
    repeats[#repeats + 1] = held
  else
    if idem ~= '' then
      redis.call('SET', prefix .. 'idem:' .. idem, id .. '/' .. ARGV[i + 7], 'EX', ttl)
    end
    local req = prefix .. 'req:' .. id
    redis.call('HSET', req, 'state', 'pending', 'enq', now, 'seq', seq + position,
               'size', size, 'buf', buf)
    if ARGV[i + 5] ~= '' then redis.call('HSET', req, 'cbq', ARGV[i + 5]) end
    if ARGV[i + 6] ~= '' then redis.call('HSET', req, 'meta', ARGV[i + 6]) end
    if ARGV[i + 8] ~= '' then redis.call('HSET', req, 'wh', ARGV[i + 8]) end
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
