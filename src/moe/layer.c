/*
** moe/layer.c — the Mixture-of-Experts layer (moe.h): route, select, capacity,
** group, experts, combine; and the same in reverse.
**
** Buffers live in MoeState and grow only, so after the first steps a forward
** allocates nothing. Each expert's GEMMs run in one thread (OpenBLAS is single
** threaded inside our OpenMP threads), and every sum over a token's experts
** runs in rank order, so results do not depend on how experts were spread
** over threads.
*/
#include "moe/moe.h"

#include <assert.h>
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"
#include "moe/router.h"

/* ------------------------------------------------------------------------ */
/* buffers (grow-only, with ML_GROW of common.h)                             */

void moe_state_free(MoeState *s) {
    if (!s) return;
    free(s->logits); free(s->probs); free(s->lse); free(s->entropy); free(s->top1);
    free(s->sel_expert); free(s->sel_weight); free(s->sel_p); free(s->sel_count);
    free(s->sel_row); free(s->counts); free(s->offsets); free(s->dropped); free(s->hoff);
    free(s->prob_mass); free(s->row_token); free(s->xe); free(s->ye);
    free(s->he); free(s->ge); free(s->ae); free(s->scratch);
    moe_exchange_free(s->ex);
    memset(s, 0, sizeof *s);
}

void moe_scratch_free(MoeScratch *s) {
    if (!s) return;
    free(s->dye); free(s->dxe); free(s->dae); free(s->dhe); free(s->dge);
    free(s->dw); free(s->dprobs); free(s->dlogits); free(s->drouter_pieces); free(s->dexpert);
    memset(s, 0, sizeof *s);
}

static int ensure_tokens(MoeState *s, int N, int E, int slots) {
    if (N <= s->cap_tokens && slots <= s->cap_slots && s->E == E) return 0;
    size_t NE = (size_t)N * E, NS = (size_t)N * slots;
    if (ML_GROW(s->logits, NE) || ML_GROW(s->probs, NE) || ML_GROW(s->lse, N) || ML_GROW(s->top1, N) ||
        ML_GROW(s->entropy, N) ||
        ML_GROW(s->sel_expert, NS) || ML_GROW(s->sel_weight, NS) || ML_GROW(s->sel_p, NS) ||
        ML_GROW(s->sel_count, N) || ML_GROW(s->sel_row, NS) || ML_GROW(s->counts, E) ||
        ML_GROW(s->offsets, E + 1) || ML_GROW(s->dropped, E) || ML_GROW(s->hoff, E + 1) ||
        ML_GROW(s->prob_mass, E) || ML_GROW(s->scratch, N))
        return -1;
    s->cap_tokens = N;
    s->cap_slots = slots;
    return 0;
}

