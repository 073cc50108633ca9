-- extend: renew a live reservation's lease to a new deadline, now + ttl.
-- A lapsed lease cannot be revived: its credits may have been spent since.
-- A hold stays backed: the part of it on buckets that expire before the new
-- deadline moves to buckets that last until then, or the renewal is refused.
--
-- KEYS[1..5]  account, holds, journal, idempotency, reservation record
--             (see reserve.lua)
-- KEYS[6..]   on a path of a tree, each ancestor's account and holds,
--             parent first: the reservation's path (see _scopes.lua); every
--             level holding a part of it renews, or none does
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     new lease length from now, ms
-- ARGV[10]    reservation id
-- ARGV[11]    retention of the record after its deadline, ms
--
-- Returns {0, replayed, new deadline (ms), sequence, amount held};
--   {1, 0, account} when an account of the path is not in Redis (hydrate
--     it, then call again);
--   {17, 0, account, the reservation's path} when the path named is not
--     the reservation's; {18, 0, root}: see debit.lua;
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
local r = redis.call('HMGET', record, 'dl', 'st', 'bp', 'amt', 'sp')
if not r[1] then return {RES_NOT_FOUND, 0} end
if r[2] ~= 'a' then return {RES_CLOSED, 0, CLOSED_STATE[r[2]]} end
local levels, refused = open_path(5)
if refused then return refused end
if path_text(levels) ~= (r[5] or '') then
  return {NOT_IN_SCOPE, 0, ctx.account, r[5] or ''}
end
catch_up_path(levels)
if ctx.now >= tonumber(r[1]) then return {RES_LAPSED, 0, tonumber(r[1])} end

local ttl, retention = tonumber(ARGV[9]), tonumber(ARGV[11])
local deadline = ctx.now + ttl
-- Every level's move is worked out before anything is saved: a refusal at
-- one level changes nothing at any.
local moves = {}
refused = each_level(levels, function(level, i)
  local part = redis.call('HGET', level.acct, 'r.' .. rid)
  if not part or not bucketed() then return nil end
  load_buckets()
  local parts, moving = rehome(rid, tonumber(part), deadline, function(b)
    return b[BEXP] ~= 0 and b[BEXP] < deadline
  end)
  if not parts then return {NO_CREDITS, 0, moving, backing(deadline)} end
  if moving > 0 then moves[i] = parts end
  return nil
end)
if refused then return refused end
each_level(levels, function(level, i)
  if moves[i] then
    redis.call('HSET', level.acct, 'q.' .. rid, parts_text(moves[i]))
    save_balances()
  end
  -- Only where the reservation holds a part or counts against a cap.
  redis.call('ZADD', level.holds, 'XX', deadline, rid)
  return nil
end)
redis.call('HSET', record, 'dl', deadline)
redis.call('PEXPIRE', record, ttl + retention)
local seq = journal('extend', 0, 0, {'r', rid, 'dl', deadline})
return idem_store({OK, 0, deadline, seq, tonumber(r[4])})
