/*
** moe/stratified.c — Stratified Mixture of Experts (SMoE, arXiv 2305.02176),
** as the reference code (fe1ixxu/Stratified_Mixture_of_Experts) runs it.
**
** The E experts are split into L strata of consecutive experts (strata
** {4, 4}: experts 0-3, then 4-7); m_s experts come before stratum s. Stratum
** s has its own router over the experts of strata >= s, (E - m_s) × C; the
** earlier experts are not visible to it (the reference pads their logits with
** -inf, which is the same softmax). Every token starts at stratum 0. Pass s
** takes the tokens at stratum s, the lowest still occupied, and routes them
** top-2 (router.c, select_stratum_top2); each token then moves to 1 + the
** stratum of its first choice, taken before capacity drops anything. A token
** at stratum L has left the layer, so it made 1 to L passes: dynamic
** capacity. Pass s is one token-choice pass of layer.c over its tokens and
** the experts it sees, so everything else (capacity per pass over the visible
** experts, first choices first; weights renormalised over the kept pair; the
** auxiliary losses over the visible experts, averaged over the passes that
** ran) is layer.c's.
**
** Inputs and residual, the paper's pre-norm equations: pass 0 takes the
** block's ln_2 output; pass s >= 1 normalises the token's current residual
** h with its own norm (h.{l}.moe.norms.{s}); every pass adds its weighted
** expert outputs to h:  h ← h + Σ_i w_i E_i(norm_s(h)). The reference code
** normalises h in place, so that from pass 1 on its residual is the
** normalised h (h ← norm(h) + moe(norm(h))), and it normalises the output of
** the last pass once more; we follow the equations, as SPEC §2 says.
**
** With second = "sample" the second choice is the largest logit plus Gumbel
** noise among the other visible experts, in training and in evaluation, as
** the reference code. The noise is a function of (key, layer pass, row,
** expert) through a counter-based generator (splitmix64), so a forward pass
** gives the same bits on any number of threads; the model's key is its seed
** and, in training, its step, so evaluations draw the same noise each time.
*/
#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dist.h"
#include "moe/moe.h"
#include "moe/router.h"
#include "ops.h"

struct Strata {
    int L, N, C, cap_N;       /* strata, tokens of the last forward, width */
    MoeState *pass;           /* (L) pass s's state; N = 0 when it did not run */
    int *rows;                /* (L, cap_N) the layer's tokens of pass s, ascending */
    float *u;                 /* (L, cap_N, C) pass s's inputs, s >= 1 */
    float *hin;               /* (L, cap_N, C) the residual rows before pass s, s >= 1 */
    float *mean, *rstd;       /* (L, cap_N) the norm's statistics, s >= 1 */
    float *y;                 /* (cap_N, C) a pass's output rows; in backward their gradient */
    float *du;                /* (cap_N, C) backward: the gradient of a pass's inputs */
    float *gumbel;            /* (cap_N, E) */
    int *state;               /* (cap_N) a token's stratum, L once it has left */
    int *passes;              /* (cap_N) passes a token made */
    int *local;               /* (L, cap_N) a token's row in pass s, or -1 */
    int first[MOE_MAX_EXPERTS + 1]; /* m_s: experts before stratum s; first[L] = E */
    int ran;                  /* passes that had tokens (on any rank: strata_reduce_aux) */
};

void strata_free(Strata *s) {
    if (!s) return;
    for (int i = 0; s->pass && i < s->L; i++) moe_state_free(&s->pass[i]);
    free(s->pass);
    free(s->rows), free(s->u), free(s->hin), free(s->mean), free(s->rstd), free(s->y), free(s->du);
    free(s->gumbel), free(s->state), free(s->passes), free(s->local);
    free(s);
}

