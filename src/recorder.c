/*
** recorder.c — the SQLite recorder of recorder.h: the schema of SPEC §3, its
** views, and the row writers for runs, metrics and evaluations.
**
** Writes are batched: the first row after a commit opens a transaction
** (BEGIN IMMEDIATE, so a competing writer is seen at once rather than at
** commit), and rec_flush commits it. The statements that write rows are
** prepared once at open and bound, stepped and reset per row. The database
** runs in WAL mode with synchronous=NORMAL: a process crash never loses a
** commit, and readers (a plot, the sqlite3 shell) never block the writer.
*/
#include "recorder.h"

#include <math.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
** The documented schema. Tables and columns named in SPEC §3 keep their
** names; the rest (metrics.aux_*, runs.error, the indexes) are ours.
** The MoE tables are keyed by run_id first, so that the per-run queries of
** the views and `DELETE FROM runs` (cascading) stay index lookups.
*/
static const char *rec_schema_sql =
    "CREATE TABLE IF NOT EXISTS runs(\n"
    "  run_id        INTEGER PRIMARY KEY,\n"
    "  name          TEXT NOT NULL,\n"
    "  experiment    TEXT,\n"
    "  config        TEXT,               -- the whole configuration as JSON\n"
    "  seed          INTEGER,\n"
    "  status        TEXT NOT NULL DEFAULT 'running' CHECK (status IN\n"
    "                ('running','finished','diverged','interrupted','failed')),\n"
    "  started_at    TEXT NOT NULL,      -- ISO-8601 UTC\n"
    "  finished_at   TEXT,               -- ISO-8601 UTC, set by terminal states\n"
    "  params_total  INTEGER,\n"
    "  params_active INTEGER,\n"
    "  error         TEXT                -- why a run diverged or failed\n"
    ");\n"
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
    "  aux_balance REAL, aux_z REAL, aux_cv2 REAL, aux_p_penalty REAL\n"
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
    "  experts_per_token   REAL\n"
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
    "CREATE TABLE IF NOT EXISTS routing(\n"
    "  run_id  INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,\n"
    "  eval_id INTEGER NOT NULL REFERENCES evals(eval_id) ON DELETE CASCADE,\n"
    "  layer   INTEGER NOT NULL,\n"
    "  seq     INTEGER NOT NULL,\n"
    "  pos     INTEGER NOT NULL,\n"
    "  token   INTEGER,\n"
    "  rank    INTEGER NOT NULL,         -- 0 = the router's first choice\n"
    "  expert  INTEGER NOT NULL,\n"
    "  weight  REAL,\n"
    "  pass    INTEGER NOT NULL DEFAULT 0, -- stratum pass; 0 unless stratified\n"
    "  PRIMARY KEY (run_id, eval_id, layer, seq, pos, pass, rank)\n"
    ") WITHOUT ROWID;\n"
    "CREATE INDEX IF NOT EXISTS routing_by_eval ON routing(eval_id);\n"
    "\n"
    "CREATE TABLE IF NOT EXISTS token_stats(\n"
    "  run_id    INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,\n"
    "  eval_id   INTEGER NOT NULL REFERENCES evals(eval_id) ON DELETE CASCADE,\n"
    "  seq       INTEGER NOT NULL,\n"
    "  pos       INTEGER NOT NULL,\n"
    "  token     INTEGER,\n"
    "  loss      REAL,\n"
    "  experts   INTEGER,                -- expert applications, summed over layers\n"
    "  moe_flops REAL,\n"
    "  PRIMARY KEY (run_id, eval_id, seq, pos)\n"
    ") WITHOUT ROWID;\n"
    "CREATE INDEX IF NOT EXISTS token_stats_by_eval ON token_stats(eval_id);\n"
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
    "SELECT r.run_id, r.name, r.status,\n"
    "       (SELECT m.loss FROM metrics m WHERE m.run_id = r.run_id\n"
    "          AND m.split = 'train' ORDER BY m.step DESC, m.rowid DESC LIMIT 1)\n"
    "         AS train_loss,\n"
    "       (SELECT m.loss FROM metrics m WHERE m.run_id = r.run_id\n"
    "          AND m.split = 'val' ORDER BY m.step DESC, m.rowid DESC LIMIT 1)\n"
    "         AS val_loss,\n"
    "       (SELECT MAX(m.tokens) FROM metrics m WHERE m.run_id = r.run_id)\n"
    "         AS tokens\n"
    "FROM runs r;\n";

struct Recorder {
    sqlite3 *db;
    char *path;
    int64_t pending_rows;     /* rows since the last commit */
    sqlite3_stmt *begin;      /* BEGIN IMMEDIATE */
    sqlite3_stmt *commit;     /* COMMIT */
    sqlite3_stmt *rollback;   /* ROLLBACK */
    sqlite3_stmt *insert_run;
    sqlite3_stmt *update_status;
    sqlite3_stmt *update_config;
    sqlite3_stmt *insert_metric;
    sqlite3_stmt *insert_eval;
};

