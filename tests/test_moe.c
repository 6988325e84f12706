/*
** test_moe.c — the MoE layer beyond its gradients: the selection rules on
** hand-made probabilities, capacity priority, FLOPs accounting, checkpoints
** with MoE names, expert_load against the forward's own counts, and recorded
** routing that reproduces the forward pass when re-run.
*/
#include "testmodel.h"

#include <sqlite3.h>
#include <unistd.h>

#include "checkpoint.h"
#include "data.h"
#include "model.h"
#include "recorder.h"
#include "moe/router.h"
#include "trainer.h"

static void test_threshold_rule(void **state) {
    (void)state;
    int ex[8];
    float w[8];
    const float p[4] = {0.15f, 0.5f, 0.05f, 0.3f}; /* sorted: 1 (.5), 3 (.3), 0 (.15), 2 (.05) */
    /* t = 0.7: rank 1 has 0.5 before it (< 0.7): kept; rank 2 has 0.8: stop */
    assert_int_equal(router_select_threshold(p, 4, 0.7f, 0, 0, ex, w), 2);
    assert_int_equal(ex[0], 1);
    assert_int_equal(ex[1], 3);
    assert_true(w[0] == 0.5f && w[1] == 0.3f); /* raw p, not renormalised */
    /* the mass before rank 2 is 0.8 (in float, 0.5f + 0.3f): not < 0.8 */
    assert_int_equal(router_select_threshold(p, 4, 0.5f + 0.3f, 0, 0, ex, w), 2);
    assert_int_equal(router_select_threshold(p, 4, 0.81f, 0, 0, ex, w), 3);
    assert_int_equal(ex[2], 0);
    /* t = 1: every expert (the mass before the last is 0.95 < 1) */
    assert_int_equal(router_select_threshold(p, 4, 1.0f, 0, 0, ex, w), 4);
    /* max_k caps it */
    assert_int_equal(router_select_threshold(p, 4, 1.0f, 2, 0, ex, w), 2);
    /* rank 0 is always kept, even when its own mass exceeds t */
    const float dominant[4] = {0.01f, 0.01f, 0.97f, 0.01f};
    assert_int_equal(router_select_threshold(dominant, 4, 0.1f, 0, 0, ex, w), 1);
    assert_int_equal(ex[0], 2);
    assert_int_equal(router_select_threshold(dominant, 4, 0.9f, 0, 0, ex, w), 1);
    /* ties go to the lower expert index, in rank order */
    const float flat[4] = {0.25f, 0.25f, 0.25f, 0.25f};
    assert_int_equal(router_select_threshold(flat, 4, 0.5f, 0, 0, ex, w), 2);
    assert_int_equal(ex[0], 0);
    assert_int_equal(ex[1], 1);
    assert_int_equal(router_select_threshold(flat, 4, 0.6f, 0, 0, ex, w), 3);
    /* the topp alias: same experts, weights renormalised */
    assert_int_equal(router_select_threshold(p, 4, 0.7f, 0, 1, ex, w), 2);
    assert_true(test_close(w[0], 0.5 / 0.8, 1e-6, 0) && test_close(w[1], 0.3 / 0.8, 1e-6, 0));
}

static void test_topk_rule(void **state) {
    (void)state;
    int ex[4];
    float w[4];
    const float p[4] = {0.1f, 0.4f, 0.1f, 0.4f};
    assert_int_equal(router_select_topk(p, 4, 2, 1, ex, w), 2);
    assert_int_equal(ex[0], 1); /* tie: lower index first */
    assert_int_equal(ex[1], 3);
    assert_true(test_close(w[0], 0.5, 1e-6, 0) && test_close(w[1], 0.5, 1e-6, 0));
    assert_int_equal(router_select_topk(p, 4, 1, 0, ex, w), 1); /* Switch: k = 1, raw */
    assert_true(w[0] == 0.4f);
    assert_int_equal(router_select_topk(p, 4, 3, 0, ex, w), 3);
    assert_int_equal(ex[2], 0);
}

static void test_capacity_priority(void **state) {
    /* 3 tokens, 2 experts, k = 2, capacity 1 per expert.
    ** token 0: first expert 1 (p .9), second expert 0 (p .1)
    ** token 1: first expert 0 (p .6), second expert 1 (p .4)
    ** token 2: first expert 0 (p .7), second expert 1 (p .3)
    ** rank 0 first, by p: token 0 → e1 kept, token 2 → e0 kept, token 1 → e0 dropped;
    ** then rank 1: every second choice finds its expert full. */
    (void)state;
    const int sel[6] = {1, 0, 0, 1, 0, 1};
    const float ps[6] = {0.9f, 0.1f, 0.6f, 0.4f, 0.7f, 0.3f};
    const int count[3] = {2, 2, 2};
    int kept[6], dropped[2], order[3];
    router_apply_capacity(sel, ps, count, 3, 2, 2, 1, kept, dropped, order);
    const int want[6] = {1, 0, 0, 0, 1, 0};
    for (int i = 0; i < 6; i++) assert_int_equal(kept[i], want[i]);
    assert_int_equal(dropped[0], 2);
    assert_int_equal(dropped[1], 2);
}

static void test_expert_choice_rule(void **state) {
    (void)state;
    /* 3 tokens, 2 experts, each expert takes 1 token */
    const float probs[6] = {0.8f, 0.2f, 0.6f, 0.4f, 0.3f, 0.7f};
    int ex[6], count[3], order[3];
    float w[6];
    router_select_expert_choice(probs, 3, 2, 1, ex, w, count, order);
    assert_int_equal(count[0], 1); /* expert 0 takes token 0 (0.8) */
    assert_int_equal(ex[0], 0);
    assert_int_equal(count[1], 0); /* token 1 gets nothing */
    assert_int_equal(count[2], 1); /* expert 1 takes token 2 (0.7) */
    assert_int_equal(ex[4], 1);
    assert_true(w[4] == 0.7f);
}

static ModelConfig moe_model(RouterKind kind) {
    ModelConfig c;
    config_defaults(&c);
    c.context = 16;
    c.layers = 2;
    c.d_model = 16;
    c.heads = 2;
    c.ffn_hidden = 32;
    c.moe.enabled = 1;
    c.moe.experts = 4;
    for (int e = 0; e < 4; e++) c.moe.hidden[e] = 8 + 4 * e;
    c.moe.hidden_list = 1;
    c.moe.kind = kind;
    c.moe.k = 2;
    c.moe.p = 0.7f;
    c.moe.sparsity_eps = 0.01f;
    return c;
}

