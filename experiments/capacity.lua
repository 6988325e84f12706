-- capacity.lua — top-2 MoE at capacity factors 0 (dropless), 1 and 1.25:
-- how many assignments are dropped, and what it costs in loss.
--
--   ./moelab run experiments/capacity.lua [steps=200] [db=results/capacity.db]
--
-- Capacity: each expert takes at most C = max(ceil(cf · T · k / E), min_capacity)
-- assignments per batch, first choices before second choices, then by p; the
-- rest are dropped (the token keeps its residual path) and counted in
-- expert_load.dropped.

local moelab = require "moelab"
local report = require "moelab.report"
local args = moelab.args

local data = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
local db_path = args.db or "results/capacity.db"
os.remove(db_path); os.remove(db_path .. "-wal"); os.remove(db_path .. "-shm")
local db = moelab.open(db_path)

local rows = {}
for _, cf in ipairs{ 0, 1, 1.25 } do
  local name = cf == 0 and "dropless" or string.format("cf%g", cf)
  local model = moelab.model{ layers = 4, d_model = 128, heads = 4, context = 128, seed = 1,
                              moe = { experts = 8, hidden = 128,
                                      router = { kind = "topk", k = 2, capacity_factor = cf },
                                      aux = { balance = 0.01 } } }
  local run = db:run{ name = name, model = model, data = data, experiment = "capacity" }
  local t = run:train{ steps = args.steps or 200, batch = 16, lr = 3e-3, warmup = 50 }
  local e = run:evaluate{ batches = 20, record = true }
  local d = db:query([[SELECT 1.0 * SUM(dropped) / (SUM(tokens) + SUM(dropped)) AS f
                       FROM expert_load WHERE run_id = ? AND eval_id IS NULL]], run:id())[1]
  rows[#rows + 1] = { name = name, cf = cf, val_loss = e.loss, dropped = d.f,
                      experts = e.experts_per_token, flops = e.moe_flops_per_token }
end
report.print_table(rows, {
  { "name", "run" }, { "cf", "capacity factor", "%g" }, { "val_loss", "val loss", "%.4f" },
  { "dropped", "dropped (training)", "%.3f" }, { "experts", "experts/token (eval)", "%.2f" },
  { "flops", "MoE FLOPs/token", "%.0f" },
})
print("database: " .. db_path)
