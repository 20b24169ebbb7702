-- wrk script for benches/proxy/tls.sh: GET / with a different X-Shard-Key on every request
-- (as the shared harness's shard-keys.lua), plus `Connection: close` when CLOSE=1, so that
-- every request is a new TCP connection and a full TLS handshake (wrk never resumes a
-- session). Prints one machine-readable result line.

local nkeys = tonumber(os.getenv("SHARD_KEYS") or "1000")
local close = os.getenv("CLOSE") == "1"
local reqs = {}
local i = 0
local counter = 0

function setup(thread)
   thread:set("thread_id", counter)
   counter = counter + 1
end

function init(args)
   for k = 1, nkeys do
      local key = string.format("user-%d", (k * 7919) % 1000003)
      local headers = { ["X-Shard-Key"] = key }
      if close then headers["Connection"] = "close" end
      reqs[k] = wrk.format("GET", "/", headers)
   end
   i = ((thread_id or 0) * 7919) % nkeys
end

function request()
   i = i % nkeys + 1
   return reqs[i]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "WRKRESULT requests=%d duration_us=%d err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d p50_us=%d p99_us=%d\n",
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99)))
end
