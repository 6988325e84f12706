/*
** moe/parallel.c — expert parallelism over MPI ranks (moe.parallel =
** "experts"; dist.h). Every rank routes its own tokens and groups their
** assignments by expert (layer.c); then
**
**   1. the ranks exchange how many rows each sends each expert (allgather);
**   2. each rank sends every other rank the rows of the experts it holds
**      (MPI_Alltoallv, in rows of d_model floats), expert by expert;
**   3. each rank runs its experts on their rows from every rank, as one
**      product per expert (moe_rows_forward), rank 0's rows first;
**   4. the outputs go back the same way, into the senders' s->ye;
**
** and backward the same: the rows' output gradients out, their input
** gradients back, the experts' weight gradients on the rank that ran them.
** Those are the whole batch's sums: divided by the ranks, the gradient one
** process would have. The training state is sharded too (trainer.c,
** Model.owner): a rank keeps the gradients and AdamW moments of its own
** experts only and updates only their weights; when a training call ends,
** each rank sends its experts' weights to the others, so that every rank
** holds the whole model between calls (model:loss, sample, save).
**
** Expert e runs on rank placement[e] (moe.placement) or, by default, on
** rank floor(e · N / E): E/N consecutive experts a rank.
*/
#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "dist.h"
#include "moe/moe.h"

/* A layer's exchange: what its backward pass needs from its forward. */
struct MoeExchange {
    int ranks, E, C;
    int valid;                /* filled by a parallel forward */
    int *rank_of;             /* (E) */
    int *sent;                /* (ranks, E) rows rank r sent expert e */
    int *send_rows, *recv_rows; /* (ranks) this rank's, by rank */
    /* this rank's experts' rows from every rank, expert by expert (MoeRows) */
    int *counts, *offsets;    /* (E), (E + 1) */
    size_t *hoff;             /* (E + 1) */
    float *xe, *he, *ge, *ae; /* the experts' inputs and activations */
    size_t cap_rows, cap_hidden;
};

/* What lives only while one exchange runs, forward or backward: the rows
** sent and received and the experts' outputs and gradients. One exchange
** runs at a time in a process (every layer's, every model's, in turn), so
** they share these, which grow only and last as long as the process. */
static struct {
    float *send, *recv;       /* rows in rank order: to send, received */
    float *ye, *dye, *dxe;    /* (rows, C) in expert order */
    float *dae, *dhe, *dge;   /* (hidden) */
    size_t cap_send, cap_recv, cap_rows, cap_hidden; /* floats */
} work;

void moe_exchange_free(MoeExchange *ex) {
    if (!ex) return;
    free(ex->rank_of); free(ex->sent); free(ex->send_rows); free(ex->recv_rows);
    free(ex->counts); free(ex->offsets); free(ex->hoff);
    free(ex->xe); free(ex->he); free(ex->ge); free(ex->ae);
    free(ex);
}

int moe_parallel(const MoeConfig *mc) { return mc->parallel_experts && dist_active(); }

/* Expert e's rank among `ranks`: placement[e], or E/N consecutive a rank. */
static int expert_rank(const MoeConfig *mc, int ranks, int e) {
    return mc->n_placement ? mc->placement[e] : (int)((int64_t)e * ranks / mc->experts);
}

void moe_placement(const MoeConfig *mc, int ranks, int *rank_of) {
    for (int e = 0; e < mc->experts; e++) rank_of[e] = expert_rank(mc, ranks, e);
}

int moe_expert_here(const MoeConfig *mc, int e) {
    return !moe_parallel(mc) || expert_rank(mc, dist_size(), e) == dist_rank();
}

int moe_check_placement(const MoeConfig *mc, char *err) {
    if (!moe_parallel(mc) || !mc->n_placement) return 0;
    for (int e = 0; e < mc->experts; e++)
        if (mc->placement[e] >= dist_size())
            return ml_error(err, "'moe.placement' puts expert %d on rank %d, but there are %d ranks",
                            e, mc->placement[e], dist_size());
    return 0;
}

