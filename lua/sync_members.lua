-- sync_members: the syncers alive, so that each can work out its share of
-- the partitions. A syncer that stops calling this drops out by itself.
--
-- KEYS[1]     sorted set of syncer names, scored by when each drops out (ms)
-- ARGV[1]     the calling syncer's name
-- ARGV[2]     how long it stays in without calling again, ms
-- ARGV[3]     '1' to leave now (a syncer shutting down), '0' to stay
--
-- Returns the names of the syncers still in, the caller included unless it left.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('ZRANGE', KEYS[1], 0, -1)
