/*
** recorder.c — the SQLite recorder of recorder.h: the schema of SPEC §3, its
** views, and the row writers for runs, metrics and evaluations.
**
** Writes are batched: the first row after a commit opens a transaction
** (BEGIN IMMEDIATE, so a competing writer is seen at once rather than at
** commit), and rec_flush commits it. The statements that write rows are
** prepared once at open; runs, metrics and evaluations are bound, stepped
** and reset per row, and each call of the MoE records is one statement that
** reads the caller's array through a virtual table (the row sources). The database
** runs in WAL mode with synchronous=NORMAL: a process crash never loses a
** commit, and readers (a plot, the sqlite3 shell) never block the writer.
** The WAL is copied back into the database (checkpointed) by a thread of
** our own rather than by the commit that fills it (see "checkpoints").
*/
#include "recorder.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/*
** The documented schema. Tables and columns named in SPEC §3 keep their
** names; the rest (metrics.aux_*, runs.error, evals.routing_first/last,
** routing.routing_id, the indexes, the trigger) are ours. expert_load and sparsity are indexed by run_id first, so that
** the per-run queries of the views and `DELETE FROM runs` (cascading) stay
** index lookups; routing and token_stats, written a million rows a second,
** are found by eval_id through token_stats' key and evals' routing ranges
** (see there).
*/
/* The runs table, shared by a new schema and the upgrade that rebuilds it. */
#define REC_RUNS_COLUMNS \
    "(\n" \
    "  run_id        INTEGER PRIMARY KEY,\n" \
    "  name          TEXT NOT NULL,\n" \
    "  experiment    TEXT,\n" \
    "  config        TEXT,               -- the whole configuration as JSON\n" \
    "  seed          INTEGER,\n" \
    "  status        TEXT NOT NULL DEFAULT 'running' CHECK (status IN\n" \
    "                ('running','finished','diverged','interrupted','failed','crashed')),\n" \
    "  started_at    TEXT NOT NULL,      -- ISO-8601 UTC\n" \
    "  finished_at   TEXT,               -- ISO-8601 UTC, set by terminal states\n" \
    "                                    -- (not by crashed: when is not known)\n" \
    "  params_total  INTEGER,\n" \
    "  params_active INTEGER,\n" \
    "  error         TEXT,               -- why a run diverged, failed, crashed\n" \
    "  causal        INTEGER,            -- 1: no position's loss depends on a later\n" \
    "                                    -- byte; 0: it may (expert choice, merged\n" \
    "                                    -- experts gated on whole sequences) (schema 4)\n" \
    "  -- the process that set it running: its pid, host and start time (Unix\n" \
    "  -- seconds); a run 'running' whose process is gone is 'crashed' (schema 5)\n" \
    "  pid           INTEGER,\n" \
    "  host          TEXT,\n" \
    "  pid_started   REAL\n" \
    ")"

