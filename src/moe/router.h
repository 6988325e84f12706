/*
** moe/router.h — the routers of SPEC §2: their table (one entry per router:
** name, keys, selection, weights), the selection rules, and the capacity
** limit. Routers see probabilities p = softmax(x · Wrᵀ) (computed by the MoE
** layer) and decide which experts a token uses and with what weight.
**
** A token's selection is written in rank order (rank 0 = the router's first
** choice) into `experts` and `weights`, at most `slots` entries; the count is
** returned. Ties between equal probabilities go to the lower expert index.
*/
#ifndef MOELAB_ROUTER_H
#define MOELAB_ROUTER_H

#include "config.h"

/* The keys of `moe.router` (beside `kind`), as bits: what a router reads. */
enum {
    ROUTER_KEY_K = 1 << 0,
    ROUTER_KEY_P = 1 << 1,
    ROUTER_KEY_MAX_K = 1 << 2,
    ROUTER_KEY_NORMALIZE = 1 << 3,
    ROUTER_KEY_CAPACITY_FACTOR = 1 << 4,
    ROUTER_KEY_MIN_CAPACITY = 1 << 5,
    ROUTER_KEY_NOISE = 1 << 6,
    ROUTER_KEY_STRATA = 1 << 7,
    ROUTER_KEY_SECOND = 1 << 8,
    ROUTER_KEY_SEGMENT = 1 << 9,
    ROUTER_KEY_TOKEN_ATTENTION = 1 << 10,
    ROUTER_KEY_SELECT = 1 << 11,
    ROUTER_KEY_COUNT = 12
};

/* The key of bit i (ROUTER_KEY_K is bit 0: "k"). */
const char *router_key_name(int bit);

/* One batch's selection, filled in rank order per token (slots entries each). */
typedef struct {
    const float *probs;   /* (N, E) p; NULL for hash */
    const float *logits;  /* (N, E) the logits p came from */
    const float *gumbel;  /* (N, E) standard Gumbel noise for a sampled choice, or NULL */
    const int *tokens;    /* (N) token ids, for hash */
    const int *hash_map;  /* (vocab) expert of each token id, for hash */
    int N, E, slots;
    int *sel_expert;      /* (N, slots) */
    float *sel_weight;    /* (N, slots) */
    float *sel_p;         /* (N, slots) p of each choice */
    int *sel_count;       /* (N) */
    int *scratch;         /* (N) */
    int capacity;         /* set by routers with their own capacity (expert choice) */
} RouterBatch;

/*
** A router: one entry of the table in router.c. Adding a router is adding an
** entry there (and its name to RouterKind and config.c's list of names).
*/
typedef struct {
    RouterKind kind;
    const char *name;
    int has_router;   /* a router weight and probabilities (hash has neither) */
    int token_choice; /* capacity limits its selections afterwards; expert choice
                      ** sets its own (and sees the whole batch: not causal) */
    int renormalise_kept; /* weights renormalised over the assignments that
                          ** capacity kept (stratified), not over the selection */
    /* the moe.router keys it reads under this configuration (ROUTER_KEY_*) */
    unsigned (*keys)(const MoeConfig *mc);
    /* selections per token at most */
    int (*slots)(const MoeConfig *mc);
    /* experts per token nominally: capacity's k and the active parameter count */
    int (*nominal_k)(const MoeConfig *mc);
    /* the selection of a batch */
    void (*select)(const MoeConfig *mc, RouterBatch *b);
    /* 1: the weights are p renormalised over the selection; 0: raw p (or 1
    ** without a router); -1: 1 whatever p (similarity), so no gradient
    ** reaches the router through them. router_weights_backward takes 1 or 0. */
    int (*renormalised)(const MoeConfig *mc);
} Router;

/* The router of a kind (never NULL for a valid kind). */
const Router *router_of(RouterKind kind);

/* ceil() of a capacity from a float factor, exact products not rounded up. */
int router_ceil_capacity(double x);

/* The weights of a given selection (n experts) from p: raw, renormalised or 1. */
void router_weights(const Router *r, const MoeConfig *mc, const float *p, const int *experts,
                    float *weights, int n);

/* topk: the k largest p; weights p renormalised over the k, or raw p. */
int router_select_topk(const float *p, int E, int k, int normalize, int *experts,
                       float *weights);

/* threshold (XMoE): sort p descending; keep rank j while the sum of the
** probabilities before it is < t; rank 0 always; at most max_k (0 = no cap).
** Weights raw p, or renormalised over the kept ranks (the topp alias). */
int router_select_threshold(const float *p, int E, float t, int max_k, int normalize,
                            int *experts, float *weights);

/* hash: expert = map[token], weight 1. */
int router_select_hash(int token, const int *map, int *experts, float *weights);

/* expert_choice: each expert takes the `capacity` tokens of the N with the
** largest p (ties: lower token index); a token's experts are then ranked by p.
** probs (N,E); sel_expert / sel_weight (N,E); sel_count (N). order (N) is
** scratch. Weights are p. */
void router_select_expert_choice(const float *probs, int N, int E, int capacity,
                                 int *sel_expert, float *sel_weight, int *sel_count, int *order);

/* Capacity: each expert keeps at most `capacity` assignments; rank-0 choices
** before rank-1 choices and so on, within a rank the larger p first (ties:
** lower token index). sel (N,slots) with sel_count (N); p_of_slot (N,slots) the
** probability of each choice. kept (N,slots) gets 1 or 0; dropped (E) counts
** the dropped assignments. order (N) is scratch. */
void router_apply_capacity(const int *sel_expert, const float *p_of_slot, const int *sel_count,
                           int N, int slots, int E, int capacity, int *kept, int *dropped,
                           int *order);

/* Backward of a token's weights to its probabilities: dp (E) += d weights / d p
** applied to dw (n). With renormalised weights w_i = p_i / s over the selected
** set, dp_j = (dw_j - Σ_i dw_i w_i) / s; with raw weights dp_j = dw_j. */
void router_weights_backward(float *dp, const float *p, const int *experts, const float *weights,
                             const float *dw, int n, int renormalised);

#endif
