/*
** plot.c — plot_render of plot.h: selects runs from a database, writes their
** data as gnuplot datablocks, and has gnuplot draw a figure script over them.
**
** The gnuplot program that reaches gnuplot's standard input is:
**
**     $train << EOD ... EOD                the figure's data (figure writer)
**     set terminal pdfcairo ...            from the output's extension
**     set output './results/loss.pdf'
**     nruns = 2
**     array run_title[2]; run_title[1] = 'top2'; ...
**     load '/path/plots/loss.gp'           the figure script draws
**     unset output                         and the file is complete
**
** The data comes first because a figure drops the runs that lack its data
** when the runs were not named (a dense baseline has no routing to draw),
** and the page grows with the runs that remain. A run named in the run list
** that lacks the data is an error that says how to record it.
**
** Every string is a gnuplot single-quoted string, in which nothing but ''
** (a literal quote) is special, so paths and run names with spaces, quotes
** or backslashes arrive intact; line breaks are refused. Relative paths get
** a "./" so that a name starting with '|' or '<' is not run as a shell
** command by `set output` or `load`. gnuplot itself is started with fork and
** execvp, never through a shell.
*/
#include "plot.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "paths.h"
#include "recorder.h"

typedef struct {
    int64_t run_id;
    char *name;
    int name_repeats;    /* another selected run has the same name */
    int noncausal;       /* runs.causal = 0: its titles say so */
} PlotRun;

typedef struct {
    PlotRun *runs;
    int count;
    int named;           /* chosen by name, not "every run" */
} PlotRuns;

/* Writes a figure's datablocks and variables; fails when the selected runs
** have nothing to draw. May drop runs without data (see plot_keep_runs). */
typedef int (*PlotDataWriter)(FILE *gp, sqlite3 *db, const char *db_path,
                              PlotRuns *runs, char *err);

typedef struct {
    const char *name;            /* also the script's name: plots_dir/NAME.gp */
    PlotDataWriter write_data;
    int panels;                  /* one panel per run (up to 3 a row), not one plot */
} PlotFigure;

/* The page is width x height, taller by per_run for each run past the
** third, so that the legend of many runs does not squeeze the axes. */
typedef struct {
    const char *extension;
    const char *terminal;
    double width, height, per_run;
    const char *unit;
    const char *options;
} PlotFormat;

static int plot_loss_data(FILE *gp, sqlite3 *db, const char *db_path, PlotRuns *runs,
                          char *err);
static int plot_expert_load_data(FILE *gp, sqlite3 *db, const char *db_path, PlotRuns *runs,
                                 char *err);
static int plot_experts_per_token_data(FILE *gp, sqlite3 *db, const char *db_path,
                                       PlotRuns *runs, char *err);
static int plot_loss_vs_flops_data(FILE *gp, sqlite3 *db, const char *db_path,
                                   PlotRuns *runs, char *err);

/* In the order of PLOT_FIGURES. */
static const PlotFigure plot_figures[] = {
    {"loss", plot_loss_data, 0},
    {"expert_load", plot_expert_load_data, 1},
    {"experts_per_token", plot_experts_per_token_data, 0},
    {"loss_vs_flops", plot_loss_vs_flops_data, 0},
};

/* Panels a row in a figure of one panel per run. */
#define PLOT_PANEL_COLUMNS 3

/* Sized for a paper: the PDF fits one column of a two-column page, the PNG
** is that figure at 300 dpi, the SVG suits a web page. noenhanced keeps '_'
** and '^' in run names literal. */
static const PlotFormat plot_formats[] = {
    {".pdf", "pdfcairo", 3.5, 2.6, 0.13, "in",
     "font 'Sans,8' linewidth 1 rounded noenhanced"},
    {".png", "pngcairo", 1050, 780, 39, "",
     "font 'Sans,20' linewidth 2 pointscale 2 rounded noenhanced"},
    {".svg", "svg", 700, 520, 26, "",
     "dynamic font 'Sans,13' linewidth 1 rounded noenhanced background '#ffffff'"},
};

/* ---- gnuplot strings -------------------------------------------------- */

static int plot_check_one_line(const char *what, const char *text, char *err) {
    if (strpbrk(text, "\n\r"))
        return ml_error(err, "%s contains a line break, which a figure cannot carry: "
                        "'%.*s...'", what, (int)strcspn(text, "\n\r"), text);
    return 0;
}

/* prefix + text as one gnuplot single-quoted string. */
static void plot_put_quoted(FILE *gp, const char *prefix, const char *text) {
    fputc('\'', gp);
    fputs(prefix, gp);
    for (const char *c = text; *c; c++) {
        if (*c == '\'')
            fputc('\'', gp);
        fputc(*c, gp);
    }
    fputc('\'', gp);
}

static void plot_put_path(FILE *gp, const char *path) {
    plot_put_quoted(gp, path[0] == '/' ? "" : "./", path);
}

/* ---- which runs ------------------------------------------------------- */

static void plot_free_runs(PlotRuns *runs) {
    for (int i = 0; i < runs->count; i++)
        free(runs->runs[i].name);
    free(runs->runs);
    runs->runs = NULL;
    runs->count = 0;
}

static int plot_add_run(PlotRuns *runs, int64_t run_id, const char *name, int noncausal,
                        char *err) {
    for (int i = 0; i < runs->count; i++)
        if (runs->runs[i].run_id == run_id)
            return 0;                       /* named twice: draw once */
    PlotRun *grown = realloc(runs->runs, (size_t)(runs->count + 1) * sizeof *grown);
    if (!grown)
        return ml_error(err, "out of memory selecting runs");
    runs->runs = grown;
    PlotRun *run = &runs->runs[runs->count];
    run->run_id = run_id;
    run->name_repeats = 0;
    run->noncausal = noncausal;
    run->name = strdup(name ? name : "");
    if (!run->name)
        return ml_error(err, "out of memory selecting runs");
    runs->count++;
    return 0;
}

