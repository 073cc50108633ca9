-- attach: add an account to a tree, under its parent, in the root's
-- partition (see _scopes.lua). The account must be new: what it opens with
-- comes from the loader, like a first call's. Attaching again under the
-- same parent changes nothing.
--
-- KEYS[1..4]  the account's hash, holds, journal, idempotency (see
--             _prelude.lua), with the root's tag
-- KEYS[5..]   each ancestor's account and holds, parent first
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     credits to open with
-- ARGV[10]    chat messages to open with
-- ARGV[11]    plan
-- ARGV[12]    children counts of the system of record, for a parent whose
--             hash has none (see children_of in _scopes.lua)
--
-- Journals 'attach' (the opening balances, 'pa' the parent, 'ro' the root,
-- 'lv' the account's depth), and 'child' on the parent (its children, 'Z').
--
-- Returns {0, replayed, 1 attached now or 0 already there, sequence};
--   {1, 0, account} when an ancestor is not in Redis (hydrate it, then call
--     again);
--   {20, 0, account, destination} when an ancestor has moved away;
--   {24, 0, parent} when the parent's children are not counted in Redis
--     (read the count of the system of record, then call again);
--   {6, 0} when the idempotency key was used for another call;
--   {17, 0, level, its stored parent} when the path is not the stored tree,
--     or the account is in the tree under another parent;
--   {19, 0} when an account of this id has a history outside the tree.

local replay = idem_replay()
if replay then return replay end
local levels = {ctx}
for i = 5, #KEYS, 2 do levels[#levels + 1] = ancestor_context(KEYS[i], KEYS[i + 1]) end
local parent, root = levels[2].account, levels[#levels].account
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

if load_account() then
  if ctx.P == parent and ctx.R == root then
    return idem_store({OK, 0, 0, tonumber(redis.call('HGET', ctx.acct, 's'))})
  end
  if ctx.P then return {NOT_IN_SCOPE, 0, ctx.account, ctx.P} end
  return {HAS_HISTORY, 0}
end
if ctx.R and ctx.R ~= root then return {NOT_IN_SCOPE, 0, ctx.account, ''} end
if redis.call('HEXISTS', ctx.acct, 'M') == 1 then
  return {MOVED, 0, ctx.account, redis.call('HGET', ctx.acct, 'D') or ''}
end
local siblings = children_of(levels[2], ARGV[12])
if not siblings then return {UNCOUNTED, 0, parent} end

ctx.credits, ctx.chat, ctx.held, ctx.plan = tonumber(ARGV[9]), tonumber(ARGV[10]), 0, ARGV[11]
redis.call('HSET', ctx.acct, 'c', ctx.credits, 'm', ctx.chat, 'h', 0, 'p', ctx.plan, 's', 0,
  'P', parent, 'R', root, 'Z', 0)
local seq = journal('attach', ctx.credits, ctx.chat,
  {'pa', parent, 'ro', root, 'lv', #levels})
count_child(levels[2], siblings, 1, ctx.account, 'attach')
return idem_store({OK, 0, 1, seq})
