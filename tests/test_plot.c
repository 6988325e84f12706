/*
** test_plot.c — checks figure rendering (src/plot.c and the scripts in plots/) end to end:
** a database of two runs becomes real PDF, PNG and SVG files through
** gnuplot, in a directory whose name has a space and a quote; so does one of
** MoE runs (and a dense one) recorded through the recorder's API, for
** expert_load, experts_per_token and loss_vs_flops; bad figures,
** extensions, run names and paths get messages naming them; a gnuplot error
** and a missing gnuplot reach the caller as text.
**
** Build: gcc -std=c11 -D_GNU_SOURCE -Isrc -DMOELAB_PLOTS_DIR="\"$PWD/plots\""
**        tests/test_plot.c src/plot.c src/recorder.c src/common.c
**        -lsqlite3 -lcmocka -lm
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
} Fixture;

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
        if (rec_metric(r, run, step, "train", loss, 0.01, 1e-3, step * 1024, NAN, 5, NULL, err))
            return -1;
        if (step % 50 == 0
            && rec_metric(r, run, step, "val", loss + 0.05, NAN, 1e-3, step * 1024, NAN, NAN, NULL, err))
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
                       step * 1024, experts ? flops : NAN, 5, experts ? &aux : NULL, err))
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
        || rec_metric(r, run, STEPS, "val", val_loss, NAN, NAN, STEPS * 1024, flops, 5, NULL,
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
        if (plot_render("loss", fx->db, out, NULL, MOELAB_PLOTS_DIR, err))
            fail_msg("plot_render(%s): %s", outputs[i].file, err);
        assert_file_starts_with(out, outputs[i].magic, outputs[i].alt);
    }
    /* Both runs are in the legend, train and val. */
    char svg[600], line[4096];
    int seen = 0;
    path_in(svg, sizeof svg, fx, "loss 'figure'.svg");
    FILE *f = fopen(svg, "r");
    assert_non_null(f);
    while (fgets(line, sizeof line, f)) {
        seen |= strstr(line, ">top2 train<") ? 1 : 0;
        seen |= strstr(line, ">top2 val<") ? 2 : 0;
        seen |= strstr(line, ">dense_ffn train<") ? 4 : 0;
        seen |= strstr(line, ">dense_ffn val<") ? 8 : 0;
    }
    fclose(f);
    assert_int_equal(seen, 15);
}

static void test_loss_renders_selected_runs(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "selected.svg");
    assert_int_equal(plot_render("loss", fx->db, out, " dense_ffn ", MOELAB_PLOTS_DIR, err), 0);
    assert_file_starts_with(out, "<?xml", "<svg");
    FILE *f = fopen(out, "r");
    char line[4096];
    int top2 = 0, dense = 0;
    while (f && fgets(line, sizeof line, f)) {
        top2 |= strstr(line, ">top2 ") != NULL;
        dense |= strstr(line, ">dense_ffn train<") != NULL;
    }
    if (f)
        fclose(f);
    assert_false(top2);
    assert_true(dense);
    assert_int_equal(plot_render("loss", fx->db, out, "top2,dense_ffn", MOELAB_PLOTS_DIR, err), 0);
}

/* A relative output path starting with '|' is a file, not a shell pipe. */
static void test_pipe_like_path_is_a_file(void **state) {
    Fixture *fx = *state;
    char cwd[1024], err[ML_ERRLEN] = "";
    assert_non_null(getcwd(cwd, sizeof cwd));
    assert_int_equal(chdir(fx->dir), 0);
    int rc = plot_render("loss", "runs.db", "|touch pwned.png", NULL, MOELAB_PLOTS_DIR, err);
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
            if (plot_render(figures[f], fx->moe_db, out, NULL, MOELAB_PLOTS_DIR, err))
                fail_msg("plot_render(%s): %s", name, err);
            assert_file_starts_with(out, formats[k].magic, formats[k].alt);
        }
}

/* Titles name the run and what was summed; the dense run has no panel. */
static void test_expert_load_panels(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "expert_load.svg");
    assert_int_equal(plot_render("expert_load", fx->moe_db, out, NULL, MOELAB_PLOTS_DIR, err), 0);
    char *svg = read_file(out);
    assert_non_null(strstr(svg, ">top2, evaluation at step 20<"));
    assert_non_null(strstr(svg, ">threshold, evaluation at step 20<"));
    assert_non_null(strstr(svg, ">share of assignments<"));
    assert_null(strstr(svg, "ffn"));
    free(svg);
}

