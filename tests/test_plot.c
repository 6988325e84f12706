/*
** test_plot.c — checks figure rendering (src/plot.c, src/plot_figures.c and
** the scripts in plots/) end to end: a database of two runs becomes real
** PDF, PNG and SVG files through gnuplot, in a directory whose name has a
** space and a quote; so does one of MoE runs (and a dense one) recorded
** through the recorder's API. A third database is made by training tiny
** models through the Lua module (dense, top-2 with capacity, threshold,
** stratified {2,2}, a probed run, a sweep of two seeds, MoEfied models with
** counterfactual evaluations), and every figure is drawn from it: each
** makes a PDF of plausible size, the data gnuplot is given (saved with
** PlotOptions.gnuplot_out) agrees with SQL over the database, a run named
** without a figure's data is refused with how to record it, and the layer
** and size options are checked. Bad figures, extensions, run names and
** paths get messages naming them; a gnuplot error and a missing gnuplot
** reach the caller as text.
**
** Build: see the Makefile (links build/libmoelab.a, for the Lua module).
*/
#include <ftw.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include <lauxlib.h>
#include <lualib.h>
#include <sqlite3.h>

#include "lmoelab.h"
#include "plot.h"
#include "recorder.h"

#ifndef MOELAB_PLOTS_DIR
#error "compile with -DMOELAB_PLOTS_DIR=\"\\\"/path/to/moelab/plots\\\"\""
#endif

typedef struct {
    char dir[256];       /* has a space and a single quote in its name */
    char db[512];        /* runs "top2" and "dense_ffn", both with metrics */
    char empty_db[512];  /* run "idle" without metrics */
    char moe_db[512];    /* MoE runs "top2" and "threshold", dense run "ffn" */
    char trained_db[512];/* tiny models trained through Lua: see trained_script */
} Fixture;

/* plot_render with the run list and the scripts' folder set, the rest default. */
static int render(const char *figure, const char *db, const char *out, const char *runs,
                  const char *plots_dir, char *err) {
    PlotOptions opt = PLOT_OPTIONS_INIT;
    opt.runs = runs;
    opt.plots_dir = plots_dir;
    return plot_render(figure, db, out, &opt, err);
}

static void path_in(char *out, size_t n, const Fixture *fx, const char *name) {
    snprintf(out, n, "%s/%s", fx->dir, name);
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb; (void)flag; (void)ftw;
    return remove(path);
}

/* A run's loss falls from ln(256) towards 1.4 nats/byte; val every 50 steps. */
static int record_run(Recorder *r, const char *name, double floor, char *err) {
    int64_t run = 0;
    if (rec_run_begin(r, name, "test", "{}", 1, 1000, 500, 1, &run, err))
        return -1;
    for (int step = 1; step <= 400; step++) {
        double loss = floor + (log(256.0) - floor) * exp(-step / 60.0);
        if (rec_metric(r, run, step, "train", loss, 0.01, 1e-3, step * 1024, NAN, 5, NAN, NULL, err))
            return -1;
        if (step % 50 == 0
            && rec_metric(r, run, step, "val", loss + 0.05, NAN, 1e-3, step * 1024, NAN, NAN, NAN, NULL, err))
            return -1;
    }
    return rec_run_status(r, run, "finished", NULL, err);
}

/*
** An MoE run as the trainer records it, through the recorder's API: MoE
** layers 1 and 3 (every = 2) of 8 experts, expert load at each of 20
** training steps, then a validation evaluation with record = true: its
** expert load, the routing of 4 sequences of 16 tokens, and token_stats.
** top2 gives every token 2 experts; threshold gives token t 1 + t % 3 of
** them, and two more tokens (positions 16, 17) that no expert took.
** A run with experts = 0 is dense: metrics and evaluations only.
*/
static int record_moe_run(Recorder *r, const char *name, int threshold, int experts,
                          double val_loss, double flops, char *err) {
    enum { STEPS = 20, SEQS = 4, POS = 16 };
    static const int layers[] = {1, 3};
    int64_t run = 0, eval_id = 0;
    if (rec_run_begin(r, name, "test", "{}", 1, 1000, 500, 1, &run, err))
        return -1;
    for (int step = 1; step <= STEPS; step++) {
        RecAux aux = {0.01 * step, NAN, NAN, NAN, NAN};
        if (rec_metric(r, run, step, "train", 5.0 - 0.1 * step, experts ? 0.01 : NAN, 1e-3,
                       step * 1024, experts ? flops : NAN, 5, NAN, experts ? &aux : NULL, err))
            return -1;
        for (int l = 0; l < 2 && experts; l++) {
            RecExpertLoad load[8];
            for (int e = 0; e < experts; e++)   /* expert 0 busiest in layer 1 */
                load[e] = (RecExpertLoad){layers[l], e, 100 + (l == 0 && e == 0) * 300 + 10 * e,
                                          0, 0.125 * 1024};
            if (rec_expert_load(r, run, -1, step, load, (size_t)experts, err))
                return -1;
        }
    }
    if (rec_eval(r, run, STEPS, "val", SEQS * POS, val_loss, flops,
                 experts ? (threshold ? 1.92 : 2.0) : 0.0, &eval_id, err)
        || rec_metric(r, run, STEPS, "val", val_loss, NAN, NAN, STEPS * 1024, flops, 5, NAN, NULL,
                      err))
        return -1;
    if (!experts)
        return rec_run_status(r, run, "finished", NULL, err);
    RecRouting routing[2 * SEQS * POS * 3];
    RecTokenStat tokens[SEQS * POS + 2];
    size_t n = 0;
    for (int l = 0; l < 2; l++) {
        RecExpertLoad load[8];
        for (int e = 0; e < experts; e++)       /* expert 7 busiest in evaluation */
            load[e] = (RecExpertLoad){layers[l], e, 40 + (e == 7) * 80, e == 7 ? 3 : 0, 8.0};
        if (rec_expert_load(r, run, eval_id, STEPS, load, (size_t)experts, err))
            return -1;
        for (int t = 0; t < SEQS * POS; t++) {
            int k = threshold ? 1 + t % 3 : 2;
            for (int rank = 0; rank < k; rank++)
                routing[n++] = (RecRouting){.layer = layers[l], .seq = t / POS, .pos = t % POS,
                                            .token = 65 + t % 26, .rank = rank,
                                            .expert = (t + rank) % experts,
                                            .weight = 1.0f / (float)k};
        }
    }
    for (int t = 0; t < SEQS * POS + (threshold ? 2 : 0); t++)
        tokens[t] = (RecTokenStat){.seq = t < SEQS * POS ? t / POS : 0,
                                   .pos = t < SEQS * POS ? t % POS : POS + t - SEQS * POS,
                                   .token = 65 + t % 26, .experts = 4, .loss = 1.5f,
                                   .moe_flops = flops};
    if (rec_routing(r, run, eval_id, routing, n, err)
        || rec_token_stats(r, run, eval_id, tokens,
                           (size_t)(SEQS * POS + (threshold ? 2 : 0)), err))
        return -1;
    return rec_run_status(r, run, "finished", NULL, err);
}

