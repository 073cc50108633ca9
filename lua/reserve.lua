-- reserve: hold credits for a stream until a deadline (a lease). The hold
-- counts against the available balance until it is settled, released or its
-- deadline passes; after that it counts for nothing, with no process running.
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- KEYS[5]     reservation record (hash: amt, dl, st, bp, f, sp the path's
--             ancestors; outcome fields once closed), expires a retention
--             period after its deadline
-- KEYS[6..]   on a path of a tree, each ancestor's account and holds,
--             parent first (see _scopes.lua)
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
-- On a path, the hold is spread over the levels as a charge would be (the
-- nearest first) and counts against every level's cap until it closes;
-- each level that holds a part or has a cap keeps r.<rid> (its part),
-- y.<rid> (what its cap counts) and the deadline in its holds.
--
-- Returns {0, replayed, deadline (ms, server clock), sequence, reservation id,
--   limit states (7 values each, see debit.lua)...} (a replay answers with the
--   first call's reservation id);
--   {1, 0, account} when an account of the path is not in Redis (hydrate
--     it, then call again);
--   {2, 0, required, available, root} when credits are short;
--   {3, 0, required, available, root} when chat messages are short;
--   {10, 0, limit name, retry after ms, level} when a rate limit refuses;
--   {16, 0, ...}, {17, 0, ...}, {18, 0, root}: see debit.lua;
--   {6, 0} when the idempotency key was used for another call;
--   {8, 0} when a reservation with this id exists already.

local replay = idem_replay()
if replay then return replay end
local levels, refused = open_path(5)
if refused then return refused end
local limits = catch_up_path(levels, true)

local record, rid = KEYS[5], ARGV[11]
if redis.call('EXISTS', record) == 1 then return {RES_EXISTS, 0} end
local amount, ttl, retention = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[12])
local messages = tonumber(ARGV[14])
local deadline = ctx.now + ttl
local refusal, states, writes = check_path(levels, limits, amount, messages)
if refusal then return refusal end
local root = nil
if #levels > 1 then root = levels[#levels].account end
local parts, held = split_hold(levels, amount, deadline)
if not parts then return {NO_CREDITS, 0, amount, held, root} end
local _, chat = path_funds(levels)
if messages > chat then return {NO_CHAT, 0, messages, chat, root} end

-- Checked: from here on every write is made.
store_path_limits(levels, writes)
local _, paid_m, covered = split_charge(levels, 0, messages)
local bypass = 0
if ctx.bypass then bypass = 1 end
local seq
each_level(levels, function(level, i)
  local part = parts[i]
  local counted = cap_count(0, messages, amount)
  if part > 0 then
    if bucketed() then
      load_buckets()
      redis.call('HSET', level.acct, 'q.' .. rid, parts_text(allocate(part, deadline)))
    else
      level.held = level.held + part
    end
  end
  level.chat = level.chat - paid_m[i]
  if part > 0 or counted then
    redis.call('HSET', level.acct, 'r.' .. rid, part)
    if counted then redis.call('HSET', level.acct, 'y.' .. rid, amount) end
    redis.call('ZADD', level.holds, deadline, rid)
  end
  if i > 1 and part == 0 and paid_m[i] == 0 and not counted and not covered[i] then return nil end
  save_balances()
  -- Alone, the account's entry says the whole amount (held, or covered by
  -- a bypassing plan); on a path each level's says its part.
  if #levels == 1 then part = amount end
  local extra = {'r', rid, 'x', part, 'um', messages}
  if ARGV[13] ~= '' then extra[#extra + 1], extra[#extra + 2] = 'f', ARGV[13] end
  local shadows = shadow_refusals(states)
  if shadows ~= '' then extra[#extra + 1], extra[#extra + 2] = 'sh', shadows end
  local s = journal('reserve', 0, 0 - paid_m[i], with_level_fields(extra, levels, i, counted))
  if i == 1 then seq = s end
  return nil
end)

redis.call('HSET', record, 'amt', amount, 'dl', deadline, 'st', 'a', 'bp', bypass,
  'f', ARGV[13], 'sp', path_text(levels))
redis.call('PEXPIRE', record, ttl + retention)
return idem_store(with_states({OK, 0, deadline, seq, rid}, states))
