-- KEYS[1] instance hash, KEYS[2] idempotency key ('' = none), KEYS[3] (optional) admission gate: the
-- image's circuit-breaker hash (provisioner/breaker.py)
-- ARGV: prefix, id, state, role, host ('' if none), n_event, events maxlen, event pairs..., field, value, ...
-- (the 'requested' event is appended in the same step when the record is created; lib.lua emit_event)
-- Returns {1, id} created, {0, existing id} idempotent hit, {-1, id} id already taken, {-2, state} the
-- gate's breaker is not closed: nothing written (the caller runs the full admission, then calls again
-- without the gate).  An idempotent hit wins over the gate: a job's own VM is never refused.
-- A key maps to a LIVE instance only: a record that ended (gone, failed, lost: the ENDED states of
-- provisioner/state/retention.py) or expired never satisfies it, and the key moves to the new instance.
local prefix, id = ARGV[1], ARGV[2]
local ended = {gone = true, failed = true, lost = true}
if KEYS[2] ~= '' then
  local existing = redis.call('GET', KEYS[2])
  if existing then
    local st = redis.call('HGET', prefix .. ':inst:' .. existing, 'state')
    if st and not ended[st] then return {0, existing} end
  end
end
if KEYS[3] then
  local st = redis.call('HGET', KEYS[3], 'state')
  if st and st ~= 'closed' then return {-2, st} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {-1, id} end
local n_ev = tonumber(ARGV[6])
redis.call('HSET', KEYS[1], unpack(ARGV, 8 + 2 * n_ev))
redis.call('SADD', prefix .. ':insts', id)
redis.call('SADD', prefix .. ':idx:state:' .. ARGV[3], id)
redis.call('SADD', prefix .. ':idx:role:' .. ARGV[4], id)
if ARGV[5] ~= '' then redis.call('SADD', prefix .. ':idx:host:' .. ARGV[5], id) end
if KEYS[2] ~= '' then redis.call('SET', KEYS[2], id) end
emit_event(prefix, id, n_ev, ARGV[7], '0', 8)
return {1, id}
