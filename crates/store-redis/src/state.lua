-- sluice: what every script of the Redis store shares, put in front of each one when it
-- is loaded (crates/store-redis/src/lib.rs concatenates them): the Redis server's clock,
-- integer division, window bounds (calendar months too), the stored states and how
-- they stand now, and a concurrency window's holders. Times are microseconds since the
-- Unix epoch; Lua numbers are doubles, exact below 2^53.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

-- MAX_DEBT_MICROS (crates/engine/src/algorithm.rs): how far past now a forced charge may
-- push a gcra TAT. Also the most a window's count may hold, so counts stay exact.
local MAX_DEBT = 1125899906842624

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

-- An integer as Redis arguments want it (tostring would write 1.7e+15).
local function int(x)
  return string.format('%d', x)
end

-- The five values every script takes first for a window, from argv[b + 1] (the
-- script's ARGV, or one request's part of it in a batch): slot (1-based index into
-- KEYS), algorithm, capacity, period (µs), gcra interval (µs).
local function window_args(argv, b)
  return {
    slot = tonumber(argv[b + 1]), alg = argv[b + 2], cap = tonumber(argv[b + 3]),
    period = tonumber(argv[b + 4]), interval = tonumber(argv[b + 5]),
  }
end

-- Stored states: gcra "tat"; fixed "start:count"; sliding "start:count:previous".
-- A concurrency window is not a string but a sorted set (see `holders` below).
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
  if alg == 'g' then return int(st.tat) end
  if alg == 'f' then return string.format('%d:%d', st.start, st.count) end
  return string.format('%d:%d:%d', st.start, st.count, st.prev)
end

local function expires_at(w, st)
  if w.alg == 'g' then return st.tat end
  if w.alg == 'f' then return window_end(w.period, st.start) end
  if st.count > 0 then return st.start + 2 * w.period end
  return st.start + w.period
end

-- Writes a rate window's state and keeps it exactly as long as it matters: PXAT (on the
-- same clock as TIME) at the engine's expires_at, rounded up to the millisecond.
local function write(key, w, st)
  redis.call('SET', key, encode(w.alg, st), 'PXAT', int(idiv(expires_at(w, st) + 999, 1000)))
end

-- Window::normalize: a stored state (nil: absent) brought to now.
local function normalize(w, st)
  if w.alg == 'g' then
    if st and st.tat > now then return { tat = st.tat } end
    return { tat = now }
  end
  if w.alg == 'c' then
    if st and st.open > 0 then
      if st.free_at > now then return { open = st.open, free_at = st.free_at } end
      return { open = st.open, free_at = now }
    end
    return { open = 0, free_at = now }
  end
  local start = window_start(w.period)
  if w.alg == 'f' then
    -- A state from a later window (a decision whose clock read later) is current.
    if st and st.start >= start then return { start = st.start, count = st.count } end
    return { start = start, count = 0 }
  end
  if st then
    if st.start >= start then return { start = st.start, count = st.count, prev = st.prev } end
    if st.start == start - w.period then return { start = start, count = 0, prev = st.count } end
  end
  return { start = start, count = 0, prev = 0 }
end

-- A concurrency window's holders are a sorted set at its key: one member per open
-- reservation (its id), scored by the reservation's expiry. Members scored at or
-- before now have expired and do not count. The state: how many are open, and when
-- the first of them expires.
local function holders(key)
  local live = '(' .. int(now)
  local open = redis.call('ZCOUNT', key, live, '+inf')
  if open == 0 then return { open = 0, free_at = now } end
  local first = redis.call('ZRANGEBYSCORE', key, live, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  return { open = open, free_at = tonumber(first[2]) }
end

-- Keeps the holders' set exactly as long as its last holder (PXAT rounded up to the
-- millisecond; a set left with expired holders only goes at once, an empty one is gone).
local function expire_holders(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIREAT', key, int(idiv(tonumber(last[2]) + 999, 1000)))
  end
end
