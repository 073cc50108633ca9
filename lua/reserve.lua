-- reserve: hold credits for a stream until a deadline (a lease). The hold
-- counts against the available balance until it is settled, released or its
-- deadline passes; after that it counts for nothing, with no process running.
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- KEYS[5]     reservation record (hash: amt, dl, st, bp, f; outcome fields
--             once closed), expires a retention period after its deadline
-- ARGV[1..6]  common arguments (see _prelude.lua)
-- ARGV[7]     amount to hold (1..2^53)
-- ARGV[8]     lease length, ms
-- ARGV[9]     reservation id (32 hex characters, made by the client)
-- ARGV[10]    retention of the record after its deadline, ms
-- ARGV[11]    feature name, '' for none
--
-- Returns {0, replayed, deadline (ms, server clock), sequence, reservation id}
--   (a replay answers with the first call's reservation id);
--   {1, 0} when the account is not in Redis (hydrate, then call again);
--   {2, 0, required, available} when credits are short;
--   {6, 0} when the idempotency key was used for another call;
--   {8, 0} when a reservation with this id exists already.

local replay = idem_replay()
if replay then return replay end
if not load_account() then return {MISSING, 0} end
prune_lapsed_holds()

local record, rid = KEYS[5], ARGV[9]
if redis.call('EXISTS', record) == 1 then return {RES_EXISTS, 0} end
local amount, ttl, retention = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[10])
local deadline = ctx.now + ttl

local bypass = 0
if ctx.bypass then
  bypass = 1
elseif amount > available() then
  return {NO_CREDITS, 0, amount, available()}
else
  ctx.held = ctx.held + amount
  redis.call('HSET', ctx.acct, 'h', ctx.held, 'r.' .. rid, amount)
  redis.call('ZADD', ctx.holds, deadline, rid)
end

redis.call('HSET', record, 'amt', amount, 'dl', deadline, 'st', 'a', 'bp', bypass,
  'f', ARGV[11])
redis.call('PEXPIRE', record, ttl + retention)
local seq = journal('reserve', 0, 0, {'r', rid, 'x', amount})
return idem_store({OK, 0, deadline, seq, rid})
