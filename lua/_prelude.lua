-- Shared helpers, prepended to every script of this folder when it is loaded
-- (Redis cannot include one script from another). Not a script by itself.
--
-- Conventions shared by every script:
--   KEYS[1] account hash      fields c (credits), m (chat messages), h (sum of
--                             active holds), p (plan), s (last sequence number),
--                             r.<reservation id> = amount of each active hold,
--                             and the credit buckets (fields B, N, O, q.<id>:
--                             see _buckets.lua), a tree member's P, R and
--                             cap K, Kw, Kc, Km, Kh and its children Z
--                             (see _scopes.lua); a moved account's
--                             tombstone has none of these (see move_out.lua)
--   KEYS[2] holds sorted set  member = reservation id, score = deadline (ms)
--   KEYS[3] journal stream    of the account's partition
--   KEYS[4] idempotency key   string: fingerprint, newline, msgpack'd first reply
--                             (fingerprint '*': reloaded by hydrate, reply
--                             {APPLIED_BEFORE, 1, sequence number})
--   ARGV[1] account id        (written into journal entries)
--   ARGV[2] clock offset, ms  0 in production; tests move time with it
--   ARGV[3] idempotency key   '' when the call has none
--   ARGV[4] fingerprint       operation and arguments, to refuse a key reused
--                             for something else
--   ARGV[5] idempotency window, ms
--   ARGV[6] bypassing plans   '|paid|demo|': plans whose spends are unlimited
--   ARGV[7] rules             the grant settings (burn order, categories,
--                             bucket bound, default priority), then the rate
--                             limits, refills and overdraft of every plan that
--                             has any, one line per plan (format in
--                             redcredit/core/plan_rules.py, Rules)
--   ARGV[8] model             for per-model rate limits; '' for none
--
-- Every reply is an array {status, replayed, ...}; status 0 is success.
-- UNLIMITED (-2^53) stands for the balance of a bypassing plan in replies:
-- with an overdraft a real balance may be below zero.
-- Numbers never pass through tostring() (it keeps only 14 digits); amounts stay
-- below 2^53 so Lua doubles hold them exactly.

-- Reply statuses: the same numbers as Status in redcredit/core/replies.py,
-- which a test compares with these lines.
local OK, MISSING, NO_CREDITS, NO_CHAT = 0, 1, 2, 3
local RES_NOT_FOUND, RES_LAPSED, IDEM_CONFLICT, OVERFLOW = 4, 5, 6, 7
local RES_EXISTS, RES_CLOSED, RATE_LIMITED, APPLIED_BEFORE = 8, 9, 10, 11
local GRANT_EXISTS, GRANT_NOT_FOUND, TOO_MANY_GRANTS, GRANT_EXPIRED = 12, 13, 14, 15
local CAP_REACHED, NOT_IN_SCOPE, IN_TREE, HAS_HISTORY = 16, 17, 18, 19
local MOVED, HAS_CHILDREN, HAS_HOLDS, HOLDS_UNKNOWN = 20, 21, 22, 23
local UNCOUNTED, MOVE_BUSY = 24, 25
-- The fingerprint of a record reloaded from the system of record, which keeps
-- only that the key was applied, and at which sequence number.
local RELOADED = '*'
local MAX_AMOUNT = 9007199254740992
local UNLIMITED = -MAX_AMOUNT
-- The fields of one credit bucket, an array (see _buckets.lua).
local BID, BREM, BHELD, BPRIO, BCAT, BEFF, BEXP, BMADE, BGRANTED, BLIVE = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10

local ctx = {
  acct = KEYS[1], holds = KEYS[2], journal = KEYS[3], idem = KEYS[4],
  account = ARGV[1], idem_key = ARGV[3], fingerprint = ARGV[4],
  idem_window = tonumber(ARGV[5]), bypass_plans = ARGV[6],
  rules = ARGV[7], model = ARGV[8],
  -- Buckets changed since the last journal entry, and by how much.
  bchanged = {}, bdelta = {}, bafter = {},
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
  local fingerprint = string.sub(stored, 1, sep - 1)
  if fingerprint ~= ctx.fingerprint and fingerprint ~= RELOADED then
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
  local v = redis.call('HMGET', ctx.acct, 'c', 'm', 'h', 'p', 'B', 'N', 'O', 'P', 'R', 'K', 'Kh')
  -- A tree's member, or the stub it leaves in its own partition, and a cap
  -- with what its live holds may charge (see _scopes.lua).
  ctx.P, ctx.R, ctx.K, ctx.Kh = v[8], v[9], v[10], tonumber(v[11] or '0')
  if not v[1] then return false end
  ctx.credits, ctx.chat, ctx.held, ctx.plan =
    tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), v[4]
  -- Buckets stay packed until a script needs them (load_buckets).
  ctx.B, ctx.N, ctx.O = v[5], tonumber(v[6] or '0'), v[7]
  ctx.bypass = string.find(ctx.bypass_plans, '|' .. ctx.plan .. '|', 1, true) ~= nil
  return true
end

local save_buckets

-- The balances alone, for an entry in the middle of a step that saves its
-- buckets at the end (saving them may put the account back on the plain path).
local function save_totals()
  redis.call('HSET', ctx.acct, 'c', ctx.credits, 'm', ctx.chat, 'h', ctx.held)
end

local function save_balances()
  save_totals()
  if ctx.bk then save_buckets() end
end

local function int(n)
  return string.format('%d', n)
end