static int ensure_rows(MoeState *s, size_t A, size_t hidden, int C, int swiglu) {
    if (A > s->cap_rows) {
        size_t n = A + A / 4; /* headroom: assignment counts vary step to step */
        if (ML_GROW(s->row_token, n) || ML_GROW(s->xe, n * C) || ML_GROW(s->ye, n * C)) return -1;
        s->cap_rows = n;
    }
    if (hidden > s->cap_hidden) {
        size_t n = hidden + hidden / 4;
        if (ML_GROW(s->he, n) || ML_GROW(s->ae, n) || (swiglu && ML_GROW(s->ge, n))) return -1;
        s->cap_hidden = n;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* forward, stage by stage                                                   */

static void act_forward(ActKind act, float *out, const float *h, const float *g, size_t n) {
    switch (act) {
    case ACT_GELU: gelu_forward(out, h, n); break;
    case ACT_RELU: relu_forward(out, h, n); break;
    case ACT_SWIGLU: swiglu_forward(out, g, h, n); break;
    }
}

/* Tokens [t0, t0 + ROUTE_GROUP) of route below (those below N): p =
** softmax(logits), lse, top1 and the entropy. Each token's argmax and sums
** are chains of E steps; a group's run side by side (a lane a token), each in
** its own order, so every token gets the bits it would get alone. A lane past
** N repeats token N - 1 in the chains and writes nothing. */
#define ROUTE_GROUP 8
static void route_group(MoeState *s, int t0) {
    int N = s->N, E = s->E, n = N - t0 < ROUTE_GROUP ? N - t0 : ROUTE_GROUP;
    const float *l[ROUTE_GROUP];
    float *p[ROUTE_GROUP], maxv[ROUTE_GROUP], lp[ROUTE_GROUP * MOE_MAX_EXPERTS];
    int arg[ROUTE_GROUP];
    double sum[ROUTE_GROUP], h[ROUTE_GROUP];
    for (int j = 0; j < ROUTE_GROUP; j++) {
        int t = t0 + (j < n ? j : n - 1);
        l[j] = s->logits + (size_t)t * E;
        p[j] = s->probs + (size_t)t * E;
        maxv[j] = l[j][0];
        arg[j] = 0;
        sum[j] = h[j] = 0.0;
    }
    for (int e = 1; e < E; e++)
        for (int j = 0; j < ROUTE_GROUP; j++)
            if (l[j][e] > maxv[j]) {
                maxv[j] = l[j][e];
                arg[j] = e;
            }
    for (int j = 0; j < n; j++)
        for (int e = 0; e < E; e++) p[j][e] = l[j][e] - maxv[j];
    expf_inplace(p[0], n * E); /* the group's rows are contiguous */
    for (int e = 0; e < E; e++)
        for (int j = 0; j < ROUTE_GROUP; j++) sum[j] += p[j][e];
    for (int j = 0; j < n; j++) {
        for (int e = 0; e < E; e++) p[j][e] = (float)(p[j][e] / sum[j]);
        s->lse[t0 + j] = maxv[j] + (float)log(sum[j]);
        if (!s->freeze) s->top1[t0 + j] = arg[j];
    }
    /* entropy -Σ p log p (an auxiliary loss, and recorded when not) */
    memcpy(lp, p[0], sizeof(float) * (size_t)n * E);
    logf_inplace(lp, n * E);
    for (int e = 0; e < E; e++)
        for (int j = 0; j < ROUTE_GROUP; j++) {
            int k = j < n ? j : n - 1;
            if (p[k][e] > 0.0f) h[j] -= (double)p[k][e] * lp[(size_t)k * E + e];
        }
    for (int j = 0; j < n; j++) s->entropy[t0 + j] = (float)h[j];
}

/* route: logits (N,E) = x (N,C) · router (E,C)ᵀ (+ noise (N,E) · std),
** p = softmax(logits), lse (N), top1 (N) the argmax (kept when frozen).
** Without a router (hash): p = 0 and top1 the map's expert. */
static void moe_route(MoeState *s, const Router *r, const MoeConfig *mc, const float *router,
                      const float *x, const float *noise, const int *tokens, const int *hash_map) {
    int N = s->N, E = s->E, C = s->C;
    assert(N >= 0 && E >= 1 && C >= 1);
    if (!r->has_router) {
        memset(s->probs, 0, sizeof(float) * (size_t)N * E);
        memset(s->lse, 0, sizeof(float) * (size_t)N);
        for (int t = 0; t < N; t++) s->top1[t] = hash_map ? hash_map[tokens[t]] : 0;
        return;
    }
    matmul_forward(s->logits, x, router, NULL, N, C, E, 0.0f);
    if (noise)
        for (size_t i = 0; i < (size_t)N * E; i++) s->logits[i] += mc->noise * noise[i];
    int groups = (N + ROUTE_GROUP - 1) / ROUTE_GROUP;
#pragma omp parallel for schedule(static)
    for (int gr = 0; gr < groups; gr++) route_group(s, gr * ROUTE_GROUP);
}

/* select: the router's rule → per token, in rank order, sel_expert, sel_weight,
** sel_p (N, slots) and sel_count (N). */
static void moe_select(MoeState *s, const Router *r, const MoeConfig *mc, const int *tokens,
                       const int *hash_map) {
    RouterBatch b = {.probs = r->has_router ? s->probs : NULL, .logits = s->logits,
                     .gumbel = s->gumbel, .tokens = tokens,
                     .hash_map = hash_map, .N = s->N, .E = s->E, .slots = s->slots,
                     .sel_expert = s->sel_expert, .sel_weight = s->sel_weight, .sel_p = s->sel_p,
                     .sel_count = s->sel_count, .scratch = s->scratch};
    r->select(mc, &b);
    s->capacity = b.capacity;
    for (int t = 0; t < s->N; t++) assert(s->sel_count[t] >= 0 && s->sel_count[t] <= s->slots);
}

/* Weights p renormalised over the assignments kept (flags 1/0 in sel_row):
** a token left with one of its pair gets weight 1, with none nothing. */
static void renormalise_kept(MoeState *s) {
    for (int t = 0; t < s->N; t++) {
        size_t k0 = (size_t)t * s->slots;
        float sum = 0.0f;
        for (int i = 0; i < s->sel_count[t]; i++)
            if (s->sel_row[k0 + i]) sum += s->sel_p[k0 + i];
        for (int i = 0; i < s->sel_count[t]; i++)
            s->sel_weight[k0 + i] = s->sel_row[k0 + i] && sum > 0.0f ? s->sel_p[k0 + i] / sum : 0.0f;
    }
}

/* A frozen selection (select's replacement): the same experts and drops;
** weights from the new p, or kept as they are. Leaves the kept flags (1/0) in
** sel_row, as capacity does. */
static void moe_reselect(MoeState *s, const Router *r, const MoeConfig *mc, int from_p) {
    for (int t = 0; t < s->N; t++) {
        size_t k0 = (size_t)t * s->slots;
        if (from_p) {
            const float *p = s->probs + (size_t)t * s->E;
            router_weights(r, mc, p, s->sel_expert + k0, s->sel_weight + k0, s->sel_count[t]);
            for (int i = 0; i < s->sel_count[t]; i++)
                s->sel_p[k0 + i] = r->has_router ? p[s->sel_expert[k0 + i]] : 0.0f;
        }
        for (int i = 0; i < s->slots; i++) s->sel_row[k0 + i] = s->sel_row[k0 + i] >= 0;
    }
    if (from_p && r->renormalise_kept) renormalise_kept(s);
}

/* capacity (token choice, capacity_factor > 0): each expert keeps at most
** C = max(ceil(cf · N · k / E), min_capacity) assignments; kept flags (1/0)
** go to sel_row (N, slots) for the group stage, drops to dropped (E). */
static void moe_capacity(MoeState *s, const Router *r, const MoeConfig *mc) {
    int N = s->N, E = s->E;
    memset(s->dropped, 0, sizeof(int) * (size_t)E);
    if (mc->capacity_factor > 0.0f && r->token_choice) {
        int cap = router_ceil_capacity((double)mc->capacity_factor * N * r->nominal_k(mc) / E);
        s->capacity = cap > mc->min_capacity ? cap : mc->min_capacity;
        router_apply_capacity(s->sel_expert, s->sel_p, s->sel_count, N, s->slots, E, s->capacity,
                              s->sel_row, s->dropped, s->scratch);
        if (r->renormalise_kept) renormalise_kept(s);
    } else {
        for (size_t i = 0; i < (size_t)N * s->slots; i++) s->sel_row[i] = 1;
    }
}

/* group: a counting pass, whose histogram counts (E) is the expert load; the
** kept assignments become rows, expert by expert (offsets (E+1), hoff (E+1)
** into the hidden buffers), sel_row (N, slots) their row or -1, row_token (A)
** their token, and xe (A, C) the gathered inputs. */
static int moe_group(MoeState *s, const MoeConfig *mc, int swiglu, const float *x, char *err) {
    int N = s->N, E = s->E, C = s->C, slots = s->slots;
    memset(s->counts, 0, sizeof(int) * (size_t)E);
    for (int t = 0; t < N; t++)
        for (int i = 0; i < s->sel_count[t]; i++)
            if (s->sel_row[(size_t)t * slots + i]) s->counts[s->sel_expert[(size_t)t * slots + i]]++;
    s->offsets[0] = 0;
    s->hoff[0] = 0;
    for (int e = 0; e < E; e++) {
        s->offsets[e + 1] = s->offsets[e] + s->counts[e];
        s->hoff[e + 1] = s->hoff[e] + (size_t)s->counts[e] * mc->hidden[e];
    }
    size_t A = (size_t)s->offsets[E];
    assert(A <= (size_t)N * slots);
    if (ensure_rows(s, A, s->hoff[E], C, swiglu) != 0)
        return ml_error(err, "out of memory for %zu expert assignments", A);
    int fill[MOE_MAX_EXPERTS];
    memcpy(fill, s->offsets, sizeof(int) * (size_t)E);
    for (int t = 0; t < N; t++)
        for (int i = 0; i < slots; i++) {
            size_t k = (size_t)t * slots + i;
            if (i < s->sel_count[t] && s->sel_row[k]) {
                int row = fill[s->sel_expert[k]]++;
                s->sel_row[k] = row;
                s->row_token[row] = t;
            } else {
                s->sel_row[k] = -1;
            }
        }
#pragma omp parallel for schedule(static)
    for (size_t r = 0; r < A; r++)
        memcpy(s->xe + r * C, x + (size_t)s->row_token[r] * C, sizeof(float) * C);
    return 0;
}

/* experts: for each expert e, its n_e rows xe (n_e, C) →
** he = xe · fc_eᵀ (n_e, H_e) (and ge = xe · gate_eᵀ), ae = act(he),
** ye = ae · proj_eᵀ (n_e, C); one GEMM per expert, experts over threads. */
void moe_rows_forward(const MoeRows *v, const MoeConfig *mc, ActKind act, const MoeWeights *w) {
    int E = v->E, C = v->C, swiglu = act == ACT_SWIGLU;
    assert(v->offsets[0] == 0 && v->hoff[0] == 0);
#pragma omp parallel for schedule(dynamic, 1)
    for (int e = 0; e < E; e++) {
        int n = v->counts[e], H = mc->hidden[e];
        if (n == 0) continue;
        const float *xe = v->xe + (size_t)v->offsets[e] * C;
        float *he = v->he + v->hoff[e], *ae = v->ae + v->hoff[e];
        float *ge = swiglu ? v->ge + v->hoff[e] : NULL;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, H, C, 1.0f, xe, C, w->fc[e], C,
                    0.0f, he, H);
        if (w->fc_bias[e])
            for (int r = 0; r < n; r++)
                for (int h = 0; h < H; h++) he[(size_t)r * H + h] += w->fc_bias[e][h];
        if (swiglu)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, H, C, 1.0f, xe, C, w->gate[e],
                        C, 0.0f, ge, H);
        act_forward(act, ae, he, ge, (size_t)n * H);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, C, H, 1.0f, ae, H, w->proj[e], H,
                    0.0f, v->ye + (size_t)v->offsets[e] * C, C);
    }
}

