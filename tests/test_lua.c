/*
** test_lua.c — checks the `moelab` Lua module (src/lmoelab.c) as a script
** sees it: the core of SPEC §4 end to end on a tiny model (corpus, model,
** database, run, train, evaluate, save, load, loss, sample, config, plot),
** what the database holds afterwards, the messages that bad configurations
** and options get, and the status a run is left with when training diverges
** or the script fails.
**
** Each test opens its own lua_State with luaL_openlibs + lmoelab_preload and
** runs Lua snippets (as chunks named "snippet"); databases and checkpoints go to a
** mkdtemp directory under /tmp that the group teardown removes.
*/
#include "testutil.h"

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <sqlite3.h>

#include "common.h"
#include "lmoelab.h"

static char tmpdir[256];

/* ---- Lua helpers -------------------------------------------------------- */

/* What every snippet shares: the module as a global, the scratch directory,
** a tiny model configuration and a corpus long enough for it, and training
** options that keep a step at well under a millisecond. One thread, since the
** machine may be shared and OpenMP barriers then cost more than the work. */
static const char *prelude =
    "moelab = require 'moelab'\n"
    "moelab.threads(1)\n"
    "TEXT = string.rep('abcdefgh', 200)\n"
    "function tiny(extra)\n"
    "  local c = { layers = 1, d_model = 16, heads = 2, context = 16, ffn = { hidden = 32 } }\n"
    "  for k, v in pairs(extra or {}) do c[k] = v end\n"
    "  return c\n"
    "end\n"
    "function fast(extra)\n"
    "  local o = { batch = 4, lr = 1e-2, warmup = 2, threads = 1, progress = false,\n"
    "              eval_batches = 2 }\n"
    "  for k, v in pairs(extra or {}) do o[k] = v end\n"
    "  return o\n"
    "end\n"
    /* run:train reports a divergence on io.stderr: keep it for the test */
    "STDERR = ''\n"
    "io.stderr = { write = function(self, ...) STDERR = STDERR .. table.concat({...}) end }\n";

/* Runs a chunk named "snippet", so that an error message cannot match a
** needle through the chunk name (luaL_dostring names a chunk by its text). */
static int run_snippet(lua_State *L, const char *code) {
    int rc = luaL_loadbuffer(L, code, strlen(code), "=snippet");
    return rc != LUA_OK ? rc : lua_pcall(L, 0, LUA_MULTRET, 0);
}

static void run_ok(lua_State *L, const char *code) {
    if (run_snippet(L, code) != LUA_OK)
        fail_msg("Lua error: %s\nin:\n%s", lua_tostring(L, -1), code);
    lua_settop(L, 0);
}

static lua_State *new_state(void) {
    lua_State *L = luaL_newstate();
    assert_non_null(L);
    luaL_openlibs(L);
    lmoelab_preload(L);
    lua_pushstring(L, tmpdir);
    lua_setglobal(L, "DIR");
    run_ok(L, prelude);
    return L;
}

/* Runs code, which must fail with a message holding every needle (NULL ends
** the list). */
static void run_err(lua_State *L, const char *code, ...) {
    if (run_snippet(L, code) == LUA_OK) fail_msg("expected an error from:\n%s", code);
    const char *msg = lua_tostring(L, -1);
    if (!msg) fail_msg("the error from %s is not a string", code);
    va_list ap;
    va_start(ap, code);
    for (const char *needle; (needle = va_arg(ap, const char *));)
        if (!strstr(msg, needle)) {
            va_end(ap);
            fail_msg("the error from\n  %s\nis\n  %s\nwhich does not contain '%s'", code, msg, needle);
        }
    va_end(ap);
    lua_settop(L, 0);
}

/* The value of a Lua expression. */
static void eval(lua_State *L, const char *expr) {
    lua_settop(L, 0);
    lua_pushfstring(L, "return %s", expr);
    if (run_snippet(L, lua_tostring(L, -1)) != LUA_OK)
        fail_msg("Lua error: %s\nin: %s", lua_tostring(L, -1), expr);
    lua_remove(L, 1);
}

static double lua_num(lua_State *L, const char *expr) {
    eval(L, expr);
    if (lua_type(L, -1) != LUA_TNUMBER)
        fail_msg("%s is a %s, expected a number", expr, luaL_typename(L, -1));
    double v = lua_tonumber(L, -1);
    lua_settop(L, 0);
    return v;
}

static int lua_true(lua_State *L, const char *expr) {
    eval(L, expr);
    if (lua_type(L, -1) != LUA_TBOOLEAN)
        fail_msg("%s is a %s, expected a boolean", expr, luaL_typename(L, -1));
    int v = lua_toboolean(L, -1);
    lua_settop(L, 0);
    return v;
}

#define assert_lua(L, expr) do {                                           \
        if (!lua_true(L, expr)) fail_msg("Lua: %s is false", expr);        \
    } while (0)

/* A string value, copied into buf. */
static const char *lua_str(lua_State *L, const char *expr, char *buf, size_t n) {
    eval(L, expr);
    if (lua_type(L, -1) != LUA_TSTRING)
        fail_msg("%s is a %s, expected a string", expr, luaL_typename(L, -1));
    snprintf(buf, n, "%s", lua_tostring(L, -1));
    lua_settop(L, 0);
    return buf;
}

/* ---- SQLite helpers: a fresh connection, as another program would open ---- */

static sqlite3 *db_open(const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    sqlite3 *db = NULL;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK)
        fail_msg("cannot open %s: %s", path, db ? sqlite3_errmsg(db) : "out of memory");
    return db;
}

static sqlite3_stmt *db_row(sqlite3 *db, const char *sql) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
        fail_msg("prepare '%s': %s", sql, sqlite3_errmsg(db));
    if (sqlite3_step(st) != SQLITE_ROW) fail_msg("no row from '%s': %s", sql, sqlite3_errmsg(db));
    return st;
}

static int64_t db_int(sqlite3 *db, const char *sql) {
    sqlite3_stmt *st = db_row(db, sql);
    int64_t v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

static double db_real(sqlite3 *db, const char *sql) {
    sqlite3_stmt *st = db_row(db, sql);
    if (sqlite3_column_type(st, 0) == SQLITE_NULL) fail_msg("'%s' is NULL", sql);
    double v = sqlite3_column_double(st, 0);
    sqlite3_finalize(st);
    return v;
}

static const char *db_text(sqlite3 *db, const char *sql, char *buf, size_t n) {
    sqlite3_stmt *st = db_row(db, sql);
    const unsigned char *s = sqlite3_column_text(st, 0);
    snprintf(buf, n, "%s", s ? (const char *)s : "(NULL)");
    sqlite3_finalize(st);
    return buf;
}

/* The first bytes of a file under tmpdir, and its size. */
static long file_head(const char *name, char *head, size_t n) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "rb");
    if (!f) fail_msg("cannot open %s", path);
    memset(head, 0, n);
    size_t got = fread(head, 1, n, f);
    (void)got;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    return size;
}

/* ---- the module --------------------------------------------------------- */

static void test_module(void **state) {
    (void)state;
    lua_State *L = new_state();
    assert_lua(L, "type(moelab.args) == 'table'");
    assert_lua(L, "next(moelab.args) == nil");
    assert_lua(L, "require('moelab') == moelab");
    char buf[64];
    assert_string_equal(lua_str(L, "moelab.version", buf, sizeof buf), MOELAB_VERSION);
    assert_lua(L, "moelab.figures:find('loss') ~= nil");
    for (const char *f = "corpus\0model\0load\0open\0plot\0threads\0"; *f; f += strlen(f) + 1) {
        char expr[64];
        snprintf(expr, sizeof expr, "type(moelab.%s) == 'function'", f);
        assert_lua(L, expr);
    }
    run_err(L, "moelab.threads(-1)", "moelab.threads", NULL);
    lua_close(L);
}

/* model:config() fills in every default, and reflects what was given. */
static void test_config_defaults(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "m = moelab.model{ layers = 1, d_model = 16, heads = 2, context = 16 }\n"
              "c = m:config()");
    assert_int_equal((int)lua_num(L, "c.ffn.hidden"), 64); /* 4 × d_model */
    assert_int_equal((int)lua_num(L, "c.vocab"), 256);
    assert_int_equal((int)lua_num(L, "c.layers"), 1);
    assert_int_equal((int)lua_num(L, "c.d_model"), 16);
    assert_int_equal((int)lua_num(L, "c.heads"), 2);
    assert_int_equal((int)lua_num(L, "c.context"), 16);
    assert_int_equal((int)lua_num(L, "c.seed"), 1);
    assert_true(test_close(lua_num(L, "c.norm_eps"), 1e-5, 1e-6, 0));
    assert_true(test_close(lua_num(L, "c.init_std"), 0.02, 1e-6, 0));
    char buf[64];
    assert_string_equal(lua_str(L, "c.norm", buf, sizeof buf), "layernorm");
    assert_string_equal(lua_str(L, "c.activation", buf, sizeof buf), "gelu");
    assert_lua(L, "c.tied == false");
    assert_lua(L, "math.type(c.layers) == 'integer' and math.type(c.ffn.hidden) == 'integer'");

    /* the empty table is every default */
    run_ok(L, "d = moelab.model{}:config()");
    assert_int_equal((int)lua_num(L, "d.d_model"), 128);
    assert_int_equal((int)lua_num(L, "d.ffn.hidden"), 512);
    assert_int_equal((int)lua_num(L, "d.context"), 128);

    /* given values come back as given */
    run_ok(L, "e = moelab.model(tiny{ norm = 'rmsnorm', activation = 'swiglu', tied = true,\n"
              "                      seed = 7, vocab = 300 }):config()");
    assert_string_equal(lua_str(L, "e.norm", buf, sizeof buf), "rmsnorm");
    assert_string_equal(lua_str(L, "e.activation", buf, sizeof buf), "swiglu");
    assert_lua(L, "e.tied == true");
    assert_int_equal((int)lua_num(L, "e.seed"), 7);
    assert_int_equal((int)lua_num(L, "e.vocab"), 300);
    assert_int_equal((int)lua_num(L, "e.ffn.hidden"), 32);

    /* the configuration is enough to build the same model again */
    run_ok(L, "m2 = moelab.model(m:config())");
    assert_lua(L, "m2:parameters() == m:parameters()");
    assert_lua(L, "m2:loss('abcdefgh') == m:loss('abcdefgh')");
    assert_lua(L, "m:parameters() > 0");
    assert_lua(L, "tostring(m):find('d_model=16') ~= nil");
    lua_close(L);
}

/* ---- the happy path of SPEC §4 ------------------------------------------- */

/* An MoE model through the Lua API: training records expert load and aux
** parts per step; a recorded evaluation fills routing, token_stats and
** sparsity; the figures of the MoE records render. */
static void test_moe_end_to_end(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "data  = moelab.corpus{ text = TEXT, split = 0.9 }\n"
              "model = moelab.model(tiny{ moe = { experts = 4, hidden = { 8, 8, 16, 16 },\n"
              "        router = { kind = 'topk', k = 2 }, aux = { balance = 0.01, z = 0.001 } } })\n"
              "db    = moelab.open(DIR .. '/moe.db')\n"
              "run   = db:run{ name = 'moe', model = model, data = data }\n"
              "t = run:train(fast{ steps = 10 })\n"
              "e = run:evaluate{ batches = 2, batch = 4, record = true }\n"
              "total, active = model:parameters()");
    assert_lua(L, "t.status == 'finished'");
    assert_lua(L, "e.experts_per_token == 2");
    assert_lua(L, "e.moe_flops_per_token > 0");
    assert_lua(L, "active < total");
    assert_lua(L, "model:config().moe.router.kind == 'topk'");
    /* threshold and topp count their nominal k, 2, but no more than max_k:
    ** capped at one expert they counted two */
    run_ok(L, "function active(router)\n"
              "  local m = moelab.model(tiny{ moe = { experts = 4, hidden = 8, router = router } })\n"
              "  return select(2, m:parameters())\n"
              "end");
    assert_lua(L, "active{ kind = 'threshold', max_k = 1 } == active{ kind = 'topk', k = 1 }");
    assert_lua(L, "active{ kind = 'topp', p = 0.5, max_k = 1 } == active{ kind = 'topk', k = 1 }");
    assert_lua(L, "active{ kind = 'threshold', max_k = 3 } == active{ kind = 'topk', k = 2 }");
    assert_lua(L, "active{ kind = 'threshold' } == active{ kind = 'topk', k = 2 }");
    assert_lua(L, "model:config().moe.hidden[3] == 16");
    /* the checkpoint's moelab_config fills in every default (SPEC §4): moe.bias
    ** too, which was written only when true */
    run_ok(L, "model:save(DIR .. '/moe.safetensors')\n"
              "local f = assert(io.open(DIR .. '/moe.safetensors', 'rb'))\n"
              "HEADER = f:read(4096)\n"
              "f:close()");
    assert_lua(L, "HEADER:find('\"moe\\\\\":{.*\"bias\\\\\":false') ~= nil");
    assert_lua(L, "model:config().moe.bias == false");
    assert_lua(L, "moelab.load(DIR .. '/moe.safetensors'):config().moe.bias == false");
    /* per step: 1 layer x 4 experts of load, aux parts in metrics */
    assert_lua(L, "db:query('SELECT COUNT(*) AS n FROM expert_load WHERE eval_id IS NULL')[1].n == 10 * 4");
    assert_lua(L, "db:query(\"SELECT COUNT(*) AS n FROM metrics WHERE split = 'train' "
                  "AND aux_balance > 0 AND aux_z > 0 AND aux_loss > 0\")[1].n == 10");
    /* the recorded evaluation: 2 experts per token, tokens = 2 x 4 x 16 */
    assert_lua(L, "db:query('SELECT COUNT(*) AS n FROM routing WHERE eval_id = ?', e.eval_id)[1].n "
                  "== 2 * 4 * 16 * 2");
    assert_lua(L, "db:query('SELECT SUM(experts) AS n FROM token_stats WHERE eval_id = ?', e.eval_id)[1].n "
                  "== 2 * 4 * 16 * 2");
    assert_lua(L, "db:query('SELECT COUNT(*) AS n FROM sparsity WHERE eval_id = ?', e.eval_id)[1].n == 4");
    assert_lua(L, "db:query('SELECT experts_per_token AS x FROM v_experts_per_token')[1].x == 2");
    /* options may be nil */
    run_ok(L, "e2 = run:evaluate(nil)");
    /* a long list of runs (over Lua's 1 KB buffer) is read whole: the first
    ** unknown name is reported, not a broken list */
    run_err(L, "local names = {}\n"
               "for i = 1, 200 do names[i] = string.format('no-such-run-%03d', i) end\n"
               "moelab.plot{ db = db, figure = 'loss', out = DIR .. '/x.pdf', runs = names }",
            "no-such-run-001", NULL);
    /* a training call that fails leaves the run 'failed' in the database */
    run_err(L, "run:train(fast{ steps = 1, lr = 0 })", "lr", NULL);
    assert_lua(L, "db:query('SELECT status FROM runs WHERE run_id = ?', run:id())[1].status == 'failed'");
    for (const char *f = "expert_load experts_per_token loss_vs_flops"; *f;) {
        char fig[32], code[256];
        size_t n = strcspn(f, " ");
        snprintf(fig, sizeof fig, "%.*s", (int)n, f);
        snprintf(code, sizeof code, "moelab.plot{ db = db, figure = '%s', out = DIR .. '/%s.pdf' }",
                 fig, fig);
        run_ok(L, code);
        f += n + (f[n] == ' ');
    }
    lua_close(L);
}

