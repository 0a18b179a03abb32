-- Which of a batch's requests Redis no longer holds batched under that batch.
--
-- KEYS     none (reads keys built here: {p}:req:{id})
-- ARGV[1]  key prefix ("{p}:")     ARGV[2] batch id     ARGV[3..] request ids
-- Returns pairs (position among the ids, from 1; the request's state, false when its hash is
-- gone) for each request that is not "batched" under ARGV[2]: the others are the batch's.
-- The check before a provider job is created asks this of every request of the batch; a reply
-- of only the exceptions leaves the client nearly nothing to read for an intact batch.
local prefix, batch = ARGV[1], ARGV[2]
local out, n = {}, 0
for i = 3, #ARGV do
  local f = redis.call('HMGET', prefix .. 'req:' .. ARGV[i], 'state', 'batch')
  if not (f[1] == 'batched' and f[2] == batch) then
    out[n + 1], out[n + 2] = i - 2, f[1]
    n = n + 2
  end
end
return out
