-- dense_reference.lua — the dense reference model of the README, trained as
-- tools/torch_ref.py trains it in PyTorch, so the two can be compared.
--
--   ./moelab run experiments/dense_reference.lua [steps=1000] [db=results/reference.db]
--
-- layers 4, d_model 128, heads 4, context 128, dense hidden 512, GELU,
-- LayerNorm, untied head; batch 16, lr 3e-3, warm-up 50 then cosine decay to 0
-- at the last step, weight decay 0, no clipping, seed 1. Validation: 20 random
-- batches of 16 from the last 10% of data/kjv.txt.

local moelab = require "moelab"
local args = moelab.args

local data  = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
local model = moelab.model{ layers = 4, d_model = 128, heads = 4, context = 128,
                            ffn = { hidden = 512 }, activation = "gelu", norm = "layernorm",
                            tied = false, seed = 1 }
local db    = moelab.open(args.db or "results/reference.db")
local run   = db:run{ name = args.name or "dense-reference", model = model, data = data }
local t     = run:train{ steps = args.steps or 1000, batch = 16, lr = 3e-3, warmup = 50,
                         weight_decay = 0, clip = 0 }
local e     = run:evaluate{ batches = 20, batch = 16 }
model:save(args.checkpoint or "results/dense-reference.safetensors")
print(string.format("val loss %.4f  train loss (last 10%%) %.4f  %.0f tokens/s  %.0f s",
                    e.loss, t.loss, t.tokens_per_s, t.seconds))
