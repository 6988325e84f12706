/*
** moe/merge.c — Merging Experts into One (MEO, arXiv 2310.09832), as the
** reference code (Shwai-He/MEO) runs it, with a causal variant of our own.
**
** The experts share one hidden size H. Each of the two linears has its own
** gate: the fc gate (E × C) sees the mean of the layer input over a window of
** positions, the proj gate (E × H) the mean of the hidden activation. A gate
** takes the k largest logits and a softmax over those k (the reference's
** noisy top-k gate, without its noise); the linear is merged as
** W = Σ_i g_i W_i and applied once to every position it serves:
**
**   a = act(x' · W_fcᵀ),  out += a' · W_projᵀ,
**
** where x' = x and a' = a, or with token attention r > 0 x' = x +
** Up(ReLU(Down(x))) (width → width/r → width, Up starting at zero, no
** biases), and the same for a; x' and a' feed both the gate's mean and the
** merged linear (as the reference's MEO class; its GPT-2 class gates on the
** plain x).
**
** segment = 0 gates each sequence on its whole mean, as the paper (a
** classification setting): every position's weights depend on later
** positions, so for a language model the loss is not a causal one.
** segment = S > 0 is our causal variant: positions [sS, (s+1)S) use weights
** merged from the means over positions [0, max(sS, 1)) only (the first
** segment from position 0 alone). So no position sees a later one.
**
** There is no per-token choice: the route trace gives each token the k
** experts of each gate of its segment (pass 0 the fc gate, pass 1 the proj
** gate) with their gate weights. Sequences are computed one after another
** and their gradients added in sequence order, so the bits do not depend on
** the thread count; the products inside a segment are single-threaded sgemm
** calls (the speed of this layer is not tuned yet).
*/
#include <assert.h>
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "moe/moe.h"
#include "ops.h"

struct Merge {
    int B, T, C, H, E, k, S, nseg, rf, rp; /* S: positions a segment; rf, rp: token attention widths */
    int cap_N, cap_B, cap_gates; /* capacities: tokens, segments, segments × k */
    ActKind act;
    float *xp, *tfc;         /* (N, C) x', (N, rf) ReLU(Down x) */
    float *h, *a, *ap, *tpr; /* (N, H) fc output, activation, a'; (N, rp) */
    int *fc_idx, *pr_idx;    /* (B, nseg, k) the gates' experts, largest logit first */
    float *fc_g, *pr_g;      /* (B, nseg, k) their weights */
    float *fc_mean, *pr_mean; /* (B, nseg, C), (B, nseg, H) the gates' inputs */
    float *W, *dW;           /* (H · C) a merged matrix, its gradient */
    float *dxp, *dap, *dt;   /* backward: (N, C), (N, H), (N, max(rf, rp)) */
    float *pieces;           /* matmul_backward's scratch */
    size_t cap_pieces;
    double flops, flops_topk;
};

void merge_free(Merge *m) {
    if (!m) return;
    free(m->xp), free(m->tfc), free(m->h), free(m->a), free(m->ap), free(m->tpr);
    free(m->fc_idx), free(m->pr_idx), free(m->fc_g), free(m->pr_g), free(m->fc_mean);
    free(m->pr_mean), free(m->W), free(m->dW), free(m->dxp), free(m->dap), free(m->dt);
    free(m->pieces);
    free(m);
}

