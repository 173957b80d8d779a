-- KEYS[1] lease key; ARGV: prefix, token.  Deletes the lease only if that token holds it.
if redis.call('GET', KEYS[1]) == ARGV[2] then return redis.call('DEL', KEYS[1]) end
return 0
