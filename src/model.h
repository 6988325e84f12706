/*
** model.h — a decoder-only, pre-norm transformer language model in float32.
**
** Memory lives in a few arenas, in the manner of llm.c: all parameters in one
** allocation, their gradients in a second with the same layout, the AdamW
** moments in a third, the activations for the largest batch seen in a fourth,
** and the backward pass's scratch in a fifth. Every tensor is registered once,
** with its checkpoint name and shape (SPEC §4), in `params`; `Weights` holds
** pointers carved out of an arena with that layout.
*/
#ifndef MOELAB_MODEL_H
#define MOELAB_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "data.h"
#include "moe/moe.h"

#define MODEL_MAX_NAME 64

typedef enum { INIT_ZERO, INIT_ONE, INIT_NORMAL, INIT_NORMAL_RESIDUAL } ParamInit;

typedef struct {
    char name[MODEL_MAX_NAME];
    ParamInit init;
    int ndim;
    int shape[2];
    size_t offset; /* in floats, from the arena's start */
    size_t numel;
    int decay;     /* weight decay applies: matrices only */
    int expert;    /* the MoE expert it belongs to (its layer's), or -1 */
} ParamInfo;

typedef struct {
    float *ln1w, *ln1b;         /* (C) */
    float *qkvw, *qkvb;         /* (3C, C), (3C) */
    float *attprojw, *attprojb; /* (C, C), (C) */
    float *ln2w, *ln2b;         /* (C) */
    float *fcw, *fcb;           /* (H, C), (H) */
    float *gatew;               /* (H, C), SwiGLU only */
    float *projw, *projb;       /* (C, H), (C) */
    MoeWeights *moe;            /* an MoE block: router and experts instead of fc/proj */
} BlockWeights;                 /* the biases of RMSNorm are NULL */

typedef struct {
    float *wte;     /* (V, C) */
    float *wpe;     /* (T, C) */
    BlockWeights *blocks; /* (L) */
    float *lnfw, *lnfb;   /* (C) */
    float *lm_head; /* (V, C); == wte when tied */
} Weights;

typedef struct {
    float *ln1, *ln1_mean, *ln1_rstd; /* (B,T,C), (B,T), (B,T) */
    float *qkv;                       /* (B,T,3C) */
    float *att;                       /* (B,NH,T,T) */
    float *atty;                      /* (B,T,C) attention output before proj */
    float *res2;                      /* (B,T,C) residual after attention */
    float *ln2, *ln2_mean, *ln2_rstd;
    float *fch;                       /* (B,T,H) fc pre-activation */
    float *gate;                      /* (B,T,H) SwiGLU gate pre-activation */
    float *act;                       /* (B,T,H) activation, input of proj */
    float *res3;                      /* (B,T,C) block output */
} BlockActs;

typedef struct {
    float *encoded;                   /* (B,T,C) */
    BlockActs *blocks;                /* (L) */
    float *att_scratch;               /* (B,NH,hs,T) attention's, shared by the layers */
    float *lnf, *lnf_mean, *lnf_rstd; /* (B,T,C), (B,T), (B,T) */
    float *logits;                    /* (B,T,V) */
    float *probs;                     /* (B,T,V) */
    float *losses;                    /* (B,T) */
    int *inputs, *targets;            /* (B,T) */
} Acts;

typedef struct {
    float *dres, *dln, *datty;  /* (B,T,C) */
    float *dqkv;                /* (B,T,3C) */
    float *dact, *dfch, *dgate; /* (B,T,H) */
    float *datt;                /* (B,NH,T,T) */
    float *dlogits;             /* (B,T,V) */
    float *dweight_pieces;      /* matmul_backward's partial products (ops.h) */
} Scratch;

