/*
** config.c — defaults, validation and the JSON form of ModelConfig.
**
** Every configuration, from a Lua table or from a checkpoint, passes through
** config_from_json, so the messages a researcher sees about a bad key or value
** are all written here: an unknown key is named together with the nearest valid
** one, and an impossible value says which value and why.
*/
#include "config.h"

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

int config_validate(const ModelConfig *c, char *err) {
    struct { const char *name; long value, min, max; } sizes[] = {
        {"vocab", c->vocab, 2, 1 << 24},         {"context", c->context, 1, 1 << 16},
        {"layers", c->layers, 0, 1024},          {"d_model", c->d_model, 1, 1 << 16},
        {"heads", c->heads, 1, 1 << 12},         {"ffn.hidden", c->ffn_hidden, 1, 1 << 20},
    };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        if (sizes[i].value < sizes[i].min)
            return ml_error(err, "'%s' must be at least %ld, got %ld", sizes[i].name,
                            sizes[i].min, sizes[i].value);
        if (sizes[i].value > sizes[i].max)
            return ml_error(err, "'%s' = %ld is larger than moelab supports (%ld)",
                            sizes[i].name, sizes[i].value, sizes[i].max);
    }
    if (c->d_model % c->heads != 0)
        return ml_error(err, "heads = %d does not divide d_model = %d", c->heads, c->d_model);
    if (!(c->norm_eps > 0.0f) || !isfinite(c->norm_eps))
        return ml_error(err, "'norm_eps' must be a positive number");
    if (!(c->init_std >= 0.0f) || !isfinite(c->init_std))
        return ml_error(err, "'init_std' must be a number >= 0");
    const MoeConfig *m = &c->moe;
    if (!m->enabled) return 0;
    if (m->experts < 1 || m->experts > MOE_MAX_EXPERTS)
        return ml_error(err, "'moe.experts' must be between 1 and %d, got %d", MOE_MAX_EXPERTS,
                        m->experts);
    if (m->every < 1) return ml_error(err, "'moe.every' must be at least 1, got %d", m->every);
    for (int e = 0; e < m->experts; e++)
        if (m->hidden[e] < 1 || m->hidden[e] > 1 << 20)
            return ml_error(err, "'moe.hidden' of expert %d must be between 1 and %d, got %d", e,
                            1 << 20, m->hidden[e]);
    if ((router_of(m->kind)->keys(m) & ROUTER_KEY_K) && (m->k < 1 || m->k > m->experts))
        return ml_error(err, "'moe.router.k' = %d must be between 1 and moe.experts = %d", m->k,
                        m->experts);
    if (!(m->p > 0.0f && m->p <= 1.0f))
        return ml_error(err, "'moe.router.p' (the threshold t) must be in (0, 1], got %g", m->p);
    if (m->max_k < 0 || m->max_k > m->experts)
        return ml_error(err, "'moe.router.max_k' must be between 0 (no cap) and moe.experts = %d, "
                        "got %d", m->experts, m->max_k);
    if (!(m->capacity_factor >= 0.0f) || !isfinite(m->capacity_factor))
        return ml_error(err, "'moe.router.capacity_factor' must be >= 0 (0 = dropless), got %g",
                        m->capacity_factor);
    if (m->min_capacity < 0)
        return ml_error(err, "'moe.router.min_capacity' must be >= 0, got %d", m->min_capacity);
    if (!(m->noise >= 0.0f) || !isfinite(m->noise))
        return ml_error(err, "'moe.router.noise' must be >= 0, got %g", m->noise);
    float aux[] = {m->aux_balance, m->aux_z, m->aux_cv2, m->aux_p_penalty, m->aux_entropy};
    const char *aux_names[] = {"balance", "z", "cv2", "p_penalty", "entropy"};
    for (int i = 0; i < 5; i++)
        if (!(aux[i] >= 0.0f) || !isfinite(aux[i]))
            return ml_error(err, "'moe.aux.%s' must be a number >= 0 (0 = off), got %g",
                            aux_names[i], aux[i]);
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
        for (int i = 0; i < m->n_strata; i++) sum += m->strata[i];
        if (m->n_strata < 1 || sum != m->experts)
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
    if (!(m->sparsity_eps >= 0.0f) || !isfinite(m->sparsity_eps))
        return ml_error(err, "'moe.sparsity_eps' must be a number >= 0, got %g", m->sparsity_eps);
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

