/*
** config.c — defaults, validation and the JSON form of ModelConfig.
**
** Every configuration, from a Lua table or from a checkpoint, passes through
** config_from_json, so the messages a researcher sees about a bad key or value
** are all written here: an unknown key is named together with the nearest valid
** one, and an impossible value says which value and why.
*/
#include "config.h"

#include <assert.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "moe/router.h"

void config_defaults(ModelConfig *c) {
    memset(c, 0, sizeof *c);
    c->vocab = 256;
    c->context = 128;
    c->layers = 4;
    c->d_model = 128;
    c->heads = 4;
    c->norm = NORM_LAYERNORM;
    c->activation = ACT_GELU;
    c->tied = 0;
    c->seed = 1;
    c->ffn_hidden = 0; /* 4 × d_model, resolved by config_from_json */
    c->norm_eps = 1e-5f;
    c->init_std = 0.02f;
    MoeConfig *m = &c->moe;
    m->enabled = 0;
    m->every = 1;
    m->experts = 8;        /* hidden 0: d_model, resolved by config_from_json */
    m->kind = ROUTER_TOPK;
    m->k = 2;
    m->p = 0.9f;
    m->max_k = 0;
    m->normalize = 1;
    m->capacity_factor = 0.0f;
    m->min_capacity = 4;
    m->noise = 0.0f;
    m->sparsity_eps = -1.0f; /* 0 for ReLU, 0.01 otherwise */
}

static const char *const router_names[] = {"topk",       "threshold", "topp", "expert_choice",
                                           "hash",       "stratified", "merge", "all",
                                           "similarity", "learned", "oracle"};

const char *config_router_name(RouterKind k) {
    return (unsigned)k < sizeof router_names / sizeof router_names[0] ? router_names[k] : "?";
}

int config_is_moe_block(const ModelConfig *c, int l) {
    return c->moe.enabled && (l + 1) % c->moe.every == 0;
}

const char *config_norm_name(NormKind k) { return k == NORM_RMSNORM ? "rmsnorm" : "layernorm"; }

const char *config_activation_name(ActKind k) {
    return k == ACT_RELU ? "relu" : k == ACT_SWIGLU ? "swiglu" : "gelu";
}

/* ------------------------------------------------------------------------ */
/* numeric keys                                                              */

/* Every numeric key and the values it takes: one table for reading JSON, for
** checking a ModelConfig and for the message about a value that JSON cannot
** carry (lmoelab.c meets NaN and infinities before the JSON). Real keys are
** float32 fields: the value as a float must be in range, so 1e300 (inf) and,
** where 0 is excluded, 1e-300 (0) are refused. List elements (moe.hidden[2],
** moe.router.strata[1]) take the range of their list. */
typedef struct {
    const char *key;
    int integer;
    double min, max;   /* FLT_MAX as max: no bound but float32's */
    int open_min;      /* min itself is excluded */
    const char *note;  /* what a special value means, or "" */
} NumberKey;

static const NumberKey number_keys[] = {
    {"vocab", 1, 2, 1 << 24, 0, ""},
    {"context", 1, 1, 1 << 16, 0, ""},
    {"layers", 1, 0, 1024, 0, ""},
    {"d_model", 1, 1, 1 << 16, 0, ""},
    {"heads", 1, 1, 1 << 12, 0, ""},
    {"seed", 1, 0, 9007199254740991.0, 0, ""}, /* 2^53 - 1: exact in JSON */
    {"norm_eps", 0, 0, FLT_MAX, 1, ""},
    {"init_std", 0, 0, FLT_MAX, 0, ""},
    {"ffn.hidden", 1, 1, 1 << 20, 0, ""},
    {"moe.every", 1, 1, 1024, 0, ""},
    {"moe.experts", 1, 1, MOE_MAX_EXPERTS, 0, ""},
    {"moe.hidden", 1, 1, 1 << 20, 0, ""},
    {"moe.sparsity_eps", 0, 0, FLT_MAX, 0, ""},
    {"moe.placement", 1, 0, MOE_MAX_RANKS - 1, 0, " (a rank)"},
    {"moe.router.k", 1, 1, MOE_MAX_EXPERTS, 0, ""},
    {"moe.router.p", 0, 0, 1, 1, " (the threshold t)"},
    {"moe.router.max_k", 1, 0, MOE_MAX_EXPERTS, 0, " (0 = no cap)"},
    {"moe.router.capacity_factor", 0, 0, MOE_MAX_EXPERTS, 0, " (0 = dropless)"},
    {"moe.router.min_capacity", 1, 0, 1 << 30, 0, ""},
    {"moe.router.noise", 0, 0, FLT_MAX, 0, ""},
    {"moe.router.strata", 1, 1, MOE_MAX_EXPERTS, 0, ""},
    {"moe.router.segment", 1, 0, 1 << 16, 0, " (0 = the whole sequence)"},
    {"moe.router.token_attention", 1, 0, 1 << 20, 0, " (0 = off)"},
    {"moe.aux.balance", 0, 0, FLT_MAX, 0, " (0 = off)"},
    {"moe.aux.z", 0, 0, FLT_MAX, 0, " (0 = off)"},
    {"moe.aux.cv2", 0, 0, FLT_MAX, 0, " (0 = off)"},
    {"moe.aux.p_penalty", 0, 0, FLT_MAX, 0, " (0 = off)"},
    {"moe.aux.entropy", 0, 0, FLT_MAX, 0, " (0 = off)"},
};

