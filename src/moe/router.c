/*
** moe/router.c — the routers (router.h): their selection rules, the capacity
** limit, and at the end the table with one entry per router.
*/
#include "moe/router.h"

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Expert indices sorted by p descending, ties to the lower index (insertion
** sort: E is small and the sort must be stable). */
static void sort_desc(const float *p, int E, int *idx) {
    for (int i = 0; i < E; i++) {
        int j = i;
        while (j > 0 && p[idx[j - 1]] < p[i]) {
            idx[j] = idx[j - 1];
            j--;
        }
        idx[j] = i;
    }
}

static void renormalise(float *w, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += w[i];
    if (s > 0.0f)
        for (int i = 0; i < n; i++) w[i] /= s;
}

int router_select_topk(const float *p, int E, int k, int normalize, int *experts,
                       float *weights) {
    /* one pass, keeping the best k in rank order: O(E·k); a strictly larger p
    ** is needed to pass a kept one, so ties go to the lower index */
    int n = 0;
    for (int e = 0; e < E; e++) {
        if (n == k && !(p[e] > weights[k - 1])) continue;
        int j = n < k ? n++ : k - 1;
        while (j > 0 && p[e] > weights[j - 1]) {
            experts[j] = experts[j - 1];
            weights[j] = weights[j - 1];
            j--;
        }
        experts[j] = e;
        weights[j] = p[e];
    }
    if (normalize) renormalise(weights, k);
    return k;
}

int router_select_threshold(const float *p, int E, float t, int max_k, int normalize,
                            int *experts, float *weights) {
    int idx[256];
    sort_desc(p, E, idx);
    int cap = max_k > 0 && max_k < E ? max_k : E;
    double before = 0.0; /* the mass of the ranks already kept */
    int n = 0;
    for (int j = 0; j < cap; j++) {
        if (j > 0 && !(before < t)) break;
        experts[n] = idx[j];
        weights[n] = p[idx[j]];
        before += p[idx[j]];
        n++;
    }
    if (normalize) renormalise(weights, n);
    return n;
}

int router_select_hash(int token, const int *map, int *experts, float *weights) {
    experts[0] = map[token];
    weights[0] = 1.0f;
    return 1;
}

/* qsort's context, as qsort has none of its own */
static const float *sort_key;
static int sort_stride, sort_column;

static int by_key_desc(const void *a, const void *b) {
    int i = *(const int *)a, j = *(const int *)b;
    float x = sort_key[(size_t)i * sort_stride + sort_column];
    float y = sort_key[(size_t)j * sort_stride + sort_column];
    if (x > y) return -1;
    if (x < y) return 1;
    return (i > j) - (i < j);
}

void router_select_expert_choice(const float *probs, int N, int E, int capacity,
                                 int *sel_expert, float *sel_weight, int *sel_count, int *order) {
    if (capacity > N) capacity = N;
    memset(sel_count, 0, sizeof(int) * (size_t)N);
    for (int e = 0; e < E; e++) {
        for (int t = 0; t < N; t++) order[t] = t;
        sort_key = probs;
        sort_stride = E;
        sort_column = e;
        qsort(order, (size_t)N, sizeof(int), by_key_desc);
        for (int c = 0; c < capacity; c++) {
            int t = order[c];
            sel_expert[(size_t)t * E + sel_count[t]] = e;
            sel_weight[(size_t)t * E + sel_count[t]] = probs[(size_t)t * E + e];
            sel_count[t]++;
        }
    }
    /* rank each token's experts by p */
    for (int t = 0; t < N; t++) {
        int *ex = sel_expert + (size_t)t * E;
        float *w = sel_weight + (size_t)t * E;
        for (int i = 1; i < sel_count[t]; i++) {
            int e = ex[i];
            float x = w[i];
            int j = i;
            while (j > 0 && (w[j - 1] < x || (w[j - 1] == x && ex[j - 1] > e))) {
                ex[j] = ex[j - 1];
                w[j] = w[j - 1];
                j--;
            }
            ex[j] = e;
            w[j] = x;
        }
    }
}