static void test_capacity_formula(void **state) {
    /* C = max(ceil(cf · T · k / E), min_capacity), exactly: 1.1 · 2560 · 2 / 8 = 704 */
    (void)state;
    ModelConfig c = moe_model(ROUTER_TOPK);
    c.context = 128;
    c.layers = 1;
    c.moe.experts = 8;
    for (int e = 0; e < 8; e++) c.moe.hidden[e] = 4;
    c.moe.capacity_factor = 1.1f;
    c.moe.min_capacity = 0;
    Model *m;
    char err[ML_ERRLEN];
    assert_int_equal(model_create(&m, &c, err), 0);
    int *in = malloc(sizeof(int) * 2560);
    for (int i = 0; i < 2560; i++) in[i] = (i * 31) % 256;
    assert_int_equal(model_forward(m, in, in, 20, 128, err), 0);
    assert_int_equal(m->moe[0].tc.capacity, 704);
    c.moe.min_capacity = 800; /* the floor wins */
    model_free(m);
    assert_int_equal(model_create(&m, &c, err), 0);
    assert_int_equal(model_forward(m, in, in, 20, 128, err), 0);
    assert_int_equal(m->moe[0].tc.capacity, 800);
    free(in);
    model_free(m);
}

static void test_flops_accounting(void **state) {
    (void)state;
    ModelConfig c = moe_model(ROUTER_TOPK);
    c.moe.every = 2; /* one MoE layer (block 1) */
    Model *m;
    char err[ML_ERRLEN];
    assert_int_equal(model_create(&m, &c, err), 0);
    int in[2 * 16], tg[2 * 16];
    for (int i = 0; i < 32; i++) in[i] = tg[i] = (i * 37) % 256;
    assert_int_equal(model_forward(m, in, tg, 2, 16, err), 0);
    const MoeState *s = &m->moe[1].tc;
    double want = 2.0 * 32 * 16 * 4; /* the router */
    for (int e = 0; e < 4; e++) want += 2.0 * 2 * s->counts[e] * 16 * c.moe.hidden[e];
    assert_true(s->flops == want);
    assert_true(m->moe_flops == want);
    double per_token = 0.0;
    for (int t = 0; t < 32; t++) per_token += moe_trace_token(&m->moe[1], &c.moe, c.activation, t).flops;
    assert_true(test_close(per_token, want, 1e-12, 0));
    int total = 0;
    for (int e = 0; e < 4; e++) total += s->counts[e];
    assert_int_equal(total, 64); /* dropless top-2 */
    model_free(m);
}

static void test_moe_checkpoint(void **state) {
    (void)state;
    RouterKind kinds[] = {ROUTER_TOPK, ROUTER_HASH};
    for (int k = 0; k < 2; k++) {
        ModelConfig c = moe_model(kinds[k]);
        c.activation = ACT_SWIGLU;
        Model *m;
        char err[ML_ERRLEN];
        assert_int_equal(model_create(&m, &c, err), 0);
        test_fill(m->param_mem, m->num_parameters, 0.3f, 5);
        int i = model_find_param(m, "h.1.moe.experts.3.fc.weight");
        assert_true(i >= 0);
        assert_int_equal(m->params[i].shape[0], 20);
        assert_int_equal(m->params[i].shape[1], 16);
        i = model_find_param(m, "h.0.moe.experts.2.proj.weight");
        assert_int_equal(m->params[i].shape[0], 16);
        assert_int_equal(m->params[i].shape[1], 16);
        assert_true(model_find_param(m, "h.0.moe.experts.0.gate.weight") >= 0);
        assert_int_equal(model_find_param(m, "h.0.mlp.fc.weight"), -1);
        assert_int_equal(model_find_param(m, "h.0.moe.router.weight") >= 0, kinds[k] != ROUTER_HASH);
        test_save_load_same(m, "And God said, Let");
        model_free(m);
    }
}

/* A hash model's token map is stored: a map that is not the seed's routes the
** same after loading; a map naming no expert is refused. */
static void test_hash_map_stored(void **state) {
    (void)state;
    ModelConfig c = moe_model(ROUTER_HASH);
    Model *m, *back;
    char err[ML_ERRLEN], dir[] = "/tmp/moelab_hash_XXXXXX", path[256];
    assert_int_equal(model_create(&m, &c, err), 0);
    int V = c.vocab, changed = 0;
    for (int l = 0; l < c.layers; l++)
        for (int v = 0; v < V; v++) {
            int e = (v * 7 + l) % c.moe.experts;
            changed += m->hash_map[l * V + v] != e;
            m->hash_map[l * V + v] = e;
        }
    assert_true(changed > 0);
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/h.safetensors", dir);
    if (checkpoint_save(m, path, err) != 0) fail_msg("%s", err);
    if (checkpoint_load(&back, path, 0, err) != 0) fail_msg("%s", err);
    assert_memory_equal(back->hash_map, m->hash_map, sizeof(int) * c.layers * V);
    int tokens[17];
    for (int i = 0; i < 17; i++) tokens[i] = "And God said, Let"[i];
    float a, b;
    assert_int_equal(model_sequence_loss(m, tokens, 17, &a, err), 0);
    assert_int_equal(model_sequence_loss(back, tokens, 17, &b, err), 0);
    assert_true(a == b);
    model_free(back);
    /* expert 4 of 4 experts: refused, naming the tensor */
    m->hash_map[V + 3] = c.moe.experts;
    if (checkpoint_save(m, path, err) != 0) fail_msg("%s", err);
    assert_int_equal(checkpoint_load(&back, path, 0, err), -1);
    assert_null(back);
    assert_non_null(strstr(err, "'h.1.moe.hash_map' maps token 3 to 4"));
    model_free(m);
    unlink(path);
    rmdir(dir);
}

/* HMoE's parameter penalty E · Σ_i M_i P_i, M_i the share of tokens whose
** selected set holds i times H_i / mean(H), P_i the mean p_i: the balance
** loss for equal sizes and k = 1; and the entropy, the mean of -Σ p log p. */
static void test_penalty_and_entropy(void **state) {
    (void)state;
    char err[ML_ERRLEN];
    for (int hetero = 0; hetero <= 1; hetero++) {
        ModelConfig c = moe_model(ROUTER_TOPP);
        c.moe.p = 0.5f;
        if (!hetero) {
            c.moe.kind = ROUTER_TOPK;
            c.moe.k = 1;
            for (int e = 0; e < c.moe.experts; e++) c.moe.hidden[e] = 16;
        }
        Model *m;
        assert_int_equal(model_create(&m, &c, err), 0);
        int N = 2 * c.context, in[2 * 64], tg[2 * 64];
        assert_true(N <= 128);
        for (int t = 0; t < N; t++) in[t] = tg[t] = (t * 29 + 7) % 256;
        assert_int_equal(model_forward(m, in, tg, 2, c.context, err), 0);
        const MoeState *s = &m->moe[0].tc;
        int E = c.moe.experts;
        double hmean = 0, M[MOE_MAX_EXPERTS] = {0}, P[MOE_MAX_EXPERTS] = {0}, H = 0;
        for (int e = 0; e < E; e++) hmean += c.moe.hidden[e] / (double)E;
        int more_than_one = 0;
        for (int t = 0; t < N; t++) {
            const float *p = s->probs + (size_t)t * E;
            for (int i = 0; i < s->sel_count[t]; i++) M[s->sel_expert[t * s->slots + i]] += 1.0 / N;
            more_than_one += s->sel_count[t] > 1;
            for (int e = 0; e < E; e++) {
                P[e] += p[e] / N;
                H -= p[e] * log(p[e]) / N;
            }
        }
        double penalty = 0;
        for (int e = 0; e < E; e++) penalty += E * M[e] * (c.moe.hidden[e] / hmean) * P[e];
        assert_true(test_close(s->aux[AUX_P_PENALTY], penalty, 1e-5, 0));
        assert_true(test_close(s->aux[AUX_ENTROPY], H, 1e-5, 0));
        if (hetero) assert_true(more_than_one > 0);
        else assert_true(test_close(s->aux[AUX_P_PENALTY], s->aux[AUX_BALANCE], 1e-6, 0));
        model_free(m);
    }
}

