-- traffic.lua — what expert parallelism moves (issue 13): the quickstart's
-- top-2 and threshold models (`make demo` writes their checkpoints) run with
-- their experts spread over the ranks, E/N contiguous a rank:
--
--   mpirun -np 2 ./moelab run experiments/traffic.lua [steps=50] [dir=results]
--
-- For each model: a recorded evaluation of 20 batches of 16 x 128 bytes (the
-- quickstart's), then `steps` more training steps of batch 8 a rank, and from
-- the traffic table and metrics: the assignments, the share that stayed on
-- their token's rank, the bytes moved per token, and the communication's
-- share of a training step. Written to DIR/traffic.db.

local moelab = require "moelab"
local report = require "moelab.report"
local args = moelab.args
local dir = args.dir or "results"
local steps = tonumber(args.steps or 50)
if moelab.ranks < 2 then
  error("traffic.lua: run it on several ranks: mpirun -np 2 ./moelab run experiments/traffic.lua", 0)
end

local data = moelab.corpus{ path = args.data or "data/kjv.txt", split = 0.9 }
local db_path = dir .. "/traffic.db"
if moelab.rank == 0 then
  for _, suffix in ipairs{ "", "-wal", "-shm" } do os.remove(db_path .. suffix) end
end
local db = moelab.open(db_path)
local rows = {}
for _, name in ipairs{ "top2", "threshold" } do
  local model = moelab.load(dir .. "/quickstart-" .. name .. ".safetensors")
  model:parallel("experts")
  local run = db:run{ name = name, model = model, data = data, experiment = "traffic" }
  local e = run:evaluate{ batches = 20, batch = 16, record = true }
  local t = run:train{ steps = steps, batch = 8, lr = 1e-4, warmup = 0, eval_batches = 0 }
  local ev = db:query([[SELECT SUM(assignments) AS n, SUM(kept) AS kept, SUM(bytes) AS bytes
                        FROM v_traffic_local WHERE eval_id = ?]], e.eval_id)[1]
  local tr = db:query([[SELECT SUM(assignments) AS n, SUM(kept) AS kept, SUM(bytes) AS bytes,
                               COUNT(DISTINCT step) AS steps
                        FROM v_traffic_local WHERE run_id = ? AND eval_id IS NULL]], run:id())[1]
  local m = db:query([[SELECT MAX(wall_ms) - MIN(wall_ms) AS wall, MAX(comm_ms) - MIN(comm_ms) AS comm,
                              COUNT(*) AS n FROM metrics WHERE run_id = ? AND split = 'train']], run:id())[1]
  rows[#rows + 1] = {
    model = name, experts_per_token = e.experts_per_token, eval_assignments = ev.n,
    eval_local = ev.kept / ev.n, eval_bytes_per_token = ev.bytes / e.tokens,
    train_local = tr.kept / tr.n, train_mb_per_step = tr.bytes / tr.steps / 1e6,
    comm_share = m.comm / m.wall, tokens_per_s = t.tokens_per_s,
  }
end
print(string.format("expert parallelism on %d ranks (%s, %s kernels); %s", moelab.ranks,
                    moelab.machine().cpu, moelab.machine().blas_core, db_path))
print(report.format_table(rows, {
  { "model" }, { "experts_per_token", "experts/token", "%.2f" },
  { "eval_assignments", "eval assignments" }, { "eval_local", "eval kept local", "%.3f" },
  { "eval_bytes_per_token", "eval bytes/token", "%.0f" },
  { "train_local", "train kept local", "%.3f" }, { "train_mb_per_step", "train MB/step", "%.2f" },
  { "comm_share", "comm / wall", "%.3f" }, { "tokens_per_s", "train tokens/s", "%.0f" } }))