static int strata_ensure(MoeLayer *l, const MoeConfig *mc, int N, int C) {
    Strata *s = l->strata;
    if (!s) {
        s = l->strata = calloc(1, sizeof *s);
        if (!s) return -1;
        s->L = mc->n_strata;
        s->pass = calloc((size_t)s->L, sizeof *s->pass);
        if (!s->pass) return -1;
        s->first[0] = 0;
        for (int i = 0; i < s->L; i++) s->first[i + 1] = s->first[i] + mc->strata[i];
        assert(s->first[s->L] == mc->experts);
    }
    if (N <= s->cap_N && C == s->C) return 0;
    size_t L = (size_t)s->L, n = (size_t)N;
    if (ML_GROW(s->rows, L * n) || ML_GROW(s->u, L * n * C) || ML_GROW(s->hin, L * n * C) ||
        ML_GROW(s->mean, L * n) || ML_GROW(s->rstd, L * n) || ML_GROW(s->y, n * C) ||
        ML_GROW(s->du, n * C) ||
        ML_GROW(s->gumbel, n * mc->experts) || ML_GROW(s->state, n) || ML_GROW(s->passes, n) ||
        ML_GROW(s->local, L * n))
        return -1;
    s->cap_N = N;
    s->C = C;
    return 0;
}

/* Pass s's view of the layer: the experts of strata >= s, its router. */
static void pass_config(const MoeConfig *mc, const Strata *s, int p, MoeConfig *pc) {
    int m = s->first[p], E = mc->experts - m;
    *pc = *mc;
    pc->experts = E;
    memmove(pc->hidden, mc->hidden + m, sizeof(int) * (size_t)E);
    if (mc->parallel_experts) { /* the pass's experts stay on the layer's ranks */
        moe_placement(mc, dist_size(), pc->placement);
        memmove(pc->placement, pc->placement + m, sizeof(int) * (size_t)E);
        pc->n_placement = E;
    }
}

static void pass_weights(const MoeWeights *w, const Strata *s, int p, MoeWeights *pw) {
    int m = s->first[p], E = s->first[s->L] - m;
    memset(pw, 0, sizeof *pw);
    pw->router = w->routers[p];
    for (int e = 0; e < E; e++) {
        pw->fc[e] = w->fc[m + e];
        pw->gate[e] = w->gate[m + e];
        pw->proj[e] = w->proj[m + e];
    }
}

/* splitmix64: a counter-based generator, so each draw depends on its indices only */
static uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Standard Gumbel noise for pass p's n rows × E experts: -log(-log u). */
static void fill_gumbel(float *g, uint64_t key, int p, int n, int E) {
    uint64_t base = mix64(key ^ mix64((uint64_t)p + 0x5151));
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++)
        for (int e = 0; e < E; e++) {
            uint64_t r = mix64(base ^ mix64(((uint64_t)i << 16) | (uint64_t)e));
            double u = ((r >> 11) + 0.5) * (1.0 / 9007199254740992.0); /* in (0, 1) */
            g[(size_t)i * E + e] = (float)-log(-log(u));
        }
}

static void norm_rows(const ModelConfig *c, float *out, float *mean, float *rstd, const float *in,
                      const float *w, const float *b, int n) {
    if (c->norm == NORM_RMSNORM) rmsnorm_forward(out, rstd, in, w, n, c->d_model, c->norm_eps);
    else layernorm_forward(out, mean, rstd, in, w, b, n, c->d_model, c->norm_eps);
}

