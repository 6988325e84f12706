/*
** test_recorder.c — checks the SQLite recorder (src/recorder.c): the schema
** of SPEC §3 column by column, a run's rows read back with SQL, the views
** against hand-computed numbers, and the failures a user meets (a locked,
** read-only or foreign file) with the messages they get.
**
** Build: gcc -std=c11 -D_GNU_SOURCE -Isrc tests/test_recorder.c
**        src/recorder.c src/common.c -lsqlite3 -lcmocka -lm
*/
#include <ftw.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <sqlite3.h>

#include "recorder.h"
#include "recwriter.h"

/* ---- helpers ---------------------------------------------------------- */

/* cmocka 1.1.5 has no float assertion. */
#define assert_near(actual, expected, tol) do {                              \
        double a_ = (actual), e_ = (expected);                                \
        if (!(fabs(a_ - e_) <= (tol)))                                        \
            fail_msg("%s = %.17g, expected %.17g", #actual, a_, e_);          \
    } while (0)

/* The first column of the first row of sql, which must return a row. */
static sqlite3_stmt *query_row(sqlite3 *db, const char *sql) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
        fail_msg("prepare '%s': %s", sql, sqlite3_errmsg(db));
    if (sqlite3_step(st) != SQLITE_ROW)
        fail_msg("no row from '%s': %s", sql, sqlite3_errmsg(db));
    return st;
}

static int64_t query_int(sqlite3 *db, const char *sql) {
    sqlite3_stmt *st = query_row(db, sql);
    int64_t v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

static double query_real(sqlite3 *db, const char *sql) {
    sqlite3_stmt *st = query_row(db, sql);
    if (sqlite3_column_type(st, 0) == SQLITE_NULL)
        fail_msg("'%s' returned NULL", sql);
    double v = sqlite3_column_double(st, 0);
    sqlite3_finalize(st);
    return v;
}

static int query_is_null(sqlite3 *db, const char *sql) {
    sqlite3_stmt *st = query_row(db, sql);
    int is_null = sqlite3_column_type(st, 0) == SQLITE_NULL;
    sqlite3_finalize(st);
    return is_null;
}

static void query_text(sqlite3 *db, const char *sql, char *out, size_t n) {
    sqlite3_stmt *st = query_row(db, sql);
    const unsigned char *t = sqlite3_column_text(st, 0);
    snprintf(out, n, "%s", t ? (const char *)t : "(null)");
    sqlite3_finalize(st);
}

static void exec_sql(sqlite3 *db, const char *sql) {
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK)
        fail_msg("exec '%s': %s", sql, msg);
}

static int table_has_column(sqlite3 *db, const char *table, const char *column) {
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT name FROM pragma_table_info('%s')", table);
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    int found = 0;
    while (sqlite3_step(st) == SQLITE_ROW)
        found |= strcmp((const char *)sqlite3_column_text(st, 0), column) == 0;
    sqlite3_finalize(st);
    return found;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb; (void)flag; (void)ftw;
    return remove(path);
}

/* Each file test gets its own temporary directory as its state. */
static int setup_tmpdir(void **state) {
    char *dir = strdup("/tmp/moelab-test-recorder-XXXXXX");
    if (!dir || !mkdtemp(dir))
        return -1;
    *state = dir;
    return 0;
}

static int teardown_tmpdir(void **state) {
    char *dir = *state;
    chmod(dir, 0700);
    nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(dir);
    return 0;
}

static void tmp_path(char *out, size_t n, void **state, const char *name) {
    snprintf(out, n, "%s/%s", (const char *)*state, name);
}

static Recorder *open_ok(const char *path) {
    Recorder *r = NULL;
    char err[ML_ERRLEN] = "";
    if (rec_open(&r, path, err))
        fail_msg("rec_open(%s): %s", path, err);
    return r;
}

static int64_t begin_run(Recorder *r, const char *name) {
    int64_t id = 0;
    char err[ML_ERRLEN] = "";
    if (rec_run_begin(r, name, "exp", "{\"layers\":2}", 7, 1000, 250, 1, &id, err))
        fail_msg("rec_run_begin: %s", err);
    return id;
}

/* ---- schema ----------------------------------------------------------- */

static void test_schema_has_every_documented_column(void **state) {
    (void)state;
    static const char *spec[][12] = {
        {"runs", "run_id", "name", "experiment", "config", "seed", "status",
         "started_at", "finished_at", "params_total", "params_active", "error"},
        {"runs", "causal", "pid", "host", "pid_started"},
        {"evals", "routing_first", "routing_last", "complete"},
        {"metrics", "run_id", "step", "split", "loss", "aux_loss", "lr", "tokens",
         "moe_flops_per_token", "wall_ms", "aux_balance", "aux_z"},
        {"metrics", "aux_cv2", "aux_p_penalty"},
        {"evals", "eval_id", "run_id", "step", "split", "tokens", "loss",
         "moe_flops_per_token", "experts_per_token"},
        {"expert_load", "run_id", "eval_id", "step", "layer", "expert", "tokens",
         "dropped", "prob_mass"},
        {"routing", "run_id", "eval_id", "layer", "seq", "pos", "token", "rank",
         "expert", "weight", "pass"},
        {"token_stats", "run_id", "eval_id", "seq", "pos", "token", "loss",
         "experts", "moe_flops"},
        {"sparsity", "run_id", "eval_id", "layer", "expert", "activations",
         "near_zero", "mean_abs"},
    };
    Recorder *r = open_ok(":memory:");
    sqlite3 *db = rec_db(r);
    for (size_t t = 0; t < sizeof spec / sizeof *spec; t++)
        for (size_t c = 1; c < 12 && spec[t][c]; c++)
            if (!table_has_column(db, spec[t][0], spec[t][c]))
                fail_msg("table %s lacks column %s", spec[t][0], spec[t][c]);
    static const char *views[] = {"v_experts_per_token", "v_load_cv",
                                  "v_dropped_fraction", "v_layer_load", "v_final_loss"};
    for (size_t v = 0; v < sizeof views / sizeof *views; v++) {
        char sql[160];
        snprintf(sql, sizeof sql,
                 "SELECT count(*) FROM sqlite_schema WHERE type='view' AND name='%s'",
                 views[v]);
        if (query_int(db, sql) != 1)
            fail_msg("view %s is missing", views[v]);
        snprintf(sql, sizeof sql, "SELECT count(*) FROM %s", views[v]);
        assert_int_equal(query_int(db, sql), 0);   /* and it runs */
    }
    assert_int_equal(query_int(db, "PRAGMA user_version"), REC_SCHEMA_VERSION);
    rec_close(r);
}

/* ---- a run's rows ----------------------------------------------------- */

static void test_run_metrics_eval_and_status_read_back(void **state) {
    (void)state;
    char err[ML_ERRLEN] = "", text[128];
    Recorder *r = open_ok(":memory:");
    sqlite3 *db = rec_db(r);
    int64_t run = begin_run(r, "top2");
    assert_true(run > 0);
    assert_int_equal(rec_metric(r, run, 1, "train", 5.5, 0.02, 1e-3, 2048, 1.5e6, 12.5, NAN, NULL, err), 0);
    assert_int_equal(rec_metric(r, run, 2, "train", 4.25, NAN, 2e-3, 4096, NAN, 11.0, NAN, NULL, err), 0);
    assert_int_equal(rec_metric(r, run, 2, "val", 4.5, NAN, 2e-3, 4096, NAN, NAN, NAN, NULL, err), 0);
    assert_int_equal(rec_pending_rows(r), 3);
    int64_t eval_id = 0;
    assert_int_equal(rec_eval(r, run, 2, "val", 8192, 4.5, 1.25e6, 1.75, &eval_id, err), 0);
    assert_true(eval_id > 0);
    assert_int_equal(rec_flush(r, err), 0);
    assert_int_equal(rec_pending_rows(r), 0);

    query_text(db, "SELECT status FROM runs", text, sizeof text);
    assert_string_equal(text, "running");
    assert_true(query_is_null(db, "SELECT finished_at FROM runs"));
    assert_int_equal(rec_run_status(r, run, "finished", NULL, err), 0);

    query_text(db, "SELECT name || '|' || experiment || '|' || config || '|' || status"
                   " FROM runs", text, sizeof text);
    assert_string_equal(text, "top2|exp|{\"layers\":2}|finished");
    assert_int_equal(query_int(db, "SELECT seed FROM runs"), 7);
    assert_int_equal(query_int(db, "SELECT params_total FROM runs"), 1000);
    assert_int_equal(query_int(db, "SELECT params_active FROM runs"), 250);
    assert_true(query_is_null(db, "SELECT error FROM runs"));
    /* ISO-8601 UTC: 2024-05-01T12:34:56.789Z */
    assert_int_equal(query_int(db, "SELECT count(*) FROM runs WHERE"
        " started_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*Z'"
        " AND finished_at GLOB '[0-9][0-9][0-9][0-9]-*T*Z'"
        " AND finished_at >= started_at"), 1);

    assert_int_equal(query_int(db, "SELECT count(*) FROM metrics"), 3);
    assert_near(query_real(db, "SELECT loss FROM metrics WHERE step=1"), 5.5, 0);
    assert_near(query_real(db, "SELECT aux_loss FROM metrics WHERE step=1"), 0.02, 0);
    assert_near(query_real(db, "SELECT moe_flops_per_token FROM metrics WHERE step=1"),
                        1.5e6, 0);
    assert_near(query_real(db, "SELECT wall_ms FROM metrics WHERE step=1"), 12.5, 0);
    assert_int_equal(query_int(db, "SELECT tokens FROM metrics WHERE step=2 AND split='train'"),
                     4096);
    assert_true(query_is_null(db, "SELECT aux_loss FROM metrics WHERE step=2 AND split='train'"));
    assert_true(query_is_null(db, "SELECT moe_flops_per_token FROM metrics"
                                  " WHERE step=2 AND split='train'"));
    assert_true(query_is_null(db, "SELECT wall_ms FROM metrics WHERE split='val'"));
    assert_true(query_is_null(db, "SELECT aux_balance FROM metrics WHERE step=1"));

    char sql[160];
    snprintf(sql, sizeof sql, "SELECT experts_per_token FROM evals WHERE eval_id=%lld"
             " AND run_id=%lld AND step=2 AND split='val' AND tokens=8192",
             (long long)eval_id, (long long)run);
    assert_near(query_real(db, sql), 1.75, 0);
    assert_near(query_real(db, "SELECT moe_flops_per_token FROM evals"), 1.25e6, 0);

    assert_near(query_real(db, "SELECT train_loss FROM v_final_loss"), 4.25, 0);
    assert_near(query_real(db, "SELECT val_loss FROM v_final_loss"), 4.5, 0);
    assert_int_equal(query_int(db, "SELECT tokens FROM v_final_loss"), 4096);
    rec_close(r);
}

