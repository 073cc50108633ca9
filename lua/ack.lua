-- ack: acknowledge journal entries that PostgreSQL has committed, and delete
-- them from the stream. Both in one step, so an entry is never acknowledged
-- yet left behind, nor deleted while still unacknowledged.
--
-- KEYS[1]     a partition's journal stream
-- ARGV[1]     consumer group of the syncers
-- ARGV[2..n]  stream ids of the committed entries
--
-- Returns the number of entries deleted.

redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