void router_apply_capacity(const int *sel_expert, const float *p_of_slot, const int *sel_count,
                           int N, int slots, int E, int capacity, int *kept, int *dropped,
                           int *order) {
    int fill[256] = {0};
    memset(dropped, 0, sizeof(int) * (size_t)E);
    for (int r = 0; r < slots; r++) {
        int n = 0;
        for (int t = 0; t < N; t++)
            if (r < sel_count[t]) order[n++] = t;
        if (n == 0) break;
        sort_key = p_of_slot;
        sort_stride = slots;
        sort_column = r;
        qsort(order, (size_t)n, sizeof(int), by_key_desc);
        for (int i = 0; i < n; i++) {
            int t = order[i];
            int e = sel_expert[(size_t)t * slots + r];
            int ok = fill[e] < capacity;
            kept[(size_t)t * slots + r] = ok;
            if (ok) fill[e]++;
            else dropped[e]++;
        }
    }
}

void router_weights_backward(float *dp, const float *p, const int *experts, const float *weights,
                             const float *dw, int n, int renormalised) {
    if (!renormalised) {
        for (int i = 0; i < n; i++) dp[experts[i]] += dw[i];
        return;
    }
    float s = 0.0f, dot = 0.0f;
    for (int i = 0; i < n; i++) {
        s += p[experts[i]];
        dot += dw[i] * weights[i];
    }
    if (s <= 0.0f) return;
    for (int i = 0; i < n; i++) dp[experts[i]] += (dw[i] - dot) / s;
}

/* ------------------------------------------------------------------------ */
/* the table                                                                 */

static const char *const key_names[ROUTER_KEY_COUNT] = {
    "k",     "p",      "max_k",  "normalize", "capacity_factor", "min_capacity",
    "noise", "strata", "second", "segment",   "token_attention", "select"};

const char *router_key_name(int bit) {
    return bit >= 0 && bit < ROUTER_KEY_COUNT ? key_names[bit] : "?";
}

/* capacity_factor > 0 limits a token-choice router: min_capacity then applies */
static unsigned capacity_keys(const MoeConfig *mc) {
    return ROUTER_KEY_CAPACITY_FACTOR | (mc->capacity_factor > 0.0f ? ROUTER_KEY_MIN_CAPACITY : 0);
}

/* Per-token rules over a batch, in parallel: each token's selection is its own. */
static void select_per_token(const MoeConfig *mc, RouterBatch *b) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < b->N; t++) {
        const float *p = b->probs ? b->probs + (size_t)t * b->E : NULL;
        int *ex = b->sel_expert + (size_t)t * b->slots;
        float *wt = b->sel_weight + (size_t)t * b->slots;
        int n;
        switch (mc->kind) {
        case ROUTER_TOPK: n = router_select_topk(p, b->E, mc->k, mc->normalize, ex, wt); break;
        case ROUTER_HASH: n = router_select_hash(b->tokens[t], b->hash_map, ex, wt); break;
        default:
            n = router_select_threshold(p, b->E, mc->p, mc->max_k, mc->kind == ROUTER_TOPP, ex, wt);
        }
        b->sel_count[t] = n;
        for (int i = 0; i < n; i++) b->sel_p[(size_t)t * b->slots + i] = p ? p[ex[i]] : 0.0f;
    }
}

/* ceil() of a capacity computed from a float factor: 1.1f is 1.10000002, so
** an exact product such as 1.1 · 2560 · 2 / 8 = 704 must not round up to 705. */
int router_ceil_capacity(double x) { return (int)ceil(x * (1.0 - 1e-6)); }

static void select_expert_choice(const MoeConfig *mc, RouterBatch *b) {
    float c = mc->capacity_factor > 0.0f ? mc->capacity_factor : (float)mc->k;
    int cap = router_ceil_capacity((double)b->N * c / b->E);
    b->capacity = cap > b->N ? b->N : cap;
    router_select_expert_choice(b->probs, b->N, b->E, b->capacity, b->sel_expert, b->sel_weight,
                                b->sel_count, b->scratch);
    memcpy(b->sel_p, b->sel_weight, sizeof(float) * (size_t)b->N * b->slots);
}

static unsigned topk_keys(const MoeConfig *mc) {
    return ROUTER_KEY_K | ROUTER_KEY_NORMALIZE | ROUTER_KEY_NOISE | capacity_keys(mc);
}
static int topk_slots(const MoeConfig *mc) { return mc->k; }
static int topk_renormalised(const MoeConfig *mc) { return mc->normalize; }

