/*
** recwriter.c — the background writer of recwriter.h.
**
** Batches wait in a FIFO; the thread writes the head batch a chunk at a time
** (routing rows, then token rows) and puts finished batches on a spare list
** for recw_batch to hand out again, so the buffers stop growing after the
** first few batches. The queue has no bound, so the caller never waits for a
** batch to be written (on a machine busy with other work, an idle-priority
** thread may get almost no CPU); at worst it holds the whole evaluation's
** rows, as it would if it wrote them all at the end.
**
** Between chunks the thread looks at `closing`; recw_finish sets it, joins
** the thread and goes on from the same row on its own thread. The recorder is
** only ever used by one thread at a time: the writer's until it is joined,
** the caller's after. The join waits for the chunk in hand: a fraction of a
** millisecond of CPU, longer in wall time when other processes keep the
** cores busy and the idle-priority thread gets little of them. The thread
** holds the lock only to read and update the queue, never to allocate (the
** spare list is grown by recw_batch), so the caller does not wait on it
** otherwise.
*/
#include "recwriter.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Rows per call of the recorder: about 0.3 ms of SQLite, what recw_finish
** may wait for the thread to finish. A call costs a few microseconds more
** than its rows (savepoint, evaluation check, range update). */
enum { CHUNK = 1024 };

struct RecWriter {
    Recorder *rec;
    int64_t run_id, eval_id;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    RecBatch **fifo;            /* fifo[head .. tail) wait to be written */
    size_t head, tail, cap;
    size_t done_routing;        /* rows of fifo[head] already written */
    size_t done_tokens;
    RecBatch **spare;           /* written batches, to be filled again */
    size_t n_spare, cap_spare;  /* cap_spare >= every batch made: no realloc */
    size_t n_batches;           /* batches made by recw_batch */
    size_t queued;              /* rows submitted and not yet written */
    double row_seconds;         /* the thread's CPU time per row written */
    double measured_rows;       /* rows behind row_seconds */
    int closing;                /* recw_finish or recw_abort: the thread stops */
    int failed;                 /* a write failed; err says why */
    char err[ML_ERRLEN];
};

int recw_reserve(RecBatch *b, size_t n_routing, size_t n_tokens) {
    /* half again what is asked, so that a slightly larger batch fits */
    if (n_routing > b->cap_routing) {
        if (ML_GROW(b->routing, n_routing + n_routing / 2)) return -1;
        b->cap_routing = n_routing + n_routing / 2;
    }
    if (n_tokens > b->cap_tokens) {
        if (ML_GROW(b->tokens, n_tokens + n_tokens / 2)) return -1;
        b->cap_tokens = n_tokens + n_tokens / 2;
    }
    return 0;
}

static void batch_free(RecBatch *b) {
    if (!b) return;
    free(b->routing);
    free(b->tokens);
    free(b);
}

/* Writes the next chunk of b from *done_routing / *done_tokens on, and moves
** them past it. No lock is held: the calling thread owns the recorder. */
static int write_chunk(RecWriter *w, const RecBatch *b, size_t *done_routing,
                       size_t *done_tokens, char *err) {
    if (*done_routing < b->n_routing) {
        size_t n = b->n_routing - *done_routing;
        n = n < CHUNK ? n : CHUNK;
        if (rec_routing(w->rec, w->run_id, w->eval_id, b->routing + *done_routing, n, err))
            return -1;
        *done_routing += n;
    } else if (*done_tokens < b->n_tokens) { /* a batch may have none: b->tokens NULL */
        size_t n = b->n_tokens - *done_tokens;
        n = n < CHUNK ? n : CHUNK;
        if (rec_token_stats(w->rec, w->run_id, w->eval_id, b->tokens + *done_tokens, n, err))
            return -1;
        *done_tokens += n;
    }
    /* a long evaluation commits as it goes, so that the WAL stays bounded */
    return rec_commit_due(w->rec) ? rec_flush(w->rec, err) : 0;
}

/* Notes the head batch's progress; a finished batch goes to the spares.
** Called with the lock held (or once the thread is joined). */
static void advance(RecWriter *w, size_t done_routing, size_t done_tokens) {
    RecBatch *b = w->fifo[w->head];
    w->queued -= (done_routing - w->done_routing) + (done_tokens - w->done_tokens);
    w->done_routing = done_routing;
    w->done_tokens = done_tokens;
    if (done_routing < b->n_routing || done_tokens < b->n_tokens)
        return;
    w->head++;
    w->done_routing = w->done_tokens = 0;
    w->spare[w->n_spare++] = b;   /* room made by recw_batch */
}