/* A stratified model end to end: trained, its evaluation recorded with the
** stratum of each pass in routing.pass, passes and experts in token_stats
** agreeing with the routing rows, and the experts of all passes loaded. */
static void test_stratified_end_to_end(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "data  = moelab.corpus{ text = TEXT, split = 0.9 }\n"
              "model = moelab.model(tiny{ moe = { experts = 4, hidden = 8,\n"
              "        router = { kind = 'stratified', strata = { 2, 2 }, second = 'sample' },\n"
              "        aux = { balance = 0.01 } } })\n"
              "db    = moelab.open(DIR .. '/strata.db')\n"
              "run   = db:run{ name = 'smoe', model = model, data = data }\n"
              "t = run:train(fast{ steps = 5 })\n"
              "e = run:evaluate{ batches = 2, batch = 4, record = true }");
    assert_lua(L, "t.status == 'finished'");
    assert_lua(L, "model:config().moe.router.strata[2] == 2");
    assert_lua(L, "model:config().moe.router.second == 'sample'");
    /* 2 to 4 experts a token: one or two passes of two */
    assert_lua(L, "e.experts_per_token >= 2 and e.experts_per_token <= 4");
    assert_lua(L, "db:query('SELECT COUNT(DISTINCT pass) AS n FROM routing WHERE eval_id = ?',"
                  " e.eval_id)[1].n == 2");
    /* pass 1 routes to stratum 1's experts only */
    assert_lua(L, "db:query('SELECT MIN(expert) AS x FROM routing WHERE eval_id = ? AND pass = 1',"
                  " e.eval_id)[1].x >= 2");
    assert_lua(L, "db:query('SELECT COUNT(*) AS n FROM token_stats ts WHERE eval_id = ? AND "
                  "passes <> (SELECT COUNT(DISTINCT r.pass) FROM routing r WHERE r.eval_id = ts.eval_id"
                  " AND r.seq = ts.seq AND r.pos = ts.pos)', e.eval_id)[1].n == 0");
    assert_lua(L, "db:query('SELECT SUM(experts) AS n FROM token_stats WHERE eval_id = ?', e.eval_id)[1].n"
                  " == db:query('SELECT COUNT(*) AS n FROM routing WHERE eval_id = ?', e.eval_id)[1].n");
    assert_lua(L, "db:query('SELECT SUM(tokens) AS n FROM expert_load WHERE eval_id = ?', e.eval_id)[1].n"
                  " == db:query('SELECT COUNT(*) AS n FROM routing WHERE eval_id = ?', e.eval_id)[1].n");
    /* a checkpoint loads back to the same loss */
    run_ok(L, "model:save(DIR .. '/smoe.safetensors')\n"
              "same = moelab.load(DIR .. '/smoe.safetensors')");
    assert_lua(L, "same:loss('In the beginning') == model:loss('In the beginning')");
    run_err(L, "moelab.open(DIR .. '/x.db', { adpot = true })", "'adpot'", "'adopt'", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { kind = 'stratified', strata = { 2, 3 } } } })",
            "'moe.router.strata'", "add up to 4", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { kind = 'stratified', second = 'gumbel' } } })",
            "'moe.router.second'", "max, sample", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { kind = 'topk', strata = { 2, 2 } } } })",
            "'moe.router.strata' is not read by the topk router", NULL);
    lua_close(L);
}

/* Merged experts: with causal segments no position's loss depends on a
** later byte; gating on the whole sequence does depend on them (the test
** would see it); a recorded evaluation has each token's 2k gate choices. */
static void test_merge_end_to_end(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "data  = moelab.corpus{ text = TEXT, split = 0.9 }\n"
              "function merged(segment)\n"
              "  return moelab.model(tiny{ init_std = 0.3, moe = { experts = 4, hidden = 8,\n"
              "    router = { kind = 'merge', k = 2, segment = segment, token_attention = 2 } } })\n"
              "end\n"
              "causal, whole = merged(4), merged(0)\n"
              "S1 = 'In the beginning'\n"
              "-- byte 12 changed, the last input of the segment of positions 8-11\n"
              "-- (0-based): the losses 1..10 (Lua's indices) neither see it nor\n"
              "-- predict it, though 9 and 10 share its segment; from 11 on they do\n"
              "function changed_before(m)\n"
              "  local a = m:token_losses(S1 .. 'G')\n"
              "  local b = m:token_losses(S1:sub(1, 11) .. 'X' .. S1:sub(13) .. 'G')\n"
              "  local before, after = 0, 0\n"
              "  for i = 1, #a do\n"
              "    if a[i] ~= b[i] then if i <= 10 then before = before + 1 else after = after + 1 end end\n"
              "  end\n"
              "  return before, after\n"
              "end");
    assert_lua(L, "select(1, changed_before(causal)) == 0");
    assert_lua(L, "select(2, changed_before(causal)) > 0");
    assert_lua(L, "select(1, changed_before(whole)) > 0");
    run_ok(L, "db  = moelab.open(DIR .. '/merge.db')\n"
              "run = db:run{ name = 'meo', model = causal, data = data }\n"
              "t = run:train(fast{ steps = 4 })\n"
              "e = run:evaluate{ batches = 2, batch = 4, record = true }");
    assert_lua(L, "t.status == 'finished'");
    assert_lua(L, "e.experts_per_token == 4");
    /* per-token top-k with the same gates: k = 2 experts of 2 x 2 x 16 x 8
    ** FLOPs and a router of 2 x 16 x 4 (one layer); the merged layer costs less */
    assert_lua(L, "e.topk_flops_per_token == 2 * 2 * 2 * 16 * 8 + 2 * 16 * 4");
    /* what it executed: per segment of 4 positions two merges (2 x 2 x 16 x 8)
    ** and two gates (2 x 4 x (16 + 8)); per token the two merged products
    ** (2 x 2 x 16 x 8) and token attention (2 x 2 x (16 x 8 + 8 x 4)) */
    assert_lua(L, "e.moe_flops_per_token == (2 * 2 * 2 * 16 * 8 + 2 * 4 * 24) / 4"
                  " + 2 * 2 * 16 * 8 + 2 * 2 * (16 * 8 + 8 * 4)");
    assert_lua(L, "db:query('SELECT topk_flops_per_token AS x FROM evals WHERE eval_id = ?',"
                  " e.eval_id)[1].x == e.topk_flops_per_token");
    assert_lua(L, "db:query('SELECT COUNT(*) AS n FROM routing WHERE eval_id = ?', e.eval_id)[1].n"
                  " == 2 * 4 * 16 * 4");
    assert_lua(L, "db:query('SELECT COUNT(DISTINCT pass) AS n FROM routing WHERE eval_id = ?',"
                  " e.eval_id)[1].n == 2");
    /* the two gate weights of a pass add up to 1 */
    assert_lua(L, "db:query('SELECT MAX(ABS(s - 1)) AS d FROM (SELECT SUM(weight) AS s FROM routing"
                  " WHERE eval_id = ? GROUP BY seq, pos, pass)', e.eval_id)[1].d < 1e-6");
    /* the whole-sequence gate's run is recorded, and drawn, as non-causal */
    run_ok(L, "run2 = db:run{ name = 'meo-whole', model = whole, data = data }\n"
              "run2:train(fast{ steps = 2 })\n"
              "moelab.plot{ db = db, figure = 'loss', out = DIR .. '/meo-loss.svg' }\n"
              "local f = io.open(DIR .. '/meo-loss.svg'); svg = f:read('a'); f:close()");
    assert_lua(L, "db:query(\"SELECT causal FROM runs WHERE name = 'meo'\")[1].causal == 1");
    /* a capacity limit drops by what the whole batch chose: not causal either */
    run_ok(L, "run3 = db:run{ name = 'capped', data = data, model = moelab.model(tiny{ moe = {\n"
              "  experts = 4, router = { kind = 'topk', k = 2, capacity_factor = 1 } } }) }");
    assert_lua(L, "db:query(\"SELECT causal FROM runs WHERE name = 'capped'\")[1].causal == 0");
    assert_lua(L, "db:query(\"SELECT causal FROM v_final_loss WHERE name = 'meo-whole'\")[1].causal == 0");
    assert_lua(L, "svg:find('meo-whole (non-causal)', 1, true) ~= nil");
    assert_lua(L, "svg:find('meo (non-causal)', 1, true) == nil");
    run_ok(L, "causal:save(DIR .. '/meo.safetensors')\n"
              "same = moelab.load(DIR .. '/meo.safetensors')");
    assert_lua(L, "same:loss(S1) == causal:loss(S1)");
    lua_close(L);
}

/* moelab.moefy: a trained dense model split into experts computes the same
** function (every expert active), by k-means or at random, with ReLU, GELU
** or SwiGLU; it saves, loads, trains and records like any MoE model. */
static void test_moefy_end_to_end(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "data = moelab.corpus{ text = TEXT, split = 0.9 }\n"
              "db   = moelab.open(DIR .. '/moefy.db')\n"
              "S1, S2 = 'In the beginning', 'And God said, Le'\n"
              "function same(a, b)\n"
              "  for _, s in ipairs{ S1, S2 } do\n"
              "    local x, y = a:loss(s), b:loss(s)\n"
              "    if math.abs(x - y) > 1e-5 * math.abs(x) then return false end\n"
              "  end\n"
              "  return true\n"
              "end\n"
              "results = {}\n"
              "for _, act in ipairs{ 'relu', 'gelu', 'swiglu' } do\n"
              "  local dense = moelab.model(tiny{ activation = act, ffn = { hidden = 32 } })\n"
              "  db:run{ name = 'dense-' .. act, model = dense, data = data }:train(fast{ steps = 5 })\n"
              "  for _, method in ipairs{ 'kmeans', 'random' } do\n"
              "    local sparse = moelab.moefy(dense, { experts = 4, method = method, seed = 2 })\n"
              "    results[#results + 1] = { act = act, method = method, same = same(dense, sparse),\n"
              "                              kind = sparse:config().moe.router.kind,\n"
              "                              bias = sparse:config().moe.bias,\n"
              "                              hidden = sparse:config().moe.hidden }\n"
              "    last = sparse\n"
              "  end\n"
              "end");
    assert_lua(L, "#results == 6");
    assert_lua(L, "(function() for _, r in ipairs(results) do if not r.same then return false end end"
                  " return true end)()");
    assert_lua(L, "results[1].kind == 'all' and results[1].bias == true and results[1].hidden == 8");
    /* it saves and loads (experts' fc biases, the layer's bias), and trains */
    run_ok(L, "last:save(DIR .. '/moefied.safetensors')\n"
              "back = moelab.load(DIR .. '/moefied.safetensors')\n"
              "run = db:run{ name = 'moefied', model = last, data = data }\n"
              "t = run:train(fast{ steps = 2 })\n"
              "e = run:evaluate{ batches = 1, batch = 2, record = true }");
    assert_lua(L, "t.status == 'finished'");
    assert_lua(L, "e.experts_per_token == 4");
    assert_lua(L, "e.ffn_fraction == 1");
    /* the similarity router: all of them chosen is the dense model again;
    ** one chosen is a quarter of the FFN, and not the dense loss */
    run_ok(L, "dense = moelab.model(tiny{ activation = 'relu', ffn = { hidden = 32 } })\n"
              "db:run{ name = 'dense-sim', model = dense, data = data }:train(fast{ steps = 5 })\n"
              "all4 = moelab.moefy(dense, { experts = 4, router = { select = 'topk', k = 4 } })\n"
              "t1 = moelab.moefy(dense, { experts = 4, router = { select = 'threshold', p = 1 } })\n"
              "one = moelab.moefy(dense, { experts = 4, router = { kind = 'similarity', k = 1 } })\n"
              "r1 = db:run{ name = 'sim-1', model = one, data = data }\n"
              "e1 = r1:evaluate{ batches = 1, batch = 2, record = true }");
    assert_lua(L, "same(dense, all4) and same(dense, t1)");
    assert_lua(L, "not same(dense, one)");
    assert_lua(L, "e1.experts_per_token == 1 and e1.ffn_fraction == 0.25");
    assert_lua(L, "one:config().moe.router.kind == 'similarity' and one:config().moe.router.k == 1");
    assert_lua(L, "t1:config().moe.router.select == 'threshold' and t1:config().moe.router.k == nil");
    run_err(L, "moelab.moefy(dense, { experts = 4, router = { kind = 'topk' } })",
            "'kind' must be", NULL);
    /* the learned router: fitting lowers its loss and raises the activation
    ** mass its choice covers; with every expert chosen it is the dense model */
    run_ok(L, "learned = moelab.moefy(dense, { experts = 4, router = { kind = 'learned', k = 2 } })\n"
              "fit = moelab.fit_router(learned, data, { steps = 30, batch = 4, lr = 3e-2 })\n"
              "every = moelab.moefy(dense, { experts = 4, router = { kind = 'learned', k = 4 } })\n"
              "short = moelab.fit_router(every, data, { steps = 3, batch = 2 })");
    /* fewer than ten steps: the last one is the tail */
    assert_lua(L, "short.loss == short.loss and short.recall == short.recall");
    assert_lua(L, "fit.loss < fit.first_loss and fit.recall > fit.first_recall");
    assert_lua(L, "same(dense, every)");
    assert_lua(L, "learned:config().moe.router.kind == 'learned'");
    run_ok(L, "learned:save(DIR .. '/learned.safetensors')\n"
              "back = moelab.load(DIR .. '/learned.safetensors')");
    assert_lua(L, "back:loss(S1) == learned:loss(S1) and back:loss(S2) == learned:loss(S2)");
    run_err(L, "moelab.fit_router(one, data)", "not \"learned\"", NULL);
    /* the oracle: every expert run, the most active kept; all kept is dense */
    run_ok(L, "o4 = moelab.moefy(dense, { experts = 4, router = { kind = 'oracle', k = 4 } })\n"
              "o1 = moelab.moefy(dense, { experts = 4, router = { kind = 'oracle', k = 1 } })\n"
              "ro = db:run{ name = 'oracle-1', model = o1, data = data }\n"
              "eo = ro:evaluate{ batches = 1, batch = 2, record = true }");
    assert_lua(L, "same(dense, o4) and not same(dense, o1)");
    assert_lua(L, "eo.experts_per_token == 1");
    /* it computes every expert: the FLOPs of all four, no router */
    assert_lua(L, "eo.moe_flops_per_token == 4 * 2 * 2 * 16 * 8");
    run_err(L, "ro:train(fast{ steps = 1 })", "oracle", "evaluation", NULL);
    run_err(L, "moelab.fit_router(learned, data, { lr = -1 })", "'lr'", NULL);
    run_err(L, "moelab.moefy(moelab.model(tiny{ ffn = { hidden = 30 } }), { experts = 4 })",
            "experts = 4 must divide", "30", NULL);
    run_err(L, "moelab.moefy(last, { experts = 2 })", "has a moe configuration", NULL);
    run_err(L, "moelab.moefy(moelab.model(tiny()), { experts = 2, seed = 2^32 })", "'seed'", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, bias = true, router = { kind = 'stratified' } } })",
            "'moe.bias'", "stratified", NULL);
    run_err(L, "moelab.moefy(moelab.model(tiny()), { experts = 2, method = 'spectral' })",
            "'method'", NULL);
    lua_close(L);
}