/* "a, b, c" for an error message: the names of the database's runs. */
static void plot_list_run_names(sqlite3 *db, char *out, size_t size) {
    sqlite3_stmt *st = NULL;
    size_t used = 0;
    out[0] = '\0';
    if (sqlite3_prepare_v2(db, "SELECT name FROM runs GROUP BY name ORDER BY min(run_id)",
                           -1, &st, NULL) != SQLITE_OK)
        goto cleanup;
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(st, 0);
        int n = snprintf(out + used, size - used, "%s%s", used ? ", " : "", name ? name : "");
        if (n < 0 || (size_t)n >= size - used) {
            if (size > 4)
                strcpy(out + size - 4, "...");
            break;
        }
        used += (size_t)n;
    }
cleanup:
    sqlite3_finalize(st);
}

static int plot_select_all_runs(sqlite3 *db, const char *db_path, PlotRuns *runs, char *err) {
    sqlite3_stmt *st = NULL;
    int status = -1, rc;
    if (sqlite3_prepare_v2(db, "SELECT run_id, name, causal = 0 FROM runs ORDER BY run_id", -1,
                           &st, NULL) != SQLITE_OK) {
        ml_error(err, "'%s': cannot list runs: %s", db_path, sqlite3_errmsg(db));
        goto cleanup;
    }
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        if (plot_add_run(runs, sqlite3_column_int64(st, 0),
                         (const char *)sqlite3_column_text(st, 1), sqlite3_column_int(st, 2), err))
            goto cleanup;
    if (rc != SQLITE_DONE) {
        ml_error(err, "'%s': cannot list runs: %s", db_path, sqlite3_errmsg(db));
        goto cleanup;
    }
    if (runs->count == 0) {
        ml_error(err, "'%s' has no runs to plot", db_path);
        goto cleanup;
    }
    status = 0;
cleanup:
    sqlite3_finalize(st);
    return status;
}

