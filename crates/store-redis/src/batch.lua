
-- sluice: several decisions in one script call (lib.rs `Batcher`), each exactly as
-- decide.lua alone would decide it, one after the other: `decide_one` is decide.lua's
-- text with KEYS and ARGV as parameters (lib.rs wraps it), so every request sees the
-- writes of the ones before it, as separate calls would. A request whose decision
-- raises an error answers that error and the others go on.
--
-- KEYS: every request's keys, request after request.
-- ARGV[1]: the number of requests m; then, for each request, its key count and its
--   argument count (2m values); then every request's arguments (decide.lua's ARGV),
--   request after request.
-- Returns, per request: the number of values c and then its c integers (decide.lua's
--   reply), or -1 and the error's text.

local m = tonumber(ARGV[1])
local next_key, next_arg = 1, 2 + 2 * m
local out = {}
for r = 1, m do
  local key_count = tonumber(ARGV[2 * r])
  local arg_count = tonumber(ARGV[2 * r + 1])
  local keys, argv = {}, {}
  for i = 1, key_count do keys[i] = KEYS[next_key + i - 1] end
  for i = 1, arg_count do argv[i] = ARGV[next_arg + i - 1] end
  next_key = next_key + key_count
  next_arg = next_arg + arg_count
  local ok, reply = pcall(decide_one, keys, argv)
  if ok then
    out[#out + 1] = #reply
    for i = 1, #reply do out[#out + 1] = reply[i] end
  else
    out[#out + 1] = -1
    -- redis.call's errors are tables ({err = text}); Lua's own are strings.
    if type(reply) == 'table' and reply.err then reply = reply.err end
    out[#out + 1] = tostring(reply)
  end
end
return out
