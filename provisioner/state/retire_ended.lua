-- Move just-ended instances out of the hot indexes (run by the control workers' sweeper, so that
-- update_instance.lua stays one step): every record in idx:state:{gone,failed,lost} leaves insts,
-- idx:state:*, idx:role:*, idx:host:*, enters the cold zset `ended` (score = when it was retired, Redis
-- clock) and gets one compact entry in the capped `history` stream.  A lost SERVICE record is not over
-- (HA recovers it: lost -> requested) and stays hot.
-- ARGV: prefix, history_max, batch.  Returns the number of records retired.
local prefix, hmax, batch = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local done = 0
for _, st in ipairs({'gone', 'failed', 'lost'}) do
  local idx = prefix .. ':idx:state:' .. st
  for _, id in ipairs(redis.call('SRANDMEMBER', idx, batch)) do
    local k = prefix .. ':inst:' .. id
    local f = redis.call('HMGET', k, 'state', 'role', 'host', 'image', 'vo', 'owner', 'created',
                         'updated', 'reason', 'vcpus', 'memory_mib', 'idempotency_key')
    if not f[1] or f[1] ~= st then
      redis.call('SREM', idx, id)  -- deleted, or a stale membership: nothing to retire
      if not f[1] then redis.call('SREM', prefix .. ':insts', id) end
    elseif not (st == 'lost' and f[2] == 'service') then
      redis.call('SREM', idx, id)
      redis.call('SREM', prefix .. ':insts', id)
      if f[2] then redis.call('SREM', prefix .. ':idx:role:' .. f[2], id) end
      if f[3] then redis.call('SREM', prefix .. ':idx:host:' .. f[3], id) end
      redis.call('ZADD', prefix .. ':ended', now, id)
      redis.call('XADD', prefix .. ':history', 'MAXLEN', '~', hmax, '*',
        'id', id, 'state', st, 'role', f[2] or '', 'host', f[3] or '', 'image', f[4] or '',
        'vo', f[5] or '', 'owner', f[6] or '', 'created', f[7] or '', 'ended', f[8] or '',
        'reason', f[9] or '', 'vcpus', f[10] or '', 'memory_mib', f[11] or '', 'key', f[12] or '')
      done = done + 1
    end
  end
end
return done
