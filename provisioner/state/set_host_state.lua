-- Compare-and-set a host's state against the state the writer read, within the transition table.
-- KEYS[1] host hash; ARGV: prefix, new, expected, reason, allowed ("from>to,..." built from
-- provisioner.model.HOST_TRANSITIONS, plus the operator moves for an operator), watched ("up,..." from
-- provisioner.model.WATCHED_HOST_STATES).
--       optional ARGV[7]: a fencing token; with it KEYS[2] is the leader monitor's lease ("member|fence") and
--       the write happens only while that token leads (a deposed monitor's late write is refused).
-- A move from outside the watched states into them (a rejoin, the end of a maintenance) stamps
-- watched_since from Redis's clock in the same step: HA counts a host's silence from its return, so any
-- monitor, a newly elected leader too, reads the return from the record.
-- Returns false if the host is unknown, else {'ok'|'stale'|'forbidden'|'fenced', previous state}.
if ARGV[7] then
  local cur = redis.call('GET', KEYS[2])
  local sep = cur and string.find(cur, '|', 1, true)
  if not sep or string.sub(cur, sep + 1) ~= ARGV[7] then return {'fenced', ''} end
end
local prev = redis.call('HGET', KEYS[1], 'state')
if not prev then return false end
if prev ~= ARGV[3] then return {'stale', prev} end
if prev ~= ARGV[2] and not string.find(',' .. ARGV[5] .. ',', ',' .. prev .. '>' .. ARGV[2] .. ',', 1, true) then
  return {'forbidden', prev}
end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'state_reason', ARGV[4])
local watched = ',' .. ARGV[6] .. ','
if not string.find(watched, ',' .. prev .. ',', 1, true) and string.find(watched, ',' .. ARGV[2] .. ',', 1, true) then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'watched_since', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
end
return {'ok', prev}
