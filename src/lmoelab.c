/*
** lmoelab.c — the `moelab` Lua module: corpora, models, databases, runs, plots,
** placement replays.
**
** Each C object is a userdata with a metatable whose __index is its method
** table; __gc and __close call one idempotent close. The userdata is created
** empty before the resource is acquired, so an error never leaks it. Option
** tables are checked key by key: an unknown key is named together with the
** nearest valid one, and a value of the wrong type or outside its range
** with the function, the key, the range and the value. Configurations go to C as JSON, so that config.c is the
** one validator for tables and checkpoints alike.
*/
#include "lmoelab.h"

#include <lauxlib.h>
#include <lualib.h>
#include <math.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "checkpoint.h"
#include "dist.h"
#include "json.h"
#include "machine.h"
#include "paths.h"
#include "placement.h"
#include "plot.h"
#include "recorder.h"
#include "trainer.h"

#define CORPUS_MT "moelab.Corpus"
#define MODEL_MT "moelab.Model"
#define DB_MT "moelab.Db"
#define RUN_MT "moelab.Run"
#define ROUTING_MT "moelab.PlacementRouting"

typedef struct { Corpus *c; } LCorpus;
typedef struct { Model *m; } LModel;
/* Over several ranks (dist.h) rank 0 alone holds the database: the others'
** are `remote`, with r NULL; rank 0 answers their queries. */
typedef struct { Recorder *r; char *path; int remote; } LDb;
typedef struct {
    Trainer t;
    int open;          /* trainer initialised */
    char status[16];   /* as recorded */
} LRun;

/* ------------------------------------------------------------------------ */
/* option tables                                                             */

/* Raises an error naming any key of the table at idx that is not in keys. */
static void check_keys(lua_State *L, int idx, const char *what, const char *const *keys) {
    int n = 0;
    while (keys[n]) n++;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "%s: option keys must be strings", what);
        const char *k = lua_tostring(L, -1);
        int known = 0;
        for (int i = 0; i < n && !known; i++) known = strcmp(k, keys[i]) == 0;
        if (!known)
            luaL_error(L, "%s: unknown option '%s' (did you mean '%s'?)", what, k,
                       config_nearest_key(k, keys, n));
    }
}

#define SEED_MAX 9007199254740991LL /* 2^53 - 1: exact in JSON */

/* The value at idx as a message shows it: 3, 1.5, nan, "3", true, a table. */
static const char *value_text(lua_State *L, int idx, char *buf, size_t n) {
    switch (lua_type(L, idx)) {
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) snprintf(buf, n, LUA_INTEGER_FMT, (LUAI_UACINT)lua_tointeger(L, idx));
        else ml_number(buf, lua_tonumber(L, idx));
        break;
    case LUA_TSTRING: snprintf(buf, n, "\"%.40s\"%s", lua_tostring(L, idx),
                               lua_rawlen(L, idx) > 40 ? "..." : ""); break;
    case LUA_TBOOLEAN: snprintf(buf, n, "%s", lua_toboolean(L, idx) ? "true" : "false"); break;
    case LUA_TNONE: snprintf(buf, n, "nothing"); break; /* a missing argument: not "a no value" */
    default: snprintf(buf, n, "a %s", luaL_typename(L, idx));
    }
    return buf;
}

/* The value at idx as an integer in [min, max]; anything else (a fraction,
** NaN, a string) is an error naming what ("run:evaluate"), the key, the range
** and the value. */
static lua_Integer check_int(lua_State *L, int idx, const char *what, const char *key,
                             lua_Integer min, lua_Integer max) {
    int ok = lua_type(L, idx) == LUA_TNUMBER;
    lua_Integer v = ok ? lua_tointegerx(L, idx, &ok) : 0;
    if (!ok || v < min || v > max) {
        char got[64];
        luaL_error(L, "%s: '%s' must be an integer between %I and %I, got %s", what, key,
                   (LUAI_UACINT)min, (LUAI_UACINT)max, value_text(L, idx, got, sizeof got));
    }
    return v;
}

/* An integer option in [min, max], or def when absent. */
static lua_Integer opt_int(lua_State *L, int idx, const char *what, const char *key,
                           lua_Integer def, lua_Integer min, lua_Integer max) {
    lua_getfield(L, idx, key);
    lua_Integer v = lua_isnil(L, -1) ? def : check_int(L, -1, what, key, min, max);
    lua_pop(L, 1);
    return v;
}