/*
** The trained database: tiny models (2 layers, d_model 16, 4 experts of
** hidden 16, context 16), 30 steps of 4 sequences each on a text of words,
** numbers, punctuation and newlines, each evaluated with record = true:
**   dense        no MoE
**   top2         top-2 at capacity factor 1 (drops)
**   threshold    threshold 0.9
**   stratified   strata {2, 2}
**   probe        top-1, a routing probe every 5 steps
**   sweep/moe.router.capacity_factor={1,2}/seed={1,2}   moelab.sweep, top-2
**   moefy-dense  a dense ReLU model, trained, then split into 4 experts:
**   moefy-kmeans its similarity top-2 model, evaluated, and again under
**                top-k 1 and 3, threshold 0.5 and 0.8, learned 0.5 and 0.8
**   moefy-oracle an oracle top-2 model, and under oracle k 1, 3 and all
** About a second on one core.
*/
static const char *trained_script =
    "local moelab = require 'moelab'\n"
    "moelab.threads(1)\n"
    "local words = { 'In the beginning', 'God created', 'the heaven', 'and the earth.', '\\n',\n"
    "                'And', '1:2', 'said, Let', 'there be light;', '42 days', '\\n\\n' }\n"
    "local parts, s = {}, 7\n"
    "for i = 1, 600 do s = (s * 1103515245 + 12345) % 2147483648; parts[i] = words[s % #words + 1] end\n"
    "local data = moelab.corpus{ text = table.concat(parts, ' '), split = 0.8 }\n"
    "local db = moelab.open(DB)\n"
    "local function cfg(moe, activation)\n"
    "  return { layers = 2, d_model = 16, heads = 2, context = 16, ffn = { hidden = 32 },\n"
    "           activation = activation or 'gelu', seed = 1, moe = moe }\n"
    "end\n"
    "local function moe(router) return { experts = 4, hidden = 16, router = router } end\n"
    "local train = { steps = 30, batch = 4, lr = 1e-2, warmup = 2, threads = 1, progress = false,\n"
    "                eval_every = 10, eval_batches = 2 }\n"
    "local record = { batches = 2, batch = 4, record = true }\n"
    "local function go(name, config, probe)\n"
    "  local model = moelab.model(config)\n"
    "  local run = db:run{ name = name, model = model, data = data }\n"
    "  local o = {}\n"
    "  for k, v in pairs(train) do o[k] = v end\n"
    "  if probe then o.probe = { every = 5, batch = 4 } end\n"
    "  run:train(o)\n"
    "  run:evaluate{ batches = 2, batch = 4, record = config.moe ~= nil }\n"
    "  return model\n"
    "end\n"
    "go('dense', cfg())\n"
    "go('top2', cfg(moe{ kind = 'topk', k = 2, capacity_factor = 1 }))\n"
    "go('threshold', cfg(moe{ kind = 'threshold', p = 0.9 }))\n"
    "go('stratified', cfg(moe{ kind = 'stratified', strata = { 2, 2 } }))\n"
    "go('probe', cfg(moe{ kind = 'topk', k = 1 }), true)\n"
    "moelab.sweep{ db = db, name = 'sweep', data = data, base = cfg(moe{ kind = 'topk', k = 2 }),\n"
    "              vary = { ['moe.router.capacity_factor'] = { 1, 2 } }, seeds = { 1, 2 },\n"
    "              train = train, evaluate = record, progress = false }\n"
    "local dense = go('moefy-dense', cfg(nil, 'relu'))\n"
    "local similar = moelab.moefy(dense, { experts = 4, router = { kind = 'similarity', k = 2 } })\n"
    "local run = db:run{ name = 'moefy-kmeans', model = similar, data = data }\n"
    "run:evaluate(record)\n"
    "for _, k in ipairs{ 1, 3 } do\n"
    "  run:evaluate{ batches = 2, batch = 4, router = { kind = 'similarity', k = k } }\n"
    "end\n"
    "for _, p in ipairs{ 0.5, 0.8 } do\n"
    "  run:evaluate{ batches = 2, batch = 4, router = { kind = 'similarity', select = 'threshold', p = p } }\n"
    "  run:evaluate{ batches = 2, batch = 4, router = { kind = 'learned', select = 'threshold', p = p } }\n"
    "end\n"
    "local oracle = moelab.moefy(dense, { experts = 4, router = { kind = 'oracle', k = 2 } })\n"
    "run = db:run{ name = 'moefy-oracle', model = oracle, data = data }\n"
    "run:evaluate(record)\n"
    "for _, k in ipairs{ 1, 3 } do\n"
    "  run:evaluate{ batches = 2, batch = 4, router = { kind = 'oracle', k = k } }\n"
    "end\n"
    "run:evaluate{ batches = 2, batch = 4, router = { kind = 'all' } }\n"
    "db:close()\n";

static int make_trained_db(const char *path) {
    lua_State *L = luaL_newstate();
    if (!L)
        return -1;
    luaL_openlibs(L);
    lmoelab_preload(L);
    lua_pushstring(L, path);
    lua_setglobal(L, "DB");
    int rc = luaL_loadbuffer(L, trained_script, strlen(trained_script), "=trained_script");
    if (rc == LUA_OK)
        rc = lua_pcall(L, 0, 0, 0);
    if (rc != LUA_OK)
        print_error("fixture: %s\n", lua_tostring(L, -1));
    lua_close(L);
    return rc == LUA_OK ? 0 : -1;
}

static int setup_fixture(void **state) {
    Fixture *fx = calloc(1, sizeof *fx);
    char err[ML_ERRLEN] = "";
    Recorder *r = NULL;
    if (!fx)
        return -1;
    snprintf(fx->dir, sizeof fx->dir, "/tmp/moelab plot's test XXXXXX");
    if (!mkdtemp(fx->dir))
        return -1;
    path_in(fx->db, sizeof fx->db, fx, "runs.db");
    path_in(fx->empty_db, sizeof fx->empty_db, fx, "empty.db");
    if (rec_open(&r, fx->db, err) || record_run(r, "top2", 1.5, err)
        || record_run(r, "dense_ffn", 1.6, err) || rec_flush(r, err)) {
        print_error("fixture: %s\n", err);
        rec_close(r);
        return -1;
    }
    rec_close(r);
    if (rec_open(&r, fx->empty_db, err)
        || rec_run_begin(r, "idle", NULL, NULL, 0, 0, 0, -1, NULL, err)) {
        print_error("fixture: %s\n", err);
        rec_close(r);
        return -1;
    }
    rec_close(r);
    path_in(fx->moe_db, sizeof fx->moe_db, fx, "moe.db");
    if (rec_open(&r, fx->moe_db, err) || record_moe_run(r, "top2", 0, 8, 1.62, 1.31e5, err)
        || record_moe_run(r, "threshold", 1, 8, 1.66, 1.05e5, err)
        || record_moe_run(r, "ffn", 0, 0, 1.71, 0, err) || rec_flush(r, err)) {
        print_error("fixture: %s\n", err);
        rec_close(r);
        return -1;
    }
    rec_close(r);
    path_in(fx->trained_db, sizeof fx->trained_db, fx, "trained.db");
    if (make_trained_db(fx->trained_db))
        return -1;
    *state = fx;
    return 0;
}

