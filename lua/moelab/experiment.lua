-- moelab.experiment — what the experiment scripts share: their command-line
-- arguments, the corpus and database, the training options of the reference
-- configuration, and the ending (the report printed and written as Markdown,
-- the figures drawn).
--
--   local experiment = require "moelab.experiment"
--   local x = experiment.setup{ name = "xmoe", steps = 2000 }
--   moelab.sweep{ db = x.db, name = x.name, data = x.data, seeds = x.seeds,
--                 train = x:train(), evaluate = x.evaluate, ... }
--   x:finish{ figures = { "loss", "loss_vs_flops" } }
--
-- Arguments (./moelab run experiments/NAME.lua key=value ...):
--   steps=N       training steps per run (default: the script's)
--   seeds=1,2     the seeds of every design
--   out=results   where NAME.db, NAME.md and NAME-FIGURE.pdf go
--   data=PATH     the corpus (default data/kjv.txt)
--   fresh=true    start a new database instead of resuming the last one
--   eval_batches=N  batches of each evaluation (default 20)

local experiment = {}
experiment.__index = experiment

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

function experiment.setup(defaults)
  local moelab = require "moelab"
  local args = moelab.args
  local x = setmetatable({}, experiment)
  x.name = defaults.name
  x.steps = args.steps or defaults.steps or 1000
  x.out = args.out or "results"
  x.seeds = {}
  for s in tostring(args.seeds or defaults.seeds or "1,2"):gmatch("[^,]+") do
    local n = math.tointeger(tonumber(s))
    if not n or n < 0 then error(string.format("%s: seeds must be integers >= 0, got '%s'", x.name, s), 0) end
    x.seeds[#x.seeds + 1] = n
  end
  x.eval_batches = args.eval_batches or 20
  x.data = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
  -- under mpirun rank 0 alone owns the files (moelab.ranks)
  if moelab.rank == 0 then os.execute("mkdir -p " .. shell_quote(x.out)) end
  x.db = x.out .. "/" .. x.name .. ".db"
  -- fresh deletes the database: only a true says so (fresh=0 or fresh=no
  -- is a string or a number, which Lua would take for true)
  if args.fresh ~= nil and type(args.fresh) ~= "boolean" then
    error(string.format("%s: fresh must be true or false, got '%s'", x.name, tostring(args.fresh)), 0)
  end
  if args.fresh and moelab.rank == 0 then
    for _, suffix in ipairs{ "", "-wal", "-shm" } do os.remove(x.db .. suffix) end
  end
  x.evaluate = { batches = x.eval_batches, batch = 16, record = true }
  x.started = os.time()
  return x
end

-- The runs of this invocation's seeds as --runs patterns ("xmoe/*/seed=1"):
-- the database may hold other seeds from an earlier invocation, which are
-- not part of what this one reports.
function experiment:runs()
  local patterns = {}
  for _, s in ipairs(self.seeds) do patterns[#patterns + 1] = string.format("%s/*/seed=%d", self.name, s) end
  return patterns
end

-- The reference training options (batch 16 x 128, lr 3e-3, 50 warm-up steps,
-- cosine decay), with `extra` over them.
function experiment:train(extra)
  local t = { steps = self.steps, batch = 16, lr = 3e-3, warmup = 50,
              eval_every = math.max(self.steps // 10, 1), eval_batches = 10 }
  for k, v in pairs(extra or {}) do t[k] = v end
  return t
end

-- The reference model: 4 layers, d_model 128, 4 heads, context 128, GELU,
-- LayerNorm, untied head, with `moe` (nil: dense, FFN hidden 512).
function experiment.model(moe)
  return { layers = 4, d_model = 128, heads = 4, context = 128, ffn = { hidden = 512 },
           activation = "gelu", norm = "layernorm", tied = false, moe = moe }
end

-- The counterfactual evaluations (run:evaluate{ router = ... }) of a sweep's
-- finished runs, averaged over seeds per design and router: prints them as a
-- table under `title` and returns the same as Markdown. Each row: design,
-- router ("threshold t=0.9", "topk k=4"), seeds, loss, MoE FLOPs/token,
-- experts/token and, for moefied models, the share of FFN neurons run.
function experiment:counterfactuals(results, title)
  local moelab = require "moelab"
  local report = require "moelab.report"
  local db = moelab.open(self.db, { readonly = true })
  local order, groups = {}, {}
  for _, e in ipairs(results) do
    if e.status == "finished" and e.run_id then
      local experts = db:query("SELECT json_extract(config, '$.model.moe.experts') AS n FROM runs"
                               .. " WHERE run_id = ?", e.run_id)[1].n
      for _, r in ipairs(db:query("SELECT json_extract(router, '$.kind') AS kind, json_extract(router, '$.k') AS k,"
                                  .. " json_extract(router, '$.p') AS p, json_extract(router, '$.select') AS sel,"
                                  .. " loss, moe_flops_per_token AS flops, experts_per_token AS experts"
                                  .. " FROM evals WHERE run_id = ? AND router IS NOT NULL AND complete = 1"
                                  .. " ORDER BY eval_id", e.run_id)) do
        local threshold = r.kind == "threshold" or r.kind == "topp" or r.sel == "threshold"
        local router = r.kind .. (threshold and string.format(" t=%g", r.p) or string.format(" k=%d", r.k or 0))
        local key = (e.design or e.label) .. "|" .. router
        if not groups[key] then
          groups[key] = { design = e.design or e.label, router = router, seeds = 0, loss = 0, flops = 0,
                          experts = 0, experts_total = experts }
          order[#order + 1] = key
        end
        local g = groups[key]
        g.seeds, g.loss = g.seeds + 1, g.loss + r.loss
        g.flops, g.experts = g.flops + (r.flops or 0), g.experts + (r.experts or 0)
      end
    end
  end
  db:close()
  local rows = {}
  for _, key in ipairs(order) do
    local g = groups[key]
    g.loss, g.flops, g.experts = g.loss / g.seeds, g.flops / g.seeds, g.experts / g.seeds
    g.share = g.experts_total and g.experts / g.experts_total or nil
    rows[#rows + 1] = g
  end
  local columns = { { "design", "model" }, { "router", "router at inference" }, { "seeds", "seeds", "%d" },
                    { "loss", "val loss", "%.4f" }, { "flops", "MoE FLOPs/token", "%.0f" },
                    { "experts", "experts/token", "%.2f" }, { "share", "share of experts", "%.3f" } }
  print("\n" .. title .. "\n")
  report.print_table(rows, columns)
  local md = { title, "", "| model | router at inference | seeds | val loss | MoE FLOPs/token | experts/token"
               .. " | share of experts |", "|---|---|---|---|---|---|---|" }
  for _, r in ipairs(rows) do
    md[#md + 1] = string.format("| %s | %s | %d | %.4f | %.0f | %.2f | %s |", r.design, r.router, r.seeds,
                                r.loss, r.flops, r.experts, r.share and string.format("%.3f", r.share) or "-")
  end
  return table.concat(md, "\n")
end

-- Prints the report of this invocation's seeds (experiment:runs), writes it
-- as Markdown to OUT/NAME.md with `notes`, draws
-- `figures` (OUT/NAME-FIGURE.pdf, or { NAME, option = ... } for moelab.plot's
-- options), and returns the report rows. A figure that cannot be drawn does
-- not stop the others; the error that names them all comes last.
function experiment:finish(opts)
  opts = opts or {}
  local moelab = require "moelab"
  local report = require "moelab.report"
  local db = moelab.open(self.db, { readonly = true })
  local rows = report.groups(report.runs(db, { runs = self:runs() }))
  print()
  print(report.render(rows, "text"))
  local figures, failed = {}, {}
  for _, f in ipairs(opts.figures or {}) do
    local name, options = f, {}
    if type(f) == "table" then name, options = f[1], f end
    local spec = { db = db, figure = name, out = self.out .. "/" .. self.name .. "-" .. name .. ".pdf" }
    for k, v in pairs(options) do if k ~= 1 then spec[k] = v end end
    local ok, path = pcall(moelab.plot, spec)
    if ok then figures[#figures + 1] = path else failed[#failed + 1] = name .. ": " .. tostring(path) end
  end
  local md = moelab.rank == 0 and io.open(self.out .. "/" .. self.name .. ".md", "w")
  if md then
    md:write("# ", self.name, "\n\n", opts.title or "", opts.title and "\n\n" or "")
    md:write(report.render(rows, "markdown"), "\n")
    if opts.notes then md:write("\n", opts.notes, "\n") end
    md:close()
  end
  db:close()
  print()
  print("database: " .. self.db .. "   report: " .. self.out .. "/" .. self.name .. ".md")
  if #figures > 0 then print("figures:  " .. table.concat(figures, "\n          ")) end
  print(string.format("%s: %d s", self.name, os.time() - self.started))
  if #failed > 0 then -- after everything else is written
    error(self.name .. ": figures not drawn:\n  " .. table.concat(failed, "\n  "), 0)
  end
  return rows
end

return experiment
