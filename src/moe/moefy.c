/*
** moe/moefy.c — dense to sparse: a trained dense model's FFNs split into
** experts (MoEfication, Zhang et al. 2022, as XMoE applies it to dense
** models).
**
** Each dense FFN's H hidden neurons go into E groups of H/E. With "kmeans"
** the groups are balanced k-means clusters of the fc rows, each row
** normalised to unit length (as the MoEfication code clusters them); with
** "random", a seeded random split, the control. Expert e takes its neurons'
** fc rows, fc biases (and SwiGLU gate rows) and proj columns; the layer keeps
** the proj bias, added once per token. Run with router "all" (every expert,
** weight 1) the layer computes the same function as the dense FFN, up to the
** order of the sums: proj(act(fc x + b)) + c = Σ_e proj_e(act(fc_e x + b_e)) + c.
**
** The balanced assignment is greedy: every (neuron, centre) pair by distance,
** nearest first, a neuron taken by the first centre with room. (The
** MoEfication code solves it exactly as a min-cost flow; the greedy one is
** what is written here.) Centres start at E distinct neurons of a seeded
** shuffle; at most 50 rounds, until no neuron moves.
*/
#include <cblas.h>
#include <gsl/gsl_rng.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "data.h"
#include "model.h"
#include "moe/moe.h"
#include "moe/router.h"
#include "ops.h"

typedef struct {
    float dist;
    int neuron, centre;
} Pair;

static int by_distance(const void *a, const void *b) {
    const Pair *x = a, *y = b;
    if (x->dist != y->dist) return x->dist < y->dist ? -1 : 1;
    if (x->neuron != y->neuron) return x->neuron - y->neuron;
    return x->centre - y->centre;
}

static void shuffle(int *v, int n, gsl_rng *rng) {
    for (int i = 0; i < n; i++) v[i] = i;
    for (int i = n - 1; i > 0; i--) {
        int j = (int)gsl_rng_uniform_int(rng, (unsigned long)i + 1), t = v[i];
        v[i] = v[j];
        v[j] = t;
    }
}

/* group[H]: each neuron's group, E groups of H/E. fc (H, C). */
static int split_neurons(int *group, const float *fc, int H, int C, int E, int kmeans,
                         gsl_rng *rng) {
    int size = H / E;
    int *order = malloc(sizeof(int) * (size_t)H);
    if (!order) return -1;
    shuffle(order, H, rng);
    if (!kmeans) {
        for (int i = 0; i < H; i++) group[order[i]] = i / size;
        free(order);
        return 0;
    }
    float *x = malloc(sizeof(float) * (size_t)H * C), *centre = malloc(sizeof(float) * (size_t)E * C);
    Pair *pairs = malloc(sizeof(Pair) * (size_t)H * E);
    int *fill = malloc(sizeof(int) * (size_t)E), *prev = malloc(sizeof(int) * (size_t)H);
    if (!x || !centre || !pairs || !fill || !prev) {
        free(order), free(x), free(centre), free(pairs), free(fill), free(prev);
        return -1;
    }
    for (int h = 0; h < H; h++) {
        double n2 = 0.0;
        for (int j = 0; j < C; j++) n2 += (double)fc[(size_t)h * C + j] * fc[(size_t)h * C + j];
        float inv = n2 > 0.0 ? (float)(1.0 / sqrt(n2)) : 0.0f;
        for (int j = 0; j < C; j++) x[(size_t)h * C + j] = fc[(size_t)h * C + j] * inv;
    }
    for (int e = 0; e < E; e++) memcpy(centre + (size_t)e * C, x + (size_t)order[e] * C, sizeof(float) * C);
    for (int h = 0; h < H; h++) prev[h] = -1;
    for (int round = 0; round < 50; round++) {
        for (int h = 0; h < H; h++)
            for (int e = 0; e < E; e++) {
                double d = 0.0;
                for (int j = 0; j < C; j++) {
                    double diff = x[(size_t)h * C + j] - centre[(size_t)e * C + j];
                    d += diff * diff;
                }
                pairs[(size_t)h * E + e] = (Pair){(float)d, h, e};
            }
        qsort(pairs, (size_t)H * E, sizeof(Pair), by_distance);
        for (int h = 0; h < H; h++) group[h] = -1;
        memset(fill, 0, sizeof(int) * (size_t)E);
        for (size_t i = 0; i < (size_t)H * E; i++) {
            const Pair *p = &pairs[i];
            if (group[p->neuron] >= 0 || fill[p->centre] == size) continue;
            group[p->neuron] = p->centre;
            fill[p->centre]++;
        }
        int moved = 0;
        for (int h = 0; h < H; h++) moved += group[h] != prev[h];
        memcpy(prev, group, sizeof(int) * (size_t)H);
        if (!moved) break;
        memset(centre, 0, sizeof(float) * (size_t)E * C);
        for (int h = 0; h < H; h++)
            for (int j = 0; j < C; j++) centre[(size_t)group[h] * C + j] += x[(size_t)h * C + j] / size;
    }
    free(order), free(x), free(centre), free(pairs), free(fill), free(prev);
    return 0;
}

