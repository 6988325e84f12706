-- train_trace.lua — a short moelab training run whose start and end weights are
-- saved, for tools/train_compare.py to replay in PyTorch step by step.
--
--   ./moelab run tools/train_trace.lua design=top2 out=/tmp/tt [steps=30]
--       [lr=0.01] [warmup=5] [min_lr=0.0001] [weight_decay=0.1] [clip=0]
--       [beta1=0.9] [beta2=0.95] [eps=1e-8] [data=data/kjv.txt]
--   /usr/bin/python3 tools/train_compare.py /tmp/tt
--
-- The model: layers 2, d_model 32, heads 2, context 32, GELU, LayerNorm, seed 1;
-- MoE designs have 4 experts of hidden 32 in every block. Writes OUT.init.safetensors,
-- OUT.final.safetensors and OUT.db (run "trace", batch 4, no evaluation).

local moelab = require "moelab"
local args = moelab.args
local design = args.design or "top2"
local out = assert(args.out, "out=PREFIX is required")
local moes = {
  dense = nil,
  top2 = { experts = 4, hidden = 32, router = { kind = "topk", k = 2 }, aux = { balance = 0.01 } },
  threshold = { experts = 4, hidden = 32, router = { kind = "threshold", p = 0.9 },
                aux = { balance = 0.01 } },
  stratified = { experts = 4, hidden = 32, router = { kind = "stratified", strata = { 2, 2 } },
                 aux = { balance = 0.01 } },
  merge = { experts = 4, hidden = 32, router = { kind = "merge", k = 2, segment = 8 } },
  hmoe = { experts = 4, hidden = { 16, 16, 32, 48 }, router = { kind = "topp", p = 0.7 },
           aux = { balance = 0.01 } },
}
assert(design == "dense" or moes[design], "unknown design " .. design)
local data = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
local model = moelab.model{ layers = 2, d_model = 32, heads = 2, context = 32,
                            ffn = { hidden = 128 }, seed = 1, moe = moes[design] }
model:save(out .. ".init.safetensors")
os.remove(out .. ".db")
local db = moelab.open(out .. ".db")
local run = db:run{ name = "trace", model = model, data = data }
local t = run:train{ steps = tonumber(args.steps or 30), batch = 4, lr = tonumber(args.lr or 0.01),
                     warmup = tonumber(args.warmup or 5), min_lr = tonumber(args.min_lr or 1e-4),
                     weight_decay = tonumber(args.weight_decay or 0.1),
                     clip = tonumber(args.clip or 0), beta1 = tonumber(args.beta1 or 0.9),
                     beta2 = tonumber(args.beta2 or 0.95), eps = tonumber(args.eps or 1e-8),
                     eval_batches = 0, threads = 1 }
model:save(out .. ".final.safetensors")
print(design, t.status, t.last_loss)