static void test_train_evaluate_record(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "data  = moelab.corpus{ text = TEXT, split = 0.9 }\n"
              "model = moelab.model(tiny())\n"
              "db    = moelab.open(DIR .. '/happy.db')\n"
              "run   = db:run{ name = 'tiny', model = model, data = data }\n"
              "before = model:loss('abcdefghabcdefgh')\n"
              "t = run:train(fast{ steps = 30, eval_every = 10 })\n"
              "e = run:evaluate{ batches = 3, batch = 4 }\n"
              "after = model:loss('abcdefghabcdefgh')");
    char buf[256];
    assert_string_equal(lua_str(L, "t.status", buf, sizeof buf), "finished");
    double loss = lua_num(L, "t.loss");
    assert_true(isfinite(loss));
    /* 30 steps on a period-8 text must leave the uniform 5.545 well behind */
    if (!(loss > 0.0 && loss < 4.5)) fail_msg("training loss %g after 30 steps", loss);
    assert_true(lua_num(L, "t.tokens_per_s") > 0.0);
    assert_int_equal((int)lua_num(L, "t.steps"), 30);
    assert_int_equal((int)lua_num(L, "t.tokens"), 30 * 4 * 16);
    assert_true(isfinite(lua_num(L, "t.val_loss")));
    assert_lua(L, "after < before");

    assert_true(isfinite(lua_num(L, "e.loss")));
    assert_true(lua_num(L, "e.loss") < 4.5);
    /* a dense model runs no MoE layer */
    assert_true(lua_num(L, "e.moe_flops_per_token") == 0.0);
    assert_true(lua_num(L, "e.experts_per_token") == 0.0);
    assert_int_equal((int)lua_num(L, "e.tokens"), 3 * 4 * 16);
    /* the same evaluation batches give the same loss */
    assert_lua(L, "run:evaluate{ batches = 3, batch = 4 }.loss == e.loss");

    /* while the database is open, db:query sees everything */
    assert_lua(L, "#db:query(\"SELECT * FROM metrics WHERE split = 'train'\") == 30");
    assert_lua(L, "db:query('SELECT status FROM runs WHERE run_id = ?', run:id())[1].status == 'finished'");
    assert_lua(L, "db:query('SELECT count(*) AS n FROM evals')[1].n == 5");
    assert_lua(L, "db:path() == DIR .. '/happy.db'");
    run_err(L, "db:query('SELECT nope FROM runs')", "db:query", "nope", NULL);
    double params = lua_num(L, "model:parameters()");
    double val_loss = lua_num(L, "t.val_loss"), eval_loss = lua_num(L, "e.loss");
    lua_close(L);

    sqlite3 *db = db_open("happy.db");
    assert_int_equal(db_int(db, "SELECT count(*) FROM runs"), 1);
    assert_string_equal(db_text(db, "SELECT status FROM runs", buf, sizeof buf), "finished");
    assert_string_equal(db_text(db, "SELECT name FROM runs", buf, sizeof buf), "tiny");
    assert_int_equal(db_int(db, "SELECT finished_at IS NOT NULL AND started_at IS NOT NULL FROM runs"), 1);
    assert_int_equal(db_int(db, "SELECT params_total FROM runs"), (int64_t)params);
    assert_int_equal(db_int(db, "SELECT seed FROM runs"), 1);
    /* one train row per step, with its loss and learning rate */
    assert_int_equal(db_int(db, "SELECT count(*) FROM metrics WHERE split = 'train'"), 30);
    assert_int_equal(db_int(db, "SELECT count(DISTINCT step) FROM metrics WHERE split = 'train'"), 30);
    assert_int_equal(db_int(db, "SELECT min(step) FROM metrics WHERE split = 'train'"), 1);
    assert_int_equal(db_int(db, "SELECT max(step) FROM metrics WHERE split = 'train'"), 30);
    assert_int_equal(db_int(db, "SELECT count(*) FROM metrics WHERE split = 'train' AND "
                                "(loss IS NULL OR lr IS NULL OR lr <= 0 OR tokens IS NULL)"), 0);
    assert_int_equal(db_int(db, "SELECT tokens FROM metrics WHERE split = 'train' AND step = 30"),
                     30 * 4 * 16);
    /* evaluations every 10 steps (10, 20), at the end (30), and two by hand */
    assert_int_equal(db_int(db, "SELECT count(*) FROM metrics WHERE split = 'val'"), 5);
    assert_int_equal(db_int(db, "SELECT count(*) FROM evals WHERE split = 'val'"), 5);
    assert_string_equal(db_text(db, "SELECT group_concat(step, ',') FROM "
                                    "(SELECT step FROM evals ORDER BY eval_id)", buf, sizeof buf),
                        "10,20,30,30,30");
    assert_int_equal(db_int(db, "SELECT count(*) FROM evals WHERE loss IS NULL OR tokens <= 0"), 0);
    assert_true(db_real(db, "SELECT loss FROM evals WHERE step = 30 ORDER BY eval_id LIMIT 1") == val_loss);
    assert_true(db_real(db, "SELECT loss FROM evals ORDER BY eval_id LIMIT 1 OFFSET 3") == eval_loss);
    assert_int_equal(db_int(db, "SELECT tokens FROM evals ORDER BY eval_id LIMIT 1 OFFSET 3"), 3 * 4 * 16);
    /* the whole configuration, model and training, as JSON */
    assert_int_equal(db_int(db, "SELECT json_valid(config) FROM runs"), 1);
    assert_string_equal(db_text(db, "SELECT json_type(config, '$.model') FROM runs", buf, sizeof buf), "object");
    assert_string_equal(db_text(db, "SELECT json_type(config, '$.train') FROM runs", buf, sizeof buf), "object");
    assert_int_equal(db_int(db, "SELECT json_extract(config, '$.model.d_model') FROM runs"), 16);
    assert_int_equal(db_int(db, "SELECT json_extract(config, '$.model.ffn.hidden') FROM runs"), 32);
    assert_int_equal(db_int(db, "SELECT json_extract(config, '$.model.vocab') FROM runs"), 256);
    assert_int_equal(db_int(db, "SELECT json_extract(config, '$.train.steps') FROM runs"), 30);
    assert_int_equal(db_int(db, "SELECT json_extract(config, '$.train.batch') FROM runs"), 4);
    assert_true(test_close(db_real(db, "SELECT json_extract(config, '$.train.lr') FROM runs"), 1e-2, 1e-6, 0));
    sqlite3_close(db);
}

/* Save, load, loss, sample and plot, on a briefly trained model. */
static void test_save_load_sample_plot(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "data  = moelab.corpus{ text = TEXT }\n"
              "model = moelab.model(tiny())\n"
              "db    = moelab.open(DIR .. '/ckpt.db')\n"
              "run   = db:run{ name = 'ckpt', model = model, data = data }\n"
              "t     = run:train(fast{ steps = 10, eval_batches = 0 })\n"
              "model:save(DIR .. '/tiny.safetensors')\n"
              "same  = moelab.load(DIR .. '/tiny.safetensors')\n"
              "S1, S2 = 'abcdefghabcdefgh', 'In the beginning!'\n"
              "function same_table(a, b)\n"
              "  for k, v in pairs(a) do\n"
              "    if type(v) == 'table' then if not same_table(v, b[k]) then return false end\n"
              "    elseif b[k] ~= v then return false end\n"
              "  end\n"
              "  for k in pairs(b) do if a[k] == nil then return false end end\n"
              "  return true\n"
              "end");
    assert_lua(L, "t.status == 'finished'");
    /* exactly the same function */
    assert_lua(L, "same:loss(S1) == model:loss(S1)");
    assert_lua(L, "same:loss(S2) == model:loss(S2)");
    assert_lua(L, "same:parameters() == model:parameters()");
    assert_lua(L, "same_table(same:config(), model:config())");
    /* ... and not just the initialisation */
    assert_lua(L, "moelab.model(tiny()):loss(S1) ~= model:loss(S1)");
    assert_true(isfinite(lua_num(L, "model:loss(string.rep('x', 17))")));
    /* per-position losses: #text - 1 of them, their mean the loss, and a
    ** later byte changes none of the earlier positions' losses */
    run_ok(L, "tl = model:token_losses(S1)\n"
              "tl_mean = 0; for _, x in ipairs(tl) do tl_mean = tl_mean + x / #tl end\n"
              "other = model:token_losses(S1:sub(1, 9) .. (S1:sub(10, 10) == 'z' and 'y' or 'z')"
              " .. S1:sub(11))");
    assert_lua(L, "#tl == #S1 - 1");
    assert_lua(L, "math.abs(tl_mean - model:loss(S1)) <= 1e-6 * model:loss(S1)");
    /* byte 10 changed: positions 1..8 unchanged, 9 (which predicts it) on changed */
    assert_lua(L, "(function() for i = 1, 8 do if tl[i] ~= other[i] then return false end end"
                  " return tl[9] ~= other[9] and tl[10] ~= other[10] end)()");
    run_err(L, "model:token_losses('a')", "model:token_losses", "got 1", NULL);

    /* sampling: the prompt, then `tokens` bytes */
    run_ok(L, "g = model:sample{ prompt = 'abc', tokens = 20, temperature = 0 }");
    assert_int_equal((int)lua_num(L, "#g"), 23);
    assert_lua(L, "g:sub(1, 3) == 'abc'");
    /* greedy does not depend on the seed, and the loaded model agrees */
    assert_lua(L, "model:sample{ prompt = 'abc', tokens = 20, temperature = 0, seed = 99 } == g");
    assert_lua(L, "same:sample{ prompt = 'abc', tokens = 20, temperature = 0 } == g");
    /* top_k = 1 is greedy at any temperature */
    assert_lua(L, "model:sample{ prompt = 'abc', tokens = 20, temperature = 1, top_k = 1, seed = 5 } == g");
    /* a seed gives the same sample; another seed another one */
    run_ok(L, "a = model:sample{ prompt = 'And God', tokens = 30, temperature = 0.8, seed = 3 }\n"
              "b = model:sample{ prompt = 'And God', tokens = 30, temperature = 0.8, seed = 3 }\n"
              "u = moelab.model(tiny())\n"
              "c = u:sample{ prompt = 'And God', tokens = 30, temperature = 1, seed = 1 }\n"
              "d = u:sample{ prompt = 'And God', tokens = 30, temperature = 1, seed = 2 }");
    assert_lua(L, "a == b and #a == 37 and a:sub(1, 7) == 'And God'");
    assert_lua(L, "c ~= d and #c == 37 and #d == 37");
    /* a prompt longer than the context slides the window */
    assert_lua(L, "#model:sample{ prompt = string.rep('abcdefgh', 3), tokens = 5, temperature = 0 } == 29");
    assert_lua(L, "model:sample{ prompt = 'xyz', tokens = 0 } == 'xyz'");
    assert_lua(L, "#model:sample{} == 201"); /* prompt '\\n', 200 tokens */

    /* figures from the database, by handle or by path */
    char buf[256];
    assert_string_equal(lua_str(L, "moelab.plot{ db = db, figure = 'loss', out = DIR .. '/loss.pdf' }",
                                buf, sizeof buf) + strlen(tmpdir), "/loss.pdf");
    char head[512];
    long size = file_head("loss.pdf", head, sizeof head);
    assert_memory_equal(head, "%PDF-", 5);
    assert_true(size > 1000);
    run_ok(L, "moelab.plot{ db = DIR .. '/ckpt.db', figure = 'loss', out = DIR .. '/loss.svg',\n"
              "             runs = { 'ckpt' } }");
    size = file_head("loss.svg", head, sizeof head - 1);
    assert_true(size > 200);
    assert_non_null(strstr(head, "<svg"));
    run_err(L, "moelab.plot{ db = db, figure = 'loss', out = DIR .. '/x.pdf', runs = { 'nosuchrun' } }",
            "moelab.plot", "nosuchrun", NULL);
    char path[512];
    snprintf(path, sizeof path, "%s/x.pdf", tmpdir);
    assert_int_equal(access(path, F_OK), -1);
    lua_close(L);
}

/* ---- messages about configurations and options ---------------------------- */

static void test_config_errors(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_err(L, "moelab.model(tiny{ d_modle = 16 })", "moelab.model", "'d_modle'", "'d_model'", NULL);
    run_err(L, "moelab.model(tiny{ ffn = { hiden = 32 } })", "'ffn.hiden'", "'ffn.hidden'", NULL);
    run_err(L, "moelab.model(tiny{ heads = 3 })", "heads = 3", "does not divide", "d_model = 16", NULL);
    /* a whole number as written, not 3e+02 */
    run_err(L, "moelab.model(tiny{ moe = { experts = 300 } })", "between 1 and 256, got 300", NULL);
    /* MoE configuration */
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { kidn = 'topk' } } })",
            "'moe.router.kidn'", "'moe.router.kind'", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, aux = { balanse = 0.1 } } })",
            "'moe.aux.balanse'", "'moe.aux.balance'", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { kind = 'treshold' } } })",
            "\"treshold\"", "threshold", "expert_choice", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { k = 5 } } })",
            "'moe.router.k' = 5", "moe.experts = 4", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, hidden = { 8, 8, 8 } } })",
            "3 sizes for 4 experts", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { kind = 'threshold', p = 1.5 } } })",
            "'moe.router.p'", "(0, 1]", NULL);
    /* a key the router does not read is refused, naming the keys it reads */
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { p = 0.5 } } })",
            "'moe.router.p' is not read by the topk router", "k, normalize", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { kind = 'threshold', normalize = false } } })",
            "'moe.router.normalize' is not read by the threshold router (it reads",
            "p, max_k, capacity_factor, noise", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { kind = 'threshold', k = 2 } } })",
            "'moe.router.k' is not read by the threshold router when dropless", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { min_capacity = 2 } } })",
            "'moe.router.min_capacity' is not read by the topk router when dropless", NULL);
    /* one expert: routers that do not read k are not held to k <= experts */
    run_ok(L, "for _, kind in ipairs{ 'stratified', 'hash', 'threshold' } do\n"
              "  moelab.model(tiny{ moe = { experts = 1, router = { kind = kind } } })\n"
              "end");
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { kind = 'hash', k = 1 } } })",
            "'moe.router.k' is not read by the hash router", NULL);
    run_err(L, "moelab.model(tiny{ moe = { router = { kind = 'hash' }, aux = { z = 1 } } })",
            "hash", "moe.aux", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 0 } })", "'moe.experts'", NULL);
    run_err(L, "moelab.model(tiny{ layers = -1 })", "'layers'", "-1", NULL);
    run_err(L, "moelab.model(tiny{ d_model = 0 })", "'d_model'", NULL);
    run_err(L, "moelab.model(tiny{ context = -5 })", "'context'", "-5", NULL);
    run_err(L, "moelab.model(tiny{ ffn = { hidden = 0 } })", "'ffn.hidden'", NULL);
    run_err(L, "moelab.model(tiny{ context = 1.5 })", "'context'", "integer", NULL);
    run_err(L, "moelab.model(tiny{ layers = '2' })", "'layers'", "integer", NULL);
    run_err(L, "moelab.model(tiny{ norm = 3 })", "'norm'", "string", NULL);
    run_err(L, "moelab.model(tiny{ norm = 'batchnorm' })", "batchnorm", "layernorm", "rmsnorm", NULL);
    run_err(L, "moelab.model(tiny{ activation = 'tanh' })", "'activation'", "tanh", "gelu", "relu",
            "swiglu", NULL);
    run_err(L, "moelab.model(tiny{ tied = 1 })", "'tied'", "true or false", NULL);
    run_err(L, "moelab.model(tiny{ ffn = 5 })", "'ffn'", NULL);
    run_err(L, "moelab.model(tiny{ norm_eps = 0 })", "'norm_eps'", NULL);
    run_err(L, "moelab.model(tiny{ init_std = -1 })", "'init_std'", NULL);
    run_err(L, "moelab.model(tiny{ seed = print })", "function", NULL);
    run_err(L, "moelab.model(tiny{ norm_eps = 0/0 })", "'norm_eps' must be a number > 0, got nan", NULL);
    run_err(L, "moelab.model(tiny{ [1] = 2 })", "not a string", NULL);
    /* a list with a nil in it (an undefined variable) said only "has a key that is not a string" */
    run_err(L, "moelab.model(tiny{ moe = { experts = 3, hidden = { 8, undefined_size, 8 } } })",
            "configuration table 'moe.hidden' has a key that is not a string (", "): a list must have "
            "no nil in it, and cannot have named keys", NULL);
    run_err(L, "moelab.model()", "table expected", NULL);
    /* and a good one still works after all that */
    run_ok(L, "assert(moelab.model(tiny()):parameters() > 0)");
    lua_close(L);
}

