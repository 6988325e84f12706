/*
** trainer.c — training and evaluation loops of a recorded run (trainer.h).
*/
#include "trainer.h"

#include <cblas.h>
#include <gsl/gsl_rng.h>
#include <math.h>
#include <omp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dist.h"
#include "json.h"
#include "machine.h"
#include "recwriter.h"

volatile int trainer_interrupt = 0;

/* OpenBLAS's own setter; declared here since not every cblas.h has it. */
void openblas_set_num_threads(int num_threads);

static int threads_set = 0;

void trainer_set_threads(int n) {
    if (n <= 0 && threads_set) return; /* keep what moelab.threads chose */
    threads_set = 1;
    if (n <= 0) n = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (n <= 0) n = 1;
    /* OpenBLAS runs single-threaded inside our OpenMP threads: its own pool
    ** would spin against them for the same cores */
    openblas_set_num_threads(1);
    omp_set_num_threads(n);
}

void train_options_defaults(TrainOptions *o) {
    memset(o, 0, sizeof *o);
    o->steps = 1000;
    o->batch = 16;
    o->lr = 3e-3f;
    o->min_lr = 0.0f;
    o->warmup = 50;
    o->weight_decay = 0.0f;
    o->clip = 0.0f;
    o->beta1 = 0.9f;
    o->beta2 = 0.95f;
    o->eps = 1e-8f;
    o->eval_every = 0;
    o->eval_batches = 20;
    o->eval_batch = 0;
    o->threads = 0;
    o->progress = -1;
    o->probe_every = 0;
    o->probe_batch = 8;
    o->probe_seed = 4321;
}

void eval_options_defaults(EvalOptions *o) {
    memset(o, 0, sizeof *o);
    o->batches = 20;
    o->batch = 16;
    o->split = SPLIT_VAL;
    o->seed = 1234;
    o->record = 0;
}

float trainer_lr(const TrainOptions *o, int s) {
    if (s < o->warmup) return o->lr * (float)(s + 1) / (float)o->warmup;
    int decay = o->steps - o->warmup;
    if (decay <= 0) return o->lr;
    double frac = (double)(s - o->warmup) / decay;
    return (float)(o->min_lr + 0.5 * (o->lr - o->min_lr) * (1.0 + cos(M_PI * frac)));
}

static double now_ms(void) { return 1e3 * machine_clock(); }

int trainer_init(Trainer *t, Model *model, Corpus *corpus, Recorder *rec, int64_t run_id,
                 const char *name, uint64_t seed, char *err) {
    memset(t, 0, sizeof *t);
    t->model = model;
    t->corpus = corpus;
    t->rec = rec;
    t->records = rec != NULL;
    t->run_id = run_id;
    t->probed_at = -1;
    snprintf(t->name, sizeof t->name, "%s", name ? name : "run");
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    if (!rng) return ml_error(err, "out of memory");
    gsl_rng_set(rng, (unsigned long)seed);
    t->rng = rng;
    model_seed_noise(model, seed);
    return 0;
}

void trainer_free(Trainer *t) {
    if (t->rng) gsl_rng_free((gsl_rng *)t->rng);
    free(t->inputs);
    free(t->targets);
    free(t->trace);
    free(t->load);
    free(t->dropped);
    free(t->mass);
    free(t->traffic);
    memset(t, 0, sizeof *t);
}

/* Room for B x T token ids; model_check_batch has bounded B x T. */
static int ensure_batch(Trainer *t, int B, int T, char *err) {
    size_t need = (size_t)B * (size_t)T;
    if (need <= t->cap) return 0;
    free(t->inputs);
    free(t->targets);
    t->inputs = malloc(sizeof(int) * (size_t)need);
    t->targets = malloc(sizeof(int) * (size_t)need);
    if (!t->inputs || !t->targets) {
        t->cap = 0;
        return ml_error(err, "out of memory for a batch of %d x %d", B, T);
    }
    t->cap = need;
    return 0;
}

volatile int trainer_stopped_by = 0;

static void sigint_handler(int sig) {
    trainer_interrupt = sig;
    signal(sig, SIG_DFL); /* a second one ends the process */
}

/* The signal that asked to stop, over every rank (the largest number: one
** that a single rank took, SIGTERM from a scheduler, is named on every rank,
** not taken for Ctrl-C), or 0: when there is one the flag is cleared and
** trainer_stopped_by set. (1 is SIGHUP, not a boolean Ctrl-C.) */
static int take_interrupt(void) {
    int sig = dist_max_int(trainer_interrupt);
    if (sig) {
        trainer_interrupt = 0;
        trainer_stopped_by = sig;
    }
    return sig;
}

const char *trainer_signal_name(int sig) {
    return sig == SIGTERM ? "SIGTERM" : sig == SIGHUP ? "SIGHUP" : "Ctrl-C";
}

static void format_duration(char *buf, size_t n, double s) {
    if (!(s >= 0) || s > 1e7) snprintf(buf, n, "?");
    else if (s < 60) snprintf(buf, n, "%.0fs", s);
    else if (s < 3600) snprintf(buf, n, "%dm%02ds", (int)s / 60, (int)s % 60);
    else snprintf(buf, n, "%dh%02dm", (int)s / 3600, ((int)s % 3600) / 60);
}

/* Rows of one step's expert load: every MoE layer × expert, from the last forward. */
/* A recorded evaluation's sparsity sums over its batches, per (layer, expert). */
typedef struct {
    int64_t *activations, *near_zero;
    double *abs_sum;
} EvalSparsity;

