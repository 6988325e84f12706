/*
** model.c — the transformer: parameter layout, initialisation, forward and
** backward passes, AdamW, and sampling.
**
** The parameter layout is defined in exactly one place, model_layout(), which
** walks the tensors in checkpoint order. Called once with registering = 1 it
** fills the registry (names, shapes, offsets, init); called again on an arena it
** hands out the pointers of a Weights struct. Parameters and gradients share it.
*/
#include "model.h"

#include <assert.h>
#include <stdarg.h>
#include <gsl/gsl_randist.h>
#include <gsl/gsl_rng.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "moe/router.h"
#include "ops.h"

/* ------------------------------------------------------------------------ */
/* layout                                                                    */

typedef struct {
    Model *m;
    float *base;     /* arena being carved, or NULL while registering */
    size_t offset;   /* floats handed out so far */
    int index;       /* registry entry reached */
    int registering;
    int failed;      /* out of memory while registering */
    int expert;      /* the expert whose tensors are being handed out, or -1 */
} Layout;

static float *take(Layout *L, ParamInit init, int d0, int d1, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* Hands out the next tensor of shape (d0) or (d0, d1) when d1 > 0. */
static float *take(Layout *L, ParamInit init, int d0, int d1, const char *fmt, ...) {
    size_t numel = (size_t)d0 * (size_t)(d1 > 0 ? d1 : 1);
    Model *m = L->m;
    if (L->registering) {
        ParamInfo *grown = realloc(m->params, sizeof(ParamInfo) * (size_t)(m->n_params + 1));
        if (!grown) {
            L->failed = 1;
            return NULL;
        }
        m->params = grown;
        ParamInfo *p = &m->params[m->n_params++];
        memset(p, 0, sizeof *p);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(p->name, sizeof p->name, fmt, ap);
        va_end(ap);
        p->init = init;
        p->ndim = d1 > 0 ? 2 : 1;
        p->shape[0] = d0;
        p->shape[1] = d1 > 0 ? d1 : 0;
        p->offset = L->offset;
        p->numel = numel;
        p->decay = p->ndim == 2;
        p->expert = L->expert;
    } else {
        assert(m->params[L->index].offset == L->offset);
    }
    L->index++;
    float *ptr = L->base ? L->base + L->offset : NULL;
    L->offset += numel;
    return ptr;
}

static void model_layout(Model *m, Weights *w, float *base, int registering, int *failed) {
    const ModelConfig *c = &m->config;
    int C = c->d_model, V = c->vocab, H = c->ffn_hidden;
    int rms = c->norm == NORM_RMSNORM;
    Layout L = {m, base, 0, 0, registering, 0, -1};
    w->wte = take(&L, INIT_NORMAL, V, C, "wte.weight");
    w->wpe = take(&L, INIT_NORMAL, c->context, C, "wpe.weight");
    for (int l = 0; l < c->layers; l++) {
        BlockWeights *b = &w->blocks[l];
        b->ln1w = take(&L, INIT_ONE, C, 0, "h.%d.ln_1.weight", l);
        b->ln1b = rms ? NULL : take(&L, INIT_ZERO, C, 0, "h.%d.ln_1.bias", l);
        b->qkvw = take(&L, INIT_NORMAL, 3 * C, C, "h.%d.attn.qkv.weight", l);
        b->qkvb = take(&L, INIT_ZERO, 3 * C, 0, "h.%d.attn.qkv.bias", l);
        b->attprojw = take(&L, INIT_NORMAL_RESIDUAL, C, C, "h.%d.attn.proj.weight", l);
        b->attprojb = take(&L, INIT_ZERO, C, 0, "h.%d.attn.proj.bias", l);
        b->ln2w = take(&L, INIT_ONE, C, 0, "h.%d.ln_2.weight", l);
        b->ln2b = rms ? NULL : take(&L, INIT_ZERO, C, 0, "h.%d.ln_2.bias", l);
        if (b->moe) {
            const MoeConfig *mc = &c->moe;
            MoeWeights *mw = b->moe;
            const Router *r = router_of(mc->kind);
            int own_router = mc->kind != ROUTER_STRATIFIED && mc->kind != ROUTER_MERGE;
            mw->router = r->has_router && own_router
                             ? take(&L, INIT_NORMAL, mc->experts, C, "h.%d.moe.router.weight", l)
                             : NULL;
            if (mc->kind == ROUTER_MERGE) { /* a gate per linear; token attention */
                int He = mc->hidden[0], r_ = mc->token_attention;
                mw->gate_fc = take(&L, INIT_NORMAL, mc->experts, C, "h.%d.moe.gate_fc.weight", l);
                mw->gate_proj = take(&L, INIT_NORMAL, mc->experts, He, "h.%d.moe.gate_proj.weight", l);
                if (r_ > 0) {
                    int rf = C / r_, rp = He / r_ > 0 ? He / r_ : 1;
                    mw->tfc_down = take(&L, INIT_NORMAL, rf, C, "h.%d.moe.tokatt_fc.down.weight", l);
                    mw->tfc_up = take(&L, INIT_ZERO, C, rf, "h.%d.moe.tokatt_fc.up.weight", l);
                    mw->tpr_down = take(&L, INIT_NORMAL, rp, He, "h.%d.moe.tokatt_proj.down.weight", l);
                    mw->tpr_up = take(&L, INIT_ZERO, He, rp, "h.%d.moe.tokatt_proj.up.weight", l);
                }
            }
            for (int st = 0, m_s = 0; mc->kind == ROUTER_STRATIFIED && st < mc->n_strata;
                 m_s += mc->strata[st++]) {
                mw->routers[st] = take(&L, INIT_NORMAL, mc->experts - m_s, C,
                                       "h.%d.moe.routers.%d.weight", l, st);
                if (st == 0) continue; /* pass 0 starts from the block's ln_2 */
                mw->norm_w[st] = take(&L, INIT_ONE, C, 0, "h.%d.moe.norms.%d.weight", l, st);
                mw->norm_b[st] = rms ? NULL : take(&L, INIT_ZERO, C, 0, "h.%d.moe.norms.%d.bias", l, st);
            }
            for (int e = 0; e < mc->experts; e++) {
                int He = mc->hidden[e];
                L.expert = e;
                mw->fc[e] = take(&L, INIT_NORMAL, He, C, "h.%d.moe.experts.%d.fc.weight", l, e);
                mw->gate[e] = c->activation == ACT_SWIGLU
                                  ? take(&L, INIT_NORMAL, He, C, "h.%d.moe.experts.%d.gate.weight", l, e)
                                  : NULL;
                mw->proj[e] = take(&L, INIT_NORMAL_RESIDUAL, C, He,
                                   "h.%d.moe.experts.%d.proj.weight", l, e);
                mw->fc_bias[e] = mc->bias ? take(&L, INIT_ZERO, He, 0,
                                                 "h.%d.moe.experts.%d.fc.bias", l, e)
                                          : NULL;
                L.expert = -1;
            }
            mw->bias = mc->bias ? take(&L, INIT_ZERO, C, 0, "h.%d.moe.bias", l) : NULL;
            b->fcw = b->fcb = b->gatew = b->projw = b->projb = NULL;
            continue;
        }
        b->fcw = take(&L, INIT_NORMAL, H, C, "h.%d.mlp.fc.weight", l);
        b->fcb = take(&L, INIT_ZERO, H, 0, "h.%d.mlp.fc.bias", l);
        b->gatew = c->activation == ACT_SWIGLU
                       ? take(&L, INIT_NORMAL, H, C, "h.%d.mlp.gate.weight", l)
                       : NULL;
        b->projw = take(&L, INIT_NORMAL_RESIDUAL, C, H, "h.%d.mlp.proj.weight", l);
        b->projb = take(&L, INIT_ZERO, C, 0, "h.%d.mlp.proj.bias", l);
    }
    w->lnfw = take(&L, INIT_ONE, C, 0, "ln_f.weight");
    w->lnfb = rms ? NULL : take(&L, INIT_ZERO, C, 0, "ln_f.bias");
    w->lm_head = c->tied ? w->wte : take(&L, INIT_NORMAL, V, C, "lm_head.weight");
    if (registering) m->num_parameters = L.offset;
    assert(registering || L.offset == m->num_parameters);
    if (failed) *failed = L.failed;
}

static size_t lazy_arena_bytes(size_t n) { return n > 0 ? n * sizeof(float) : 1; }

/* A zeroed, 64-byte aligned arena of n floats. */
static float *arena_alloc(size_t n) {
    size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    float *p = aligned_alloc(64, bytes > 0 ? bytes : 64);
    if (p) memset(p, 0, bytes);
    return p;
}

/* The gradients' and AdamW moments' arenas: zeroed, page-aligned, mapped
** lazily, so that the pages of tensors this process never touches (other
** ranks' experts, Model.owner) take no memory. */
static float *lazy_arena_alloc(size_t n) {
    void *p = mmap(NULL, lazy_arena_bytes(n), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    /* in small pages, as on a host whose transparent huge pages are
    ** `madvise` (Debian's default, where every figure here was measured):
    ** with `always`, a 2 MiB page would bring in its untouched neighbours */
    madvise(p, lazy_arena_bytes(n), MADV_NOHUGEPAGE);
    return p;
}

static void lazy_arena_free(float *p, size_t n) {
    if (p) munmap(p, lazy_arena_bytes(n));
}

/* The hash router's fixed random map, one per layer, derived from the seed. */
static int make_hash_map(Model *m) {
    const ModelConfig *c = &m->config;
    m->hash_map = malloc(sizeof(int) * (size_t)c->layers * c->vocab);
    if (!m->hash_map) return -1;
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    if (!rng) return -1;
    gsl_rng_set(rng, (unsigned long)(c->seed ^ 0x5eedf00dUL));
    for (size_t i = 0; i < (size_t)c->layers * c->vocab; i++)
        m->hash_map[i] = (int)gsl_rng_uniform_int(rng, (unsigned long)c->moe.experts);
    gsl_rng_free(rng);
    return 0;
}

static void initialise(Model *m) {
    const ModelConfig *c = &m->config;
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, (unsigned long)c->seed);
    double resid_std = c->init_std / sqrt(2.0 * c->layers);
    for (int i = 0; i < m->n_params; i++) {
        ParamInfo *p = &m->params[i];
        float *x = m->param_mem + p->offset;
        for (size_t j = 0; j < p->numel; j++) {
            switch (p->init) {
            case INIT_ZERO: x[j] = 0.0f; break;
            case INIT_ONE: x[j] = 1.0f; break;
            case INIT_NORMAL: x[j] = (float)gsl_ran_gaussian(rng, c->init_std); break;
            case INIT_NORMAL_RESIDUAL: x[j] = (float)gsl_ran_gaussian(rng, resid_std); break;
            }
        }
    }
    gsl_rng_free(rng);
}

int model_plan(Model **out, const ModelConfig *config, char *err) {
    *out = NULL;
    if (config_validate(config, err) != 0) return -1;
    Model *m = calloc(1, sizeof *m);
    if (!m) return ml_error(err, "out of memory creating the model");
    m->config = *config;
    config_canonical(&m->config);
    int L = config->layers;
    m->w.blocks = calloc((size_t)L, sizeof(BlockWeights));
    m->g.blocks = calloc((size_t)L, sizeof(BlockWeights));
    m->acts.blocks = calloc((size_t)L, sizeof(BlockActs));
    m->moe = calloc((size_t)(L > 0 ? L : 1), sizeof(MoeLayer));
    int failed = !m->w.blocks || !m->g.blocks || !m->acts.blocks || !m->moe;
    for (int l = 0; l < L && !failed; l++)
        if (config_is_moe_block(config, l)) {
            m->n_moe_layers++;
            m->w.blocks[l].moe = calloc(1, sizeof(MoeWeights));
            m->g.blocks[l].moe = calloc(1, sizeof(MoeWeights));
            failed = !m->w.blocks[l].moe || !m->g.blocks[l].moe;
        }
    if (!failed) model_layout(m, &m->w, NULL, 1, &failed);
    if (failed) {
        model_free(m);
        return ml_error(err, "out of memory creating the model");
    }
    *out = m;
    return 0;
}

int model_allocate(Model *m, char *err) {
    const ModelConfig *c = &m->config;
    int hash = c->moe.enabled && c->moe.kind == ROUTER_HASH;
    size_t map_bytes = hash ? sizeof(int) * (size_t)c->layers * c->vocab : 0;
    char what[96];
    snprintf(what, sizeof what, "the model's %zu parameters", m->num_parameters);
    if (ml_memory_check(m->num_parameters * sizeof(float) + map_bytes, what, err) != 0) return -1;
    if (hash && make_hash_map(m) != 0) return ml_error(err, "out of memory creating the model");
    m->param_mem = arena_alloc(m->num_parameters);
    if (!m->param_mem) return ml_error(err, "out of memory: %zu parameters", m->num_parameters);
    model_layout(m, &m->w, m->param_mem, 0, NULL);
    return 0;
}

int model_create(Model **out, const ModelConfig *config, char *err) {
    Model *m;
    if (model_plan(&m, config, err) != 0) return -1;
    if (model_allocate(m, err) != 0) {
        model_free(m);
        return -1;
    }
    initialise(m);
    *out = m;
    return 0;
}

void model_free(Model *m) {
    if (!m) return;
    for (int l = 0; l < m->config.layers; l++) {
        if (m->w.blocks) free(m->w.blocks[l].moe);
        if (m->g.blocks) free(m->g.blocks[l].moe);
        if (m->moe) moe_layer_free(&m->moe[l]);
    }
    free(m->moe);
    moe_scratch_free(&m->moe_scratch);
    free(m->hash_map);
    free(m->noise);
    if (m->noise_rng) gsl_rng_free((gsl_rng *)m->noise_rng);
    free(m->params);
    free(m->param_mem);
    lazy_arena_free(m->grad_mem, m->num_parameters);
    lazy_arena_free(m->adam_m, m->num_parameters);
    lazy_arena_free(m->adam_v, m->num_parameters);
    free(m->owner);
    free(m->act_mem);
    free(m->scratch_mem);
    free(m->w.blocks);
    free(m->g.blocks);
    free(m->acts.blocks);
    free(m);
}

int model_is_causal(const Model *m) {
    const MoeConfig *mc = &m->config.moe;
    if (!mc->enabled) return 1;
    /* a capacity drops assignments by what the whole batch chose, later
    ** positions included */
    int capacity = router_of(mc->kind)->token_choice && mc->capacity_factor > 0.0f;
    return mc->kind != ROUTER_EXPERT_CHOICE && !(mc->kind == ROUTER_MERGE && mc->segment == 0) &&
           !capacity;
}

int64_t model_active_parameters(const Model *m) {
    int64_t total = (int64_t)m->num_parameters;
    const MoeConfig *mc = &m->config.moe;
    if (!mc->enabled) return total;
    int per_expert_mats = m->config.activation == ACT_SWIGLU ? 3 : 2;
    int64_t experts = 0;
    for (int e = 0; e < mc->experts; e++) experts += (int64_t)per_expert_mats * mc->hidden[e] * m->config.d_model;
    const Router *r = router_of(mc->kind);
    /* threshold and topp: their nominal k, but no more than max_k lets a token take */
    int k = r->nominal_k(mc) < r->slots(mc) ? r->nominal_k(mc) : r->slots(mc);
    /* per MoE layer: all experts out, k of average size in */
    return total - (int64_t)m->n_moe_layers * (experts - experts * k / mc->experts);
}

int model_check_router(const Model *m, const MoeConfig *mc, char *err) {
    ModelConfig c = m->config;
    c.moe = *mc;
    Model *plan;
    char inner[ML_ERRLEN];
    if (!m->config.moe.enabled) return ml_error(err, "a dense model has no router to replace");
    if (model_plan(&plan, &c, inner) != 0) return ml_error(err, "%s", inner);
    const char *mine = config_router_name(m->config.moe.kind), *theirs = config_router_name(mc->kind);
    int rc = 0;
    for (int i = 0; i < plan->n_params && rc == 0; i++) {
        const ParamInfo *p = &plan->params[i];
        int k = model_find_param(m, p->name);
        if (k < 0 || m->params[k].shape[0] != p->shape[0] || m->params[k].shape[1] != p->shape[1])
            rc = ml_error(err, "the %s router needs tensor '%s' (%d x %d), which this %s model %s; "
                          "a model can be evaluated under a router that reads the parameters it "
                          "has (topk, threshold, topp and expert_choice share theirs)", theirs,
                          p->name, p->shape[0], p->ndim == 2 ? p->shape[1] : 1, mine,
                          k < 0 ? "does not have" : "has in another shape");
    }
    if (rc == 0 && plan->n_params != m->n_params)
        rc = ml_error(err, "the %s router reads fewer parameters than this %s model has: it would "
                      "ignore some of what was trained", theirs, mine);
    /* the token map is no parameter: a model without one (the all and oracle
    ** routers have no router tensor either) would pass the check above */
    if (rc == 0 && mc->kind == ROUTER_HASH && !m->hash_map)
        rc = ml_error(err, "the hash router needs a hash model's token map (h.{l}.moe.hash_map), "
                      "which this %s model does not have", mine);
    model_free(plan);
    return rc;
}

int model_find_param(const Model *m, const char *name) {
    for (int i = 0; i < m->n_params; i++)
        if (strcmp(m->params[i].name, name) == 0) return i;
    return -1;
}

/* ------------------------------------------------------------------------ */
/* activations                                                               */

/* Carves n floats from *cursor (or only counts, when base is NULL). */
static float *carve(float *base, size_t *cursor, size_t n) {
    float *p = base ? base + *cursor : NULL;
    *cursor += (n + 15) / 16 * 16; /* keep every buffer 64-byte aligned */
    return p;
}

/* Lays out the activations of B sequences from base into a (or, with base
** NULL, only counts them: then a->blocks may be NULL). Returns floats. */
static size_t acts_layout(const ModelConfig *c, Acts *a, float *base, int B) {
    size_t T = (size_t)c->context, C = (size_t)c->d_model, H = (size_t)c->ffn_hidden;
    size_t NH = (size_t)c->heads, V = (size_t)c->vocab, BT = (size_t)B * T;
    size_t at = 0;
    a->encoded = carve(base, &at, BT * C);
    a->att_scratch = carve(base, &at, attention_scratch(B, (int)T, (int)C));
    for (int l = 0; l < c->layers; l++) {
        BlockActs counting, *b = a->blocks ? &a->blocks[l] : &counting;
        b->ln1 = carve(base, &at, BT * C);
        b->ln1_mean = carve(base, &at, BT);
        b->ln1_rstd = carve(base, &at, BT);
        b->qkv = carve(base, &at, BT * 3 * C);
        b->att = carve(base, &at, (size_t)B * NH * T * T);
        b->atty = carve(base, &at, BT * C);
        b->res2 = carve(base, &at, BT * C);
        b->ln2 = carve(base, &at, BT * C);
        b->ln2_mean = carve(base, &at, BT);
        b->ln2_rstd = carve(base, &at, BT);
        size_t Hb = config_is_moe_block(c, l) ? 0 : H; /* MoE blocks keep theirs in MoeState */
        b->fch = carve(base, &at, BT * Hb);
        b->gate = c->activation == ACT_SWIGLU ? carve(base, &at, BT * Hb) : NULL;
        b->act = carve(base, &at, BT * Hb);
        b->res3 = carve(base, &at, BT * C);
    }
    a->lnf = carve(base, &at, BT * C);
    a->lnf_mean = carve(base, &at, BT);
    a->lnf_rstd = carve(base, &at, BT);
    a->logits = carve(base, &at, BT * V);
    a->probs = carve(base, &at, BT * V);
    a->losses = carve(base, &at, BT);
    /* token ids share the arena: an int is the size of a float */
    a->inputs = (int *)carve(base, &at, BT);
    a->targets = (int *)carve(base, &at, BT);
    return at;
}

static size_t scratch_layout(const ModelConfig *c, Scratch *s, float *base, int B) {
    size_t BT = (size_t)B * c->context, C = (size_t)c->d_model, H = (size_t)c->ffn_hidden;
    size_t at = 0;
    s->dres = carve(base, &at, BT * C);
    s->dln = carve(base, &at, BT * C);
    s->datty = carve(base, &at, BT * C);
    s->dqkv = carve(base, &at, BT * 3 * C);
    s->dact = carve(base, &at, BT * H);
    s->dfch = carve(base, &at, BT * H);
    s->dgate = c->activation == ACT_SWIGLU ? carve(base, &at, BT * H) : NULL;
    s->datt = carve(base, &at, (size_t)B * c->heads * c->context * c->context);
    s->dlogits = carve(base, &at, BT * (size_t)c->vocab);
    /* the largest of the products' weights: lm_head, qkv, fc/proj (gate) */
    size_t pieces = 0, n;
    int d = c->d_model, shapes[3] = {c->vocab, 3 * d, c->ffn_hidden};
    for (int i = 0; i < 3; i++)
        if ((n = matmul_backward_scratch((int)BT, d, shapes[i])) > pieces) pieces = n;
    s->dweight_pieces = pieces ? carve(base, &at, pieces) : NULL;
    return at;
}

void model_memory(const Model *m, int B, int training, ModelMemory *out) {
    const ModelConfig *c = &m->config;
    const MoeConfig *mc = &c->moe;
    Acts a = {0};
    Scratch s;
    memset(out, 0, sizeof *out);
    out->parameters = m->num_parameters * sizeof(float);
    if (training) { /* of the parameters this process trains (Model.owner) */
        size_t here = 0;
        for (int i = 0; i < m->n_params; i++)
            if (m->params[i].expert < 0 || moe_expert_here(mc, m->params[i].expert))
                here += m->params[i].numel;
        out->gradients = here * sizeof(float);
        out->optimizer = 2 * out->gradients;
        out->scratch = scratch_layout(c, &s, NULL, B) * sizeof(float);
    }
    out->activations = acts_layout(c, &a, NULL, B) * sizeof(float);
    if (m->n_moe_layers > 0) {
        /* per MoE layer: router probabilities and, for each of the nominal
        ** experts per token, its hidden activations (twice when training) */
        double hidden = 0.0, N = (double)B * c->context;
        for (int e = 0; e < mc->experts; e++) hidden += mc->hidden[e];
        hidden /= mc->experts;
        int mats = c->activation == ACT_SWIGLU ? 3 : 2;
        double per_layer = N * mc->experts + N * router_of(mc->kind)->nominal_k(mc) * hidden * mats *
                           (training ? 2 : 1) + N * c->d_model * 2;
        out->moe = (size_t)(per_layer * m->n_moe_layers) * sizeof(float);
    }
    out->total = out->parameters + out->gradients + out->optimizer + out->activations +
                 out->scratch + out->moe;
}

size_t model_memory_bytes(const Model *m, int B, int training) {
    ModelMemory mem;
    model_memory(m, B, training, &mem);
    return mem.total;
}

/* The limit checks of a batch of B sequences of T tokens: the token count
** every loop indexes with an int, and the memory it needs. */
static int check_batch(const Model *m, int B, int T, int training, char *err) {
    if ((int64_t)B * T > MODEL_MAX_BATCH_TOKENS)
        return ml_error(err, "a batch of %d x %d tokens is %lld tokens, more than moelab takes in "
                        "one batch (%d); use a smaller batch", B, T, (long long)B * T,
                        MODEL_MAX_BATCH_TOKENS);
    char what[96];
    snprintf(what, sizeof what, "%s a batch of %d sequences of %d tokens",
             training ? "training on" : "running", B, m->config.context);
    return ml_memory_check(model_memory_bytes(m, B, training), what, err);
}

int model_check_batch(const Model *m, int B, int T, int training, char *err) {
    if (B < 1 || T < 1 || T > m->config.context)
        return ml_error(err, "need a batch of at least 1 sequence of 1 to %d tokens (the context), "
                        "got %d x %d", m->config.context, B, T);
    return check_batch(m, B, T, training, err);
}

/* Makes the activation arena large enough for B sequences; grows, never shrinks. */
static int ensure_acts(Model *m, int B, char *err) {
    if (B <= m->max_batch) return 0;
    if (check_batch(m, B, m->config.context, m->grad_mem != NULL, err) != 0) return -1;
    free(m->act_mem);
    free(m->scratch_mem);
    m->scratch_mem = NULL;
    m->act_mem = arena_alloc(acts_layout(&m->config, &m->acts, NULL, B));
    if (!m->act_mem) {
        m->max_batch = 0;
        return ml_error(err, "out of memory for the activations of a batch of %d", B);
    }
    acts_layout(&m->config, &m->acts, m->act_mem, B);
    m->max_batch = B;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* forward and backward                                                      */

static void norm_forward(const ModelConfig *c, float *out, float *mean, float *rstd,
                         const float *inp, const float *w, const float *b, int N) {
    if (c->norm == NORM_RMSNORM)
        rmsnorm_forward(out, rstd, inp, w, N, c->d_model, c->norm_eps);
    else
        layernorm_forward(out, mean, rstd, inp, w, b, N, c->d_model, c->norm_eps);
}

static void norm_backward(const ModelConfig *c, float *dinp, float *dw, float *db,
                          const float *dout, const float *inp, const float *w,
                          const float *mean, const float *rstd, int N) {
    if (c->norm == NORM_RMSNORM)
        rmsnorm_backward(dinp, dw, dout, inp, w, rstd, N, c->d_model);
    else
        layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, c->d_model);
}

void model_seed_noise(Model *m, uint64_t seed) {
    if (!m->noise_rng) m->noise_rng = gsl_rng_alloc(gsl_rng_mt19937);
    if (m->noise_rng) gsl_rng_set((gsl_rng *)m->noise_rng, (unsigned long)(seed ^ 0xa0a0a0a0UL));
}

/* Standard normal noise for one layer's router logits. */
static int fill_noise(Model *m, size_t n, char *err) {
    if (n > m->noise_cap) {
        float *p = realloc(m->noise, sizeof(float) * n);
        if (!p) return ml_error(err, "out of memory for router noise");
        m->noise = p;
        m->noise_cap = n;
    }
    if (!m->noise_rng) {
        gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
        if (!rng) return ml_error(err, "out of memory for router noise");
        gsl_rng_set(rng, (unsigned long)(m->config.seed ^ 0xa0a0a0a0UL));
        m->noise_rng = rng;
    }
    /* the whole batch's draws, of which this shard keeps its slice */
    for (int r = 0; r < (m->shards > 1 ? m->shards : 1); r++)
        for (size_t i = 0; i < n; i++) {
            float z = (float)gsl_ran_gaussian((gsl_rng *)m->noise_rng, 1.0);
            if (r == m->shard) m->noise[i] = z;
        }
    return 0;
}

/* The FLOPs of a forward's products outside the MoE layers: the attention
** projections, the scores and their weighted sum (those attention_forward
** computes), the dense FFNs and the output layer. */
static double dense_flops(const Model *m, int B, int T) {
    const ModelConfig *c = &m->config;
    double N = (double)B * T, C = c->d_model, H = c->ffn_hidden;
    double ffn = 2.0 * N * C * H * (c->activation == ACT_SWIGLU ? 3 : 2);
    double per_layer = 2.0 * N * C * 3 * C + attention_flops(B, T, c->d_model) + 2.0 * N * C * C;
    return c->layers * per_layer + (c->layers - m->n_moe_layers) * ffn + 2.0 * N * C * c->vocab;
}

int model_forward(Model *m, const int *inputs, const int *targets, int B, int T, char *err) {
    const ModelConfig *c = &m->config;
    if (B < 1 || T < 1 || T > c->context)
        return ml_error(err, "forward: need 1 <= T <= context (%d), got B=%d T=%d",
                        c->context, B, T);
    if ((int64_t)B * T > MODEL_MAX_BATCH_TOKENS)
        return check_batch(m, B, T, 0, err);
    for (int i = 0; i < B * T; i++) {
        if (inputs[i] < 0 || inputs[i] >= c->vocab)
            return ml_error(err, "forward: token %d outside the vocabulary (%d)", inputs[i], c->vocab);
        if (targets && (targets[i] < 0 || targets[i] >= c->vocab))
            return ml_error(err, "forward: target %d outside the vocabulary (%d)", targets[i], c->vocab);
    }
    if (ensure_acts(m, B, err) != 0) return -1;
    int C = c->d_model, H = c->ffn_hidden, V = c->vocab, NH = c->heads, N = B * T;
    size_t NC = (size_t)N * C, NHid = (size_t)N * H;
    Acts *a = &m->acts;
    memcpy(a->inputs, inputs, sizeof(int) * (size_t)N);
    if (targets) memcpy(a->targets, targets, sizeof(int) * (size_t)N);
    m->B = B;
    m->T = T;

    m->moe_flops = m->moe_flops_topk = 0.0;
    m->flops = 0.0;
    m->aux_loss = 0.0f;
    memset(m->aux_parts, 0, sizeof m->aux_parts);
    encoder_forward(a->encoded, inputs, m->w.wte, m->w.wpe, B, T, C);
    const float *res = a->encoded;
    for (int l = 0; l < c->layers; l++) {
        const BlockWeights *w = &m->w.blocks[l];
        BlockActs *b = &a->blocks[l];
        norm_forward(c, b->ln1, b->ln1_mean, b->ln1_rstd, res, w->ln1w, w->ln1b, N);
        matmul_forward(b->qkv, b->ln1, w->qkvw, w->qkvb, N, C, 3 * C, 0.0f);
        attention_forward(b->atty, b->att, b->qkv, B, T, C, NH, a->att_scratch);
        memcpy(b->res2, res, sizeof(float) * NC);
        matmul_forward(b->res2, b->atty, w->attprojw, w->attprojb, N, C, C, 1.0f);

        norm_forward(c, b->ln2, b->ln2_mean, b->ln2_rstd, b->res2, w->ln2w, w->ln2b, N);
        if (w->moe) {
            memcpy(b->res3, b->res2, sizeof(float) * NC);
            const float *noise = NULL;
            if (m->training && c->moe.noise > 0.0f) {
                if (fill_noise(m, (size_t)N * c->moe.experts, err) != 0) return -1;
                noise = m->noise;
            }
            /* Gumbel draws (stratified, second = "sample"): by seed, step and layer */
            uint64_t key = c->seed * 0x9e3779b97f4a7c15ULL ^
                           ((uint64_t)(m->training ? m->adam_t + 1 : 0) << 16) ^ (uint64_t)l ^
                           ((uint64_t)m->shard << 48);
            if (moe_layer_forward(&m->moe[l], c, w->moe,
                                  m->hash_map ? m->hash_map + (size_t)l * V : NULL, b->res3, b->ln2,
                                  a->inputs, noise, B, T, key, err) != 0)
                return -1;
            m->moe_flops += m->moe[l].flops;
            m->moe_flops_topk += m->moe[l].flops_topk;
            m->aux_loss += m->moe[l].aux_weighted / m->n_moe_layers;
            for (int k = 0; k < AUX_KINDS; k++) m->aux_parts[k] += m->moe[l].aux[k] / m->n_moe_layers;
            res = b->res3;
            continue;
        }
        matmul_forward(b->fch, b->ln2, w->fcw, w->fcb, N, C, H, 0.0f);
        switch (c->activation) {
        case ACT_GELU: gelu_forward(b->act, b->fch, NHid); break;
        case ACT_RELU: relu_forward(b->act, b->fch, NHid); break;
        case ACT_SWIGLU:
            matmul_forward(b->gate, b->ln2, w->gatew, NULL, N, C, H, 0.0f);
            swiglu_forward(b->act, b->gate, b->fch, NHid);
            break;
        }
        memcpy(b->res3, b->res2, sizeof(float) * NC);
        matmul_forward(b->res3, b->act, w->projw, w->projb, N, H, C, 1.0f);
        res = b->res3;
    }
    norm_forward(c, a->lnf, a->lnf_mean, a->lnf_rstd, res, m->w.lnfw, m->w.lnfb, N);
    matmul_forward(a->logits, a->lnf, m->w.lm_head, NULL, N, C, V, 0.0f);
    m->flops = dense_flops(m, B, T) + m->moe_flops;
    m->mean_loss = crossentropy_forward(a->losses, a->probs, a->logits,
                                        targets ? a->targets : NULL, N, V);
    if (!targets) m->mean_loss = NAN;
    return 0;
}

void model_reduce_aux(Model *m, MoeSum sum, int ranks) {
    const ModelConfig *c = &m->config;
    m->aux_loss = 0.0f;
    memset(m->aux_parts, 0, sizeof m->aux_parts);
    for (int l = 0; l < c->layers; l++) {
        if (!m->w.blocks[l].moe) continue;
        moe_layer_reduce_aux(&m->moe[l], c, sum, ranks);
        m->aux_loss += m->moe[l].aux_weighted / m->n_moe_layers;
        for (int k = 0; k < AUX_KINDS; k++) m->aux_parts[k] += m->moe[l].aux[k] / m->n_moe_layers;
    }
}

static int ensure_moments(Model *m, char *err);
static AdamwStep next_adamw_step(const Model *m, const AdamwOptions *o);

void model_zero_grad(Model *m) {
    if (!m->grad_mem) return;
    for (int i = 0; i < m->n_params; i++)
        if (model_trains(m, i))
            memset(m->grad_mem + m->params[i].offset, 0, sizeof(float) * m->params[i].numel);
}

/* [x, x + n) to zeros: its whole pages back to the system (the arenas are
** private anonymous mappings, so they read as zeros and take no memory
** again), the ends on pages shared with other tensors cleared. */
static void release_floats(float *x, size_t n) {
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = ((uintptr_t)x + page - 1) / page * page, b = (uintptr_t)(x + n) / page * page;
    if (b <= a) {
        memset(x, 0, sizeof(float) * n);
        return;
    }
    memset(x, 0, a - (uintptr_t)x);
    madvise((void *)a, b - a, MADV_DONTNEED);
    memset((void *)b, 0, (uintptr_t)(x + n) - b);
}

void model_release_untrained(Model *m) {
    if (!m->owner) return;
    float *arenas[3] = {m->grad_mem, m->adam_m, m->adam_v};
    for (int i = 0; i < m->n_params;) {
        if (model_trains(m, i)) {
            i++;
            continue;
        }
        int j = i; /* a run of tensors not trained here: contiguous in the arenas */
        size_t n = 0;
        while (j < m->n_params && !model_trains(m, j)) n += m->params[j++].numel;
        for (int a = 0; a < 3; a++)
            if (arenas[a]) release_floats(arenas[a] + m->params[i].offset, n);
        i = j;
    }
}

int model_backward(Model *m, char *err) {
    return model_backward_adamw(m, NULL, err);
}

int model_backward_adamw(Model *m, const AdamwOptions *o, char *err) {
    const ModelConfig *c = &m->config;
    if (m->B == 0 || isnan(m->mean_loss))
        return ml_error(err, "backward: the last forward had no targets");
    MoeUpdate update, *up = NULL;
    m->experts_updated = 0;
    if (o && m->n_moe_layers > 0 && moe_layer_can_update(&c->moe)) {
        if (ensure_moments(m, err) != 0) return -1;
        update = (MoeUpdate){.step = next_adamw_step(m, o), .weight_decay = o->weight_decay,
                             .params = m->param_mem, .m = m->adam_m, .v = m->adam_v};
        up = &update;
    }
    if (!m->grad_mem) {
        m->grad_mem = lazy_arena_alloc(m->num_parameters);
        if (!m->grad_mem) return ml_error(err, "out of memory for the gradients");
        model_layout(m, &m->g, m->grad_mem, 0, NULL);
    }
    if (!m->scratch_mem) {
        Scratch counting;
        m->scratch_mem = arena_alloc(scratch_layout(&m->config, &counting, NULL, m->max_batch));
        if (!m->scratch_mem) return ml_error(err, "out of memory for the backward pass");
        scratch_layout(&m->config, &m->scratch, m->scratch_mem, m->max_batch);
    }
    int B = m->B, T = m->T, N = B * T;
    int C = c->d_model, H = c->ffn_hidden, V = c->vocab, NH = c->heads;
    size_t NHid = (size_t)N * H;
    Acts *a = &m->acts;
    Scratch *s = &m->scratch;

    crossentropy_backward(s->dlogits, a->probs, a->targets, 1.0f / N, N, V);
    matmul_backward(s->dln, m->g.lm_head, NULL, s->dlogits, a->lnf, m->w.lm_head, N, C, V, 0.0f,
                        s->dweight_pieces);
    const float *res_last = c->layers > 0 ? a->blocks[c->layers - 1].res3 : a->encoded;
    memset(s->dres, 0, sizeof(float) * (size_t)N * C);
    norm_backward(c, s->dres, m->g.lnfw, m->g.lnfb, s->dln, res_last, m->w.lnfw,
                  a->lnf_mean, a->lnf_rstd, N);

    for (int l = c->layers - 1; l >= 0; l--) {
        const BlockWeights *w = &m->w.blocks[l];
        BlockWeights *g = &m->g.blocks[l];
        BlockActs *b = &a->blocks[l];
        const float *res_in = l == 0 ? a->encoded : a->blocks[l - 1].res3;

        if (w->moe) { /* res3 = res2 + moe(ln2(res2)) */
            if (moe_layer_backward(&m->moe[l], &m->moe_scratch, c, w->moe, g->moe, s->dln,
                                   s->dres, b->ln2, 1.0f / m->n_moe_layers, up, err) != 0)
                return -1;
        } else {
        /* res3 = res2 + proj(act(fc(ln2(res2)))) */
        matmul_backward(s->dact, g->projw, g->projb, s->dres, b->act, w->projw, N, H, C, 0.0f,
                        s->dweight_pieces);
        switch (c->activation) {
        case ACT_GELU: gelu_backward(s->dfch, s->dact, b->fch, NHid); break;
        case ACT_RELU: relu_backward(s->dfch, s->dact, b->fch, NHid); break;
        case ACT_SWIGLU: swiglu_backward(s->dgate, s->dfch, s->dact, b->gate, b->fch, NHid); break;
        }
        matmul_backward(s->dln, g->fcw, g->fcb, s->dfch, b->ln2, w->fcw, N, C, H, 0.0f,
                        s->dweight_pieces);
        if (c->activation == ACT_SWIGLU)
            matmul_backward(s->dln, g->gatew, NULL, s->dgate, b->ln2, w->gatew, N, C, H, 1.0f,
                            s->dweight_pieces);
        }
        norm_backward(c, s->dres, g->ln2w, g->ln2b, s->dln, b->res2, w->ln2w, b->ln2_mean,
                      b->ln2_rstd, N);

        /* res2 = res_in + attproj(attention(qkv(ln1(res_in)))) */
        matmul_backward(s->datty, g->attprojw, g->attprojb, s->dres, b->atty, w->attprojw, N, C,
                        C, 0.0f, s->dweight_pieces);
        attention_backward(s->dqkv, s->datt, s->datty, b->qkv, b->att, B, T, C, NH, a->att_scratch);
        matmul_backward(s->dln, g->qkvw, g->qkvb, s->dqkv, b->ln1, w->qkvw, N, C, 3 * C, 0.0f,
                        s->dweight_pieces);
        norm_backward(c, s->dres, g->ln1w, g->ln1b, s->dln, res_in, w->ln1w, b->ln1_mean,
                      b->ln1_rstd, N);
    }
    encoder_backward(m->g.wte, m->g.wpe, s->dres, a->inputs, B, T, C);
    m->experts_updated = up != NULL;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* optimisation                                                              */

float model_clip_grad(Model *m, float clip, MoeSum sum) {
    if (!m->grad_mem) return 0.0f;
    /* squares of every rank's tensors, and of this rank's experts (whose
    ** sums the ranks add up); in one process, the arena in order */
    double sq[2] = {0.0, 0.0};
    for (int i = 0; i < m->n_params; i++) {
        if (!model_trains(m, i)) continue;
        const float *g = m->grad_mem + m->params[i].offset;
        double *acc = &sq[m->owner && m->owner[i] >= 0];
        for (size_t j = 0; j < m->params[i].numel; j++) *acc += (double)g[j] * g[j];
    }
    if (m->owner && sum) sum(&sq[1], 1);
    float norm = (float)sqrt(sq[0] + sq[1]);
    if (clip > 0.0f && norm > clip) {
        float scale = clip / norm;
        for (int i = 0; i < m->n_params; i++) {
            if (!model_trains(m, i)) continue;
            float *g = m->grad_mem + m->params[i].offset;
            for (size_t j = 0; j < m->params[i].numel; j++) g[j] *= scale;
        }
    }
    return norm;
}

static int ensure_moments(Model *m, char *err) {
    if (!m->adam_m) m->adam_m = lazy_arena_alloc(m->num_parameters);
    if (!m->adam_v) m->adam_v = lazy_arena_alloc(m->num_parameters);
    if (!m->adam_m || !m->adam_v) return ml_error(err, "out of memory for AdamW's moments");
    return 0;
}

/* The factors of the next step, the (adam_t + 1)-th. */
static AdamwStep next_adamw_step(const Model *m, const AdamwOptions *o) {
    int64_t t = m->adam_t + 1;
    return (AdamwStep){.lr = o->lr, .beta1 = o->beta1, .beta2 = o->beta2, .eps = o->eps,
                       .inv_bc1 = 1.0f / (1.0f - powf(o->beta1, (float)t)),
                       .inv_bc2 = 1.0f / (1.0f - powf(o->beta2, (float)t))};
}

int model_adamw_step(Model *m, float lr, float beta1, float beta2, float eps,
                     float weight_decay, char *err) {
    if (!m->grad_mem) return ml_error(err, "AdamW step before any backward pass");
    if (ensure_moments(m, err) != 0) return -1;
    AdamwOptions o = {lr, beta1, beta2, eps, weight_decay};
    AdamwStep step = next_adamw_step(m, &o);
    int skip_experts = m->experts_updated; /* by model_backward_adamw */
    m->experts_updated = 0;
    m->adam_t++;
    /* one parallel region for all tensors: a model with many experts has
    ** hundreds of small ones; each thread takes its contiguous share of each.
    ** The gradient is zeroed once consumed, which saves the next step a pass
    ** over the arena. */
#pragma omp parallel
    {
        size_t tid = (size_t)omp_get_thread_num(), nth = (size_t)omp_get_num_threads();
        for (int i = 0; i < m->n_params; i++) {
            const ParamInfo *p = &m->params[i];
            /* an expert's matrices (fc, gate, proj): an expert's 2-d tensors */
            if (!model_trains(m, i) || (skip_experts && p->expert >= 0 && p->ndim == 2)) continue;
            size_t lo = p->numel * tid / nth, hi = p->numel * (tid + 1) / nth, at = p->offset + lo;
            adamw_update(m->param_mem + at, m->adam_m + at, m->adam_v + at, m->grad_mem + at,
                         hi - lo, &step, p->decay ? weight_decay : 0.0f);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* evaluation and sampling                                                   */

/* A forward of this process alone: every rank holds every expert's weights
** between training calls (moe/parallel.c), so a sequence's loss or a
** sample needs no exchange under expert parallelism, and a script may ask
** for one on one rank only. */
static int forward_here(Model *m, const int *inputs, const int *targets, int B, int T, char *err) {
    int parallel = m->config.moe.parallel_experts, shard = m->shard, shards = m->shards;
    m->config.moe.parallel_experts = 0;
    m->shard = 0; /* and as one process's: the same on every rank (Gumbel draws) */
    m->shards = 1;
    int rc = model_forward(m, inputs, targets, B, T, err);
    m->config.moe.parallel_experts = parallel;
    m->shard = shard;
    m->shards = shards;
    return rc;
}

int model_sequence_losses(Model *m, const int *tokens, int n, float *losses, char *err) {
    float mean;
    if (model_sequence_loss(m, tokens, n, &mean, err) != 0) return -1;
    memcpy(losses, m->acts.losses, sizeof(float) * (size_t)(n - 1));
    return 0;
}

int model_sequence_loss(Model *m, const int *tokens, int n, float *loss, char *err) {
    if (n < 2 || n > m->config.context + 1)
        return ml_error(err, "a sequence needs 2 to context + 1 = %d tokens, got %d",
                        m->config.context + 1, n);
    if (forward_here(m, tokens, tokens + 1, 1, n - 1, err) != 0) return -1;
    *loss = m->mean_loss;
    return 0;
}

int model_sample(Model *m, const int *prompt, int n_prompt, int n_new, float temperature,
                 int top_k, uint64_t seed, int *out, char *err) {
    const ModelConfig *c = &m->config;
    int V = c->vocab;
    if (n_prompt < 1) return ml_error(err, "sample: the prompt needs at least one token");
    if (n_new < 0) return ml_error(err, "sample: tokens must be >= 0, got %d", n_new);
    if (!(temperature >= 0.0f) || !isfinite(temperature))
        return ml_error(err, "sample: temperature must be a number >= 0, got %g", temperature);
    if (top_k < 0 || top_k > V) top_k = 0;
    float *p = malloc(sizeof(float) * (size_t)V);
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    if (!p || !rng) {
        free(p);
        if (rng) gsl_rng_free(rng);
        return ml_error(err, "out of memory while sampling");
    }
    gsl_rng_set(rng, (unsigned long)seed);
    memcpy(out, prompt, sizeof(int) * (size_t)n_prompt);
    int rc = 0;
    for (int i = 0; i < n_new; i++) {
        int len = n_prompt + i;
        int start = len > c->context ? len - c->context : 0;
        int T = len - start;
        if (forward_here(m, out + start, NULL, 1, T, err) != 0) {
            rc = -1;
            break;
        }
        const float *logits = m->acts.logits + (size_t)(T - 1) * V;
        int next = 0;
        if (temperature == 0.0f) {
            for (int v = 1; v < V; v++)
                if (logits[v] > logits[next]) next = v;
        } else {
            /* keep the top_k largest logits (all when 0), softmax at temperature */
            float cutoff = -INFINITY;
            if (top_k > 0) {
                for (int v = 0; v < V; v++) p[v] = logits[v];
                for (int k = 0; k < top_k; k++) { /* partial selection */
                    int best = k;
                    for (int v = k + 1; v < V; v++)
                        if (p[v] > p[best]) best = v;
                    float t = p[k]; p[k] = p[best]; p[best] = t;
                }
                cutoff = p[top_k - 1];
            }
            float maxv = -INFINITY;
            for (int v = 0; v < V; v++)
                if (logits[v] > maxv) maxv = logits[v];
            double sum = 0.0;
            for (int v = 0; v < V; v++) {
                p[v] = logits[v] >= cutoff ? expf((logits[v] - maxv) / temperature) : 0.0f;
                sum += p[v];
            }
            double r = gsl_rng_uniform(rng) * sum, acc = 0.0;
            next = -1;
            for (int v = 0; v < V; v++) {
                if (p[v] == 0.0f) continue;
                acc += p[v];
                next = v;
                if (acc > r) break;
            }
            if (next < 0) next = 0;
        }
        out[len] = next;
    }
    free(p);
    gsl_rng_free(rng);
    return rc;
}