static int teardown_fixture(void **state) {
    Fixture *fx = *state;
    nftw(fx->dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(fx);
    return 0;
}

static void assert_file_starts_with(const char *path, const char *magic, const char *alt) {
    char head[16] = "";
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("no file '%s'", path);
    size_t n = fread(head, 1, sizeof head - 1, f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    if (size <= 0 || n == 0)
        fail_msg("'%s' is empty", path);
    if (strncmp(head, magic, strlen(magic)) != 0 && !(alt && strncmp(head, alt, strlen(alt)) == 0))
        fail_msg("'%s' starts with '%.8s', expected '%s'", path, head, magic);
}

/* ---- figures that work ------------------------------------------------ */

static void test_loss_renders_pdf_png_and_svg(void **state) {
    Fixture *fx = *state;
    static const struct { const char *file, *magic, *alt; } outputs[] = {
        {"loss 'figure'.pdf", "%PDF", NULL},
        {"loss 'figure'.png", "\x89PNG", NULL},
        {"loss 'figure'.svg", "<?xml", "<svg"},
        {"LOSS.PDF", "%PDF", NULL},
    };
    for (size_t i = 0; i < sizeof outputs / sizeof *outputs; i++) {
        char out[600], err[ML_ERRLEN] = "";
        path_in(out, sizeof out, fx, outputs[i].file);
        if (render("loss", fx->db, out, NULL, MOELAB_PLOTS_DIR, err))
            fail_msg("render(%s): %s", outputs[i].file, err);
        assert_file_starts_with(out, outputs[i].magic, outputs[i].alt);
    }
    /* Both runs are in the key, and what its two kinds of line are. */
    char svg[600], line[4096];
    int seen = 0;
    path_in(svg, sizeof svg, fx, "loss 'figure'.svg");
    FILE *f = fopen(svg, "r");
    assert_non_null(f);
    while (fgets(line, sizeof line, f)) {
        seen |= strstr(line, ">top2<") ? 1 : 0;
        seen |= strstr(line, ">dense_ffn<") ? 2 : 0;
        seen |= strstr(line, ">training<") ? 4 : 0;
        seen |= strstr(line, ">validation<") ? 8 : 0;
    }
    fclose(f);
    assert_int_equal(seen, 15);
}

static void test_loss_renders_selected_runs(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "selected.svg");
    assert_int_equal(render("loss", fx->db, out, " dense_ffn ", MOELAB_PLOTS_DIR, err), 0);
    assert_file_starts_with(out, "<?xml", "<svg");
    FILE *f = fopen(out, "r");
    char line[4096];
    int top2 = 0, dense = 0;
    while (f && fgets(line, sizeof line, f)) {
        top2 |= strstr(line, ">top2<") != NULL;
        dense |= strstr(line, ">dense_ffn<") != NULL;
    }
    if (f)
        fclose(f);
    assert_false(top2);
    assert_true(dense);
    assert_int_equal(render("loss", fx->db, out, "top2,dense_ffn", MOELAB_PLOTS_DIR, err), 0);
}

/* A relative output path starting with '|' is a file, not a shell pipe. */
static void test_pipe_like_path_is_a_file(void **state) {
    Fixture *fx = *state;
    char cwd[1024], err[ML_ERRLEN] = "";
    assert_non_null(getcwd(cwd, sizeof cwd));
    assert_int_equal(chdir(fx->dir), 0);
    int rc = render("loss", "runs.db", "|touch pwned.png", NULL, MOELAB_PLOTS_DIR, err);
    int pwned = access("pwned.png", F_OK) == 0;
    int written = access("|touch pwned.png", F_OK) == 0;
    assert_int_equal(chdir(cwd), 0);
    if (rc)
        fail_msg("plot_render: %s", err);
    assert_false(pwned);
    assert_true(written);
}

/* The whole of a text file, or fail. The caller frees it. */
static char *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("no file '%s'", path);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = calloc((size_t)size + 1, 1);
    assert_non_null(text);
    assert_int_equal(fread(text, 1, (size_t)size, f), (size_t)size);
    fclose(f);
    return text;
}

static void test_moe_figures_render_pdf_png_and_svg(void **state) {
    Fixture *fx = *state;
    static const char *figures[] = {"expert_load", "experts_per_token", "loss_vs_flops"};
    static const struct { const char *ext, *magic, *alt; } formats[] = {
        {"pdf", "%PDF", NULL}, {"png", "\x89PNG", NULL}, {"svg", "<?xml", "<svg"},
    };
    for (size_t f = 0; f < sizeof figures / sizeof *figures; f++)
        for (size_t k = 0; k < sizeof formats / sizeof *formats; k++) {
            char name[64], out[600], err[ML_ERRLEN] = "";
            snprintf(name, sizeof name, "%s.%s", figures[f], formats[k].ext);
            path_in(out, sizeof out, fx, name);
            if (render(figures[f], fx->moe_db, out, NULL, MOELAB_PLOTS_DIR, err))
                fail_msg("render(%s): %s", name, err);
            assert_file_starts_with(out, formats[k].magic, formats[k].alt);
        }
}

/* Titles name the run and what was summed; the dense run has no panel. */
static void test_expert_load_panels(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "expert_load.svg");
    assert_int_equal(render("expert_load", fx->moe_db, out, NULL, MOELAB_PLOTS_DIR, err), 0);
    char *svg = read_file(out);
    assert_non_null(strstr(svg, ">top2<"));
    assert_non_null(strstr(svg, ">threshold<"));
    assert_non_null(strstr(svg, ">evaluation at step 20<"));
    assert_non_null(strstr(svg, ">share of the layer's assignments<"));
    assert_null(strstr(svg, "ffn"));
    free(svg);
}

static void test_experts_per_token_legend_has_means(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "experts_per_token.svg");
    assert_int_equal(render("experts_per_token", fx->moe_db, out, "threshold, top2",
                                 MOELAB_PLOTS_DIR, err), 0);
    char *svg = read_file(out);
    /* threshold, per layer: 22 tokens with 1 expert, 21 with 2, 21 with 3,
    ** and 2 with none: (22 + 42 + 63) / 66 = 1.924 */
    assert_non_null(strstr(svg, ">threshold (mean 1.92)<"));
    assert_non_null(strstr(svg, ">top2 (mean 2.00)<"));
    free(svg);
}

static void test_loss_vs_flops_places_dense_runs_at_zero(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "loss_vs_flops.svg");
    assert_int_equal(render("loss_vs_flops", fx->moe_db, out, NULL, MOELAB_PLOTS_DIR, err),
                     0);
    char *svg = read_file(out);
    assert_non_null(strstr(svg, ">ffn (dense)<"));
    assert_non_null(strstr(svg, ">top2<"));
    assert_non_null(strstr(svg, ">threshold<"));
    free(svg);
}


/* ---- the figure suite, from trained models ----------------------------- */

/* A file's size and whether it starts with magic and ends with tail. */
static long check_file(const char *path, const char *magic, const char *tail) {
    FILE *f = fopen(path, "rb");
    if (!f)
        fail_msg("no file '%s'", path);
    char head[16] = "", end[16] = "";
    size_t n = fread(head, 1, strlen(magic), f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    if (tail && size > 16) {
        fseek(f, -16, SEEK_END);
        n = fread(end, 1, 16, f);
        end[n < 16 ? n : 15] = '\0';
    }
    fclose(f);
    if (strncmp(head, magic, strlen(magic)) != 0)
        fail_msg("'%s' starts with '%.8s', expected '%s'", path, head, magic);
    if (tail) {
        int found = 0;
        for (size_t i = 0; i + strlen(tail) <= 16 && !found; i++)
            found = memcmp(end + i, tail, strlen(tail)) == 0;
        if (!found)
            fail_msg("'%s' does not end with '%s'", path, tail);
    }
    return size;
}

/* A PNG's width, from its IHDR chunk. */
static unsigned png_width(const char *path) {
    unsigned char head[24];
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fread(head, 1, sizeof head, f), sizeof head);
    fclose(f);
    return (unsigned)head[16] << 24 | (unsigned)head[17] << 16 | (unsigned)head[18] << 8 | head[19];
}

/* Renders figure from the trained database with options, saving what
** gnuplot is given; returns plot_render's status. */
static int render_trained(const Fixture *fx, const char *figure, const char *file,
                          PlotOptions opt, char *program, size_t program_size, char *err) {
    char out[600];
    path_in(out, sizeof out, fx, file);
    if (program) {
        char name[128];
        snprintf(name, sizeof name, "%s.gnuplot", file);
        path_in(program, program_size, fx, name);
        opt.gnuplot_out = program;
    }
    opt.plots_dir = MOELAB_PLOTS_DIR;
    return plot_render(figure, fx->trained_db, out, &opt, err);
}