/* runs_csv: names separated by commas, spaces around them ignored. */
static int plot_select_named_runs(sqlite3 *db, const char *db_path, const char *runs_csv,
                                  PlotRuns *runs, char *err) {
    sqlite3_stmt *st = NULL;
    char *names = strdup(runs_csv), *save = NULL;
    int status = -1;
    if (!names) {
        ml_error(err, "out of memory selecting runs");
        goto cleanup;
    }
    if (sqlite3_prepare_v2(db, "SELECT run_id, causal = 0 FROM runs WHERE name = ?1"
                           " ORDER BY run_id DESC LIMIT 1", -1, &st, NULL) != SQLITE_OK) {
        ml_error(err, "'%s': cannot look up runs: %s", db_path, sqlite3_errmsg(db));
        goto cleanup;
    }
    for (char *name = strtok_r(names, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
        name += strspn(name, " \t");
        size_t len = strlen(name);
        while (len > 0 && (name[len - 1] == ' ' || name[len - 1] == '\t'))
            name[--len] = '\0';
        if (len == 0)
            continue;
        sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
        int rc = sqlite3_step(st);
        if (rc == SQLITE_DONE) {
            char known[256];
            plot_list_run_names(db, known, sizeof known);
            ml_error(err, "no run named '%s' in '%s' (its runs: %s)", name, db_path,
                     known[0] ? known : "none");
            goto cleanup;
        }
        if (rc != SQLITE_ROW) {
            ml_error(err, "'%s': cannot look up run '%s': %s", db_path, name,
                     sqlite3_errmsg(db));
            goto cleanup;
        }
        int64_t run_id = sqlite3_column_int64(st, 0);
        int noncausal = sqlite3_column_int(st, 1);
        sqlite3_reset(st);
        if (plot_add_run(runs, run_id, name, noncausal, err))
            goto cleanup;
    }
    if (runs->count == 0) {
        ml_error(err, "no run names in '%s'", runs_csv);
        goto cleanup;
    }
    status = 0;
cleanup:
    sqlite3_finalize(st);
    free(names);
    return status;
}

static int plot_select_runs(sqlite3 *db, const char *db_path, const char *runs_csv,
                            PlotRuns *runs, char *err) {
    int all = !runs_csv || runs_csv[strspn(runs_csv, " \t")] == '\0';
    runs->named = !all;
    if (all ? plot_select_all_runs(db, db_path, runs, err)
            : plot_select_named_runs(db, db_path, runs_csv, runs, err))
        return -1;
    for (int i = 0; i < runs->count; i++) {
        char what[64];
        snprintf(what, sizeof what, "the name of run %lld", (long long)runs->runs[i].run_id);
        if (plot_check_one_line(what, runs->runs[i].name, err))
            return -1;
        for (int j = 0; j < runs->count; j++)
            if (j != i && strcmp(runs->runs[i].name, runs->runs[j].name) == 0)
                runs->runs[i].name_repeats = 1;
    }
    return 0;
}

/*
** Keeps the runs that have a figure's data (has[i]), in order, and their
** entries of the writer's per-run array info (count elements of size bytes)
** alike. A named run without the data is an error: "run 'x' has no
** <missing>: <remedy>"; when every run was selected, runs without it are
** left out, and it is an error only if none has it.
*/
static int plot_keep_runs(PlotRuns *runs, const int *has, void *info, size_t size,
                          const char *db_path, const char *missing, const char *remedy,
                          char *err) {
    int kept = 0;
    for (int i = 0; i < runs->count; i++)
        if (!has[i] && runs->named)
            return ml_error(err, "run '%s' has no %s: %s", runs->runs[i].name, missing, remedy);
    for (int i = 0; i < runs->count; i++) {
        if (!has[i]) {
            free(runs->runs[i].name);
            continue;
        }
        if (kept != i)
            memcpy((char *)info + (size_t)kept * size, (char *)info + (size_t)i * size, size);
        runs->runs[kept++] = runs->runs[i];
    }
    int had = runs->count;
    runs->count = kept;
    if (kept == 0)
        return ml_error(err, "no run in '%s' has %s (%d run%s looked at): %s", db_path, missing,
                        had, had == 1 ? "" : "s", remedy);
    return 0;
}

static int plot_db_error(sqlite3 *db, const char *db_path, const char *what, char *err) {
    return ml_error(err, "'%s': cannot read %s: %s", db_path, what, sqlite3_errmsg(db));
}

static int plot_prepare(sqlite3 *db, const char *db_path, const char *what, const char *sql,
                        sqlite3_stmt **st, char *err) {
    if (sqlite3_prepare_v2(db, sql, -1, st, NULL) != SQLITE_OK)
        return plot_db_error(db, db_path, what, err);
    return 0;
}

/* nruns and run_title[1..nruns]: what every figure script receives. */
static void plot_put_run_titles(FILE *gp, const PlotRuns *runs) {
    fprintf(gp, "nruns = %d\narray run_title[%d]\n", runs->count, runs->count);
    for (int i = 0; i < runs->count; i++) {
        const PlotRun *run = &runs->runs[i];
        char title[64] = "";
        if (run->name_repeats)   /* same name twice: tell them apart */
            snprintf(title, sizeof title, " (run %lld)", (long long)run->run_id);
        if (run->noncausal)      /* its loss may look at later bytes */
            snprintf(title + strlen(title), sizeof title - strlen(title), " (non-causal)");
        fprintf(gp, "run_title[%d] = ", i + 1);
        plot_put_quoted(gp, "", run->name);
        if (title[0]) {
            fputs(" . ", gp);
            plot_put_quoted(gp, "", title);
        }
        fputc('\n', gp);
    }
}

/* ---- figure "loss" ---------------------------------------------------- */

/*
** $train and $val: per run (index i-1 for run i) the rows "tokens loss" of
** metrics with that split, in step order; a run without rows gets one
** "NaN NaN" row so that the block indices stay aligned. Also has_train[i],
** has_val[i] (0 or 1), tokens_min (the smallest positive x, 0 if none) and
** tokens_max.
*/
static int plot_loss_data(FILE *gp, sqlite3 *db, const char *db_path, PlotRuns *runs,
                          char *err) {
    static const char *splits[] = {"train", "val"};
    sqlite3_stmt *st = NULL;
    int *has_rows = calloc((size_t)runs->count * 2, sizeof *has_rows);
    double tokens_min = INFINITY, tokens_max = 0;
    int64_t points = 0;
    int status = -1;
    if (!has_rows) {
        ml_error(err, "out of memory reading metrics");
        goto cleanup;
    }
    if (sqlite3_prepare_v2(db, "SELECT tokens, loss FROM metrics"
                           " WHERE run_id = ?1 AND split = ?2"
                           " AND tokens IS NOT NULL AND loss IS NOT NULL"
                           " ORDER BY step, rowid", -1, &st, NULL) != SQLITE_OK) {
        ml_error(err, "'%s': cannot read metrics: %s", db_path, sqlite3_errmsg(db));
        goto cleanup;
    }
    for (int s = 0; s < 2; s++) {
        fprintf(gp, "$%s << EOD\n", splits[s]);
        for (int i = 0; i < runs->count; i++) {
            int *has = &has_rows[s * runs->count + i];
            if (i > 0)
                fputs("\n\n", gp);              /* next index */
            sqlite3_bind_int64(st, 1, runs->runs[i].run_id);
            sqlite3_bind_text(st, 2, splits[s], -1, SQLITE_STATIC);
            int rc;
            while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                int64_t tokens = sqlite3_column_int64(st, 0);
                double loss = sqlite3_column_double(st, 1);
                if (!isfinite(loss))
                    continue;                   /* a diverged step */
                fprintf(gp, "%lld %.9g\n", (long long)tokens, loss);
                if (tokens > 0 && tokens < tokens_min)
                    tokens_min = (double)tokens;
                if (tokens > tokens_max)
                    tokens_max = (double)tokens;
                *has = 1;
                points++;
            }
            if (rc != SQLITE_DONE) {
                ml_error(err, "'%s': cannot read metrics: %s", db_path, sqlite3_errmsg(db));
                goto cleanup;
            }
            sqlite3_reset(st);
            if (!*has)
                fputs("NaN NaN\n", gp);
        }
        fputs("EOD\n", gp);
    }
    if (points == 0) {
        ml_error(err, "'%s' has no train or val loss metrics for the selected run%s (%s%s)",
                 db_path, runs->count > 1 ? "s" : "", runs->runs[0].name,
                 runs->count > 1 ? ", ..." : "");
        goto cleanup;
    }
    for (int s = 0; s < 2; s++) {
        fprintf(gp, "array has_%s[%d]\n", splits[s], runs->count);
        for (int i = 0; i < runs->count; i++)
            fprintf(gp, "has_%s[%d] = %d\n", splits[s], i + 1, has_rows[s * runs->count + i]);
    }
    fprintf(gp, "tokens_min = %.1f\ntokens_max = %.1f\n",
            isfinite(tokens_min) ? tokens_min : 0.0, tokens_max);
    status = 0;
cleanup:
    sqlite3_finalize(st);
    free(has_rows);
    return status;
}

/* ---- figure "expert_load" --------------------------------------------- */

typedef struct {
    int64_t eval_id;     /* the evaluation drawn; -1: the training steps summed */
    int64_t step;        /* its step, or the last training step */
    int64_t steps;       /* training steps summed */
} PlotLoadSource;