/* A configuration stores only the keys its router reads (threshold: no k or
** normalize unless capacity makes k capacity's k); a checkpoint written with
** every key, as before, still loads, while a user's table with them fails. */
static void test_router_keys_stored(void **state) {
    (void)state;
    static const struct { const char *router, *has[4], *lacks[4]; } cases[] = {
        {"{\"kind\":\"threshold\",\"p\":0.8}", {"\"p\":", "\"max_k\":", "\"noise\":"},
         {"\"k\":", "\"normalize\":", "\"min_capacity\":"}},
        {"{\"kind\":\"threshold\",\"p\":0.8,\"capacity_factor\":1.5,\"k\":3}",
         {"\"k\":3", "\"min_capacity\":4", "\"capacity_factor\":1.5"}, {"\"normalize\":"}},
        {"{\"kind\":\"topk\",\"k\":1,\"normalize\":false}", {"\"k\":1", "\"normalize\":false"},
         {"\"p\":", "\"max_k\":", "\"min_capacity\":"}},
        {"{\"kind\":\"hash\"}", {"\"capacity_factor\":0"}, {"\"k\":", "\"p\":", "\"noise\":"}},
        {"{\"kind\":\"expert_choice\",\"k\":2}", {"\"k\":2"}, {"\"min_capacity\":", "\"normalize\":"}},
    };
    char err[ML_ERRLEN], json[512];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(json, sizeof json, "{\"layers\":1,\"moe\":{\"experts\":4,\"router\":%s}}",
                 cases[i].router);
        ModelConfig c;
        config_defaults(&c);
        if (config_from_json(&c, json, strlen(json), err) != 0) fail_msg("%s: %s", json, err);
        char *out = config_to_json(&c);
        assert_non_null(out);
        for (int j = 0; j < 4 && cases[i].has[j]; j++)
            if (!strstr(out, cases[i].has[j])) fail_msg("%s lacks %s", out, cases[i].has[j]);
        for (int j = 0; j < 4 && cases[i].lacks[j]; j++)
            if (strstr(strstr(out, "\"router\""), cases[i].lacks[j]))
                fail_msg("%s has %s", out, cases[i].lacks[j]);
        /* what it wrote reads back to the same bytes */
        ModelConfig back;
        config_defaults(&back);
        assert_int_equal(config_from_json(&back, out, strlen(out), err), 0);
        assert_memory_equal(&back, &c, sizeof c);
        free(out);
    }
    /* the old form: every router key, whatever the router */
    const char *old = "{\"layers\":1,\"moe\":{\"experts\":4,\"router\":{\"kind\":\"threshold\","
                      "\"k\":2,\"normalize\":true,\"capacity_factor\":0,\"p\":0.9,\"max_k\":0,"
                      "\"min_capacity\":4,\"noise\":0}}}";
    ModelConfig c;
    config_defaults(&c);
    assert_int_equal(config_from_checkpoint_json(&c, old, strlen(old), err), 0);
    assert_int_equal(c.moe.kind, ROUTER_THRESHOLD);
    config_defaults(&c);
    assert_int_equal(config_from_json(&c, old, strlen(old), err), -1);
    assert_non_null(strstr(err, "'moe.router.k' is not read by the threshold router"));
}

/* A stratified router without strata gets two halves (one stratum of one
** expert when there is one), and nothing past them: with one expert the
** default used to set a second stratum's size that n_strata did not count, so
** the configuration read back from its own JSON (a checkpoint's) differed. */
static void test_stratified_default_strata(void **state) {
    (void)state;
    static const struct { int experts, n, first, second; } cases[] = {
        {1, 1, 1, 0}, {2, 2, 1, 1}, {3, 2, 1, 2}, {4, 2, 2, 2}, {5, 2, 2, 3},
    };
    char err[ML_ERRLEN], json[256];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(json, sizeof json, "{\"layers\":1,\"d_model\":8,\"heads\":2,\"moe\":{\"experts\":%d,"
                 "\"hidden\":8,\"router\":{\"kind\":\"stratified\"}}}", cases[i].experts);
        ModelConfig c, back;
        config_defaults(&c);
        if (config_from_json(&c, json, strlen(json), err) != 0) fail_msg("%s: %s", json, err);
        assert_int_equal(c.moe.n_strata, cases[i].n);
        assert_int_equal(c.moe.strata[0], cases[i].first);
        assert_int_equal(c.moe.strata[1], cases[i].second);
        for (int s = 2; s < MOE_MAX_EXPERTS; s++) assert_int_equal(c.moe.strata[s], 0);
        char *out = config_to_json(&c);
        assert_non_null(out);
        config_defaults(&back);
        if (config_from_json(&back, out, strlen(out), err) != 0) fail_msg("%s: %s", out, err);
        assert_memory_equal(&back, &c, sizeof c);
        free(out);
    }
}

/* ------------------------------------------------------------------------ */
/* stratified layers                                                         */

static ModelConfig strata_model(int first, int second) {
    ModelConfig c = moe_model(ROUTER_STRATIFIED);
    c.moe.n_strata = 2;
    c.moe.strata[0] = first;
    c.moe.strata[1] = second;
    c.moe.experts = first + second;
    for (int e = 0; e < c.moe.experts; e++) c.moe.hidden[e] = 8 + 4 * (e % 3);
    c.init_std = 0.2f; /* routers far from uniform: tokens spread over the strata */
    return c;
}