/* Every figure of PLOT_FIGURES: a PDF from every run of the trained
** database (the figure picks the runs that have its data), of a size that
** holds a drawing; one as PNG and one as SVG too. */
static void test_every_figure_renders(void **state) {
    Fixture *fx = *state;
    char figures[] = PLOT_FIGURES, *save = NULL;
    int count = 0;
    for (char *figure = strtok_r(figures, ",", &save); figure;
         figure = strtok_r(NULL, ",", &save)) {
        char file[96], out[600], err[ML_ERRLEN] = "";
        PlotOptions opt = PLOT_OPTIONS_INIT;
        snprintf(file, sizeof file, "every %s.pdf", figure);
        if (render_trained(fx, figure, file, opt, NULL, 0, err))
            fail_msg("%s: %s", figure, err);
        path_in(out, sizeof out, fx, file);
        long size = check_file(out, "%PDF-", "%%EOF");
        if (size < 4000)
            fail_msg("%s: a PDF of %ld bytes has hardly anything drawn", figure, size);
        count++;
    }
    assert_int_equal(count, 14);

    char out[600], err[ML_ERRLEN] = "";
    PlotOptions opt = PLOT_OPTIONS_INIT;
    assert_int_equal(render_trained(fx, "strata_flow", "strata_flow.png", opt, NULL, 0, err), 0);
    path_in(out, sizeof out, fx, "strata_flow.png");
    assert_true(check_file(out, "\x89PNG\r\n\x1a\n", NULL) > 20000);
    assert_int_equal(png_width(out), 990);        /* one panel: one column, 300 dpi */
    assert_int_equal(render_trained(fx, "sparse_curve", "sparse_curve.svg", opt, NULL, 0, err), 0);
    path_in(out, sizeof out, fx, "sparse_curve.svg");
    assert_true(check_file(out, "<?xml", "</svg>") > 4000);
    char *svg = read_file(out);
    assert_non_null(strstr(svg, ">moefy-kmeans: similarity, top-k<"));
    assert_non_null(strstr(svg, ">moefy-kmeans: learned, threshold<"));
    assert_non_null(strstr(svg, ">moefy-oracle: oracle, top-k<"));
    assert_non_null(strstr(svg, ">moefy-oracle: all experts (dense)<"));
    assert_non_null(strstr(svg, ">k=3<"));
    assert_non_null(strstr(svg, ">t=0.8<"));
    free(svg);
}

/* A run named for a figure whose data it lacks is refused, saying how to
** record it; with every run selected, such runs are left out. */
static void test_every_figure_names_missing_data(void **state) {
    Fixture *fx = *state;
    static const struct { const char *figure, *runs, *needle, *remedy; } cases[] = {
        {"loss_by_experts", "dense", "run 'dense' has no recorded per-token losses",
         "record = true"},
        {"load_over_training", "dense", "run 'dense' has no expert load recorded in training",
         "only MoE models"},
        {"dropped_vs_capacity", "dense", "run 'dense' has no recorded expert load",
         "only MoE models"},
        {"dropped_vs_capacity", "moefy-kmeans", "run 'moefy-kmeans' has no capacity factor",
         "capacity_factor"},
        {"sparsity", "dense", "run 'dense' has no recorded sparsity", "record = true"},
        {"cooccurrence", "dense", "run 'dense' has no recorded routing", "record = true"},
        {"byte_classes", "moefy-dense", "run 'moefy-dense' has no recorded routing",
         "record = true"},
        {"routing_stability", "top2", "run 'top2' has no routing probes",
         "probe = { every = N }"},
        {"strata_flow", "top2", "run 'top2' has no stratified layers", "kind = 'stratified'"},
        {"sparse_curve", "top2", "run 'top2' has no MoEfied model", "moelab.moefy"},
        {"placement", "dense", "run 'dense' has no recorded routing", "record = true"},
        {"loss_vs_flops", "moefy-oracle,dense", NULL, NULL},   /* both have evaluations */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char err[ML_ERRLEN] = "";
        PlotOptions opt = PLOT_OPTIONS_INIT;
        opt.runs = cases[i].runs;
        int rc = render_trained(fx, cases[i].figure, "missing.pdf", opt, NULL, 0, err);
        if (!cases[i].needle) {
            if (rc)
                fail_msg("%s: %s", cases[i].figure, err);
            continue;
        }
        if (rc == 0)
            fail_msg("%s of run '%s' was drawn", cases[i].figure, cases[i].runs);
        if (!strstr(err, cases[i].needle) || !strstr(err, cases[i].remedy))
            fail_msg("%s: '%s' does not say '%s' and '%s'", cases[i].figure, err,
                     cases[i].needle, cases[i].remedy);
    }
    /* every run of a database without any: the figure says none has it */
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "none.pdf");
    assert_int_equal(render("strata_flow", fx->moe_db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "no run in"));
    assert_non_null(strstr(err, "stratified layers"));
    assert_int_equal(render("routing_stability", fx->moe_db, out, NULL, MOELAB_PLOTS_DIR, err),
                     -1);
    assert_non_null(strstr(err, "routing probes"));
}

static void test_layer_and_size_options(void **state) {
    Fixture *fx = *state;
    char err[ML_ERRLEN] = "", out[600], program[600];
    PlotOptions opt = PLOT_OPTIONS_INIT;

    /* a layer the runs do not have, named and not */
    opt.layer = 5;
    opt.runs = "top2";
    assert_int_equal(render_trained(fx, "load_over_training", "x.pdf", opt, NULL, 0, err), -1);
    assert_non_null(strstr(err, "run 'top2' has no MoE layer 5"));
    assert_non_null(strstr(err, "its MoE layers: 0, 1"));
    opt.runs = NULL;
    assert_int_equal(render_trained(fx, "byte_classes", "x.pdf", opt, NULL, 0, err), -1);
    assert_non_null(strstr(err, "has MoE layer 5"));
    assert_int_equal(render_trained(fx, "routing_stability", "x.pdf", opt, NULL, 0, err), -1);
    assert_non_null(strstr(err, "MoE layer 5"));
    assert_int_equal(render_trained(fx, "strata_flow", "x.pdf", opt, NULL, 0, err), -1);
    assert_non_null(strstr(err, "MoE layer 5"));
    opt.layer = -1;
    assert_int_equal(render_trained(fx, "byte_classes", "x.pdf", opt, NULL, 0, err), -1);
    assert_non_null(strstr(err, "layer -1: layers are block numbers"));
    /* a figure that draws no single layer, or no pair */
    opt.layer = 1;
    assert_int_equal(render_trained(fx, "loss", "x.pdf", opt, NULL, 0, err), -1);
    assert_non_null(strstr(err, "figure 'loss' draws no single layer"));
    assert_non_null(strstr(err, "load_over_training"));
    opt.layer = PLOT_LAYER_UNSET;
    opt.layers[0] = 0;
    opt.layers[1] = 1;
    assert_int_equal(render_trained(fx, "byte_classes", "x.pdf", opt, NULL, 0, err), -1);
    assert_non_null(strstr(err, "draws no pair of layers: the layers option is for cooccurrence"));
    opt.layers[1] = 7;
    opt.runs = "threshold";
    assert_int_equal(render_trained(fx, "cooccurrence", "x.pdf", opt, NULL, 0, err), -1);
    assert_non_null(strstr(err, "run 'threshold' has no MoE layer 7"));
    opt.layers[0] = opt.layers[1] = PLOT_LAYER_UNSET;
    opt.runs = NULL;
    opt.size = "A4";
    assert_int_equal(render_trained(fx, "loss", "x.pdf", opt, NULL, 0, err), -1);
    assert_non_null(strstr(err, "unknown size 'A4': use single (one column, 3.3 in wide) or "
                                "double (two columns, 7 in)"));
    path_in(out, sizeof out, fx, "x.pdf");
    assert_int_not_equal(access(out, F_OK), 0);

    /* the layer asked for is the one drawn */
    opt.size = NULL;
    opt.layer = 1;
    opt.runs = "top2";
    assert_int_equal(render_trained(fx, "load_over_training", "layer1.pdf", opt, program,
                                    sizeof program, err), 0);
    char *text = read_file(program);
    assert_non_null(strstr(text, "panel_layer[1] = 1\n"));
    free(text);

    /* pages: one column by default, two for panels of several runs, as asked */
    static const struct { const char *figure, *runs, *size; unsigned width; } pages[] = {
        {"loss", NULL, NULL, 990},
        {"loss", NULL, "double", 2100},
        {"expert_load", NULL, NULL, 2100},
        {"expert_load", "top2", NULL, 990},
        {"expert_load", "top2,threshold", "single", 990},
        {"placement", "top2", NULL, 2100},       /* two plots side by side */
        {"placement", "top2", "single", 990},
    };
    for (size_t i = 0; i < sizeof pages / sizeof *pages; i++) {
        PlotOptions o = PLOT_OPTIONS_INIT;
        o.runs = pages[i].runs;
        o.size = pages[i].size;
        if (render_trained(fx, pages[i].figure, "page.png", o, NULL, 0, err))
            fail_msg("%s: %s", pages[i].figure, err);
        path_in(out, sizeof out, fx, "page.png");
        if (png_width(out) != pages[i].width)
            fail_msg("%s (runs %s, size %s): %u pixels wide, expected %u", pages[i].figure,
                     pages[i].runs ? pages[i].runs : "all", pages[i].size ? pages[i].size : "-",
                     png_width(out), pages[i].width);
    }
}

