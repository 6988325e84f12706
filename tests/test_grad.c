/*
** test_grad.c — finite-difference gradient checks: every op's backward, and
** the whole model for each norm, activation and head tying.
**
** For an op we take the scalar L = Σ out ⊙ R with a fixed random R (summed in
** double), so the op's backward with dout = R must give dL/dinput; each input
** entry is nudged by ±h and the central difference compared with it.
*/
#include "testutil.h"

#include "config.h"
#include "model.h"
#include "moe/moe.h"
#include "ops.h"

static double H_STEP = 1e-2; /* the models use 1e-3: ReLU kinks */

/* The op under test, as a closure over static buffers. */
static void (*op_forward)(void);
static const float *op_out;
static const float *op_r;
static size_t op_nout;

static double op_loss(void) {
    op_forward();
    double s = 0.0;
    for (size_t i = 0; i < op_nout; i++) s += (double)op_out[i] * op_r[i];
    return s;
}

/* Compares analytic (n) with central differences of op_loss in x (n). */
static void check_grad(const char *what, float *x, const float *analytic, size_t n) {
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        float saved = x[i];
        x[i] = saved + (float)H_STEP;
        double lp = op_loss();
        x[i] = saved - (float)H_STEP;
        double lm = op_loss();
        x[i] = saved;
        double num = (lp - lm) / (2.0 * H_STEP);
        double err = fabs(num - analytic[i]) / (1e-3 + fmax(fabs(num), fabs(analytic[i])));
        if (err > worst) worst = err;
        if (!test_close(num, analytic[i], 2e-2, 2e-3))
            fail_msg("%s[%zu]: numeric %.6g, analytic %.6g", what, i, num, (double)analytic[i]);
    }
    op_loss(); /* leave the forward state as it was */
    (void)worst;
}

/* ------------------------------------------------------------------------ */

enum { B = 2, T = 5, C = 8, NH = 2, OC = 6, V = 7 };
static float inp[B * T * 3 * C], w[3 * C * C], bias[3 * C], out[B * T * 3 * C];
static float datt_scratch[B * NH * T * T], mean_[B * T], rstd_[B * T], att[B * NH * T * T], R[B * T * 3 * C];
static float dinp[B * T * 3 * C], dw[3 * C * C], dbias[3 * C], att_t[B * T * C];
static int tokens[B * T];

static void setup_common(size_t nin, size_t nout, uint64_t seed) {
    test_fill(inp, nin, 1.0f, seed);
    test_fill(R, nout, 1.0f, seed + 100);
    memset(dinp, 0, sizeof dinp);
    memset(dw, 0, sizeof dw);
    memset(dbias, 0, sizeof dbias);
    op_out = out;
    op_r = R;
    op_nout = nout;
}

static void fwd_layernorm(void) { layernorm_forward(out, mean_, rstd_, inp, w, bias, B * T, C, 1e-5f); }

static void test_layernorm(void **state) {
    (void)state;
    setup_common(B * T * C, B * T * C, 1);
    test_fill(w, C, 1.0f, 2);
    test_fill(bias, C, 1.0f, 3);
    op_forward = fwd_layernorm;
    fwd_layernorm();
    layernorm_backward(dinp, dw, dbias, R, inp, w, mean_, rstd_, B * T, C);
    check_grad("layernorm dinp", inp, dinp, B * T * C);
    check_grad("layernorm dweight", w, dw, C);
    check_grad("layernorm dbias", bias, dbias, C);
}

static void fwd_rmsnorm(void) { rmsnorm_forward(out, rstd_, inp, w, B * T, C, 1e-5f); }

static void test_rmsnorm(void **state) {
    (void)state;
    setup_common(B * T * C, B * T * C, 4);
    test_fill(w, C, 1.0f, 5);
    op_forward = fwd_rmsnorm;
    fwd_rmsnorm();
    rmsnorm_backward(dinp, dw, R, inp, w, rstd_, B * T, C);
    check_grad("rmsnorm dinp", inp, dinp, B * T * C);
    check_grad("rmsnorm dweight", w, dw, C);
}

static void fwd_matmul(void) { matmul_forward(out, inp, w, bias, B * T, C, OC, 0.0f); }

static void test_matmul(void **state) {
    (void)state;
    setup_common(B * T * C, B * T * OC, 6);
    test_fill(w, OC * C, 1.0f, 7);
    test_fill(bias, OC, 1.0f, 8);
    op_forward = fwd_matmul;
    fwd_matmul();
    matmul_backward(dinp, dw, dbias, R, inp, w, B * T, C, OC, 0.0f, NULL);
    check_grad("matmul dinp", inp, dinp, B * T * C);
    check_grad("matmul dweight", w, dw, OC * C);
    check_grad("matmul dbias", bias, dbias, OC);
}