/* The last forward's routing and token rows (batch i) into b, from each MoE
** layer's route trace; its sparsity into sp. Routing rows go layer by layer,
** each pass by pass in (seq, pos, rank) order. */
static int eval_record_batch(RecBatch *b, EvalSparsity *sp, Trainer *t, int seq0, int B, int T) {
    Model *m = t->model;
    const ModelConfig *c = &m->config;
    const MoeConfig *mc = &c->moe;
    int N = B * T, E = mc->experts;
    size_t n_routing = 0;
    for (int l = 0; l < c->layers; l++)
        if (config_is_moe_block(c, l)) n_routing += moe_trace_count(&m->moe[l]);
    if (recw_reserve(b, n_routing, (size_t)N) != 0) return -1;
    if (n_routing > t->trace_cap) {
        if (ML_GROW(t->trace, n_routing)) return -1;
        t->trace_cap = n_routing;
    }
    RecRouting *out = b->routing;
    for (int l = 0; l < c->layers; l++) {
        if (!config_is_moe_block(c, l)) continue;
        const MoeLayer *layer = &m->moe[l];
        size_t n = moe_trace_routes(layer, mc, t->trace);
        for (size_t j = 0; j < n; j++) {
            const MoeRoute *r = &t->trace[j];
            *out++ = (RecRouting){.layer = l, .seq = seq0 + r->token / T, .pos = r->token % T,
                                  .token = m->acts.inputs[r->token], .rank = r->rank,
                                  .expert = r->expert, .pass = r->pass, .weight = r->weight};
        }
        size_t k = (size_t)l * E;
        moe_trace_sparsity(layer, mc, mc->sparsity_eps, sp->activations + k, sp->near_zero + k,
                           sp->abs_sum + k);
    }
    b->n_routing = (size_t)(out - b->routing);
    for (int n = 0; n < N; n++) {
        RecTokenStat *ts = &b->tokens[n];
        *ts = (RecTokenStat){.seq = seq0 + n / T, .pos = n % T, .token = m->acts.inputs[n],
                             .experts = 0, .passes = 0, .loss = m->acts.losses[n],
                             .moe_flops = 0.0};
        for (int l = 0; l < c->layers; l++) {
            if (!config_is_moe_block(c, l)) continue;
            MoeTokenTrace x = moe_trace_token(&m->moe[l], mc, c->activation, n);
            ts->experts += x.experts;
            ts->passes += x.passes;
            ts->moe_flops += x.flops;
        }
    }
    b->n_tokens = (size_t)N;
    return 0;
}

/* expert_load of a step (eval_id −1) or an evaluation, and its sparsity
** when sp is not NULL. */
static int record_load(const EvalSparsity *sp, Trainer *t, int64_t eval_id,
                       const int64_t *load, const int64_t *dropped, const double *mass,
                       char *err) {
    Model *m = t->model;
    const ModelConfig *c = &m->config;
    int E = c->moe.experts;
    RecExpertLoad lrows[MOE_MAX_EXPERTS];
    RecSparsity srows[MOE_MAX_EXPERTS];
    for (int l = 0; l < c->layers; l++) {
        if (!config_is_moe_block(c, l)) continue;
        for (int e = 0; e < E; e++) {
            size_t k = (size_t)l * E + e;
            lrows[e] = (RecExpertLoad){.layer = l, .expert = e, .tokens = load[k],
                                       .dropped = dropped[k],
                                       .prob_mass = mass[k]};
            if (sp) {
                int64_t n = sp->activations[k];
                srows[e] = (RecSparsity){.layer = l, .expert = e, .activations = n,
                                         .near_zero = sp->near_zero[k],
                                         .mean_abs = n > 0 ? sp->abs_sum[k] / n : NAN};
            }
        }
        if (rec_expert_load(t->rec, t->run_id, eval_id, t->step, lrows, (size_t)E, err) != 0)
            return -1;
        if (sp && rec_sparsity(t->rec, t->run_id, eval_id, srows, (size_t)E, err) != 0)
            return -1;
    }
    return 0;
}

/* Adds the last forward's per-expert totals to load, dropped and mass (L, E). */
static void add_loads(const Model *m, int64_t *load, int64_t *dropped, double *mass) {
    const ModelConfig *c = &m->config;
    int E = c->moe.experts;
    for (int l = 0; l < c->layers; l++) {
        if (!config_is_moe_block(c, l)) continue;
        for (int e = 0; e < E; e++) {
            MoeExpertTrace x = moe_trace_expert(&m->moe[l], &c->moe, e);
            load[(size_t)l * E + e] += x.tokens;
            dropped[(size_t)l * E + e] += x.dropped;
            mass[(size_t)l * E + e] += x.prob_mass;
        }
    }
}

/* The step's expert_load, summed over the ranks; rank 0 writes it. */
static int record_step_load(Trainer *t, char *err) {
    Model *m = t->model;
    size_t n = (size_t)m->config.layers * m->config.moe.experts;
    if (!t->records || m->n_moe_layers == 0) return 0;
    if (!t->load) {
        t->load = malloc(sizeof *t->load * n);
        t->dropped = malloc(sizeof *t->dropped * n);
        t->mass = malloc(sizeof *t->mass * n);
        if (!t->load || !t->dropped || !t->mass) return ml_error(err, "out of memory");
    }
    memset(t->load, 0, sizeof *t->load * n);
    memset(t->dropped, 0, sizeof *t->dropped * n);
    memset(t->mass, 0, sizeof *t->mass * n);
    add_loads(m, t->load, t->dropped, t->mass);
    dist_sum_int64(t->load, n);
    dist_sum_int64(t->dropped, n);
    dist_sum_double(t->mass, n);
    return t->rec ? record_load(NULL, t, -1, t->load, t->dropped, t->mass, err) : 0;
}

/* Under expert parallelism: the last forward's assignments from rank to
** rank, per MoE layer, added to traffic (L, ranks, ranks). */
static void add_traffic(const Model *m, int ranks, int64_t *traffic) {
    const ModelConfig *c = &m->config;
    for (int l = 0; l < c->layers; l++)
        if (config_is_moe_block(c, l))
            moe_layer_traffic(&m->moe[l], ranks, traffic + (size_t)l * ranks * ranks);
}

/* Rank 0: traffic's rows, each assignment that left its rank moving
** `moves` rows of d_model floats (there and back; in training backward too). */
static int record_traffic(Trainer *t, int64_t eval_id, const int64_t *traffic, int ranks,
                          int moves, char *err) {
    const ModelConfig *c = &t->model->config;
    size_t RR = (size_t)ranks * ranks;
    RecTraffic *rows = malloc(sizeof *rows * RR * (size_t)c->layers);
    if (!rows) return ml_error(err, "out of memory recording traffic");
    size_t n = 0;
    for (int l = 0; l < c->layers; l++) {
        if (!config_is_moe_block(c, l)) continue;
        for (int src = 0; src < ranks; src++)
            for (int dst = 0; dst < ranks; dst++) {
                int64_t tokens = traffic[(size_t)l * RR + (size_t)src * ranks + dst];
                rows[n++] = (RecTraffic){.layer = l, .src = src, .dst = dst, .tokens = tokens,
                                         .bytes = src == dst ? 0
                                                             : tokens * moves * c->d_model *
                                                                   (int64_t)sizeof(float)};
            }
    }
    int rc = rec_traffic(t->rec, t->run_id, eval_id, t->step, rows, n, err);
    free(rows);
    return rc;
}