static const char *rec_schema_sql =
    "CREATE TABLE IF NOT EXISTS runs" REC_RUNS_COLUMNS ";\n"
    "CREATE INDEX IF NOT EXISTS runs_by_name ON runs(name);\n"
    "\n"
    "CREATE TABLE IF NOT EXISTS metrics(\n"
    "  run_id   INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,\n"
    "  step     INTEGER NOT NULL,\n"
    "  split    TEXT NOT NULL,           -- 'train' or 'val'\n"
    "  loss     REAL,                    -- nats per token (byte)\n"
    "  aux_loss REAL,                    -- all auxiliary losses, weighted\n"
    "  lr       REAL,\n"
    "  tokens   INTEGER,                 -- tokens seen so far\n"
    "  moe_flops_per_token REAL,\n"
    "  wall_ms  REAL,\n"
    "  aux_balance REAL, aux_z REAL, aux_cv2 REAL, aux_p_penalty REAL,\n"
    "  aux_entropy REAL,                 -- (schema 4)\n"
    "  comm_ms  REAL                     -- of wall_ms, in MPI communication (schema 6)\n"
    ");\n"
    "CREATE INDEX IF NOT EXISTS metrics_by_run ON metrics(run_id, split, step);\n"
    "\n"
    "CREATE TABLE IF NOT EXISTS evals(\n"
    "  eval_id  INTEGER PRIMARY KEY,\n"
    "  run_id   INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,\n"
    "  step     INTEGER,\n"
    "  split    TEXT NOT NULL,\n"
    "  tokens   INTEGER,                 -- tokens evaluated\n"
    "  loss     REAL,\n"
    "  moe_flops_per_token REAL,\n"
    "  experts_per_token   REAL,\n"
    "  topk_flops_per_token REAL,          -- merged experts: the same gates as per-token\n"
    "                                      -- top-k layers would cost (schema 4)\n"
    "  routing_first INTEGER,            -- its routing rows all have a routing_id\n"
    "  routing_last  INTEGER,            -- in [first, last] (see routing)\n"
    "  -- the router it ran under, when not the model's own: a counterfactual\n"
    "  -- evaluation, run:evaluate{ router = ... }, as JSON (schema 5)\n"
    "  router        TEXT,\n"
    "  -- 0 while it is written: a long one commits in chunks, and a crash\n"
    "  -- leaves it 0 with the rows written so far (schema 5)\n"
    "  complete      INTEGER NOT NULL DEFAULT 1\n"
    ");\n"
    "CREATE INDEX IF NOT EXISTS evals_by_run ON evals(run_id, step);\n"
    "\n"
    "-- Per training step (eval_id NULL) and per evaluation: one row per\n"
    "-- (layer, expert), experts with no tokens included. tokens counts the\n"
    "-- assignments the expert processed (kept); dropped those over capacity.\n"
    "CREATE TABLE IF NOT EXISTS expert_load(\n"
    "  run_id    INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,\n"
    "  eval_id   INTEGER REFERENCES evals(eval_id) ON DELETE CASCADE,\n"
    "  step      INTEGER,\n"
    "  layer     INTEGER NOT NULL,\n"
    "  expert    INTEGER NOT NULL,\n"
    "  tokens    INTEGER NOT NULL DEFAULT 0,\n"
    "  dropped   INTEGER NOT NULL DEFAULT 0,\n"
    "  prob_mass REAL                    -- sum of router probabilities\n"
    ");\n"
    "CREATE INDEX IF NOT EXISTS expert_load_by_run\n"
    "  ON expert_load(run_id, eval_id, step, layer, expert);\n"
    "CREATE INDEX IF NOT EXISTS expert_load_by_eval ON expert_load(eval_id);\n"
    "\n"
    "-- One row per (token, layer, selected expert) of a recorded evaluation.\n"
    "-- An evaluation writes millions of these, so the table is made for\n"
    "-- appending (over 1M rows/s, tests/bench_recorder.c): a rowid table with\n"
    "-- no index. An index on eval_id cost a third of the insert time (3.4M\n"
    "-- rows per CPU second without, 2.3M with) and put recording over its\n"
    "-- budget; a WITHOUT ROWID key starting with eval_id costs as much.\n"
    "-- Instead the recorder keeps, in evals.routing_first/routing_last, a\n"
    "-- range of routing_id that holds all of an evaluation's rows (the\n"
    "-- trainer writes an evaluation in one transaction, so there exactly\n"
    "-- them; rows written for two evaluations in turn interleave):\n"
    "--   SELECT r.* FROM evals e JOIN routing r\n"
    "--     ON r.routing_id BETWEEN e.routing_first AND e.routing_last\n"
    "--    AND r.eval_id = e.eval_id WHERE e.eval_id = ?\n"
    "-- reads only that range; a plain WHERE eval_id = ? reads the table.\n"
    "-- routing_id is an INTEGER PRIMARY KEY so that VACUUM keeps it.\n"
    "-- There are no foreign keys (two lookups per row, 20%): the recorder\n"
    "-- checks each call's evaluation once, and evals_delete_records below\n"
    "-- removes an evaluation's rows with it (and so with its run).\n"
    "CREATE TABLE IF NOT EXISTS routing(\n"
    "  routing_id INTEGER PRIMARY KEY,   -- the rowid, kept by VACUUM\n"
    "  run_id  INTEGER NOT NULL,         -- runs(run_id), the evaluation's run\n"
    "  eval_id INTEGER NOT NULL,         -- evals(eval_id)\n"
    "  layer   INTEGER NOT NULL,         -- the block, counted from 0\n"
    "  seq     INTEGER NOT NULL,         -- sequence of the evaluation\n"
    "  pos     INTEGER NOT NULL,         -- position in the sequence\n"
    "  token   INTEGER,\n"
    "  rank    INTEGER NOT NULL,         -- 0 = the router's first choice\n"
    "  expert  INTEGER NOT NULL,\n"
    "  weight  REAL,                     -- the factor on the expert's output\n"
    "  pass    INTEGER NOT NULL DEFAULT 0 -- stratum pass; 0 unless stratified\n"
    ");\n"
    "\n"
    "-- One row per token of a recorded evaluation. Keyed by (eval_id, seq,\n"
    "-- pos), the order tokens are written in, so appending stays cheap and\n"
    "-- joins with routing on (eval_id, seq, pos) are lookups. No foreign keys,\n"
    "-- as for routing.\n"
    "CREATE TABLE IF NOT EXISTS token_stats(\n"
    "  run_id    INTEGER NOT NULL,       -- runs(run_id), the evaluation's run\n"
    "  eval_id   INTEGER NOT NULL,       -- evals(eval_id)\n"
    "  seq       INTEGER NOT NULL,\n"
    "  pos       INTEGER NOT NULL,\n"
    "  token     INTEGER,\n"
    "  loss      REAL,                   -- nats, predicting the next token\n"
    "  experts   INTEGER,                -- expert applications, summed over layers\n"
    "  moe_flops REAL,\n"
    "  passes    INTEGER,                -- passes through MoE layers, summed (schema 4)\n"
    "  PRIMARY KEY (eval_id, seq, pos)\n"
    ") WITHOUT ROWID;\n"
    "\n"
    "-- The cascade that foreign keys would give routing and token_stats:\n"
    "-- deleting a run deletes its evaluations (ON DELETE CASCADE), and\n"
    "-- deleting an evaluation deletes their rows.\n"
    "CREATE TRIGGER IF NOT EXISTS evals_delete_records AFTER DELETE ON evals BEGIN\n"
    "  DELETE FROM routing WHERE routing_id BETWEEN old.routing_first\n"
    "    AND old.routing_last AND eval_id = old.eval_id;\n"
    "  DELETE FROM token_stats WHERE eval_id = old.eval_id;\n"
    "END;\n"
    "\n"
    "-- Expert hidden activations with |a| <= eps (eps is in the run config).\n"
    "CREATE TABLE IF NOT EXISTS sparsity(\n"
    "  run_id      INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,\n"
    "  eval_id     INTEGER REFERENCES evals(eval_id) ON DELETE CASCADE,\n"
    "  layer       INTEGER NOT NULL,\n"
    "  expert      INTEGER NOT NULL,\n"
    "  activations INTEGER NOT NULL,\n"
    "  near_zero   INTEGER NOT NULL,\n"
    "  mean_abs    REAL\n"
    ");\n"
    "CREATE INDEX IF NOT EXISTS sparsity_by_run\n"
    "  ON sparsity(run_id, eval_id, layer, expert);\n"
    "CREATE INDEX IF NOT EXISTS sparsity_by_eval ON sparsity(eval_id);\n"
    "\n"
    "-- Expert parallelism over MPI ranks (schema 6): per training step\n"
    "-- (eval_id NULL) or evaluation, and MoE layer, the assignments of\n"
    "-- src_rank's tokens to experts on dst_rank (src = dst: they stayed), and\n"
    "-- the bytes that moved for them: d_model floats there and back, and in\n"
    "-- training the same again backward (0 when they stayed).\n"
    "CREATE TABLE IF NOT EXISTS traffic(\n"
    "  run_id   INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,\n"
    "  eval_id  INTEGER REFERENCES evals(eval_id) ON DELETE CASCADE,\n"
    "  step     INTEGER NOT NULL,\n"
    "  layer    INTEGER NOT NULL,\n"
    "  src_rank INTEGER NOT NULL,\n"
    "  dst_rank INTEGER NOT NULL,\n"
    "  tokens   INTEGER NOT NULL,\n"
    "  bytes    INTEGER NOT NULL\n"
    ");\n"
    "CREATE INDEX IF NOT EXISTS traffic_by_run ON traffic(run_id, eval_id, step, layer);\n"
    "CREATE INDEX IF NOT EXISTS traffic_by_eval ON traffic(eval_id);\n"
    "\n"
    "-- The share of the assignments that stayed on their token's rank, per\n"
    "-- training step or evaluation and layer, and the bytes that moved.\n"
    "CREATE VIEW IF NOT EXISTS v_traffic_local AS\n"
    "SELECT run_id, eval_id, step, layer, SUM(tokens) AS assignments,\n"
    "       SUM(CASE WHEN src_rank = dst_rank THEN tokens ELSE 0 END) AS kept,\n"
    "       1.0 * SUM(CASE WHEN src_rank = dst_rank THEN tokens ELSE 0 END)\n"
    "         / NULLIF(SUM(tokens), 0) AS local_share,\n"
    "       SUM(bytes) AS bytes\n"
    "FROM traffic GROUP BY run_id, eval_id, step, layer;\n"
    "\n"
    "-- Expert applications per token, per recorded evaluation and layer.\n"
    "-- A stratified token that passes twice through top-2 counts 4. The\n"
    "-- denominator is every token of the evaluation: the token_stats rows\n"
    "-- when they were recorded (so a token that no expert chose counts, as\n"
    "-- with expert choice), else the tokens that appear in routing.\n"
    "CREATE VIEW IF NOT EXISTS v_experts_per_token AS\n"
    "WITH selections AS (\n"
    "       SELECT run_id, eval_id, layer, COUNT(*) AS selections\n"
    "       FROM routing GROUP BY run_id, eval_id, layer),\n"
    "     routed AS (\n"
    "       SELECT run_id, eval_id, COUNT(*) AS tokens\n"
    "       FROM (SELECT DISTINCT run_id, eval_id, seq, pos FROM routing)\n"
    "       GROUP BY run_id, eval_id),\n"
    "     recorded AS (\n"
    "       SELECT run_id, eval_id, COUNT(*) AS tokens\n"
    "       FROM token_stats GROUP BY run_id, eval_id)\n"
    "SELECT s.run_id, s.eval_id, s.layer, s.selections,\n"
    "       COALESCE(recorded.tokens, routed.tokens) AS tokens,\n"
    "       1.0 * s.selections / COALESCE(recorded.tokens, routed.tokens)\n"
    "         AS experts_per_token\n"
    "FROM selections s JOIN routed USING (run_id, eval_id)\n"
    "     LEFT JOIN recorded USING (run_id, eval_id);\n"
    "\n"
    "-- Coefficient of variation (population std / mean) of the tokens each\n"
    "-- expert kept, per training step or evaluation and layer; cv2 = cv^2.\n"
    "CREATE VIEW IF NOT EXISTS v_load_cv AS\n"
    "WITH moments AS (\n"
    "       SELECT run_id, eval_id, step, layer, COUNT(*) AS experts,\n"
    "              SUM(tokens) AS tokens, AVG(tokens) AS mean,\n"
    "              MAX(0.0, AVG(1.0 * tokens * tokens) - AVG(tokens) * AVG(tokens))\n"
    "                AS variance\n"
    "       FROM expert_load GROUP BY run_id, eval_id, step, layer)\n"
    "SELECT run_id, eval_id, step, layer, experts, tokens,\n"
    "       mean AS mean_tokens,\n"
    "       CASE WHEN mean > 0 THEN sqrt(variance) / mean END AS cv,\n"
    "       CASE WHEN mean > 0 THEN variance / (mean * mean) END AS cv2\n"
    "FROM moments;\n"
    "\n"
    "-- Share of assignments dropped over capacity, per run and layer:\n"
    "-- dropped / (kept + dropped), since expert_load.tokens counts kept\n"
    "-- assignments only. Training steps and evaluations also separately.\n"
    "CREATE VIEW IF NOT EXISTS v_dropped_fraction AS\n"
    "SELECT run_id, layer,\n"
    "       SUM(tokens) AS kept, SUM(dropped) AS dropped,\n"
    "       1.0 * SUM(dropped) / NULLIF(SUM(tokens) + SUM(dropped), 0)\n"
    "         AS dropped_fraction,\n"
    "       1.0 * SUM(CASE WHEN eval_id IS NULL THEN dropped END)\n"
    "         / NULLIF(SUM(CASE WHEN eval_id IS NULL THEN tokens + dropped END), 0)\n"
    "         AS train_dropped_fraction,\n"
    "       1.0 * SUM(CASE WHEN eval_id IS NOT NULL THEN dropped END)\n"
    "         / NULLIF(SUM(CASE WHEN eval_id IS NOT NULL THEN tokens + dropped END), 0)\n"
    "         AS eval_dropped_fraction\n"
    "FROM expert_load GROUP BY run_id, layer;\n"
    "\n"
    "-- Tokens each expert kept over the whole run (training steps and\n"
    "-- evaluations together) and its share of its layer's total.\n"
    "CREATE VIEW IF NOT EXISTS v_layer_load AS\n"
    "SELECT run_id, layer, expert,\n"
    "       SUM(tokens) AS tokens, SUM(dropped) AS dropped,\n"
    "       SUM(prob_mass) AS prob_mass,\n"
    "       1.0 * SUM(tokens) / SUM(SUM(tokens)) OVER (PARTITION BY run_id, layer)\n"
    "         AS share\n"
    "FROM expert_load GROUP BY run_id, layer, expert;\n"
    "\n"
    "-- Per run: the last recorded train and val loss, and the tokens seen.\n"
    "CREATE VIEW IF NOT EXISTS v_final_loss AS\n"
    "SELECT r.run_id, r.name, r.status, r.causal,\n"
    "       (SELECT m.loss FROM metrics m WHERE m.run_id = r.run_id\n"
    "          AND m.split = 'train' ORDER BY m.step DESC, m.rowid DESC LIMIT 1)\n"
    "         AS train_loss,\n"
    "       (SELECT m.loss FROM metrics m WHERE m.run_id = r.run_id\n"
    "          AND m.split = 'val' ORDER BY m.step DESC, m.rowid DESC LIMIT 1)\n"
    "         AS val_loss,\n"
    "       (SELECT MAX(m.tokens) FROM metrics m WHERE m.run_id = r.run_id)\n"
    "         AS tokens\n"
    "FROM runs r;\n"
    "\n"
    "-- Routing over training (run:train{ probe = ... }): per probe after the\n"
    "-- first and layer, the share of the probe batch's tokens whose first\n"
    "-- choice (rank 0, first pass) differs from the previous probe's. Tokens\n"
    "-- with no first choice in either (none chose them, or dropped) are left out:\n"
    "-- the previous probe is the run's one before, not the token's last first\n"
    "-- choice, which a drop would make an older probe's (schema 7).\n"
    "CREATE VIEW IF NOT EXISTS v_routing_stability AS\n"
    "WITH probes AS (\n"
    "       SELECT run_id, step, eval_id, routing_first, routing_last,\n"
    "              LAG(eval_id) OVER (PARTITION BY run_id ORDER BY step, eval_id)\n"
    "                AS before_id\n"
    "       FROM evals WHERE split = 'probe' AND complete = 1),\n"
    "     first_choice AS (\n"
    "       SELECT p.run_id, p.step, p.eval_id, p.before_id, r.layer, r.seq, r.pos,\n"
    "              r.expert\n"
    "       FROM probes p JOIN routing r\n"
    "         ON r.routing_id BETWEEN p.routing_first AND p.routing_last\n"
    "        AND r.eval_id = p.eval_id\n"
    "       WHERE r.rank = 0 AND r.pass = 0)\n"
    "SELECT a.run_id, a.step, a.eval_id, a.layer, COUNT(*) AS tokens,\n"
    "       AVG(a.expert <> b.expert) AS changed\n"
    "FROM first_choice a JOIN first_choice b\n"
    "  ON b.eval_id = a.before_id AND b.layer = a.layer AND b.seq = a.seq\n"
    " AND b.pos = a.pos\n"
    "GROUP BY a.run_id, a.step, a.eval_id, a.layer;\n";

/*
** The MoE tables are written by one statement per call, reading the caller's
** array through a virtual table (below, "the row sources"):
**
**     INSERT OR FAIL INTO routing(run_id, eval_id, layer, ...)
**       SELECT ?3, ?4, layer, ... FROM moelab_routing_rows(?1, ?2)
**
** ?1 is the array, bound with sqlite3_bind_pointer, ?2 its length. Nothing
** is bound, parsed or stepped per row.
*/
typedef void (*RecRowColumn)(sqlite3_context *ctx, const void *row, int column);
typedef struct RecCheckpointer RecCheckpointer;

typedef struct {
    const char *table;
    const char *source;       /* the row source: "moelab_routing_rows" */
    const char *pointer_type; /* of the array bound to the source */
    const char *shared;       /* columns every row of a call shares */
    const char *columns;      /* the row's own, as the source names them */
    int n_columns;
    size_t row_size;
    RecRowColumn column;
    const char *what;         /* "insert routing rows" */
    int needs_eval;           /* rows belong to an evaluation */
} RecRowKind;

enum { REC_EXPERT_LOAD, REC_ROUTING, REC_TOKEN_STATS, REC_SPARSITY, REC_ROW_KINDS };

struct Recorder {
    sqlite3 *db;
    char *path;
    int64_t pending_rows;     /* rows since the last commit */
    sqlite3_stmt *begin;      /* BEGIN IMMEDIATE */
    sqlite3_stmt *commit;     /* COMMIT */
    sqlite3_stmt *rollback;   /* ROLLBACK */
    sqlite3_stmt *savepoint;  /* SAVEPOINT rec_rows: one call's rows */
    sqlite3_stmt *release;    /* RELEASE rec_rows */
    sqlite3_stmt *undo;       /* ROLLBACK TO rec_rows */
    sqlite3_stmt *insert_run;
    sqlite3_stmt *update_status;
    sqlite3_stmt *update_config;
    sqlite3_stmt *update_topk_flops;
    sqlite3_stmt *update_eval_router;
    sqlite3_stmt *insert_metric;
    sqlite3_stmt *insert_traffic;
    sqlite3_stmt *insert_eval;
    sqlite3_stmt *update_eval;
    sqlite3_stmt *delete_eval;
    sqlite3_stmt *routing_range;  /* widens evals.routing_first/last */
    sqlite3_stmt *eval_run;   /* the run of an evaluation */
    sqlite3_stmt *insert_rows[REC_ROW_KINDS];
    int64_t commit_rows;      /* an evaluation's writer commits every so many rows */
    int pid;                  /* this process, recorded with the runs it sets running */
    char host[256];
    double pid_started;
    RecCheckpointer *checkpointer; /* started by the first full WAL */
    int checkpointer_failed;       /* could not start: commits checkpoint */
};

