/*
** test_crash.c — what a crash leaves in the database. A child process trains
** an MoE model and records evaluations, committing a long evaluation in
** small chunks, and is killed (SIGKILL) at a random point; it reports over a
** pipe everything it knows to be committed. After each kill the database
** must pass PRAGMA integrity_check, hold every row the child reported, mark
** the killed run 'crashed' (or leave it 'finished' when the kill fell between
** two calls) and leave at most the evaluation in progress incomplete
** (evals.complete = 0). Then Ctrl-C in the middle of a long
** recorded evaluation, after some of its chunks were committed, must remove
** all of it, and a disk that fills up during one must leave the file sound.
** Bounded: a fixed number of kills, each within a second.
*/
#include "testmodel.h"

#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "data.h"
#include "recorder.h"
#include "trainer.h"

enum { KILLS = 10, EVAL_BATCH = 4, EVAL_BATCHES = 6, COMMIT_ROWS = 300 };

static char dir[] = "/tmp/moelab_crash_XXXXXX";

static ModelConfig crash_config(void) {
    ModelConfig c = test_tiny_config();
    c.seed = 3;
    c.moe.enabled = 1;
    c.moe.experts = 4;
    for (int e = 0; e < c.moe.experts; e++) c.moe.hidden[e] = 16;
    c.moe.kind = ROUTER_TOPK;
    c.moe.sparsity_eps = 0.01f;
    c.moe.k = 2; /* no capacity: every token has exactly 2 routing rows per layer */
    return c;
}

static void on_sigint(int sig) { trainer_interrupt = sig; }

static void say(int fd, const char *fmt, long long a, long long b) {
    char line[64];
    int n = snprintf(line, sizeof line, fmt, a, b);
    if (write(fd, line, (size_t)n) != n) _exit(9);
}

/* In a child process: a recorded run named `name` of crash_config()'s model
** on a small synthetic corpus, and its trainer (one thread); exits 2 with the
** message on failure. */
static void child_run(const char *path, const char *name, Recorder **rec, Trainer *t) {
    char err[ML_ERRLEN], text[8192];
    for (size_t i = 0; i < sizeof text; i++) text[i] = "abcdefghij klmnop"[(i * 7 + i / 13) % 17];
    ModelConfig c = crash_config();
    Corpus *corpus;
    Model *m;
    int64_t run_id;
    trainer_set_threads(1);
    if (corpus_from_bytes(&corpus, (const uint8_t *)text, sizeof text, 0.5, err) || model_create(&m, &c, err) ||
        rec_open(rec, path, err) || rec_run_begin(*rec, name, NULL, NULL, 3, 0, 0, 1, &run_id, err) ||
        trainer_init(t, m, corpus, *rec, run_id, name, 3, err)) {
        fprintf(stderr, "child: %s\n", err);
        _exit(2);
    }
}

/* The child: trains 3 steps, evaluates (recorded), and again, for ever,
** reporting "R run", "S steps" and "E eval_id tokens" once each is
** committed; with big_eval, one long evaluation that reports "I" when it
** was interrupted. Never returns. */
static void child(const char *path, int fd, int big_eval) {
    char err[ML_ERRLEN];
    Recorder *rec;
    Trainer t;
    child_run(path, "crash", &rec, &t);
    rec_set_commit_rows(rec, COMMIT_ROWS);
    say(fd, "R %lld %lld\n", (long long)t.run_id, 0);
    TrainOptions o;
    train_options_defaults(&o);
    o.steps = 3;
    o.batch = 4;
    o.progress = 0;
    o.eval_batches = 0;
    EvalOptions eo;
    eval_options_defaults(&eo);
    eo.batches = big_eval ? 100000 : EVAL_BATCHES;
    eo.batch = EVAL_BATCH;
    eo.record = 1;
    if (big_eval) {
        signal(SIGINT, on_sigint);
        EvalResult r;
        say(fd, "B %lld %lld\n", 0, 0);
        int rc = trainer_evaluate(&t, &eo, &r, err);
        say(fd, rc != 0 && r.interrupted ? "I %lld %lld\n" : "X %lld %lld\n", 0, 0);
        _exit(0);
    }
    for (;;) {
        TrainResult tr;
        EvalResult r;
        if (trainer_train(&t, &o, &tr, err) != 0) _exit(3);
        say(fd, "S %lld %lld\n", (long long)t.step, 0);
        if (trainer_evaluate(&t, &eo, &r, err) != 0) _exit(4);
        say(fd, "E %lld %lld\n", (long long)r.eval_id, (long long)r.tokens);
    }
}

static int64_t query_int(sqlite3 *db, const char *fmt, long long a) {
    char sql[512];
    snprintf(sql, sizeof sql, fmt, a);
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK || sqlite3_step(st) != SQLITE_ROW)
        fail_msg("'%s': %s", sql, sqlite3_errmsg(db));
    int64_t v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