static double gelu(double x) {
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

/* One expert on one input, in double: proj(gelu(fc · u)). */
static void naive_expert(const MoeWeights *w, int e, int H, const double *u, int C, double *y) {
    for (int j = 0; j < C; j++) y[j] = 0.0;
    for (int h = 0; h < H; h++) {
        double a = 0.0;
        for (int j = 0; j < C; j++) a += w->fc[e][h * C + j] * u[j];
        a = gelu(a);
        for (int j = 0; j < C; j++) y[j] += w->proj[e][j * H + h] * a;
    }
}

/* SPEC §2's stratified layer, token by token in double, against the grouped
** layer: passes, per-pass norms, routers over the visible experts, top-2
** renormalised, strata moves. */
static void test_stratified_against_naive_loop(void **state) {
    (void)state;
    ModelConfig c = strata_model(3, 3);
    c.moe.n_strata = 3;
    c.moe.strata[0] = c.moe.strata[1] = 2;
    c.moe.strata[2] = 2;
    c.moe.experts = 6;
    char err[ML_ERRLEN];
    Model *m;
    assert_int_equal(model_create(&m, &c, err), 0);
    int B = 2, T = 16, N = B * T, C = c.d_model, E = c.moe.experts;
    int in[32], tg[32];
    for (int i = 0; i < N; i++) in[i] = tg[i] = (i * 41 + 5) % 256;
    assert_int_equal(model_forward(m, in, tg, B, T, err), 0);
    int histogram[4] = {0};
    for (int l = 0; l < c.layers; l++) {
        const BlockActs *b = &m->acts.blocks[l];
        const MoeWeights *w = m->w.blocks[l].moe;
        for (int t = 0; t < N; t++) {
            double h[16], u[16], y[16], logit[8], p[8];
            for (int j = 0; j < C; j++) h[j] = b->res2[t * C + j];
            int st = 0, passes = 0, first[4] = {0, 2, 4, 6};
            for (int s = 0; s < 3; s++) {
                if (st != s) continue;
                passes++;
                if (s == 0) {
                    for (int j = 0; j < C; j++) u[j] = b->ln2[t * C + j];
                } else {
                    double mean = 0, var = 0;
                    for (int j = 0; j < C; j++) mean += h[j] / C;
                    for (int j = 0; j < C; j++) var += (h[j] - mean) * (h[j] - mean) / C;
                    for (int j = 0; j < C; j++)
                        u[j] = (h[j] - mean) / sqrt(var + 1e-5) * w->norm_w[s][j] + w->norm_b[s][j];
                }
                int m_s = first[s], Es = E - m_s, e1 = 0, e2 = -1;
                double maxl = -1e30, sum = 0;
                for (int e = 0; e < Es; e++) {
                    logit[e] = 0;
                    for (int j = 0; j < C; j++) logit[e] += w->routers[s][e * C + j] * u[j];
                    if (logit[e] > maxl) maxl = logit[e];
                }
                for (int e = 0; e < Es; e++) sum += p[e] = exp(logit[e] - maxl);
                for (int e = 0; e < Es; e++) p[e] /= sum;
                for (int e = 1; e < Es; e++) if (p[e] > p[e1]) e1 = e;
                for (int e = 0; e < Es; e++) if (e != e1 && (e2 < 0 || p[e] > p[e2])) e2 = e;
                int pick[2] = {e1, e2};
                for (int i = 0; i < 2; i++) {
                    naive_expert(w, m_s + pick[i], c.moe.hidden[m_s + pick[i]], u, C, y);
                    double wt = p[pick[i]] / (p[e1] + p[e2]);
                    for (int j = 0; j < C; j++) h[j] += wt * y[j];
                }
                int e = m_s + e1;
                st = e < 2 ? 1 : e < 4 ? 2 : 3;
            }
            histogram[passes]++;
            assert_int_equal(moe_trace_token(&m->moe[l], &c.moe, c.activation, t).passes, passes);
            for (int j = 0; j < C; j++)
                if (!test_close(b->res3[t * C + j], h[j], 1e-4, 1e-5))
                    fail_msg("layer %d token %d feature %d: %g, naive %g", l, t, j,
                             (double)b->res3[t * C + j], h[j]);
        }
    }
    /* the test saw tokens of one, two and three passes */
    if (!(histogram[1] && histogram[2] && histogram[3]))
        fail_msg("passes: %d, %d, %d tokens", histogram[1], histogram[2], histogram[3]);
    model_free(m);
}

/* order (E): the experts by p, descending. */
static void order_desc(const double *p, int E, int *order) {
    for (int e = 0; e < E; e++) order[e] = e;
    for (int i = 0; i < E; i++)
        for (int j = i + 1; j < E; j++)
            if (p[order[j]] > p[order[i]]) {
                int x = order[i];
                order[i] = order[j];
                order[j] = x;
            }
}

/* Every token-choice router against a naive per-token loop in double (and
** expert choice's per-expert rule): SPEC §2's selection and weights, each
** selected expert run on the token alone, summed into the residual. */
static void test_routers_against_naive_loop(void **state) {
    (void)state;
    struct { RouterKind kind; int k, normalize; float p; int max_k; } cases[] = {
        {ROUTER_TOPK, 2, 1, 0, 0},      {ROUTER_TOPK, 1, 0, 0, 0},  {ROUTER_THRESHOLD, 2, 0, 0.6f, 0},
        {ROUTER_TOPP, 2, 1, 0.8f, 3},   {ROUTER_EXPERT_CHOICE, 2, 0, 0, 0}, {ROUTER_HASH, 1, 0, 0, 0},
        {ROUTER_SIMILARITY, 2, 0, 0, 0}, {ROUTER_LEARNED, 2, 0, 0.7f, 0}, {ROUTER_ORACLE, 2, 0, 0, 0},
    };
    for (size_t v = 0; v < sizeof cases / sizeof cases[0]; v++) {
        ModelConfig c = moe_model(cases[v].kind);
        c.moe.k = cases[v].k;
        c.moe.normalize = cases[v].normalize;
        if (cases[v].p > 0) c.moe.p = cases[v].p;
        c.moe.max_k = cases[v].max_k;
        c.moe.select_threshold = cases[v].kind == ROUTER_LEARNED; /* with p; the others top-k */
        c.init_std = 0.2f;
        char err[ML_ERRLEN];
        Model *m;
        assert_int_equal(model_create(&m, &c, err), 0);
        int B = 2, T = 16, N = B * T, C = c.d_model, E = c.moe.experts;
        int in[32], tg[32];
        for (int i = 0; i < N; i++) in[i] = tg[i] = (i * 61 + 9) % 256;
        assert_int_equal(model_forward(m, in, tg, B, T, err), 0);
        for (int l = 0; l < c.layers; l++) {
            const BlockActs *b = &m->acts.blocks[l];
            const MoeWeights *w = m->w.blocks[l].moe;
            static double p[32][4], wt[32][4]; /* wt[t][e]: the factor on expert e's output */
            for (int t = 0; t < N; t++) {
                double logit[4], maxl = -1e30, sum = 0;
                for (int e = 0; e < E; e++) {
                    logit[e] = 0;
                    for (int j = 0; j < C && w->router; j++) logit[e] += w->router[e * C + j] * b->ln2[t * C + j];
                    if (logit[e] > maxl) maxl = logit[e];
                }
                for (int e = 0; e < E; e++) sum += p[t][e] = exp(logit[e] - maxl);
                for (int e = 0; e < E; e++) {
                    p[t][e] /= sum;
                    wt[t][e] = 0;
                }
                int order[4];
                order_desc(p[t], E, order);
                int n = 0, unit = 0;
                double before = 0, kept = 0;
                if (cases[v].kind == ROUTER_ORACLE) { /* by shares of activation mass */
                    double mass[4], total = 0, u[16];
                    for (int j = 0; j < C; j++) u[j] = b->ln2[t * C + j];
                    for (int e = 0; e < E; e++) {
                        mass[e] = 0;
                        for (int h = 0; h < c.moe.hidden[e]; h++) {
                            double a = 0;
                            for (int j = 0; j < C; j++) a += w->fc[e][h * C + j] * u[j];
                            mass[e] += fabs(gelu(a));
                        }
                        total += mass[e];
                    }
                    for (int e = 0; e < E; e++) p[t][e] = mass[e] / total;
                    order_desc(p[t], E, order);
                }
                switch (cases[v].kind) {
                case ROUTER_SIMILARITY:
                case ROUTER_ORACLE: n = cases[v].k, unit = 1; break;
                case ROUTER_LEARNED:
                    unit = 1; /* the threshold rule, at weight 1 */
                    while (n < E && (n == 0 || before < cases[v].p)) before += p[t][order[n++]];
                    break;
                case ROUTER_TOPK: n = cases[v].k; break;
                case ROUTER_THRESHOLD:
                case ROUTER_TOPP:
                    while (n < E && (n == 0 || before < cases[v].p) && (!cases[v].max_k || n < cases[v].max_k))
                        before += p[t][order[n++]];
                    break;
                case ROUTER_HASH: wt[t][m->hash_map[l * c.vocab + in[t]]] = 1.0; break;
                default: break;
                }
                for (int i = 0; i < n; i++) kept += p[t][order[i]];
                int renorm = cases[v].kind == ROUTER_TOPP || (cases[v].kind == ROUTER_TOPK && cases[v].normalize);
                for (int i = 0; i < n; i++)
                    wt[t][order[i]] = unit ? 1.0 : p[t][order[i]] / (renorm ? kept : 1.0);
            }
            if (cases[v].kind == ROUTER_EXPERT_CHOICE) { /* each expert its top ceil(N·k/E) tokens */
                int cap = (N * cases[v].k + E - 1) / E;
                for (int e = 0; e < E; e++) {
                    int taken[32] = {0};
                    for (int i = 0; i < cap; i++) {
                        int best = -1;
                        for (int t = 0; t < N; t++)
                            if (!taken[t] && (best < 0 || p[t][e] > p[best][e])) best = t;
                        taken[best] = 1;
                        wt[best][e] = p[best][e];
                    }
                }
            }
            for (int t = 0; t < N; t++) {
                double u[16], y[16], out[16];
                for (int j = 0; j < C; j++) {
                    u[j] = b->ln2[t * C + j];
                    out[j] = b->res2[t * C + j];
                }
                for (int e = 0; e < E; e++) {
                    if (wt[t][e] == 0.0) continue;
                    naive_expert(w, e, c.moe.hidden[e], u, C, y);
                    for (int j = 0; j < C; j++) out[j] += wt[t][e] * y[j];
                }
                for (int j = 0; j < C; j++)
                    if (!test_close(b->res3[t * C + j], out[j], 1e-4, 1e-5))
                        fail_msg("router %s layer %d token %d feature %d: %g, naive %g",
                                 config_router_name(cases[v].kind), l, t, j,
                                 (double)b->res3[t * C + j], out[j]);
            }
        }
        model_free(m);
    }
}

/* Tokens whose first choice is in the last stratum leave after one pass: a
** layer where every token does so is a top-2 layer with stratum 0's router. */
static void test_stratified_one_pass_is_top2(void **state) {
    (void)state;
    ModelConfig c = strata_model(2, 2);
    char err[ML_ERRLEN];
    Model *sm, *tm;
    assert_int_equal(model_create(&sm, &c, err), 0);
    ModelConfig tc = c;
    tc.moe.kind = ROUTER_TOPK;
    tc.moe.k = 2;
    tc.moe.normalize = 1;
    tc.moe.n_strata = 0;
    assert_int_equal(model_create(&tm, &tc, err), 0);
    int C = c.d_model;
    for (int l = 0; l < c.layers; l++) {
        /* stratum 0's router: zero rows for experts 0, 1; r and -r for 2, 3,
        ** so one of the last stratum's logits is positive, the largest */
        float *r = sm->w.blocks[l].moe->routers[0];
        for (int j = 0; j < C; j++) {
            r[0 * C + j] = r[1 * C + j] = 0.0f;
            r[3 * C + j] = -r[2 * C + j];
        }
    }
    /* the same weights, name by name, where the top-2 model has them */
    for (int i = 0; i < tm->n_params; i++) {
        char name[96];
        snprintf(name, sizeof name, "%s", tm->params[i].name);
        char *router = strstr(name, "moe.router.weight");
        if (router) snprintf(router, sizeof name - (size_t)(router - name), "moe.routers.0.weight");
        int j = model_find_param(sm, name);
        assert_true(j >= 0);
        assert_int_equal(sm->params[j].numel, tm->params[i].numel);
        memcpy(tm->param_mem + tm->params[i].offset, sm->param_mem + sm->params[j].offset,
               sizeof(float) * tm->params[i].numel);
    }
    int in[32], tg[32];
    for (int i = 0; i < 32; i++) in[i] = tg[i] = (i * 13 + 1) % 256;
    assert_int_equal(model_forward(sm, in, tg, 2, 16, err), 0);
    assert_int_equal(model_forward(tm, in, tg, 2, 16, err), 0);
    for (int l = 0; l < c.layers; l++)
        for (int t = 0; t < 32; t++)
            assert_int_equal(moe_trace_token(&sm->moe[l], &c.moe, c.activation, t).passes, 1);
    assert_memory_equal(sm->acts.logits, tm->acts.logits, sizeof(float) * 32 * c.vocab);
    assert_true(sm->mean_loss == tm->mean_loss);
    assert_true(sm->moe_flops == tm->moe_flops);
    model_free(sm);
    model_free(tm);
}

/* Stratified checkpoints: SPEC §4's names and shapes, and a round trip. */
static void test_stratified_checkpoint(void **state) {
    (void)state;
    ModelConfig c = strata_model(3, 2);
    c.moe.second_sample = 1;
    char err[ML_ERRLEN];
    Model *m;
    assert_int_equal(model_create(&m, &c, err), 0);
    int i = model_find_param(m, "h.1.moe.routers.1.weight");
    assert_true(i >= 0);
    assert_int_equal(m->params[i].shape[0], 2); /* E - m_1 = 5 - 3 */
    assert_int_equal(m->params[i].shape[1], c.d_model);
    i = model_find_param(m, "h.1.moe.routers.0.weight");
    assert_int_equal(m->params[i].shape[0], 5);
    assert_true(model_find_param(m, "h.0.moe.norms.1.weight") >= 0);
    assert_true(model_find_param(m, "h.0.moe.norms.1.bias") >= 0);
    assert_int_equal(model_find_param(m, "h.0.moe.norms.0.weight"), -1); /* pass 0: ln_2 */
    assert_int_equal(model_find_param(m, "h.0.moe.router.weight"), -1);
    test_fill(m->param_mem, m->num_parameters, 0.3f, 9);
    test_save_load_same(m, "And God said, Let");
    char *json = config_to_json(&m->config);
    assert_non_null(strstr(json, "\"strata\":[3,2],\"second\":\"sample\""));
    free(json);
    model_free(m);
}

/* ------------------------------------------------------------------------ */
/* merged layers                                                             */

static ModelConfig merge_model(int k, int segment, int r) {
    ModelConfig c = moe_model(ROUTER_MERGE);
    for (int e = 0; e < c.moe.experts; e++) c.moe.hidden[e] = 12;
    c.moe.hidden_list = 0;
    c.moe.k = k;
    c.moe.segment = segment;
    c.moe.token_attention = r;
    c.init_std = 0.2f;
    return c;
}

/* A merge gate in double: logits = mean · Wgᵀ, the k largest (ties to the
** lower expert) in idx, g their softmax. */
static void naive_gate(const float *Wg, const double *mean, int E, int D, int k, int *idx,
                       double *g) {
    double logit[8], z = 0;
    for (int e = 0; e < E; e++) {
        logit[e] = 0;
        for (int j = 0; j < D; j++) logit[e] += Wg[e * D + j] * mean[j];
    }
    for (int i = 0; i < k; i++) {
        idx[i] = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int q = 0; q < i; q++) taken |= idx[q] == e;
            if (!taken && (idx[i] < 0 || logit[e] > logit[idx[i]])) idx[i] = e;
        }
    }
    for (int i = 0; i < k; i++) z += g[i] = exp(logit[idx[i]] - logit[idx[0]]);
    for (int i = 0; i < k; i++) g[i] /= z;
}