static int ensure_exchange(MoeState *s, int ranks) {
    MoeExchange *ex = s->ex;
    if (ex && ex->ranks == ranks && ex->E == s->E) return 0;
    moe_exchange_free(ex);
    s->ex = ex = calloc(1, sizeof *ex);
    if (!ex) return -1;
    ex->ranks = ranks;
    ex->E = s->E;
    size_t E = (size_t)s->E;
    if (!(ex->rank_of = malloc(sizeof(int) * E)) || !(ex->sent = malloc(sizeof(int) * E * ranks)) ||
        !(ex->send_rows = malloc(sizeof(int) * ranks)) ||
        !(ex->recv_rows = malloc(sizeof(int) * ranks)) || !(ex->counts = malloc(sizeof(int) * E)) ||
        !(ex->offsets = malloc(sizeof(int) * (E + 1))) ||
        !(ex->hoff = malloc(sizeof(size_t) * (E + 1)))) {
        moe_exchange_free(ex);
        s->ex = NULL;
        return -1;
    }
    return 0;
}

/* Room for A rows and `hidden` activations of this rank's experts, with
** their gradients (the work's), and for the rows sent and received. */
static int ensure_rows(MoeExchange *ex, size_t A, size_t hidden, size_t send, size_t recv,
                       int swiglu) {
    size_t C = (size_t)ex->C;
    if (A > ex->cap_rows) {
        size_t n = A + A / 4;
        if (ML_GROW(ex->xe, n * C)) return -1;
        ex->cap_rows = n;
    }
    if (hidden > ex->cap_hidden || (swiglu && !ex->ge)) {
        size_t n = hidden + hidden / 4 > ex->cap_hidden ? hidden + hidden / 4 : ex->cap_hidden;
        if (ML_GROW(ex->he, n) || ML_GROW(ex->ae, n) || (swiglu && ML_GROW(ex->ge, n))) return -1;
        ex->cap_hidden = n;
    }
    if (A * C > work.cap_rows) {
        size_t n = A * C + A * C / 4;
        if (ML_GROW(work.ye, n) || ML_GROW(work.dye, n) || ML_GROW(work.dxe, n)) return -1;
        work.cap_rows = n;
    }
    if (hidden > work.cap_hidden || (swiglu && !work.dge)) {
        size_t n = hidden + hidden / 4 > work.cap_hidden ? hidden + hidden / 4 : work.cap_hidden;
        if (ML_GROW(work.dae, n) || ML_GROW(work.dhe, n) || (swiglu && ML_GROW(work.dge, n)))
            return -1;
        work.cap_hidden = n;
    }
    if (send * C > work.cap_send) {
        if (ML_GROW(work.send, send * C + send * C / 4)) return -1;
        work.cap_send = send * C + send * C / 4;
    }
    if (recv * C > work.cap_recv) {
        if (ML_GROW(work.recv, recv * C + recv * C / 4)) return -1;
        work.cap_recv = recv * C + recv * C / 4;
    }
    return 0;
}

/* Between this rank's grouped rows (layer order: expert by expert) and the
** rows it sends (rank by rank, each rank's experts in order). */
static void by_rank(const MoeExchange *ex, const MoeState *s, float *sent, float *rows, int out) {
    size_t C = (size_t)ex->C, at = 0;
    for (int d = 0; d < ex->ranks; d++)
        for (int e = 0; e < ex->E; e++) {
            if (ex->rank_of[e] != d) continue;
            size_t n = (size_t)s->counts[e] * C;
            float *mine = rows + (size_t)s->offsets[e] * C;
            if (out) memcpy(sent + at, mine, sizeof(float) * n);
            else memcpy(mine, sent + at, sizeof(float) * n);
            at += n;
        }
}

/* Between the rows received (rank by rank, this rank's experts in order)
** and this rank's experts' rows (expert by expert, ranks in order). */
static void by_expert(const MoeExchange *ex, const float *received, float *rows, int in) {
    size_t C = (size_t)ex->C, at = 0;
    int me = dist_rank();
    for (int r = 0; r < ex->ranks; r++)
        for (int e = 0; e < ex->E; e++) {
            if (ex->rank_of[e] != me) continue;
            size_t before = 0; /* rows of e from ranks before r */
            for (int q = 0; q < r; q++) before += (size_t)ex->sent[(size_t)q * ex->E + e];
            size_t n = (size_t)ex->sent[(size_t)r * ex->E + e] * C;
            float *row = rows + ((size_t)ex->offsets[e] + before) * C;
            if (in) memcpy(row, received + at, sizeof(float) * n);
            else memcpy((float *)received + at, row, sizeof(float) * n);
            at += n;
        }
}

static MoeRows exchange_rows(const MoeExchange *ex) {
    return (MoeRows){.E = ex->E, .C = ex->C, .counts = ex->counts, .offsets = ex->offsets,
                     .hoff = ex->hoff, .xe = ex->xe, .he = ex->he, .ge = ex->ge, .ae = ex->ae,
                     .ye = work.ye, .dye = work.dye, .dxe = work.dxe, .dae = work.dae,
                     .dhe = work.dhe, .dge = work.dge};
}