static void test_matmul_beta(void **state) {
    /* beta = 1 adds to out; dinp_beta = 1 adds to dinp */
    (void)state;
    float base[B * T * OC], acc[B * T * OC], d1[B * T * C], d2[B * T * C];
    test_fill(inp, B * T * C, 1.0f, 9);
    test_fill(w, OC * C, 1.0f, 10);
    test_fill(base, B * T * OC, 1.0f, 11);
    memcpy(acc, base, sizeof acc);
    matmul_forward(out, inp, w, NULL, B * T, C, OC, 0.0f);
    matmul_forward(acc, inp, w, NULL, B * T, C, OC, 1.0f);
    for (int i = 0; i < B * T * OC; i++) assert_true(test_close(acc[i], base[i] + out[i], 1e-5, 1e-6));
    test_fill(d1, B * T * C, 1.0f, 12);
    memcpy(d2, d1, sizeof d2);
    memset(dw, 0, sizeof dw);
    matmul_backward(d2, dw, NULL, base, inp, w, B * T, C, OC, 1.0f, NULL);
    float only[B * T * C];
    matmul_backward(only, dw, NULL, base, inp, w, B * T, C, OC, 0.0f, NULL);
    for (int i = 0; i < B * T * C; i++) assert_true(test_close(d2[i], d1[i] + only[i], 1e-5, 1e-6));
}

static void fwd_attention(void) { attention_forward(out, att, inp, B, T, C, NH, att_t); }

static void test_attention(void **state) {
    (void)state;
    setup_common(B * T * 3 * C, B * T * C, 13);
    op_forward = fwd_attention;
    fwd_attention();
    attention_backward(dinp, datt_scratch, R, inp, att, B, T, C, NH, att_t);
    check_grad("attention dqkv", inp, dinp, B * T * 3 * C);
}

static void test_attention_causal(void **state) {
    /* changing a later token never changes an earlier output */
    (void)state;
    float before[B * T * C];
    test_fill(inp, B * T * 3 * C, 1.0f, 14);
    attention_forward(before, att, inp, B, T, C, NH, att_t);
    for (int i = 0; i < 3 * C; i++) inp[(T - 1) * 3 * C + i] += 1.0f; /* last token of batch 0 */
    attention_forward(out, att, inp, B, T, C, NH, att_t);
    for (int t = 0; t < T - 1; t++)
        for (int i = 0; i < C; i++) assert_true(out[t * C + i] == before[t * C + i]);
}

/* Past one block of rows (ops.c's ATT_BLOCK, 32): a head's scores, output
** and gradients against a plain double-precision loop over every pair, at a
** T of two whole blocks and part of a third. */
enum { LT = 70, LC = 8, LNH = 2, LHS = LC / LNH };
static float lqkv[LT * 3 * LC], lout[LT * LC], latt[LNH * LT * LT], ldatt[LNH * LT * LT];
static float ldout[LT * LC], ldqkv[LT * 3 * LC], latt_t[LT * LC];

static void test_attention_blocks(void **state) {
    (void)state;
    test_fill(lqkv, LT * 3 * LC, 1.0f, 31);
    test_fill(ldout, LT * LC, 1.0f, 32);
    memset(latt, 0xff, sizeof latt); /* NaN: what the forward does not write is never read */
    memset(ldatt, 0xff, sizeof ldatt);
    attention_forward(lout, latt, lqkv, 1, LT, LC, LNH, latt_t);
    attention_backward(ldqkv, ldatt, ldout, lqkv, latt, 1, LT, LC, LNH, latt_t);
    static double p[LT][LT], dp[LT][LT], dq[LT * 3 * LC];
    memset(dq, 0, sizeof dq);
    double scale = 1.0 / sqrt((double)LHS);
    for (int h = 0; h < LNH; h++) {
#define Q(t, i) ((double)lqkv[(t) * 3 * LC + h * LHS + (i)])
#define K(t, i) ((double)lqkv[(t) * 3 * LC + LC + h * LHS + (i)])
#define VV(t, i) ((double)lqkv[(t) * 3 * LC + 2 * LC + h * LHS + (i)])
        for (int t = 0; t < LT; t++) {
            double mx = -1e300, sum = 0.0;
            for (int u = 0; u <= t; u++) {
                double sc = 0.0;
                for (int i = 0; i < LHS; i++) sc += Q(t, i) * K(u, i);
                p[t][u] = sc * scale;
                if (p[t][u] > mx) mx = p[t][u];
            }
            for (int u = 0; u <= t; u++) sum += p[t][u] = exp(p[t][u] - mx);
            for (int u = 0; u <= t; u++) p[t][u] /= sum;
            for (int i = 0; i < LHS; i++) {
                double o = 0.0;
                for (int u = 0; u <= t; u++) o += p[t][u] * VV(u, i);
                assert_true(test_close(lout[t * LC + h * LHS + i], o, 1e-4, 1e-5));
            }
            for (int u = 0; u <= t; u++)
                assert_true(test_close(latt[((size_t)h * LT + t) * LT + u], p[t][u], 1e-4, 1e-6));
        }
        /* backward: dp = dout · v, dscore = p (dp - Σ p dp) scale */
        for (int t = 0; t < LT; t++) {
            double dot = 0.0;
            for (int u = 0; u <= t; u++) {
                dp[t][u] = 0.0;
                for (int i = 0; i < LHS; i++) dp[t][u] += ldout[t * LC + h * LHS + i] * VV(u, i);
                dot += p[t][u] * dp[t][u];
            }
            for (int u = 0; u <= t; u++) {
                double ds = p[t][u] * (dp[t][u] - dot) * scale;
                for (int i = 0; i < LHS; i++) {
                    dq[t * 3 * LC + h * LHS + i] += ds * K(u, i);
                    dq[u * 3 * LC + LC + h * LHS + i] += ds * Q(t, i);
                    dq[u * 3 * LC + 2 * LC + h * LHS + i] += p[t][u] * ldout[t * LC + h * LHS + i];
                }
            }
        }
#undef Q
#undef K
#undef VV
    }
    for (int i = 0; i < LT * 3 * LC; i++)
        if (!test_close(ldqkv[i], dq[i], 1e-4, 1e-5))
            fail_msg("dqkv[%d] (row %d): %.7g, reference %.7g", i, i / (3 * LC), (double)ldqkv[i], dq[i]);
}

