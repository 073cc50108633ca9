-- locate: where an account stands, read before a move (see move_out.lua):
-- the fields of one of its hashes, without changing anything.
--
-- KEYS[1]  an account hash (its own partition's, or a tree's)
--
-- Returns {credits or false, parent P, root R, move id M, done F,
--          destination D, old path Q}, each false when absent.

return redis.call('HMGET', KEYS[1], 'c', 'P', 'R', 'M', 'F', 'D', 'Q')