/* A number option, or def when absent; its range is the caller's to check
** (NaN and infinities included). */
static double opt_num(lua_State *L, int idx, const char *what, const char *key, double def) {
    lua_getfield(L, idx, key);
    double v = def;
    if (!lua_isnil(L, -1)) {
        char got[64];
        if (lua_type(L, -1) != LUA_TNUMBER)
            luaL_error(L, "%s: '%s' must be a number, got %s", what, key,
                       value_text(L, -1, got, sizeof got));
        v = lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

/* A number option for a float32 field: a finite value that the float would
** turn into an infinity or 0 is refused as given (NaN and infinities pass, for
** the caller's range check to name). */
static float opt_float(lua_State *L, int idx, const char *what, const char *key, float def) {
    double v = opt_num(L, idx, what, key, def);
    float f = (float)v;
    char got[ML_NUMLEN];
    if (isfinite(v) && isinf(f))
        luaL_error(L, "%s: '%s' = %s is too large for a float32 (at most 3.4e+38)", what, key,
                   ml_number(got, v));
    if (v != 0.0 && f == 0.0f)
        luaL_error(L, "%s: '%s' = %s is too small for a float32 (it would be 0)", what, key,
                   ml_number(got, v));
    return f;
}

static int opt_bool(lua_State *L, int idx, const char *what, const char *key, int def) {
    lua_getfield(L, idx, key);
    int v = def;
    if (!lua_isnil(L, -1)) {
        char got[64];
        if (!lua_isboolean(L, -1))
            luaL_error(L, "%s: '%s' must be true or false, got %s", what, key,
                       value_text(L, -1, got, sizeof got));
        v = lua_toboolean(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

/* A string option, or def; the string stays valid while the table lives. */
static const char *opt_str(lua_State *L, int idx, const char *what, const char *key,
                           const char *def) {
    lua_getfield(L, idx, key);
    const char *v = def;
    if (!lua_isnil(L, -1)) {
        char got[64];
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "%s: '%s' must be a string, got %s", what, key,
                       value_text(L, -1, got, sizeof got));
        v = lua_tostring(L, -1);
    }
    lua_pop(L, 1);
    return v;
}

/* The index in names (NULL-terminated) of string option key, def when it is
** absent; another value is an error that lists the names. */
static int opt_choice(lua_State *L, int idx, const char *what, const char *key,
                      const char *const *names, int def) {
    const char *v = opt_str(L, idx, what, key, NULL);
    if (!v) return def;
    char list[160] = "";
    for (int i = 0; names[i]; i++) {
        if (strcmp(v, names[i]) == 0) return i;
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s\"%s\"", i ? ", " : "",
                 names[i]);
    }
    return luaL_error(L, "%s: '%s' must be one of %s, got \"%s\"", what, key, list, v);
}

/* Every call a script makes that the ranks make together starts here: the
** ranks check that they are all at it, from the same line (dist_agree). */
void lmoelab_agree(lua_State *L, const char *what) {
    if (!dist_active()) return;
    luaL_where(L, 1); /* "file:line: ", or "" when C called us */
    char where[256];
    snprintf(where, sizeof where, "%s", lua_tostring(L, -1));
    lua_pop(L, 1);
    size_t n = strlen(where);
    while (n > 0 && (where[n - 1] == ' ' || where[n - 1] == ':')) where[--n] = '\0';
    dist_agree(what, where);
}

/* agree for run:train and run:evaluate, once their options are read: ranks
** at the same call from the same line that disagree on what sets the
** collectives it makes inside (steps, evaluations, clipping, probes, the
** model's parameters, its parallelism and expert placement) would wait on
** one another forever, so they agree on those too; `what` says them. */
static void agree_shape(lua_State *L, char *what, size_t n, const Model *m, const MoeConfig *moe) {
    size_t at = strlen(what);
    unsigned long place = 0;
    for (int e = 0; e < moe->n_placement; e++)
        place = 31 * place + (unsigned long)moe->placement[e] + 1;
    if (at < n)
        snprintf(what + at, n - at, ", %zu parameters, %s parallel", m->num_parameters,
                 moe_parallel(moe) ? "expert" : "data");
    at = strlen(what);
    if (moe_parallel(moe) && moe->n_placement && at < n)
        snprintf(what + at, n - at, " (placement %lx)", place);
    at = strlen(what);
    if (at < n) snprintf(what + at, n - at, ")");
    lmoelab_agree(L, what);
}

/* Ranks that agree on the call may still hold different models (a seed, a
** router or a checkpoint path that depends on moelab.rank), read different
** corpora (a path or a file that differs between machines) or be given
** different options that set no collective (lr, an evaluation's seed): their
** gradients would be averaged over models or data no record names, each
** rank would step its copy of the model its own way, and evaluations would
** add up losses of different models or batches, without a word. So
** run:train and run:evaluate compare digests of the model's configuration
** and parameters (and a counterfactual router's, router_json or NULL), of
** the corpus and its split, and of the options (n bytes at `options`,
** named by `names`), and every rank raises the same error when one differs
** from rank 0's. */
static int agree_inputs(const Model *m, const char *router_json, const Corpus *c,
                        const void *options, size_t n, const char *names, char *err) {
    if (!dist_active()) return 0;
    char *config = config_to_json(&m->config);
    if (!config) dist_fail("out of memory");
    uint64_t digest[3];
    digest[0] = ml_digest(config, strlen(config), ML_DIGEST_START);
    free(config);
    if (router_json) digest[0] = ml_digest(router_json, strlen(router_json), digest[0]);
    digest[0] = ml_digest(m->param_mem, sizeof(float) * m->num_parameters, digest[0]);
    digest[1] = ml_digest(&c->split, sizeof c->split, c->digest);
    digest[2] = ml_digest(options, n, ML_DIGEST_START);
    int mine[6];
    for (int k = 0; k < 3; k++) {
        mine[2 * k] = (int)(uint32_t)digest[k];
        mine[2 * k + 1] = (int)(uint32_t)(digest[k] >> 32);
    }
    int ranks = dist_size();
    int *all = malloc(sizeof(int) * 6 * (size_t)ranks);
    if (!all) dist_fail("out of memory");
    dist_allgather_int(mine, 6, all);
    char differ[3][128] = {"", "", ""}; /* the ranks whose model, corpus, options are not rank 0's */
    for (int k = 0; k < 3; k++)
        for (int r = 1; r < ranks; r++) {
            size_t len = strlen(differ[k]);
            if ((all[6 * r + 2 * k] != all[2 * k] || all[6 * r + 2 * k + 1] != all[2 * k + 1]) &&
                len < sizeof differ[k])
                snprintf(differ[k] + len, sizeof differ[k] - len, "%s%d", len ? ", " : "", r);
        }
    free(all);
    if (differ[0][0])
        return ml_error(err, "the ranks hold different models: the configuration or parameters "
                        "of rank %s are not rank 0's (a seed, a router or a checkpoint that "
                        "depends on moelab.rank, or options that differed in an earlier call?); "
                        "every rank must build or load the same model", differ[0]);
    if (differ[1][0])
        return ml_error(err, "the ranks read different corpora: the bytes or split of rank %s are "
                        "not rank 0's (a corpus path that depends on moelab.rank, or a file that "
                        "differs between machines?)", differ[1]);
    if (differ[2][0])
        return ml_error(err, "the ranks were given different options: the %s of rank %s are not "
                        "rank 0's; every rank must pass the same", names, differ[2]);
    return 0;
}

/* Over several ranks, the outcome of what rank 0 alone does (the database,
** files): its rc, and its message when it failed, on every rank, so that
** all go on or all raise the same error. */
static int rank0_outcome(int rc, char *err) {
    if (!dist_active()) return rc;
    dist_broadcast(&rc, sizeof rc);
    if (rc != 0) dist_broadcast_string(err, ML_ERRLEN);
    return rc;
}

/* Raises err, a message from the C layer, as "what: ..."; err's own prefix
** ("train: ", "moefy: ") is dropped, so that it is not said twice. */
static int c_error(lua_State *L, const char *what, const char *prefix, const char *err) {
    size_t n = strlen(prefix);
    if (strncmp(err, prefix, n) == 0 && strncmp(err + n, ": ", 2) == 0) err += n + 2;
    return luaL_error(L, "%s: %s", what, err);
}

/* ------------------------------------------------------------------------ */
/* Lua values as JSON                                                        */

static void to_json(lua_State *L, int idx, JsonBuf *b, int depth, const char *path);

static int is_array(lua_State *L, int idx) {
    lua_Integer n = (lua_Integer)lua_rawlen(L, idx), count = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (!lua_isinteger(L, -1)) {
            lua_pop(L, 1);
            return 0;
        }
        count++;
    }
    return count == n && n > 0;
}

/* path is the value's key path for messages: "moe.router.p", "moe.hidden[2]". */
static void to_json(lua_State *L, int idx, JsonBuf *b, int depth, const char *path) {
    idx = lua_absindex(L, idx);
    if (depth > 16) luaL_error(L, "configuration nested too deeply at '%s'", path);
    char child[256];
    switch (lua_type(L, idx)) {
    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) jb_printf(b, "%lld", (long long)lua_tointeger(L, idx));
        else {
            double x = lua_tonumber(L, idx);
            if (!isfinite(x)) { /* JSON cannot carry it: config.c says what the key takes */
                char err[ML_ERRLEN];
                config_number_error(path, x, err);
                luaL_error(L, "%s", err);
            }
            jb_number(b, x);
        }
        break;
    case LUA_TBOOLEAN: jb_puts(b, lua_toboolean(L, idx) ? "true" : "false"); break;
    case LUA_TSTRING: jb_string(b, lua_tostring(L, idx)); break;
    case LUA_TTABLE:
        if (is_array(L, idx)) {
            jb_puts(b, "[");
            lua_Integer n = (lua_Integer)lua_rawlen(L, idx);
            for (lua_Integer i = 1; i <= n; i++) {
                if (i > 1) jb_puts(b, ",");
                lua_rawgeti(L, idx, i);
                snprintf(child, sizeof child, "%s[%lld]", path, (long long)i);
                to_json(L, -1, b, depth + 1, child);
                lua_pop(L, 1);
            }
            jb_puts(b, "]");
        } else {
            jb_puts(b, "{");
            int first = 1;
            lua_pushnil(L);
            while (lua_next(L, idx)) {
                if (lua_type(L, -2) != LUA_TSTRING) {
                    /* a list with a nil in it ({ 8, h2, 8 } where h2 is undefined) or
                    ** list items beside named keys come here: say which */
                    char key[64];
                    luaL_error(L, "configuration table '%s' has a key that is not a string (%s)%s",
                               *path ? path : "model", value_text(L, -2, key, sizeof key),
                               lua_type(L, -2) == LUA_TNUMBER
                                   ? ": a list must have no nil in it, and cannot have named keys"
                                   : "");
                }
                const char *k = lua_tostring(L, -2);
                if (!first) jb_puts(b, ",");
                first = 0;
                jb_string(b, k);
                jb_puts(b, ":");
                snprintf(child, sizeof child, "%s%s%s", path, *path ? "." : "", k);
                to_json(L, -1, b, depth + 1, child);
                lua_pop(L, 1);
            }
            jb_puts(b, "}");
        }
        break;
    default:
        luaL_error(L, "configuration value '%s' has type %s; use numbers, strings, booleans "
                   "and tables", *path ? path : "model", luaL_typename(L, idx));
    }
}

/* Pushes a Lua value for a JSON value. */
static void push_json(lua_State *L, const JsonValue *v) {
    switch (json_type(v)) {
    case JSON_BOOL: lua_pushboolean(L, json_bool(v)); break;
    case JSON_NUMBER: {
        double x = json_number(v);
        if (x == floor(x) && fabs(x) < 9007199254740992.0) lua_pushinteger(L, (lua_Integer)x);
        else lua_pushnumber(L, x);
        break;
    }
    case JSON_STRING: lua_pushlstring(L, json_string(v), json_string_len(v)); break;
    case JSON_ARRAY:
        lua_createtable(L, (int)json_array_len(v), 0);
        for (size_t i = 0; i < json_array_len(v); i++) {
            push_json(L, json_array_at(v, i));
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        break;
    case JSON_OBJECT:
        lua_createtable(L, 0, (int)json_object_len(v));
        for (size_t i = 0; i < json_object_len(v); i++) {
            lua_pushlstring(L, json_object_key_at(v, i), json_object_key_len_at(v, i));
            push_json(L, json_object_value_at(v, i));
            lua_rawset(L, -3);
        }
        break;
    default: lua_pushnil(L);
    }
}

/* ------------------------------------------------------------------------ */
/* corpus                                                                    */

static LCorpus *check_corpus(lua_State *L, int idx) { return luaL_checkudata(L, idx, CORPUS_MT); }

static int corpus_gc(lua_State *L) {
    LCorpus *c = check_corpus(L, 1);
    corpus_free(c->c);
    c->c = NULL;
    return 0;
}

static int l_corpus(lua_State *L) {
    static const char *const keys[] = {"path", "text", "split", NULL};
    luaL_checktype(L, 1, LUA_TTABLE);
    check_keys(L, 1, "moelab.corpus", keys);
    const char *path = opt_str(L, 1, "moelab.corpus", "path", NULL);
    const char *text = opt_str(L, 1, "moelab.corpus", "text", NULL);
    size_t text_len = 0;
    if (text) {
        lua_getfield(L, 1, "text");
        lua_tolstring(L, -1, &text_len); /* bytes, NULs included */
        lua_pop(L, 1);
    }
    double split = opt_num(L, 1, "moelab.corpus", "split", 0.9);
    if (!path == !text) luaL_error(L, "moelab.corpus: give either 'path' or 'text'");
    LCorpus *c = lua_newuserdatauv(L, sizeof *c, 0);
    c->c = NULL;
    luaL_setmetatable(L, CORPUS_MT);
    char err[ML_ERRLEN];
    int rc = path ? corpus_load(&c->c, path, split, err)
                  : corpus_from_bytes(&c->c, (const uint8_t *)text, text_len, split, err);
    if (rc != 0) luaL_error(L, "moelab.corpus: %s", err);
    return 1;
}

static int corpus_size(lua_State *L) {
    LCorpus *c = check_corpus(L, 1);
    if (!c->c) luaL_error(L, "corpus is closed");
    lua_pushinteger(L, (lua_Integer)c->c->n);
    lua_pushinteger(L, (lua_Integer)c->c->n_train);
    lua_pushinteger(L, (lua_Integer)(c->c->n - c->c->n_train));
    return 3;
}

static int corpus_tostring(lua_State *L) {
    LCorpus *c = check_corpus(L, 1);
    if (!c->c) lua_pushstring(L, "moelab.corpus (closed)");
    else lua_pushfstring(L, "moelab.corpus(%s, %I bytes, %I train)", c->c->path ? c->c->path : "text",
                         (lua_Integer)c->c->n, (lua_Integer)c->c->n_train); /* over 2 GiB too */
    return 1;
}

/* ------------------------------------------------------------------------ */
/* model                                                                     */

static LModel *check_model(lua_State *L, int idx) {
    LModel *m = luaL_checkudata(L, idx, MODEL_MT);
    if (!m->m) luaL_error(L, "the model is closed");
    return m;
}

static int model_gc(lua_State *L) {
    LModel *m = luaL_checkudata(L, 1, MODEL_MT);
    model_free(m->m);
    m->m = NULL;
    return 0;
}

static LModel *new_model_udata(lua_State *L) {
    LModel *m = lua_newuserdatauv(L, sizeof *m, 0);
    m->m = NULL;
    luaL_setmetatable(L, MODEL_MT);
    return m;
}

/* to_json under lua_pcall: (table, JsonBuf*, path of its keys) */
static int to_json_protected(lua_State *L) {
    JsonBuf *b = lua_touserdata(L, 2);
    to_json(L, 1, b, 0, lua_tostring(L, 3));
    return 0;
}

/* The table at idx as JSON into b, which the caller frees; raises errors
** (a value JSON cannot hold, out of memory) as `what: ...` with b freed.
** path ("" or "moe.router") names the table in messages. */
static void table_json(lua_State *L, int idx, const char *what, const char *path, JsonBuf *b) {
    idx = lua_absindex(L, idx);
    lua_pushcfunction(L, to_json_protected);
    lua_pushvalue(L, idx);
    lua_pushlightuserdata(L, b);
    lua_pushstring(L, path);
    if (lua_pcall(L, 3, 0, 0) != LUA_OK) { /* the buffer is ours to free */
        jb_free(b);
        luaL_error(L, "%s: %s", what, lua_tostring(L, -1));
    }
    if (b->failed) {
        jb_free(b);
        luaL_error(L, "%s: out of memory", what);
    }
}

static int l_model(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    JsonBuf b = {0};
    table_json(L, 1, "moelab.model", "", &b);
    LModel *m = new_model_udata(L);
    ModelConfig c;
    config_defaults(&c);
    char err[ML_ERRLEN];
    int rc = config_from_json(&c, b.data ? b.data : "{}", b.data ? b.len : 2, err);
    jb_free(&b);
    if (rc != 0 || model_create(&m->m, &c, err) != 0) luaL_error(L, "moelab.model: %s", err);
    return 1;
}

/* moelab.load(path [, { nonfinite = true }]): nonfinite loads a checkpoint
** whose weights hold NaN or infinities, to inspect a diverged model. */
static int l_load(lua_State *L) {
    static const char *const keys[] = {"nonfinite", NULL};
    const char *path = luaL_checkstring(L, 1);
    int nonfinite = 0;
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        check_keys(L, 2, "moelab.load", keys);
        nonfinite = opt_bool(L, 2, "moelab.load", "nonfinite", 0) == 1;
    }
    LModel *m = new_model_udata(L);
    char err[ML_ERRLEN];
    if (checkpoint_load(&m->m, path, nonfinite, err) != 0) luaL_error(L, "moelab.load: %s", err);
    return 1;
}

/* moelab.moefy(model, { experts = E, method = "kmeans" | "random", seed = 1,
** router = { kind, select, k, p } }) */
static int l_moefy(lua_State *L) {
    static const char *const keys[] = {"experts", "method", "seed", "router", NULL};
    static const char *const router_keys[] = {"kind", "select", "k", "p", NULL};
    static const char *const methods[] = {"kmeans", "random", NULL};
    static const char *const kinds[] = {"similarity", "learned", "oracle", "all", NULL};
    static const RouterKind kind_of[] = {ROUTER_SIMILARITY, ROUTER_LEARNED, ROUTER_ORACLE,
                                         ROUTER_ALL};
    static const char *const selects[] = {"topk", "threshold", NULL};
    LModel *dense = check_model(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    check_keys(L, 2, "moelab.moefy", keys);
    int E = (int)opt_int(L, 2, "moelab.moefy", "experts", 8, 1, MOE_MAX_EXPERTS);
    /* the generator takes 32 bits (moefy.c adds one) */
    lua_Integer seed = opt_int(L, 2, "moelab.moefy", "seed", 1, 0, ((lua_Integer)1 << 32) - 2);
    int kmeans = opt_choice(L, 2, "moelab.moefy", "method", methods, 0) == 0;
    MoeConfig router = {.kind = ROUTER_ALL, .k = 2, .p = 0.9f};
    lua_getfield(L, 2, "router");
    if (!lua_isnil(L, -1)) {
        int r = lua_gettop(L);
        luaL_checktype(L, r, LUA_TTABLE);
        check_keys(L, r, "moelab.moefy router", router_keys);
        const char *what = "moelab.moefy router";
        int kind = opt_choice(L, r, what, "kind", kinds, 0);
        router.kind = kind_of[kind];
        router.select_threshold = opt_choice(L, r, what, "select", selects, 0) == 1;
        /* k is read by the top-k selection, p by the threshold; `all` reads
        ** neither. A key the router does not read is refused, as in
        ** moelab.model, rather than ignored: { kind = "similarity", p = 0.5 }
        ** without select = "threshold" would be top-2. */
        int uses_k = router.kind != ROUTER_ALL && !router.select_threshold;
        int uses_p = router.kind != ROUTER_ALL && router.select_threshold;
        static const char *const chosen[] = {"k", "p", "select", NULL};
        const int read[] = {uses_k, uses_p, router.kind != ROUTER_ALL};
        for (int i = 0; chosen[i]; i++) {
            int given = lua_getfield(L, r, chosen[i]) != LUA_TNIL;
            lua_pop(L, 1);
            if (read[i] || !given) continue;
            luaL_error(L, "%s: '%s' is not read by the %s router%s (it reads %s)", what, chosen[i],
                       kinds[kind], router.kind == ROUTER_ALL ? ""
                       : router.select_threshold ? " with select = \"threshold\""
                                                 : " with select = \"topk\"",
                       router.kind == ROUTER_ALL ? "no other key"
                       : router.select_threshold ? "select, p" : "select, k");
        }
        router.k = (int)opt_int(L, r, what, "k", uses_k && E < 2 ? E : 2, 1,
                                uses_k ? E : MOE_MAX_EXPERTS);
        router.p = opt_float(L, r, what, "p", router.p);
        if (!(router.p > 0.0f && router.p <= 1.0f)) {
            char got[ML_NUMLEN];
            luaL_error(L, "%s: 'p' (the threshold t) must be a number in (0, 1], got %s", what,
                       ml_number(got, router.p));
        }
    }
    lua_pop(L, 1);
    LModel *m = new_model_udata(L);
    char err[ML_ERRLEN];
    if (moe_moefy(&m->m, dense->m, E, kmeans, (uint64_t)seed, &router, err) != 0)
        c_error(L, "moelab.moefy", "moefy", err);
    return 1;
}

static void set_num(lua_State *L, const char *k, double v);
static void set_int(lua_State *L, const char *k, lua_Integer v);

/* moelab.fit_router(model, corpus, { steps = 200, batch = 16, lr = 1e-2, seed = 1 }):
** fits a moefied model's learned routers, the rest frozen; returns { loss,
** recall, first_loss, first_recall }. */
static int l_fit_router(lua_State *L) {
    static const char *const keys[] = {"steps", "batch", "lr", "seed", NULL};
    LModel *m = check_model(L, 1);
    LCorpus *c = check_corpus(L, 2);
    if (!c->c) luaL_error(L, "moelab.fit_router: the corpus is closed");
    const char *what = "moelab.fit_router";
    int steps = 200, batch = 16;
    float lr = 1e-2f;
    lua_Integer seed = 1;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        check_keys(L, 3, what, keys);
        steps = (int)opt_int(L, 3, what, "steps", steps, 1, 1000000);
        batch = (int)opt_int(L, 3, what, "batch", batch, 1, 4096);
        seed = opt_int(L, 3, what, "seed", seed, 0, ((lua_Integer)1 << 32) - 2);
        lr = opt_float(L, 3, what, "lr", lr);
        if (!(lr > 0.0f) || !isfinite(lr)) {
            char got[ML_NUMLEN];
            luaL_error(L, "%s: 'lr' must be a number > 0, got %s", what, ml_number(got, lr));
        }
    }
    MoeFit fit;
    char err[ML_ERRLEN];
    if (corpus_check_vocab(c->c, m->m->config.vocab, err) != 0) luaL_error(L, "%s: %s", what, err);
    if (moe_fit_routers(m->m, c->c, steps, batch, lr, (uint64_t)seed, &fit, err) != 0)
        c_error(L, "moelab.fit_router", "fit_router", err);
    lua_newtable(L);
    set_num(L, "loss", fit.loss);
    set_num(L, "recall", fit.recall);
    set_num(L, "first_loss", fit.first_loss);
    set_num(L, "first_recall", fit.first_recall);
    return 1;
}

static int model_save(lua_State *L) {
    lmoelab_agree(L, "model:save");
    LModel *m = check_model(L, 1);
    const char *path = luaL_checkstring(L, 2);
    char err[ML_ERRLEN];
    /* over several ranks the models are the same: rank 0 writes the file */
    int rc = dist_rank() == 0 ? checkpoint_save(m->m, path, err) : 0;
    if (rank0_outcome(rc, err) != 0) luaL_error(L, "model:save: %s", err);
    return 0;
}

/* Bytes of a Lua string as token ids, each checked against the model's
** vocabulary (smaller than 256 bytes when configured so). */
static int *string_tokens(lua_State *L, const LModel *m, const char *what, const char *s,
                          size_t n) {
    int *t = lua_newuserdatauv(L, sizeof(int) * (n ? n : 1), 0);
    for (size_t i = 0; i < n; i++) {
        t[i] = (unsigned char)s[i];
        if (t[i] >= m->m->config.vocab)
            luaL_error(L, "%s: byte %d at position %d is outside the vocabulary "
                       "(vocab = %d)", what, t[i], (int)i + 1, m->m->config.vocab);
    }
    return t;
}

/* The text argument of model:loss and model:token_losses as token ids, its
** length checked: one sequence of 2 to context + 1 bytes. */
static int *sequence_arg(lua_State *L, const LModel *m, const char *what, size_t *n) {
    const char *text = luaL_checklstring(L, 2, n);
    int max = m->m->config.context + 1;
    if (*n < 2 || *n > (size_t)max)
        luaL_error(L, "model:%s: the text must have 2 to context + 1 = %d bytes, got %d", what,
                   max, (int)*n);
    char where[32];
    snprintf(where, sizeof where, "model:%s", what);
    return string_tokens(L, m, where, text, *n);
}

static int model_loss(lua_State *L) {
    LModel *m = check_model(L, 1);
    size_t n;
    int *tokens = sequence_arg(L, m, "loss", &n);
    float loss;
    char err[ML_ERRLEN];
    if (model_sequence_loss(m->m, tokens, (int)n, &loss, err) != 0) luaL_error(L, "model:loss: %s", err);
    lua_pushnumber(L, loss);
    return 1;
}

/* model:token_losses(text): the next-byte loss at each position, as an array
** of #text - 1 numbers whose mean is model:loss(text). */
static int model_token_losses(lua_State *L) {
    LModel *m = check_model(L, 1);
    size_t n;
    int *tokens = sequence_arg(L, m, "token_losses", &n);
    float *losses = lua_newuserdatauv(L, sizeof(float) * (n - 1), 0);
    char err[ML_ERRLEN];
    if (model_sequence_losses(m->m, tokens, (int)n, losses, err) != 0)
        luaL_error(L, "model:token_losses: %s", err);
    lua_createtable(L, (int)n - 1, 0);
    for (size_t i = 0; i + 1 < n; i++) {
        lua_pushnumber(L, losses[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

static int model_sample_l(lua_State *L) {
    static const char *const keys[] = {"prompt", "tokens", "temperature", "top_k", "seed", NULL};
    LModel *m = check_model(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    check_keys(L, 2, "model:sample", keys);
    size_t np = 1;
    const char *prompt = "\n";
    lua_getfield(L, 2, "prompt");
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "model:sample: 'prompt' must be a string");
        prompt = lua_tolstring(L, -1, &np);
    }
    lua_pop(L, 1); /* the string stays alive in the options table */
    lua_Integer n_new = opt_int(L, 2, "model:sample", "tokens", 200, 0, 1000000);
    float temperature = opt_float(L, 2, "model:sample", "temperature", 1.0f);
    lua_Integer top_k = opt_int(L, 2, "model:sample", "top_k", 0, 0, m->m->config.vocab);
    lua_Integer seed = opt_int(L, 2, "model:sample", "seed", 1, 0, SEED_MAX);
    if (np < 1) luaL_error(L, "model:sample: the prompt must not be empty");
    if (!(temperature >= 0) || !isfinite(temperature)) {
        char got[ML_NUMLEN];
        luaL_error(L, "model:sample: temperature must be a number >= 0, got %s",
                   ml_number(got, temperature));
    }
    int *in = string_tokens(L, m, "model:sample", prompt, np);
    int *out = lua_newuserdatauv(L, sizeof(int) * (np + (size_t)n_new), 0);
    char err[ML_ERRLEN];
    if (model_sample(m->m, in, (int)np, (int)n_new, (float)temperature, (int)top_k,
                     (uint64_t)seed, out, err) != 0)
        c_error(L, "model:sample", "sample", err);
    luaL_Buffer buf;
    luaL_buffinit(L, &buf);
    for (size_t i = 0; i < np + (size_t)n_new; i++) {
        if (out[i] > 255) luaL_error(L, "model:sample: token %d is not a byte", out[i]);
        luaL_addchar(&buf, (char)out[i]);
    }
    luaL_pushresult(&buf);
    return 1;
}

/* model:config() → the configuration as a table, every default filled in;
** model:config("json") → the same as the JSON text runs.config.model holds */
/* model:parallel("experts" [, { rank of each expert }]) or ("data"): how
** its MoE layers run over MPI ranks from now on (moe.parallel and
** moe.placement, as if configured so); changes nothing a run computes. */
static int model_parallel(lua_State *L) {
    LModel *m = check_model(L, 1);
    static const char *const modes[] = {"data", "experts", NULL};
    int experts = luaL_checkoption(L, 2, NULL, modes);
    ModelConfig c = m->m->config;
    if (!c.moe.enabled) luaL_error(L, "model:parallel: the model has no MoE layers");
    c.moe.parallel_experts = experts;
    c.moe.n_placement = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        lua_Integer n = (lua_Integer)lua_rawlen(L, 3);
        if (n != c.moe.experts)
            luaL_error(L, "model:parallel: the placement must list a rank for each of the %d "
                       "experts, got %d", c.moe.experts, (int)n);
        for (lua_Integer e = 1; e <= n; e++) {
            lua_rawgeti(L, 3, e);
            c.moe.placement[e - 1] = (int)check_int(L, -1, "model:parallel", "placement", 0,
                                                    MOE_MAX_RANKS - 1);
            lua_pop(L, 1);
        }
        c.moe.n_placement = (int)n;
    }
    char err[ML_ERRLEN];
    if (config_validate(&c, err) != 0) luaL_error(L, "model:parallel: %s", err);
    m->m->config.moe = c.moe;
    return 0;
}

static int model_config_l(lua_State *L) {
    LModel *m = check_model(L, 1);
    static const char *const forms[] = {"table", "json", NULL};
    int form = luaL_checkoption(L, 2, "table", forms);
    char *json = config_to_json(&m->m->config);
    if (!json) luaL_error(L, "out of memory");
    if (form == 1) {
        lua_pushstring(L, json);
        free(json);
        return 1;
    }
    JsonValue *v = NULL;
    int rc = json_parse(json, strlen(json), &v, NULL);
    free(json);
    if (rc != 0) luaL_error(L, "model:config: internal error");
    push_json(L, v);
    json_free(v);
    return 1;
}

/* model:parameters() → total, active (per token: k experts per MoE layer) */
static int model_parameters(lua_State *L) {
    LModel *m = check_model(L, 1);
    lua_pushinteger(L, (lua_Integer)m->m->num_parameters);
    lua_pushinteger(L, (lua_Integer)model_active_parameters(m->m));
    return 2;
}

/* model:memory{ batch = 16, training = true } → the bytes a batch of that
** many sequences of the context's length needs, by part (model_memory) */
static int model_memory_l(lua_State *L) {
    static const char *const keys[] = {"batch", "training", NULL};
    LModel *m = check_model(L, 1);
    ModelMemory mem;
    int B = 16, training = 1;
    if (!lua_isnoneornil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        check_keys(L, 2, "model:memory", keys);
        /* the batches a model takes: at most MODEL_MAX_BATCH_TOKENS tokens */
        B = (int)opt_int(L, 2, "model:memory", "batch", 16, 1,
                         MODEL_MAX_BATCH_TOKENS / m->m->config.context);
        training = opt_bool(L, 2, "model:memory", "training", 1);
    }
    model_memory(m->m, B, training, &mem);
    lua_newtable(L);
    set_int(L, "parameters", (lua_Integer)mem.parameters);
    set_int(L, "gradients", (lua_Integer)mem.gradients);
    set_int(L, "optimizer", (lua_Integer)mem.optimizer);
    set_int(L, "activations", (lua_Integer)mem.activations);
    set_int(L, "scratch", (lua_Integer)mem.scratch);
    set_int(L, "moe", (lua_Integer)mem.moe);
    set_int(L, "total", (lua_Integer)mem.total);
    return 1;
}

static int model_tostring(lua_State *L) {
    LModel *m = luaL_checkudata(L, 1, MODEL_MT);
    if (!m->m) lua_pushstring(L, "moelab.model (closed)");
    else {
        const ModelConfig *c = &m->m->config;
        lua_pushfstring(L, "moelab.model(layers=%d, d_model=%d, heads=%d, context=%d, %d parameters)",
                        c->layers, c->d_model, c->heads, c->context, (int)m->m->num_parameters);
    }
    return 1;
}

/* ------------------------------------------------------------------------ */
/* database                                                                  */

static LDb *check_db(lua_State *L, int idx) {
    LDb *d = luaL_checkudata(L, idx, DB_MT);
    if (!d->r && !d->remote) luaL_error(L, "the database is closed");
    return d;
}


static int run_close(lua_State *L);

/* Closes the database, closing its open runs first (so each gets its status). */
static int db_close(lua_State *L) {
    LDb *d = luaL_checkudata(L, 1, DB_MT);
    if ((d->r || d->remote) && lua_getiuservalue(L, 1, 1) == LUA_TTABLE) {
        lua_pushnil(L);
        while (lua_next(L, -2)) {
            lua_pop(L, 1);
            lua_pushcfunction(L, run_close);
            lua_pushvalue(L, -2);
            lua_call(L, 1, 0);
        }
    }
    lua_settop(L, 1);
    if (d->r) rec_close(d->r);
    d->r = NULL;
    d->remote = 0;
    free(d->path);
    d->path = NULL;
    return 0;
}

/* moelab.open(path [, { adopt = true } | { readonly = true }]): readonly
** opens an existing database for queries only (no upgrade, no lock) */
static int l_open(lua_State *L) {
    static const char *const keys[] = {"adopt", "readonly", NULL};
    lmoelab_agree(L, "moelab.open");
    const char *path = luaL_checkstring(L, 1);
    int adopt = 0, readonly = 0;
    if (!lua_isnoneornil(L, 2)) { /* moelab.open(path, { adopt = true }) */
        luaL_checktype(L, 2, LUA_TTABLE);
        check_keys(L, 2, "moelab.open", keys);
        adopt = opt_bool(L, 2, "moelab.open", "adopt", 0) == 1;
        readonly = opt_bool(L, 2, "moelab.open", "readonly", 0) == 1;
        if (adopt && readonly) luaL_error(L, "moelab.open: adopt and readonly exclude each other");
    }
    LDb *d = lua_newuserdatauv(L, sizeof *d, 1);
    d->r = NULL;
    d->path = NULL;
    d->remote = 0;
    luaL_setmetatable(L, DB_MT);
    lua_newtable(L); /* its runs, weakly: a run still referenced elsewhere lives on */
    lua_newtable(L);
    lua_pushstring(L, "k");
    lua_setfield(L, -2, "__mode");
    lua_setmetatable(L, -2);
    lua_setiuservalue(L, -2, 1);
    char err[ML_ERRLEN];
    int rc = 0;
    /* what every rank did before (a script removing an old file) is done */
    dist_barrier();
    if (dist_rank() == 0)
        rc = readonly ? rec_open_readonly(&d->r, path, err)
                      : adopt ? rec_open_adopting(&d->r, path, err) : rec_open(&d->r, path, err);
    if (rank0_outcome(rc, err) != 0) luaL_error(L, "moelab.open: %s", err);
    d->remote = dist_rank() != 0;
    d->path = strdup(path);
    return 1;
}

/* db:query(sql, ...) → an array of rows, each a table keyed by column name. */
static int query_here(lua_State *L) {
    LDb *d = check_db(L, 1);
    const char *sql = luaL_checkstring(L, 2);
    char err[ML_ERRLEN];
    if (rec_flush(d->r, err) != 0) luaL_error(L, "db:query: %s", err);
    sqlite3 *db = rec_db(d->r);
    sqlite3_stmt *st = NULL, *next = NULL;
    const char *tail = NULL;
    if (sqlite3_prepare_v2(db, sql, -1, &st, &tail) != SQLITE_OK)
        luaL_error(L, "db:query: %s", sqlite3_errmsg(db));
    if (!st) luaL_error(L, "db:query: the SQL holds no statement (it is empty or a comment)");
    /* one statement a call: what follows the first would be dropped unsaid
    ** (prepared, not run, only to tell whitespace and comments from SQL) */
    if (sqlite3_prepare_v2(db, tail, -1, &next, NULL) != SQLITE_OK || next) {
        sqlite3_finalize(next);
        sqlite3_finalize(st);
        while (*tail == ' ' || *tail == '\t' || *tail == '\n' || *tail == '\r') tail++;
        char rest[64];
        snprintf(rest, sizeof rest, "%.40s%s", tail, strlen(tail) > 40 ? "..." : "");
        return luaL_error(L, "db:query: runs one statement a call, and the SQL goes on after "
                          "the first: \"%s\"", rest);
    }
    int nargs = lua_gettop(L) - 2, nparams = sqlite3_bind_parameter_count(st);
    if (nargs != nparams) { /* a missing value would be NULL, an extra one an obscure error */
        sqlite3_finalize(st);
        return luaL_error(L, "db:query: the SQL has %d parameter%s, got %d value%s", nparams,
                          nparams == 1 ? "" : "s", nargs, nargs == 1 ? "" : "s");
    }
    for (int i = 1; i <= nargs; i++) {
        int idx = i + 2, rc;
        size_t len;
        switch (lua_type(L, idx)) {
        case LUA_TNUMBER:
            rc = lua_isinteger(L, idx) ? sqlite3_bind_int64(st, i, lua_tointeger(L, idx))
                                       : sqlite3_bind_double(st, i, lua_tonumber(L, idx));
            break;
        case LUA_TSTRING: { /* its bytes, NULs included */
            const char *text = lua_tolstring(L, idx, &len);
            rc = sqlite3_bind_text64(st, i, text, len, SQLITE_TRANSIENT, SQLITE_UTF8);
            break;
        }
        case LUA_TNIL: rc = sqlite3_bind_null(st, i); break;
        case LUA_TBOOLEAN: rc = sqlite3_bind_int(st, i, lua_toboolean(L, idx)); break;
        default: sqlite3_finalize(st); return luaL_error(L, "db:query: cannot bind a %s", luaL_typename(L, idx));
        }
        if (rc != SQLITE_OK) {
            sqlite3_finalize(st);
            return luaL_error(L, "db:query: %s", sqlite3_errmsg(db));
        }
    }
    lua_newtable(L);
    int row = 0, rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        lua_newtable(L);
        for (int c = 0; c < sqlite3_column_count(st); c++) {
            switch (sqlite3_column_type(st, c)) {
            case SQLITE_INTEGER: lua_pushinteger(L, sqlite3_column_int64(st, c)); break;
            case SQLITE_FLOAT: lua_pushnumber(L, sqlite3_column_double(st, c)); break;
            case SQLITE_NULL: lua_pushnil(L); break;
            default:
                lua_pushlstring(L, (const char *)sqlite3_column_text(st, c),
                                (size_t)sqlite3_column_bytes(st, c));
            }
            lua_setfield(L, -2, sqlite3_column_name(st, c));
        }
        lua_rawseti(L, -2, ++row);
    }
    if (rc != SQLITE_DONE) {
        char msg[ML_ERRLEN];
        snprintf(msg, sizeof msg, "%s", sqlite3_errmsg(db));
        sqlite3_finalize(st);
        return luaL_error(L, "db:query: %s", msg);
    }
    sqlite3_finalize(st);
    /* The recorder commits whatever is open before each query (rec_flush):
    ** a BEGIN or SAVEPOINT of the script's would end at its next query, and
    ** its ROLLBACK would find nothing to undo after the changes were kept. */
    if (!sqlite3_get_autocommit(db)) {
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        return luaL_error(L, "db:query: a transaction cannot stay open across queries (moelab "
                          "commits its own rows before each one, so a later ROLLBACK would undo "
                          "nothing); run the statements without BEGIN or SAVEPOINT");
    }
    return 1;
}

/* Query rows as bytes, for the ranks that have no database: per row its
** field count, then per field its name, a type byte and the value. */
typedef struct {
    char *p;
    size_t n, cap;
    int failed;
} Bytes;

static void put(Bytes *b, const void *x, size_t n) {
    if (b->failed) return;
    if (b->n + n > b->cap) {
        size_t cap = 2 * (b->n + n) + 256;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->failed = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, x, n);
    b->n += n;
}

static void put_string(Bytes *b, const char *s, size_t n) {
    uint64_t len = n;
    put(b, &len, sizeof len);
    put(b, s, n);
}

static void rows_encode(lua_State *L, int idx, Bytes *b) {
    uint64_t rows = lua_rawlen(L, idx);
    put(b, &rows, sizeof rows);
    for (uint64_t i = 1; i <= rows; i++) {
        lua_rawgeti(L, idx, (lua_Integer)i);
        uint64_t fields = 0;
        for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1)) fields++;
        put(b, &fields, sizeof fields);
        for (lua_pushnil(L); lua_next(L, -2); lua_pop(L, 1)) {
            size_t n;
            const char *k = lua_tolstring(L, -2, &n); /* a column name: a string already */
            put_string(b, k, n);
            char type = lua_isinteger(L, -1) ? 'i' : lua_type(L, -1) == LUA_TNUMBER ? 'n' : 's';
            put(b, &type, 1);
            if (type == 'i') {
                lua_Integer v = lua_tointeger(L, -1);
                put(b, &v, sizeof v);
            } else if (type == 'n') {
                lua_Number v = lua_tonumber(L, -1);
                put(b, &v, sizeof v);
            } else {
                const char *v = lua_tolstring(L, -1, &n);
                put_string(b, v, n);
            }
        }
        lua_pop(L, 1);
    }
}