static int merge_ensure(MoeLayer *l, const ModelConfig *c, int B, int T) {
    const MoeConfig *mc = &c->moe;
    Merge *m = l->merge;
    if (!m) {
        m = l->merge = calloc(1, sizeof *m);
        if (!m) return -1;
        m->C = c->d_model;
        m->H = mc->hidden[0];
        m->E = mc->experts;
        m->act = c->activation;
        m->rf = mc->token_attention > 0 ? m->C / mc->token_attention : 0;
        m->rp = mc->token_attention > 0 ? m->H / mc->token_attention : 0;
        if (mc->token_attention > 0 && m->rp < 1) m->rp = 1;
    }
    m->B = B;
    m->T = T;
    m->k = mc->k; /* a counterfactual evaluation (run:evaluate{ router }) merges another k */
    m->S = mc->segment > 0 ? mc->segment : T;
    m->nseg = (T + m->S - 1) / m->S;
    int N = B * T, C = m->C, H = m->H, k = m->k;
    int rt = m->rf > m->rp ? m->rf : m->rp;
    if (N > m->cap_N) {
        if (ML_GROW(m->xp, (size_t)N * C) || ML_GROW(m->tfc, (size_t)N * (m->rf + 1)) ||
            ML_GROW(m->h, (size_t)N * H) || ML_GROW(m->a, (size_t)N * H) ||
            ML_GROW(m->ap, (size_t)N * H) || ML_GROW(m->tpr, (size_t)N * (m->rp + 1)) ||
            ML_GROW(m->dxp, (size_t)N * C) || ML_GROW(m->dap, (size_t)N * H) ||
            ML_GROW(m->dt, (size_t)N * (rt + 1)))
            return -1;
        m->cap_N = N;
    }
    int segs = B * m->nseg;
    if (segs > m->cap_B) {
        if (ML_GROW(m->fc_mean, (size_t)segs * C) || ML_GROW(m->pr_mean, (size_t)segs * H) ||
            ML_GROW(m->W, (size_t)H * C) || ML_GROW(m->dW, (size_t)H * C))
            return -1;
        m->cap_B = segs;
    }
    if (segs * k > m->cap_gates) {
        if (ML_GROW(m->fc_idx, (size_t)segs * k) || ML_GROW(m->pr_idx, (size_t)segs * k) ||
            ML_GROW(m->fc_g, (size_t)segs * k) || ML_GROW(m->pr_g, (size_t)segs * k))
            return -1;
        m->cap_gates = segs * k;
    }
    size_t pieces = 0, n;
    if ((n = matmul_backward_scratch(N, C, m->rf)) > pieces) pieces = n;
    if ((n = matmul_backward_scratch(N, m->rf, C)) > pieces) pieces = n;
    if ((n = matmul_backward_scratch(N, H, m->rp)) > pieces) pieces = n;
    if ((n = matmul_backward_scratch(N, m->rp, H)) > pieces) pieces = n;
    if (pieces > m->cap_pieces) {
        if (ML_GROW(m->pieces, pieces)) return -1;
        m->cap_pieces = pieces;
    }
    return 0;
}

/* Window of segment s: positions [0, end) of its sequence. */
static int window_end(const Merge *m, const MoeConfig *mc, int s) {
    if (mc->segment == 0) return m->T;
    int end = s * m->S;
    return end > 1 ? end : 1;
}

/* A gate: logits = mean · Wgᵀ (E), the k largest (ties to the lower expert)
** in rank order in idx, g = softmax over them. */
static void gate(const float *mean, const float *Wg, int E, int D, int k, int *idx, float *g) {
    float logit[MOE_MAX_EXPERTS];
    for (int e = 0; e < E; e++) {
        float z = 0.0f;
        for (int j = 0; j < D; j++) z += mean[j] * Wg[(size_t)e * D + j];
        logit[e] = z;
    }
    for (int i = 0; i < k; i++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int j = 0; j < i && !taken; j++) taken = idx[j] == e;
            if (!taken && (best < 0 || logit[e] > logit[best])) best = e;
        }
        idx[i] = best;
        g[i] = logit[best];
    }
    float maxv = g[0], sum = 0.0f;
    for (int i = 0; i < k; i++) sum += g[i] = expf(g[i] - maxv);
    for (int i = 0; i < k; i++) g[i] /= sum;
}

/* W (rows, cols) = Σ_i g_i expert_i's matrix (from mats, one per expert). */
static void merge_matrix(float *W, float *const *mats, const int *idx, const float *g, int k,
                         size_t n) {
    memset(W, 0, sizeof(float) * n);
    for (int i = 0; i < k; i++) {
        const float *Wi = mats[idx[i]];
        float gi = g[i];
        for (size_t j = 0; j < n; j++) W[j] += gi * Wi[j];
    }
}

