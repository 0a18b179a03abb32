-- Claim the oldest requests of one pending buffer for a new batch, if the buffer is due.
--
-- KEYS[1]  {p}:pending:{buf}       list    request ids in arrival order (see _buffers.lua)
-- KEYS[2]  {p}:buffers             hash    buf -> bytes of JSONL waiting in that buffer
-- KEYS[3]  {p}:claim:{batch}:ids   list    the claimed request ids, in file order
-- KEYS[4]  {p}:claim:{batch}       hash    buf, count, bytes, at: the claim's description
-- KEYS[5]  {p}:claims              zset    batch ids of uncommitted claims, scored by claim time
-- KEYS[6]  {p}:npending            hash    buf -> requests waiting in that buffer
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] buf          ARGV[3] batch id
-- ARGV[4]  max requests            ARGV[5] max bytes    ARGV[6] max wait (ms)
-- ARGV[7]  unused (ages are measured on the Redis server's clock, as enqueue times are)
-- ARGV[8]  "1" to flush even if no threshold is reached
-- ARGV[9]  seconds the batch's intact mark lives (absent or 0: no mark)
-- Key built here: {p}:intact:{batch}  string  the intact mark: set with the claim, dropped by
-- every script that takes a request out of the batch (bb_drop_intact in _terminal.lua). While
-- it exists, Redis holds every claimed request batched under this batch: see
-- worker/batch_ownership.py, batch_still_owns_requests.
-- Returns {claimed count, claimed bytes, reason, then per claimed request: id, cbq, attempts,
-- webhook URL}
-- (what the packer records in SQL), or {0, 0, ''} when the buffer is not due.
-- A claimed request is in exactly one place: this claim (state "batched", batch = id).
local prefix, buf, batch = ARGV[1], ARGV[2], ARGV[3]
local max_n, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local n = tonumber(redis.call('HGET', KEYS[6], buf) or '0')
if n <= 0 then return {0, 0, ''} end
local bytes = tonumber(redis.call('HGET', KEYS[2], buf) or '0')
-- The head is the oldest waiting request (bb_trim_head keeps it so).
local first = redis.call('LINDEX', KEYS[1], 0)
local oldest = now
if first then oldest = tonumber(redis.call('HGET', prefix .. 'req:' .. first, 'enq') or now) end
local reason = ''
if n >= max_n then reason = 'count'
elseif bytes >= max_bytes then reason = 'bytes'
elseif now - oldest >= tonumber(ARGV[6]) then reason = 'age'
elseif ARGV[8] == '1' then reason = 'forced'
else return {0, 0, ''} end

local taken, total, passed = 0, 0, 0  -- passed: list entries consumed, taken or dropped
local claimed = {}
local out = {0, 0, reason}
local full = false
while not full and taken < max_n do
  -- Dropped ids may sit among the waiting ones, so read past max_n when there are any.
  local ids = redis.call('LRANGE', KEYS[1], passed, passed + max_n - taken - 1)
  if #ids == 0 then break end
  for i = 1, #ids do
    local id = ids[i]
    local req = prefix .. 'req:' .. id
    local f = redis.call('HMGET', req, 'state', 'cbq', 'attempts', 'wh')
    if f[1] == 'pending' then
      local size = bb_weight(prefix, buf, id)
      if taken > 0 and total + size > max_bytes then
        full = true
        break
      end
      taken, total = taken + 1, total + size
      redis.call('HSET', req, 'state', 'batched', 'batch', batch)
      claimed[taken] = id
      -- Indexed by position: the length operator costs a search on every append.
      local at = 4 * taken
      out[at], out[at + 1], out[at + 2], out[at + 3] = id, f[2] or '', f[3] or '0', f[4] or ''
    end
    passed = passed + 1
    if taken == max_n then break end
  end
end
redis.call('LTRIM', KEYS[1], passed, -1)
bb_trim_head(prefix, buf)
if taken == 0 then return {0, 0, ''} end
-- unpack() is bounded by Lua's C stack, so push in chunks.
for i = 1, taken, 1000 do
  redis.call('RPUSH', KEYS[3], unpack(claimed, i, math.min(i + 999, taken)))
end
bb_account(prefix, buf, -taken, -total)
redis.call('HSET', KEYS[4], 'buf', buf, 'count', taken, 'bytes', total, 'at', ARGV[7])
redis.call('ZADD', KEYS[5], now, batch)
-- In the same step as the claim, so a Redis that lost the claim has lost the mark too.
if tonumber(ARGV[9] or '0') > 0 then
  redis.call('SET', prefix .. 'intact:' .. batch, '1', 'EX', ARGV[9])
end
out[1], out[2] = taken, total
return out