/* threshold and topp read k only as capacity's k */
static unsigned threshold_keys(const MoeConfig *mc) {
    return ROUTER_KEY_P | ROUTER_KEY_MAX_K | ROUTER_KEY_NOISE | capacity_keys(mc) |
           (mc->capacity_factor > 0.0f ? ROUTER_KEY_K : 0);
}
static int threshold_slots(const MoeConfig *mc) { return mc->max_k > 0 ? mc->max_k : mc->experts; }
static int never(const MoeConfig *mc) { (void)mc; return 0; }
static int always(const MoeConfig *mc) { (void)mc; return 1; }
static int config_k(const MoeConfig *mc) { return mc->k; }

/* expert choice: k is its c unless capacity_factor gives it */
static unsigned expert_choice_keys(const MoeConfig *mc) {
    return ROUTER_KEY_CAPACITY_FACTOR | ROUTER_KEY_NOISE |
           (mc->capacity_factor > 0.0f ? 0 : ROUTER_KEY_K);
}
static int expert_choice_slots(const MoeConfig *mc) { return mc->experts; }
/* experts per token on average: c, from capacity_factor or else k (rounded) */
static int expert_choice_nominal_k(const MoeConfig *mc) {
    if (mc->capacity_factor <= 0.0f) return mc->k;
    int c = (int)lroundf(mc->capacity_factor);
    return c < 1 ? 1 : c > mc->experts ? mc->experts : c;
}

static unsigned hash_keys(const MoeConfig *mc) { return capacity_keys(mc); }

/* One stratum's pass (SMoE): top-2 over the experts it sees, the first the
** largest p, the second the next largest or, with second = "sample", the
** largest logit + Gumbel noise among the others (as the reference code);
** weights renormalised over the pair (and again over what capacity keeps). */
static void select_stratum_top2(const MoeConfig *mc, RouterBatch *b) {
    int E = b->E;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < b->N; t++) {
        const float *p = b->probs + (size_t)t * E;
        int *ex = b->sel_expert + (size_t)t * b->slots;
        float *wt = b->sel_weight + (size_t)t * b->slots;
        int first = 0;
        for (int e = 1; e < E; e++)
            if (p[e] > p[first]) first = e;
        int second = -1;
        if (E > 1) {
            const float *l = b->logits + (size_t)t * E;
            const float *g = mc->second_sample && b->gumbel ? b->gumbel + (size_t)t * E : NULL;
            float best = 0.0f;
            for (int e = 0; e < E; e++) {
                if (e == first) continue;
                float key = g ? l[e] + g[e] : p[e];
                if (second < 0 || key > best) {
                    second = e;
                    best = key;
                }
            }
        }
        int n = second < 0 ? 1 : 2;
        ex[0] = first;
        if (n == 2) ex[1] = second;
        float sum = 0.0f;
        for (int i = 0; i < n; i++) sum += wt[i] = p[ex[i]];
        for (int i = 0; i < n; i++) {
            b->sel_p[(size_t)t * b->slots + i] = wt[i];
            if (sum > 0.0f) wt[i] /= sum;
        }
        b->sel_count[t] = n;
    }
}

static unsigned stratified_keys(const MoeConfig *mc) {
    return ROUTER_KEY_STRATA | ROUTER_KEY_SECOND | capacity_keys(mc);
}
static int two_at_most(const MoeConfig *mc) { return mc->experts < 2 ? mc->experts : 2; }

/* merge gates each linear per sequence or segment (moe/merge.c), not per
** token: it has no per-token selection for the token-choice stages */
static unsigned merge_keys(const MoeConfig *mc) {
    (void)mc;
    return ROUTER_KEY_K | ROUTER_KEY_SEGMENT | ROUTER_KEY_TOKEN_ATTENTION;
}
static void select_none(const MoeConfig *mc, RouterBatch *b) {
    (void)mc;
    (void)b;
    assert(!"merge layers do not select per token");
}