/* The entry of path ("moe.hidden[3]" is moe.hidden's), or NULL. */
static const NumberKey *number_key(const char *path) {
    size_t n = strcspn(path, "[");
    for (size_t i = 0; i < sizeof number_keys / sizeof number_keys[0]; i++)
        if (strlen(number_keys[i].key) == n && strncmp(number_keys[i].key, path, n) == 0)
            return &number_keys[i];
    return NULL;
}

static int number_ok(const NumberKey *k, double x) {
    if (k->integer) return x == floor(x) && x >= k->min && x <= k->max;
    float f = (float)x;
    return isfinite(f) && (k->open_min ? f > k->min : f >= k->min) && f <= k->max;
}

/* "an integer between 1 and 256", "a number in (0, 1]", "a number >= 0" */
static const char *range_text(const NumberKey *k, char *buf, size_t n) {
    char lo[ML_NUMLEN], hi[ML_NUMLEN];
    ml_number(lo, k->min);
    ml_number(hi, k->max);
    if (k->integer) snprintf(buf, n, "an integer between %s and %s", lo, hi);
    else if (k->max == FLT_MAX) snprintf(buf, n, "a number %s %s", k->open_min ? ">" : ">=", lo);
    else snprintf(buf, n, "a number in %c%s, %s]", k->open_min ? '(' : '[', lo, hi);
    return buf;
}

/* The message for value x of path, which k refuses. */
static int number_error(const NumberKey *k, const char *path, double x, char *err) {
    char range[96], v[ML_NUMLEN];
    range_text(k, range, sizeof range);
    ml_number(v, x);
    const char *why = "";
    if (!k->integer && isfinite(x) && isinf((float)x)) why = " (a float32 holds at most 3.4e+38)";
    else if (!k->integer && x != 0 && (float)x == 0) why = " (as a float32 it is 0)";
    return ml_error(err, "'%s' must be %s%s, got %s%s", path, range, k->note, v, why);
}

/* Checks x as the value of path, a key of number_keys. */
static int check_number(const char *path, double x, char *err) {
    const NumberKey *k = number_key(path);
    assert(k);
    return number_ok(k, x) ? 0 : number_error(k, path, x, err);
}

int config_number_error(const char *path, double x, char *err) {
    const NumberKey *k = number_key(path);
    if (k) return number_error(k, path, x, err);
    char v[ML_NUMLEN];
    return ml_error(err, "'%s' cannot be %s: a configuration holds finite numbers only", path,
                    ml_number(v, x));
}

/* ------------------------------------------------------------------------ */
/* validation                                                                */

