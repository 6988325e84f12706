-- dense_to_sparse.lua — MoEfication (Zhang et al., 2022): a trained dense
-- ReLU model's FFNs split into experts, and a router that picks a few of
-- them per token; how much of the FFN compute can go before the loss does?
--
--   ./moelab run experiments/dense_to_sparse.lua [steps=1500] [seeds=1,2] [out=results]
--       [fresh=true] [fit_steps=300]
--
-- Per seed: a dense ReLU reference model (4 layers, d_model 128, FFN hidden
-- 512) is trained; its FFNs are split into 16 experts of 32 neurons, by
-- balanced k-means of the neurons and at random; each split gets three
-- routers — similarity (the token against each expert's centroid), a
-- learned router fitted with the rest frozen (moelab.fit_router), and the
-- oracle (the experts holding most of the token's activation mass) — and
-- each is evaluated with the top-k rule for k = 1, 2, 4, 8, 16 and the
-- threshold rule for t = 0.5 ... 0.99 (counterfactual evaluations of one
-- run per split and router). The sparse_curve figure draws loss against the
-- share of the FFN run, one curve per router and rule.

local moelab = require "moelab"
local experiment = require "moelab.experiment"
local x = experiment.setup{ name = "d2s", steps = 1500 }
local fit_steps = moelab.args.fit_steps or 300

local ks = { 1, 2, 4, 8, 16 }
local ts = { 0.5, 0.7, 0.8, 0.9, 0.95, 0.99 }

local base = experiment.model(nil)
base.activation = "relu"
moelab.sweep{
  db = x.db, name = x.name, data = x.data, seeds = x.seeds, base = base,
  designs = { { name = "dense-relu" } },
  train = x:train(), evaluate = x.evaluate,
  after = function(_, dense, entry)
    local db = moelab.open(x.db)
    for _, method in ipairs{ "kmeans", "random" } do
      for _, kind in ipairs{ "similarity", "learned", "oracle" } do
        local sparse = moelab.moefy(dense, { experts = 16, method = method, seed = entry.seed,
                                             router = { kind = kind, select = "topk", k = 4 } })
        if kind == "learned" then
          moelab.fit_router(sparse, x.data, { steps = fit_steps, batch = 16, seed = entry.seed })
        end
        local name = string.format("%s/%s-%s/seed=%d", x.name, method, kind, entry.seed)
        local run = db:run{ name = name, model = sparse, data = x.data, seed = entry.seed,
                            experiment = x.name }
        run:evaluate(x.evaluate)
        for _, k in ipairs(ks) do
          run:evaluate{ batches = x.eval_batches, batch = 16, router = { select = "topk", k = k } }
        end
        for _, t in ipairs(ts) do
          run:evaluate{ batches = x.eval_batches, batch = 16, router = { select = "threshold", p = t } }
        end
        run:close() -- an evaluated run with no training is finished as it closes
        sparse:close()
      end
    end
    db:close()
  end,
}
-- every converted model of the database, those of seeds trained by an
-- earlier (resumed) invocation included
local derived = {}
local db = moelab.open(x.db, { readonly = true })
for _, seed in ipairs(x.seeds) do -- this invocation's seeds only
  for _, r in ipairs(db:query("SELECT run_id, name, status FROM runs WHERE name GLOB ? AND name NOT GLOB ?"
                              .. " AND run_id IN (SELECT MAX(run_id) FROM runs GROUP BY name) ORDER BY run_id",
                              string.format("%s/*/seed=%d", x.name, seed),
                              string.format("%s/dense-relu/*", x.name))) do
    derived[#derived + 1] = { name = r.name, design = r.name:match("^[^/]+/([^/]+)/"), status = r.status,
                              run_id = r.run_id }
  end
end
db:close()
local cf = x:counterfactuals(derived, "The converted models by router and rule (mean over seeds); the"
                             .. " share of experts is the share of FFN neurons run:")
x:finish{ title = "Dense to sparse: a dense ReLU model's FFNs as 16 experts of 32 neurons.",
          notes = cf, figures = { "loss", "sparse_curve" } }
