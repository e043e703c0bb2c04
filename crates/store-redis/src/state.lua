-- sluice: what every script of the Redis store shares, put in front of each one when it
-- is loaded (crates/store-redis/src/lib.rs concatenates them): the Redis server's clock,
-- integer division, and the stored states. Times are microseconds since the Unix epoch;
-- Lua numbers are doubles, exact below 2^53.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- floor(a / b) for non-negative integers, corrected for the rounding of the division.
local function idiv(a, b)
  local q = math.floor(a / b)
  local r = a - q * b
  if r < 0 then q = q - 1 elseif r >= b then q = q + 1 end
  return q
end

local function window_start(period)
  return now - (now - idiv(now, period) * period)
end

-- Stored states: gcra "tat"; fixed "start:count"; sliding "start:count:previous".
local function parse(alg, raw)
  if not raw then return nil end
  if alg == 'g' then
    local tat = string.match(raw, '^(%-?%d+)$')
    if tat then return { tat = tonumber(tat) } end
  elseif alg == 'f' then
    local s, c = string.match(raw, '^(%-?%d+):(%d+)$')
    if s then return { start = tonumber(s), count = tonumber(c) } end
  else
    local s, c, p = string.match(raw, '^(%-?%d+):(%d+):(%d+)$')
    if s then return { start = tonumber(s), count = tonumber(c), prev = tonumber(p) } end
  end
  return nil
end

local function encode(alg, st)
  if alg == 'g' then return string.format('%d', st.tat) end
  if alg == 'f' then return string.format('%d:%d', st.start, st.count) end
  return string.format('%d:%d:%d', st.start, st.count, st.prev)
end

local function expires_at(w, st)
  if w.alg == 'g' then return st.tat end
  if w.alg == 'f' then return st.start + w.period end
  if st.count > 0 then return st.start + 2 * w.period end
  return st.start + w.period
end
