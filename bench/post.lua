-- wrk script: POST one file (path in env FG_IMAGE; Content-Type FG_CONTENT_TYPE, default image/png); count statuses.
local f = assert(io.open(os.getenv("FG_IMAGE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("FG_CONTENT_TYPE") or "image/png"

local statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local parts = {}
  for _, q in ipairs({50, 90, 99}) do parts[#parts + 1] = string.format('"p%d_ms": %.3f', q, latency:percentile(q) / 1000) end
  io.write(string.format('WRK_JSON {"requests": %d, "duration_s": %.3f, "non2xx": %d, "timeouts": %d, %s}\n',
    summary.requests, summary.duration / 1e6, summary.errors.status, summary.errors.timeout, table.concat(parts, ", ")))
end
