-- settle: close a reservation, charging the actual cost ('settle') or nothing
-- ('release'). Closing twice is harmless: the second call changes nothing and
-- gets the first outcome back.
--
-- KEYS[1..5]  account, holds, journal, idempotency, reservation record
--             (see reserve.lua)
-- KEYS[6..]   on a path of a tree, each ancestor's account and holds,
--             parent first: the reservation's path (see _scopes.lua)
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     'settle' or 'release'
-- ARGV[10]    actual cost (0..2^53; ignored on release)
-- ARGV[11]    reservation id
-- ARGV[12]    1 to charge a lapsed reservation anyway (as far as the available
--             balance goes), 0 to refuse
-- ARGV[13]    retention of the closed record, ms
--
-- A cost above the amount held is charged only as far as the available
-- balance goes, never below zero (below it only within the plan's
-- overdraft); the rest is replied as uncharged. The charge burns the
-- buckets in burn order once the hold's own have been freed. On a path,
-- every level's part and cap hold are freed and the charge is spread as a
-- spend's is, never past a level's cap.
--
-- Returns {0, replayed, outcome, charged, uncharged, credits after (UNLIMITED
--          when unlimited), sequence} with outcome 1 settled, 2 released,
--          3 settled after its lease lapsed;
--   {1, 0, account} when an account of the path is not in Redis (hydrate
--     it, then call again);
--   {17, 0, account, the reservation's path} when the path named is not
--     the reservation's; {18, 0, root}: see debit.lua;
--   {4, 0} when there is no such reservation (or its record has expired);
--   {5, 0, deadline} when the lease lapsed and late charges were not allowed;
--   {6, 0} when the idempotency key was used for another call.

local SETTLED, RELEASED, LATE = 1, 2, 3
local CLOSED_STATE = {s = SETTLED, x = RELEASED, l = LATE}

local replay = idem_replay()
if replay then
  -- A reply stored by a release before overdrafts said -1 for unlimited.
  if replay[1] == OK and replay[6] == -1 and redis.call('HGET', KEYS[5], 'bp') == '1' then
    replay[6] = UNLIMITED
  end
  return replay
end
local record, rid = KEYS[5], ARGV[11]
local r = redis.call('HMGET', record, 'amt', 'dl', 'st', 'bp', 'f', 'ch', 'un', 'c', 'q', 'sp')
if not r[1] then return {RES_NOT_FOUND, 0} end
if r[3] ~= 'a' then
  -- Stored under the key like a first reply: the key is bound to this call from now on.
  local left = tonumber(r[8])
  -- Records closed before UNLIMITED was -2^53 say -1.
  if r[4] == '1' then left = UNLIMITED end
  return idem_store({OK, 1, CLOSED_STATE[r[3]], tonumber(r[6]), tonumber(r[7]),
    left, tonumber(r[9])})
end
local levels, refused = open_path(5)
if refused then return refused end
if path_text(levels) ~= (r[10] or '') then
  return {NOT_IN_SCOPE, 0, ctx.account, r[10] or ''}
end

local amount, deadline, bypass = tonumber(r[1]), tonumber(r[2]), r[4] == '1'
-- The account's plan when the hold was made decides: a plan changed since
-- neither frees a bypassing reservation's cost nor waives a held one's.
ctx.bypass = bypass
local lapsed = ctx.now >= deadline
local release = ARGV[9] == 'release'
if lapsed and not release and ARGV[12] ~= '1' then
  catch_up_path(levels)
  return {RES_LAPSED, 0, deadline}
end

-- A lapsed hold is dropped (and journaled) by the pruning; a live one here.
catch_up_path(levels)
local had = {}
if not lapsed then
  each_level(levels, function(_, i)
    had[i] = drop_level_hold(rid)
    return nil
  end)
end

local outcome, state, actual, charged = RELEASED, 'x', 0, 0
if not release then
  actual = tonumber(ARGV[10])
  outcome, state = SETTLED, 's'
  if lapsed then outcome, state = LATE, 'l' end
  local funds = path_funds(levels)
  charged = math.max(math.min(actual, funds), 0)
  each_level(levels, function()
    charged = math.min(charged, (cap_room()))
    return nil
  end)
end
local uncharged = actual - charged

local extra = {'r', rid, 'x', amount, 'uc', actual}
if r[5] and r[5] ~= '' then
  extra[#extra + 1] = 'f'
  extra[#extra + 1] = r[5]
end
local paid_c, paid_m, covered = split_charge(levels, charged, 0)
for i = 2, #levels do
  -- A level that held a part journals its release even when it pays nothing.
  if had[i] then covered[i] = true end
end
local seq = charge_path(levels, ARGV[9], charged, 0, extra, paid_c, paid_m, covered, true)

local left = remaining_credits()
redis.call('HSET', record, 'st', state, 'ch', charged, 'un', uncharged, 'c', left, 'q', seq)
redis.call('PEXPIRE', record, tonumber(ARGV[13]))
return idem_store({OK, 0, outcome, charged, uncharged, left, seq})
