-- Remove an instance record (ghost cleanup) with its indexes, idempotency key and claim.
-- KEYS[1] instance hash; ARGV: prefix, id.  Returns 1 if it existed.
local prefix, id = ARGV[1], ARGV[2]
local f = redis.call('HMGET', KEYS[1], 'state', 'role', 'host', 'idempotency_key')
if not f[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', prefix .. ':insts', id)
redis.call('ZREM', prefix .. ':ended', id)  -- a retired record (provisioner/state/retention.py)
redis.call('SREM', prefix .. ':idx:state:' .. f[1], id)
if f[2] then redis.call('SREM', prefix .. ':idx:role:' .. f[2], id) end
if f[3] then
  redis.call('SREM', prefix .. ':idx:host:' .. f[3], id)
  release_claim(prefix, f[3], id)
end
if f[4] then
  local ik = prefix .. ':idem:' .. f[4]
  if redis.call('GET', ik) == id then redis.call('DEL', ik) end
end
return 1
