-- reserve: hold credits for a stream until a deadline (a lease). The hold
-- counts against the available balance until it is settled, released or its
-- deadline passes; after that it counts for nothing, with no process running.
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- KEYS[5]     reservation record (hash: amt, dl, st, bp, f; outcome fields
--             once closed), expires a retention period after its deadline
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     amount to hold (1..2^53)
-- ARGV[10]    lease length, ms
-- ARGV[11]    reservation id (32 hex characters, made by the client)
-- ARGV[12]    retention of the record after its deadline, ms
-- ARGV[13]    feature name, '' for none
-- ARGV[14]    chat messages spent with the hold (a streamed chat turn), 0..2^53
--
-- Rate limits of the plan are checked in the same step, the credit-weighted
-- ones with the amount held; a refill due is applied first. Only credits that
-- live until the deadline back the hold (buckets expiring earlier do not),
-- plus the plan's overdraft; which buckets back it is kept in q.<rid>.
--
-- Returns {0, replayed, deadline (ms, server clock), sequence, reservation id,
--   limit states (7 values each, see debit.lua)...} (a replay answers with the
--   first call's reservation id);
--   {1, 0} when the account is not in Redis (hydrate, then call again);
--   {2, 0, required, available} when credits are short;
--   {3, 0, required, available} when chat messages are short;
--   {10, 0, limit name, retry after ms} when a rate limit refuses;
--   {6, 0} when the idempotency key was used for another call;
--   {8, 0} when a reservation with this id exists already.

local replay = idem_replay()
if replay then return replay end
if not load_account() then return {MISSING, 0} end
local limits = catch_up(true)

local record, rid = KEYS[5], ARGV[11]
if redis.call('EXISTS', record) == 1 then return {RES_EXISTS, 0} end
local amount, ttl, retention = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[12])
local messages = tonumber(ARGV[14])
local deadline = ctx.now + ttl
local refusal, states, writes = evaluate_limits(limits, 1, amount)
if refusal then return refusal end

local bypass = 0
if ctx.bypass then
  bypass = 1
else
  if bucketed() then
    load_buckets()
    local parts = allocate(amount, deadline)
    if not parts then return {NO_CREDITS, 0, amount, backing(deadline)} end
    if messages > ctx.chat then return {NO_CHAT, 0, messages, ctx.chat} end
    redis.call('HSET', ctx.acct, 'q.' .. rid, parts_text(parts))
  else
    local spendable = available() + ctx.overdraft
    if amount > spendable then return {NO_CREDITS, 0, amount, spendable} end
    if messages > ctx.chat then return {NO_CHAT, 0, messages, ctx.chat} end
    ctx.held = ctx.held + amount
  end
  ctx.chat = ctx.chat - messages
  save_balances()
  redis.call('HSET', ctx.acct, 'r.' .. rid, amount)
  redis.call('ZADD', ctx.holds, deadline, rid)
end
store_limits(writes)

redis.call('HSET', record, 'amt', amount, 'dl', deadline, 'st', 'a', 'bp', bypass,
  'f', ARGV[13])
redis.call('PEXPIRE', record, ttl + retention)
local extra = {'r', rid, 'x', amount, 'um', messages}
if ARGV[13] ~= '' then
  extra[#extra + 1] = 'f'
  extra[#extra + 1] = ARGV[13]
end
local shadows = shadow_refusals(states)
if shadows ~= '' then
  extra[#extra + 1] = 'sh'
  extra[#extra + 1] = shadows
end
local chat_delta = -messages
if bypass == 1 then chat_delta = 0 end
local seq = journal('reserve', 0, chat_delta, extra)
return idem_store(with_states({OK, 0, deadline, seq, rid}, states))
