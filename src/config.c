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

static int read_float(const JsonValue *obj, const char *key, float *out, char *err) {
    const JsonValue *v = json_object_get(obj, key);
    if (!v) return 0;
    if (json_type(v) != JSON_NUMBER)
        return ml_error(err, "'%s' must be a number, got %s", key, json_type_name(json_type(v)));
    *out = (float)json_number(v);
    return 0;
}

static int read_choice(const JsonValue *obj, const char *key, const char *const *names, int n,
                       int *out, char *err) {
    const JsonValue *v = json_object_get(obj, key);
    if (!v) return 0;
    const char *s = json_string(v);
    if (!s) return ml_error(err, "'%s' must be a string, got %s", key, json_type_name(json_type(v)));
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
    return ml_error(err, "'%s' = \"%s\" is not one of %s", key, s, list);
}

int config_from_json(ModelConfig *c, const char *json, size_t len, char *err) {
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
    if (json_object_get(root, "moe")) {
        ml_error(err, "'moe' layers are not implemented yet in this build of moelab");
        goto done;
    }
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
    if (read_choice(root, "norm", norms, 2, &choice, err)) goto done;
    c->norm = (NormKind)choice;
    choice = (int)c->activation;
    if (read_choice(root, "activation", acts, 3, &choice, err)) goto done;
    c->activation = (ActKind)choice;
    const JsonValue *tied = json_object_get(root, "tied");
    if (tied) {
        if (json_type(tied) != JSON_BOOL) {
            ml_error(err, "'tied' must be true or false, got %s", json_type_name(json_type(tied)));
            goto done;
        }
        c->tied = json_bool(tied);
    }
    if (read_float(root, "norm_eps", &c->norm_eps, err)) goto done;
    if (read_float(root, "init_std", &c->init_std, err)) goto done;
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
    rc = config_validate(c, err);
done:
    json_free(root);
    return rc;
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
    jb_puts(&b, "}");
    if (b.failed) {
        jb_free(&b);
        return NULL;
    }
    return b.data;
}
