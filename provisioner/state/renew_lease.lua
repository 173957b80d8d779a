-- KEYS[1] host hash, KEYS[2] lease key; ARGV: prefix, token, ttl_ms.  Returns 0 if the host is unknown.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'last_seen', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
return 1
