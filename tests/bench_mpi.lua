-- bench_mpi.lua — data parallelism as a user gets it (`make bench-mpi`;
-- issue 13): the top-2 reference model (4 layers, d 128, 8 experts of hidden
-- 128) trained through run:train on data/kjv.txt with a batch of 16 x 128
-- tokens per step, by 1 rank on 2 threads against 2 ranks (mpirun) on 1
-- thread each with batch 8 apiece, the same 16 sequences a step, data
-- parallel and expert parallel (4 experts a rank). The three alternate,
-- `pairs` times each, so that a busy neighbour slows them alike.
-- Reported: the median tokens/s of steps 21..N with quartiles, pooled over
-- the repetitions, and the ratio of the medians. Then memory: each rank's
-- peak resident set after 5 steps of the same model with 64 experts, data
-- against expert parallel (where each rank keeps the gradients and AdamW
-- moments of its own experts only), with the analytic difference.
--
--   ./moelab run tests/bench_mpi.lua [steps=150] [pairs=3] [data=data/kjv.txt]
--
-- It starts itself as the worker (worker=OUT) for each repetition, under
-- mpirun for the 2 ranks (--oversubscribe, and --allow-run-as-root as root).

local moelab = require "moelab"
local args = moelab.args
local steps = tonumber(args.steps or 150)
local skip = 20
local data_path = args.data or "data/kjv.txt"

if args.worker then
  moelab.threads(tonumber(args.threads))
  local data = moelab.corpus{ path = data_path, split = 0.9 }
  local model = moelab.model{ layers = 4, d_model = 128, heads = 4, context = 128, seed = 1,
                              moe = { experts = tonumber(args.experts or 8), hidden = 128,
                                      router = { kind = "topk", k = 2 },
                                      aux = { balance = 0.01 }, parallel = args.parallel } }
  local db = moelab.open(args.worker .. ".db")
  local run = db:run{ name = "bench", model = model, data = data }
  run:train{ steps = steps, batch = tonumber(args.batch), lr = 3e-3, warmup = 20, eval_batches = 0 }
  local rows = db:query("SELECT step, wall_ms, tokens FROM metrics WHERE split = 'train' ORDER BY step")
  if args.rss then -- each rank's peak resident set, and the experts' parameters
    local f = assert(io.open(args.worker .. ".rss" .. moelab.rank, "w"))
    local experts = 4 * tonumber(args.experts) * 2 * 128 * 128 -- layers x experts x (fc, proj)
    f:write(string.format("%d %d\n", moelab.machine().peak_rss, experts))
    f:close()
  elseif moelab.rank == 0 then
    local f = assert(io.open(args.worker, "w"))
    for i = skip + 1, #rows do
      local tokens = rows[i].tokens - rows[i - 1].tokens
      f:write(string.format("%.3f\n", tokens / ((rows[i].wall_ms - rows[i - 1].wall_ms) / 1e3)))
    end
    f:close()
  end
  db:close()
  os.remove(args.worker .. ".db")
  return
end

local stats = require("moelab.stats").summary

local machine = moelab.machine()
print(string.format("moelab bench-mpi: CPU %s; OpenBLAS kernels %s", machine.cpu, machine.blas_core))
local self = arg and arg[0] or "tests/bench_mpi.lua"
local exe = os.getenv("MOELAB") or "./moelab"
local root = io.popen("id -u"):read("l") == "0" and " --allow-run-as-root" or ""
local configs = {
  { name = "1 rank x 2 threads, batch 16", cmd = exe .. " run " .. self .. " threads=2 batch=16" },
  { name = "2 ranks x 1 thread, batch 8 each",
    cmd = "mpirun -np 2 --oversubscribe" .. root .. " " .. exe .. " run " .. self .. " threads=1 batch=8" },
  { name = "the same, experts parallel",
    cmd = "mpirun -np 2 --oversubscribe" .. root .. " " .. exe .. " run " .. self ..
          " threads=1 batch=8 parallel=experts" },
}
local tmp = os.tmpname()
for _, c in ipairs(configs) do c.samples = {} end
for rep = 1, tonumber(args.pairs or 3) do
  for _, c in ipairs(configs) do
    local out = tmp .. "-" .. rep
    local cmd = string.format("%s steps=%d data=%s worker=%s", c.cmd, steps, data_path, out)
    assert(os.execute(cmd), "bench_mpi: failed: " .. cmd)
    for line in io.lines(out) do c.samples[#c.samples + 1] = tonumber(line) end
    os.remove(out)
  end
end
os.remove(tmp)
print(string.format("%-34s %10s  %s", "", "tokens/s", "quartiles (steps 21.." .. steps .. ", all repetitions)"))
for _, c in ipairs(configs) do
  c.st = stats(c.samples)
  print(string.format("%-34s %10.0f  %.0f–%.0f (%d steps)", c.name, c.st.median, c.st.q1, c.st.q3, c.st.n))
end
print(string.format("2 ranks / 1 rank: %.2f data parallel, %.2f expert parallel",
                    configs[2].st.median / configs[1].st.median,
                    configs[3].st.median / configs[1].st.median))

-- memory per rank: 64 experts, 5 steps, data against expert parallel
local mem = {}
for _, mode in ipairs{ "data", "experts" } do
  local out = tmp .. "-rss"
  local cmd = string.format("mpirun -np 2 --oversubscribe%s %s run %s threads=1 batch=8 experts=64 " ..
                            "steps=5 rss=1 parallel=%s data=%s worker=%s", root, exe, self, mode,
                            data_path, out)
  assert(os.execute(cmd), "bench_mpi: failed: " .. cmd)
  mem[mode] = {}
  for r = 0, 1 do
    local rss, experts = io.open(out .. ".rss" .. r):read("n", "n")
    mem[mode][r + 1] = rss
    mem.expert_params = experts
    os.remove(out .. ".rss" .. r)
  end
end
local MiB = 1024 * 1024
print(string.format("peak resident set a rank, 64 experts (%.1fM expert parameters), 5 steps:",
                    mem.expert_params / 1e6))
print(string.format("  data parallel   %.0f / %.0f MiB (rank 0 / rank 1)", mem.data[1] / MiB, mem.data[2] / MiB))
print(string.format("  expert parallel %.0f / %.0f MiB: %.0f MiB less a rank; the other rank's experts' " ..
                    "gradients and moments are %.0f MiB",
                    mem.experts[1] / MiB, mem.experts[2] / MiB,
                    (mem.data[1] + mem.data[2] - mem.experts[1] - mem.experts[2]) / 2 / MiB,
                    3 * 4 * mem.expert_params / 2 / MiB))
