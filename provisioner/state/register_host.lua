-- Register (or re-register) a host: refresh uri/capacity/labels, keep state and claims unless new.
-- last_seen comes from Redis's clock (never the agent's).
-- KEYS[1] host hash; ARGV: prefix, name, state_if_new, field, value, ...
-- Returns {epoch, 1 if new else 0}.
local prefix, name = ARGV[1], ARGV[2]
local new = redis.call('EXISTS', KEYS[1]) == 0
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'last_seen', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
if new then
  redis.call('HSET', KEYS[1], 'state', ARGV[3], 'used_vcpus', 0, 'used_memory_mib', 0,
             'state_reason', 'registered')
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('SADD', prefix .. ':hosts', name)
if new then return {epoch, 1} end
return {epoch, 0}
