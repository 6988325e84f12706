-- bench_user.lua — speed as a user gets it (`make bench`; issue 11): the
-- same calls a script makes, run:train and run:evaluate on data/kjv.txt,
-- stated as ratios measured in this one run, each with its spread. Not a
-- test: the machine is shared and noisy, so it reports, and the reader judges.
--
--   ./moelab run tests/bench_user.lua [steps=150] [block=50] [pairs=7] [data=data/kjv.txt]
--
-- 1. sgemm 2048³ on every thread (OpenBLAS alone): the machine's rate now,
--    timed at the start and at the end.
-- 2. Training the top-2 reference model (4 layers, d 128, 8 experts of hidden
--    128, batch 16 x 128) through run:train: tokens/s of each step from the
--    metrics table, median and quartiles of steps 20..N; its GFLOP/s against
--    sgemm's.
-- 3. The same model with 64 experts at equal active size, trained in blocks
--    alternating with 2's (so that a busy neighbour slows both alike): the
--    time per token of the medians.
-- 4. Threshold routing (t 0.9) against top-2, alternating in the same way:
--    the time per FLOP of the one against the other's (1 when wall time
--    follows the FLOPs).
-- 5. An evaluation recorded against the same unrecorded (20 batches of 16,
--    on 2's trained model), in alternating pairs: the medians.

local moelab = require "moelab"
local args = moelab.args
local steps = tonumber(args.steps or 150)
local block = tonumber(args.block or 50)
local pairs_n = tonumber(args.pairs or 7)
local skip = 20
assert(steps > skip and block >= 2 and pairs_n >= 5,
       "bench_user: need steps > 20, block >= 2 and pairs >= 5")

local machine = moelab.machine()
print(string.format("moelab bench (the user's path: run:train and run:evaluate on %s)",
                    args.data or "data/kjv.txt"))
print(string.format("CPU: %s; OpenBLAS kernels: %s; libxsmm kernels: %s; %d threads", machine.cpu,
                    machine.blas_core, machine.xsmm_target, machine.threads))
print("")

local stats = require("moelab.stats").summary

local function spread(st, fmt)
  fmt = fmt or "%.0f"
  return string.format("(quartiles " .. fmt .. "–" .. fmt .. ", range " .. fmt .. "–" .. fmt ..
                       ", %d samples)", st.q1, st.q3, st.min, st.max, st.n)
end

local data = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
local path = os.tmpname()
local db = moelab.open(path .. ".db")

local function reference(moe)
  local m = { experts = 8, hidden = 128, router = { kind = "topk", k = 2 }, aux = { balance = 0.01 } }
  for k, v in pairs(moe or {}) do m[k] = v end
  return moelab.model{ layers = 4, d_model = 128, heads = 4, context = 128, activation = "gelu",
                       norm = "layernorm", tied = false, seed = 1, moe = m }
end

-- Trains the runs in alternating blocks of `block` steps up to `steps` each;
-- returns per run the seconds of each step (steps 21..N, less the first of
-- each block, which pays for the other model's turn in the caches) and each
-- step's FLOPs per token.
local function train_alternating(runs)
  local out = {}
  for i = 1, #runs do out[i] = { seconds = {}, flops = {}, firsts = {} } end
  local done = 0
  while done < steps do
    local n = math.min(block, steps - done)
    for i, r in ipairs(runs) do
      out[i].last = r:train{ steps = n, batch = 16, lr = 3e-3, warmup = 50, weight_decay = 0,
                             clip = 0, eval_batches = 0, progress = false }
      out[i].firsts[done + 1] = true
    end
    done = done + n
  end
  for i, r in ipairs(runs) do
    local rows = db:query("SELECT step, wall_ms, moe_flops_per_token FROM metrics " ..
                          "WHERE run_id = ? AND split = 'train' ORDER BY step", r:id())
    -- the forward's FLOPs per token outside the MoE layers, the same every
    -- step: the last call's mean (flops_per_token counts forward and
    -- backward, 3x the forward) less its MoE layers' mean
    local moe_last = 0
    for k = #rows - out[i].last.steps + 1, #rows do moe_last = moe_last + rows[k].moe_flops_per_token end
    local dense = out[i].last.flops_per_token / 3 - moe_last / out[i].last.steps
    for k = 2, #rows do
      local s = rows[k].step
      if s > skip and not out[i].firsts[s] then
        table.insert(out[i].seconds, (rows[k].wall_ms - rows[k - 1].wall_ms) / 1e3)
        table.insert(out[i].flops, 3 * (dense + rows[k].moe_flops_per_token))
      end
    end
  end
  return out
end

local function rate(r)   -- tokens/s of each step
  local xs = {}
  for k, dt in ipairs(r.seconds) do xs[k] = 2048 / dt end
  return stats(xs)
end

local function per_flop(r)   -- seconds per GFLOP of each step
  local xs = {}
  for k, dt in ipairs(r.seconds) do xs[k] = dt / (2048 * r.flops[k] / 1e9) end
  return stats(xs)
end

local results = {}

-- 1 and 2
local sg1 = moelab.sgemm{ n = 2048, repeats = 5 }
io.stderr:write("bench: training top-2 with 8 and with 64 experts, alternating\n")
local r8 = db:run{ name = "top2-e8", model = reference(), data = data }
local r64 = db:run{ name = "top2-e64", model = reference{ experts = 64 }, data = data }
local t8, t64 = table.unpack(train_alternating{ r8, r64 })
io.stderr:write("bench: training threshold against top-2, alternating\n")
local rk = db:run{ name = "top2", model = reference(), data = data }
local rt = db:run{ name = "threshold", model = reference{ router = { kind = "threshold", p = 0.9 } },
                   data = data }
local tk, tt = table.unpack(train_alternating{ rk, rt })

-- 5
io.stderr:write("bench: evaluations, recorded and not, alternating\n")
local plain, recorded, ratios = {}, {}, {}
for i = 1, pairs_n do
  local times = {}
  for _, record in ipairs(i % 2 == 1 and { false, true } or { true, false }) do
    local t0 = moelab.clock()
    r8:evaluate{ batches = 20, batch = 16, record = record }
    times[record] = moelab.clock() - t0
  end
  plain[i], recorded[i] = times[false], times[true]
  ratios[i] = times[true] / times[false]
end
local sg2 = moelab.sgemm{ n = 2048, repeats = 5 }

local sgemm = stats{ sg1.median, sg2.median }
print(string.format("1. sgemm 2048^3, %d threads: %.1f GFLOP/s at the start, %.1f at the end " ..
                    "(medians of 5; ranges %.1f–%.1f, %.1f–%.1f)", machine.threads, sg1.median,
                    sg2.median, sg1.min, sg1.max, sg2.min, sg2.max))
print("")

local s8 = rate(t8)
local flops8 = stats(t8.flops).median
local gflops8 = s8.median * flops8 / 1e9
print(string.format("2. training the top-2 reference model through run:train, steps %d..%d",
                    skip + 1, steps))
print(string.format("   %.0f tokens/s median %s", s8.median, spread(s8)))
print(string.format("   %.2f MFLOP/token (forward and backward) -> %.1f GFLOP/s, %.2f of sgemm's " ..
                    "%.1f (target >= 0.50)", flops8 / 1e6, gflops8, gflops8 / sgemm.median,
                    sgemm.median))
results.sgemm_fraction = gflops8 / sgemm.median
print("")

local s64 = rate(t64)
local ratio64 = s8.median / s64.median
print("3. 64 experts against 8 at equal active size (top-2, hidden 128), through run:train")
print(string.format("   8 experts   %.0f tokens/s median %s", s8.median, spread(s8)))
print(string.format("   64 experts  %.0f tokens/s median %s", s64.median, spread(s64)))
print(string.format("   time per token 64/8: %.2f (target <= 1.15)", ratio64))
print("")

local pk, pt = per_flop(tk), per_flop(tt)
local fk, ft = stats(tk.flops).median, stats(tt.flops).median
local wk, wt = stats(tk.seconds).median, stats(tt.seconds).median
print("4. threshold (t 0.9) against top-2, same experts, through run:train")
print(string.format("   FLOPs per token, medians   top-2 %.2f M, threshold %.2f M: ratio %.2f",
                    fk / 1e6, ft / 1e6, ft / fk))
print(string.format("   step time, medians         top-2 %.1f ms, threshold %.1f ms: ratio %.2f",
                    wk * 1e3, wt * 1e3, wt / wk))
print(string.format("   time per FLOP, threshold / top-2 (medians of the steps'): %.2f " ..
                    "(target within 0.90–1.10)", pt.median / pk.median))
results.per_flop = pt.median / pk.median
print("")

local sp, sr, sq = stats(plain), stats(recorded), stats(ratios)
print(string.format("5. an evaluation (20 batches of 16 x 128, the model of 2), %d alternating pairs",
                    pairs_n))
print(string.format("   unrecorded  %.3f s median %s", sp.median, spread(sp, "%.3f")))
print(string.format("   recorded    %.3f s median %s", sr.median, spread(sr, "%.3f")))
print(string.format("   overhead    %+.1f %% by the medians; %+.1f %% the median pair " ..
                    "(pairs %+.1f %% to %+.1f %%) (target <= +10 %%)",
                    100 * (sr.median / sp.median - 1), 100 * (sq.median - 1),
                    100 * (sq.min - 1), 100 * (sq.max - 1)))
print("")

print("summary           measured   target")
print(string.format("  step / sgemm     %6.2f    >= 0.50", results.sgemm_fraction))
print(string.format("  64 / 8 experts   %6.2f    <= 1.15", ratio64))
print(string.format("  threshold/FLOP   %6.2f    0.90–1.10", results.per_flop))
print(string.format("  recording        %+5.1f %%   <= +10 %%", 100 * (sr.median / sp.median - 1)))

db:close()
for _, suffix in ipairs{ ".db", ".db-wal", ".db-shm", "" } do os.remove(path .. suffix) end