/* The latest evaluation of the run with expert_load rows, else its training
** steps; *found = 0 when it has neither. */
static int plot_load_source(sqlite3 *db, const char *db_path, int64_t run_id,
                            PlotLoadSource *src, int *found, char *err) {
    sqlite3_stmt *st = NULL;
    int status = -1, rc;
    *found = 0;
    if (plot_prepare(db, db_path, "expert_load",
                     "SELECT eval_id, step FROM expert_load WHERE run_id = ?1"
                     " AND eval_id IS NOT NULL ORDER BY eval_id DESC LIMIT 1", &st, err))
        goto cleanup;
    sqlite3_bind_int64(st, 1, run_id);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        src->eval_id = sqlite3_column_int64(st, 0);
        src->step = sqlite3_column_int64(st, 1);
        src->steps = 0;
        *found = 1;
        status = 0;
        goto cleanup;
    }
    if (rc != SQLITE_DONE) {
        plot_db_error(db, db_path, "expert_load", err);
        goto cleanup;
    }
    sqlite3_finalize(st);
    st = NULL;
    if (plot_prepare(db, db_path, "expert_load",
                     "SELECT count(DISTINCT step), max(step) FROM expert_load"
                     " WHERE run_id = ?1 AND eval_id IS NULL", &st, err))
        goto cleanup;
    sqlite3_bind_int64(st, 1, run_id);
    if (sqlite3_step(st) != SQLITE_ROW) {
        plot_db_error(db, db_path, "expert_load", err);
        goto cleanup;
    }
    src->eval_id = -1;
    src->steps = sqlite3_column_int64(st, 0);
    src->step = sqlite3_column_int64(st, 1);
    *found = src->steps > 0;
    status = 0;
cleanup:
    sqlite3_finalize(st);
    return status;
}

/*
** $load: per run (index i-1) one row per (layer, expert) cell, "expert row
** share layer", where row numbers the run's MoE layers from 0 and share is
** the expert's part of the assignments its layer kept (0 when the layer
** kept none); experts missing from a layer's rows count 0. Also
** panel_note[i] (what was summed), panel_experts[i], panel_layers[i] and
** share_max over every panel, for one colour scale.
*/
static int plot_load_cells(FILE *gp, sqlite3 *db, const char *db_path, int64_t run_id,
                           const PlotLoadSource *src, int *experts, int *layers,
                           double *share_max, char *err) {
    typedef struct {
        int layer, expert;
        int64_t tokens;
    } Cell;
    sqlite3_stmt *st = NULL;
    Cell *cells = NULL;
    int64_t *layer_total = NULL;
    size_t n = 0, cap = 0;
    int status = -1, rc, n_experts = 0, n_layers = 0;
    if (plot_prepare(db, db_path, "expert_load",
                     "SELECT layer, expert, sum(tokens) FROM expert_load"
                     " WHERE run_id = ?1 AND eval_id IS ?2 AND expert >= 0"
                     " GROUP BY layer, expert ORDER BY layer, expert", &st, err))
        goto cleanup;
    sqlite3_bind_int64(st, 1, run_id);
    if (src->eval_id >= 0)
        sqlite3_bind_int64(st, 2, src->eval_id);
    else
        sqlite3_bind_null(st, 2);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            Cell *grown = realloc(cells, cap * sizeof *grown);
            if (!grown)
                goto oom;
            cells = grown;
        }
        Cell *c = &cells[n++];
        c->layer = sqlite3_column_int(st, 0);
        c->expert = sqlite3_column_int(st, 1);
        c->tokens = sqlite3_column_int64(st, 2);
        if (c->expert >= n_experts)
            n_experts = c->expert + 1;
        if (n == 1 || c->layer != cells[n - 2].layer)
            n_layers++;
    }
    if (rc != SQLITE_DONE) {
        plot_db_error(db, db_path, "expert_load", err);
        goto cleanup;
    }
    layer_total = calloc((size_t)n_layers + 1, sizeof *layer_total);
    if (!layer_total)
        goto oom;
    for (size_t i = 0, row = 0; i < n; i++) {
        if (i > 0 && cells[i].layer != cells[i - 1].layer)
            row++;
        layer_total[row] += cells[i].tokens;
    }
    /* The grid row by row, experts without rows as 0; cells are sorted. */
    for (size_t i = 0, row = 0; i < n; row++) {
        int layer = cells[i].layer;
        for (int e = 0; e < n_experts; e++) {
            int64_t tokens = 0;
            if (i < n && cells[i].layer == layer && cells[i].expert == e)
                tokens = cells[i++].tokens;
            double share = layer_total[row] > 0 ? (double)tokens / layer_total[row] : 0.0;
            if (share > *share_max)
                *share_max = share;
            fprintf(gp, "%d %zu %.6g %d\n", e, row, share, layer);
        }
    }
    *experts = n_experts;
    *layers = n_layers;
    status = 0;
    goto cleanup;
oom:
    ml_error(err, "out of memory reading expert_load");
cleanup:
    sqlite3_finalize(st);
    free(cells);
    free(layer_total);
    return status;
}

