-- void: take back what is left of a credit bucket (an admin call). Credits
-- already spent from it stay spent; a pending bucket is dropped before it
-- starts. Live holds the bucket backs move to other buckets that last until
-- their deadlines, or the void is refused: a hold is never left unbacked.
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- KEYS[5..]   on a path of a tree, each ancestor's account and holds,
--             parent first: the path is checked, the call acts on the
--             account alone (see _scopes.lua)
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     bucket id
-- ARGV[10]    reason, '' for none (journaled as field 'f')
--
-- Returns {0, replayed, credits taken back, credits, sequence, credits the
--          bucket held for live holds (moved)};
--   {1, 0, account} when an account of the path is not in Redis (hydrate
--     it, then call again); {17, 0, level, parent}, {18, 0, root}: see
--     debit.lua;
--   {2, 0, required, available} when holds the bucket backs cannot move;
--   {6, 0} when the idempotency key was used for another call;
--   {13, 0} when the account has no such bucket (never granted, spent,
--     expired or voided).

local replay = idem_replay()
if replay then return replay end
local _, refused = open_path(4)
if refused then return refused end
catch_up()

local id = ARGV[9]
if not ctx.B then return {GRANT_NOT_FOUND, 0} end
load_buckets()
local b = ctx.bidx[id]
if not b then return {GRANT_NOT_FOUND, 0} end

local moved_total = b[BHELD]
if b[BHELD] > 0 then
  local writes = {}
  local holds = redis.call('ZRANGE', ctx.holds, 0, -1, 'WITHSCORES')
  for i = 1, #holds, 2 do
    local rid, deadline = holds[i], tonumber(holds[i + 1])
    local amount = tonumber(redis.call('HGET', ctx.acct, 'r.' .. rid) or '0')
    local parts, moving = rehome(rid, amount, deadline, function(bucket)
      return bucket[BID] == id
    end, id)
    -- Nothing is saved before this point: a refusal changes nothing.
    if not parts then return {NO_CREDITS, 0, moving, backing(deadline, id)} end
    if moving > 0 then
      writes[#writes + 1] = 'q.' .. rid
      writes[#writes + 1] = parts_text(parts)
    end
  end
  if #writes > 0 then redis.call('HSET', ctx.acct, unpack(writes)) end
end

local taken = b[BREM]
local credit_delta = 0
if b[BLIVE] == 1 then credit_delta = -taken end
bucket_delta(b, -taken)
save_balances()
local extra = {'g', id}
if ARGV[10] ~= '' then extra[#extra + 1], extra[#extra + 2] = 'f', ARGV[10] end
local seq = journal('void', credit_delta, 0, extra)
return idem_store({OK, 0, taken, ctx.credits, seq, moved_total})