static const char *take(const char **p, size_t n) {
    const char *at = *p;
    *p += n;
    return at;
}

static uint64_t take_u64(const char **p) {
    uint64_t v;
    memcpy(&v, take(p, sizeof v), sizeof v);
    return v;
}

static void rows_decode(lua_State *L, const char *p) {
    uint64_t rows = take_u64(&p);
    lua_createtable(L, (int)rows, 0);
    for (uint64_t i = 1; i <= rows; i++) {
        uint64_t fields = take_u64(&p);
        lua_createtable(L, 0, (int)fields);
        for (uint64_t f = 0; f < fields; f++) {
            uint64_t n = take_u64(&p);
            lua_pushlstring(L, take(&p, n), n);
            char type = *take(&p, 1);
            if (type == 'i') {
                lua_Integer v;
                memcpy(&v, take(&p, sizeof v), sizeof v);
                lua_pushinteger(L, v);
            } else if (type == 'n') {
                lua_Number v;
                memcpy(&v, take(&p, sizeof v), sizeof v);
                lua_pushnumber(L, v);
            } else {
                n = take_u64(&p);
                lua_pushlstring(L, take(&p, n), n);
            }
            lua_rawset(L, -3);
        }
        lua_rawseti(L, -2, (lua_Integer)i);
    }
}