/* A training step's traffic, when recorded (rank 0 writes it). */
static int record_step_traffic(Trainer *t, char *err) {
    Model *m = t->model;
    int ranks = dist_size();
    if (!t->rec || !moe_parallel(&m->config.moe)) return 0;
    size_t n = (size_t)m->config.layers * ranks * ranks;
    if (!t->traffic && !(t->traffic = malloc(sizeof *t->traffic * n)))
        return ml_error(err, "out of memory recording traffic");
    memset(t->traffic, 0, sizeof *t->traffic * n);
    add_traffic(m, ranks, t->traffic);
    return record_traffic(t, -1, t->traffic, ranks, 4, err);
}

/* Rank r's slice of a batch of B sequences cut over `ranks`: its first row
** into *first, and how many. */
static int slice(int r, int B, int ranks, int *first) {
    *first = (int)((int64_t)r * B / ranks);
    return (int)((int64_t)(r + 1) * B / ranks) - *first;
}

/* Over several ranks: rank 0's rc, and its message (err, ML_ERRLEN bytes)
** when it failed, on every rank; for what rank 0 alone does (the database). */
static int rank0_outcome(int rc, char *err) {
    if (!dist_active()) return rc;
    dist_broadcast(&rc, sizeof rc);
    if (rc != 0) dist_broadcast_string(err, ML_ERRLEN);
    return rc;
}

/* A recorded batch computed on another rank: its rows to rank 0, which
** queues them for its writer in batch order. Sizes first, then the rows. */
static void send_rows(const RecBatch *b) {
    uint64_t n[2] = {b->n_routing, b->n_tokens};
    dist_send(n, sizeof n, 0);
    dist_send(b->routing, sizeof *b->routing * b->n_routing, 0);
    dist_send(b->tokens, sizeof *b->tokens * b->n_tokens, 0);
}

static int recv_rows(RecWriter *w, int from, char *err) {
    uint64_t n[2];
    dist_recv(n, sizeof n, from);
    RecBatch *b = recw_batch(w);
    if (!b || recw_reserve(b, (size_t)n[0], (size_t)n[1]) != 0) {
        if (b) {
            b->n_routing = b->n_tokens = 0;
            recw_submit(w, b, err);
        }
        return ml_error(err, "out of memory recording the evaluation");
    }
    dist_recv(b->routing, sizeof *b->routing * n[0], from);
    dist_recv(b->tokens, sizeof *b->tokens * n[1], from);
    b->n_routing = (size_t)n[0];
    b->n_tokens = (size_t)n[1];
    return recw_submit(w, b, err);
}

/* Rank 0: the other ranks' slices of a batch of B sequences, in rank order. */
static int recv_slices(RecWriter *w, int B, int ranks, char *err) {
    for (int r = 1; r < ranks; r++) {
        int first;
        if (slice(r, B, ranks, &first) > 0 && recv_rows(w, r, err) != 0) return -1;
    }
    return 0;
}

/*
** Sharing the cores with the writer. Its idle-priority thread gets only the
** gaps the computation leaves, a fraction of what the rows cost on a small
** model, and whatever is still queued after the last batch would be written
** alone while the other cores wait. So when the queue holds at least one
** forward pass's worth of writing (at the thread's measured CPU time per row),
** the next batch runs on one thread fewer and the writer has a core to itself.
** On the last batch that is worth it when the queue takes longer to write
** than the slower forward pass costs extra. The forward pass gives the same
** bits on any number of threads (each product is cut into pieces by its
** shape, not by the team, ops.c; tests/test_threads.c checks it for each
** OpenBLAS kernel family), so this changes only the time.
*/
typedef struct {
    int threads;      /* the computation's usual team */
    double all_ms;    /* the last forward pass on all of them */
    double fewer_ms;  /* the last one on one thread fewer; 0: none yet */
} EvalPace;

static int eval_give_writer_a_core(const EvalPace *p, RecWriter *w, int last) {
    if (p->threads < 2 || p->all_ms <= 0.0) return 0;
    double backlog_ms = recw_backlog_seconds(w) * 1e3;
    if (backlog_ms <= 0.0) return 0;
    double fewer_ms = p->fewer_ms > 0.0 ? p->fewer_ms
                                        : p->all_ms * p->threads / (p->threads - 1);
    return last ? backlog_ms > fewer_ms - p->all_ms : backlog_ms >= fewer_ms;
}

