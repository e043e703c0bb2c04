-- wrk script: GET /v1/forward-auth as nginx auth_request sends it, one of KEYS users
-- per request (X-User-Id). Statuses are counted per thread and summed in done().
local keys = tonumber(os.getenv("KEYS") or "10000")
local threads = {}
local thread_index = 0

function setup(thread)
  thread:set("id", thread_index)
  thread_index = thread_index + 1
  table.insert(threads, thread)
end

statuses = {}
local counter = 0

function init(args)
  counter = (id or 0) * 7919
end

function request()
  counter = counter + 1
  return wrk.format("GET", "/v1/forward-auth", {
    ["X-Original-URI"] = "/chat/message",
    ["X-Original-Method"] = "POST",
    ["X-User-Id"] = "u" .. (counter % keys),
  })
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local totals = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses") or {}) do
      totals[code] = (totals[code] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(totals) do
    table.insert(parts, code .. "=" .. n)
  end
  io.write("status codes: " .. table.concat(parts, " ") .. "\n")
end