static const char *rec_statuses[] = {
    "running", "finished", "diverged", "interrupted", "failed", "crashed",
};

/* The message for the connection's last error while doing `what`. */
static int rec_sqlite_error(Recorder *r, const char *what, char *err) {
    int code = sqlite3_errcode(r->db) & 0xff;
    const char *msg = sqlite3_errmsg(r->db);
    if (code == SQLITE_NOTADB)
        return ml_error(err, "'%s' is not a SQLite database (%s)", r->path, msg);
    return ml_error(err, "'%s': cannot %s: %s", r->path, what, msg);
}

/* Steps a prepared statement that returns no rows, then makes it ready for
** the next binding. */
static int rec_step_done(Recorder *r, sqlite3_stmt *st, const char *what, char *err) {
    int rc = sqlite3_step(st);
    int status = 0;
    if (rc != SQLITE_DONE) {
        status = rec_sqlite_error(r, what, err);   /* before reset clears it */
        /* Some errors (disk full, I/O) roll the whole transaction back. */
        if (sqlite3_get_autocommit(r->db))
            r->pending_rows = 0;
    }
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return status;
}

static int rec_begin_if_needed(Recorder *r, char *err) {
    if (!sqlite3_get_autocommit(r->db))
        return 0;
    return rec_step_done(r, r->begin, "begin a transaction", err);
}

static void rec_bind_real_or_null(sqlite3_stmt *st, int index, double value) {
    if (isnan(value))
        sqlite3_bind_null(st, index);
    else
        sqlite3_bind_double(st, index, value);
}

static void rec_bind_text_or_null(sqlite3_stmt *st, int index, const char *text) {
    if (text)
        sqlite3_bind_text(st, index, text, -1, SQLITE_TRANSIENT);
    else
        sqlite3_bind_null(st, index);
}

/* This process's pid, host and start time, at index, index + 1, index + 2. */
static void rec_bind_process(Recorder *r, sqlite3_stmt *st, int index) {
    sqlite3_bind_int(st, index, r->pid);
    sqlite3_bind_text(st, index + 1, r->host, -1, SQLITE_STATIC);
    rec_bind_real_or_null(st, index + 2, r->pid_started);
}

/* Reads PRAGMA user_version: the first real read of the file, so this is
** where a file that is not a database is noticed. */
static int rec_schema_version(Recorder *r, int *version, char *err) {
    sqlite3_stmt *st = NULL;
    int status = -1;
    if (sqlite3_prepare_v2(r->db, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK
        || sqlite3_step(st) != SQLITE_ROW) {
        rec_sqlite_error(r, "read the schema version", err);
        goto cleanup;
    }
    *version = sqlite3_column_int(st, 0);
    status = 0;
cleanup:
    sqlite3_finalize(st);
    return status;
}

static int rec_has_table(Recorder *r, const char *table, int *found, char *err) {
    sqlite3_stmt *st = NULL;
    int status = -1;
    if (sqlite3_prepare_v2(r->db,
            "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1",
            -1, &st, NULL) != SQLITE_OK) {
        rec_sqlite_error(r, "read the schema", err);
        goto cleanup;
    }
    sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        rec_sqlite_error(r, "read the schema", err);
        goto cleanup;
    }
    *found = rc == SQLITE_ROW;
    status = 0;
cleanup:
    sqlite3_finalize(st);
    return status;
}

/* Adds a column unless the table has it already: version 4's columns, for
** databases of any older version. */
static int rec_add_column(Recorder *r, const char *table, const char *column, const char *type,
                          char *err) {
    sqlite3_stmt *st = NULL;
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT 1 FROM pragma_table_info('%s') WHERE name = '%s'", table,
             column);
    if (sqlite3_prepare_v2(r->db, sql, -1, &st, NULL) != SQLITE_OK)
        return rec_sqlite_error(r, "read the schema", err);
    int rc = sqlite3_step(st);
    sqlite3_finalize(st);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) return rec_sqlite_error(r, "read the schema", err);
    if (rc == SQLITE_ROW) return 0;
    snprintf(sql, sizeof sql, "ALTER TABLE %s ADD COLUMN %s %s", table, column, type);
    if (sqlite3_exec(r->db, sql, NULL, NULL, NULL) != SQLITE_OK)
        return rec_sqlite_error(r, "upgrade the schema", err);
    return 0;
}

static int rec_exec(Recorder *r, const char *sql, const char *what, char *err) {
    if (sqlite3_exec(r->db, sql, NULL, NULL, NULL) != SQLITE_OK)
        return rec_sqlite_error(r, what, err);
    return 0;
}

/*
** Version 1 had routing and token_stats as WITHOUT ROWID tables with foreign
** keys; version 2 made them quick to append to (see the schema), and
** version 3 changed routing again (below). Their rows
** move into the new tables; v_experts_per_token, which reads them, is made
** again by the schema.
*/
static const char *rec_upgrade_from_1_sql =
    "DROP VIEW IF EXISTS v_experts_per_token;\n"
    "DROP INDEX IF EXISTS routing_by_eval;\n"
    "DROP INDEX IF EXISTS token_stats_by_eval;\n"
    "ALTER TABLE routing RENAME TO routing_v1;\n"
    "ALTER TABLE token_stats RENAME TO token_stats_v1;\n";

/*
** Version 2 had an index on routing(eval_id) and no routing_id; version 3
** keeps ranges of routing_id in evals instead (see the schema). Routing rows
** move into the new table with their rowids; the trigger that deletes them
** is made again by the schema, with the ranges. (UPDATE ... FROM needs
** SQLite 3.33; Debian 12 has 3.40.)
*/
static const char *rec_upgrade_from_2_sql =
    "DROP VIEW IF EXISTS v_experts_per_token;\n"
    "DROP INDEX IF EXISTS routing_by_eval;\n"
    "ALTER TABLE routing RENAME TO routing_v2;\n";

static const char *rec_upgrade_to_3_sql =
    "ALTER TABLE evals ADD COLUMN routing_first INTEGER;\n"
    "ALTER TABLE evals ADD COLUMN routing_last INTEGER;\n"
    "DROP TRIGGER IF EXISTS evals_delete_records;\n";

static const char *rec_upgrade_from_2_copy_sql =
    "INSERT INTO routing(routing_id, run_id, eval_id, layer, seq, pos, token, rank,"
    " expert, weight, pass)\n"
    "  SELECT rowid, run_id, eval_id, layer, seq, pos, token, rank, expert, weight, pass\n"
    "  FROM routing_v2 ORDER BY rowid;\n"
    "DROP TABLE routing_v2;\n";

static const char *rec_upgrade_ranges_sql =
    "UPDATE evals SET routing_first = g.first, routing_last = g.last\n"
    "  FROM (SELECT eval_id, MIN(routing_id) AS first, MAX(routing_id) AS last\n"
    "        FROM routing GROUP BY eval_id) AS g\n"
    "  WHERE g.eval_id = evals.eval_id;\n";

static const char *rec_upgrade_from_1_copy_sql =
    "INSERT INTO routing(run_id, eval_id, layer, seq, pos, token, rank, expert,"
    " weight, pass)\n"
    "  SELECT run_id, eval_id, layer, seq, pos, token, rank, expert, weight, pass\n"
    "  FROM routing_v1 ORDER BY eval_id, layer, seq, pos, pass, rank;\n"
    "INSERT INTO token_stats(run_id, eval_id, seq, pos, token, loss, experts,"
    " moe_flops)\n"
    "  SELECT run_id, eval_id, seq, pos, token, loss, experts, moe_flops\n"
    "  FROM token_stats_v1;\n"
    "DROP TABLE routing_v1;\n"
    "DROP TABLE token_stats_v1;\n";

/*
** Version 5 lets a run be 'crashed', which the CHECK of older versions'
** runs table refuses, and records the process of a running run. The table
** is made again and its rows copied (SQLite's way to change a constraint:
** create, copy, drop, rename, with foreign keys off so that the drop
** cascades to nothing); v_final_loss, which reads it, is made again by the
** schema.
*/
static const char *rec_upgrade_runs_to_5_sql =
    "DROP VIEW IF EXISTS v_final_loss;\n"
    "CREATE TABLE runs_v5" REC_RUNS_COLUMNS ";\n"
    "INSERT INTO runs_v5(run_id, name, experiment, config, seed, status, started_at,"
    " finished_at, params_total, params_active, error, causal)\n"
    "  SELECT run_id, name, experiment, config, seed, status, started_at, finished_at,"
    " params_total, params_active, error, causal FROM runs;\n"
    "DROP TABLE runs;\n"
    "ALTER TABLE runs_v5 RENAME TO runs;\n";

/* Creates the schema of a new database, upgrades an older one, or checks an
** existing one's version. Foreign keys are still off (rec_open_with). */
static int rec_ensure_schema(Recorder *r, int readonly, char *err) {
    int version = 0;
    if (rec_schema_version(r, &version, err))
        return -1;
    if (version > REC_SCHEMA_VERSION)
        return ml_error(err, "'%s' has schema version %d, newer than this moelab "
                        "knows (%d); upgrade moelab", r->path, version,
                        REC_SCHEMA_VERSION);
    if (version == REC_SCHEMA_VERSION)
        return 0;
    if (readonly) {
        int found = 0;
        if (rec_has_table(r, "runs", &found, err))
            return -1;
        if (!found)
            return ml_error(err, "'%s' is not a moelab database (it has no runs table)",
                            r->path);
        if (version > 0)
            return ml_error(err, "'%s' has schema version %d and this moelab reads version "
                            "%d: open it for writing once to upgrade it (moelab.open in a "
                            "script, or any 'moelab run' that records into it)", r->path,
                            version, REC_SCHEMA_VERSION);
        return 0;
    }
    if (rec_exec(r, "BEGIN IMMEDIATE", "create the schema", err))
        return -1;
    char sql[64];
    snprintf(sql, sizeof sql, "PRAGMA user_version = %d", REC_SCHEMA_VERSION);
    int from1 = version == 1, from2 = version == 2, upgrade = from1 || from2;
    int old = version > 0; /* version 4 adds metrics.aux_entropy, token_stats.passes */
    if ((from1 && rec_exec(r, rec_upgrade_from_1_sql, "upgrade the schema", err))
        || (from2 && rec_exec(r, rec_upgrade_from_2_sql, "upgrade the schema", err))
        || (upgrade && rec_exec(r, rec_upgrade_to_3_sql, "upgrade the schema", err))
        || (old && rec_add_column(r, "metrics", "aux_entropy", "REAL", err))
        || (old && rec_add_column(r, "metrics", "comm_ms", "REAL", err))
        || (old && rec_add_column(r, "runs", "causal", "INTEGER", err))
        || (old && rec_add_column(r, "evals", "topk_flops_per_token", "REAL", err))
        || (old && rec_exec(r, "DROP VIEW IF EXISTS v_final_loss", "upgrade the schema", err))
        || (old && !from1 && rec_add_column(r, "token_stats", "passes", "INTEGER", err))
        || (old && rec_add_column(r, "evals", "router", "TEXT", err))
        || (old && rec_add_column(r, "evals", "complete", "INTEGER NOT NULL DEFAULT 1", err))
        || (old && rec_exec(r, rec_upgrade_runs_to_5_sql, "upgrade the schema", err))
        || (old && rec_exec(r, "DROP VIEW IF EXISTS v_routing_stability", "upgrade the schema",
                            err))
        || rec_exec(r, rec_schema_sql, "create the schema", err)
        || (from1 && rec_exec(r, rec_upgrade_from_1_copy_sql, "upgrade the schema", err))
        || (from2 && rec_exec(r, rec_upgrade_from_2_copy_sql, "upgrade the schema", err))
        || (upgrade && rec_exec(r, rec_upgrade_ranges_sql, "upgrade the schema", err))
        || rec_exec(r, sql, "set the schema version", err)
        || rec_exec(r, "COMMIT", "create the schema", err)) {
        sqlite3_exec(r->db, "ROLLBACK", NULL, NULL, NULL);
        return -1;
    }
    return 0;
}

