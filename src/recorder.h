/*
** recorder.h — moelab's SQLite recorder: one database file, any number of runs.
**
** The recorder owns the documented schema (SPEC §3: runs, metrics, evals,
** expert_load, routing, token_stats, sparsity, and the v_* views) and writes
** rows into it (and reads an evaluation's routing back for placement.h). Rows go into an open transaction that rec_flush commits; the
** caller flushes about once a second or every few thousand rows, and closing
** flushes too. A crash loses at most the rows written since the last flush;
** everything committed stays (WAL journal, synchronous=NORMAL).
**
** The run record itself is committed at once: rec_run_begin and rec_run_status
** commit immediately, together with any rows still pending.
**
** The MoE records (expert_load, routing, token_stats, sparsity) come in arrays,
** one call per layer, batch or evaluation. routing and token_stats are written
** at well over a million rows a second (tests/bench_recorder.c): one
** statement per call, which reads the array through a virtual table
** (nothing bound or parsed per row), and no per-row foreign-key lookups
** (each call checks its evaluation once instead). A transaction of any size is fine: SQLite keeps only its page
** cache in memory and spills the rest to the WAL file.
**
** A Recorder is used by one thread at a time (its connection has no mutex).
** A database file also gets a thread of the recorder's own, with a second
** connection, that copies a full WAL back into the database (recorder.c,
** "checkpoints"); rec_close stops it.
**
** Every function that can fail returns 0 or -1 with a one-line message in err
** (common.h). Messages name the database path and SQLite's own words, e.g.
** "cannot insert a metric into 'r.db': database is locked".
*/
#ifndef MOELAB_RECORDER_H
#define MOELAB_RECORDER_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"
#include "placement.h"

typedef struct sqlite3 sqlite3;
typedef struct Recorder Recorder;

/* PRAGMA user_version of a database with the schema of this build. */
#define REC_SCHEMA_VERSION 7

/* Default busy timeout: how long a write waits for another writer's lock. */
#define REC_BUSY_TIMEOUT_MS 5000

/* Opens (creating when needed) the database at path and its schema. ":memory:"
** works. On failure *out is NULL. */
int rec_open(Recorder **out, const char *path, char *err);

/* Opening for writing also marks 'crashed' every run left 'running' on
** this host whose process is gone (see recorder.c). */

/* rec_open for a file that has tables of its own and no moelab schema, which
** rec_open refuses: moelab's tables are added beside them. */
int rec_open_adopting(Recorder **out, const char *path, char *err);

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
** as their two's-complement int64 (cast back to uint64_t to read them).
** causal: 1 when no position's loss depends on a later byte, 0 when one may
** (model_is_causal), -1 unknown (NULL). */
int rec_run_begin(Recorder *r, const char *name, const char *experiment,
                  const char *config_json, uint64_t seed, int64_t params_total,
                  int64_t params_active, int causal, int64_t *run_id, char *err);

/* Sets evals.topk_flops_per_token: what a merged model's gates would have
** cost as per-token top-k layers. */
int rec_eval_topk_flops(Recorder *r, int64_t eval_id, double flops_per_token, char *err);

/* Sets evals.router: the router (JSON) a counterfactual evaluation ran under. */
int rec_eval_router(Recorder *r, int64_t eval_id, const char *router_json, char *err);

/* Sets a run's status: running, finished, diverged, interrupted, failed or
** crashed. Every status but running also sets finished_at; running records
** this process (pid, host, start time) as the run's. error_msg (may be NULL)
** is the message kept for diverged or failed runs. Commits at once. */
int rec_run_status(Recorder *r, int64_t run_id, const char *status,
                   const char *error_msg, char *err);

/* A run is 'running' while a process works on it, so that a crash marks it
** 'crashed'. rec_run_hold makes it running for a while (an evaluation of a
** trained run) with this process as its own, keeping its finished_at and
** error, and puts its status in held; rec_run_release puts held back.
** Both commit at once. */
int rec_run_hold(Recorder *r, int64_t run_id, char *held, size_t n, char *err);
int rec_run_release(Recorder *r, int64_t run_id, const char *held, char *err);

/* Sets config.KEY of a run to the JSON value json (as training options are
** known only when training starts: key "train"). Commits at once. */
int rec_run_config_set(Recorder *r, int64_t run_id, const char *key, const char *json,
                       char *err);

/* The unweighted auxiliary losses of one metrics row, in the columns
** aux_balance, aux_z, aux_cv2, aux_p_penalty and aux_entropy; a NaN part (a
** loss that is off) is stored as NULL. */
typedef struct {
    double balance, z, cv2, p_penalty, entropy;
} RecAux;

/* One row of the training curve (split "train") or of an evaluation ("val").
** A NaN in any REAL argument is stored as NULL (aux_loss and
** moe_flops_per_token are NaN for dense models). aux may be NULL: every
** aux_* column NULL. */
int rec_metric(Recorder *r, int64_t run_id, int64_t step, const char *split,
               double loss, double aux_loss, double lr, int64_t tokens,
               double moe_flops_per_token, double wall_ms, double comm_ms, const RecAux *aux,
               char *err);

