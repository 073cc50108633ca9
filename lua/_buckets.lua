-- Credit buckets, lapsed holds and refills: shared helpers sent after
-- _prelude.lua with every script of this folder. Not a script by itself.
--
-- An account without field B has only its base bucket, which holds all of
-- its credits (c): every script takes the plain path, as before buckets
-- existed. With B, the account's buckets, base included, as one cmsgpack
-- array in burn order, each {id, remaining, held, priority, category,
-- effective, expires, created, granted, live} (ms on the server clock;
-- expires 0 = never; live 0 while pending, before its effective instant,
-- when its credits are not in c yet). c is the sum of the live buckets'
-- remaining, h of all buckets' held. The base bucket (id 'base', category
-- 'paid') never expires, takes plain grants and refunds, and alone goes
-- below zero, within a plan's overdraft.
--   N        the next instant a bucket becomes effective or expires (0: none),
--            so the dates are looked at only when one is due
--   O        the burn order and categories the array is sorted by
--   q.<rid>  the buckets backing a hold, 'id:amount,...'; a hold without it
--            is backed by the base bucket
-- A hold is backed only by buckets that live until its deadline, so no
-- bucket ever expires under a live hold.

local BASE, REFILL = 'base', 'refill'
local NEVER = MAX_AMOUNT

-- The first line of ARGV[7]: burn order letters | categories in burn order |
-- most grants per account | default priority. Read only by a call that
-- works with buckets: the plain path never pays for it.
local settings_line, grant_order, grant_max, grant_priority
local category_rank = {}
local function read_grant_settings()
  if settings_line then return end
  local stop = string.find(ctx.rules, '\n', 1, true) or #ctx.rules + 1
  settings_line = string.sub(ctx.rules, 1, stop - 1)
  -- A caller that sends no rules gets the default grant settings.
  if settings_line == '' then settings_line = 'pxced|promotional,paid|32|50' end
  local f = split(settings_line, '|')
  grant_order, grant_max, grant_priority = f[1], tonumber(f[3]), tonumber(f[4])
  for i, name in ipairs(split(f[2], ',')) do category_rank[name] = i end
end

local function until_never(at)
  if at == 0 then return NEVER end
  return at
end

-- True when bucket a burns before bucket b: the criteria of the burn order,
-- in turn (p priority, lower first; x soonest expiry; c category, in the
-- configured order; e effective start; d creation), then the id.
local function burns_before(a, b)
  for i = 1, #grant_order do
    local k = string.sub(grant_order, i, i)
    local x, y
    if k == 'p' then x, y = a[BPRIO], b[BPRIO]
    elseif k == 'x' then x, y = until_never(a[BEXP]), until_never(b[BEXP])
    elseif k == 'c' then x, y = category_rank[a[BCAT]] or 1000, category_rank[b[BCAT]] or 1000
    elseif k == 'e' then x, y = a[BEFF], b[BEFF]
    else x, y = a[BMADE], b[BMADE] end
    if x ~= y then return x < y end
  end
  return a[BID] < b[BID]
end

-- True when the account's credits are in buckets (packed, or unpacked by
-- this call); false on the plain path, where c alone is the base bucket.
local function bucketed()
  -- A missing hash field reads as false, not nil.
  if ctx.B then return true end
  return ctx.bk ~= nil
end

local function index_buckets()
  ctx.bidx = {}
  for _, b in ipairs(ctx.bk) do ctx.bidx[b[BID]] = b end
end

-- The buckets, unpacked once per call; an account on the plain path gets
-- its base bucket made explicit.
local function load_buckets()
  if ctx.bk then return ctx.bk end
  read_grant_settings()
  if ctx.B then
    ctx.bk = cmsgpack.unpack(ctx.B)
    -- The base bucket holds whatever the other buckets do not: scripts of a
    -- release before buckets, still running in a rolling upgrade, change c
    -- and h alone, and their change lands here.
    local rest, held, base = ctx.credits, ctx.held, nil
    for _, b in ipairs(ctx.bk) do
      if b[BID] == BASE then
        base = b
      else
        if b[BLIVE] == 1 then rest = rest - b[BREM] end
        held = held - b[BHELD]
      end
    end
    if base then base[BREM], base[BHELD] = rest, held end
  else
    ctx.bk = {{BASE, ctx.credits, ctx.held, grant_priority, 'paid', 0, 0, 0, 0, 1}}
  end
  index_buckets()
  if ctx.O ~= settings_line then table.sort(ctx.bk, burns_before) end
  return ctx.bk
end

local function sort_buckets()
  table.sort(ctx.bk, burns_before)
end

