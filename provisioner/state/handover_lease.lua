-- Hand a host's lease from a dead agent to its successor on the same host, with no gap.
-- KEYS[1] lease key, KEYS[2] host hash (last_seen stamped on success); ARGV: prefix, old token (the dead agent's, from its local record), new token, ttl_ms.
-- Compare-and-set: only if the old token still holds the lease (or nobody does) is it given to the new
-- token.  Returns '' when the new token holds the lease now, else the holder's token (nothing written).
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[2] and cur ~= ARGV[3] then return cur end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
stamp_seen(KEYS[2])
return ''