/* SPEC §2's merged layer, position by position in double, against the layer:
** the windows' means, both gates (top-k logits, softmax over the k), the
** merged fc and proj; k = 1 is the chosen expert itself. */
static void test_merge_against_naive_loop(void **state) {
    (void)state;
    for (int v = 0; v < 3; v++) {
        int k = v == 0 ? 1 : 2, S = v == 2 ? 0 : 5; /* 16 positions: segments of 5, 5, 5, 1 */
        ModelConfig c = merge_model(k, S, 0);
        char err[ML_ERRLEN];
        Model *m;
        assert_int_equal(model_create(&m, &c, err), 0);
        int B = 2, T = 16, C = c.d_model, H = 12, E = c.moe.experts;
        int in[32], tg[32];
        for (int i = 0; i < B * T; i++) in[i] = tg[i] = (i * 53 + 11) % 256;
        assert_int_equal(model_forward(m, in, tg, B, T, err), 0);
        int chose_other = 0;
        for (int l = 0; l < c.layers; l++) {
            const BlockActs *b = &m->acts.blocks[l];
            const MoeWeights *w = m->w.blocks[l].moe;
            double a[16][12];
            for (int bb = 0; bb < B; bb++) {
                const float *x0 = b->ln2 + (size_t)bb * T * C;
                /* a for every position, from its own segment's fc gate */
                for (int t = 0; t < T; t++) {
                    int s = S ? t / S : 0, wend = S ? (s * S > 1 ? s * S : 1) : T;
                    double mean[16] = {0}, g[4];
                    int idx[4];
                    for (int q = 0; q < wend; q++)
                        for (int j = 0; j < C; j++) mean[j] += x0[q * C + j] / (double)wend;
                    naive_gate(w->gate_fc, mean, E, C, k, idx, g);
                    double z = 1.0;
                    for (int h = 0; h < H; h++) {
                        double acc = 0;
                        for (int i = 0; i < k; i++)
                            for (int j = 0; j < C; j++)
                                acc += g[i] / z * w->fc[idx[i]][h * C + j] * x0[t * C + j];
                        a[t][h] = gelu(acc);
                    }
                    chose_other += idx[0] != 0;
                }
                for (int pos = 0; pos < T; pos++) {
                    int s = S ? pos / S : 0, wend = S ? (s * S > 1 ? s * S : 1) : T;
                    double g[4], z = 1.0;
                    int idx[4];
                    /* the proj gate on the mean of a over the window */
                    double pmean[12] = {0};
                    for (int t = 0; t < wend; t++)
                        for (int h = 0; h < H; h++) pmean[h] += a[t][h] / wend;
                    naive_gate(w->gate_proj, pmean, E, H, k, idx, g);
                    int n = bb * T + pos;
                    for (int j = 0; j < C; j++) {
                        double y = b->res2[n * C + j];
                        for (int i = 0; i < k; i++)
                            for (int h = 0; h < H; h++)
                                y += g[i] / z * w->proj[idx[i]][j * H + h] * a[pos][h];
                        if (!test_close(b->res3[n * C + j], y, 1e-4, 1e-5))
                            fail_msg("k %d segment %d layer %d seq %d pos %d feature %d: %g, naive %g",
                                     k, S, l, bb, pos, j, (double)b->res3[n * C + j], y);
                    }
                }
            }
        }
        assert_true(chose_other > 0); /* not only the tie-break's expert 0 */
        model_free(m);
    }
}

