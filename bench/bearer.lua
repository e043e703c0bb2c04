-- wrk script: GET requests carrying `Authorization: Bearer <token>`, the tokens read
-- from a file (one per line) and sent in turn, each thread from its own offset.
--
--   wrk -t2 -c64 -d8s --latency -s bench/bearer.lua http://127.0.0.1:PORT/search -- tokens.txt
--
-- done() prints the status-code histogram, so a run whose requests were refused or
-- never keyed on the token is seen.

local threads = {}
local thread_index = 0

function setup(thread)
   thread:set("id", thread_index)
   thread_index = thread_index + 1
   table.insert(threads, thread)
end

local tokens = {}
local i = 0
statuses = {}

function init(args)
   local path = args[1] or error("usage: ... -s bench/bearer.lua URL -- TOKENS_FILE")
   for line in io.lines(path) do
      if #line > 0 then table.insert(tokens, "Bearer " .. line) end
   end
   if #tokens == 0 then error("no tokens in " .. path) end
   i = ((id or 0) * 7919) % #tokens
end

function request()
   i = i + 1
   if i > #tokens then i = 1 end
   return wrk.format(nil, nil, { ["Authorization"] = tokens[i] })
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local codes = {}
   for _, t in ipairs(threads) do
      for code, n in pairs(t:get("statuses") or {}) do
         codes[code] = (codes[code] or 0) + n
      end
   end
   io.write("status codes:")
   for code, n in pairs(codes) do io.write(string.format(" %d=%d", code, n)) end
   io.write("\n")
end
