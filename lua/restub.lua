-- restub: the last steps of a move (see move_out.lua), in the account's own
-- partition: its stub names the root of the tree it is in now, so a call
-- naming it without its path is refused (IN_TREE) with the right root.
-- Harmless to run again; nothing to do where the account itself lives.
--
-- KEYS[1]  the account's hash in its own partition
-- ARGV[1]  the root of its tree now
--
-- Returns {0, 0, 1 when the stub was set, 0 when the account lives there}.

if redis.call('HEXISTS', KEYS[1], 'c') == 1 then return {0, 0, 0} end
redis.call('HSET', KEYS[1], 'R', ARGV[1])
return {0, 0, 1}
