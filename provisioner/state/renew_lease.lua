-- Renew a host's lease by compare-and-set on the agent's token; last_seen from Redis's clock only.
-- KEYS[1] host hash, KEYS[2] lease key; ARGV: prefix, token, ttl_ms, then the agent's lease health
-- (failures, refusals, losses, last_error) recorded on the host for operators and monitors.
-- Returns {'unknown', ''} (host not registered: nothing written), {'refused', holder} (another token
-- holds the lease: nothing written), {'retaken', ''} (the lease had expired: taken again, a gap) or
-- {'renewed', ''}.
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown', ''} end
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= ARGV[2] then return {'refused', cur} end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'last_seen', t[1] .. '.' .. string.format('%06d', tonumber(t[2])),
           'lease_failures', ARGV[4], 'lease_refusals', ARGV[5], 'lease_losses', ARGV[6],
           'lease_last_error', ARGV[7])
if cur then return {'renewed', ''} end
return {'retaken', ''}