static void fwd_gelu(void) { gelu_forward(out, inp, B * T * C); }
static void fwd_relu(void) { relu_forward(out, inp, B * T * C); }
static void fwd_swiglu(void) { swiglu_forward(out, inp, inp + B * T * C, B * T * C); }

static void test_activations(void **state) {
    (void)state;
    setup_common(B * T * C, B * T * C, 15);
    op_forward = fwd_gelu;
    fwd_gelu();
    gelu_backward(dinp, R, inp, B * T * C);
    check_grad("gelu", inp, dinp, B * T * C);

    setup_common(B * T * C, B * T * C, 16);
    for (int i = 0; i < B * T * C; i++) /* keep away from the kink at 0 */
        if (fabsf(inp[i]) < 0.05f) inp[i] = 0.5f;
    op_forward = fwd_relu;
    fwd_relu();
    relu_backward(dinp, R, inp, B * T * C);
    check_grad("relu", inp, dinp, B * T * C);

    setup_common(2 * B * T * C, B * T * C, 17);
    op_forward = fwd_swiglu;
    fwd_swiglu();
    swiglu_backward(dinp, dinp + B * T * C, R, inp, inp + B * T * C, B * T * C);
    check_grad("swiglu (gate and fc)", inp, dinp, 2 * B * T * C);
}

static float ce_losses[B * T], ce_probs[B * T * V];
static void fwd_ce(void) {
    crossentropy_forward(ce_losses, ce_probs, inp, tokens, B * T, V);
}

static void test_crossentropy(void **state) {
    (void)state;
    setup_common(B * T * V, B * T, 18);
    for (int i = 0; i < B * T; i++) {
        tokens[i] = i % V;
        R[i] = 1.0f / (B * T); /* L = mean loss */
    }
    op_out = ce_losses;
    op_forward = fwd_ce;
    float mean = crossentropy_forward(ce_losses, ce_probs, inp, tokens, B * T, V);
    double direct = 0.0;
    for (int i = 0; i < B * T; i++) {
        const float *l = inp + i * V;
        double s = 0.0;
        for (int v = 0; v < V; v++) s += exp(l[v]);
        direct += log(s) - l[tokens[i]];
    }
    assert_true(test_close(mean, direct / (B * T), 1e-5, 1e-6));
    crossentropy_backward(dinp, ce_probs, tokens, 1.0f / (B * T), B * T, V);
    check_grad("crossentropy dlogits", inp, dinp, B * T * V);
}

static float enc_wte[V * C], enc_wpe[T * C];
static void fwd_encoder(void) { encoder_forward(out, tokens, enc_wte, enc_wpe, B, T, C); }

static void test_encoder(void **state) {
    (void)state;
    setup_common(0, B * T * C, 19);
    test_fill(enc_wte, V * C, 1.0f, 20);
    test_fill(enc_wpe, T * C, 1.0f, 21);
    for (int i = 0; i < B * T; i++) tokens[i] = (i * 3) % V;
    float dwte[V * C] = {0}, dwpe[T * C] = {0};
    op_forward = fwd_encoder;
    fwd_encoder();
    encoder_backward(dwte, dwpe, R, tokens, B, T, C);
    check_grad("encoder dwte", enc_wte, dwte, V * C);
    check_grad("encoder dwpe", enc_wpe, dwpe, T * C);
}

/* ------------------------------------------------------------------------ */
/* the whole model                                                           */

static Model *gm;
static int g_in[2 * 6], g_tg[2 * 6];
static float g_loss_out;
static float g_one = 1.0f;
static void fwd_model(void) {
    char err[ML_ERRLEN];
    if (gm->training) model_seed_noise(gm, 5); /* the same router noise every forward */
    assert_int_equal(model_forward(gm, g_in, g_tg, 2, 6, err), 0);
    g_loss_out = gm->mean_loss + gm->aux_loss;
}

