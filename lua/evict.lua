-- evict: drop an idle account from Redis when PostgreSQL holds all of it, so
-- memory stays bounded; the next call loads it back from PostgreSQL.
--
-- KEYS[1]     account hash
-- KEYS[2]     holds sorted set
-- ARGV[1]     minimum idle time, ms (Redis's own idle clock of the key)
-- ARGV[2]     last sequence number PostgreSQL has applied for the account
-- ARGV[3]     PostgreSQL's credits
-- ARGV[4]     PostgreSQL's chat messages
--
-- Returns 1 when evicted; 0 when absent (or a tree member's stub); 2 when it has holds (even lapsed
-- ones: their lapse is still to be journaled); 3 when Redis and PostgreSQL
-- differ: entries not in PostgreSQL yet, or a history that forked from
-- PostgreSQL's (reloading it would drop the fork's change); 4 when it was
-- used too recently.

-- Read the idle time before anything touches the key and resets it.
local idle = redis.call('OBJECT', 'IDLETIME', KEYS[1])
if not idle then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
local v = redis.call('HMGET', KEYS[1], 'h', 's', 'c', 'm')
-- The stub a tree's member leaves in its own partition holds no balances.
if not v[3] then return 0 end
if tonumber(v[1]) ~= 0 then return 2 end
for i = 2, 4 do
  if tonumber(v[i]) ~= tonumber(ARGV[i]) then return 3 end
end
if idle * 1000 < tonumber(ARGV[1]) then return 4 end
redis.call('DEL', KEYS[1])
return 1
