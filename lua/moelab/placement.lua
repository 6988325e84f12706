-- moelab.placement — what a recorded evaluation's routing would cost with the
-- experts placed on P devices (issue 13, item 4): a replay, no cluster needed.
--
--   local placement = require "moelab.placement"
--   local rows = placement.study(db, { devices = { 2, 8, 64 }, policy = "cooccurrence",
--                                      run = "top2", bandwidth = 25, rate = 100 })
--   print(placement.render(rows, "markdown"))
--
-- and from the command line: moelab placement DB --devices 2,8,64 [--policy P]
-- [--run NAME] [--eval ID] [--bandwidth GB/s] [--rate GFLOP/s] [--format F].
--
-- The replay is C (src/placement.c; its model is stated in placement.h and
-- in the README, "Placement studies"), the same that the figure `moelab plot
-- placement` draws; this module picks the evaluation, names its rows,
-- formats them and reads the command line.

local moelab = require "moelab"

local placement = {}

placement.policies = moelab.placement_policies

-- Replays one layer: tokens[i] = { the experts (0-based) token i chose },
-- in (seq, pos) order; o = { d_model = C, flops = { an assignment's forward
-- FLOPs at each expert }, bandwidth = GB/s, rate = GFLOP/s }. Returns a row's
-- columns (placement.study) and devices[e + 1], expert e's device (0-based).
--   placement.layer(tokens, E, P, policy, o)
placement.layer = moelab.placement_layer

-- The evaluation to replay: o.eval, or the latest complete recorded one of
-- o.run (a name), or of the latest run that has one; as the figures' "latest
-- recorded evaluation", under the run's own router and not a probe.
local function find_eval(db, o)
  local sql = "SELECT e.eval_id AS eval_id, e.run_id AS run_id, r.name AS name FROM evals e"
              .. " JOIN runs r USING (run_id) WHERE e.complete = 1 AND e.routing_first IS NOT NULL"
  local latest = " AND e.router IS NULL AND e.split <> 'probe' ORDER BY e.eval_id DESC LIMIT 1"
  local rows
  if o.eval then
    rows = db:query(sql .. " AND e.eval_id = ?", o.eval)
  elseif o.run then
    rows = db:query(sql .. " AND r.name = ?" .. latest, o.run)
  else
    rows = db:query(sql .. latest)
  end
  if #rows == 0 then
    error(string.format("moelab placement: no recorded evaluation%s (run:evaluate{ record = true })",
                        o.eval and (" " .. o.eval) or o.run and (" of run '" .. o.run .. "'") or ""), 0)
  end
  return rows[1]
end

-- One row per (policy, devices, layer) and a total row per (policy, devices)
-- (layer "all": sums over the layers, the largest imbalance), for o.policy
-- (a name, default "contiguous", or "all") and each of o.devices (a number
-- or a list; default 2, 4, ..., 1024): run, eval_id, policy, devices, layer,
-- assignments, local_share, remote_tokens ((token, device) pairs sent
-- away), bytes (the all-to-all volume, both ways), imbalance (the most
-- loaded device / the mean), compute_ms, comm_ms, critical_ms.
-- o.bandwidth GB/s (default 25) and o.rate GFLOP/s (100) price them.
function placement.study(db, o)
  o = o or {}
  local ev = find_eval(db, o)
  local rows = moelab.placement_study(db, ev.eval_id, { devices = o.devices, policy = o.policy,
                                                        bandwidth = o.bandwidth, rate = o.rate })
  for _, r in ipairs(rows) do r.run, r.eval_id = ev.name, ev.eval_id end
  return rows
end

local columns = {
  { "policy", "policy", "%s" }, { "devices", "devices", "%d" }, { "layer", "layer", "%s" },
  { "assignments", "assignments", "%d" }, { "local_share", "local", "%.3f" },
  { "bytes", "all-to-all MB", "%.3f", 1e-6 }, { "imbalance", "max/mean load", "%.2f" },
  { "compute_ms", "compute ms", "%.3f" }, { "comm_ms", "comm ms", "%.3f" },
  { "critical_ms", "critical ms", "%.3f" },
}

