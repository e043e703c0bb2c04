-- sluice: what every script of the Redis store shares, put in front of each one when it
-- is loaded (crates/store-redis/src/lib.rs concatenates them): the Redis server's clock,
-- integer division, window bounds (calendar months too), and the stored states. Times
-- are microseconds since the Unix epoch; Lua numbers are doubles, exact below 2^53.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- floor(a / b) for non-negative integers, corrected for the rounding of the division.
local function idiv(a, b)
  local q = math.floor(a / b)
  local r = a - q * b
  if r < 0 then q = q - 1 elseif r >= b then q = q + 1 end
  return q
end

-- UTC calendar months, for N/month windows (period -1): Howard Hinnant's
-- days_from_civil and civil_from_days, as crates/engine/src/calendar.rs writes them, with
-- idiv for every division (days stay far below 2^53, and so do their microseconds).
local DAY = 86400000000

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = idiv(y, 400)
  local yoe = y - era * 400
  local mp
  if m > 2 then mp = m - 3 else mp = m + 9 end
  local doy = idiv(153 * mp + 2, 5) + d - 1
  local doe = yoe * 365 + idiv(yoe, 4) - idiv(yoe, 100) + doy
  return era * 146097 + doe - 719468
end

-- The year and month of the day `days` days after 1970-01-01.
local function civil_from_days(days)
  local z = days + 719468
  local era = idiv(z, 146097)
  local doe = z - era * 146097
  local yoe = idiv(doe - idiv(doe, 1460) + idiv(doe, 36524) - idiv(doe, 146096), 365)
  local doy = doe - (365 * yoe + idiv(yoe, 4) - idiv(yoe, 100))
  local mp = idiv(5 * doy + 2, 153)
  local m
  if mp < 10 then m = mp + 3 else m = mp - 9 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

-- The start of the UTC calendar month holding t, moved on by `add` months (0 or 1).
local function month_start(t, add)
  local y, m = civil_from_days(idiv(t, DAY))
  m = m + add
  if m > 12 then
    m = m - 12
    y = y + 1
  end
  return days_from_civil(y, m, 1) * DAY
end

-- The start of the window holding now: epoch-aligned multiples of period, or (period
-- < 0) the UTC calendar month.
local function window_start(period)
  if period < 0 then return month_start(now, 0) end
  return now - (now - idiv(now, period) * period)
end

-- Where the window starting at `start` ends: months differ in length.
local function window_end(period, start)
  if period < 0 then return month_start(start, 1) end
  return start + period
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
  if w.alg == 'f' then return window_end(w.period, st.start) end
  if st.count > 0 then return st.start + 2 * w.period end
  return st.start + w.period
end
