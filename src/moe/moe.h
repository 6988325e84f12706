/*
** moe/moe.h — the Mixture-of-Experts FFN layer: router, selection, capacity,
** grouped expert execution, auxiliary losses, and the route trace.
**
** Forward, named where each stage happens (which is where the trace hooks in):
**   route     logits = x · Wrᵀ (+ noise in training), p = softmax(logits)
**   select    the router's rule (router.c) → per token: experts, weights, p
**   capacity  drop assignments beyond C per expert (token-choice routers)
**   group     a counting pass: the histogram is the expert load; tokens are
**             gathered into contiguous rows, expert by expert
**   experts   one GEMM per expert over its rows (experts spread over threads)
**   combine   out[t] += Σ weight · expert output, in rank order
** Backward runs the same stages in reverse. The state of the last forward
** stays in MoeState: what backward needs, and what the route trace below
** hands the recorder (selection, load, drops, FLOPs, sparsity).
**
** A model's MoE block holds a MoeLayer: a token-choice layer (layer.c, one
** MoeState), a stratified one (stratified.c: one token-choice pass per
** stratum, composed of the same stages), or a merged one (merge.c: experts
** merged per sequence or segment). Each design is in its own file; the
** routers are one table (router.c); moefy.c turns dense FFNs into experts.
*/
#ifndef MOELAB_MOE_H
#define MOELAB_MOE_H

#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "ops.h"

typedef struct {
    float *router;                /* (E, C); NULL for hash routing and stratified layers */
    float *fc[MOE_MAX_EXPERTS];   /* (H_e, C) */
    float *gate[MOE_MAX_EXPERTS]; /* (H_e, C), SwiGLU only */
    float *proj[MOE_MAX_EXPERTS]; /* (C, H_e) */
    float *fc_bias[MOE_MAX_EXPERTS]; /* (H_e) with moe.bias (moefied dense FFNs), else NULL */
    float *bias;                  /* (C) the layer's proj bias, added once per token */
    /* stratified: stratum s's router over the experts of strata >= s, and for
    ** s >= 1 the norm its pass starts with (pass 0 uses the block's ln_2) */
    float *routers[MOE_MAX_EXPERTS];                      /* (E - m_s, C) */
    float *norm_w[MOE_MAX_EXPERTS], *norm_b[MOE_MAX_EXPERTS]; /* (C); no bias for RMSNorm */
    /* merge: a gate per linear, and with token attention r its blocks */
    float *gate_fc, *gate_proj;   /* (E, C), (E, H) */
    float *tfc_down, *tfc_up;     /* (C/r, C), (C, C/r) */
    float *tpr_down, *tpr_up;     /* (H/r, H), (H, H/r) */
} MoeWeights;

enum { AUX_BALANCE, AUX_Z, AUX_CV2, AUX_P_PENALTY, AUX_ENTROPY, AUX_KINDS };
#define MOE_STATS(E) (3 * (E) + 3)

typedef struct {
    int N, E, C, slots;       /* tokens, experts, d_model, selections per token at most */
    int capacity;             /* per expert; 0 = dropless */
    /* route */
    float *logits, *probs;    /* (N, E) */
    float *lse;               /* (N) logsumexp of the logits */
    float *entropy;           /* (N) each token's entropy of p */
    int *top1;                /* (N) argmax p */
    /* select + capacity: rank order per token */
    int *sel_expert;          /* (N, slots) */
    float *sel_weight;        /* (N, slots) the factor on the expert's output */
    float *sel_p;             /* (N, slots) the router probability of the choice */
    int *sel_count;           /* (N) */
    int *sel_row;             /* (N, slots) row in the grouped buffers, -1 if dropped */
    /* group: kept assignments per expert */
    int *counts, *offsets;    /* (E), (E + 1) */
    int *dropped;             /* (E) */
    size_t *hoff;             /* (E + 1) offsets into the hidden buffers */
    float *prob_mass;         /* (E) Σ_t p_{t,e} */
    int *row_token;           /* (A) */
    /* experts */
    float *xe, *ye;           /* (A, C) gathered inputs, unweighted outputs */
    float *he, *ge, *ae;      /* (Σ_e n_e · H_e) fc, gate pre-activation, activation */
    /* accounting */
    double flops;             /* FLOPs executed by this layer in the last forward */
    float aux[AUX_KINDS];     /* unweighted auxiliary losses */
    float aux_weighted;       /* Σ coefficient · aux */
    float aux_dp[MOE_MAX_EXPERTS]; /* d aux_weighted / d p_te (the same for every t) */
    /* what aux is made of, summed over the tokens (MOE_STATS(E)): first
    ** choices per expert (E), assignments per expert (E), probability mass
    ** (E), Σ entropy, Σ lse², tokens */
    double stats[MOE_STATS(MOE_MAX_EXPERTS)];
    float aux_tokens;         /* what the per-token aux gradients (z, entropy) divide
                              ** by: N, or over ranks the whole batch's / ranks */
    /* capacities of the buffers above (grow only) */
    int cap_tokens, cap_slots;
    size_t cap_rows, cap_hidden;
    int *scratch;             /* (N) */
    int freeze;               /* 1: keep the last selection (and drops) and
                              ** recompute only the weights from p (gradient
                              ** checks); 2: keep the weights too (re-running a
                              ** recorded selection) */
    const float *gumbel;      /* (N, E) Gumbel noise for a sampled choice, or NULL;
                              ** set by the caller (stratified passes) */
    struct MoeExchange *ex;   /* expert parallelism's state (moe/parallel.c); NULL */
} MoeState;