static ModelConfig small_config(NormKind norm, ActKind act, int tied) {
    ModelConfig c;
    config_defaults(&c);
    c.vocab = 11;
    c.context = 8;
    c.layers = 2;
    c.d_model = 8;
    c.heads = 2;
    c.ffn_hidden = 12;
    c.norm = norm;
    c.activation = act;
    c.tied = tied;
    c.init_std = 0.4f; /* large weights: gradients well above float noise */
    c.seed = 3;
    return c;
}

/* Biases and norm weights start at 0 and 1, token attention's Up at 0:
** randomised too, norm weights around 1. */
static void randomise_params(Model *m) {
    for (int i = 0; i < m->n_params; i++)
        if (m->params[i].ndim == 1 || strstr(m->params[i].name, "up.weight"))
            test_fill(m->param_mem + m->params[i].offset, m->params[i].numel, 0.5f, 30 + i);
    for (int i = 0; i < m->n_params; i++)
        if (strstr(m->params[i].name, "ln") && m->params[i].ndim == 1 &&
            strstr(m->params[i].name, "weight"))
            for (size_t j = 0; j < m->params[i].numel; j++) m->param_mem[m->params[i].offset + j] += 1.0f;
}

/* When set (".moe."), check_config checks only the tensors whose names hold
** it, and the ln_2 before each MoE layer (whose gradient is the layer's
** input gradient), and fewer entries of each: time saved where the rest of
** the model is checked already. */
static const char *g_only;

/* Checks every parameter tensor of a model of configuration c (sampled
** entries); MoE selections are frozen after the first forward. With router
** noise (c.moe.noise > 0) the model is in training and draws the same noise
** every forward (fwd_model). */
static void check_config(ModelConfig c, const char *label) {
    char err[ML_ERRLEN];
    assert_int_equal(model_create(&gm, &c, err), 0);
    gm->training = c.moe.noise > 0.0f;
    for (int i = 0; i < 12; i++) {
        g_in[i] = (i * 7 + 3) % c.vocab;
        g_tg[i] = (i * 5 + 1) % c.vocab;
    }
    randomise_params(gm);
    fwd_model();
    for (int l = 0; l < c.layers; l++) gm->moe[l].freeze = config_is_moe_block(&c, l);
    model_zero_grad(gm);
    assert_int_equal(model_backward(gm, err), 0);
    model_zero_grad(gm); /* the gradient arena exists now: a clean second pass */
    fwd_model();
    assert_int_equal(model_backward(gm, err), 0);
    op_forward = fwd_model;
    H_STEP = 1e-3;
    op_out = &g_loss_out;
    op_r = &g_one;
    op_nout = 1;
    for (int i = 0; i < gm->n_params; i++) {
        const ParamInfo *p = &gm->params[i];
        if (g_only && !strstr(p->name, g_only) && !strstr(p->name, "ln_2")) continue;
        char what[128];
        snprintf(what, sizeof what, "model(%s) %s", label, p->name);
        /* at most 24 entries per tensor (8 with g_only), spread over it */
        size_t most = g_only ? 8 : 24, stride = p->numel > most ? p->numel / most : 1;
        for (size_t j = 0; j < p->numel; j += stride)
            check_grad(what, gm->param_mem + p->offset + j, gm->grad_mem + p->offset + j, 1);
    }
    H_STEP = 1e-2;
    model_free(gm);
    gm = NULL;
}

static void test_model_layernorm_gelu(void **state) {
    (void)state;
    check_config(small_config(NORM_LAYERNORM, ACT_GELU, 0), "layernorm gelu");
}
static void test_model_rmsnorm_swiglu_tied(void **state) {
    (void)state;
    check_config(small_config(NORM_RMSNORM, ACT_SWIGLU, 1), "rmsnorm swiglu tied");
}
static void test_model_layernorm_relu_tied(void **state) {
    (void)state;
    check_config(small_config(NORM_LAYERNORM, ACT_RELU, 1), "layernorm relu tied");
}

/* An MoE model: every block an MoE layer of 4 experts of hidden 6. */
static ModelConfig moe_config(RouterKind kind) {
    ModelConfig c = small_config(NORM_LAYERNORM, ACT_GELU, 0);
    MoeConfig *m = &c.moe;
    m->enabled = 1;
    m->experts = 4;
    for (int e = 0; e < 4; e++) m->hidden[e] = 6;
    m->kind = kind;
    m->k = 2;
    m->p = 0.6f;
    m->sparsity_eps = 0.01f;
    return c;
}

static void test_moe_topk(void **state) {
    (void)state;
    check_config(moe_config(ROUTER_TOPK), "moe topk renormalised");
    ModelConfig c = moe_config(ROUTER_TOPK);
    c.moe.k = 1;
    c.moe.normalize = 0;
    check_config(c, "moe switch (k=1 raw)");
}

static void test_moe_threshold(void **state) {
    (void)state;
    check_config(moe_config(ROUTER_THRESHOLD), "moe threshold");
    check_config(moe_config(ROUTER_TOPP), "moe topp");
}

