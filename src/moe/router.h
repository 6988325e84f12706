/*
** moe/router.h — the selection rules of SPEC §2, one function per rule, and the
** capacity limit. Routers see probabilities p = softmax(x · Wrᵀ) (computed by
** the MoE layer) and decide which experts a token uses and with what weight.
**
** A token's selection is written in rank order (rank 0 = the router's first
** choice) into `experts` and `weights`, at most `slots` entries; the count is
** returned. Ties between equal probabilities go to the lower expert index.
*/
#ifndef MOELAB_ROUTER_H
#define MOELAB_ROUTER_H

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
