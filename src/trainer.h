/*
** trainer.h — a run: a model trained and evaluated on a corpus, recorded.
**
** The trainer ties the numeric core (model, corpus) to the recorder: it draws
** batches, steps AdamW on a warm-up + cosine schedule, writes a metrics row per
** step and an evaluation every eval_every steps, shows a progress line on a
** terminal, and keeps the run's status true — running, finished, diverged (the
** loss became NaN or infinite) or interrupted (Ctrl-C) — flushing what it wrote
** before it returns. It knows nothing of Lua.
*/
#ifndef MOELAB_TRAINER_H
#define MOELAB_TRAINER_H

#include <stdint.h>

#include "data.h"
#include "model.h"
#include "recorder.h"

/* A run has diverged when its loss is NaN or infinite, or stays more than
** TRAIN_EXPLODE_MARGIN nats above the first step's loss of the train call
** for TRAIN_EXPLODE_STEPS steps in a row. */
#define TRAIN_EXPLODE_MARGIN 3.0
#define TRAIN_EXPLODE_STEPS 10

typedef struct {
    int steps;
    int batch;
    float lr, min_lr;  /* cosine decays from lr to min_lr at the last step */
    int warmup;        /* linear warm-up steps */
    float weight_decay;
    float clip;        /* clip the global gradient norm; 0 = off */
    float beta1, beta2, eps;
    int eval_every;    /* 0 = only at the end */
    int eval_batches;
    int eval_batch;    /* 0 = same as batch */
    int threads;       /* 0 = as set before (moelab.threads), else all cores */
    int progress;      /* -1 = when stderr is a terminal, 0 = never, 1 = always */
    /* Routing over training: every probe_every steps (0 = never), before the
    ** step and after the last, the routing of one fixed batch of probe_batch
    ** validation sequences (drawn with probe_seed) is recorded as an
    ** evaluation with split 'probe' (v_routing_stability compares them). */
    int probe_every;
    int probe_batch;
    uint64_t probe_seed;
} TrainOptions;

typedef struct {
    int batches;
    int batch;
    Split split;
    uint64_t seed;     /* the evaluation batches: the same seed gives the same batches */
    int record;        /* record per-token detail (token_stats) */
    /* A counterfactual evaluation: the model runs under this router instead
    ** of its own (model_check_router says which it can), recorded in
    ** evals.router as router_json. NULL: its own. */
    const MoeConfig *router;
    const char *router_json;
    /* Recorded as this split instead of the corpus's ('probe'), and then not
    ** in the validation curve. NULL: the corpus split's name. */
    const char *label;
} EvalOptions;

typedef struct {
    const char *status; /* "finished", "diverged" or "interrupted" */
    double loss;        /* mean training loss of the last 10% of steps */
    double last_loss;   /* of the last step */
    double val_loss;    /* of the final evaluation (NaN if none) */
    double tokens_per_s;
    double seconds;
    double flops_per_token; /* of a training step (forward and backward: 3x the forward's), mean */
    int64_t steps;      /* steps done in this call */
    int64_t tokens;     /* tokens seen by the run so far */
} TrainResult;

typedef struct {
    double loss;
    double moe_flops_per_token;
    double topk_flops_per_token; /* merged experts: as per-token top-k; NaN otherwise */
    double experts_per_token;
    int64_t tokens;
    int64_t eval_id;
    int interrupted;    /* the signal that stopped it (its rows were rolled back); 0 */
} EvalResult;

typedef struct {
    Model *model;
    Corpus *corpus;
    Recorder *rec;     /* may be NULL: nothing recorded here */
    int records;       /* the run is recorded: by rec, or by rank 0 where this
                       ** rank has none (dist.h); what it records is reduced
                       ** over the ranks */
    int64_t run_id;
    char name[128];
    int64_t step;      /* optimiser steps so far, over every train call */
    int64_t tokens;    /* training tokens so far */
    double wall_ms;    /* training time so far: the steps and their recording */
    double comm_ms;    /* of which in MPI communication (dist.h) */
    void *rng;         /* gsl_rng of the training batches */
    int *inputs, *targets;
    size_t cap;        /* ints in inputs and targets */
    MoeRoute *trace;   /* one layer's route trace, while an evaluation is recorded */
    size_t trace_cap;
    int64_t probed_at; /* the step of the last probe; -1 before the first */
    int64_t *load, *dropped; /* (L, E) a step's expert_load, when recorded */
    int64_t *traffic;  /* (L, ranks, ranks) a step's traffic, when recorded */
    double *mass;
} Trainer;

void train_options_defaults(TrainOptions *o);
void eval_options_defaults(EvalOptions *o);

/* Learning rate at 0-based step s of `steps`: linear warm-up to lr over
** `warmup` steps, then cosine decay to min_lr at step `steps`. */
float trainer_lr(const TrainOptions *o, int s);

/* The trainer keeps pointers to model, corpus and recorder; it owns none. */
int trainer_init(Trainer *t, Model *model, Corpus *corpus, Recorder *rec, int64_t run_id,
                 const char *name, uint64_t seed, char *err);
void trainer_free(Trainer *t);

int trainer_train(Trainer *t, const TrainOptions *o, TrainResult *res, char *err);
/* One training step's gradients, added to the model's (zero them first):
** the next batch of B sequences a rank (dist.h), forward and backward, and
** over several ranks their mean, the whole batch's; *loss and *moe_flops
** are the whole batch's too. A loss that is not finite (the run diverged)
** leaves the gradients as they were. With fuse (on one process), the
** backward updates the experts' matrices itself (model_backward_adamw), and
** model_adamw_step with the same options must follow. */
int trainer_gradients(Trainer *t, int B, const AdamwOptions *fuse, float *loss, double *moe_flops,
                      char *err);
/* With a recorder, the evaluation is a transaction of its own: the run's
** pending rows are committed first, and a failure or an interrupt removes
** everything the evaluation wrote. With record = true its routing and token
** rows are written by a background thread (recwriter.h) while it computes,
** committed every REC_EVAL_COMMIT_ROWS rows: a crash leaves evals.complete
** = 0. */
int trainer_evaluate(Trainer *t, const EvalOptions *o, EvalResult *res, char *err);

/* Set to the signal by SIGINT, SIGTERM or SIGHUP while trainer_train runs (its
** handler is installed only then; a host sets the signal number too, and 1 is
** SIGHUP); a second such signal kills the process as usual. */
extern volatile int trainer_interrupt;
/* The signal (SIGINT, SIGTERM or SIGHUP) that last stopped a training run; 0 if none. */
extern volatile int trainer_stopped_by;
/* "Ctrl-C", "SIGTERM" or "SIGHUP", for messages. */
const char *trainer_signal_name(int sig);

/* Number of threads of the OpenMP loops (OpenBLAS runs single-threaded inside
** them). n <= 0: all cores, unless a count was already set. */
void trainer_set_threads(int n);

#endif