static void test_moe_expert_choice_hash(void **state) {
    (void)state;
    check_config(moe_config(ROUTER_EXPERT_CHOICE), "moe expert choice");
    check_config(moe_config(ROUTER_HASH), "moe hash");
}

static void test_moe_capacity_drops(void **state) {
    (void)state;
    ModelConfig c = moe_config(ROUTER_TOPK);
    c.moe.capacity_factor = 0.5f; /* C = ceil(0.5 · 12 · 2 / 4) = 3 of 6 on average */
    c.moe.min_capacity = 0;
    check_config(c, "moe capacity 0.5");
    /* and drops really happened */
    char err[ML_ERRLEN];
    Model *m;
    assert_int_equal(model_create(&m, &c, err), 0);
    assert_int_equal(model_forward(m, g_in, g_tg, 2, 6, err), 0);
    int dropped = 0, kept = 0;
    for (int e = 0; e < 4; e++) {
        dropped += m->moe[0].tc.dropped[e];
        kept += m->moe[0].tc.counts[e];
        assert_true(m->moe[0].tc.counts[e] <= 3);
    }
    assert_true(dropped > 0);
    assert_int_equal(kept + dropped, 12 * 2);
    model_free(m);
}

static void test_moe_aux_losses(void **state) {
    (void)state;
    const char *names[] = {"balance", "z", "cv2", "p_penalty", "entropy", "p_penalty topp"};
    for (int k = 0; k < 6; k++) {
        ModelConfig c = moe_config(k == 5 ? ROUTER_TOPP : ROUTER_TOPK);
        float *coef[] = {&c.moe.aux_balance, &c.moe.aux_z,       &c.moe.aux_cv2,
                         &c.moe.aux_p_penalty, &c.moe.aux_entropy, &c.moe.aux_p_penalty};
        *coef[k] = 1.0f;
        if (k == 3 || k == 5) /* heterogeneous experts, so the penalty differs from balance */
            for (int e = 0; e < 4; e++) c.moe.hidden[e] = 3 + 2 * e;
        char label[64];
        snprintf(label, sizeof label, "moe aux %s", names[k]);
        check_config(c, label);
    }
}

static void test_moe_heterogeneous_swiglu(void **state) {
    (void)state;
    ModelConfig c = moe_config(ROUTER_THRESHOLD);
    c.activation = ACT_SWIGLU;
    c.moe.every = 2;
    for (int e = 0; e < 4; e++) c.moe.hidden[e] = 2 + 3 * e;
    c.moe.hidden_list = 1;
    check_config(c, "hmoe swiglu every 2");
}

/* Stratified layers (strata {2, 2}): every pass's router, norm and experts,
** the second choice the next largest p or Gumbel-sampled, with and without
** capacity, layer norm and RMS norm; some tokens make two passes. */
static void test_moe_stratified(void **state) {
    (void)state;
    for (int v = 0; v < 4; v++) {
        ModelConfig c = moe_config(ROUTER_STRATIFIED);
        c.moe.n_strata = 2;
        c.moe.strata[0] = c.moe.strata[1] = 2;
        c.moe.second_sample = v == 1;
        c.moe.aux_balance = v == 2 ? 1.0f : 0.0f;
        if (v == 2) { /* C = max(ceil(0.75 · n · 2 / E_s), 0) per pass: drops */
            c.moe.capacity_factor = 0.75f;
            c.moe.min_capacity = 0;
        }
        if (v == 3) {
            c.norm = NORM_RMSNORM;
            c.activation = ACT_SWIGLU;
            for (int e = 0; e < 4; e++) c.moe.hidden[e] = 3 + e;
        }
        const char *labels[] = {"stratified", "stratified sampled", "stratified capacity balance",
                                "stratified rmsnorm swiglu hmoe"};
        check_config(c, labels[v]);
        /* two passes for some tokens, one for others */
        char err[ML_ERRLEN];
        Model *m;
        assert_int_equal(model_create(&m, &c, err), 0);
        assert_int_equal(model_forward(m, g_in, g_tg, 2, 6, err), 0);
        int one = 0, two = 0;
        for (int t = 0; t < 12; t++) {
            int p = moe_trace_token(&m->moe[0], &c.moe, c.activation, t).passes;
            one += p == 1;
            two += p == 2;
        }
        if (!(one > 0 && two > 0)) fail_msg("%s: %d tokens with one pass, %d with two", labels[v], one, two);
        model_free(m);
    }
}

/* Merged layers (MEO): both gates, the merges, the means over the windows,
** with whole-sequence and causal segments, k = 1 and 2, token attention. */
static void test_moe_merge(void **state) {
    (void)state;
    for (int v = 0; v < 4; v++) {
        ModelConfig c = moe_config(ROUTER_MERGE);
        c.moe.k = v == 1 ? 1 : 2;
        c.moe.segment = v == 0 ? 0 : 2;
        c.moe.token_attention = v >= 2 ? 2 : 0;
        if (v == 3) c.activation = ACT_RELU;
        char label[64];
        snprintf(label, sizeof label, "merge k %d segment %d r %d%s", c.moe.k, c.moe.segment,
                 c.moe.token_attention, v == 3 ? " relu" : "");
        check_config(c, label);
    }
}