typedef struct MoeExchange MoeExchange; /* expert parallelism's (moe/parallel.c) */
typedef struct Strata Strata; /* a stratified layer's passes (stratified.c) */
typedef struct Merge Merge;   /* a merged layer's state (merge.c) */
struct MoeScratch;

/*
** One MoE block's layer, as the model holds it: a token-choice layer is one
** MoeState; a stratified layer runs one MoeState per stratum that has tokens.
** The totals of the last forward are the same for both.
*/
typedef struct {
    MoeState tc;              /* token-choice layers */
    Strata *strata;           /* stratified layers; NULL otherwise */
    Merge *merge;             /* merged layers; NULL otherwise */
    int freeze;               /* as MoeState.freeze, for every pass */
    double flops;             /* executed in the last forward, every pass */
    double flops_topk;        /* merged layers: what the same gates would cost as a
                              ** per-token top-k layer; the same as flops otherwise */
    float aux[AUX_KINDS];     /* unweighted, averaged over the passes that ran */
    float aux_weighted;
} MoeLayer;

void moe_layer_free(MoeLayer *l);

/* out (N,C), N = B·T, holds the block's residual stream and gets the layer added:
** out += MoE(x), x (N,C) = ln_2(out) (a stratified layer's later passes
** normalise out itself). tokens (N) are the input ids (hash routing), noise
** (N,E) the router noise of training or NULL; key seeds the Gumbel draws of
** a sampled second choice (stratified). */
int moe_layer_forward(MoeLayer *l, const ModelConfig *c, const MoeWeights *w, const int *hash_map,
                      float *out, const float *x, const int *tokens, const float *noise, int B,
                      int T, uint64_t key, char *err);

/* Sums the sums of the last forward's auxiliary losses with `sum` (over
** `ranks` processes, dist.h) and recomputes the losses and their gradient
** as the whole batch's; merged layers have none. */
typedef void (*MoeSum)(double *x, size_t n);
void moe_layer_reduce_aux(MoeLayer *l, const ModelConfig *c, MoeSum sum, int ranks);
/* Under expert parallelism: the last forward's assignments from rank to
** rank (every pass), added to tokens (ranks × ranks, source-major). */
void moe_layer_traffic(const MoeLayer *l, int ranks, int64_t *tokens);

/* AdamW fused into the backward pass (model_backward_adamw): each expert's
** matrices updated as soon as their gradients are complete, in place of
** accumulating these into g. The moments m and v lie at the weights'
** offsets from params, the start of the parameter arena. */
typedef struct {
    AdamwStep step; /* ops.h */
    float weight_decay;
    const float *params;
    float *m, *v;
} MoeUpdate;
/* Whether a layer of mc updates its experts itself when given a MoeUpdate:
** token-choice layers on one process, whose experts' gradients are complete
** after one product each (not stratified or merged layers, nor expert
** parallelism). */
int moe_layer_can_update(const MoeConfig *mc);

/* dx (N,C) = d/dx (written); dout (N,C) is d/d out, and a stratified layer
** adds to it what flows through its later passes' norms. Gradients
** accumulate into g; with u (moe_layer_can_update), the experts' matrices
** are updated instead and their gradients in g left as they are. */
int moe_layer_backward(MoeLayer *l, struct MoeScratch *scr, const ModelConfig *c, const MoeWeights *w,
                       MoeWeights *g, float *dx, float *dout, const float *x, float aux_scale,
                       const MoeUpdate *u, char *err);

