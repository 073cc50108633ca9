-- reset_limits: an admin call that forgets the state of an account's rate
-- limits (one by name, or all), journaled like every change.
--
-- KEYS[1..4]  account, holds, journal, idempotency (see _prelude.lua)
-- KEYS[5..]   on a path of a tree, each ancestor's account and holds,
--             parent first: the path is checked, the call acts on the
--             account alone (see _scopes.lua)
-- ARGV[1..8]  common arguments (see _prelude.lua)
-- ARGV[9]     limit name, '' for all
--
-- Returns {0, replayed, fields removed, sequence};
--   {1, 0, account} when an account of the path is not in Redis (hydrate
--     it, then call again); {17, 0, level, parent}, {18, 0, root}: see
--     debit.lua;
--   {6, 0} when the idempotency key was used for another call.

local replay = idem_replay()
if replay then return replay end
local _, refused = open_path(4)
if refused then return refused end
catch_up()

local prefix = 'l.'
if ARGV[9] ~= '' then prefix = 'l.' .. ARGV[9] end
local removed = 0
for _, field in ipairs(redis.call('HKEYS', ctx.acct)) do
  -- Per-model states of a limit are 'l.<name>.<model>'.
  local rest = string.sub(field, #prefix + 1, #prefix + 1)
  if string.sub(field, 1, #prefix) == prefix and (ARGV[9] == '' or rest == '' or rest == '.') then
    redis.call('HDEL', ctx.acct, field)
    removed = removed + 1
  end
end
local seq = journal('limit_reset', 0, 0, {'f', ARGV[9]})
return idem_store({OK, 0, removed, seq})
