-- _terminal.lua: the one way a request reaches its terminal outcome ("done"). Prepended to
-- finish, requeue, unclaim, restore_done and cancel by shared/redis_layout.py, so every
-- script that finishes a request delivers it the same way, in the same atomic step.
--
-- Keys written (prefix p, one Redis):
--   {p}:req:{id}       hash    state=done, outcome, result; expires after the result TTL
--   {p}:bodies:{buf}   hash    the body is dropped: it will never be sent again
--   {p}:cb:{queue}     stream  the result, when the request has a callback queue
--   {p}:wh:{id}        hash    the webhook delivery (url, type, result, at, attempts), and
--   {p}:whq            zset    its due time (ms): when the request has a webhook URL
--   {p}:torecord       list    the id, when no batch will record the outcome in SQL
--   {p}:cbqueues       set     the callback queue's name (so metrics can find the queues)
--   {p}:intact:{batch} string  dropped by bb_drop_intact (see claim.lua)
--   {p}:counters       hash    requests:{outcome} +1, and the request's end-to-end latency
--                              (from its enqueue time "enq", when it has one) in the
--                              histogram fields lat:{outcome}:{le} (the smallest bucket that
--                              holds it) and lat_ms:{outcome} (the sum); see shared/counters.py
-- Because the outcome, the stream entry and the outbox entry are one script, they reach the
-- AOF together: a result is never delivered without its "done", which every script checks.
-- The counters are in the same step, so each outcome is counted exactly once: bb_terminal
-- adds them up in Lua and bb_flush writes each field once, which a script using bb_terminal
-- calls before it returns (a 2,000-request finish writes a handful of fields, not 6,000).
local BB_NOW_MS = nil  -- the script's instant, as TIME gives it (ms, a string) ...
local BB_NOW_N = nil   -- ... and as a number
local BB_COUNTS = {}  -- {p}:counters field -> increment
local BB_QUEUES = {}  -- callback queue names seen
-- Names built once per script call rather than once per request (a 2,000-request finish
-- concatenated each of them 2,000 times): counter fields by outcome, keys by buffer/queue.
local BB_OUTCOME_FIELDS = {}
local BB_BODIES_KEYS = {}
local BB_STREAM_KEYS = {}

local function bb_now_ms()
  -- A script runs as one instant: one TIME per call, not one per request.
  if not BB_NOW_MS then
    local t = redis.call('TIME')
    BB_NOW_MS = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
    BB_NOW_N = tonumber(BB_NOW_MS)
  end
  return BB_NOW_MS
end

local function bb_count(field, n)
  BB_COUNTS[field] = (BB_COUNTS[field] or 0) + n
end

local function bb_flush(prefix)
  local counters = prefix .. 'counters'
  for field, n in pairs(BB_COUNTS) do
    redis.call('HINCRBY', counters, field, n)
  end
  for cbq in pairs(BB_QUEUES) do
    redis.call('SADD', prefix .. 'cbqueues', cbq)
  end
  BB_COUNTS, BB_QUEUES = {}, {}
end

-- Upper bounds (s) of the latency buckets; shared/counters.py LATENCY_BUCKETS has the same.
local BB_LATENCY_BUCKETS = {1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400,
                            28800, 86400}
local BB_LATENCY_MS = {}
for i, bound in ipairs(BB_LATENCY_BUCKETS) do BB_LATENCY_MS[i] = bound * 1000 end

-- The counter fields of one outcome: requests:{outcome}, lat_ms:{outcome}, and per bucket
-- lat:{outcome}:{le} (the last one '+Inf').
local function bb_outcome_fields(outcome)
  local fields = BB_OUTCOME_FIELDS[outcome]
  if not fields then
    fields = {requests = 'requests:' .. outcome, sum = 'lat_ms:' .. outcome, le = {}}
    for i, bound in ipairs(BB_LATENCY_BUCKETS) do
      fields.le[i] = 'lat:' .. outcome .. ':' .. tostring(bound)
    end
    fields.le[#BB_LATENCY_BUCKETS + 1] = 'lat:' .. outcome .. ':+Inf'
    BB_OUTCOME_FIELDS[outcome] = fields
  end
  return fields
end

local function bb_count_outcome(req, outcome, enq)
  local fields = bb_outcome_fields(outcome)
  bb_count(fields.requests, 1)
  if enq == nil then enq = redis.call('HGET', req, 'enq') end
  enq = tonumber(enq)
  if not enq then return end  -- a hash rebuilt from the record: its submit time is unknown
  bb_now_ms()
  local ms = math.floor(math.max(BB_NOW_N - enq, 0))
  -- The smallest bucket that holds it; past the last bound, '+Inf'.
  local i, n = 1, #BB_LATENCY_MS
  while i <= n and ms > BB_LATENCY_MS[i] do i = i + 1 end
  bb_count(fields.le[i], 1)
  bb_count(fields.sum, ms)
end

-- prefix .. kind .. name, concatenated once per name in a script call.
local function bb_cached_key(cache, prefix, kind, name)
  local key = cache[name]
  if not key then
    key = prefix .. kind .. name
    cache[name] = key
  end
  return key
end

-- Drop batch's intact mark ({p}:intact:{batch}, set by claim.lua): a request is leaving it
-- (finished, sent round again, returned to its buffer). Each script that takes requests out of
-- a batch calls this once, so the mark never outlives the batch holding all of its requests.
local function bb_drop_intact(prefix, batch)
  redis.call('DEL', prefix .. 'intact:' .. batch)
end

-- enq: the request's enqueue time when the caller already read it (nil: read here).
local function bb_terminal(prefix, id, buf, cbq, wh, outcome, result, ttl, unrecorded, enq)
  local req = prefix .. 'req:' .. id
  bb_count_outcome(req, outcome, enq)
  redis.call('HSET', req, 'state', 'done', 'outcome', outcome, 'result', result)
  if buf and buf ~= '' then
    redis.call('HDEL', bb_cached_key(BB_BODIES_KEYS, prefix, 'bodies:', buf), id)
  end
  redis.call('EXPIRE', req, ttl)
  if cbq and cbq ~= '' then
    redis.call('XADD', bb_cached_key(BB_STREAM_KEYS, prefix, 'cb:', cbq), '*', 'result', result)
    BB_QUEUES[cbq] = true
  end
  if wh and wh ~= '' then
    local now = bb_now_ms()
    redis.call('HSET', prefix .. 'wh:' .. id, 'url', wh, 'type', outcome, 'result', result,
               'at', now, 'attempts', 0)
    redis.call('ZADD', prefix .. 'whq', now, id)
  end
  if unrecorded then redis.call('RPUSH', prefix .. 'torecord', id) end
end
