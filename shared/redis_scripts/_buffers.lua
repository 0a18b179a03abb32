-- _buffers.lua: how a pending buffer is kept. Prepended by shared/redis_layout.py to every
-- script that moves requests into or out of a buffer, or reads a request's buffer.
--
-- Keys (prefix p, one Redis):
--   {p}:pending:{buf}  list    request ids in arrival order. Leaving the buffer other than by
--                              claim (cancel, reclaim, restore) only changes the request's
--                              state: removing an id from the middle of a list costs a scan,
--                              so the id stays until a claim reaches it and drops it. A request
--                              sent round again is pushed at the head (it is older than what
--                              waits), and may then be listed twice: only the first occurrence
--                              that is still "pending" is claimed, the state check skips the
--                              rest. The head is always a pending request (bb_trim_head).
--   {p}:buffers        hash    buf -> bytes waiting (batch lines plus metadata); only buffers
--                              a request waits in (bb_account drops the others)
--   {p}:npending       hash    buf -> requests waiting (the list's length counts dropped ids)
--   {p}:bufname        hash    buffer number -> buf; a request hash stores the number in its
--                              field "buf" (a ~47-character name in every request cost ~50 B)
--   {p}:bufno          hash    buf -> buffer number (enqueue.lua assigns them)
--   {p}:bodies:{buf}   hash    request id -> body JSON
--   {p}:req:{id}       hash    the request: state, buf (number), meta, ...

-- shared/schemas.py LINE_OVERHEAD: the bytes of a batch line beyond its custom_id and body
-- (tests/test_buffer_invariants.py checks the two agree).
local BB_LINE_OVERHEAD = 25
local BB_BUFFER_NAMES = {}  -- buffer number -> name, read once per script call

-- The name of a request's buffer from the number its hash stores (nil for nil). A hash
-- written before buffers had numbers holds the name itself (names contain a colon).
local function bb_buffer_name(prefix, number)
  if not number then return nil end
  if string.find(number, ':', 1, true) then return number end
  local name = BB_BUFFER_NAMES[number]
  if not name then
    name = redis.call('HGET', prefix .. 'bufname', number)
    BB_BUFFER_NAMES[number] = name
  end
  return name
end

-- The number of buffer buf, given it on first use. Numbers are never taken back, so the
-- next one is the count so far plus one.
local function bb_buffer_number(prefix, buf)
  local number = redis.call('HGET', prefix .. 'bufno', buf)
  if not number then
    number = tostring(redis.call('HLEN', prefix .. 'bufno') + 1)
    redis.call('HSET', prefix .. 'bufno', buf, number)
    redis.call('HSET', prefix .. 'bufname', number, buf)
  end
  return number
end

-- What a request weighs in its buffer: its batch line plus its metadata. Derived from what
-- is stored rather than stored again: a size field pushed every request hash into the next
-- allocation size class.
local function bb_weight(prefix, buf, id)
  return BB_LINE_OVERHEAD + #id + redis.call('HSTRLEN', prefix .. 'bodies:' .. buf, id)
         + redis.call('HSTRLEN', prefix .. 'req:' .. id, 'meta')
end

-- Count n requests of `bytes` into (or, negative, out of) buffer buf. A buffer nothing waits
-- in any more is forgotten (enqueue.lua lists it again with its next request): models are
-- whatever producers name, and each one ever named would otherwise stay listed, scanned by
-- every aggregate tick and exported as metric series, for ever.
local function bb_account(prefix, buf, n, bytes)
  if redis.call('HINCRBY', prefix .. 'npending', buf, n) > 0 then
    redis.call('HINCRBY', prefix .. 'buffers', buf, bytes)
  else
    redis.call('HDEL', prefix .. 'npending', buf)
    redis.call('HDEL', prefix .. 'buffers', buf)
  end
end

-- Drop ids at the head of a buffer's list whose requests no longer wait there, so the head
-- is the oldest waiting request (claim.lua, status and metrics read its age). Each id is
-- dropped once, so this costs O(1) per request over the buffer's life.
local function bb_trim_head(prefix, buf)
  local key = prefix .. 'pending:' .. buf
  while true do
    local id = redis.call('LINDEX', key, 0)
    if not id or redis.call('HGET', prefix .. 'req:' .. id, 'state') == 'pending' then
      return
    end
    redis.call('LPOP', key)
  end
end

-- Push ids (oldest first) back at the head of buf's list, keeping their order.
local function bb_push_head(prefix, buf, ids)
  local reversed = {}
  for i = #ids, 1, -1 do reversed[#reversed + 1] = ids[i] end
  -- unpack() is bounded by Lua's C stack, so push in chunks (the last chunk pushed ends up
  -- first, so push the newest chunk first).
  for i = 1, #reversed, 1000 do
    redis.call('LPUSH', prefix .. 'pending:' .. buf,
               unpack(reversed, i, math.min(i + 999, #reversed)))
  end
end
