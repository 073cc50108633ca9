-- sync_lease: one syncer's claim on a journal partition, so that each
-- partition is read by one syncer at a time and its entries reach PostgreSQL
-- in order. A lease lapses by itself when its syncer stops renewing it (it
-- died, or lost Redis): another syncer then takes the partition over.
--
-- KEYS[1]     the partition's lease key
-- ARGV[1]     the syncer's name (its consumer name in the group)
-- ARGV[2]     lease time, ms
-- ARGV[3]     'hold' to take the lease if free or renew it if ours;
--             'release' to give it up if ours
--
-- Returns 1 when the lease is ours after the call ('hold') or was ours
-- ('release'); 0 when another syncer holds it.

local owner = redis.call('GET', KEYS[1])
if ARGV[3] == 'release' then
  if owner ~= ARGV[1] then return 0 end
  redis.call('DEL', KEYS[1])
  return 1
end
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