/* Over several ranks rank 0 calls `here` with the arguments on the stack
** and sends every rank the array of rows it returns (or its error), so that
** scripts read the same on every rank; the others (remote) do not call it. */
static int rank0_rows(lua_State *L, lua_CFunction here, int remote, const char *what) {
    char err[ML_ERRLEN] = "";
    int rc = 0;
    if (!remote) {
        lua_pushcfunction(L, here);
        lua_insert(L, 1);
        if (lua_pcall(L, lua_gettop(L) - 1, 1, 0) != LUA_OK) {
            snprintf(err, sizeof err, "%s", lua_isstring(L, -1) ? lua_tostring(L, -1) : "failed");
            rc = -1;
        }
    }
    Bytes b = {0};
    if (rc == 0 && !remote) {
        rows_encode(L, lua_gettop(L), &b);
        if (b.failed) rc = ml_error(err, "%s: out of memory", what);
    }
    if (rank0_outcome(rc, err) != 0) {
        free(b.p);
        return luaL_error(L, "%s", err);
    }
    uint64_t n = b.n;
    dist_broadcast(&n, sizeof n);
    if (remote && !(b.p = malloc(n ? n : 1))) dist_fail("out of memory for rank 0's rows");
    dist_broadcast(b.p, n);
    if (remote) rows_decode(L, b.p);
    free(b.p);
    return 1;
}