/* Every numeric configuration key: NaN, infinities, fractions for integers,
** values a float32 cannot hold, out-of-range and meaningless values get a
** message with the key's whole path, the value and what the key takes. */
static void test_config_numbers(void **state) {
    (void)state;
    lua_State *L = new_state();
    /* NaN and infinities stop before the JSON; the message still names the path and range */
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { kind = 'threshold', p = 0/0 } } })",
            "moelab.model: 'moe.router.p' must be a number in (0, 1] (the threshold t), got nan", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { k = 1/0 } } })",
            "'moe.router.k' must be an integer between 1 and 256, got inf", NULL);
    run_err(L, "moelab.model(tiny{ ffn = { hidden = -1/0 } })",
            "'ffn.hidden' must be an integer between 1 and 1048576, got -inf", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, hidden = { 8, 0/0, 8, 8 } } })",
            "'moe.hidden[2]' must be an integer between 1 and 1048576, got nan", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, aux = { z = 0/0 } } })",
            "'moe.aux.z' must be a number >= 0 (0 = off), got nan", NULL);
    /* list elements and fractions name the value */
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, hidden = { 8, 1.5, 8, 8 } } })",
            "'moe.hidden[2]' must be an integer between 1 and 1048576, got 1.5", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { kind = 'stratified', strata = { 0, 4 } } } })",
            "'moe.router.strata[1]' must be an integer between 1 and 256, got 0", NULL);
    run_err(L, "moelab.model(tiny{ context = 1.5 })", "'context' must be an integer between 1 and 65536, got 1.5",
            NULL);
    run_err(L, "moelab.model(tiny{ layers = math.maxinteger })",
            "'layers' must be an integer between 0 and 1024, got 9.223372036854776e+18", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { segment = 1e300, kind = 'merge' } } })",
            "'moe.router.segment' must be an integer between 0 and 65536 (0 = the whole sequence), got 1e+300",
            NULL);
    run_err(L, "moelab.model(tiny{ seed = 2^53 })",
            "'seed' must be an integer between 0 and 9007199254740991, got 9007199254740992", NULL);
    run_err(L, "moelab.model(tiny{ vocab = 'bytes' })", "'vocab' must be an integer between 2 and 16777216, "
            "got string", NULL);
    /* real keys are float32: what overflows to inf or underflows to 0 is refused as given */
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { noise = 1e300 } } })",
            "'moe.router.noise' must be a number >= 0, got 1e+300", "float32", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, aux = { balance = -1e300 } } })",
            "'moe.aux.balance' must be a number >= 0 (0 = off), got -1e+300", NULL);
    run_err(L, "moelab.model(tiny{ norm_eps = 1e-50 })", "'norm_eps' must be a number > 0, got 1e-50",
            "float32", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { kind = 'threshold', p = 1e-300 } } })",
            "'moe.router.p'", "got 1e-300", NULL);
    run_err(L, "moelab.model(tiny{ init_std = -1 })", "'init_std' must be a number >= 0, got -1", NULL);
    /* values that were taken silently */
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, sparsity_eps = -1 } })",
            "'moe.sparsity_eps' must be a number >= 0, got -1", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { capacity_factor = 1e30 } } })",
            "'moe.router.capacity_factor' must be a number in [0, 256] (0 = dropless), got 1e+30", NULL);
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, every = 2 } })",
            "'moe.every' = 2 must be at most layers = 1", "no MoE layer", NULL);
    run_err(L, "moelab.model(tiny{ layers = 0, moe = { experts = 4 } })", "'moe.every' = 1", "layers = 0",
            NULL);
    /* a key that takes no number (here an unknown one), not finite: its path and value */
    run_err(L, "moelab.model(tiny{ moe = { experts = 4, router = { nosie = 0/0 } } })",
            "'moe.router.nosie' cannot be nan: a configuration holds finite numbers only", NULL);
    /* the edges of each range are taken */
    run_ok(L, "moelab.model(tiny{ init_std = 0, seed = 2^53 - 1, norm_eps = 1e-30,\n"
              "  moe = { experts = 4, every = 1, sparsity_eps = 0,\n"
              "          router = { kind = 'threshold', p = 1, capacity_factor = 256 } } })");
    lua_close(L);
}

static void test_option_errors(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "data  = moelab.corpus{ text = TEXT }\n"
              "model = moelab.model(tiny())\n"
              "db    = moelab.open(DIR .. '/options.db')\n"
              "run   = db:run{ name = 'opts', model = model, data = data }");
    run_err(L, "run:train{ stpes = 1 }", "run:train", "'stpes'", "'steps'", NULL);
    run_err(L, "run:train(fast{ lerning_rate = 1 })", "'lerning_rate'", NULL);
    run_err(L, "run:train(fast{ steps = 0 })", "run:train: 'steps' must be an integer between 1 and", NULL);
    run_err(L, "run:train(fast{ steps = 1.5 })", "'steps'", "integer", NULL);
    run_err(L, "run:train(fast{ steps = 1, batch = 0 })", "batch", NULL);
    run_err(L, "run:train(fast{ steps = 1, lr = -1 })", "lr must be a positive", NULL);
    run_err(L, "run:train(fast{ steps = 1, lr = 0/0 })", "lr", NULL);
    run_err(L, "run:train(fast{ steps = 1, lr = 'big' })", "'lr'", "number", NULL);
    run_err(L, "run:train(fast{ steps = 1, beta1 = 1 })", "beta1", NULL);
    run_err(L, "run:train(fast{ steps = 1, warmup = -1 })", "warmup", NULL);
    run_err(L, "run:train(fast{ steps = 1, clip = -1 })", "clip", NULL);
    /* NaN, infinities and out-of-range values name the option and the value */
    run_err(L, "run:train(fast{ steps = 1, clip = 0/0 })", "clip must be a number >= 0", "nan", NULL);
    run_err(L, "run:train(fast{ steps = 1, weight_decay = 1/0 })", "weight_decay", "inf", NULL);
    run_err(L, "run:train(fast{ steps = 1, beta1 = 0/0 })", "beta1 must be in [0, 1)", NULL);
    run_err(L, "run:train(fast{ steps = 1, beta2 = -0.5 })", "beta2 must be in [0, 1)", "-0.5", NULL);
    run_err(L, "run:train(fast{ steps = 1, eps = -1 })", "eps must be a positive number", "-1", NULL);
    run_err(L, "run:train(fast{ steps = 1, eps = 0/0 })", "eps", NULL);
    run_err(L, "run:train(fast{ steps = 1, min_lr = 0/0 })", "min_lr must be between 0 and lr", NULL);
    run_err(L, "run:train(fast{ steps = 1, lr = 1e-3, min_lr = 1 })", "min_lr", "got 1", NULL);
    run_err(L, "run:train(fast{ steps = 1, eval_every = -1 })", "eval_every", NULL);
    run_err(L, "run:train{ [1] = 5 }", "run:train", "strings", NULL);
    run_err(L, "run:train(5)", "table expected", NULL);
    run_err(L, "run:evaluate{ batchs = 1 }", "run:evaluate", "'batchs'", "'batch", NULL);
    run_err(L, "run:evaluate{ recrod = true }", "'recrod'", "'record'", NULL);
    run_err(L, "run:evaluate{ split = 'test' }", "split", "test", NULL);
    run_err(L, "run:evaluate{ batches = 0 }", "batches", NULL);
    run_err(L, "run:evaluate{ record = 'yes' }", "'record'", "true or false", NULL);
    run_err(L, "model:sample{ promt = 'a' }", "model:sample", "'promt'", "'prompt'", NULL);
    run_err(L, "model:sample{ temprature = 1 }", "'temprature'", "'temperature'", NULL);
    run_err(L, "model:sample{ prompt = '' }", "prompt", "empty", NULL);
    run_err(L, "model:sample{ temperature = -1 }", "temperature", NULL);
    run_err(L, "model:sample{ temperature = 0/0 }", "temperature must be a number >= 0", NULL);
    run_err(L, "model:sample{ temperature = 1/0 }", "temperature", "inf", NULL);
    run_err(L, "model:sample{ tokens = -1 }", "tokens", NULL);
    run_err(L, "model:sample{ top_k = -1 }", "top_k", NULL);
    run_err(L, "model:sample{ prompt = 5 }", "'prompt'", "string", NULL);
    run_err(L, "moelab.corpus{ txt = TEXT }", "moelab.corpus", "'txt'", "'text'", NULL);
    run_err(L, "moelab.corpus{ paht = 'x.txt' }", "'paht'", "'path'", NULL);
    run_err(L, "moelab.plot{ db = db, figur = 'loss', out = DIR .. '/x.pdf' }", "moelab.plot", "'figur'",
            "'figure'", NULL);
    run_err(L, "moelab.plot{ db = db, figure = 'nofigure', out = DIR .. '/x.pdf' }", "nofigure", NULL);
    run_err(L, "moelab.plot{ db = db, figure = 'loss', out = DIR .. '/x.jpg' }", "x.jpg", NULL);
    run_err(L, "moelab.plot{ db = db, figure = 'loss' }", "'out'", NULL);
    run_err(L, "moelab.plot{ db = 5, figure = 'loss', out = DIR .. '/x.pdf' }", "'db'", NULL);
    /* the figure options: checked by plot_render, as the command line's */
    run_err(L, "moelab.plot{ db = db, figure = 'loss', out = DIR .. '/x.pdf', size = 'huge' }",
            "moelab.plot: unknown size 'huge'", "single", "double", NULL);
    run_err(L, "moelab.plot{ db = db, figure = 'loss', out = DIR .. '/x.pdf', layer = 1 }",
            "moelab.plot: figure 'loss' draws no single layer", NULL);
    run_err(L, "moelab.plot{ db = db, figure = 'byte_classes', out = DIR .. '/x.pdf', layer = -1 }",
            "'layer' must be an integer between 0", NULL);
    run_err(L, "moelab.plot{ db = db, figure = 'cooccurrence', out = DIR .. '/x.pdf', layers = { 0 } }",
            "'layers' must be two block numbers", NULL);
    run_err(L, "db:run{ nam = 'x', model = model, data = data }", "db:run", "'nam'", "'name'", NULL);
    run_err(L, "db:run{ model = model, data = data }", "'name'", NULL);
    run_err(L, "db:run{ name = 'x', model = data, data = data }", "'model'", NULL);
    run_err(L, "db:run{ name = 'x', model = model, data = 'some text' }", "'data'", NULL);
    run_err(L, "moelab.open(DIR .. '/no/such/dir/x.db')", "moelab.open", "x.db", NULL);
    /* none of it touched the run */
    run_ok(L, "t = run:train(fast{ steps = 2, eval_batches = 0 })\n"
              "assert(t.status == 'finished' and t.steps == 2)");
    lua_close(L);
}

/* Numeric options of every function: NaN, infinities, fractions, strings,
** values beyond a float32 and out-of-range values get a message naming the
** function, the option, the range and the value. */
static void test_option_numbers(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "data  = moelab.corpus{ text = TEXT }\n"
              "model = moelab.model(tiny())\n"
              "db    = moelab.open(DIR .. '/option-numbers.db')\n"
              "run   = db:run{ name = 'numbers', model = model, data = data }");
    /* the function, the option, the range and the value */
    run_err(L, "run:evaluate{ batch = 0 }", "run:evaluate: 'batch' must be an integer between 1 and 65536, got 0",
            NULL);
    run_err(L, "run:evaluate{ batches = 0/0 }",
            "run:evaluate: 'batches' must be an integer between 1 and 1048576, got nan", NULL);
    run_err(L, "run:evaluate{ seed = 1.5 }", "run:evaluate: 'seed' must be an integer between 0 and", "got 1.5",
            NULL);
    run_err(L, "run:evaluate{ batch = 2^40 }", "run:evaluate: 'batch'", "got 1099511627776", NULL);
    run_err(L, "run:evaluate{ split = 5 }", "run:evaluate: 'split' must be a string, got 5", NULL);
    run_err(L, "run:train(fast{ eval_batch = -1 })", "run:train: 'eval_batch' must be an integer between 0 and",
            "got -1", NULL);
    run_err(L, "run:train(fast{ threads = 1/0 })", "run:train: 'threads'", "got inf", NULL);
    run_err(L, "db:run{ name = 'x', model = model, data = data, seed = 1.5 }",
            "db:run: 'seed' must be an integer between 0 and 9007199254740991, got 1.5", NULL);
    run_err(L, "model:sample{ seed = -1 }", "model:sample: 'seed'", "got -1", NULL);
    run_err(L, "model:sample{ temperature = 0/0 }", "temperature must be a number >= 0, got nan", NULL);
    /* numbers as strings were taken; configurations refuse them, and so do options */
    run_err(L, "run:evaluate{ batches = '3' }", "run:evaluate: 'batches'", "got \"3\"", NULL);
    run_err(L, "model:sample{ tokens = '3' }", "model:sample: 'tokens'", "got \"3\"", NULL);
    run_err(L, "run:train(fast{ steps = '1' })", "run:train: 'steps'", "got \"1\"", NULL);
    run_err(L, "run:train(fast{ steps = 1, lr = '0.1' })", "run:train: 'lr' must be a number, got \"0.1\"", NULL);
    run_err(L, "moelab.threads('2')", "moelab.threads: 'n'", "got \"2\"", NULL);
    run_err(L, "moelab.corpus{ text = 55 }", "moelab.corpus: 'text' must be a string, got 55", NULL);
    /* top_k beyond the vocabulary meant all of it, silently */
    run_err(L, "model:sample{ top_k = 300 }", "model:sample: 'top_k' must be an integer between 0 and 256, got 300",
            NULL);
    /* moelab.threads: the range and the value, for NaN and fractions too */
    run_err(L, "moelab.threads(0/0)", "moelab.threads: 'n' must be an integer between 0 and 1024, got nan", NULL);
    run_err(L, "moelab.threads(1.5)", "got 1.5", NULL);
    run_err(L, "moelab.threads(2000)", "between 0 and 1024, got 2000", NULL);
    /* a missing argument is "nothing" (it was "got a no value") */
    run_err(L, "moelab.threads()", "moelab.threads: 'n' must be an integer between 0 and 1024, got nothing",
            NULL);
    run_err(L, "moelab.threads(nil)", "got a nil", NULL);
    /* float32 options: what the float would make inf or 0 is refused as given */
    run_err(L, "run:train(fast{ steps = 1, lr = 1e300 })", "run:train: 'lr' = 1e+300 is too large for a float32",
            NULL);
    run_err(L, "run:train(fast{ steps = 1, lr = 1e-50 })", "run:train: 'lr' = 1e-50 is too small for a float32",
            NULL);
    /* moelab.open */
    run_err(L, "moelab.open(DIR .. '/adopt.db', { adopt = 1 })", "moelab.open: 'adopt' must be true or false, got 1",
            NULL);
    /* a split that leaves nothing to train on */
    run_err(L, "moelab.corpus{ text = TEXT, split = 1e-9 }", "moelab.corpus", "split 1e-09 of 1600 bytes",
            "train split empty", NULL);
    run_err(L, "moelab.corpus{ text = TEXT, split = 0/0 }", "split must be in (0, 1], got nan", NULL);
    /* moefy and fit_router */
    run_err(L, "moelab.moefy(model, { experts = 4, router = { kind = 'similarity', select = 'threshold', p = 0/0 } })",
            "moelab.moefy router: 'p' (the threshold t) must be a number in (0, 1], got nan", NULL);
    run_err(L, "moelab.moefy(model, { experts = 4, router = { kind = 'similarity', k = 5 } })",
            "moelab.moefy router: 'k' must be an integer between 1 and 4, got 5", NULL);
    run_err(L, "moelab.moefy(model, { experts = 0/0 })", "moelab.moefy: 'experts' must be an integer between 1 and 256, "
            "got nan", NULL);
    run_ok(L, "one = moelab.moefy(model, { experts = 1, router = { kind = 'similarity' } })\n"
              "assert(one:config().moe.router.k == 1)");
    run_ok(L, "learned = moelab.moefy(model, { experts = 4, router = { kind = 'learned' } })");
    run_err(L, "moelab.fit_router(learned, data, { lr = 0/0 })", "moelab.fit_router: 'lr' must be a number > 0, got nan",
            NULL);
    run_err(L, "moelab.fit_router(learned, data, { steps = 1, lr = 1e300 })",
            "moelab.fit_router: 'lr' = 1e+300 is too large for a float32", NULL);
    run_err(L, "moelab.fit_router(learned, data, { steps = 0 })",
            "moelab.fit_router: 'steps' must be an integer between 1 and 1000000, got 0", NULL);
    run_err(L, "moelab.fit_router(learned, moelab.corpus{ text = 'abcdefgh' }, { steps = 1 })",
            "moelab.fit_router: context 16 is longer than the corpus", NULL);
    /* the C layer's own prefix is not said twice ("run:train: train: lr ...") */
    run_err(L, "run:train(fast{ steps = 1, lr = -1 })", "run:train: lr must be a positive number, got -1", NULL);
    /* bytes beyond a smaller vocabulary are named where they enter, not by the forward pass */
    run_ok(L, "v100 = moelab.model(tiny{ vocab = 100 })");
    run_err(L, "v100:loss('abz')", "model:loss: byte 122 at position 3 is outside the vocabulary (vocab = 100)",
            NULL);
    run_err(L, "v100:token_losses('za')", "model:token_losses: byte 122 at position 1", NULL);
    run_err(L, "v100:sample{ prompt = 'z', tokens = 1 }", "model:sample: byte 122 at position 1", NULL);
    run_err(L, "db:run{ name = 'v100', model = v100, data = data }",
            "db:run: the corpus has byte 100 at offset 3, outside the model's vocabulary (vocab = 100)", NULL);
    /* none of it touched the run */
    run_ok(L, "t = run:train(fast{ steps = 2, eval_batches = 0 })\n"
              "assert(t.status == 'finished' and t.steps == 2)");
    lua_close(L);
}

