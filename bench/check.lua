-- wrk script: POST /v1/check with keys cycling through a fixed key space.
--
--   wrk -t2 -c64 -d20s --latency -s bench/check.lua http://127.0.0.1:PORT/v1/check \
--       -- [checks=1|2] [keys=10000] [limit=api] [limit2=api_ip] [ips=256]
--
-- checks=1: {"checks":[{"limit":"api","key":"k<N>"}]}
-- peer=throttlecrab: the same load in throttlecrab-server's API (POST /throttle):
--   {"key":"k<N>","max_burst":100,"count_per_period":100,"period":1,"quantity":1}
--   (GCRA, 100 per second per key: the benchmark's `api: {rate: 100/second}`)
-- checks=2: {"checks":[{"limit":"api","key":"k<N>"},{"limit":"api_ip","key":"ip<M>"}]}
--
-- Bodies are precomputed in init(); each thread starts at a different offset.
-- done() prints the status-code histogram (non-200 answers are called out)
-- and how many decisions were allowed/denied, summed over all threads.

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

-- per-thread counters (read back in done() with thread:get)
statuses = {}
non200 = 0
allowed = 0
denied = 0
unparsed = 0
sample_error = nil

local function opt(args, name, default)
   for _, a in ipairs(args) do
      local k, v = a:match("^([%w_]+)=(.*)$")
      if k == name then return v end
   end
   return default
end

function init(args)
   local checks = tonumber(opt(args, "checks", "1"))
   local keys = tonumber(opt(args, "keys", "10000"))
   local limit = opt(args, "limit", "api")
   local limit2 = opt(args, "limit2", "api_ip")
   local ips = tonumber(opt(args, "ips", "256"))
   local peer = opt(args, "peer", "")
   for n = 0, keys - 1 do
      local body
      if peer == "throttlecrab" then
         body = string.format(
            '{"key":"k%d","max_burst":100,"count_per_period":100,"period":1,"quantity":1}', n)
      elseif checks == 2 then
         body = string.format(
            '{"checks":[{"limit":"%s","key":"k%d"},{"limit":"%s","key":"ip%d"}]}',
            limit, n, limit2, n % ips)
      else
         body = string.format('{"checks":[{"limit":"%s","key":"k%d"}]}', limit, n)
      end
      bodies[n + 1] = body
   end
   nbodies = keys
   -- spread threads over the key space
   i = ((id or 0) * 7919) % nbodies
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
end

function request()
   i = i + 1
   if i > nbodies then i = 1 end
   return wrk.format(nil, nil, nil, bodies[i])
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
   -- the decision's own "allowed" is the first one in the body when the
   -- server writes `allowed` first (docs/design/front-doors.md, "Decision API");
   -- otherwise count it as unparsed
   local a = body and body:match('^%s*{%s*"allowed"%s*:%s*(%a+)')
   if a == "true" then
      allowed = allowed + 1
   elseif a == "false" then
      denied = denied + 1
   else
      unparsed = unparsed + 1
   end
end

function done(summary, latency, requests)
   local codes = {}
   local total_non200, total_allowed, total_denied, total_unparsed = 0, 0, 0, 0
   local first_error = nil
   for _, t in ipairs(threads) do
      local st = t:get("statuses")
      if st then
         for code, n in pairs(st) do
            codes[code] = (codes[code] or 0) + n
         end
      end
      total_non200 = total_non200 + (t:get("non200") or 0)
      total_allowed = total_allowed + (t:get("allowed") or 0)
      total_denied = total_denied + (t:get("denied") or 0)
      total_unparsed = total_unparsed + (t:get("unparsed") or 0)
      first_error = first_error or t:get("sample_error")
   end
   local e = summary.errors
   io.write("------------------------------\n")
   io.write("status codes:")
   local sorted = {}
   for code in pairs(codes) do table.insert(sorted, code) end
   table.sort(sorted)
   for _, code in ipairs(sorted) do
      io.write(string.format(" %d=%d", code, codes[code]))
   end
   io.write("\n")
   io.write(string.format("non-200 responses: %d\n", total_non200))
   if first_error then
      io.write("first non-200: " .. first_error .. "\n")
   end
   io.write(string.format("decisions: allowed=%d denied=%d unparsed=%d\n",
      total_allowed, total_denied, total_unparsed))
   io.write(string.format("socket errors: connect=%d read=%d write=%d timeout=%d status(>399)=%d\n",
      e.connect, e.read, e.write, e.timeout, e.status))
end
