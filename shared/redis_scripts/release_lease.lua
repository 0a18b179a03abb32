-- Release a lease only if this holder still owns it (it may have expired and been re-taken).
--
-- KEYS[1]  {p}:lock:{name}         string  the lease, holding its owner's token
-- ARGV[1]  the owner's token
-- Returns 1 if released, else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
