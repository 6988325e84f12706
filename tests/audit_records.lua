-- audit_records.lua — trains one tiny run per router/expert design, records an
-- evaluation of each, and checks that the recorded tables agree with each
-- other and with SPEC §2/§3 (selection rules, token_stats against routing,
-- evals against token_stats, expert_load and sparsity against routing, FLOPs
-- from the routing rows, parameters against the checkpoint, metrics, the
-- views, recorded against unrecorded evaluations). Fails (error) on any
-- violated invariant; about 10 s on 2 cores.
--   ./moelab run tests/audit_records.lua [db=KEEP.db] [steps=30] [batches=2] [batch=4]
--                                        [designs=top2-norm,stratified,...,moefy]
local moelab = require "moelab"
local args = moelab.args
local tmpbase = os.tmpname() -- (a file Lua made: ours to remove at the end)
local dbpath = args.db or tmpbase .. ".db"
os.remove(dbpath)
local ckpath = tmpbase .. ".safetensors"
local STEPS = args.steps or 30
local BATCHES, BATCH = args.batches or 2, args.batch or 4
local data = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
local db = moelab.open(dbpath)

local failures = {}
local function fail(run, fmt, ...)
  local msg = string.format("[%s] " .. fmt, run, ...)
  failures[#failures + 1] = msg
  io.stderr:write("FAIL ", msg, "\n")
end
local function close(a, b, tol)
  tol = tol or 1e-5
  if a == nil or b == nil then return a == b end
  return math.abs(a - b) <= tol * math.max(1, math.abs(a), math.abs(b))
end
local function q(sql, ...) return db:query(sql, ...) end
local function q1(sql, ...) local r = q(sql, ...)[1]; return r end

local base = { layers = 2, d_model = 32, heads = 2, context = 32, seed = 1 }
local function cfg(moe, extra)
  local c = {}
  for k, v in pairs(base) do c[k] = v end
  for k, v in pairs(extra or {}) do c[k] = v end
  c.moe = moe
  return c
end

local designs = {
  { name = "top1-raw", model = cfg{ experts = 4, hidden = 16, router = { kind = "topk", k = 1, normalize = false } } },
  { name = "top1-norm", model = cfg{ experts = 4, hidden = 16, router = { kind = "topk", k = 1 } } },
  { name = "top2-norm", model = cfg{ experts = 4, hidden = 16, router = { kind = "topk", k = 2 } } },
  { name = "top2-raw", model = cfg{ experts = 4, hidden = 16, router = { kind = "topk", k = 2, normalize = false } } },
  { name = "top2-cap", model = cfg{ experts = 4, hidden = 16,
      router = { kind = "topk", k = 2, capacity_factor = 0.5, min_capacity = 1 } } },
  { name = "top2-raw-cap", model = cfg{ experts = 4, hidden = 16,
      router = { kind = "topk", k = 2, normalize = false, capacity_factor = 0.75 } } },
  { name = "top1-raw-cap", model = cfg{ experts = 4, hidden = 16,
      router = { kind = "topk", k = 1, normalize = false, capacity_factor = 1, min_capacity = 1 } } },
  { name = "hash-cap", model = cfg{ experts = 4, hidden = 16, router = { kind = "hash", capacity_factor = 1, min_capacity = 1 } } },
  { name = "thr-rmsnorm-tied", model = cfg({ experts = 8, hidden = 8, router = { kind = "threshold", p = 0.9 } },
      { norm = "rmsnorm", tied = true }) },
  { name = "strat-sample", model = cfg{ experts = 8, hidden = 8, router = { kind = "stratified", strata = { 4, 4 }, second = "sample" } } },
  { name = "merge-tokatt", model = cfg({ experts = 4, hidden = 16, router = { kind = "merge", k = 2, segment = 8, token_attention = 4 } },
      { activation = "relu" }) },
  { name = "top1-aux", model = cfg{ experts = 4, hidden = 16, router = { kind = "topk", k = 1, normalize = false },
      aux = { balance = 0.01, z = 0.001, cv2 = 0.01, entropy = 0.001 } } },
  { name = "top2-relu", model = cfg({ experts = 4, hidden = 16, router = { kind = "topk", k = 2 } }, { activation = "relu" }) },
  { name = "top2-swiglu", model = cfg({ experts = 4, hidden = 16, router = { kind = "topk", k = 2 } }, { activation = "swiglu" }) },
  { name = "top2-every2", model = cfg({ every = 2, experts = 4, hidden = 16, router = { kind = "topk", k = 2 } }, { layers = 3 }) },
  { name = "thr0.5", model = cfg{ experts = 8, hidden = 8, router = { kind = "threshold", p = 0.5 } } },
  { name = "thr0.9-max3", model = cfg{ experts = 8, hidden = 8, router = { kind = "threshold", p = 0.9, max_k = 3 } } },
  { name = "thr0.9-cap", model = cfg{ experts = 8, hidden = 8,
      router = { kind = "threshold", p = 0.9, capacity_factor = 0.5, k = 2, min_capacity = 1 } } },
  { name = "topp0.7", model = cfg{ experts = 8, hidden = 8, router = { kind = "topp", p = 0.7 } } },
  { name = "stratified", model = cfg{ experts = 8, hidden = 8, router = { kind = "stratified", strata = { 4, 4 } } } },
  { name = "stratified-3", model = cfg{ experts = 6, hidden = 8, router = { kind = "stratified", strata = { 2, 2, 2 } } } },
  { name = "stratified-cap", model = cfg{ experts = 8, hidden = 8,
      router = { kind = "stratified", strata = { 4, 4 }, capacity_factor = 0.5, min_capacity = 1 } } },
  { name = "strat-cap-single", model = cfg({ every = 2, experts = 8, hidden = 8,
      router = { kind = "stratified", strata = { 2, 2, 4 }, capacity_factor = 0.5, min_capacity = 1 } }) },
  { name = "hash-every2", model = cfg({ every = 2, experts = 4, hidden = 16, router = { kind = "hash" } }, { layers = 4 }) },
  { name = "merge-every2", model = cfg({ every = 2, experts = 4, hidden = 16, router = { kind = "merge", k = 2, segment = 8 } }, { layers = 4 }) },
  { name = "thr-cap-swiglu", model = cfg({ experts = 8, hidden = 8,
      router = { kind = "threshold", p = 0.8, max_k = 3, capacity_factor = 0.5, k = 2, min_capacity = 1 } }, { activation = "swiglu" }) },
  { name = "hmoe-topp", model = cfg{ experts = 4, hidden = { 8, 16, 24, 32 }, router = { kind = "topp", p = 0.7 },
      aux = { p_penalty = 0.01, entropy = 0.01 } } },
  { name = "hmoe-top2-swiglu", model = cfg({ experts = 4, hidden = { 8, 16, 24, 32 }, router = { kind = "topk", k = 2 } },
      { activation = "swiglu" }) },
  { name = "merge-seg8", model = cfg{ experts = 4, hidden = 16, router = { kind = "merge", k = 2, segment = 8 } } },
  { name = "merge-whole", model = cfg{ experts = 4, hidden = 16, router = { kind = "merge", k = 2, segment = 0 } } },
  { name = "hash", model = cfg{ experts = 4, hidden = 16, router = { kind = "hash" } } },
  { name = "expert_choice", model = cfg{ experts = 4, hidden = 16, router = { kind = "expert_choice", capacity_factor = 2 } } },
}

-- ---------------------------------------------------------------- helpers
local function checkpoint_params(path)
  local f = assert(io.open(path, "rb"))
  local n = string.unpack("<I8", f:read(8))
  local header = f:read(n)
  f:close()
  local total = 0
  for name, shape in header:gmatch('"([^"]+)":%s*{[^}]-"shape":%s*%[([%d,%s]*)%]') do
    if not name:find("hash_map", 1, true) then
      local p = 1
      for d in shape:gmatch("%d+") do p = p * tonumber(d) end
      total = total + p
    end
  end
  return total
end

local function check_run(d, run, model, e, n_moe_layers)
  local name = d.name
  local rid, eid = run:id(), e.eval_id
  local mc = model:config()
  local rc = mc.moe.router
  local E = mc.moe.experts
  local hidden = mc.moe.hidden
  if type(hidden) ~= "table" then local h = hidden; hidden = {}; for i = 1, E do hidden[i] = h end end
  local kind = rc.kind
  local capped = (rc.capacity_factor or 0) > 0
  local T = BATCHES * BATCH * mc.context
  local ev = q1("SELECT * FROM evals WHERE eval_id = ?", eid)

  -- evals vs returned values and token_stats
  local ts = q1([[SELECT COUNT(*) n, AVG(loss) loss, AVG(experts) experts, AVG(moe_flops) flops,
                  AVG(passes) passes FROM token_stats WHERE eval_id = ?]], eid)
  if ev.tokens ~= T then fail(name, "evals.tokens %s ~= %d", ev.tokens, T) end
  if ts.n ~= ev.tokens then fail(name, "token_stats rows %d ~= evals.tokens %d", ts.n, ev.tokens) end
  if not close(ts.loss, ev.loss) then fail(name, "mean token_stats.loss %.7f ~= evals.loss %.7f", ts.loss, ev.loss) end
  if not close(e.loss, ev.loss) then fail(name, "evaluate().loss %.7f ~= evals.loss %.7f", e.loss, ev.loss) end
  if not close(ts.flops, ev.moe_flops_per_token, 1e-4) then
    fail(name, "mean token_stats.moe_flops %.3f ~= evals.moe_flops_per_token %.3f", ts.flops, ev.moe_flops_per_token)
  end
  if not close(ts.experts / n_moe_layers, ev.experts_per_token) then
    fail(name, "mean token_stats.experts / layers %.5f ~= evals.experts_per_token %.5f",
         ts.experts / n_moe_layers, ev.experts_per_token)
  end
  if ev.complete ~= 1 then fail(name, "evals.complete = %s", ev.complete) end

  -- token_stats.experts = its routing rows, passes
  local bad = q1([[SELECT COUNT(*) n, MIN(t.experts - COALESCE(r.n, 0)) lo, MAX(t.experts - COALESCE(r.n, 0)) hi
      FROM token_stats t LEFT JOIN (SELECT seq, pos, COUNT(*) n FROM routing WHERE eval_id = ?1 GROUP BY seq, pos) r
      USING (seq, pos) WHERE t.eval_id = ?1 AND t.experts <> COALESCE(r.n, 0)]], eid)
  if bad.n > 0 then fail(name, "%d tokens with token_stats.experts ~= routing rows (diff %s..%s)", bad.n, bad.lo, bad.hi) end
  if kind == "stratified" then
    local bp = q1([[SELECT COUNT(*) n FROM token_stats t LEFT JOIN
        (SELECT seq, pos, COUNT(*) np FROM (SELECT DISTINCT seq, pos, layer, pass FROM routing WHERE eval_id = ?1)
         GROUP BY seq, pos) r USING (seq, pos) WHERE t.eval_id = ?1 AND t.passes <> COALESCE(r.np, 0)]], eid)
    if bp.n > 0 and not capped then fail(name, "%d tokens: passes ~= distinct (layer, pass) in routing", bp.n) end
    local lo = q1("SELECT MIN(passes) lo, MAX(passes) hi FROM token_stats WHERE eval_id = ?", eid)
    local L = #rc.strata
    if lo.lo < n_moe_layers or lo.hi > n_moe_layers * L then
      fail(name, "passes out of [%d, %d]: %d..%d", n_moe_layers, n_moe_layers * L, lo.lo, lo.hi)
    end
  elseif kind ~= "expert_choice" then
    local bp = q1("SELECT COUNT(*) n FROM token_stats WHERE eval_id = ? AND passes <> ?", eid, n_moe_layers)
    if bp.n > 0 then fail(name, "%d tokens with passes ~= %d MoE layers", bp.n, n_moe_layers) end
  end
  -- token ids agree between token_stats and routing
  local tk = q1([[SELECT COUNT(*) n FROM routing r JOIN token_stats t ON t.eval_id = r.eval_id AND t.seq = r.seq
      AND t.pos = r.pos WHERE r.eval_id = ? AND r.token <> t.token]], eid)
  if tk.n > 0 then fail(name, "%d routing rows whose token differs from token_stats", tk.n) end

  -- routing rows: range, duplicates, ranks
  local rr = q1([[SELECT COUNT(*) n, MIN(expert) emin, MAX(expert) emax, MIN(weight) wmin, MAX(weight) wmax,
      MIN(seq) smin, MAX(seq) smax, MIN(pos) pmin, MAX(pos) pmax, COUNT(DISTINCT layer) layers
      FROM routing WHERE eval_id = ?]], eid)
  if rr.emin < 0 or rr.emax >= E then fail(name, "expert out of range %d..%d", rr.emin, rr.emax) end
  if rr.wmin < 0 then fail(name, "negative weight %g", rr.wmin) end
  if rr.smin ~= 0 or rr.smax ~= BATCHES * BATCH - 1 or rr.pmin ~= 0 or rr.pmax ~= mc.context - 1 then
    fail(name, "seq %d..%d pos %d..%d", rr.smin, rr.smax, rr.pmin, rr.pmax)
  end
  if rr.layers ~= n_moe_layers then fail(name, "routing has %d layers, model %d MoE layers", rr.layers, n_moe_layers) end
  local dup = q1([[SELECT COUNT(*) n FROM (SELECT COUNT(*) c FROM routing WHERE eval_id = ?
      GROUP BY layer, seq, pos, pass, expert HAVING c > 1)]], eid)
  if dup.n > 0 then fail(name, "%d duplicate (token, layer, pass, expert)", dup.n) end
  local duprank = q1([[SELECT COUNT(*) n FROM (SELECT COUNT(*) c FROM routing WHERE eval_id = ?
      GROUP BY layer, seq, pos, pass, rank HAVING c > 1)]], eid)
  if duprank.n > 0 then fail(name, "%d duplicate (token, layer, pass, rank)", duprank.n) end
  if not capped then
    local nc = q1([[SELECT COUNT(*) n FROM (SELECT MIN(rank) lo, MAX(rank) hi, COUNT(*) c FROM routing
        WHERE eval_id = ? GROUP BY layer, seq, pos, pass) WHERE lo <> 0 OR hi <> c - 1]], eid)
    if nc.n > 0 and kind ~= "expert_choice" then fail(name, "%d (token, layer, pass) with non-contiguous ranks", nc.n) end
  end
  -- every MoE layer routes every token (not expert choice)
  if kind ~= "expert_choice" and not capped then
    local miss = q1([[SELECT COUNT(*) n FROM (SELECT layer, COUNT(DISTINCT seq * 100000 + pos) c FROM routing
        WHERE eval_id = ? GROUP BY layer) WHERE c <> ?]], eid, T)
    if miss.n > 0 then fail(name, "%d layers where not every token has routing rows", miss.n) end
  end

  -- per-token selection rule
  local groups = q([[SELECT layer, seq, pos, pass, COUNT(*) c, SUM(weight) w, MIN(rank) lo, MAX(rank) hi,
      group_concat(weight, ',') ws FROM (SELECT * FROM routing WHERE eval_id = ? ORDER BY layer, seq, pos, pass, rank)
      GROUP BY layer, seq, pos, pass]], eid)
  local nbad, first = 0, nil
  local function bad_token(g, why)
    nbad = nbad + 1
    first = first or string.format("layer %d seq %d pos %d pass %d: %s (weights %s)", g.layer, g.seq, g.pos, g.pass, why, g.ws)
  end
  for _, g in ipairs(groups) do
    local ws = {}
    for w in g.ws:gmatch("[^,]+") do ws[#ws + 1] = tonumber(w) end
    if kind == "topk" then
      if (not capped and g.c ~= rc.k) or g.c > rc.k then bad_token(g, "count " .. g.c .. " for k " .. rc.k) end
      if rc.normalize and not capped and not close(g.w, 1, 1e-5) then bad_token(g, "normalized weights sum " .. g.w) end
      if not rc.normalize and g.w > 1 + 1e-5 then bad_token(g, "raw weights sum " .. g.w) end
      if rc.normalize and capped and g.c == rc.k and not close(g.w, 1, 1e-5) then bad_token(g, "sum " .. g.w) end
    elseif kind == "threshold" or kind == "topp" then
      local maxk = rc.max_k or 0
      if maxk > 0 and g.c > maxk then bad_token(g, "count over max_k") end
      if kind == "threshold" and not capped then
        local before = 0
        for j = 1, #ws - 1 do before = before + ws[j] end
        if before >= rc.p + 1e-6 then bad_token(g, "kept a rank after the mass reached p") end
        if g.w < rc.p - 1e-6 and not (maxk > 0 and g.c == maxk) and g.c ~= E then
          bad_token(g, "mass " .. g.w .. " below p without cap")
        end
      end
      if kind == "topp" and not capped and not close(g.w, 1, 1e-5) then bad_token(g, "topp weights sum " .. g.w) end
    elseif kind == "stratified" then
      if not capped and g.c ~= 2 then bad_token(g, "stratified count " .. g.c) end
      if not close(g.w, 1, 1e-5) then bad_token(g, "stratified weights sum " .. g.w) end
    elseif kind == "merge" then
      if g.c ~= rc.k then bad_token(g, "merge count " .. g.c) end
      if not close(g.w, 1, 1e-5) then bad_token(g, "merge gate sum " .. g.w) end
    elseif kind == "hash" then
      if g.c ~= 1 or ws[1] ~= 1 then bad_token(g, "hash") end
    end
    -- weights descending by rank where the router ranks by p
    if kind ~= "expert_choice" and kind ~= "hash" then
      for j = 2, #ws do if ws[j] > ws[j - 1] + 1e-6 then bad_token(g, "weights not descending by rank"); break end end
    end
  end
  if nbad > 0 then fail(name, "%d (token, layer, pass) break the %s rule; first: %s", nbad, kind, first) end

  -- hash: same token id, same expert
  if kind == "hash" then
    local h = q1([[SELECT COUNT(*) n FROM (SELECT layer, token, COUNT(DISTINCT expert) c FROM routing WHERE eval_id = ?
        GROUP BY layer, token) WHERE c > 1]], eid)
    if h.n > 0 then fail(name, "%d (layer, token) routed to several experts", h.n) end
  end
  -- stratified: pass s routes only to experts of strata >= s; a token makes pass s+1 iff its top-1 was in stratum s
  if kind == "stratified" then
    local m = {}
    local acc = 0
    for s, n in ipairs(rc.strata) do m[s - 1] = acc; acc = acc + n end
    for s = 0, #rc.strata - 1 do
      local v = q1("SELECT COUNT(*) n FROM routing WHERE eval_id = ? AND pass = ? AND expert < ?", eid, s, m[s])
      if v.n > 0 then fail(name, "%d rows of pass %d route to an expert of an earlier stratum", v.n, s) end
    end
    if not capped then
      -- next pass = 1 + stratum of rank-0 expert (when < L)
      local rows = q([[SELECT layer, seq, pos, pass, expert FROM routing WHERE eval_id = ? AND rank = 0
          ORDER BY layer, seq, pos, pass]], eid)
      local function stratum(x) local s = 0; for i = 0, #rc.strata - 1 do if x >= m[i] then s = i end end; return s end
      local nb = 0
      for i, r in ipairs(rows) do
        local nxt = rows[i + 1]
        local expect = stratum(r.expert) + 1
        local same = nxt and nxt.layer == r.layer and nxt.seq == r.seq and nxt.pos == r.pos
        if expect < #rc.strata then
          if not same or nxt.pass ~= expect then nb = nb + 1 end
        elseif same then nb = nb + 1 end
      end
      if nb > 0 then fail(name, "%d stratified passes do not follow the top-1 stratum", nb) end
    end
  end

  -- expert_load of the evaluation vs routing
  local el = q([[SELECT l.layer, l.expert, l.tokens, l.dropped, l.prob_mass, COALESCE(r.n, 0) n
      FROM expert_load l LEFT JOIN (SELECT layer, expert, COUNT(*) n FROM routing WHERE eval_id = ?1 GROUP BY layer, expert) r
      USING (layer, expert) WHERE l.eval_id = ?1 ORDER BY l.layer, l.expert]], eid)
  if #el ~= n_moe_layers * E then fail(name, "expert_load has %d eval rows, expected %d", #el, n_moe_layers * E) end
  local mass, dropped, kept = {}, 0, 0
  for _, r in ipairs(el) do
    if r.tokens ~= r.n then
      fail(name, "expert_load layer %d expert %d tokens %d ~= routing rows %d", r.layer, r.expert, r.tokens, r.n)
    end
    if r.dropped > 0 and not capped then fail(name, "dropped %d without capacity", r.dropped) end
    mass[r.layer] = (mass[r.layer] or 0) + (r.prob_mass or 0)
    dropped, kept = dropped + r.dropped, kept + r.tokens
  end
  if capped and dropped == 0 and kind ~= "expert_choice" then fail(name, "capacity %g dropped nothing", rc.capacity_factor) end
  if kind == "topk" then
    if kept + dropped ~= T * rc.k * n_moe_layers then
      fail(name, "kept %d + dropped %d ~= T k layers %d", kept, dropped, T * rc.k * n_moe_layers)
    end
  end
  if capped and kind ~= "stratified" then
    local k = rc.k or 1
    local C = math.max(math.ceil(rc.capacity_factor * BATCH * mc.context * k / E), rc.min_capacity or 4)
    for _, r in ipairs(el) do
      if r.tokens > C * BATCHES then fail(name, "expert %d kept %d > C %d x batches", r.expert, r.tokens, C) end
    end
  end
  -- prob_mass: the sum of router probabilities, summed over experts = routed tokens (softmax routers)
  if kind == "topk" or kind == "threshold" or kind == "topp" or kind == "expert_choice" then
    for l, s in pairs(mass) do
      if not close(s, T, 1e-3) then fail(name, "layer %d: prob_mass sums to %.3f, tokens %d", l, s, T) end
    end
  elseif kind == "stratified" then
    -- each pass's router spreads probability 1 over its visible experts: the mass is the passes made
    local all = 0
    for _, s in pairs(mass) do all = all + s end
    local p = q1("SELECT SUM(passes) n FROM token_stats WHERE eval_id = ?", eid)
    if not close(all, p.n, 1e-3) then fail(name, "prob_mass sums to %.3f, token_stats.passes to %d", all, p.n) end
  end
  -- the training steps' expert_load: one row per (step, layer, expert)
  local st = q1([[SELECT COUNT(DISTINCT step) steps, COUNT(*) n, MIN(step) lo, MAX(step) hi
      FROM expert_load WHERE run_id = ? AND eval_id IS NULL]], rid)
  if st.steps ~= STEPS or st.n ~= STEPS * n_moe_layers * E then
    fail(name, "training expert_load: %d steps %d rows (expected %d, %d)", st.steps, st.n, STEPS, STEPS * n_moe_layers * E)
  end
  if kind == "topk" and not capped then
    local tl = q1([[SELECT COUNT(*) n FROM (SELECT step, layer, SUM(tokens) s FROM expert_load WHERE run_id = ?
        AND eval_id IS NULL GROUP BY step, layer) WHERE s <> ?]], rid, BATCH * mc.context * rc.k)
    if tl.n > 0 then fail(name, "%d training (step, layer) with assignments ~= B T k", tl.n) end
  end

  -- FLOPs from the routing rows: router 2 d E (stratified: 2 d (E - m_s) a pass), 2 mult d H_e a row
  if kind ~= "merge" and not (kind == "stratified" and capped) then
    local mult = mc.activation == "swiglu" and 3 or 2
    local m0 = {}
    if kind == "stratified" then local a = 0; for s, n in ipairs(rc.strata) do m0[s - 1] = a; a = a + n end end
    local rows = q("SELECT seq, pos, layer, pass, expert FROM routing WHERE eval_id = ?", eid)
    local want, seen = {}, {}
    for _, r in ipairs(rows) do
      local key = r.seq * 100000 + r.pos
      local w = want[key] or 0
      w = w + 2 * mult * mc.d_model * hidden[r.expert + 1]
      local pk = key .. ":" .. r.layer .. ":" .. r.pass
      if not seen[pk] then
        seen[pk] = true
        if kind == "stratified" then w = w + 2 * mc.d_model * (E - m0[r.pass]) end
      end
      want[key] = w
    end
    local ts_rows = q("SELECT seq, pos, moe_flops FROM token_stats WHERE eval_id = ?", eid)
    local nb, ex = 0, nil
    for _, t in ipairs(ts_rows) do
      local w = want[t.seq * 100000 + t.pos] or 0
      -- every token-choice router (not hash) and expert choice score every token in every layer
      if kind ~= "stratified" and kind ~= "hash" then w = w + n_moe_layers * 2 * mc.d_model * E end
      if not close(t.moe_flops, w, 1e-6) then nb = nb + 1; ex = ex or string.format("seq %d pos %d: %g ~= %g", t.seq, t.pos, t.moe_flops, w) end
    end
    if nb > 0 then fail(name, "%d tokens whose moe_flops differ from their routing rows; %s", nb, ex) end
  end

  -- the routing_id range of the evaluation holds its rows
  local rg = q1([[SELECT (SELECT COUNT(*) FROM routing WHERE eval_id = ?1) n,
      (SELECT COUNT(*) FROM routing r JOIN evals e ON r.routing_id BETWEEN e.routing_first AND e.routing_last
       AND r.eval_id = e.eval_id WHERE e.eval_id = ?1) m]], eid)
  if rg.n ~= rg.m then fail(name, "routing range holds %d of %d rows", rg.m, rg.n) end

  -- causal flag: capacity, expert choice and whole-sequence merges are not causal
  local causal = not (capped or kind == "expert_choice" or (kind == "merge" and (rc.segment or 0) == 0))
  local cr = q1("SELECT causal FROM runs WHERE run_id = ?", rid)
  if cr.causal ~= (causal and 1 or 0) then fail(name, "runs.causal %s, expected %s", cr.causal, causal) end

  -- training steps: assignments, drops and probability mass per (step, layer), and the
  -- train metrics' FLOPs from the step's expert_load
  if kind ~= "merge" and kind ~= "stratified" then
    local k = (kind == "topk") and rc.k or (kind == "hash" and 1) or nil
    local rows = q([[SELECT step, layer, SUM(tokens) kept, SUM(dropped) dropped, SUM(prob_mass) mass
        FROM expert_load WHERE run_id = ? AND eval_id IS NULL GROUP BY step, layer]], rid)
    local BT = BATCH * mc.context
    for _, r in ipairs(rows) do
      if k and r.kept + r.dropped ~= BT * k then fail(name, "step %d layer %d: kept %d + dropped %d ~= %d", r.step, r.layer, r.kept, r.dropped, BT * k); break end
      if kind ~= "hash" and not close(r.mass, BT, 1e-3) then fail(name, "step %d layer %d: prob_mass %g ~= %d", r.step, r.layer, r.mass, BT); break end
    end
    local mult = mc.activation == "swiglu" and 3 or 2
    local hsql = {}
    for i = 1, E do hsql[#hsql + 1] = string.format("WHEN %d THEN %d", i - 1, hidden[i]) end
    local fl = q(string.format([[SELECT l.step, SUM(l.tokens * (CASE l.expert %s END)) ht, m.moe_flops_per_token f
        FROM expert_load l JOIN metrics m ON m.run_id = l.run_id AND m.step = l.step AND m.split = 'train'
        WHERE l.run_id = ? AND l.eval_id IS NULL GROUP BY l.step ORDER BY l.step]], table.concat(hsql, " ")), rid)
    local router = (kind == "hash") and 0 or 2 * mc.d_model * E * n_moe_layers
    for _, r in ipairs(fl) do
      local want = router + 2 * mult * mc.d_model * r.ht / BT
      if not close(r.f, want, 1e-5) then fail(name, "step %d: metrics moe_flops_per_token %g ~= %g from expert_load", r.step, r.f, want); break end
    end
  end
  if kind == "expert_choice" then
    local C = math.ceil(BATCH * mc.context * rc.capacity_factor / E)
    local b = q1("SELECT COUNT(*) n FROM expert_load WHERE eval_id = ? AND tokens <> ?", eid, C * BATCHES)
    if b.n > 0 then fail(name, "%d experts did not take C = %d tokens a batch", b.n, C) end
  end

  -- auxiliary losses: aux_loss is the weighted sum; balance and p_penalty from the step's expert_load
  local aux = mc.moe.aux or {}
  local am = q([[SELECT step, aux_loss, aux_balance, aux_z, aux_cv2, aux_p_penalty, aux_entropy FROM metrics
      WHERE run_id = ? AND split = 'train' ORDER BY step]], rid)
  for _, r in ipairs(am) do
    local want = (aux.balance or 0) * (r.aux_balance or 0) + (aux.z or 0) * (r.aux_z or 0) + (aux.cv2 or 0) * (r.aux_cv2 or 0)
      + (aux.p_penalty or 0) * (r.aux_p_penalty or 0) + (aux.entropy or 0) * (r.aux_entropy or 0)
    if not close(r.aux_loss, want, 1e-4) then fail(name, "step %d aux_loss %g ~= weighted sum %g", r.step, r.aux_loss, want); break end
  end
  if (kind == "topk" or kind == "threshold" or kind == "topp") and not capped then
    local hm = 0
    for i = 1, E do hm = hm + hidden[i] / E end
    local BT = BATCH * mc.context
    local rows = q("SELECT step, layer, expert, tokens, prob_mass FROM expert_load WHERE run_id = ? AND eval_id IS NULL", rid)
    local bal, pen = {}, {}
    for _, r in ipairs(rows) do
      bal[r.step] = (bal[r.step] or 0) + E * (r.tokens / BT) * (r.prob_mass / BT) / n_moe_layers
      pen[r.step] = (pen[r.step] or 0) + E * (r.tokens / BT) * (hidden[r.expert + 1] / hm) * (r.prob_mass / BT) / n_moe_layers
    end
    for _, r in ipairs(am) do
      if kind == "topk" and rc.k == 1 and not close(r.aux_balance, bal[r.step], 1e-4) then
        fail(name, "step %d aux_balance %g ~= %g from expert_load", r.step, r.aux_balance, bal[r.step]); break
      end
      if not close(r.aux_p_penalty, pen[r.step], 1e-4) then
        fail(name, "step %d aux_p_penalty %g ~= %g from expert_load", r.step, r.aux_p_penalty, pen[r.step]); break
      end
    end
  end

  -- sparsity
  local sp = q([[SELECT s.layer, s.expert, s.activations, s.near_zero, s.mean_abs, l.tokens FROM sparsity s
      JOIN expert_load l ON l.eval_id = s.eval_id AND l.layer = s.layer AND l.expert = s.expert
      WHERE s.eval_id = ?]], eid)
  if #sp ~= n_moe_layers * E then fail(name, "sparsity has %d rows, expected %d", #sp, n_moe_layers * E) end
  for _, r in ipairs(sp) do
    local want = r.tokens * hidden[r.expert + 1]
    if kind == "merge" then want = nil end
    if want and r.activations ~= want then
      fail(name, "sparsity layer %d expert %d activations %d ~= tokens %d x hidden %d", r.layer, r.expert,
           r.activations, r.tokens, hidden[r.expert + 1])
    end
    if r.near_zero > r.activations or r.near_zero < 0 then fail(name, "near_zero %d > activations %d", r.near_zero, r.activations) end
    if mc.activation == "relu" and r.activations > 0 and r.near_zero == 0 then
      fail(name, "relu expert with no zero activations")
    end
  end

  -- runs params vs model and checkpoint
  local run_row = q1("SELECT * FROM runs WHERE run_id = ?", rid)
  local total, active = model:parameters()
  if run_row.params_total ~= total or run_row.params_active ~= active then
    fail(name, "runs params %d/%d ~= model:parameters() %d/%d", run_row.params_total, run_row.params_active, total, active)
  end
  local ck = ckpath
  model:save(ck)
  local ckp = checkpoint_params(ck)
  os.remove(ck)
  if ckp ~= total then fail(name, "checkpoint holds %d parameters, model:parameters() %d", ckp, total) end
  if active > total then fail(name, "active %d > total %d", active, total) end
  if kind == "topk" then
    local per = (mc.activation == "swiglu" and 3 or 2) * mc.d_model
    local all, want = 0, 0
    for i = 1, E do all = all + per * hidden[i] end
    want = total - n_moe_layers * (all - all * rc.k // E)
    if active ~= want then fail(name, "active %d ~= expected %d", active, want) end
  end

  -- metrics: training rows
  local m = q([[SELECT step, tokens, wall_ms, loss, lr FROM metrics WHERE run_id = ? AND split = 'train' ORDER BY step]], rid)
  for i, r in ipairs(m) do
    local s0, want = i - 1, nil
    if s0 < 5 then want = 3e-3 * (s0 + 1) / 5 else want = 0.5 * 3e-3 * (1 + math.cos(math.pi * (s0 - 5) / (STEPS - 5))) end
    if not close(r.lr, want, 1e-5) then fail(name, "lr %g at step %d, schedule %g", r.lr, r.step, want); break end
  end
  if #m ~= STEPS then fail(name, "%d train metrics rows for %d steps", #m, STEPS) end
  for i, r in ipairs(m) do
    if r.step ~= i then fail(name, "train metrics step %d at row %d", r.step, i); break end
    if r.tokens ~= i * BATCH * mc.context then fail(name, "train tokens %d at step %d (want cumulative %d)",
      r.tokens, r.step, i * BATCH * mc.context); break end
    if i > 1 and not (r.wall_ms > m[i - 1].wall_ms) then fail(name, "wall_ms not increasing at step %d", r.step); break end
  end
  local vm = q([[SELECT step, loss, tokens, moe_flops_per_token f FROM metrics WHERE run_id = ? AND split = 'val' ORDER BY rowid]], rid)
  for _, r in ipairs(vm) do
    if r.tokens ~= r.step * BATCH * mc.context then fail(name, "val metrics at step %d: tokens %d", r.step, r.tokens) end
  end
  -- FLOPs that do not depend on the data: the training steps' equal the evaluation's
  if (kind == "topk" and not capped and (mc.moe.hidden == nil or type(mc.moe.hidden) ~= "table")) or kind == "merge" then
    local tf = q1("SELECT MIN(moe_flops_per_token) lo, MAX(moe_flops_per_token) hi FROM metrics WHERE run_id = ? AND split = 'train'", rid)
    if not close(tf.lo, ev.moe_flops_per_token, 1e-6) or not close(tf.hi, ev.moe_flops_per_token, 1e-6) then
      fail(name, "train moe_flops_per_token %g..%g, evaluation %g", tf.lo, tf.hi, ev.moe_flops_per_token)
    end
  end
  local evs = q([[SELECT step, loss FROM evals WHERE run_id = ? AND split = 'val' AND router IS NULL ORDER BY eval_id]], rid)
  if #vm ~= #evs then fail(name, "%d val metrics rows, %d val evaluations", #vm, #evs) end
  for i = 1, math.min(#vm, #evs) do
    if vm[i].step ~= evs[i].step or not close(vm[i].loss, evs[i].loss) then fail(name, "val metrics row %d ~= evals", i) end
  end

  -- views
  local v = q("SELECT layer, selections, tokens, experts_per_token FROM v_experts_per_token WHERE eval_id = ?", eid)
  local sum = 0
  for _, r in ipairs(v) do
    local c = q1("SELECT COUNT(*) n FROM routing WHERE eval_id = ? AND layer = ?", eid, r.layer)
    if r.selections ~= c.n or r.tokens ~= T then fail(name, "v_experts_per_token layer %d: %d/%d", r.layer, r.selections, r.tokens) end
    sum = sum + r.experts_per_token
  end
  if #v ~= n_moe_layers then fail(name, "v_experts_per_token has %d rows", #v) end
  if not close(sum / n_moe_layers, ev.experts_per_token) then
    fail(name, "v_experts_per_token mean %.5f ~= evals.experts_per_token %.5f", sum / n_moe_layers, ev.experts_per_token)
  end
  local vl = q("SELECT layer, cv, mean_tokens, tokens, experts FROM v_load_cv WHERE eval_id = ?", eid)
  for _, r in ipairs(vl) do
    local rows = q("SELECT tokens FROM expert_load WHERE eval_id = ? AND layer = ?", eid, r.layer)
    local s, s2 = 0, 0
    for _, x in ipairs(rows) do s = s + x.tokens; s2 = s2 + x.tokens * x.tokens end
    local mean = s / #rows
    local cv = mean > 0 and math.sqrt(math.max(0, s2 / #rows - mean * mean)) / mean or nil
    if r.experts ~= E or r.tokens ~= s or not close(r.cv, cv, 1e-6) then fail(name, "v_load_cv layer %d", r.layer) end
  end
  local vd = q("SELECT layer, kept, dropped, eval_dropped_fraction f FROM v_dropped_fraction WHERE run_id = ?", rid)
  for _, r in ipairs(vd) do
    local x = q1([[SELECT SUM(tokens) k, SUM(dropped) d FROM expert_load WHERE run_id = ? AND layer = ?
        AND eval_id IS NOT NULL]], rid, r.layer)
    local f = (x.k + x.d) > 0 and x.d / (x.k + x.d) or nil
    if not close(r.f, f, 1e-9) then fail(name, "v_dropped_fraction layer %d %s ~= %s", r.layer, r.f, f) end
  end
  local vll = q("SELECT layer, SUM(share) s FROM v_layer_load WHERE run_id = ? GROUP BY layer", rid)
  for _, r in ipairs(vll) do if not close(r.s, 1, 1e-9) then fail(name, "v_layer_load shares sum %g", r.s) end end
  local vf = q1("SELECT * FROM v_final_loss WHERE run_id = ?", rid)
  if not close(vf.train_loss, m[#m].loss) then fail(name, "v_final_loss train_loss") end
  if #vm > 0 and not close(vf.val_loss, vm[#vm].loss) then fail(name, "v_final_loss val_loss") end
end

-- the cross-table checks of any recorded evaluation (a counterfactual router's too)
local function check_eval_tables(name, eid, n_moe_layers, hidden, T)
  local ev = q1("SELECT * FROM evals WHERE eval_id = ?", eid)
  local ts = q1("SELECT COUNT(*) n, AVG(loss) loss, AVG(experts) ex, AVG(moe_flops) f FROM token_stats WHERE eval_id = ?", eid)
  if ev.tokens ~= T or ts.n ~= T or not close(ts.loss, ev.loss) or not close(ts.ex / n_moe_layers, ev.experts_per_token)
     or not close(ts.f, ev.moe_flops_per_token, 1e-4) then
    fail(name, "eval %d: evals vs token_stats: %d/%d/%d %g/%g %g/%g %g/%g", eid, T, ev.tokens, ts.n, ts.loss, ev.loss,
         ts.ex / n_moe_layers, ev.experts_per_token, ts.f, ev.moe_flops_per_token)
  end
  local bad = q1([[SELECT COUNT(*) n FROM token_stats t LEFT JOIN (SELECT seq, pos, COUNT(*) n FROM routing WHERE eval_id = ?1
      GROUP BY seq, pos) r USING (seq, pos) WHERE t.eval_id = ?1 AND t.experts <> COALESCE(r.n, 0)]], eid)
  if bad.n > 0 then fail(name, "eval %d: %d token_stats.experts ~= routing rows", eid, bad.n) end
  local el = q1([[SELECT COUNT(*) n FROM expert_load l LEFT JOIN (SELECT layer, expert, COUNT(*) n FROM routing
      WHERE eval_id = ?1 GROUP BY layer, expert) r USING (layer, expert) WHERE l.eval_id = ?1 AND l.tokens <> COALESCE(r.n, 0)]], eid)
  if el.n > 0 then fail(name, "eval %d: %d expert_load rows disagree with routing", eid, el.n) end
  local sp = q("SELECT s.expert, s.activations, l.tokens FROM sparsity s JOIN expert_load l ON l.eval_id = s.eval_id AND l.layer = s.layer AND l.expert = s.expert WHERE s.eval_id = ?", eid)
  for _, r in ipairs(sp) do
    if r.activations ~= r.tokens * hidden[r.expert + 1] then fail(name, "eval %d: sparsity activations ~= tokens x hidden", eid); break end
  end
  local dup = q1([[SELECT COUNT(*) n FROM (SELECT COUNT(*) c FROM routing WHERE eval_id = ?
      GROUP BY layer, seq, pos, pass, expert HAVING c > 1)]], eid)
  if dup.n > 0 then fail(name, "eval %d: %d duplicate (token, layer, pass, expert)", eid, dup.n) end
end

-- ---------------------------------------------------------------- runs
local sample = "In the beginning God created the"
local only = args.designs and ("," .. args.designs .. ",")
for _, d in ipairs(designs) do
  if only and not only:find("," .. d.name .. ",", 1, true) then goto next end
  local model = moelab.model(d.model)
  local run = db:run{ name = d.name, model = model, data = data }
  run:train{ steps = STEPS, batch = BATCH, lr = 3e-3, warmup = 5, eval_every = 15, eval_batches = BATCHES }
  local plain = run:evaluate{ batches = BATCHES, batch = BATCH }
  local e = run:evaluate{ batches = BATCHES, batch = BATCH, record = true }
  if plain.loss ~= e.loss or plain.moe_flops_per_token ~= e.moe_flops_per_token
     or plain.experts_per_token ~= e.experts_per_token then
    fail(d.name, "recorded evaluation %.7f/%g/%g differs from unrecorded %.7f/%g/%g", e.loss,
         e.moe_flops_per_token, e.experts_per_token, plain.loss, plain.moe_flops_per_token, plain.experts_per_token)
  end
  local per = model:token_losses(sample)
  local s = 0
  for _, x in ipairs(per) do s = s + x end
  if #per ~= #sample - 1 then fail(d.name, "token_losses gives %d losses for %d bytes", #per, #sample) end
  if not close(s / #per, model:loss(sample), 1e-5) then fail(d.name, "loss %.7f ~= mean token_losses %.7f", model:loss(sample), s / #per) end
  local n_moe = 0
  local mc = model:config()
  for l = 0, mc.layers - 1 do if (l + 1) % (mc.moe.every or 1) == 0 then n_moe = n_moe + 1 end end
  check_run(d, run, model, e, n_moe)
  -- counterfactual routers, recorded
  do
    local mc = model:config()
    local hidden = mc.moe.hidden
    if type(hidden) ~= "table" then local h = hidden; hidden = {}; for i = 1, mc.moe.experts do hidden[i] = h end end
    local kinds = ({ topk = { { kind = "threshold", p = 0.5 }, { kind = "topp", p = 0.8, max_k = 2 }, { k = 1 } },
                     threshold = { { kind = "topk", k = 1 }, { max_k = 2 } }, topp = { { kind = "topk", k = 3 } } })[d.model.moe.router.kind] or {}
    for _, cr in ipairs(kinds) do
      local ce = run:evaluate{ batches = BATCHES, batch = 3, record = true, router = cr }
      check_eval_tables(d.name .. " under " .. (cr.kind or "own") , ce.eval_id, n_moe, hidden, BATCHES * 3 * mc.context)
    end
  end
  -- per-position losses of a recorded evaluation = model:token_losses of the same text
  local rc, mc = d.model.moe.router, model:config()
  if (rc.capacity_factor or 0) == 0 and rc.kind ~= "expert_choice" then
    local text = "And God said, Let there be light: and there was light."
    local val = text:sub(1, mc.context + 1)
    local small = moelab.corpus{ text = string.rep("x", 200) .. val, split = 200 / (200 + #val) }
    local prun = db:run{ name = d.name .. "/positions", model = model, data = small }
    local pe = prun:evaluate{ batches = 1, batch = 2, record = true }
    local per = model:token_losses(val)
    local rows = q("SELECT seq, pos, token, loss FROM token_stats WHERE eval_id = ? ORDER BY seq, pos", pe.eval_id)
    local nb, ex = 0, nil
    for _, r in ipairs(rows) do
      -- (Gumbel noise is a function of the batch row: only the first sequence shares it)
      if (r.seq == 0 or rc.second ~= "sample") and (r.token ~= val:byte(r.pos + 1) or not close(r.loss, per[r.pos + 1], 1e-4)) then
        nb = nb + 1
        ex = ex or string.format("seq %d pos %d token %d/%d loss %.6f/%.6f", r.seq, r.pos, r.token, val:byte(r.pos + 1), r.loss, per[r.pos + 1])
      end
    end
    if #rows ~= 2 * mc.context or nb > 0 then fail(d.name, "%d of %d token_stats differ from token_losses; %s", nb, #rows, ex) end
  end
  -- the model's own router as a counterfactual gives the plain numbers, bit for bit
  local own = {}
  for k, v in pairs(d.model.moe.router) do own[k] = v end
  local ce = run:evaluate{ batches = BATCHES, batch = BATCH, router = own }
  if ce.loss ~= plain.loss or ce.moe_flops_per_token ~= plain.moe_flops_per_token then
    fail(d.name, "own router as counterfactual %.7f ~= plain %.7f", ce.loss, plain.loss)
  end
  -- a checkpoint gives the same loss
  local ck = ckpath
  model:save(ck)
  local again = moelab.load(ck)
  os.remove(ck)
  if again:loss(sample) ~= model:loss(sample) then fail(d.name, "loaded checkpoint loss %.7f ~= %.7f", again:loss(sample), model:loss(sample)) end
  local rc = d.model.moe.router
  -- (routing.weight is p only for raw weights: threshold, topk without normalize, hash's ties)
  if (rc.capacity_factor or 0) > 0 and (rc.kind == "threshold" or rc.kind == "hash"
      or (rc.kind == "topk" and rc.normalize == false)) then
    -- the kept assignments of the first MoE layer (same input) are, per batch and expert, the
    -- first C of the dropless selection, first choices before second ones, then by p
    local free = run:evaluate{ batches = BATCHES, batch = BATCH, record = true, router = { capacity_factor = 0 } }
    local l0 = q1("SELECT MIN(layer) l FROM routing WHERE eval_id = ?", free.eval_id).l
    local k = rc.kind == "hash" and 1 or rc.k or 2
    local C = math.max(math.ceil(rc.capacity_factor * BATCH * mc.context * k / mc.moe.experts), rc.min_capacity or 4)
    local demand = q([[SELECT seq, pos, rank, expert, weight FROM routing WHERE eval_id = ? AND layer = ?
        ORDER BY seq / ?, expert, rank, weight DESC, seq, pos]], free.eval_id, l0, BATCH)
    local want = {}
    local cnt = {}
    for _, r in ipairs(demand) do
      local key = (r.seq // BATCH) .. ":" .. r.expert
      cnt[key] = (cnt[key] or 0) + 1
      if cnt[key] <= C then want[r.seq .. ":" .. r.pos .. ":" .. r.expert] = true end
    end
    local got = q("SELECT seq, pos, expert FROM routing WHERE eval_id = ? AND layer = ?", e.eval_id, l0)
    local extra, missing = 0, 0
    for _, r in ipairs(got) do
      local key = r.seq .. ":" .. r.pos .. ":" .. r.expert
      if want[key] then want[key] = nil else extra = extra + 1 end
    end
    for _ in pairs(want) do missing = missing + 1 end
    if extra + missing > 0 then
      fail(d.name, "capacity C=%d: %d kept assignments not in the expected first C, %d expected ones missing", C, extra, missing)
    end
  end
  if rc.kind == "stratified" and (rc.capacity_factor or 0) > 0 and n_moe == 1 then
    -- a token moves on by its first choice before drops, and pass 0 sees the same input with
    -- or without capacity: whether it makes a second pass is the same as dropless (later
    -- passes route what drops changed, so with 3 strata the third pass may differ)
    local free = run:evaluate{ batches = BATCHES, batch = BATCH, record = true, router = { capacity_factor = 0 } }
    local diff = q1([[SELECT COUNT(*) n FROM token_stats a JOIN token_stats b ON b.eval_id = ?2 AND b.seq = a.seq
        AND b.pos = a.pos WHERE a.eval_id = ?1 AND MIN(a.passes, 2) <> MIN(b.passes, 2)]], e.eval_id, free.eval_id)
    if diff.n > 0 then fail(d.name, "%d tokens make a second pass or not, unlike without capacity", diff.n) end
  end
  if d.model.moe.router.kind == "topp" then
    -- topp is the threshold rule with renormalised weights: the same sets as the threshold router
    local ct = run:evaluate{ batches = BATCHES, batch = BATCH, record = true,
                             router = { kind = "threshold", p = d.model.moe.router.p } }
    -- only the first MoE layer sees the same input (the weights differ after it)
    local diff = q1([[SELECT COUNT(*) n FROM (SELECT layer, seq, pos, expert FROM routing WHERE eval_id = ?1 AND layer = 0
        EXCEPT SELECT layer, seq, pos, expert FROM routing WHERE eval_id = ?2 AND layer = 0)]], e.eval_id, ct.eval_id)
    if diff.n > 0 then fail(d.name, "topp selects %d assignments the threshold rule does not", diff.n) end
  end
  -- routing over training: v_routing_stability against the probes' first choices, probe by probe
  do
    local prun = db:run{ name = d.name .. "/probes", model = model, data = data }
    prun:train{ steps = 12, batch = BATCH, lr = 1e-2, warmup = 1, probe = { every = 2, batch = 2 } }
    local want = q([[WITH p AS (SELECT eval_id, step, LAG(eval_id) OVER (ORDER BY step, eval_id) prev FROM evals
          WHERE run_id = ?1 AND split = 'probe'),
        f AS (SELECT eval_id, layer, seq, pos, expert FROM routing WHERE run_id = ?1 AND rank = 0 AND pass = 0)
      SELECT p.step, a.layer, COUNT(*) tokens, AVG(a.expert <> b.expert) changed FROM p JOIN f a ON a.eval_id = p.eval_id
        JOIN f b ON b.eval_id = p.prev AND b.layer = a.layer AND b.seq = a.seq AND b.pos = a.pos
      GROUP BY p.step, a.layer ORDER BY p.step, a.layer]], prun:id())
    local got = q("SELECT step, layer, tokens, changed FROM v_routing_stability WHERE run_id = ? ORDER BY step, layer", prun:id())
    local same = #got == #want and #got > 0
    for i = 1, math.min(#got, #want) do
      local a, b = got[i], want[i]
      if a.step ~= b.step or a.layer ~= b.layer or a.tokens ~= b.tokens or not close(a.changed, b.changed, 1e-12) then same = false end
    end
    if not same then fail(d.name, "v_routing_stability (%d rows) differs from consecutive probes (%d rows)", #got, #want) end
  end
  ::next::
end

-- moefied dense model
if not only or only:find(",moefy,", 1, true) then
  local dense = moelab.model{ layers = 2, d_model = 32, heads = 2, context = 32, seed = 1, activation = "relu",
                              ffn = { hidden = 64 } }
  local drun = db:run{ name = "dense", model = dense, data = data }
  drun:train{ steps = STEPS, batch = BATCH, lr = 3e-3, warmup = 5 }
  local de = drun:evaluate{ batches = BATCHES, batch = BATCH, record = true }
  for _, r in ipairs{ { kind = "all" }, { kind = "similarity", k = 2 },
                      { kind = "similarity", select = "threshold", p = 0.9 }, { kind = "oracle", k = 2 } } do
    local name = "moefy-" .. r.kind .. (r.k and ("-k" .. r.k) or "") .. (r.p and ("-p" .. r.p) or "")
    local mm = moelab.moefy(dense, { experts = 4, method = "kmeans", seed = 1, router = r })
    local run = db:run{ name = name, model = mm, data = data }
    local e = run:evaluate{ batches = BATCHES, batch = BATCH, record = true }
    local plain = run:evaluate{ batches = BATCHES, batch = BATCH }
    if plain.loss ~= e.loss then fail(name, "recorded loss differs from unrecorded") end
    if r.kind == "all" and not close(e.loss, de.loss, 1e-5) then
      fail(name, "all experts %.6f ~= dense %.6f", e.loss, de.loss)
    end
    -- the checks that do not need training rows
    local eid = e.eval_id
    local ev = q1("SELECT * FROM evals WHERE eval_id = ?", eid)
    local ts = q1("SELECT COUNT(*) n, AVG(loss) loss, AVG(experts) ex, AVG(moe_flops) f FROM token_stats WHERE eval_id = ?", eid)
    if ts.n ~= ev.tokens or not close(ts.loss, ev.loss) or not close(ts.ex / 2, ev.experts_per_token)
       or not close(ts.f, ev.moe_flops_per_token, 1e-4) then
      fail(name, "evals vs token_stats: %d/%d %g/%g %g/%g %g/%g", ts.n, ev.tokens, ts.loss, ev.loss, ts.ex / 2,
           ev.experts_per_token, ts.f, ev.moe_flops_per_token)
    end
    if e.ffn_fraction and not close(e.ffn_fraction, ev.experts_per_token / 4) then fail(name, "ffn_fraction") end
    local el = q1([[SELECT COUNT(*) n FROM expert_load l LEFT JOIN (SELECT layer, expert, COUNT(*) n FROM routing
        WHERE eval_id = ?1 GROUP BY layer, expert) r USING (layer, expert) WHERE l.eval_id = ?1 AND l.tokens <> COALESCE(r.n, 0)]], eid)
    -- the oracle runs every expert on every token (expert_load and sparsity count what ran)
    if el.n > 0 and r.kind ~= "oracle" then fail(name, "%d expert_load rows disagree with routing", el.n) end
    local w = q1("SELECT MIN(weight) lo, MAX(weight) hi FROM routing WHERE eval_id = ?", eid)
    if w.lo ~= 1 or w.hi ~= 1 then fail(name, "moefied weights %g..%g, documented 1", w.lo, w.hi) end
    if r.k then
      local c = q1([[SELECT COUNT(*) n FROM (SELECT COUNT(*) c FROM routing WHERE eval_id = ? GROUP BY layer, seq, pos)
          WHERE c <> ?]], eid, r.k)
      if c.n > 0 then fail(name, "%d tokens without exactly k experts", c.n) end
    end
    local total = mm:parameters()
    local ck = ckpath
    mm:save(ck)
    local ckp = checkpoint_params(ck)
    os.remove(ck)
    if ckp ~= total then fail(name, "checkpoint holds %d parameters, model:parameters() %d", ckp, total) end
    local sp = q1([[SELECT COUNT(*) n FROM sparsity s JOIN expert_load l ON l.eval_id = s.eval_id AND l.layer = s.layer
        AND l.expert = s.expert WHERE s.eval_id = ? AND (s.activations <> l.tokens * 16 OR s.near_zero > s.activations)]], eid)
    if sp.n > 0 and r.kind ~= "oracle" then fail(name, "%d sparsity rows ~= tokens x 16", sp.n) end
  end
end

db:close()
os.remove(tmpbase)
if not args.db then
  for _, suffix in ipairs{ "", "-wal", "-shm" } do os.remove(dbpath .. suffix) end
end
if #failures > 0 then
  error(string.format("audit_records: %d invariant(s) violated:\n  %s", #failures, table.concat(failures, "\n  ")), 0)
end
print(string.format("audit_records: %d designs, every invariant holds%s", #designs + 4, args.db and (" (" .. dbpath .. ")") or ""))