typedef struct Model {
    ModelConfig config;
    ParamInfo *params;
    int n_params;
    size_t num_parameters;
    float *param_mem;  Weights w;
    float *grad_mem;   Weights g;   /* NULL until the first backward */
    float *adam_m, *adam_v;         /* NULL until the first update */
    int64_t adam_t;
    int experts_updated; /* the last backward updated the experts' matrices itself */
    /* Expert parallelism's sharded training state (trainer.c): the rank that
    ** trains each parameter (an expert's: its rank; -1: every rank), and
    ** this rank. The gradients and AdamW moments of other ranks' experts are
    ** never touched here, so their pages are never allocated (the arenas are
    ** mapped lazily); their weights come from their ranks when a training
    ** call ends. NULL: every parameter is trained here. */
    int *owner;
    int owner_me;
    /* activations, laid out for max_batch sequences of context tokens */
    int max_batch;
    float *act_mem; Acts acts;
    float *scratch_mem; Scratch scratch;
    int B, T;          /* of the last forward */
    float mean_loss;   /* of the last forward with targets: cross-entropy only */
    /* MoE */
    int n_moe_layers;
    MoeLayer *moe;            /* (L); used by the MoE blocks */
    MoeScratch moe_scratch;
    int *hash_map;            /* (L, V) expert of each token id, for hash routing */
    float *noise;             /* (B·T, E) router noise of one layer, in training */
    size_t noise_cap;
    void *noise_rng;          /* gsl_rng */
    int training;             /* router noise on */
    /* this process's slice of a batch cut over `shards` processes (dist.h):
    ** router noise is drawn for the whole batch and this slice kept, and
    ** the Gumbel draws of a sampled second choice are keyed by the shard */
    int shard, shards;
    float aux_loss;           /* Σ coefficient · aux, averaged over MoE layers */
    float aux_parts[AUX_KINDS]; /* unweighted, averaged over MoE layers */
    double moe_flops;         /* FLOPs executed in MoE layers by the last forward */
    double moe_flops_topk;    /* the same as per-token top-k layers (merged experts) */
    double flops;             /* FLOPs of the last forward's products, MoE layers included */
} Model;

/* Builds a model with freshly initialised weights (seeded by config.seed). */
int model_create(Model **out, const ModelConfig *config, char *err);

/* model_create in two steps, for a loader that checks a file against the
** model's tensors before it pays for them: model_plan validates the
** configuration and registers every parameter (params, num_parameters) but
** allocates none of them; model_allocate checks the memory they need against
** the machine's (ml_memory_check) and allocates them, zeroed, with the hash
** router's map derived from the seed. */
int model_plan(Model **out, const ModelConfig *config, char *err);
int model_allocate(Model *m, char *err);

/* The most tokens one batch may hold (B x T): every loop over a batch's
** tokens indexes with an int, and N x E router probabilities must too. */
#define MODEL_MAX_BATCH_TOKENS (1 << 22)

/* An estimate of the bytes a batch of B sequences needs, by part: the
** parameters, their gradients and AdamW moments (training), the activations,
** the backward pass's scratch (training), and the MoE layers' per-batch state
** at the nominal experts per token. */
typedef struct {
    size_t parameters, gradients, optimizer, activations, scratch, moe, total;
} ModelMemory;
void model_memory(const Model *m, int B, int training, ModelMemory *out);
/* Their total. */
size_t model_memory_bytes(const Model *m, int B, int training);

/* Refuses, with a message, a batch of B sequences of T tokens that is empty,
** longer than the context, over MODEL_MAX_BATCH_TOKENS, or needs more memory
** than ml_memory_check allows. model_forward checks it; callers that
** allocate per batch (the trainer) check it first. */
int model_check_batch(const Model *m, int B, int T, int training, char *err);
void model_free(Model *m);

/* Runs the model on inputs (B,T) with T <= context. With targets, computes
** the loss into acts.losses and mean_loss; without, only acts.probs. */
int model_forward(Model *m, const int *inputs, const int *targets, int B, int T, char *err);
/* Gradients of mean_loss for the last forward (which must have had targets),
** accumulated into the gradient arena; model_zero_grad zeroes those of the
** parameters trained here (model_trains). */
void model_zero_grad(Model *m);
int model_backward(Model *m, char *err);
/* After a training forward on one of `ranks` slices of a batch: the
** auxiliary losses (aux_loss, aux_parts) and their gradients as the whole
** batch's, from each MoE layer's sums added up by `sum` over the ranks. */
void model_reduce_aux(Model *m, MoeSum sum, int ranks);

/* Whether this process trains parameter i (Model.owner). */
static inline int model_trains(const Model *m, int i) {
    return !m->owner || m->owner[i] < 0 || m->owner[i] == m->owner_me;
}

/* Zeroes the gradients and AdamW moments of the tensors not trained here
** (Model.owner), giving back the memory of their whole pages. */
void model_release_untrained(Model *m);