/* The value of "name = N" in a gnuplot program, or of "name[i] = N". */
static double program_value(const char *program, const char *name) {
    char needle[96];
    snprintf(needle, sizeof needle, "\n%s = ", name);
    const char *at = strstr(program, needle);
    if (!at)
        fail_msg("no '%s' in the program", name);
    return strtod(at + strlen(needle), NULL);
}

/* A datablock's rows: rows[index][row][column], as numbers (NaN for text). */
typedef struct {
    int blocks, rows[64], columns[64][256];
    double v[64][256][6];
} Block;

static void read_block(const char *program, const char *name, Block *b) {
    char needle[64];
    snprintf(needle, sizeof needle, "%s << EOD\n", name);
    const char *at = strstr(program, needle);
    if (!at)
        fail_msg("no datablock %s", name);
    at += strlen(needle);
    memset(b, 0, sizeof *b);
    int blank = 0;
    b->blocks = 1;
    while (strncmp(at, "EOD\n", 4) != 0) {
        const char *end = strchr(at, '\n');
        assert_non_null(end);
        if (end == at) {
            if (++blank == 2 && b->blocks < 64)
                b->blocks++;
        } else {
            blank = 0;
            int i = b->blocks - 1, r = b->rows[i];
            if (r < 256) {
                const char *c = at;
                int col = 0;
                while (c < end && col < 6) {
                    char *next;
                    double x = strtod(c, &next);
                    if (next == c) {             /* text: up to the next space */
                        x = NAN;
                        next = (char *)c + strcspn(c, " \n");
                        if (*c == '"')
                            next = strchr((char *)c + 1, '"') + 1;
                    }
                    b->v[i][r][col++] = x;
                    c = next + strspn(next, " ");
                }
                b->columns[i][r] = col;
                b->rows[i]++;
            }
        }
        at = end + 1;
    }
}

static double sql_double(sqlite3 *db, const char *sql) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
        fail_msg("SQL: %s: %s", sqlite3_errmsg(db), sql);
    double x = NAN;
    if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
        x = sqlite3_column_double(st, 0);
    sqlite3_finalize(st);
    return x;
}

#define ASSERT_NEAR(a, b, tol) do {                                             \
        double a_ = (a), b_ = (b);                                              \
        if (!(fabs(a_ - b_) <= (tol)))                                          \
            fail_msg("%s = %.9g, expected %s = %.9g", #a, a_, #b, b_);          \
    } while (0)