/* x' (n, D) = x + Up(ReLU(Down x)); t (n, r) keeps ReLU(Down x). */
static void token_attention(float *xp, float *t, const float *x, const float *down,
                            const float *up, int n, int D, int r) {
    memcpy(xp, x, sizeof(float) * (size_t)n * D);
    if (r == 0) return;
    matmul_forward(t, x, down, NULL, n, D, r, 0.0f);
    relu_forward(t, t, (size_t)n * r);
    matmul_forward(xp, t, up, NULL, n, r, D, 1.0f);
}

static void act_forward(ActKind act, float *out, const float *h, size_t n) {
    if (act == ACT_RELU) relu_forward(out, h, n);
    else gelu_forward(out, h, n);
}

int merge_forward(MoeLayer *l, const ModelConfig *c, const MoeWeights *w, float *out,
                  const float *x, int B, int T, char *err) {
    const MoeConfig *mc = &c->moe;
    if (merge_ensure(l, c, B, T) != 0) return ml_error(err, "out of memory in a merged layer");
    Merge *m = l->merge;
    int N = B * T, C = m->C, H = m->H, E = m->E, k = m->k, S = m->S;
    token_attention(m->xp, m->tfc, x, w->tfc_down, w->tfc_up, N, C, m->rf);
    for (int b = 0; b < B; b++)
        for (int s = 0; s < m->nseg; s++) {
            int seg = b * m->nseg + s, p0 = b * T + s * S, n = (s + 1) * S < T ? S : T - s * S;
            int wend = window_end(m, mc, s);
            /* fc: gate on the mean of x' over the window, merge, apply */
            float *mean = m->fc_mean + (size_t)seg * C;
            memset(mean, 0, sizeof(float) * C);
            for (int t = 0; t < wend; t++)
                for (int j = 0; j < C; j++) mean[j] += m->xp[(size_t)(b * T + t) * C + j];
            for (int j = 0; j < C; j++) mean[j] /= wend;
            int *idx = m->fc_idx + (size_t)seg * k;
            float *g = m->fc_g + (size_t)seg * k;
            gate(mean, w->gate_fc, E, C, k, idx, g);
            merge_matrix(m->W, (float *const *)w->fc, idx, g, k, (size_t)H * C);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, H, C, 1.0f,
                        m->xp + (size_t)p0 * C, C, m->W, C, 0.0f, m->h + (size_t)p0 * H, H);
            act_forward(m->act, m->a + (size_t)p0 * H, m->h + (size_t)p0 * H, (size_t)n * H);
            token_attention(m->ap + (size_t)p0 * H, m->tpr + (size_t)p0 * m->rp,
                            m->a + (size_t)p0 * H, w->tpr_down, w->tpr_up, n, H, m->rp);
            /* proj: gate on the mean of a' over the window (positions before
            ** the segment, computed already, or position 0 of this one) */
            float *pmean = m->pr_mean + (size_t)seg * H;
            memset(pmean, 0, sizeof(float) * H);
            for (int t = 0; t < wend; t++)
                for (int j = 0; j < H; j++) pmean[j] += m->ap[(size_t)(b * T + t) * H + j];
            for (int j = 0; j < H; j++) pmean[j] /= wend;
            idx = m->pr_idx + (size_t)seg * k;
            g = m->pr_g + (size_t)seg * k;
            gate(pmean, w->gate_proj, E, H, k, idx, g);
            merge_matrix(m->W, (float *const *)w->proj, idx, g, k, (size_t)C * H);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, C, H, 1.0f,
                        m->ap + (size_t)p0 * H, H, m->W, H, 1.0f, out + (size_t)p0 * C, C);
        }
    /* FLOPs: per segment two merges (k · H · C multiply-adds each) and two
    ** gates; per token the two merged products and token attention */
    double segs = (double)B * m->nseg;
    m->flops = segs * (2.0 * 2.0 * k * H * C + 2.0 * E * (C + H)) + N * 2.0 * 2.0 * C * H +
               N * 2.0 * 2.0 * ((double)C * m->rf + (double)H * m->rp);
    /* the same gates as a per-token top-k layer: k experts, a router of E */
    m->flops_topk = N * (k * 2.0 * 2.0 * C * H + 2.0 * C * E);
    l->flops = m->flops;
    l->flops_topk = m->flops_topk;
    memset(l->aux, 0, sizeof l->aux);
    l->aux_weighted = 0.0f;
    return 0;
}