static int read_int(const JsonValue *obj, const char *key, const char *where, long min,
                    long max, long *out, char *err) {
    const JsonValue *v = json_object_get(obj, key);
    if (!v) return 0;
    double x = json_number(v);
    if (json_type(v) != JSON_NUMBER || x != floor(x))
        return ml_error(err, "'%s%s' must be an integer, got %s", where, key,
                        json_type(v) == JSON_NUMBER ? "a fraction" : json_type_name(json_type(v)));
    if (x < (double)min || x > (double)max)
        return ml_error(err, "'%s%s' must be between %ld and %ld, got %.17g", where, key, min,
                        max, x);
    *out = (long)x;
    return 0;
}

static int read_float(const JsonValue *obj, const char *key, const char *where, float *out,
                      char *err) {
    const JsonValue *v = json_object_get(obj, key);
    if (!v) return 0;
    if (json_type(v) != JSON_NUMBER)
        return ml_error(err, "'%s%s' must be a number, got %s", where, key,
                        json_type_name(json_type(v)));
    *out = (float)json_number(v);
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
                                       "bias"};
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
    if (read_int(moe, "every", "moe.", 1, 1024, &v, err)) return -1;
    m->every = (int)v;
    v = m->experts;
    if (read_int(moe, "experts", "moe.", 1, MOE_MAX_EXPERTS, &v, err)) return -1;
    m->experts = (int)v;
    const JsonValue *hidden = json_object_get(moe, "hidden");
    memset(m->hidden, 0, sizeof m->hidden);
    if (json_type(hidden) == JSON_ARRAY) {
        size_t n = json_array_len(hidden);
        if (n != (size_t)m->experts)
            return ml_error(err, "'moe.hidden' lists %zu sizes for %d experts: give one per "
                            "expert, or one number for all", n, m->experts);
        for (size_t e = 0; e < n; e++) {
            double x = json_number(json_array_at(hidden, e));
            if (json_type(json_array_at(hidden, e)) != JSON_NUMBER || x != floor(x) || x < 1 ||
                x > (1 << 20))
                return ml_error(err, "'moe.hidden[%zu]' must be an integer between 1 and %d", e + 1,
                                1 << 20);
            m->hidden[e] = (int)x;
        }
        m->hidden_list = 1;
    } else if (hidden) {
        long h = 0;
        if (read_int(moe, "hidden", "moe.", 1, 1 << 20, &h, err)) return -1;
        for (int e = 0; e < m->experts; e++) m->hidden[e] = (int)h;
        m->hidden_list = 0;
    }
    if (read_float(moe, "sparsity_eps", "moe.", &m->sparsity_eps, err)) return -1;
    if (read_bool(moe, "bias", "moe.", &m->bias, err)) return -1;

    const JsonValue *router = json_object_get(moe, "router");
    if (router) {
        if (json_type(router) != JSON_OBJECT)
            return ml_error(err, "'moe.router' must be a table, for example { kind = \"topk\", k = 2 }");
        if (check_keys(router, router_keys, NKEYS(router_keys), "moe.router.", err)) return -1;
        int kind = (int)m->kind;
        if (read_choice(router, "kind", "moe.router.", router_names, NKEYS(router_names), &kind, err))
            return -1;
        m->kind = (RouterKind)kind;
        v = m->k;
        if (read_int(router, "k", "moe.router.", 1, MOE_MAX_EXPERTS, &v, err)) return -1;
        m->k = (int)v;
        v = m->max_k;
        if (read_int(router, "max_k", "moe.router.", 0, MOE_MAX_EXPERTS, &v, err)) return -1;
        m->max_k = (int)v;
        v = m->min_capacity;
        if (read_int(router, "min_capacity", "moe.router.", 0, 1 << 30, &v, err)) return -1;
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
                const JsonValue *x = json_array_at(strata, i);
                double v = json_number(x);
                if (json_type(x) != JSON_NUMBER || v != floor(v) || v < 1 || v > MOE_MAX_EXPERTS)
                    return ml_error(err, "'moe.router.strata[%zu]' must be an integer between 1 "
                                    "and %d", i + 1, MOE_MAX_EXPERTS);
                m->strata[i] = (int)v;
            }
            m->n_strata = (int)n;
        }
        v = m->segment;
        if (read_int(router, "segment", "moe.router.", 0, 1 << 16, &v, err)) return -1;
        m->segment = (int)v;
        v = m->token_attention;
        if (read_int(router, "token_attention", "moe.router.", 0, 1 << 20, &v, err)) return -1;
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
    }
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
#define INT_KEY(key, field, min, max)                                                   \
    v = c->field;                                                                       \
    if (read_int(root, key, "", min, max, &v, err)) goto done;                          \
    c->field = (int)v;
    INT_KEY("vocab", vocab, 2, 1 << 24)
    INT_KEY("context", context, 1, 1 << 16)
    INT_KEY("layers", layers, 0, 1024)
    INT_KEY("d_model", d_model, 1, 1 << 16)
    INT_KEY("heads", heads, 1, 1 << 12)
