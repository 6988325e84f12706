-- meo.lua — MEO's claim (He et al., 2023): merging the selected experts into
-- one per sequence (or segment) costs about one expert's FLOPs, where
-- per-token top-k costs k, at a similar loss.
--
--   ./moelab run experiments/meo.lua [steps=1000] [seeds=1,2] [out=results] [fresh=true]
--
-- The reference model (4 layers, d_model 128) with 8 experts of hidden 128:
--   topk4        per-token top-4 of the 8, balance loss 0.01
--   merge-seg32  the 4 selected experts' weights merged per segment of 32
--                positions, gated on the segments before it (causal)
--   merge-whole  merged per whole sequence, as the paper, gated on all of it:
--                each position's loss sees later bytes, so the run is
--                recorded as non-causal and its loss is not comparable
-- evals.topk_flops_per_token says what the merged models' gates would cost
-- as per-token top-4.

local moelab = require "moelab"
local experiment = require "moelab.experiment"
local x = experiment.setup{ name = "meo", steps = 1000 }

moelab.sweep{
  db = x.db, name = x.name, data = x.data, seeds = x.seeds,
  base = experiment.model{ experts = 8, hidden = 128 },
  designs = {
    { name = "topk4", set = { ["moe.router"] = { kind = "topk", k = 4 }, ["moe.aux"] = { balance = 0.01 } } },
    { name = "merge-seg32", set = { ["moe.router"] = { kind = "merge", k = 4, segment = 32 } } },
    { name = "merge-whole", set = { ["moe.router"] = { kind = "merge", k = 4, segment = 0 } } },
  },
  train = x:train(), evaluate = x.evaluate,
}
x:finish{ title = "Merged experts (MEO) against per-token top-4 over the same 8 experts.",
          notes = "merge-whole is non-causal (gated on whole sequences): its loss sees later bytes.",
          figures = { "loss", "loss_vs_flops" } }
