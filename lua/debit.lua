-- debit: spend credits and/or chat messages, all or nothing.
-- Serves spend (credits), spend_chat_message (chat) and chat_turn (both).
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- KEYS[5..]   on a path of a tree, each ancestor's account and holds,
--             parent first (see _scopes.lua)
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
-- may go below zero within the plan's overdraft. On a path, every level's
-- limits and cap are checked and the levels pay nearest first (_scopes.lua).
--
-- Returns {0, replayed, credits left, chat messages left, sequence, limit
--   states...}, where UNLIMITED (-2^53) means unlimited (bypassing plan; the usage is
--   journaled all the same) and each limit adds 7 values (name, rate, window
--   s, remaining, reset s, shadow 0/1, would refuse 0/1);
--   {1, 0, account} when an account of the path is not in Redis (hydrate
--     it, then call again);
--   {2, 0, required, available, root} when credits are short (the root
--     only on a path: what all its levels can pay);
--   {3, 0, required, available, root} when chat messages are short;
--   {6, 0} when the idempotency key was used for another call;
--   {10, 0, limit name, retry after ms, level} when a rate limit refuses
--     (the level only on a path);
--   {16, 0, level, 'credits' or 'messages', cap, used, ms to the next
--     window} when a level's cap refuses;
--   {17, 0, level, its stored parent} when the path is not the stored tree;
--   {18, 0, root} when the account is in a tree and was named without its
--     path.
-- A refusal changes nothing and is not remembered under the idempotency key.

local replay = idem_replay()
if replay then return replay end
local levels, refused = open_path(4)
if refused then return refused end
local limits = catch_up_path(levels, true)

local cost, messages = tonumber(ARGV[9]), tonumber(ARGV[10])
local refusal, states, writes = check_path(levels, limits, cost, messages)
if refusal then return refusal end
local credits, chat = path_funds(levels)
local root = nil
if #levels > 1 then root = levels[#levels].account end
if cost > credits then return {NO_CREDITS, 0, cost, credits, root} end
if messages > chat then return {NO_CHAT, 0, messages, chat, root} end

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

store_path_limits(levels, writes)
local paid_c, paid_m, covered = split_charge(levels, cost, messages)
local seq = charge_path(levels, ARGV[12], cost, messages, extra, paid_c, paid_m, covered)
return idem_store(with_states({OK, 0, remaining_credits(), remaining_chat(), seq}, states))