static void test_diverged_run_keeps_its_message(void **state) {
    (void)state;
    char err[ML_ERRLEN] = "", text[128];
    Recorder *r = open_ok(":memory:");
    int64_t run = begin_run(r, "hot");
    assert_int_equal(rec_run_status(r, run, "diverged", "loss is NaN at step 40", err), 0);
    query_text(rec_db(r), "SELECT status || ': ' || error FROM runs", text, sizeof text);
    assert_string_equal(text, "diverged: loss is NaN at step 40");
    assert_false(query_is_null(rec_db(r), "SELECT finished_at FROM runs"));
    rec_close(r);
}

static void test_bad_status_and_unknown_run_are_rejected(void **state) {
    (void)state;
    char err[ML_ERRLEN] = "";
    Recorder *r = open_ok(":memory:");
    int64_t run = begin_run(r, "a");
    assert_int_equal(rec_run_status(r, run, "done", NULL, err), -1);
    assert_non_null(strstr(err, "'done'"));
    assert_non_null(strstr(err, "finished"));
    assert_int_equal(rec_run_status(r, run, NULL, NULL, err), -1);
    assert_int_equal(rec_run_status(r, run, "", NULL, err), -1);
    char text[32];
    query_text(rec_db(r), "SELECT status FROM runs", text, sizeof text);
    assert_string_equal(text, "running");

    assert_int_equal(rec_run_status(r, run + 41, "finished", NULL, err), -1);
    assert_non_null(strstr(err, "no run with id"));
    assert_int_equal(rec_metric(r, run + 41, 1, "train", 1, 0, 0, 1, 0, 0, NAN, NULL, err), -1);
    assert_non_null(strstr(err, "FOREIGN KEY"));
    assert_int_equal(rec_run_begin(r, "", NULL, NULL, 0, 0, 0, -1, NULL, err), -1);
    assert_int_equal(rec_metric(r, run, 1, NULL, 1, 0, 0, 1, 0, 0, NAN, NULL, err), -1);
    rec_close(r);
}

/* ---- MoE records ------------------------------------------------------ */

static void test_metric_aux_parts_read_back(void **state) {
    (void)state;
    char err[ML_ERRLEN] = "";
    Recorder *r = open_ok(":memory:");
    sqlite3 *db = rec_db(r);
    int64_t run = begin_run(r, "aux");
    RecAux aux = {.balance = 1.25, .z = 0.5, .cv2 = NAN, .p_penalty = 0.125};
    assert_int_equal(rec_metric(r, run, 1, "train", 3.0, 0.02, 1e-3, 64, 2e5, 1, NAN, &aux, err), 0);
    assert_int_equal(rec_metric(r, run, 2, "train", 2.9, NAN, 1e-3, 128, NAN, 1, NAN, NULL, err), 0);
    assert_near(query_real(db, "SELECT aux_balance FROM metrics WHERE step=1"), 1.25, 0);
    assert_near(query_real(db, "SELECT aux_z FROM metrics WHERE step=1"), 0.5, 0);
    assert_true(query_is_null(db, "SELECT aux_cv2 FROM metrics WHERE step=1"));
    assert_near(query_real(db, "SELECT aux_p_penalty FROM metrics WHERE step=1"), 0.125, 0);
    assert_near(query_real(db, "SELECT aux_loss FROM metrics WHERE step=1"), 0.02, 0);
    assert_int_equal(query_int(db, "SELECT count(*) FROM metrics WHERE step=2 AND"
                                   " aux_balance IS NULL AND aux_z IS NULL AND"
                                   " aux_cv2 IS NULL AND aux_p_penalty IS NULL"), 1);
    rec_close(r);
}

/* Every field of every kind lands in its column; 150 routing rows go as two
** statements of 64 rows and 22 of one. */
static void test_moe_records_read_back(void **state) {
    (void)state;
    char err[ML_ERRLEN] = "", sql[256];
    Recorder *r = open_ok(":memory:");
    sqlite3 *db = rec_db(r);
    int64_t run = begin_run(r, "top2"), eval_id = 0;
    assert_int_equal(rec_eval(r, run, 40, "val", 300, 2.5, 1e5, 2.0, &eval_id, err), 0);
    assert_int_equal(rec_flush(r, err), 0);

    RecExpertLoad load[] = {{1, 0, 700, 3, 350.5}, {1, 1, 324, 0, NAN}};
    assert_int_equal(rec_expert_load(r, run, -1, 39, load, 2, err), 0);
    load[0].tokens = 150;
    assert_int_equal(rec_expert_load(r, run, eval_id, 40, load, 1, err), 0);
    assert_int_equal(rec_pending_rows(r), 3);
    assert_int_equal(query_int(db, "SELECT count(*) FROM expert_load WHERE eval_id IS NULL"
                                   " AND step=39"), 2);
    assert_int_equal(query_int(db, "SELECT tokens + 10 * dropped FROM expert_load"
                                   " WHERE eval_id IS NULL AND layer=1 AND expert=0"), 730);
    assert_near(query_real(db, "SELECT prob_mass FROM expert_load WHERE eval_id IS NULL"
                               " AND expert=0"), 350.5, 0);
    assert_true(query_is_null(db, "SELECT prob_mass FROM expert_load WHERE expert=1"));
    snprintf(sql, sizeof sql, "SELECT tokens FROM expert_load WHERE eval_id=%lld AND step=40"
             " AND run_id=%lld", (long long)eval_id, (long long)run);
    assert_int_equal(query_int(db, sql), 150);

    enum { N = 150 };
    RecRouting routing[N];
    for (int i = 0; i < N; i++)   /* 75 tokens of layer 3, top-2 */
        routing[i] = (RecRouting){.layer = 3, .seq = i / 50, .pos = (i / 2) % 25,
                                  .token = 100 + i / 2, .rank = i % 2, .expert = i % 7,
                                  .pass = i / 100, .weight = i % 2 ? 0.25f : 0.75f};
    routing[N - 1].weight = NAN;
    assert_int_equal(rec_routing(r, run, eval_id, routing, N, err), 0);
    assert_int_equal(rec_pending_rows(r), 3 + N);
    assert_int_equal(query_int(db, "SELECT count(*) FROM routing"), N);
    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT run_id, eval_id, layer, seq, pos, token,"
                                            " rank, expert, weight, pass FROM routing"
                                            " ORDER BY rowid", -1, &st, NULL), SQLITE_OK);
    for (int i = 0; i < N; i++) {
        assert_int_equal(sqlite3_step(st), SQLITE_ROW);
        const RecRouting *x = &routing[i];
        int64_t expected[] = {run, eval_id, x->layer, x->seq, x->pos, x->token, x->rank,
                              x->expert};
        for (int c = 0; c < 8; c++)
            if (sqlite3_column_int64(st, c) != expected[c])
                fail_msg("routing row %d column %d: %lld, expected %lld", i, c,
                         (long long)sqlite3_column_int64(st, c), (long long)expected[c]);
        assert_int_equal(sqlite3_column_int(st, 9), x->pass);
        if (i == N - 1)
            assert_int_equal(sqlite3_column_type(st, 8), SQLITE_NULL);
        else
            assert_near(sqlite3_column_double(st, 8), x->weight, 0);
    }
    assert_int_equal(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);

    RecTokenStat tokens[] = {{0, 0, 72, 4, 2.5f, 1.5e5, 3}, {0, 1, 101, 3, NAN, 1.25e5, 2}};
    assert_int_equal(rec_token_stats(r, run, eval_id, tokens, 2, err), 0);
    assert_int_equal(query_int(db, "SELECT token * 10 + experts FROM token_stats"
                                   " WHERE seq=0 AND pos=0"), 724);
    assert_near(query_real(db, "SELECT loss FROM token_stats WHERE pos=0"), 2.5, 0);
    assert_near(query_real(db, "SELECT moe_flops FROM token_stats WHERE pos=1"), 1.25e5, 0);
    assert_int_equal(query_int(db, "SELECT sum(passes * (pos + 1)) FROM token_stats"), 7);
    assert_true(query_is_null(db, "SELECT loss FROM token_stats WHERE pos=1"));
    snprintf(sql, sizeof sql, "SELECT count(*) FROM token_stats WHERE run_id=%lld"
             " AND eval_id=%lld", (long long)run, (long long)eval_id);
    assert_int_equal(query_int(db, sql), 2);

    RecSparsity sparsity[] = {{3, 0, 4096, 1024, 0.375}, {3, 1, 0, 0, NAN}};
    assert_int_equal(rec_sparsity(r, run, eval_id, sparsity, 2, err), 0);
    assert_int_equal(rec_sparsity(r, run, -1, sparsity, 1, err), 0);
    snprintf(sql, sizeof sql, "SELECT activations + near_zero FROM sparsity"
             " WHERE eval_id=%lld AND layer=3 AND expert=0", (long long)eval_id);
    assert_int_equal(query_int(db, sql), 5120);
    assert_near(query_real(db, "SELECT mean_abs FROM sparsity WHERE eval_id IS NULL"), 0.375, 0);
    assert_true(query_is_null(db, "SELECT mean_abs FROM sparsity WHERE expert=1"));

    assert_int_equal(rec_pending_rows(r), 3 + N + 2 + 3);
    assert_int_equal(rec_routing(r, run, eval_id, routing, 0, err), 0);   /* a no-op */
    assert_int_equal(rec_flush(r, err), 0);
    assert_int_equal(rec_pending_rows(r), 0);
    assert_int_equal(query_int(db, "SELECT count(*) FROM routing"), N);
    rec_close(r);
}

