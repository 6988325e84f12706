/*
** recorder.h — moelab's SQLite recorder: one database file, any number of runs.
**
** The recorder owns the documented schema (SPEC §3: runs, metrics, evals,
** expert_load, routing, token_stats, sparsity, and the v_* views) and writes
** rows into it. Rows go into an open transaction that rec_flush commits; the
** caller flushes about once a second or every few thousand rows, and closing
** flushes too. A crash loses at most the rows written since the last flush;
** everything committed stays (WAL journal, synchronous=NORMAL).
**
** The run record itself is committed at once: rec_run_begin and rec_run_status
** commit immediately, together with any rows still pending.
**
** Every function that can fail returns 0 or -1 with a one-line message in err
** (common.h). Messages name the database path and SQLite's own words, e.g.
** "cannot insert a metric into 'r.db': database is locked".
*/
#ifndef MOELAB_RECORDER_H
#define MOELAB_RECORDER_H

#include <stdint.h>

#include "common.h"

typedef struct sqlite3 sqlite3;
typedef struct Recorder Recorder;

/* PRAGMA user_version of a database with the schema of this build. */
#define REC_SCHEMA_VERSION 1

/* Default busy timeout: how long a write waits for another writer's lock. */
#define REC_BUSY_TIMEOUT_MS 5000

/* Opens (creating when needed) the database at path and its schema. ":memory:"
** works. On failure *out is NULL. */
int rec_open(Recorder **out, const char *path, char *err);

/* Opens an existing moelab database for reading only (plots, queries); every
** write through it fails with "attempt to write a readonly database". */
int rec_open_readonly(Recorder **out, const char *path, char *err);

/* Commits pending rows (call rec_flush first to learn whether that worked:
** a failed final commit is rolled back here) and closes. NULL is a no-op. */
void rec_close(Recorder *r);

/* How long a write waits for another connection's lock before it fails with
** "database is locked". */
int rec_set_busy_timeout(Recorder *r, int ms, char *err);

/* Starts a run with status 'running' and started_at now; commits at once.
** experiment and config_json may be NULL. Seeds of 2^63 and above are stored
** as their two's-complement int64 (cast back to uint64_t to read them). */
int rec_run_begin(Recorder *r, const char *name, const char *experiment,
                  const char *config_json, uint64_t seed, int64_t params_total,
                  int64_t params_active, int64_t *run_id, char *err);

/* Sets a run's status: running, finished, diverged, interrupted or failed.
** Every status but running also sets finished_at; error_msg (may be NULL) is
** the message kept for diverged or failed runs. Commits at once. */
int rec_run_status(Recorder *r, int64_t run_id, const char *status,
                   const char *error_msg, char *err);

/* Sets config.KEY of a run to the JSON value json (as training options are
** known only when training starts: key "train"). Commits at once. */
int rec_run_config_set(Recorder *r, int64_t run_id, const char *key, const char *json,
                       char *err);

/* One row of the training curve (split "train") or of an evaluation ("val").
** A NaN in any REAL argument is stored as NULL (aux_loss and
** moe_flops_per_token are NaN for dense models). */
int rec_metric(Recorder *r, int64_t run_id, int64_t step, const char *split,
               double loss, double aux_loss, double lr, int64_t tokens,
               double moe_flops_per_token, double wall_ms, char *err);

/* One evaluation; *eval_id (may be NULL) keys its expert_load, routing,
** token_stats and sparsity rows. NaN is stored as NULL. */
int rec_eval(Recorder *r, int64_t run_id, int64_t step, const char *split,
             int64_t tokens, double loss, double moe_flops_per_token,
             double experts_per_token, int64_t *eval_id, char *err);

/* Commits the open transaction. On failure (say, the database is locked) the
** rows stay pending and the next flush tries again. */
int rec_flush(Recorder *r, char *err);

/* Rows written since the last successful commit. */
int64_t rec_pending_rows(const Recorder *r);

/* The connection, for tests and for the extensions that record MoE tables. */
sqlite3 *rec_db(Recorder *r);

/* The path the recorder was opened with. */
const char *rec_path(const Recorder *r);

#endif
