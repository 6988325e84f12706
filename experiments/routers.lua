-- routers.lua — every router side by side on one configuration.
--
--   ./moelab run experiments/routers.lua [steps=800] [seeds=1,2] [out=results] [fresh=true]
--
-- The reference model (4 layers, d_model 128) with 8 experts of hidden 128,
-- and the dense baseline (FFN hidden 512). Token-choice routers with balance
-- loss 0.01 where they have router probabilities:
--   topk k=2, threshold t=0.9, topp p=0.7, expert_choice (capacity factor 2,
--   so about 2 experts per token, non-causal), hash (a fixed random map of
--   byte to expert), stratified {4,4}, merge k=4 over segments of 32.

local moelab = require "moelab"
local experiment = require "moelab.experiment"
local x = experiment.setup{ name = "routers", steps = 800 }

local balance = { balance = 0.01 }
moelab.sweep{
  db = x.db, name = x.name, data = x.data, seeds = x.seeds,
  base = experiment.model{ experts = 8, hidden = 128 },
  designs = {
    { name = "dense", set = { moe = false } },
    { name = "topk", set = { ["moe.router"] = { kind = "topk", k = 2 }, ["moe.aux"] = balance } },
    { name = "threshold", set = { ["moe.router"] = { kind = "threshold", p = 0.9 }, ["moe.aux"] = balance } },
    { name = "topp", set = { ["moe.router"] = { kind = "topp", p = 0.7 }, ["moe.aux"] = balance } },
    { name = "expert_choice", set = { ["moe.router"] = { kind = "expert_choice", capacity_factor = 2 } } },
    { name = "hash", set = { ["moe.router"] = { kind = "hash" } } },
    { name = "stratified", set = { ["moe.router"] = { kind = "stratified", strata = { 4, 4 } }, ["moe.aux"] = balance } },
    { name = "merge", set = { ["moe.router"] = { kind = "merge", k = 4, segment = 32 } } },
  },
  train = x:train(), evaluate = x.evaluate,
}
x:finish{ title = "Every router on the reference configuration (8 experts of hidden 128).",
          figures = { "loss", "loss_vs_flops", "experts_per_token", "expert_load" } }
