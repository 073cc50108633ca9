-- grant: add a credit bucket (a grant with a category, a priority, and an
-- effective start and expiry of its own), and chat messages with it.
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- KEYS[5..]   on a path of a tree, each ancestor's account and holds,
--             parent first: the path is checked, the call acts on the
--             account alone (see _scopes.lua)
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     credits (1..2^53)
-- ARGV[10]    chat messages added with them (0..2^53)
-- ARGV[11]    bucket id (made by the client when the caller names none)
-- ARGV[12]    category
-- ARGV[13]    priority (lower burns first)
-- ARGV[14]    effective from, ms (server clock); 0 for now
-- ARGV[15]    expires at, ms; 0 for never (or see ARGV[16])
-- ARGV[16]    expires this many ms after the grant; 0 for never
-- ARGV[17]    reason, '' for none (journaled as field 'f')
--
-- A bucket effective later is pending: its credits join the balance at its
-- effective instant (journaled 'effective' by the next script then).
--
-- Returns {0, replayed, credits, chat messages, sequence, bucket id,
--          effective ms, expires ms (0 never)};
--   {1, 0, account} when an account of the path is not in Redis (hydrate
--     it, then call again); {17, 0, level, parent}, {18, 0, root}: see
--     debit.lua;
--   {6, 0} when the idempotency key was used for another call;
--   {7, 0, limit} when a balance would pass 2^53;
--   {12, 0} when a live bucket has this id;
--   {14, 0, most} when the account has the most grants it may hold;
--   {15, 0, expires ms, server time ms} when the grant would expire before
--     it starts (or now).

local replay = idem_replay()
if replay then return replay end
local _, refused = open_path(4)
if refused then return refused end
catch_up()

local amount, messages, id = tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11]
local effective = tonumber(ARGV[14])
if effective == 0 then effective = ctx.now end
local expires = tonumber(ARGV[15])
if tonumber(ARGV[16]) > 0 then expires = ctx.now + tonumber(ARGV[16]) end
if expires ~= 0 and expires <= math.max(effective, ctx.now) then
  return {GRANT_EXPIRED, 0, expires, ctx.now}
end
load_buckets()
if ctx.bidx[id] then return {GRANT_EXISTS, 0} end
if count_grants() >= grant_max then return {TOO_MANY_GRANTS, 0, grant_max} end
local pending_total = 0
for _, b in ipairs(ctx.bk) do
  if b[BLIVE] == 0 then pending_total = pending_total + b[BREM] end
end
if ctx.credits + pending_total + amount > MAX_AMOUNT or ctx.chat + messages > MAX_AMOUNT then
  return {OVERFLOW, 0, MAX_AMOUNT}
end

local live = 1
if effective > ctx.now then live = 0 end
local b = {id, 0, 0, tonumber(ARGV[13]), ARGV[12], effective, expires, ctx.now, amount, live}
ctx.bk[#ctx.bk + 1] = b
ctx.bidx[id] = b
sort_buckets()
bucket_delta(b, amount)
ctx.chat = ctx.chat + messages
save_balances()
local extra = {}
if ARGV[17] ~= '' then extra = {'f', ARGV[17]} end
local seq = journal('grant', amount * live, messages, bucket_fields(b, extra))
return idem_store({OK, 0, ctx.credits, ctx.chat, seq, id, effective, expires})
