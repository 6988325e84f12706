/*
** bench_recorder.c — how fast the recorder writes the MoE tables of a
** recorded evaluation into a file database (WAL, synchronous=NORMAL), the
** final commit included. Not a test: it prints one line per measurement,
**
**     routing rows/s: 1234567
**
** for routing rows in the table's order (layer-major), routing rows batch by
** batch (each batch layer-major, the order in which an evaluation writes
** them), and token_stats rows. SPEC §5 / issue 3
** ask for at least 1,000,000 routing rows per second.
**
** Last, the record of the evaluation of `make bench`'s section 4 (20
** batches: 327,680 routing rows in one call per layer, 40,960 token_stats
** rows, expert_load and sparsity, then the commit), written five times into
** one database as an evaluation at a time would be: milliseconds per
** evaluation, the CPU time the recorder needs. Recording may add at most 15%
** to that evaluation's wall time; the trainer writes these rows on a
** background thread, mostly in CPU time the computation leaves idle, so
** bench_moe's section 4 measures what is left of it. The databases are
** temporary files, removed at the end.
**
** Usage: bench_recorder [ROWS]   (default 2,000,000 routing rows)
** Build: the Makefile's bench target, or
**        cc -O2 -std=c11 -D_GNU_SOURCE -Isrc tests/bench_recorder.c
**        build/libmoelab.a -lsqlite3 -lm
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "recorder.h"

/* The shape of an evaluation: batches of B sequences of T tokens, L MoE
** layers, top-K routing over E experts. */
enum { B = 16, T = 128, L = 4, K = 2, E = 8 };