int moe_parallel_forward(MoeState *s, const MoeConfig *mc, ActKind act, const MoeWeights *w,
                         char *err) {
    int R = dist_size(), me = dist_rank(), E = s->E;
    if (ensure_exchange(s, R) != 0) return ml_error(err, "out of memory for expert parallelism");
    MoeExchange *ex = s->ex;
    ex->C = s->C;
    ex->valid = 0;
    moe_placement(mc, R, ex->rank_of);
    for (int e = 0; e < E; e++)
        if (ex->rank_of[e] >= R)
            return ml_error(err, "'moe.placement' puts expert %d on rank %d, but there are %d ranks",
                            e, ex->rank_of[e], R);
    /* 1. who sends what */
    dist_allgather_int(s->counts, E, ex->sent);
    size_t recv = 0;
    for (int r = 0; r < R; r++) ex->send_rows[r] = ex->recv_rows[r] = 0;
    for (int e = 0; e < E; e++) {
        ex->send_rows[ex->rank_of[e]] += s->counts[e];
        ex->counts[e] = 0;
        if (ex->rank_of[e] != me) continue;
        for (int r = 0; r < R; r++) {
            ex->recv_rows[r] += ex->sent[(size_t)r * E + e];
            ex->counts[e] += ex->sent[(size_t)r * E + e];
        }
        recv += (size_t)ex->counts[e];
    }
    ex->offsets[0] = 0;
    ex->hoff[0] = 0;
    for (int e = 0; e < E; e++) {
        ex->offsets[e + 1] = ex->offsets[e] + ex->counts[e];
        ex->hoff[e + 1] = ex->hoff[e] + (size_t)ex->counts[e] * mc->hidden[e];
    }
    size_t A = (size_t)s->offsets[E];
    if (ensure_rows(ex, recv, ex->hoff[E], A, recv, act == ACT_SWIGLU) != 0)
        return ml_error(err, "out of memory for expert parallelism");
    /* 2. the rows out; 3. the experts; 4. their outputs back */
    by_rank(ex, s, work.send, s->xe, 1);
    dist_alltoall_rows(work.send, ex->send_rows, work.recv, ex->recv_rows, ex->C);
    by_expert(ex, work.recv, ex->xe, 1);
    MoeRows v = exchange_rows(ex);
    moe_rows_forward(&v, mc, act, w);
    by_expert(ex, work.recv, work.ye, 0);
    dist_alltoall_rows(work.recv, ex->recv_rows, work.send, ex->send_rows, ex->C);
    by_rank(ex, s, work.send, s->ye, 0);
    ex->valid = 1;
    return 0;
}

int moe_parallel_backward(MoeState *s, MoeScratch *scr, const MoeConfig *mc, ActKind act,
                          const MoeWeights *w, MoeWeights *g, char *err) {
    MoeExchange *ex = s->ex;
    assert(ex && ex->valid);
    size_t A = (size_t)s->offsets[s->E], recv = (size_t)ex->offsets[ex->E];
    if (ensure_rows(ex, recv, ex->hoff[ex->E], A, recv, act == ACT_SWIGLU) != 0)
        return ml_error(err, "out of memory for expert parallelism");
    by_rank(ex, s, work.send, scr->dye, 1);
    dist_alltoall_rows(work.send, ex->send_rows, work.recv, ex->recv_rows, ex->C);
    by_expert(ex, work.recv, work.dye, 1);
    MoeRows v = exchange_rows(ex);
    moe_rows_backward(&v, mc, act, w, g, NULL, NULL);
    by_expert(ex, work.recv, work.dxe, 0);
    dist_alltoall_rows(work.recv, ex->recv_rows, work.send, ex->send_rows, ex->C);
    by_rank(ex, s, work.send, scr->dxe, 0);
    return 0;
}

int moe_parallel_rows(const MoeState *s, MoeRows *v) {
    if (!s->ex || !s->ex->valid) return 0;
    *v = exchange_rows(s->ex);
    return 1;
}

void moe_parallel_traffic(const MoeState *s, int ranks, int64_t *tokens) {
    const MoeExchange *ex = s->ex;
    if (!ex || !ex->valid || ex->ranks != ranks) return;
    for (int r = 0; r < ranks; r++)
        for (int e = 0; e < ex->E; e++)
            tokens[(size_t)r * ranks + ex->rank_of[e]] += ex->sent[(size_t)r * ex->E + e];
}