/* Token attention starts as the identity (Up is zero): the same outputs, bit
** for bit, as the layer without it and the same other weights. */
static void test_merge_token_attention_starts_as_identity(void **state) {
    (void)state;
    ModelConfig with = merge_model(2, 4, 4), without = merge_model(2, 4, 0);
    char err[ML_ERRLEN];
    Model *a, *b;
    assert_int_equal(model_create(&a, &with, err), 0);
    assert_int_equal(model_create(&b, &without, err), 0);
    for (int i = 0; i < b->n_params; i++) {
        int j = model_find_param(a, b->params[i].name);
        assert_true(j >= 0);
        memcpy(b->param_mem + b->params[i].offset, a->param_mem + a->params[j].offset,
               sizeof(float) * b->params[i].numel);
    }
    assert_true(model_find_param(a, "h.0.moe.tokatt_fc.down.weight") >= 0);
    assert_true(model_find_param(a, "h.1.moe.tokatt_proj.up.weight") >= 0);
    int in[32], tg[32];
    for (int i = 0; i < 32; i++) in[i] = tg[i] = (i * 19 + 2) % 256;
    assert_int_equal(model_forward(a, in, tg, 2, 16, err), 0);
    assert_int_equal(model_forward(b, in, tg, 2, 16, err), 0);
    assert_memory_equal(a->acts.logits, b->acts.logits, sizeof(float) * 32 * with.vocab);
    model_free(a);
    model_free(b);
}