static int plot_expert_load_data(FILE *gp, sqlite3 *db, const char *db_path, PlotRuns *runs,
                                 char *err) {
    PlotLoadSource *src = calloc((size_t)runs->count, sizeof *src);
    int *has = calloc((size_t)runs->count, sizeof *has);
    int *experts = calloc((size_t)runs->count, sizeof *experts);
    int *layers = calloc((size_t)runs->count, sizeof *layers);
    double share_max = 0;
    int status = -1;
    if (!src || !has || !experts || !layers) {
        ml_error(err, "out of memory reading expert_load");
        goto cleanup;
    }
    for (int i = 0; i < runs->count; i++)
        if (plot_load_source(db, db_path, runs->runs[i].run_id, &src[i], &has[i], err))
            goto cleanup;
    if (plot_keep_runs(runs, has, src, sizeof *src, db_path, "recorded expert load",
                       "only MoE models record it, at every training step and evaluation",
                       err))
        goto cleanup;
    fputs("$load << EOD\n", gp);
    for (int i = 0; i < runs->count; i++) {
        if (i > 0)
            fputs("\n\n", gp);
        if (plot_load_cells(gp, db, db_path, runs->runs[i].run_id, &src[i], &experts[i],
                            &layers[i], &share_max, err))
            goto cleanup;
    }
    fputs("EOD\n", gp);
    fprintf(gp, "array panel_note[%d]\narray panel_experts[%d]\narray panel_layers[%d]\n",
            runs->count, runs->count, runs->count);
    for (int i = 0; i < runs->count; i++) {
        char note[128];
        if (src[i].eval_id >= 0)
            snprintf(note, sizeof note, "evaluation at step %lld", (long long)src[i].step);
        else
            snprintf(note, sizeof note, "training, %lld step%s summed",
                     (long long)src[i].steps, src[i].steps == 1 ? "" : "s");
        fprintf(gp, "panel_note[%d] = ", i + 1);
        plot_put_quoted(gp, "", note);
        fprintf(gp, "\npanel_experts[%d] = %d\npanel_layers[%d] = %d\n", i + 1, experts[i],
                i + 1, layers[i]);
    }
    fprintf(gp, "share_max = %.6g\n", share_max > 0 ? share_max : 1.0);
    status = 0;
cleanup:
    free(src);
    free(has);
    free(experts);
    free(layers);
    return status;
}

/* ---- figure "experts_per_token" --------------------------------------- */

typedef struct {
    int64_t eval_id, step;
    int64_t *pairs;      /* (max_experts + 1) (token, layer) pairs by expert count */
    int max_experts;
    int64_t total;       /* (token, layer) pairs */
    double mean;
} PlotExpertsHist;

static int plot_hist_add(PlotExpertsHist *h, int64_t experts, int64_t count) {
    if (experts > h->max_experts || !h->pairs) {
        int64_t *grown = realloc(h->pairs, (size_t)(experts + 1) * sizeof *grown);
        if (!grown)
            return -1;
        for (int64_t e = h->pairs ? h->max_experts + 1 : 0; e <= experts; e++)
            grown[e] = 0;
        h->pairs = grown;
        h->max_experts = (int)experts;
    }
    h->pairs[experts] += count;
    h->total += count;
    return 0;
}

/*
** The latest evaluation of a run that recorded routing, and its histogram:
** for every (token, layer) the number of routing rows, so that a stratified
** token's passes count together; tokens in token_stats that no expert took
** in a layer (expert choice) count 0.
*/
static int plot_experts_hist(sqlite3 *db, const char *db_path, int64_t run_id,
                             PlotExpertsHist *h, int *found, char *err) {
    sqlite3_stmt *st = NULL;
    int status = -1, rc;
    *found = 0;
    if (plot_prepare(db, db_path, "routing",
                     "SELECT e.eval_id, e.step FROM evals e WHERE e.run_id = ?1"
                     " AND e.routing_first IS NOT NULL ORDER BY e.eval_id DESC LIMIT 1",
                     &st, err))
        goto cleanup;
    sqlite3_bind_int64(st, 1, run_id);
    rc = sqlite3_step(st);
    if (rc == SQLITE_DONE) {
        status = 0;
        goto cleanup;
    }
    if (rc != SQLITE_ROW) {
        plot_db_error(db, db_path, "routing", err);
        goto cleanup;
    }
    h->eval_id = sqlite3_column_int64(st, 0);
    h->step = sqlite3_column_int64(st, 1);
    sqlite3_finalize(st);
    st = NULL;

    if (plot_prepare(db, db_path, "routing",
                     "SELECT n, count(*) FROM (SELECT count(*) AS n FROM evals e JOIN routing r"
                     " ON r.routing_id BETWEEN e.routing_first AND e.routing_last"
                     " AND r.eval_id = e.eval_id WHERE e.eval_id = ?1"
                     " GROUP BY r.layer, r.seq, r.pos) GROUP BY n ORDER BY n",
                     &st, err))
        goto cleanup;
    sqlite3_bind_int64(st, 1, h->eval_id);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        if (plot_hist_add(h, sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 1))) {
            ml_error(err, "out of memory reading routing");
            goto cleanup;
        }
    if (rc != SQLITE_DONE) {
        plot_db_error(db, db_path, "routing", err);
        goto cleanup;
    }
    sqlite3_finalize(st);
    st = NULL;

    if (plot_prepare(db, db_path, "token_stats",
                     "SELECT (SELECT count(*) FROM token_stats WHERE eval_id = ?1)"
                     " * (SELECT count(DISTINCT r.layer) FROM evals e JOIN routing r"
                     " ON r.routing_id BETWEEN e.routing_first AND e.routing_last"
                     " AND r.eval_id = e.eval_id WHERE e.eval_id = ?1)",
                     &st, err))
        goto cleanup;
    sqlite3_bind_int64(st, 1, h->eval_id);
    if (sqlite3_step(st) != SQLITE_ROW) {
        plot_db_error(db, db_path, "token_stats", err);
        goto cleanup;
    }
    int64_t unrouted = sqlite3_column_int64(st, 0) - h->total;
    if (unrouted > 0 && plot_hist_add(h, 0, unrouted)) {
        ml_error(err, "out of memory reading routing");
        goto cleanup;
    }
    double sum = 0;
    for (int e = 0; e <= h->max_experts; e++)
        sum += (double)e * (double)h->pairs[e];
    h->mean = h->total > 0 ? sum / (double)h->total : 0.0;
    *found = h->total > 0;
    status = 0;
cleanup:
    sqlite3_finalize(st);
    return status;
}

