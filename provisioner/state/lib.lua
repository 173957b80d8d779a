-- Shared helpers, prepended to every dynvm script (scripts cannot call each other).
-- Keys are built from ARGV[1] (the prefix) exactly as provisioner/state/keys.py builds them; ids were
-- validated in Python before they got here.  Single Redis (Sentinel), not Cluster: scripts touch keys
-- they compute.
--
-- A claim is prefix:claims:HOST field ID = "vcpus,memory_mib,vo,group" (vo/group empty when none; claims
-- written before policy was kept have only "vcpus,memory_mib").  Next to the claims, and changed only
-- together with them (here and in claim.lua):
--   prefix:host:HOST        used_vcpus / used_memory_mib = sum of the host's claims
--   prefix:vomembers:VO     ID -> "vcpus,refs": instances of the VO holding at least one claim (a migrating
--                           VM holds two, refs=2, and still counts once); HLEN = the VO's instance count
--   prefix:vovcpus          VO -> sum of its members' vcpus
--   prefix:aa:HOST          GROUP -> comma list of the group's instances holding a claim on the host

local function split2(s)
  local comma = string.find(s, ',', 1, true)
  return tonumber(string.sub(s, 1, comma - 1)), tonumber(string.sub(s, comma + 1))
end

local function set_of(csv)
  local t = {}
  for item in string.gmatch(csv, '[^,]+') do t[item] = true end
  return t
end

-- "v,m[,vo,group]" -> v, m, vo, group ('' when absent)
local function parse_claim(s)
  local f = {}
  for item in string.gmatch(s .. ',', '([^,]*),') do f[#f + 1] = item end
  return tonumber(f[1]), tonumber(f[2]), f[3] or '', f[4] or ''
end

local function vo_join(prefix, vo, id, v)
  local mk = prefix .. ':vomembers:' .. vo
  local cur = redis.call('HGET', mk, id)
  if cur then
    local cv, refs = split2(cur)
    redis.call('HSET', mk, id, cv .. ',' .. (refs + 1))
    return
  end
  redis.call('HSET', mk, id, v .. ',1')
  redis.call('HINCRBY', prefix .. ':vovcpus', vo, v)
end

local function vo_leave(prefix, vo, id)
  local mk = prefix .. ':vomembers:' .. vo
  local cur = redis.call('HGET', mk, id)
  if not cur then return end
  local cv, refs = split2(cur)
  if refs > 1 then
    redis.call('HSET', mk, id, cv .. ',' .. (refs - 1))
    return
  end
  redis.call('HDEL', mk, id)
  redis.call('HINCRBY', prefix .. ':vovcpus', vo, -cv)
end

local function aa_join(prefix, host, group, id)
  local k = prefix .. ':aa:' .. host
  local cur = redis.call('HGET', k, group)
  if not cur or cur == '' then redis.call('HSET', k, group, id); return end
  if set_of(cur)[id] then return end
  redis.call('HSET', k, group, cur .. ',' .. id)
end

local function aa_leave(prefix, host, group, id)
  local k = prefix .. ':aa:' .. host
  local cur = redis.call('HGET', k, group)
  if not cur then return end
  local keep = {}
  for item in string.gmatch(cur, '[^,]+') do if item ~= id then keep[#keep + 1] = item end end
  if #keep == 0 then redis.call('HDEL', k, group) else redis.call('HSET', k, group, table.concat(keep, ',')) end
end

-- Give back the claim of instance `id` on `host` with its VO and anti-affinity membership; returns 1 if
-- there was one.  Every path that ends a claim (release, transition, delete, claim batch) comes here.
local function release_claim(prefix, host, id)
  local ck = prefix .. ':claims:' .. host
  local c = redis.call('HGET', ck, id)
  if not c then return 0 end
  local v, m, vo, group = parse_claim(c)
  redis.call('HDEL', ck, id)
  local hk = prefix .. ':host:' .. host
  if redis.call('EXISTS', hk) == 1 then
    redis.call('HINCRBY', hk, 'used_vcpus', -v)
    redis.call('HINCRBY', hk, 'used_memory_mib', -m)
  end
  if vo ~= '' then vo_leave(prefix, vo, id) end
  if group ~= '' then aa_leave(prefix, host, group, id) end
  return 1
end

-- Record a claim (the caller released any earlier claim of `id` on `host` first).
local function add_claim(prefix, host, id, v, m, vo, group)
  redis.call('HSET', prefix .. ':claims:' .. host, id, v .. ',' .. m .. ',' .. vo .. ',' .. group)
  redis.call('HINCRBY', prefix .. ':host:' .. host, 'used_vcpus', v)
  redis.call('HINCRBY', prefix .. ':host:' .. host, 'used_memory_mib', m)
  if vo ~= '' then vo_join(prefix, vo, id, v) end
  if group ~= '' then aa_join(prefix, host, group, id) end
end

-- Append an event (n field/value pairs at ARGV[first ..]) to the event stream, capped near maxlen, and
-- when notify == '1' wake the instance's waiters: what EventsMixin.add_event(notify=True) does from
-- Python, here in the same atomic step as the state change it reports (no round trip of its own, and
-- never an event for a change that was refused).
local function emit_event(prefix, id, n, maxlen, notify, first)
  if n > 0 then
    redis.call('XADD', prefix .. ':events', 'MAXLEN', '~', maxlen, '*', unpack(ARGV, first, first + 2 * n - 1))
  end
  if notify == '1' then
    local k = prefix .. ':notify:' .. id
    redis.call('LPUSH', k, '1')
    redis.call('LTRIM', k, 0, 0)
    redis.call('PEXPIRE', k, 60000)
  end
end

-- A live agent of a registered host was just heard from: stamp last_seen from Redis's clock (never the
-- agent's).  Lease acquisition and handover call it too, so a restarted agent's host is judged on the
-- moment its new agent took the lease, not on its predecessor's last renewal (issue 7/10).
local function stamp_seen(host_key)
  if redis.call('EXISTS', host_key) == 0 then return end
  local t = redis.call('TIME')
  redis.call('HSET', host_key, 'last_seen', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
end
