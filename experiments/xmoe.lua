-- xmoe.lua — XMoE's claim (Yang et al., 2024): threshold routing over many
-- small experts keeps the loss of top-2 over a few large ones with less MoE
-- compute, and the threshold can be moved at inference.
--
--   ./moelab run experiments/xmoe.lua [steps=2000] [seeds=1,2] [out=results] [fresh=true]
--
-- Equal total parameters on the reference model (4 layers, d_model 128):
--   top2       8 experts of hidden 128, top-2 (256 hidden units per token)
--   threshold  32 experts of hidden 32, threshold t = 0.9 (each token takes
--              experts, most probable first, until their probability mass
--              reaches 0.9)
-- both with balance loss 0.01, dropless. After training, each model is also
-- evaluated under the threshold router at t = 0.5 ... 0.99 (counterfactual
-- evaluations, evals.router), which is XMoE's "threshold at inference".

local moelab = require "moelab"
local experiment = require "moelab.experiment"
local x = experiment.setup{ name = "xmoe", steps = 2000 }

local thresholds = { 0.5, 0.7, 0.8, 0.9, 0.95, 0.99 }
local results = moelab.sweep{
  db = x.db, name = x.name, data = x.data, seeds = x.seeds,
  base = experiment.model{ aux = { balance = 0.01 } },
  designs = {
    { name = "top2", set = { ["moe.experts"] = 8, ["moe.hidden"] = 128,
                             ["moe.router"] = { kind = "topk", k = 2 } } },
    { name = "threshold", set = { ["moe.experts"] = 32, ["moe.hidden"] = 32,
                                  ["moe.router"] = { kind = "threshold", p = 0.9 } } },
  },
  train = x:train(), evaluate = x.evaluate,
  after = function(run)
    for _, t in ipairs(thresholds) do
      run:evaluate{ batches = x.eval_batches, batch = 16, router = { kind = "threshold", p = t } }
    end
  end,
}

local cf = x:counterfactuals(results, "The trained models under the threshold router at inference"
                                      .. " (mean over seeds):")
x:finish{ title = "Threshold routing over 32 small experts against top-2 over 8 large ones, equal parameters.",
          notes = cf,
          figures = { "loss", "loss_vs_flops", "experts_per_token", "loss_by_experts" } }
