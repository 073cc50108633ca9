-- settle: close a reservation, charging the actual cost ('settle') or nothing
-- ('release'). Closing twice is harmless: the second call changes nothing and
-- gets the first outcome back.
--
-- KEYS[1..5]  account, holds, journal, idempotency, reservation record
--             (see reserve.lua)
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
-- buckets in burn order once the hold's own have been freed.
--
-- Returns {0, replayed, outcome, charged, uncharged, credits after (UNLIMITED
--          when unlimited), sequence} with outcome 1 settled, 2 released,
--          3 settled after its lease lapsed;
--   {1, 0} when the account is not in Redis (hydrate, then call again);
--   {4, 0} when there is no such reservation (or its record has expired);
--   {5, 0, deadline} when the lease lapsed and late charges were not allowed;
--   {6, 0} when the idempotency key was used for another call.

local SETTLED, RELEASED, LATE = 1, 2, 3
local CLOSED_STATE = {s = SETTLED, x = RELEASED, l = LATE}

local replay = idem_replay()
if replay then return replay end
local record, rid = KEYS[5], ARGV[11]
local r = redis.call('HMGET', record, 'amt', 'dl', 'st', 'bp', 'f', 'ch', 'un', 'c', 'q')
if not r[1] then return {RES_NOT_FOUND, 0} end
if r[3] ~= 'a' then
  -- Stored under the key like a first reply: the key is bound to this call from now on.
  local left = tonumber(r[8])
  -- Records closed before UNLIMITED was -2^53 say -1.
  if r[4] == '1' then left = UNLIMITED end
  return idem_store({OK, 1, CLOSED_STATE[r[3]], tonumber(r[6]), tonumber(r[7]),
    left, tonumber(r[9])})
end
if not load_account() then return {MISSING, 0} end

local amount, deadline, bypass = tonumber(r[1]), tonumber(r[2]), r[4] == '1'
local lapsed = ctx.now >= deadline
local release = ARGV[9] == 'release'
if lapsed and not release and ARGV[12] ~= '1' then
  catch_up()
  return {RES_LAPSED, 0, deadline}
end

-- A lapsed hold is dropped (and journaled) by the pruning; a live one here.
catch_up()
if not lapsed and not bypass then
  release_hold(rid, amount)
  redis.call('HDEL', ctx.acct, 'r.' .. rid)
  redis.call('ZREM', ctx.holds, rid)
end

local outcome, state, actual, charged = RELEASED, 'x', 0, 0
if not release then
  actual = tonumber(ARGV[10])
  outcome, state = SETTLED, 's'
  if lapsed then outcome, state = LATE, 'l' end
  if bypass then
    charged = actual
  else
    charged = math.min(actual, math.max(available() + ctx.overdraft, 0))
    if bucketed() then
      load_buckets()
      burn(charged)
    else
      ctx.credits = ctx.credits - charged
    end
  end
end
local uncharged = actual - charged

local credit_delta = -charged
if bypass then credit_delta = 0 end
save_balances()
local extra = {'r', rid, 'x', amount, 'uc', actual}
if r[5] and r[5] ~= '' then
  extra[#extra + 1] = 'f'
  extra[#extra + 1] = r[5]
end
local seq = journal(ARGV[9], credit_delta, 0, extra)

local left = ctx.credits
if bypass then left = UNLIMITED end
redis.call('HSET', record, 'st', state, 'ch', charged, 'un', uncharged, 'c', left, 'q', seq)
redis.call('PEXPIRE', record, tonumber(ARGV[13]))
return idem_store({OK, 0, outcome, charged, uncharged, left, seq})