static int rec_prepare(Recorder *r, sqlite3_stmt **st, const char *sql, char *err) {
    if (sqlite3_prepare_v3(r->db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL) != SQLITE_OK)
        return rec_sqlite_error(r, "prepare a statement", err);
    return 0;
}

/* ---- the row sources -------------------------------------------------- */

/*
** Each MoE row kind has an eponymous-only virtual table, moelab_KIND_rows,
** that reads a caller's array of rows: its hidden columns "rows" and "n"
** are the table-valued function's two arguments, the array (a pointer of
** type kind->pointer_type, which plain SQL cannot make) and its length.
** Without a pointer it is empty. It lives in the connection only; the data
** go into ordinary tables.
*/

typedef struct {
    sqlite3_vtab base;
    const RecRowKind *kind;
} RecRowsTable;

typedef struct {
    sqlite3_vtab_cursor base;
    const char *row;          /* the current one */
    int64_t n, i;
    size_t row_size;
    int n_columns;
    RecRowColumn column;
} RecRowsCursor;

static void rec_result_real_or_null(sqlite3_context *ctx, double value) {
    if (isnan(value))
        sqlite3_result_null(ctx);
    else
        sqlite3_result_double(ctx, value);
}

static void rec_column_expert_load(sqlite3_context *ctx, const void *row, int column) {
    const RecExpertLoad *x = row;
    switch (column) {
    case 0: sqlite3_result_int(ctx, x->layer); break;
    case 1: sqlite3_result_int(ctx, x->expert); break;
    case 2: sqlite3_result_int64(ctx, x->tokens); break;
    case 3: sqlite3_result_int64(ctx, x->dropped); break;
    case 4: rec_result_real_or_null(ctx, x->prob_mass); break;
    }
}

static void rec_column_routing(sqlite3_context *ctx, const void *row, int column) {
    const RecRouting *x = row;
    switch (column) {
    case 0: sqlite3_result_int(ctx, x->layer); break;
    case 1: sqlite3_result_int(ctx, x->seq); break;
    case 2: sqlite3_result_int(ctx, x->pos); break;
    case 3: sqlite3_result_int(ctx, x->token); break;
    case 4: sqlite3_result_int(ctx, x->rank); break;
    case 5: sqlite3_result_int(ctx, x->expert); break;
    case 6: rec_result_real_or_null(ctx, x->weight); break;
    case 7: sqlite3_result_int(ctx, x->pass); break;
    }
}

static void rec_column_token_stat(sqlite3_context *ctx, const void *row, int column) {
    const RecTokenStat *x = row;
    switch (column) {
    case 0: sqlite3_result_int(ctx, x->seq); break;
    case 1: sqlite3_result_int(ctx, x->pos); break;
    case 2: sqlite3_result_int(ctx, x->token); break;
    case 3: rec_result_real_or_null(ctx, x->loss); break;
    case 4: sqlite3_result_int(ctx, x->experts); break;
    case 5: rec_result_real_or_null(ctx, x->moe_flops); break;
    case 6: sqlite3_result_int(ctx, x->passes); break;
    }
}

static void rec_column_sparsity(sqlite3_context *ctx, const void *row, int column) {
    const RecSparsity *x = row;
    switch (column) {
    case 0: sqlite3_result_int(ctx, x->layer); break;
    case 1: sqlite3_result_int(ctx, x->expert); break;
    case 2: sqlite3_result_int64(ctx, x->activations); break;
    case 3: sqlite3_result_int64(ctx, x->near_zero); break;
    case 4: rec_result_real_or_null(ctx, x->mean_abs); break;
    }
}

static const RecRowKind rec_row_kinds[REC_ROW_KINDS] = {
    [REC_EXPERT_LOAD] = {"expert_load", "moelab_expert_load_rows", "moelab_expert_load",
        "run_id, eval_id, step", "layer, expert, tokens, dropped, prob_mass", 5,
        sizeof(RecExpertLoad), rec_column_expert_load, "insert expert_load rows", 0},
    [REC_ROUTING] = {"routing", "moelab_routing_rows", "moelab_routing",
        "run_id, eval_id", "layer, seq, pos, token, rank, expert, weight, pass", 8,
        sizeof(RecRouting), rec_column_routing, "insert routing rows", 1},
    [REC_TOKEN_STATS] = {"token_stats", "moelab_token_stats_rows", "moelab_token_stats",
        "run_id, eval_id", "seq, pos, token, loss, experts, moe_flops, passes", 7,
        sizeof(RecTokenStat), rec_column_token_stat, "insert token_stats rows", 1},
    [REC_SPARSITY] = {"sparsity", "moelab_sparsity_rows", "moelab_sparsity",
        "run_id, eval_id", "layer, expert, activations, near_zero, mean_abs", 5,
        sizeof(RecSparsity), rec_column_sparsity, "insert sparsity rows", 0},
};

static int rec_rows_connect(sqlite3 *db, void *aux, int argc, const char *const *argv,
                            sqlite3_vtab **out, char **errmsg) {
    const RecRowKind *kind = aux;
    (void)argc;
    (void)argv;
    char *sql = sqlite3_mprintf("CREATE TABLE x(%s, rows HIDDEN, n HIDDEN)", kind->columns);
    if (!sql)
        return SQLITE_NOMEM;
    int rc = sqlite3_declare_vtab(db, sql);
    sqlite3_free(sql);
    if (rc != SQLITE_OK) {
        *errmsg = sqlite3_mprintf("%s", sqlite3_errmsg(db));
        return rc;
    }
    /* Not from schema objects (triggers, views): only our statements. */
    sqlite3_vtab_config(db, SQLITE_VTAB_DIRECTONLY);
    RecRowsTable *t = sqlite3_malloc(sizeof *t);
    if (!t)
        return SQLITE_NOMEM;
    memset(t, 0, sizeof *t);
    t->kind = kind;
    *out = &t->base;
    return SQLITE_OK;
}

static int rec_rows_disconnect(sqlite3_vtab *vtab) {
    sqlite3_free(vtab);
    return SQLITE_OK;
}

/* Both arguments are needed: "rows = ? AND n = ?" is the only plan. */
static int rec_rows_best_index(sqlite3_vtab *vtab, sqlite3_index_info *info) {
    int rows_column = ((RecRowsTable *)vtab)->kind->n_columns, found[2] = {-1, -1};
    for (int i = 0; i < info->nConstraint; i++) {
        const struct sqlite3_index_constraint *c = &info->aConstraint[i];
        int arg = c->iColumn - rows_column;
        if (arg < 0 || arg > 1)
            continue;
        if (!c->usable || c->op != SQLITE_INDEX_CONSTRAINT_EQ)
            return SQLITE_CONSTRAINT;
        found[arg] = i;
    }
    if (found[0] < 0 || found[1] < 0)
        return SQLITE_CONSTRAINT;
    for (int arg = 0; arg < 2; arg++) {
        info->aConstraintUsage[found[arg]].argvIndex = arg + 1;
        info->aConstraintUsage[found[arg]].omit = 1;
    }
    info->estimatedCost = 1.0;
    info->estimatedRows = 1000;
    return SQLITE_OK;
}

static int rec_rows_open(sqlite3_vtab *vtab, sqlite3_vtab_cursor **out) {
    (void)vtab;
    RecRowsCursor *c = sqlite3_malloc(sizeof *c);
    if (!c)
        return SQLITE_NOMEM;
    memset(c, 0, sizeof *c);
    *out = &c->base;
    return SQLITE_OK;
}

static int rec_rows_close(sqlite3_vtab_cursor *cursor) {
    sqlite3_free(cursor);
    return SQLITE_OK;
}

static int rec_rows_filter(sqlite3_vtab_cursor *cursor, int plan, const char *plan_name,
                           int argc, sqlite3_value **argv) {
    RecRowsCursor *c = (RecRowsCursor *)cursor;
    const RecRowKind *kind = ((RecRowsTable *)cursor->pVtab)->kind;
    (void)plan;
    (void)plan_name;
    c->row = argc == 2 ? sqlite3_value_pointer(argv[0], kind->pointer_type) : NULL;
    c->n = c->row ? sqlite3_value_int64(argv[1]) : 0;
    c->i = 0;
    c->row_size = kind->row_size;
    c->n_columns = kind->n_columns;
    c->column = kind->column;
    return SQLITE_OK;
}

static int rec_rows_next(sqlite3_vtab_cursor *cursor) {
    RecRowsCursor *c = (RecRowsCursor *)cursor;
    c->i++;
    c->row += c->row_size;
    return SQLITE_OK;
}

static int rec_rows_eof(sqlite3_vtab_cursor *cursor) {
    const RecRowsCursor *c = (const RecRowsCursor *)cursor;
    return c->i >= c->n;
}

static int rec_rows_column(sqlite3_vtab_cursor *cursor, sqlite3_context *ctx, int column) {
    const RecRowsCursor *c = (const RecRowsCursor *)cursor;
    /* The hidden columns read as NULL. */
    if (column < c->n_columns)
        c->column(ctx, c->row, column);
    return SQLITE_OK;
}

static int rec_rows_rowid(sqlite3_vtab_cursor *cursor, sqlite3_int64 *rowid) {
    *rowid = ((const RecRowsCursor *)cursor)->i;
    return SQLITE_OK;
}

/* xCreate NULL: eponymous-only, so "CREATE VIRTUAL TABLE" cannot use it. */
static const sqlite3_module rec_rows_module = {
    .iVersion = 0,
    .xConnect = rec_rows_connect,
    .xBestIndex = rec_rows_best_index,
    .xDisconnect = rec_rows_disconnect,
    .xOpen = rec_rows_open,
    .xClose = rec_rows_close,
    .xFilter = rec_rows_filter,
    .xNext = rec_rows_next,
    .xEof = rec_rows_eof,
    .xColumn = rec_rows_column,
    .xRowid = rec_rows_rowid,
};

