-- designs.lua — the MoE designs beyond token-choice routing, each trained on
-- the reference configuration and recorded, to compare with
-- experiments/moe_reference.lua's top-2 and threshold runs.
--
--   ./moelab run experiments/designs.lua [design=stratified] [steps=1000]
--       [seed=1] [db=results/designs.db] [second=max|sample]
--
-- The reference configuration (layers 4, d_model 128, heads 4, context 128,
-- GELU, LayerNorm, untied head; batch 16, lr 3e-3, warm-up 50 then cosine
-- decay to 0; an MoE layer in every block, 8 experts of hidden 128, balance
-- loss 0.01, dropless) with:
--   stratified  SMoE, strata {4, 4}: top-2 per pass, 1 or 2 passes a token.
--   merge       MEO, k 4, causal segments of 32 positions: each linear merged
--               from 4 experts per segment, gated on the means before it.
--   merge-whole MEO as the paper, gated on the whole sequence: its loss sees
--               later bytes (the run is recorded as non-causal).
--   moefy       dense to sparse: a dense ReLU model (hidden 512) trained as
--               the dense reference, split into 16 experts of 32 neurons by
--               balanced k-means, its learned router fitted (the rest frozen)
--               and run with the threshold rule at t = 0.9; evaluated with
--               the similarity and oracle routers, top-4, and a random split
--               beside it (each its own run in the database).

local moelab = require "moelab"
local args = moelab.args
local design = args.design or "stratified"
local designs = {
  stratified = { kind = "stratified", strata = { 4, 4 }, second = args.second or "max" },
  merge = { kind = "merge", k = 4, segment = 32 },
  ["merge-whole"] = { kind = "merge", k = 4, segment = 0 },
}
local router = designs[design]
local data  = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
local db    = moelab.open(args.db or "results/designs.db")

if design == "moefy" then
  local dense = moelab.model{ layers = 4, d_model = 128, heads = 4, context = 128,
                              activation = "relu", norm = "layernorm", tied = false,
                              ffn = { hidden = 512 }, seed = args.seed or 1 }
  local run = db:run{ name = "moefy-dense", model = dense, data = data, experiment = "designs" }
  run:train{ steps = args.steps or 1000, batch = 16, lr = 3e-3, warmup = 50, weight_decay = 0,
             clip = 0, eval_every = 100 }
  -- on run when given (the dense model's own: a second run of its name would
  -- hide the trained one from the report and figures, which take the latest)
  local function evaluate(name, model, run)
    local r = run or db:run{ name = name, model = model, data = data, experiment = "designs" }
    local e = r:evaluate{ batches = 20, batch = 16, record = true }
    print(string.format("%-26s val loss %.4f  experts/token %5.2f  FFN share %.3f  MoE FLOPs/token %.0f",
                        name, e.loss, e.experts_per_token, e.ffn_fraction or 1, e.moe_flops_per_token))
    return e
  end
  evaluate("moefy-dense", dense, run)
  for _, method in ipairs{ "kmeans", "random" } do
    local learned = moelab.moefy(dense, { experts = 16, method = method,
                                          router = { kind = "learned", select = "threshold", p = 0.9 } })
    local fit = moelab.fit_router(learned, data, { steps = args.fit_steps or 300, batch = 16 })
    print(string.format("%s: router fit loss %.3f -> %.3f, mass covered %.3f -> %.3f", method,
                        fit.first_loss, fit.loss, fit.first_recall, fit.recall))
    evaluate("moefy-" .. method .. "-learned-t0.9", learned)
    evaluate("moefy-" .. method .. "-similarity-top4",
             moelab.moefy(dense, { experts = 16, method = method,
                                   router = { kind = "similarity", k = 4 } }))
    evaluate("moefy-" .. method .. "-oracle-top4",
             moelab.moefy(dense, { experts = 16, method = method, router = { kind = "oracle", k = 4 } }))
    if method == "kmeans" then learned:save(args.checkpoint or "results/moefy-reference.safetensors") end
  end
  return
end

if not router then
  local names = {}
  for name in pairs(designs) do names[#names + 1] = name end
  names[#names + 1] = "moefy"
  table.sort(names)
  error(string.format("designs.lua: unknown design '%s' (one of: %s)", design,
                      table.concat(names, ", ")), 0)
end

local merged = router.kind == "merge" -- gates whole segments: no per-token aux loss
local model = moelab.model{ layers = 4, d_model = 128, heads = 4, context = 128,
                            activation = "gelu", norm = "layernorm", tied = false,
                            seed = args.seed or 1,
                            moe = { experts = 8, hidden = 128, router = router,
                                    aux = { balance = merged and 0 or 0.01 } } }
local name  = design .. (args.seed and ("-seed" .. args.seed) or "")
local run   = db:run{ name = name, model = model, data = data, experiment = "designs" }
local t     = run:train{ steps = args.steps or 1000, batch = 16, lr = 3e-3, warmup = 50,
                         weight_decay = 0, clip = 0, eval_every = 100 }
local e     = run:evaluate{ batches = 20, batch = 16, record = true }
model:save(args.checkpoint or ("results/" .. design .. "-reference.safetensors"))
local passes = db:query([[SELECT AVG(passes) / 4.0 AS p FROM token_stats WHERE eval_id = ?]],
                        e.eval_id)[1].p
-- a run whose loss may see later bytes says so wherever its loss is shown
if db:query("SELECT causal FROM runs WHERE run_id = ?", run:id())[1].causal == 0 then
  name = name .. " (non-causal)"
end
print(string.format("%s: val loss %.4f  experts/token %.2f  passes/token/layer %.2f  " ..
                    "MoE FLOPs/token %.0f%s  train loss (last 10%%) %.4f  %.0f tokens/s  %.0f s",
                    name, e.loss, e.experts_per_token, passes, e.moe_flops_per_token,
                    e.topk_flops_per_token and string.format(" (as per-token top-k: %.0f)",
                                                             e.topk_flops_per_token) or "",
                    t.loss, t.tokens_per_s, t.seconds))
