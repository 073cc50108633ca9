-- move_in: the second step of moving an account (see move_out.lua): in the
-- partition of its new place, recreate it from move_out's snapshot under
-- its new parent (or as a root of its own), and count it as the parent's
-- child. Idempotent by the move's id: a retry answers as the first call.
--
-- KEYS[1..4]  the account's hash, holds, journal, idempotency (not used) at
--             its new place (see _prelude.lua)
-- KEYS[5..]   the new parent's and its ancestors' account hash and holds,
--             parent first (none to become a root of its own)
-- ARGV[1..8]  common arguments (see _prelude.lua); ARGV[3] is the move's id
-- ARGV[9]     the snapshot move_out answered
-- ARGV[10]    the sequence of the 'move_out' entry
-- ARGV[11]    the root the account leaves ('' for none): a stub naming it
--             may stand at the new place (the account's own partition)
-- ARGV[12]    the system of record's last sequence number of the account
-- ARGV[13]    children counts of the system of record, for a parent whose
--             hash has none (see children_of in _scopes.lua)
--
-- Journals 'move_in' (no delta; 'pa' and 'ro' the new place, '' for none;
-- its sequence follows the 'move_out' entry's) and 'child' on the parent.
--
-- Returns {0, replayed, sequence of 'move_in'};
--   {1, 0, account} when a level of the destination is not in Redis
--     (hydrate it, then call again);
--   {17, 0, level, parent} when the destination is not the stored tree;
--   {20, 0, account, destination} when a level of it has moved away;
--   {24, 0, parent} when the parent's children are not counted in Redis;
--   {25, 0, move id} when the account is there already under another move.

local key, out_seq = ctx.idem_key, tonumber(ARGV[10])
local t = redis.call('HMGET', ctx.acct, 'c', 'Mi', 'Ms', 'M', 'F', 'S', 'R')
if t[1] then
  if t[2] == key then return {OK, 1, tonumber(t[3])} end
  return {MOVE_BUSY, 0, t[2] or ''}
end
if t[4] and t[4] ~= key then
  -- A tombstone of a move out of this place: one made after this move
  -- came in means it came in (and left again); an older, finished one
  -- gives way; an unfinished one keeps the only copy of the account.
  if t[5] and tonumber(t[6]) > out_seq then return {OK, 1, out_seq + 1} end
  if not t[5] then return {MOVE_BUSY, 0, t[4]} end
elseif not t[4] and t[7] and t[7] ~= ARGV[11] then
  return {MOVE_BUSY, 0, ''}
elseif not t[4] and tonumber(ARGV[12]) > out_seq then
  -- Moved in before, and evicted since: the system of record has it.
  return {OK, 1, out_seq + 1}
end

local levels = {ctx}
for i = 5, #KEYS, 2 do levels[#levels + 1] = ancestor_context(KEYS[i], KEYS[i + 1]) end
local parent, root = '', ''
if #levels > 1 then parent, root = levels[2].account, levels[#levels].account end
for i = 2, #levels do
  local level = levels[i]
  ctx = level
  local found = load_account()
  ctx = levels[1]
  if not found then return absent_reply(level) end
  local above = false
  if levels[i + 1] then above = levels[i + 1].account end
  if level.P ~= above or (above and level.R ~= root) then
    return {NOT_IN_SCOPE, 0, level.account, level.P or ''}
  end
end
local siblings = -1
if levels[2] then
  siblings = children_of(levels[2], ARGV[13])
  if not siblings then return {UNCOUNTED, 0, parent} end
end

-- Checked: from here on every write is made.
local packed = string.gsub(ARGV[9], '..', function(h) return string.char(tonumber(h, 16)) end)
local fields = cmsgpack.unpack(packed)
redis.call('DEL', ctx.acct, ctx.holds)
redis.call('HSET', ctx.acct, unpack(fields))
redis.call('HSET', ctx.acct, 'Z', 0, 'Mi', key)
if parent ~= '' then redis.call('HSET', ctx.acct, 'P', parent, 'R', root) end
load_account()
local seq = journal('move_in', 0, 0, {'pa', parent, 'ro', root, 'lv', #levels})
redis.call('HSET', ctx.acct, 'Ms', seq)
if levels[2] then count_child(levels[2], siblings, 1, ctx.account, 'move_in') end
return {OK, 0, seq}
