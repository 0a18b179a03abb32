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
-- Because the outcome, the stream entry and the outbox entry are one script, they reach the
-- AOF together: a result is never delivered without its "done", which every script checks.
local function bb_now_ms()
  local t = redis.call('TIME')
  return t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
end

local function bb_terminal(prefix, id, buf, cbq, wh, outcome, result, ttl, unrecorded)
  local req = prefix .. 'req:' .. id
  redis.call('HSET', req, 'state', 'done', 'outcome', outcome, 'result', result)
  if buf and buf ~= '' then redis.call('HDEL', prefix .. 'bodies:' .. buf, id) end
  redis.call('EXPIRE', req, ttl)
  if cbq and cbq ~= '' then
    redis.call('XADD', prefix .. 'cb:' .. cbq, '*', 'result', result)
  end
  if wh and wh ~= '' then
    local now = bb_now_ms()
    redis.call('HSET', prefix .. 'wh:' .. id, 'url', wh, 'type', outcome, 'result', result,
               'at', now, 'attempts', 0)
    redis.call('ZADD', prefix .. 'whq', now, id)
  end
  if unrecorded then redis.call('RPUSH', prefix .. 'torecord', id) end
end