/* The layer's own rows (and, in backward, scr's gradients of them). */
static MoeRows own_rows(const MoeState *s, const MoeScratch *scr) {
    MoeRows v = {.E = s->E, .C = s->C, .counts = s->counts, .offsets = s->offsets,
                 .hoff = s->hoff, .xe = s->xe, .he = s->he, .ge = s->ge, .ae = s->ae, .ye = s->ye};
    if (scr) {
        v.dye = scr->dye;
        v.dxe = scr->dxe;
        v.dae = scr->dae;
        v.dhe = scr->dhe;
        v.dge = scr->dge;
    }
    return v;
}

/* The rows whose activations this rank computed: its own, or under expert
** parallelism (mc's, as the last forward ran) its experts' rows from every
** rank. An exchange kept from before model:parallel("data") is not read. */
static MoeRows computed_rows(const MoeState *s, const MoeConfig *mc) {
    MoeRows v;
    return moe_parallel(mc) && moe_parallel_rows(s, &v) ? v : own_rows(s, NULL);
}

void moe_mass_shares(const MoeState *s, const MoeConfig *mc, int t, float *share) {
    size_t k0 = (size_t)t * s->slots;
    double total = 0.0;
    assert(s->sel_count[t] == s->E);
    for (int i = 0; i < s->sel_count[t]; i++) {
        int e = s->sel_expert[k0 + i], r = s->sel_row[k0 + i];
        const float *a = s->ae + s->hoff[e] + (size_t)(r - s->offsets[e]) * mc->hidden[e];
        double mass = 0.0;
        for (int h = 0; h < mc->hidden[e]; h++) mass += fabsf(a[h]);
        share[e] = (float)mass;
        total += mass;
    }
    for (int e = 0; e < s->E; e++) share[e] = total > 0.0 ? (float)(share[e] / total) : 1.0f / s->E;
}

