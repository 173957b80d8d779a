-- KEYS[1] host hash; ARGV: prefix, state, reason.  Returns the previous state, or false if unknown.
local prev = redis.call('HGET', KEYS[1], 'state')
if not prev then return false end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'state_reason', ARGV[3])
return prev
