-- Atomic compare-and-set transition and/or field update of one instance, keeping the indexes right.
-- KEYS[1] instance hash
-- ARGV: prefix, id, new_state ('' = keep), expected_state ('' = any), expected_host ('*' = any, '' = the
--       record has no host, else that host), expected_epoch ('' = any), bump ('1' = a new placement:
--       increment the epoch even if the host stays), allowed_from (csv of states from which new_state may
--       be entered), claiming (csv of states that hold a claim), release_on ('' or a host whose claim for
--       this instance is given back, as part of the same compare-and-set), n_set, n_event, events maxlen,
--       notify ('1' = wake the instance's waiters), set pairs..., event pairs..., del fields...
-- On success the event (if n_event > 0) is appended and the waiters woken in the same step (lib.lua).
-- Returns {status, state, host, epoch, field, value, ...} with status ok | missing | conflict | invalid;
-- on conflict/invalid the record's current state, host and epoch (what the caller's read missed).
local prefix, id, new = ARGV[1], ARGV[2], ARGV[3]
local exp_state, exp_host, exp_epoch, bump = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return {'missing', '', '', ''} end
local old_host = redis.call('HGET', KEYS[1], 'host')
local epoch = redis.call('HGET', KEYS[1], 'epoch') or '0'
if (exp_state ~= '' and cur ~= exp_state)
    or (exp_host ~= '*' and (old_host or '') ~= exp_host)
    or (exp_epoch ~= '' and tonumber(epoch) ~= tonumber(exp_epoch)) then
  return {'conflict', cur, old_host or '', epoch}
end
if new ~= '' and new ~= cur and not set_of(ARGV[8])[cur] then
  return {'invalid', cur, old_host or '', epoch}
end
local n_set, n_ev = tonumber(ARGV[11]), tonumber(ARGV[12])
local ev_first = 15 + 2 * n_set
local del_first = ev_first + 2 * n_ev
if n_set > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 15, 14 + 2 * n_set)) end
if #ARGV >= del_first then redis.call('HDEL', KEYS[1], unpack(ARGV, del_first)) end
if new ~= '' and new ~= cur then
  redis.call('HSET', KEYS[1], 'state', new)
  redis.call('SREM', prefix .. ':idx:state:' .. cur, id)
  redis.call('SADD', prefix .. ':idx:state:' .. new, id)
end
local new_host = redis.call('HGET', KEYS[1], 'host')
if old_host ~= new_host then
  if old_host then redis.call('SREM', prefix .. ':idx:host:' .. old_host, id) end
  if new_host then redis.call('SADD', prefix .. ':idx:host:' .. new_host, id) end
end
-- A new placement (host changed, or the caller says so) gets a new epoch: every decision taken on a
-- read of the previous placement now fails its compare-and-set.
if bump == '1' or old_host ~= new_host then redis.call('HINCRBY', KEYS[1], 'epoch', 1) end
-- Leaving the claiming states gives the capacity back in the same atomic step (no leaked claims).
if new ~= '' and not set_of(ARGV[9])[new] then
  if old_host then release_claim(prefix, old_host, id) end
  if new_host and new_host ~= old_host then release_claim(prefix, new_host, id) end
end
if ARGV[10] ~= '' then release_claim(prefix, ARGV[10], id) end
emit_event(prefix, id, n_ev, ARGV[13], ARGV[14], ev_first)
local out = {'ok', cur, old_host or '', epoch}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all do out[#out + 1] = all[i] end
return out
