-- debit: spend credits and/or chat messages, all or nothing.
-- Serves spend (credits), spend_chat_message (chat) and chat_turn (both).
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- ARGV[1..6]  common arguments (see _prelude.lua)
-- ARGV[7]     credits to spend (0..2^53)
-- ARGV[8]     chat messages to spend (0..2^53)
-- ARGV[9]     feature name, '' when the cost was given explicitly
-- ARGV[10]    operation name for the journal: 'spend', 'chat' or 'turn'
--
-- Returns {0, replayed, credits left, chat messages left, sequence}, where -1
--   means unlimited (bypassing plan; the usage is journaled all the same);
--   {1, 0} when the account is not in Redis (hydrate, then call again);
--   {2, 0, required, available} when credits are short;
--   {3, 0, required, available} when chat messages are short;
--   {6, 0} when the idempotency key was used for another call.
-- A refusal changes nothing and is not remembered under the idempotency key.

local replay = idem_replay()
if replay then return replay end
if not load_account() then return {MISSING, 0} end
prune_lapsed_holds()

local cost, messages = tonumber(ARGV[7]), tonumber(ARGV[8])
local extra = {'uc', cost, 'um', messages}
if ARGV[9] ~= '' then
  extra[#extra + 1] = 'f'
  extra[#extra + 1] = ARGV[9]
end

if ctx.bypass then
  local seq = journal(ARGV[10], 0, 0, extra)
  return idem_store({OK, 0, -1, -1, seq})
end

if cost > available() then return {NO_CREDITS, 0, cost, available()} end
if messages > ctx.chat then return {NO_CHAT, 0, messages, ctx.chat} end

ctx.credits = ctx.credits - cost
ctx.chat = ctx.chat - messages
save_balances()
local seq = journal(ARGV[10], -cost, -messages, extra)
return idem_store({OK, 0, ctx.credits, ctx.chat, seq})