/* moelab.moefy refuses a router key its router does not read, as moelab.model
** does: { kind = "similarity", p = 0.5 } without select = "threshold" was
** top-2 with p ignored, and k beside a threshold (or on `all`) was ignored too. */
static void test_moefy_unread_router_keys(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "dense = moelab.model(tiny())");
    run_err(L, "moelab.moefy(dense, { experts = 4, router = { kind = 'similarity', p = 0.5 } })",
            "moelab.moefy router: 'p' is not read by the similarity router with select = \"topk\" "
            "(it reads select, k)", NULL);
    run_err(L, "moelab.moefy(dense, { experts = 4, router = { select = 'threshold', p = 0.5, k = 2 } })",
            "'k' is not read by the similarity router with select = \"threshold\" (it reads select, p)",
            NULL);
    run_err(L, "moelab.moefy(dense, { experts = 4, router = { kind = 'all', k = 2 } })",
            "'k' is not read by the all router", NULL);
    run_err(L, "moelab.moefy(dense, { experts = 4, router = { kind = 'all', select = 'threshold' } })",
            "'select' is not read by the all router", NULL);
    /* what each router reads is still taken */
    run_ok(L, "t = moelab.moefy(dense, { experts = 4, router = { kind = 'learned', select = 'threshold',\n"
              "                                                 p = 0.5 } }):config().moe.router\n"
              "assert(t.p == 0.5 and t.select == 'threshold')\n"
              "k = moelab.moefy(dense, { experts = 4, router = { kind = 'oracle', k = 3 } }):config().moe.router\n"
              "assert(k.k == 3 and k.select == 'topk')\n"
              "assert(moelab.moefy(dense, { experts = 4, router = { kind = 'all' } }):config().moe.router.kind == 'all')");
    lua_close(L);
}

/* db:query runs exactly one statement with exactly its parameters: the
** statements after the first were dropped unsaid (CREATE TABLE t(x); INSERT
** ... created an empty table), a missing value became NULL, an extra one said
** "column index out of range", an empty query "not an error", and a string
** with a NUL was cut at it. */
static void test_query_one_statement(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "db = moelab.open(DIR .. '/query.db')");
    run_err(L, "db:query('CREATE TABLE t(x); INSERT INTO t VALUES (1)')",
            "db:query: runs one statement a call, and the SQL goes on after the first: "
            "\"INSERT INTO t VALUES (1)\"", NULL);
    /* nothing of it ran */
    assert_lua(L, "#db:query(\"SELECT * FROM sqlite_master WHERE name = 't'\") == 0");
    run_err(L, "db:query('SELECT 1; SELECT 2')", "goes on after the first: \"SELECT 2\"", NULL);
    run_err(L, "db:query('')", "db:query: the SQL holds no statement", NULL);
    run_err(L, "db:query('  -- a comment')", "db:query: the SQL holds no statement", NULL);
    run_err(L, "db:query('SELECT ? AS a, ? AS b', 1)", "db:query: the SQL has 2 parameters, got 1 value",
            NULL);
    run_err(L, "db:query('SELECT ? AS a', 1, 2)", "db:query: the SQL has 1 parameter, got 2 values", NULL);
    /* what still works: a trailing semicolon, whitespace or comment; ?1 twice is one parameter */
    assert_lua(L, "db:query('SELECT ?1 + ?1 AS a;  -- done\\n', 2)[1].a == 4");
    assert_lua(L, "db:query('SELECT ? AS a', 'a\\0b')[1].a == 'a\\0b'");
    run_ok(L, "db:query('CREATE TABLE t(x)') db:query('INSERT INTO t VALUES (?)', 5)\n"
              "assert(db:query('SELECT x FROM t')[1].x == 5)");
    lua_close(L);
}

/* A script's BEGIN through db:query was committed at its next query (the
** recorder commits what is open first), so BEGIN, DELETE, ROLLBACK kept the
** DELETE and the ROLLBACK said only "no transaction is active". */
static void test_query_no_open_transaction(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "db = moelab.open(DIR .. '/transaction.db')\n"
              "db:query('CREATE TABLE t(x)') db:query('INSERT INTO t VALUES (1)')");
    run_err(L, "db:query('BEGIN')", "db:query: a transaction cannot stay open across queries", NULL);
    run_err(L, "db:query('SAVEPOINT s')", "db:query: a transaction cannot stay open", NULL);
    /* neither is left open: each statement is committed on its own, and the recorder still writes */
    run_ok(L, "db:query('DELETE FROM t')\n"
              "run = db:run{ name = 'after', model = moelab.model(tiny()), data = moelab.corpus{ text = TEXT } }\n"
              "run:train(fast{ steps = 2, eval_batches = 0 })");
    assert_lua(L, "#db:query('SELECT * FROM t') == 0");
    sqlite3 *db = db_open("transaction.db");
    assert_int_equal(db_int(db, "SELECT COUNT(*) FROM t"), 0);
    assert_int_equal(db_int(db, "SELECT COUNT(*) FROM metrics WHERE split = 'train'"), 2);
    sqlite3_close(db);
    lua_close(L);
}

/* A corpus that cannot feed the model: the message says why, with the path. */
static void test_corpus_errors(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "model = moelab.model(tiny())\n"
              "db = moelab.open(DIR .. '/corpus.db')");
    run_err(L, "db:run{ name = 'short', model = model, data = moelab.corpus{ text = 'abcdefgh' } }",
            "db:run", "context 16 is longer than the corpus", NULL);
    assert_lua(L, "#db:query('SELECT * FROM runs') == 0");
    run_err(L, "moelab.corpus{ path = DIR .. '/missing-corpus.txt' }", "moelab.corpus",
            "missing-corpus.txt", "No such file", NULL);
    /* a directory opens, and fails at the read: the message says why (it did not) */
    run_err(L, "moelab.corpus{ path = DIR }", "moelab.corpus: cannot read corpus", "Is a directory", NULL);
    run_err(L, "moelab.corpus{}", "'path' or 'text'", NULL);
    run_err(L, "moelab.corpus{ text = TEXT, path = 'x' }", "'path' or 'text'", NULL);
    run_err(L, "moelab.corpus{ text = TEXT, split = 0 }", "split", NULL);
    run_err(L, "moelab.corpus{ text = TEXT, split = 1.5 }", "split", NULL);
    run_err(L, "moelab.corpus{ text = 'a' }", "at least 2", NULL);
    /* a corpus from a file */
    run_ok(L, "local f = assert(io.open(DIR .. '/corpus.txt', 'wb'))\n"
              "f:write(TEXT) f:close()\n"
              "c = moelab.corpus{ path = DIR .. '/corpus.txt', split = 0.5 }\n"
              "n, ntrain, nval = c:size()");
    assert_int_equal((int)lua_num(L, "n"), 1600);
    assert_int_equal((int)lua_num(L, "ntrain"), 800);
    assert_int_equal((int)lua_num(L, "nval"), 800);
    assert_lua(L, "tostring(c):find('corpus.txt', 1, true) ~= nil");
    /* a validation split too short for an evaluation: training still works
    ** (without evaluations), run:evaluate says why it cannot */
    run_ok(L, "short = moelab.corpus{ text = string.rep('abcd', 10), split = 0.9 }\n"
              "run = db:run{ name = 'noval', model = model, data = short }\n"
              "t = run:train(fast{ steps = 2, batch = 2 })");
    assert_lua(L, "t.status == 'finished' and t.val_loss ~= t.val_loss");
    run_err(L, "run:evaluate{ batches = 1 }", "run:evaluate", "context 16 is longer", "val", NULL);
    lua_close(L);
}

/* Checkpoints that are missing, not checkpoints, or cut short. */
static void test_load_errors(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "function write(name, ...)\n"
              "  local f = assert(io.open(DIR .. '/' .. name, 'wb'))\n"
              "  f:write(...) f:close()\n"
              "end\n"
              "function st(header, data) return string.pack('<I8', #header), header, data end\n"
              "model = moelab.model(tiny())\n"
              "model:save(DIR .. '/good.safetensors')\n"
              "local f = assert(io.open(DIR .. '/good.safetensors', 'rb'))\n"
              "GOOD = f:read('a') f:close()\n"
              "write('garbage.safetensors', 'this is a text file, not a checkpoint\\n')\n"
              "write('empty.safetensors', '')\n"
              "write('half.safetensors', GOOD:sub(1, #GOOD // 2))\n"
              "write('short.safetensors', GOOD:sub(1, #GOOD - 4))\n"
              "write('headonly.safetensors', GOOD:sub(1, 8))\n"
              "local x = '\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}'\n"
              "write('nometa.safetensors', st('{' .. x .. '}', string.pack('<f', 1)))\n"
              "write('badconfig.safetensors', st('{\"__metadata__\":{\"moelab_config\":'\n"
              "      .. '\"{\\\\\"d_modle\\\\\":16}\"},' .. x .. '}', string.pack('<f', 1)))\n"
              "write('notensors.safetensors', st('{\"__metadata__\":{\"moelab_config\":'\n"
              "      .. '\"{\\\\\"layers\\\\\":1,\\\\\"d_model\\\\\":16,\\\\\"heads\\\\\":2,\\\\\"context\\\\\":16}\"},'\n"
              "      .. x .. '}', string.pack('<f', 1)))");
    assert_lua(L, "#GOOD > 1000");
    run_err(L, "moelab.load(DIR .. '/none.safetensors')", "moelab.load", "none.safetensors",
            "No such file", NULL);
    run_err(L, "moelab.load(DIR .. '/garbage.safetensors')", "moelab.load", "garbage.safetensors", NULL);
    run_err(L, "moelab.load(DIR .. '/empty.safetensors')", "moelab.load", "empty.safetensors", NULL);
    run_err(L, "moelab.load(DIR .. '/half.safetensors')", "moelab.load", "half.safetensors", NULL);
    run_err(L, "moelab.load(DIR .. '/short.safetensors')", "moelab.load", "short.safetensors", NULL);
    run_err(L, "moelab.load(DIR .. '/headonly.safetensors')", "moelab.load", "headonly.safetensors", NULL);
    run_err(L, "moelab.load(DIR .. '/nometa.safetensors')", "moelab.load", "not a moelab checkpoint", NULL);
    run_err(L, "moelab.load(DIR .. '/badconfig.safetensors')", "moelab.load", "moelab_config", "d_modle",
            NULL);
    run_err(L, "moelab.load(DIR .. '/notensors.safetensors')", "moelab.load", "has no tensor", NULL);
    run_err(L, "moelab.load(DIR)", "moelab.load", NULL);
    run_err(L, "moelab.load()", "string expected", NULL);
    /* the good one loads */
    run_ok(L, "assert(moelab.load(DIR .. '/good.safetensors'):loss('abcdefgh') == model:loss('abcdefgh'))");
    run_err(L, "model:save(DIR .. '/no/such/dir/m.safetensors')", "model:save", "m.safetensors", NULL);
    lua_close(L);
}

/* A checkpoint whose weights hold NaN is refused, naming the tensor, unless
** asked for (it used to load silently, and every loss was NaN). */
static void test_load_nonfinite(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "model = moelab.model(tiny())\n"
              "model:save(DIR .. '/nan.safetensors')\n"
              "local f = assert(io.open(DIR .. '/nan.safetensors', 'rb'))\n"
              "local bytes = f:read('a') f:close()\n"
              "local data = 8 + string.unpack('<I8', bytes) + 1\n"
              "bytes = bytes:sub(1, data + 39) .. string.pack('<f', 0/0) .. bytes:sub(data + 44)\n"
              "f = assert(io.open(DIR .. '/nan.safetensors', 'wb')) f:write(bytes) f:close()");
    run_err(L, "moelab.load(DIR .. '/nan.safetensors')", "moelab.load", "nan.safetensors",
            "'wte.weight' has 1 non-finite value", "element 10", "nonfinite = true", NULL);
    run_ok(L, "back = moelab.load(DIR .. '/nan.safetensors', { nonfinite = true })");
    assert_lua(L, "back:loss('\\0abcdefgh') ~= back:loss('\\0abcdefgh')"); /* byte 0's embedding */
    run_err(L, "moelab.load(DIR .. '/nan.safetensors', { nonfinit = true })", "moelab.load",
            "nonfinit", NULL);
    lua_close(L);
}

/* batch x context past an int's range, each within its limit: refused with a
** message and the run marked failed (it used to segfault, the run left
** running). */
static void test_train_batch_overflow(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "model = moelab.model{ context = 65536, d_model = 8, heads = 1, layers = 1,\n"
              "                      ffn = { hidden = 8 } }\n"
              "db = moelab.open(DIR .. '/overflow.db')\n"
              "run = db:run{ name = 'big', model = model,\n"
              "              data = moelab.corpus{ text = string.rep('abcdefgh', 100000) } }");
    run_err(L, "run:train{ steps = 1, batch = 32768 }", "run:train", "32768 x 65536",
            "2147483648 tokens", NULL);
    assert_lua(L, "db:query('SELECT status FROM runs')[1].status == 'failed'");
    run_err(L, "run:evaluate{ batches = 1, batch = 40 }", "run:evaluate",
            "a batch of 40 sequences of 65536 tokens", "GiB", NULL);
    lua_close(L);
}

/* run:evaluate{ router = ... } evaluates the trained model under another
** router: under its own router it equals a plain evaluation, bit for bit;
** it is recorded with the router and stays out of the validation curve;
** routers that need parameters the model lacks are refused. */
static void test_counterfactual_evaluation(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "model = moelab.model(tiny{ moe = { experts = 4, hidden = 16,\n"
              "                                   router = { kind = 'topk', k = 2 } } })\n"
              "db = moelab.open(DIR .. '/counterfactual.db')\n"
              "run = db:run{ name = 'cf', model = model, data = moelab.corpus{ text = TEXT } }\n"
              "run:train(fast{ steps = 3 })\n"
              "vals = #db:query(\"SELECT 1 FROM metrics WHERE split = 'val'\")\n"
              "own = run:evaluate{ batches = 2 }\n"
              "same = run:evaluate{ batches = 2, router = { kind = 'topk', k = 2 } }\n"
              "wide = run:evaluate{ batches = 2, router = { kind = 'threshold', p = 0.99 }, record = true }\n"
              "one = run:evaluate{ batches = 2, router = { k = 1 } }");
    assert_lua(L, "same.loss == own.loss and same.experts_per_token == own.experts_per_token");
    assert_lua(L, "same.moe_flops_per_token == own.moe_flops_per_token");
    assert_lua(L, "wide.experts_per_token > 2 and one.experts_per_token == 1");
    assert_lua(L, "wide.loss ~= own.loss");
    /* the model's own router is back afterwards */
    assert_lua(L, "run:evaluate{ batches = 2 }.loss == own.loss");
    assert_lua(L, "model:config().moe.router.kind == 'topk'");
    assert_lua(L, "db:query('SELECT router FROM evals WHERE eval_id = ?', own.eval_id)[1].router == nil");
    assert_lua(L, "db:query(\"SELECT json_extract(router, '$.p') AS p, json_extract(router, '$.kind')"
                  " AS kind FROM evals WHERE eval_id = ?\", wide.eval_id)[1].kind == 'threshold'");
    assert_lua(L, "db:query('SELECT count(*) AS n FROM routing WHERE eval_id = ?', wide.eval_id)[1].n"
                  " > 2 * wide.tokens");
    /* one val row per plain evaluation: the two above, not the three counterfactual */
    assert_lua(L, "#db:query(\"SELECT 1 FROM metrics WHERE split = 'val'\") == vals + 2");
    run_err(L, "run:evaluate{ router = { kind = 'hash' } }", "run:evaluate", "hash router", NULL);
    run_err(L, "run:evaluate{ router = { kind = 'stratified', strata = { 2, 2 } } }", "run:evaluate",
            "stratified router needs tensor", NULL);
    run_err(L, "run:evaluate{ router = { kind = 'threshold', k = 2 } }", "run:evaluate",
            "'moe.router.k' is not read by the threshold router", NULL);
    run_err(L, "run:evaluate{ router = { k = 0/0 } }", "run:evaluate", "moe.router.k", "nan", NULL);
    run_err(L, "run:evaluate{ router = 'topk' }", "run:evaluate", "'router' must be a table", NULL);
    run_ok(L, "dense = db:run{ name = 'dense', model = moelab.model(tiny()),\n"
              "                data = moelab.corpus{ text = TEXT } }");
    run_err(L, "dense:evaluate{ router = { kind = 'topk' } }", "run:evaluate", "dense model", NULL);
    lua_close(L);
}

