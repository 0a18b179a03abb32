-- Extend a lease only if this holder still owns it.
--
-- KEYS[1]  {p}:lock:{name}         string  the lease, holding its owner's token
-- ARGV[1]  the owner's token       ARGV[2] new time to live (ms)
-- Returns 1 if extended, else 0 (the lease expired and someone else may hold it now).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
