-- wrk script: reserve + settle pairs (POST /v1/reserve, then POST /v1/settle with the
-- token it answered), keys cycling through a fixed key space.
--
--   wrk -t2 -c64 -d20s --latency -s bench/reserve.lua http://127.0.0.1:PORT \
--       -- [keys=10000] [limit=api]
--
-- Each thread keeps the tokens its reservations answered; the next request of any of
-- its connections settles one (at cost 1, the estimate) when there is one, else
-- reserves. done() prints how many of each were answered, and the pairs: settlements.

local threads = {}
local thread_index = 0

function setup(thread)
   thread:set("id", thread_index)
   thread_index = thread_index + 1
   table.insert(threads, thread)
end

local bodies = {}
local nbodies = 0
local i = 0
local tokens = {}

statuses = {}
non200 = 0
reserved = 0
denied = 0
settled = 0
sample_error = nil

local function opt(args, name, default)
   for _, a in ipairs(args) do
      local k, v = a:match("^([%w_]+)=(.*)$")
      if k == name then return v end
   end
   return default
end

function init(args)
   local keys = tonumber(opt(args, "keys", "10000"))
   local limit = opt(args, "limit", "api")
   for n = 0, keys - 1 do
      bodies[n + 1] = string.format('{"checks":[{"limit":"%s","key":"k%d"}]}', limit, n)
   end
   nbodies = keys
   i = ((id or 0) * 7919) % nbodies
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
end

function request()
   local token = table.remove(tokens)
   if token then
      return wrk.format(nil, "/v1/settle", nil,
         '{"reservation":"' .. token .. '","cost":1}')
   end
   i = i + 1
   if i > nbodies then i = 1 end
   return wrk.format(nil, "/v1/reserve", nil, bodies[i])
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   if status ~= 200 then
      non200 = non200 + 1
      if sample_error == nil then
         sample_error = tostring(status) .. " " .. string.sub(body or "", 1, 200)
      end
      return
   end
   local token = body and body:match('"reservation":"([^"]+)"')
   if token then
      reserved = reserved + 1
      table.insert(tokens, token)
   elseif body and body:match('"settled":true') then
      settled = settled + 1
   else
      denied = denied + 1
   end
end

function done(summary, latency, requests)
   local codes = {}
   local t_non200, t_reserved, t_denied, t_settled = 0, 0, 0, 0
   local first_error = nil
   for _, t in ipairs(threads) do
      local st = t:get("statuses")
      if st then
         for code, n in pairs(st) do codes[code] = (codes[code] or 0) + n end
      end
      t_non200 = t_non200 + (t:get("non200") or 0)
      t_reserved = t_reserved + (t:get("reserved") or 0)
      t_denied = t_denied + (t:get("denied") or 0)
      t_settled = t_settled + (t:get("settled") or 0)
      first_error = first_error or t:get("sample_error")
   end
   io.write("------------------------------\n")
   io.write("status codes:")
   local sorted = {}
   for code in pairs(codes) do table.insert(sorted, code) end
   table.sort(sorted)
   for _, code in ipairs(sorted) do io.write(string.format(" %d=%d", code, codes[code])) end
   io.write("\n")
   io.write(string.format("non-200 responses: %d\n", t_non200))
   if first_error then io.write("first non-200: " .. first_error .. "\n") end
   io.write(string.format("reservations: allowed=%d denied=%d settled=%d\n",
      t_reserved, t_denied, t_settled))
   io.write(string.format("pairs/sec: %.2f\n", t_settled / (summary.duration / 1000000)))
end