/* A merged model under a counterfactual k merges that many experts, and the
** k of its first forward pass did not stay for good: it stayed, so { k = 1 }
** and { k = 4 } gave the k = 2 numbers, and a model first evaluated under
** { k = 1 } computed k = 1 ever after, in plain evaluations too. */
static void test_counterfactual_merge_k(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "data = moelab.corpus{ text = TEXT }\n"
              "cfg = tiny{ init_std = 0.3, moe = { experts = 4, hidden = 8,\n"
              "            router = { kind = 'merge', k = 2, segment = 4 } } }\n"
              "db = moelab.open(DIR .. '/merge-k.db')\n"
              "a = db:run{ name = 'a', model = moelab.model(cfg), data = data }\n"
              "b = db:run{ name = 'b', model = moelab.model(cfg), data = data }\n"
              "one = b:evaluate{ batches = 1, router = { k = 1 } }\n"
              "four = b:evaluate{ batches = 1, router = { k = 4 } }\n"
              "own_a, own_b = a:evaluate{ batches = 1 }, b:evaluate{ batches = 1 }");
    /* two gates a token, k experts each */
    assert_lua(L, "one.experts_per_token == 2 and four.experts_per_token == 8");
    assert_lua(L, "own_b.experts_per_token == 4");
    assert_lua(L, "one.loss ~= own_b.loss and four.loss ~= own_b.loss and one.loss ~= four.loss");
    assert_lua(L, "one.moe_flops_per_token < own_b.moe_flops_per_token");
    assert_lua(L, "four.moe_flops_per_token > own_b.moe_flops_per_token");
    assert_lua(L, "own_b.loss == own_a.loss and own_b.moe_flops_per_token == own_a.moe_flops_per_token");
    lua_close(L);
}

/* A model without a router tensor (moefied under `all` or `oracle`) has every
** parameter the hash router reads, but not its token map, which is no
** parameter: run:evaluate{ router = { kind = 'hash' } } read a NULL map and
** crashed the process. */
static void test_counterfactual_hash_needs_map(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "data = moelab.corpus{ text = TEXT }\n"
              "dense = moelab.model(tiny{ activation = 'relu' })\n"
              "db = moelab.open(DIR .. '/hash-map.db')\n"
              "all = db:run{ name = 'all', data = data,\n"
              "              model = moelab.moefy(dense, { experts = 4, router = { kind = 'all' } }) }\n"
              "oracle = db:run{ name = 'oracle', data = data,\n"
              "                 model = moelab.moefy(dense, { experts = 4, router = { kind = 'oracle' } }) }");
    run_err(L, "all:evaluate{ batches = 1, router = { kind = 'hash' } }", "run:evaluate",
            "hash router needs a hash model's token map", "this all model", NULL);
    run_err(L, "oracle:evaluate{ batches = 1, router = { kind = 'hash' } }", "run:evaluate",
            "token map", "this oracle model", NULL);
    /* a hash model keeps its own map, and may run every expert */
    run_ok(L, "hash = db:run{ name = 'hash', data = data, model = moelab.model(tiny{\n"
              "  moe = { experts = 4, hidden = 8, router = { kind = 'hash' } } }) }\n"
              "own = hash:evaluate{ batches = 1 }\n"
              "same = hash:evaluate{ batches = 1, router = { kind = 'hash' } }\n"
              "every = hash:evaluate{ batches = 1, router = { kind = 'all' } }");
    assert_lua(L, "own.loss == same.loss and every.experts_per_token == 4");
    lua_close(L);
}

/* moelab.sweep: every combination and seed as a named run; a second call
** skips the finished ones, runs a failed one again, and refuses a changed
** configuration under an old name. */
static void test_sweep_resumes(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "spec = { db = DIR .. '/sweep.db', name = 's', data = moelab.corpus{ text = TEXT },\n"
              "  base = tiny{ moe = { experts = 4, hidden = 16 } },\n"
              "  vary = { ['moe.router'] = { { kind = 'topk', k = 2 }, { kind = 'threshold', p = 0.9 } } },\n"
              "  seeds = { 1, 2 }, train = fast{ steps = 2 }, evaluate = { batches = 1 },\n"
              "  after = function(run, model, entry)\n"
              "    if entry.values['moe.router'].kind == 'threshold' and entry.seed == 2 then\n"
              "      error('the hook failed') end\n"
              "  end }\n"
              "first = moelab.sweep(spec)\n"
              "second = moelab.sweep(spec)\n"
              "db = moelab.open(DIR .. '/sweep.db')");
    assert_lua(L, "#first == 4 and #second == 4");
    assert_lua(L, "first[1].name == 's/moe.router={k=2,kind=topk}/seed=1'");
    assert_lua(L, "first[1].status == 'finished' and not first[1].skipped and first[1].eval.loss > 0");
    assert_lua(L, "first[4].status == 'failed' and first[4].error:find('the hook failed') ~= nil");
    assert_lua(L, "second[1].skipped and second[1].run_id == first[1].run_id");
    assert_lua(L, "second[1].val_loss == first[1].val_loss and second[1].eval.loss == first[1].eval.loss");
    assert_lua(L, "not second[4].skipped and second[4].status == 'failed'");
    /* three runs once, the failed one twice; both of its rows say failed */
    assert_lua(L, "db:query('SELECT count(*) AS n FROM runs')[1].n == 5");
    assert_lua(L, "db:query(\"SELECT count(*) AS n FROM runs WHERE status = 'failed'\")[1].n == 2");
    assert_lua(L, "STDERR:find('sweep s: 4 runs: 1 failed, 3 skipped', 1, true) ~= nil");
    assert_lua(L, "STDERR:find('failed: s/moe.router={kind=threshold,p=0.9}/seed=2', 1, true) ~= nil");
    /* named designs over base: false removes a key (a dense baseline) */
    run_ok(L, "named = moelab.sweep{ db = DIR .. '/sweep.db', name = 'd', data = spec.data,\n"
              "  base = spec.base, train = fast{ steps = 1 }, progress = false,\n"
              "  designs = { { name = 'dense', set = { moe = false } },\n"
              "              { name = 'hmoe', set = { ['moe.hidden'] = { 8, 12, 20, 24 } } } },\n"
              "  vary = { ['moe.router.k'] = { 1 } } }");
    /* the vary values come after the design's: the first is an MoE model again */
    assert_lua(L, "#named == 2 and named[1].name == 'd/dense/moe.router.k=1/seed=1'");
    assert_lua(L, "named[2].name == 'd/hmoe/moe.router.k=1/seed=1' and named[2].status == 'finished'");
    assert_lua(L, "db:query(\"SELECT json_extract(config, '$.model.moe.hidden[2]') AS h FROM runs\"\n"
                  "  .. \" WHERE name = ?\", named[2].name)[1].h == 20");
    run_ok(L, "dense = moelab.sweep{ db = DIR .. '/sweep.db', name = 'd', data = spec.data,\n"
              "  base = spec.base, train = fast{ steps = 1 }, progress = false,\n"
              "  designs = { { name = 'dense', set = { moe = false } } } }");
    assert_lua(L, "dense[1].name == 'd/dense/seed=1' and dense[1].status == 'finished'");
    assert_lua(L, "db:query('SELECT config FROM runs WHERE name = ?', dense[1].name)[1].config:find('moe') == nil");
    run_err(L, "moelab.sweep{ db = DIR .. '/sweep.db', data = spec.data, base = tiny(),\n"
               "  designs = { { name = 'a/b' } } }", "each design", NULL);
    /* a run whose training never started (a bad option) is failed, and runs again */
    run_ok(L, "bad = { db = DIR .. '/sweep.db', name = 'b', data = spec.data, base = spec.base,\n"
              "        train = fast{ stepz = 1 }, progress = false }\n"
              "b1 = moelab.sweep(bad)\n"
              "b2 = moelab.sweep(bad)");
    assert_lua(L, "b1[1].status == 'failed' and b1[1].error:find('stepz') ~= nil");
    assert_lua(L, "not b2[1].skipped and b2[1].status == 'failed'");
    assert_lua(L, "db:query(\"SELECT count(*) AS n FROM runs WHERE name LIKE 'b/%' AND status = 'failed'\")[1].n == 2");
    /* runs recorded before moe.bias was always written (only when true) are
    ** the same configuration */
    run_ok(L, "db:query(\"UPDATE runs SET config = json_remove(config, '$.model.moe.bias')\"\n"
              "         .. \" WHERE name LIKE 's/%'\")\n"
              "third = moelab.sweep(spec)");
    assert_lua(L, "third[1].skipped and third[2].skipped and third[1].run_id == first[1].run_id");
    run_ok(L, "spec.base.d_model = 8");
    run_err(L, "moelab.sweep(spec)", "another model configuration", NULL);
    run_err(L, "moelab.sweep{ db = DIR .. '/sweep.db', data = 1, base = tiny(), colour = 1 }",
            "unknown option 'colour'", NULL);
    /* a path, not a corpus: named before any run (a resumed sweep reads the corpus's size) */
    run_err(L, "moelab.sweep{ db = DIR .. '/sweep.db', data = 'data/kjv.txt', base = tiny() }",
            "'data' must be a corpus", "got 'data/kjv.txt'", NULL);
    run_err(L, "moelab.sweep{ db = DIR .. '/sweep.db', data = spec.data, base = tiny(),\n"
               "  vary = { layers = {} } }", "vary['layers']", NULL);
    /* a run named twice would be trained once, then skipped and counted twice */
    run_err(L, "moelab.sweep{ db = DIR .. '/sweep.db', data = spec.data, base = tiny(), seeds = { 1, 2, 1 } }",
            "seed 1 is given twice", NULL);
    run_err(L, "moelab.sweep{ db = DIR .. '/sweep.db', name = 'v', data = spec.data, base = tiny(),\n"
               "  vary = { layers = { 1, 1 } } }", "two runs would be named 'v/layers=1/seed=...'", NULL);
    run_err(L, "moelab.sweep{ db = DIR .. '/sweep.db', name = 'v', data = spec.data, base = tiny(),\n"
               "  designs = { { name = 'a' }, { name = 'a' } } }", "'v/a/seed=...'", NULL);
    assert_lua(L, "db:query(\"SELECT count(*) AS n FROM runs WHERE name LIKE 'v/%'\")[1].n == 0");
    lua_close(L);
}

/* A finished run is reused only when it was trained as the sweep would
** train it: other steps, another lr or another corpus under an old name are
** refused (they were skipped, their numbers reported as the new ones'), and
** threads, which change the time alone, are not compared. */
static void test_sweep_refuses_other_training(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "spec = { db = DIR .. '/retrain.db', name = 't', data = moelab.corpus{ text = TEXT },\n"
              "  base = tiny(), seeds = { 1 }, train = fast{ steps = 2 }, progress = false }\n"
              "first = moelab.sweep(spec)\n"
              "spec.train.threads = 2\n"
              "second = moelab.sweep(spec)");
    assert_lua(L, "first[1].status == 'finished' and second[1].skipped");
    run_ok(L, "spec.train.steps = 3");
    run_err(L, "moelab.sweep(spec)", "'t/base/seed=1'", "trained otherwise (steps 2, now 3)", NULL);
    run_ok(L, "spec.train.steps = 2; spec.train.lr = 0.02");
    run_err(L, "moelab.sweep(spec)", "lr 0.01, now 0.02", NULL);
    run_ok(L, "spec.train.lr = nil; spec.data = moelab.corpus{ text = TEXT .. TEXT }");
    run_err(L, "moelab.sweep(spec)", "a corpus of 1600 bytes (1440 train), now 3200 (2880)", NULL);
    run_ok(L, "db = moelab.open(DIR .. '/retrain.db')");
    assert_lua(L, "db:query('SELECT count(*) AS n FROM runs')[1].n == 1");
    lua_close(L);
}

/* An experiment script run again with fewer seeds (seeds=2 after seeds=1,2)
** reports the seeds it was given: the database's other seed is not folded
** into the mean of what it prints. */
static void test_experiment_reports_its_seeds(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "experiment = require 'moelab.experiment'\n"
              "local f = io.open(DIR .. '/experiment.txt', 'w') f:write(TEXT) f:close()\n"
              "function again(seeds)\n"
              "  moelab.args = { data = DIR .. '/experiment.txt', out = DIR .. '/experiment', seeds = seeds }\n"
              "  local x = experiment.setup{ name = 'e' }\n"
              "  moelab.sweep{ db = x.db, name = x.name, data = x.data, seeds = x.seeds, progress = false,\n"
              "                base = tiny(), designs = { { name = 'dense' } }, train = fast{ steps = 2 } }\n"
              "  return x:finish{}\n"
              "end\n"
              "both = again('1,2')\n"
              "one = again('2')");
    assert_lua(L, "#both == 1 and both[1].n == 2 and both[1].val_loss_sd ~= nil");
    assert_lua(L, "#one == 1 and one[1].n == 1 and one[1].val_loss_sd == nil");
    run_ok(L, "db = moelab.open(DIR .. '/experiment/e.db', { readonly = true })\n"
              "seed2 = db:query(\"SELECT val_loss FROM v_final_loss WHERE name = 'e/dense/seed=2'\")[1].val_loss\n"
              "db:close()");
    assert_lua(L, "one[1].val_loss == seed2");
    lua_close(L);
}

/* fresh=true deletes an experiment's database; fresh=0 or fresh=no (a
** number, a string: true to Lua) is refused before it deletes anything. */
static void test_experiment_fresh_values(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "experiment = require 'moelab.experiment'\n"
              "local f = io.open(DIR .. '/fresh.txt', 'w') f:write(TEXT) f:close()\n"
              "function setup(fresh)\n"
              "  moelab.args = { data = DIR .. '/fresh.txt', out = DIR .. '/fresh', fresh = fresh }\n"
              "  return experiment.setup{ name = 'f' }\n"
              "end\n"
              "x = setup(nil)\n"
              "moelab.open(x.db):close()\n"
              "function exists() local f = io.open(x.db) if f then f:close() end return f ~= nil end");
    run_err(L, "setup(0)", "f: fresh must be true or false, got '0'", NULL);
    run_err(L, "setup('no')", "got 'no'", NULL);
    assert_lua(L, "exists()");
    run_ok(L, "setup(false)");
    assert_lua(L, "exists()");
    run_ok(L, "setup(true)");
    assert_lua(L, "not exists()");
    lua_close(L);
}

/* A seed that lacks a number (no validation loss here) leaves it out of the
** mean, and the report says over how many of the seeds the mean is, rather
** than a mean of one under "seeds 2". */
static void test_report_counts_missing_seeds(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "report = require 'moelab.report'\n"
              "db = moelab.open(DIR .. '/missing.db')\n"
              "data = moelab.corpus{ text = TEXT }\n"
              "for seed = 1, 2 do\n"
              "  local model = moelab.model(tiny{ seed = seed })\n"
              "  local run = db:run{ name = 'g/seed=' .. seed, model = model, data = data }\n"
              "  run:train(fast{ steps = 2, eval_every = 1, eval_batches = seed == 1 and 1 or 0 })\n"
              "  run:close() model:close()\n"
              "end\n"
              "groups = report.groups(report.runs(db))\n"
              "v1 = db:query(\"SELECT val_loss FROM v_final_loss WHERE name = 'g/seed=1'\")[1].val_loss");
    assert_lua(L, "#groups == 1 and groups[1].n == 2 and groups[1].val_loss == v1");
    assert_lua(L, "groups[1].val_loss_n == 1 and groups[1].val_loss_sd == nil and groups[1].train_loss_n == nil");
    assert_lua(L, "report.render(groups, 'text'):find(string.format('%.4f (1 of 2)', v1), 1, true) ~= nil");
    assert_lua(L, "report.render(groups, 'markdown'):find(string.format('| %.4f (1 of 2) |', v1), 1, true) ~= nil");
    lua_close(L);
}

