-- Shared helpers, prepended to every dynvm script (scripts cannot call each other).
-- Keys are built from ARGV[1] (the prefix) exactly as provisioner/state/keys.py builds them; ids were
-- validated in Python before they got here.  Single Redis (Sentinel), not Cluster: scripts touch keys
-- they compute.

local function split2(s)
  local comma = string.find(s, ',', 1, true)
  return tonumber(string.sub(s, 1, comma - 1)), tonumber(string.sub(s, comma + 1))
end

-- Give back the claim of instance `id` on `host`; returns 1 if there was one.
local function release_claim(prefix, host, id)
  local ck = prefix .. ':claims:' .. host
  local c = redis.call('HGET', ck, id)
  if not c then return 0 end
  local v, m = split2(c)
  redis.call('HDEL', ck, id)
  local hk = prefix .. ':host:' .. host
  if redis.call('EXISTS', hk) == 1 then
    redis.call('HINCRBY', hk, 'used_vcpus', -v)
    redis.call('HINCRBY', hk, 'used_memory_mib', -m)
  end
  return 1
end

local function set_of(csv)
  local t = {}
  for item in string.gmatch(csv, '[^,]+') do t[item] = true end
  return t
end
