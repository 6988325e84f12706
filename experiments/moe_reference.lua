-- moe_reference.lua — the MoE reference models, trained as tools/torch_ref.py
-- trains them in PyTorch, so the two can be compared.
--
--   ./moelab run experiments/moe_reference.lua router=topk|threshold [steps=1000]
--       [seed=1] [db=results/moe_reference.db] [checkpoint=PATH]
--
-- The dense reference configuration (layers 4, d_model 128, heads 4, context
-- 128, GELU, LayerNorm, untied head; batch 16, lr 3e-3, warm-up 50 then cosine
-- decay to 0, weight decay 0, no clipping, seed 1) with an MoE layer in every
-- block: 8 experts of hidden 128, balance loss 0.01, dropless; the router is
-- top-2 (renormalised) or threshold (XMoE, t = 0.9, raw weights).

local moelab = require "moelab"
local args = moelab.args
local kind = args.router or "topk"
local router = kind == "threshold" and { kind = "threshold", p = 0.9 } or { kind = "topk", k = 2 }
local name = kind == "threshold" and "threshold" or "top2"

local data  = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
local model = moelab.model{ layers = 4, d_model = 128, heads = 4, context = 128,
                            activation = "gelu", norm = "layernorm", tied = false,
                            seed = args.seed or 1,
                            moe = { experts = 8, hidden = 128, router = router,
                                    aux = { balance = 0.01 } } }
local db    = moelab.open(args.db or "results/moe_reference.db")
local run   = db:run{ name = args.seed and (name .. "-seed" .. args.seed) or name,
                      model = model, data = data }
local t     = run:train{ steps = args.steps or 1000, batch = 16, lr = 3e-3, warmup = 50,
                         weight_decay = 0, clip = 0, eval_every = 100 }
local e     = run:evaluate{ batches = 20, batch = 16, record = true }
model:save(args.checkpoint or ("results/" .. name .. "-reference.safetensors"))
print(string.format("%s: val loss %.4f  experts/token %.2f  MoE FLOPs/token %.0f  " ..
                    "train loss (last 10%%) %.4f  %.0f tokens/s  %.0f s", name, e.loss,
                    e.experts_per_token, e.moe_flops_per_token, t.loss, t.tokens_per_s, t.seconds))
