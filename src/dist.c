/*
** dist.c — MPI for data and expert parallelism (dist.h, moe/parallel.c).
** MPI is started only under a launcher; one rank never calls it. The calls
** come from the main thread alone (MPI_THREAD_FUNNELED): OpenMP teams
** compute between them.
*/
#include <fcntl.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "dist.h"
#include "machine.h"

static int rank = 0, size = 1, started = 0;
static FILE *errors; /* this rank's stderr once dist_quiet silenced it; else NULL */
static double comm_seconds;

/* Times the communication of the function it is in: COMM_BEGIN at the top,
** COMM_END before it returns. */
#define COMM_BEGIN double comm_t0_ = machine_clock()
#define COMM_END comm_seconds += machine_clock() - comm_t0_

double dist_comm_seconds(void) { return comm_seconds; }

static int launched(void) {
    return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMIX_RANK") || getenv("PMI_SIZE");
}

int dist_init(int *argc, char ***argv, char *err) {
    if (started || !launched()) return 0;
    int provided = 0;
    if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
        return ml_error(err, "MPI_Init failed");
    started = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    return 0;
}

void dist_finalize(void) {
    if (!started) return;
    MPI_Finalize();
    started = 0;
}

int dist_rank(void) { return rank; }
int dist_size(void) { return size; }
int dist_active(void) { return size > 1; }

/* MPI counts are ints: long buffers go in pieces of at most 2^30 elements. */
#define DIST_CHUNK ((size_t)1 << 30)

static void sum(void *x, size_t n, size_t elem, MPI_Datatype type) {
    if (size == 1) return;
    COMM_BEGIN;
    for (size_t i = 0; i < n; i += DIST_CHUNK) {
        size_t k = n - i < DIST_CHUNK ? n - i : DIST_CHUNK;
        MPI_Allreduce(MPI_IN_PLACE, (char *)x + i * elem, (int)k, type, MPI_SUM, MPI_COMM_WORLD);
    }
    COMM_END;
}

void dist_sum_float(float *x, size_t n) { sum(x, n, sizeof *x, MPI_FLOAT); }
void dist_sum_double(double *x, size_t n) { sum(x, n, sizeof *x, MPI_DOUBLE); }
void dist_sum_int64(int64_t *x, size_t n) { sum(x, n, sizeof *x, MPI_INT64_T); }

void dist_barrier(void) {
    if (size > 1) MPI_Barrier(MPI_COMM_WORLD);
}

int dist_max_int(int x) {
    if (size == 1) return x;
    MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return x;
}

void dist_allgather_int(const int *mine, int n, int *all) {
    if (size == 1) {
        memcpy(all, mine, sizeof(int) * (size_t)n);
        return;
    }
    COMM_BEGIN;
    MPI_Allgather(mine, n, MPI_INT, all, n, MPI_INT, MPI_COMM_WORLD);
    COMM_END;
}

void dist_alltoall_rows(const float *send, const int *send_rows, float *recv, const int *recv_rows,
                        int width) {
    if (size == 1) {
        memcpy(recv, send, sizeof(float) * (size_t)send_rows[0] * width);
        return;
    }
    COMM_BEGIN;
    /* counts in rows, so that they stay ints however wide a row is */
    MPI_Datatype row;
    MPI_Type_contiguous(width, MPI_FLOAT, &row);
    MPI_Type_commit(&row);
    int *sd = malloc(sizeof(int) * 2 * (size_t)size), *rd = sd + size;
    if (!sd) dist_fail("out of memory for an all-to-all");
    sd[0] = rd[0] = 0;
    for (int r = 1; r < size; r++) {
        sd[r] = sd[r - 1] + send_rows[r - 1];
        rd[r] = rd[r - 1] + recv_rows[r - 1];
    }
    MPI_Alltoallv(send, send_rows, sd, row, recv, recv_rows, rd, row, MPI_COMM_WORLD);
    MPI_Type_free(&row);
    free(sd);
    COMM_END;
}