static double clock_s(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Wall time and this process's CPU time (user + system): on a machine that
** other jobs share, the second says what the recorder itself costs. */
typedef struct {
    double wall, cpu;
} Stopwatch;

static Stopwatch stopwatch_start(void) {
    return (Stopwatch){clock_s(CLOCK_MONOTONIC), clock_s(CLOCK_PROCESS_CPUTIME_ID)};
}

static void print_rate(const char *what, size_t rows, Stopwatch start) {
    double wall = clock_s(CLOCK_MONOTONIC) - start.wall;
    double cpu = clock_s(CLOCK_PROCESS_CPUTIME_ID) - start.cpu;
    printf("%s rows/s: %.0f   (%zu rows in %.2f s; %.0f rows per CPU second)\n", what,
           (double)rows / wall, rows, wall, (double)rows / cpu);
    fflush(stdout);
}

static void die(const char *what, const char *err) {
    fprintf(stderr, "bench_recorder: %s: %s\n", what, err);
    exit(1);
}

static RecRouting routing_row(int layer, int seq, int pos, int rank) {
    unsigned h = (unsigned)(seq * 131 + pos * 31 + layer * 7) * 2654435761u;
    return (RecRouting){.layer = layer, .seq = seq, .pos = pos, .token = (int)(h >> 24),
                        .rank = rank, .expert = (int)((h >> 8) + (unsigned)rank) % E,
                        .pass = 0, .weight = rank == 0 ? 0.625f : 0.375f};
}

/* n routing rows of whole batches: layer-major over the evaluation, or
** batch by batch (each batch layer-major). */
static size_t fill_routing(RecRouting *rows, size_t n, int batch_by_batch) {
    size_t per_batch = (size_t)B * T * L * K, batches = n / per_batch, i = 0;
    if (batch_by_batch) {
        for (size_t b = 0; b < batches; b++)
            for (int l = 0; l < L; l++)
                for (int s = 0; s < B; s++)
                    for (int p = 0; p < T; p++)
                        for (int k = 0; k < K; k++)
                            rows[i++] = routing_row(l, (int)b * B + s, p, k);
    } else {
        for (int l = 0; l < L; l++)
            for (size_t s = 0; s < batches * B; s++)
                for (int p = 0; p < T; p++)
                    for (int k = 0; k < K; k++)
                        rows[i++] = routing_row(l, (int)s, p, k);
    }
    return i;
}

typedef struct {
    Recorder *rec;
    int64_t run_id, eval_id;
    char path[64];
} BenchDb;

static void bench_open(BenchDb *db) {
    char err[ML_ERRLEN];
    strcpy(db->path, "/tmp/moelab-bench-XXXXXX");
    int fd = mkstemp(db->path);
    if (fd < 0)
        die("mkstemp", "cannot create a temporary file");
    close(fd);
    if (rec_open(&db->rec, db->path, err)
        || rec_run_begin(db->rec, "bench", NULL, NULL, 1, 0, 0, 1, &db->run_id, err)
        || rec_eval(db->rec, db->run_id, 0, "val", 0, 1.0, 0.0, K, &db->eval_id, err)
        || rec_flush(db->rec, err))
        die(db->path, err);
}

static void bench_close(BenchDb *db) {
    char other[80];
    rec_close(db->rec);
    unlink(db->path);
    snprintf(other, sizeof other, "%s-wal", db->path);
    unlink(other);
    snprintf(other, sizeof other, "%s-shm", db->path);
    unlink(other);
}

/* Writes rows in calls of `chunk` rows (one layer of one batch), then
** commits. */
static void bench_routing(const char *what, const RecRouting *rows, size_t n, size_t chunk) {
    BenchDb db;
    char err[ML_ERRLEN];
    bench_open(&db);
    Stopwatch start = stopwatch_start();
    for (size_t i = 0; i < n; i += chunk)
        if (rec_routing(db.rec, db.run_id, db.eval_id, rows + i, n - i < chunk ? n - i : chunk,
                        err))
            die("rec_routing", err);
    if (rec_flush(db.rec, err))
        die("rec_flush", err);
    print_rate(what, n, start);
    bench_close(&db);
}

static void bench_token_stats(size_t n) {
    RecTokenStat *rows = malloc(n * sizeof *rows);
    if (!rows)
        die("malloc", "out of memory");
    for (size_t i = 0; i < n; i++)
        rows[i] = (RecTokenStat){.seq = (int)(i / T), .pos = (int)(i % T),
                                 .token = (int)(i * 7 % 256), .experts = L * K,
                                 .loss = 1.5f + (float)(i % 13) * 0.125f,
                                 .moe_flops = 1.5e6};
    BenchDb db;
    char err[ML_ERRLEN];
    bench_open(&db);
    Stopwatch start = stopwatch_start();
    for (size_t i = 0; i < n; i += (size_t)B * T)
        if (rec_token_stats(db.rec, db.run_id, db.eval_id, rows + i,
                            n - i < (size_t)B * T ? n - i : (size_t)B * T, err))
            die("rec_token_stats", err);
    if (rec_flush(db.rec, err))
        die("rec_flush", err);
    print_rate("token_stats", n, start);
    bench_close(&db);
    free(rows);
}

/* The record of one evaluation of bench_moe's section 4, as trainer.c writes
** it (per layer: expert_load, sparsity, routing; then token_stats; commit),
** repeated; the first evaluation is not timed. */
static void bench_evaluation(void) {
    enum { BATCHES = 20, EVALS = 5 };
    size_t per_layer = (size_t)BATCHES * B * T * K, n_tokens = (size_t)BATCHES * B * T;
    RecRouting *rows = malloc(L * per_layer * sizeof *rows);
    RecTokenStat *tokens = malloc(n_tokens * sizeof *tokens);
    if (!rows || !tokens)
        die("malloc", "out of memory");
    size_t i = 0;
    for (int l = 0; l < L; l++)
        for (int s = 0; s < BATCHES * B; s++)
            for (int p = 0; p < T; p++)
                for (int k = 0; k < K; k++)
                    rows[i++] = routing_row(l, s, p, k);
    for (size_t t = 0; t < n_tokens; t++)
        tokens[t] = (RecTokenStat){.seq = (int)(t / T), .pos = (int)(t % T),
                                   .token = (int)(t * 7 % 256), .experts = L * K,
                                   .loss = 1.5f + (float)(t % 13) * 0.125f, .moe_flops = 1.5e6};
    RecExpertLoad load[E];
    RecSparsity sparsity[E];
    BenchDb db;
    char err[ML_ERRLEN];
    bench_open(&db);
    Stopwatch start = stopwatch_start();
    double best = 1e30;
    for (int e = 0; e < EVALS; e++) {
        int64_t eval_id;
        if (e == 1)
            start = stopwatch_start();
        double t0 = clock_s(CLOCK_MONOTONIC);
        if (rec_eval(db.rec, db.run_id, e, "val", (int64_t)n_tokens, 1.0, 1e6, K, &eval_id, err))
            die("rec_eval", err);
        for (int l = 0; l < L; l++) {
            for (int x = 0; x < E; x++) {
                load[x] = (RecExpertLoad){l, x, (int64_t)(per_layer / E), 0, 1e3};
                sparsity[x] = (RecSparsity){l, x, 1 << 20, 1 << 18, 0.25};
            }
            if (rec_expert_load(db.rec, db.run_id, eval_id, e, load, E, err)
                || rec_sparsity(db.rec, db.run_id, eval_id, sparsity, E, err)
                || rec_routing(db.rec, db.run_id, eval_id, rows + l * per_layer, per_layer, err))
                die("recording an evaluation", err);
        }
        if (rec_token_stats(db.rec, db.run_id, eval_id, tokens, n_tokens, err)
            || rec_flush(db.rec, err))
            die("recording an evaluation", err);
        double dt = clock_s(CLOCK_MONOTONIC) - t0;
        if (e > 0 && dt < best)
            best = dt;
    }
    size_t per_eval = L * per_layer + n_tokens + 2 * L * E;
    printf("evaluation (bench_moe section 4: %zu rows, commit included): best %.1f ms\n",
           per_eval, best * 1e3);
    print_rate("evaluation", per_eval * (EVALS - 1), start);
    bench_close(&db);
    free(rows);
    free(tokens);
}

int main(int argc, char **argv) {
    size_t want = argc > 1 ? strtoull(argv[1], NULL, 10) : 2000000;
    size_t per_batch = (size_t)B * T * L * K;
    if (want < per_batch)
        want = per_batch;
    RecRouting *rows = malloc(want * sizeof *rows);
    if (!rows)
        die("malloc", "out of memory");
    size_t chunk = (size_t)B * T * K;      /* one layer of one batch */

    size_t n = fill_routing(rows, want, 0);
    bench_routing("routing", rows, n, chunk);
    n = fill_routing(rows, want, 1);
    bench_routing("routing (batch by batch)", rows, n, chunk);
    free(rows);
    bench_token_stats(want / 2);
    bench_evaluation();
    return 0;
}
