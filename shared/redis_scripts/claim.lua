-- Claim the oldest requests of one pending buffer for a new batch, if the buffer is due.
--
-- KEYS[1]  {p}:pending:{buf}       zset    request ids scored by enqueue sequence
-- KEYS[2]  {p}:buffers             hash    buf -> bytes of JSONL waiting in that buffer
-- KEYS[3]  {p}:claim:{batch}:ids   list    the claimed request ids, in file order
-- KEYS[4]  {p}:claim:{batch}       hash    buf, count, bytes, at: the claim's description
-- KEYS[5]  {p}:claims              zset    batch ids of uncommitted claims, scored by claim time
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] buf          ARGV[3] batch id
-- ARGV[4]  max requests            ARGV[5] max bytes    ARGV[6] max wait (ms)
-- ARGV[7]  unused (ages are measured on the Redis server's clock, as enqueue times are)
-- ARGV[8]  "1" to flush even if no threshold is reached
-- Returns {claimed count, claimed bytes, reason, then per claimed request: id, cbq, attempts,
-- webhook URL}
-- (what the packer records in SQL), or {0, 0, ''} when the buffer is not due.
-- A claimed request is in exactly one place: this claim (state "batched", batch = id).
local prefix, buf, batch = ARGV[1], ARGV[2], ARGV[3]
local max_n, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local n = redis.call('ZCARD', KEYS[1])
if n == 0 then return {0, 0, ''} end
local bytes = tonumber(redis.call('HGET', KEYS[2], buf) or '0')
local first = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
local oldest = tonumber(redis.call('HGET', prefix .. 'req:' .. first, 'enq') or now)
local reason = ''
if n >= max_n then reason = 'count'
elseif bytes >= max_bytes then reason = 'bytes'
elseif now - oldest >= tonumber(ARGV[6]) then reason = 'age'
elseif ARGV[8] == '1' then reason = 'forced'
else return {0, 0, ''} end

local ids = redis.call('ZRANGE', KEYS[1], 0, max_n - 1)
local taken, total = 0, 0
local out = {0, 0, reason}
for i = 1, #ids do
  local req = prefix .. 'req:' .. ids[i]
  local f = redis.call('HMGET', req, 'size', 'cbq', 'attempts', 'wh')
  local size = tonumber(f[1] or '0')
  if taken > 0 and total + size > max_bytes then break end
  taken, total = taken + 1, total + size
  redis.call('HSET', req, 'state', 'batched', 'batch', batch)
  -- Indexed by position: the length operator costs a search on every append.
  local at = 4 * taken
  out[at], out[at + 1], out[at + 2], out[at + 3] = ids[i], f[2] or '', f[3] or '0', f[4] or ''
end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, taken - 1)
-- unpack() is bounded by Lua's C stack, so push in chunks.
for i = 1, taken, 1000 do
  redis.call('RPUSH', KEYS[3], unpack(ids, i, math.min(i + 999, taken)))
end
redis.call('HINCRBY', KEYS[2], buf, -total)
redis.call('HSET', KEYS[4], 'buf', buf, 'count', taken, 'bytes', total, 'at', ARGV[7])
redis.call('ZADD', KEYS[5], now, batch)
out[1], out[2] = taken, total
return out
