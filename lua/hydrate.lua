-- hydrate: insert an account loaded from the system of record (or created with
-- the configured defaults) only if Redis does not have it yet, so two callers
-- racing to load the same account cannot overwrite each other's updates.
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     credits
-- ARGV[10]    chat messages
-- ARGV[11]    plan
-- ARGV[12]    last sequence number applied in the system of record
-- ARGV[13]    1 to journal the opening balances (op 'open', with the buckets
--             of ARGV[14] as field bs): for an account new to the system of
--             record, or one it holds but never received a journal entry for
--             (a legacy row), so its ledger sums to its balance
-- ARGV[14]    the account's buckets besides its base bucket, '' for none:
--             ';'-separated 'id,category,priority,remaining,granted,
--             effective ms,expires ms,created ms,live (0/1)'; the base
--             bucket holds the rest of the credits
-- ARGV[15]    the account's parent in its tree, '' for none
-- ARGV[16]    the root of its tree, '' for none (keys carry the root's tag)
-- ARGV[17]    its cap (K, see _scopes.lua), '' for none
-- ARGV[18]    the cap's use, 'window start,credits,messages', '' for none
-- ARGV[19]    the instants (ms) of the last refill of each resource the
--             system of record holds, ';'-separated 'resource,ms' (resource
--             'c' or 'm'), '' for none: the refill period markers (f<resource>,
--             see apply_refills in _buckets.lua), so the next refill comes a
--             period after the last, neither again in its period nor never
-- ARGV[20]    its children (Z, see _scopes.lua), '' when the system of
--             record keeps no count
-- KEYS[5..]   idempotency records of calls the system of record holds (the
--             account's, like KEYS[4]), set only where none exists
-- ARGV[21..]  for each of them: sequence number of the call's entry, ms left
--             in the idempotency window
--
-- Returns {0, 0, inserted (0/1)};
--   {20, 0, account, destination} when the account has moved away from
--     here: its tombstone stays (see move_out.lua).

-- Only the stub a tree's member keeps here (field R) may be there already.
local v = redis.call('HMGET', ctx.acct, 'c', 'M', 'D')
if v[1] then return {OK, 0, 0} end
if v[2] then return {MOVED, 0, ctx.account, v[3] or ''} end
ctx.credits, ctx.chat, ctx.held, ctx.plan = tonumber(ARGV[9]), tonumber(ARGV[10]), 0, ARGV[11]
redis.call('HSET', ctx.acct, 'c', ctx.credits, 'm', ctx.chat, 'h', 0, 'p', ctx.plan,
  's', ARGV[12])
if ARGV[15] ~= '' then redis.call('HSET', ctx.acct, 'P', ARGV[15], 'R', ARGV[16]) end
if ARGV[17] ~= '' then redis.call('HSET', ctx.acct, 'K', ARGV[17]) end
if ARGV[20] ~= '' then redis.call('HSET', ctx.acct, 'Z', ARGV[20]) end
if ARGV[18] ~= '' then
  local use = split(ARGV[18], ',')
  redis.call('HSET', ctx.acct, 'Kw', use[1], 'Kc', use[2], 'Km', use[3])
end
-- A rolling period's marker is the refill's instant; a calendar period's is
-- its start, and a refill's instant falls in its period, at or after it:
-- either way the marker apply_refills compares with.
for _, mark in ipairs(split(ARGV[19], ';')) do
  local f = split(mark, ',')
  redis.call('HSET', ctx.acct, 'f' .. f[1], f[2])
end
if ARGV[13] == '1' then
  -- The system of record has no history of the account: the entry carries
  -- its buckets too (field bs, the format of ARGV[14]), or it never learns them.
  local extra = nil
  if ARGV[14] ~= '' then extra = {'bs', ARGV[14]} end
  journal('open', ctx.credits, ctx.chat, extra)
end
if ARGV[14] ~= '' then
  -- Buckets due (expired, or effective) while Redis lacked the account are
  -- journaled by the next script, like any other.
  load_buckets()
  local base = ctx.bidx[BASE]
  for _, text in ipairs(split(ARGV[14], ';')) do
    local f = split(text, ',')
    local b = {f[1], tonumber(f[4]), 0, tonumber(f[3]), f[2], tonumber(f[6]), tonumber(f[7]),
      tonumber(f[8]), tonumber(f[5]), tonumber(f[9])}
    ctx.bk[#ctx.bk + 1] = b
    if b[BLIVE] == 1 then base[BREM] = base[BREM] - b[BREM] end
  end
  index_buckets()
  sort_buckets()
  save_buckets()
end
-- A record Redis still has (an eviction keeps them) holds the first reply: kept.
for i = 5, #KEYS do
  local at = 21 + (i - 5) * 2
  redis.call('SET', KEYS[i], RELOADED .. '\n' .. cmsgpack.pack({APPLIED_BEFORE, 1, tonumber(ARGV[at])}),
    'PX', ARGV[at + 1], 'NX')
end
return {OK, 0, 1}
