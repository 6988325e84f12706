-- moelab.sweep — every combination of some configuration values, and seeds,
-- trained and evaluated as named runs of one database; resumable.
--
--   local results = moelab.sweep{
--     db = "results/xmoe.db",                 -- a path, or a database from moelab.open
--     name = "xmoe",                          -- runs are named "xmoe/<values>/seed=<s>"
--     data = corpus,
--     base = { layers = 4, d_model = 128, moe = { experts = 8, hidden = 128 } },
--     vary = { ["moe.router"] = { { kind = "topk", k = 2 }, { kind = "threshold", p = 0.9 } },
--              ["moe.experts"] = { 8, 16 } },
--     designs = { { name = "top2", set = { ["moe.router"] = { kind = "topk", k = 2 } } },
--                 { name = "dense", set = { moe = false } } },  -- optional (false removes a key)
--     seeds = { 1, 2 },                       -- the model's seed and the data order's
--     train = { steps = 300, batch = 16 },
--     evaluate = { batches = 20, record = true },  -- after training (optional)
--     after = function(run, model, entry) end,     -- more work per run (optional)
--   }
--
-- Keys of `vary` are dotted paths into the configuration; each value replaces
-- what base has there. `designs`, when given, are named sets of such values
-- (a value false removes the key), each crossed with the vary combinations;
-- its runs are named "<name>/<design>/<values>/seed=<s>". Combinations run in
-- a fixed order (designs in the order given, keys sorted, values in the order
-- given, then seeds). A run whose name is already in the
-- database as `finished` or `diverged` with the same model configuration is
-- skipped and its recorded results are returned, so an interrupted sweep
-- resumes where it stopped; one recorded as failed, interrupted or crashed is
-- run again under the same name. One made with another model configuration,
-- other training options (of those `train` gives) or another corpus (its size
-- and train split) is refused: its numbers are not this sweep's. A run that fails is reported and the sweep
-- goes on; Ctrl-C stops the sweep. Returns one entry per run:
--   { name, design, label, seed, values = { [key] = value }, status, run_id, skipped,
--     loss, val_loss (the run's last train and val rows, v_final_loss),
--     eval = <run:evaluate's result>, error, seconds }

local sweep = {}

local function deep_copy(v)
  if type(v) ~= "table" then return v end
  local t = {}
  for k, x in pairs(v) do t[k] = deep_copy(x) end
  return t
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end

-- A value as it appears in a run's name: compact and the same every time.
local function show(v)
  if type(v) ~= "table" then return tostring(v) end
  local parts = {}
  if #v > 0 then
    for _, x in ipairs(v) do parts[#parts + 1] = show(x) end
  else
    for _, k in ipairs(sorted_keys(v)) do parts[#parts + 1] = tostring(k) .. "=" .. show(v[k]) end
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

-- config[path] = value for a dotted path, making the tables on the way.
local function set_path(config, path, value)
  local t, last = config, nil
  for part in path:gmatch("[^.]+") do
    if last then
      if t[last] == nil then t[last] = {} end
      if type(t[last]) ~= "table" then
        error(string.format("moelab.sweep: vary key '%s': '%s' is not a table in base", path, last), 0)
      end
      t = t[last]
    end
    last = part
  end
  if not last then error("moelab.sweep: an empty vary key", 0) end
  if value == false then t[last] = nil else t[last] = deep_copy(value) end
end

-- Every combination of the vary values: an array of { {key, value}, ... }.
local function combinations(vary)
  local keys = sorted_keys(vary)
  local out = { {} }
  for _, key in ipairs(keys) do
    local values = vary[key]
    if type(values) ~= "table" or #values == 0 then
      error(string.format("moelab.sweep: vary['%s'] must be a non-empty list of values", key), 0)
    end
    local grown = {}
    for _, combo in ipairs(out) do
      for _, value in ipairs(values) do
        local c = { table.unpack(combo) }
        c[#c + 1] = { key, value }
        grown[#grown + 1] = c
      end
    end
    out = grown
  end
  return out
end

local function duration(s)
  if s >= 3600 then return string.format("%dh%02dm", s // 3600, s % 3600 // 60) end
  if s >= 60 then return string.format("%dm%02ds", s // 60, s % 60) end
  return string.format("%ds", s)
end

local known = { db = true, name = true, data = true, base = true, vary = true, seeds = true,
                train = true, evaluate = true, after = true, experiment = true, progress = true,
                designs = true }

-- The last run of this name, and whether its configuration is model_json.
-- Configurations recorded before moe.bias was always written have it only
-- when true: a missing one is false.
local function previous(db, name, model_json)
  local rows = db:query("SELECT run_id, status,"
                        .. " json(json_remove(json_extract(config, '$.model'), '$.moe.bias'))"
                        .. " = json(json_remove(?1, '$.moe.bias'))"
                        .. " AND coalesce(json_extract(config, '$.model.moe.bias'), 0)"
                        .. " = coalesce(json_extract(?1, '$.moe.bias'), 0) AS same"
                        .. " FROM runs WHERE name = ?2 ORDER BY run_id DESC LIMIT 1", model_json, name)
  return rows[1]
end

-- What run run_id was trained on that this sweep's run would not be, as
-- "steps 300, now 20; ...", or nil: the training options the sweep gives
-- (but threads and progress, which change the time, not the numbers, and
-- the probe, which only records) against the recorded ones (float32, hence
-- the tolerance), and the corpus's size and train split.
local function other_training(db, run_id, train, data)
  local differ = {}
  for _, key in ipairs(sorted_keys(train)) do
    local now = train[key]
    if type(now) == "number" and key ~= "threads" and not (key == "eval_batch" and now == 0) then
      local was = db:query("SELECT json_extract(config, ?) AS v FROM runs WHERE run_id = ?",
                           "$.train." .. key, run_id)[1].v
      if type(was) ~= "number" or math.abs(was - now) > 1e-6 * math.max(math.abs(was), math.abs(now)) then
        differ[#differ + 1] = string.format("%s %s, now %s", key, tostring(was), tostring(now))
      end
    end
  end
  local bytes, train_bytes = data:size()
  local d = db:query("SELECT json_extract(config, '$.data.bytes') AS bytes,"
                     .. " json_extract(config, '$.data.split') AS split FROM runs WHERE run_id = ?", run_id)[1]
  local was_train = d.bytes and d.split and math.floor(d.bytes * d.split)
  if d.bytes ~= bytes or was_train ~= train_bytes then
    differ[#differ + 1] = string.format("a corpus of %s bytes (%s train), now %d (%d)", tostring(d.bytes),
                                        tostring(was_train), bytes, train_bytes)
  end
  return #differ > 0 and table.concat(differ, "; ") or nil
end

-- An entry's losses as the database has them (v_final_loss: the last train
-- and val rows), and with_eval its last evaluation under its own router.
local function recorded_results(db, entry, with_eval)
  local final = db:query("SELECT train_loss, val_loss FROM v_final_loss WHERE run_id = ?", entry.run_id)[1]
  if final then
    entry.loss, entry.val_loss = final.train_loss, final.val_loss
  end
  if not with_eval then return end
  local e = db:query("SELECT eval_id, loss, tokens, moe_flops_per_token, experts_per_token FROM evals"
                     .. " WHERE run_id = ? AND router IS NULL AND complete = 1"
                     .. " ORDER BY eval_id DESC LIMIT 1", entry.run_id)[1]
  if e then entry.eval = e end
end

function sweep.run(spec)
  local moelab = require "moelab"
  if type(spec) ~= "table" then error("moelab.sweep: expected a table of options", 2) end
  for k in pairs(spec) do
    if not known[k] then error(string.format("moelab.sweep: unknown option '%s'", tostring(k)), 2) end
  end
  if spec.data == nil then error("moelab.sweep: 'data' (a corpus) is required", 2) end
  local data_mt = getmetatable(spec.data)
  if type(data_mt) ~= "table" or data_mt.__name ~= "moelab.Corpus" then
    error(string.format("moelab.sweep: 'data' must be a corpus (moelab.corpus{ path = ... }), got %s",
                        type(spec.data) == "string" and string.format("'%s'", spec.data) or type(spec.data)), 2)
  end
  if type(spec.base) ~= "table" then error("moelab.sweep: 'base' (a model configuration) is required", 2) end
  local vary = spec.vary or {}
  local seeds = spec.seeds or { 1 }
  if type(seeds) ~= "table" or #seeds == 0 then error("moelab.sweep: 'seeds' must be a non-empty list", 2) end
  local seen_seeds = {}
  for _, s in ipairs(seeds) do
    if math.type(s) ~= "integer" or s < 0 then
      error(string.format("moelab.sweep: seeds must be integers >= 0, got %s", tostring(s)), 2)
    end
    -- the same run twice: trained once, then skipped, and counted twice
    if seen_seeds[s] then error(string.format("moelab.sweep: seed %d is given twice", s), 2) end
    seen_seeds[s] = true
  end
  local prefix = spec.name or "sweep"
  local db = spec.db
  if type(db) == "string" then db = moelab.open(db)
  elseif db == nil then error("moelab.sweep: 'db' (a path or a database) is required", 2) end
  local progress = spec.progress
  if progress == nil then progress = true end
  progress = progress and moelab.rank == 0 -- under mpirun, rank 0 speaks for all

  local designs = spec.designs or { false }
  if type(designs) ~= "table" or #designs == 0 then
    error("moelab.sweep: 'designs' must be a non-empty list of { name = ..., set = { ... } }", 2)
  end
  for _, d in ipairs(designs) do
    if d and (type(d) ~= "table" or type(d.name) ~= "string" or d.name:find("/")
              or (d.set ~= nil and type(d.set) ~= "table")) then
      error("moelab.sweep: each design is { name = \"...\" (no '/'), set = { [\"dotted.key\"] = value } }", 2)
    end
  end
  local combos = combinations(vary)
  -- a combination's label ("KEY=VALUE,...") and its part of the run names
  local function labelled(d, combo)
    local labels = {}
    for _, kv in ipairs(combo) do labels[#labels + 1] = kv[1] .. "=" .. show(kv[2]) end
    local label = #labels > 0 and table.concat(labels, ",") or (d and "" or "base")
    return label, d and (label ~= "" and (d.name .. "/" .. label) or d.name) or label
  end
  local seen_names = {}
  for _, d in ipairs(designs) do
    for _, combo in ipairs(combos) do
      local _, shown = labelled(d, combo)
      if seen_names[shown] then
        error(string.format("moelab.sweep: two runs would be named '%s/%s/seed=...' (a design or a vary"
                            .. " value given twice)", prefix, shown), 2)
      end
      seen_names[shown] = true
    end
  end
  local total, done_here, spent = #designs * #combos * #seeds, 0, 0.0
  local results, i = {}, 0
  for _, d in ipairs(designs) do
    for _, combo in ipairs(combos) do
      local label, shown = labelled(d, combo)
      for _, seed in ipairs(seeds) do
        i = i + 1
        local config = deep_copy(spec.base)
        local values = {}
        if d then
          for _, key in ipairs(sorted_keys(d.set or {})) do set_path(config, key, d.set[key]) end
        end
        for _, kv in ipairs(combo) do
          set_path(config, kv[1], kv[2])
          values[kv[1]] = kv[2]
        end
        config.seed = seed
        local name = string.format("%s/%s/seed=%d", prefix, shown, seed)
        local entry = { name = name, design = d and d.name or nil, label = label, seed = seed,
                        values = values }
        results[#results + 1] = entry
        local ok_model, model = pcall(moelab.model, config)
        if not ok_model then
          entry.status, entry.error = "failed", tostring(model)
        else
          local before = previous(db, name, model:config("json"))
          if before and before.same == 0 and (before.status == "finished" or before.status == "diverged") then
            model:close()
            error(string.format("moelab.sweep: run '%s' in %s was made with another model configuration;"
                                .. " give the sweep another name or database", name, db:path()), 2)
          end
          local done = before and (before.status == "finished" or before.status == "diverged")
          local differ = done and other_training(db, before.run_id, spec.train or {}, spec.data)
          if differ then
            model:close()
            error(string.format("moelab.sweep: run '%s' in %s was trained otherwise (%s);"
                                .. " give the sweep another name or database", name, db:path(), differ), 2)
          end
          if done then
            entry.status, entry.run_id, entry.skipped = before.status, before.run_id, true
            recorded_results(db, entry, true)
            model:close()
          else
            if progress then
              local eta = spent > 0 and (" (ETA " .. duration(math.floor(spent / done_here
                                                                     * (total - i + 1))) .. ")") or ""
              io.stderr:write(string.format("sweep %s: run %d of %d: %s seed %d%s\n", prefix, i, total,
                                            shown, seed, eta))
            end
            local t0 = os.time()
            local run = db:run{ name = name, model = model, data = spec.data, seed = seed,
                                experiment = spec.experiment or prefix }
            entry.run_id = run:id()
            local ok, result = pcall(run.train, run, spec.train or {})
            if ok then
              entry.status, entry.loss, entry.val_loss = result.status, result.loss, result.val_loss
            end
            if ok and entry.status == "finished" and spec.evaluate then
              ok, result = pcall(run.evaluate, run, spec.evaluate)
              if ok then entry.eval = result end
            end
            if ok and entry.status == "finished" and spec.after then
              ok, result = pcall(spec.after, run, model, entry)
            end
            if not ok then
              local msg = tostring(result)
              run:close() -- first: closing records a run still open as finished
              local status = db:query("SELECT status FROM runs WHERE run_id = ?", entry.run_id)[1].status
              if status == "interrupted" or msg:find("interrupted by", 1, true) then
                model:close()
                error(result, 0) -- Ctrl-C (in training, an evaluation or the hook) stops the sweep
              end
              -- whatever failed (options, training, an evaluation, the hook): the run says so
              entry.status, entry.error = "failed", msg
              db:query("UPDATE runs SET status = 'failed', error = ? WHERE run_id = ?", msg, entry.run_id)
            end
            if entry.status == "failed" and progress then
              io.stderr:write(string.format("sweep %s: run %s failed: %s\n", prefix, name, entry.error))
            end
            if entry.status ~= "failed" then recorded_results(db, entry, false) end
            run:close()
            model:close()
            entry.seconds = os.time() - t0
            done_here, spent = done_here + 1, spent + entry.seconds
          end
        end
      end
    end
  end
  if progress then
    local counts, failed = {}, {}
    for _, e in ipairs(results) do
      local k = e.skipped and "skipped" or e.status
      counts[k] = (counts[k] or 0) + 1
      if e.status == "failed" then failed[#failed + 1] = e.name end
    end
    local parts = {}
    for _, k in ipairs(sorted_keys(counts)) do parts[#parts + 1] = counts[k] .. " " .. k end
    io.stderr:write(string.format("sweep %s: %d runs: %s%s\n", prefix, #results, table.concat(parts, ", "),
                                  #failed > 0 and ("; failed: " .. table.concat(failed, ", ")) or ""))
  end
  return results
end

return sweep