static void check_integrity(sqlite3 *db) {
    sqlite3_stmt *st;
    assert_int_equal(sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &st, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    assert_string_equal((const char *)sqlite3_column_text(st, 0), "ok");
    sqlite3_finalize(st);
}

static void test_killed_at_random_points(void **state) {
    (void)state;
    char path[300], err[ML_ERRLEN];
    snprintf(path, sizeof path, "%s/crash.db", dir);
    /* random points, from a seed printed so that a failure can be replayed */
    const char *env = getenv("MOELAB_CRASH_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 10) : (uint64_t)time(NULL), rng = seed;
    print_message("kill points from MOELAB_CRASH_SEED=%llu\n", (unsigned long long)seed);
    int moe_layers = crash_config().layers, k = 2, evals_checked = 0, crashed = 0;
    for (int kill_no = 0; kill_no < KILLS; kill_no++) {
        int fds[2];
        assert_int_equal(pipe(fds), 0);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            close(fds[0]);
            child(path, fds[1], 0);
        }
        close(fds[1]);
        int ms = 100 + (int)(test_rand(&rng) % 900);
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        kill(pid, SIGKILL);
        int status;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        if (!WIFSIGNALED(status)) fail_msg("kill %d: the child ended by itself (%d)", kill_no, status);
        char buf[1 << 16];
        ssize_t n = 0, got;
        while ((got = read(fds[0], buf + n, sizeof buf - 1 - (size_t)n)) > 0) n += got;
        close(fds[0]);
        buf[n] = 0;
        long long run = -1, steps = 0;
        Recorder *r;
        if (rec_open(&r, path, err) != 0) fail_msg("kill %d: %s", kill_no, err);
        sqlite3 *db = rec_db(r);
        check_integrity(db);
        for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
            long long a, b;
            if (sscanf(line, "R %lld", &a) == 1) run = a;
            if (sscanf(line, "S %lld", &a) == 1) steps = a;
            if (sscanf(line, "E %lld %lld", &a, &b) == 2) { /* a committed evaluation, whole */
                assert_int_equal(query_int(db, "SELECT complete FROM evals WHERE eval_id = %lld", a), 1);
                assert_int_equal(query_int(db, "SELECT count(*) FROM token_stats WHERE eval_id = %lld", a), b);
                assert_int_equal(query_int(db, "SELECT count(*) FROM evals e JOIN routing r ON"
                                               " r.routing_id BETWEEN e.routing_first AND e.routing_last"
                                               " AND r.eval_id = e.eval_id WHERE e.eval_id = %lld", a),
                                 b * moe_layers * k);
                evals_checked++;
            }
        }
        if (run < 0) { /* killed before its run was committed */
            rec_close(r);
            continue;
        }
        char status_text[32] = "";
        sqlite3_stmt *st;
        assert_int_equal(sqlite3_prepare_v2(db, "SELECT status FROM runs WHERE run_id = ?1", -1, &st, NULL), SQLITE_OK);
        sqlite3_bind_int64(st, 1, run);
        assert_int_equal(sqlite3_step(st), SQLITE_ROW);
        snprintf(status_text, sizeof status_text, "%s", (const char *)sqlite3_column_text(st, 0));
        sqlite3_finalize(st);
        /* killed inside a call: crashed; between two calls the run is what the
        ** last call left, finished, with no evaluation cut short */
        if (strcmp(status_text, "crashed") == 0)
            crashed++;
        else if (strcmp(status_text, "finished") != 0 ||
                 query_int(db, "SELECT count(*) FROM evals WHERE run_id = %lld AND complete = 0", run) != 0)
            fail_msg("kill %d: the run is '%s'", kill_no, status_text);
        /* every step the child saw committed is there */
        assert_true(query_int(db, "SELECT count(*) FROM metrics WHERE run_id = %lld AND split = 'train'",
                              run) >= steps);
        /* at most the evaluation in progress is incomplete, and its rows are its own */
        assert_true(query_int(db, "SELECT count(*) FROM evals WHERE run_id = %lld AND complete = 0", run) <= 1);
        assert_int_equal(query_int(db, "SELECT count(*) FROM routing r WHERE run_id = %lld AND NOT EXISTS"
                                       " (SELECT 1 FROM evals e WHERE e.eval_id = r.eval_id)", run), 0);
        rec_close(r);
    }
    if (evals_checked == 0) fail_msg("no evaluation finished before any kill: the test checked nothing");
    if (crashed == 0) fail_msg("no kill found its run crashed: the test checked nothing");
    print_message("%d kills, %d runs crashed, %d committed evaluations checked\n", KILLS, crashed,
                  evals_checked);
}