static const char *rec_statuses[] = {
    "running", "finished", "diverged", "interrupted", "failed",
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

static int rec_exec(Recorder *r, const char *sql, const char *what, char *err) {
    if (sqlite3_exec(r->db, sql, NULL, NULL, NULL) != SQLITE_OK)
        return rec_sqlite_error(r, what, err);
    return 0;
}

/* Creates the schema of a new database, or checks an existing one's version. */
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
        return 0;
    }
    if (rec_exec(r, "BEGIN IMMEDIATE", "create the schema", err))
        return -1;
    char sql[64];
    snprintf(sql, sizeof sql, "PRAGMA user_version = %d", REC_SCHEMA_VERSION);
    if (rec_exec(r, rec_schema_sql, "create the schema", err)
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

static int rec_prepare_all(Recorder *r, char *err) {
    if (rec_prepare(r, &r->begin, "BEGIN IMMEDIATE", err)
        || rec_prepare(r, &r->commit, "COMMIT", err)
        || rec_prepare(r, &r->rollback, "ROLLBACK", err)
        || rec_prepare(r, &r->insert_run,
               "INSERT INTO runs(name, experiment, config, seed, status, started_at,"
               " params_total, params_active)"
               " VALUES (?1, ?2, ?3, ?4, 'running',"
               " strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?5, ?6)", err)
        || rec_prepare(r, &r->update_status,
               "UPDATE runs SET status = ?2, error = ?3,"
               " finished_at = CASE WHEN ?2 = 'running' THEN NULL"
               " ELSE strftime('%Y-%m-%dT%H:%M:%fZ', 'now') END"
               " WHERE run_id = ?1", err)
        || rec_prepare(r, &r->update_config,
               "UPDATE runs SET config = json_set(COALESCE(config, '{}'), '$.' || ?2, json(?3))"
               " WHERE run_id = ?1", err)
        || rec_prepare(r, &r->insert_metric,
               "INSERT INTO metrics(run_id, step, split, loss, aux_loss, lr, tokens,"
               " moe_flops_per_token, wall_ms)"
               " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)", err)
        || rec_prepare(r, &r->insert_eval,
               "INSERT INTO evals(run_id, step, split, tokens, loss,"
               " moe_flops_per_token, experts_per_token)"
               " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)", err))
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

static int rec_connect(Recorder *r, const char *filename, int flags, char *err) {
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

static int rec_open_with(Recorder **out, const char *path, int readonly, char *err) {
    *out = NULL;
    if (!path || !*path)
        return ml_error(err, "no database path given");
    Recorder *r = calloc(1, sizeof *r);
    if (!r || !(r->path = strdup(path))) {
        free(r);
        return ml_error(err, "out of memory opening '%s'", path);
    }
    if (readonly) {
        if (rec_connect_readonly(r, err))
            goto fail;
    } else {
        /* The journal mode is kept in the file; WAL lets readers run while a
        ** run writes. It quietly stays "memory" for ":memory:". */
        if (rec_connect(r, path, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, err)
            || rec_exec(r, "PRAGMA journal_mode = WAL", "switch to WAL mode", err)
            || rec_exec(r, "PRAGMA synchronous = NORMAL", "set synchronous", err))
            goto fail;
    }
    if (rec_exec(r, "PRAGMA foreign_keys = ON", "enable foreign keys", err)
        || rec_ensure_schema(r, readonly, err)
        || rec_prepare_all(r, err))
        goto fail;
    *out = r;
    return 0;
fail:
    rec_close(r);
    return -1;
}

int rec_open(Recorder **out, const char *path, char *err) {
    return rec_open_with(out, path, 0, err);
}

int rec_open_readonly(Recorder **out, const char *path, char *err) {
    return rec_open_with(out, path, 1, err);
}

void rec_close(Recorder *r) {
    if (!r)
        return;
    if (r->db && !sqlite3_get_autocommit(r->db)) {
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
    sqlite3_finalize(r->insert_metric);
    sqlite3_finalize(r->insert_eval);
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
                  int64_t params_active, int64_t *run_id, char *err) {
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

int rec_run_status(Recorder *r, int64_t run_id, const char *status,
                   const char *error_msg, char *err) {
    int known = 0;
    for (size_t i = 0; status && i < sizeof rec_statuses / sizeof *rec_statuses; i++)
        known |= strcmp(status, rec_statuses[i]) == 0;
    if (!known)
        return ml_error(err, "unknown run status '%s' (expected running, finished, "
                        "diverged, interrupted or failed)", status ? status : "(null)");
    if (rec_begin_if_needed(r, err))
        return -1;
    sqlite3_stmt *st = r->update_status;
    sqlite3_bind_int64(st, 1, run_id);
    sqlite3_bind_text(st, 2, status, -1, SQLITE_TRANSIENT);
    rec_bind_text_or_null(st, 3, error_msg);
    if (rec_step_done(r, st, "update a run's status", err))
        return -1;
    if (sqlite3_changes(r->db) == 0)
        return ml_error(err, "no run with id %lld in '%s'", (long long)run_id, r->path);
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
               double moe_flops_per_token, double wall_ms, char *err) {
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
    if (rec_step_done(r, st, "insert a metric", err))
        return -1;
    r->pending_rows++;
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
