-- Take a host's lease for a starting agent, before it touches anything else.
-- KEYS[1] lease key, KEYS[2] host hash (its last_seen is stamped when the lease is ours); ARGV: prefix,
-- token, ttl_ms.
-- Returns '' when the token now holds the lease (taken, or already ours), else the holder's token.
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  stamp_seen(KEYS[2])
  return ''
end
if cur == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  stamp_seen(KEYS[2])
  return ''
end
return cur
