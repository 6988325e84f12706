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
-- The model (README, "Placement studies"), per MoE layer:
--   * Tokens live where the batch is split: the N tokens of the evaluation, in
--     (seq, pos) order, go to the P devices in equal contiguous shares; token
--     i's home is floor(i * P / N).
--   * Each expert lives on one device, by the policy: "contiguous" (expert e
--     on floor(e * P / E)), "round_robin" (e mod P), "balanced" (the experts
--     by falling load, each to the least loaded device with room) or
--     "cooccurrence" (the experts by falling load, each to the device with
--     room whose experts this layer's tokens choose together with it most
--     often, ties to the least loaded; then swaps of two experts while one
--     keeps more of the tokens' pairs on one device). A device holds at most
--     ceil(E / P).
--   * A token goes once to each other device that holds any of its experts
--     (dispatch) and comes back from it (combine): d_model floats of 4 bytes
--     each way. The all-to-all volume counts both.
--   * A device's compute is its assignments times the forward FLOPs of its
--     experts (2 per multiply-add over fc and proj, 3 matrices for SwiGLU)
--     at `rate` GFLOP/s; its communication, per phase, the larger of what it
--     sends and receives at `bandwidth` GB/s. The layer's critical path is
--     the slowest device's compute plus the slowest device's dispatch and
--     combine: nothing overlaps.

local placement = {}

placement.policies = { "contiguous", "round_robin", "balanced", "cooccurrence" }

-- The experts' devices (0-based, indexed by expert + 1) under a policy, for
-- one layer: load[e] its assignments, co[e][f] how many tokens chose both.
function placement.assign(policy, E, P, load, co)
  local dev, cap = {}, math.ceil(E / P)
  if policy == "contiguous" then
    for e = 0, E - 1 do dev[e + 1] = math.floor(e * P / E) end
    return dev
  elseif policy == "round_robin" then
    for e = 0, E - 1 do dev[e + 1] = e % P end
    return dev
  elseif policy ~= "balanced" and policy ~= "cooccurrence" then
    error(string.format("moelab placement: unknown policy '%s' (%s)", tostring(policy),
                        table.concat(placement.policies, ", ")), 0)
  end
  local order = {}
  for e = 1, E do order[e] = e end
  table.sort(order, function(a, b) return load[a] > load[b] or (load[a] == load[b] and a < b) end)
  local held, dload, members = {}, {}, {}
  for d = 1, math.min(P, E) do held[d], dload[d], members[d] = 0, 0, {} end
  for _, e in ipairs(order) do
    local best, best_aff = nil, -1
    for d = 1, math.min(P, E) do
      if held[d] < cap then
        local aff = 0
        if policy == "cooccurrence" then
          for _, f in ipairs(members[d]) do aff = aff + (co[e][f] or 0) end
        end
        if not best or aff > best_aff or (aff == best_aff and dload[d] < dload[best]) then
          best, best_aff = d, aff
        end
      end
    end
    dev[e] = best - 1
    held[best], dload[best] = held[best] + 1, dload[best] + load[e]
    table.insert(members[best], e)
  end
  if policy == "cooccurrence" then
    -- then swaps of two experts between devices while one raises the count of
    -- tokens' expert pairs kept together (the best swap first; at most E² swaps)
    local function with(e, d) -- e's pairs with the experts on device d, e excluded
      local n = 0
      for f = 1, E do
        if f ~= e and dev[f] == d then n = n + (co[e][f] or 0) end
      end
      return n
    end
    for _ = 1, E * E do
      local best_gain, ba, bb = 0, nil, nil
      for a = 1, E do
        for b = a + 1, E do
          local da, db = dev[a], dev[b]
          if da ~= db then
            local gain = with(a, db) + with(b, da) - with(a, da) - with(b, db) - 2 * (co[a][b] or 0)
            if gain > best_gain then best_gain, ba, bb = gain, a, b end
          end
        end
      end
      if not ba then break end
      dev[ba], dev[bb] = dev[bb], dev[ba]
    end
  end
  return dev
end

-- Replays one layer: tokens[i] = { the experts (0-based) token i chose },
-- in (seq, pos) order; flops[e] an assignment's forward FLOPs at expert e.
function placement.layer(tokens, E, P, policy, o)
  local N = #tokens
  local load, co = {}, {}
  for e = 1, E do load[e], co[e] = 0, {} end
  for _, ex in ipairs(tokens) do
    for a = 1, #ex do
      local e = ex[a] + 1
      load[e] = load[e] + 1
      for b = 1, #ex do
        local f = ex[b] + 1
        if f ~= e then co[e][f] = (co[e][f] or 0) + 1 end
      end
    end
  end
  local dev = placement.assign(policy, E, P, load, co)
  local sent, recv, compute, dload = {}, {}, {}, {}
  local assignments, localn, pairs_remote = 0, 0, 0
  for i, ex in ipairs(tokens) do
    local home = math.floor((i - 1) * P / N)
    local seen = {}
    for a = 1, #ex do
      local e = ex[a] + 1
      local d = dev[e]
      assignments = assignments + 1
      dload[d] = (dload[d] or 0) + 1
      compute[d] = (compute[d] or 0) + o.flops[e]
      if d == home then
        localn = localn + 1
      elseif not seen[d] then
        seen[d] = true
        pairs_remote = pairs_remote + 1
        sent[home] = (sent[home] or 0) + 1
        recv[d] = (recv[d] or 0) + 1
      end
    end
  end
  local token_bytes = 4 * o.d_model
  local max_load, max_compute, max_comm = 0, 0, 0
  for d = 0, P - 1 do
    max_load = math.max(max_load, dload[d] or 0)
    max_compute = math.max(max_compute, compute[d] or 0)
    max_comm = math.max(max_comm, sent[d] or 0, recv[d] or 0)
  end
  local mean_load = assignments / P
  return {
    assignments = assignments,
    local_share = assignments > 0 and localn / assignments or 0,
    remote_tokens = pairs_remote,                 -- (token, device) pairs sent away
    bytes = 2 * pairs_remote * token_bytes,       -- dispatch and combine
    imbalance = mean_load > 0 and max_load / mean_load or 0,
    compute_ms = max_compute / (o.rate * 1e9) * 1e3,
    comm_ms = 2 * max_comm * token_bytes / (o.bandwidth * 1e9) * 1e3,
    devices = dev,
  }
end

-- The model's shape for the replay, from the run's configuration.
local function model_shape(db, run_id)
  local r = db:query("SELECT json_extract(config, '$.model.d_model') AS d,"
                     .. " json_extract(config, '$.model.moe.experts') AS e,"
                     .. " json_extract(config, '$.model.moe.hidden') AS h,"
                     .. " json_extract(config, '$.model.activation') AS act"
                     .. " FROM runs WHERE run_id = ?", run_id)[1]
  if not r or not r.e then error("moelab placement: the run has no MoE layers", 0) end
  local hidden = {}
  if type(r.h) == "number" then
    for e = 1, r.e do hidden[e] = r.h end
  else
    local e = 0
    for h in tostring(r.h):gmatch("%d+") do e = e + 1; hidden[e] = tonumber(h) end
  end
  local mats = r.act == "swiglu" and 3 or 2
  local flops = {}
  for e = 1, r.e do flops[e] = 2 * mats * r.d * hidden[e] end
  return r.d, r.e, flops
end

-- The evaluation to replay: o.eval, or the latest complete recorded one of
-- o.run (a name), or of the latest run that has one.
local function find_eval(db, o)
  local sql = "SELECT e.eval_id AS eval_id, e.run_id AS run_id, r.name AS name FROM evals e"
              .. " JOIN runs r USING (run_id) WHERE e.complete = 1 AND e.routing_first IS NOT NULL"
  local rows
  if o.eval then
    rows = db:query(sql .. " AND e.eval_id = ?", o.eval)
  elseif o.run then
    rows = db:query(sql .. " AND r.name = ? ORDER BY e.eval_id DESC LIMIT 1", o.run)
  else
    rows = db:query(sql .. " ORDER BY e.eval_id DESC LIMIT 1")
  end
  if #rows == 0 then
    error(string.format("moelab placement: no recorded evaluation%s (run:evaluate{ record = true })",
                        o.eval and (" " .. o.eval) or o.run and (" of run '" .. o.run .. "'") or ""), 0)
  end
  return rows[1]
end

-- One row per (devices, layer) and a total row per devices ("all"), for one
-- policy: see placement.layer for the columns.
function placement.study(db, o)
  o = o or {}
  local devices = o.devices or { 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024 }
  if type(devices) == "number" then devices = { devices } end
  local policy = o.policy or "contiguous"
  local bandwidth, rate = o.bandwidth or 25, o.rate or 100
  for _, P in ipairs(devices) do
    if math.type(P) ~= "integer" or P < 1 then
      error(string.format("moelab placement: devices must be whole numbers >= 1, got %s", tostring(P)), 0)
    end
  end
  if not (bandwidth > 0 and rate > 0) then
    error("moelab placement: bandwidth and rate must be positive", 0)
  end
  local ev = find_eval(db, o)
  local d_model, E, flops = model_shape(db, ev.run_id)
  local rows = db:query("SELECT layer, seq, pos, expert FROM routing r, evals e"
                        .. " WHERE e.eval_id = ? AND r.routing_id BETWEEN e.routing_first AND e.routing_last"
                        .. " AND r.eval_id = e.eval_id ORDER BY layer, seq, pos, pass, rank", ev.eval_id)
  local layers, order = {}, {}
  for _, x in ipairs(rows) do
    local L = layers[x.layer]
    if not L then
      L = { tokens = {}, last = nil }
      layers[x.layer] = L
      order[#order + 1] = x.layer
    end
    local key = x.seq * 1048576 + x.pos
    if L.last ~= key then
      L.tokens[#L.tokens + 1] = {}
      L.last = key
    end
    local t = L.tokens[#L.tokens]
    t[#t + 1] = x.expert
  end
  table.sort(order)
  local out = {}
  local opts = { d_model = d_model, flops = flops, bandwidth = bandwidth, rate = rate }
  for _, P in ipairs(devices) do
    local total = { run = ev.name, eval_id = ev.eval_id, policy = policy, devices = P, layer = "all",
                    assignments = 0, bytes = 0, remote_tokens = 0, imbalance = 0, compute_ms = 0,
                    comm_ms = 0, local_n = 0 }
    for _, l in ipairs(order) do
      local r = placement.layer(layers[l].tokens, E, P, policy, opts)
      r.run, r.eval_id, r.policy, r.devices, r.layer = ev.name, ev.eval_id, policy, P, l
      r.critical_ms = r.compute_ms + r.comm_ms
      out[#out + 1] = r
      total.assignments = total.assignments + r.assignments
      total.local_n = total.local_n + r.local_share * r.assignments
      total.bytes = total.bytes + r.bytes
      total.remote_tokens = total.remote_tokens + r.remote_tokens
      total.imbalance = math.max(total.imbalance, r.imbalance)
      total.compute_ms = total.compute_ms + r.compute_ms
      total.comm_ms = total.comm_ms + r.comm_ms
    end
    total.local_share = total.assignments > 0 and total.local_n / total.assignments or 0
    total.critical_ms = total.compute_ms + total.comm_ms
    out[#out + 1] = total
  end
  return out
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
      elseif a == "--policy" then o.policy = v
      elseif a == "--run" then o.run = v
      elseif a == "--format" then format = v
      else
        local n = tonumber(v)
        if not n then error(string.format("moelab placement: %s takes a number, got '%s'", a, v), 0) end
        if a == "--eval" then o.eval = math.tointeger(n) else o[a:sub(3)] = n end
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
  local policies = o.policy == "all" and placement.policies or { o.policy or "contiguous" }
  local rows = {}
  for _, p in ipairs(policies) do
    o.policy = p
    for _, r in ipairs(placement.study(db, o)) do rows[#rows + 1] = r end
  end
  db:close()
  print(placement.render(rows, format))
  return 0
end

return placement
