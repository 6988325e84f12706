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
#include <stdlib.h>
#include <string.h>

#include "ops.h"
#include "moe/router.h"

/* ------------------------------------------------------------------------ */
/* buffers (grow-only, with ML_GROW of common.h)                             */

void moe_state_free(MoeState *s) {
    if (!s) return;
    free(s->logits); free(s->probs); free(s->lse); free(s->top1);
    free(s->sel_expert); free(s->sel_weight); free(s->sel_p); free(s->sel_count);
    free(s->sel_row); free(s->counts); free(s->offsets); free(s->dropped); free(s->hoff);
    free(s->prob_mass); free(s->row_token); free(s->xe); free(s->ye);
    free(s->he); free(s->ge); free(s->ae); free(s->scratch);
    memset(s, 0, sizeof *s);
}

void moe_scratch_free(MoeScratch *s) {
    if (!s) return;
    free(s->dye); free(s->dxe); free(s->dae); free(s->dhe); free(s->dge);
    free(s->dw); free(s->dprobs); free(s->dlogits); free(s->drouter_pieces);
    memset(s, 0, sizeof *s);
}

static int ensure_tokens(MoeState *s, int N, int E, int slots) {
    if (N <= s->cap_tokens && slots <= s->cap_slots && s->E == E) return 0;
    size_t NE = (size_t)N * E, NS = (size_t)N * slots;
    if (ML_GROW(s->logits, NE) || ML_GROW(s->probs, NE) || ML_GROW(s->lse, N) || ML_GROW(s->top1, N) ||
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

static int slots_for(const MoeConfig *mc) {
    switch (mc->kind) {
    case ROUTER_TOPK: return mc->k;
    case ROUTER_THRESHOLD:
    case ROUTER_TOPP: return mc->max_k > 0 ? mc->max_k : mc->experts;
    case ROUTER_EXPERT_CHOICE: return mc->experts;
    case ROUTER_HASH: return 1;
    }
    return mc->experts;
}

/* ------------------------------------------------------------------------ */
/* forward                                                                   */

static void act_forward(ActKind act, float *out, const float *h, const float *g, size_t n) {
    switch (act) {
    case ACT_GELU: gelu_forward(out, h, n); break;
    case ACT_RELU: relu_forward(out, h, n); break;
    case ACT_SWIGLU: swiglu_forward(out, g, h, n); break;
    }
}

/* ceil() of a capacity computed from a float factor: 1.1f is 1.10000002, so
** an exact product such as 1.1 · 2560 · 2 / 8 = 704 must not round up to 705. */
static int ceil_capacity(double x) { return (int)ceil(x * (1.0 - 1e-6)); }

/* A frozen selection: the same experts and drops; weights from the new p, or
** kept as they are. Leaves kept flags (1/0) in sel_row for the group stage. */
static void reweight(MoeState *s, const MoeConfig *mc, int from_p) {
    int renorm = (mc->kind == ROUTER_TOPK && mc->normalize) || mc->kind == ROUTER_TOPP;
    for (int t = 0; t < s->N; t++) {
        size_t k0 = (size_t)t * s->slots;
        float sum = 0.0f;
        for (int i = 0; !from_p && i < s->slots; i++) s->sel_row[k0 + i] = s->sel_row[k0 + i] >= 0;
        if (!from_p) continue;
        for (int i = 0; i < s->sel_count[t]; i++) {
            float p = s->probs[(size_t)t * s->E + s->sel_expert[k0 + i]];
            s->sel_p[k0 + i] = p;
            s->sel_weight[k0 + i] = mc->kind == ROUTER_HASH ? 1.0f : p;
            sum += p;
        }
        if (renorm && sum > 0.0f)
            for (int i = 0; i < s->sel_count[t]; i++) s->sel_weight[k0 + i] /= sum;
        for (int i = 0; i < s->slots; i++) s->sel_row[k0 + i] = s->sel_row[k0 + i] >= 0;
    }
}

int moe_forward(MoeState *s, const MoeConfig *mc, ActKind act, const MoeWeights *w,
                const int *hash_map, float *out, const float *x, const int *tokens,
                const float *noise, int N, int C, char *err) {
    int E = mc->experts, slots = slots_for(mc);
    int swiglu = act == ACT_SWIGLU;
    if (ensure_tokens(s, N, E, slots) != 0) return ml_error(err, "out of memory in an MoE layer");
    s->N = N;
    s->E = E;
    s->C = C;
    s->slots = slots;
    s->capacity = 0;

    /* route: p = softmax(x · Wrᵀ (+ noise)) */
    if (mc->kind != ROUTER_HASH) {
        matmul_forward(s->logits, x, w->router, NULL, N, C, E, 0.0f);
        if (noise)
            for (size_t i = 0; i < (size_t)N * E; i++) s->logits[i] += mc->noise * noise[i];
#pragma omp parallel for schedule(static)
        for (int t = 0; t < N; t++) {
            const float *l = s->logits + (size_t)t * E;
            float *p = s->probs + (size_t)t * E;
            float maxv = l[0];
            int arg = 0;
            for (int e = 1; e < E; e++)
                if (l[e] > maxv) {
                    maxv = l[e];
                    arg = e;
                }
            double sum = 0.0;
            for (int e = 0; e < E; e++) {
                p[e] = expf(l[e] - maxv);
                sum += p[e];
            }
            for (int e = 0; e < E; e++) p[e] = (float)(p[e] / sum);
            s->lse[t] = maxv + (float)log(sum);
            if (!s->freeze) s->top1[t] = arg;
        }
    } else {
        memset(s->probs, 0, sizeof(float) * (size_t)N * E);
        memset(s->lse, 0, sizeof(float) * (size_t)N);
        for (int t = 0; t < N; t++) s->top1[t] = hash_map[tokens[t]];
    }

    if (s->freeze) {
        reweight(s, mc, s->freeze == 1);
        goto group;
    }
    /* select */
    switch (mc->kind) {
    case ROUTER_TOPK:
    case ROUTER_THRESHOLD:
    case ROUTER_TOPP:
    case ROUTER_HASH:
#pragma omp parallel for schedule(static)
        for (int t = 0; t < N; t++) {
            const float *p = s->probs + (size_t)t * E;
            int *ex = s->sel_expert + (size_t)t * slots;
            float *wt = s->sel_weight + (size_t)t * slots;
            int n;
            if (mc->kind == ROUTER_TOPK) n = router_select_topk(p, E, mc->k, mc->normalize, ex, wt);
            else if (mc->kind == ROUTER_HASH) n = router_select_hash(tokens[t], hash_map, ex, wt);
            else n = router_select_threshold(p, E, mc->p, mc->max_k, mc->kind == ROUTER_TOPP, ex, wt);
            s->sel_count[t] = n;
            for (int i = 0; i < n; i++) s->sel_p[(size_t)t * slots + i] = p[ex[i]];
        }
        break;
    case ROUTER_EXPERT_CHOICE: {
        float c = mc->capacity_factor > 0.0f ? mc->capacity_factor : (float)mc->k;
        int cap = ceil_capacity((double)N * c / E);
        s->capacity = cap > N ? N : cap;
        router_select_expert_choice(s->probs, N, E, s->capacity, s->sel_expert, s->sel_weight,
                                    s->sel_count, s->scratch);
        memcpy(s->sel_p, s->sel_weight, sizeof(float) * (size_t)N * slots);
        break;
    }
    }

    /* capacity (token choice): kept flags go to sel_row for now */
    memset(s->dropped, 0, sizeof(int) * (size_t)E);
    if (mc->capacity_factor > 0.0f && mc->kind != ROUTER_EXPERT_CHOICE) {
        int cap = ceil_capacity((double)mc->capacity_factor * N * mc->k / E);
        s->capacity = cap > mc->min_capacity ? cap : mc->min_capacity;
        router_apply_capacity(s->sel_expert, s->sel_p, s->sel_count, N, slots, E, s->capacity,
                              s->sel_row, s->dropped, s->scratch);
    } else {
        for (size_t i = 0; i < (size_t)N * slots; i++) s->sel_row[i] = 1;
    }

group:
    /* group: the counting pass; its histogram is the expert load */
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

    /* experts: one GEMM per expert over its contiguous rows */
#pragma omp parallel for schedule(dynamic, 1)
    for (int e = 0; e < E; e++) {
        int n = s->counts[e], H = mc->hidden[e];
        if (n == 0) continue;
        const float *xe = s->xe + (size_t)s->offsets[e] * C;
        float *he = s->he + s->hoff[e], *ae = s->ae + s->hoff[e];
        float *ge = swiglu ? s->ge + s->hoff[e] : NULL;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, H, C, 1.0f, xe, C, w->fc[e], C,
                    0.0f, he, H);
        if (swiglu)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, H, C, 1.0f, xe, C, w->gate[e],
                        C, 0.0f, ge, H);
        act_forward(act, ae, he, ge, (size_t)n * H);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, C, H, 1.0f, ae, H, w->proj[e], H,
                    0.0f, s->ye + (size_t)s->offsets[e] * C, C);
    }

    /* combine, in rank order */