static void moe_oracle_choose(MoeState *s, const MoeConfig *mc) {
#pragma omp parallel for schedule(static)
    for (int t = 0; t < s->N; t++) {
        float share[MOE_MAX_EXPERTS], wt[MOE_MAX_EXPERTS];
        int ex[MOE_MAX_EXPERTS], row[MOE_MAX_EXPERTS];
        size_t k0 = (size_t)t * s->slots;
        moe_mass_shares(s, mc, t, share);
        for (int i = 0; i < s->sel_count[t]; i++) row[s->sel_expert[k0 + i]] = s->sel_row[k0 + i];
        int n = mc->select_threshold ? router_select_threshold(share, s->E, mc->p, 0, 0, ex, wt)
                                     : router_select_topk(share, s->E, mc->k, 0, ex, wt);
        for (int i = 0; i < n; i++) {
            s->sel_expert[k0 + i] = ex[i];
            s->sel_weight[k0 + i] = 1.0f;
            s->sel_p[k0 + i] = share[ex[i]];
            s->sel_row[k0 + i] = row[ex[i]];
        }
        for (int i = n; i < s->slots; i++) s->sel_row[k0 + i] = -1;
        s->sel_count[t] = n;
    }
}

/* combine: out[t] (C) += Σ_i weight_ti · ye[row_ti], in rank order. */
static void moe_combine(const MoeState *s, float *out) {
    int C = s->C, slots = s->slots;
    assert(s->N == 0 || out);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < s->N; t++) {
        float *o = out + (size_t)t * C;
        for (int i = 0; i < s->sel_count[t]; i++) {
            int row = s->sel_row[(size_t)t * slots + i];
            if (row < 0) continue;
            float wt = s->sel_weight[(size_t)t * slots + i];
            const float *y = s->ye + (size_t)row * C;
            for (int c = 0; c < C; c++) o[c] += wt * y[c];
        }
    }
}

/* accounting: FLOPs executed, probability mass (E), and the sums the
** auxiliary losses are made of (MoeState.stats), over this forward's tokens. */
static void moe_account(MoeState *s, const Router *r, const MoeConfig *mc, ActKind act) {
    int N = s->N, E = s->E, C = s->C, slots = s->slots;
    int mult = act == ACT_SWIGLU ? 3 : 2;
    double flops = r->has_router ? 2.0 * N * C * E : 0.0;
    for (int e = 0; e < E; e++) flops += 2.0 * mult * s->counts[e] * C * mc->hidden[e];
    s->flops = flops;
    memset(s->prob_mass, 0, sizeof(float) * (size_t)E);
    for (int t = 0; t < N; t++)
        for (int e = 0; e < E; e++) s->prob_mass[e] += s->probs[(size_t)t * E + e];
    double *st = s->stats;
    memset(st, 0, sizeof(double) * MOE_STATS(E));
    if (r->has_router) {
        double *first = st, *load = st + E, *mass = st + 2 * E;
        for (int t = 0; t < N; t++) {
            first[s->top1[t]] += 1.0;
            for (int i = 0; i < s->sel_count[t]; i++) load[s->sel_expert[(size_t)t * slots + i]] += 1.0;
            st[3 * E] += s->entropy[t];
            st[3 * E + 1] += (double)s->lse[t] * s->lse[t];
        }
        for (int e = 0; e < E; e++) mass[e] = s->prob_mass[e];
    }
    st[3 * E + 2] = N;
    moe_aux(s, mc, r->has_router, 1);
}

void moe_aux(MoeState *s, const MoeConfig *mc, int has_router, int ranks) {
    int E = s->E;
    const double *st = s->stats, *first = st, *load = st + E, *mass = st + 2 * E;
    double N = st[3 * E + 2];
    s->aux_tokens = (float)(N / ranks);
    memset(s->aux, 0, sizeof s->aux);
    s->aux_weighted = 0.0f;
    if (has_router && N > 0) {
        /* f: share of tokens whose first choice is e; M: share whose selected
        ** set holds e, times H_e / mean(H) (HMoE's parameter penalty) */
        double f[MOE_MAX_EXPERTS], M[MOE_MAX_EXPERTS];
        double hmean = 0.0;
        for (int e = 0; e < E; e++) hmean += (double)mc->hidden[e] / E;
        for (int e = 0; e < E; e++) {
            f[e] = first[e] / N;
            M[e] = load[e] / N * (mc->hidden[e] / hmean);
        }
        double balance = 0.0, penalty = 0.0;
        double imean = 0.0, ivar = 0.0, lmean = 0.0, lvar = 0.0;
        for (int e = 0; e < E; e++) {
            double P = mass[e] / N;
            balance += f[e] * P;
            penalty += M[e] * P;
            imean += mass[e] / E;
            lmean += load[e] / E;
        }
        for (int e = 0; e < E; e++) {
            ivar += (mass[e] - imean) * (mass[e] - imean) / E;
            lvar += (load[e] - lmean) * (load[e] - lmean) / E;
        }
        s->aux[AUX_BALANCE] = (float)(E * balance);
        s->aux[AUX_Z] = (float)(st[3 * E + 1] / N);
        s->aux[AUX_CV2] = (float)((imean > 0 ? ivar / (imean * imean) : 0.0) +
                                  (lmean > 0 ? lvar / (lmean * lmean) : 0.0));
        s->aux[AUX_P_PENALTY] = (float)(E * penalty);
        s->aux[AUX_ENTROPY] = (float)(st[3 * E] / N);
        /* d(weighted balance + p_penalty + cv2)/d p_te is the same for every
        ** token (f and M held constant); the entropy's is not (backward).
        ** Over several ranks it is the whole batch's, times the ranks, as
        ** their gradients are averaged (dist.h). */
        for (int e = 0; e < E; e++) {
            double d = mc->aux_balance * E * f[e] / N + mc->aux_p_penalty * E * M[e] / N;
            if (mc->aux_cv2 > 0.0f && imean > 0.0) /* d CV²(I) / d I_e, with I_e = Σ_t p_te */
                d += mc->aux_cv2 * (2.0 * (mass[e] - imean) / (E * imean * imean) -
                                    2.0 * ivar / (E * imean * imean * imean));
            s->aux_dp[e] = (float)(d * ranks);
        }
    }
    s->aux_weighted = mc->aux_balance * s->aux[AUX_BALANCE] + mc->aux_z * s->aux[AUX_Z] +
                      mc->aux_cv2 * s->aux[AUX_CV2] + mc->aux_p_penalty * s->aux[AUX_P_PENALTY] +
                      mc->aux_entropy * s->aux[AUX_ENTROPY];
}