/* run:train{ probe = { every = N } } records the routing of one fixed batch
** every N steps (once per step across train calls), as evaluations with
** split 'probe' that stay out of the validation curve, all of the same
** tokens; v_routing_stability compares each with the one before. */
static void test_probe_routing_over_training(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "model = moelab.model(tiny{ layers = 2, moe = { experts = 4, hidden = 16 } })\n"
              "db = moelab.open(DIR .. '/probe.db')\n"
              "run = db:run{ name = 'p', model = model, data = moelab.corpus{ text = TEXT } }\n"
              "run:train(fast{ steps = 6, probe = { every = 2, batch = 2 } })\n"
              "run:train(fast{ steps = 2, probe = { every = 2, batch = 2 } })\n"
              "run:train(fast{ steps = 1, probe = { every = 2, batch = 2 } })\n" /* ends off the grid */
              "probes = db:query(\"SELECT step, tokens FROM evals WHERE split = 'probe' ORDER BY step\")\n"
              "stable = db:query('SELECT * FROM v_routing_stability ORDER BY layer, step')");
    /* 0, 2, 4, 6, 8 and after the last step, 9 (8 is not probed twice) */
    assert_lua(L, "#probes == 6 and probes[1].step == 0 and probes[5].step == 8 and probes[6].step == 9");
    assert_lua(L, "probes[1].tokens == 2 * 16");
    assert_lua(L, "#stable == 5 * 2 and stable[1].step == 2 and stable[1].tokens == 32");
    assert_lua(L, "(function() for _, r in ipairs(stable) do\n"
                  "  if not (r.changed >= 0 and r.changed <= 1) then return false end end\n"
                  "  return true end)()");
    /* every probe sees the same tokens */
    assert_lua(L, "db:query(\"SELECT count(*) AS n FROM evals a JOIN evals b ON a.split = 'probe'\"\n"
                  "  .. \" AND b.split = 'probe' AND a.step = 0 AND b.step = 8 JOIN token_stats x\"\n"
                  "  .. \" ON x.eval_id = a.eval_id JOIN token_stats y ON y.eval_id = b.eval_id\"\n"
                  "  .. \" AND y.seq = x.seq AND y.pos = x.pos AND y.token = x.token\")[1].n == 32");
    assert_lua(L, "#db:query(\"SELECT 1 FROM metrics WHERE split = 'val'\") == 3");
    run_err(L, "run:train(fast{ steps = 1, probe = {} })", "run:train probe", "'every'", NULL);
    run_err(L, "run:train(fast{ steps = 1, probe = { every = 0 } })", "run:train probe", "every", NULL);
    run_err(L, "run:train(fast{ steps = 1, probe = { evry = 2 } })", "run:train probe", "evry", NULL);
    run_ok(L, "dense = db:run{ name = 'dense', model = moelab.model(tiny()),\n"
              "                data = moelab.corpus{ text = TEXT } }");
    run_err(L, "dense:train(fast{ steps = 1, probe = { every = 1 } })", "run:train",
            "needs a recorded run of an MoE model", NULL);
    lua_close(L);
}

/* The report's numbers are the database's: each against SQL computed
** directly, per run and folded over seeds. */
static void test_report_matches_sql(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "report = require 'moelab.report'\n"
              "moelab.sweep{ db = DIR .. '/report.db', name = 'r', data = moelab.corpus{ text = TEXT },\n"
              "  base = tiny{ layers = 2, moe = { experts = 4, hidden = 16, router = { capacity_factor = 1 } } },\n"
              "  vary = { ['moe.router.k'] = { 1, 2 } }, seeds = { 1, 2, 3 },\n"
              "  train = fast{ steps = 3 }, evaluate = { batches = 2, record = true } }\n"
              "db = moelab.open(DIR .. '/report.db', { readonly = true })\n"
              "runs = report.runs(db)\n"
              "groups = report.groups(runs)\n"
              "function sql(q, ...) local r = db:query(q, ...)[1]; return r and r.v end\n"
              "function near(a, b) return a == b or math.abs(a - b) <= 1e-12 * math.max(1, math.abs(b)) end");
    assert_lua(L, "#runs == 6 and #groups == 2 and groups[1].n == 3");
    assert_lua(L, "groups[1].name == 'r/moe.router.k=1' and groups[1].design == 'topk k=1, 4x16'");
    assert_lua(L, "(function() for _, r in ipairs(runs) do\n"
                  "  local e = sql('SELECT MAX(eval_id) AS v FROM evals WHERE run_id = ?', r.run_id)\n"
                  "  if r.eval_id ~= e then return false end\n"
                  "  if not near(r.val_loss, sql(\"SELECT loss AS v FROM metrics WHERE run_id = ? AND split = 'val'\"\n"
                  "      .. ' ORDER BY step DESC, rowid DESC LIMIT 1', r.run_id)) then return false end\n"
                  "  if not near(r.experts_per_token, sql('SELECT experts_per_token AS v FROM evals WHERE eval_id = ?', e))\n"
                  "    then return false end\n"
                  "  if not near(r.load_cv, sql('SELECT AVG(cv) AS v FROM v_load_cv WHERE eval_id = ?', e)) then return false end\n"
                  "  if not near(r.dropped, sql('SELECT 1.0 * SUM(dropped) / (SUM(tokens) + SUM(dropped)) AS v'\n"
                  "      .. ' FROM expert_load WHERE eval_id = ?', e)) then return false end\n"
                  "  local p95 = sql('SELECT experts / 2.0 AS v FROM (SELECT experts, ROW_NUMBER() OVER'\n"
                  "      .. ' (ORDER BY experts) AS i, COUNT(*) OVER () AS n FROM token_stats WHERE eval_id = ?)'\n"
                  "      .. ' WHERE i = CAST(ceil(0.95 * n) AS INTEGER)', e)\n"
                  "  if not near(r.experts_p95, p95) then return false end\n"
                  "  if not near(r.tokens_per_s, sql(\"SELECT MAX(tokens) / (MAX(wall_ms) / 1000.0) AS v FROM metrics\"\n"
                  "      .. \" WHERE run_id = ? AND split = 'train'\", r.run_id)) then return false end\n"
                  /* 3 steps: the last tenth is the last step */
                  "  if not near(r.train_loss, sql(\"SELECT loss AS v FROM metrics WHERE run_id = ? AND split = 'train'\"\n"
                  "      .. ' AND step = 3', r.run_id)) then return false end\n"
                  "end return true end)()");
    /* folded: the mean over seeds and the sample standard deviation */
    assert_lua(L, "near(groups[2].val_loss, sql(\"SELECT AVG(f.val_loss) AS v FROM v_final_loss f\"\n"
                  "  .. \" WHERE f.name LIKE 'r/moe.router.k=2/seed=%'\"))");
    assert_lua(L, "near(groups[2].val_loss_sd, sql(\"SELECT sqrt(SUM((f.val_loss - a.m) * (f.val_loss - a.m)) / 2)\"\n"
                  "  .. \" AS v FROM v_final_loss f, (SELECT AVG(val_loss) AS m FROM v_final_loss\"\n"
                  "  .. \" WHERE name LIKE 'r/moe.router.k=2/seed=%') a WHERE f.name LIKE 'r/moe.router.k=2/seed=%'\"))");
    assert_lua(L, "groups[2].dropped > 0"); /* capacity 1 drops some of top-2's picks */
    assert_lua(L, "report.render(groups, 'markdown'):find('| r/moe.router.k=2 | topk k=2, 4x16 | 3 |', 1, true) ~= nil");
    assert_lua(L, "select(2, report.render(groups, 'csv'):gsub('\\n', '')) == 2");
    assert_lua(L, "#report.runs(db, { runs = { 'r/moe.router.k=1/*' } }) == 3");
    /* a pattern is a glob with * only: case counts, and _ and ? are themselves */
    assert_lua(L, "#report.runs(db, { runs = { 'R/*' } }) == 0");
    assert_lua(L, "#report.runs(db, { runs = { 'r/moe_router*', 'r/moe.router.k=?/*' } }) == 0");
    run_err(L, "report.render(groups, 'xml')", "text, csv or markdown", NULL);
    run_err(L, "db:query('DELETE FROM runs')", "readonly", NULL);
    lua_close(L);
}

/* What a speed figure needs: the machine, sgemm's rate, a clock, the FLOPs
** of a training step and the memory a model needs, by part. */
static void test_machine_and_costs(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "m = moelab.machine()\n"
              "r = moelab.sgemm{ n = 64, repeats = 3 }\n"
              "c0 = moelab.clock(); x = 0; for i = 1, 1e5 do x = x + i end; c1 = moelab.clock()");
    assert_lua(L, "type(m.cpu) == 'string' and #m.cpu > 0 and type(m.blas_core) == 'string'");
    assert_lua(L, "type(m.xsmm_target) == 'string' and #m.xsmm_target > 0");
    assert_lua(L, "m.threads == 1 and math.type(m.peak_rss) == 'integer' and m.peak_rss > 0");
    assert_lua(L, "r.min > 0 and r.min <= r.median and r.median <= r.max");
    assert_lua(L, "c1 > c0");
    run_err(L, "moelab.sgemm{ n = 0 }", "moelab.sgemm", "'n'", NULL);
    run_err(L, "moelab.sgemm{ size = 3 }", "moelab.sgemm", "unknown option 'size'", NULL);

    /* a dense model: the forward's FLOPs per token are 2·C·3C (qkv) + 4·T·C
    ** (scores and their sum, every pair) + 2·C·C (projection) + 2·2·C·H (FFN)
    ** + 2·C·V (output) = 13312 at C 16, T 16, H 32, V 256; a step is 3x */
    run_ok(L, "data = moelab.corpus{ text = TEXT, split = 0.9 }\n"
              "model = moelab.model(tiny())\n"
              "db = moelab.open(DIR .. '/costs.db')\n"
              "run = db:run{ name = 'dense', model = model, data = data }\n"
              "t = run:train(fast{ steps = 5 })\n"
              "w = db:query(\"SELECT wall_ms FROM metrics WHERE split = 'train' ORDER BY step\")\n"
              "mem = model:memory{ batch = 4 }\n"
              "inf = model:memory{ batch = 4, training = false }\n"
              "big = model:memory{ batch = 8 }");
    assert_true(lua_num(L, "t.flops_per_token") == 3.0 * 13312);
    assert_lua(L, "#w == 5 and w[1].wall_ms > 0");
    assert_lua(L, "(function() for i = 2, #w do if w[i].wall_ms <= w[i-1].wall_ms then return false end end return true end)()");
    assert_lua(L, "w[#w].wall_ms <= t.seconds * 1000 + 1e-6");
    assert_lua(L, "mem.parameters == model:parameters() * 4 and mem.gradients == mem.parameters");
    assert_lua(L, "mem.optimizer == 2 * mem.parameters and mem.moe == 0");
    assert_lua(L, "mem.total == mem.parameters + mem.gradients + mem.optimizer + mem.activations + mem.scratch");
    assert_lua(L, "inf.gradients == 0 and inf.optimizer == 0 and inf.scratch == 0");
    assert_lua(L, "inf.activations == mem.activations and big.activations > mem.activations");
    run_err(L, "model:memory{ batch = 0 }", "model:memory", "'batch'", NULL);
    /* no more tokens than a batch may hold (2^22; context 16) */
    assert_lua(L, "model:memory{ batch = 262144 }.total > big.total");
    run_err(L, "model:memory{ batch = 262145 }", "model:memory", "'batch'", "262144", NULL);

    /* an MoE model: the dense part (no FFN: 11264 a token) plus what the MoE
    ** layers ran, step by step, as the metrics table records it */
    run_ok(L, "moe = moelab.model(tiny{ moe = { experts = 4, hidden = 8, router = { kind = 'threshold', p = 0.8 } } })\n"
              "mrun = db:run{ name = 'moe', model = moe, data = data }\n"
              "mt = mrun:train(fast{ steps = 6 })\n"
              "moe_mean = db:query(\"SELECT avg(moe_flops_per_token) AS f FROM metrics \" ..\n"
              "                    \"WHERE split = 'train' AND run_id = ?\", mrun:id())[1].f");
    double moe_mean = lua_num(L, "moe_mean");
    assert_true(moe_mean > 0.0);
    assert_true(test_close(lua_num(L, "mt.flops_per_token"), 3.0 * (11264 + moe_mean), 1e-9, 0));
    assert_lua(L, "moe:memory{ batch = 4 }.moe > 0");
    /* the report's train loss is run:train's: the mean of the last tenth of
    ** the steps (20 in all: steps 19 and 20), not the last step's alone */
    run_ok(L, "mt2 = mrun:train(fast{ steps = 14 })\n"
              "rows = require('moelab.report').runs(db, { runs = { 'moe' } })");
    assert_lua(L, "#rows == 1 and math.abs(rows[1].train_loss - mt2.loss) <= 1e-6 * mt2.loss");
    assert_lua(L, "rows[1].train_loss ~= mt2.last_loss");
    lua_close(L);
}

/* Placement replay (moelab.placement): hand-made tokens with hand-computed
** volumes, and a recorded evaluation replayed whole. */
static void test_placement_replay(void **state) {
    (void)state;
    lua_State *L = new_state();
    /* 4 experts on 2 devices; tokens 1-2 live on device 0, 3-4 on device 1;
    ** d_model 2 (8 bytes a token), 1 FLOP an assignment, 1 GB/s, 1 GFLOP/s */
    run_ok(L, "pl = require 'moelab.placement'\n"
              "toks = { {0, 2}, {0, 2}, {1, 3}, {1, 3} }\n"
              "o = { d_model = 2, flops = { 1, 1, 1, 1 }, bandwidth = 1, rate = 1 }\n"
              "c = pl.layer(toks, 4, 2, 'contiguous', o)\n"
              "k = pl.layer(toks, 4, 2, 'cooccurrence', o)\n"
              "b = pl.layer(toks, 4, 2, 'balanced', o)\n"
              "one = pl.layer(toks, 4, 1, 'round_robin', o)");
    /* contiguous: experts 0,1 | 2,3; every token has one expert away: 4
    ** (token, device) pairs, there and back, 8 bytes each */
    assert_lua(L, "c.assignments == 8 and c.local_share == 0.5 and c.remote_tokens == 4 and c.bytes == 64");
    assert_lua(L, "c.devices[1] == 0 and c.devices[2] == 0 and c.devices[3] == 1 and c.devices[4] == 1");
    /* each device sends 2 and receives 2: two phases of 2 x 8 bytes at 1 GB/s */
    assert_lua(L, "math.abs(c.comm_ms - 2 * 2 * 8 / 1e9 * 1e3) < 1e-15 and c.imbalance == 1");
    assert_lua(L, "math.abs(c.compute_ms - 4 / 1e9 * 1e3) < 1e-15");
    /* co-occurrence puts 0 with 2 and 1 with 3: every token stays home */
    assert_lua(L, "k.devices[1] == k.devices[3] and k.devices[2] == k.devices[4] and k.devices[1] ~= k.devices[2]");
    assert_lua(L, "k.local_share == 1 and k.bytes == 0 and k.comm_ms == 0");
    assert_lua(L, "b.imbalance == 1 and one.local_share == 1 and one.bytes == 0");
    /* the greedy pass alone would pair 0 with 1 (the two busiest, chosen
    ** together once); the swaps then keep 0 with 2 and 1 with 3 (three times) */
    run_ok(L, "g = pl.layer({ {0, 1}, {0, 2}, {0, 2}, {0, 2}, {1, 3}, {1, 3}, {1, 3} }, 4, 2,\n"
              "             'cooccurrence', o).devices");
    assert_lua(L, "g[1] == g[3] and g[2] == g[4] and g[1] ~= g[2]");
    run_err(L, "pl.layer(toks, 4, 2, 'random', o)", "unknown policy 'random'", NULL);

    /* a recorded evaluation: every assignment is replayed, one device keeps all */
    run_ok(L, "data = moelab.corpus{ text = TEXT, split = 0.9 }\n"
              "db = moelab.open(DIR .. '/placement.db')\n"
              "run = db:run{ name = 'moe', data = data,\n"
              "  model = moelab.model(tiny{ layers = 2, moe = { experts = 4, hidden = 8 } }) }\n"
              "run:train(fast{ steps = 3 })\n"
              "e = run:evaluate{ batches = 2, batch = 4, record = true }\n"
              "rows = pl.study(db, { devices = { 1, 4, 1024 }, policy = 'cooccurrence' })\n"
              "n = db:query('SELECT COUNT(*) AS n FROM routing WHERE eval_id = ?', e.eval_id)[1].n");
    assert_lua(L, "#rows == 9 and rows[3].layer == 'all' and rows[3].devices == 1");
    assert_lua(L, "rows[3].assignments == n and rows[3].local_share == 1 and rows[3].bytes == 0");
    assert_lua(L, "rows[6].assignments == n and rows[6].local_share < 1 and rows[6].bytes > 0");
    assert_lua(L, "rows[9].imbalance > 1 and pl.render(rows, 'markdown'):find('| cooccurrence | 4 | all |', 1, true) ~= nil");
    /* a recorded evaluation under another router is not the run's latest: the
    ** figures' rule; asked for by id, it is replayed */
    run_ok(L, "cf = run:evaluate{ batches = 1, batch = 4, record = true,\n"
              "                   router = { kind = 'topk', k = 1 } }\n"
              "latest = pl.study(db, { run = 'moe', devices = 2 })\n"
              "asked = pl.study(db, { eval = cf.eval_id, devices = 2, policy = 'all' })");
    assert_lua(L, "cf.eval_id > e.eval_id and latest[1].eval_id == e.eval_id");
    assert_lua(L, "#asked == 4 * 3 and asked[12].eval_id == cf.eval_id and asked[12].policy == 'cooccurrence'");
    run_err(L, "pl.study(db, { devices = { 0 } })", "devices must be whole numbers", NULL);
    /* an empty list gave no rows and no word why */
    run_err(L, "pl.study(db, { devices = {} })", "devices must list at least one device count, got none",
            NULL);
    run_err(L, "moelab.placement_study(db, e.eval_id, { devices = {} })", "got none", NULL);
    /* `moelab placement --eval 1.5` replayed the latest evaluation instead */
    run_err(L, "pl.main{ DIR .. '/placement.db', '--devices', '2', '--eval', '1.5' }",
            "moelab placement: --eval takes an evaluation id (a whole number), got '1.5'", NULL);
    run_err(L, "pl.study(db, { run = 'nope' })", "no recorded evaluation of run 'nope'", NULL);
    lua_close(L);
}