/* The numbers gnuplot is given, against the same computed with SQL. */
static void test_figure_data_agrees_with_sql(void **state) {
    Fixture *fx = *state;
    char err[ML_ERRLEN] = "", program[600], sql[1024];
    sqlite3 *db = NULL;
    Block *b = malloc(sizeof *b);
    assert_non_null(b);
    assert_int_equal(sqlite3_open_v2(fx->trained_db, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    PlotOptions opt = PLOT_OPTIONS_INIT;

    /* loss_vs_flops: the sweep's design at capacity factor 1 is the mean and
    ** sample std over its two seeds; the dense model sits at its FFN FLOPs,
    ** 2 layers x 2 x 2 x 16 x 32 */
    opt.runs = "dense,sweep/moe.router.capacity_factor=1/seed=1,"
               "sweep/moe.router.capacity_factor=1/seed=2";
    assert_int_equal(render_trained(fx, "loss_vs_flops", "lvf.pdf", opt, program,
                                    sizeof program, err), 0);
    char *text = read_file(program);
    read_block(text, "$designs", b);
    assert_int_equal(b->blocks, 2);
    ASSERT_NEAR(b->v[0][0][0], 4096.0, 1e-6);
    assert_int_equal((int)b->v[1][0][4], 2);
    const char *latest = "(SELECT loss FROM evals e WHERE e.run_id = r.run_id AND split = 'val'"
                         " AND router IS NULL ORDER BY step DESC, eval_id DESC LIMIT 1)";
    snprintf(sql, sizeof sql, "SELECT avg(x) FROM (SELECT %s AS x FROM runs r WHERE name LIKE"
             " 'sweep/moe.router.capacity_factor=1/seed=%%')", latest);
    double mean = sql_double(db, sql);
    ASSERT_NEAR(b->v[1][0][1], mean, 1e-6);
    snprintf(sql, sizeof sql, "SELECT sqrt(sum((x - %.17g) * (x - %.17g)) / (count(*) - 1)) FROM"
             " (SELECT %s AS x FROM runs r WHERE name LIKE"
             " 'sweep/moe.router.capacity_factor=1/seed=%%')", mean, mean, latest);
    ASSERT_NEAR(b->v[1][0][3], sql_double(db, sql), 1e-6);
    assert_true(b->v[1][0][3] > 0);    /* two seeds: not the same loss */
    /* both seeds of a design have its colour, whichever runs are drawn */
    assert_true(program_value(text, "run_design[2]") == program_value(text, "run_design[3]"));
    double sweep_color = program_value(text, "run_design[2]");
    free(text);
    /* the same runs by a pattern, as `moelab report --runs` reads one */
    opt.runs = "dense,sweep/moe.router.capacity_factor=1/*";
    assert_int_equal(render_trained(fx, "loss_vs_flops", "lvf2.pdf", opt, program,
                                    sizeof program, err), 0);
    text = read_file(program);
    read_block(text, "$designs", b);
    assert_int_equal(b->blocks, 2);
    assert_int_equal((int)b->v[1][0][4], 2);
    ASSERT_NEAR(b->v[1][0][1], mean, 1e-6);
    free(text);
    opt.runs = "sweep/nothing*";
    assert_int_equal(render_trained(fx, "loss", "none.pdf", opt, program, sizeof program, err), -1);
    assert_non_null(strstr(err, "no run matches 'sweep/nothing*'"));
    opt.runs = "sweep/moe.router.capacity_factor=1/seed=2";
    assert_int_equal(render_trained(fx, "loss", "loss.pdf", opt, program, sizeof program, err), 0);
    text = read_file(program);
    assert_true(program_value(text, "run_design[1]") == sweep_color);
    assert_true(sweep_color == 6);     /* dense, top2, threshold, stratified, probe, sweep */
    free(text);

    /* dropped_vs_capacity: each run's training drops, as v_dropped_fraction
    ** sums them; top-2 runs in one series */
    opt.runs = "top2,sweep/moe.router.capacity_factor=1/seed=1,"
               "sweep/moe.router.capacity_factor=2/seed=1";
    assert_int_equal(render_trained(fx, "dropped_vs_capacity", "dvc.pdf", opt, program,
                                    sizeof program, err), 0);
    text = read_file(program);
    read_block(text, "$train", b);
    assert_int_equal(b->blocks, 1);
    assert_int_equal(b->rows[0], 3);
    static const char *const dropped_runs[] = {"top2", "sweep/moe.router.capacity_factor=1/seed=1",
                                               "sweep/moe.router.capacity_factor=2/seed=1"};
    for (int i = 0; i < 3; i++) {
        snprintf(sql, sizeof sql, "SELECT 1.0 * sum(dropped) / sum(tokens + dropped) FROM"
                 " expert_load WHERE eval_id IS NULL AND run_id = (SELECT max(run_id) FROM runs"
                 " WHERE name = '%s')", dropped_runs[i]);
        ASSERT_NEAR(b->v[0][i][1], sql_double(db, sql), 1e-5);
    }
    assert_true(b->v[0][0][1] > 0);    /* capacity factor 1 drops */
    free(text);

    /* strata_flow: pass 0 sees every token; its first choices by stratum */
    opt.runs = NULL;
    assert_int_equal(render_trained(fx, "strata_flow", "sf.pdf", opt, program, sizeof program,
                                    err), 0);
    text = read_file(program);
    read_block(text, "$cells", b);
    assert_int_equal(b->rows[0], 4);    /* 2 passes x 2 strata */
    const char *strat_eval = "(SELECT max(eval_id) FROM evals WHERE run_id = (SELECT run_id FROM"
                             " runs WHERE name = 'stratified') AND routing_first IS NOT NULL)";
    snprintf(sql, sizeof sql, "SELECT 1.0 * count(*) / (2 * (SELECT count(*) FROM token_stats"
             " WHERE eval_id = %s)) FROM routing WHERE eval_id = %s AND rank = 0 AND pass = 0"
             " AND expert >= 2", strat_eval, strat_eval);
    ASSERT_NEAR(b->v[0][1][2], sql_double(db, sql), 1e-5);   /* pass 0, stratum 1 */
    ASSERT_NEAR(b->v[0][0][2] + b->v[0][1][2], 1.0, 1e-5);
    assert_true(isnan(b->v[0][2][2]));                        /* pass 1 sees no stratum 0 */
    snprintf(sql, sizeof sql, "SELECT 1.0 * count(*) / (2 * (SELECT count(*) FROM token_stats"
             " WHERE eval_id = %s)) FROM routing WHERE eval_id = %s AND rank = 0 AND pass = 1",
             strat_eval, strat_eval);
    ASSERT_NEAR(b->v[0][3][2], sql_double(db, sql), 1e-5);
    free(text);

    /* cooccurrence: each row is a share of layer 0's first choices */
    opt.runs = "top2,threshold,stratified,probe";
    assert_int_equal(render_trained(fx, "cooccurrence", "co.pdf", opt, program, sizeof program,
                                    err), 0);
    text = read_file(program);
    read_block(text, "$cells", b);
    assert_int_equal(b->blocks, 4);
    for (int i = 0; i < b->blocks; i++) {
        assert_int_equal(b->rows[i], 16);
        for (int r = 0; r < 16; r += 4) {
            double row = 0;
            for (int c = 0; c < 4; c++)
                row += b->v[i][r + c][2];
            if (!isnan(row))
                ASSERT_NEAR(row, 1.0, 1e-5);
        }
    }
    free(text);

    /* routing_stability: the view's numbers, a series per layer */
    opt.runs = "probe";
    assert_int_equal(render_trained(fx, "routing_stability", "rs.pdf", opt, program,
                                     sizeof program, err), 0);
    text = read_file(program);
    read_block(text, "$changed", b);
    assert_int_equal(b->blocks, 2);
    for (int l = 0; l < 2; l++) {
        snprintf(sql, sizeof sql, "SELECT count(*) FROM v_routing_stability WHERE layer = %d"
                 " AND run_id = (SELECT run_id FROM runs WHERE name = 'probe')", l);
        assert_int_equal(b->rows[l], (int)sql_double(db, sql));
        for (int r = 0; r < b->rows[l]; r++) {
            snprintf(sql, sizeof sql, "SELECT changed FROM v_routing_stability WHERE layer = %d"
                     " AND step = %d AND run_id = (SELECT run_id FROM runs WHERE name = 'probe')",
                     l, (int)b->v[l][r][0]);
            ASSERT_NEAR(b->v[l][r][1], sql_double(db, sql), 1e-6);
        }
    }
    free(text);

    /* sparse_curve: a point per evaluation, share = experts per token / 4 */
    opt.runs = "moefy-kmeans";
    assert_int_equal(render_trained(fx, "sparse_curve", "sc.pdf", opt, program, sizeof program,
                                    err), 0);
    text = read_file(program);
    read_block(text, "$curves", b);
    assert_int_equal((int)program_value(text, "ncurves"), 3);  /* learned thr., similarity thr., top-k */
    int points = 0;
    for (int i = 0; i < b->blocks; i++)
        for (int r = 0; r < b->rows[i]; r++) {
            snprintf(sql, sizeof sql, "SELECT count(*) FROM evals WHERE abs(experts_per_token / 4"
                     " - %.17g) < 1e-6 AND abs(loss - %.17g) < 1e-6 AND run_id = (SELECT run_id"
                     " FROM runs WHERE name = 'moefy-kmeans')", b->v[i][r][0], b->v[i][r][1]);
            assert_true(sql_double(db, sql) >= 1);
            points++;
        }
    assert_int_equal(points, 7);       /* its own top-2, k 1 and 3, two thresholds x 2 */
    free(text);

    /* byte_classes: the share of letters that expert 0 of layer 0 processed */
    opt.runs = "top2";
    assert_int_equal(render_trained(fx, "byte_classes", "bc.pdf", opt, program, sizeof program,
                                    err), 0);
    text = read_file(program);
    read_block(text, "$cells", b);
    const char *top2_eval = "(SELECT max(eval_id) FROM evals WHERE run_id = (SELECT run_id FROM"
                            " runs WHERE name = 'top2') AND routing_first IS NOT NULL)";
    const char *letter = "((token BETWEEN 65 AND 90) OR (token BETWEEN 97 AND 122))";
    snprintf(sql, sizeof sql, "SELECT 1.0 * (SELECT count(DISTINCT seq * 100000 + pos) FROM"
             " routing WHERE eval_id = %s AND layer = 0 AND expert = 0 AND %s) / (SELECT count(*)"
             " FROM token_stats WHERE eval_id = %s AND %s)", top2_eval, letter, top2_eval, letter);
    ASSERT_NEAR(b->v[0][0][2], sql_double(db, sql), 1e-5);
    free(text);

    /* load_over_training: each group of steps shares out its layer's load */
    assert_int_equal(render_trained(fx, "load_over_training", "lot.pdf", opt, program,
                                    sizeof program, err), 0);
    text = read_file(program);
    read_block(text, "$cells", b);
    assert_int_equal(b->rows[0], 30 * 4);
    for (int r = 0; r < b->rows[0]; r += 4)
        ASSERT_NEAR(b->v[0][r][2] + b->v[0][r + 1][2] + b->v[0][r + 2][2] + b->v[0][r + 3][2],
                    1.0, 1e-5);
    free(text);

    /* loss_by_experts: the tokens' shares add up; each bin's mean loss */
    opt.runs = "threshold";
    assert_int_equal(render_trained(fx, "loss_by_experts", "lbe.pdf", opt, program,
                                    sizeof program, err), 0);
    text = read_file(program);
    read_block(text, "$bins", b);
    const char *thr_eval = "(SELECT max(eval_id) FROM evals WHERE run_id = (SELECT run_id FROM"
                           " runs WHERE name = 'threshold') AND routing_first IS NOT NULL)";
    double shares = 0;
    for (int r = 0; r < b->rows[0]; r++) {
        shares += b->v[0][r][3];
        snprintf(sql, sizeof sql, "SELECT avg(loss) FROM token_stats WHERE eval_id = %s AND"
                 " experts = %d", thr_eval, (int)lround(b->v[0][r][0] * 2));
        ASSERT_NEAR(b->v[0][r][1], sql_double(db, sql), 1e-5);
    }
    ASSERT_NEAR(shares, 1.0, 1e-5);
    free(text);

    /* placement: a series per run and policy, P = 2 ... 1024 by rows. The
    ** round-robin volume (experts on e mod P; the layer's N tokens in (seq,
    ** pos) order at home on i P / N; a token sent once to each other device
    ** holding its experts, 16 floats each way) and, with one expert a
    ** device, the most loaded device against the mean, from SQL. */
    opt.runs = "top2,threshold";
    assert_int_equal(render_trained(fx, "placement", "pl.pdf", opt, program, sizeof program,
                                    err), 0);
    text = read_file(program);
    read_block(text, "$placement", b);
    assert_int_equal((int)program_value(text, "npolicies"), 4);
    assert_non_null(strstr(text, "\npolicy_name[2] = 'round_robin'\n"));
    assert_int_equal(b->blocks, 2 * 4);
    static const char *const placement_runs[] = {"top2", "threshold"};
    for (int i = 0; i < 2; i++) {
        char eval[160];
        snprintf(eval, sizeof eval, "(SELECT max(eval_id) FROM evals WHERE run_id = (SELECT"
                 " run_id FROM runs WHERE name = '%s') AND routing_first IS NOT NULL)",
                 placement_runs[i]);
        for (int s = 0; s < 4; s++) {
            assert_int_equal(b->rows[i * 4 + s], 10);
            for (int r = 0; r < 10; r++)
                ASSERT_NEAR(b->v[i * 4 + s][r][0], (double)(2 << r), 0);
        }
        for (int r = 0; r < 10; r++) {
            int P = 2 << r;
            snprintf(sql, sizeof sql,
                     "WITH t AS (SELECT layer, expert, DENSE_RANK() OVER (PARTITION BY layer"
                     " ORDER BY seq, pos) - 1 AS i FROM routing WHERE eval_id = %s),"
                     " u AS (SELECT layer, max(i) + 1 AS n FROM t GROUP BY layer)"
                     " SELECT count(*) * 2 * 4 * 16 / 1e6 FROM (SELECT DISTINCT layer, i,"
                     " expert %% %d AS d, i * %d / n AS home FROM t JOIN u USING (layer))"
                     " WHERE d <> home",
                     eval, P, P);
            double mb = sql_double(db, sql);
            assert_true(mb > 0);
            ASSERT_NEAR(b->v[i * 4 + 1][r][1], mb, 1e-5 * mb);
        }
        snprintf(sql, sizeof sql, "SELECT max(1024.0 * m / n) FROM (SELECT max(c) AS m, sum(c)"
                 " AS n FROM (SELECT layer, count(*) AS c FROM routing WHERE eval_id = %s"
                 " GROUP BY layer, expert) GROUP BY layer)", eval);
        double imbalance = sql_double(db, sql);
        for (int s = 0; s < 4; s++)
            ASSERT_NEAR(b->v[i * 4 + s][9][3], imbalance, 1e-5 * imbalance);
    }
    free(text);

    sqlite3_close(db);
    free(b);
}

/* A database of its own, made by record_moe_run for each name; db is its
** path in the fixture's folder. */
static void make_moe_db(const Fixture *fx, const char *file, const char *const *names,
                        const double *val_losses, int n, char *db, size_t size) {
    char err[ML_ERRLEN] = "";
    Recorder *r = NULL;
    path_in(db, size, fx, file);
    remove(db);
    if (rec_open(&r, db, err))
        fail_msg("%s", err);
    for (int i = 0; i < n; i++)
        if (record_moe_run(r, names[i], 0, 8, val_losses[i], 1.31e5, err))
            fail_msg("%s", err);
    if (rec_flush(r, err))
        fail_msg("%s", err);
    rec_close(r);
}

/* sparsity: an expert that ran no token in the evaluation has no share of
** near-zero activations; its cell is NaN (blank), not 0 (all active). */
static void test_sparsity_leaves_idle_experts_blank(void **state) {
    Fixture *fx = *state;
    char db_path[512], out[600], program[600], err[ML_ERRLEN] = "";
    static const char *const names[] = {"top2"};
    static const double losses[] = {1.62};
    make_moe_db(fx, "idle_expert.db", names, losses, 1, db_path, sizeof db_path);
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(db_path, &db), SQLITE_OK);
    /* layers 1 and 3 of 8 experts, a tenth near zero; expert 5 of layer 3 idle */
    assert_int_equal(sqlite3_exec(db,
                                  "WITH RECURSIVE e(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM e"
                                  " WHERE x < 7) INSERT INTO sparsity (run_id, eval_id, layer,"
                                  " expert, activations, near_zero, mean_abs) SELECT ev.run_id,"
                                  " ev.eval_id, l.layer, e.x, CASE WHEN l.layer = 3 AND e.x = 5"
                                  " THEN 0 ELSE 100 END, CASE WHEN l.layer = 3 AND e.x = 5 THEN 0"
                                  " ELSE 10 END, 0.5 FROM evals ev, e, (SELECT 1 AS layer UNION"
                                  " ALL SELECT 3) l",
                                  NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
    PlotOptions opt = PLOT_OPTIONS_INIT;
    path_in(out, sizeof out, fx, "idle_expert.pdf");
    path_in(program, sizeof program, fx, "idle_expert.gnuplot");
    opt.plots_dir = MOELAB_PLOTS_DIR;
    opt.gnuplot_out = program;
    if (plot_render("sparsity", db_path, out, &opt, err))
        fail_msg("%s", err);
    char *text = read_file(program);
    Block *b = malloc(sizeof *b);
    assert_non_null(b);
    read_block(text, "$cells", b);
    assert_int_equal(b->blocks, 1);
    assert_int_equal(b->rows[0], 2 * 8);
    for (int r = 0; r < 16; r++) {
        int expert = (int)b->v[0][r][0], layer = (int)b->v[0][r][3];
        if (layer == 3 && expert == 5)
            assert_true(isnan(b->v[0][r][2]));
        else
            ASSERT_NEAR(b->v[0][r][2], 0.1, 1e-9);
    }
    ASSERT_NEAR(program_value(text, "value_max"), 0.1, 1e-9);
    free(b);
    free(text);
}

/* loss_vs_flops: a seed run again (a sweep runs a failed or interrupted
** seed anew under its name) is still one seed of its design: the latest
** run of each name counts, as `moelab report` takes it; with every run drawn
** the design has two seeds, not three, and the earlier run's loss is no
** part of the mean. */
static void test_loss_vs_flops_counts_a_name_once(void **state) {
    Fixture *fx = *state;
    char db_path[512], out[600], program[600], err[ML_ERRLEN] = "";
    static const char *const names[] = {"s/seed=1", "s/seed=2", "s/seed=1"};
    static const double losses[] = {3.5, 1.7, 1.6};
    make_moe_db(fx, "rerun.db", names, losses, 3, db_path, sizeof db_path);
    PlotOptions opt = PLOT_OPTIONS_INIT;
    path_in(out, sizeof out, fx, "rerun.pdf");
    path_in(program, sizeof program, fx, "rerun.gnuplot");
    opt.plots_dir = MOELAB_PLOTS_DIR;
    opt.gnuplot_out = program;
    if (plot_render("loss_vs_flops", db_path, out, &opt, err))
        fail_msg("%s", err);
    char *text = read_file(program);
    Block *b = malloc(sizeof *b);
    assert_non_null(b);
    read_block(text, "$designs", b);
    assert_int_equal(b->blocks, 1);
    assert_int_equal((int)b->v[0][0][4], 2);
    ASSERT_NEAR(b->v[0][0][1], 1.65, 1e-6);                   /* mean of 1.6 and 1.7 */
    ASSERT_NEAR(b->v[0][0][3], sqrt(0.005), 1e-6);            /* their sample std */
    assert_non_null(strstr(text, "\ndesign_title[1] = 's (2 seeds)'\n"));
    free(b);
    free(text);
}

/* loss: a model never trained (a converted one, evaluated at step 0) has
** no loss past 0 tokens; named, it is refused with how to get one, and
** when no run has any the figure says so (gnuplot failed on its empty
** axis with "undefined value"). */
static void test_loss_refuses_runs_never_trained(void **state) {
    Fixture *fx = *state;
    char db[512], out[600], err[ML_ERRLEN] = "";
    Recorder *r = NULL;
    int64_t run = 0;
    path_in(db, sizeof db, fx, "untrained.db");
    path_in(out, sizeof out, fx, "untrained.pdf");
    if (rec_open(&r, db, err)
        || rec_run_begin(r, "converted", "test", "{}", 1, 1000, 500, 1, &run, err)
        || rec_metric(r, run, 0, "val", 2.5, NAN, NAN, 0, NAN, NAN, NAN, NULL, err)
        || rec_run_status(r, run, "finished", NULL, err) || rec_flush(r, err))
        fail_msg("%s", err);
    rec_close(r);
    assert_int_equal(render("loss", db, out, "converted", MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "run 'converted' has no training"));
    assert_non_null(strstr(err, "run:train{}"));
    assert_int_equal(render("loss", db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "has training"));
    assert_null(strstr(err, "gnuplot"));
    assert_int_not_equal(access(out, F_OK), 0);
}

/* ---- figures that cannot be made -------------------------------------- */

static void test_moe_figures_name_the_missing_data(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "missing.pdf");
    assert_int_equal(render("expert_load", fx->moe_db, out, "top2,ffn", MOELAB_PLOTS_DIR,
                                 err), -1);
    assert_non_null(strstr(err, "run 'ffn' has no recorded expert load"));
    assert_int_equal(render("experts_per_token", fx->moe_db, out, "ffn", MOELAB_PLOTS_DIR,
                                 err), -1);
    assert_non_null(strstr(err, "run 'ffn' has no recorded routing: evaluate it with record = true"));
    /* the loss-only database: nothing to draw, every run looked at */
    assert_int_equal(render("expert_load", fx->db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "has recorded expert load"));
    assert_int_equal(render("experts_per_token", fx->db, out, NULL, MOELAB_PLOTS_DIR, err),
                     -1);
    assert_non_null(strstr(err, "record = true"));
    assert_int_equal(render("loss_vs_flops", fx->db, out, "top2", MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "run 'top2' has no validation evaluation"));
    assert_int_equal(render("loss_vs_flops", fx->empty_db, out, NULL, MOELAB_PLOTS_DIR, err),
                     -1);
    assert_non_null(strstr(err, "validation evaluation"));
    assert_int_not_equal(access(out, F_OK), 0);
}


static void test_unknown_figure_lists_known_ones(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "x.pdf");
    assert_int_equal(render("lossy", fx->db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "unknown figure 'lossy'"));
    assert_non_null(strstr(err, PLOT_FIGURES));
    assert_int_equal(render(NULL, fx->db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
}

static void test_bad_extension_is_refused(void **state) {
    Fixture *fx = *state;
    static const char *names[] = {"x.jpg", "x", "x.pdf.txt", "dir.pdf/x"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char out[600], err[ML_ERRLEN] = "";
        path_in(out, sizeof out, fx, names[i]);
        assert_int_equal(render("loss", fx->db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
        assert_non_null(strstr(err, ".pdf, .png or .svg"));
        assert_int_not_equal(access(out, F_OK), 0);
    }
}

static void test_unknown_run_is_named(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "x.pdf");
    assert_int_equal(render("loss", fx->db, out, "top2,top3", MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "'top3'"));
    assert_non_null(strstr(err, "top2, dense_ffn"));   /* what there is */
}

static void test_no_metrics_is_a_clear_error(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "x.pdf");
    assert_int_equal(render("loss", fx->empty_db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "no train or val loss"));
    assert_non_null(strstr(err, "idle"));
    char missing[600];
    path_in(missing, sizeof missing, fx, "missing.db");
    assert_int_equal(render("loss", missing, out, NULL, MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, missing));
}

static void test_line_breaks_are_refused(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "two\nlines.pdf");
    assert_int_equal(render("loss", fx->db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "line break"));
    path_in(out, sizeof out, fx, "x.pdf");
    assert_int_equal(render("loss", fx->db, out, "top2\n", MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "line break"));
}

static void test_gnuplot_error_reaches_the_caller(void **state) {
    Fixture *fx = *state;
    char dir[600], script[700], out[600], err[ML_ERRLEN] = "";
    path_in(dir, sizeof dir, fx, "broken plots");
    assert_int_equal(mkdir(dir, 0755), 0);
    snprintf(script, sizeof script, "%s/loss.gp", dir);
    FILE *f = fopen(script, "w");
    assert_non_null(f);
    fputs("set xlabel 'x'\nplot $train index 0 using 1:(no_such_function($2))\n", f);
    fclose(f);
    snprintf(script, sizeof script, "%s/style.gp", dir);
    f = fopen(script, "w");
    assert_non_null(f);
    fclose(f);
    path_in(out, sizeof out, fx, "broken.png");
    assert_int_equal(render("loss", fx->db, out, NULL, dir, err), -1);
    assert_non_null(strstr(err, "gnuplot failed"));
    assert_non_null(strstr(err, "no_such_function"));

    path_in(dir, sizeof dir, fx, "no plots here");
    assert_int_equal(render("loss", fx->db, out, NULL, dir, err), -1);
    assert_non_null(strstr(err, "loss.gp"));

    path_in(out, sizeof out, fx, "no such dir/x.pdf");
    assert_int_equal(render("loss", fx->db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "gnuplot"));
}

static void test_missing_gnuplot_says_how_to_install(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "", empty[600];
    path_in(empty, sizeof empty, fx, "empty bin");
    assert_int_equal(mkdir(empty, 0755), 0);
    char *saved = strdup(getenv("PATH") ? getenv("PATH") : "/usr/bin:/bin");
    assert_non_null(saved);
    setenv("PATH", empty, 1);
    path_in(out, sizeof out, fx, "x.pdf");
    int rc = render("loss", fx->db, out, NULL, MOELAB_PLOTS_DIR, err);
    setenv("PATH", saved, 1);
    free(saved);
    assert_int_equal(rc, -1);
    assert_non_null(strstr(err, "gnuplot not found; install gnuplot-nox"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_loss_renders_pdf_png_and_svg),
        cmocka_unit_test(test_loss_renders_selected_runs),
        cmocka_unit_test(test_pipe_like_path_is_a_file),
        cmocka_unit_test(test_moe_figures_render_pdf_png_and_svg),
        cmocka_unit_test(test_expert_load_panels),
        cmocka_unit_test(test_experts_per_token_legend_has_means),
        cmocka_unit_test(test_loss_vs_flops_places_dense_runs_at_zero),
        cmocka_unit_test(test_moe_figures_name_the_missing_data),
        cmocka_unit_test(test_every_figure_renders),
        cmocka_unit_test(test_every_figure_names_missing_data),
        cmocka_unit_test(test_layer_and_size_options),
        cmocka_unit_test(test_figure_data_agrees_with_sql),
        cmocka_unit_test(test_sparsity_leaves_idle_experts_blank),
        cmocka_unit_test(test_loss_vs_flops_counts_a_name_once),
        cmocka_unit_test(test_loss_refuses_runs_never_trained),
        cmocka_unit_test(test_unknown_figure_lists_known_ones),
        cmocka_unit_test(test_bad_extension_is_refused),
        cmocka_unit_test(test_unknown_run_is_named),
        cmocka_unit_test(test_no_metrics_is_a_clear_error),
        cmocka_unit_test(test_line_breaks_are_refused),
        cmocka_unit_test(test_gnuplot_error_reaches_the_caller),
        cmocka_unit_test(test_missing_gnuplot_says_how_to_install),
    };
    return cmocka_run_group_tests(tests, setup_fixture, teardown_fixture);
}