/* all: every expert, weight 1 (a dense FFN split into experts computes the
** same function so, moefy.c) */
static unsigned all_keys(const MoeConfig *mc) { (void)mc; return 0; }
static int all_experts(const MoeConfig *mc) { return mc->experts; }
static void select_all(const MoeConfig *mc, RouterBatch *b) {
    (void)mc;
    for (int t = 0; t < b->N; t++) {
        for (int e = 0; e < b->E; e++) {
            b->sel_expert[(size_t)t * b->slots + e] = e;
            b->sel_weight[(size_t)t * b->slots + e] = 1.0f;
            b->sel_p[(size_t)t * b->slots + e] = 0.0f;
        }
        b->sel_count[t] = b->E;
    }
}

/* similarity (moefied layers): p = softmax(x · centroidsᵀ); the k largest or
** the threshold rule on p; every chosen expert at weight 1, so that choosing
** them all is the dense FFN (MoEfication sums the chosen groups unweighted) */
static unsigned similarity_keys(const MoeConfig *mc) {
    return ROUTER_KEY_SELECT | (mc->select_threshold ? ROUTER_KEY_P : ROUTER_KEY_K);
}
static int similarity_slots(const MoeConfig *mc) { return mc->select_threshold ? mc->experts : mc->k; }
static int similarity_nominal_k(const MoeConfig *mc) {
    return mc->select_threshold ? mc->experts : mc->k;
}
static void select_similarity(const MoeConfig *mc, RouterBatch *b) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < b->N; t++) {
        const float *p = b->probs + (size_t)t * b->E;
        int *ex = b->sel_expert + (size_t)t * b->slots;
        float *wt = b->sel_weight + (size_t)t * b->slots;
        int n = mc->select_threshold ? router_select_threshold(p, b->E, mc->p, 0, 0, ex, wt)
                                     : router_select_topk(p, b->E, mc->k, 0, ex, wt);
        b->sel_count[t] = n;
        for (int i = 0; i < n; i++) {
            b->sel_p[(size_t)t * b->slots + i] = wt[i];
            wt[i] = 1.0f;
        }
    }
}
static int unit(const MoeConfig *mc) { (void)mc; return -1; }

static const Router routers[] = {
    {ROUTER_TOPK, "topk", 1, 1, 0, topk_keys, topk_slots, config_k, select_per_token,
     topk_renormalised},
    {ROUTER_THRESHOLD, "threshold", 1, 1, 0, threshold_keys, threshold_slots, config_k,
     select_per_token, never},
    {ROUTER_TOPP, "topp", 1, 1, 0, threshold_keys, threshold_slots, config_k, select_per_token,
     always},
    {ROUTER_EXPERT_CHOICE, "expert_choice", 1, 0, 0, expert_choice_keys, expert_choice_slots,
     expert_choice_nominal_k, select_expert_choice, never},
    {ROUTER_HASH, "hash", 0, 1, 0, hash_keys, always, always, select_per_token, never},
    {ROUTER_STRATIFIED, "stratified", 1, 1, 1, stratified_keys, two_at_most, two_at_most,
     select_stratum_top2, always},
    {ROUTER_MERGE, "merge", 1, 0, 0, merge_keys, config_k, config_k, select_none, always},
    {ROUTER_ALL, "all", 0, 1, 0, all_keys, all_experts, all_experts, select_all, never},
    {ROUTER_SIMILARITY, "similarity", 1, 1, 0, similarity_keys, similarity_slots,
     similarity_nominal_k, select_similarity, unit},
    {ROUTER_LEARNED, "learned", 1, 1, 0, similarity_keys, similarity_slots, similarity_nominal_k,
     select_similarity, unit},
    {ROUTER_ORACLE, "oracle", 0, 1, 0, similarity_keys, all_experts, similarity_nominal_k,
     select_all, never},
};

const Router *router_of(RouterKind kind) {
    for (size_t i = 0; i < sizeof routers / sizeof routers[0]; i++)
        if (routers[i].kind == kind) return &routers[i];
    return NULL;
}

void router_weights(const Router *r, const MoeConfig *mc, const float *p, const int *experts,
                    float *weights, int n) {
    int how = r->renormalised(mc); /* 1 renormalised, 0 raw, -1 unit */
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        weights[i] = r->has_router && how >= 0 ? p[experts[i]] : 1.0f;
        sum += weights[i];
    }
    if (r->has_router && how == 1 && sum > 0.0f)
        for (int i = 0; i < n; i++) weights[i] /= sum;
}