int moe_moefy(Model **out, const Model *dense, int E, int kmeans, uint64_t seed,
              const MoeConfig *router, char *err) {
    *out = NULL;
    const ModelConfig *d = &dense->config;
    int H = d->ffn_hidden, C = d->d_model;
    if (d->moe.enabled)
        return ml_error(err, "moefy: the model has a moe configuration; it takes a dense model");
    if (E < 1 || E > MOE_MAX_EXPERTS || H % E != 0)
        return ml_error(err, "moefy: experts = %d must divide the FFN's hidden size %d (and be at "
                        "most %d)", E, H, MOE_MAX_EXPERTS);
    ModelConfig c = *d;
    MoeConfig *mc = &c.moe;
    mc->enabled = 1;
    mc->every = 1;
    mc->experts = E;
    for (int e = 0; e < E; e++) mc->hidden[e] = H / E;
    mc->hidden_list = 0;
    mc->kind = ROUTER_ALL;
    if (router && (router->kind == ROUTER_SIMILARITY || router->kind == ROUTER_LEARNED ||
                   router->kind == ROUTER_ORACLE)) {
        mc->kind = router->kind;
        mc->select_threshold = router->select_threshold;
        mc->k = router->k;
        mc->p = router->p;
    } else if (router && router->kind != ROUTER_ALL) {
        return ml_error(err, "moefy: the router of a converted model is \"all\", "
                        "\"similarity\", \"learned\" or \"oracle\", not \"%s\"",
                        config_router_name(router->kind));
    }
    mc->bias = 1;
    mc->sparsity_eps = d->activation == ACT_RELU ? 0.0f : 0.01f;
    config_canonical(&c);
    Model *m;
    if (model_create(&m, &c, err) != 0) return -1;
    /* everything but the dense FFNs, by name */
    for (int i = 0; i < dense->n_params; i++) {
        const ParamInfo *p = &dense->params[i];
        if (strstr(p->name, ".mlp.")) continue;
        int j = model_find_param(m, p->name);
        if (j < 0 || m->params[j].numel != p->numel) {
            model_free(m);
            return ml_error(err, "moefy: no tensor '%s' in the sparse model", p->name);
        }
        memcpy(m->param_mem + m->params[j].offset, dense->param_mem + p->offset,
               sizeof(float) * p->numel);
    }
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    int *group = malloc(sizeof(int) * (size_t)H), *fill = malloc(sizeof(int) * (size_t)E);
    if (!rng || !group || !fill) {
        if (rng) gsl_rng_free(rng);
        free(group), free(fill), model_free(m);
        return ml_error(err, "moefy: out of memory");
    }
    gsl_rng_set(rng, (unsigned long)seed + 1); /* mt19937 takes 0 as its default 4357 */
    int rc = 0;
    for (int l = 0; l < c.layers && rc == 0; l++) {
        const BlockWeights *db = &dense->w.blocks[l];
        const MoeWeights *w = m->w.blocks[l].moe;
        if (split_neurons(group, db->fcw, H, C, E, kmeans, rng) != 0) {
            rc = ml_error(err, "moefy: out of memory");
            break;
        }
        memset(fill, 0, sizeof(int) * (size_t)E);
        for (int h = 0; h < H; h++) { /* neurons in ascending order within each expert */
            int e = group[h], i = fill[e]++, He = H / E;
            memcpy(w->fc[e] + (size_t)i * C, db->fcw + (size_t)h * C, sizeof(float) * C);
            if (db->gatew) memcpy(w->gate[e] + (size_t)i * C, db->gatew + (size_t)h * C, sizeof(float) * C);
            w->fc_bias[e][i] = db->fcb[h];
            for (int j = 0; j < C; j++) w->proj[e][(size_t)j * He + i] = db->projw[(size_t)j * H + h];
        }
        memcpy(w->bias, db->projb, sizeof(float) * C);
        if (w->router) { /* similarity: each group's centroid of normalised fc rows */
            memset(w->router, 0, sizeof(float) * (size_t)E * C);
            for (int h = 0; h < H; h++) {
                double n2 = 0.0;
                const float *row = db->fcw + (size_t)h * C;
                for (int j = 0; j < C; j++) n2 += (double)row[j] * row[j];
                float scale = n2 > 0.0 ? (float)(1.0 / sqrt(n2) / (H / E)) : 0.0f;
                for (int j = 0; j < C; j++) w->router[(size_t)group[h] * C + j] += row[j] * scale;
            }
        }
    }
    gsl_rng_free(rng);
    free(group), free(fill);
    if (rc != 0) {
        model_free(m);
        return -1;
    }
    *out = m;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* fitting a learned router                                                  */

/*
** Each MoE layer's router is fitted, the rest of the model frozen, to predict
** each group's share of the layer's activation mass: the target q_te is
** Σ_h |a_h| over expert e's neurons for token t, over the same summed over
** every expert (uniform when all are zero), with every expert running (the
** dense function, so each layer sees the inputs it will see); the loss is the
** cross-entropy of softmax(x · Wᵀ) against q, minimised with Adam (β 0.9,
** 0.999) on W alone. recall is the share of the mass that the router's own
** choice (its select, k or p) covers.
*/
/* One layer's fit: the mean over the N tokens of the cross-entropy of
** softmax(x · Wᵀ) against the shares q (N, E); grad (E, C) = d loss / d W;
** adds to recall the mean share that the router's choice covers. p (N, E)
** is scratch. x (N, C), W (E, C). */
double moe_router_fit_loss(float *grad, float *p, const float *x, const float *W, const float *q,
                           const MoeConfig *mc, int N, int C, int E, double *recall) {
    double loss = 0.0;
    matmul_forward(p, x, W, NULL, N, C, E, 0.0f);
    for (int t = 0; t < N; t++) {
        float *pt = p + (size_t)t * E;
        const float *qt = q + (size_t)t * E;
        float maxv = pt[0];
        for (int e = 1; e < E; e++) maxv = pt[e] > maxv ? pt[e] : maxv;
        double sum = 0.0;
        for (int e = 0; e < E; e++) sum += pt[e] = expf(pt[e] - maxv);
        for (int e = 0; e < E; e++) {
            pt[e] = (float)(pt[e] / sum);
            if (qt[e] > 0.0f) loss -= qt[e] * log(pt[e] > 1e-30f ? pt[e] : 1e-30f) / N;
        }
        int ex[MOE_MAX_EXPERTS];
        float wt[MOE_MAX_EXPERTS];
        int n = mc->select_threshold ? router_select_threshold(pt, E, mc->p, 0, 0, ex, wt)
                                     : router_select_topk(pt, E, mc->k, 0, ex, wt);
        for (int i = 0; i < n; i++) *recall += qt[ex[i]] / N;
        for (int e = 0; e < E; e++) pt[e] = (pt[e] - qt[e]) / N; /* d loss / d logit */
    }
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, E, C, N, 1.0f, p, E, x, C, 0.0f, grad, C);
    return loss;
}

