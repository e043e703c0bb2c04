-- sluice: move counters by signed amounts, on the Redis server's clock (`now`, the state
-- helpers and normalize come from state.lua): a refund (Store::refund, and what a
-- cluster decision gives back when another slot denied), a settlement (Store::settle),
-- or the release of a reservation another slot denied.
-- Mirrors crates/engine/src/algorithm.rs (Window::refund, Window::force) and
-- crates/engine/src/reservation.rs (settle), and the memory store's hold records.
--
-- A negative amount gives back (Window::refund): gcra moves the TAT back by that many
-- intervals, never before now; fixed windows decrement the current window's count;
-- sliding windows decrement the current count first, then the previous one; never
-- below zero; absent or expired counters are left alone. A positive amount is charged
-- whatever the limit says (Window::force, debt): gcra pushes the TAT, at most
-- MAX_DEBT past now; counts grow, to at most MAX_DEBT.
--
-- A hold's key holds 'open:<digest>' until it is settled, then 'settled:<digest>'
-- (same expiry); it is gone once expired. A concurrency window's holders are a sorted
-- set (state.lua).
--
-- KEYS: the distinct counters moved (as decide.lua's), all in one cluster slot; with a
--   hold, then the hold's key.
-- ARGV[1]: what to do with the hold: '' none (move unconditionally); 'settle' (only if
--   the hold is open with this digest, and then mark it settled); 'release' (the
--   reservation was denied by another slot: forget the hold, unconditionally).
-- ARGV[2]: the hold's id; ARGV[3]: its digest ('' without a hold).
-- ARGV[4]: the number of windows n; then 6 values per window: slot (1-based index into
--   KEYS), algorithm ('g', 'f', 's', 'c'), capacity, period (µs), gcra interval (µs),
--   amount (signed, at most MAX_DEBT either way). With a hold, a concurrency window
--   ('c') gives the hold's slot back (its amount is 0).
-- ARGV[5 + 6n]: the deny cache's channel: the counters given back (a refund, a slot
--   freed) are announced on it (announce.lua).
-- Returns 1 when applied, 2 when the hold was settled before, 3 when no open hold has
--   this id and digest (nothing moved then).

local mode = ARGV[1]
local hold_id, digest = ARGV[2], ARGV[3]
local n = tonumber(ARGV[4])

if mode == 'settle' then
  local hold = KEYS[#KEYS]
  local value = redis.call('GET', hold)
  if value == 'settled:' .. digest then return 2 end
  if value ~= 'open:' .. digest then return 3 end
  redis.call('SET', hold, 'settled:' .. digest, 'KEEPTTL')
elseif mode == 'release' then
  redis.call('DEL', KEYS[#KEYS])
end

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

-- Window::force: the state after charging `cost` past the limit.
local function force(w, st, cost)
  local cur = normalize(w, st)
  if w.alg == 'g' then
    local tat = cur.tat + cost * w.interval
    if tat > now + MAX_DEBT then tat = now + MAX_DEBT end
    return { tat = tat }
  end
  local count = cur.count + cost
  if count > MAX_DEBT then count = MAX_DEBT end
  if w.alg == 'f' then return { start = cur.start, count = count } end
  return { start = cur.start, count = count, prev = cur.prev }
end

local states = {}
local algs = {}
local windows = {}
for i = 1, n do
  local b = 4 + (i - 1) * 6
  local w = window_args(ARGV, b)
  w.amount = tonumber(ARGV[b + 6])
  windows[i] = w
  if algs[w.slot] == nil then
    algs[w.slot] = w
    if w.alg ~= 'c' then
      states[w.slot] = parse(w.alg, redis.call('GET', KEYS[w.slot])) or false
    end
  end
end

local channel = ARGV[5 + 6 * n]
local dirty = {}
-- Counters that may admit sooner now: what the deny caches must forget.
local gave = {}
for i = 1, n do
  local w = windows[i]
  if w.alg == 'c' then
    if mode ~= '' and not dirty[w.slot] then
      -- The reservation's slot comes back at once.
      redis.call('ZREM', KEYS[w.slot], hold_id)
      expire_holders(KEYS[w.slot])
      dirty[w.slot] = true
      gave[w.slot] = true
    end
  else
    local after
    if w.amount < 0 then
      after = refund(w, states[w.slot] or nil, -w.amount)
      if after then gave[w.slot] = true end
    elseif w.amount > 0 then
      after = force(w, states[w.slot] or nil, w.amount)
    end
    if after then
      states[w.slot] = after
      dirty[w.slot] = true
    end
  end
end

for slot, _ in pairs(dirty) do
  local w = algs[slot]
  if w.alg ~= 'c' then write(KEYS[slot], w, states[slot]) end
end
local given = {}
for slot, _ in pairs(gave) do given[#given + 1] = KEYS[slot] end
announce(channel, given)
return 1