/* A call that fails leaves nothing of itself behind and says why. */
static void test_moe_records_are_all_or_nothing(void **state) {
    (void)state;
    char err[ML_ERRLEN] = "";
    Recorder *r = open_ok(":memory:");
    sqlite3 *db = rec_db(r);
    int64_t run = begin_run(r, "a"), other = begin_run(r, "b"), eval_id = 0, other_eval = 0;
    assert_int_equal(rec_eval(r, run, 1, "val", 10, 2.0, NAN, NAN, &eval_id, err), 0);
    assert_int_equal(rec_eval(r, other, 1, "val", 10, 2.0, NAN, NAN, &other_eval, err), 0);
    RecTokenStat tokens[100];
    for (int i = 0; i < 100; i++)
        tokens[i] = (RecTokenStat){.seq = 0, .pos = i, .token = i, .experts = 2, .loss = 1.0f};
    assert_int_equal(rec_token_stats(r, run, eval_id, tokens, 10, err), 0);
    int64_t pending = rec_pending_rows(r);

    tokens[90].pos = 95;   /* a token recorded twice, 80 rows into the call */
    assert_int_equal(rec_token_stats(r, run, eval_id, tokens + 10, 90, err), -1);
    assert_non_null(strstr(err, "UNIQUE"));
    assert_non_null(strstr(err, "token_stats"));
    assert_int_equal(query_int(db, "SELECT count(*) FROM token_stats"), 10);
    assert_int_equal(rec_pending_rows(r), pending);

    RecRouting routing = {.layer = 0, .expert = 1, .weight = 1.0f};
    assert_int_equal(rec_routing(r, run, -1, &routing, 1, err), -1);
    assert_non_null(strstr(err, "evaluation"));
    assert_int_equal(rec_routing(r, run, other_eval, &routing, 1, err), -1);
    assert_non_null(strstr(err, "belongs to run"));
    assert_int_equal(rec_routing(r, run, other_eval + 40, &routing, 1, err), -1);
    assert_non_null(strstr(err, "no evaluation with id"));
    assert_int_equal(rec_routing(r, run, eval_id, NULL, 3, err), -1);
    RecExpertLoad load = {0, 0, 1, 0, 1.0};
    assert_int_equal(rec_expert_load(r, run + 40, -1, 1, &load, 1, err), -1);
    assert_non_null(strstr(err, "FOREIGN KEY"));
    assert_int_equal(rec_sparsity(r, other, eval_id, &(RecSparsity){0, 0, 1, 0, 0}, 1, err), -1);
    assert_non_null(strstr(err, "belongs to run"));
    assert_int_equal(query_int(db, "SELECT (SELECT count(*) FROM routing)"
                                   " + (SELECT count(*) FROM expert_load)"
                                   " + (SELECT count(*) FROM sparsity)"), 0);
    assert_int_equal(rec_pending_rows(r), pending);

    /* and the transaction goes on */
    assert_int_equal(rec_token_stats(r, run, eval_id, tokens + 10, 10, err), 0);
    assert_int_equal(rec_flush(r, err), 0);
    assert_int_equal(query_int(db, "SELECT count(*) FROM token_stats"), 20);
    rec_close(r);
}

/* routing and token_stats have no foreign keys; a trigger cascades instead. */
static void test_deleting_a_run_deletes_its_records(void **state) {
    (void)state;
    char err[ML_ERRLEN] = "";
    Recorder *r = open_ok(":memory:");
    sqlite3 *db = rec_db(r);
    int64_t runs[2], evals[2];
    for (int i = 0; i < 2; i++) {
        runs[i] = begin_run(r, i ? "keep" : "drop");
        assert_int_equal(rec_eval(r, runs[i], 5, "val", 2, 1.0, NAN, NAN, &evals[i], err), 0);
        RecRouting routing[] = {{0, 0, 0, 1, 0, 2, 0, 1.0f}, {0, 0, 1, 2, 0, 3, 0, 1.0f}};
        RecTokenStat tokens[] = {{0, 0, 1, 1, 1.0f, 0, 1}, {0, 1, 2, 1, 1.0f, 0, 1}};
        RecExpertLoad load[] = {{0, 2, 1, 0, 0.5}, {0, 3, 1, 0, 0.5}};
        RecSparsity sparsity[] = {{0, 2, 8, 4, 0.5}};
        assert_int_equal(rec_routing(r, runs[i], evals[i], routing, 2, err), 0);
        assert_int_equal(rec_token_stats(r, runs[i], evals[i], tokens, 2, err), 0);
        assert_int_equal(rec_expert_load(r, runs[i], evals[i], 5, load, 2, err), 0);
        assert_int_equal(rec_expert_load(r, runs[i], -1, 5, load, 2, err), 0);
        assert_int_equal(rec_sparsity(r, runs[i], evals[i], sparsity, 1, err), 0);
    }
    assert_int_equal(rec_flush(r, err), 0);
    exec_sql(db, "DELETE FROM runs WHERE name = 'drop'");
    static const char *tables[] = {"routing", "token_stats", "expert_load", "sparsity", "evals"};
    for (size_t t = 0; t < sizeof tables / sizeof *tables; t++) {
        char sql[160];
        snprintf(sql, sizeof sql, "SELECT count(*) FROM %s WHERE run_id = %lld", tables[t],
                 (long long)runs[0]);
        if (query_int(db, sql) != 0)
            fail_msg("%s still has rows of the deleted run", tables[t]);
        snprintf(sql, sizeof sql, "SELECT count(*) > 0 FROM %s WHERE run_id = %lld", tables[t],
                 (long long)runs[1]);
        if (query_int(db, sql) != 1)
            fail_msg("%s lost the rows of the other run", tables[t]);
    }
    rec_close(r);
}

/* ---- views ------------------------------------------------------------ */

static void test_views_compute_the_documented_numbers(void **state) {
    (void)state;
    char err[ML_ERRLEN] = "";
    Recorder *r = open_ok(":memory:");
    sqlite3 *db = rec_db(r);
    int64_t run = begin_run(r, "moe");
    int64_t e1 = 0, e2 = 0;
    assert_int_equal(rec_eval(r, run, 10, "val", 3, 4.0, NAN, NAN, &e1, err), 0);
    assert_int_equal(rec_eval(r, run, 20, "val", 4, 3.5, NAN, NAN, &e2, err), 0);
    assert_int_equal(run, 1);
    assert_int_equal(e1, 1);
    assert_int_equal(e2, 2);
    /* training step 10: layer 0 kept {10, 30}, dropped {0, 2}; layer 1 {20, 20} */
    static const RecExpertLoad step_load[] = {
        {0, 0, 10, 0, 0.3}, {0, 1, 30, 2, 0.7}, {1, 0, 20, 0, 0.5}, {1, 1, 20, 0, 0.5},
    };
    /* evaluation 1: layer 0 kept {5, 15}, dropped {1, 1} */
    static const RecExpertLoad eval_load[] = {{0, 0, 5, 1, 0.2}, {0, 1, 15, 1, 0.8}};
    /* eval 1, layer 0: token (0,0) two experts, (0,1) one, (0,2) three (two
    ** in pass 0, one in pass 1); layer 1: one each.
    ** {layer, seq, pos, token, rank, expert, pass, weight} */
    static const RecRouting routing[] = {
        {0, 0, 0, 65, 0, 1, 0, 0.6f}, {0, 0, 0, 65, 1, 0, 0, 0.4f},
        {0, 0, 1, 66, 0, 0, 0, 1.0f},
        {0, 0, 2, 67, 0, 1, 0, 0.7f}, {0, 0, 2, 67, 1, 0, 0, 0.3f},
        {0, 0, 2, 67, 0, 1, 1, 1.0f},
        {1, 0, 0, 65, 0, 0, 0, 1.0f}, {1, 0, 1, 66, 0, 1, 0, 1.0f},
        {1, 0, 2, 67, 0, 1, 0, 1.0f},
    };
    /* eval 2: the same layer-0 routing, but token_stats knows a fourth token
    ** that no expert took. {seq, pos, token, experts, loss, moe_flops, passes} */
    static const RecTokenStat tokens[] = {
        {0, 0, 65, 2, 1.0f, 0, 1}, {0, 1, 66, 1, 1.0f, 0, 1}, {0, 2, 67, 3, 1.0f, 0, 1},
        {0, 3, 68, 0, 1.0f, 0, 1},
    };
    assert_int_equal(rec_expert_load(r, run, -1, 10, step_load, 4, err), 0);
    assert_int_equal(rec_expert_load(r, run, e1, 10, eval_load, 2, err), 0);
    assert_int_equal(rec_routing(r, run, e1, routing, 9, err), 0);
    assert_int_equal(rec_routing(r, run, e2, routing, 6, err), 0);
    assert_int_equal(rec_token_stats(r, run, e2, tokens, 4, err), 0);
    assert_int_equal(rec_flush(r, err), 0);

    assert_near(query_real(db, "SELECT experts_per_token FROM v_experts_per_token"
                                       " WHERE eval_id=1 AND layer=0"), 2.0, 1e-12);
    assert_int_equal(query_int(db, "SELECT tokens FROM v_experts_per_token"
                                   " WHERE eval_id=1 AND layer=0"), 3);
    assert_near(query_real(db, "SELECT experts_per_token FROM v_experts_per_token"
                                       " WHERE eval_id=1 AND layer=1"), 1.0, 1e-12);
    assert_near(query_real(db, "SELECT experts_per_token FROM v_experts_per_token"
                                       " WHERE eval_id=2 AND layer=0"), 1.5, 1e-12);

    /* {10, 30}: mean 20, population std 10 */
    assert_near(query_real(db, "SELECT cv FROM v_load_cv"
                                       " WHERE eval_id IS NULL AND step=10 AND layer=0"), 0.5, 1e-12);
    assert_near(query_real(db, "SELECT cv2 FROM v_load_cv"
                                       " WHERE eval_id IS NULL AND step=10 AND layer=0"), 0.25, 1e-12);
    assert_near(query_real(db, "SELECT cv FROM v_load_cv"
                                       " WHERE eval_id IS NULL AND step=10 AND layer=1"), 0.0, 1e-12);
    assert_near(query_real(db, "SELECT cv FROM v_load_cv WHERE eval_id=1 AND layer=0"),
                        0.5, 1e-12);
    assert_int_equal(query_int(db, "SELECT count(*) FROM v_load_cv"), 3);

    /* layer 0: kept 10+30+5+15 = 60, dropped 0+2+1+1 = 4 */
    assert_near(query_real(db, "SELECT dropped_fraction FROM v_dropped_fraction"
                                       " WHERE run_id=1 AND layer=0"), 4.0 / 64.0, 1e-12);
    assert_near(query_real(db, "SELECT train_dropped_fraction FROM v_dropped_fraction"
                                       " WHERE layer=0"), 2.0 / 42.0, 1e-12);
    assert_near(query_real(db, "SELECT eval_dropped_fraction FROM v_dropped_fraction"
                                       " WHERE layer=0"), 2.0 / 22.0, 1e-12);
    assert_near(query_real(db, "SELECT dropped_fraction FROM v_dropped_fraction"
                                       " WHERE layer=1"), 0.0, 1e-12);

    assert_int_equal(query_int(db, "SELECT tokens FROM v_layer_load WHERE layer=0 AND expert=0"), 15);
    assert_near(query_real(db, "SELECT share FROM v_layer_load WHERE layer=0 AND expert=0"),
                        0.25, 1e-12);
    assert_near(query_real(db, "SELECT share FROM v_layer_load WHERE layer=0 AND expert=1"),
                        0.75, 1e-12);
    assert_near(query_real(db, "SELECT share FROM v_layer_load WHERE layer=1 AND expert=1"),
                        0.5, 1e-12);
    rec_close(r);
}

