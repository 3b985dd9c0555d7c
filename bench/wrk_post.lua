-- wrk script of bench/serving.py: POST one fixed JSON body to the URL, then print one JSON summary line.
--
--   wrk -t1 -c64 -d8s --timeout 10s -s bench/wrk_post.lua http://127.0.0.1:8765/predict -- BODY_FILE [TOKEN]
--
-- BODY_FILE holds the request body; TOKEN, when given, is sent as "Authorization: Bearer TOKEN".
-- The last line of output is
--   {"requests": n, "duration_s": s, "rps": r, "p50_ms": .., "p90_ms": .., "p99_ms": .., "max_ms": ..,
--    "mean_ms": .., "errors": {"connect": .., "read": .., "write": .., "status": .., "timeout": ..}}
-- where "status" counts responses that were not 2xx or 3xx.

function init(args)
   local path = args[1]
   if path == nil then
      error("wrk_post.lua needs the body file: wrk ... -s wrk_post.lua URL -- BODY_FILE [TOKEN]")
   end
   local fh = assert(io.open(path, "rb"))
   wrk.body = fh:read("*a")
   fh:close()
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   if args[2] ~= nil and args[2] ~= "" then
      wrk.headers["Authorization"] = "Bearer " .. args[2]
   end
end

local function ms(us)
   return us / 1000.0
end

function done(summary, latency, requests)
   local s = summary.duration / 1e6
   local e = summary.errors
   io.write(string.format(
      '{"requests": %d, "duration_s": %.3f, "rps": %.2f, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, ' ..
      '"max_ms": %.3f, "mean_ms": %.3f, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, ' ..
      '"timeout": %d}}\n',
      summary.requests, s, summary.requests / s, ms(latency:percentile(50)), ms(latency:percentile(90)),
      ms(latency:percentile(99)), ms(latency.max), ms(latency.mean), e.connect, e.read, e.write, e.status,
      e.timeout))
end
