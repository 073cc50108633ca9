-- extend: renew a live reservation's lease to a new deadline, now + ttl.
-- A lapsed lease cannot be revived: its credits may have been spent since.
-- A hold stays backed: the part of it on buckets that expire before the new
-- deadline moves to buckets that last until then, or the renewal is refused.
--
-- KEYS[1..5]  account, holds, journal, idempotency, reservation record
--             (see reserve.lua)
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     new lease length from now, ms
-- ARGV[10]    reservation id
-- ARGV[11]    retention of the record after its deadline, ms
--
-- Returns {0, replayed, new deadline (ms), sequence, amount held};
--   {1, 0} when the account is not in Redis (hydrate, then call again);
--   {2, 0, required, available} when the credits that live until the new
--     deadline cannot back the hold (nothing changes: the lease keeps its
--     deadline);
--   {4, 0} when there is no such reservation;
--   {5, 0, deadline} when the lease has lapsed;
--   {6, 0} when the idempotency key was used for another call;
--   {9, 0, outcome} when the reservation is already settled or released.

local CLOSED_STATE = {s = 1, x = 2, l = 3}

local replay = idem_replay()
if replay then return replay end
local record, rid = KEYS[5], ARGV[10]
local r = redis.call('HMGET', record, 'dl', 'st', 'bp', 'amt')
if not r[1] then return {RES_NOT_FOUND, 0} end
if r[2] ~= 'a' then return {RES_CLOSED, 0, CLOSED_STATE[r[2]]} end
if not load_account() then return {MISSING, 0} end
catch_up()
if ctx.now >= tonumber(r[1]) then return {RES_LAPSED, 0, tonumber(r[1])} end

local ttl, retention = tonumber(ARGV[9]), tonumber(ARGV[11])
local deadline = ctx.now + ttl
if r[3] ~= '1' and bucketed() then
  load_buckets()
  local parts, moving = rehome(rid, tonumber(r[4]), deadline, function(b)
    return b[BEXP] ~= 0 and b[BEXP] < deadline
  end)
  -- Nothing is saved before this point: a refusal changes nothing.
  if not parts then return {NO_CREDITS, 0, moving, backing(deadline)} end
  if moving > 0 then
    redis.call('HSET', ctx.acct, 'q.' .. rid, parts_text(parts))
    save_balances()
  end
end
if r[3] ~= '1' then redis.call('ZADD', ctx.holds, deadline, rid) end
redis.call('HSET', record, 'dl', deadline)
redis.call('PEXPIRE', record, ttl + retention)
local seq = journal('extend', 0, 0, {'r', rid, 'dl', deadline})
return idem_store({OK, 0, deadline, seq, tonumber(r[4])})
