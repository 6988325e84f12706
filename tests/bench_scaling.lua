-- bench_scaling.lua — how speed and memory scale (`make bench-scaling`;
-- issue 11): the top-2 reference model trained through run:train on
-- data/kjv.txt with one dimension changed at a time — d_model 128 / 256 /
-- 512, context 128 / 512 / 1024 (2048 tokens a batch throughout), and 8 / 64
-- / 256 experts at equal active size — each in a process of its own, so that
-- its peak memory is its own. For each: the median tokens/s of steps
-- 11..N (with quartiles), GFLOP/s against the same process's sgemm 2048³ on
-- every thread, and the peak resident memory against what the model needs by
-- moelab's own estimate (model:memory: parameters, gradients, AdamW moments,
-- activations, backward scratch, MoE state).
--
--   ./moelab run tests/bench_scaling.lua [steps=40] [only=NAME] [data=data/kjv.txt]
--
-- With config=NAME it measures that one configuration and prints one line
-- of results (what the parent reads).

local moelab = require "moelab"
local args = moelab.args
local steps = tonumber(args.steps or 40)
local skip = 10
assert(steps > skip + 4, "bench_scaling: need steps > 14")

-- name, d_model, heads, context, batch, experts, expert hidden
local configs = {
  { "d128",   128, 4, 128,  16, 8,   128 },
  { "d256",   256, 4, 128,  16, 8,   256 },
  { "d512",   512, 8, 128,  16, 8,   512 },
  { "T512",   128, 4, 512,  4,  8,   128 },
  { "T1024",  128, 4, 1024, 2,  8,   128 },
  { "E64",    128, 4, 128,  16, 64,  128 },
  { "E256",   128, 4, 128,  16, 256, 128 },
}

local stats = require("moelab.stats").summary

local function measure(cfg)
  local name, d, heads, T, B, E, H = table.unpack(cfg)
  local data = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
  local model = moelab.model{ layers = 4, d_model = d, heads = heads, context = T,
                              activation = "gelu", norm = "layernorm", tied = false, seed = 1,
                              moe = { experts = E, hidden = H, router = { kind = "topk", k = 2 },
                                      aux = { balance = 0.01 } } }
  local need = model:memory{ batch = B, training = true }
  local path = os.tmpname()
  local db = moelab.open(path .. ".db")
  local run = db:run{ name = name, model = model, data = data }
  local t = run:train{ steps = steps, batch = B, lr = 3e-3, warmup = 50, weight_decay = 0,
                       clip = 0, eval_batches = 0, progress = false }
  local rows = db:query("SELECT step, wall_ms FROM metrics WHERE run_id = ? AND split = 'train' " ..
                        "ORDER BY step", run:id())
  local rates = {}
  for k = 2, #rows do
    if rows[k].step > skip then
      table.insert(rates, B * T * 1e3 / (rows[k].wall_ms - rows[k - 1].wall_ms))
    end
  end
  local r = stats(rates)
  local peak = moelab.machine().peak_rss -- before sgemm's matrices count in it
  local sg = moelab.sgemm{ n = 2048, repeats = 5 }
  db:close()
  for _, suffix in ipairs{ ".db", ".db-wal", ".db-shm", "" } do os.remove(path .. suffix) end
  return string.format("%s %.0f %.0f %.0f %.4f %.2f %d %d %d %d %d %d", name, r.median, r.q1, r.q3,
                       t.flops_per_token / 1e6, sg.median, peak, need.total, need.parameters,
                       need.optimizer + need.gradients, need.activations + need.scratch + need.moe,
                       select(2, model:parameters()))
end

if args.config then
  for _, cfg in ipairs(configs) do
    if cfg[1] == args.config then
      print("RESULT " .. measure(cfg))
      return
    end
  end
  error("bench_scaling: no configuration '" .. args.config .. "'")
end

local machine = moelab.machine()
print(string.format("moelab scaling: the top-2 reference model through run:train, one change at a time"))
print(string.format("CPU: %s; OpenBLAS kernels: %s; libxsmm kernels: %s; %d threads; %d steps, " ..
                    "medians of steps %d..%d", machine.cpu, machine.blas_core, machine.xsmm_target,
                    machine.threads, steps, skip + 1, steps))
print("")
print("| model | tokens/s (quartiles) | MFLOP/token | GFLOP/s | of sgemm | peak memory | estimate (params / grads+AdamW / activations) |")
print("|---|---|---|---|---|---|---|")
local mib = 1024 * 1024
for _, cfg in ipairs(configs) do
  if not args.only or args.only == cfg[1] then
    io.stderr:write("bench_scaling: " .. cfg[1] .. "\n")
    local cmd = string.format("%s run %s steps=%d config=%s%s", os.getenv("MOELAB") or "./moelab",
                              debug.getinfo(1, "S").source:sub(2), steps, cfg[1],
                              args.data and (" data=" .. args.data) or "")
    local p = assert(io.popen(cmd))
    local out = p:read("a")
    p:close()
    local line = out:match("RESULT ([^\n]+)")
    if not line then error("bench_scaling: " .. cfg[1] .. " failed:\n" .. out) end
    local f = {}
    for w in line:gmatch("%S+") do table.insert(f, w) end
    local rate, q1, q3, mflop, sgemm = tonumber(f[2]), tonumber(f[3]), tonumber(f[4]),
                                       tonumber(f[5]), tonumber(f[6])
    local peak, total, params, opt, acts = tonumber(f[7]), tonumber(f[8]), tonumber(f[9]),
                                           tonumber(f[10]), tonumber(f[11])
    local gflops = rate * mflop / 1e3
    print(string.format("| %s | %.0f (%.0f–%.0f) | %.2f | %.1f | %.2f of %.0f | %.0f MiB | %.0f MiB (%.0f / %.0f / %.0f) |",
                        cfg[1], rate, q1, q3, mflop, gflops, gflops / sgemm, sgemm, peak / mib,
                        total / mib, params / mib, opt / mib, acts / mib))
  end
end