#pragma omp parallel for schedule(static)
    for (int t = 0; t < N; t++) {
        float *o = out + (size_t)t * C;
        for (int i = 0; i < s->sel_count[t]; i++) {
            int row = s->sel_row[(size_t)t * slots + i];
            if (row < 0) continue;
            float wt = s->sel_weight[(size_t)t * slots + i];
            const float *y = s->ye + (size_t)row * C;
            for (int c = 0; c < C; c++) o[c] += wt * y[c];
        }
    }

    /* accounting: FLOPs, probability mass, auxiliary losses */
    int mult = swiglu ? 3 : 2;
    double flops = mc->kind == ROUTER_HASH ? 0.0 : 2.0 * N * C * E;
    for (int e = 0; e < E; e++) flops += 2.0 * mult * s->counts[e] * C * mc->hidden[e];
    s->flops = flops;
    memset(s->prob_mass, 0, sizeof(float) * (size_t)E);
    for (int t = 0; t < N; t++)
        for (int e = 0; e < E; e++) s->prob_mass[e] += s->probs[(size_t)t * E + e];
    memset(s->aux, 0, sizeof s->aux);
    if (mc->kind != ROUTER_HASH) {
        double f[MOE_MAX_EXPERTS] = {0}, load[MOE_MAX_EXPERTS] = {0};
        int hmax = 0;
        for (int e = 0; e < E; e++) hmax = mc->hidden[e] > hmax ? mc->hidden[e] : hmax;
        for (int t = 0; t < N; t++) {
            f[s->top1[t]] += 1.0 / N;
            for (int i = 0; i < s->sel_count[t]; i++) load[s->sel_expert[(size_t)t * slots + i]] += 1.0;
        }
        double balance = 0.0, penalty = 0.0, z = 0.0;
        double imean = 0.0, ivar = 0.0, lmean = 0.0, lvar = 0.0;
        for (int e = 0; e < E; e++) {
            double P = s->prob_mass[e] / N;
            balance += f[e] * P;
            penalty += f[e] * ((double)mc->hidden[e] / hmax) * P;
            imean += s->prob_mass[e] / E;
            lmean += load[e] / E;
        }
        for (int e = 0; e < E; e++) {
            ivar += (s->prob_mass[e] - imean) * (s->prob_mass[e] - imean) / E;
            lvar += (load[e] - lmean) * (load[e] - lmean) / E;
        }
        for (int t = 0; t < N; t++) z += (double)s->lse[t] * s->lse[t] / N;
        s->aux[AUX_BALANCE] = (float)(E * balance);
        s->aux[AUX_Z] = (float)z;
        s->aux[AUX_CV2] = (float)((imean > 0 ? ivar / (imean * imean) : 0.0) +
                                  (lmean > 0 ? lvar / (lmean * lmean) : 0.0));
        s->aux[AUX_P_PENALTY] = (float)(E * penalty);
        /* d(weighted balance + p_penalty + cv2)/d p_te is the same for every token */
        for (int e = 0; e < E; e++) {
            double d = mc->aux_balance * E * f[e] / N +
                       mc->aux_p_penalty * E * f[e] * ((double)mc->hidden[e] / hmax) / N;
            if (mc->aux_cv2 > 0.0f && imean > 0.0) /* d CV²(I) / d I_e, with I_e = Σ_t p_te */
                d += mc->aux_cv2 * (2.0 * (s->prob_mass[e] - imean) / (E * imean * imean) -
                                    2.0 * ivar / (E * imean * imean * imean));
            s->aux_dp[e] = (float)d;
        }
    }
    s->aux_weighted = mc->aux_balance * s->aux[AUX_BALANCE] + mc->aux_z * s->aux[AUX_Z] +
                      mc->aux_cv2 * s->aux[AUX_CV2] + mc->aux_p_penalty * s->aux[AUX_P_PENALTY];
    return 0;
}