/* v_routing_stability compares each probe with the probe just before it: a
** token whose first choice was dropped there (its rank 1 kept, no rank 0) is
** left out of the next probe's share, not compared with an older probe. */
static void test_routing_stability_compares_consecutive_probes(void **state) {
    (void)state;
    char err[ML_ERRLEN] = "";
    Recorder *r = open_ok(":memory:");
    sqlite3 *db = rec_db(r);
    int64_t run = begin_run(r, "moe");
    int64_t probe[3];
    /* position 0: first choice 1, then dropped (only its second choice, 0,
    ** kept), then 2; position 1: first choice 0, 0, then 1.
    ** {layer, seq, pos, token, rank, expert, pass, weight} */
    static const RecRouting routing[3][2] = {
        {{0, 0, 0, 65, 0, 1, 0, 0.6f}, {0, 0, 1, 66, 0, 0, 0, 0.6f}},
        {{0, 0, 0, 65, 1, 0, 0, 0.4f}, {0, 0, 1, 66, 0, 0, 0, 0.6f}},
        {{0, 0, 0, 65, 0, 2, 0, 0.6f}, {0, 0, 1, 66, 0, 1, 0, 0.6f}},
    };
    for (int i = 0; i < 3; i++) {
        assert_int_equal(rec_eval(r, run, 10 * i, "probe", 2, 1.0, 0.0, 1.0, &probe[i], err), 0);
        assert_int_equal(rec_routing(r, run, probe[i], routing[i], 2, err), 0);
    }
    assert_int_equal(rec_flush(r, err), 0);
    assert_int_equal(query_int(db, "SELECT count(*) FROM v_routing_stability"), 2);
    /* probe 2 against 1: position 1 alone, unchanged */
    assert_int_equal(query_int(db, "SELECT tokens FROM v_routing_stability WHERE step = 10"), 1);
    assert_near(query_real(db, "SELECT changed FROM v_routing_stability WHERE step = 10"), 0.0,
                1e-12);
    /* probe 3 against 2: position 1 alone (position 0 had no first choice in
    ** probe 2), changed */
    assert_int_equal(query_int(db, "SELECT tokens FROM v_routing_stability WHERE step = 20"), 1);
    assert_near(query_real(db, "SELECT changed FROM v_routing_stability WHERE step = 20"), 1.0,
                1e-12);
    rec_close(r);
}

/* ---- files ------------------------------------------------------------ */

static void test_flushed_rows_survive_close_and_reopen(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "runs.db");
    Recorder *r = open_ok(path);
    int64_t run = begin_run(r, "a");
    for (int i = 0; i < 100; i++)
        assert_int_equal(rec_metric(r, run, i, "train", 3.0, NAN, 1e-3, i * 64, NAN, 1, NAN, NULL, err), 0);
    assert_int_equal(rec_flush(r, err), 0);
    for (int i = 100; i < 110; i++)     /* committed by the close */
        assert_int_equal(rec_metric(r, run, i, "train", 3.0, NAN, 1e-3, i * 64, NAN, 1, NAN, NULL, err), 0);
    rec_close(r);

    r = open_ok(path);
    assert_int_equal(query_int(rec_db(r), "SELECT count(*) FROM metrics"), 110);
    assert_int_equal(query_int(rec_db(r), "PRAGMA user_version"), REC_SCHEMA_VERSION);
    char mode[16];
    query_text(rec_db(r), "PRAGMA journal_mode", mode, sizeof mode);
    assert_string_equal(mode, "wal");
    int64_t second = begin_run(r, "b");   /* one file, any number of runs */
    assert_int_equal(second, run + 1);
    rec_close(r);
}

/* More routing rows than the page cache holds, into a file, in one
** transaction: they spill to the WAL and all arrive. */
static void test_large_routing_batch_reaches_the_file(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "big.db");
    Recorder *r = open_ok(path);
    int64_t run = begin_run(r, "big"), eval_id = 0;
    assert_int_equal(rec_eval(r, run, 1, "val", 0, 1.0, NAN, NAN, &eval_id, err), 0);
    enum { N = 200000, CHUNK = 4096 };
    RecRouting *rows = malloc(N * sizeof *rows);
    assert_non_null(rows);
    for (int i = 0; i < N; i++)
        rows[i] = (RecRouting){.layer = i / (N / 2), .seq = (i % (N / 2)) / 256,
                               .pos = (i / 2) % 128, .token = i % 256, .rank = i % 2,
                               .expert = i % 8, .weight = 0.5f};
    for (int i = 0; i < N; i += CHUNK)
        assert_int_equal(rec_routing(r, run, eval_id, rows + i, N - i < CHUNK ? N - i : CHUNK,
                                     err), 0);
    free(rows);
    assert_int_equal(rec_pending_rows(r), N + 1);
    assert_int_equal(rec_flush(r, err), 0);
    rec_close(r);

    assert_int_equal(rec_open_readonly(&r, path, err), 0);
    sqlite3 *db = rec_db(r);
    assert_int_equal(query_int(db, "SELECT count(*) FROM routing"), N);
    assert_int_equal(query_int(db, "SELECT sum(expert) FROM routing"), (int64_t)N / 8 * 28);
    assert_int_equal(query_int(db, "SELECT count(*) FROM routing WHERE layer = 1 AND rank = 1"),
                     N / 4);
    assert_int_equal(query_int(db, "PRAGMA page_size"), 16384);
    rec_close(r);
}

/* A commit that fills the WAL past 1000 pages leaves the copy back into the
** database to the recorder's checkpoint thread: the database file grows to
** hold the rows before the recorder is closed, the WAL is reused rather than
** grown by the next commit, commits back to back do not grow it without
** bound, and every row is there after a reopen. */
static void test_full_wal_is_checkpointed_in_the_background(void **state) {
    char path[512], wal[520], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "wal.db");
    snprintf(wal, sizeof wal, "%s-wal", path);
    Recorder *r = open_ok(path);
    int64_t run = begin_run(r, "wal"), eval_id = 0;
    assert_int_equal(rec_eval(r, run, 1, "val", 0, 1.0, NAN, NAN, &eval_id, err), 0);
    enum { N = 700000, CHUNK = 8192 };
    RecRouting *rows = malloc(N * sizeof *rows);
    assert_non_null(rows);
    for (int i = 0; i < N; i++)
        rows[i] = (RecRouting){.layer = i % 4, .seq = i / 512, .pos = i % 128, .token = i % 256,
                               .rank = i % 2, .expert = i % 8, .weight = 0.5f};
    for (int i = 0; i < N; i += CHUNK)
        assert_int_equal(rec_routing(r, run, eval_id, rows + i, N - i < CHUNK ? N - i : CHUNK,
                                     err), 0);
    assert_int_equal(rec_background_checkpoints(r), 0);
    assert_int_equal(rec_flush(r, err), 0);
    struct stat st;
    assert_int_equal(stat(wal, &st), 0);
    off_t wal_size = st.st_size;
    assert_true(wal_size > 1000 * 16384);
    /* the thread may wait for a core and for the disk: up to 30 s */
    for (int i = 0; i < 3000 && rec_background_checkpoints(r) == 0; i++) usleep(10000);
    assert_int_equal(rec_background_checkpoints(r), 1);
    assert_int_equal(stat(path, &st), 0);
    assert_true(st.st_size > 1000 * 16384);
    /* a checkpointed WAL is written again from its start */
    for (int i = 0; i < N; i += CHUNK)
        assert_int_equal(rec_routing(r, run, eval_id, rows + i, N - i < CHUNK ? N - i : CHUNK,
                                     err), 0);
    assert_int_equal(rec_flush(r, err), 0);
    assert_int_equal(stat(wal, &st), 0);
    assert_true(st.st_size <= wal_size + 16 * 16384);
    /* Commits back to back, each transaction beginning before the thread has
    ** copied the last one, cannot reuse the WAL; at 4000 pages the commit
    ** finishes the copy itself, so the WAL stops growing there. */
    for (int k = 0; k < 4; k++) {
        for (int i = 0; i < N; i += CHUNK)
            assert_int_equal(rec_routing(r, run, eval_id, rows + i,
                                         N - i < CHUNK ? N - i : CHUNK, err), 0);
        assert_int_equal(rec_flush(r, err), 0);
    }
    assert_int_equal(stat(wal, &st), 0);
    assert_true(st.st_size < (off_t)(4000 + 1400) * 16384);
    free(rows);
    rec_close(r);

    assert_int_equal(rec_open_readonly(&r, path, err), 0);
    assert_int_equal(query_int(rec_db(r), "SELECT count(*) FROM routing"), 6 * N);
    assert_int_equal(query_int(rec_db(r), "SELECT sum(expert) FROM routing"), 6 * (N / 8) * 28);
    rec_close(r);
}