/*
** An evaluation in a recorded run is a transaction of its own: what the
** run had pending is committed first, the evals row is written before the
** first batch (its results, and complete = 1, are set at the end), and on
** failure or interrupt everything of the evaluation is rolled back. A long
** recorded one commits every REC_EVAL_COMMIT_ROWS rows (recwriter.c), so
** its WAL stays bounded; a failure then deletes what it committed, and a
** crash leaves it with complete = 0 and the rows written so far. With record = true, each batch's routing
** and token rows go to a background writer (recwriter.h) that inserts them
** in the CPU time the next batches' computation leaves idle, and gets a core
** of its own when it falls behind (EvalPace above).
*/
int trainer_evaluate(Trainer *t, const EvalOptions *o, EvalResult *res, char *err) {
    Model *m = t->model;
    const ModelConfig *c = &m->config;
    int T = c->context, B = o->batch, L = c->layers, E = c->moe.experts;
    memset(res, 0, sizeof *res);
    res->eval_id = -1;
    if (o->batches < 1) return ml_error(err, "evaluate: batches must be at least 1, got %d", o->batches);
    if (B < 1) return ml_error(err, "evaluate: batch must be at least 1, got %d", B);
    if (corpus_check_context(t->corpus, o->split, T, err) != 0) return -1;
    char inner[ML_ERRLEN];
    if (model_check_batch(m, B, T, 0, inner) != 0) return ml_error(err, "evaluate: %s", inner);
    if (ensure_batch(t, B, T, err) != 0) return -1;
    if (o->router && model_check_router(m, o->router, inner) != 0)
        return ml_error(err, "evaluate: %s", inner);
    if (moe_check_placement(o->router ? o->router : &c->moe, inner) != 0)
        return ml_error(err, "evaluate: %s", inner);
    if (B < dist_size() && moe_parallel(o->router ? o->router : &c->moe))
        return ml_error(err, "evaluate: batch %d is cut over %d ranks, and under expert "
                        "parallelism each needs a sequence: use batch >= %d", B, dist_size(),
                        dist_size());
    MoeConfig own = c->moe; /* back after a counterfactual evaluation */
    if (o->router) m->config.moe = *o->router;
    int moe = m->n_moe_layers > 0;
    int record = o->record && t->records && moe;
    const char *split = o->label ? o->label : corpus_split_name(o->split);
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    int64_t *load = moe ? calloc((size_t)L * E, sizeof *load) : NULL;
    int64_t *dropped = moe ? calloc((size_t)L * E, sizeof *dropped) : NULL;
    double *mass = moe ? calloc((size_t)L * E, sizeof *mass) : NULL;
    EvalSparsity sp = {0};
    RecWriter *writer = NULL;
    RecBatch own_rows = {0}; /* a batch's rows on a rank other than 0, to send */
    int parallel = t->rec && moe && moe_parallel(&c->moe);
    int64_t *traffic = parallel ? calloc((size_t)L * dist_size() * dist_size(), sizeof *traffic) : NULL;
    int64_t eval_id = -1;
    int rank = dist_rank(), ranks = dist_size();
    int began = 0; /* everything pending is this evaluation's */
    char held[32] = "running"; /* the run's status before (rec_run_hold) */
    int rc = -1;
    if (!rng || (moe && (!load || !dropped || !mass)) || (parallel && !traffic)) {
        ml_error(err, "out of memory");
        goto done;
    }
    if (record) {
        sp.activations = calloc((size_t)L * E, sizeof *sp.activations);
        sp.near_zero = calloc((size_t)L * E, sizeof *sp.near_zero);
        sp.abs_sum = calloc((size_t)L * E, sizeof *sp.abs_sum);
        if (!sp.activations || !sp.near_zero || !sp.abs_sum) {
            ml_error(err, "out of memory");
            goto done;
        }
    }
    if (t->rec) {
        if (rec_run_hold(t->rec, t->run_id, held, sizeof held, err) != 0) goto done;
        began = 1;
        if (rec_eval(t->rec, t->run_id, t->step, split, 0, NAN, NAN, NAN, &eval_id, err) != 0 ||
            (o->router_json && rec_eval_router(t->rec, eval_id, o->router_json, err) != 0))
            goto done;
        if (record && recw_start(&writer, t->rec, t->run_id, eval_id, err) != 0)
            goto done;
    }
    gsl_rng_set(rng, (unsigned long)o->seed);
    m->training = 0;
    m->shard = rank; /* this rank's slice (Gumbel draws), trained here or not */
    m->shards = ranks;
    double sums[4] = {0}; /* loss, FLOPs, top-k FLOPs, assignments */
    EvalPace pace = {.threads = omp_get_max_threads()};
    /* over several ranks each batch is cut in slices, rank r's rows
    ** first .. first + Br − 1; every rank draws every batch, so that the
    ** batches are those of one process */
    int first, Br = slice(rank, B, ranks, &first);
    for (int i = 0; i < o->batches; i++) {
        int sig = take_interrupt(); /* Ctrl-C, SIGTERM, SIGHUP: stop at this batch */
        if (sig) {
            res->interrupted = sig;
            ml_error(err, "interrupted by %s during an evaluation, at batch %d of %d (none of "
                     "its rows were kept)", trainer_signal_name(sig), i + 1, o->batches);
            goto done;
        }
        corpus_batch_part(t->corpus, o->split, rng, B, first, Br, T, t->inputs, t->targets);
        if (Br == 0) { /* fewer sequences than ranks: none here (data parallel only) */
            if (writer && recv_slices(writer, B, ranks, err) != 0) goto done;
            continue;
        }
        int fewer = writer && eval_give_writer_a_core(&pace, writer, i == o->batches - 1);
        if (fewer) omp_set_num_threads(pace.threads - 1);
        double t0 = now_ms();
        int failed = model_forward(m, t->inputs, t->targets, Br, T, err);
        double ms = now_ms() - t0;
        if (fewer) {
            omp_set_num_threads(pace.threads);
            pace.fewer_ms = ms;
        } else {
            pace.all_ms = ms;
        }
        if (failed) goto done;
        sums[0] += m->mean_loss * ((double)Br / B); /* the batch's mean, summed over ranks */
        sums[1] += m->moe_flops;
        sums[2] += m->moe_flops_topk;
        for (int l = 0; moe && l < L; l++)
            if (config_is_moe_block(c, l)) sums[3] += (double)moe_trace_count(&m->moe[l]);
        if (moe) add_loads(m, load, dropped, mass);
        if (parallel) add_traffic(m, ranks, traffic); /* every rank's: the counts are shared */
        if (record && rank != 0) {
            if (eval_record_batch(&own_rows, &sp, t, i * B + first, Br, T) != 0) {
                ml_error(err, "out of memory recording the evaluation");
                goto done;
            }
            send_rows(&own_rows);
        }
        if (writer) {
            RecBatch *b = recw_batch(writer);
            if (!b || eval_record_batch(b, &sp, t, i * B + first, Br, T) != 0) {
                if (b) { /* an empty batch gives the buffers back */
                    b->n_routing = b->n_tokens = 0;
                    recw_submit(writer, b, err);
                }
                ml_error(err, "out of memory recording the evaluation");
                goto done;
            }
            if (recw_submit(writer, b, err) != 0 || recv_slices(writer, B, ranks, err) != 0)
                goto done;
        }
    }
    if (ranks > 1) {
        dist_sum_double(sums, 4);
        if (moe) {
            dist_sum_int64(load, (size_t)L * E);
            dist_sum_int64(dropped, (size_t)L * E);
            dist_sum_double(mass, (size_t)L * E);
        }
        if (record) {
            dist_sum_int64(sp.activations, (size_t)L * E);
            dist_sum_int64(sp.near_zero, (size_t)L * E);
            dist_sum_double(sp.abs_sum, (size_t)L * E);
        }
    }
    res->loss = sums[0] / o->batches;
    res->tokens = (int64_t)o->batches * B * T;
    res->moe_flops_per_token = sums[1] / res->tokens;
    res->topk_flops_per_token = moe && c->moe.kind == ROUTER_MERGE ? sums[2] / res->tokens : NAN;
    res->experts_per_token = moe ? sums[3] / ((double)res->tokens * m->n_moe_layers) : 0.0;
    if (writer) {
        int failed = recw_finish(writer, err);
        writer = NULL;
        if (failed) goto done;
    }
    if (t->rec) {
        if (rec_eval_result(t->rec, eval_id, res->tokens, res->loss, res->moe_flops_per_token,
                            res->experts_per_token, err) != 0 ||
            (!isnan(res->topk_flops_per_token) &&
             rec_eval_topk_flops(t->rec, eval_id, res->topk_flops_per_token, err) != 0))
            goto done;
        /* the validation curve; a training-split or counterfactual evaluation
        ** stays in evals only, so that metrics keeps the model's own curve */
        if (o->split == SPLIT_VAL && !o->router && !o->label &&
            rec_metric(t->rec, t->run_id, t->step, split, res->loss, NAN, NAN, t->tokens,
                       res->moe_flops_per_token, t->wall_ms,
                       ranks > 1 ? t->comm_ms : NAN, NULL, err) != 0)
            goto done;
        if (moe && record_load(record ? &sp : NULL, t, eval_id, load, dropped, mass, err) != 0)
            goto done;
        if (parallel && record_traffic(t, eval_id, traffic, ranks, 2, err) != 0) goto done;
        if (rec_flush(t->rec, err) != 0) goto done;
        res->eval_id = eval_id;
    }
    if (t->records && ranks > 1) { /* the same id on every rank */
        dist_broadcast(&eval_id, sizeof eval_id);
        res->eval_id = eval_id;
    }
    rc = 0;
done:
    /* past the checks every rank made alike, a failure of one stops them all */
    if (rc != 0 && ranks > 1 && !res->interrupted) dist_fail(err);
    m->config.moe = own;
    if (writer) recw_abort(writer);
    /* a long one may have committed some of its rows (recwriter.h): all go */
    if (rc != 0 && began && eval_id >= 0)
        rec_eval_delete(t->rec, eval_id, NULL);
    else if (rc != 0 && began)
        rec_discard(t->rec);
    int succeeded = rc == 0; /* on every rank alike, here */
    if (began && rec_run_release(t->rec, t->run_id, held, rc == 0 ? err : NULL) != 0) rc = -1;
    if (succeeded && ranks > 1) rc = rank0_outcome(rc, err); /* rank 0's release failed */
    if (rng) gsl_rng_free(rng);
    free(load);
    free(dropped);
    free(mass);
    free(sp.activations);
    free(sp.near_zero);
    free(sp.abs_sum);
    free(own_rows.routing);
    free(own_rows.tokens);
    free(traffic);
    return rc;
}

