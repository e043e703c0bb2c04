-- sluice: decide every window of one request atomically, on the Redis server's clock
-- (`now`, the state helpers, normalize and a concurrency window's holders come from
-- state.lua); with a hold, reserve (Store::reserve): the same decision, and when it is
-- allowed the hold is recorded and takes a slot of every concurrency window it charged.
-- Mirrors crates/engine/src/algorithm.rs (Window::evaluate, remaining, reset_after,
-- expires_at), crates/engine/src/decision.rs (apply: two passes) and the memory store's
-- reserve (crates/store-memory/src/lib.rs). Times are microseconds since the Unix
-- epoch; Lua numbers are doubles, exact below 2^53.
--
-- KEYS: the distinct counters of the request (prefix .. '{' .. limit .. ':' .. key .. '}:' .. window),
--   all in one cluster slot; with a hold, then the hold's key (see settle.lua).
-- ARGV[1]: '1' for dry_run; ARGV[2]: the number of windows n; then 7 values per window:
--   slot (1-based index into KEYS), algorithm ('g', 'f', 's', 'c'), capacity (gcra
--   burst, concurrency slots, otherwise the quota), period (µs; -1: a UTC calendar month, fixed windows only), gcra interval (µs),
--   cost (already capped at capacity + 1, which decides the same), flags
--   (1: charge_denied, 2: shadow).
--   With a hold, 3 more: its id (a concurrency set's member), its digest, its ttl (µs).
-- Returns 4 integers per window: allowed (1/0), remaining, reset_after (µs),
--   retry_after (µs; -1: never).

local dry_run = ARGV[1] == '1'
local n = tonumber(ARGV[2])
local hold_id = ARGV[3 + 7 * n]
local TWO53 = 9007199254740992

-- floor(a * b / d) and (a * b) mod d for non-negative integers, exact even when the
-- product exceeds 2^53 (quota times a period of months does).
local function muldiv(a, b, d)
  if a * b < TWO53 then
    local p = a * b
    local q = idiv(p, d)
    return q, p - q * d
  end
  local qa = idiv(a, d)
  local ra = a - qa * d
  local bits = {}
  local x = b
  while x > 0 do
    local bit = x % 2
    bits[#bits + 1] = bit
    x = (x - bit) / 2
  end
  -- Binary long multiplication of ra * b, keeping the quotient and remainder by d.
  local q, r = 0, 0
  for i = #bits, 1, -1 do
    q = q * 2
    r = r * 2
    if r >= d then r = r - d; q = q + 1 end
    if bits[i] == 1 then
      r = r + ra
      if r >= d then r = r - d; q = q + 1 end
    end
  end
  return qa * b + q, r
end


local function sliding_used(w, st)
  local left = w.period - (now - st.start)
  if left < 0 then left = 0 elseif left > w.period then left = w.period end
  local q, r = muldiv(st.prev, left, w.period)
  if r > 0 then q = q + 1 end
  return q + st.count
end

-- Window::evaluate: allowed, retry (-1: never), current state, charged state.
local function evaluate(w, st, cost)
  local cur = normalize(w, st)
  if w.alg == 'g' then
    local tau = w.cap * w.interval
    local charged_tat = cur.tat + cost * w.interval
    local allowed = cost == 0 or charged_tat - now <= tau
    local retry
    if allowed then retry = 0 elseif cost > w.cap then retry = -1 else retry = charged_tat - tau - now end
    -- charge_denied locks out for at most one more bucket after the last attempt.
    local bound = now + 2 * tau
    if cur.tat > bound then bound = cur.tat end
    if charged_tat > bound then charged_tat = bound end
    return allowed, retry, cur, { tat = charged_tat }
  elseif w.alg == 'f' then
    local spent = cur.count + cost
    local allowed = cost == 0 or spent <= w.cap
    local retry
    if allowed then retry = 0 elseif cost > w.cap then retry = -1 else retry = window_end(w.period, cur.start) - now end
    return allowed, retry, cur, { start = cur.start, count = spent }
  elseif w.alg == 'c' then
    local held = cur.open + cost
    local allowed = cost == 0 or held <= w.cap
    local retry
    -- A slot may come back sooner (a settle); this is when one must.
    if allowed then retry = 0 elseif cost > w.cap then retry = -1 else retry = cur.free_at - now end
    return allowed, retry, cur, { open = held, free_at = cur.free_at }
  end
  local quota, period = w.cap, w.period
  local used = sliding_used(w, cur)
  local allowed = cost == 0 or used + cost <= quota
  local retry
  if allowed then
    retry = 0
  elseif cost > quota then
    retry = -1
  elseif cur.count + cost > quota then
    local elapsed = period - muldiv(quota - cost, period, cur.count)
    if elapsed < 0 then elapsed = 0 end
    retry = cur.start + period + elapsed - now
  else
    local prev = cur.prev
    if prev < 1 then prev = 1 end
    local elapsed = period - muldiv(quota - cur.count - cost, period, prev)
    retry = cur.start + elapsed - now
  end
  return allowed, retry, cur, { start = cur.start, count = cur.count + cost, prev = cur.prev }
end

local function remaining(w, st)
  if w.alg == 'g' then
    local left = now + w.cap * w.interval - st.tat
    if left < 0 then return 0 end
    return idiv(left, w.interval)
  end
  if w.alg == 'c' then
    if st.open >= w.cap then return 0 end
    return w.cap - st.open
  end
  local used = st.count
  if w.alg == 's' then used = sliding_used(w, st) end
  if used >= w.cap then return 0 end
  return w.cap - used
end

local function reset_after(w, st)
  if w.alg == 'g' then
    if st.tat > now then return st.tat - now end
    return 0
  end
  if w.alg == 'c' then
    if st.open > 0 then return st.free_at - now end
    return 0
  end
  if st.count > 0 then
    if w.alg == 'f' then return window_end(w.period, st.start) - now end
    return st.start + 2 * w.period - now
  end
  if w.alg == 's' and st.prev > 0 then return st.start + w.period - now end
  return 0
end

local windows = {}
local loaded = {}
local slot_alg = {}
for i = 1, n do
  local b = 2 + (i - 1) * 7
  local w = window_args(ARGV, b)
  w.cost = tonumber(ARGV[b + 6])
  local flags = tonumber(ARGV[b + 7])
  w.charge_denied, w.shadow = flags % 2 == 1, flags >= 2
  windows[i] = w
  if slot_alg[w.slot] == nil then
    slot_alg[w.slot] = w.alg
    if w.alg == 'c' then
      loaded[w.slot] = holders(KEYS[w.slot])
    else
      loaded[w.slot] = parse(w.alg, redis.call('GET', KEYS[w.slot])) or false
    end
  end
end

-- Pass 1: every window as if the decision were allowed; repeated counters see each other.
local working = {}
for s, st in pairs(loaded) do working[s] = st end
local out = {}
local decision_allowed = true
for i = 1, n do
  local w = windows[i]
  local allowed, retry, cur, charged = evaluate(w, working[w.slot] or nil, w.cost)
  local after = cur
  if w.cost > 0 and (allowed or (w.charge_denied and retry >= 0)) then
    working[w.slot] = charged
    after = charged
  end
  if not (allowed or w.shadow) then decision_allowed = false end
  out[i] = { allowed and 1 or 0, remaining(w, after), reset_after(w, after), retry }
end

-- Pass 2 (denied): from the stored states, charge only charge_denied windows that could fit.
if not decision_allowed then
  for s, st in pairs(loaded) do working[s] = st end
  for i = 1, n do
    local w = windows[i]
    local _, _, cur, charged = evaluate(w, working[w.slot] or nil, w.cost)
    local after = cur
    if w.cost > 0 and w.charge_denied and out[i][4] >= 0 then
      working[w.slot] = charged
      after = charged
    end
    out[i][2] = remaining(w, after)
    out[i][3] = reset_after(w, after)
  end
end

-- An allowed reservation holds until it is settled or expires.
local holding = hold_id and decision_allowed and not dry_run
local hold_expires = 0
if holding then
  hold_expires = now + tonumber(ARGV[5 + 7 * n])
  redis.call('SET', KEYS[#KEYS], 'open:' .. ARGV[4 + 7 * n], 'PXAT', int(idiv(hold_expires + 999, 1000)))
end

if not dry_run then
  for i = 1, n do
    local w = windows[i]
    local st = working[w.slot]
    if st and st ~= loaded[w.slot] then
      if w.alg ~= 'c' then
        write(KEYS[w.slot], w, st)
      elseif holding then
        -- A slot is taken by a reservation only; a plain decision just reads the window.
        redis.call('ZREMRANGEBYSCORE', KEYS[w.slot], '-inf', int(now))
        redis.call('ZADD', KEYS[w.slot], int(hold_expires), hold_id)
        expire_holders(KEYS[w.slot])
      end
      loaded[w.slot] = st
    end
  end
end

local reply = {}
for i = 1, n do
  local o = out[i]
  reply[#reply + 1] = o[1]
  reply[#reply + 1] = o[2]
  reply[#reply + 1] = o[3]
  reply[#reply + 1] = o[4]
end
return reply
