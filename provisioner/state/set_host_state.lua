-- Compare-and-set a host's state against the state the writer read, within the transition table.
-- KEYS[1] host hash; ARGV: prefix, new, expected, reason, allowed ("from>to,..." built from
-- provisioner.model.HOST_TRANSITIONS, plus the operator moves for an operator).
-- Returns false if the host is unknown, else {'ok'|'stale'|'forbidden', previous state}.
local prev = redis.call('HGET', KEYS[1], 'state')
if not prev then return false end
if prev ~= ARGV[3] then return {'stale', prev} end
if prev ~= ARGV[2] and not string.find(',' .. ARGV[5] .. ',', ',' .. prev .. '>' .. ARGV[2] .. ',', 1, true) then
  return {'forbidden', prev}
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'state_reason', ARGV[4])
return {'ok', prev}
