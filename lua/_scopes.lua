-- Scopes: accounts in a tree of at most four levels (e.g. org -> project ->
-- user -> key). Shared helpers sent after _buckets.lua with every script of
-- this folder. Not a script by itself.
--
-- A tree lives in its root's partition: every member's keys carry the
-- root's tag, so a call on any path of the tree touches one slot. A call on
-- a member names its path: past the script's own keys come each ancestor's
-- account hash and holds, parent first (an account's id is what follows the
-- first '}:a:' of its hash's name). Fields of a member's hash:
--   P    its parent's id; R its root's id (a root has neither)
--   K    its cap, 'credits,messages,period': the most that calls through it
--        may charge per window (-1: no cap on that resource); period 'd',
--        'w' or 'M' (calendar day, week, month: the client sends their
--        starts) or a length in ms (windows aligned on the epoch)
--   Kw, Kc, Km  the window the use below is of, and the credits and chat
--        messages charged through the member in it
--   Kh   credits that live reservations through it may still charge
--   y.<rid>  a reservation's part of Kh, dropped with the hold
--   Z    how many children it has (attach and move_in add one, move_out
--        takes one away; each change journals a 'child' entry on it). A
--        hash made before the count has no Z: the caller then passes the
--        count the system of record holds (see children_of)
--   Mi, Ms   the move that brought it to this place, and the sequence of
--        its 'move_in' entry (move_in.lua)
-- A member's own partition, when another, keeps a stub with R alone: a call
-- naming the member without its path is refused (IN_TREE) instead of
-- opening a second account of the same id.
--
-- The rules of a call on a path (docs/scopes.md): every level's rate limits
-- and cap must allow it; its credits and chat messages come from the
-- nearest level that has them free, the account's own first, up to the
-- root, and a bypassing level pays for what is left; overdrafts are drawn
-- only once no level has free credits, nearest first. Each level that pays,
-- or whose cap counts the call, gets its own journal entry ('v' the calling
-- account, 'lv' the level's depth, 1 for the root).

-- Starts of the calendar windows, from the rules' '*cal' line: three per
-- kind (previous, current, next), the latest not after the server's time
-- being current, as for refills. Only the kind a cap uses is read, with one
-- match, so a capped call does not split the whole line.
local CALENDAR_FIELD = {d = 1, w = 2, M = 3}
local calendar_line
local function calendar_window(kind)
  if not calendar_line then
    local at = string.find(ctx.rules, '\n*cal|', 1, true)
    local stop = string.find(ctx.rules, '\n', at + 1, true) or #ctx.rules + 1
    calendar_line = string.sub(ctx.rules, at + 6, stop - 1)
  end
  local field = CALENDAR_FIELD[kind]
  local pattern = string.rep('[^|]*|', field - 1) .. '(%d+),(%d+),(%d+)'
  local previous, current, following = string.match(calendar_line, '^' .. pattern)
  previous, current, following = tonumber(previous), tonumber(current), tonumber(following)
  local start, finish = previous, current
  if current <= ctx.now then
    start, finish = current, following
    -- The window after the next is a period on; its length is the last's.
    if following <= ctx.now then start, finish = following, following + (following - current) end
  end
  return start, finish
end

-- The level's cap and its use in the current window, read once per call
-- (nil without a cap). A new window starts from nothing but the live holds.
local function load_cap()
  if ctx.cap ~= nil then return ctx.cap or nil end
  if not ctx.K then
    ctx.cap = false
    return nil
  end
  local credits, messages, period = string.match(ctx.K, '^([^,]+),([^,]+),(.+)$')
  local cap = {credits = tonumber(credits), messages = tonumber(messages)}
  if CALENDAR_FIELD[period] then
    cap.start, cap.finish = calendar_window(period)
  else
    local length = tonumber(period)
    cap.start = ctx.now - ctx.now % length
    cap.finish = cap.start + length
  end
  -- What holds count is ctx.Kh, kept current by the call (drop_cap_hold).
  local use = redis.call('HMGET', ctx.acct, 'Kw', 'Kc', 'Km')
  cap.used_c, cap.used_m, cap.held = 0, 0, ctx.Kh
  -- What the hash holds, so that counting a call writes only what changed.
  cap.stored_window, cap.stored_held = tonumber(use[1] or '-1'), ctx.Kh
  if cap.stored_window == cap.start then
    cap.used_c, cap.used_m = tonumber(use[2]), tonumber(use[3])
  end
  ctx.cap = cap
  return cap
end

-- Refuses a call that would take the level past its cap (nil: it fits).
local function cap_refusal(credits, messages)
  local cap = load_cap()
  if not cap then return nil end
  local wait = cap.finish - ctx.now
  if cap.credits >= 0 and cap.used_c + cap.held + credits > cap.credits then
    return {CAP_REACHED, 0, ctx.account, 'credits', cap.credits,
      cap.used_c + cap.held, wait}
  end
  if cap.messages >= 0 and cap.used_m + messages > cap.messages then
    return {CAP_REACHED, 0, ctx.account, 'messages', cap.messages, cap.used_m, wait}
  end
  return nil
end

-- What a cap still lets through: the credits, and the messages.
local function cap_room()
  local cap = load_cap()
  if not cap then return MAX_AMOUNT, MAX_AMOUNT end
  local credits, messages = MAX_AMOUNT, MAX_AMOUNT
  if cap.credits >= 0 then credits = math.max(cap.credits - cap.used_c - cap.held, 0) end
  if cap.messages >= 0 then messages = math.max(cap.messages - cap.used_m, 0) end
  return credits, messages
end

-- Counts a call's charge (and a change of what holds may charge) against
-- the level's cap; the cap's use after it, for the journal entry.
local function cap_count(credits, messages, held_delta)
  local cap = load_cap()
  if not cap then return nil end
  cap.used_c, cap.used_m = cap.used_c + credits, cap.used_m + messages
  cap.held = cap.held + held_delta
  local writes = {'HSET', ctx.acct, 'Kc', cap.used_c, 'Km', cap.used_m}
  if cap.stored_window ~= cap.start then
    writes[#writes + 1], writes[#writes + 2] = 'Kw', cap.start
    cap.stored_window = cap.start
  end
  if cap.stored_held ~= cap.held then
    writes[#writes + 1], writes[#writes + 2] = 'Kh', cap.held
    cap.stored_held = cap.held
  end
  redis.call(unpack(writes))
  return {'kw', cap.start, 'kc', cap.used_c, 'km', cap.used_m}
end

-- A context for one ancestor of the call's account, sharing the call's
-- clock, rules and journal; no idempotency key of its own (the call's is
-- kept at its account).
local function ancestor_context(acct, holds)
  return {
    acct = acct, holds = holds, journal = ctx.journal, idem = ctx.idem,
    account = string.sub(acct, (string.find(acct, '}:a:', 1, true)) + 4),
    idem_key = '', fingerprint = ctx.fingerprint, idem_window = ctx.idem_window,
    bypass_plans = ctx.bypass_plans, rules = ctx.rules, model = ctx.model, now = ctx.now,
    bchanged = {}, bdelta = {}, bafter = {},
  }
end

-- The reply to a level missing from Redis: moved away (its tombstone, see
-- move_out.lua, names where to), or to be hydrated by the caller.
local function absent_reply(level)
  local t = redis.call('HMGET', level.acct, 'M', 'D')
  if t[1] then return {MOVED, 0, level.account, t[2] or ''} end
  return {MISSING, 0, level.account}
end

-- The children of a level: its Z, or for a hash made before the count the
-- system of record's count, which the caller passes in 'counts' ('id\nn'
-- pairs, n -1 when the system of record keeps no count); nil when neither
-- is known yet (the caller reads it, then calls again).
local function children_of(level, counts)
  local z = redis.call('HGET', level.acct, 'Z')
  if z then return tonumber(z) end
  local parts = split(counts, '\n')
  for i = 1, #parts - 1, 2 do
    if parts[i] == level.account then return tonumber(parts[i + 1]) end
  end
  return nil
end

-- Adds 'delta' to a level's children ('had' from children_of) and journals
-- it on the level ('child': 'Z' the count after, 'v' the child, 'f' why).
-- Without a count anywhere (-1) nothing is counted.
local function count_child(level, had, delta, child, why)
  if had < 0 then return end
  local leaf = ctx
  ctx = level
  redis.call('HSET', level.acct, 'Z', had + delta)
  journal('child', 0, 0, {'Z', had + delta, 'v', child, 'f', why})
  ctx = leaf
end

-- The levels of the call, its account first and the root last, loaded and
-- checked against the stored tree; or nil and the reply refusing the call.
-- 'own' is the number of keys the script has before the ancestors'.
local function open_path(own)
  local leaf = ctx
  local levels = {leaf}
  for i = own + 1, #KEYS, 2 do levels[#levels + 1] = ancestor_context(KEYS[i], KEYS[i + 1]) end
  local root = levels[#levels].account
  for i, level in ipairs(levels) do
    ctx = level
    local found = load_account()
    ctx = leaf
    -- An account of another tree (or its stub) named without its path.
    if #levels == 1 and level.R then return nil, {IN_TREE, 0, level.R} end
    if not found then return nil, absent_reply(level) end
    local parent = false
    if levels[i + 1] then parent = levels[i + 1].account end
    if level.P ~= parent or (parent and level.R ~= root) then
      return nil, {NOT_IN_SCOPE, 0, level.account, level.P or ''}
    end
    level.depth = #levels - i + 1
  end
  return levels
end

-- Runs fn(level, i) on each level, leaf first, with the level as ctx;
-- stops at the first non-nil result and returns it.
local function each_level(levels, fn)
  local leaf = ctx
  for i, level in ipairs(levels) do
    ctx = level
    local result = fn(level, i)
    if result ~= nil then
      ctx = leaf
      return result
    end
  end
  ctx = leaf
  return nil
end

-- Catches up every level (see catch_up); returns each level's rate limits.
local function catch_up_path(levels, with_refills)
  local limits = {}
  each_level(levels, function(_, i) limits[i] = catch_up(with_refills) end)
  return limits
end

-- Every level's rate limits for a call weighing 'credit_weight', then every
-- level's cap: the first refusal, naming its level, or nil with the limit
-- states for the reply (an ancestor's named '<account>/<limit>') and each
-- level's writes.
local function check_path(levels, limits, credit_weight, messages)
  local states, writes = {}, {}
  local refusal = each_level(levels, function(level, i)
    local refused, own, w = evaluate_limits(limits[i], 1, credit_weight)
    if refused then
      if #levels > 1 then refused[5] = level.account end
      return refused
    end
    writes[i] = w
    for j = 1, #own, 7 do
      if i > 1 then own[j] = level.account .. '/' .. own[j] end
      for k = 0, 6 do states[#states + 1] = own[j + k] end
    end
    return cap_refusal(credit_weight, messages)
  end)
  return refusal, states, writes
end

local function store_path_limits(levels, writes)
  each_level(levels, function(_, i) store_limits(writes[i]) end)
end

-- What the path can pay now: every level's free credits, then the
-- overdrafts (MAX_AMOUNT past a bypassing level), and the chat messages.
local function path_funds(levels)
  -- Alone, an account below zero (an overdraft its plan no longer has) can
  -- pay nothing, not even a call of no cost, and says by how much it is short.
  if #levels == 1 then
    if ctx.bypass then return MAX_AMOUNT, MAX_AMOUNT end
    return ctx.credits - ctx.held + ctx.overdraft, ctx.chat
  end
  local credits, messages = 0, 0
  for _, level in ipairs(levels) do
    if level.bypass then return MAX_AMOUNT, MAX_AMOUNT end
    credits = credits + math.max(level.credits - level.held + level.overdraft, 0)
    messages = messages + level.chat
  end
  return credits, messages
end

-- Takes 'amount' from the level's credits (its buckets in burn order).
local function take_credits(n)
  if bucketed() then
    load_buckets()
    burn(n)
  else
    ctx.credits = ctx.credits - n
  end
end

-- Spreads a charge the caller checked against path_funds over the levels:
-- free credits nearest first, then a bypassing level, then overdrafts.
-- Returns what each level pays, and of each level's share how much a
-- bypassing level covered (it pays nothing from its balance).
local function split_charge(levels, credits, messages)
  local paid_c, paid_m, covered = {}, {}, {}
  local need_c, need_m = credits, messages
  for i, level in ipairs(levels) do
    paid_c[i], paid_m[i] = 0, 0
    if level.bypass and (need_c > 0 or need_m > 0) then
      covered[i] = true
      need_c, need_m = 0, 0
    elseif not level.bypass then
      local n = math.min(math.max(level.credits - level.held, 0), need_c)
      local m = math.min(level.chat, need_m)
      paid_c[i], paid_m[i] = n, m
      need_c, need_m = need_c - n, need_m - m
    end
  end
  for i, level in ipairs(levels) do
    if need_c == 0 then break end
    local room = level.credits - level.held - paid_c[i] + level.overdraft
    local n = math.min(math.max(room, 0), need_c)
    paid_c[i] = paid_c[i] + n
    need_c = need_c - n
  end
  return paid_c, paid_m, covered
end

-- Adds to a level's journal fields where it stands on the path ('lv', and
-- 'v' on an ancestor's) and its cap's use after the call ('counted').
local function with_level_fields(fields, levels, i, counted)
  if #levels > 1 then
    fields[#fields + 1], fields[#fields + 2] = 'lv', levels[i].depth
    if i > 1 then fields[#fields + 1], fields[#fields + 2] = 'v', levels[1].account end
  end
  for j = 1, #(counted or {}) do fields[#fields + 1] = counted[j] end
  return fields
end

-- Applies a split charge: each level's balances, buckets and cap, and its
-- journal entry (the call's account always gets one: it carries the key).
-- 'extra' is the entry's fields; returns the call's account's sequence.
local function charge_path(levels, op, credits, messages, extra, paid_c, paid_m, covered,
    held_changed)
  local seq
  each_level(levels, function(level, i)
    if paid_c[i] > 0 then take_credits(paid_c[i]) end
    level.chat = level.chat - paid_m[i]
    local counted = cap_count(credits, messages, 0)
    if i == 1 or paid_c[i] > 0 or paid_m[i] > 0 or counted or covered[i] then
      -- Catching up saved what it changed: a level that does not pay keeps
      -- its balances as they are, unless the call changed its holds.
      if i == 1 or paid_c[i] > 0 or paid_m[i] > 0 or held_changed then save_balances() end
      local fields = {}
      for j = 1, #extra do fields[j] = extra[j] end
      local s = journal(op, 0 - paid_c[i], 0 - paid_m[i],
        with_level_fields(fields, levels, i, counted))
      if i == 1 then seq = s end
    end
  end)
  return seq
end

-- Credits a level can hold for a reservation until 'deadline': its free
-- credits that last until then ('free'), and its overdraft on top.
local function hold_room(deadline)
  local backed = available() + ctx.overdraft
  if bucketed() then
    load_buckets()
    backed = backing(deadline)
  end
  return math.max(backed - ctx.overdraft, 0), math.max(backed, 0) - math.max(backed - ctx.overdraft, 0)
end

-- Spreads a hold of 'amount' until 'deadline' over the levels like a charge
-- (split_charge): returns each level's part and whether a bypassing level
-- covered the rest, or nil and what the path could hold.
local function split_hold(levels, amount, deadline)
  local parts, rooms, need, covered = {}, {}, amount, false
  each_level(levels, function(level, i)
    parts[i] = 0
    if covered then return nil end
    if level.bypass then
      covered = true
      need = 0
      return nil
    end
    local free, overdraft = hold_room(deadline)
    rooms[i] = overdraft
    local n = math.min(free, need)
    parts[i], need = n, need - n
    return nil
  end)
  for i = 1, #levels do
    if need == 0 then break end
    local n = math.min(rooms[i] or 0, need)
    parts[i], need = parts[i] + n, need - n
  end
  if need > 0 then
    -- Alone, an account says what backs a hold until then, below zero too.
    if #levels == 1 then
      if bucketed() then return nil, backing(deadline) end
      return nil, available() + ctx.overdraft
    end
    local total = 0
    for i = 1, #levels do total = total + parts[i] end
    return nil, total
  end
  return parts, covered
end

-- The ids of the path's ancestors, parent first, as kept with a reservation.
local function path_text(levels)
  local ids = {}
  for i = 2, #levels do ids[#ids + 1] = levels[i].account end
  return table.concat(ids, ',')
end

-- Ends a reservation's claims at the current level: its held part and its
-- part of the cap's holds. Returns the part, or nil when the level had none.
local function drop_level_hold(rid)
  local v = redis.call('HMGET', ctx.acct, 'r.' .. rid, 'y.' .. rid)
  if not v[1] then return nil end
  local part = tonumber(v[1])
  release_hold(rid, part)
  redis.call('HDEL', ctx.acct, 'r.' .. rid, 'y.' .. rid)
  redis.call('ZREM', ctx.holds, rid)
  if v[2] then drop_cap_hold(tonumber(v[2])) end
  return part
end