#undef INT_KEY
    v = (long)c->seed;
    if (read_int(root, "seed", "", 0, 9007199254740991L, &v, err)) goto done;
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
        if (read_int(ffn, "hidden", "ffn.", 1, 1 << 20, &v, err)) goto done;
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
        /* the router's own keys only, in the order of ROUTER_KEY_* */
        jb_puts(&b, ",\"router\":{\"kind\":");
        jb_string(&b, config_router_name(m->kind));
        unsigned used = router_of(m->kind)->keys(m);
        if (used & ROUTER_KEY_K) jb_printf(&b, ",\"k\":%d", m->k);
        if (used & ROUTER_KEY_P) {
            jb_puts(&b, ",\"p\":");
            jb_float(&b, m->p);
        }
        if (used & ROUTER_KEY_MAX_K) jb_printf(&b, ",\"max_k\":%d", m->max_k);
        if (used & ROUTER_KEY_NORMALIZE)
            jb_printf(&b, ",\"normalize\":%s", m->normalize ? "true" : "false");
        if (used & ROUTER_KEY_CAPACITY_FACTOR) {
            jb_puts(&b, ",\"capacity_factor\":");
            jb_float(&b, m->capacity_factor);
        }
        if (used & ROUTER_KEY_MIN_CAPACITY) jb_printf(&b, ",\"min_capacity\":%d", m->min_capacity);
        if (used & ROUTER_KEY_NOISE) {
            jb_puts(&b, ",\"noise\":");
            jb_float(&b, m->noise);
        }
        if (used & ROUTER_KEY_STRATA) {
            jb_puts(&b, ",\"strata\":[");
            for (int i = 0; i < m->n_strata; i++) jb_printf(&b, i ? ",%d" : "%d", m->strata[i]);
            jb_puts(&b, "]");
        }
        if (used & ROUTER_KEY_SECOND)
            jb_printf(&b, ",\"second\":\"%s\"", m->second_sample ? "sample" : "max");
        if (used & ROUTER_KEY_SEGMENT) jb_printf(&b, ",\"segment\":%d", m->segment);
        if (used & ROUTER_KEY_TOKEN_ATTENTION)
            jb_printf(&b, ",\"token_attention\":%d", m->token_attention);
        if (used & ROUTER_KEY_SELECT)
            jb_printf(&b, ",\"select\":\"%s\"", m->select_threshold ? "threshold" : "topk");
        jb_puts(&b, "},\"aux\":{\"balance\":");
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
        if (m->bias) jb_puts(&b, ",\"bias\":true");
        jb_puts(&b, "}");
    }
    jb_puts(&b, "}");
    if (b.failed) {
        jb_free(&b);
        return NULL;
    }
    return b.data;
}