double moe_token_flops(const MoeState *s, const MoeConfig *mc, ActKind act, int t) {
    int mult = act == ACT_SWIGLU ? 3 : 2;
    double flops = mc->kind == ROUTER_HASH ? 0.0 : 2.0 * s->C * s->E;
    for (int i = 0; i < s->sel_count[t]; i++) {
        size_t k = (size_t)t * s->slots + i;
        if (s->sel_row[k] >= 0) flops += 2.0 * mult * s->C * mc->hidden[s->sel_expert[k]];
    }
    return flops;
}

void moe_measure_sparsity(MoeState *s, const MoeConfig *mc, float eps) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int e = 0; e < s->E; e++) {
        const float *a = s->ae + s->hoff[e];
        size_t n = (size_t)s->counts[e] * mc->hidden[e];
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
        s->near_zero[e] = zero;
        s->abs_sum[e] = sum;
    }
}

/* ------------------------------------------------------------------------ */
/* backward                                                                  */

static int ensure_scratch(MoeScratch *scr, const MoeState *s, int swiglu) {
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
    return 0;
}

int moe_backward(MoeState *s, MoeScratch *scr, const MoeConfig *mc, ActKind act,
                 const MoeWeights *w, MoeWeights *g, float *dx, const float *dout,
                 const float *x, float aux_scale, char *err) {
    int N = s->N, E = s->E, C = s->C, slots = s->slots;
    int swiglu = act == ACT_SWIGLU;
    if (ensure_scratch(scr, s, swiglu) != 0) return ml_error(err, "out of memory in MoE backward");

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
    if (mc->kind != ROUTER_HASH) {
        float *dp = scr->dprobs, *dl = scr->dlogits;
        memset(dp, 0, sizeof(float) * (size_t)N * E);
        int renorm = (mc->kind == ROUTER_TOPK && mc->normalize) || mc->kind == ROUTER_TOPP;
        for (int t = 0; t < N; t++)
            router_weights_backward(dp + (size_t)t * E, s->probs + (size_t)t * E,
                                    s->sel_expert + (size_t)t * slots,
                                    s->sel_weight + (size_t)t * slots, scr->dw + (size_t)t * slots,
                                    s->sel_count[t], renorm);
        /* auxiliary losses through p (balance, p_penalty, cv2): from the forward */
        float dpe[MOE_MAX_EXPERTS];
        for (int e = 0; e < E; e++) dpe[e] = s->aux_dp[e] * aux_scale;
        float zscale = mc->aux_z * aux_scale * 2.0f / N;
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
        }
        matmul_backward(dx, g->router, NULL, dl, x, w->router, N, C, E, 0.0f,
                        scr->drouter_pieces);
    } else {
        memset(dx, 0, sizeof(float) * (size_t)N * C);
    }

    /* experts, reversed */
