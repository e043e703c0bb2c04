-- sluice: forgets counters (Store::reset) and announces it (announce.lua).
-- KEYS: the counters, all in one cluster slot (one check's windows share a hash tag).
-- ARGV[1]: the deny cache's channel. Returns how many keys were removed.
local removed = redis.call('UNLINK', unpack(KEYS))
announce(ARGV[1], KEYS)
return removed