/* Moefied layers: every expert at weight 1, experts' fc biases and the
** layer's proj bias. */
static void test_moe_all_with_biases(void **state) {
    (void)state;
    ModelConfig c = moe_config(ROUTER_ALL);
    c.moe.bias = 1;
    check_config(c, "moe all with biases");
    c.activation = ACT_SWIGLU;
    check_config(c, "moe all with biases swiglu");
    /* the similarity router: chosen experts at weight 1 (no gradient to it) */
    c = moe_config(ROUTER_SIMILARITY);
    c.moe.bias = 1;
    c.moe.k = 2;
    check_config(c, "moe similarity top-2 with biases");
    c.moe.select_threshold = 1;
    c.moe.p = 0.5f;
    check_config(c, "moe similarity threshold with biases");
    c.moe.kind = ROUTER_LEARNED;
    check_config(c, "moe learned threshold with biases");
}

/* ------------------------------------------------------------------------ */
/* router and expert options not covered above                              */

/* One MoE layer as an op (block 0's, with the model's weights): L = Σ out ⊙ R
** + the layer's weighted auxiliary loss, out = out0 + MoE(x), so the
** gradients are of order one, where the whole model's are often below
** check_grad's absolute tolerance. Checks dx, d out0 (a stratified layer's
** later passes normalise out0 too) and every tensor of the layer. The
** selection is frozen after the first forward, as in check_config. */
enum { LN = 12 };
static Model *lm;
static float lay_x[LN * 8], lay_out0[LN * 8], lay_out[LN * 8], lay_r[LN * 8], lay_noise[LN * 8];
static float lay_loss;
static double lay_base; /* L at the start: lay_loss is L less it, so that the float
                        ** op_loss reads keeps the digits of the differences */
static void fwd_layer(void) {
    char err[ML_ERRLEN];
    const ModelConfig *c = &lm->config;
    memcpy(lay_out, lay_out0, sizeof lay_out);
    assert_int_equal(moe_layer_forward(&lm->moe[0], c, lm->w.blocks[0].moe, lm->hash_map, lay_out, lay_x,
                                       g_in, c->moe.noise > 0.0f ? lay_noise : NULL, 2, 6, 7, err),
                     0);
    double sum = lm->moe[0].aux_weighted;
    for (int i = 0; i < LN * 8; i++) sum += (double)lay_out[i] * lay_r[i];
    lay_loss = (float)(sum - lay_base);
}

static void check_layer(ModelConfig c, const char *label) {
    char err[ML_ERRLEN];
    assert_int_equal(c.d_model, 8);
    assert_int_equal(model_create(&lm, &c, err), 0);
    randomise_params(lm);
    gm = lm; /* fwd_model, for the gradient arena */
    fwd_model();
    assert_int_equal(model_backward(lm, err), 0);
    gm = NULL;
    test_fill(lay_x, LN * 8, 1.0f, 50);
    test_fill(lay_out0, LN * 8, 1.0f, 51);
    test_fill(lay_r, LN * 8, 1.0f, 52);
    test_fill(lay_noise, LN * 8, 1.0f, 53);
    MoeLayer *l = &lm->moe[0];
    l->freeze = 0;
    fwd_layer();
    l->freeze = 1;
    lay_base = 0.0;
    fwd_layer();
    lay_base = lay_loss;
    model_zero_grad(lm);
    float dx[LN * 8], dout[LN * 8];
    memcpy(dout, lay_r, sizeof dout);
    assert_int_equal(moe_layer_backward(l, &lm->moe_scratch, &lm->config, lm->w.blocks[0].moe,
                                        lm->g.blocks[0].moe, dx, dout, lay_x, 1.0f, NULL, err),
                     0);
    if (c.moe.capacity_factor > 0.0f && c.moe.kind != ROUTER_EXPERT_CHOICE &&
        c.moe.kind != ROUTER_STRATIFIED) { /* drops happened */
        int dropped = 0;
        for (int e = 0; e < c.moe.experts; e++) dropped += l->tc.dropped[e];
        if (dropped == 0) fail_msg("layer(%s): nothing dropped", label);
    }
    op_forward = fwd_layer;
    op_out = &lay_loss;
    op_r = &g_one;
    op_nout = 1;
    H_STEP = 1e-3;
    char what[128];
    snprintf(what, sizeof what, "layer(%s) dx", label);
    check_grad(what, lay_x, dx, LN * 8);
    snprintf(what, sizeof what, "layer(%s) dout0", label);
    check_grad(what, lay_out0, dout, LN * 8);
    for (int i = 0; i < lm->n_params; i++) {
        const ParamInfo *p = &lm->params[i];
        if (strncmp(p->name, "h.0.moe.", 8) != 0) continue;
        snprintf(what, sizeof what, "layer(%s) %s", label, p->name);
        size_t stride = p->numel > 24 ? p->numel / 24 : 1;
        for (size_t j = 0; j < p->numel; j += stride)
            check_grad(what, lm->param_mem + p->offset + j, lm->grad_mem + p->offset + j, 1);
    }
    H_STEP = 1e-2;
    model_free(lm);
    lm = NULL;
}