static int rec_prepare_rows(Recorder *r, int k, char *err) {
    const RecRowKind *kind = &rec_row_kinds[k];
    if (sqlite3_create_module_v2(r->db, kind->source, &rec_rows_module, (void *)kind, NULL)
        != SQLITE_OK)
        return rec_sqlite_error(r, "register a row source", err);
    /* OR FAIL, because a failing statement need not undo its own rows (the
    ** caller's savepoint does), and so SQLite keeps no statement journal. */
    char *sql = sqlite3_mprintf("INSERT OR FAIL INTO %s(%s, %s) SELECT ?3, ?4%s, %s FROM %s(?1, ?2)",
                                kind->table, kind->shared, kind->columns,
                                k == REC_EXPERT_LOAD ? ", ?5" : "", kind->columns, kind->source);
    if (!sql)
        return ml_error(err, "out of memory opening '%s'", r->path);
    int status = rec_prepare(r, &r->insert_rows[k], sql, err);
    sqlite3_free(sql);
    return status;
}

static int rec_prepare_all(Recorder *r, char *err) {
    for (int k = 0; k < REC_ROW_KINDS; k++)
        if (rec_prepare_rows(r, k, err))
            return -1;
    if (rec_prepare(r, &r->begin, "BEGIN IMMEDIATE", err)
        || rec_prepare(r, &r->commit, "COMMIT", err)
        || rec_prepare(r, &r->rollback, "ROLLBACK", err)
        || rec_prepare(r, &r->savepoint, "SAVEPOINT rec_rows", err)
        || rec_prepare(r, &r->release, "RELEASE rec_rows", err)
        || rec_prepare(r, &r->undo, "ROLLBACK TO rec_rows", err)
        || rec_prepare(r, &r->eval_run, "SELECT run_id FROM evals WHERE eval_id = ?1", err)
        || rec_prepare(r, &r->insert_run,
               "INSERT INTO runs(name, experiment, config, seed, status, started_at,"
               " params_total, params_active, causal, pid, host, pid_started)"
               " VALUES (?1, ?2, ?3, ?4, 'running',"
               " strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?5, ?6, ?7, ?8, ?9, ?10)", err)
        || rec_prepare(r, &r->update_status,
               "UPDATE runs SET status = ?2, error = ?3,"
               " finished_at = CASE WHEN ?2 = 'running' THEN NULL"
               " ELSE strftime('%Y-%m-%dT%H:%M:%fZ', 'now') END,"
               " pid = CASE WHEN ?2 = 'running' THEN ?4 ELSE pid END,"
               " host = CASE WHEN ?2 = 'running' THEN ?5 ELSE host END,"
               " pid_started = CASE WHEN ?2 = 'running' THEN ?6 ELSE pid_started END"
               " WHERE run_id = ?1", err)
        || rec_prepare(r, &r->update_topk_flops,
               "UPDATE evals SET topk_flops_per_token = ?2 WHERE eval_id = ?1", err)
        || rec_prepare(r, &r->update_eval_router,
               "UPDATE evals SET router = json(?2) WHERE eval_id = ?1", err)
        || rec_prepare(r, &r->update_config,
               "UPDATE runs SET config = json_set(COALESCE(config, '{}'), '$.' || ?2, json(?3))"
               " WHERE run_id = ?1", err)
        || rec_prepare(r, &r->insert_metric,
               "INSERT INTO metrics(run_id, step, split, loss, aux_loss, lr, tokens,"
               " moe_flops_per_token, wall_ms, aux_balance, aux_z, aux_cv2, aux_p_penalty,"
               " aux_entropy, comm_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12,"
               " ?13, ?14, ?15)",
               err)
        || rec_prepare(r, &r->insert_traffic,
               "INSERT INTO traffic(run_id, eval_id, step, layer, src_rank, dst_rank, tokens,"
               " bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)", err)
        || rec_prepare(r, &r->insert_eval,
               "INSERT INTO evals(run_id, step, split, tokens, loss,"
               " moe_flops_per_token, experts_per_token, complete)"
               " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?5 IS NOT NULL)", err)
        || rec_prepare(r, &r->update_eval,
               "UPDATE evals SET tokens = ?2, loss = ?3, moe_flops_per_token = ?4,"
               " experts_per_token = ?5, complete = 1 WHERE eval_id = ?1", err)
        || rec_prepare(r, &r->delete_eval, "DELETE FROM evals WHERE eval_id = ?1", err)
        || rec_prepare(r, &r->routing_range,
               "UPDATE evals SET routing_first = MIN(COALESCE(routing_first, ?2), ?2),"
               " routing_last = MAX(COALESCE(routing_last, ?3), ?3) WHERE eval_id = ?1", err))
        return -1;
    return 0;
}

/* A read-only "file:" URI for path with immutable=1: percent-encodes the
** characters a URI gives meaning to. The caller frees it. */
static char *rec_immutable_uri(const char *path) {
    size_t n = strlen(path);
    char *uri = malloc(3 * n + 32), *p = uri;
    if (!uri)
        return NULL;
    p += sprintf(p, path[0] == '/' ? "file://" : "file:");
    for (const char *c = path; *c; c++) {
        if (*c == '%' || *c == '?' || *c == '#')
            p += sprintf(p, "%%%02X", (unsigned char)*c);
        else
            *p++ = *c;
    }
    strcpy(p, "?immutable=1");
    return uri;
}

/*
** Checkpoints. SQLite copies the WAL back into the database from the commit
** that takes it past 1000 pages, and with synchronous=NORMAL that copy syncs
** the WAL and the database: tens of milliseconds of waiting for the disk
** (every 16 MB with our 16 KiB pages), paid by whichever evaluation or
** training step commits then. Here that commit only wakes a thread, which
** runs the checkpoint on its own connection; a passive checkpoint does not
** stop the writer.
**
** A writer starts the WAL again from its beginning only when its transaction
** begins after a checkpoint has copied all of it. Evaluations run back to
** back begin the next one microseconds after the commit that woke the
** thread, so the WAL would keep growing: at REC_WAL_FORCE_PAGES the commit
** waits for the thread and copies the rest itself, once every few such
** evaluations (and whenever the thread could not be started). Only the
** Recorder's own thread commits (the writer of recwriter.h never does), so
** the hook and r->checkpointer need no lock.
*/
enum { REC_WAL_PAGES = 1000, REC_WAL_FORCE_PAGES = 4 * REC_WAL_PAGES };

struct RecCheckpointer {
    sqlite3 *db;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;      /* requested or closing set */
    pthread_cond_t idle;      /* running cleared */
    int requested, running, closing;
    int64_t done;             /* checkpoints completed */
};

static void *rec_checkpointer_main(void *arg) {
    RecCheckpointer *c = arg;
    pthread_mutex_lock(&c->lock);
    for (;;) {
        while (!c->requested && !c->closing)
            pthread_cond_wait(&c->wake, &c->lock);
        if (c->closing)
            break;
        c->requested = 0;
        c->running = 1;
        pthread_mutex_unlock(&c->lock);
        /* busy (a reader holds old pages, or a checkpoint is running
        ** elsewhere) is not an error: the next commit asks again */
        int rc = sqlite3_wal_checkpoint_v2(c->db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        pthread_mutex_lock(&c->lock);
        c->done += rc == SQLITE_OK;
        c->running = 0;
        pthread_cond_broadcast(&c->idle);
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

/* Frees what rec_checkpointer_start made; the thread is not running. */
static void rec_checkpointer_free(RecCheckpointer *c) {
    pthread_cond_destroy(&c->wake);
    pthread_cond_destroy(&c->idle);
    pthread_mutex_destroy(&c->lock);
    sqlite3_close(c->db);
    free(c);
}

static void rec_checkpointer_stop(RecCheckpointer *c) {
    if (!c)
        return;
    pthread_mutex_lock(&c->lock);
    c->closing = 1;
    pthread_cond_signal(&c->wake);
    pthread_mutex_unlock(&c->lock);
    pthread_join(c->thread, NULL);
    rec_checkpointer_free(c);
}

/* The thread gets the normal policy whatever its creator runs at (a thread
** inherits an idle-priority creator's otherwise). */
static int rec_checkpointer_spawn(RecCheckpointer *c) {
    pthread_attr_t attr;
    struct sched_param normal = {0};
    int rc = pthread_attr_init(&attr);
    if (rc == 0) {
        if (pthread_attr_setinheritsched(&attr, PTHREAD_EXPLICIT_SCHED) == 0
            && pthread_attr_setschedpolicy(&attr, SCHED_OTHER) == 0
            && pthread_attr_setschedparam(&attr, &normal) == 0)
            rc = pthread_create(&c->thread, &attr, rec_checkpointer_main, c);
        else
            rc = pthread_create(&c->thread, NULL, rec_checkpointer_main, c);
        pthread_attr_destroy(&attr);
    }
    return rc;
}

static RecCheckpointer *rec_checkpointer_start(sqlite3 *db) {
    /* the file's absolute name, whatever the working directory is now */
    const char *path = sqlite3_db_filename(db, "main");
    if (!path || !*path || !sqlite3_threadsafe())
        return NULL;
    RecCheckpointer *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->wake, NULL);
    pthread_cond_init(&c->idle, NULL);
    /* The pragma reads the schema, and so opens the WAL: a connection that
    ** has never read the database would checkpoint nothing. */
    if (sqlite3_open_v2(path, &c->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL)
            != SQLITE_OK
        || sqlite3_busy_timeout(c->db, REC_BUSY_TIMEOUT_MS) != SQLITE_OK
        || sqlite3_exec(c->db, "PRAGMA synchronous = NORMAL", NULL, NULL, NULL) != SQLITE_OK
        || rec_checkpointer_spawn(c) != 0) {
        rec_checkpointer_free(c);
        return NULL;
    }
    return c;
}

/* sqlite3_wal_hook: called after each commit with the WAL's size in pages
** (this replaces SQLite's own automatic checkpoint). */
static int rec_wal_hook(void *arg, sqlite3 *db, const char *name, int pages) {
    Recorder *r = arg;
    if (pages < REC_WAL_PAGES)
        return SQLITE_OK;
    if (!r->checkpointer && !r->checkpointer_failed
        && !(r->checkpointer = rec_checkpointer_start(db)))
        r->checkpointer_failed = 1;
    RecCheckpointer *c = r->checkpointer;
    if (c) {
        pthread_mutex_lock(&c->lock);
        if (pages < REC_WAL_FORCE_PAGES) {
            c->requested = 1;
            pthread_cond_signal(&c->wake);
            pthread_mutex_unlock(&c->lock);
            return SQLITE_OK;
        }
        while (c->running)
            pthread_cond_wait(&c->idle, &c->lock);
        pthread_mutex_unlock(&c->lock);
    }
    sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    return SQLITE_OK;
}

static int rec_connect(Recorder *r, const char *filename, int flags, char *err) {
    /* One thread at a time uses a Recorder, so its connection needs no mutex
    ** (which every bind would otherwise take). */
    flags |= SQLITE_OPEN_NOMUTEX;
    if (sqlite3_open_v2(filename, &r->db, flags, NULL) != SQLITE_OK) {
        if (!r->db)
            return ml_error(err, "cannot open database '%s': out of memory", r->path);
        return ml_error(err, "cannot open database '%s': %s", r->path,
                        sqlite3_errmsg(r->db));
    }
    sqlite3_extended_result_codes(r->db, 1);
    sqlite3_busy_timeout(r->db, REC_BUSY_TIMEOUT_MS);
    return 0;
}

/* Reading a WAL database needs its -shm file, which a reader cannot create
** in a directory it may not write. There nobody can be writing the
** database either, so it is read as immutable (a -wal left behind by a
** crashed writer is then not seen). */
static int rec_connect_readonly(Recorder *r, char *err) {
    int version = 0;
    if (rec_connect(r, r->path, SQLITE_OPEN_READONLY, err))
        return -1;
    if (rec_schema_version(r, &version, err) == 0)
        return 0;
    int code = sqlite3_errcode(r->db) & 0xff;
    if (code != SQLITE_READONLY && code != SQLITE_CANTOPEN)
        return -1;
    sqlite3_close(r->db);
    r->db = NULL;
    char *uri = rec_immutable_uri(r->path);
    if (!uri)
        return ml_error(err, "out of memory opening '%s'", r->path);
    int status = rec_connect(r, uri, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, err);
    free(uri);
    return status;
}

/* A file with tables of its own and no moelab schema is someone else's:
** refused before anything in it changes (the journal mode included), unless
** the caller adopts it. */
static int rec_check_foreign(Recorder *r, char *err) {
    int version = 0, runs = 0;
    if (rec_schema_version(r, &version, err) || rec_has_table(r, "runs", &runs, err))
        return -1;
    if (version > 0 || runs)
        return 0;
    sqlite3_stmt *st = NULL;
    char names[200] = "";
    int n = 0;
    if (sqlite3_prepare_v2(r->db, "SELECT name FROM sqlite_schema WHERE type IN ('table', 'view')"
                           " AND name NOT LIKE 'sqlite_%' ORDER BY name", -1, &st, NULL) != SQLITE_OK)
        return rec_sqlite_error(r, "read the schema", err);
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(st, 0);
        if (n++ < 5 && strlen(names) + strlen(name) + 3 < sizeof names)
            snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", n > 1 ? ", " : "",
                     name);
    }
    sqlite3_finalize(st);
    if (n == 0)
        return 0;
    return ml_error(err, "'%s' is not a moelab database: it has %d table%s of its own (%s%s) and "
                    "no moelab schema; nothing was changed. To add moelab's tables to it, open it "
                    "with adopt = true", r->path, n, n == 1 ? "" : "s", names, n > 5 ? ", ..." : "");
}

