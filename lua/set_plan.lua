-- set_plan: move an account to another plan (free, paid, demo or a custom one).
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- KEYS[5..]   on a path of a tree, each ancestor's account and holds,
--             parent first: the path is checked, the call acts on the
--             account alone (see _scopes.lua)
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     the new plan's name
--
-- Returns {0, replayed, sequence, previous plan};
--   {1, 0, account} when an account of the path is not in Redis (hydrate
--     it, then call again); {17, 0, level, parent}, {18, 0, root}: see
--     debit.lua;
--   {6, 0} when the idempotency key was used for another call.

local replay = idem_replay()
if replay then return replay end
local _, refused = open_path(4)
if refused then return refused end
catch_up()

local previous = ctx.plan
ctx.plan = ARGV[9]
redis.call('HSET', ctx.acct, 'p', ctx.plan)
local seq = journal('plan', 0, 0)
return idem_store({OK, 0, seq, previous})