#pragma omp parallel for schedule(dynamic, 1)
    for (int e = 0; e < E; e++) {
        int n = s->counts[e], H = mc->hidden[e];
        if (n == 0) continue;
        size_t r0 = (size_t)s->offsets[e] * C;
        const float *xe = s->xe + r0, *dye = scr->dye + r0;
        float *dxe = scr->dxe + r0;
        const float *he = s->he + s->hoff[e], *ae = s->ae + s->hoff[e];
        float *dae = scr->dae + s->hoff[e], *dhe = scr->dhe + s->hoff[e];
        /* ye = ae · projᵀ */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, H, C, 1.0f, dye, C, w->proj[e], H,
                    0.0f, dae, H);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, C, H, n, 1.0f, dye, C, ae, H, 1.0f,
                    g->proj[e], H);
        switch (act) {
        case ACT_GELU: gelu_backward(dhe, dae, he, (size_t)n * H); break;
        case ACT_RELU: relu_backward(dhe, dae, he, (size_t)n * H); break;
        case ACT_SWIGLU:
            swiglu_backward(scr->dge + s->hoff[e], dhe, dae, s->ge + s->hoff[e], he, (size_t)n * H);
            break;
        }
        /* he = xe · fcᵀ (and ge = xe · gateᵀ) */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, H, C, n, 1.0f, dhe, H, xe, C, 1.0f,
                    g->fc[e], C);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, C, H, 1.0f, dhe, H, w->fc[e], C,
                    0.0f, dxe, C);
        if (swiglu) {
            const float *dge = scr->dge + s->hoff[e];
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, H, C, n, 1.0f, dge, H, xe, C, 1.0f,
                        g->gate[e], C);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, C, H, 1.0f, dge, H, w->gate[e],
                        C, 1.0f, dxe, C);
        }
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