/* The backward of a gate and a merge, given dW (the merged matrix's
** gradient): the experts' gradients, and the mean's gradient in dmean (D). */
static void merge_gate_backward(float *const *dmats, const float *const *mats, float *dWg,
                                const float *Wg, const float *mean, float *dmean, const float *dW,
                                const int *idx, const float *g, int k, int D, size_t n) {
    float dg[MOE_MAX_EXPERTS], dot = 0.0f;
    for (int i = 0; i < k; i++) {
        const float *Wi = mats[idx[i]];
        float *dWi = dmats[idx[i]];
        double d = 0.0;
        for (size_t j = 0; j < n; j++) {
            d += (double)dW[j] * Wi[j];
            dWi[j] += g[i] * dW[j];
        }
        dg[i] = (float)d;
        dot += g[i] * dg[i];
    }
    memset(dmean, 0, sizeof(float) * D);
    for (int i = 0; i < k; i++) {
        float dl = g[i] * (dg[i] - dot); /* softmax over the k logits */
        const float *wg = Wg + (size_t)idx[i] * D;
        float *dwg = dWg + (size_t)idx[i] * D;
        for (int j = 0; j < D; j++) {
            dwg[j] += dl * mean[j];
            dmean[j] += dl * wg[j];
        }
    }
}

/* dx (n, D) = dxp + the token attention's input gradient (dxp may be dx). */
static void token_attention_backward(float *dx, const float *dxp, float *dt, float *ddown,
                                     float *dup, const float *x, const float *t,
                                     const float *down, const float *up, int n, int D, int r,
                                     float *pieces) {
    if (dx != dxp) memcpy(dx, dxp, sizeof(float) * (size_t)n * D);
    if (r == 0) return;
    matmul_backward(dt, dup, NULL, dxp, t, up, n, r, D, 0.0f, pieces);
    relu_backward(dt, dt, t, (size_t)n * r);
    matmul_backward(dx, ddown, NULL, dt, x, down, n, D, r, 1.0f, pieces);
}