/* Backward scratch shared by every MoE layer (grow only). */
typedef struct MoeScratch {
    float *dye, *dxe;         /* (A, C) */
    float *dae, *dhe, *dge;   /* (Σ n_e H_e) */
    float *dw;                /* (N, slots) */
    float *dprobs, *dlogits;  /* (N, E) */
    float *drouter_pieces;    /* matmul_backward's partial products (ops.h) */
    float *dexpert;           /* (threads, 3 · max H_e · C) with a MoeUpdate: each
                              ** thread's expert's weight gradients */
    size_t cap_rows, cap_hidden, cap_tokens, cap_pieces, cap_dexpert;
} MoeScratch;

void moe_state_free(MoeState *s);

/* Rows grouped by expert, as the experts' products see them: counts[e] rows
** from row offsets[e], their hidden activations from hoff[e]. A layer's own
** (MoeState), or under expert parallelism the rows of this rank's experts
** from every rank (moe/parallel.c). Backward reads dye and writes dxe. */
typedef struct {
    int E, C;
    const int *counts, *offsets;
    const size_t *hoff;
    float *xe, *he, *ge, *ae, *ye;      /* (A, C), (Σ n_e H_e) ×3, (A, C) */
    float *dye, *dxe, *dae, *dhe, *dge; /* backward */
} MoeRows;
void moe_rows_forward(const MoeRows *v, const MoeConfig *mc, ActKind act, const MoeWeights *w);
/* With u, the experts' matrices are updated, their gradients taken in
** dexpert (MoeScratch) instead of g. */
void moe_rows_backward(const MoeRows *v, const MoeConfig *mc, ActKind act, const MoeWeights *w,
                       MoeWeights *g, const MoeUpdate *u, float *dexpert);

/* Expert parallelism (moe/parallel.c): whether the layer's experts run on
** their ranks (moe.parallel = "experts", over more than one rank). */
int moe_parallel(const MoeConfig *mc);
/* 0, or -1 with err when mc runs expert parallel and its placement names a
** rank beyond the ranks there are (checked before a run's collective part). */
int moe_check_placement(const MoeConfig *mc, char *err);
/* The rank of each expert (E of mc->experts) among `ranks`. */
void moe_placement(const MoeConfig *mc, int ranks, int *rank_of);
/* Whether this process trains expert e: all do, unless mc runs expert
** parallel, where only its rank does (the trainer's Model.owner). */
int moe_expert_here(const MoeConfig *mc, int e);
/* A forward's grouped rows (s->xe) to their experts' ranks, the experts run
** there on every rank's rows, their outputs back into s->ye. */
int moe_parallel_forward(MoeState *s, const MoeConfig *mc, ActKind act, const MoeWeights *w,
                         char *err);
/* The same, reversed: scr->dye out, scr->dxe back; weight gradients into g
** for this rank's experts (the whole batch's, as the trainer averages them
** over the ranks). */
int moe_parallel_backward(MoeState *s, struct MoeScratch *scr, const MoeConfig *mc, ActKind act,
                          const MoeWeights *w, MoeWeights *g, char *err);
/* 1 and the rows this rank's experts ran on, after a parallel forward; else 0. */
int moe_parallel_rows(const MoeState *s, MoeRows *v);
/* Assignments sent from rank to rank by the last parallel forward, added to
** tokens (ranks × ranks, source-major; the diagonal stayed). */
void moe_parallel_traffic(const MoeState *s, int ranks, int64_t *tokens);
void moe_exchange_free(struct MoeExchange *ex);
void moe_scratch_free(MoeScratch *s);

/* out (N,C) += MoE(x (N,C)). tokens (N) are the input ids (for hash routing);
** noise (N,E) is the standard normal noise to add to the logits times
** config noise, or NULL. Fills s; returns -1 only when out of memory. */
int moe_forward(MoeState *s, const MoeConfig *mc, ActKind act, const MoeWeights *w,
                const int *hash_map, float *out, const float *x, const int *tokens,
                const float *noise, int N, int C, char *err);

/* aux, aux_weighted and aux_dp from s->stats: those of the forward that
** filled them, or the sums over `ranks` processes' forwards (a dist.h step;
** then aux_dp is the whole batch's, times ranks). */
void moe_aux(MoeState *s, const MoeConfig *mc, int has_router, int ranks);

/* dx (N,C) = d/dx; grads accumulate into g. aux_scale multiplies the gradient
** of this layer's weighted auxiliary losses (1 / MoE layers, as they are
** averaged over layers). */
int moe_backward(MoeState *s, MoeScratch *scr, const MoeConfig *mc, ActKind act,
                 const MoeWeights *w, MoeWeights *g, float *dx, const float *dout,
                 const float *x, float aux_scale, const MoeUpdate *u, char *err);

