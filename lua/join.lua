-- join: in an account's own partition, mark it as a member of a tree before
-- attach.lua adds it there, so that a call naming the account without its
-- path is refused (IN_TREE) instead of opening a second account of the same
-- id. Run before attach; running it again is harmless.
--
-- KEYS[1]  the account's hash in its own partition (the member's own hash
--          when the root's partition is the same)
-- ARGV[1]  the root's id
--
-- Returns {0, 0} when marked (or marked already for this root);
--   {18, 0, root} when it is marked for another tree;
--   {19, 0} when the account has a history of its own there.

local v = redis.call('HMGET', KEYS[1], 'c', 'R')
if v[2] then
  if v[2] == ARGV[1] then return {0, 0} end
  return {18, 0, v[2]}
end
if v[1] then return {19, 0} end
redis.call('HSET', KEYS[1], 'R', ARGV[1])
return {0, 0}
