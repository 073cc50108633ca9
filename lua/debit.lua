-- debit: spend credits and/or chat messages, all or nothing.
-- Serves spend (credits), spend_chat_message (chat) and chat_turn (both).
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     credits to spend (0..2^53)
-- ARGV[10]    chat messages to spend (0..2^53)
-- ARGV[11]    feature name, '' when the cost was given explicitly
-- ARGV[12]    operation name for the journal: 'spend', 'chat' or 'turn'
--
-- Rate limits of the plan are checked in the same step: a call refused by any
-- limit spends nothing on any other; a refill due is applied first.
--
-- Credits burn the account's buckets in burn order (see _buckets.lua), and
-- may go below zero within the plan's overdraft.
--
-- Returns {0, replayed, credits left, chat messages left, sequence, limit
--   states...}, where UNLIMITED (-2^53) means unlimited (bypassing plan; the usage is
--   journaled all the same) and each limit adds 7 values (name, rate, window
--   s, remaining, reset s, shadow 0/1, would refuse 0/1);
--   {1, 0} when the account is not in Redis (hydrate, then call again);
--   {2, 0, required, available} when credits are short;
--   {3, 0, required, available} when chat messages are short;
--   {6, 0} when the idempotency key was used for another call;
--   {10, 0, limit name, retry after ms} when a rate limit refuses.
-- A refusal changes nothing and is not remembered under the idempotency key.

local replay = idem_replay()
if replay then return replay end
if not load_account() then return {MISSING, 0} end
local limits = catch_up(true)

local cost, messages = tonumber(ARGV[9]), tonumber(ARGV[10])
local refusal, states, writes = evaluate_limits(limits, 1, cost)
if refusal then return refusal end
local extra = {'uc', cost, 'um', messages}
if ARGV[11] ~= '' then
  extra[#extra + 1] = 'f'
  extra[#extra + 1] = ARGV[11]
end
local shadows = shadow_refusals(states)
if shadows ~= '' then
  extra[#extra + 1] = 'sh'
  extra[#extra + 1] = shadows
end

if ctx.bypass then
  store_limits(writes)
  local seq = journal(ARGV[12], 0, 0, extra)
  return idem_store(with_states({OK, 0, UNLIMITED, UNLIMITED, seq}, states))
end

local spendable = available() + ctx.overdraft
if cost > spendable then return {NO_CREDITS, 0, cost, spendable} end
if messages > ctx.chat then return {NO_CHAT, 0, messages, ctx.chat} end

store_limits(writes)
if bucketed() then
  load_buckets()
  burn(cost)
else
  ctx.credits = ctx.credits - cost
end
ctx.chat = ctx.chat - messages
save_balances()
local seq = journal(ARGV[12], -cost, -messages, extra)
return idem_store(with_states({OK, 0, ctx.credits, ctx.chat, seq}, states))
