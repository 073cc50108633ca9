-- Shared helpers, prepended to every script of this folder when it is loaded
-- (Redis cannot include one script from another). Not a script by itself.
--
-- Conventions shared by every script:
--   KEYS[1] account hash      fields c (credits), m (chat messages), h (sum of
--                             active holds), p (plan), s (last sequence number),
--                             and r.<reservation id> = amount of each active hold
--   KEYS[2] holds sorted set  member = reservation id, score = deadline (ms)
--   KEYS[3] journal stream    of the account's partition
--   KEYS[4] idempotency key   string: fingerprint, newline, msgpack'd first reply
--   ARGV[1] account id        (written into journal entries)
--   ARGV[2] clock offset, ms  0 in production; tests move time with it
--   ARGV[3] idempotency key   '' when the call has none
--   ARGV[4] fingerprint       operation and arguments, to refuse a key reused
--                             for something else
--   ARGV[5] idempotency window, ms
--   ARGV[6] bypassing plans   '|paid|demo|': plans whose spends are unlimited
--
-- Every reply is an array {status, replayed, ...}; status 0 is success.
-- Numbers never pass through tostring() (it keeps only 14 digits); amounts stay
-- below 2^53 so Lua doubles hold them exactly.

local OK, MISSING, NO_CREDITS, NO_CHAT = 0, 1, 2, 3
local RES_NOT_FOUND, RES_LAPSED, IDEM_CONFLICT, OVERFLOW = 4, 5, 6, 7
local RES_EXISTS, RES_CLOSED = 8, 9
local MAX_AMOUNT = 9007199254740992

local ctx = {
  acct = KEYS[1], holds = KEYS[2], journal = KEYS[3], idem = KEYS[4],
  account = ARGV[1], idem_key = ARGV[3], fingerprint = ARGV[4],
  idem_window = tonumber(ARGV[5]), bypass_plans = ARGV[6],
}

do
  -- The server's clock is the only clock: deadlines, windows and refills all use it.
  local t = redis.call('TIME')
  ctx.now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
end

-- A reply stored under the idempotency key is returned as is, flagged as a replay.
local function idem_replay()
  if ctx.idem_key == '' then return nil end
  local stored = redis.call('GET', ctx.idem)
  if not stored then return nil end
  local sep = string.find(stored, '\n', 1, true)
  if string.sub(stored, 1, sep - 1) ~= ctx.fingerprint then
    return {IDEM_CONFLICT, 0}
  end
  local reply = cmsgpack.unpack(string.sub(stored, sep + 1))
  reply[2] = 1
  return reply
end

local function idem_store(reply)
  if ctx.idem_key ~= '' then
    redis.call('SET', ctx.idem, ctx.fingerprint .. '\n' .. cmsgpack.pack(reply),
      'PX', ctx.idem_window)
  end
  return reply
end

-- Loads the balances into ctx; false when the account is not in Redis yet and
-- must be hydrated by the caller first.
local function load_account()
  local v = redis.call('HMGET', ctx.acct, 'c', 'm', 'h', 'p')
  if not v[1] then return false end
  ctx.credits, ctx.chat, ctx.held, ctx.plan =
    tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), v[4]
  ctx.bypass = string.find(ctx.bypass_plans, '|' .. ctx.plan .. '|', 1, true) ~= nil
  return true
end

local function save_balances()
  redis.call('HSET', ctx.acct, 'c', ctx.credits, 'm', ctx.chat, 'h', ctx.held)
end

-- Appends one journal entry. Field names are documented in docs/journal.md;
-- 'extra' is a flat list of further field/value pairs.
local function journal(op, credit_delta, chat_delta, extra)
  local seq = redis.call('HINCRBY', ctx.acct, 's', 1)
  local entry = {'XADD', ctx.journal, '*',
    'a', ctx.account, 'op', op, 's', seq, 't', ctx.now,
    'dc', credit_delta, 'dm', chat_delta, 'c', ctx.credits, 'm', ctx.chat, 'p', ctx.plan}
  if ctx.idem_key ~= '' then
    entry[#entry + 1] = 'k'
    entry[#entry + 1] = ctx.idem_key
  end
  if extra then
    for i = 1, #extra do entry[#entry + 1] = extra[i] end
  end
  redis.call(unpack(entry))
  return seq
end

-- A hold counts until its deadline and for nothing from the deadline on. Lapsed
-- holds are dropped here, by whichever script touches the account next, so the
-- available balance is exact without any sweeper running.
local function prune_lapsed_holds()
  -- Holds are never of zero, so no held credits means no holds to look at.
  if ctx.held == 0 then return end
  local lapsed = redis.call('ZRANGEBYSCORE', ctx.holds, '-inf', ctx.now)
  if #lapsed == 0 then return end
  for _, rid in ipairs(lapsed) do
    local field = 'r.' .. rid
    local amount = tonumber(redis.call('HGET', ctx.acct, field) or '0')
    redis.call('HDEL', ctx.acct, field)
    ctx.held = ctx.held - amount
    redis.call('ZREM', ctx.holds, rid)
    journal('lapse', 0, 0, {'r', rid, 'x', amount})
  end
  save_balances()
end

local function available()
  return ctx.credits - ctx.held
end

-- Remaining balances as replied: -1 stands for unlimited (a bypassing plan).
local function remaining_credits()
  if ctx.bypass then return -1 end
  return ctx.credits
end

local function remaining_chat()
  if ctx.bypass then return -1 end
  return ctx.chat
end