/* ---- runs whose process is gone ------------------------------------ */

/*
** A run is set running with its process's pid, host and start time. When a
** database is opened for writing, every run still 'running' on this host
** whose process is gone -- no such pid, a zombie, or a pid since reused by a
** process that started at another time -- is marked 'crashed'. Runs of
** other hosts cannot be checked from here and keep their status.
*/

/* The start time of process pid in Unix seconds, from /proc (NAN when it
** cannot be read), and in *zombie whether it has ended but not been reaped. */
static double rec_process_started(int pid, int *zombie) {
    char path[64], buf[1024];
    *zombie = 0;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return NAN;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    char state = 0;
    unsigned long long ticks = 0;
    /* after the name: state (field 3), ..., starttime (field 22) */
    if (!p || sscanf(p + 1, " %c %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s"
                     " %*s %*s %*s %llu", &state, &ticks) != 2)
        return NAN;
    *zombie = state == 'Z';
    f = fopen("/proc/stat", "r");
    if (!f)
        return NAN;
    double boot = NAN;
    unsigned long long btime;
    while (fgets(buf, sizeof buf, f))
        if (sscanf(buf, "btime %llu", &btime) == 1)
            boot = (double)btime;
    fclose(f);
    return boot + (double)ticks / (double)sysconf(_SC_CLK_TCK);
}

static int rec_process_alive(int64_t pid, double started) {
    if (pid <= 0 || pid > INT32_MAX)
        return 0;
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH)
        return 0;
    int zombie;
    double now = rec_process_started((int)pid, &zombie);
    return !zombie && (isnan(started) || isnan(now) || fabs(now - started) < 0.5);
}

static int rec_mark_crashed(Recorder *r, char *err) {
    sqlite3_stmt *st = NULL;
    int64_t *dead = NULL;
    int64_t *pids = NULL;
    size_t n = 0, cap = 0;
    int status = -1;
    if (sqlite3_prepare_v2(r->db, "SELECT run_id, pid, pid_started FROM runs"
                           " WHERE status = 'running' AND host = ?1 AND pid IS NOT NULL",
                           -1, &st, NULL) != SQLITE_OK) {
        rec_sqlite_error(r, "read the runs", err);
        goto cleanup;
    }
    sqlite3_bind_text(st, 1, r->host, -1, SQLITE_STATIC);
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        int64_t pid = sqlite3_column_int64(st, 1);
        double started = sqlite3_column_type(st, 2) == SQLITE_NULL ? NAN : sqlite3_column_double(st, 2);
        if (rec_process_alive(pid, started))
            continue;
        if (n == cap && (ML_GROW(dead, cap * 2 + 8) || ML_GROW(pids, cap * 2 + 8))) {
            ml_error(err, "out of memory opening '%s'", r->path);
            goto cleanup;
        }
        if (n == cap)
            cap = cap * 2 + 8;
        pids[n] = pid;
        dead[n++] = sqlite3_column_int64(st, 0);
    }
    if (rc != SQLITE_DONE) {
        rec_sqlite_error(r, "read the runs", err);
        goto cleanup;
    }
    sqlite3_finalize(st);
    st = NULL;
    for (size_t i = 0; i < n; i++) {
        char msg[400];
        snprintf(msg, sizeof msg, "its process (pid %lld on %s) ended without finishing the run: "
                 "killed or crashed; found on opening the database", (long long)pids[i], r->host);
        if (rec_begin_if_needed(r, err))
            goto cleanup;
        /* the process seen dead, not one that has taken the run since */
        if (sqlite3_prepare_v2(r->db, "UPDATE runs SET status = 'crashed', error = ?2"
                               " WHERE run_id = ?1 AND status = 'running' AND pid = ?3 AND host = ?4",
                               -1, &st, NULL) != SQLITE_OK) {
            rec_sqlite_error(r, "mark a crashed run", err);
            goto cleanup;
        }
        sqlite3_bind_int64(st, 1, dead[i]);
        sqlite3_bind_text(st, 2, msg, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int64(st, 3, pids[i]);
        sqlite3_bind_text(st, 4, r->host, -1, SQLITE_STATIC);
        if (rec_step_done(r, st, "mark a crashed run", err))
            goto cleanup;
        sqlite3_finalize(st);
        st = NULL;
        r->pending_rows++;
    }
    status = rec_flush(r, err);
cleanup:
    if (status != 0)
        rec_discard(r);
    sqlite3_finalize(st);
    free(dead);
    free(pids);
    return status;
}

static int rec_open_with(Recorder **out, const char *path, int readonly, int adopt, char *err) {
    *out = NULL;
    if (!path || !*path)
        return ml_error(err, "no database path given");
    /* SQLite would say "disk I/O error" or "unable to open database file" */
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        return ml_error(err, "'%s' is a directory, not a database file", path);
    Recorder *r = calloc(1, sizeof *r);
    if (!r || !(r->path = strdup(path))) {
        free(r);
        return ml_error(err, "out of memory opening '%s'", path);
    }
    r->commit_rows = REC_EVAL_COMMIT_ROWS;
    r->pid = (int)getpid();
    if (gethostname(r->host, sizeof r->host - 1) != 0)
        snprintf(r->host, sizeof r->host, "unknown");
    int zombie;
    r->pid_started = rec_process_started(r->pid, &zombie);
    if (readonly) {
        if (rec_connect_readonly(r, err))
            goto fail;
    } else {
        /* The journal mode is kept in the file; WAL lets readers run while a
        ** run writes. It quietly stays "memory" for ":memory:". A new file
        ** gets 16 KiB pages (an existing one keeps its own): routing rows go
        ** in at 2.2M rows per CPU second instead of 1.7-2.0M with 4 KiB
        ** pages, as fewer, larger writes reach the WAL; 64 KiB pages are no
        ** faster. A larger page cache (cache_size) or temp_store=MEMORY do
        ** not help either (measured with tests/bench_recorder.c). */
        if (rec_connect(r, path, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, err)
            || (!adopt && rec_check_foreign(r, err))
            || rec_exec(r, "PRAGMA page_size = 16384", "set the page size", err)
            || rec_exec(r, "PRAGMA journal_mode = WAL", "switch to WAL mode", err)
            || rec_exec(r, "PRAGMA synchronous = NORMAL", "set synchronous", err))
            goto fail;
        /* ":memory:" has no WAL, and then no hook is called */
        sqlite3_wal_hook(r->db, rec_wal_hook, r);
    }
    if (rec_ensure_schema(r, readonly, err)
        || rec_exec(r, "PRAGMA foreign_keys = ON", "enable foreign keys", err)
        || rec_prepare_all(r, err))
        goto fail;
    /* best effort: a database another writer holds now, or that cannot be
    ** written, still opens; the next open marks them */
    char ignored[ML_ERRLEN];
    if (!readonly)
        rec_mark_crashed(r, ignored);
    *out = r;
    return 0;
fail:
    rec_close(r);
    return -1;
}

int rec_open(Recorder **out, const char *path, char *err) {
    return rec_open_with(out, path, 0, 0, err);
}

int rec_open_adopting(Recorder **out, const char *path, char *err) {
    return rec_open_with(out, path, 0, 1, err);
}

int rec_open_readonly(Recorder **out, const char *path, char *err) {
    return rec_open_with(out, path, 1, 0, err);
}

void rec_close(Recorder *r) {
    if (!r)
        return;
    if (r->db && !sqlite3_get_autocommit(r->db)) {
        /* closing checkpoints anyway: this commit need not start a thread */
        sqlite3_wal_hook(r->db, NULL, NULL);
        if (!r->commit || sqlite3_step(r->commit) != SQLITE_DONE) {
            if (r->rollback)
                sqlite3_step(r->rollback);
            else
                sqlite3_exec(r->db, "ROLLBACK", NULL, NULL, NULL);
        }
    }
    sqlite3_finalize(r->begin);
    sqlite3_finalize(r->commit);
    sqlite3_finalize(r->rollback);
    sqlite3_finalize(r->insert_run);
    sqlite3_finalize(r->update_status);
    sqlite3_finalize(r->update_config);
    sqlite3_finalize(r->update_topk_flops);
    sqlite3_finalize(r->insert_metric);
    sqlite3_finalize(r->insert_traffic);
    sqlite3_finalize(r->insert_eval);
    sqlite3_finalize(r->update_eval);
    sqlite3_finalize(r->update_eval_router);
    sqlite3_finalize(r->delete_eval);
    sqlite3_finalize(r->routing_range);
    sqlite3_finalize(r->savepoint);
    sqlite3_finalize(r->release);
    sqlite3_finalize(r->undo);
    sqlite3_finalize(r->eval_run);
    for (int k = 0; k < REC_ROW_KINDS; k++)
        sqlite3_finalize(r->insert_rows[k]);
    /* first, so that ours is the last connection, which checkpoints and
    ** removes the WAL as it closes */
    rec_checkpointer_stop(r->checkpointer);
    sqlite3_close(r->db);
    free(r->path);
    free(r);
}