static int db_query(lua_State *L) {
    lmoelab_agree(L, "db:query");
    LDb *d = check_db(L, 1);
    if (!dist_active()) return query_here(L);
    return rank0_rows(L, query_here, d->remote, "db:query");
}

static int db_path(lua_State *L) {
    LDb *d = check_db(L, 1);
    lua_pushstring(L, d->path);
    return 1;
}

/* ------------------------------------------------------------------------ */
/* runs                                                                      */

enum { RUN_UV_DB = 1, RUN_UV_MODEL, RUN_UV_CORPUS, RUN_NUV = 3 };

static LRun *check_run(lua_State *L, int idx) {
    LRun *r = luaL_checkudata(L, idx, RUN_MT);
    if (!r->open) luaL_error(L, "the run is closed");
    return r;
}

/* The database of a run, or NULL when it has been closed. */
static Recorder *run_recorder(lua_State *L, int idx) {
    lua_getiuservalue(L, idx, RUN_UV_DB);
    LDb *d = luaL_testudata(L, -1, DB_MT);
    lua_pop(L, 1);
    return d ? d->r : NULL;
}

/* Closes a run: a run still 'running' ends as the script ended. */
static int run_close(lua_State *L) {
    LRun *r = luaL_checkudata(L, 1, RUN_MT);
    if (!r->open) return 0;
    Recorder *rec = run_recorder(L, 1);
    if (rec && strcmp(r->status, "running") == 0) {
        lua_getfield(L, LUA_REGISTRYINDEX, "moelab.script_status");
        const char *status = lua_isstring(L, -1) ? lua_tostring(L, -1) : "finished";
        lua_getfield(L, LUA_REGISTRYINDEX, "moelab.script_error");
        const char *msg = lua_tostring(L, -1);
        char err[ML_ERRLEN];
        rec_flush(rec, err);
        if (rec_run_status(rec, r->t.run_id, status, msg, err) == 0)
            snprintf(r->status, sizeof r->status, "%s", status); /* what tostring shows */
        lua_pop(L, 2);
    }
    int64_t run_id = r->t.run_id; /* kept for tostring */
    trainer_free(&r->t);
    r->t.run_id = run_id;
    r->open = 0;
    return 0;
}

static int db_run(lua_State *L) {
    static const char *const keys[] = {"name", "model", "data", "experiment", "seed", NULL};
    lmoelab_agree(L, "db:run");
    LDb *d = check_db(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    check_keys(L, 2, "db:run", keys);
    const char *name = opt_str(L, 2, "db:run", "name", NULL);
    if (!name) luaL_error(L, "db:run: 'name' is required");
    const char *experiment = opt_str(L, 2, "db:run", "experiment", NULL);
    lua_getfield(L, 2, "model");
    LModel *m = luaL_testudata(L, -1, MODEL_MT);
    if (!m || !m->m) luaL_error(L, "db:run: 'model' must be a model from moelab.model or moelab.load");
    lua_getfield(L, 2, "data");
    LCorpus *c = luaL_testudata(L, -1, CORPUS_MT);
    if (!c || !c->c) luaL_error(L, "db:run: 'data' must be a corpus from moelab.corpus");
    lua_Integer seed = opt_int(L, 2, "db:run", "seed", (lua_Integer)m->m->config.seed, 0, SEED_MAX);
    char err[ML_ERRLEN];
    if (corpus_check_context(c->c, SPLIT_TRAIN, m->m->config.context, err) != 0 ||
        corpus_check_vocab(c->c, m->m->config.vocab, err) != 0)
        luaL_error(L, "db:run: %s", err);
    if (!experiment) {
        lua_getfield(L, LUA_REGISTRYINDEX, "moelab.script");
        experiment = lua_tostring(L, -1);
    }

    LRun *r = lua_newuserdatauv(L, sizeof *r, RUN_NUV);
    memset(r, 0, sizeof *r);
    luaL_setmetatable(L, RUN_MT);
    int ud = lua_gettop(L);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, ud, RUN_UV_DB);
    lua_getfield(L, 2, "model");
    lua_setiuservalue(L, ud, RUN_UV_MODEL);
    lua_getfield(L, 2, "data");
    lua_setiuservalue(L, ud, RUN_UV_CORPUS);

    char *model_json = config_to_json(&m->m->config);
    JsonBuf b = {0};
    jb_puts(&b, "{\"model\":");
    jb_puts(&b, model_json ? model_json : "null");
    jb_puts(&b, ",\"data\":{\"path\":");
    if (c->c->path) jb_string(&b, c->c->path);
    else jb_puts(&b, "null");
    jb_printf(&b, ",\"bytes\":%zu,\"split\":", c->c->n);
    jb_number(&b, c->c->split);
    jb_printf(&b, "},\"seed\":%lld}", (long long)seed);
    free(model_json);
    if (b.failed) {
        jb_free(&b);
        luaL_error(L, "db:run: out of memory");
    }
    int64_t run_id = -1;
    int rc = d->remote ? 0
                       : rec_run_begin(d->r, name, experiment, b.data, (uint64_t)seed,
                                       (int64_t)m->m->num_parameters, model_active_parameters(m->m),
                                       model_is_causal(m->m), &run_id, err);
    jb_free(&b);
    if (rank0_outcome(rc, err) != 0) luaL_error(L, "db:run: %s", err);
    dist_broadcast(&run_id, sizeof run_id);
    if (trainer_init(&r->t, m->m, c->c, d->r, run_id, name, (uint64_t)seed, err) != 0)
        luaL_error(L, "db:run: %s", err);
    r->t.records = 1; /* here, or by rank 0 */
    r->open = 1;
    snprintf(r->status, sizeof r->status, "running");
    lua_getiuservalue(L, 1, 1);
    lua_pushvalue(L, ud);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    return 1;
}

