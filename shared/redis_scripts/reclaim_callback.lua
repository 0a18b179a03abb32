-- Take the next idle (unacked, timed-out) result of a callback queue for one consumer,
-- continuing from the caller's cursor in the pending entries list (PEL), and move each result
-- that has already been delivered the maximum number of times to the dead-letter stream.
--
-- KEYS[1]  {p}:cb:{queue}      stream  the callback queue (its consumer group is ARGV[1])
-- KEYS[2]  {p}:cbdead:{queue}  stream  the queue's dead-letter stream
-- ARGV[1]  group                ARGV[2] consumer        ARGV[3] min idle time (ms)
-- ARGV[4]  cursor: the PEL id to scan from ('0-0' starts a new pass)
-- ARGV[5]  max deliveries       ARGV[6] most XAUTOCLAIM steps (each scans up to 10 entries)
-- Returns {next cursor, {request id, deliveries, ...} of the results dead-lettered,
--          id, deliveries, {field, value, ...} of the result delivered};
-- id is '' when no idle result was found. A next cursor of '0-0' means the pass is complete.
--
-- Moving a result is XADD to the dead stream + XACK + XDEL in this one script, so a crash
-- can neither lose it nor leave it in both streams.
local live, dead, group, consumer = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local min_idle, cursor, max_deliveries = ARGV[3], ARGV[4], tonumber(ARGV[5])
local dead_ids = {}  -- request id, deliveries, ... of the results moved

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

for _ = 1, tonumber(ARGV[6]) do
  -- JUSTID claims without counting a delivery (counted below, only for a real delivery),
  -- and returns entries deleted while pending by id, which Redis 6.2 otherwise hides.
  local reply = redis.call('XAUTOCLAIM', live, group, consumer, min_idle, cursor,
    'COUNT', 1, 'JUSTID')
  cursor = reply[1]
  local id = reply[2][1]
  if id then
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
      redis.call('XCLAIM', live, group, consumer, 0, id, 'RETRYCOUNT', delivered + 1, 'JUSTID')
      return {cursor, dead_ids, id, delivered + 1, entry[2]}
    end
  end
  if cursor == '0-0' then break end
end
return {cursor, dead_ids, '', 0, {}}
