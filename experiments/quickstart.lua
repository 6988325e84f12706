-- quickstart.lua — the main job: the MoE designs side by side on the King
-- James Bible, with the dense baseline: top-2 (GShard), threshold (XMoE),
-- stratified (SMoE), heterogeneous experts under top-p (HMoE) and merged
-- experts (MEO). Each is trained, evaluated with every routing decision
-- recorded, and saved; everything goes into results/quickstart.db; then the
-- report (as `moelab report` prints it), the figures and a sample.
--
--   ./moelab run experiments/quickstart.lua [steps=500] [data=data/kjv.txt] [out=results]
--       [designs=top2,threshold,...]
--
-- Every model has 4 layers, d_model 128, 4 heads, context 128, GELU,
-- LayerNorm, an untied head, and is trained for `steps` steps of 16 x 128
-- bytes (lr 3e-3, 50 warm-up steps, cosine decay). The dense FFN has hidden
-- 512. The MoE layers hold 8 experts and 1024 hidden units in all (8 x 128;
-- HMoE's sizes spread arithmetically from 64 to 192), with balance loss 0.01
-- (merged experts gate whole segments and take no auxiliary loss):
--   top2        top-2 of 8 (2 x 128 = half the dense FFN per token)
--   threshold   experts by probability until their mass reaches t = 0.9
--   stratified  strata {4, 4}: top-2 in the first, and the tokens that chose
--               stratum 2 pass again through it
--   hmoe        top-p (p = 0.7) over heterogeneous experts, with HMoE's
--               parameter penalty (0.01) in place of the balance loss
--   merge       k = 4 experts merged into one per segment of 32 positions,
--               gated on the segments before (causal)

local moelab = require "moelab"
local report = require "moelab.report"
local experiment = require "moelab.experiment"

local args = moelab.args
local steps = args.steps or 500
local out_dir = args.out or "results"

local data = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
os.execute("mkdir -p '" .. out_dir:gsub("'", "'\\''") .. "'")
local db_path = out_dir .. "/quickstart.db"
os.remove(db_path); os.remove(db_path .. "-wal"); os.remove(db_path .. "-shm")
local db = moelab.open(db_path)

-- the reference model of every experiment (moelab.experiment), seed 1
local function model_config(moe)
  local config = experiment.model(moe)
  config.seed = 1
  return config
end

local balance = { balance = 0.01 }
local all = {
  { name = "top2", moe = { experts = 8, hidden = 128, router = { kind = "topk", k = 2 }, aux = balance } },
  { name = "threshold", moe = { experts = 8, hidden = 128, router = { kind = "threshold", p = 0.9 },
                                aux = balance } },
  { name = "stratified", moe = { experts = 8, hidden = 128,
                                 router = { kind = "stratified", strata = { 4, 4 } }, aux = balance } },
  { name = "hmoe", moe = { experts = 8, hidden = { 64, 80, 96, 112, 144, 160, 176, 192 },
                           router = { kind = "topp", p = 0.7 }, aux = { p_penalty = 0.01 } } },
  { name = "merge", moe = { experts = 8, hidden = 128, router = { kind = "merge", k = 4, segment = 32 } } },
  { name = "dense" },
}
local chosen = {}
for name in (args.designs or "top2,threshold,stratified,hmoe,merge,dense"):gmatch("[^,]+") do
  chosen[name] = true
end
local designs = {}
for _, d in ipairs(all) do if chosen[d.name] then designs[#designs + 1] = d; chosen[d.name] = nil end end
for name in pairs(chosen) do error("quickstart: no design '" .. name .. "'", 0) end

local sample_model
for i, d in ipairs(designs) do
  io.stderr:write(string.format("quickstart: %d of %d: %s\n", i, #designs, d.name))
  local model = moelab.model(model_config(d.moe))
  local run = db:run{ name = d.name, model = model, data = data, experiment = "quickstart" }
  run:train{ steps = steps, batch = 16, lr = 3e-3, warmup = 50,
             eval_every = math.max(steps // 10, 1), eval_batches = 10 }
  run:evaluate{ batches = 20, batch = 16, record = d.moe ~= nil }
  model:save(out_dir .. "/quickstart-" .. d.name .. ".safetensors")
  if d.name == "top2" or not sample_model then sample_model = model end
end

-- The figures this database has the data for (moelab plot lists them all;
-- figures of the MoE runs' routing leave the dense run out by themselves).
local figures = {}
for _, f in ipairs{ "loss", "loss_vs_flops", "expert_load", "experts_per_token",
                    "loss_by_experts", "load_over_training", "sparsity", "cooccurrence",
                    "byte_classes", "placement" } do
  figures[#figures + 1] = moelab.plot{ db = db, figure = f,
                                       out = out_dir .. "/quickstart-" .. f .. ".pdf" }
end

print()
print("Validation loss: mean next-byte cross-entropy (nats/byte) on 20 batches of 16 x 128")
print("bytes from the last 10% of the corpus. MoE FLOPs/token counts 2 FLOPs per")
print("multiply-add in the MoE layers, routers included; experts/token is per MoE layer.")
print()
print(report.render(report.groups(report.runs(db)), "text"))
print()
print("database:    " .. db_path .. "   (moelab report " .. db_path .. " prints the table again)")
print("figures:     " .. table.concat(figures, ", "))
print("checkpoints: " .. out_dir .. "/quickstart-{" .. (args.designs or
      "top2,threshold,stratified,hmoe,merge,dense") .. "}.safetensors")
print()
print("a sample (temperature 0.8):")
print(sample_model:sample{ prompt = "And God said", tokens = 300, temperature = 0.8, seed = 1 })