/*
** $hist: per run (index i-1) rows "experts fraction" for experts 0 ..
** the run's largest count; fraction of the (token, layer) pairs of its
** latest recorded evaluation. Also mean_experts[i], eval_step[i] and
** experts_max over every run.
*/
static int plot_experts_per_token_data(FILE *gp, sqlite3 *db, const char *db_path,
                                       PlotRuns *runs, char *err) {
    PlotExpertsHist *hist = calloc((size_t)runs->count, sizeof *hist);
    int *has = calloc((size_t)runs->count, sizeof *has);
    int status = -1, count = runs->count, experts_max = 0;
    if (!hist || !has) {
        ml_error(err, "out of memory reading routing");
        goto cleanup;
    }
    for (int i = 0; i < runs->count; i++)
        if (plot_experts_hist(db, db_path, runs->runs[i].run_id, &hist[i], &has[i], err))
            goto cleanup;
    /* the histograms of runs left out are freed here, as they move */
    for (int i = 0; i < count; i++)
        if (!has[i]) {
            free(hist[i].pairs);
            hist[i].pairs = NULL;
        }
    if (plot_keep_runs(runs, has, hist, sizeof *hist, db_path, "recorded routing",
                       "evaluate it with record = true (run:evaluate{ record = true })", err))
        goto cleanup;
    count = runs->count;
    fputs("$hist << EOD\n", gp);
    for (int i = 0; i < count; i++) {
        if (i > 0)
            fputs("\n\n", gp);
        for (int e = 0; e <= hist[i].max_experts; e++)
            fprintf(gp, "%d %.6g\n", e, (double)hist[i].pairs[e] / (double)hist[i].total);
        if (hist[i].max_experts > experts_max)
            experts_max = hist[i].max_experts;
    }
    fputs("EOD\n", gp);
    fprintf(gp, "array mean_experts[%d]\narray eval_step[%d]\n", count, count);
    for (int i = 0; i < count; i++)
        fprintf(gp, "mean_experts[%d] = %.6g\neval_step[%d] = %lld\n", i + 1, hist[i].mean,
                i + 1, (long long)hist[i].step);
    fprintf(gp, "experts_max = %d\n", experts_max);
    status = 0;
cleanup:
    for (int i = 0; hist && i < count; i++)
        free(hist[i].pairs);
    free(hist);
    free(has);
    return status;
}

/* ---- figure "loss_vs_flops" ------------------------------------------- */

typedef struct {
    double loss, flops;  /* flops 0: a dense model */
    int64_t step;
} PlotValPoint;

/*
** $points: per run (index i-1) one row "flops loss" from its latest
** validation evaluation; a run without MoE FLOPs (NULL or 0) is dense and
** sits at x = 0. Also dense[i] (0 or 1) and flops_max.
*/
static int plot_loss_vs_flops_data(FILE *gp, sqlite3 *db, const char *db_path,
                                   PlotRuns *runs, char *err) {
    sqlite3_stmt *st = NULL;
    PlotValPoint *points = calloc((size_t)runs->count, sizeof *points);
    int *has = calloc((size_t)runs->count, sizeof *has);
    double flops_max = 0;
    int status = -1, rc;
    if (!points || !has) {
        ml_error(err, "out of memory reading evals");
        goto cleanup;
    }
    if (plot_prepare(db, db_path, "evals",
                     "SELECT loss, coalesce(moe_flops_per_token, 0), step FROM evals"
                     " WHERE run_id = ?1 AND split = 'val' AND loss IS NOT NULL"
                     " ORDER BY step DESC, eval_id DESC LIMIT 1", &st, err))
        goto cleanup;
    for (int i = 0; i < runs->count; i++) {
        sqlite3_bind_int64(st, 1, runs->runs[i].run_id);
        rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            points[i].loss = sqlite3_column_double(st, 0);
            points[i].flops = sqlite3_column_double(st, 1);
            points[i].step = sqlite3_column_int64(st, 2);
            has[i] = isfinite(points[i].loss) && isfinite(points[i].flops);
        } else if (rc != SQLITE_DONE) {
            plot_db_error(db, db_path, "evals", err);
            goto cleanup;
        }
        sqlite3_reset(st);
    }
    if (plot_keep_runs(runs, has, points, sizeof *points, db_path, "validation evaluation",
                       "evaluate it on the 'val' split (run:evaluate{} or train with "
                       "eval_every)", err))
        goto cleanup;
    fputs("$points << EOD\n", gp);
    for (int i = 0; i < runs->count; i++) {
        if (i > 0)
            fputs("\n\n", gp);
        fprintf(gp, "%.9g %.9g\n", points[i].flops, points[i].loss);
        if (points[i].flops > flops_max)
            flops_max = points[i].flops;
    }
    fputs("EOD\n", gp);
    fprintf(gp, "array dense[%d]\n", runs->count);
    for (int i = 0; i < runs->count; i++)
        fprintf(gp, "dense[%d] = %d\n", i + 1, points[i].flops <= 0);
    fprintf(gp, "flops_max = %.9g\n", flops_max);
    status = 0;
cleanup:
    sqlite3_finalize(st);
    free(points);
    free(has);
    return status;
}

/* ---- running gnuplot -------------------------------------------------- */

static int plot_line_says_where(const char *line, const char *line_end) {
    for (const char *c = strstr(line, "line "); c && c < line_end; c = strstr(c + 1, "line "))
        if (c[5] >= '0' && c[5] <= '9')
            return 1;
    return 0;
}

