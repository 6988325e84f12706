-- speed_moelab.lua — moelab's half of tools/speed_vs_torch.py: trains the top-2
-- reference model of experiments/moe_reference.lua through run:train and prints
-- each step's training time, read back from the database, as one JSON line.
--
--   ./moelab run tools/speed_moelab.lua db=/tmp/x.db [steps=150] [data=data/kjv.txt]
--       [seed=1] [threads=0]
--
-- The model and protocol are those of experiments/moe_reference.lua (router=topk):
-- 4 layers, d_model 128, 4 heads, context 128, GELU, LayerNorm, untied head, every
-- block an MoE layer of 8 experts of hidden 128, top-2 renormalised, balance 0.01;
-- batch 16, lr 3e-3, warm-up 50, no weight decay, no clipping. No evaluation runs
-- during training. metrics.wall_ms is the cumulative training time (batch,
-- forward, backward, AdamW and the recording of the step before), so step s
-- took about wall_ms[s] - wall_ms[s-1].

local moelab = require "moelab"
local args = moelab.args
assert(args.db, "speed_moelab.lua: give db=PATH (a scratch database; it is written)")
local steps = args.steps or 150

local data  = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
local model = moelab.model{ layers = 4, d_model = 128, heads = 4, context = 128,
                            activation = "gelu", norm = "layernorm", tied = false,
                            seed = args.seed or 1,
                            moe = { experts = 8, hidden = 128, router = { kind = "topk", k = 2 },
                                    aux = { balance = 0.01 } } }
local db    = moelab.open(args.db)
local run   = db:run{ name = "speed-top2", model = model, data = data }
local t     = run:train{ steps = steps, batch = 16, lr = 3e-3, warmup = 50,
                         weight_decay = 0, clip = 0, eval_every = 0,
                         threads = args.threads or 0, progress = false }
local rows  = db:query("SELECT m.step AS step, m.wall_ms AS wall_ms FROM metrics m" ..
                       " JOIN runs r ON r.run_id = m.run_id" ..
                       " WHERE r.name = 'speed-top2' AND m.split = 'train' ORDER BY m.step")
assert(#rows == steps, string.format("speed_moelab.lua: %d metric rows for %d steps", #rows, steps))
local ms, prev = {}, 0
for i, r in ipairs(rows) do
  assert(r.step == i, "speed_moelab.lua: steps are not 1..N")
  ms[i] = string.format("%.4f", (r.wall_ms - prev) / 1000)
  prev = r.wall_ms
end
print(string.format('{"steps": %d, "params": %d, "tokens_per_s": %.1f, "train_seconds": %.3f, ' ..
                    '"train_loss_tail": %.6f, "step_seconds": [%s]}',
                    steps, model:parameters(), t.tokens_per_s, t.seconds, t.loss,
                    table.concat(ms, ", ")))