int merge_backward(MoeLayer *l, const ModelConfig *c, const MoeWeights *w, MoeWeights *g,
                   float *dx, const float *dout, const float *x, char *err) {
    const MoeConfig *mc = &c->moe;
    Merge *m = l->merge;
    int B = m->B, T = m->T, N = B * T, C = m->C, H = m->H, k = m->k, S = m->S;
    float *dmc = malloc(sizeof(float) * (size_t)(C > H ? C : H));
    if (!dmc) return ml_error(err, "out of memory in a merged layer's backward");
    memset(m->dxp, 0, sizeof(float) * (size_t)N * C);
    memset(m->dap, 0, sizeof(float) * (size_t)N * H);
    for (int b = 0; b < B; b++)
        for (int s = m->nseg - 1; s >= 0; s--) {
            int seg = b * m->nseg + s, p0 = b * T + s * S, n = (s + 1) * S < T ? S : T - s * S;
            int wend = window_end(m, mc, s);
            /* proj: out += a' · Wpᵀ */
            const int *idx = m->pr_idx + (size_t)seg * k;
            const float *gg = m->pr_g + (size_t)seg * k;
            merge_matrix(m->W, (float *const *)w->proj, idx, gg, k, (size_t)C * H);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, H, C, 1.0f,
                        dout + (size_t)p0 * C, C, m->W, H, 1.0f, m->dap + (size_t)p0 * H, H);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, C, H, n, 1.0f,
                        dout + (size_t)p0 * C, C, m->ap + (size_t)p0 * H, H, 0.0f, m->dW, H);
            merge_gate_backward(g->proj, (const float *const *)w->proj, g->gate_proj, w->gate_proj,
                                m->pr_mean + (size_t)seg * H, dmc, m->dW, idx, gg, k, H,
                                (size_t)C * H);
            for (int t = 0; t < wend; t++)
                for (int j = 0; j < H; j++) m->dap[(size_t)(b * T + t) * H + j] += dmc[j] / wend;
            /* the segment's a' gradient is complete: later segments and this
            ** one's gate have added theirs. Through token attention and act. */
            float *da = m->dap + (size_t)p0 * H; /* becomes dh in place */
            token_attention_backward(da, da, m->dt, g->tpr_down, g->tpr_up, m->a + (size_t)p0 * H,
                                     m->tpr + (size_t)p0 * m->rp, w->tpr_down, w->tpr_up, n, H,
                                     m->rp, m->pieces);
            if (m->act == ACT_RELU) relu_backward(da, da, m->h + (size_t)p0 * H, (size_t)n * H);
            else gelu_backward(da, da, m->h + (size_t)p0 * H, (size_t)n * H);
            /* fc: h = x' · W_fcᵀ */
            idx = m->fc_idx + (size_t)seg * k;
            gg = m->fc_g + (size_t)seg * k;
            merge_matrix(m->W, (float *const *)w->fc, idx, gg, k, (size_t)H * C);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, C, H, 1.0f, da, H, m->W, C,
                        1.0f, m->dxp + (size_t)p0 * C, C);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, H, C, n, 1.0f, da, H,
                        m->xp + (size_t)p0 * C, C, 0.0f, m->dW, C);
            merge_gate_backward(g->fc, (const float *const *)w->fc, g->gate_fc, w->gate_fc,
                                m->fc_mean + (size_t)seg * C, dmc, m->dW, idx, gg, k, C,
                                (size_t)H * C);
            for (int t = 0; t < wend; t++)
                for (int j = 0; j < C; j++) m->dxp[(size_t)(b * T + t) * C + j] += dmc[j] / wend;
        }
    free(dmc);
    token_attention_backward(dx, m->dxp, m->dt, g->tfc_down, g->tfc_up, x, m->tfc, w->tfc_down,
                             w->tfc_up, N, C, m->rf, m->pieces);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* the route trace: each token gets its segment's gates                      */

size_t merge_trace_count(const Merge *m) { return (size_t)m->B * m->T * 2 * m->k; }

size_t merge_trace_routes(const Merge *m, MoeRoute *out) {
    MoeRoute *o = out;
    for (int pass = 0; pass < 2; pass++) /* pass by pass, as every layer's trace */
        for (int t = 0; t < m->B * m->T; t++) {
            int seg = (t / m->T) * m->nseg + (t % m->T) / m->S;
            const int *idx = (pass ? m->pr_idx : m->fc_idx) + (size_t)seg * m->k;
            const float *g = (pass ? m->pr_g : m->fc_g) + (size_t)seg * m->k;
            for (int i = 0; i < m->k; i++)
                *o++ = (MoeRoute){.token = t, .pass = pass, .rank = i, .expert = idx[i],
                                  .weight = g[i]};
        }
    return (size_t)(o - out);
}

MoeTokenTrace merge_trace_token(const Merge *m, int t) {
    (void)t;
    return (MoeTokenTrace){.experts = 2 * m->k, .passes = 1, .flops = m->flops / ((double)m->B * m->T)};
}

MoeExpertTrace merge_trace_expert(const Merge *m, int e) {
    MoeExpertTrace tr = {0, 0, 0.0};
    for (int seg = 0; seg < m->B * m->nseg; seg++) {
        int s = seg % m->nseg, n = (s + 1) * m->S < m->T ? m->S : m->T - s * m->S;
        for (int i = 0; i < m->k; i++) {
            if (m->fc_idx[(size_t)seg * m->k + i] == e) {
                tr.tokens += n;
                tr.prob_mass += (double)n * m->fc_g[(size_t)seg * m->k + i];
            }
            if (m->pr_idx[(size_t)seg * m->k + i] == e) {
                tr.tokens += n;
                tr.prob_mass += (double)n * m->pr_g[(size_t)seg * m->k + i];
            }
        }
    }
    return tr;
}
