-- adjust: add (grant) or correct credits and chat messages; the admin path.
-- Goes through the same journal as spends, so a queued write can never land
-- on top of a newer value in PostgreSQL. Credits added go to the base bucket
-- (a grant with bucket attributes is grant.lua's); credits removed burn the
-- buckets in burn order, never what live holds need.
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- KEYS[5..]   on a path of a tree, each ancestor's account and holds,
--             parent first: the path is checked, the call acts on the
--             account alone (see _scopes.lua)
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     credit delta (signed, |delta| <= 2^53)
-- ARGV[10]    chat message delta (signed, |delta| <= 2^53)
-- ARGV[11]    operation name for the journal: 'grant' or 'correct'
-- ARGV[12]    reason, '' for none (journaled as field 'f')
--
-- Returns {0, replayed, credits, chat messages, sequence};
--   {1, 0, account} when an account of the path is not in Redis (hydrate
--     it, then call again); {17, 0, level, parent}, {18, 0, root}: see
--     debit.lua;
--   {2, 0, required, available} when a negative correction would take
--     credits below the active holds, {3, 0, required, available} likewise
--     for chat messages;
--   {7, 0, limit} when a balance would pass 2^53;
--   {6, 0} when the idempotency key was used for another call.

local replay = idem_replay()
if replay then return replay end
local _, refused = open_path(4)
if refused then return refused end
catch_up()

local credit_delta, chat_delta = tonumber(ARGV[9]), tonumber(ARGV[10])
if credit_delta < 0 and -credit_delta > available() then
  return {NO_CREDITS, 0, -credit_delta, available()}
end
if chat_delta < 0 and -chat_delta > ctx.chat then
  return {NO_CHAT, 0, -chat_delta, ctx.chat}
end
if ctx.credits + credit_delta > MAX_AMOUNT or ctx.chat + chat_delta > MAX_AMOUNT then
  return {OVERFLOW, 0, MAX_AMOUNT}
end

if bucketed() and credit_delta < 0 then
  load_buckets()
  burn(-credit_delta)
elseif bucketed() then
  load_buckets()
  bucket_delta(ctx.bidx[BASE], credit_delta)
else
  ctx.credits = ctx.credits + credit_delta
end
ctx.chat = ctx.chat + chat_delta
save_balances()
local extra = nil
if ARGV[12] ~= '' then extra = {'f', ARGV[12]} end
local seq = journal(ARGV[11], credit_delta, chat_delta, extra)
return idem_store({OK, 0, ctx.credits, ctx.chat, seq})
