-- move_done: the end of a move (see move_out.lua), in the partition the
-- account left, once it lives at its new place: its tombstone is marked
-- done and drops the snapshot. A retry of the move then answers at once,
-- and another move may bring the account back to this place.
--
-- KEYS[1]  the tombstone (the account's hash at its old place)
-- ARGV[1]  the move's id
--
-- Returns {0, 0, 1 when marked now, 0 when there was nothing to mark}.

local v = redis.call('HMGET', KEYS[1], 'c', 'M', 'F')
if v[1] or v[2] ~= ARGV[1] or v[3] then return {0, 0, 0} end
redis.call('HSET', KEYS[1], 'F', 1)
redis.call('HDEL', KEYS[1], 'X')
return {0, 0, 1}
