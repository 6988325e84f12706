-- quickstart.lua — the main job: train a small byte-level transformer on the
-- King James Bible, evaluate it, save a checkpoint, record everything in
-- results/quickstart.db, draw the loss figure and print a sample.
--
--   ./moelab run experiments/quickstart.lua [steps=600] [data=data/kjv.txt]
--
-- The model is the dense reference configuration of the README (4 layers,
-- d_model 128, 4 heads, context 128, hidden 512, GELU, LayerNorm, untied).

local moelab = require "moelab"
local report = require "moelab.report"

local args = moelab.args
local steps = args.steps or 600
local out_dir = args.out or "results"

local data = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
os.execute("mkdir -p '" .. out_dir:gsub("'", "'\\''") .. "'")
local db_path = out_dir .. "/quickstart.db"
os.remove(db_path); os.remove(db_path .. "-wal"); os.remove(db_path .. "-shm")
local db = moelab.open(db_path)

local configs = {
  { name = "dense",
    model = { layers = 4, d_model = 128, heads = 4, context = 128,
              ffn = { hidden = 512 }, activation = "gelu", norm = "layernorm",
              tied = false, seed = 1 } },
}

local rows = {}
local last_model
for _, c in ipairs(configs) do
  local model = moelab.model(c.model)
  local run = db:run{ name = c.name, model = model, data = data, experiment = "quickstart" }
  local t = run:train{ steps = steps, batch = 16, lr = 3e-3, warmup = 50,
                       eval_every = math.max(steps // 10, 1), eval_batches = 10 }
  local e = run:evaluate{ batches = 20, batch = 16 }
  rows[#rows + 1] = { name = c.name, params = model:parameters(), steps = t.steps,
                      train_loss = t.loss, val_loss = e.loss,
                      moe_flops = e.moe_flops_per_token, experts = e.experts_per_token,
                      tok_s = t.tokens_per_s, seconds = t.seconds }
  model:save(out_dir .. "/quickstart-" .. c.name .. ".safetensors")
  last_model = model
end

local figure = moelab.plot{ db = db, figure = "loss", out = out_dir .. "/quickstart-loss.pdf" }

print()
print("Validation loss: mean next-byte cross-entropy (nats/byte) on 20 batches of 16 x 128")
print("bytes from the last 10% of the corpus.")
print()
report.print_table(rows, {
  { "name", "run" }, { "params", "params", "%d" }, { "steps", "steps", "%d" },
  { "train_loss", "train loss", "%.4f" }, { "val_loss", "val loss", "%.4f" },
  { "moe_flops", "MoE FLOPs/token", "%.0f" }, { "experts", "experts/token", "%.2f" },
  { "tok_s", "tokens/s", "%.0f" }, { "seconds", "seconds", "%.1f" },
})
print()
print("database:   " .. db_path)
print("figure:     " .. figure)
print("checkpoint: " .. out_dir .. "/quickstart-dense.safetensors")
print()
print("sample (temperature 0.8):")
print(last_model:sample{ prompt = "And God said", tokens = 300, temperature = 0.8, seed = 1 })
