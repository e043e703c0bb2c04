-- sluice: give back what one decision charged, for a Redis Cluster decision whose
-- checks live in several slots and that another slot denied (see slots.rs). Mirrors
-- the state formats of decide.lua.
--
-- KEYS: the distinct counters to refund.
-- ARGV[1]: the time the charge was made (µs, decide.lua's `now` on this node);
-- ARGV[2]: the number of windows n; then 5 values per window: slot (1-based index into
--   KEYS), algorithm ('g', 'f', 's'), period (µs), gcra interval (µs), cost.
-- A window whose period has moved on keeps its state: the charge has expired with it
-- (a sliding window's previous period still counts, so that is where it is taken from).
-- Returns the number of windows refunded.

local charged_at = tonumber(ARGV[1])
local n = tonumber(ARGV[2])

local function idiv(a, b)
  local q = math.floor(a / b)
  local r = a - q * b
  if r < 0 then q = q - 1 elseif r >= b then q = q + 1 end
  return q
end

local refunded = 0
for i = 1, n do
  local b = 2 + (i - 1) * 5
  local key = KEYS[tonumber(ARGV[b + 1])]
  local alg = ARGV[b + 2]
  local period = tonumber(ARGV[b + 3])
  local interval = tonumber(ARGV[b + 4])
  local cost = tonumber(ARGV[b + 5])
  local raw = redis.call('GET', key)
  if raw then
    if alg == 'g' then
      local tat = string.match(raw, '^(%-?%d+)$')
      if tat then
        -- A tat earlier than now is an empty bucket: nothing below it to protect.
        redis.call('SET', key, string.format('%d', tonumber(tat) - cost * interval), 'KEEPTTL')
        refunded = refunded + 1
      end
    else
      local start = idiv(charged_at, period) * period
      if alg == 'f' then
        local s, c = string.match(raw, '^(%-?%d+):(%d+)$')
        if s and tonumber(s) == start then
          local left = math.max(tonumber(c) - cost, 0)
          redis.call('SET', key, string.format('%d:%d', start, left), 'KEEPTTL')
          refunded = refunded + 1
        end
      else
        local s, c, p = string.match(raw, '^(%-?%d+):(%d+):(%d+)$')
        if s then
          s, c, p = tonumber(s), tonumber(c), tonumber(p)
          if s == start then
            c = math.max(c - cost, 0)
          elseif s == start + period then
            p = math.max(p - cost, 0)
          end
          if s == start or s == start + period then
            redis.call('SET', key, string.format('%d:%d:%d', s, c, p), 'KEEPTTL')
            refunded = refunded + 1
          end
        end
      end
    end
  end
end
return refunded
