-- ARGV: prefix, host, id.  Returns 1 if a claim was released, 0 if there was none (idempotent).
-- id '' releases every claim on the host (removing a host), keeping the VO and anti-affinity books right.
if ARGV[3] ~= '' then return release_claim(ARGV[1], ARGV[2], ARGV[3]) end
local n = 0
for _, id in ipairs(redis.call('HKEYS', ARGV[1] .. ':claims:' .. ARGV[2])) do
  n = n + release_claim(ARGV[1], ARGV[2], id)
end
return n