int strata_forward(MoeLayer *l, const ModelConfig *c, const MoeWeights *w, float *out,
                   const float *x, int N, uint64_t key, char *err) {
    const MoeConfig *mc = &c->moe;
    int C = c->d_model;
    if (strata_ensure(l, mc, N, C) != 0) return ml_error(err, "out of memory in a stratified layer");
    Strata *s = l->strata;
    s->N = N;
    memset(s->state, 0, sizeof(int) * (size_t)N);
    memset(s->passes, 0, sizeof(int) * (size_t)N);
    for (size_t i = 0; i < (size_t)s->L * N; i++) s->local[i] = -1;
    l->flops = 0.0;
    memset(l->aux, 0, sizeof l->aux);
    l->aux_weighted = 0.0f;
    int ran = 0;
    for (int p = 0; p < s->L; p++) {
        MoeState *ps = &s->pass[p];
        int *rows = s->rows + (size_t)p * N, n = 0;
        for (int t = 0; t < N; t++)
            if (s->state[t] == p) {
                s->local[(size_t)p * N + t] = n;
                rows[n++] = t;
            }
        ps->N = 0;
        /* under expert parallelism every rank takes part in every pass's
        ** exchange, with or without tokens of its own in it */
        if (n == 0 && !moe_parallel(mc)) continue;
        MoeConfig pc;
        MoeWeights pw;
        pass_config(mc, s, p, &pc);
        pass_weights(w, s, p, &pw);
        const float *u = x; /* pass 0: every token, the block's ln_2 output */
        float *y = out;     /* pass 0 adds to the residual directly */
        if (p > 0) {
            float *hin = s->hin + (size_t)p * N * C, *up = s->u + (size_t)p * N * C;
            for (int i = 0; i < n; i++)
                memcpy(hin + (size_t)i * C, out + (size_t)rows[i] * C, sizeof(float) * C);
            norm_rows(c, up, s->mean + (size_t)p * N, s->rstd + (size_t)p * N, hin, w->norm_w[p],
                      w->norm_b[p], n);
            u = up;
            y = s->y;
            memset(y, 0, sizeof(float) * (size_t)n * C);
        } else {
            assert(n == N);
        }
        if (mc->second_sample) fill_gumbel(s->gumbel, key, p, n, pc.experts);
        ps->gumbel = mc->second_sample ? s->gumbel : NULL;
        ps->freeze = l->freeze;
        if (moe_forward(ps, &pc, c->activation, &pw, NULL, y, u, NULL, NULL, n, C, err) != 0)
            return -1;
        if (p > 0)
            for (int i = 0; i < n; i++) {
                float *o = out + (size_t)rows[i] * C;
                const float *yi = y + (size_t)i * C;
                for (int j = 0; j < C; j++) o[j] += yi[j];
            }
        /* each token moves to 1 + the stratum of its first choice, before drops */
        for (int i = 0; i < n; i++) {
            int e = s->first[p] + ps->top1[i], q = p;
            while (e >= s->first[q + 1]) q++;
            s->state[rows[i]] = q + 1;
            s->passes[rows[i]]++;
        }
        l->flops += ps->flops;
        if (n == 0) continue;
        for (int k = 0; k < AUX_KINDS; k++) l->aux[k] += ps->aux[k];
        l->aux_weighted += ps->aux_weighted;
        ran++;
    }
    for (int k = 0; k < AUX_KINDS; k++) l->aux[k] /= ran;
    l->aux_weighted /= ran;
    s->ran = ran;
    l->flops_topk = l->flops;
    return 0;
}

/* As strata_forward averages them: over the passes that had tokens, here
** on any rank. A pass without tokens on this rank adds zeros. */
void strata_reduce_aux(MoeLayer *l, const ModelConfig *c, MoeSum sum, int ranks) {
    Strata *s = l->strata;
    memset(l->aux, 0, sizeof l->aux);
    l->aux_weighted = 0.0f;
    int ran = 0;
    for (int p = 0; p < s->L; p++) {
        MoeState *ps = &s->pass[p];
        MoeConfig pc;
        pass_config(&c->moe, s, p, &pc);
        if (ps->N == 0) {
            ps->E = pc.experts;
            memset(ps->stats, 0, sizeof(double) * MOE_STATS(pc.experts));
        }
        sum(ps->stats, MOE_STATS(pc.experts));
        if (ps->stats[MOE_STATS(pc.experts) - 1] == 0.0) continue;
        moe_aux(ps, &pc, router_of(pc.kind)->has_router, ranks);
        for (int k = 0; k < AUX_KINDS; k++) l->aux[k] += ps->aux[k];
        l->aux_weighted += ps->aux_weighted;
        ran++;
    }
    for (int k = 0; ran > 0 && k < AUX_KINDS; k++) l->aux[k] /= ran;
    if (ran > 0) l->aux_weighted /= ran;
    s->ran = ran;
}

