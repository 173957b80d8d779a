-- Capacity claims with placement policy, all-or-nothing: optional releases first, then claims, each checked
-- in one atomic step against
--   the host: known, up, and (require_lease) its agent's lease alive;
--   capacity: used + request <= floor(capacity * overcommit);
--   anti-affinity: no other instance of the claim's group holds a claim on the host;
--   the VO quota: members + 1 <= max_instances and vcpus + request <= max_vcpus (-1 = no limit), unless the
--   instance already counts (a migration's second claim, a repeated claim).
-- Nothing is written unless every claim passes.  Each claim sees the releases and the earlier claims.
-- ARGV: prefix, cpu_overcommit, mem_overcommit, require_lease ('1'|'0'), n_release, (host, id) * n_release,
--       (host, id, vcpus, memory_mib, vo, group, max_instances, max_vcpus) * n_claims
-- Returns one code per claim: 'ok' | 'missing' | 'state:<state>' | 'no_lease' | 'capacity' |
-- 'anti_affinity' | 'quota', prefixed by 'committed' or 'rejected'.
local prefix = ARGV[1]
local cpu_oc, mem_oc = tonumber(ARGV[2]), tonumber(ARGV[3])
local need_lease = ARGV[4] == '1'
local n_rel = tonumber(ARGV[5])
local hosts, groups, vos = {}, {}, {}

local function host(name)
  local h = hosts[name]
  if h == nil then
    local f = redis.call('HMGET', prefix .. ':host:' .. name, 'state', 'cap_vcpus', 'cap_memory_mib',
                         'used_vcpus', 'used_memory_mib')
    if not f[1] then h = false else
      h = {state = f[1], cap_v = math.floor(tonumber(f[2]) * cpu_oc),
           cap_m = math.floor(tonumber(f[3]) * mem_oc),
           used_v = tonumber(f[4] or '0'), used_m = tonumber(f[5] or '0'), held = {},
           leased = redis.call('EXISTS', prefix .. ':lease:host:' .. name) == 1}
    end
    hosts[name] = h
  end
  return h
end

-- The claim `id` holds on the host as {v, m, vo, group}, or false (as changed so far by this batch).
local function held(h, name, id)
  if h.held[id] == nil then
    local c = redis.call('HGET', prefix .. ':claims:' .. name, id)
    if c then local v, m, vo, g = parse_claim(c); h.held[id] = {v, m, vo, g} else h.held[id] = false end
  end
  return h.held[id]
end

-- Members of `group` holding a claim on host `name`: a set, as changed so far by this batch.
local function group_on(name, group)
  local key = name .. '\n' .. group
  if groups[key] == nil then
    groups[key] = set_of(redis.call('HGET', prefix .. ':aa:' .. name, group) or '')
  end
  return groups[key]
end

-- A VO's usage: {n, v, refs = {id -> claims held}} (refs loaded per instance on demand).
local function vo_of(vo)
  if vos[vo] == nil then
    vos[vo] = {n = redis.call('HLEN', prefix .. ':vomembers:' .. vo),
               v = tonumber(redis.call('HGET', prefix .. ':vovcpus', vo) or '0'), refs = {}, size = {}}
  end
  return vos[vo]
end

local function vo_refs(u, vo, id)
  if u.refs[id] == nil then
    local cur = redis.call('HGET', prefix .. ':vomembers:' .. vo, id)
    if cur then local cv, r = split2(cur); u.refs[id] = r; u.size[id] = cv else u.refs[id] = 0 end
  end
  return u.refs[id]
end

-- Forget (in this batch's view) the claim `c` of `id` on host `name`.
local function drop(h, name, id, c)
  h.used_v = h.used_v - c[1]; h.used_m = h.used_m - c[2]; h.held[id] = false
  if c[3] ~= '' then
    local u = vo_of(c[3])
    local r = vo_refs(u, c[3], id)
    if r == 1 then u.n = u.n - 1; u.v = u.v - (u.size[id] or c[1]) end
    if r > 0 then u.refs[id] = r - 1 end
  end
  if c[4] ~= '' then group_on(name, c[4])[id] = nil end
end

local function quota_ok(vo, id, v, max_n, max_v)
  local u = vo_of(vo)
  if vo_refs(u, vo, id) > 0 then return true end  -- already counted
  if max_n >= 0 and u.n + 1 > max_n then return false end
  if max_v >= 0 and u.v + v > max_v then return false end
  return true
end

local function group_ok(name, group, id)
  for member, _ in pairs(group_on(name, group)) do
    if member ~= id then return false end
  end
  return true
end

local i = 6
for _ = 1, n_rel do
  local name, id = ARGV[i], ARGV[i + 1]
  local h = host(name)
  if h then
    local c = held(h, name, id)
    if c then drop(h, name, id, c) end
  end
  i = i + 2
end
local codes, all_ok, claims = {}, true, {}
while i <= #ARGV do
  local name, id, v, m = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local vo, group, max_n, max_v = ARGV[i + 4], ARGV[i + 5], tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7])
  local h, code = host(name), 'ok'
  if not h then code = 'missing'
  elseif h.state ~= 'up' then code = 'state:' .. h.state
  elseif need_lease and not h.leased then code = 'no_lease'
  else
    local c = held(h, name, id)
    local dv, dm = v, m
    if c then dv, dm = v - c[1], m - c[2] end  -- a repeated claim only counts its difference
    if h.used_v + dv > h.cap_v or h.used_m + dm > h.cap_m then code = 'capacity'
    elseif group ~= '' and not group_ok(name, group, id) then code = 'anti_affinity'
    elseif vo ~= '' and not quota_ok(vo, id, v, max_n, max_v) then code = 'quota'
    else
      if c then drop(h, name, id, c) end
      h.used_v = h.used_v + v; h.used_m = h.used_m + m; h.held[id] = {v, m, vo, group}
      if vo ~= '' then
        local u = vo_of(vo)
        local r = vo_refs(u, vo, id)
        if r == 0 then u.n = u.n + 1; u.v = u.v + v; u.size[id] = v end
        u.refs[id] = r + 1
      end
      if group ~= '' then group_on(name, group)[id] = true end
    end
  end
  if code ~= 'ok' then all_ok = false end
  codes[#codes + 1] = code
  claims[#claims + 1] = {name, id, v, m, vo, group}
  i = i + 8
end
if not all_ok then table.insert(codes, 1, 'rejected'); return codes end
i = 6
for _ = 1, n_rel do release_claim(prefix, ARGV[i], ARGV[i + 1]); i = i + 2 end
for _, c in ipairs(claims) do
  release_claim(prefix, c[1], c[2])  -- a repeated claim replaces the earlier one
  add_claim(prefix, c[1], c[2], c[3], c[4], c[5], c[6])
end
table.insert(codes, 1, 'committed')
return codes