/* Every router and option, as layers: top-k k = 1, 2, 3 renormalised or
** raw; router noise; capacity with drops for each token-choice router and
** expert choice's own; threshold and top-p capped by max_k (p = 0.9 keeps
** 3 or 4 of 4 experts uncapped, so the cap of 2 binds); HMoE with SwiGLU;
** the learned router (weights 1: a gradient from an auxiliary loss alone);
** each auxiliary loss alone; three strata (tokens make one to three
** passes) with a sampled second choice, capacity and each auxiliary loss;
** merged layers. Selections and drops are piecewise constant: check_layer
** freezes them after the first forward, so the finite differences see the
** smooth function of a fixed selection, whose gradient is what backward
** computes; merged layers are not frozen and rely on their gate logits
** being further apart than h (1e-3). */
static void test_moe_layers(void **state) {
    (void)state;
    ModelConfig c = moe_config(ROUTER_TOPK);
    check_layer(c, "topk k=2");
    c.moe.normalize = 0;
    check_layer(c, "topk k=2 raw");
    c.moe.k = 3;
    c.moe.normalize = 1;
    check_layer(c, "topk k=3");
    c.moe.k = 1; /* weight 1 whatever p: no gradient to the router */
    check_layer(c, "topk k=1 renormalised");
    c.moe.normalize = 0;
    c.moe.noise = 1.0f;
    check_layer(c, "topk k=1 raw noise");

    RouterKind kinds[] = {ROUTER_TOPK, ROUTER_TOPK, ROUTER_THRESHOLD, ROUTER_TOPP, ROUTER_HASH,
                          ROUTER_EXPERT_CHOICE};
    const char *capacity_labels[] = {"topk capacity 0.5", "topk k=1 raw capacity 0.5",
                                     "threshold capacity 0.5", "topp capacity 0.5",
                                     "hash capacity 0.5", "expert choice capacity 1.5"};
    for (int v = 0; v < 6; v++) {
        c = moe_config(kinds[v]);
        c.moe.capacity_factor = kinds[v] == ROUTER_EXPERT_CHOICE ? 1.5f : 0.5f;
        c.moe.min_capacity = 0;
        if (v == 1) {
            c.moe.k = 1;
            c.moe.normalize = 0;
        }
        check_layer(c, capacity_labels[v]);
    }
    check_layer(moe_config(ROUTER_EXPERT_CHOICE), "expert choice");

    for (int v = 0; v < 2; v++) {
        c = moe_config(v ? ROUTER_TOPP : ROUTER_THRESHOLD);
        c.moe.max_k = 2;
        c.moe.p = 0.9f;
        c.moe.noise = (float)v;
        check_layer(c, v ? "topp max_k 2 noise" : "threshold max_k 2");
    }
    c = moe_config(ROUTER_TOPP);
    c.activation = ACT_SWIGLU;
    for (int e = 0; e < 4; e++) c.moe.hidden[e] = 3 + e;
    check_layer(c, "topp hmoe swiglu");
    c = moe_config(ROUTER_HASH);
    c.activation = ACT_RELU;
    check_layer(c, "hash relu");
    c = moe_config(ROUTER_LEARNED);
    c.moe.bias = 1;
    c.moe.aux_balance = 1.0f;
    check_layer(c, "learned top-2 biases balance");

    const char *aux_labels[] = {"balance", "z", "cv2", "p_penalty", "entropy"};
    for (int k = 0; k < AUX_KINDS; k++) { /* each alone; heterogeneous for p_penalty */
        for (int v = 0; v < 2; v++) {
            c = moe_config(v ? ROUTER_STRATIFIED : k == AUX_ENTROPY ? ROUTER_TOPP : ROUTER_TOPK);
            if (v) {
                c.moe.experts = 6;
                c.moe.n_strata = 3;
                c.moe.strata[0] = c.moe.strata[1] = c.moe.strata[2] = 2;
            }
            for (int e = 0; e < c.moe.experts; e++) c.moe.hidden[e] = 3 + e;
            float *coef[] = {&c.moe.aux_balance, &c.moe.aux_z, &c.moe.aux_cv2, &c.moe.aux_p_penalty,
                             &c.moe.aux_entropy};
            *coef[k] = 1.0f;
            char label[64];
            snprintf(label, sizeof label, "%s aux %s", v ? "stratified x3" : config_router_name(c.moe.kind),
                     aux_labels[k]);
            check_layer(c, label);
        }
    }
    for (int v = 0; v < 2; v++) {
        c = moe_config(ROUTER_STRATIFIED);
        c.moe.experts = 6;
        c.moe.n_strata = 3;
        for (int e = 0; e < 6; e++) c.moe.hidden[e] = 6;
        c.moe.strata[0] = c.moe.strata[1] = c.moe.strata[2] = 2;
        c.moe.second_sample = v;
        if (v) {
            c.moe.capacity_factor = 0.75f;
            c.moe.min_capacity = 0;
        }
        check_layer(c, v ? "stratified x3 sampled capacity" : "stratified x3");
    }
    c = moe_config(ROUTER_MERGE);
    c.moe.segment = 4; /* T = 6: the last segment short */
    c.moe.token_attention = 2;
    check_layer(c, "merge segment 4 r 2");
    c.moe.segment = 0;
    c.moe.token_attention = 0;
    check_layer(c, "merge whole sequence");
}