function placement.render(rows, format)
  format = format or "text"
  local lines, head = {}, {}
  for _, c in ipairs(columns) do head[#head + 1] = c[2] end
  local function cells(r)
    local t = {}
    for _, c in ipairs(columns) do
      local v = r[c[1]]
      if c[4] then v = v * c[4] end
      t[#t + 1] = string.format(c[3], v)
    end
    return t
  end
  if format == "csv" then
    lines[1] = table.concat(head, ",")
    for _, r in ipairs(rows) do lines[#lines + 1] = table.concat(cells(r), ",") end
  elseif format == "markdown" then
    lines[1] = "| " .. table.concat(head, " | ") .. " |"
    lines[2] = "|" .. string.rep("---|", #head)
    for _, r in ipairs(rows) do lines[#lines + 1] = "| " .. table.concat(cells(r), " | ") .. " |" end
  elseif format == "text" then
    local shown, cols = {}, {}
    for i, r in ipairs(rows) do shown[i] = cells(r) end
    for j, c in ipairs(columns) do cols[j] = { j, c[2], right = j > 1 } end
    return require("moelab.report").format_table(shown, cols)
  else
    error(string.format("moelab placement: --format must be text, csv or markdown, got '%s'",
                        tostring(format)), 0)
  end
  return table.concat(lines, "\n")
end

-- moelab placement DB --devices P[,P...] [--policy NAME|all] [--run NAME] [--eval ID]
--     [--bandwidth GB/s] [--rate GFLOP/s] [--format text|csv|markdown]
function placement.main(args)
  local path, o, format = nil, {}, "text"
  local i = 1
  local takes = { ["--devices"] = true, ["--policy"] = true, ["--run"] = true, ["--eval"] = true,
                  ["--bandwidth"] = true, ["--rate"] = true, ["--format"] = true }
  while i <= #args do
    local a = args[i]
    if takes[a] then
      local v = args[i + 1]
      if not v then error(string.format("moelab placement: %s needs a value", a), 0) end
      if a == "--devices" then
        o.devices = {}
        for p in v:gmatch("[^,]+") do
          local n = math.tointeger(tonumber(p))
          if not n or n < 1 then
            error(string.format("moelab placement: --devices takes whole numbers >= 1, got '%s'", p), 0)
          end
          o.devices[#o.devices + 1] = n
        end
        if #o.devices == 0 then
          error(string.format("moelab placement: --devices names no device count, got '%s'", v), 0)
        end
      elseif a == "--policy" then o.policy = v
      elseif a == "--run" then o.run = v
      elseif a == "--format" then format = v
      else
        local n = tonumber(v)
        if not n then error(string.format("moelab placement: %s takes a number, got '%s'", a, v), 0) end
        if a == "--eval" then
          -- not a whole number: refused, not taken as "the latest evaluation"
          o.eval = math.tointeger(n)
          if not o.eval then
            error(string.format("moelab placement: --eval takes an evaluation id (a whole number),"
                                .. " got '%s'", v), 0)
          end
        else
          o[a:sub(3)] = n
        end
      end
      i = i + 2
    elseif a:sub(1, 2) == "--" then
      error(string.format("moelab placement: unknown option '%s'", a), 0)
    elseif path then
      error(string.format("moelab placement: unexpected argument '%s'", a), 0)
    else
      path, i = a, i + 1
    end
  end
  if path and not o.devices then error("moelab placement: need --devices P[,P...]", 0) end
  local db = require("moelab.report").open_readonly("moelab placement", path, format)
  local rows = placement.study(db, o)
  db:close()
  print(placement.render(rows, format))
  return 0
end

return placement
