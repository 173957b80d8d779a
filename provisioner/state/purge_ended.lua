-- Expire ended records retired at or before ARGV[2] (Redis clock): delete the record, its idempotency
-- key (if it still names the record) and its wake-up key.  A record that came back to life meanwhile
-- (failed or lost -> requested / stopping) is put back into the hot indexes instead, as are the ids the
-- caller passes after the batch size (records it found alive again).
-- ARGV: prefix, cutoff ('' = expire nothing), batch, id....  Returns {expired, revived}.
local prefix, cutoff, batch = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ended = {gone = true, failed = true, lost = true}
local zk = prefix .. ':ended'
local expired, revived = 0, 0

local function revive(id, f)
  if redis.call('ZREM', zk, id) == 0 then return end
  redis.call('SADD', prefix .. ':insts', id)
  if f[2] then redis.call('SADD', prefix .. ':idx:role:' .. f[2], id) end
  if f[3] then redis.call('SADD', prefix .. ':idx:host:' .. f[3], id) end
  revived = revived + 1
end

local function fields(id)
  return redis.call('HMGET', prefix .. ':inst:' .. id, 'state', 'role', 'host', 'idempotency_key')
end

for i = 4, #ARGV do
  local f = fields(ARGV[i])
  if f[1] and not ended[f[1]] then revive(ARGV[i], f) end
end
if cutoff ~= '' then
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', zk, '-inf', cutoff, 'LIMIT', 0, batch)) do
    local f = fields(id)
    if f[1] and not ended[f[1]] then
      revive(id, f)
    else
      redis.call('ZREM', zk, id)
      if f[1] then
        redis.call('DEL', prefix .. ':inst:' .. id)
        if f[4] then
          local ik = prefix .. ':idem:' .. f[4]
          if redis.call('GET', ik) == id then redis.call('DEL', ik) end
        end
        redis.call('DEL', prefix .. ':notify:' .. id)
        expired = expired + 1
      end
    end
  end
end
return {expired, revived}