/* Merged checkpoints: SPEC §4's names and shapes, and a round trip; the
** configuration errors. */
static void test_merge_checkpoint_and_errors(void **state) {
    (void)state;
    ModelConfig c = merge_model(3, 8, 4);
    char err[ML_ERRLEN];
    Model *m;
    assert_int_equal(model_create(&m, &c, err), 0);
    int i = model_find_param(m, "h.0.moe.gate_fc.weight");
    assert_true(i >= 0 && m->params[i].shape[0] == 4 && m->params[i].shape[1] == c.d_model);
    i = model_find_param(m, "h.1.moe.gate_proj.weight");
    assert_true(i >= 0 && m->params[i].shape[0] == 4 && m->params[i].shape[1] == 12);
    i = model_find_param(m, "h.1.moe.tokatt_proj.down.weight");
    assert_true(i >= 0 && m->params[i].shape[0] == 3 && m->params[i].shape[1] == 12);
    assert_int_equal(model_find_param(m, "h.0.moe.router.weight"), -1);
    test_fill(m->param_mem, m->num_parameters, 0.3f, 4);
    test_save_load_same(m, "And God said, Let");
    model_free(m);
    ModelConfig bad = merge_model(2, 0, 0);
    bad.moe.hidden[1] = 20;
    assert_int_equal(model_create(&m, &bad, err), -1);
    assert_non_null(strstr(err, "one hidden size"));
    bad = merge_model(2, 0, 0);
    bad.activation = ACT_SWIGLU;
    assert_int_equal(model_create(&m, &bad, err), -1);
    assert_non_null(strstr(err, "swiglu"));
    bad = merge_model(2, 0, 0);
    bad.moe.aux_balance = 0.01f;
    assert_int_equal(model_create(&m, &bad, err), -1);
    assert_non_null(strstr(err, "moe.aux"));
}

/* ------------------------------------------------------------------------ */
/* dense to sparse                                                           */

/* Mean cosine similarity of each neuron's fc row to its group's other rows. */
static double group_coherence(const Model *m, int l, int E, int He, int C) {
    const MoeWeights *w = m->w.blocks[l].moe;
    double total = 0.0;
    for (int e = 0; e < E; e++)
        for (int i = 0; i < He; i++)
            for (int j = 0; j < He; j++) {
                if (i == j) continue;
                const float *a = w->fc[e] + (size_t)i * C, *b = w->fc[e] + (size_t)j * C;
                double ab = 0, aa = 0, bb = 0;
                for (int q = 0; q < C; q++) {
                    ab += a[q] * b[q];
                    aa += a[q] * a[q];
                    bb += b[q] * b[q];
                }
                total += ab / sqrt(aa * bb);
            }
    return total / ((double)E * He * (He - 1));
}

/* moefy's groups: E of H/E neurons each, every neuron once; k-means groups
** rows that point the same way more than a random split does. */
static void test_moefy_groups(void **state) {
    (void)state;
    ModelConfig c = moe_model(ROUTER_TOPK);
    c.moe.enabled = 0;
    c.ffn_hidden = 64;
    c.d_model = 16;
    char err[ML_ERRLEN];
    Model *dense, *km, *rnd;
    assert_int_equal(model_create(&dense, &c, err), 0);
    /* fc rows in 4 directions plus noise: there are groups to find */
    for (int l = 0; l < c.layers; l++) {
        float *fc = dense->w.blocks[l].fcw;
        test_fill(fc, 64 * 16, 0.3f, 40 + l);
        for (int h = 0; h < 64; h++) fc[h * 16 + (h * 7) % 4] += 2.0f;
    }
    assert_int_equal(moe_moefy(&km, dense, 4, 1, 1, NULL, err), 0);
    assert_int_equal(moe_moefy(&rnd, dense, 4, 0, 1, NULL, err), 0);
    for (int l = 0; l < c.layers; l++) {
        /* every dense row is in exactly one expert */
        int seen[64] = {0};
        for (int e = 0; e < 4; e++)
            for (int i = 0; i < 16; i++)
                for (int h = 0; h < 64; h++)
                    if (!memcmp(km->w.blocks[l].moe->fc[e] + i * 16, dense->w.blocks[l].fcw + h * 16,
                                sizeof(float) * 16))
                        seen[h]++;
        for (int h = 0; h < 64; h++) assert_int_equal(seen[h], 1);
        double a = group_coherence(km, l, 4, 16, 16), b = group_coherence(rnd, l, 4, 16, 16);
        if (!(a > b + 0.3)) fail_msg("layer %d: k-means coherence %.3f, random %.3f", l, a, b);
    }
    model_free(dense);
    model_free(km);
    model_free(rnd);
}

/* A trained-for-a-few-steps model in an in-memory database. */
typedef struct {
    Corpus *corpus;
    Model *model;
    Recorder *rec;
    Trainer t;
} Fixture;

static void fixture_open(Fixture *f, ModelConfig c, int steps) {
    char err[ML_ERRLEN], text[6000];
    for (size_t i = 0; i < sizeof text; i++) text[i] = "the lord said unto moses, "[(i * 5 + i / 7) % 26];
    int64_t run_id;
    assert_int_equal(corpus_from_bytes(&f->corpus, (const uint8_t *)text, sizeof text, 0.8, err), 0);
    assert_int_equal(model_create(&f->model, &c, err), 0);
    assert_int_equal(rec_open(&f->rec, ":memory:", err), 0);
    assert_int_equal(rec_run_begin(f->rec, "moe", NULL, NULL, 1, 0, 0, 1, &run_id, err), 0);
    assert_int_equal(trainer_init(&f->t, f->model, f->corpus, f->rec, run_id, "moe", 1, err), 0);
    TrainOptions o;
    train_options_defaults(&o);
    o.steps = steps;
    o.batch = 4;
    o.warmup = 1;
    o.progress = 0;
    o.eval_batches = 1;
    TrainResult res;
    if (trainer_train(&f->t, &o, &res, err) != 0) fail_msg("%s", err);
}

static void fixture_close(Fixture *f) {
    trainer_free(&f->t);
    rec_close(f->rec);
    model_free(f->model);
    corpus_free(f->corpus);
}

static int64_t query_int(Recorder *r, const char *sql) {
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(rec_db(r), sql, -1, &st, NULL) != SQLITE_OK)
        fail_msg("%s: %s", sql, sqlite3_errmsg(rec_db(r)));
    int64_t v = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int64(st, 0) : -1;
    sqlite3_finalize(st);
    return v;
}

