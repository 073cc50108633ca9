-- set_plan: move an account to another plan (free, paid, demo or a custom one).
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     the new plan's name
--
-- Returns {0, replayed, sequence, previous plan};
--   {1, 0} when the account is not in Redis (hydrate, then call again);
--   {6, 0} when the idempotency key was used for another call.

local replay = idem_replay()
if replay then return replay end
if not load_account() then return {MISSING, 0} end
catch_up()

local previous = ctx.plan
ctx.plan = ARGV[9]
redis.call('HSET', ctx.acct, 'p', ctx.plan)
local seq = journal('plan', 0, 0)
return idem_store({OK, 0, seq, previous})
