-- Atomic transition and/or field update of one instance, keeping the indexes right.
-- KEYS[1] instance hash
-- ARGV: prefix, id, new_state ('' = keep), expected ('' = any), allowed_from (csv of states from which
--       new_state may be entered), claiming (csv of states that hold a claim), n_set, set pairs..., del fields...
-- Returns {status, previous_state, field, value, ...} with status ok | missing | conflict | invalid.
local prefix, id, new, expected = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {'missing', ''} end
if expected ~= '' and cur ~= expected then return {'conflict', cur} end
if new ~= '' and new ~= cur and not set_of(ARGV[5])[cur] then
  return {'invalid', cur}
end
local old_host = redis.call('HGET', KEYS[1], 'host')
local n_set = tonumber(ARGV[7])
if n_set > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 8, 7 + 2 * n_set)) end
if #ARGV > 7 + 2 * n_set then redis.call('HDEL', KEYS[1], unpack(ARGV, 8 + 2 * n_set)) end
if new ~= '' and new ~= cur then
  redis.call('HSET', KEYS[1], 'state', new)
  redis.call('SREM', prefix .. ':idx:state:' .. cur, id)
  redis.call('SADD', prefix .. ':idx:state:' .. new, id)
end
local new_host = redis.call('HGET', KEYS[1], 'host')
if old_host ~= new_host then
  if old_host then redis.call('SREM', prefix .. ':idx:host:' .. old_host, id) end
  if new_host then redis.call('SADD', prefix .. ':idx:host:' .. new_host, id) end
end
-- Leaving the claiming states gives the capacity back in the same atomic step (no leaked claims).
if new ~= '' and not set_of(ARGV[6])[new] then
  if old_host then release_claim(prefix, old_host, id) end
  if new_host and new_host ~= old_host then release_claim(prefix, new_host, id) end
end
local out = {'ok', cur}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all do out[#out + 1] = all[i] end
return out