/* An evaluation in the middle of training: 0, -1 on failure, or 1 when a
** signal stopped it (then *status is "interrupted" with the message). */
static int evaluate_in_training(Trainer *t, const EvalOptions *eo, EvalResult *er,
                                const char **status, char *status_msg, size_t n, char *err) {
    if (trainer_evaluate(t, eo, er, err) == 0) return 0;
    if (!er->interrupted) return -1;
    *status = "interrupted"; /* the run stops as interrupted, not failed */
    snprintf(status_msg, n, "%s", err);
    return 1;
}

/* The probe of TrainOptions.probe_every (every probe_every steps, and after
** the last step when last), unless this step has one. */
static int probe(Trainer *t, const TrainOptions *o, int last, const char **status, char *status_msg,
                 size_t n, char *err) {
    if (o->probe_every <= 0 || (!last && t->step % o->probe_every != 0) || t->probed_at == t->step)
        return 0;
    EvalOptions po;
    eval_options_defaults(&po);
    po.batches = 1;
    po.batch = o->probe_batch;
    po.seed = o->probe_seed;
    po.record = 1;
    po.label = "probe";
    EvalResult er;
    t->probed_at = t->step;
    return evaluate_in_training(t, &po, &er, status, status_msg, n, err);
}

/* ------------------------------------------------------------------------ */
/* expert parallelism's sharded training state (Model.owner)                 */

/* The rank that trains each parameter when this model trains over `ranks`
** ranks now: under expert parallelism, an expert's tensors are its rank's
** (moe.placement), the rest every rank's (-1). NULL in *out when nothing is
** sharded (one process, data parallelism). */
static int shard_plan(const Model *m, int ranks, int **out, char *err) {
    const MoeConfig *mc = &m->config.moe;
    *out = NULL;
    if (ranks < 2 || m->n_moe_layers == 0 || !moe_parallel(mc)) return 0;
    int *owner = malloc(sizeof(int) * (size_t)m->n_params);
    int *rank_of = malloc(sizeof(int) * (size_t)mc->experts);
    if (!owner || !rank_of) {
        free(owner);
        free(rank_of);
        return ml_error(err, "out of memory for expert parallelism");
    }
    moe_placement(mc, ranks, rank_of);
    for (int i = 0; i < m->n_params; i++)
        owner[i] = m->params[i].expert >= 0 ? rank_of[m->params[i].expert] : -1;
    free(rank_of);
    *out = owner;
    return 0;
}

/* Calls f(x, n, owner) for each run of consecutive tensors of `arena` with
** the same owner (Model.owner; without owners, one run of every rank's):
** few calls, each over a contiguous range. */
static void owner_runs(const Model *m, float *arena, void (*f)(float *x, size_t n, int owner, int ranks),
                       int ranks) {
    if (!m->owner) {
        f(arena, m->num_parameters, -1, ranks);
        return;
    }
    for (int i = 0; i < m->n_params;) {
        int o = m->owner[i], j = i;
        size_t n = 0;
        while (j < m->n_params && m->owner[j] == o) n += m->params[j++].numel;
        f(arena + m->params[i].offset, n, o, ranks);
        i = j;
    }
}

static void broadcast_run(float *x, size_t n, int owner, int ranks) {
    (void)ranks;
    if (owner >= 0) dist_broadcast_from(x, sizeof(float) * n, owner);
}