static void test_loss_errors(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "model = moelab.model(tiny())");
    run_err(L, "model:loss(string.rep('a', 18))", "model:loss", "context + 1 = 17", "got 18", NULL);
    run_err(L, "model:loss('a')", "model:loss", "got 1", NULL);
    run_err(L, "model:loss('')", "model:loss", "got 0", NULL);
    run_err(L, "model:loss({})", "string expected", NULL);
    double a = lua_num(L, "model:loss(string.rep('a', 17))");
    double b = lua_num(L, "model:loss('ab')");
    assert_true(isfinite(a) && a > 0);
    assert_true(isfinite(b) && b > 0);
    /* an untrained model is close to uniform over 256 bytes */
    assert_true(fabs(b - log(256.0)) < 0.5);
    lua_close(L);
}

/* Objects used after close() say so instead of crashing. */
static void test_closed_objects(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "data  = moelab.corpus{ text = TEXT }\n"
              "model = moelab.model(tiny())\n"
              "db    = moelab.open(DIR .. '/closed.db')\n"
              "run   = db:run{ name = 'closed', model = model, data = data }\n"
              "m2 = moelab.model(tiny()) m2:close() m2:close()\n"
              "c2 = moelab.corpus{ text = TEXT } c2:close()");
    run_err(L, "m2:loss('abc')", "closed", NULL);
    run_err(L, "m2:sample{}", "closed", NULL);
    assert_lua(L, "tostring(m2):find('closed') ~= nil");
    run_err(L, "c2:size()", "closed", NULL);
    run_err(L, "db:run{ name = 'x', model = m2, data = data }", "'model'", NULL);
    run_err(L, "db:run{ name = 'x', model = model, data = c2 }", "'data'", NULL);
    run_ok(L, "model:close()");
    run_err(L, "run:train(fast{ steps = 1 })", "model", "closed", NULL);
    run_ok(L, "run:close() run:close()");
    run_err(L, "run:train(fast{ steps = 1 })", "run is closed", NULL);
    /* a closed run shows what it was recorded as, and its id (it showed
    ** "id 0, running") */
    assert_lua(L, "tostring(run) == 'moelab.run(closed, id 1, finished)'");
    run_ok(L, "r2 = db:run{ name = 'closed-by-db', model = moelab.model(tiny()), data = data }");
    assert_lua(L, "tostring(r2) == 'moelab.run(closed-by-db, id 2, running)'");
    run_ok(L, "db:close() db:close()");
    assert_lua(L, "tostring(r2) == 'moelab.run(closed, id 2, finished)'");
    run_err(L, "db:query('SELECT 1')", "closed", NULL);
    run_err(L, "moelab.plot{ db = db, figure = 'loss', out = DIR .. '/c.pdf' }", "closed", NULL);
    lua_close(L);
}

/* ---- how runs end ------------------------------------------------------- */

/* A learning rate of 1e30 sends the weights to infinity within a step or two:
** the run is recorded as diverged with a message, and what came before stays. */
/* moelab.stats, which the benchmarks state every figure in */
static void test_stats_summary(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "xs = { 3, 1, 2, 10 }\n"
              "s = require('moelab.stats').summary(xs)");
    assert_lua(L, "s.median == 2.5 and s.q1 == 1.75 and s.q3 == 4.75");
    assert_lua(L, "s.min == 1 and s.max == 10 and s.n == 4");
    assert_lua(L, "xs[1] == 3 and xs[4] == 10"); /* left as it was */
    assert_lua(L, "require('moelab.stats').summary{ 7 }.q3 == 7");
    assert_lua(L, "not pcall(require('moelab.stats').summary, {})");
    lua_close(L);
}

static void test_divergence(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "data  = moelab.corpus{ text = TEXT }\n"
              "model = moelab.model(tiny())\n"
              "db    = moelab.open(DIR .. '/diverge.db')\n"
              "run   = db:run{ name = 'boom', model = model, data = data }\n"
              "t1 = run:train(fast{ steps = 5, eval_batches = 0 })\n"
              "t2 = run:train(fast{ steps = 50, lr = 1e30, warmup = 0, eval_batches = 0 })");
    assert_lua(L, "t1.status == 'finished'");
    char buf[512];
    assert_string_equal(lua_str(L, "t2.status", buf, sizeof buf), "diverged");
    int steps = (int)lua_num(L, "t2.steps");
    assert_true(steps >= 0 && steps < 50);
    assert_true(lua_num(L, "t2.tokens_per_s") >= 0.0);
    /* the script is told on stderr, with the run's name */
    lua_str(L, "STDERR", buf, sizeof buf);
    if (!strstr(buf, "boom") || !strstr(buf, "diverged"))
        fail_msg("stderr after divergence: '%s'", buf);
    assert_lua(L, "db:query('SELECT status FROM runs')[1].status == 'diverged'");
    lua_close(L);

    sqlite3 *db = db_open("diverge.db");
    assert_string_equal(db_text(db, "SELECT status FROM runs", buf, sizeof buf), "diverged");
    db_text(db, "SELECT error FROM runs", buf, sizeof buf);
    if (!strstr(buf, "NaN") && !strstr(buf, "infinite")) fail_msg("runs.error is '%s'", buf);
    assert_int_equal(db_int(db, "SELECT finished_at IS NOT NULL FROM runs"), 1);
    /* the 5 good steps and those of the second call before the loss blew up */
    assert_int_equal(db_int(db, "SELECT count(*) FROM metrics WHERE split = 'train'"), 5 + steps);
    assert_int_equal(db_int(db, "SELECT count(*) FROM metrics WHERE split = 'train' AND step <= 5 "
                                "AND loss IS NOT NULL"), 5);
    assert_int_equal(db_int(db, "SELECT json_extract(config, '$.train.steps') FROM runs"), 50);
    /* the step named is the one that blew up, numbered as metrics numbers the
    ** steps (from 1, over both calls): the one after the last row kept */
    db_text(db, "SELECT error FROM runs", buf, sizeof buf);
    char want[64];
    snprintf(want, sizeof want, "at step %d;", 5 + steps + 1);
    if (!strstr(buf, want)) fail_msg("runs.error is '%s', expected '%s'", buf, want);
    sqlite3_close(db);
}

/* A loss that explodes but stays finite (lr 1e6: it climbs past 1e10) ends the
** run as diverged after TRAIN_EXPLODE_STEPS steps above the first loss plus
** TRAIN_EXPLODE_MARGIN, with the step and the loss in the message. */
static void test_exploding_loss_diverges(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "data  = moelab.corpus{ text = TEXT }\n"
              "model = moelab.model(tiny())\n"
              "db    = moelab.open(DIR .. '/explode.db')\n"
              "run   = db:run{ name = 'explode', model = model, data = data }\n"
              "t = run:train(fast{ steps = 200, lr = 1e6, warmup = 0, eval_batches = 0 })\n"
              "err = db:query('SELECT error FROM runs')[1].error\n"
              "worst = db:query(\"SELECT MAX(loss) AS x FROM metrics WHERE split = 'train'\")[1].x");
    char buf[512];
    assert_string_equal(lua_str(L, "t.status", buf, sizeof buf), "diverged");
    assert_true(lua_num(L, "t.steps") < 200);
    lua_str(L, "err", buf, sizeof buf);
    if (!strstr(buf, "loss exploded") || !strstr(buf, "at step") || !strstr(buf, "10 steps"))
        fail_msg("runs.error is '%s'", buf);
    assert_lua(L, "worst > 100 and worst < math.huge"); /* finite: not the NaN rule */
    /* the step named is the one that blew up, after the last recorded row (the
    ** row with the step's number would hold another step's loss) */
    run_ok(L, "last = db:query(\"SELECT MAX(step) AS s FROM metrics WHERE split = 'train'\")[1].s\n"
              "named = tonumber(err:match('at step (%d+)'))");
    assert_lua(L, "named == last + 1 and named == t.steps + 1");
    /* an ordinary run is not caught by it */
    run_ok(L, "ok = db:run{ name = 'fine', model = moelab.model(tiny()), data = data }"
              ":train(fast{ steps = 40 })");
    assert_lua(L, "ok.status == 'finished'");
    lua_close(L);
}

/* A script that fails while a run is open: lmoelab_script_ended then lua_close
** record the run as failed, with the message, keeping its rows. A run whose
** training finished before the error stays finished. */
static void test_script_error_fails_open_runs(void **state) {
    (void)state;
    lua_State *L = new_state();
    run_ok(L, "data  = moelab.corpus{ text = TEXT }\n"
              "model = moelab.model(tiny())\n"
              "db    = moelab.open(DIR .. '/failed.db')\n"
              "done  = db:run{ name = 'done', model = model, data = data }\n"
              "done:train(fast{ steps = 3, eval_batches = 0 })\n"
              "open  = db:run{ name = 'open', model = model, data = data }\n"
              "open:evaluate{ batches = 1, batch = 2 }");
    assert_lua(L, "db:query(\"SELECT status FROM runs WHERE name = 'open'\")[1].status == 'running'");
    int rc = run_snippet(L, "local x = nil\nerror('the script broke here')");
    assert_int_not_equal(rc, LUA_OK);
    char msg[512];
    snprintf(msg, sizeof msg, "%s", lua_tostring(L, -1));
    lmoelab_script_ended(L, msg, 0);
    lua_close(L);

    sqlite3 *db = db_open("failed.db");
    char buf[512];
    assert_string_equal(db_text(db, "SELECT status FROM runs WHERE name = 'open'", buf, sizeof buf), "failed");
    db_text(db, "SELECT error FROM runs WHERE name = 'open'", buf, sizeof buf);
    if (!strstr(buf, "the script broke here")) fail_msg("runs.error is '%s'", buf);
    assert_int_equal(db_int(db, "SELECT finished_at IS NOT NULL FROM runs WHERE name = 'open'"), 1);
    assert_int_equal(db_int(db, "SELECT count(*) FROM evals e JOIN runs r USING (run_id) "
                                "WHERE r.name = 'open'"), 1);
    assert_int_equal(db_int(db, "SELECT count(*) FROM metrics m JOIN runs r USING (run_id) "
                                "WHERE r.name = 'open' AND m.split = 'val'"), 1);
    assert_string_equal(db_text(db, "SELECT status FROM runs WHERE name = 'done'", buf, sizeof buf),
                        "finished");
    assert_int_equal(db_int(db, "SELECT count(*) FROM metrics m JOIN runs r USING (run_id) "
                                "WHERE r.name = 'done' AND m.split = 'train'"), 3);
    sqlite3_close(db);
}

/* The same with interrupted = 1 (Ctrl-C), and with a script that ended well. */
static void test_script_interrupted_or_finished(void **state) {
    (void)state;
    for (int interrupted = 0; interrupted <= 1; interrupted++) {
        lua_State *L = new_state();
        run_ok(L, "data  = moelab.corpus{ text = TEXT }\n"
                  "model = moelab.model(tiny())\n"
                  "db    = moelab.open(DIR .. '/ended.db')\n"
                  "open  = db:run{ name = 'open', model = model, data = data }");
        lmoelab_script_ended(L, interrupted ? "interrupted by Ctrl-C" : NULL, interrupted);
        lua_close(L);
    }
    sqlite3 *db = db_open("ended.db");
    char buf[512];
    assert_string_equal(db_text(db, "SELECT group_concat(status, ',') FROM "
                                    "(SELECT status FROM runs ORDER BY run_id)", buf, sizeof buf),
                        "finished,interrupted");
    assert_int_equal(db_int(db, "SELECT count(*) FROM runs WHERE finished_at IS NULL"), 0);
    sqlite3_close(db);
}

/* ---- main --------------------------------------------------------------- */

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int group_setup(void **state) {
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/moelab-test-lua-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return -1;
    }
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    if (getenv("MOELAB_KEEP_TMP")) {
        fprintf(stderr, "test_lua: keeping %s\n", tmpdir);
        return 0;
    }
    nftw(tmpdir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_module),
        cmocka_unit_test(test_config_defaults),
        cmocka_unit_test(test_train_evaluate_record),
        cmocka_unit_test(test_moe_end_to_end),
        cmocka_unit_test(test_stratified_end_to_end),
        cmocka_unit_test(test_merge_end_to_end),
        cmocka_unit_test(test_moefy_end_to_end),
        cmocka_unit_test(test_save_load_sample_plot),
        cmocka_unit_test(test_config_errors),
        cmocka_unit_test(test_config_numbers),
        cmocka_unit_test(test_option_errors),
        cmocka_unit_test(test_option_numbers),
        cmocka_unit_test(test_moefy_unread_router_keys),
        cmocka_unit_test(test_query_one_statement),
        cmocka_unit_test(test_query_no_open_transaction),
        cmocka_unit_test(test_corpus_errors),
        cmocka_unit_test(test_load_errors),
        cmocka_unit_test(test_load_nonfinite),
        cmocka_unit_test(test_counterfactual_evaluation),
        cmocka_unit_test(test_counterfactual_merge_k),
        cmocka_unit_test(test_counterfactual_hash_needs_map),
        cmocka_unit_test(test_sweep_resumes),
        cmocka_unit_test(test_sweep_refuses_other_training),
        cmocka_unit_test(test_experiment_reports_its_seeds),
        cmocka_unit_test(test_report_counts_missing_seeds),
        cmocka_unit_test(test_experiment_fresh_values),
        cmocka_unit_test(test_probe_routing_over_training),
        cmocka_unit_test(test_report_matches_sql),
        cmocka_unit_test(test_machine_and_costs),
        cmocka_unit_test(test_placement_replay),
        cmocka_unit_test(test_train_batch_overflow),
        cmocka_unit_test(test_loss_errors),
        cmocka_unit_test(test_closed_objects),
        cmocka_unit_test(test_stats_summary),
        cmocka_unit_test(test_divergence),
        cmocka_unit_test(test_exploding_loss_diverges),
        cmocka_unit_test(test_script_error_fails_open_runs),
        cmocka_unit_test(test_script_interrupted_or_finished),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