static void test_experts_per_token_legend_has_means(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "experts_per_token.svg");
    assert_int_equal(plot_render("experts_per_token", fx->moe_db, out, "threshold, top2",
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
    assert_int_equal(plot_render("loss_vs_flops", fx->moe_db, out, NULL, MOELAB_PLOTS_DIR, err),
                     0);
    char *svg = read_file(out);
    assert_non_null(strstr(svg, ">ffn (dense)<"));
    assert_non_null(strstr(svg, ">top2<"));
    assert_non_null(strstr(svg, ">threshold<"));
    free(svg);
}

/* ---- figures that cannot be made -------------------------------------- */

static void test_moe_figures_name_the_missing_data(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "missing.pdf");
    assert_int_equal(plot_render("expert_load", fx->moe_db, out, "top2,ffn", MOELAB_PLOTS_DIR,
                                 err), -1);
    assert_non_null(strstr(err, "run 'ffn' has no recorded expert load"));
    assert_int_equal(plot_render("experts_per_token", fx->moe_db, out, "ffn", MOELAB_PLOTS_DIR,
                                 err), -1);
    assert_non_null(strstr(err, "run 'ffn' has no recorded routing: evaluate it with record = true"));
    /* the loss-only database: nothing to draw, every run looked at */
    assert_int_equal(plot_render("expert_load", fx->db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "has recorded expert load"));
    assert_int_equal(plot_render("experts_per_token", fx->db, out, NULL, MOELAB_PLOTS_DIR, err),
                     -1);
    assert_non_null(strstr(err, "record = true"));
    assert_int_equal(plot_render("loss_vs_flops", fx->db, out, "top2", MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "run 'top2' has no validation evaluation"));
    assert_int_equal(plot_render("loss_vs_flops", fx->empty_db, out, NULL, MOELAB_PLOTS_DIR, err),
                     -1);
    assert_non_null(strstr(err, "validation evaluation"));
    assert_int_not_equal(access(out, F_OK), 0);
}


static void test_unknown_figure_lists_known_ones(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "x.pdf");
    assert_int_equal(plot_render("lossy", fx->db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "unknown figure 'lossy'"));
    assert_non_null(strstr(err, "loss,expert_load,experts_per_token,loss_vs_flops"));
    assert_int_equal(plot_render(NULL, fx->db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
}

static void test_bad_extension_is_refused(void **state) {
    Fixture *fx = *state;
    static const char *names[] = {"x.jpg", "x", "x.pdf.txt", "dir.pdf/x"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char out[600], err[ML_ERRLEN] = "";
        path_in(out, sizeof out, fx, names[i]);
        assert_int_equal(plot_render("loss", fx->db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
        assert_non_null(strstr(err, ".pdf, .png or .svg"));
        assert_int_not_equal(access(out, F_OK), 0);
    }
}

static void test_unknown_run_is_named(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "x.pdf");
    assert_int_equal(plot_render("loss", fx->db, out, "top2,top3", MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "'top3'"));
    assert_non_null(strstr(err, "top2, dense_ffn"));   /* what there is */
}

static void test_no_metrics_is_a_clear_error(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "x.pdf");
    assert_int_equal(plot_render("loss", fx->empty_db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "no train or val loss"));
    assert_non_null(strstr(err, "idle"));
    char missing[600];
    path_in(missing, sizeof missing, fx, "missing.db");
    assert_int_equal(plot_render("loss", missing, out, NULL, MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, missing));
}

static void test_line_breaks_are_refused(void **state) {
    Fixture *fx = *state;
    char out[600], err[ML_ERRLEN] = "";
    path_in(out, sizeof out, fx, "two\nlines.pdf");
    assert_int_equal(plot_render("loss", fx->db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
    assert_non_null(strstr(err, "line break"));
    path_in(out, sizeof out, fx, "x.pdf");
    assert_int_equal(plot_render("loss", fx->db, out, "top2\n", MOELAB_PLOTS_DIR, err), -1);
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
    path_in(out, sizeof out, fx, "broken.png");
    assert_int_equal(plot_render("loss", fx->db, out, NULL, dir, err), -1);
    assert_non_null(strstr(err, "gnuplot failed"));
    assert_non_null(strstr(err, "no_such_function"));

    path_in(dir, sizeof dir, fx, "no plots here");
    assert_int_equal(plot_render("loss", fx->db, out, NULL, dir, err), -1);
    assert_non_null(strstr(err, "loss.gp"));

    path_in(out, sizeof out, fx, "no such dir/x.pdf");
    assert_int_equal(plot_render("loss", fx->db, out, NULL, MOELAB_PLOTS_DIR, err), -1);
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
    int rc = plot_render("loss", fx->db, out, NULL, MOELAB_PLOTS_DIR, err);
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