int rec_set_busy_timeout(Recorder *r, int ms, char *err) {
    if (ms < 0)
        return ml_error(err, "busy timeout must be >= 0 ms, got %d", ms);
    if (sqlite3_busy_timeout(r->db, ms) != SQLITE_OK)
        return rec_sqlite_error(r, "set the busy timeout", err);
    return 0;
}

int rec_flush(Recorder *r, char *err) {
    if (sqlite3_get_autocommit(r->db))
        return 0;
    if (rec_step_done(r, r->commit, "commit recorded rows", err))
        return -1;
    r->pending_rows = 0;
    return 0;
}

void rec_discard(Recorder *r) {
    if (!sqlite3_get_autocommit(r->db)) {
        sqlite3_step(r->rollback);
        sqlite3_reset(r->rollback);
    }
    r->pending_rows = 0;
}

int64_t rec_background_checkpoints(Recorder *r) {
    RecCheckpointer *c = r->checkpointer;
    if (!c)
        return 0;
    pthread_mutex_lock(&c->lock);
    int64_t n = c->done;
    pthread_mutex_unlock(&c->lock);
    return n;
}

void rec_set_commit_rows(Recorder *r, int64_t rows) {
    r->commit_rows = rows > 0 ? rows : REC_EVAL_COMMIT_ROWS;
}

int rec_commit_due(const Recorder *r) {
    return r->pending_rows >= r->commit_rows;
}

int rec_eval_delete(Recorder *r, int64_t eval_id, char *err) {
    rec_discard(r);
    if (rec_begin_if_needed(r, err))
        return -1;
    sqlite3_bind_int64(r->delete_eval, 1, eval_id);
    if (rec_step_done(r, r->delete_eval, "delete an evaluation", err)) {
        rec_discard(r);
        return -1;
    }
    r->pending_rows++;
    return rec_flush(r, err);
}

int64_t rec_pending_rows(const Recorder *r) {
    return r->pending_rows;
}

sqlite3 *rec_db(Recorder *r) {
    return r->db;
}

const char *rec_path(const Recorder *r) {
    return r->path;
}

int rec_run_begin(Recorder *r, const char *name, const char *experiment,
                  const char *config_json, uint64_t seed, int64_t params_total,
                  int64_t params_active, int causal, int64_t *run_id, char *err) {
    if (!name || !*name)
        return ml_error(err, "a run needs a non-empty name");
    if (rec_begin_if_needed(r, err))
        return -1;
    sqlite3_stmt *st = r->insert_run;
    sqlite3_bind_text(st, 1, name, -1, SQLITE_TRANSIENT);
    rec_bind_text_or_null(st, 2, experiment);
    rec_bind_text_or_null(st, 3, config_json);
    sqlite3_bind_int64(st, 4, (int64_t)seed);
    sqlite3_bind_int64(st, 5, params_total);
    sqlite3_bind_int64(st, 6, params_active);
    if (causal >= 0) sqlite3_bind_int(st, 7, causal != 0);
    else sqlite3_bind_null(st, 7);
    rec_bind_process(r, st, 8);
    if (rec_step_done(r, st, "insert a run", err))
        return -1;
    int64_t id = sqlite3_last_insert_rowid(r->db);
    r->pending_rows++;
    if (rec_flush(r, err))
        return -1;
    if (run_id)
        *run_id = id;
    return 0;
}

int rec_eval_topk_flops(Recorder *r, int64_t eval_id, double flops_per_token, char *err) {
    if (rec_begin_if_needed(r, err))
        return -1;
    sqlite3_stmt *st = r->update_topk_flops;
    sqlite3_bind_int64(st, 1, eval_id);
    rec_bind_real_or_null(st, 2, flops_per_token);
    if (rec_step_done(r, st, "record an evaluation's top-k FLOPs", err))
        return -1;
    r->pending_rows++;
    return 0;
}

int rec_eval_router(Recorder *r, int64_t eval_id, const char *router_json, char *err) {
    if (rec_begin_if_needed(r, err))
        return -1;
    sqlite3_stmt *st = r->update_eval_router;
    sqlite3_bind_int64(st, 1, eval_id);
    sqlite3_bind_text(st, 2, router_json, -1, SQLITE_TRANSIENT);
    if (rec_step_done(r, st, "record an evaluation's router", err))
        return -1;
    r->pending_rows++;
    return 0;
}

int rec_run_status(Recorder *r, int64_t run_id, const char *status,
                   const char *error_msg, char *err) {
    int known = 0;
    for (size_t i = 0; status && i < sizeof rec_statuses / sizeof *rec_statuses; i++)
        known |= strcmp(status, rec_statuses[i]) == 0;
    if (!known)
        return ml_error(err, "unknown run status '%s' (expected running, finished, "
                        "diverged, interrupted, failed or crashed)", status ? status : "(null)");
    if (rec_begin_if_needed(r, err))
        return -1;
    sqlite3_stmt *st = r->update_status;
    sqlite3_bind_int64(st, 1, run_id);
    sqlite3_bind_text(st, 2, status, -1, SQLITE_TRANSIENT);
    rec_bind_text_or_null(st, 3, error_msg);
    rec_bind_process(r, st, 4);
    if (rec_step_done(r, st, "update a run's status", err))
        return -1;
    if (sqlite3_changes(r->db) == 0)
        return ml_error(err, "no run with id %lld in '%s'", (long long)run_id, r->path);
    r->pending_rows++;
    return rec_flush(r, err);
}

