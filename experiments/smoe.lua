-- smoe.lua — SMoE's claim (Xu et al., 2023): stratified experts give tokens
-- dynamic capacity (a token passes through one stratum or more) and beat
-- top-2 over the same experts.
--
--   ./moelab run experiments/smoe.lua [steps=1500] [seeds=1,2] [out=results] [fresh=true]
--
-- The reference model (4 layers, d_model 128) with 8 experts of hidden 128,
-- balance loss 0.01, dropless:
--   top2       top-2 of the 8
--   strata44   strata {4, 4}: top-2 in stratum 1; tokens whose first choice
--              is in stratum 2 pass again, through it
--   strata2222 strata {2, 2, 2, 2}: up to four passes
-- The report gives loss, compute and experts per token; token_stats.passes
-- and the strata_flow figure show how many passes tokens took.

local moelab = require "moelab"
local experiment = require "moelab.experiment"
local x = experiment.setup{ name = "smoe", steps = 1500 }

local results = moelab.sweep{
  db = x.db, name = x.name, data = x.data, seeds = x.seeds,
  base = experiment.model{ experts = 8, hidden = 128, aux = { balance = 0.01 } },
  designs = {
    { name = "top2", set = { ["moe.router"] = { kind = "topk", k = 2 } } },
    { name = "strata44", set = { ["moe.router"] = { kind = "stratified", strata = { 4, 4 } } } },
    { name = "strata2222", set = { ["moe.router"] = { kind = "stratified", strata = { 2, 2, 2, 2 } } } },
  },
  train = x:train(), evaluate = x.evaluate,
}

-- passes per token through the MoE layers, from the last recorded evaluation
local db = moelab.open(x.db, { readonly = true })
local lines = { "Passes per token and MoE layer (mean over seeds; 1 for a token-choice layer):", "",
                "| design | passes/token |", "|---|---|" }
-- the runs of this sweep (the database may hold other seeds), by design
local order, ids = {}, {}
for _, e in ipairs(results) do
  if e.status == "finished" then
    if not ids[e.design] then ids[e.design], order[#order + 1] = {}, e.design end
    table.insert(ids[e.design], e.run_id)
  end
end
print("\nPasses per token and MoE layer (mean over seeds):")
for _, design in ipairs(order) do
  local r = db:query([[SELECT AVG(1.0 * t.passes / 4) AS passes FROM token_stats t
                       JOIN runs r USING (run_id)
                       WHERE r.run_id IN (SELECT value FROM json_each(?))
                         AND t.eval_id = (SELECT MAX(eval_id) FROM evals WHERE run_id = r.run_id
                                          AND router IS NULL AND split = 'val')]],
                     "[" .. table.concat(ids[design], ",") .. "]")[1]
  print(string.format("  %-12s %.3f", design, r.passes or 0))
  lines[#lines + 1] = string.format("| %s | %.3f |", design, r.passes or 0)
end
db:close()
x:finish{ title = "Stratified experts {4,4} and {2,2,2,2} against top-2 over the same 8 experts.",
          notes = table.concat(lines, "\n"),
          figures = { "loss", "loss_vs_flops", "experts_per_token", { "strata_flow", runs = { "smoe/strata44/seed=" .. x.seeds[1] } } } }