/* The bulk path (one INSERT ... SELECT from the row source per call) stores
** exactly the rows given, in order: every value, NULL for a NaN weight or
** loss, the count; n = 0 stores nothing; 200,000 rows in one call. Rows of
** several layers, passes and evaluations in one call, out of table order. */
static void test_bulk_path_stores_exactly_the_rows(void **state) {
    (void)state;
    char err[ML_ERRLEN] = "";
    Recorder *r = open_ok(":memory:");
    sqlite3 *db = rec_db(r);
    int64_t run = begin_run(r, "bulk"), eval_id = 0;
    assert_int_equal(rec_eval(r, run, 3, "val", 0, 1.0, NAN, NAN, &eval_id, err), 0);
    enum { N = 200000 };
    RecRouting *rows = malloc(N * sizeof *rows);
    RecTokenStat *tokens = malloc(N * sizeof *tokens);
    assert_non_null(rows);
    assert_non_null(tokens);
    for (int i = 0; i < N; i++) {
        unsigned h = (unsigned)i * 2654435761u;
        rows[i] = (RecRouting){.layer = (int)(h >> 28), .seq = N - i, .pos = (int)(h % 1024),
                               .token = (int)(h >> 8) - 8000000, .rank = i % 3,
                               .expert = (int)(h >> 16) % 64, .pass = i % 5 == 0,
                               .weight = i % 7 == 0 ? NAN : (float)(h % 1000) / 997.0f};
        tokens[i] = (RecTokenStat){.seq = i / 256, .pos = i % 256, .token = (int)(h >> 20),
                                   .experts = i % 9, .loss = i % 11 == 0 ? NAN : 0.001f * i,
                                   .moe_flops = i % 13 == 0 ? NAN : 1e3 * i + 0.5};
    }
    assert_int_equal(rec_routing(r, run, eval_id, rows, 0, err), 0);
    assert_int_equal(rec_token_stats(r, run, eval_id, tokens, 0, err), 0);
    assert_int_equal(rec_pending_rows(r), 1);
    assert_int_equal(query_int(db, "SELECT (SELECT count(*) FROM routing)"
                                   " + (SELECT count(*) FROM token_stats)"), 0);

    assert_int_equal(rec_routing(r, run, eval_id, rows, N, err), 0);
    assert_int_equal(rec_token_stats(r, run, eval_id, tokens, N, err), 0);
    assert_int_equal(rec_pending_rows(r), 1 + 2 * (int64_t)N);
    assert_int_equal(rec_flush(r, err), 0);
    assert_int_equal(query_int(db, "SELECT count(*) FROM routing"), N);
    assert_int_equal(query_int(db, "SELECT count(*) FROM token_stats"), N);
    assert_int_equal(query_int(db, "SELECT count(*) FROM routing WHERE weight IS NULL"),
                     (N + 6) / 7);

    sqlite3_stmt *st = NULL;
    assert_int_equal(sqlite3_prepare_v2(db, "SELECT run_id, eval_id, layer, seq, pos, token,"
                                            " rank, expert, pass, weight FROM routing"
                                            " ORDER BY rowid", -1, &st, NULL), SQLITE_OK);
    for (int i = 0; i < N; i++) {
        assert_int_equal(sqlite3_step(st), SQLITE_ROW);
        const RecRouting *x = &rows[i];
        int64_t expected[] = {run, eval_id, x->layer, x->seq, x->pos, x->token, x->rank,
                              x->expert, x->pass};
        for (int c = 0; c < 9; c++)
            if (sqlite3_column_type(st, c) != SQLITE_INTEGER
                || sqlite3_column_int64(st, c) != expected[c])
                fail_msg("routing row %d column %d: %lld, expected %lld", i, c,
                         (long long)sqlite3_column_int64(st, c), (long long)expected[c]);
        if (isnan(x->weight) ? sqlite3_column_type(st, 9) != SQLITE_NULL
                             : sqlite3_column_double(st, 9) != (double)x->weight)
            fail_msg("routing row %d: weight %.9g, expected %.9g", i,
                     sqlite3_column_double(st, 9), (double)x->weight);
    }
    assert_int_equal(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);

    assert_int_equal(sqlite3_prepare_v2(db, "SELECT run_id, eval_id, seq, pos, token, experts,"
                                            " loss, moe_flops FROM token_stats"
                                            " ORDER BY seq, pos", -1, &st, NULL), SQLITE_OK);
    for (int i = 0; i < N; i++) {
        assert_int_equal(sqlite3_step(st), SQLITE_ROW);
        const RecTokenStat *x = &tokens[i];
        int64_t expected[] = {run, eval_id, x->seq, x->pos, x->token, x->experts};
        for (int c = 0; c < 6; c++)
            if (sqlite3_column_int64(st, c) != expected[c])
                fail_msg("token_stats row %d column %d: %lld, expected %lld", i, c,
                         (long long)sqlite3_column_int64(st, c), (long long)expected[c]);
        double reals[] = {x->loss, x->moe_flops};
        for (int c = 0; c < 2; c++)
            if (isnan(reals[c]) ? sqlite3_column_type(st, 6 + c) != SQLITE_NULL
                                : sqlite3_column_double(st, 6 + c) != reals[c])
                fail_msg("token_stats row %d column %d: %.17g, expected %.17g", i, 6 + c,
                         sqlite3_column_double(st, 6 + c), reals[c]);
    }
    assert_int_equal(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);

    /* Plain SQL cannot hand the row sources an array: they read as empty,
    ** and schema objects cannot use them at all. */
    assert_int_equal(query_int(db, "SELECT count(*) FROM moelab_routing_rows(NULL, 5)"), 0);
    assert_int_equal(query_int(db, "SELECT count(*) FROM moelab_token_stats_rows(x'00', 5)"),
                     0);
    assert_int_not_equal(sqlite3_exec(db, "CREATE VIEW v AS SELECT * FROM moelab_routing_rows"
                                          "(1, 1); SELECT * FROM v", NULL, NULL, NULL),
                         SQLITE_OK);
    free(rows);
    free(tokens);
    rec_close(r);
}

/* A database of schema version 1 (routing and token_stats WITHOUT ROWID,
** with foreign keys) is upgraded in place, its rows kept. */
static void test_version_1_database_is_upgraded(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "v1.db");
    Recorder *r = open_ok(path);
    int64_t run = begin_run(r, "old"), eval_id = 0;
    assert_int_equal(rec_eval(r, run, 1, "val", 0, 1.0, NAN, NAN, &eval_id, err), 0);
    assert_int_equal(rec_flush(r, err), 0);
    exec_sql(rec_db(r),
        "DROP TRIGGER evals_delete_records; DROP VIEW v_experts_per_token;"
        "DROP VIEW v_routing_stability;" /* schema 5, reads evals.routing_first */
        "DROP TABLE routing; DROP TABLE token_stats;"
        "ALTER TABLE metrics DROP COLUMN aux_entropy;"
        "ALTER TABLE evals DROP COLUMN routing_first;"
        "ALTER TABLE evals DROP COLUMN routing_last;"
        "CREATE TABLE routing(\n"
        "  run_id  INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,\n"
        "  eval_id INTEGER NOT NULL REFERENCES evals(eval_id) ON DELETE CASCADE,\n"
        "  layer INTEGER NOT NULL, seq INTEGER NOT NULL, pos INTEGER NOT NULL, token INTEGER,\n"
        "  rank INTEGER NOT NULL, expert INTEGER NOT NULL, weight REAL,\n"
        "  pass INTEGER NOT NULL DEFAULT 0,\n"
        "  PRIMARY KEY (run_id, eval_id, layer, seq, pos, pass, rank)) WITHOUT ROWID;\n"
        "CREATE INDEX routing_by_eval ON routing(eval_id);\n"
        "CREATE TABLE token_stats(\n"
        "  run_id INTEGER NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,\n"
        "  eval_id INTEGER NOT NULL REFERENCES evals(eval_id) ON DELETE CASCADE,\n"
        "  seq INTEGER NOT NULL, pos INTEGER NOT NULL, token INTEGER, loss REAL,\n"
        "  experts INTEGER, moe_flops REAL,\n"
        "  PRIMARY KEY (run_id, eval_id, seq, pos)) WITHOUT ROWID;\n"
        "CREATE INDEX token_stats_by_eval ON token_stats(eval_id);\n"
        "CREATE VIEW v_experts_per_token AS SELECT 1 AS stale;\n"
        "INSERT INTO routing VALUES (1, 1, 0, 0, 0, 65, 0, 3, 0.5, 0),"
        "                           (1, 1, 0, 0, 0, 65, 1, 5, 0.5, 0);\n"
        "INSERT INTO token_stats VALUES (1, 1, 0, 0, 65, 2.25, 2, 100.0);\n"
        "PRAGMA user_version = 1;");
    rec_close(r);

    r = open_ok(path);
    sqlite3 *db = rec_db(r);
    assert_int_equal(query_int(db, "PRAGMA user_version"), REC_SCHEMA_VERSION);
    assert_int_equal(query_int(db, "SELECT count(*) FROM sqlite_schema WHERE name IN"
                                   " ('routing', 'token_stats') AND sql LIKE '%REFERENCES%'"), 0);
    assert_int_equal(query_int(db, "SELECT count(*) FROM sqlite_schema WHERE name LIKE '%_v1'"), 0);
    assert_int_equal(query_int(db, "SELECT sum(expert) FROM routing WHERE eval_id = 1"), 8);
    assert_near(query_real(db, "SELECT loss FROM token_stats WHERE eval_id = 1"), 2.25, 0);
    assert_near(query_real(db, "SELECT experts_per_token FROM v_experts_per_token"), 2.0, 0);
    RecRouting more = {.layer = 1, .expert = 2, .weight = 1.0f};
    assert_int_equal(rec_routing(r, run, eval_id, &more, 1, err), 0);
    assert_int_equal(rec_flush(r, err), 0);
    exec_sql(db, "DELETE FROM runs");
    assert_int_equal(query_int(db, "SELECT count(*) FROM routing"), 0);
    assert_int_equal(query_int(db, "SELECT count(*) FROM token_stats"), 0);
    rec_close(r);
}