static void test_expert_load_matches_forward(void **state) {
    (void)state;
    float factors[] = {0.0f, 1.0f};
    for (int i = 0; i < 2; i++) {
        ModelConfig c = moe_model(ROUTER_TOPK);
        c.moe.capacity_factor = factors[i];
        c.moe.min_capacity = 0;
        Fixture f;
        fixture_open(&f, c, 3);
        /* a training step's rows account for every assignment */
        int64_t assigned = query_int(f.rec,
            "SELECT SUM(tokens) + SUM(dropped) FROM expert_load WHERE eval_id IS NULL AND step = 3 AND layer = 0");
        assert_int_equal(assigned, 4 * 16 * 2); /* B·T tokens, k = 2 each */
        int64_t dropped = query_int(f.rec,
            "SELECT SUM(dropped) FROM expert_load WHERE eval_id IS NULL AND layer = 1");
        if (i == 0) assert_int_equal(dropped, 0);
        /* capacity 1: C = ceil(1 · 64 · 2 / 4) = 32; no expert over it in training */
        if (i == 1)
            assert_int_equal(query_int(f.rec, "SELECT COUNT(*) FROM expert_load "
                                              "WHERE eval_id IS NULL AND tokens > 32"), 0);
        /* a one-batch evaluation: its rows are exactly the forward's counts */
        EvalOptions eo;
        eval_options_defaults(&eo);
        eo.batches = 1;
        eo.batch = 4;
        EvalResult er;
        char err[ML_ERRLEN];
        if (trainer_evaluate(&f.t, &eo, &er, err) != 0) fail_msg("%s", err);
        for (int l = 0; l < 2; l++)
            for (int e = 0; e < 4; e++) {
                char sql[256];
                snprintf(sql, sizeof sql, "SELECT tokens * 1000000 + dropped FROM expert_load "
                         "WHERE eval_id = %lld AND layer = %d AND expert = %d",
                         (long long)er.eval_id, l, e);
                const MoeState *s = &f.model->moe[l].tc;
                assert_int_equal(query_int(f.rec, sql), (int64_t)s->counts[e] * 1000000 + s->dropped[e]);
            }
        fixture_close(&f);
    }
}

/* A recorded evaluation's routing rows, fed back as a frozen selection,
** reproduce the layer's output bit for bit. */
static void test_recorded_routing_reproduces_forward(void **state) {
    (void)state;
    RouterKind kinds[] = {ROUTER_THRESHOLD, ROUTER_TOPK, ROUTER_EXPERT_CHOICE};
    for (int k = 0; k < 3; k++) {
        ModelConfig c = moe_model(kinds[k]);
        if (kinds[k] == ROUTER_TOPK) c.moe.capacity_factor = 0.75f; /* with drops */
        Fixture f;
        fixture_open(&f, c, 2);
        EvalOptions eo;
        eval_options_defaults(&eo);
        eo.batches = 1;
        eo.batch = 4;
        eo.record = 1;
        EvalResult er;
        char err[ML_ERRLEN];
        if (trainer_evaluate(&f.t, &eo, &er, err) != 0) fail_msg("%s", err);
        Model *m = f.model;
        int N = 4 * 16, C = 16;
        for (int l = 0; l < 2; l++) {
            MoeState *s = &m->moe[l].tc;
            BlockActs *b = &m->acts.blocks[l];
            /* wipe the selection and rebuild it from the database */
            for (int t = 0; t < N; t++) {
                s->sel_count[t] = 0;
                for (int i = 0; i < s->slots; i++) s->sel_row[(size_t)t * s->slots + i] = -1;
            }
            sqlite3_stmt *st;
            char sql[256];
            snprintf(sql, sizeof sql, "SELECT seq, pos, rank, expert, weight FROM routing "
                     "WHERE eval_id = %lld AND layer = %d ORDER BY seq, pos, rank",
                     (long long)er.eval_id, l);
            assert_int_equal(sqlite3_prepare_v2(rec_db(f.rec), sql, -1, &st, NULL), SQLITE_OK);
            int rows = 0;
            while (sqlite3_step(st) == SQLITE_ROW) {
                int t = sqlite3_column_int(st, 0) * 16 + sqlite3_column_int(st, 1);
                int rank = sqlite3_column_int(st, 2); /* a dropped rank leaves a gap */
                assert_true(rank >= s->sel_count[t] && rank < s->slots);
                s->sel_count[t] = rank + 1;
                s->sel_expert[(size_t)t * s->slots + rank] = sqlite3_column_int(st, 3);
                s->sel_weight[(size_t)t * s->slots + rank] = (float)sqlite3_column_double(st, 4);
                s->sel_row[(size_t)t * s->slots + rank] = 0; /* kept */
                rows++;
            }
            sqlite3_finalize(st);
            assert_true(rows > 0);
            float *out = malloc(sizeof(float) * (size_t)N * C);
            memcpy(out, b->res2, sizeof(float) * (size_t)N * C);
            s->freeze = 2; /* the recorded experts and weights */
            assert_int_equal(moe_forward(s, &c.moe, c.activation, m->w.blocks[l].moe, NULL, out,
                                         b->ln2, m->acts.inputs, NULL, N, C, err), 0);
            s->freeze = 0;
            for (int i = 0; i < N * C; i++)
                if (out[i] != b->res3[i])
                    fail_msg("router %d layer %d: element %d differs: %g vs %g", k, l, i,
                             (double)out[i], (double)b->res3[i]);
            free(out);
        }
        /* token_stats and routing agree on the experts each token received */
        assert_int_equal(query_int(f.rec, "SELECT SUM(experts) FROM token_stats"),
                         query_int(f.rec, "SELECT COUNT(*) FROM routing"));
        fixture_close(&f);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threshold_rule),
        cmocka_unit_test(test_topk_rule),
        cmocka_unit_test(test_capacity_priority),
        cmocka_unit_test(test_expert_choice_rule),
        cmocka_unit_test(test_capacity_formula),
        cmocka_unit_test(test_flops_accounting),
        cmocka_unit_test(test_moe_checkpoint),
        cmocka_unit_test(test_router_keys_stored),
        cmocka_unit_test(test_penalty_and_entropy),
        cmocka_unit_test(test_hash_map_stored),
        cmocka_unit_test(test_routers_against_naive_loop),
        cmocka_unit_test(test_stratified_default_strata),
        cmocka_unit_test(test_stratified_against_naive_loop),
        cmocka_unit_test(test_stratified_one_pass_is_top2),
        cmocka_unit_test(test_stratified_checkpoint),
        cmocka_unit_test(test_merge_against_naive_loop),
        cmocka_unit_test(test_merge_token_attention_starts_as_identity),
        cmocka_unit_test(test_merge_checkpoint_and_errors),
        cmocka_unit_test(test_moefy_groups),
        cmocka_unit_test(test_expert_load_matches_forward),
        cmocka_unit_test(test_recorded_routing_reproduces_forward),
    };
    return cmocka_run_group_tests_name("moe", tests, NULL, NULL);
}
