-- quickstart.lua — the main job: train, side by side, a top-2 MoE, a threshold
-- MoE (XMoE) and the dense baseline on the King James Bible; evaluate each
-- (recording every routing decision of the MoE models), save checkpoints,
-- record everything in results/quickstart.db, draw the figures, and print a
-- summary table and a sample.
--
--   ./moelab run experiments/quickstart.lua [steps=500] [data=data/kjv.txt] [out=results]
--
-- Every model has 4 layers, d_model 128, 4 heads, context 128, GELU,
-- LayerNorm, an untied head. The dense FFN has hidden 512; the MoE layers have
-- 8 experts of hidden 128 (top-2 runs half the dense FFN's width per token:
-- 2 × 128 against 512), with balance loss 0.01.

local moelab = require "moelab"
local report = require "moelab.report"

local args = moelab.args
local steps = args.steps or 500
local out_dir = args.out or "results"

local data = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
os.execute("mkdir -p '" .. out_dir:gsub("'", "'\\''") .. "'")
local db_path = out_dir .. "/quickstart.db"
os.remove(db_path); os.remove(db_path .. "-wal"); os.remove(db_path .. "-shm")
local db = moelab.open(db_path)

local function model_config(moe)
  return { layers = 4, d_model = 128, heads = 4, context = 128, ffn = { hidden = 512 },
           activation = "gelu", norm = "layernorm", tied = false, seed = 1, moe = moe }
end

local configs = {
  { name = "top2", model = model_config{ experts = 8, hidden = 128,
      router = { kind = "topk", k = 2 }, aux = { balance = 0.01 } } },
  { name = "threshold", model = model_config{ experts = 8, hidden = 128,
      router = { kind = "threshold", p = 0.9 }, aux = { balance = 0.01 } } },
  { name = "dense", model = model_config(nil) },
}

local rows = {}
local last_model
for _, c in ipairs(configs) do
  local model = moelab.model(c.model)
  local run = db:run{ name = c.name, model = model, data = data, experiment = "quickstart" }
  local t = run:train{ steps = steps, batch = 16, lr = 3e-3, warmup = 50,
                       eval_every = math.max(steps // 10, 1), eval_batches = 10 }
  local e = run:evaluate{ batches = 20, batch = 16, record = c.model.moe ~= nil }
  local total, active = model:parameters()
  rows[#rows + 1] = { name = c.name, params = total, active = active, steps = t.steps,
                      train_loss = t.loss, val_loss = e.loss,
                      moe_flops = e.moe_flops_per_token, experts = e.experts_per_token,
                      tok_s = t.tokens_per_s, seconds = t.seconds }
  model:save(out_dir .. "/quickstart-" .. c.name .. ".safetensors")
  last_model = last_model or model
end

-- The figures this database has the data for (moelab plot lists them all;
-- figures of the MoE runs' routing leave the dense run out by themselves).
local figures = {}
for _, f in ipairs{ "loss", "loss_vs_flops", "expert_load", "experts_per_token",
                    "loss_by_experts", "load_over_training", "sparsity", "cooccurrence",
                    "byte_classes" } do
  figures[#figures + 1] = moelab.plot{ db = db, figure = f,
                                       out = out_dir .. "/quickstart-" .. f .. ".pdf" }
end

print()
print("Validation loss: mean next-byte cross-entropy (nats/byte) on 20 batches of 16 x 128")
print("bytes from the last 10% of the corpus.")
print()
report.print_table(rows, {
  { "name", "run" }, { "params", "params", "%d" }, { "active", "active/token", "%d" },
  { "steps", "steps", "%d" },
  { "train_loss", "train loss", "%.4f" }, { "val_loss", "val loss", "%.4f" },
  { "moe_flops", "MoE FLOPs/token", "%.0f" }, { "experts", "experts/token", "%.2f" },
  { "tok_s", "tokens/s", "%.0f" }, { "seconds", "seconds", "%.1f" },
})
print()
print("MoE FLOPs/token counts 2 FLOPs per multiply-add in the MoE layers, router")
print("included; experts/token is per MoE layer, averaged over the evaluation.")
print()
print("database:    " .. db_path)
print("figures:     " .. table.concat(figures, ", "))
print("checkpoints: " .. out_dir .. "/quickstart-{top2,threshold,dense}.safetensors")
print()
print("sample from top2 (temperature 0.8):")
print(last_model:sample{ prompt = "And God said", tokens = 300, temperature = 0.8, seed = 1 })