/* CPU time of the calling thread: what a chunk costs, however long the
** thread waited for a core. */
static double thread_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *writer_main(void *arg) {
    RecWriter *w = arg;
    /* best effort: without it the thread competes with the computation */
    struct sched_param idle = {0};
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &idle);
    char err[ML_ERRLEN];
    pthread_mutex_lock(&w->lock);
    for (;;) {
        while (w->head == w->tail && !w->closing)
            pthread_cond_wait(&w->wake, &w->lock);
        if (w->closing)
            break;
        const RecBatch *b = w->fifo[w->head];
        size_t done_routing = w->done_routing, done_tokens = w->done_tokens;
        size_t before = done_routing + done_tokens;
        pthread_mutex_unlock(&w->lock);
        double t0 = thread_seconds();
        int rc = write_chunk(w, b, &done_routing, &done_tokens, err);
        double dt = thread_seconds() - t0;
        pthread_mutex_lock(&w->lock);
        if (rc) {
            w->failed = 1;
            memcpy(w->err, err, sizeof err);
            break;
        }
        /* a running mean over the last few thousand rows (routing and
        ** token rows alike: they cost about the same) */
        double n = (double)(done_routing + done_tokens - before);
        if (n > 0.0) {
            double keep = w->measured_rows > 4096.0 ? 4096.0 : w->measured_rows;
            w->row_seconds = (w->row_seconds * keep + dt) / (keep + n);
            w->measured_rows = keep + n;
        }
        advance(w, done_routing, done_tokens);
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

int recw_start(RecWriter **out, Recorder *rec, int64_t run_id, int64_t eval_id, char *err) {
    RecWriter *w = calloc(1, sizeof *w);
    if (!w) return ml_error(err, "out of memory starting the evaluation's writer");
    w->rec = rec;
    w->run_id = run_id;
    w->eval_id = eval_id;
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->wake, NULL);
    int rc = pthread_create(&w->thread, NULL, writer_main, w);
    if (rc != 0) {
        pthread_cond_destroy(&w->wake);
        pthread_mutex_destroy(&w->lock);
        free(w);
        return ml_error(err, "cannot start the evaluation's writer thread: %s", strerror(rc));
    }
    *out = w;
    return 0;
}

RecBatch *recw_batch(RecWriter *w) {
    RecBatch *b = NULL;
    pthread_mutex_lock(&w->lock);
    if (w->n_spare > 0) {
        b = w->spare[--w->n_spare];
    } else {
        /* a new batch, and first room for it on the spare list, where it
        ** goes once written: the thread never allocates */
        if (w->n_batches == w->cap_spare) {
            size_t cap = w->cap_spare ? 2 * w->cap_spare : 4;
            RecBatch **p = realloc(w->spare, cap * sizeof *p);
            if (p) {
                w->spare = p;
                w->cap_spare = cap;
            }
        }
        if (w->n_batches < w->cap_spare && (b = calloc(1, sizeof *b)))
            w->n_batches++;
    }
    pthread_mutex_unlock(&w->lock);
    if (b)
        b->n_routing = b->n_tokens = 0;
    return b;
}

int recw_submit(RecWriter *w, RecBatch *b, char *err) {
    int status = 0;
    pthread_mutex_lock(&w->lock);
    if (w->failed) {
        status = ml_error(err, "%s", w->err);
    } else {
        if (w->tail == w->cap && w->head > 0) {     /* slide the queue down */
            memmove(w->fifo, w->fifo + w->head, (w->tail - w->head) * sizeof *w->fifo);
            w->tail -= w->head;
            w->head = 0;
        }
        if (w->tail == w->cap) {
            size_t cap = w->cap ? 2 * w->cap : 8;
            RecBatch **p = realloc(w->fifo, cap * sizeof *p);
            if (p) {
                w->fifo = p;
                w->cap = cap;
            }
        }
        if (w->tail < w->cap) {
            w->queued += b->n_routing + b->n_tokens;
            w->fifo[w->tail++] = b;
            b = NULL;
            pthread_cond_signal(&w->wake);
        } else {
            status = ml_error(err, "out of memory queueing the evaluation's rows");
        }
    }
    pthread_mutex_unlock(&w->lock);
    batch_free(b);      /* not queued */
    return status;
}

double recw_backlog_seconds(RecWriter *w) {
    pthread_mutex_lock(&w->lock);
    double s = w->measured_rows > 0.0 ? (double)w->queued * w->row_seconds : -1.0;
    pthread_mutex_unlock(&w->lock);
    return s;
}

/* Stops and joins the thread. */
static void stop(RecWriter *w) {
    pthread_mutex_lock(&w->lock);
    w->closing = 1;
    pthread_cond_signal(&w->wake);
    pthread_mutex_unlock(&w->lock);
    pthread_join(w->thread, NULL);
}

static void writer_free(RecWriter *w) {
    for (size_t i = w->head; i < w->tail; i++) batch_free(w->fifo[i]);
    for (size_t i = 0; i < w->n_spare; i++) batch_free(w->spare[i]);
    free(w->fifo);
    free(w->spare);
    pthread_cond_destroy(&w->wake);
    pthread_mutex_destroy(&w->lock);
    free(w);
}

int recw_finish(RecWriter *w, char *err) {
    stop(w);
    int status = 0;
    if (w->failed) {
        status = ml_error(err, "%s", w->err);
    } else {
        while (w->head < w->tail) {
            size_t done_routing = w->done_routing, done_tokens = w->done_tokens;
            if (write_chunk(w, w->fifo[w->head], &done_routing, &done_tokens, err)) {
                status = -1;
                break;
            }
            advance(w, done_routing, done_tokens);
        }
    }
    writer_free(w);
    return status;
}

void recw_abort(RecWriter *w) {
    stop(w);
    writer_free(w);
}