void dist_broadcast_from(void *buf, size_t bytes, int root) {
    if (size == 1) return;
    COMM_BEGIN;
    for (size_t i = 0; i < bytes; i += DIST_CHUNK) {
        size_t k = bytes - i < DIST_CHUNK ? bytes - i : DIST_CHUNK;
        MPI_Bcast((char *)buf + i, (int)k, MPI_BYTE, root, MPI_COMM_WORLD);
    }
    COMM_END;
}

void dist_broadcast(void *buf, size_t bytes) { dist_broadcast_from(buf, bytes, 0); }

void dist_broadcast_string(char *buf, size_t n) {
    dist_broadcast(buf, n);
    buf[n - 1] = '\0';
}

void dist_send(const void *buf, size_t bytes, int to) {
    for (size_t i = 0; i < bytes; i += DIST_CHUNK) {
        size_t k = bytes - i < DIST_CHUNK ? bytes - i : DIST_CHUNK;
        MPI_Send((const char *)buf + i, (int)k, MPI_BYTE, to, 0, MPI_COMM_WORLD);
    }
}

void dist_recv(void *buf, size_t bytes, int from) {
    for (size_t i = 0; i < bytes; i += DIST_CHUNK) {
        size_t k = bytes - i < DIST_CHUNK ? bytes - i : DIST_CHUNK;
        MPI_Recv((char *)buf + i, (int)k, MPI_BYTE, from, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    }
}

int dist_quiet(char *err) {
    if (rank == 0 || getenv("MOELAB_ALL_RANKS") || errors) return 0;
    int null = open("/dev/null", O_WRONLY), saved = dup(STDERR_FILENO);
    if (null < 0 || saved < 0 || !(errors = fdopen(saved, "w"))) {
        if (null >= 0) close(null);
        if (saved >= 0) close(saved);
        return ml_error(err, "cannot silence rank %d's output", rank);
    }
    setvbuf(errors, NULL, _IOLBF, 0);
    fflush(stdout);
    fflush(stderr);
    dup2(null, STDOUT_FILENO);
    dup2(null, STDERR_FILENO);
    close(null);
    return 0;
}

FILE *dist_errors(void) { return errors ? errors : stderr; }

/* A rank's call in dist_agree: what, then where, each NUL-terminated. */
typedef struct {
    char what[256];
    char where[208];
} DistCall;

void dist_agree(const char *what, const char *where) {
    if (size == 1) return;
    DistCall mine;
    memset(&mine, 0, sizeof mine);
    snprintf(mine.what, sizeof mine.what, "%s", what);
    snprintf(mine.where, sizeof mine.where, "%s", where ? where : "");
    DistCall *all = malloc(sizeof *all * (size_t)size);
    if (!all) dist_fail("out of memory");
    COMM_BEGIN;
    MPI_Allgather(&mine, (int)sizeof mine, MPI_BYTE, all, (int)sizeof mine, MPI_BYTE, MPI_COMM_WORLD);
    COMM_END;
    int same = 1;
    for (int r = 0; r < size; r++)
        same &= strcmp(all[r].what, mine.what) == 0 && strcmp(all[r].where, mine.where) == 0;
    if (same) {
        free(all);
        return;
    }
    char msg[2048];
    size_t n = (size_t)snprintf(msg, sizeof msg, "the ranks are at different calls:");
    for (int r = 0; r < size && n < sizeof msg; r++)
        n += (size_t)snprintf(msg + n, sizeof msg - n, "%s rank %d at %s%s%s%s", r ? "," : "", r,
                              all[r].what, all[r].where[0] ? " (" : "", all[r].where,
                              all[r].where[0] ? ")" : "");
    if (n < sizeof msg)
        snprintf(msg + n, sizeof msg - n, ". Every rank must make the same collective calls in "
                 "the same order, training and evaluating alike: an error raised on one rank and caught there with pcall, or a "
                 "branch on moelab.rank, sends them different ways");
    free(all);
    if (rank != 0) sleep(2); /* rank 0 says it, and stops the others */
    dist_fail(msg);
}

_Noreturn void dist_fail(const char *msg) {
    fprintf(dist_errors(), "moelab: [rank %d of %d] %s; stopping every rank\n", rank, size,
            msg ? msg : "failed");
    fflush(dist_errors());
    if (started) MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}
