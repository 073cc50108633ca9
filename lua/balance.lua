-- balance: read an account's balances. Writes only to drop lapsed holds, so
-- "held" and "available" are exact at the moment of the call.
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- KEYS[5..]   on a path of a tree, each ancestor's account and holds,
--             parent first: the path is checked, the call acts on the
--             account alone (see _scopes.lua)
-- ARGV[1..8]  common arguments (see _prelude.lua)
--
-- Writes also when a refill is due (see _prelude.lua). Rate limits are
-- evaluated for a call of no weight and not stored: a peek.
--
-- Returns {0, 0, credits, chat messages, held, plan, sequence, bypass (0/1),
--          server time in ms, overdraft, buckets, limit states (7 values
--          each, see debit.lua)...}, buckets an array in burn order of
--          {id, remaining, held, priority, category, effective ms, expires ms
--          (0 never), created ms, granted, live 0/1}, the base bucket included;
--   {1, 0, account} when an account of the path is not in Redis (hydrate
--     it, then call again); {17, 0, level, parent}, {18, 0, root}: see
--     debit.lua.

local _, refused = open_path(4)
if refused then return refused end
local limits = catch_up(true)
local _, states = evaluate_limits(limits, 0, 0)
local seq = tonumber(redis.call('HGET', ctx.acct, 's') or '0')
local bypass = 0
if ctx.bypass then bypass = 1 end
return with_states({OK, 0, ctx.credits, ctx.chat, ctx.held, ctx.plan, seq, bypass, ctx.now,
  ctx.overdraft, load_buckets()}, states)