/* Refreshes the trainer's pointers: the model, corpus or db may have been closed. */
static void run_bind(lua_State *L, LRun *r) {
    lua_getiuservalue(L, 1, RUN_UV_DB);
    LDb *d = luaL_testudata(L, -1, DB_MT);
    lua_pop(L, 1);
    if (!d || (!d->r && !d->remote)) luaL_error(L, "the run's database is closed");
    r->t.rec = d->r;
    lua_getiuservalue(L, 1, RUN_UV_MODEL);
    LModel *m = luaL_testudata(L, -1, MODEL_MT);
    lua_getiuservalue(L, 1, RUN_UV_CORPUS);
    LCorpus *c = luaL_testudata(L, -1, CORPUS_MT);
    lua_pop(L, 2);
    if (!m || !m->m) luaL_error(L, "the run's model is closed");
    if (!c || !c->c) luaL_error(L, "the run's corpus is closed");
    r->t.model = m->m;
    r->t.corpus = c->c;
}

static void set_num(lua_State *L, const char *k, double v) {
    lua_pushnumber(L, v);
    lua_setfield(L, -2, k);
}

static void set_int(lua_State *L, const char *k, lua_Integer v) {
    lua_pushinteger(L, v);
    lua_setfield(L, -2, k);
}

/* The options table of a run method at index 2 (nil or absent: all defaults),
** its keys checked. */
static void run_options(lua_State *L, const char *what, const char *const *keys) {
    if (lua_isnoneornil(L, 2)) {
        lua_settop(L, 1);
        lua_newtable(L);
    }
    luaL_checktype(L, 2, LUA_TTABLE);
    check_keys(L, 2, what, keys);
}

static int run_train(lua_State *L) {
    static const char *const keys[] = {
        "steps", "batch", "lr", "min_lr", "warmup", "weight_decay", "clip", "beta1", "beta2",
        "eps", "eval_every", "eval_batches", "eval_batch", "threads", "progress", "probe", NULL};
    static const char *const probe_keys[] = {"every", "batch", "seed", NULL};
    LRun *r = check_run(L, 1);
    run_options(L, "run:train", keys);
    run_bind(L, r);
    TrainOptions o;
    train_options_defaults(&o);
    const char *what = "run:train";
    o.steps = (int)opt_int(L, 2, what, "steps", o.steps, 1, 1 << 30);
    o.batch = (int)opt_int(L, 2, what, "batch", o.batch, 1, 65536);
    o.lr = opt_float(L, 2, what, "lr", o.lr);
    o.min_lr = opt_float(L, 2, what, "min_lr", o.min_lr);
    o.warmup = (int)opt_int(L, 2, what, "warmup", o.warmup, 0, 1 << 30);
    o.weight_decay = opt_float(L, 2, what, "weight_decay", o.weight_decay);
    o.clip = opt_float(L, 2, what, "clip", o.clip);
    o.beta1 = opt_float(L, 2, what, "beta1", o.beta1);
    o.beta2 = opt_float(L, 2, what, "beta2", o.beta2);
    o.eps = opt_float(L, 2, what, "eps", o.eps);
    o.eval_every = (int)opt_int(L, 2, what, "eval_every", o.eval_every, 0, 1 << 30);
    o.eval_batches = (int)opt_int(L, 2, what, "eval_batches", o.eval_batches, 0, 1 << 20);
    o.eval_batch = (int)opt_int(L, 2, what, "eval_batch", o.eval_batch, 0, 65536);
    o.threads = (int)opt_int(L, 2, what, "threads", o.threads, 0, 1024);
    o.progress = opt_bool(L, 2, what, "progress", -1);
    if (!lua_isnoneornil(L, 2) && lua_getfield(L, 2, "probe") != LUA_TNIL) {
        /* probe = { every = N, batch = 8, seed = 4321 }: routing over training */
        if (!lua_istable(L, -1)) luaL_error(L, "run:train: 'probe' must be a table, for example { every = 50 }");
        int p = lua_gettop(L);
        check_keys(L, p, "run:train probe", probe_keys);
        const char *pw = "run:train probe";
        o.probe_every = (int)opt_int(L, p, pw, "every", 0, 1, 1 << 30);
        if (o.probe_every == 0) luaL_error(L, "run:train probe: 'every' (steps between probes) is required");
        o.probe_batch = (int)opt_int(L, p, pw, "batch", o.probe_batch, 1, 65536);
        o.probe_seed = (uint64_t)opt_int(L, p, pw, "seed", (lua_Integer)o.probe_seed, 0, SEED_MAX);
    }
    lua_settop(L, 2);

    char shape[256];
    int eval_batch = o.eval_batches ? (o.eval_batch ? o.eval_batch : o.batch) : 0;
    snprintf(shape, sizeof shape, "run:train (%d steps of batch %d, evaluations %d every %d of %d, "
             "%sclip, probe %d of %d", o.steps, o.batch, o.eval_batches, o.eval_every, eval_batch,
             o.clip > 0.0f ? "" : "no ", o.probe_every, o.probe_every ? o.probe_batch : 0);
    agree_shape(L, shape, sizeof shape, r->t.model, &r->t.model->config.moe);

    TrainResult res;
    char err[ML_ERRLEN] = "";
    /* what sets no collective but must be the same: each rank steps its copy
    ** (+ 0.0 makes -0.0 0.0, which trains alike but has other bits) */
    double same[] = {o.lr, o.min_lr + 0.0, o.warmup, o.weight_decay + 0.0, o.clip + 0.0,
                     o.beta1 + 0.0, o.beta2 + 0.0, o.eps, (double)o.probe_seed};
    if (agree_inputs(r->t.model, NULL, r->t.corpus, same, sizeof same, "lr, min_lr, warmup, "
                     "weight_decay, clip, beta1, beta2, eps or probe seed", err) != 0)
        luaL_error(L, "run:train: %s", err);
    if (trainer_train(&r->t, &o, &res, err) != 0) {
        char ignored[ML_ERRLEN];
        if (r->t.rec) /* rank 0's, over several ranks (the others have none) */
            rec_run_status(r->t.rec, r->t.run_id, "failed", err, ignored); /* kept rows stay */
        snprintf(r->status, sizeof r->status, "failed");
        c_error(L, "run:train", "train", err);
    }
    snprintf(r->status, sizeof r->status, "%s", res.status);
    if (strcmp(res.status, "interrupted") == 0) {
        lua_sethook(L, NULL, 0, 0); /* the CLI's stop hook would replace this message */
        luaL_error(L, "run '%s' %s; the run is recorded as 'interrupted'", r->t.name, err);
    }
    if (strcmp(res.status, "diverged") == 0) {
        lua_getglobal(L, "io");
        lua_getfield(L, -1, "stderr");
        lua_getfield(L, -1, "write");
        lua_pushvalue(L, -2);
        lua_pushfstring(L, "moelab: run '%s' diverged: %s; recorded as 'diverged'\n", r->t.name, err);
        lua_call(L, 2, 0);
        lua_pop(L, 2);
    }
    lua_newtable(L);
    set_num(L, "loss", res.loss);
    set_num(L, "last_loss", res.last_loss);
    set_num(L, "val_loss", res.val_loss);
    set_num(L, "tokens_per_s", res.tokens_per_s);
    set_num(L, "seconds", res.seconds);
    set_num(L, "flops_per_token", res.flops_per_token);
    set_int(L, "steps", res.steps);
    set_int(L, "tokens", res.tokens);
    lua_pushstring(L, res.status);
    lua_setfield(L, -2, "status");
    return 1;
}

/* run:evaluate{ batches, batch, split, record, seed, router }: router is a
** counterfactual router table (config_router_from_json) */
static int run_evaluate(lua_State *L) {
    static const char *const keys[] = {"batches", "batch", "split", "record", "seed", "router", NULL};
    LRun *r = check_run(L, 1);
    run_options(L, "run:evaluate", keys);
    run_bind(L, r);
    EvalOptions o;
    eval_options_defaults(&o);
    static const char *const splits[] = {"val", "train", NULL};
    const char *what = "run:evaluate";
    o.batches = (int)opt_int(L, 2, what, "batches", o.batches, 1, 1 << 20);
    o.batch = (int)opt_int(L, 2, what, "batch", o.batch, 1, 65536);
    o.seed = (uint64_t)opt_int(L, 2, what, "seed", (lua_Integer)o.seed, 0, SEED_MAX);
    o.record = opt_bool(L, 2, what, "record", 0);
    o.split = opt_choice(L, 2, what, "split", splits, 0) == 0 ? SPLIT_VAL : SPLIT_TRAIN;
    EvalResult res;
    char err[ML_ERRLEN];
    ModelConfig cf = r->t.model->config; /* a counterfactual router over the model's */
    char *router_json = NULL;
    if (!lua_isnoneornil(L, 2) && lua_getfield(L, 2, "router") != LUA_TNIL) {
        if (!lua_istable(L, -1)) luaL_error(L, "run:evaluate: 'router' must be a table, for example "
                                               "{ kind = \"threshold\", p = 0.9 }");
        JsonBuf b = {0};
        table_json(L, -1, "run:evaluate: router", "moe.router", &b);
        int bad = config_router_from_json(&cf, b.data ? b.data : "{}", b.data ? b.len : 2, err);
        jb_free(&b);
        if (bad) luaL_error(L, "run:evaluate: router: %s", err);
        if (!(router_json = config_router_to_json(&cf.moe))) luaL_error(L, "run:evaluate: out of memory");
        o.router = &cf.moe;
        o.router_json = router_json;
    }
    lua_settop(L, 2);
    char shape[256];
    snprintf(shape, sizeof shape, "run:evaluate (%d batches of %d, %srecorded", o.batches, o.batch,
             o.record ? "" : "not ");
    agree_shape(L, shape, sizeof shape, r->t.model, o.router ? o.router : &r->t.model->config.moe);
    uint64_t same[] = {o.seed, (uint64_t)o.split}; /* every rank draws every batch */
    if (agree_inputs(r->t.model, router_json, r->t.corpus, same, sizeof same, "seed or split",
                     err) != 0) {
        free(router_json);
        luaL_error(L, "run:evaluate: %s", err);
    }
    int failed = trainer_evaluate(&r->t, &o, &res, err);
    free(router_json);
    if (failed) {
        if (res.interrupted) { /* the run is interrupted too, as by run:train */
            char ignored[ML_ERRLEN];
            if (r->t.rec) rec_run_status(r->t.rec, r->t.run_id, "interrupted", err, ignored);
            snprintf(r->status, sizeof r->status, "interrupted");
            lua_sethook(L, NULL, 0, 0); /* the CLI's stop hook would replace this message */
            luaL_error(L, "run '%s' %s; the run is recorded as 'interrupted'", r->t.name, err);
        }
        c_error(L, "run:evaluate", "evaluate", err);
    }
    lua_newtable(L);
    set_num(L, "loss", res.loss);
    set_num(L, "moe_flops_per_token", res.moe_flops_per_token);
    if (!isnan(res.topk_flops_per_token)) set_num(L, "topk_flops_per_token", res.topk_flops_per_token);
    set_num(L, "experts_per_token", res.experts_per_token);
    const MoeConfig *mc = &r->t.model->config.moe;
    if (mc->enabled && mc->bias) /* a moefied model: the share of its FFN neurons run */
        set_num(L, "ffn_fraction", res.experts_per_token / mc->experts);
    set_int(L, "tokens", res.tokens);
    set_int(L, "eval_id", res.eval_id);
    return 1;
}

