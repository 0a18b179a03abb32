-- Claim due webhook deliveries for sending: each is pushed into the future while in flight,
-- so a sender that dies mid-send only delays it (it is claimed again once that time passes).
-- Per-endpoint concurrency is counted here, across every sender process: a delivery whose
-- endpoint (origin: scheme://host:port) already has ARGV[5] sends in flight is left due, and
-- the scan goes on past it, so a slow endpoint never holds up the others.
--
-- KEYS[1]  {p}:whq                 zset    delivery ids by due time (ms)
-- Keys built here:
--   {p}:wh:{id}       hash    url, type, result, at, attempts; this sets ep (the endpoint)
--                             and claim (ARGV[7], so only this claim can settle it)
--   {p}:whep:{ep}     zset    ids in flight to endpoint ep, by in-flight-until (ms); a member
--                             whose time has passed (its sender died) no longer counts
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] in flight for this long (ms)
-- ARGV[3]  claim at most this many ARGV[4] per-endpoint cap
-- ARGV[5]  look at most this many due ids                ARGV[6] claim token
-- Times are Redis' clock (as _terminal.lua's due times are), so senders' clocks never matter.
-- Returns {now (ms), blocked, id, url, type, result, at, attempts, id, ...}: blocked counts
-- the due deliveries left because their endpoint was at its cap. A queued id whose hash is
-- gone (delivered by another sender) is dropped from the queue.
local prefix, token = ARGV[1], ARGV[6]
local limit, cap, scan = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now_n = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now = string.format('%.0f', now_n)
local until_ms = string.format('%.0f', now_n + tonumber(ARGV[2]))
local default_ports = {http = '80', https = '443'}

-- The origin of a URL, lower-cased, with the scheme's default port made explicit.
local function origin(url)
  local scheme, authority = string.match(url, '^(%a[%w+.-]*)://([^/?#]*)')
  if not scheme then return url end
  scheme = string.lower(scheme)
  authority = string.lower((string.gsub(authority, '^.*@', '')))
  if not string.match(authority, ':%d+$') and default_ports[scheme] then
    authority = authority .. ':' .. default_ports[scheme]
  end
  return scheme .. '://' .. authority
end

local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, scan)
local busy = {}
local out = {now, 0}
local taken, blocked = 0, 0
for _, id in ipairs(ids) do
  if taken >= limit then break end
  local wh = prefix .. 'wh:' .. id
  local f = redis.call('HMGET', wh, 'url', 'type', 'result', 'at', 'attempts')
  if not f[1] then
    redis.call('ZREM', KEYS[1], id)
  else
    local ep = origin(f[1])
    local flights = prefix .. 'whep:' .. ep
    if busy[ep] == nil then
      redis.call('ZREMRANGEBYSCORE', flights, '-inf', now)
      busy[ep] = redis.call('ZCARD', flights)
    end
    if busy[ep] >= cap then
      blocked = blocked + 1
    else
      busy[ep] = busy[ep] + 1
      redis.call('ZADD', flights, until_ms, id)
      redis.call('PEXPIREAT', flights, until_ms)
      redis.call('ZADD', KEYS[1], 'XX', until_ms, id)
      redis.call('HSET', wh, 'ep', ep, 'claim', token)
      taken = taken + 1
      out[#out + 1] = id
      for j = 1, 5 do out[#out + 1] = f[j] or '' end
    end
  end
end
out[2] = blocked
return out
