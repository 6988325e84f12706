-- moelab.report — tables of a database's runs (what `moelab report` prints),
-- and plain-text tables for experiment summaries.
--
--   local report = require "moelab.report"
--   report.print_table(rows, { {"name", "run"}, {"val_loss", "val loss", "%.4f"} })
--
-- rows is an array of tables; each column is { key, title, format }, where
-- format is a string.format pattern (default "%s"). Numbers align right (or
-- as the column's `right` says).

local report = {}

local function cell(row, col)
  local v = row[col[1]]
  if v == nil then return "-" end
  if col[3] and type(v) == "number" then return string.format(col[3], v) end
  return tostring(v)
end

function report.format_table(rows, columns)
  local widths, cells = {}, {}
  for j, col in ipairs(columns) do widths[j] = #(col[2] or col[1]) end
  for i, row in ipairs(rows) do
    cells[i] = {}
    for j, col in ipairs(columns) do
      local s = cell(row, col)
      cells[i][j] = s
      if #s > widths[j] then widths[j] = #s end
    end
  end
  local out = {}
  local function line(values, numeric)
    local parts = {}
    for j, s in ipairs(values) do
      local pad = string.rep(" ", widths[j] - #s)
      parts[j] = numeric[j] and pad .. s or s .. pad
    end
    out[#out + 1] = table.concat(parts, "  ")
  end
  local titles, numeric = {}, {}
  for j, col in ipairs(columns) do
    titles[j] = col[2] or col[1]
    numeric[j] = col.right or (col.right == nil and rows[1] ~= nil and type(rows[1][col[1]]) == "number")
  end
  line(titles, numeric)
  local rule = {}
  for j = 1, #columns do rule[j] = string.rep("-", widths[j]) end
  out[#out + 1] = table.concat(rule, "  ")
  for i = 1, #rows do line(cells[i], numeric) end
  return table.concat(out, "\n")
end

function report.print_table(rows, columns)
  print(report.format_table(rows, columns))
end

-- ---- the runs of a database ------------------------------------------------
--
-- report.runs(db, { runs = {"name or pattern", ...} }) → one row per run (the
-- latest of each name), with what `moelab report` prints (the train loss is
-- the mean over the last tenth of the steps, as run:train's `loss`: one
-- batch's loss is too noisy to compare runs by); report.groups(rows)
-- folds the seeds of a sweep (names ending "/seed=N") into one row, each
-- number the mean over them with its spread (sample standard deviation) in
-- KEY_sd, and n the count; a number some seeds lack (a diverged run's NaN
-- validation loss, a run never evaluated) is the mean over those that have
-- it, KEY_n of them, which text and Markdown show as "(2 of 3)". report.render(rows, format) gives the text
-- ("text", "csv" or "markdown").

local run_sql = [[
SELECT r.run_id, r.name, r.experiment, r.status, r.causal, r.params_total, r.params_active,
       (SELECT AVG(m.loss) FROM metrics m WHERE m.run_id = r.run_id AND m.split = 'train'
          AND m.step > (SELECT MAX(x.step) - (MAX(x.step) + 9) / 10 FROM metrics x
                        WHERE x.run_id = r.run_id AND x.split = 'train')) AS train_loss,
       f.val_loss, f.tokens,
       (SELECT MAX(m.wall_ms) FROM metrics m WHERE m.run_id = r.run_id AND m.split = 'train')
         AS wall_ms,
       json_extract(r.config, '$.model.moe.router.kind') AS kind,
       json_extract(r.config, '$.model.moe.router.k') AS k,
       json_extract(r.config, '$.model.moe.router.p') AS p,
       json_extract(r.config, '$.model.moe.router.select') AS sel,
       json_extract(r.config, '$.model.moe.router.strata') AS strata,
       json_extract(r.config, '$.model.moe.router.segment') AS segment,
       json_extract(r.config, '$.model.moe.experts') AS experts,
       json_extract(r.config, '$.model.moe.hidden') AS hidden,
       json_extract(r.config, '$.model.ffn.hidden') AS ffn_hidden,
       e.eval_id, e.moe_flops_per_token, e.experts_per_token
FROM runs r JOIN v_final_loss f USING (run_id)
LEFT JOIN evals e ON e.eval_id = (SELECT MAX(x.eval_id) FROM evals x WHERE x.run_id = r.run_id
                                  AND x.router IS NULL AND x.complete = 1 AND x.split = 'val')
WHERE r.run_id IN (SELECT MAX(run_id) FROM runs GROUP BY name)
ORDER BY r.run_id
]]

-- A short name for a run's design, from its configuration.
local function design(r)
  if r.kind == nil then return string.format("dense (ffn %s)", tostring(r.ffn_hidden)) end
  local sizes = tostring(r.hidden)
  if sizes:sub(1, 1) == "[" then sizes = "[" .. sizes:sub(2, -2) .. "]" end
  local shape = string.format("%sx%s", tostring(r.experts), sizes)
  local kind = r.kind
  if kind == "topk" then return string.format("topk k=%s, %s", r.k, shape) end
  if kind == "threshold" then return string.format("threshold t=%s, %s", r.p, shape) end
  if kind == "topp" then return string.format("topp p=%s, %s", r.p, shape) end
  if kind == "stratified" then return string.format("stratified %s, %s", r.strata, shape) end
  if kind == "merge" then
    return string.format("merge k=%s seg=%s, %s", r.k, r.segment == 0 and "whole" or r.segment, shape)
  end
  if r.sel then return string.format("%s %s, %s", kind, r.sel == "threshold" and ("t=" .. tostring(r.p))
                                     or ("k=" .. tostring(r.k)), shape) end
  return string.format("%s, %s", kind, shape)
end

-- A --runs pattern as a GLOB: * matches anything, every other character
-- itself (case included).
local function glob(pattern)
  return (pattern:gsub("[%?%[]", function(c) return "[" .. c .. "]" end))
end

function report.runs(db, opts)
  opts = opts or {}
  local rows = db:query(run_sql)
  if opts.runs and #opts.runs > 0 then
    local keep = {}
    for _, r in ipairs(rows) do
      for _, pattern in ipairs(opts.runs) do
        if db:query("SELECT ? GLOB ? AS hit", r.name, glob(pattern))[1].hit == 1 then
          keep[#keep + 1] = r
          break
        end
      end
    end
    rows = keep
  end
  for _, r in ipairs(rows) do
    r.design = design(r)
    r.tokens_per_s = (r.tokens and r.wall_ms and r.wall_ms > 0) and r.tokens / (r.wall_ms / 1000) or nil
    r.causal = r.causal == nil and "?" or (r.causal == 1 and "yes" or "no")
    if not r.kind then r.moe_flops_per_token, r.experts_per_token = nil, nil end -- dense: no MoE
    if r.eval_id and r.kind then
      local layers = db:query("SELECT COUNT(DISTINCT layer) AS n FROM expert_load WHERE eval_id = ?",
                              r.eval_id)[1].n
      local load = db:query("SELECT AVG(cv) AS cv FROM v_load_cv WHERE eval_id = ?", r.eval_id)[1]
      r.load_cv = load and load.cv
      local d = db:query("SELECT 1.0 * SUM(dropped) / NULLIF(SUM(tokens) + SUM(dropped), 0) AS f"
                         .. " FROM expert_load WHERE eval_id = ?", r.eval_id)[1]
      r.dropped = d and d.f
      -- the 95th percentile of experts per token and layer: over the last recorded evaluation
      local rec = db:query("SELECT MAX(eval_id) AS id FROM evals WHERE run_id = ? AND router IS NULL"
                           .. " AND complete = 1 AND split = 'val' AND EXISTS (SELECT 1 FROM"
                           .. " token_stats t WHERE t.eval_id = evals.eval_id)", r.run_id)[1].id
      if rec and layers > 0 then
        local n = db:query("SELECT COUNT(*) AS n FROM token_stats WHERE eval_id = ?", rec)[1].n
        local at = math.max(0, math.ceil(0.95 * n) - 1)
        local q = db:query("SELECT experts FROM token_stats WHERE eval_id = ? ORDER BY experts"
                           .. " LIMIT 1 OFFSET ?", rec, at)[1]
        r.experts_p95 = q and q.experts / layers
      end
    end
  end
  return rows
end

local numeric = { "params_total", "params_active", "tokens", "train_loss", "val_loss",
                  "moe_flops_per_token", "experts_per_token", "experts_p95", "load_cv", "dropped",
                  "tokens_per_s" }

function report.groups(rows)
  local order, groups = {}, {}
  for _, r in ipairs(rows) do
    local key = r.name:gsub("/seed=%d+$", "")
    if not groups[key] then
      groups[key] = {}
      order[#order + 1] = key
    end
    table.insert(groups[key], r)
  end
  local out = {}
  for _, key in ipairs(order) do
    local members, g = groups[key], { name = key, n = #groups[key] }
    g.design, g.causal = members[1].design, members[1].causal
    local statuses = {}
    for _, m in ipairs(members) do statuses[m.status] = (statuses[m.status] or 0) + 1 end
    local list = {}
    for s, c in pairs(statuses) do list[#list + 1] = #members > 1 and (c .. " " .. s) or s end
    table.sort(list)
    g.status = table.concat(list, ", ")
    for _, col in ipairs(numeric) do
      local sum, count = 0, 0
      for _, m in ipairs(members) do
        if type(m[col]) == "number" then sum, count = sum + m[col], count + 1 end
      end
      if count > 0 then
        local mean = sum / count
        g[col] = mean
        if count < g.n then g[col .. "_n"] = count end -- a seed without it: say over how many
        if count > 1 then
          local ss = 0
          for _, m in ipairs(members) do
            if type(m[col]) == "number" then ss = ss + (m[col] - mean) ^ 2 end
          end
          g[col .. "_sd"] = math.sqrt(ss / (count - 1))
        end
      end
    end
    out[#out + 1] = g
  end
  return out
end

local columns = {
  { "name", "run" }, { "design", "design" }, { "n", "seeds" },
  { "params_total", "params", "%.0f" }, { "params_active", "active", "%.0f" },
  { "tokens", "tokens", "%.0f" }, { "train_loss", "train loss", "%.4f", sd = true },
  { "val_loss", "val loss", "%.4f", sd = true }, { "moe_flops_per_token", "MoE FLOPs/tok", "%.0f" },
  { "experts_per_token", "experts/tok", "%.2f" }, { "experts_p95", "p95", "%.2f" },
  { "load_cv", "load CV", "%.3f" }, { "dropped", "dropped", "%.4f" },
  { "tokens_per_s", "tok/s", "%.0f" }, { "status", "status" }, { "causal", "causal" },
}

local function csv_cell(v)
  if v == nil then return "" end
  if type(v) == "number" then return string.format("%.10g", v) end
  local s = tostring(v)
  if s:find('[,"\n]') then s = '"' .. s:gsub('"', '""') .. '"' end
  return s
end

function report.render(rows, format)
  format = format or "text"
  if format == "csv" then
    local head = {}
    for _, c in ipairs(columns) do
      head[#head + 1] = c[1]
      if c.sd then head[#head + 1] = c[1] .. "_sd" end
    end
    local out = { table.concat(head, ",") }
    for _, r in ipairs(rows) do
      local cells = {}
      for _, c in ipairs(columns) do
        cells[#cells + 1] = csv_cell(r[c[1]])
        if c.sd then cells[#cells + 1] = csv_cell(r[c[1] .. "_sd"]) end
      end
      out[#out + 1] = table.concat(cells, ",")
    end
    return table.concat(out, "\n")
  end
  if format ~= "text" and format ~= "markdown" then
    error(string.format("report: format must be text, csv or markdown, got '%s'", tostring(format)), 2)
  end
  -- text and markdown: numbers formatted, "mean ± sd" where seeds differ
  local shown = {}
  for i, r in ipairs(rows) do
    shown[i] = {}
    for _, c in ipairs(columns) do
      local v = r[c[1]]
      if type(v) == "number" and c[3] then
        v = string.format(c[3], v)
        if c.sd and r[c[1] .. "_sd"] then v = v .. " ± " .. string.format(c[3], r[c[1] .. "_sd"]) end
        if r[c[1] .. "_n"] then v = string.format("%s (%d of %d)", v, r[c[1] .. "_n"], r.n) end
      end
      shown[i][c[1]] = v
    end
  end
  if format == "markdown" then
    local head, rule = {}, {}
    for _, c in ipairs(columns) do head[#head + 1] = c[2]; rule[#rule + 1] = "---" end
    local out = { "| " .. table.concat(head, " | ") .. " |", "|" .. table.concat(rule, "|") .. "|" }
    for _, r in ipairs(shown) do
      local cells = {}
      for _, c in ipairs(columns) do cells[#cells + 1] = r[c[1]] == nil and "-" or tostring(r[c[1]]) end
      out[#out + 1] = "| " .. table.concat(cells, " | ") .. " |"
    end
    return table.concat(out, "\n")
  end
  local cols = {}
  for _, c in ipairs(columns) do cols[#cols + 1] = { c[1], c[2], right = c[3] ~= nil or c[1] == "n" } end
  return report.format_table(shown, cols)
end

-- What the commands that read a database (report, placement) check before
-- they open it read-only: command is their name in messages.
function report.open_readonly(command, path, format)
  if not path then error(string.format("%s: need DB", command), 0) end
  if format ~= "text" and format ~= "csv" and format ~= "markdown" then
    error(string.format("%s: --format must be text, csv or markdown, got '%s'", command,
                        tostring(format)), 0)
  end
  local f = io.open(path, "rb")
  if not f then error(string.format("%s: cannot read database '%s'", command, path), 0) end
  f:close()
  -- a file that is no moelab database (or a newer one) is the user's
  -- mistake, said as such: without moelab.open's traceback
  local ok, db = pcall(require("moelab").open, path, { readonly = true })
  if not ok then
    error(string.format("%s: %s", command, (tostring(db):gsub("^moelab%.open: ", ""))), 0)
  end
  return db
end

-- `moelab report DB [--runs A,B] [--format text|csv|markdown]`: args as given.
function report.main(args)
  local path, runs, format = nil, nil, "text"
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "--runs" or a == "--format" then
      if not args[i + 1] then error(string.format("moelab report: %s needs a value", a), 0) end
      if a == "--runs" then
        runs = {}
        for name in args[i + 1]:gmatch("[^,]+") do   -- spaces around a name ignored, as by plot
          name = name:match("^%s*(.-)%s*$")
          if name ~= "" then runs[#runs + 1] = name end
        end
        -- an empty list would print every run, as if --runs were not given
        if #runs == 0 then
          error(string.format("moelab report: --runs names no run, got '%s'", args[i + 1]), 0)
        end
      else
        format = args[i + 1]
      end
      i = i + 2
    elseif a:sub(1, 2) == "--" then
      error(string.format("moelab report: unknown option '%s'", a), 0)
    elseif path then
      error(string.format("moelab report: unexpected argument '%s'", a), 0)
    else
      path, i = a, i + 1
    end
  end
  local db = report.open_readonly("moelab report", path, format)
  local rows = report.groups(report.runs(db, { runs = runs }))
  db:close()
  if #rows == 0 then
    io.stderr:write(runs and "moelab report: no run matches --runs\n" or "moelab report: no runs\n")
    return 1
  end
  print(report.render(rows, format))
  return 0
end

return report