int moe_fit_routers(Model *m, const Corpus *corpus, int steps, int B, float lr, uint64_t seed,
                    MoeFit *fit, char *err) {
    const ModelConfig *c = &m->config;
    const MoeConfig *mc = &c->moe;
    memset(fit, 0, sizeof *fit);
    if (!mc->enabled || mc->kind != ROUTER_LEARNED)
        return ml_error(err, "fit_router: the model's router is not \"learned\" (make one with "
                        "moelab.moefy(model, { router = { kind = \"learned\" } }))");
    int T = c->context, N = B * T, E = mc->experts, C = c->d_model, L = c->layers;
    if (corpus_check_context(corpus, SPLIT_TRAIN, T, err) != 0) return -1;
    size_t NE = (size_t)N * E, EC = (size_t)E * C;
    int *in = malloc(sizeof(int) * (size_t)N), *tg = malloc(sizeof(int) * (size_t)N);
    float *q = malloc(sizeof(float) * NE), *p = malloc(sizeof(float) * NE);
    float *grad = malloc(sizeof(float) * EC), *mom = calloc(2 * EC * (size_t)L, sizeof(float));
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    int rc = -1;
    if (!in || !tg || !q || !p || !grad || !mom || !rng) {
        ml_error(err, "fit_router: out of memory");
        goto done;
    }
    gsl_rng_set(rng, (unsigned long)seed + 1);
    int tail = steps - (steps >= 10 ? steps / 10 : 1), counted = 0; /* at least the last step */
    for (int step = 0; step < steps; step++) {
        corpus_batch(corpus, SPLIT_TRAIN, rng, B, T, in, tg);
        m->config.moe.kind = ROUTER_ALL; /* every expert: the targets, and the dense inputs */
        /* here alone, under expert parallelism too: the targets read every
        ** expert's activations of a token (moe_mass_shares), and every rank
        ** holds every expert */
        int training = m->training, parallel = m->config.moe.parallel_experts;
        m->training = 0;
        m->config.moe.parallel_experts = 0;
        int failed = model_forward(m, in, NULL, B, T, err);
        m->config.moe.parallel_experts = parallel;
        m->config.moe.kind = ROUTER_LEARNED;
        m->training = training;
        if (failed) goto done;
        double loss = 0.0, recall = 0.0;
        int layers = 0;
        for (int l = 0; l < L; l++) {
            if (!config_is_moe_block(c, l)) continue;
            const MoeState *s = &m->moe[l].tc;
            const float *x = m->acts.blocks[l].ln2;
            float *W = m->w.blocks[l].moe->router;
            for (int t = 0; t < N; t++) moe_mass_shares(s, mc, t, q + (size_t)t * E);
            loss += moe_router_fit_loss(grad, p, x, W, q, mc, N, C, E, &recall);
            float *m1 = mom + 2 * EC * (size_t)l, *m2 = m1 + EC;
            float bc1 = 1.0f - powf(0.9f, (float)(step + 1)), bc2 = 1.0f - powf(0.999f, (float)(step + 1));
            for (size_t i = 0; i < EC; i++) {
                m1[i] = 0.9f * m1[i] + 0.1f * grad[i];
                m2[i] = 0.999f * m2[i] + 0.001f * grad[i] * grad[i];
                W[i] -= lr * (m1[i] / bc1) / (sqrtf(m2[i] / bc2) + 1e-8f);
            }
            layers++;
        }
        loss /= layers;
        recall /= layers;
        if (step == 0) {
            fit->first_loss = loss;
            fit->first_recall = recall;
        }
        if (step >= tail) {
            fit->loss += loss;
            fit->recall += recall;
            counted++;
        }
    }
    fit->loss /= counted;
    fit->recall /= counted;
    rc = 0;
done:
    free(in), free(tg), free(q), free(p), free(grad), free(mom);
    if (rng) gsl_rng_free(rng);
    return rc;
}
