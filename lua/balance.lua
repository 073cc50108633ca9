-- balance: read an account's balances. Writes only to drop lapsed holds, so
-- "held" and "available" are exact at the moment of the call.
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- ARGV[1..8]  common arguments (see _prelude.lua)
--
-- Writes also when a refill is due (see _prelude.lua). Rate limits are
-- evaluated for a call of no weight and not stored: a peek.
--
-- Returns {0, 0, credits, chat messages, held, plan, sequence, bypass (0/1),
--          server time in ms, limit states (7 values each, see debit.lua)...};
--   {1, 0} when the account is not in Redis (hydrate, then call again).

if not load_account() then return {MISSING, 0} end
prune_lapsed_holds()
local limits, refills = plan_rules()
apply_refills(refills)
local _, states = evaluate_limits(limits, 0, 0)
local seq = tonumber(redis.call('HGET', ctx.acct, 's') or '0')
local bypass = 0
if ctx.bypass then bypass = 1 end
return with_states({OK, 0, ctx.credits, ctx.chat, ctx.held, ctx.plan, seq, bypass, ctx.now},
  states)