int config_validate(const ModelConfig *c, char *err) {
    const struct { const char *key; double value; } numbers[] = {
        {"vocab", c->vocab},         {"context", c->context},       {"layers", c->layers},
        {"d_model", c->d_model},     {"heads", c->heads},           {"seed", (double)c->seed},
        {"norm_eps", c->norm_eps},   {"init_std", c->init_std},     {"ffn.hidden", c->ffn_hidden},
    };
    for (size_t i = 0; i < sizeof numbers / sizeof numbers[0]; i++)
        if (check_number(numbers[i].key, numbers[i].value, err)) return -1;
    if (c->d_model % c->heads != 0)
        return ml_error(err, "heads = %d does not divide d_model = %d", c->heads, c->d_model);
    const MoeConfig *m = &c->moe;
    if (!m->enabled) return 0;
    const struct { const char *key; double value; } moe_numbers[] = {
        {"moe.experts", m->experts},
        {"moe.every", m->every},
        {"moe.router.p", m->p},
        {"moe.router.max_k", m->max_k},
        {"moe.router.capacity_factor", m->capacity_factor},
        {"moe.router.min_capacity", m->min_capacity},
        {"moe.router.noise", m->noise},
        {"moe.router.segment", m->segment},
        {"moe.router.token_attention", m->token_attention},
        {"moe.aux.balance", m->aux_balance},
        {"moe.aux.z", m->aux_z},
        {"moe.aux.cv2", m->aux_cv2},
        {"moe.aux.p_penalty", m->aux_p_penalty},
        {"moe.aux.entropy", m->aux_entropy},
        {"moe.sparsity_eps", m->sparsity_eps},
    };
    for (size_t i = 0; i < sizeof moe_numbers / sizeof moe_numbers[0]; i++)
        if (check_number(moe_numbers[i].key, moe_numbers[i].value, err)) return -1;
    if (m->every > c->layers)
        return ml_error(err, "'moe.every' = %d must be at most layers = %d: the model would have "
                        "no MoE layer", m->every, c->layers);
    char path[64];
    for (int e = 0; e < m->experts; e++) {
        snprintf(path, sizeof path, "moe.hidden[%d]", e + 1);
        if (check_number(path, m->hidden[e], err)) return -1;
    }
    if ((router_of(m->kind)->keys(m) & ROUTER_KEY_K) && (m->k < 1 || m->k > m->experts))
        return ml_error(err, "'moe.router.k' = %d must be between 1 and moe.experts = %d", m->k,
                        m->experts);
    if (m->max_k > m->experts)
        return ml_error(err, "'moe.router.max_k' must be between 0 (no cap) and moe.experts = %d, "
                        "got %d", m->experts, m->max_k);
    if (m->parallel_experts && m->kind == ROUTER_MERGE)
        return ml_error(err, "'moe.parallel' = \"experts\" needs experts that run apart: merged "
                        "experts run as one FFN");
    if (m->parallel_experts && m->kind == ROUTER_ORACLE)
        return ml_error(err, "'moe.parallel' = \"experts\" needs experts that run apart: the "
                        "oracle router reads every expert's activations of a token");
    if (m->n_placement && !m->parallel_experts)
        return ml_error(err, "'moe.placement' places experts on ranks: it needs moe.parallel = "
                        "\"experts\"");
    if (m->bias && (m->kind == ROUTER_MERGE || m->kind == ROUTER_STRATIFIED))
        return ml_error(err, "'moe.bias' (expert biases) is not supported with %s experts",
                        m->kind == ROUTER_MERGE ? "merged" : "stratified");
    if ((m->kind == ROUTER_ALL || m->kind == ROUTER_ORACLE) && (m->aux_balance > 0 || m->aux_z > 0 || m->aux_cv2 > 0 ||
                                  m->aux_p_penalty > 0 || m->aux_entropy > 0))
        return ml_error(err, "'moe.router.kind' = \"%s\" runs every expert without a router: "
                        "moe.aux must be 0", config_router_name(m->kind));
    if (m->kind == ROUTER_HASH && (m->aux_balance > 0 || m->aux_z > 0 || m->aux_cv2 > 0 ||
                                   m->aux_p_penalty > 0 || m->aux_entropy > 0 || m->noise > 0))
        return ml_error(err, "'moe.router.kind' = \"hash\" has no router probabilities: "
                        "moe.aux and moe.router.noise must be 0");
    if (m->kind == ROUTER_STRATIFIED) {
        int sum = 0;
        for (int i = 0; i < m->n_strata && i < MOE_MAX_EXPERTS; i++) {
            snprintf(path, sizeof path, "moe.router.strata[%d]", i + 1);
            if (check_number(path, m->strata[i], err)) return -1;
            sum += m->strata[i];
        }
        if (m->n_strata < 1 || m->n_strata > MOE_MAX_EXPERTS || sum != m->experts)
            return ml_error(err, "'moe.router.strata' must split the %d experts into strata "
                            "(sizes that add up to %d), got sizes adding up to %d", m->experts,
                            m->experts, sum);
    }
    if (m->kind == ROUTER_MERGE) {
        for (int e = 1; e < m->experts; e++)
            if (m->hidden[e] != m->hidden[0])
                return ml_error(err, "'moe.router.kind' = \"merge\" merges the experts into one: "
                                "they need one hidden size (moe.hidden lists %d and %d)",
                                m->hidden[0], m->hidden[e]);
        if (c->activation == ACT_SWIGLU)
            return ml_error(err, "'moe.router.kind' = \"merge\" merges fc and proj: use "
                            "activation \"gelu\" or \"relu\", not \"swiglu\"");
        if (m->segment > c->context)
            return ml_error(err, "'moe.router.segment' = %d is longer than the context (%d)",
                            m->segment, c->context);
        if (m->token_attention > c->d_model)
            return ml_error(err, "'moe.router.token_attention' = %d leaves d_model = %d no width "
                            "(it must be at most d_model)", m->token_attention, c->d_model);
        if (m->aux_balance > 0 || m->aux_z > 0 || m->aux_cv2 > 0 || m->aux_p_penalty > 0 ||
            m->aux_entropy > 0)
            return ml_error(err, "'moe.router.kind' = \"merge\" gates whole sequences, not "
                            "tokens: moe.aux is not supported for it");
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* nearest key                                                               */

static int levenshtein(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63) return 64;
    int row[64];
    for (size_t j = 0; j <= lb; j++) row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int up = row[j];
            int cost = a[i - 1] == b[j - 1] ? 0 : 1;
            int best = diag + cost;
            if (row[j] + 1 < best) best = row[j] + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

const char *config_nearest_key(const char *key, const char *const *keys, int n) {
    const char *best = NULL;
    int best_d = 1 << 30;
    for (int i = 0; i < n; i++) {
        int d = levenshtein(key, keys[i]);
        if (d < best_d) {
            best_d = d;
            best = keys[i];
        }
    }
    return best;
}

/* ------------------------------------------------------------------------ */
/* reading                                                                   */

static const char *const top_keys[] = {
    "vocab", "context", "layers", "d_model", "heads", "norm", "activation",
    "tied",  "seed",    "ffn",    "moe",     "norm_eps", "init_std",
};
static const char *const ffn_keys[] = {"hidden"};

/* Every key of obj must be in keys; `where` prefixes the message ("", "ffn."). */
static int check_keys(const JsonValue *obj, const char *const *keys, int n, const char *where,
                      char *err) {
    for (size_t i = 0; i < json_object_len(obj); i++) {
        const char *k = json_object_key_at(obj, i);
        int known = 0;
        for (int j = 0; j < n && !known; j++) known = strcmp(k, keys[j]) == 0;
        if (!known)
            return ml_error(err, "unknown configuration key '%s%s' (did you mean '%s%s'?)", where,
                            k, where, config_nearest_key(k, keys, n));
    }
    return 0;
}

/* The value v of path (a key of number_keys) into *out; v is a number in its range. */
static int read_number(const JsonValue *v, const char *path, double *out, char *err) {
    const NumberKey *k = number_key(path);
    assert(k);
    if (json_type(v) != JSON_NUMBER) {
        char range[96];
        return ml_error(err, "'%s' must be %s%s, got %s", path, range_text(k, range, sizeof range),
                        k->note, json_type_name(json_type(v)));
    }
    if (!number_ok(k, json_number(v))) return number_error(k, path, json_number(v), err);
    *out = json_number(v);
    return 0;
}

/* Key `key` of obj, when present, into *out; `where` is the path of obj ("", "moe."). */
static int read_int(const JsonValue *obj, const char *key, const char *where, long *out,
                    char *err) {
    const JsonValue *v = json_object_get(obj, key);
    char path[64];
    snprintf(path, sizeof path, "%s%s", where, key);
    double x;
    if (!v) return 0;
    if (read_number(v, path, &x, err)) return -1;
    *out = (long)x;
    return 0;
}

static int read_float(const JsonValue *obj, const char *key, const char *where, float *out,
                      char *err) {
    const JsonValue *v = json_object_get(obj, key);
    char path[64];
    snprintf(path, sizeof path, "%s%s", where, key);
    double x;
    if (!v) return 0;
    if (read_number(v, path, &x, err)) return -1;
    *out = (float)x;
    return 0;
}

static int read_bool(const JsonValue *obj, const char *key, const char *where, int *out,
                     char *err) {
    const JsonValue *v = json_object_get(obj, key);
    if (!v) return 0;
    if (json_type(v) != JSON_BOOL)
        return ml_error(err, "'%s%s' must be true or false, got %s", where, key,
                        json_type_name(json_type(v)));
    *out = json_bool(v);
    return 0;
}

static int read_choice(const JsonValue *obj, const char *key, const char *where,
                       const char *const *names, int n, int *out, char *err) {
    const JsonValue *v = json_object_get(obj, key);
    if (!v) return 0;
    const char *s = json_string(v);
    if (!s)
        return ml_error(err, "'%s%s' must be a string, got %s", where, key,
                        json_type_name(json_type(v)));
    for (int i = 0; i < n; i++)
        if (strcmp(s, names[i]) == 0) {
            *out = i;
            return 0;
        }
    char list[256] = "";
    for (int i = 0; i < n; i++) {
        strncat(list, i ? ", " : "", sizeof list - strlen(list) - 1);
        strncat(list, names[i], sizeof list - strlen(list) - 1);
    }
    return ml_error(err, "'%s%s' = \"%s\" is not one of %s", where, key, s, list);
}

static const char *const moe_keys[] = {"every", "experts", "hidden", "router", "aux", "sparsity_eps",
                                       "bias", "parallel", "placement"};
static const char *const router_keys[] = {
    "kind",  "k",      "p",      "max_k",   "normalize",      "capacity_factor", "min_capacity",
    "noise", "strata", "second", "segment", "token_attention", "select"};
static const char *const aux_keys[] = {"balance", "z", "cv2", "p_penalty", "entropy"};
#define NKEYS(a) ((int)(sizeof(a) / sizeof(a)[0]))

/* The keys of `keys` (ROUTER_KEY_* bits) as a list, for messages. */
static void router_key_list(char *buf, size_t n, unsigned keys) {
    buf[0] = 0;
    for (int i = 0; i < ROUTER_KEY_COUNT; i++)
        if (keys & (1u << i)) {
            strncat(buf, buf[0] ? ", " : "", n - strlen(buf) - 1);
            strncat(buf, router_key_name(i), n - strlen(buf) - 1);
        }
}

/* The `moe.router` table, over what m holds, into m; strict as read_moe. */
static int read_router(MoeConfig *m, const JsonValue *router, int strict, char *err) {
    long v;
    if (json_type(router) != JSON_OBJECT)
        return ml_error(err, "'moe.router' must be a table, for example { kind = \"topk\", k = 2 }");
    if (check_keys(router, router_keys, NKEYS(router_keys), "moe.router.", err)) return -1;
    int kind = (int)m->kind;
    if (read_choice(router, "kind", "moe.router.", router_names, NKEYS(router_names), &kind, err))
        return -1;
    m->kind = (RouterKind)kind;
    v = m->k;
    if (read_int(router, "k", "moe.router.", &v, err)) return -1;
    m->k = (int)v;
    v = m->max_k;
    if (read_int(router, "max_k", "moe.router.", &v, err)) return -1;
    m->max_k = (int)v;
    v = m->min_capacity;
    if (read_int(router, "min_capacity", "moe.router.", &v, err)) return -1;
    m->min_capacity = (int)v;
    if (read_float(router, "p", "moe.router.", &m->p, err) ||
        read_float(router, "capacity_factor", "moe.router.", &m->capacity_factor, err) ||
        read_float(router, "noise", "moe.router.", &m->noise, err) ||
        read_bool(router, "normalize", "moe.router.", &m->normalize, err))
        return -1;
    const JsonValue *strata = json_object_get(router, "strata");
    if (strata) {
        size_t n = json_array_len(strata);
        if (json_type(strata) != JSON_ARRAY || n < 1 || n > MOE_MAX_EXPERTS)
            return ml_error(err, "'moe.router.strata' must be a list of stratum sizes, for "
                            "example { 4, 4 }");
        for (size_t i = 0; i < n; i++) {
            char path[64];
            double x;
            snprintf(path, sizeof path, "moe.router.strata[%zu]", i + 1);
            if (read_number(json_array_at(strata, i), path, &x, err)) return -1;
            m->strata[i] = (int)x;
        }
        m->n_strata = (int)n;
    }
    v = m->segment;
    if (read_int(router, "segment", "moe.router.", &v, err)) return -1;
    m->segment = (int)v;
    v = m->token_attention;
    if (read_int(router, "token_attention", "moe.router.", &v, err)) return -1;
    m->token_attention = (int)v;
    static const char *const selects[] = {"topk", "threshold"};
    if (read_choice(router, "select", "moe.router.", selects, 2, &m->select_threshold, err))
        return -1;
    static const char *const seconds[] = {"max", "sample"};
    if (read_choice(router, "second", "moe.router.", seconds, 2, &m->second_sample, err))
        return -1;
    unsigned used = router_of(m->kind)->keys(m);
    MoeConfig limited = *m; /* what it reads with a capacity */
    limited.capacity_factor = 1.0f;
    unsigned with_capacity = router_of(m->kind)->keys(&limited);
    for (int i = 0; strict && i < ROUTER_KEY_COUNT; i++) {
        if ((used & (1u << i)) || !json_object_get(router, router_key_name(i))) continue;
        char list[256];
        router_key_list(list, sizeof list, used);
        int dropless = m->capacity_factor == 0.0f && (with_capacity & (1u << i));
        return ml_error(err, "'moe.router.%s' is not read by the %s router%s (it reads %s)",
                        router_key_name(i), config_router_name(m->kind),
                        dropless ? " when dropless" : "", list[0] ? list : "no other key");
    }
    return 0;
}

/* The `moe` table: over the defaults, into c->moe. A router key that the
** router does not read under this configuration is refused when strict (a
** user's table), ignored otherwise (checkpoints written before the routers
** stored only their own keys). */
static int read_moe(ModelConfig *c, const JsonValue *moe, int strict, char *err) {
    MoeConfig *m = &c->moe;
    if (json_type(moe) != JSON_OBJECT)
        return ml_error(err, "'moe' must be a table, for example { experts = 8, hidden = 128 }");
    if (check_keys(moe, moe_keys, NKEYS(moe_keys), "moe.", err)) return -1;
    m->enabled = 1;
    long v = m->every;
    if (read_int(moe, "every", "moe.", &v, err)) return -1;
    m->every = (int)v;
    v = m->experts;
    if (read_int(moe, "experts", "moe.", &v, err)) return -1;
    m->experts = (int)v;
    const JsonValue *hidden = json_object_get(moe, "hidden");
    memset(m->hidden, 0, sizeof m->hidden);
    if (json_type(hidden) == JSON_ARRAY) {
        size_t n = json_array_len(hidden);
        if (n != (size_t)m->experts)
            return ml_error(err, "'moe.hidden' lists %zu sizes for %d experts: give one per "
                            "expert, or one number for all", n, m->experts);
        for (size_t e = 0; e < n; e++) {
            char path[64];
            double x;
            snprintf(path, sizeof path, "moe.hidden[%zu]", e + 1);
            if (read_number(json_array_at(hidden, e), path, &x, err)) return -1;
            m->hidden[e] = (int)x;
        }
        m->hidden_list = 1;
    } else if (hidden) {
        long h = 0;
        if (read_int(moe, "hidden", "moe.", &h, err)) return -1;
        for (int e = 0; e < m->experts; e++) m->hidden[e] = (int)h;
        m->hidden_list = 0;
    }
    if (read_float(moe, "sparsity_eps", "moe.", &m->sparsity_eps, err)) return -1;
    if (read_bool(moe, "bias", "moe.", &m->bias, err)) return -1;
    static const char *const parallels[] = {"data", "experts"};
    if (read_choice(moe, "parallel", "moe.", parallels, 2, &m->parallel_experts, err)) return -1;
    const JsonValue *placement = json_object_get(moe, "placement");
    if (placement && json_type(placement) != JSON_NULL) {
        size_t n = json_type(placement) == JSON_ARRAY ? json_array_len(placement) : 0;
        if (n != (size_t)m->experts)
            return ml_error(err, "'moe.placement' must list a rank for each of the %d experts, "
                            "for example { 0, 0, 1, 1 }", m->experts);
        for (size_t e = 0; e < n; e++) {
            char path[64];
            double x;
            snprintf(path, sizeof path, "moe.placement[%zu]", e + 1);
            if (read_number(json_array_at(placement, e), path, &x, err)) return -1;
            m->placement[e] = (int)x;
        }
        m->n_placement = (int)n;
    }

    const JsonValue *router = json_object_get(moe, "router");
    if (router && read_router(m, router, strict, err)) return -1;
    const JsonValue *aux = json_object_get(moe, "aux");
    if (aux) {
        if (json_type(aux) != JSON_OBJECT)
            return ml_error(err, "'moe.aux' must be a table, for example { balance = 0.01 }");
        if (check_keys(aux, aux_keys, NKEYS(aux_keys), "moe.aux.", err)) return -1;
        if (read_float(aux, "balance", "moe.aux.", &m->aux_balance, err) ||
            read_float(aux, "z", "moe.aux.", &m->aux_z, err) ||
            read_float(aux, "cv2", "moe.aux.", &m->aux_cv2, err) ||
            read_float(aux, "p_penalty", "moe.aux.", &m->aux_p_penalty, err) ||
            read_float(aux, "entropy", "moe.aux.", &m->aux_entropy, err))
            return -1;
    }
    return 0;
}

static int config_parse(ModelConfig *c, const char *json, size_t len, int strict, char *err) {
    char jerr[ML_ERRLEN];
    JsonValue *root = NULL;
    if (json_parse(json, len, &root, jerr) != 0)
        return ml_error(err, "configuration is not valid JSON: %s", jerr);
    int rc = -1;
    long v;
    if (json_type(root) != JSON_OBJECT) {
        ml_error(err, "configuration must be a JSON object");
        goto done;
    }
    if (check_keys(root, top_keys, sizeof top_keys / sizeof top_keys[0], "", err)) goto done;
#define INT_KEY(key, field)                                                             \
    v = c->field;                                                                       \
    if (read_int(root, key, "", &v, err)) goto done;                                    \
    c->field = (int)v;
    INT_KEY("vocab", vocab)
    INT_KEY("context", context)
    INT_KEY("layers", layers)
    INT_KEY("d_model", d_model)
    INT_KEY("heads", heads)
#undef INT_KEY
    v = (long)c->seed;
    if (read_int(root, "seed", "", &v, err)) goto done;
    c->seed = (uint64_t)v;
    static const char *const norms[] = {"layernorm", "rmsnorm"};
    static const char *const acts[] = {"gelu", "relu", "swiglu"};
    int choice = (int)c->norm;
    if (read_choice(root, "norm", "", norms, 2, &choice, err)) goto done;
    c->norm = (NormKind)choice;
    choice = (int)c->activation;
    if (read_choice(root, "activation", "", acts, 3, &choice, err)) goto done;
    c->activation = (ActKind)choice;
    if (read_bool(root, "tied", "", &c->tied, err)) goto done;
    if (read_float(root, "norm_eps", "", &c->norm_eps, err)) goto done;
    if (read_float(root, "init_std", "", &c->init_std, err)) goto done;
    const JsonValue *ffn = json_object_get(root, "ffn");
    if (ffn) {
        if (json_type(ffn) != JSON_OBJECT) {
            ml_error(err, "'ffn' must be a table, for example { hidden = 512 }");
            goto done;
        }
        if (check_keys(ffn, ffn_keys, 1, "ffn.", err)) goto done;
        v = c->ffn_hidden;
        if (read_int(ffn, "hidden", "ffn.", &v, err)) goto done;
        c->ffn_hidden = (int)v;
    }
    if (c->ffn_hidden == 0) c->ffn_hidden = 4 * c->d_model;
    const JsonValue *moe = json_object_get(root, "moe");
    if (moe && json_type(moe) != JSON_NULL && read_moe(c, moe, strict, err)) goto done;
    if (c->moe.enabled) {
        for (int e = 0; e < c->moe.experts; e++)
            if (c->moe.hidden[e] == 0) c->moe.hidden[e] = c->d_model;
        if (c->moe.kind == ROUTER_STRATIFIED && c->moe.n_strata == 0) { /* two halves */
            int E = c->moe.experts;
            c->moe.n_strata = E > 1 ? 2 : 1;
            c->moe.strata[0] = E > 1 ? E / 2 : 1;
            if (E > 1) c->moe.strata[1] = E - E / 2; /* one expert: one stratum, no second */
        }
        if (c->moe.sparsity_eps < 0.0f)
            c->moe.sparsity_eps = c->activation == ACT_RELU ? 0.0f : 0.01f;
    }
    rc = config_validate(c, err);
    if (rc == 0) config_canonical(c);
done:
    json_free(root);
    return rc;
}

void config_canonical(ModelConfig *c) {
    MoeConfig *m = &c->moe, d;
    if (!m->enabled) return;
    ModelConfig defaults;
    config_defaults(&defaults);
    d = defaults.moe;
    unsigned used = router_of(m->kind)->keys(m);
    if (!(used & ROUTER_KEY_K)) m->k = d.k;
    if (!(used & ROUTER_KEY_P)) m->p = d.p;
    if (!(used & ROUTER_KEY_MAX_K)) m->max_k = d.max_k;
    if (!(used & ROUTER_KEY_NORMALIZE)) m->normalize = d.normalize;
    if (!(used & ROUTER_KEY_CAPACITY_FACTOR)) m->capacity_factor = d.capacity_factor;
    if (!(used & ROUTER_KEY_MIN_CAPACITY)) m->min_capacity = d.min_capacity;
    if (!(used & ROUTER_KEY_NOISE)) m->noise = d.noise;
    if (!(used & ROUTER_KEY_STRATA)) {
        m->n_strata = 0;
        memset(m->strata, 0, sizeof m->strata);
    }
    if (!(used & ROUTER_KEY_SECOND)) m->second_sample = 0;
    if (!(used & ROUTER_KEY_SEGMENT)) m->segment = 0;
    if (!(used & ROUTER_KEY_TOKEN_ATTENTION)) m->token_attention = 0;
    if (!(used & ROUTER_KEY_SELECT)) m->select_threshold = 0;
}

int config_from_json(ModelConfig *c, const char *json, size_t len, char *err) {
    return config_parse(c, json, len, 1, err);
}

int config_from_checkpoint_json(ModelConfig *c, const char *json, size_t len, char *err) {
    return config_parse(c, json, len, 0, err);
}

/* ------------------------------------------------------------------------ */
/* writing                                                                   */

/* The router's own keys, in the order of ROUTER_KEY_*, as a JSON object. */
static void router_to_json(JsonBuf *b, const MoeConfig *m) {
    jb_puts(b, "{\"kind\":");
    jb_string(b, config_router_name(m->kind));
    unsigned used = router_of(m->kind)->keys(m);
    if (used & ROUTER_KEY_K) jb_printf(b, ",\"k\":%d", m->k);
    if (used & ROUTER_KEY_P) {
        jb_puts(b, ",\"p\":");
        jb_float(b, m->p);
    }
    if (used & ROUTER_KEY_MAX_K) jb_printf(b, ",\"max_k\":%d", m->max_k);
    if (used & ROUTER_KEY_NORMALIZE)
        jb_printf(b, ",\"normalize\":%s", m->normalize ? "true" : "false");
    if (used & ROUTER_KEY_CAPACITY_FACTOR) {
        jb_puts(b, ",\"capacity_factor\":");
        jb_float(b, m->capacity_factor);
    }
    if (used & ROUTER_KEY_MIN_CAPACITY) jb_printf(b, ",\"min_capacity\":%d", m->min_capacity);
    if (used & ROUTER_KEY_NOISE) {
        jb_puts(b, ",\"noise\":");
        jb_float(b, m->noise);
    }
    if (used & ROUTER_KEY_STRATA) {
        jb_puts(b, ",\"strata\":[");
        for (int i = 0; i < m->n_strata; i++) jb_printf(b, i ? ",%d" : "%d", m->strata[i]);
        jb_puts(b, "]");
    }
    if (used & ROUTER_KEY_SECOND)
        jb_printf(b, ",\"second\":\"%s\"", m->second_sample ? "sample" : "max");
    if (used & ROUTER_KEY_SEGMENT) jb_printf(b, ",\"segment\":%d", m->segment);
    if (used & ROUTER_KEY_TOKEN_ATTENTION)
        jb_printf(b, ",\"token_attention\":%d", m->token_attention);
    if (used & ROUTER_KEY_SELECT)
        jb_printf(b, ",\"select\":\"%s\"", m->select_threshold ? "threshold" : "topk");
    jb_puts(b, "}");
}

char *config_router_to_json(const MoeConfig *m) {
    JsonBuf b = {0};
    router_to_json(&b, m);
    if (b.failed) {
        jb_free(&b);
        return NULL;
    }
    return b.data;
}

int config_router_from_json(ModelConfig *c, const char *json, size_t len, char *err) {
    char jerr[ML_ERRLEN];
    JsonValue *root = NULL;
    if (json_parse(json, len, &root, jerr) != 0)
        return ml_error(err, "the router is not valid JSON: %s", jerr);
    ModelConfig next = *c;
    MoeConfig *m = &next.moe;
    const char *kind = json_string(json_object_get(root, "kind"));
    if (kind && strcmp(kind, config_router_name(m->kind)) != 0) {
        /* another router: its keys start from their defaults */
        ModelConfig d;
        config_defaults(&d);
        m->k = d.moe.k;
        m->p = d.moe.p;
        m->max_k = d.moe.max_k;
        m->normalize = d.moe.normalize;
        m->capacity_factor = d.moe.capacity_factor;
        m->min_capacity = d.moe.min_capacity;
        m->noise = d.moe.noise;
        m->n_strata = 0;
        memset(m->strata, 0, sizeof m->strata);
        m->second_sample = m->segment = m->token_attention = m->select_threshold = 0;
    }
    int rc = read_router(m, root, 1, err);
    json_free(root);
    if (rc != 0 || config_validate(&next, err) != 0) return -1;
    config_canonical(&next);
    *c = next;
    return 0;
}

char *config_to_json(const ModelConfig *c) {
    JsonBuf b = {0};
    jb_printf(&b, "{\"layers\":%d,\"d_model\":%d,\"heads\":%d,\"context\":%d,\"vocab\":%d,",
              c->layers, c->d_model, c->heads, c->context, c->vocab);
    jb_puts(&b, "\"norm\":");
    jb_string(&b, config_norm_name(c->norm));
    jb_puts(&b, ",\"activation\":");
    jb_string(&b, config_activation_name(c->activation));
    jb_printf(&b, ",\"tied\":%s,\"ffn\":{\"hidden\":%d},\"seed\":%llu,\"norm_eps\":",
              c->tied ? "true" : "false", c->ffn_hidden ? c->ffn_hidden : 4 * c->d_model,
              (unsigned long long)c->seed);
    jb_float(&b, c->norm_eps);
    jb_puts(&b, ",\"init_std\":");
    jb_float(&b, c->init_std);
    const MoeConfig *m = &c->moe;
    if (m->enabled) {
        jb_printf(&b, ",\"moe\":{\"every\":%d,\"experts\":%d,\"hidden\":", m->every, m->experts);
        if (m->hidden_list) {
            jb_puts(&b, "[");
            for (int e = 0; e < m->experts; e++) jb_printf(&b, e ? ",%d" : "%d", m->hidden[e]);
            jb_puts(&b, "]");
        } else {
            jb_printf(&b, "%d", m->hidden[0]);
        }
        jb_puts(&b, ",\"router\":");
        router_to_json(&b, m);
        jb_puts(&b, ",\"aux\":{\"balance\":");
        jb_float(&b, m->aux_balance);
        jb_puts(&b, ",\"z\":");
        jb_float(&b, m->aux_z);
        jb_puts(&b, ",\"cv2\":");
        jb_float(&b, m->aux_cv2);
        jb_puts(&b, ",\"p_penalty\":");
        jb_float(&b, m->aux_p_penalty);
        jb_puts(&b, ",\"entropy\":");
        jb_float(&b, m->aux_entropy);
        jb_puts(&b, "},\"sparsity_eps\":");
        jb_float(&b, m->sparsity_eps);
        jb_printf(&b, ",\"bias\":%s", m->bias ? "true" : "false");
        if (m->parallel_experts) jb_puts(&b, ",\"parallel\":\"experts\"");
        if (m->n_placement) {
            jb_puts(&b, ",\"placement\":[");
            for (int e = 0; e < m->n_placement; e++) jb_printf(&b, e ? ",%d" : "%d", m->placement[e]);
            jb_puts(&b, "]");
        }
        jb_puts(&b, "}");
    }
    jb_puts(&b, "}");
    if (b.failed) {
        jb_free(&b);
        return NULL;
    }
    return b.data;
}
