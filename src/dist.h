/*
** dist.h — several processes as one run: data parallelism over MPI ranks
** (and the collectives expert parallelism uses, moe/parallel.c).
**
** `mpirun -np N moelab run script.lua` starts N copies of the script. Each
** rank holds the whole model and runs the same Lua statements in the same
** order; the trainer cuts every batch into N slices (rank r takes rows
** r·B .. r·B + B − 1 of the N·B rows one process would draw), averages the
** gradients over the ranks before each AdamW step, and reduces what it
** records, so that N ranks with batch B train as one process with batch N·B
** (README, Several machines). Rank 0 alone opens the database and writes it;
** the others send it what it records and receive what it queries.
**
** A plain `moelab` (no launcher in the environment) never calls MPI: every
** function here is then a no-op or the identity, for one rank. A rank that
** fails inside the collective part of a run calls dist_fail, which prints
** the message and aborts every rank (MPI_Abort), so none waits forever.
*/
#ifndef MOELAB_DIST_H
#define MOELAB_DIST_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Starts MPI when an MPI launcher started this process (Open MPI's, or one
** that sets PMIX_RANK or PMI_SIZE); else nothing. 0, or -1 with err. */
int dist_init(int *argc, char ***argv, char *err);
void dist_finalize(void);
int dist_rank(void);   /* 0 .. dist_size() − 1 */
int dist_size(void);   /* 1 without a launcher */
int dist_active(void); /* more than one rank */

/* In place, over every rank: sums (the result is the same on every rank). */
void dist_sum_float(float *x, size_t n);
void dist_sum_double(double *x, size_t n);
void dist_sum_int64(int64_t *x, size_t n);
/* Returns when every rank has called it. */
void dist_barrier(void);
/* The largest of the ranks' x, on every rank. */
int dist_max_int(int x);
/* Every rank's n ints, rank r's at all + r·n. */
void dist_allgather_int(const int *mine, int n, int *all);
/* All to all, in rows of `width` floats: send_rows[d] rows to rank d from
** send (rank by rank), recv_rows[s] rows from rank s into recv. */
void dist_alltoall_rows(const float *send, const int *send_rows, float *recv, const int *recv_rows,
                        int width);
/* Seconds this process has spent in the functions here that communicate
** (what a step's wall time owes to the network; 0 for one rank). */
double dist_comm_seconds(void);
/* Rank 0's bytes to every rank. */
void dist_broadcast(void *buf, size_t bytes);
/* Rank root's bytes to every rank. */
void dist_broadcast_from(void *buf, size_t bytes, int root);
/* Rank 0's string (at most n bytes with its NUL) into every rank's buf. */
void dist_broadcast_string(char *buf, size_t n);
/* Point to point, bytes. */
void dist_send(const void *buf, size_t bytes, int to);
void dist_recv(void *buf, size_t bytes, int from);

/* On ranks other than 0, sends standard output and error to /dev/null (so
** that a script speaks once), unless MOELAB_ALL_RANKS is set; errors still
** go to dist_errors(). 0, or -1 with err. */
int dist_quiet(char *err);
/* Where this rank's errors go: stderr, or its own stderr before dist_quiet. */
FILE *dist_errors(void);

/* Before a collective call a script makes (db:query, run:train, ...): each
** rank says which call (`what`) and from where in the script (`where`,
** "file:line"). When the ranks are not all at the same call from the same
** place (an error raised on one rank and caught there with pcall, a branch
** on moelab.rank), every rank stops, saying where each was, instead of
** running mismatched collectives or waiting forever. Nothing for one rank. */
void dist_agree(const char *what, const char *where);

/* Prints "moelab: [rank r] msg" and stops every rank with exit code 1. */
_Noreturn void dist_fail(const char *msg);

#endif
