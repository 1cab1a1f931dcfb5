-- wrk script of benches/side-by-side.sh. Environment:
--   MODE=zipf  PATHS=file   requests paths of the file drawn by Zipf(0.9) over their rank
--   MODE=seq   PATHS=file   requests the paths in order, each once (a miss path)
--   MODE=range             random 1 MiB Ranges of wrk's URL (a 20 MiB object)
local mode = os.getenv("MODE") or "seq"
local paths, cdf, n, i = {}, {}, 0, 0
local headers = { ["Accept-Encoding"] = "identity" }

if mode ~= "range" then
  for line in io.lines(os.getenv("PATHS")) do
    n = n + 1
    paths[n] = line
  end
end

if mode == "zipf" then
  local s, total = 0.9, 0
  for k = 1, n do
    total = total + 1 / k ^ s
    cdf[k] = total
  end
  for k = 1, n do cdf[k] = cdf[k] / total end
end

local function zipf()
  local u, lo, hi = math.random(), 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo
end

local size, span = 20 * 1024 * 1024, 1024 * 1024

function init(args)
  math.randomseed(tonumber(os.getenv("SEED") or "1"))
end

function request()
  if mode == "zipf" then
    return wrk.format("GET", paths[zipf()], headers)
  elseif mode == "range" then
    local start = math.random(0, size - span)
    headers["Range"] = "bytes=" .. start .. "-" .. (start + span - 1)
    return wrk.format("GET", nil, headers)
  else
    i = i + 1
    if i > n then i = 1 end -- wraps only if the list was too short; the script warns
    return wrk.format("GET", paths[i], headers)
  end
end

function done(summary, latency, requests)
  if mode == "seq" and summary.requests > n then
    io.stderr:write("warning: more requests than distinct paths\n")
  end
end
