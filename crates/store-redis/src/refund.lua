-- sluice: give back what an earlier decision charged, on the Redis server's clock
-- (`now` and the state helpers come from state.lua).
-- Mirrors crates/engine/src/algorithm.rs (Window::refund): gcra moves the TAT back by
-- cost intervals, never before now; fixed windows decrement the current window's count;
-- sliding windows decrement the current count first, then the previous one; never below
-- zero. Absent or expired counters are left alone.
--
-- KEYS: the distinct counters refunded (as decide.lua's), all in one cluster slot.
-- ARGV[1]: the number of windows n; then 6 values per window: slot (1-based index into
--   KEYS), algorithm ('g', 'f', 's'), capacity, period (µs; -1: a UTC calendar month, as
--   for decide.lua), gcra interval (µs), cost.
-- Returns the number of counters written.

local n = tonumber(ARGV[1])

-- Window::refund: the state after giving back `cost`, or nil when nothing changes.
local function refund(w, st, cost)
  if not st or cost == 0 then return nil end
  if w.alg == 'g' then
    if st.tat <= now then return nil end
    local tat = st.tat - cost * w.interval
    if tat < now then tat = now end
    return { tat = tat }
  end
  local start = window_start(w.period)
  if w.alg == 'f' then
    if st.start < start or st.count == 0 then return nil end
    local count = st.count - cost
    if count < 0 then count = 0 end
    return { start = st.start, count = count }
  end
  local cur
  if st.start >= start then
    cur = { start = st.start, count = st.count, prev = st.prev }
  elseif st.start == start - w.period then
    cur = { start = start, count = 0, prev = st.count }
  else
    return nil
  end
  local from_count = math.min(cur.count, cost)
  local from_prev = math.min(cur.prev, cost - from_count)
  if from_count == 0 and from_prev == 0 then return nil end
  return { start = cur.start, count = cur.count - from_count, prev = cur.prev - from_prev }
end

local states = {}
local algs = {}
local windows = {}
for i = 1, n do
  local b = 1 + (i - 1) * 6
  local w = {
    slot = tonumber(ARGV[b + 1]), alg = ARGV[b + 2], cap = tonumber(ARGV[b + 3]),
    period = tonumber(ARGV[b + 4]), interval = tonumber(ARGV[b + 5]), cost = tonumber(ARGV[b + 6]),
  }
  windows[i] = w
  if algs[w.slot] == nil then
    algs[w.slot] = w
    states[w.slot] = parse(w.alg, redis.call('GET', KEYS[w.slot])) or false
  end
end

local dirty = {}
for i = 1, n do
  local w = windows[i]
  local after = refund(w, states[w.slot] or nil, w.cost)
  if after then
    states[w.slot] = after
    dirty[w.slot] = true
  end
end

local written = 0
for slot, _ in pairs(dirty) do
  local w = algs[slot]
  local st = states[slot]
  local ms = idiv(expires_at(w, st) + 999, 1000)
  redis.call('SET', KEYS[slot], encode(w.alg, st), 'PXAT', string.format('%d', ms))
  written = written + 1
end
return written
