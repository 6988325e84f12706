-- moelab.stats — the statistics speed figures are stated in (README, Speed):
-- the median of a list of samples with its quartiles and extremes, as the
-- benchmarks (tests/bench_*.lua) report every figure.
--
--   local st = require("moelab.stats").summary{ 3, 1, 2 }
--   -- { median = 2, q1 = 1.5, q3 = 2.5, min = 1, max = 3, n = 3 }

local stats = {}

-- Quantiles by linear interpolation between the sorted samples (R's type 7);
-- xs itself is left as it was.
function stats.summary(xs)
  local s = {}
  for i, x in ipairs(xs) do s[i] = x end
  assert(#s > 0, "moelab.stats: no samples")
  table.sort(s)
  local function q(p)
    local h = (#s - 1) * p + 1
    local lo = math.floor(h)
    return s[lo] + (h - lo) * ((s[lo + 1] or s[lo]) - s[lo])
  end
  return { median = q(0.5), q1 = q(0.25), q3 = q(0.75), min = s[1], max = s[#s], n = #s }
end

return stats
