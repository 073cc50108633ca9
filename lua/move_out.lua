-- move_out: the first step of moving an account to another place (an admin
-- call, docs/scopes.md): in the partition it leaves, check that it may
-- move, journal 'move_out', and put in place of its hash a tombstone that
-- keeps its state (the snapshot) and where it goes. A call on the old path
-- is then refused (MOVED), and the move's retry finds the snapshot again.
-- move_in.lua recreates the account at its new place from the snapshot.
--
-- KEYS[1..4]  the account's hash, holds, journal, idempotency (not used) at
--             its old place (see _prelude.lua)
-- KEYS[5..4+r] reservation records of the account (r = ARGV[9]) for the
--             live holds of its ancestors that an earlier reply named
-- KEYS[5+r..] its ancestors' account hash and holds, parent first
-- ARGV[1..8]  common arguments (see _prelude.lua); ARGV[3], the idempotency
--             key, is the move's id
-- ARGV[9]     r, the number of reservation records
-- ARGV[10]    the reservation ids of those records, '\n'-separated
-- ARGV[11]    the destination: the new parent's path, root first,
--             '\n'-separated; '' to become a root of its own
-- ARGV[12]    the root to name in the tombstone when it is also the stub of
--             the account's own partition ('' for none)
-- ARGV[13]    children counts of the system of record, for hashes without
--             one (see children_of in _scopes.lua)
--
-- Checks everything before it writes: no children, no live hold (its own,
-- or one of its reservations on an ancestor), the path. Lapsed holds and
-- due buckets are then journaled as any script does; rate-limit states
-- (fields l.*) are not kept.
--
-- Journals 'move_out' (no delta: the balances move with the account; 'pa'
-- and 'ro' the place it leaves, '' for none) and 'child' on the old parent.
--
-- The tombstone's fields: M the move id, D the destination (as ARGV[11]),
-- X the snapshot (hex of a msgpack'd field/value list, dropped once the
-- move is done), S the sequence of the 'move_out' entry, Q the old path
-- ('\n'-separated), F 1 once the move is done (move_done.lua).
--
-- Returns {0, replayed, sequence of 'move_out', snapshot, done 0/1, moved
--   1 (0: already at the destination, nothing written; the sequence is then
--   the newest, or the 'move_in' entry's when this move brought it there)};
--   {1, 0, account} when the account or an ancestor is not in Redis
--     (hydrate it, then call again);
--   {17, 0, level, parent}, {18, 0, root}: see debit.lua (the path changed);
--   {20, 0, account, destination} when it moved away under another move,
--     now done;
--   {21, 0, children} when it has children;
--   {22, 0} when it has a live hold;
--   {23, 0, reservation id...} when ancestors hold live reservations whose
--     records were not passed (call again with them);
--   {24, 0, level} when a level's children are not counted in Redis;
--   {25, 0, move id} when another move of the account is half-done.

local key = ctx.idem_key
local dest = ARGV[11]
local t = redis.call('HMGET', ctx.acct, 'c', 'M', 'F', 'S', 'X', 'D', 'Mi')
if not t[1] and t[2] then
  if t[2] == key then
    local done = 0
    if t[3] then done = 1 end
    return {OK, 1, tonumber(t[4]), t[5] or '', done, 1}
  end
  if t[3] then return {MOVED, 0, ctx.account, t[6] or ''} end
  return {MOVE_BUSY, 0, t[2]}
end

local records = tonumber(ARGV[9])
local levels, refused = open_path(4 + records)
if refused then return refused end
local here = {}
for i = #levels, 2, -1 do here[#here + 1] = levels[i].account end
if table.concat(here, '\n') == dest then
  if t[7] == key then return {OK, 1, tonumber(redis.call('HGET', ctx.acct, 'Ms')), '', 1, 0} end
  return {OK, 0, tonumber(redis.call('HGET', ctx.acct, 's') or '0'), '', 1, 0}
end

local children = children_of(ctx, ARGV[13])
if not children then return {UNCOUNTED, 0, ctx.account} end
if children > 0 then return {HAS_CHILDREN, 0, children} end
local siblings = -1
if levels[2] then
  siblings = children_of(levels[2], ARGV[13])
  if not siblings then return {UNCOUNTED, 0, levels[2].account} end
end
if redis.call('ZCOUNT', ctx.holds, '(' .. ctx.now, '+inf') > 0 then return {HAS_HOLDS, 0} end
-- A reservation may hold its credits on ancestors alone: each live hold on
-- them is looked up in the account's records, which the caller names.
local named = {}
for i, rid in ipairs(split(ARGV[10], '\n')) do named[rid] = KEYS[4 + i] end
local unknown = {}
for i = 2, #levels do
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', levels[i].holds, '(' .. ctx.now, '+inf')) do
    local record = named[rid]
    if not record then
      unknown[#unknown + 1] = rid
    elseif redis.call('HGET', record, 'st') == 'a' then
      return {HAS_HOLDS, 0}
    end
  end
end
if #unknown > 0 then
  local reply = {HOLDS_UNKNOWN, 0}
  for i, rid in ipairs(unknown) do reply[i + 2] = rid end
  return reply
end

-- Checked: from here on every write is made.
catch_up(false)
local parent, root = ctx.P or '', ctx.R or ''
local seq = journal('move_out', 0, 0, {'pa', parent, 'ro', root})
if levels[2] then count_child(levels[2], siblings, -1, ctx.account, 'move_out') end

local all = redis.call('HGETALL', ctx.acct)
local kept = {}
for i = 1, #all, 2 do
  local field = all[i]
  local prefix = string.sub(field, 1, 2)
  if prefix ~= 'l.' and prefix ~= 'r.' and prefix ~= 'y.' and prefix ~= 'q.'
    and field ~= 'P' and field ~= 'R' and field ~= 'Z' and field ~= 'Mi' and field ~= 'Ms' then
    kept[#kept + 1] = field
    kept[#kept + 1] = all[i + 1]
  end
end
local snapshot = string.gsub(cmsgpack.pack(kept), '.', function(c)
  return string.format('%02x', string.byte(c))
end)
local old = {}
for i = #levels, 1, -1 do old[#old + 1] = levels[i].account end
redis.call('DEL', ctx.acct, ctx.holds)
redis.call('HSET', ctx.acct, 'M', key, 'D', dest, 'X', snapshot, 'S', seq,
  'Q', table.concat(old, '\n'))
if ARGV[12] ~= '' then redis.call('HSET', ctx.acct, 'R', ARGV[12]) end
return {OK, 0, seq, snapshot, 0, 1}