/* A database of schema version 2 (an index on routing(eval_id), no rowid
** ranges in evals) gets the ranges of its evaluations' rows and loses the
** index; deleting an evaluation still deletes its rows, and only those. */
static void test_version_2_database_is_upgraded(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "v2.db");
    Recorder *r = open_ok(path);
    int64_t run = begin_run(r, "old"), e1 = 0, e2 = 0;
    assert_int_equal(rec_eval(r, run, 1, "val", 0, 1.0, NAN, NAN, &e1, err), 0);
    assert_int_equal(rec_eval(r, run, 2, "val", 0, 1.0, NAN, NAN, &e2, err), 0);
    RecRouting rows[3] = {{.expert = 1}, {.expert = 2, .rank = 1}, {.pos = 1, .expert = 3}};
    assert_int_equal(rec_routing(r, run, e1, rows, 3, err), 0);
    assert_int_equal(rec_routing(r, run, e2, rows, 2, err), 0);
    assert_int_equal(rec_flush(r, err), 0);
    exec_sql(rec_db(r),
        "DROP TRIGGER evals_delete_records; DROP VIEW v_experts_per_token;"
        "DROP VIEW v_routing_stability;" /* schema 5, reads evals.routing_first */
        "CREATE TABLE routing_old(run_id INTEGER NOT NULL, eval_id INTEGER NOT NULL,"
        "  layer INTEGER NOT NULL, seq INTEGER NOT NULL, pos INTEGER NOT NULL, token INTEGER,"
        "  rank INTEGER NOT NULL, expert INTEGER NOT NULL, weight REAL,"
        "  pass INTEGER NOT NULL DEFAULT 0);"
        "INSERT INTO routing_old SELECT run_id, eval_id, layer, seq, pos, token, rank, expert,"
        "  weight, pass FROM routing ORDER BY routing_id;"
        "DROP TABLE routing; ALTER TABLE routing_old RENAME TO routing;"
        "ALTER TABLE metrics DROP COLUMN aux_entropy;"
        "ALTER TABLE token_stats DROP COLUMN passes;"
        "ALTER TABLE evals DROP COLUMN routing_first;"
        "ALTER TABLE evals DROP COLUMN routing_last;"
        "CREATE INDEX routing_by_eval ON routing(eval_id);"
        "CREATE VIEW v_experts_per_token AS SELECT 1 AS stale;"
        "CREATE TRIGGER evals_delete_records AFTER DELETE ON evals BEGIN\n"
        "  DELETE FROM routing WHERE eval_id = old.eval_id;\n"
        "  DELETE FROM token_stats WHERE eval_id = old.eval_id;\n"
        "END;"
        "PRAGMA user_version = 2;");
    rec_close(r);

    /* reading it needs the upgrade first, and says so */
    assert_int_equal(rec_open_readonly(&r, path, err), -1);
    assert_null(r);
    assert_non_null(strstr(err, "open it for writing once"));
    r = open_ok(path);
    sqlite3 *db = rec_db(r);
    assert_int_equal(query_int(db, "PRAGMA user_version"), REC_SCHEMA_VERSION);
    assert_int_equal(query_int(db, "SELECT count(*) FROM sqlite_schema WHERE name = 'routing_by_eval'"), 0);
    assert_int_equal(query_int(db, "SELECT routing_last - routing_first FROM evals WHERE eval_id = 1"), 2);
    assert_int_equal(query_int(db, "SELECT routing_last - routing_first FROM evals WHERE eval_id = 2"), 1);
    assert_near(query_real(db, "SELECT experts_per_token FROM v_experts_per_token WHERE eval_id = 1"),
                1.5, 1e-12);
    exec_sql(db, "DELETE FROM evals WHERE eval_id = 1");
    assert_int_equal(query_int(db, "SELECT count(*) FROM routing"), 2);
    assert_int_equal(query_int(db, "SELECT count(*) FROM routing WHERE eval_id = 2"), 2);
    rec_close(r);
}

/* Someone else's SQLite file (tables of its own, no moelab schema) is refused,
** naming its tables, and left as it was (no WAL, no new tables); adopting it
** adds moelab's tables beside its own. An empty file is simply created. */
static void test_foreign_database_is_refused(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "notes.db");
    sqlite3 *db;
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    exec_sql(db, "CREATE TABLE notes(id INTEGER PRIMARY KEY, text TEXT);"
                 "INSERT INTO notes(text) VALUES ('keep me');");
    sqlite3_close(db);
    Recorder *r = NULL;
    assert_int_equal(rec_open(&r, path, err), -1);
    assert_null(r);
    assert_non_null(strstr(err, "not a moelab database"));
    assert_non_null(strstr(err, "notes"));
    assert_non_null(strstr(err, "adopt = true"));
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    assert_int_equal(query_int(db, "SELECT count(*) FROM sqlite_schema"), 1);
    char mode[32];
    sqlite3_stmt *st;
    assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    snprintf(mode, sizeof mode, "%s", (const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    assert_string_equal(mode, "delete");
    sqlite3_close(db);
    assert_int_equal(rec_open_adopting(&r, path, err), 0);
    assert_int_equal(query_int(rec_db(r), "SELECT count(*) FROM notes"), 1);
    assert_int_equal(query_int(rec_db(r), "PRAGMA user_version"), REC_SCHEMA_VERSION);
    rec_close(r);
    /* adopted once, it is a moelab database: a plain open works */
    assert_int_equal(rec_open(&r, path, err), 0);
    rec_close(r);
}

/* A database of schema version 3 gains runs.causal, metrics.aux_entropy and
** token_stats.passes, its rows kept (NULL in the new columns), and
** v_final_loss with causal. */
static void test_version_3_database_is_upgraded(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "v3.db");
    Recorder *r = open_ok(path);
    int64_t run = begin_run(r, "old"), eval_id = 0;
    RecAux aux = {.balance = 1.5, .z = NAN, .cv2 = NAN, .p_penalty = NAN, .entropy = NAN};
    assert_int_equal(rec_metric(r, run, 1, "train", 2.0, 0.1, 1e-3, 100, NAN, 1.0, NAN, &aux, err), 0);
    assert_int_equal(rec_eval(r, run, 1, "val", 0, 1.0, NAN, NAN, &eval_id, err), 0);
    RecTokenStat tok = {.seq = 0, .pos = 0, .token = 65, .experts = 2, .loss = 1.5f};
    assert_int_equal(rec_token_stats(r, run, eval_id, &tok, 1, err), 0);
    assert_int_equal(rec_flush(r, err), 0);
    exec_sql(rec_db(r), "DROP VIEW v_final_loss;"
                        "CREATE VIEW v_final_loss AS SELECT run_id, name FROM runs;"
                        "ALTER TABLE runs DROP COLUMN causal;"
                        "ALTER TABLE evals DROP COLUMN topk_flops_per_token;"
                        "ALTER TABLE metrics DROP COLUMN aux_entropy;"
                        "ALTER TABLE token_stats DROP COLUMN passes;"
                        "PRAGMA user_version = 3;");
    rec_close(r);
    r = open_ok(path);
    sqlite3 *db = rec_db(r);
    assert_int_equal(query_int(db, "PRAGMA user_version"), REC_SCHEMA_VERSION);
    assert_near(query_real(db, "SELECT aux_balance FROM metrics"), 1.5, 0);
    assert_true(query_is_null(db, "SELECT aux_entropy FROM metrics"));
    assert_true(query_is_null(db, "SELECT passes FROM token_stats"));
    assert_near(query_real(db, "SELECT loss FROM token_stats"), 1.5, 0);
    assert_true(query_is_null(db, "SELECT causal FROM v_final_loss"));
    assert_true(query_is_null(db, "SELECT topk_flops_per_token FROM evals"));
    int64_t later = 0;
    assert_int_equal(rec_run_begin(r, "new", NULL, NULL, 1, 0, 0, 0, &later, err), 0);
    assert_int_equal(query_int(db, "SELECT causal FROM v_final_loss WHERE name = 'new'"), 0);
    aux.entropy = 0.25;
    assert_int_equal(rec_metric(r, run, 2, "train", 2.0, 0.1, 1e-3, 200, NAN, 1.0, NAN, &aux, err), 0);
    assert_int_equal(rec_flush(r, err), 0);
    assert_near(query_real(db, "SELECT aux_entropy FROM metrics WHERE step = 2"), 0.25, 0);
    rec_close(r);
}

