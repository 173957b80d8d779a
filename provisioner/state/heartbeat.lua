-- A control worker's sweeper says it is alive.  KEYS: none (computed); ARGV: prefix, worker name,
-- liveness_s.  Workers not heard of within liveness_s are dropped; `workers:since` is the time (Redis
-- clock) since which at least one control worker has been alive without a gap.  Returns {now, since}.
local prefix, name, live = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local zk, sk = prefix .. ':workers', prefix .. ':workers:since'
redis.call('ZREMRANGEBYSCORE', zk, '-inf', '(' .. (now - live))
if redis.call('ZCARD', zk) == 0 or redis.call('EXISTS', sk) == 0 then
  redis.call('SET', sk, tostring(now))
end
redis.call('ZADD', zk, now, name)
return {tostring(now), redis.call('GET', sk)}
