-- Record requests and append each to its (provider, model) pending buffer, atomically.
--
-- KEYS[1]  {p}:buffers             hash    buf -> bytes waiting in that buffer (JSONL lines
--                                          plus metadata)
-- Keys built here (one Redis, not a cluster), besides the buffer keys of _buffers.lua:
--          {p}:req:{id}            hash    the request record (small fields: stays a listpack)
--          {p}:bodies:{buf}        hash    request id -> body JSON, one hash per buffer: a
--                                          single HSET per call stores a whole chunk
--          {p}:idem:{key}          string  idempotency key -> "{request id}/{digest}", the
--                                          digest naming the request the key was used for
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] unused (enqueue times are the Redis server's
--          clock, so producers on many hosts agree)      ARGV[3] idempotency TTL (s)
-- ARGV[4..] 8 values per request: id, buf, idempotency key ('' for none), body JSON,
--          callback queue, metadata JSON, request digest, webhook URL
-- Returns a flat array: number of buffers touched B, then B pairs (buf, count after), then
-- pairs (1-based request position, existing id) for requests whose idempotency key was taken
-- by the identical request (or whose keyed id, derived from key and digest, is already
-- here). If any key is taken by a different request (another digest), nothing at all is
-- written and the reply is {-1, position, existing id} for the first one.
local prefix, ttl = ARGV[1], ARGV[3]
local clock = redis.call('TIME')
local now = clock[1] .. string.format('%03d', math.floor(tonumber(clock[2]) / 1000))
-- Pass 1 (reads only): what each idempotency key already stands for. A key first used
-- earlier in this call stands for that request.
local existing, first_use = {}, {}
local position = 0
for i = 4, #ARGV, 8 do
  position = position + 1
  local idem = ARGV[i + 2]
  if idem ~= '' then
    local digest = ARGV[i + 6]
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
-- Redis does not undo a script's writes when a later command fails, so a buffer key of
-- another type (a buffer an older batchbridge kept as a sorted set, not upgraded yet) is
-- refused here, before anything is written: otherwise the request hashes and idempotency
-- keys written before the RPUSH failed would stay, and a retry with the same key would get
-- the id of a request in no buffer.
local checked = {}
for i = 5, #ARGV, 8 do
  local buf = ARGV[i]
  if not checked[buf] then
    checked[buf] = true
    for key, want in pairs({[prefix .. 'pending:' .. buf] = 'list',
                            [prefix .. 'bodies:' .. buf] = 'hash'}) do
      local kind = redis.call('TYPE', key)['ok']
      if kind ~= 'none' and kind ~= want then
        return redis.error_reply('WRONGTYPE ' .. key .. ' is a ' .. kind .. ', not a ' .. want
          .. ' (a buffer of an older batchbridge: start a worker of this version to upgrade '
          .. 'it); nothing was stored')
      end
    end
  end
end
-- Pass 2: write.
local ids_by_buf, bodies_by_buf, bytes_by_buf, number_of, order = {}, {}, {}, {}, {}
local repeats = {}
position = 0
for i = 4, #ARGV, 8 do
  position = position + 1
  local id, buf, idem, body = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local cbq, meta, wh = ARGV[i + 4], ARGV[i + 5], ARGV[i + 7]
  local held = existing[position]
  if held then
    repeats[#repeats + 1] = position
    repeats[#repeats + 1] = held
  else
    if idem ~= '' then
      redis.call('SET', prefix .. 'idem:' .. idem, id .. '/' .. ARGV[i + 6], 'EX', ttl)
    end
    local ids, bodies = ids_by_buf[buf], bodies_by_buf[buf]
    if not ids then
      ids, bodies = {}, {}
      ids_by_buf[buf], bodies_by_buf[buf] = ids, bodies
      bytes_by_buf[buf] = 0
      order[#order + 1] = buf
      number_of[buf] = bb_buffer_number(prefix, buf)
    end
    local req = prefix .. 'req:' .. id
    redis.call('HSET', req, 'state', 'pending', 'enq', now, 'buf', number_of[buf])
    if cbq ~= '' then redis.call('HSET', req, 'cbq', cbq) end
    if meta ~= '' then redis.call('HSET', req, 'meta', meta) end
    if wh ~= '' then redis.call('HSET', req, 'wh', wh) end
    ids[#ids + 1] = id
    bodies[#bodies + 1] = id
    bodies[#bodies + 1] = body
    -- The same weight bb_weight derives when the request leaves the buffer.
    bytes_by_buf[buf] = bytes_by_buf[buf] + BB_LINE_OVERHEAD + #id + #body + #meta
  end
end
local out = {#order}
for _, buf in ipairs(order) do
  local ids, bodies = ids_by_buf[buf], bodies_by_buf[buf]
  -- unpack() is bounded by Lua's C stack, so add in chunks.
  for j = 1, #ids, 1000 do
    redis.call('RPUSH', prefix .. 'pending:' .. buf, unpack(ids, j, math.min(j + 999, #ids)))
  end
  for j = 1, #bodies, 1000 do
    redis.call('HSET', prefix .. 'bodies:' .. buf, unpack(bodies, j, math.min(j + 999, #bodies)))
  end
  redis.call('HINCRBY', KEYS[1], buf, bytes_by_buf[buf])
  out[#out + 1] = buf
  out[#out + 1] = redis.call('HINCRBY', prefix .. 'npending', buf, #ids)
end
for _, value in ipairs(repeats) do out[#out + 1] = value end
return out