int moe_forward(MoeState *s, const MoeConfig *mc, ActKind act, const MoeWeights *w,
                const int *hash_map, float *out, const float *x, const int *tokens,
                const float *noise, int N, int C, char *err) {
    const Router *r = router_of(mc->kind);
    int E = mc->experts, slots = r->slots(mc);
    assert(N >= 0 && C >= 1 && E >= 1 && slots >= 1);
    if (ensure_tokens(s, N, E, slots) != 0) return ml_error(err, "out of memory in an MoE layer");
    s->N = N;
    s->E = E;
    s->C = C;
    s->slots = slots;
    s->capacity = 0;
    moe_route(s, r, mc, w->router, x, noise, tokens, hash_map);
    if (s->freeze) {
        moe_reselect(s, r, mc, s->freeze == 1);
    } else {
        moe_select(s, r, mc, tokens, hash_map);
        moe_capacity(s, r, mc);
    }
    if (moe_group(s, mc, act == ACT_SWIGLU, x, err) != 0) return -1;
    if (moe_parallel(mc)) {
        if (mc->kind == ROUTER_ORACLE)
            return ml_error(err, "the oracle router reads every expert's activations of a token: "
                            "it does not run with moe.parallel = \"experts\"");
        if (moe_parallel_forward(s, mc, act, w, err) != 0) return -1;
    } else {
        MoeRows v = own_rows(s, NULL);
        moe_rows_forward(&v, mc, act, w);
    }
    if (mc->kind == ROUTER_ORACLE) moe_oracle_choose(s, mc);
    moe_combine(s, out);
    if (w->bias) /* the layer's proj bias: once per token */
        for (int t = 0; t < N; t++)
            for (int c = 0; c < C; c++) out[(size_t)t * C + c] += w->bias[c];
    moe_account(s, r, mc, act);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* the route trace                                                           */

/* Kept assignments of a pass: every row, but for the oracle's uncombined ones. */
static size_t moe_pass_count(const MoeState *s) {
    size_t n = 0;
    for (int t = 0; t < s->N; t++)
        for (int k = 0; k < s->sel_count[t]; k++) n += s->sel_row[(size_t)t * s->slots + k] >= 0;
    return n;
}

size_t moe_pass_routes(const MoeState *s, int pass, int first, const int *rows, MoeRoute *out) {
    MoeRoute *o = out;
    for (int t = 0; t < s->N; t++)
        for (int k = 0; k < s->sel_count[t]; k++) {
            size_t j = (size_t)t * s->slots + k;
            if (s->sel_row[j] < 0) continue;
            *o++ = (MoeRoute){.token = rows ? rows[t] : t, .pass = pass, .rank = k,
                              .expert = first + s->sel_expert[j], .weight = s->sel_weight[j]};
        }
    assert((size_t)(o - out) == moe_pass_count(s));
    return (size_t)(o - out);
}

MoeTokenTrace moe_pass_token(const MoeState *s, const MoeConfig *mc, int first, ActKind act,
                             int t) {
    const int *hidden = mc->hidden + first; /* the pass's experts */
    int mult = act == ACT_SWIGLU ? 3 : 2;
    MoeTokenTrace tr = {.experts = 0, .passes = 1,
                        .flops = router_of(mc->kind)->has_router ? 2.0 * s->C * s->E : 0.0};
    for (int i = 0; i < s->sel_count[t]; i++) {
        size_t k = (size_t)t * s->slots + i;
        if (s->sel_row[k] < 0) continue;
        tr.experts++;
        if (mc->kind != ROUTER_ORACLE) tr.flops += 2.0 * mult * s->C * hidden[s->sel_expert[k]];
    }
    for (int e = 0; mc->kind == ROUTER_ORACLE && e < s->E; e++) /* it ran them all */
        tr.flops += 2.0 * mult * s->C * hidden[e];
    return tr;
}

void moe_pass_sparsity(const MoeState *s, const MoeConfig *mc, int first, float eps,
                       int64_t *activations, int64_t *near_zero, double *abs_sum) {
    MoeRows v = computed_rows(s, mc);
#pragma omp parallel for schedule(dynamic, 1)
    for (int e = 0; e < s->E; e++) {
        const float *a = v.ae + v.hoff[e];
        size_t n = (size_t)v.counts[e] * mc->hidden[first + e];
        /* in chunks: float lanes within one, a double across them */
        int64_t zero = 0;
        double sum = 0.0;
        for (size_t i0 = 0; i0 < n; i0 += 4096) {
            size_t i1 = i0 + 4096 < n ? i0 + 4096 : n;
            int z = 0;
            float part = 0.0f;
#pragma omp simd reduction(+ : z, part)
            for (size_t i = i0; i < i1; i++) {
                float v = fabsf(a[i]);
                z += v <= eps;
                part += v;
            }
            zero += z;
            sum += part;
        }
        activations[e] += (int64_t)n;
        near_zero[e] += zero;
        abs_sum[e] += sum;
    }
}

size_t moe_trace_count(const MoeLayer *l) {
    if (l->merge) return merge_trace_count(l->merge);
    return l->strata ? strata_trace_count(l->strata) : moe_pass_count(&l->tc);
}

size_t moe_trace_routes(const MoeLayer *l, const MoeConfig *mc, MoeRoute *out) {
    if (l->merge) return merge_trace_routes(l->merge, out);
    return l->strata ? strata_trace_routes(l->strata, mc, out)
                     : moe_pass_routes(&l->tc, 0, 0, NULL, out);
}

MoeTokenTrace moe_trace_token(const MoeLayer *l, const MoeConfig *mc, ActKind act, int t) {
    if (l->merge) return merge_trace_token(l->merge, t);
    return l->strata ? strata_trace_token(l->strata, mc, act, t) : moe_pass_token(&l->tc, mc, 0, act, t);
}

MoeExpertTrace moe_trace_expert(const MoeLayer *l, const MoeConfig *mc, int e) {
    if (l->merge) return merge_trace_expert(l->merge, e);
    if (l->strata) return strata_trace_expert(l->strata, mc, e);
    return (MoeExpertTrace){.tokens = l->tc.counts[e], .dropped = l->tc.dropped[e],
                            .prob_mass = router_of(mc->kind)->has_router ? l->tc.prob_mass[e] : NAN};
}

void moe_trace_sparsity(const MoeLayer *l, const MoeConfig *mc, float eps, int64_t *activations,
                        int64_t *near_zero, double *abs_sum) {
    if (l->merge) return; /* one merged FFN: no activations of an expert's own */
    if (l->strata) strata_trace_sparsity(l->strata, mc, eps, activations, near_zero, abs_sum);
    else moe_pass_sparsity(&l->tc, mc, 0, eps, activations, near_zero, abs_sum);
}

/* ------------------------------------------------------------------------ */
/* the layer as the model holds it                                           */

void moe_layer_free(MoeLayer *l) {
    if (!l) return;
    moe_state_free(&l->tc);
    strata_free(l->strata);
    merge_free(l->merge);
    memset(l, 0, sizeof *l);
}

int moe_layer_forward(MoeLayer *l, const ModelConfig *c, const MoeWeights *w, const int *hash_map,
                      float *out, const float *x, const int *tokens, const float *noise, int B,
                      int T, uint64_t key, char *err) {
    int N = B * T;
    if (c->moe.kind == ROUTER_MERGE) return merge_forward(l, c, w, out, x, B, T, err);
    if (c->moe.kind == ROUTER_STRATIFIED) return strata_forward(l, c, w, out, x, N, key, err);
    l->tc.freeze = l->freeze;
    if (moe_forward(&l->tc, &c->moe, c->activation, w, hash_map, out, x, tokens, noise, N,
                    c->d_model, err) != 0)
        return -1;
    l->flops = l->flops_topk = l->tc.flops;
    memcpy(l->aux, l->tc.aux, sizeof l->aux);
    l->aux_weighted = l->tc.aux_weighted;
    return 0;
}

void moe_layer_traffic(const MoeLayer *l, int ranks, int64_t *tokens) {
    if (l->strata) strata_traffic(l->strata, ranks, tokens);
    else moe_parallel_traffic(&l->tc, ranks, tokens);
}

void moe_layer_reduce_aux(MoeLayer *l, const ModelConfig *c, MoeSum sum, int ranks) {
    if (c->moe.kind == ROUTER_MERGE) return;
    if (c->moe.kind == ROUTER_STRATIFIED) {
        strata_reduce_aux(l, c, sum, ranks);
        return;
    }
    MoeState *s = &l->tc;
    sum(s->stats, MOE_STATS(s->E));
    moe_aux(s, &c->moe, router_of(c->moe.kind)->has_router, ranks);
    memcpy(l->aux, s->aux, sizeof l->aux);
    l->aux_weighted = s->aux_weighted;
}

int moe_layer_can_update(const MoeConfig *mc) {
    return mc->kind != ROUTER_MERGE && mc->kind != ROUTER_STRATIFIED && !moe_parallel(mc);
}

int moe_layer_backward(MoeLayer *l, MoeScratch *scr, const ModelConfig *c, const MoeWeights *w,
                       MoeWeights *g, float *dx, float *dout, const float *x, float aux_scale,
                       const MoeUpdate *u, char *err) {
    assert(!u || moe_layer_can_update(&c->moe));
    if (c->moe.kind == ROUTER_MERGE) return merge_backward(l, c, w, g, dx, dout, x, err);
    if (c->moe.kind == ROUTER_STRATIFIED)
        return strata_backward(l, scr, c, w, g, dx, dout, x, aux_scale, err);
    return moe_backward(&l->tc, scr, &c->moe, c->activation, w, g, dx, dout, x, aux_scale, u, err);
}

/* ------------------------------------------------------------------------ */
/* backward                                                                  */

/* One thread's share of MoeScratch.dexpert: an expert's fc, gate and proj
** gradients, at most max H_e · C each. */
static size_t dexpert_floats(const MoeConfig *mc, int E, int C) {
    int H = 0;
    for (int e = 0; e < E; e++) H = mc->hidden[e] > H ? mc->hidden[e] : H;
    return 3 * (size_t)H * C;
}

/* AdamW on one expert matrix x of n weights from its gradient g (zeroed). */
static void update_matrix(const MoeUpdate *u, float *x, float *g, size_t n) {
    size_t at = (size_t)(x - u->params);
    adamw_update(x, u->m + at, u->v + at, g, n, &u->step, u->weight_decay);
}

/* AdamW on expert e's matrices from their gradients in a thread's share of
** dexpert: fc's at gfc, then gate's and proj's, HC each. */
static void update_expert(const MoeUpdate *u, const MoeWeights *w, int e, int swiglu, float *gfc,
                          size_t HC) {
    update_matrix(u, w->fc[e], gfc, HC);
    if (swiglu) update_matrix(u, w->gate[e], gfc + HC, HC);
    update_matrix(u, w->proj[e], gfc + 2 * HC, HC);
}

static int ensure_scratch(MoeScratch *scr, const MoeState *s, const MoeConfig *mc, int swiglu,
                          int update) {
    size_t A = (size_t)s->offsets[s->E], hidden = s->hoff[s->E];
    size_t tokens = (size_t)s->N * (s->slots > s->E ? s->slots : s->E);
    if (A > scr->cap_rows) {
        size_t n = A + A / 4;
        if (ML_GROW(scr->dye, n * s->C) || ML_GROW(scr->dxe, n * s->C)) return -1;
        scr->cap_rows = n;
    }
    if (hidden > scr->cap_hidden) {
        size_t n = hidden + hidden / 4;
        if (ML_GROW(scr->dae, n) || ML_GROW(scr->dhe, n) || (swiglu && ML_GROW(scr->dge, n))) return -1;
        scr->cap_hidden = n;
    }
    if (tokens > scr->cap_tokens) {
        if (ML_GROW(scr->dw, tokens) || ML_GROW(scr->dprobs, tokens) || ML_GROW(scr->dlogits, tokens))
            return -1;
        scr->cap_tokens = tokens;
    }
    size_t pieces = matmul_backward_scratch(s->N, s->C, s->E);
    if (pieces > scr->cap_pieces) {
        if (ML_GROW(scr->drouter_pieces, pieces)) return -1;
        scr->cap_pieces = pieces;
    }
    if (update) {
        size_t dexpert = (size_t)omp_get_max_threads() * dexpert_floats(mc, s->E, s->C);
        if (dexpert > scr->cap_dexpert) {
            if (ML_GROW(scr->dexpert, dexpert)) return -1;
            memset(scr->dexpert, 0, sizeof(float) * dexpert); /* and kept zero */
            scr->cap_dexpert = dexpert;
        }
    }
    return 0;
}

/* experts, reversed, for the rows of v: dye → dxe, weight gradients into g,
** or with u into the thread's share of dexpert and from there, by AdamW,
** into the weights (an expert without rows too: its gradients are zero).
** dexpert's shares are zero between calls (adamw_update zeroes them). */
void moe_rows_backward(const MoeRows *v, const MoeConfig *mc, ActKind act, const MoeWeights *w,
                       MoeWeights *g, const MoeUpdate *u, float *dexpert) {
    int E = v->E, C = v->C, swiglu = act == ACT_SWIGLU;
    size_t share = u ? dexpert_floats(mc, E, C) : 0;
#pragma omp parallel for schedule(dynamic, 1)
    for (int e = 0; e < E; e++) {
        int n = v->counts[e], H = mc->hidden[e];
        size_t HC = (size_t)H * C;
        float *gfc = g->fc[e], *ggate = g->gate[e], *gproj = g->proj[e];
        float beta = 1.0f; /* accumulate into g, or write the thread's share */
        if (u) {
            gfc = dexpert + share * (size_t)omp_get_thread_num();
            ggate = gfc + HC;
            gproj = ggate + HC;
            beta = 0.0f;
        }
        if (n == 0) {
            if (u) update_expert(u, w, e, swiglu, gfc, HC); /* the share is zero: zero gradients */
            continue;
        }
        size_t r0 = (size_t)v->offsets[e] * C;
        const float *xe = v->xe + r0, *dye = v->dye + r0;
        float *dxe = v->dxe + r0;
        const float *he = v->he + v->hoff[e], *ae = v->ae + v->hoff[e];
        float *dae = v->dae + v->hoff[e], *dhe = v->dhe + v->hoff[e];
        /* ye = ae · projᵀ */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, H, C, 1.0f, dye, C, w->proj[e], H,
                    0.0f, dae, H);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, C, H, n, 1.0f, dye, C, ae, H, beta,
                    gproj, H);
        switch (act) {
        case ACT_GELU: gelu_backward(dhe, dae, he, (size_t)n * H); break;
        case ACT_RELU: relu_backward(dhe, dae, he, (size_t)n * H); break;
        case ACT_SWIGLU:
            swiglu_backward(v->dge + v->hoff[e], dhe, dae, v->ge + v->hoff[e], he, (size_t)n * H);
            break;
        }
        if (g->fc_bias[e])
            for (int r = 0; r < n; r++)
                for (int h = 0; h < H; h++) g->fc_bias[e][h] += dhe[(size_t)r * H + h];
        /* he = xe · fcᵀ (+ fc bias) (and ge = xe · gateᵀ) */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, H, C, n, 1.0f, dhe, H, xe, C, beta,
                    gfc, C);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, C, H, 1.0f, dhe, H, w->fc[e], C,
                    0.0f, dxe, C);
        if (swiglu) {
            const float *dge = v->dge + v->hoff[e];
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, H, C, n, 1.0f, dge, H, xe, C, beta,
                        ggate, C);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, C, H, 1.0f, dge, H, w->gate[e],
                        C, 1.0f, dxe, C);
        }
        if (u) update_expert(u, w, e, swiglu, gfc, HC); /* its weights are read no more this step */
    }
}