/* evals.routing_first/last hold every routing row of the evaluation even when
** two evaluations' rows interleave, and deleting one leaves the other's. */
static void test_routing_ranges_cover_interleaved_evaluations(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "ranges.db");
    Recorder *r = open_ok(path);
    int64_t run = begin_run(r, "ranges"), e1 = 0, e2 = 0;
    assert_int_equal(rec_eval(r, run, 1, "val", 0, 1.0, NAN, NAN, &e1, err), 0);
    assert_int_equal(rec_eval(r, run, 2, "val", 0, 1.0, NAN, NAN, &e2, err), 0);
    RecRouting rows[4] = {{.expert = 0}, {.pos = 1, .expert = 1}, {.pos = 2, .expert = 2},
                          {.pos = 3, .expert = 3}};
    assert_int_equal(rec_routing(r, run, e1, rows, 2, err), 0);
    assert_int_equal(rec_routing(r, run, e2, rows, 4, err), 0);
    assert_int_equal(rec_routing(r, run, e1, rows + 2, 2, err), 0);
    assert_int_equal(rec_flush(r, err), 0);
    sqlite3 *db = rec_db(r);
    const char *in_range =
        "SELECT count(*) FROM evals e JOIN routing x ON x.routing_id BETWEEN e.routing_first"
        " AND e.routing_last AND x.eval_id = e.eval_id WHERE e.eval_id = %lld";
    char sql[256];
    snprintf(sql, sizeof sql, in_range, (long long)e1);
    assert_int_equal(query_int(db, sql), 4);
    snprintf(sql, sizeof sql, in_range, (long long)e2);
    assert_int_equal(query_int(db, sql), 4);
    assert_int_equal(query_int(db, "SELECT routing_first FROM evals WHERE eval_id = 2"), 3);
    snprintf(sql, sizeof sql, "DELETE FROM evals WHERE eval_id = %lld", (long long)e1);
    exec_sql(db, sql);
    assert_int_equal(query_int(db, "SELECT count(*) FROM routing"), 4);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM routing WHERE eval_id = %lld", (long long)e2);
    assert_int_equal(query_int(db, sql), 4);
    /* VACUUM keeps routing_id (an INTEGER PRIMARY KEY), so the ranges hold */
    exec_sql(db, "VACUUM");
    snprintf(sql, sizeof sql, in_range, (long long)e2);
    assert_int_equal(query_int(db, sql), 4);
    snprintf(sql, sizeof sql, "DELETE FROM evals WHERE eval_id = %lld", (long long)e2);
    exec_sql(db, sql);
    assert_int_equal(query_int(db, "SELECT count(*) FROM routing"), 0);
    rec_close(r);
}

/* Fills b with n routing and n token rows of sequence seq (distinct keys). */
static void fill_batch(RecBatch *b, int seq, size_t n) {
    assert_int_equal(recw_reserve(b, n, n), 0);
    for (size_t i = 0; i < n; i++) {
        b->routing[i] = (RecRouting){.layer = (int)(i % 3), .seq = seq, .pos = (int)i,
                                     .expert = (int)(i % 7), .weight = 0.25f};
        b->tokens[i] = (RecTokenStat){.seq = seq, .pos = (int)i, .experts = 1, .loss = 1.5f};
    }
    b->n_routing = b->n_tokens = n;
}

/* The background writer stores every queued row, in chunks, batches larger
** than a chunk included, and the batches' buffers are handed out again. Its
** backlog is unknown (-1) before the first chunk and then positive while
** rows wait. */
static void test_background_writer_writes_every_row(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "writer.db");
    Recorder *r = open_ok(path);
    int64_t run = begin_run(r, "w"), eval_id = 0;
    assert_int_equal(rec_eval(r, run, 1, "val", 0, NAN, NAN, NAN, &eval_id, err), 0);
    RecWriter *w = NULL;
    assert_int_equal(recw_start(&w, r, run, eval_id, err), 0);
    /* nothing written yet: no rate to tell the backlog by */
    assert_true(recw_backlog_seconds(w) == -1.0);
    size_t sizes[5] = {0, 300000, 1, 0, 4097};
    for (int i = 0; i < 5; i++) {
        RecBatch *b = recw_batch(w);
        assert_non_null(b);
        fill_batch(b, i, sizes[i]);
        assert_int_equal(recw_submit(w, b, err), 0);
        if (i == 1) {
            /* 600,000 rows queued (an empty batch first, which must not
            ** spoil the rate): once the thread has written its first
            ** chunk, a fraction of a millisecond, most of them are left */
            double s;
            for (int k = 0; k < 60000 && (s = recw_backlog_seconds(w)) == -1.0; k++) usleep(1000);
            assert_true(s > 0.0 && s < 60.0);
        }
    }
    assert_int_equal(recw_finish(w, err), 0);
    assert_int_equal(rec_flush(r, err), 0);
    sqlite3 *db = rec_db(r);
    assert_int_equal(query_int(db, "SELECT count(*) FROM routing"), 304098);
    assert_int_equal(query_int(db, "SELECT count(*) FROM token_stats"), 304098);
    assert_int_equal(query_int(db, "SELECT count(*) FROM routing WHERE seq = 4"), 4097);
    assert_int_equal(query_int(db, "SELECT sum(expert) FROM routing WHERE seq = 1"),
                     query_int(db, "SELECT sum(pos % 7) FROM token_stats WHERE seq = 1"));
    assert_int_equal(query_int(db, "SELECT routing_last - routing_first + 1 FROM evals"), 304098);
    rec_close(r);
}

/* A write that fails on the thread (here: no such evaluation) is reported by
** a later submit or by finish, with the recorder's message; rec_discard then
** takes back what the evaluation had written. */
static void test_background_writer_reports_failure(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "writer_fail.db");
    Recorder *r = open_ok(path);
    int64_t run = begin_run(r, "w");
    RecWriter *w = NULL;
    assert_int_equal(recw_start(&w, r, run, 999, err), 0);
    int failed = 0;
    for (int i = 0; i < 3; i++) {
        RecBatch *b = recw_batch(w);
        assert_non_null(b);
        fill_batch(b, i, 100);
        failed |= recw_submit(w, b, err) != 0;
    }
    failed |= recw_finish(w, err) != 0;
    assert_true(failed);
    assert_non_null(strstr(err, "no evaluation with id 999"));

    int64_t eval_id = 0;
    assert_int_equal(rec_eval(r, run, 1, "val", 0, NAN, NAN, NAN, &eval_id, err), 0);
    assert_int_equal(recw_start(&w, r, run, eval_id, err), 0);
    RecBatch *b = recw_batch(w);
    fill_batch(b, 0, 5000);
    assert_int_equal(recw_submit(w, b, err), 0);
    recw_abort(w);
    rec_discard(r);
    assert_int_equal(rec_pending_rows(r), 0);
    assert_int_equal(query_int(rec_db(r), "SELECT count(*) FROM evals"), 0);
    assert_int_equal(query_int(rec_db(r), "SELECT count(*) FROM routing"), 0);
    assert_int_equal(query_int(rec_db(r), "SELECT count(*) FROM runs"), 1);
    rec_close(r);
}

static void test_crash_loses_only_unflushed_rows(void **state) {
    char path[512];
    tmp_path(path, sizeof path, state, "crash.db");
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        Recorder *r = NULL;
        char err[ML_ERRLEN];
        int64_t run = 0;
        if (rec_open(&r, path, err) || rec_run_begin(r, "c", NULL, NULL, 1, 0, 0, 1, &run, err))
            _exit(2);
        for (int i = 0; i < 5; i++)
            if (rec_metric(r, run, i, "train", 2.0, NAN, 0, i, NAN, NAN, NAN, NULL, err))
                _exit(3);
        if (rec_flush(r, err))
            _exit(4);
        for (int i = 5; i < 8; i++)
            if (rec_metric(r, run, i, "train", 2.0, NAN, 0, i, NAN, NAN, NAN, NULL, err))
                _exit(5);
        _exit(0);   /* dies without flushing or closing */
    }
    int wstatus = 0;
    assert_int_equal(waitpid(pid, &wstatus, 0), pid);
    assert_true(WIFEXITED(wstatus));
    assert_int_equal(WEXITSTATUS(wstatus), 0);
    Recorder *r = open_ok(path);
    assert_int_equal(query_int(rec_db(r), "SELECT count(*) FROM runs"), 1);
    assert_int_equal(query_int(rec_db(r), "SELECT count(*) FROM metrics"), 5);
    assert_int_equal(query_int(rec_db(r), "SELECT max(step) FROM metrics"), 4);
    rec_close(r);
}

/* A run left 'running' by a process that is gone is 'crashed' on the next
** open for writing; one whose process lives (this one), one on another host
** and one whose pid was reused by a later process are told apart. */
static void test_dead_process_run_is_marked_crashed(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "crashed.db");
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        Recorder *r = NULL;
        int64_t run = 0;
        if (rec_open(&r, path, err) || rec_run_begin(r, "dies", NULL, NULL, 1, 0, 0, 1, &run, err))
            _exit(2);
        _exit(0); /* as kill -9 would leave it: running, no finished_at */
    }
    int wstatus = 0;
    assert_int_equal(waitpid(pid, &wstatus, 0), pid);
    assert_true(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0);
    Recorder *r = open_ok(path);
    sqlite3 *db = rec_db(r);
    char text[400];
    query_text(db, "SELECT status FROM runs WHERE name = 'dies'", text, sizeof text);
    assert_string_equal(text, "crashed");
    query_text(db, "SELECT error FROM runs WHERE name = 'dies'", text, sizeof text);
    char want[64];
    snprintf(want, sizeof want, "pid %d on ", (int)pid);
    if (!strstr(text, want)) fail_msg("error '%s' does not name %s", text, want);
    assert_true(query_is_null(db, "SELECT finished_at FROM runs WHERE name = 'dies'"));
    /* this process's run; one of another host; one whose pid is ours but
    ** whose process started at another time (the pid was reused) */
    int64_t mine = begin_run(r, "mine");
    assert_true(query_int(db, "SELECT pid FROM runs WHERE name = 'mine'") == getpid());
    exec_sql(db, "INSERT INTO runs(name, status, started_at, pid, host, pid_started)"
                 " SELECT 'elsewhere', 'running', started_at, 1, 'another-host', 0 FROM runs"
                 " WHERE name = 'mine';"
                 "INSERT INTO runs(name, status, started_at, pid, host, pid_started)"
                 " SELECT 'reused', 'running', started_at, pid, host, pid_started - 1000"
                 " FROM runs WHERE name = 'mine';");
    rec_close(r);
    r = open_ok(path);
    db = rec_db(r);
    query_text(db, "SELECT group_concat(name || '=' || status, ' ') FROM"
                   " (SELECT * FROM runs ORDER BY run_id)", text, sizeof text);
    assert_string_equal(text, "dies=crashed mine=running elsewhere=running reused=crashed");
    /* a run set running again belongs to the process that did it */
    assert_int_equal(rec_run_status(r, mine, "finished", NULL, err), 0);
    assert_int_equal(rec_run_status(r, mine, "running", NULL, err), 0);
    assert_int_equal(rec_run_status(r, mine, "crashed", "by hand", err), 0);
    rec_close(r);
}

