-- hmoe.lua — HMoE's claim (Wang et al., 2024): experts of different sizes,
-- routed by top-p with a penalty on the parameters activated, reach a lower
-- loss per activated parameter than homogeneous experts.
--
--   ./moelab run experiments/hmoe.lua [steps=1500] [seeds=1,2] [out=results] [fresh=true]
--
-- The reference model (4 layers, d_model 128), 8 experts, 1024 hidden units in
-- all (equal total parameters):
--   top2        8 of hidden 128, top-2, balance loss 0.01
--   topp        8 of hidden 128, top-p (p = 0.7), balance loss 0.01
--   hmoe        hidden 64, 80, ..., 192 (an arithmetic spread), top-p (p = 0.7),
--               parameter penalty 0.01 and entropy loss 0.01
-- The report's MoE FLOPs per token measure the parameters activated.

local moelab = require "moelab"
local experiment = require "moelab.experiment"
local x = experiment.setup{ name = "hmoe", steps = 1500 }

moelab.sweep{
  db = x.db, name = x.name, data = x.data, seeds = x.seeds,
  base = experiment.model{ experts = 8, hidden = 128 },
  designs = {
    { name = "top2", set = { ["moe.router"] = { kind = "topk", k = 2 }, ["moe.aux"] = { balance = 0.01 } } },
    { name = "topp", set = { ["moe.router"] = { kind = "topp", p = 0.7 }, ["moe.aux"] = { balance = 0.01 } } },
    { name = "hmoe", set = { ["moe.hidden"] = { 64, 80, 96, 112, 144, 160, 176, 192 },
                             ["moe.router"] = { kind = "topp", p = 0.7 },
                             ["moe.aux"] = { p_penalty = 0.01, entropy = 0.01 } } },
  },
  train = x:train(), evaluate = x.evaluate,
}
x:finish{ title = "Heterogeneous experts under top-p (HMoE) against homogeneous top-2 and top-p, equal parameters.",
          figures = { "loss", "loss_vs_flops", "experts_per_token", "expert_load" } }