save_buckets = function()
  local kept, due = {}, 0
  for _, b in ipairs(ctx.bk) do
    -- A spent bucket is done with; the base bucket stays.
    if b[BID] == BASE or b[BREM] ~= 0 or b[BHELD] ~= 0 then
      kept[#kept + 1] = b
      local at = b[BEXP]
      if b[BLIVE] == 0 then at = b[BEFF] end
      if at > 0 and (due == 0 or at < due) then due = at end
    else
      ctx.bidx[b[BID]] = nil
    end
  end
  ctx.bk = kept
  if #kept == 1 and ctx.held == 0 then
    -- The base bucket alone and no hold: back to the plain path.
    redis.call('HDEL', ctx.acct, 'B', 'N', 'O')
    ctx.B, ctx.bk, ctx.bidx = nil, nil, nil
  else
    ctx.B = cmsgpack.pack(kept)
    redis.call('HSET', ctx.acct, 'B', ctx.B, 'N', due, 'O', settings_line)
  end
  ctx.N, ctx.O = due, settings_line
end

-- Changes a bucket's remaining credits, and the balance if it is live.
local function bucket_delta(b, delta)
  b[BREM] = b[BREM] + delta
  if b[BLIVE] == 1 then ctx.credits = ctx.credits + delta end
  local id = b[BID]
  if not ctx.bdelta[id] then
    ctx.bchanged[#ctx.bchanged + 1] = id
    ctx.bdelta[id] = 0
  end
  ctx.bdelta[id] = ctx.bdelta[id] + delta
  -- Kept apart from the bucket: a spent bucket may be gone from ctx.bk by
  -- the time the entry is written.
  ctx.bafter[id] = b[BREM]
end

local function count_grants()
  local n = 0
  for _, b in ipairs(ctx.bk) do
    if b[BID] ~= BASE and b[BID] ~= REFILL then n = n + 1 end
  end
  return n
end

-- Burns credits free of holds in burn order; what the buckets lack comes
-- from the base bucket, below zero only within the overdraft the caller
-- checked.
local function burn(amount)
  local need = amount
  for _, b in ipairs(ctx.bk) do
    if need == 0 then return end
    local free = b[BREM] - b[BHELD]
    if b[BLIVE] == 1 and free > 0 then
      local n = math.min(free, need)
      bucket_delta(b, -n)
      need = need - n
    end
  end
  if need > 0 then bucket_delta(ctx.bidx[BASE], -need) end
end

-- Credits that can back a hold until 'deadline' (buckets live now that last
-- until then, 'except' left out), overdraft included.
local function backing(deadline, except)
  local total = ctx.overdraft or 0
  for _, b in ipairs(ctx.bk) do
    if b[BLIVE] == 1 and b[BID] ~= except and (b[BEXP] == 0 or b[BEXP] >= deadline) then
      total = total + b[BREM] - b[BHELD]
    end
  end
  return total
end

-- Holds 'amount' on the buckets backing it until 'deadline', in burn order;
-- returns the parts {id, n, ...}, or nil (changing nothing) when short.
local function allocate(amount, deadline, except)
  if backing(deadline, except) < amount then return nil end
  local need, parts = amount, {}
  for _, b in ipairs(ctx.bk) do
    if need == 0 then break end
    local free = b[BREM] - b[BHELD]
    if b[BLIVE] == 1 and b[BID] ~= BASE and b[BID] ~= except and free > 0
        and (b[BEXP] == 0 or b[BEXP] >= deadline) then
      local n = math.min(free, need)
      b[BHELD] = b[BHELD] + n
      parts[#parts + 1], parts[#parts + 2] = b[BID], n
      need = need - n
    end
  end
  if need > 0 then
    local base = ctx.bidx[BASE]
    base[BHELD] = base[BHELD] + need
    parts[#parts + 1], parts[#parts + 2] = BASE, need
  end
  ctx.held = ctx.held + amount
  return parts
end

local function parts_text(parts)
  local out = {}
  for i = 1, #parts, 2 do out[#out + 1] = parts[i] .. ':' .. int(parts[i + 1]) end
  return table.concat(out, ',')
end

-- The parts of a hold on the bucket path ({id, n, ...}).
local function hold_parts(rid, amount)
  local text = redis.call('HGET', ctx.acct, 'q.' .. rid)
  if not text then return {BASE, amount} end
  local parts = {}
  for _, part in ipairs(split(text, ',')) do
    local sep = string.find(part, ':', 1, true)
    parts[#parts + 1] = string.sub(part, 1, sep - 1)
    parts[#parts + 1] = tonumber(string.sub(part, sep + 1))
  end
  return parts
end

local function unhold(parts)
  for i = 1, #parts, 2 do
    local b = ctx.bidx[parts[i]] or ctx.bidx[BASE]
    b[BHELD] = b[BHELD] - parts[i + 1]
    ctx.held = ctx.held - parts[i + 1]
  end
end

-- Moves the parts of a hold on the buckets 'leaving' picks to buckets that
-- back it until 'deadline' ('except' left out): extend and void. Returns the
-- hold's parts after the move and the credits moved, or nil and the credits
-- that could not move (in memory only: the caller refuses without saving).
local function rehome(rid, amount, deadline, leaving, except)
  local parts, kept, short, moving = hold_parts(rid, amount), {}, {}, 0
  for i = 1, #parts, 2 do
    local b = ctx.bidx[parts[i]]
    if b and leaving(b) then
      short[#short + 1], short[#short + 2] = parts[i], parts[i + 1]
      moving = moving + parts[i + 1]
    else
      kept[#kept + 1], kept[#kept + 2] = parts[i], parts[i + 1]
    end
  end
  if moving == 0 then return parts, 0 end
  unhold(short)
  local moved = allocate(moving, deadline, except)
  if not moved then return nil, moving end
  for i = 1, #moved do kept[#kept + 1] = moved[i] end
  return kept, moving
end

-- Ends a hold's claim on its buckets (settle, release, lapse).
local function release_hold(rid, amount)
  if not bucketed() then
    ctx.held = ctx.held - amount
    return
  end
  load_buckets()
  unhold(hold_parts(rid, amount))
  redis.call('HDEL', ctx.acct, 'q.' .. rid)
end

-- Ends what a reservation's hold counted against its level's cap (y.<rid>,
-- see _scopes.lua), even while the level has no cap: the call's view of Kh
-- follows, so a cap loaded later in the call starts from it.
local function drop_cap_hold(counted)
  ctx.Kh = ctx.Kh - counted
  if ctx.cap then
    ctx.cap.held = ctx.cap.held - counted
  else
    redis.call('HINCRBY', ctx.acct, 'Kh', 0 - counted)
  end
end

-- A hold counts until its deadline and for nothing from the deadline on. Lapsed
-- holds are dropped here, by whichever script touches the account next, so the
-- available balance is exact without any sweeper running.
local function prune_lapsed_holds()
  -- Holds are never of zero (but where a cap counts them, see _scopes.lua),
  -- so no held credits means no holds to look at.
  if ctx.held == 0 and ctx.Kh == 0 then return end
  local lapsed = redis.call('ZRANGEBYSCORE', ctx.holds, '-inf', ctx.now)
  if #lapsed == 0 then return end
  for _, rid in ipairs(lapsed) do
    local v = redis.call('HMGET', ctx.acct, 'r.' .. rid, 'y.' .. rid)
    local amount = tonumber(v[1] or '0')
    redis.call('HDEL', ctx.acct, 'r.' .. rid, 'y.' .. rid)
    if v[2] then drop_cap_hold(tonumber(v[2])) end
    release_hold(rid, amount)
    redis.call('ZREM', ctx.holds, rid)
    journal('lapse', 0, 0, {'r', rid, 'x', amount})
  end
  save_balances()
end

-- Buckets whose effective start or expiry has come, in the order they came:
-- a pending bucket's credits join the balance ('effective'), an expired
-- bucket's leave it ('expire', with the amount lost). Exact at the instant,
-- with no sweeper: whichever script touches the account next does it, after
-- the lapsed holds (a hold never outlives the buckets backing it).
local function apply_bucket_events()
  if not ctx.B or ctx.N == 0 or ctx.now < ctx.N then return end
  load_buckets()
  while true do
    local due, at = nil, nil
    for _, b in ipairs(ctx.bk) do
      local when = b[BEXP]
      if b[BLIVE] == 0 then when = b[BEFF] end
      if when > 0 and when <= ctx.now and (not at or when < at) then due, at = b, when end
    end
    if not due then break end
    if due[BLIVE] == 0 then
      due[BLIVE] = 1
      ctx.credits = ctx.credits + due[BREM]
      bucket_delta(due, 0)
      save_totals()
      journal('effective', due[BREM], 0, {'g', due[BID]})
    else
      local lost = due[BREM]
      bucket_delta(due, -lost)
      due[BEXP] = 0
      save_totals()
      journal('expire', -lost, 0, {'g', due[BID]})
    end
  end
  save_balances()
end

-- The attributes of a bucket, journaled with its grant or refill.
local function bucket_fields(b, extra)
  local f = {'g', b[BID], 'gc', b[BCAT], 'gp', b[BPRIO], 'ge', b[BEFF], 'gx', b[BEXP],
    'ga', b[BGRANTED], 'gt', b[BMADE]}
  for i = 1, #extra do f[#f + 1] = extra[i] end
  return f
end

-- The credits of a refill period: the refill bucket keeps what the rollover
-- allows of its remaining (all, none, or up to a cap; never what live holds
-- need), then gets the amount ('add') or what tops the balance up to it
-- ('top_up_to'), and a new expiry, never before the deadline of a hold it
-- backs.
local function refill_credits(amount, mode, rollover, expires_ms, category, priority, period_start)
  load_buckets()
  local b = ctx.bidx[REFILL]
  if b then
    local keep = b[BREM]
    if rollover >= 0 then keep = math.max(math.min(b[BREM], rollover), b[BHELD]) end
    local dropped = b[BREM] - keep
    if dropped > 0 then
      bucket_delta(b, -dropped)
      save_totals()
      journal('expire', -dropped, 0, {'g', REFILL, 'f', 'rollover'})
    end
  end
  local expires = 0
  if expires_ms > 0 then expires = period_start + expires_ms end
  local add = amount
  if mode == 't' then add = math.max(amount - ctx.credits, 0) end
  if expires ~= 0 and expires <= ctx.now then add = 0 end
  if b and b[BHELD] > 0 and expires ~= 0 then
    -- A live hold is always backed: credits it holds on the bucket last
    -- until the latest deadline among the account's holds, whatever the
    -- plan's refills now say.
    local latest = redis.call('ZRANGE', ctx.holds, -1, -1, 'WITHSCORES')
    if latest[2] then expires = math.max(expires, tonumber(latest[2])) end
  end
  if not b then
    if add == 0 then
      save_balances()
      return
    end
    b = {REFILL, 0, 0, priority, category, ctx.now, expires, ctx.now, add, 1}
    ctx.bk[#ctx.bk + 1] = b
    ctx.bidx[REFILL] = b
  end
  b[BPRIO], b[BCAT], b[BEFF], b[BEXP], b[BMADE], b[BGRANTED] =
    priority, category, math.min(b[BEFF], ctx.now), expires, ctx.now, add
  bucket_delta(b, add)
  sort_buckets()
  save_balances()
  journal('refill', add, 0, bucket_fields(b, {'f', 'refill'}))
end

-- Free balances that refill on a schedule, lazily: whichever script touches
-- the account first in a new period applies the refill and journals it. No
-- scheduled job has to run. Each refill is 'resource,amount,mode,rollover,
-- expires_ms,category,priority,' then 'r,period_ms' (rolling: a period after
-- the last refill) or 'c,start1,start2,start3' (calendar: the latest period
-- start not after the server's time); mode 'a' (add) or 't' (top up to),
-- rollover -1 (all), 0 (none) or a cap, expires_ms 0 for never (credits
-- only: chat messages are one balance). The first touch only starts the clock.
local function apply_refills(refills)
  if refills == '' then return end
  for _, text in ipairs(split(refills, ';')) do
    local f = split(text, ',')
    local resource, amount, mode = f[1], tonumber(f[2]), f[3]
    local field = 'f' .. resource
    local marker = tonumber(redis.call('HGET', ctx.acct, field) or '-1')
    local period_start
    if f[8] == 'r' then
      if marker < 0 or ctx.now >= marker + tonumber(f[9]) then period_start = ctx.now end
    else
      period_start = tonumber(f[9])
      for i = 10, 11 do
        if tonumber(f[i]) <= ctx.now then period_start = tonumber(f[i]) end
      end
      if marker >= period_start then period_start = nil end
    end
    if period_start then
      redis.call('HSET', ctx.acct, field, period_start)
      if marker >= 0 and resource == 'c' then
        refill_credits(amount, mode, tonumber(f[4]), tonumber(f[5]), f[6], tonumber(f[7]),
          period_start)
      elseif marker >= 0 then
        local delta = amount
        if mode == 't' then delta = math.max(amount - ctx.chat, 0) end
        if delta > 0 then
          ctx.chat = ctx.chat + delta
          save_balances()
          journal('refill', 0, delta, {'f', 'refill'})
        end
      end
    end
  end
end

-- Every script's first steps on an account: what time has done since the
-- last call (lapsed holds, due buckets, due refills). Returns the plan's
-- rate limits.
-- Refills are applied by the calls that spend or read (debit, reserve,
-- balance); the others only read the plan's overdraft.
local function catch_up(with_refills)
  prune_lapsed_holds()
  apply_bucket_events()
  local limits, refills = plan_rules()
  if with_refills then apply_refills(refills) end
  return limits
end