static int run_id(lua_State *L) {
    LRun *r = check_run(L, 1);
    lua_pushinteger(L, r->t.run_id);
    return 1;
}

static int run_tostring(lua_State *L) {
    LRun *r = luaL_checkudata(L, 1, RUN_MT);
    lua_pushfstring(L, "moelab.run(%s, id %d, %s)", r->open ? r->t.name : "closed",
                    (int)r->t.run_id, r->status);
    return 1;
}

/* moelab.sweep{ ... }: lua/moelab/sweep.lua's run, loaded when first used */
static int l_sweep(lua_State *L) {
    int n = lua_gettop(L);
    lua_getglobal(L, "require");
    lua_pushstring(L, "moelab.sweep");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "run");
    lua_insert(L, 1);
    lua_pop(L, 1);
    lua_call(L, n, LUA_MULTRET);
    return lua_gettop(L);
}

/* ------------------------------------------------------------------------ */
/* placement replays: the C side of lua/moelab/placement.lua                 */

#define PLACEMENT_WHAT "moelab placement"

/* Raises "moelab placement: ..." with no position before it, as the
** command's own errors are (`moelab placement` shows them as usage errors). */
static int placement_error(lua_State *L, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    lua_pushfstring(L, "%s: ", PLACEMENT_WHAT);
    lua_pushvfstring(L, fmt, ap);
    va_end(ap);
    lua_concat(L, 2);
    return lua_error(L);
}

/* A replay's routing, read from a database: freed with the userdata. */
static int routing_gc(lua_State *L) {
    placement_routing_free(luaL_checkudata(L, 1, ROUTING_MT));
    return 0;
}

static PlacementPolicy check_policy(lua_State *L, const char *name) {
    int p = placement_policy(name);
    if (p < 0) {
        luaL_Buffer names;
        luaL_buffinit(L, &names);
        for (int i = 0; i < PLACEMENT_POLICIES; i++) {
            if (i > 0) luaL_addstring(&names, ", ");
            luaL_addstring(&names, placement_policy_names[i]);
        }
        luaL_pushresult(&names);
        placement_error(L, "unknown policy '%s' (%s)", name, lua_tostring(L, -1));
    }
    return (PlacementPolicy)p;
}

/* The value at idx as a device count (the range is placement.h's). */
static int check_devices(lua_State *L, int idx) {
    int ok = lua_type(L, idx) == LUA_TNUMBER;
    lua_Integer v = ok ? lua_tointegerx(L, idx, &ok) : 0;
    if (!ok || v < 1 || v > PLACEMENT_MAX_DEVICES) {
        char got[64];
        placement_error(L, "devices must be whole numbers between 1 and %d, got %s",
                        PLACEMENT_MAX_DEVICES, value_text(L, idx, got, sizeof got));
    }
    return (int)v;
}

static PlacementCosts placement_costs(lua_State *L, int idx) {
    PlacementCosts c = {opt_num(L, idx, PLACEMENT_WHAT, "bandwidth", PLACEMENT_BANDWIDTH),
                        opt_num(L, idx, PLACEMENT_WHAT, "rate", PLACEMENT_RATE)};
    return c;
}

/* A result row as a table; layer "all" for a total. */
static void push_placement_result(lua_State *L, const PlacementResult *r) {
    lua_createtable(L, 0, 11);
    lua_pushstring(L, placement_policy_names[r->policy]);
    lua_setfield(L, -2, "policy");
    set_int(L, "devices", r->devices);
    if (r->layer == PLACEMENT_ALL_LAYERS) {
        lua_pushstring(L, "all");
        lua_setfield(L, -2, "layer");
    } else {
        set_int(L, "layer", r->layer);
    }
    set_int(L, "assignments", r->assignments);
    set_num(L, "local_share", r->local_share);
    set_int(L, "remote_tokens", r->remote_tokens);
    set_int(L, "bytes", r->bytes);
    set_num(L, "imbalance", r->imbalance);
    set_num(L, "compute_ms", r->compute_ms);
    set_num(L, "comm_ms", r->comm_ms);
    set_num(L, "critical_ms", r->critical_ms);
}

