-- rebase: join an account whose history in Redis forked from PostgreSQL's
-- back onto PostgreSQL's, once per fork. Its balances become PostgreSQL's plus
-- the fork's net change (Redis's balances less those the fork left from, less
-- the deltas of fork entries that repeat one of PostgreSQL's side), clamped at
-- what the live holds need (zero without holds); its sequence number becomes
-- PostgreSQL's last, and one 'rebase' entry journals the difference and the
-- buckets as they are (field bs: the fork's changes to them never reached
-- PostgreSQL). A tree's level keeps its place and its cap, and its cap's use
-- becomes the one the syncer worked out as for the balances (ARGV[20]); the
-- entry carries them (fields pa, ro, K, kw, kc, km), so PostgreSQL's row
-- takes what the fork changed. Holds, limits, refill markers and idempotency records stay;
-- those of the calls on PostgreSQL's side are added where none exists. Done
-- only when Redis is at the newest fork entry PostgreSQL holds, so the syncer
-- knows every entry of the fork, and idempotent by the fork's first stream
-- id, kept in the account hash (fields rb, and rbo for the reply).
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua; the
--             fourth is not used)
-- KEYS[5..]   idempotency records of calls on PostgreSQL's side of the fork
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     stream id of the fork's first entry
-- ARGV[10]    sequence number of the newest fork entry PostgreSQL holds
-- ARGV[11]    credits before the fork's first entry
-- ARGV[12]    chat messages before it
-- ARGV[13]    credit delta of fork entries that repeat PostgreSQL's side
-- ARGV[14]    chat-message delta of those entries
-- ARGV[15]    PostgreSQL's credits
-- ARGV[16]    PostgreSQL's chat messages
-- ARGV[17]    PostgreSQL's plan (kept unless the fork changed the plan)
-- ARGV[18]    PostgreSQL's last sequence number
-- ARGV[19]    plan before the fork's first entry ('' if unknown)
-- ARGV[20]    the cap's use after the re-base, 'window start,credits,messages'
--             ('' for none): PostgreSQL's in the window current at the fork's
--             end, plus what the fork counted in it, less its repeated calls
-- ARGV[21..]  for each of KEYS[5..]: sequence number of the call's entry, ms
--             left in the idempotency window
--
-- Returns {0, replayed, 'rebased', sequence number before, sequence number of
--   the rebase entry, net credits, net chat messages, credits added, chat
--   messages added} (added − net was not collected: the clamp);
--   {0, 0, 'behind', sequence number, last stream id} when Redis has fork
--   entries PostgreSQL does not hold yet: nothing changes;
--   {1, 0, last stream id} when the account is not in Redis.

-- Every entry journaled before this call has a stream id up to this one.
local function last_id()
  local newest = redis.call('XREVRANGE', ctx.journal, '+', '-', 'COUNT', 1)
  if #newest == 0 then return '0-0' end
  return newest[1][1]
end

local fork = ARGV[9]
if not load_account() then return {MISSING, 0, last_id()} end
local done = redis.call('HMGET', ctx.acct, 'rb', 'rbo', 's')
if done[1] == fork then
  local reply = cmsgpack.unpack(done[2])
  return {OK, 1, 'rebased', unpack(reply)}
end
local old_seq = tonumber(done[3])
if old_seq ~= tonumber(ARGV[10]) then return {OK, 0, 'behind', old_seq, last_id()} end

-- Not pruned first: a lapse journaled now would be one more fork entry.
local live = 0
if ctx.held > 0 then
  local holds = redis.call('ZRANGEBYSCORE', ctx.holds, string.format('(%d', ctx.now), '+inf')
  for _, rid in ipairs(holds) do
    live = live + tonumber(redis.call('HGET', ctx.acct, 'r.' .. rid) or '0')
  end
end
local pg_credits, pg_chat = tonumber(ARGV[15]), tonumber(ARGV[16])
local net_credits = ctx.credits - tonumber(ARGV[11]) - tonumber(ARGV[13])
local net_chat = ctx.chat - tonumber(ARGV[12]) - tonumber(ARGV[14])
local credits = math.min(math.max(pg_credits + net_credits, live), MAX_AMOUNT)
if bucketed() then
  -- The buckets stay as the fork left them; the base bucket takes the difference.
  load_buckets()
  bucket_delta(ctx.bidx[BASE], credits - ctx.credits)
  save_buckets()
end
ctx.credits = credits
ctx.chat = math.min(math.max(pg_chat + net_chat, 0), MAX_AMOUNT)
if ctx.plan == ARGV[19] then ctx.plan = ARGV[17] end
redis.call('HSET', ctx.acct, 'c', ctx.credits, 'm', ctx.chat, 'p', ctx.plan, 's', ARGV[18])
-- PostgreSQL never saw the fork's changes to the buckets (they were kept
-- apart): the entry carries them as they are now, in hydrate.lua's format
-- ('bs', '' for none besides the base bucket).
local snapshot = {}
for _, b in ipairs(ctx.bk or {}) do
  if b[BID] ~= BASE and b[BREM] ~= 0 then
    snapshot[#snapshot + 1] = table.concat({b[BID], b[BCAT], int(b[BPRIO]), int(b[BREM]),
      int(b[BGRANTED]), int(b[BEFF]), int(b[BEXP]), int(b[BMADE]), int(b[BLIVE])}, ',')
  end
end
local fields = {'f', fork, 'bs', table.concat(snapshot, ';')}
if ctx.R then
  fields[#fields + 1], fields[#fields + 2] = 'pa', ctx.P or ''
  fields[#fields + 1], fields[#fields + 2] = 'ro', ctx.R
end
if ctx.R or ctx.K then
  fields[#fields + 1], fields[#fields + 2] = 'K', ctx.K or ''
end
if ctx.K and ARGV[20] ~= '' then
  local use = split(ARGV[20], ',')
  redis.call('HSET', ctx.acct, 'Kw', use[1], 'Kc', use[2], 'Km', use[3])
  for i, name in ipairs({'kw', 'kc', 'km'}) do
    fields[#fields + 1], fields[#fields + 2] = name, use[i]
  end
end
local seq = journal('rebase', ctx.credits - pg_credits, ctx.chat - pg_chat, fields)
local reply = {old_seq, seq, net_credits, net_chat, ctx.credits - pg_credits, ctx.chat - pg_chat}
redis.call('HSET', ctx.acct, 'rb', fork, 'rbo', cmsgpack.pack(reply))
for i = 5, #KEYS do
  local at = 21 + (i - 5) * 2
  redis.call('SET', KEYS[i], RELOADED .. '\n' .. cmsgpack.pack({APPLIED_BEFORE, 1, tonumber(ARGV[at])}),
    'PX', ARGV[at + 1], 'NX')
end
-- Holds that lapsed meanwhile are journaled on the joined history.
prune_lapsed_holds()
return {OK, 0, 'rebased', unpack(reply)}
