-- Take up to N results of a callback queue for one consumer in one step: first the idle ones
-- (delivered, unacked, outstanding for longer than the visibility timeout), continuing the
-- caller's scan of the pending entries list (PEL), then new ones. An idle result that has
-- already been delivered the maximum number of times moves to the dead-letter stream instead.
-- The caller blocks (XREADGROUP BLOCK, not allowed in a script) only when this takes nothing.
--
-- KEYS[1]  {p}:cb:{queue}      stream  the callback queue (its consumer group is ARGV[1])
-- KEYS[2]  {p}:cbdead:{queue}  stream  the queue's dead-letter stream: id, request_id,
--                                      deliveries, reason, result
-- ARGV[1]  group                ARGV[2] consumer        ARGV[3] min idle time (ms)
-- ARGV[4]  cursor: the PEL id to scan from ('0-0' starts a new pass, '' skips the scan)
-- ARGV[5]  max deliveries       ARGV[6] most PEL entries to look at
-- ARGV[7]  most results to take
-- Returns {next cursor ('0-0': the pass is complete; '' when no scan was asked for),
--          {request id, deliveries, ...} of the results dead-lettered,
--          {id, deliveries, {field, value, ...}, ...} of the idle results taken, oldest first,
--          {{id, {field, value, ...}}, ...} of the new results taken (each delivery 1)}.
--
-- Moving a result is XADD to the dead stream + XACK + XDEL in this one script, so a crash
-- can neither lose it nor leave it in both streams.
local live, dead, group, consumer = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local min_idle, cursor, max_deliveries = ARGV[3], ARGV[4], tonumber(ARGV[5])
local budget, want = tonumber(ARGV[6]), tonumber(ARGV[7])
local dead_ids = {}  -- request id, deliveries, ... of the results moved
local idle = {}      -- id, deliveries, fields, ... of the idle results taken
local taken = 0

local function request_id_of(fields)
  for i = 1, #fields, 2 do
    if fields[i] == 'result' then
      local ok, decoded = pcall(cjson.decode, fields[i + 1])
      if ok and type(decoded) == 'table' and type(decoded.request_id) == 'string' then
        return decoded.request_id, fields[i + 1]
      end
      return '', fields[i + 1]
    end
  end
  return '', ''
end

if cursor ~= '' then
  while taken < want and budget > 0 do
    -- XAUTOCLAIM looks at up to 10 x COUNT entries per call: that is what the budget counts.
    local count = math.min(want - taken, math.max(1, math.floor(budget / 10)))
    budget = budget - count * 10
    -- JUSTID claims without counting a delivery (counted below, only for a real delivery),
    -- and returns entries deleted while pending by id, which Redis 6.2 otherwise hides.
    local reply = redis.call('XAUTOCLAIM', live, group, consumer, min_idle, cursor,
      'COUNT', count, 'JUSTID')
    cursor = reply[1]
    for _, id in ipairs(reply[2]) do
      local entry = redis.call('XRANGE', live, id, id)[1]
      local delivered = redis.call('XPENDING', live, group, id, id, 1)[1][4]
      if not entry then
        redis.call('XACK', live, group, id)  -- deleted while pending: nothing to deliver
      elseif delivered >= max_deliveries then
        local request_id, result = request_id_of(entry[2])
        redis.call('XADD', dead, '*', 'id', id, 'request_id', request_id,
          'deliveries', delivered, 'reason', 'max_deliveries', 'result', result)
        redis.call('XACK', live, group, id)
        redis.call('XDEL', live, id)
        dead_ids[#dead_ids + 1] = request_id
        dead_ids[#dead_ids + 1] = delivered
      else
        redis.call('XCLAIM', live, group, consumer, 0, id, 'RETRYCOUNT', delivered + 1,
          'JUSTID')
        idle[#idle + 1] = id
        idle[#idle + 1] = delivered + 1
        idle[#idle + 1] = entry[2]
        taken = taken + 1
      end
    end
    if cursor == '0-0' then break end
  end
end

local new = {}
if taken < want then
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want - taken,
    'STREAMS', live, '>')
  if reply then new = reply[1][2] end
end
return {cursor, dead_ids, idle, new}
