-- set_cap: set or remove the cap of an account (an admin call): the most
-- that calls through it may charge per window, whichever level pays (see
-- _scopes.lua). The use of the current window is kept.
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- KEYS[5..]   on a path of a tree, each ancestor's account and holds,
--             parent first: the path is checked
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     the cap, 'credits,messages,period' (see K in _scopes.lua);
--             '' to remove it
--
-- Journals 'cap' with the cap in 'K' ('' when removed).
--
-- Returns {0, replayed, sequence};
--   {1, 0, account} when an account of the path is not in Redis (hydrate
--     it, then call again); {17, 0, level, parent}, {18, 0, root}: see
--     debit.lua;
--   {6, 0} when the idempotency key was used for another call.

local replay = idem_replay()
if replay then return replay end
local _, refused = open_path(4)
if refused then return refused end
catch_up()

if ARGV[9] == '' then
  redis.call('HDEL', ctx.acct, 'K', 'Kw', 'Kc', 'Km')
else
  redis.call('HSET', ctx.acct, 'K', ARGV[9])
end
local seq = journal('cap', 0, 0, {'K', ARGV[9]})
return idem_store({OK, 0, seq})