/* Global L2 norm of the gradients; with clip > 0 and norm > clip, scales them
** down to norm `clip`. Returns the norm before clipping. With sharded
** experts (Model.owner), `sum` adds the ranks' sums of their own experts'
** squares; NULL for one process. */
float model_clip_grad(Model *m, float clip, MoeSum sum);
/* One AdamW step on every parameter trained here (model_trains); weight
** decay on matrices only. The gradients are zero afterwards (consumed),
** ready for the next backward. After model_backward_adamw, the parameters
** that the backward updated are left alone. */
int model_adamw_step(Model *m, float lr, float beta1, float beta2, float eps,
                     float weight_decay, char *err);

/* model_adamw_step's arguments. */
typedef struct { float lr, beta1, beta2, eps, weight_decay; } AdamwOptions;
/* model_backward with AdamW fused into it: in each token-choice MoE layer,
** every expert's matrices (fc, gate, proj) are updated by AdamW as soon as
** their gradients are complete, while these are in cache, and the gradients
** are not kept (grad_mem holds zeros there); model_adamw_step, called next
** with the same options, updates the rest. With 64 experts these matrices
** are nearly all of the parameters, and AdamW, which streams every
** parameter's weight, gradient and moments through memory, was 8% of a
** step (README, Speed). The same arithmetic as model_backward and
** model_adamw_step, so the same bits, for a step whose gradients need
** nothing else first: no clipping, one process. Stratified and merged
** layers and expert parallelism, whose experts' gradients come in pieces,
** are left to model_adamw_step. */
int model_backward_adamw(Model *m, const AdamwOptions *o, char *err);

/* Mean next-token loss of one sequence of n tokens (2 <= n <= context + 1).
** This and model_sample compute in this process alone, under expert
** parallelism too (no rank waits for another). */
int model_sequence_loss(Model *m, const int *tokens, int n, float *loss, char *err);
/* The same forward: losses (n - 1) gets each position's next-token loss
** (their mean is the sequence's loss). */
int model_sequence_losses(Model *m, const int *tokens, int n, float *losses, char *err);

/* Appends n_new sampled tokens to the prompt: out (n_prompt + n_new) starts
** with the prompt. temperature 0 is greedy; top_k 0 keeps every token. */
int model_sample(Model *m, const int *prompt, int n_prompt, int n_new, float temperature,
                 int top_k, uint64_t seed, int *out, char *err);

/* Restarts the router-noise stream from seed (a run's seed; the model's
** config seed until then). */
void model_seed_noise(Model *m, uint64_t seed);

/* Parameters a token uses: everything outside the experts, plus k experts
** (router.k; 1 for hash) of average size per MoE layer. */
/* Dense to sparse (moe/moefy.c): a new model whose every FFN is the dense
** one's hidden neurons split into E experts (balanced k-means on the
** normalised fc rows, or a seeded random split). router (NULL: "all", the
** same function) may ask for "similarity" with its select, k and p. */
int moe_moefy(Model **out, const Model *dense, int E, int kmeans, uint64_t seed,
              const MoeConfig *router, char *err);

/* What moe_fit_routers reports: the routers' loss (cross-entropy against
** the groups' activation-mass shares, averaged over MoE layers) and recall
** (the share of the mass their choice covers), at the first step and over
** the last tenth of the steps (at least the last step). */
typedef struct {
    double first_loss, loss, first_recall, recall;
} MoeFit;

/* Fits a moefied model's learned routers (moe/moefy.c), the rest frozen:
** steps batches of B sequences from the corpus's train split. */
int moe_fit_routers(Model *m, const Corpus *corpus, int steps, int B, float lr,
                    uint64_t seed, MoeFit *fit, char *err);

/* 1 when no position's output depends on a later position (0: expert choice
** routing, merged experts gated on whole sequences, and any capacity limit,
** which drops assignments by what the whole batch chose). */
int model_is_causal(const Model *m);
int64_t model_active_parameters(const Model *m);

/* Index of the registry entry with this name, or -1. */
int model_find_param(const Model *m, const char *name);

/* Whether the model can run under router mc instead of its own (a
** counterfactual evaluation): mc must read exactly the parameters the model
** has, of the same shapes. A message says what is missing otherwise. */
int model_check_router(const Model *m, const MoeConfig *mc, char *err);

#endif