/* moelab.placement_study(db, eval_id, { devices = P | { P, ... }, policy = NAME | "all",
** bandwidth = GB/s, rate = GFLOP/s }) → a row per (policy, P, layer) and a total
** per (policy, P) (placement_study of placement.h) */
static int placement_study_here(lua_State *L) {
    static const char *const keys[] = {"devices", "policy", "bandwidth", "rate", NULL};
    LDb *d = check_db(L, 1);
    lua_Integer eval_id = luaL_checkinteger(L, 2);
    luaL_checktype(L, 3, LUA_TTABLE);
    check_keys(L, 3, PLACEMENT_WHAT, keys);
    PlacementCosts costs = placement_costs(L, 3);
    PlacementPolicy policies[PLACEMENT_POLICIES] = {PLACEMENT_CONTIGUOUS};
    int npolicies = 1;
    const char *policy = opt_str(L, 3, PLACEMENT_WHAT, "policy", "contiguous");
    if (strcmp(policy, "all") == 0)
        for (npolicies = 0; npolicies < PLACEMENT_POLICIES; npolicies++)
            policies[npolicies] = (PlacementPolicy)npolicies;
    else
        policies[0] = check_policy(L, policy);
    int ndevices = PLACEMENT_DEFAULT_DEVICES;
    const int *devices = placement_default_devices;
    int type = lua_getfield(L, 3, "devices");
    if (type == LUA_TTABLE) {
        ndevices = (int)lua_rawlen(L, -1);
        int *list = lua_newuserdatauv(L, (size_t)(ndevices > 0 ? ndevices : 1) * sizeof *list, 0);
        for (int i = 0; i < ndevices; i++) {
            lua_rawgeti(L, -2, i + 1);
            list[i] = check_devices(L, -1);
            lua_pop(L, 1);
        }
        devices = list;
    } else if (type != LUA_TNIL) {
        int *one = lua_newuserdatauv(L, sizeof *one, 0);
        *one = check_devices(L, -2);
        devices = one;
        ndevices = 1;
    }
    PlacementRouting *r = lua_newuserdatauv(L, sizeof *r, 0);
    memset(r, 0, sizeof *r);
    luaL_setmetatable(L, ROUTING_MT);
    char err[ML_ERRLEN];
    if (rec_flush(d->r, err) != 0 || rec_placement_routing(rec_db(d->r), d->path, eval_id, r, err))
        placement_error(L, "%s", err);
    size_t nrows = (size_t)npolicies * (size_t)ndevices * (size_t)(r->nlayers + 1);
    PlacementResult *rows = lua_newuserdatauv(L, (nrows > 0 ? nrows : 1) * sizeof *rows, 0);
    if (placement_study(rows, r, policies, npolicies, devices, ndevices, &costs, err))
        placement_error(L, "%s", err);
    lua_createtable(L, (int)nrows, 0);
    for (size_t i = 0; i < nrows; i++) {
        push_placement_result(L, &rows[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

/* Over several ranks rank 0 reads the routing and computes the rows (the
** others have no database): every rank gets them. */
static int l_placement_study(lua_State *L) {
    lmoelab_agree(L, "moelab.placement_study");
    LDb *d = check_db(L, 1);
    if (!dist_active()) return placement_study_here(L);
    return rank0_rows(L, placement_study_here, d->remote, PLACEMENT_WHAT);
}

/* moelab.placement_layer(tokens, E, P, policy, { d_model = C, flops = { per expert },
** bandwidth = GB/s, rate = GFLOP/s }): one layer of hand-made tokens, each a list
** of the experts (from 0) it chose → the row of placement_layer, and devices
** (1-based by expert, each its device from 0) */
static int l_placement_layer(lua_State *L) {
    static const char *const keys[] = {"d_model", "flops", "bandwidth", "rate", NULL};
    luaL_checktype(L, 1, LUA_TTABLE);
    PlacementRouting r = {0};
    r.experts = (int)check_int(L, 2, PLACEMENT_WHAT, "experts", 1, MOE_MAX_EXPERTS);
    int P = check_devices(L, 3);
    PlacementPolicy policy = check_policy(L, luaL_checkstring(L, 4));
    luaL_checktype(L, 5, LUA_TTABLE);
    check_keys(L, 5, PLACEMENT_WHAT, keys);
    r.d_model = (int)opt_int(L, 5, PLACEMENT_WHAT, "d_model", 0, 1, INT_MAX);
    PlacementCosts costs = placement_costs(L, 5);
    if (lua_getfield(L, 5, "flops") != LUA_TTABLE || (int)lua_rawlen(L, -1) != r.experts)
        placement_error(L, "'flops' must list the %d experts' FLOPs", r.experts);
    for (int e = 0; e < r.experts; e++) {
        if (lua_rawgeti(L, -1, e + 1) != LUA_TNUMBER)
            placement_error(L, "'flops' must list the %d experts' FLOPs", r.experts);
        r.flops[e] = lua_tonumber(L, -1);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    PlacementLayer layer = {0};
    layer.tokens = (int64_t)lua_rawlen(L, 1);
    layer.first = lua_newuserdatauv(L, (size_t)(layer.tokens + 1) * sizeof *layer.first, 0);
    layer.first[0] = 0;
    for (int64_t i = 0; i < layer.tokens; i++) {
        if (lua_rawgeti(L, 1, (lua_Integer)i + 1) != LUA_TTABLE)
            placement_error(L, "token %d must be a list of experts", (int)i + 1);
        layer.first[i + 1] = layer.first[i] + (int64_t)lua_rawlen(L, -1);
        lua_pop(L, 1);
    }
    size_t rows = (size_t)layer.first[layer.tokens] + 1;
    layer.experts = lua_newuserdatauv(L, rows * sizeof *layer.experts, 0);
    for (int64_t i = 0; i < layer.tokens; i++) {
        lua_rawgeti(L, 1, (lua_Integer)i + 1);
        for (int64_t k = layer.first[i]; k < layer.first[i + 1]; k++) {
            lua_rawgeti(L, -1, (lua_Integer)(k - layer.first[i]) + 1);
            layer.experts[k] = (int)check_int(L, -1, PLACEMENT_WHAT, "tokens", 0, r.experts - 1);
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    int device[MOE_MAX_EXPERTS];
    PlacementResult out;
    char err[ML_ERRLEN];
    if (placement_layer(&out, device, &r, &layer, policy, P, &costs, err))
        placement_error(L, "%s", err);
    push_placement_result(L, &out);
    lua_createtable(L, r.experts, 0);
    for (int e = 0; e < r.experts; e++) {
        lua_pushinteger(L, device[e]);
        lua_rawseti(L, -2, e + 1);
    }
    lua_setfield(L, -2, "devices");
    return 1;
}

/* ------------------------------------------------------------------------ */
/* plots and settings                                                        */

/* moelab.plot{ db, figure, out, runs, layer, layers, size, gnuplot }: the
** options of `moelab plot`, checked by plot_render as there. */
static int l_plot(lua_State *L) {
    static const char *const keys[] = {"db", "figure", "out", "runs", "layer", "layers",
                                       "size", "gnuplot", NULL};
    lmoelab_agree(L, "moelab.plot");
    const char *what = "moelab.plot";
    luaL_checktype(L, 1, LUA_TTABLE);
    check_keys(L, 1, what, keys);
    PlotOptions opt = PLOT_OPTIONS_INIT;
    const char *figure = opt_str(L, 1, what, "figure", NULL);
    const char *out = opt_str(L, 1, what, "out", NULL);
    if (!figure) luaL_error(L, "moelab.plot: 'figure' is required (one of %s)", PLOT_FIGURES);
    if (!out) luaL_error(L, "moelab.plot: 'out' is required (a .pdf, .png or .svg path)");
    opt.layer = (int)opt_int(L, 1, what, "layer", PLOT_LAYER_UNSET, 0, INT_MAX);
    opt.size = opt_str(L, 1, what, "size", NULL);
    opt.gnuplot_out = opt_str(L, 1, what, "gnuplot", NULL);
    /* layers = { a, b } */
    if (lua_getfield(L, 1, "layers") != LUA_TNIL) {
        int tbl = lua_gettop(L);
        if (!lua_istable(L, tbl) || lua_rawlen(L, tbl) != 2)
            luaL_error(L, "moelab.plot: 'layers' must be two block numbers, { a, b }");
        for (int i = 0; i < 2; i++) {
            lua_rawgeti(L, tbl, i + 1);
            opt.layers[i] = (int)check_int(L, -1, what, "layers", 0, INT_MAX);
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    lua_getfield(L, 1, "db");
    const char *db_path = NULL;
    LDb *d = luaL_testudata(L, -1, DB_MT);
    char err[ML_ERRLEN];
    if (d) {
        if (!d->r && !d->remote) luaL_error(L, "moelab.plot: the database is closed");
        db_path = d->path;
    } else if (lua_type(L, -1) == LUA_TSTRING) {
        db_path = lua_tostring(L, -1);
    } else {
        luaL_error(L, "moelab.plot: 'db' must be a database from moelab.open or a path");
    }
    /* runs: a list of names or "a,b" */
    lua_getfield(L, 1, "runs");
    if (lua_type(L, -1) == LUA_TTABLE) {
        int tbl = lua_gettop(L);
        lua_Integer n = (lua_Integer)lua_rawlen(L, tbl);
        luaL_Buffer runs;
        luaL_buffinit(L, &runs);
        for (lua_Integer i = 1; i <= n; i++) {
            if (i > 1) luaL_addchar(&runs, ',');
            if (lua_rawgeti(L, tbl, i) != LUA_TSTRING)
                luaL_error(L, "moelab.plot: 'runs' must hold run names");
            luaL_addvalue(&runs); /* the value on top, the buffer below it */
        }
        luaL_pushresult(&runs);
        opt.runs = lua_tostring(L, -1);
    } else if (lua_type(L, -1) == LUA_TSTRING) {
        opt.runs = lua_tostring(L, -1);
    } else if (!lua_isnil(L, -1)) {
        luaL_error(L, "moelab.plot: 'runs' must be a list of names or \"a,b\"");
    }
    /* over several ranks rank 0 draws it */
    int rc = dist_rank() != 0                     ? 0
             : d && d->r && rec_flush(d->r, err) != 0 ? -1
                                                      : plot_render(figure, db_path, out, &opt, err);
    if (rank0_outcome(rc, err) != 0) luaL_error(L, "moelab.plot: %s", err);
    lua_pushstring(L, out);
    return 1;
}

/* moelab.machine() → { cpu, blas_core, xsmm_target, threads, peak_rss }: what a speed
** figure is measured on (machine.h) */
static int l_machine(lua_State *L) {
    lua_newtable(L);
    lua_pushstring(L, machine_cpu_model());
    lua_setfield(L, -2, "cpu");
    lua_pushstring(L, machine_blas_core());
    lua_setfield(L, -2, "blas_core");
    lua_pushstring(L, machine_xsmm_target());
    lua_setfield(L, -2, "xsmm_target");
    set_int(L, "threads", machine_threads());
    set_int(L, "peak_rss", (lua_Integer)machine_peak_rss());
    return 1;
}

/* moelab.sgemm{ n = 2048, threads = all, repeats = 5 } → { median, min, max }
** GFLOP/s of OpenBLAS's sgemm on n³ */
static int l_sgemm(lua_State *L) {
    static const char *const keys[] = {"n", "threads", "repeats", NULL};
    int n = 2048, threads = machine_threads(), repeats = 5;
    if (!lua_isnoneornil(L, 1)) {
        luaL_checktype(L, 1, LUA_TTABLE);
        check_keys(L, 1, "moelab.sgemm", keys);
        n = (int)opt_int(L, 1, "moelab.sgemm", "n", n, 1, 16384);
        threads = (int)opt_int(L, 1, "moelab.sgemm", "threads", threads, 1, 1024);
        repeats = (int)opt_int(L, 1, "moelab.sgemm", "repeats", repeats, 1, 1000);
    }
    MachineRate r;
    char err[ML_ERRLEN];
    if (machine_sgemm_gflops(n, threads, repeats, &r, err) != 0) luaL_error(L, "moelab.sgemm: %s", err);
    lua_newtable(L);
    set_num(L, "median", r.median);
    set_num(L, "min", r.min);
    set_num(L, "max", r.max);
    return 1;
}

/* moelab.clock() → seconds on a monotonic clock (os.clock is CPU time) */
static int l_clock(lua_State *L) {
    lua_pushnumber(L, machine_clock());
    return 1;
}

static int l_threads(lua_State *L) {
    lua_Integer n = check_int(L, 1, "moelab.threads", "n", 0, 1024); /* 0: all cores */
    trainer_set_threads((int)n);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* module                                                                    */

static void new_class(lua_State *L, const char *name, const luaL_Reg *methods,
                      lua_CFunction gc, lua_CFunction tostring) {
    luaL_newmetatable(L, name);
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__close");
    if (tostring) {
        lua_pushcfunction(L, tostring);
        lua_setfield(L, -2, "__tostring");
    }
    lua_pop(L, 1);
}

int luaopen_moelab(lua_State *L) {
    static const luaL_Reg corpus_methods[] = {{"size", corpus_size}, {"close", corpus_gc}, {NULL, NULL}};
    static const luaL_Reg model_methods[] = {
        {"save", model_save},     {"loss", model_loss},   {"token_losses", model_token_losses},
        {"sample", model_sample_l},
        {"config", model_config_l}, {"parameters", model_parameters}, {"memory", model_memory_l},
        {"parallel", model_parallel},
        {"close", model_gc},
        {NULL, NULL}};
    static const luaL_Reg db_methods[] = {
        {"run", db_run}, {"query", db_query}, {"path", db_path}, {"close", db_close}, {NULL, NULL}};
    static const luaL_Reg run_methods[] = {
        {"train", run_train}, {"evaluate", run_evaluate}, {"id", run_id}, {"close", run_close},
        {NULL, NULL}};
    static const luaL_Reg functions[] = {
        {"corpus", l_corpus}, {"model", l_model}, {"load", l_load}, {"open", l_open},
        {"plot", l_plot},     {"threads", l_threads}, {"moefy", l_moefy}, {"fit_router", l_fit_router},
        {"sweep", l_sweep}, {"machine", l_machine}, {"sgemm", l_sgemm}, {"clock", l_clock},
        {"placement_study", l_placement_study}, {"placement_layer", l_placement_layer},
        {NULL, NULL}};
    static const luaL_Reg no_methods[] = {{NULL, NULL}};
    trainer_set_threads(0); /* OpenBLAS single-threaded inside OpenMP, from the start */
    new_class(L, CORPUS_MT, corpus_methods, corpus_gc, corpus_tostring);
    new_class(L, MODEL_MT, model_methods, model_gc, model_tostring);
    new_class(L, DB_MT, db_methods, db_close, NULL);
    new_class(L, RUN_MT, run_methods, run_close, run_tostring);
    new_class(L, ROUTING_MT, no_methods, routing_gc, NULL);
    luaL_newlib(L, functions);
    lua_pushstring(L, MOELAB_VERSION);
    lua_setfield(L, -2, "version");
    lua_newtable(L);
    lua_setfield(L, -2, "args");
    lua_pushstring(L, PLOT_FIGURES);
    lua_setfield(L, -2, "figures");
    /* this process among those `mpirun -np N` started (dist.h): 0 and 1 alone */
    lua_pushinteger(L, dist_rank());
    lua_setfield(L, -2, "rank");
    lua_pushinteger(L, dist_size());
    lua_setfield(L, -2, "ranks");
    lua_createtable(L, PLACEMENT_POLICIES, 0);
    for (int p = 0; p < PLACEMENT_POLICIES; p++) {
        lua_pushstring(L, placement_policy_names[p]);
        lua_rawseti(L, -2, p + 1);
    }
    lua_setfield(L, -2, "placement_policies");
    return 1;
}

void lmoelab_preload(lua_State *L) {
    luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
    lua_pushcfunction(L, luaopen_moelab);
    lua_setfield(L, -2, "moelab");
    lua_pop(L, 1);
    lua_getglobal(L, "package");
    lua_pushfstring(L, "%s/?.lua;", ml_lua_dir());
    lua_getfield(L, -2, "path");
    lua_concat(L, 2);
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
}

void lmoelab_script_ended(lua_State *L, const char *error_msg, int interrupted) {
    lua_pushstring(L, interrupted ? "interrupted" : error_msg ? "failed" : "finished");
    lua_setfield(L, LUA_REGISTRYINDEX, "moelab.script_status");
    if (error_msg) {
        lua_pushstring(L, error_msg);
        lua_setfield(L, LUA_REGISTRYINDEX, "moelab.script_error");
    }
}