/*
** The route trace of the last forward: what the recorder persists, so that
** nothing outside the layer reads its state. Tokens are the layer's rows
** 0 .. N-1; a token-choice layer has one pass (0).
*/
typedef struct {
    int token, pass, rank, expert; /* rank 0 = the router's first choice */
    float weight;                  /* the factor on the expert's output */
} MoeRoute;

typedef struct {
    int experts;  /* assignments kept, over the passes */
    int passes;   /* passes through the layer */
    double flops; /* 2 × multiply-adds routing it cost, router included */
} MoeTokenTrace;

typedef struct {
    int64_t tokens, dropped; /* assignments kept and dropped */
    double prob_mass;        /* Σ_t p_te; NaN without router probabilities */
} MoeExpertTrace;

/* Kept assignments: the rows moe_trace_routes writes. */
size_t moe_trace_count(const MoeLayer *l);
/* One row per kept assignment: pass by pass, token by token in each, in rank
** order; returns the count. */
size_t moe_trace_routes(const MoeLayer *l, const MoeConfig *mc, MoeRoute *out);
MoeTokenTrace moe_trace_token(const MoeLayer *l, const MoeConfig *mc, ActKind act, int t);
MoeExpertTrace moe_trace_expert(const MoeLayer *l, const MoeConfig *mc, int e);
/* Adds each expert's hidden activations, those with |a| <= eps and Σ|a| to
** activations, near_zero and abs_sum (E each). */
void moe_trace_sparsity(const MoeLayer *l, const MoeConfig *mc, float eps, int64_t *activations,
                        int64_t *near_zero, double *abs_sum);

/* The same for one token-choice pass over E experts, the first of which is
** expert `first` of the layer (stratified.c composes its passes of these;
** mc is the layer's configuration). */
size_t moe_pass_routes(const MoeState *s, int pass, int first, const int *rows, MoeRoute *out);
MoeTokenTrace moe_pass_token(const MoeState *s, const MoeConfig *mc, int first, ActKind act,
                             int t);
void moe_pass_sparsity(const MoeState *s, const MoeConfig *mc, int first, float eps,
                       int64_t *activations, int64_t *near_zero, double *abs_sum);

/* Each expert's share of token t's activation mass Σ_h |a_h| (uniform when it
** is all zero), after a forward in which every expert ran on every token (the
** "all" and oracle selections): share (E). The oracle chooses by it, and
** moe_fit_routers fits learned routers to it. */
void moe_mass_shares(const MoeState *s, const MoeConfig *mc, int t, float *share);

/* moefy.c: one learned router's fitting loss (moe_fit_routers, model.h): the
** mean cross-entropy of softmax(x · Wᵀ) against each expert's share q (N, E)
** of the activation mass; grad (E, C) = d loss / d W, and the share that the
** router's own choice covers added to recall. p (N, E) is scratch. */
double moe_router_fit_loss(float *grad, float *p, const float *x, const float *W, const float *q,
                           const MoeConfig *mc, int N, int C, int E, double *recall);

/* merge.c */
int merge_forward(MoeLayer *l, const ModelConfig *c, const MoeWeights *w, float *out,
                  const float *x, int B, int T, char *err);
int merge_backward(MoeLayer *l, const ModelConfig *c, const MoeWeights *w, MoeWeights *g,
                   float *dx, const float *dout, const float *x, char *err);
void merge_free(Merge *m);
size_t merge_trace_count(const Merge *m);
size_t merge_trace_routes(const Merge *m, MoeRoute *out);
MoeTokenTrace merge_trace_token(const Merge *m, int t);
MoeExpertTrace merge_trace_expert(const Merge *m, int e);

/* stratified.c */
int strata_forward(MoeLayer *l, const ModelConfig *c, const MoeWeights *w, float *out,
                   const float *x, int N, uint64_t key, char *err);
int strata_backward(MoeLayer *l, struct MoeScratch *scr, const ModelConfig *c, const MoeWeights *w,
                    MoeWeights *g, float *dx, float *dout, const float *x, float aux_scale,
                    char *err);
void strata_free(Strata *s);
void strata_reduce_aux(MoeLayer *l, const ModelConfig *c, MoeSum sum, int ranks);
void strata_traffic(const Strata *s, int ranks, int64_t *tokens);
size_t strata_trace_count(const Strata *s);
size_t strata_trace_routes(const Strata *s, const MoeConfig *mc, MoeRoute *out);
MoeTokenTrace strata_trace_token(const Strata *s, const MoeConfig *mc, ActKind act, int t);
MoeExpertTrace strata_trace_expert(const Strata *s, const MoeConfig *mc, int e);
void strata_trace_sparsity(const Strata *s, const MoeConfig *mc, float eps, int64_t *activations,
                           int64_t *near_zero, double *abs_sum);

#endif