int strata_backward(MoeLayer *l, MoeScratch *scr, const ModelConfig *c, const MoeWeights *w,
                    MoeWeights *g, float *dx, float *dout, const float *x, float aux_scale,
                    char *err) {
    const MoeConfig *mc = &c->moe;
    Strata *s = l->strata;
    int N = s->N, C = s->C;
    float scale = aux_scale / s->ran; /* the auxiliary losses are averaged over the passes */
    /* later passes first: a pass's output gradient is complete once every
    ** later pass has added what flows back through its own input */
    for (int p = s->L - 1; p >= 0; p--) {
        MoeState *ps = &s->pass[p];
        int n = ps->N;
        if (n == 0 && !moe_parallel(mc)) continue;
        MoeConfig pc;
        MoeWeights pw, pg;
        pass_config(mc, s, p, &pc);
        pass_weights(w, s, p, &pw);
        pass_weights(g, s, p, &pg);
        if (p == 0) {
            if (moe_backward(ps, scr, &pc, c->activation, &pw, &pg, dx, dout, x, scale, NULL, err) != 0)
                return -1;
            continue;
        }
        const int *rows = s->rows + (size_t)p * N;
        float *dy = s->y, *du = s->du;
        const float *u = s->u + (size_t)p * N * C, *hin = s->hin + (size_t)p * N * C;
        for (int i = 0; i < n; i++)
            memcpy(dy + (size_t)i * C, dout + (size_t)rows[i] * C, sizeof(float) * C);
        if (moe_backward(ps, scr, &pc, c->activation, &pw, &pg, du, dy, u, scale, NULL, err) != 0)
            return -1;
        float *dh = dy; /* the norm's input gradient, then added to dout's rows */
        memset(dh, 0, sizeof(float) * (size_t)n * C);
        if (c->norm == NORM_RMSNORM)
            rmsnorm_backward(dh, g->norm_w[p], du, hin, w->norm_w[p], s->rstd + (size_t)p * N, n, C);
        else
            layernorm_backward(dh, g->norm_w[p], g->norm_b[p], du, hin, w->norm_w[p],
                               s->mean + (size_t)p * N, s->rstd + (size_t)p * N, n, C);
        for (int i = 0; i < n; i++) {
            float *d = dout + (size_t)rows[i] * C;
            const float *di = dh + (size_t)i * C;
            for (int j = 0; j < C; j++) d[j] += di[j];
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* the route trace                                                           */

void strata_traffic(const Strata *s, int ranks, int64_t *tokens) {
    for (int p = 0; p < s->L; p++) moe_parallel_traffic(&s->pass[p], ranks, tokens);
}

size_t strata_trace_count(const Strata *s) {
    size_t n = 0;
    for (int p = 0; p < s->L; p++)
        if (s->pass[p].N > 0) n += (size_t)s->pass[p].offsets[s->pass[p].E];
    return n;
}

size_t strata_trace_routes(const Strata *s, const MoeConfig *mc, MoeRoute *out) {
    (void)mc;
    size_t n = 0;
    for (int p = 0; p < s->L; p++)
        if (s->pass[p].N > 0)
            n += moe_pass_routes(&s->pass[p], p, s->first[p], s->rows + (size_t)p * s->N, out + n);
    return n;
}

MoeTokenTrace strata_trace_token(const Strata *s, const MoeConfig *mc, ActKind act, int t) {
    MoeTokenTrace tr = {0, 0, 0.0};
    for (int p = 0; p < s->L; p++) {
        int i = s->local[(size_t)p * s->N + t];
        if (i < 0) continue;
        MoeTokenTrace x = moe_pass_token(&s->pass[p], mc, s->first[p], act, i);
        tr.experts += x.experts;
        tr.passes += 1;
        tr.flops += x.flops;
    }
    return tr;
}

MoeExpertTrace strata_trace_expert(const Strata *s, const MoeConfig *mc, int e) {
    (void)mc;
    MoeExpertTrace tr = {0, 0, 0.0};
    for (int p = 0; p < s->L && s->first[p] <= e; p++) {
        const MoeState *ps = &s->pass[p];
        if (ps->N == 0) continue;
        int i = e - s->first[p];
        tr.tokens += ps->counts[i];
        tr.dropped += ps->dropped[i];
        tr.prob_mass += ps->prob_mass[i];
    }
    return tr;
}

void strata_trace_sparsity(const Strata *s, const MoeConfig *mc, float eps, int64_t *activations,
                           int64_t *near_zero, double *abs_sum) {
    for (int p = 0; p < s->L; p++) {
        if (s->pass[p].N == 0) continue;
        int m = s->first[p];
        moe_pass_sparsity(&s->pass[p], mc, m, eps, activations + m, near_zero + m, abs_sum + m);
    }
}
