/*
** recwriter.h — writes a recorded evaluation's routing and token_stats rows
** on a background thread while the caller computes the next batch.
**
** The thread runs at idle priority (SCHED_IDLE): it takes only the CPU time
** the computation leaves, at its barriers and serial parts, and never holds
** up the threads that compute. When that is not enough, the caller can leave
** it a core (recw_backlog_seconds tells when). The caller does not wait for
** batches to be written: recw_finish writes whatever is still queued on the
** caller's own thread, at its own priority, once the thread has finished the
** chunk in hand (1024 rows, a fraction of a millisecond of CPU, but longer
** when other processes keep the cores busy).
**
**     RecWriter *w;
**     recw_start(&w, rec, run_id, eval_id, err);      after rec_eval
**     for each batch:
**         RecBatch *b = recw_batch(w);                 NULL: out of memory
**         ... fill b->routing / b->tokens (recw_reserve grows them) ...
**         recw_submit(w, b, err);
**     recw_finish(w, err);                             or recw_abort(w)
**
** The recorder belongs to the writer from recw_start until recw_finish or
** recw_abort return: the caller must not use it in between.
*/
#ifndef MOELAB_RECWRITER_H
#define MOELAB_RECWRITER_H

#include <stddef.h>
#include <stdint.h>

#include "recorder.h"

/* One batch's rows. The writer owns the arrays and keeps them for reuse. */
typedef struct {
    RecRouting *routing;
    size_t n_routing, cap_routing;
    RecTokenStat *tokens;
    size_t n_tokens, cap_tokens;
} RecBatch;

typedef struct RecWriter RecWriter;

int recw_start(RecWriter **out, Recorder *rec, int64_t run_id, int64_t eval_id, char *err);

/* An empty batch to fill (a written one again when there is one); NULL when
** out of memory. */
RecBatch *recw_batch(RecWriter *w);

/* Room for at least n_routing routing rows and n_tokens token rows in all. */
int recw_reserve(RecBatch *b, size_t n_routing, size_t n_tokens);

/* Queues b, from recw_batch; the writer owns it again, whatever the result.
** Reports a failure of an earlier write. */
int recw_submit(RecWriter *w, RecBatch *b, char *err);

/* The CPU time the queued rows will take to write, at the rate the thread
** has measured so far; -1 before its first chunk. The caller can use it to
** give the thread a core of its own when it falls behind (trainer.c). */
double recw_backlog_seconds(RecWriter *w);

/* Stops the thread, writes what is left, frees the writer. */
int recw_finish(RecWriter *w, char *err);

/* Stops the thread and frees the writer; rows not yet written are dropped. */
void recw_abort(RecWriter *w);

#endif