/* In the whole model (only the MoE layers' tensors and the ln_2 before
** them: g_only): router noise, which the model draws in training, held
** fixed by fwd_model; and three strata, whose later passes add to the
** residual's gradient through their norms. */
static void test_moe_model_noise_strata(void **state) {
    (void)state;
    g_only = ".moe.";
    ModelConfig c = moe_config(ROUTER_TOPK);
    c.moe.noise = 1.0f;
    c.moe.aux_z = 1.0f;
    check_config(c, "moe topk noise z");
    c = moe_config(ROUTER_STRATIFIED);
    c.moe.experts = 6;
    c.moe.n_strata = 3;
    for (int e = 0; e < 6; e++) c.moe.hidden[e] = 6;
    c.moe.strata[0] = c.moe.strata[1] = c.moe.strata[2] = 2;
    check_config(c, "stratified x3");
    g_only = NULL;
    char err[ML_ERRLEN];
    Model *m;
    assert_int_equal(model_create(&m, &c, err), 0);
    assert_int_equal(model_forward(m, g_in, g_tg, 2, 6, err), 0);
    int three = 0;
    for (int l = 0; l < 2; l++)
        for (int t = 0; t < 12; t++) three += moe_trace_token(&m->moe[l], &c.moe, c.activation, t).passes == 3;
    if (three == 0) fail_msg("stratified x3: no token made three passes");
    model_free(m);
}

/* A learned router's fit (moelab.fit_router): the cross-entropy of
** softmax(x · Wᵀ) against activation-mass shares q, and its gradient in W. */
enum { FN = 10, FC = 8, FE = 4 };
static float fit_x[FN * FC], fit_w[FE * FC], fit_q[FN * FE], fit_p[FN * FE], fit_loss;
static MoeConfig fit_mc;
static void fwd_fit(void) {
    double recall = 0.0;
    float grad[FE * FC];
    fit_loss = (float)moe_router_fit_loss(grad, fit_p, fit_x, fit_w, fit_q, &fit_mc, FN, FC, FE, &recall);
}

static void test_router_fit(void **state) {
    (void)state;
    test_fill(fit_x, FN * FC, 1.0f, 40);
    test_fill(fit_w, FE * FC, 1.0f, 41);
    test_fill(fit_q, FN * FE, 1.0f, 42);
    for (int t = 0; t < FN; t++) { /* shares: >= 0, summing to 1, one of them 0 */
        float *q = fit_q + t * FE, sum = 0.0f;
        for (int e = 0; e < FE; e++) sum += q[e] = e == t % FE ? 0.0f : fabsf(q[e]) + 0.1f;
        for (int e = 0; e < FE; e++) q[e] /= sum;
    }
    ModelConfig c = moe_config(ROUTER_LEARNED);
    fit_mc = c.moe;
    float grad[FE * FC];
    double recall = 0.0;
    moe_router_fit_loss(grad, fit_p, fit_x, fit_w, fit_q, &fit_mc, FN, FC, FE, &recall);
    assert_true(recall > 0.0 && recall <= 1.0 + 1e-6);
    op_forward = fwd_fit;
    op_out = &fit_loss;
    op_r = &g_one;
    op_nout = 1;
    H_STEP = 1e-3;
    check_grad("router fit dW", fit_w, grad, FE * FC);
    H_STEP = 1e-2;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layernorm),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_beta),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attention_causal),
        cmocka_unit_test(test_attention_blocks),
        cmocka_unit_test(test_activations),
        cmocka_unit_test(test_crossentropy),
        cmocka_unit_test(test_encoder),
        cmocka_unit_test(test_model_layernorm_gelu),
        cmocka_unit_test(test_model_rmsnorm_swiglu_tied),
        cmocka_unit_test(test_model_layernorm_relu_tied),
        cmocka_unit_test(test_moe_topk),
        cmocka_unit_test(test_moe_threshold),
        cmocka_unit_test(test_moe_expert_choice_hash),
        cmocka_unit_test(test_moe_capacity_drops),
        cmocka_unit_test(test_moe_aux_losses),
        cmocka_unit_test(test_moe_heterogeneous_swiglu),
        cmocka_unit_test(test_moe_stratified),
        cmocka_unit_test(test_moe_merge),
        cmocka_unit_test(test_moe_all_with_biases),
        cmocka_unit_test(test_moe_layers),
        cmocka_unit_test(test_moe_model_noise_strata),
        cmocka_unit_test(test_router_fit),
    };
    return cmocka_run_group_tests_name("gradients", tests, NULL, NULL);
}