/* Ctrl-C in a long recorded evaluation after chunks of it were committed:
** the evaluation and every row of it are gone, the rest of the run stays. */
static void test_interrupt_removes_committed_chunks(void **state) {
    (void)state;
    char path[300], err[ML_ERRLEN];
    snprintf(path, sizeof path, "%s/interrupt.db", dir);
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        child(path, fds[1], 1);
    }
    close(fds[1]);
    /* wait until some of the evaluation is committed, as a reader sees it */
    sqlite3 *db;
    int64_t rows = 0;
    for (int i = 0; i < 1000 && rows < 3 * COMMIT_ROWS; i++) {
        struct timespec ts = {0, 10000000L};
        nanosleep(&ts, NULL);
        if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK) {
            sqlite3_stmt *st;
            if (sqlite3_prepare_v2(db, "SELECT count(*) FROM routing", -1, &st, NULL) == SQLITE_OK &&
                sqlite3_step(st) == SQLITE_ROW)
                rows = sqlite3_column_int64(st, 0);
            sqlite3_finalize(st);
        }
        sqlite3_close(db);
    }
    if (rows < 3 * COMMIT_ROWS) fail_msg("the evaluation committed no chunk in 10 s");
    kill(pid, SIGINT);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    char buf[256];
    ssize_t n = read(fds[0], buf, sizeof buf - 1);
    close(fds[0]);
    buf[n > 0 ? n : 0] = 0;
    if (!strstr(buf, "\nI ")) fail_msg("the child did not report an interrupted evaluation: '%s'", buf);
    Recorder *r;
    if (rec_open(&r, path, err) != 0) fail_msg("%s", err);
    check_integrity(rec_db(r));
    assert_int_equal(query_int(rec_db(r), "SELECT count(*) FROM evals", 0), 0);
    assert_int_equal(query_int(rec_db(r), "SELECT count(*) FROM routing", 0), 0);
    assert_int_equal(query_int(rec_db(r), "SELECT count(*) FROM token_stats", 0), 0);
    assert_int_equal(query_int(rec_db(r), "SELECT count(*) FROM runs", 0), 1);
    rec_close(r);
}

/* A full disk (here a file size limit) in the middle of a recorded
** evaluation: the call fails with SQLite's message, what was committed
** before stays, nothing of the evaluation is left, and the file is sound. */
static void test_full_disk_fails_cleanly(void **state) {
    (void)state;
    char path[300], err[ML_ERRLEN];
    snprintf(path, sizeof path, "%s/full.db", dir);
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        Recorder *rec;
        Trainer t;
        child_run(path, "full", &rec, &t);
        TrainOptions o;
        train_options_defaults(&o);
        o.steps = 3;
        o.batch = 4;
        o.progress = 0;
        o.eval_batches = 0;
        TrainResult tr;
        if (trainer_train(&t, &o, &tr, err) != 0) _exit(3);
        signal(SIGXFSZ, SIG_IGN); /* a write past the limit fails instead */
        struct stat st;
        off_t size = stat(path, &st) == 0 ? st.st_size : 0;
        struct rlimit lim = {(rlim_t)size + (256 << 10), (rlim_t)size + (256 << 10)};
        if (setrlimit(RLIMIT_FSIZE, &lim) != 0) _exit(4);
        EvalOptions eo;
        eval_options_defaults(&eo);
        eo.batches = 400;
        eo.batch = EVAL_BATCH;
        eo.record = 1;
        EvalResult r;
        int rc = trainer_evaluate(&t, &eo, &r, err);
        char line[ML_ERRLEN + 8];
        int n = snprintf(line, sizeof line, "%d %s\n", rc, rc ? err : "");
        if (write(fds[1], line, (size_t)n) != n) _exit(5);
        rec_close(rec);
        _exit(0);
    }
    close(fds[1]);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    char buf[ML_ERRLEN + 8];
    ssize_t n = read(fds[0], buf, sizeof buf - 1);
    close(fds[0]);
    buf[n > 0 ? n : 0] = 0;
    if (strncmp(buf, "-1 ", 3) != 0 || !strstr(buf, "full.db") ||
        !(strstr(buf, "disk I/O error") || strstr(buf, "full")))
        fail_msg("the evaluation should fail on the full disk with SQLite's message, got '%s'", buf);
    Recorder *r;
    if (rec_open(&r, path, err) != 0) fail_msg("%s", err);
    sqlite3 *db = rec_db(r);
    check_integrity(db);
    assert_int_equal(query_int(db, "SELECT count(*) FROM metrics WHERE split = 'train'", 0), 3);
    assert_int_equal(query_int(db, "SELECT count(*) FROM evals WHERE complete = 0", 0), 0);
    assert_int_equal(query_int(db, "SELECT count(*) FROM routing r WHERE NOT EXISTS"
                                   " (SELECT 1 FROM evals e WHERE e.eval_id = r.eval_id)", 0), 0);
    rec_close(r);
}

static int setup(void **state) {
    (void)state;
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_killed_at_random_points),
        cmocka_unit_test(test_interrupt_removes_committed_chunks),
        cmocka_unit_test(test_full_disk_fails_cleanly),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
