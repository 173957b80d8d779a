-- Capacity claims, all-or-nothing: optional releases first, then claims, checked against
-- floor(capacity * overcommit) on hosts that are up.  Nothing is written unless every claim fits.
-- ARGV: prefix, cpu_overcommit, mem_overcommit, n_release, (host, id) * n_release,
--       (host, id, vcpus, memory_mib) * n_claims
-- Returns one code per claim: 'ok' | 'missing' | 'state:<state>' | 'capacity' , prefixed by
-- 'committed' or 'rejected'.
local prefix = ARGV[1]
local cpu_oc, mem_oc = tonumber(ARGV[2]), tonumber(ARGV[3])
local n_rel = tonumber(ARGV[4])
local hosts = {}
local function host(name)
  local h = hosts[name]
  if h == nil then
    local f = redis.call('HMGET', prefix .. ':host:' .. name, 'state', 'cap_vcpus', 'cap_memory_mib',
                         'used_vcpus', 'used_memory_mib')
    if not f[1] then h = false else
      h = {state = f[1], cap_v = math.floor(tonumber(f[2]) * cpu_oc),
           cap_m = math.floor(tonumber(f[3]) * mem_oc),
           used_v = tonumber(f[4] or '0'), used_m = tonumber(f[5] or '0'), held = {}}
    end
    hosts[name] = h
  end
  return h
end
local function held(h, name, id)
  if h.held[id] == nil then
    local c = redis.call('HGET', prefix .. ':claims:' .. name, id)
    if c then local v, m = split2(c); h.held[id] = {v, m} else h.held[id] = false end
  end
  return h.held[id]
end
local i = 5
for _ = 1, n_rel do
  local name, id = ARGV[i], ARGV[i + 1]
  local h = host(name)
  if h then
    local c = held(h, name, id)
    if c then h.used_v = h.used_v - c[1]; h.used_m = h.used_m - c[2]; h.held[id] = false end
  end
  i = i + 2
end
local codes, all_ok, claims = {}, true, {}
while i <= #ARGV do
  local name, id, v, m = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local h, code = host(name), 'ok'
  if not h then code = 'missing'
  elseif h.state ~= 'up' then code = 'state:' .. h.state
  else
    local c = held(h, name, id)
    local dv, dm = v, m
    if c then dv, dm = v - c[1], m - c[2] end  -- a repeated claim only counts its difference
    if h.used_v + dv > h.cap_v or h.used_m + dm > h.cap_m then code = 'capacity'
    else h.used_v = h.used_v + dv; h.used_m = h.used_m + dm; h.held[id] = {v, m} end
  end
  if code ~= 'ok' then all_ok = false end
  codes[#codes + 1] = code
  claims[#claims + 1] = {name, id, v, m}
  i = i + 4
end
if not all_ok then table.insert(codes, 1, 'rejected'); return codes end
i = 5
for _ = 1, n_rel do release_claim(prefix, ARGV[i], ARGV[i + 1]); i = i + 2 end
for _, c in ipairs(claims) do
  local ck = prefix .. ':claims:' .. c[1]
  local old = redis.call('HGET', ck, c[2])
  local ov, om = 0, 0
  if old then ov, om = split2(old) end
  redis.call('HSET', ck, c[2], c[3] .. ',' .. c[4])
  redis.call('HINCRBY', prefix .. ':host:' .. c[1], 'used_vcpus', c[3] - ov)
  redis.call('HINCRBY', prefix .. ':host:' .. c[1], 'used_memory_mib', c[4] - om)
end
table.insert(codes, 1, 'committed')
return codes