/* gnuplot's error as one line: from the last line that says where ("line 0:",
** '"loss.gp" line 12:'; its echo of the command and the caret above are left
** out) to the end, lines joined by "; " and spaces collapsed. Only the last
** few lines are searched; without such a line, the last line is the error. */
static void plot_error_message(const char *text, char *out, size_t size) {
    const char *end = text + strlen(text);
    while (end > text && (end[-1] == '\n' || end[-1] == '\r' || end[-1] == ' '))
        end--;
    const char *start = end;
    while (start > text && start[-1] != '\n')
        start--;
    const char *line = start, *line_end = end;
    for (int looked = 0; looked < 4; looked++) {
        if (plot_line_says_where(line, line_end)) {
            start = line;
            break;
        }
        if (line == text)
            break;
        line_end = line - 1;
        line = line_end;
        while (line > text && line[-1] != '\n')
            line--;
    }
    size_t used = 0;
    const char *pending = "";    /* separator owed before the next word */
    for (const char *c = start; c < end; c++) {
        if (*c == '\n') {
            pending = used ? "; " : "";
        } else if (*c == ' ' || *c == '\t' || *c == '\r') {
            if (used && !*pending)
                pending = " ";
        } else {
            size_t need = strlen(pending) + 1;
            if (used + need >= size)
                break;
            memcpy(out + used, pending, need - 1);
            used += need - 1;
            out[used++] = *c;
            pending = "";
        }
    }
    out[used] = '\0';
}

/* Keeps the last part of what gnuplot says, which holds its error. */
static void plot_keep_messages(char *buf, size_t *used, size_t cap, const char *data, size_t n) {
    if (n >= cap)
        data += n - (cap - 1), n = cap - 1;
    if (*used + n >= cap) {
        size_t drop = *used + n - (cap - 1);
        memmove(buf, buf + drop, *used - drop);
        *used -= drop;
    }
    memcpy(buf + *used, data, n);
    *used += n;
    buf[*used] = '\0';
}

/*
** Feeds script to a gnuplot child and collects its messages (stderr; its
** stdout goes to /dev/null, since a terminal that cannot open its output
** file writes the figure there instead). The child's stdin is
** one end of a socket pair so that writes use MSG_NOSIGNAL: if gnuplot dies
** early we get EPIPE instead of a SIGPIPE that would end the caller. Writing
** and reading are interleaved with poll, so a gnuplot that prints a lot
** while we still write cannot deadlock us.
*/
static int plot_run_gnuplot(const char *script, size_t length, const char *out_path,
                            char *err) {
    int input[2] = {-1, -1}, stderr_pipe[2] = {-1, -1}, exec_report[2] = {-1, -1};
    int devnull = -1;
    char messages[8192] = "";
    size_t messages_used = 0;
    int status = -1;
    pid_t pid = -1;

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, input)
        || pipe2(stderr_pipe, O_CLOEXEC) || pipe2(exec_report, O_CLOEXEC)
        || (devnull = open("/dev/null", O_WRONLY | O_CLOEXEC)) < 0) {
        ml_error(err, "cannot start gnuplot: %s", strerror(errno));
        goto cleanup;
    }
    pid = fork();
    if (pid < 0) {
        ml_error(err, "cannot start gnuplot: fork: %s", strerror(errno));
        goto cleanup;
    }
    if (pid == 0) {
        /* Only async-signal-safe calls between fork and exec. */
        char *argv[] = {"gnuplot", NULL};
        if (dup2(input[1], STDIN_FILENO) >= 0 && dup2(devnull, STDOUT_FILENO) >= 0
            && dup2(stderr_pipe[1], STDERR_FILENO) >= 0)
            execvp("gnuplot", argv);
        int e = errno;
        ssize_t unused = write(exec_report[1], &e, sizeof e);
        (void)unused;
        _exit(127);
    }
    close(input[1]);
    close(stderr_pipe[1]);
    close(exec_report[1]);
    input[1] = stderr_pipe[1] = exec_report[1] = -1;

    /* exec_report closes on a successful exec, or carries exec's errno. */
    int exec_errno = 0;
    ssize_t got;
    while ((got = read(exec_report[0], &exec_errno, sizeof exec_errno)) < 0 && errno == EINTR)
        ;
    if (got == (ssize_t)sizeof exec_errno) {
        if (exec_errno == ENOENT)
            ml_error(err, "gnuplot not found; install gnuplot-nox (apt-get install gnuplot-nox)");
        else
            ml_error(err, "cannot run gnuplot: %s", strerror(exec_errno));
        goto cleanup;
    }

    fcntl(input[0], F_SETFL, fcntl(input[0], F_GETFL) | O_NONBLOCK);
    size_t written = 0;
    while (input[0] >= 0 || stderr_pipe[0] >= 0) {
        struct pollfd fds[2] = {{.fd = input[0], .events = POLLOUT},
                                {.fd = stderr_pipe[0], .events = POLLIN}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            ml_error(err, "talking to gnuplot: poll: %s", strerror(errno));
            goto cleanup;
        }
        if (input[0] >= 0 && fds[0].revents) {
            ssize_t n = send(input[0], script + written, length - written, MSG_NOSIGNAL);
            if (n > 0)
                written += (size_t)n;
            /* EPIPE: gnuplot stopped reading; its exit status says why. */
            if ((n < 0 && errno != EAGAIN && errno != EINTR) || written == length) {
                close(input[0]);
                input[0] = -1;
            }
        }
        if (stderr_pipe[0] >= 0 && fds[1].revents) {
            char chunk[4096];
            ssize_t n = read(stderr_pipe[0], chunk, sizeof chunk);
            if (n > 0)
                plot_keep_messages(messages, &messages_used, sizeof messages, chunk, (size_t)n);
            else if (n == 0 || errno != EINTR) {
                close(stderr_pipe[0]);
                stderr_pipe[0] = -1;
            }
        }
    }

    int wstatus = 0;
    pid_t waited;
    while ((waited = waitpid(pid, &wstatus, 0)) < 0 && errno == EINTR)
        ;
    pid = -1;
    if (waited < 0) {
        ml_error(err, "cannot wait for gnuplot: %s", strerror(errno));
        goto cleanup;
    }
    char last[400];
    plot_error_message(messages, last, sizeof last);
    if (WIFSIGNALED(wstatus)) {
        ml_error(err, "gnuplot was killed by signal %d%s%s", WTERMSIG(wstatus),
                 last[0] ? ": " : "", last);
        goto cleanup;
    }
    if (WEXITSTATUS(wstatus) != 0) {
        ml_error(err, "gnuplot failed to render '%s' (exit status %d): %s", out_path,
                 WEXITSTATUS(wstatus), last[0] ? last : "no message");
        goto cleanup;
    }
    if (written != length) {
        ml_error(err, "gnuplot stopped reading its input early%s%s",
                 last[0] ? ": " : "", last);
        goto cleanup;
    }
    status = 0;