/* Version 4's runs table refuses 'crashed' in its CHECK: the upgrade makes
** the table again with its rows, and the cascades still work. */
static void test_version_4_database_is_upgraded(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "v4.db");
    Recorder *r = open_ok(path);
    int64_t run = begin_run(r, "old"), eval_id = 0;
    assert_int_equal(rec_metric(r, run, 1, "train", 2.0, 0.1, 1e-3, 100, NAN, 1.0, NAN, NULL, err), 0);
    assert_int_equal(rec_eval(r, run, 1, "val", 0, 1.0, NAN, NAN, &eval_id, err), 0);
    assert_int_equal(rec_run_status(r, run, "finished", NULL, err), 0);
    rec_close(r);
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    exec_sql(db, "PRAGMA foreign_keys = OFF;"
                 "BEGIN;"
                 "DROP VIEW v_final_loss;"
                 "CREATE TABLE runs_v4(run_id INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                 "  experiment TEXT, config TEXT, seed INTEGER,"
                 "  status TEXT NOT NULL DEFAULT 'running' CHECK (status IN"
                 "  ('running','finished','diverged','interrupted','failed')),"
                 "  started_at TEXT NOT NULL, finished_at TEXT, params_total INTEGER,"
                 "  params_active INTEGER, error TEXT, causal INTEGER);"
                 "INSERT INTO runs_v4 SELECT run_id, name, experiment, config, seed, status,"
                 "  started_at, finished_at, params_total, params_active, error, causal FROM runs;"
                 "DROP TABLE runs;"
                 "ALTER TABLE runs_v4 RENAME TO runs;"
                 "CREATE VIEW v_final_loss AS SELECT run_id, name FROM runs;"
                 /* DROP COLUMN trips on the comment before it; a rename does */
                 "ALTER TABLE evals RENAME COLUMN complete TO complete_before;"
                 "PRAGMA user_version = 4;"
                 "COMMIT;");
    assert_int_equal(sqlite3_exec(db, "UPDATE runs SET status = 'crashed'", NULL, NULL, NULL),
                     SQLITE_CONSTRAINT);
    sqlite3_close(db);
    r = open_ok(path);
    db = rec_db(r);
    assert_int_equal(query_int(db, "PRAGMA user_version"), REC_SCHEMA_VERSION);
    char text[64];
    query_text(db, "SELECT status FROM runs", text, sizeof text);
    assert_string_equal(text, "finished");
    assert_int_equal(query_int(db, "SELECT complete FROM evals"), 1);
    assert_true(query_is_null(db, "SELECT pid FROM runs"));
    assert_int_equal(query_int(db, "SELECT count(*) FROM pragma_foreign_key_check"), 0);
    assert_int_equal(rec_run_status(r, run, "crashed", NULL, err), 0);
    exec_sql(db, "DELETE FROM runs");
    assert_int_equal(query_int(db, "SELECT count(*) FROM metrics"), 0);
    assert_int_equal(query_int(db, "SELECT count(*) FROM evals"), 0);
    rec_close(r);
}

static void test_locked_database_names_the_lock(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "locked.db");
    Recorder *r = open_ok(path);
    int64_t run = begin_run(r, "a");
    assert_int_equal(rec_set_busy_timeout(r, 50, err), 0);

    sqlite3 *other = NULL;
    assert_int_equal(sqlite3_open(path, &other), SQLITE_OK);
    exec_sql(other, "BEGIN EXCLUSIVE; INSERT INTO runs(name, started_at) VALUES ('x', 'now');");

    assert_int_equal(rec_metric(r, run, 1, "train", 2.0, NAN, 0, 1, NAN, NAN, NAN, NULL, err), -1);
    assert_non_null(strstr(err, "database is locked"));
    assert_non_null(strstr(err, path));

    exec_sql(other, "COMMIT");
    assert_int_equal(rec_metric(r, run, 1, "train", 2.0, NAN, 0, 1, NAN, NAN, NAN, NULL, err), 0);

    /* Now the recorder holds the write lock until it flushes. */
    assert_int_equal(sqlite3_busy_timeout(other, 10), SQLITE_OK);
    assert_int_not_equal(sqlite3_exec(other, "INSERT INTO runs(name, started_at)"
                                             " VALUES ('y', 'now')", NULL, NULL, NULL), SQLITE_OK);
    assert_int_equal(rec_flush(r, err), 0);
    assert_int_equal(query_int(other, "SELECT count(*) FROM metrics"), 1);
    assert_int_equal(query_int(other, "SELECT count(*) FROM runs"), 2);
    sqlite3_close(other);
    rec_close(r);
}

static void test_readonly_connection_refuses_writes(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "ro.db");
    Recorder *r = open_ok(path);
    int64_t run = begin_run(r, "a");
    rec_close(r);

    assert_int_equal(rec_open_readonly(&r, path, err), 0);
    assert_int_equal(query_int(rec_db(r), "SELECT count(*) FROM runs"), 1);
    int rc = rec_metric(r, run, 1, "train", 2.0, NAN, 0, 1, NAN, NAN, NAN, NULL, err);
    if (rc == 0)
        rc = rec_flush(r, err);
    assert_int_equal(rc, -1);
    assert_non_null(strstr(err, "attempt to write a readonly database"));
    assert_non_null(strstr(err, path));
    rec_close(r);

    char missing[512];
    tmp_path(missing, sizeof missing, state, "missing.db");
    assert_int_equal(rec_open_readonly(&r, missing, err), -1);
    assert_null(r);
    assert_non_null(strstr(err, missing));
    assert_non_null(strstr(err, "unable to open"));

    char empty[512];   /* a SQLite database, but not one of ours */
    tmp_path(empty, sizeof empty, state, "other.db");
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(empty, &db), SQLITE_OK);
    exec_sql(db, "CREATE TABLE t(x)");
    sqlite3_close(db);
    assert_int_equal(rec_open_readonly(&r, empty, err), -1);
    assert_non_null(strstr(err, "not a moelab database"));
}

static void test_readonly_file_refuses_writes(void **state) {
    if (geteuid() == 0) {
        print_message("skipped: running as root, chmod 0444 does not stop root's "
                      "writes (rec_open_readonly is tested instead)\n");
        skip();
    }
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "file-ro.db");
    Recorder *r = open_ok(path);
    int64_t run = begin_run(r, "a");
    rec_close(r);
    assert_int_equal(chmod(path, 0444), 0);
    assert_int_equal(chmod((const char *)*state, 0555), 0);
    int rc = rec_open(&r, path, err);
    if (rc == 0) {
        rc = rec_metric(r, run, 1, "train", 2.0, NAN, 0, 1, NAN, NAN, NAN, NULL, err);
        if (rc == 0)
            rc = rec_flush(r, err);
        rec_close(r);
    }
    assert_int_equal(rc, -1);
    assert_non_null(strstr(err, path));
    if (!strstr(err, "readonly") && !strstr(err, "unable to open"))
        fail_msg("unexpected message: %s", err);

    /* Reading still works, though the directory refuses the -shm file. */
    assert_int_equal(rec_open_readonly(&r, path, err), 0);
    assert_int_equal(query_int(rec_db(r), "SELECT count(*) FROM runs"), 1);
    rec_close(r);
}

static void test_foreign_file_is_not_a_database(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "notes.txt");
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    for (int i = 0; i < 40; i++)
        fputs("These are my notes, not a database at all.\n", f);
    fclose(f);
    Recorder *r = NULL;
    assert_int_equal(rec_open(&r, path, err), -1);
    assert_null(r);
    assert_non_null(strstr(err, "not a SQLite database"));
    assert_non_null(strstr(err, path));
    assert_int_equal(rec_open_readonly(&r, path, err), -1);
    assert_non_null(strstr(err, "not a SQLite database"));
}

static void test_newer_schema_is_refused(void **state) {
    char path[512], err[ML_ERRLEN] = "";
    tmp_path(path, sizeof path, state, "future.db");
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
    exec_sql(db, "PRAGMA user_version = 99");
    sqlite3_close(db);
    Recorder *r = NULL;
    assert_int_equal(rec_open(&r, path, err), -1);
    assert_non_null(strstr(err, "newer"));
    rec_close(NULL);   /* a no-op */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_schema_has_every_documented_column),
        cmocka_unit_test(test_run_metrics_eval_and_status_read_back),
        cmocka_unit_test(test_diverged_run_keeps_its_message),
        cmocka_unit_test(test_bad_status_and_unknown_run_are_rejected),
        cmocka_unit_test(test_metric_aux_parts_read_back),
        cmocka_unit_test(test_moe_records_read_back),
        cmocka_unit_test(test_moe_records_are_all_or_nothing),
        cmocka_unit_test(test_bulk_path_stores_exactly_the_rows),
        cmocka_unit_test(test_deleting_a_run_deletes_its_records),
        cmocka_unit_test(test_views_compute_the_documented_numbers),
        cmocka_unit_test(test_routing_stability_compares_consecutive_probes),
        cmocka_unit_test_setup_teardown(test_flushed_rows_survive_close_and_reopen,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_full_wal_is_checkpointed_in_the_background,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_large_routing_batch_reaches_the_file,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_foreign_database_is_refused,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_version_3_database_is_upgraded,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_version_2_database_is_upgraded,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_routing_ranges_cover_interleaved_evaluations,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_background_writer_writes_every_row,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_background_writer_reports_failure,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_version_1_database_is_upgraded,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_crash_loses_only_unflushed_rows,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_dead_process_run_is_marked_crashed,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_version_4_database_is_upgraded,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_locked_database_names_the_lock,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_readonly_connection_refuses_writes,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_readonly_file_refuses_writes,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_foreign_file_is_not_a_database,
                                        setup_tmpdir, teardown_tmpdir),
        cmocka_unit_test_setup_teardown(test_newer_schema_is_refused,
                                        setup_tmpdir, teardown_tmpdir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