-- The buckets changed since the last entry, as the entry's 'bk' field:
-- 'id:delta:remaining after', comma-separated.
local function bucket_changes()
  local parts = {}
  for i, id in ipairs(ctx.bchanged) do
    parts[i] = id .. ':' .. int(ctx.bdelta[id]) .. ':' .. int(ctx.bafter[id])
  end
  ctx.bchanged, ctx.bdelta, ctx.bafter = {}, {}, {}
  return table.concat(parts, ',')
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
  if ctx.bchanged and #ctx.bchanged > 0 then
    entry[#entry + 1] = 'bk'
    entry[#entry + 1] = bucket_changes()
  end
  redis.call(unpack(entry))
  return seq
end

-- Credits free of holds, not counting the plan's overdraft.
local function available()
  return ctx.credits - ctx.held
end

local function remaining_credits()
  if ctx.bypass then return UNLIMITED end
  return ctx.credits
end

local function remaining_chat()
  if ctx.bypass then return UNLIMITED end
  return ctx.chat
end


local function split(text, separator)
  local parts = {}
  for part in string.gmatch(text, '[^' .. separator .. ']+') do parts[#parts + 1] = part end
  return parts
end

-- The rate limits and refills of the account's plan, as two strings, and
-- its overdraft (how far below zero its credits may go); also kept in
-- ctx.overdraft.
local function plan_rules()
  ctx.overdraft = 0
  local start = string.find(ctx.rules, '\n' .. ctx.plan .. '|', 1, true)
  if not start then return '', '', 0 end
  local finish = string.find(ctx.rules, '\n', start + 1, true) or (#ctx.rules + 1)
  local line = string.sub(ctx.rules, start + #ctx.plan + 2, finish - 1)
  local bar = string.find(line, '|', 1, true)
  local bar2 = string.find(line, '|', bar + 1, true)
  ctx.overdraft = tonumber(string.sub(line, bar2 + 1))
  return string.sub(line, 1, bar - 1), string.sub(line, bar + 1, bar2 - 1), ctx.overdraft
end

-- Evaluates every rate limit of the plan for a call of one request weighing
-- 'credit_weight' credits, without writing anything. Each limit is
-- 'name,kind,rate,period_ms,burst,per_model,shadow': kind 'r' counts requests
-- with GCRA (one stored number: the theoretical arrival time), kind 'c' is a
-- token bucket drained by the call's credits (stored as 'tokens:time').
-- Returns a refusal reply or nil, the states for the reply (7 values each),
-- and the field/value pairs to store if the call goes ahead.
local function evaluate_limits(limits, requests, credit_weight)
  local states, writes = {}, {}
  if limits == '' then return nil, states, writes end
  for _, text in ipairs(split(limits, ';')) do
    local f = split(text, ',')
    local name, rate, period, burst = f[1], tonumber(f[3]), tonumber(f[4]), tonumber(f[5])
    local shadow = f[7] == '1'
    local field = 'l.' .. name
    if f[6] == '1' then field = field .. '.' .. ctx.model end
    local allowed, remaining, reset_ms, retry_ms, value
    if f[2] == 'r' then
      local interval = period / rate
      local tat = math.max(tonumber(redis.call('HGET', ctx.acct, field) or '0'), ctx.now)
      local new_tat = tat + interval * requests
      local allow_at = new_tat - interval * burst
      allowed = allow_at <= ctx.now
      if allowed then
        value = new_tat
        remaining = math.floor((ctx.now - allow_at) / interval)
        reset_ms = new_tat - ctx.now
      else
        retry_ms = allow_at - ctx.now
        remaining = 0
        reset_ms = tat - ctx.now
      end
    else
      local per_ms = rate / period
      local tokens, last = burst, ctx.now
      local stored = redis.call('HGET', ctx.acct, field)
      if stored then
        local sep = string.find(stored, ':', 1, true)
        tokens = tonumber(string.sub(stored, 1, sep - 1))
        last = tonumber(string.sub(stored, sep + 1))
      end
      tokens = math.min(burst, tokens + (ctx.now - last) * per_ms)
      allowed = credit_weight <= tokens
      local left = tokens
      if allowed then
        left = tokens - credit_weight
        value = string.format('%.17g:%d', left, ctx.now)
      else
        retry_ms = (credit_weight - tokens) / per_ms
      end
      remaining = math.floor(left)
      reset_ms = (burst - left) / per_ms
    end
    local shadow_flag, refused_flag = 0, 0
    if shadow then shadow_flag = 1 end
    if not allowed then
      if not shadow then
        return {RATE_LIMITED, 0, name, math.ceil(retry_ms)}, states, writes
      end
      refused_flag = 1
    else
      writes[#writes + 1] = field
      writes[#writes + 1] = value
    end
    local n = #states
    states[n + 1], states[n + 2], states[n + 3] = name, rate, math.ceil(period / 1000)
    states[n + 4], states[n + 5] = remaining, math.ceil(math.max(reset_ms, 0) / 1000)
    states[n + 6], states[n + 7] = shadow_flag, refused_flag
  end
  return nil, states, writes
end

-- Names of the shadow limits that would have refused, for the journal.
local function shadow_refusals(states)
  local names = {}
  for i = 1, #states, 7 do
    if states[i + 6] == 1 then names[#names + 1] = states[i] end
  end
  return table.concat(names, ' ')
end

local function store_limits(writes)
  if #writes > 0 then redis.call('HSET', ctx.acct, unpack(writes)) end
end

-- Appends the limit states to a reply.
local function with_states(reply, states)
  for i = 1, #states do reply[#reply + 1] = states[i] end
  return reply
end