/* The mean of the ranks' gradients: every rank's tensors summed over the
** ranks, a rank's own experts' as they are (that rank ran them on the whole
** batch's rows; the others hold zeros there), both divided by the ranks. */
static void average_run(float *x, size_t n, int owner, int ranks) {
    if (owner >= 0 && owner != dist_rank()) return;
    if (owner < 0) dist_sum_float(x, n);
    cblas_sscal((blasint)n, 1.0f / ranks, x, 1);
}

/* Makes `want` (shard_plan's) the model's ownership for the training that
** starts. AdamW moments kept under another ownership (an earlier call with
** other placements, or expert parallelism then, data parallelism now) come
** first from the ranks that kept them: to the expert's new rank alone, or
** to every rank for data parallelism. Then what this rank does not train
** any more (an expert that moved, the others' after data parallelism) is
** given back, so that it takes no memory here. */
static void shard_training(Model *m, int *want) {
    int me = dist_rank();
    if (m->owner && m->adam_m && m->adam_v)
        for (int i = 0; i < m->n_params; i++) {
            int o = m->owner[i], w = want ? want[i] : -1;
            if (o < 0 || w == o) continue;
            const ParamInfo *p = &m->params[i];
            size_t bytes = sizeof(float) * p->numel;
            float *moments[2] = {m->adam_m + p->offset, m->adam_v + p->offset};
            /* every rank goes through the tensors in the same order, and each
            ** send has its receive at the same point: no rank waits in a cycle */
            for (int k = 0; k < 2; k++) {
                if (w < 0) dist_broadcast_from(moments[k], bytes, o);
                else if (me == o) dist_send(moments[k], bytes, w);
                else if (me == w) dist_recv(moments[k], bytes, o);
            }
        }
    free(m->owner);
    m->owner = want;
    m->owner_me = me;
    model_release_untrained(m);
}

/* After sharded training: every expert's weights from the rank that trained
** them, so that every rank holds the whole model again (model:loss, sample,
** save; the moments stay where they are). */
static void gather_experts(Model *m) {
    owner_runs(m, m->param_mem, broadcast_run, dist_size());
}

int trainer_gradients(Trainer *t, int B, const AdamwOptions *fuse, float *loss, double *moe_flops,
                      char *err) {
    Model *m = t->model;
    int T = m->config.context, rank = dist_rank(), ranks = dist_size();
    if (ensure_batch(t, B, T, err) != 0) return -1;
    m->shard = rank;
    m->shards = ranks;
    corpus_batch_part(t->corpus, SPLIT_TRAIN, t->rng, ranks * B, rank * B, B, T, t->inputs,
                      t->targets);
    m->training = 1;
    int rc = model_forward(m, t->inputs, t->targets, B, T, err);
    m->training = 0;
    if (rc != 0) return -1;
    *loss = m->mean_loss;
    *moe_flops = m->moe_flops;
    if (ranks > 1) { /* the whole batch's losses, on every rank */
        model_reduce_aux(m, dist_sum_double, ranks);
        double v[2] = {m->mean_loss, m->moe_flops};
        dist_sum_double(v, 2);
        *loss = (float)(v[0] / ranks);
        *moe_flops = v[1] / ranks;
    }
    if (!isfinite(*loss) || !isfinite(m->aux_loss)) return 0; /* diverged: no gradients */
    if (model_backward_adamw(m, ranks > 1 ? NULL : fuse, err) != 0) return -1;
    if (ranks > 1) owner_runs(m, m->grad_mem, average_run, ranks); /* the whole batch's */
    return 0;
}