/* Under expert parallelism: the assignments of rank src's tokens to experts
** on rank dst in a layer (src = dst: they stayed), and the bytes moved for
** them, of a training step (eval_id < 0) or an evaluation. */
typedef struct {
    int layer, src, dst;
    int64_t tokens, bytes;
} RecTraffic;
int rec_traffic(Recorder *r, int64_t run_id, int64_t eval_id, int64_t step,
                const RecTraffic *rows, size_t n, char *err);

/* One evaluation; *eval_id (may be NULL) keys its expert_load, routing,
** token_stats and sparsity rows. NaN is stored as NULL. */
int rec_eval(Recorder *r, int64_t run_id, int64_t step, const char *split,
             int64_t tokens, double loss, double moe_flops_per_token,
             double experts_per_token, int64_t *eval_id, char *err);

/* Sets an evaluation's results, for one recorded as it goes: rec_eval
** first (with NaN for what is not known yet: evals.complete is 0 until
** this), its rows, then this. */
int rec_eval_result(Recorder *r, int64_t eval_id, int64_t tokens, double loss,
                    double moe_flops_per_token, double experts_per_token, char *err);

/* Deletes an evaluation and every row of it, committed or pending, and
** commits: what an evaluation that fails or is interrupted leaves. */
int rec_eval_delete(Recorder *r, int64_t eval_id, char *err);

/* A recorded evaluation's writer (recwriter.h) commits whenever this many
** rows are pending, so that its WAL stays bounded however long it runs;
** rec_commit_due says when. */
#define REC_EVAL_COMMIT_ROWS ((int64_t)1 << 21)
void rec_set_commit_rows(Recorder *r, int64_t rows);
int rec_commit_due(const Recorder *r);

/*
** The MoE records. Each call writes rows[0..n) into the open transaction, all
** or none of them: on failure nothing of that call stays pending. n = 0 is a
** no-op. eval_id is an id from rec_eval; for routing and token_stats the
** evaluation must belong to run_id (checked once per call).
*/

/* One (layer, expert) of a training step or an evaluation. tokens counts the
** assignments the expert processed, dropped those over capacity, prob_mass
** the sum of the router's probabilities for it (NaN → NULL). */
typedef struct {
    int layer, expert;
    int64_t tokens, dropped;
    double prob_mass;
} RecExpertLoad;

/* eval_id < 0 → NULL: a training step; step is the optimiser step. */
int rec_expert_load(Recorder *r, int64_t run_id, int64_t eval_id, int64_t step,
                    const RecExpertLoad *rows, size_t n, char *err);

/* One selected expert of one token in one layer. rank 0 is the router's first
** choice; pass is the stratum pass of a stratified layer, else 0; weight
** multiplies the expert's output. Any order is accepted; each call's rows
** get consecutive routing_ids and widen the evaluation's range in
** evals.routing_first/last. */
typedef struct {
    int layer, seq, pos, token, rank, expert, pass;
    float weight;
} RecRouting;

int rec_routing(Recorder *r, int64_t run_id, int64_t eval_id, const RecRouting *rows,
                size_t n, char *err);

/* One token of a recorded evaluation: its loss (nats; NaN → NULL), the
** expert applications and passes it received summed over layers, and the
** MoE FLOPs spent on it. A (seq, pos) is recorded once per evaluation. */
typedef struct {
    int seq, pos, token, experts;
    float loss;
    double moe_flops;
    int passes; /* passes through the MoE layers, summed over them */
} RecTokenStat;

int rec_token_stats(Recorder *r, int64_t run_id, int64_t eval_id,
                    const RecTokenStat *rows, size_t n, char *err);

/* Hidden activations of one expert: how many, how many with |a| <= eps, and
** their mean |a| (NaN → NULL). eval_id < 0 → NULL. */
typedef struct {
    int layer, expert;
    int64_t activations, near_zero;
    double mean_abs;
} RecSparsity;

int rec_sparsity(Recorder *r, int64_t run_id, int64_t eval_id, const RecSparsity *rows,
                 size_t n, char *err);

/* Commits the open transaction. On failure (say, the database is locked) the
** rows stay pending and the next flush tries again. */
int rec_flush(Recorder *r, char *err);

/* Rolls the open transaction back: every row since the last commit is gone. */
void rec_discard(Recorder *r);

/* Rows written since the last successful commit. */
int64_t rec_pending_rows(const Recorder *r);

/* Checkpoints run so far by the background thread that copies a full WAL
** (1000 pages) back into the database; 0 until the WAL first fills. */
int64_t rec_background_checkpoints(Recorder *r);

/* Reads recorded evaluation eval_id back for a placement replay (placement.h):
** per MoE layer, its tokens in (seq, pos) order with the experts each chose
** (every pass), and the model's shape from its run's configuration. db_path
** names the database in messages. On failure out holds nothing. */
int rec_placement_routing(sqlite3 *db, const char *db_path, int64_t eval_id,
                          PlacementRouting *out, char *err);

/* The connection, for tests and ad-hoc queries. */
sqlite3 *rec_db(Recorder *r);

/* The path the recorder was opened with. */
const char *rec_path(const Recorder *r);

#endif