cleanup:
    for (int i = 0; i < 2; i++) {
        if (input[i] >= 0)
            close(input[i]);
        if (stderr_pipe[i] >= 0)
            close(stderr_pipe[i]);
        if (exec_report[i] >= 0)
            close(exec_report[i]);
    }
    if (devnull >= 0)
        close(devnull);
    if (pid > 0)
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
    return status;
}

/* ---- plot_render ------------------------------------------------------ */

static const PlotFigure *plot_find_figure(const char *name) {
    for (size_t i = 0; name && i < sizeof plot_figures / sizeof *plot_figures; i++)
        if (strcmp(plot_figures[i].name, name) == 0)
            return &plot_figures[i];
    return NULL;
}

static const PlotFormat *plot_find_format(const char *out_path) {
    const char *dot = strrchr(out_path, '.');
    if (!dot || strchr(dot, '/'))
        return NULL;
    for (size_t i = 0; i < sizeof plot_formats / sizeof *plot_formats; i++)
        if (strcasecmp(dot, plot_formats[i].extension) == 0)
            return &plot_formats[i];
    return NULL;
}

int plot_render(const char *figure, const char *db_path, const char *out_path,
                const char *runs_csv, const char *plots_dir, char *err) {
    Recorder *rec = NULL;
    PlotRuns runs = {0};
    char *script = NULL, *gp_file = NULL;
    size_t script_length = 0;
    FILE *gp = NULL;
    int status = -1;

    const PlotFigure *fig = plot_find_figure(figure);
    if (!fig) {
        ml_error(err, "unknown figure '%s' (known figures: " PLOT_FIGURES ")",
                 figure ? figure : "(none)");
        goto cleanup;
    }
    if (!db_path || !*db_path || !out_path || !*out_path) {
        ml_error(err, "figure '%s' needs a database and an output file", figure);
        goto cleanup;
    }
    const PlotFormat *format = plot_find_format(out_path);
    if (!format) {
        ml_error(err, "cannot tell the format of '%s' from its extension: "
                 "use .pdf, .png or .svg", out_path);
        goto cleanup;
    }
    if (!plots_dir || !*plots_dir) plots_dir = ml_plots_dir();
    if (plot_check_one_line("the output path", out_path, err)
        || plot_check_one_line("the plots directory", plots_dir, err)
        || (runs_csv && plot_check_one_line("the run list", runs_csv, err)))
        goto cleanup;

    if (asprintf(&gp_file, "%s/%s.gp", plots_dir, fig->name) < 0) {
        gp_file = NULL;
        ml_error(err, "out of memory");
        goto cleanup;
    }
    if (access(gp_file, R_OK) != 0) {
        ml_error(err, "cannot read the script of figure '%s', '%s': %s", fig->name,
                 gp_file, strerror(errno));
        goto cleanup;
    }

    if (rec_open_readonly(&rec, db_path, err)
        || plot_select_runs(rec_db(rec), db_path, runs_csv, &runs, err))
        goto cleanup;

    gp = open_memstream(&script, &script_length);
    if (!gp) {
        ml_error(err, "out of memory");
        goto cleanup;
    }
    if (fig->write_data(gp, rec_db(rec), db_path, &runs, err))
        goto cleanup;
    /* A legend of many runs makes the page taller; panels make it wider
    ** (up to PLOT_PANEL_COLUMNS) and then taller, row by row. */
    double scale_x = 1, scale_y = 1;
    int columns = 1, rows = 1;
    if (fig->panels) {
        columns = runs.count < PLOT_PANEL_COLUMNS ? runs.count : PLOT_PANEL_COLUMNS;
        rows = (runs.count + PLOT_PANEL_COLUMNS - 1) / PLOT_PANEL_COLUMNS;
        scale_x = 1 + 0.7 * (columns - 1);
        scale_y = 1 + 0.8 * (rows - 1);
    } else if (runs.count > 3) {
        scale_y = 1 + format->per_run * (runs.count - 3) / format->height;
    }
    fprintf(gp, "set terminal %s size %g%s,%g%s %s\nset output ", format->terminal,
            format->width * scale_x, format->unit, format->height * scale_y, format->unit,
            format->options);
    plot_put_path(gp, out_path);
    fputc('\n', gp);
    fprintf(gp, "page_scale_x = %g\npage_scale_y = %g\npanel_columns = %d\npanel_rows = %d\n",
            scale_x, scale_y, columns, rows);
    plot_put_run_titles(gp, &runs);
    fputs("load ", gp);
    plot_put_path(gp, gp_file);
    fputs("\nunset output\n", gp);
    int failed = ferror(gp);
    if (fclose(gp) || failed) {
        gp = NULL;
        ml_error(err, "out of memory writing the gnuplot script");
        goto cleanup;
    }
    gp = NULL;
    rec_close(rec);
    rec = NULL;

    /* Remove an old figure, so that a file left behind proves this one. */
    struct stat st;
    if (stat(out_path, &st) == 0 && S_ISREG(st.st_mode))
        unlink(out_path);
    if (plot_run_gnuplot(script, script_length, out_path, err))
        goto cleanup;
    if (stat(out_path, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size == 0) {
        ml_error(err, "gnuplot exited without writing '%s'", out_path);
        goto cleanup;
    }
    status = 0;
cleanup:
    if (gp)
        fclose(gp);
    free(script);
    free(gp_file);
    plot_free_runs(&runs);
    rec_close(rec);
    return status;
}
