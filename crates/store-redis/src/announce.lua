-- sluice: tells every instance's local deny cache (crates/store-redis/src/deny_cache.rs)
-- that these counters may admit sooner now, from inside the script that moved them, so
-- the message leaves Redis with the change: PUBLISH on `channel` the letter 'k' and each
-- key as '<length in bytes>:<key>'. pcall: a user whose ACL grants no channel still moves
-- its counters (its instances cannot subscribe either, so none of them caches).
local function announce(channel, keys)
  if #keys == 0 or not channel or channel == '' then return end
  local parts = { 'k' }
  for i = 1, #keys do parts[#parts + 1] = #keys[i] .. ':' .. keys[i] end
  redis.pcall('PUBLISH', channel, table.concat(parts))
end
