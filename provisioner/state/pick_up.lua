-- A control worker starts on a request: mark it picked (on Redis's clock, for the outbox sweeper) and
-- read its record, in one round trip.
-- ARGV: prefix, instance id, ttl_s.  Returns the instance hash (flat field/value list; empty if none).
local prefix, id = ARGV[1], ARGV[2]
local t = redis.call('TIME')
redis.call('SET', prefix .. ':picked:' .. id, t[1] .. '.' .. string.format('%06d', tonumber(t[2])), 'EX', ARGV[3])
return redis.call('HGETALL', prefix .. ':inst:' .. id)
