-- wrk script for the mesh-filters benchmark: every request carries the headers
-- our filters key on, cycling through many distinct values:
--   x-api-key  key-<n>     (ratelimit: one bucket per key)
--   x-user-id  user-<n>    (lb-hints: sticky target per user)
--   x-tenant   gold | silver | bronze   (metrics: custom label; bronze folds into "other")
-- Every benchmark case gets the same requests, so the load generator's own cost
-- is the same for all of them.
--
--   wrk -t1 -c16 -d10s --latency -s envoy/bench/keys.lua http://127.0.0.1:18001/api/items -- [keys] [unique]
--
-- keys (default 10000): how many distinct keys to cycle through (pre-built requests).
-- "unique": a fresh key for every request instead (for the memory measurement).
-- At the end it prints one line "BENCH {json}" (latencies in microseconds).

local keys = 10000
local unique = false
local requests = {}
local n = 0
local tenants = { "gold", "silver", "bronze" }

local function build(k)
  return wrk.format(nil, nil, {
    ["x-api-key"] = "key-" .. k,
    ["x-user-id"] = "user-" .. k,
    ["x-tenant"] = tenants[k % 3 + 1],
  })
end

function init(args)
  keys = tonumber(args[1]) or keys
  unique = args[2] == "unique"
  if not unique then
    for k = 1, keys do
      requests[k] = build(k)
    end
  end
end

function request()
  n = n + 1
  if unique then
    return build(n)
  end
  if n > keys then
    n = 1
  end
  return requests[n]
end

function done(summary, latency, _)
  local non2xx = summary.errors.status
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "mean_us": %.1f, ' ..
    '"non_2xx_3xx": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean,
    non2xx, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
