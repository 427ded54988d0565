-- POST /payments with a unique correlationId per request (tag from the command line,
-- thread number, counter), then one line of JSON with the figures bench.py needs.
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
function init(args)
  tag = tonumber(args[1] or "0", 16) or 0
  counter = 0
end
function request()
  counter = counter + 1
  local id = string.format("%08x-%04x-4000-8000-%012x", tag, tid, counter)
  return wrk.format("POST", "/payments", {["Content-Type"] = "application/json"},
                    '{"correlationId":"' .. id .. '","amount":19.90}')
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