int trainer_train(Trainer *t, const TrainOptions *o, TrainResult *res, char *err) {
    Model *m = t->model;
    int T = m->config.context, B = o->batch;
    memset(res, 0, sizeof *res);
    res->val_loss = NAN;
    if (o->steps < 1) return ml_error(err, "train: steps must be at least 1, got %d", o->steps);
    if (B < 1) return ml_error(err, "train: batch must be at least 1, got %d", B);
    char nb[ML_NUMLEN], nb2[ML_NUMLEN];
    if (!(o->lr > 0.0f) || !isfinite(o->lr))
        return ml_error(err, "train: lr must be a positive number, got %s", ml_number(nb, o->lr));
    if (o->warmup < 0) return ml_error(err, "train: warmup must be >= 0, got %d", o->warmup);
    /* every real option finite and in range, NaN included: !(x >= lo) is true for NaN */
    if (!(o->clip >= 0.0f) || !isfinite(o->clip))
        return ml_error(err, "train: clip must be a number >= 0 (0 = off), got %s", ml_number(nb, o->clip));
    if (!(o->weight_decay >= 0.0f) || !isfinite(o->weight_decay))
        return ml_error(err, "train: weight_decay must be a number >= 0, got %s", ml_number(nb, o->weight_decay));
    if (!(o->min_lr >= 0.0f) || !(o->min_lr <= o->lr))
        return ml_error(err, "train: min_lr must be between 0 and lr = %s, got %s", ml_number(nb, o->lr),
                         ml_number(nb2, o->min_lr));
    if (!(o->beta1 >= 0.0f && o->beta1 < 1.0f))
        return ml_error(err, "train: beta1 must be in [0, 1), got %s", ml_number(nb, o->beta1));
    if (!(o->beta2 >= 0.0f && o->beta2 < 1.0f))
        return ml_error(err, "train: beta2 must be in [0, 1), got %s", ml_number(nb, o->beta2));
    if (!(o->eps > 0.0f) || !isfinite(o->eps))
        return ml_error(err, "train: eps must be a positive number, got %s", ml_number(nb, o->eps));
    if (corpus_check_context(t->corpus, SPLIT_TRAIN, T, err) != 0) return -1;
    char inner[ML_ERRLEN];
    if (model_check_batch(m, B, T, 1, inner) != 0) return ml_error(err, "train: %s", inner);
    /* said before any step (over several ranks, a step's failure stops them all) */
    if (m->n_moe_layers > 0 && m->config.moe.kind == ROUTER_ORACLE)
        return ml_error(err, "train: the oracle router runs every expert to choose among them: it "
                        "is for evaluation, not training");
    if (o->probe_every < 0) return ml_error(err, "train: probe every must be >= 1, got %d", o->probe_every);
    if (o->probe_every > 0) { /* routing over training: recorded routing of a validation batch */
        if (!t->records || m->n_moe_layers == 0)
            return ml_error(err, "train: a probe records routing: it needs a recorded run of an MoE model");
        if (corpus_check_context(t->corpus, SPLIT_VAL, T, inner) != 0)
            return ml_error(err, "train: probe: %s", inner);
        if (model_check_batch(m, o->probe_batch, T, 0, inner) != 0)
            return ml_error(err, "train: probe: %s", inner);
    }
    if (ensure_batch(t, B, T, err) != 0) return -1;
    trainer_set_threads(o->threads);
    /* over several ranks (dist.h) each step's batch is ranks × B rows, this
    ** rank's slice of which it computes; rank 0 shows the progress */
    int rank = dist_rank(), ranks = dist_size();
    int progress = rank != 0 ? 0 : o->progress < 0 ? isatty(STDERR_FILENO) : o->progress;
    EvalOptions eo;
    eval_options_defaults(&eo);
    eo.batches = o->eval_batches;
    eo.batch = o->eval_batch > 0 ? o->eval_batch : B;
    size_t val = corpus_split_len(t->corpus, SPLIT_VAL);
    int can_eval = val >= (size_t)T + 1 && o->eval_batches > 0;
    /* a validation split without a window trains without evaluations, but
    ** eval_every asks for a validation curve: said before any step, not a
    ** run finished without one */
    if (!can_eval && o->eval_batches > 0 && o->eval_every > 0) {
        corpus_check_context(t->corpus, SPLIT_VAL, T, inner);
        return ml_error(err, "train: eval_every: %s (eval_every = 0 trains without evaluations)",
                        inner);
    }
    if (can_eval && model_check_batch(m, eo.batch, T, 0, inner) != 0) /* before any step, not after */
        return ml_error(err, "train: eval_batch: %s", inner);
    /* under expert parallelism every rank needs a sequence of each evaluation
    ** (trainer_evaluate): said before any step, not as a failure after them */
    if (moe_check_placement(&m->config.moe, inner) != 0) return ml_error(err, "train: %s", inner);
    if (moe_parallel(&m->config.moe)) {
        if (can_eval && eo.batch < ranks)
            return ml_error(err, "train: eval_batch %d is cut over %d ranks, and under expert "
                            "parallelism each needs a sequence: use eval_batch >= %d", eo.batch,
                            ranks, ranks);
        if (o->probe_every > 0 && o->probe_batch < ranks)
            return ml_error(err, "train: probe: batch %d is cut over %d ranks, and under expert "
                            "parallelism each needs a sequence: use batch >= %d", o->probe_batch,
                            ranks, ranks);
    }
    if (t->rec) {
        JsonBuf j = {0};
        jb_printf(&j, "{\"steps\":%d,\"batch\":%d,\"lr\":", o->steps, B);
        jb_float(&j, o->lr);
        jb_puts(&j, ",\"min_lr\":");
        jb_float(&j, o->min_lr);
        jb_printf(&j, ",\"warmup\":%d,\"schedule\":\"warmup-cosine\",\"weight_decay\":", o->warmup);
        jb_float(&j, o->weight_decay);
        jb_puts(&j, ",\"clip\":");
        jb_float(&j, o->clip);
        jb_puts(&j, ",\"beta1\":");
        jb_float(&j, o->beta1);
        jb_puts(&j, ",\"beta2\":");
        jb_float(&j, o->beta2);
        jb_puts(&j, ",\"eps\":");
        jb_float(&j, o->eps);
        jb_printf(&j, ",\"eval_every\":%d,\"eval_batches\":%d,\"eval_batch\":%d,"
                  "\"threads\":%d,\"ranks\":%d,\"first_step\":%lld", o->eval_every,
                  o->eval_batches, eo.batch, omp_get_max_threads(), ranks, (long long)t->step);
        if (o->probe_every > 0)
            jb_printf(&j, ",\"probe\":{\"every\":%d,\"batch\":%d,\"seed\":%llu}", o->probe_every,
                      o->probe_batch, (unsigned long long)o->probe_seed);
        jb_puts(&j, "}");
        int bad = j.failed ? ml_error(err, "out of memory")
                           : rec_run_config_set(t->rec, t->run_id, "train", j.data, err) != 0 ||
                             rec_run_status(t->rec, t->run_id, "running", NULL, err) != 0;
        jb_free(&j);
        if (bad && ranks > 1) dist_fail(err);
        if (bad) return -1;
    }

    /* under expert parallelism each rank trains its own experts (Model.owner) */
    int *owner;
    if (shard_plan(m, ranks, &owner, err) != 0) {
        if (ranks > 1) dist_fail(err);
        return -1;
    }
    shard_training(m, owner);

    /* a Ctrl-C that came just before (the host sets the flag too) still counts */
    /* Ctrl-C, SIGTERM and SIGHUP end the step and stop the run as interrupted */
    void (*old_int)(int) = signal(SIGINT, sigint_handler);
    void (*old_term)(int) = signal(SIGTERM, sigint_handler);
    void (*old_hup)(int) = signal(SIGHUP, sigint_handler);
    const char *status = "finished";
    char status_msg[ML_ERRLEN] = "";
    double start = now_ms(), last_flush = start, last_print = 0.0;
    double tail_sum = 0.0;
    int tail_n = 0, tail_from = o->steps - (o->steps + 9) / 10;
    /* divergence without NaN: TRAIN_EXPLODE_STEPS steps in a row more than
    ** TRAIN_EXPLODE_MARGIN nats above this call's first loss */
    float first_loss = NAN;
    int above = 0;
    double flops = 0.0;
    int rc = 0, s = 0;
    for (s = 0; s < o->steps; s++) {
        int stop = probe(t, o, 0, &status, status_msg, sizeof status_msg, err);
        if (stop < 0) rc = -1;
        if (stop) break;
        int sig = take_interrupt();
        if (sig) {
            status = "interrupted";
            snprintf(status_msg, sizeof status_msg, "interrupted by %s at step %lld",
                     trainer_signal_name(sig), (long long)t->step);
            break;
        }
        double t0 = now_ms(), comm0 = dist_comm_seconds();
        if (s == 0) model_zero_grad(m); /* afterwards AdamW leaves them zero */
        float loss, lr = trainer_lr(o, s);
        double moe_flops;
        /* AdamW fused into the backward pass where the gradients need nothing
        ** else first: no clipping, one process, and not a step that may find
        ** the loss exploded (which stops before updating) */
        AdamwOptions adamw = {lr, o->beta1, o->beta2, o->eps, o->weight_decay};
        int fuse = o->clip <= 0.0f && ranks == 1 && above < TRAIN_EXPLODE_STEPS - 1;
        if ((rc = trainer_gradients(t, B, fuse ? &adamw : NULL, &loss, &moe_flops, err)) != 0)
            break;
        /* the step that stops the run is named as metrics would number it,
        ** t->step + 1: the one after the last row kept */
        if (!isfinite(loss) || !isfinite(m->aux_loss)) {
            status = "diverged";
            snprintf(status_msg, sizeof status_msg, "loss became %s at step %lld; training stopped",
                     isnan(loss) || isnan(m->aux_loss) ? "NaN" : "infinite", (long long)t->step + 1);
            break;
        }
        if (s == 0) first_loss = loss;
        above = loss > first_loss + TRAIN_EXPLODE_MARGIN ? above + 1 : 0;
        if (above >= TRAIN_EXPLODE_STEPS) {
            status = "diverged";
            snprintf(status_msg, sizeof status_msg,
                     "loss exploded: %g at step %lld, more than %g nats above the first step's "
                     "%g for %d steps in a row; training stopped", loss, (long long)t->step + 1,
                     TRAIN_EXPLODE_MARGIN, first_loss, TRAIN_EXPLODE_STEPS);
            break;
        }
        if (o->clip > 0.0f) model_clip_grad(m, o->clip, dist_sum_double);
        if (model_adamw_step(m, lr, o->beta1, o->beta2, o->eps, o->weight_decay, err) != 0) {
            rc = -1;
            break;
        }
        t->step++;
        t->tokens += (int64_t)ranks * B * T;
        flops += 3.0 * m->flops;
        double t1 = now_ms(), comm1 = dist_comm_seconds();
        t->wall_ms += t1 - t0;
        t->comm_ms += 1e3 * (comm1 - comm0);
        res->last_loss = loss;
        if (s >= tail_from) {
            tail_sum += loss;
            tail_n++;
        }
        /* the step's recording (its loads summed over the ranks) counts as
        ** training time, in the next row */
        if (record_step_load(t, err) != 0 || record_step_traffic(t, err) != 0) { rc = -1; break; }
        if (t->rec) {
            int moe = m->n_moe_layers > 0;
            RecAux aux = {m->aux_parts[AUX_BALANCE], m->aux_parts[AUX_Z], m->aux_parts[AUX_CV2],
                          m->aux_parts[AUX_P_PENALTY], m->aux_parts[AUX_ENTROPY]};
            if (rec_metric(t->rec, t->run_id, t->step, "train", loss, moe ? m->aux_loss : NAN, lr,
                           t->tokens, moe_flops / ((double)B * T), t->wall_ms,
                           ranks > 1 ? t->comm_ms : NAN,
                           moe ? &aux : NULL, err) != 0) { rc = -1; break; }
            if (t1 - last_flush > 1000.0) {
                if (rec_flush(t->rec, err) != 0) { rc = -1; break; }
                last_flush = t1;
            }
        }
        t->wall_ms += now_ms() - t1;
        t->comm_ms += 1e3 * (dist_comm_seconds() - comm1);
        if (can_eval && o->eval_every > 0 && (s + 1) % o->eval_every == 0 && s + 1 < o->steps) {
            EvalResult er;
            int stop = evaluate_in_training(t, &eo, &er, &status, status_msg, sizeof status_msg, err);
            if (stop < 0) rc = -1;
            if (stop) break;
            res->val_loss = er.loss;
        }
        if (progress && (t1 - last_print > 200.0 || s + 1 == o->steps)) {
            double el = (t1 - start) / 1e3;
            char eta[32];
            format_duration(eta, sizeof eta, el / (s + 1) * (o->steps - s - 1));
            fprintf(stderr, "\r%s: step %d/%d | loss %.4f | %.1fk tok/s | ETA %s   ", t->name,
                    s + 1, o->steps, loss, (double)(s + 1) * ranks * B * T / el / 1e3, eta);
            fflush(stderr);
            last_print = t1;
        }
    }
    if (progress) fprintf(stderr, "\n");
    /* a rank that failed in a step stops them all: the others wait in its collectives */
    if (rc != 0 && ranks > 1) dist_fail(err);
    gather_experts(m);
    if (rc == 0 && strcmp(status, "finished") == 0 && probe(t, o, 1, &status, status_msg,
                                                            sizeof status_msg, err) < 0)
        rc = -1;
    signal(SIGINT, old_int);
    signal(SIGTERM, old_term);
    signal(SIGHUP, old_hup);
    res->steps = s;
    res->tokens = t->tokens;
    res->seconds = (now_ms() - start) / 1e3;
    res->tokens_per_s = res->seconds > 0 ? (double)s * ranks * B * T / res->seconds : 0.0;
    res->flops_per_token = s > 0 ? flops / ((double)s * B * T) : 0.0;
    res->loss = tail_n > 0 ? tail_sum / tail_n : res->last_loss;
    res->status = status;
    if (rc != 0) {
        /* a failure of our own: keep what was recorded and say so */
        if (t->rec) {
            char ignored[ML_ERRLEN];
            rec_flush(t->rec, ignored);
            rec_run_status(t->rec, t->run_id, "failed", err, ignored);
        }
        return -1;
    }
    if (strcmp(status, "finished") == 0 && can_eval) {
        EvalResult er;
        if (trainer_evaluate(t, &eo, &er, err) == 0) {
            res->val_loss = er.loss;
        } else if (er.interrupted) {
            status = res->status = "interrupted";
            snprintf(status_msg, sizeof status_msg, "%s", err);
        } else {
            return -1;
        }
    }
    int failed = t->rec && (rec_flush(t->rec, err) != 0 ||
                            rec_run_status(t->rec, t->run_id, status,
                                           status_msg[0] ? status_msg : NULL, err) != 0);
    /* what rank 0 alone wrote: its outcome on every rank, so that all go on
    ** or all fail (a script that catches the error then does the same) */
    if (rank0_outcome(failed ? -1 : 0, err) != 0) return -1;
    if (status_msg[0] && err) snprintf(err, ML_ERRLEN, "%s", status_msg);
    return 0;
}
