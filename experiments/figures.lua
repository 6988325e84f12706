-- figures.lua — every figure of `moelab plot` from one small database: a
-- gallery to look at the figures with real data, and a recipe for the data
-- each needs. Small models (2 layers, d_model 64, 8 experts of hidden 64,
-- context 64) on the King James Bible:
--
--   dense                         the dense baseline (FFN hidden 256)
--   top2/moe.router.capacity_factor={0,1,1.25}/seed={1,2}
--                                 a sweep: top-2 dropless and at two capacity
--                                 factors, two seeds each (loss_vs_flops'
--                                 error bars, dropped_vs_capacity)
--   threshold, stratified         XMoE t = 0.9 and SMoE strata {4, 4}, with a
--                                 routing probe every steps/10 steps
--                                 (routing_stability; strata_flow)
--   moefy-similarity, moefy-learned   the dense model split into 8 experts,
--                                 evaluated under several k and thresholds
--                                 (sparse_curve)
--
-- Every MoE run's last evaluation records its routing (record = true), which
-- experts_per_token, loss_by_experts, sparsity, cooccurrence, byte_classes
-- and placement draw.
--
--   ./moelab run experiments/figures.lua [steps=300] [data=data/kjv.txt] [out=results]
--
-- writes results/figures.db and results/figures-FIGURE.pdf (and .png with
-- png=true). About 35 seconds on the project's 2-core machine at 300 steps.

local moelab = require "moelab"

local args = moelab.args
local steps = args.steps or 300
local out_dir = args.out or "results"
local data = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
os.execute("mkdir -p '" .. out_dir:gsub("'", "'\\''") .. "'")
local db_path = out_dir .. "/figures.db"
os.remove(db_path); os.remove(db_path .. "-wal"); os.remove(db_path .. "-shm")
local db = moelab.open(db_path)

local function config(moe, seed)
  return { layers = 2, d_model = 64, heads = 4, context = 64, ffn = { hidden = 256 },
           activation = "gelu", seed = seed or 1, moe = moe }
end
local function moe(router)
  return { experts = 8, hidden = 64, router = router, aux = { balance = 0.01 } }
end
local train = { steps = steps, batch = 16, lr = 3e-3, warmup = math.min(50, steps // 5),
                eval_every = math.max(steps // 5, 1), eval_batches = 5 }
local record = { batches = 10, batch = 16, record = true }

local function run(name, cfg, probe)
  local model = moelab.model(cfg)
  local r = db:run{ name = name, model = model, data = data, experiment = "figures" }
  local opts = {}
  for k, v in pairs(train) do opts[k] = v end
  if probe then opts.probe = { every = math.max(steps // 10, 1), batch = 8 } end
  r:train(opts)
  r:evaluate{ batches = 10, batch = 16, record = cfg.moe ~= nil }
  return model, r
end

local dense = run("dense", config())
moelab.sweep{ db = db, name = "top2", data = data, base = config(moe{ kind = "topk", k = 2 }),
              vary = { ["moe.router.capacity_factor"] = { 0, 1, 1.25 } }, seeds = { 1, 2 },
              train = train, evaluate = record, experiment = "figures" }
run("threshold", config(moe{ kind = "threshold", p = 0.9 }), true)
run("stratified", config(moe{ kind = "stratified", strata = { 4, 4 } }), true)

-- Dense to sparse: the dense model's FFNs as 8 experts of 32 neurons, run
-- under its router at several k and thresholds (counterfactual evaluations
-- of one run: the points of a curve).
local function curve(name, router, fit)
  local model = moelab.moefy(dense, { experts = 8, router = router })
  if fit then moelab.fit_router(model, data, { steps = math.max(steps // 2, 10), batch = 16 }) end
  local r = db:run{ name = name, model = model, data = data, experiment = "figures" }
  r:evaluate(record)
  for _, k in ipairs{ 1, 2, 4, 6 } do
    r:evaluate{ batches = 10, batch = 16, router = { kind = router.kind, k = k } }
  end
  for _, p in ipairs{ 0.5, 0.7, 0.9 } do
    r:evaluate{ batches = 10, batch = 16,
                router = { kind = router.kind, select = "threshold", p = p } }
  end
end
curve("moefy-similarity", { kind = "similarity", k = 2 })
curve("moefy-learned", { kind = "learned", k = 2 }, true)
local all = db:run{ name = "moefy-all", model = moelab.moefy(dense, { experts = 8 }),
                    data = data, experiment = "figures" }
all:evaluate{ batches = 10, batch = 16 }

local written = {}
for figure in moelab.figures:gmatch("[^,]+") do
  for _, ext in ipairs(args.png and { "pdf", "png" } or { "pdf" }) do
    written[#written + 1] = moelab.plot{ db = db, figure = figure,
                                         out = string.format("%s/figures-%s.%s", out_dir, figure, ext) }
  end
end
print("database: " .. db_path)
print("figures:  " .. table.concat(written, "\n          "))