int moe_backward(MoeState *s, MoeScratch *scr, const MoeConfig *mc, ActKind act,
                 const MoeWeights *w, MoeWeights *g, float *dx, const float *dout,
                 const float *x, float aux_scale, const MoeUpdate *u, char *err) {
    if (mc->kind == ROUTER_ORACLE)
        return ml_error(err, "the oracle router runs every expert to choose among them: it is "
                        "for evaluation, not training");
    int N = s->N, E = s->E, C = s->C, slots = s->slots;
    int swiglu = act == ACT_SWIGLU;
    if (ensure_scratch(scr, s, mc, swiglu, u != NULL) != 0)
        return ml_error(err, "out of memory in MoE backward");

    if (g->bias) /* the layer's proj bias, each column summed in token order */
        for (int t = 0; t < N; t++)
            for (int c = 0; c < C; c++) g->bias[c] += dout[(size_t)t * C + c];
    /* combine, reversed: dye = weight · dout; dweight = dout · ye */
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        const float *d = dout + (size_t)t * C;
        for (int i = 0; i < slots; i++) {
            size_t k = (size_t)t * slots + i;
            scr->dw[k] = 0.0f;
            if (i >= s->sel_count[t] || s->sel_row[k] < 0) continue;
            int row = s->sel_row[k];
            float wt = s->sel_weight[k], dot = 0.0f;
            const float *y = s->ye + (size_t)row * C;
            float *dy = scr->dye + (size_t)row * C;
            for (int c = 0; c < C; c++) {
                dy[c] = wt * d[c];
                dot += d[c] * y[c];
            }
            scr->dw[k] = dot;
        }
    }

    /* route, reversed: weights → p → logits → x and Wr. This writes dx. */
    const Router *r = router_of(mc->kind);
    if (r->has_router) {
        float *dp = scr->dprobs, *dl = scr->dlogits;
        memset(dp, 0, sizeof(float) * (size_t)N * E);
        int renorm = r->renormalised(mc);
        for (int t = 0; t < N; t++) {
            const int *ex = s->sel_expert + (size_t)t * slots;
            const float *wt = s->sel_weight + (size_t)t * slots, *dw = scr->dw + (size_t)t * slots;
            int n = s->sel_count[t];
            int kex[MOE_MAX_EXPERTS];
            float kwt[MOE_MAX_EXPERTS], kdw[MOE_MAX_EXPERTS];
            if (r->renormalise_kept) { /* the weights are over the kept ones only */
                int m = 0;
                for (int i = 0; i < n; i++)
                    if (s->sel_row[(size_t)t * slots + i] >= 0) {
                        kex[m] = ex[i];
                        kwt[m] = wt[i];
                        kdw[m++] = dw[i];
                    }
                ex = kex, wt = kwt, dw = kdw, n = m;
            }
            if (renorm >= 0) /* unit weights (similarity) pass nothing back to p */
                router_weights_backward(dp + (size_t)t * E, s->probs + (size_t)t * E, ex, wt, dw,
                                        n, renorm);
        }
        /* auxiliary losses through p (balance, p_penalty, cv2): from the forward */
        float dpe[MOE_MAX_EXPERTS];
        for (int e = 0; e < E; e++) dpe[e] = s->aux_dp[e] * aux_scale;
        float zscale = mc->aux_z * aux_scale * 2.0f / s->aux_tokens;
        float hscale = mc->aux_entropy * aux_scale / s->aux_tokens;
#pragma omp parallel for schedule(static)
        for (int t = 0; t < N; t++) {
            const float *p = s->probs + (size_t)t * E;
            float *dpt = dp + (size_t)t * E, *dlt = dl + (size_t)t * E;
            float dot = 0.0f;
            for (int e = 0; e < E; e++) {
                dpt[e] += dpe[e];
                dot += p[e] * dpt[e];
            }
            for (int e = 0; e < E; e++) dlt[e] = p[e] * (dpt[e] - dot) + zscale * s->lse[t] * p[e];
            if (hscale != 0.0f) {
                /* d H_t / d logit_e = -p_e (log p_e + H_t) */
                float lp[MOE_MAX_EXPERTS], h = s->entropy[t];
                memcpy(lp, p, sizeof(float) * (size_t)E);
                logf_inplace(lp, E);
                for (int e = 0; e < E; e++)
                    if (p[e] > 0.0f) dlt[e] -= hscale * p[e] * (lp[e] + h);
            }
        }
        matmul_backward(dx, g->router, NULL, dl, x, w->router, N, C, E, 0.0f,
                        scr->drouter_pieces);
    } else {
        memset(dx, 0, sizeof(float) * (size_t)N * C);
    }

    /* experts, reversed */
    if (moe_parallel(mc)) {
        assert(!u);
        if (moe_parallel_backward(s, scr, mc, act, w, g, err) != 0) return -1;
    } else {
        MoeRows v = own_rows(s, scr);
        moe_rows_backward(&v, mc, act, w, g, u, scr->dexpert);
    }

    /* group, reversed: scatter the rows' input gradients back, in rank order */
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        float *d = dx + (size_t)t * C;
        for (int i = 0; i < s->sel_count[t]; i++) {
            int row = s->sel_row[(size_t)t * slots + i];
            if (row < 0) continue;
            const float *dr = scr->dxe + (size_t)row * C;
            for (int c = 0; c < C; c++) d[c] += dr[c];
        }
    }
    return 0;
}