int rec_run_hold(Recorder *r, int64_t run_id, char *held, size_t n, char *err) {
    sqlite3_stmt *st = NULL;
    int status = -1;
    if (rec_flush(r, err))
        return -1;
    if (sqlite3_prepare_v2(r->db, "SELECT status FROM runs WHERE run_id = ?1", -1, &st, NULL)
        != SQLITE_OK) {
        rec_sqlite_error(r, "read a run's status", err);
        goto cleanup;
    }
    sqlite3_bind_int64(st, 1, run_id);
    if (sqlite3_step(st) != SQLITE_ROW) {
        ml_error(err, "no run with id %lld in '%s'", (long long)run_id, r->path);
        goto cleanup;
    }
    snprintf(held, n, "%s", (const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    st = NULL;
    if (strcmp(held, "running") == 0)
        return 0;
    if (rec_begin_if_needed(r, err))
        goto cleanup;
    if (sqlite3_prepare_v2(r->db, "UPDATE runs SET status = 'running', pid = ?2, host = ?3,"
                           " pid_started = ?4 WHERE run_id = ?1", -1, &st, NULL) != SQLITE_OK) {
        rec_sqlite_error(r, "hold a run", err);
        goto cleanup;
    }
    sqlite3_bind_int64(st, 1, run_id);
    rec_bind_process(r, st, 2);
    if (rec_step_done(r, st, "hold a run", err))
        goto cleanup;
    r->pending_rows++;
    status = rec_flush(r, err);
cleanup:
    sqlite3_finalize(st);
    return status;
}

int rec_run_release(Recorder *r, int64_t run_id, const char *held, char *err) {
    if (strcmp(held, "running") == 0)
        return 0;
    sqlite3_stmt *st = NULL;
    if (rec_begin_if_needed(r, err))
        return -1;
    if (sqlite3_prepare_v2(r->db, "UPDATE runs SET status = ?2 WHERE run_id = ?1", -1, &st, NULL)
        != SQLITE_OK)
        return rec_sqlite_error(r, "release a run", err);
    sqlite3_bind_int64(st, 1, run_id);
    sqlite3_bind_text(st, 2, held, -1, SQLITE_TRANSIENT);
    int failed = rec_step_done(r, st, "release a run", err);
    sqlite3_finalize(st);
    if (failed)
        return -1;
    r->pending_rows++;
    return rec_flush(r, err);
}

int rec_run_config_set(Recorder *r, int64_t run_id, const char *key, const char *json,
                       char *err) {
    if (rec_begin_if_needed(r, err))
        return -1;
    sqlite3_stmt *st = r->update_config;
    sqlite3_bind_int64(st, 1, run_id);
    sqlite3_bind_text(st, 2, key, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 3, json, -1, SQLITE_TRANSIENT);
    if (rec_step_done(r, st, "update a run's config", err))
        return -1;
    if (sqlite3_changes(r->db) == 0)
        return ml_error(err, "no run with id %lld in '%s'", (long long)run_id, r->path);
    r->pending_rows++;
    return rec_flush(r, err);
}

int rec_metric(Recorder *r, int64_t run_id, int64_t step, const char *split,
               double loss, double aux_loss, double lr, int64_t tokens,
               double moe_flops_per_token, double wall_ms, double comm_ms, const RecAux *aux,
               char *err) {
    if (!split || !*split)
        return ml_error(err, "a metric needs a split ('train' or 'val')");
    if (rec_begin_if_needed(r, err))
        return -1;
    sqlite3_stmt *st = r->insert_metric;
    sqlite3_bind_int64(st, 1, run_id);
    sqlite3_bind_int64(st, 2, step);
    sqlite3_bind_text(st, 3, split, -1, SQLITE_TRANSIENT);
    rec_bind_real_or_null(st, 4, loss);
    rec_bind_real_or_null(st, 5, aux_loss);
    rec_bind_real_or_null(st, 6, lr);
    sqlite3_bind_int64(st, 7, tokens);
    rec_bind_real_or_null(st, 8, moe_flops_per_token);
    rec_bind_real_or_null(st, 9, wall_ms);
    rec_bind_real_or_null(st, 15, comm_ms);
    if (aux) {      /* unbound parameters are NULL */
        rec_bind_real_or_null(st, 10, aux->balance);
        rec_bind_real_or_null(st, 11, aux->z);
        rec_bind_real_or_null(st, 12, aux->cv2);
        rec_bind_real_or_null(st, 13, aux->p_penalty);
        rec_bind_real_or_null(st, 14, aux->entropy);
    }
    if (rec_step_done(r, st, "insert a metric", err))
        return -1;
    r->pending_rows++;
    return 0;
}

int rec_traffic(Recorder *r, int64_t run_id, int64_t eval_id, int64_t step,
                const RecTraffic *rows, size_t n, char *err) {
    if (rec_begin_if_needed(r, err))
        return -1;
    sqlite3_stmt *st = r->insert_traffic;
    for (size_t i = 0; i < n; i++) {
        sqlite3_bind_int64(st, 1, run_id);
        if (eval_id >= 0) sqlite3_bind_int64(st, 2, eval_id);
        else sqlite3_bind_null(st, 2);
        sqlite3_bind_int64(st, 3, step);
        sqlite3_bind_int(st, 4, rows[i].layer);
        sqlite3_bind_int(st, 5, rows[i].src);
        sqlite3_bind_int(st, 6, rows[i].dst);
        sqlite3_bind_int64(st, 7, rows[i].tokens);
        sqlite3_bind_int64(st, 8, rows[i].bytes);
        if (rec_step_done(r, st, "insert traffic", err))
            return -1;
        r->pending_rows++;
    }
    return 0;
}

int rec_eval(Recorder *r, int64_t run_id, int64_t step, const char *split,
             int64_t tokens, double loss, double moe_flops_per_token,
             double experts_per_token, int64_t *eval_id, char *err) {
    if (!split || !*split)
        return ml_error(err, "an evaluation needs a split ('val', 'train', ...)");
    if (rec_begin_if_needed(r, err))
        return -1;
    sqlite3_stmt *st = r->insert_eval;
    sqlite3_bind_int64(st, 1, run_id);
    sqlite3_bind_int64(st, 2, step);
    sqlite3_bind_text(st, 3, split, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(st, 4, tokens);
    rec_bind_real_or_null(st, 5, loss);
    rec_bind_real_or_null(st, 6, moe_flops_per_token);
    rec_bind_real_or_null(st, 7, experts_per_token);
    if (rec_step_done(r, st, "insert an evaluation", err))
        return -1;
    r->pending_rows++;
    if (eval_id)
        *eval_id = sqlite3_last_insert_rowid(r->db);
    return 0;
}

int rec_eval_result(Recorder *r, int64_t eval_id, int64_t tokens, double loss,
                    double moe_flops_per_token, double experts_per_token, char *err) {
    if (rec_begin_if_needed(r, err))
        return -1;
    sqlite3_stmt *st = r->update_eval;
    sqlite3_bind_int64(st, 1, eval_id);
    sqlite3_bind_int64(st, 2, tokens);
    rec_bind_real_or_null(st, 3, loss);
    rec_bind_real_or_null(st, 4, moe_flops_per_token);
    rec_bind_real_or_null(st, 5, experts_per_token);
    if (rec_step_done(r, st, "update an evaluation", err))
        return -1;
    if (sqlite3_changes(r->db) == 0)
        return ml_error(err, "no evaluation with id %lld in '%s'", (long long)eval_id, r->path);
    r->pending_rows++;
    return 0;
}

/* ---- the MoE records -------------------------------------------------- */

/* An evaluation's rows must name its run: routing and token_stats have no
** foreign keys, so this is their only check. */
static int rec_check_eval(Recorder *r, int64_t run_id, int64_t eval_id, const char *what,
                          char *err) {
    sqlite3_stmt *st = r->eval_run;
    sqlite3_bind_int64(st, 1, eval_id);
    int rc = sqlite3_step(st);
    int status = 0;
    if (rc == SQLITE_ROW) {
        int64_t owner = sqlite3_column_int64(st, 0);
        if (owner != run_id)
            status = ml_error(err, "'%s': cannot %s: evaluation %lld belongs to run %lld,"
                              " not run %lld", r->path, what, (long long)eval_id,
                              (long long)owner, (long long)run_id);
    } else if (rc == SQLITE_DONE) {
        status = ml_error(err, "'%s': cannot %s: no evaluation with id %lld", r->path, what,
                          (long long)eval_id);
    } else {
        status = rec_sqlite_error(r, what, err);
    }
    sqlite3_reset(st);
    return status;
}

/*
** Writes rows[0..n) of kind k with one statement, inside the savepoint
** rec_rows, so that a call that fails halfway (a duplicate token, a full
** disk) leaves nothing of itself pending. eval_id < 0 is stored as NULL.
*/
static int rec_insert_rows(Recorder *r, int k, int64_t run_id, int64_t eval_id, int64_t step,
                           const void *rows, size_t n, char *err) {
    const RecRowKind *kind = &rec_row_kinds[k];
    if (n == 0)
        return 0;
    if (!rows)
        return ml_error(err, "cannot %s: no rows given (NULL) for %zu rows", kind->what, n);
    if (n > INT64_MAX)
        return ml_error(err, "cannot %s: %zu rows is too many", kind->what, n);
    if (kind->needs_eval && eval_id < 0)
        return ml_error(err, "cannot %s: %s rows belong to an evaluation (an eval_id from "
                        "rec_eval), got eval_id %lld", kind->what, kind->table,
                        (long long)eval_id);
    if ((eval_id >= 0 && rec_check_eval(r, run_id, eval_id, kind->what, err))
        || rec_begin_if_needed(r, err)
        || rec_step_done(r, r->savepoint, kind->what, err))
        return -1;

    sqlite3_stmt *st = r->insert_rows[k];
    sqlite3_bind_pointer(st, 1, (void *)rows, kind->pointer_type, NULL);
    sqlite3_bind_int64(st, 2, (int64_t)n);
    sqlite3_bind_int64(st, 3, run_id);
    if (eval_id >= 0)
        sqlite3_bind_int64(st, 4, eval_id);
    else
        sqlite3_bind_null(st, 4);
    if (k == REC_EXPERT_LOAD)
        sqlite3_bind_int64(st, 5, step);
    int failed = rec_step_done(r, st, kind->what, err);
    if (!failed && k == REC_ROUTING) {
        /* one statement appends its rows at consecutive rowids */
        int64_t last = sqlite3_last_insert_rowid(r->db);
        sqlite3_bind_int64(r->routing_range, 1, eval_id);
        sqlite3_bind_int64(r->routing_range, 2, last - (int64_t)n + 1);
        sqlite3_bind_int64(r->routing_range, 3, last);
        failed = rec_step_done(r, r->routing_range, kind->what, err);
    }
    if (!failed && rec_step_done(r, r->release, kind->what, err) == 0) {
        r->pending_rows += (int64_t)n;
        return 0;
    }
    /* Some errors (a full disk, I/O) roll the whole transaction back. */
    if (sqlite3_get_autocommit(r->db)) {
        r->pending_rows = 0;
    } else {
        sqlite3_step(r->undo);
        sqlite3_reset(r->undo);
        sqlite3_step(r->release);
        sqlite3_reset(r->release);
    }
    return -1;
}

int rec_expert_load(Recorder *r, int64_t run_id, int64_t eval_id, int64_t step,
                    const RecExpertLoad *rows, size_t n, char *err) {
    return rec_insert_rows(r, REC_EXPERT_LOAD, run_id, eval_id, step, rows, n, err);
}

int rec_routing(Recorder *r, int64_t run_id, int64_t eval_id, const RecRouting *rows,
                size_t n, char *err) {
    return rec_insert_rows(r, REC_ROUTING, run_id, eval_id, 0, rows, n, err);
}

int rec_token_stats(Recorder *r, int64_t run_id, int64_t eval_id,
                    const RecTokenStat *rows, size_t n, char *err) {
    return rec_insert_rows(r, REC_TOKEN_STATS, run_id, eval_id, 0, rows, n, err);
}

int rec_sparsity(Recorder *r, int64_t run_id, int64_t eval_id, const RecSparsity *rows,
                 size_t n, char *err) {
    return rec_insert_rows(r, REC_SPARSITY, run_id, eval_id, 0, rows, n, err);
}

/* ---- reading a recorded evaluation back --------------------------------- */

/* Room for element n of *v (elements of elem bytes), the capacity doubling. */
static int rec_grow(void **v, size_t elem, int64_t n, int64_t *cap) {
    if (n < *cap)
        return 0;
    *cap = *cap ? 2 * *cap : 4096;
    return ml_grow(v, (size_t)*cap, elem);
}

int rec_placement_routing(sqlite3 *db, const char *db_path, int64_t eval_id,
                          PlacementRouting *out, char *err) {
    sqlite3_stmt *st = NULL;
    ModelConfig config;
    PlacementLayer *layer = NULL;
    const char *json;
    char why[ML_ERRLEN];
    int64_t first_cap = 0, experts_cap = 0, seq = -1, pos = -1;
    int status = -1, rc;
    memset(out, 0, sizeof *out);
    config_defaults(&config);
    if (sqlite3_prepare_v2(db, "SELECT json_extract(r.config, '$.model') FROM evals e"
                           " JOIN runs r USING (run_id) WHERE e.eval_id = ?1", -1, &st,
                           NULL) != SQLITE_OK)
        goto db_error;
    sqlite3_bind_int64(st, 1, eval_id);
    rc = sqlite3_step(st);
    if (rc == SQLITE_DONE) {
        ml_error(err, "'%s' has no evaluation %lld", db_path, (long long)eval_id);
        goto cleanup;
    }
    if (rc != SQLITE_ROW)
        goto db_error;
    json = (const char *)sqlite3_column_text(st, 0);
    if (!json || config_from_checkpoint_json(&config, json, (size_t)sqlite3_column_bytes(st, 0),
                                             why)
        || placement_shape(out, &config, why)) {
        ml_error(err, "evaluation %lld of '%s': %s", (long long)eval_id, db_path,
                 json ? why : "its run has no model configuration");
        goto cleanup;
    }
    sqlite3_finalize(st);
    st = NULL;

    /* rows in (layer, seq, pos) order: a layer's tokens one after another */
    if (sqlite3_prepare_v2(db, "SELECT r.layer, r.seq, r.pos, r.expert FROM evals e, routing r"
                           " WHERE e.eval_id = ?1"
                           " AND r.routing_id BETWEEN e.routing_first AND e.routing_last"
                           " AND r.eval_id = e.eval_id ORDER BY r.layer, r.seq, r.pos, r.pass,"
                           " r.rank", -1, &st, NULL) != SQLITE_OK)
        goto db_error;
    sqlite3_bind_int64(st, 1, eval_id);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        int l = sqlite3_column_int(st, 0);
        if (!layer || layer->layer != l) {
            if (ML_GROW(out->layers, (size_t)out->nlayers + 1))
                goto oom;
            layer = &out->layers[out->nlayers++];
            memset(layer, 0, sizeof *layer);
            layer->layer = l;
            first_cap = experts_cap = 0;
            if (rec_grow((void **)&layer->first, sizeof *layer->first, 0, &first_cap))
                goto oom;
            layer->first[0] = 0;
            seq = -1;
        }
        if (sqlite3_column_int64(st, 1) != seq || sqlite3_column_int64(st, 2) != pos) {
            seq = sqlite3_column_int64(st, 1);
            pos = sqlite3_column_int64(st, 2);
            if (rec_grow((void **)&layer->first, sizeof *layer->first, layer->tokens + 1,
                         &first_cap))
                goto oom;
            layer->tokens++;
            layer->first[layer->tokens] = layer->first[layer->tokens - 1];
        }
        int64_t k = layer->first[layer->tokens];
        if (rec_grow((void **)&layer->experts, sizeof *layer->experts, k, &experts_cap))
            goto oom;
        layer->experts[k] = sqlite3_column_int(st, 3);
        layer->first[layer->tokens] = k + 1;
    }
    if (rc != SQLITE_DONE)
        goto db_error;
    if (out->nlayers == 0) {
        ml_error(err, "evaluation %lld of '%s' recorded no routing (run:evaluate{ record = true })",
                 (long long)eval_id, db_path);
        goto cleanup;
    }
    status = 0;
    goto cleanup;
oom:
    ml_error(err, "out of memory reading the routing of evaluation %lld of '%s'",
             (long long)eval_id, db_path);
    goto cleanup;
db_error:
    ml_error(err, "cannot read the routing of evaluation %lld of '%s': %s", (long long)eval_id,
             db_path, sqlite3_errmsg(db));
cleanup:
    sqlite3_finalize(st);
    if (status)
        placement_routing_free(out);
    return status;
}
