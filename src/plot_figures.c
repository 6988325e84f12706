/*
** plot_figures.c — what each figure of plot.h draws: its data, read from a
** run database with SQL and written as gnuplot datablocks and variables for
** plots/FIGURE.gp (whose header comment lists them). A writer drops the runs
** that lack its data when every run was selected, and refuses a named run
** that lacks it with a message saying how to record it (plot_keep_runs).
**
** Datablocks hold one index per run (or per series), separated by two blank
** lines, so that a script draws run i with `index (i - 1)`.
*/
#include "plot_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "placement.h"
#include "recorder.h"

/* ---- helpers ---------------------------------------------------------- */

/* A growing list of ints: a run's MoE layers, a curve's points. */
typedef struct {
    int *v;
    int n, cap;
} PlotInts;

static int plot_ints_push(PlotInts *l, int x) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 8;
        int *grown = realloc(l->v, (size_t)cap * sizeof *grown);
        if (!grown)
            return -1;
        l->v = grown;
        l->cap = cap;
    }
    l->v[l->n++] = x;
    return 0;
}

static int plot_ints_has(const PlotInts *l, int x) {
    for (int i = 0; i < l->n; i++)
        if (l->v[i] == x)
            return 1;
    return 0;
}

/* "0, 1, 2" */
static void plot_ints_format(const PlotInts *l, char *out, size_t size) {
    size_t used = 0;
    out[0] = '\0';
    for (int i = 0; i < l->n && used + 16 < size; i++)
        used += (size_t)snprintf(out + used, size - used, "%s%d", i ? ", " : "", l->v[i]);
}

static void plot_ints_free(PlotInts *l, int n) {
    for (int i = 0; l && i < n; i++)
        free(l[i].v);
}

static int plot_oom(PlotContext *ctx, const char *what) {
    return ml_error(ctx->err, "out of memory reading %s", what);
}

/* A key of an entry per run, each the run's title and extra characters
** after it (" (mean 2.00)"): the titles give up those characters. */
static void plot_key_of_runs(PlotContext *ctx, int extra) {
    ctx->title_chars -= extra;
    ctx->key_entries += ctx->runs->count;
    for (int i = 0; i < ctx->runs->count; i++) {
        int n = plot_title_chars(ctx->runs->runs[i].title, ctx->title_chars) + extra;
        if (n > ctx->key_chars)
            ctx->key_chars = n;
    }
}

/* One more key entry of n characters. */
static void plot_key_entry(PlotContext *ctx, int n) {
    ctx->key_entries++;
    if (n > ctx->key_chars)
        ctx->key_chars = n;
}

/* The layers of a query's rows (one int column, sorted), for run_id in ?1
** and another id in ?2 (an evaluation) when id2 >= 0. */
static int plot_read_layers(PlotContext *ctx, const char *what, const char *sql, int64_t run_id,
                            int64_t id2, PlotInts *layers) {
    sqlite3_stmt *st = NULL;
    int status = -1, rc;
    if (plot_prepare(ctx, what, sql, &st))
        return -1;
    sqlite3_bind_int64(st, 1, run_id);
    if (id2 >= 0)
        sqlite3_bind_int64(st, 2, id2);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        if (plot_ints_push(layers, sqlite3_column_int(st, 0))) {
            plot_oom(ctx, what);
            goto cleanup;
        }
    if (rc != SQLITE_DONE) {
        plot_db_error(ctx, what);
        goto cleanup;
    }
    status = 0;
cleanup:
    sqlite3_finalize(st);
    return status;
}

/* A run's moe.experts from its configuration; 0 when it has none. */
static int plot_config_experts(PlotContext *ctx, int64_t run_id) {
    sqlite3_stmt *st = NULL;
    int experts = 0;
    if (sqlite3_prepare_v2(ctx->db, "SELECT json_extract(config, '$.model.moe.experts')"
                           " FROM runs WHERE run_id = ?1 AND json_valid(config)", -1, &st,
                           NULL) == SQLITE_OK) {
        sqlite3_bind_int64(st, 1, run_id);
        if (sqlite3_step(st) == SQLITE_ROW)
            experts = sqlite3_column_int(st, 0);
    }
    sqlite3_finalize(st);
    return experts > 0 && experts <= 65536 ? experts : 0;
}

/* The MoE layers of a recorded evaluation, from its expert load. */
static int plot_eval_layers(PlotContext *ctx, int64_t run_id, int64_t eval_id,
                            PlotInts *layers) {
    return plot_read_layers(ctx, "expert_load",
                            "SELECT DISTINCT layer FROM expert_load WHERE eval_id = ?2"
                            " AND run_id = ?1 ORDER BY layer", run_id, eval_id, layers);
}

/*
** The layer each run draws, for the runs that have the data (has[i]): the
** layer option when given, else the run's first MoE layer (layers[i] are
** sorted). A named run without the layer asked for is an error that lists
** its layers; with every run selected, runs without it are left out
** (has[i] = 0), and it is an error only if no run has it. what names the
** data the layers were read from.
*/
static int plot_choose_layer(PlotContext *ctx, int *has, const PlotInts *layers, int *chosen,
                             const char *what) {
    int layer = ctx->opt->layer, kept = 0, first_without = -1;
    char list[256];
    for (int i = 0; i < ctx->runs->count; i++) {
        if (!has[i])
            continue;
        if (layers[i].n == 0) {      /* data without layers: nothing to draw */
            has[i] = 0;
            continue;
        }
        if (layer == PLOT_LAYER_UNSET) {
            chosen[i] = layers[i].v[0];
            kept++;
            continue;
        }
        if (plot_ints_has(&layers[i], layer)) {
            chosen[i] = layer;
            kept++;
            continue;
        }
        plot_ints_format(&layers[i], list, sizeof list);
        if (ctx->runs->named)
            return ml_error(ctx->err, "run '%s' has no MoE layer %d in its %s (its MoE layers: "
                            "%s)", ctx->runs->runs[i].name, layer, what, list);
        if (first_without < 0)
            first_without = i;
        has[i] = 0;
    }
    if (kept == 0 && first_without >= 0) {
        plot_ints_format(&layers[first_without], list, sizeof list);
        return ml_error(ctx->err, "no run in '%s' has MoE layer %d in its %s (run '%s' has "
                        "MoE layers %s)", ctx->db_path, layer, what,
                        ctx->runs->runs[first_without].name, list);
    }
    return 0;
}

static const char *const plot_record_remedy =
    "evaluate it with record = true (run:evaluate{ record = true }); only MoE models record it";

/* Heatmap cells are written "x y value ..." and drawn as boxes: a value
** that is not a number leaves its cell blank. */
static void plot_put_value(FILE *gp, double x) {
    if (isfinite(x))
        fprintf(gp, "%.6g", x);
    else
        fputs("NaN", gp);
}

/* ---- figure "loss" ---------------------------------------------------- */

/*
** $train and $val: per run (index i-1 for run i) the rows "tokens loss" of
** metrics with that split, in step order; a run without rows gets one
** "NaN NaN" row so that the block indices stay aligned. Also has_train[i],
** has_val[i] (0 or 1), tokens_min (the smallest positive x, 0 if none) and
** tokens_max. The key has an entry per run and two for the kinds of line.
*/
static int plot_loss_data(PlotContext *ctx) {
    static const char *splits[] = {"train", "val"};
    FILE *gp = ctx->gp;
    PlotRuns *runs = ctx->runs;
    sqlite3_stmt *st = NULL;
    int *has_rows = calloc((size_t)runs->count * 2, sizeof *has_rows);
    double tokens_min = INFINITY, tokens_max = 0;
    int64_t points = 0;
    int status = -1;
    if (!has_rows) {
        plot_oom(ctx, "metrics");
        goto cleanup;
    }
    /* Runs never trained (a converted model evaluated at step 0) have no
    ** curve to draw, and no place on the tokens axis: with every run
    ** selected they are left out while some run has one; a run named
    ** without one is refused, as is a selection in which no run has one
    ** but some has an evaluation at 0 tokens (gnuplot found no axis). */
    int any = 0, untrained_rows = 0;
    if (plot_prepare(ctx, "metrics",
                     "SELECT EXISTS (SELECT 1 FROM metrics WHERE run_id = ?1 AND tokens > 0"
                     " AND loss IS NOT NULL), EXISTS (SELECT 1 FROM metrics WHERE run_id = ?1"
                     " AND tokens IS NOT NULL AND loss IS NOT NULL)", &st))
        goto cleanup;
    for (int i = 0; i < runs->count; i++) {
        sqlite3_bind_int64(st, 1, runs->runs[i].run_id);
        if (sqlite3_step(st) == SQLITE_ROW) {
            has_rows[i] = sqlite3_column_int(st, 0);
            untrained_rows |= !has_rows[i] && sqlite3_column_int(st, 1);
        }
        any |= has_rows[i];
        sqlite3_reset(st);
    }
    sqlite3_finalize(st);
    st = NULL;
    if ((any || runs->named || untrained_rows)
        && plot_keep_runs(ctx, has_rows, NULL, 0, "training (loss metrics past 0 tokens)",
                          "train it (run:train{})"))
        goto cleanup;
    memset(has_rows, 0, (size_t)runs->count * 2 * sizeof *has_rows);
    if (plot_prepare(ctx, "metrics",
                     "SELECT tokens, loss FROM metrics WHERE run_id = ?1 AND split = ?2"
                     " AND tokens IS NOT NULL AND loss IS NOT NULL ORDER BY step, rowid", &st))
        goto cleanup;
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
                plot_db_error(ctx, "metrics");
                goto cleanup;
            }
            sqlite3_reset(st);
            if (!*has)
                fputs("NaN NaN\n", gp);
        }
        fputs("EOD\n", gp);
    }
    if (points == 0) {
        ml_error(ctx->err, "'%s' has no train or val loss metrics for the selected run%s "
                 "(%s%s): train it (run:train{})", ctx->db_path, runs->count > 1 ? "s" : "",
                 runs->runs[0].name, runs->count > 1 ? ", ..." : "");
        goto cleanup;
    }
    plot_put_int_array(gp, "has_train", has_rows, runs->count);
    plot_put_int_array(gp, "has_val", has_rows + runs->count, runs->count);
    fprintf(gp, "tokens_min = %.1f\ntokens_max = %.1f\n",
            isfinite(tokens_min) ? tokens_min : 0.0, tokens_max);
    plot_key_of_runs(ctx, 0);
    plot_key_entry(ctx, 8);        /* "training" */
    plot_key_entry(ctx, 10);       /* "validation" */
    status = 0;
cleanup:
    sqlite3_finalize(st);
    free(has_rows);
    return status;
}

/* ---- figure "loss_vs_flops" ------------------------------------------- */

typedef struct {
    double loss, flops;  /* FFN FLOPs per token: MoE layers as run, dense FFNs from the config */
    int moe;             /* an MoE model */
} PlotValPoint;

typedef struct {
    int first, n;        /* its runs: points[first .. first + n - 1] after grouping */
    double loss, loss_sd, flops, flops_sd;
} PlotDesignPoint;

static void plot_mean_sd(const double *x, int n, int stride, double *mean, double *sd) {
    double sum = 0, sq = 0;
    for (int i = 0; i < n; i++)
        sum += x[i * stride];
    *mean = sum / n;
    for (int i = 0; i < n; i++)
        sq += (x[i * stride] - *mean) * (x[i * stride] - *mean);
    *sd = n > 1 ? sqrt(sq / (n - 1)) : 0.0;   /* the sample standard deviation */
}

/*
** Per design (runs of one name but for a sweep's "/seed=N", in the order
** their first run was selected; of a name run more than once, only its
** latest run with the data) the mean and sample standard deviation
** over its runs of the latest validation loss under the run's own router,
** and of its FFN FLOPs per token: the MoE layers' as recorded, plus 2 per
** multiply-add of the dense FFN blocks, from the run's configuration (a
** dense model is all dense blocks; a configuration without the sizes
** counts MoE FLOPs only).
**
** $designs: index d-1 for design d, one row "flops loss flops_sd loss_sd
** runs". $front: the Pareto front, "flops loss" rows by increasing FLOPs:
** the designs that no design of fewer or equal FLOPs matches in loss, and
** the last of them again at flops_max.
** ndesigns, design_title[d] (with its number of seeds), design_order[d]
** (the colour, as run_design), design_dense[d], design_runs[d],
** front_points, flops_max.
*/
static int plot_loss_vs_flops_data(PlotContext *ctx) {
    FILE *gp = ctx->gp;
    PlotRuns *runs = ctx->runs;
    sqlite3_stmt *st = NULL, *cfg = NULL;
    PlotValPoint *points = calloc((size_t)runs->count, sizeof *points);
    PlotDesignPoint *designs = calloc((size_t)runs->count, sizeof *designs);
    int *has = calloc((size_t)runs->count, sizeof *has);
    int *order = calloc((size_t)runs->count, sizeof *order);
    int *by_flops = calloc((size_t)runs->count, sizeof *by_flops);
    int *front = calloc((size_t)runs->count, sizeof *front);
    int *ints = calloc((size_t)runs->count * 3, sizeof *ints);
    double *values = calloc((size_t)runs->count * 2, sizeof *values);
    int status = -1, rc, ndesigns = 0, nfront = 0;
    if (!points || !designs || !has || !order || !by_flops || !front || !values || !ints) {
        plot_oom(ctx, "evals");
        goto cleanup;
    }
    if (plot_prepare(ctx, "evals",
                     "SELECT loss, coalesce(moe_flops_per_token, 0) FROM evals"
                     " WHERE run_id = ?1 AND split = 'val' AND router IS NULL AND complete = 1"
                     " AND loss IS NOT NULL ORDER BY step DESC, eval_id DESC LIMIT 1", &st)
        || plot_prepare(ctx, "runs",
                        "SELECT json_extract(c, '$.layers'), json_extract(c, '$.d_model'),"
                        " json_extract(c, '$.ffn.hidden'), json_extract(c, '$.activation'),"
                        " json_extract(c, '$.moe') IS NOT NULL,"
                        " coalesce(json_extract(c, '$.moe.every'), 1)"
                        " FROM (SELECT CASE WHEN json_valid(config)"
                        " THEN json_extract(config, '$.model') END AS c"
                        " FROM runs WHERE run_id = ?1)", &cfg))
        goto cleanup;
    for (int i = 0; i < runs->count; i++) {
        sqlite3_bind_int64(st, 1, runs->runs[i].run_id);
        rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            points[i].loss = sqlite3_column_double(st, 0);
            points[i].flops = sqlite3_column_double(st, 1);
            points[i].moe = points[i].flops > 0;
            has[i] = isfinite(points[i].loss) && isfinite(points[i].flops);
        } else if (rc != SQLITE_DONE) {
            plot_db_error(ctx, "evals");
            goto cleanup;
        }
        sqlite3_reset(st);
        sqlite3_bind_int64(cfg, 1, runs->runs[i].run_id);
        if (sqlite3_step(cfg) == SQLITE_ROW && sqlite3_column_type(cfg, 0) != SQLITE_NULL) {
            int layers = sqlite3_column_int(cfg, 0);
            double d = sqlite3_column_double(cfg, 1), hidden = sqlite3_column_double(cfg, 2);
            const char *act = (const char *)sqlite3_column_text(cfg, 3);
            int moe = sqlite3_column_int(cfg, 4), every = sqlite3_column_int(cfg, 5);
            int dense_blocks = layers - (moe && every > 0 ? layers / every : 0);
            double matrices = act && strcmp(act, "swiglu") == 0 ? 3 : 2;
            points[i].flops += 2.0 * matrices * d * hidden * dense_blocks;
            points[i].moe |= moe;
        }
        sqlite3_reset(cfg);
    }
    /* A name run again (a sweep's failed or interrupted seed run anew) is
    ** one of the design's runs, not another seed: its latest run with a
    ** validation evaluation stands for it, as in `moelab report`. */
    for (int i = 0; i < runs->count; i++)
        for (int j = 0; j < runs->count && has[i]; j++)
            if (j != i && has[j] && runs->runs[j].run_id > runs->runs[i].run_id
                && strcmp(runs->runs[j].name, runs->runs[i].name) == 0)
                has[i] = 0;
    if (plot_keep_runs(ctx, has, points, sizeof *points, "validation evaluation",
                       "evaluate it on the 'val' split (run:evaluate{} or train with "
                       "eval_every)"))
        goto cleanup;

    /* designs in the order of their first run; order[] lists runs by design */
    int placed = 0;
    for (int i = 0; i < runs->count; i++) {
        int seen = 0;
        for (int j = 0; j < i && !seen; j++)
            seen = strcmp(runs->runs[j].design, runs->runs[i].design) == 0;
        if (seen)
            continue;
        PlotDesignPoint *d = &designs[ndesigns++];
        d->first = placed;
        for (int j = i; j < runs->count; j++)
            if (strcmp(runs->runs[j].design, runs->runs[i].design) == 0) {
                values[2 * placed] = points[j].loss;
                values[2 * placed + 1] = points[j].flops;
                order[placed++] = j;
                d->n++;
            }
        plot_mean_sd(&values[2 * d->first], d->n, 2, &d->loss, &d->loss_sd);
        plot_mean_sd(&values[2 * d->first + 1], d->n, 2, &d->flops, &d->flops_sd);
    }
    /* the front: by FLOPs (then loss), each design better than all before it */
    for (int d = 0; d < ndesigns; d++)
        by_flops[d] = d;
    for (int a = 1; a < ndesigns; a++)
        for (int b = a; b > 0; b--) {
            const PlotDesignPoint *x = &designs[by_flops[b - 1]], *y = &designs[by_flops[b]];
            if (x->flops < y->flops || (x->flops == y->flops && x->loss <= y->loss))
                break;
            int t = by_flops[b - 1];
            by_flops[b - 1] = by_flops[b];
            by_flops[b] = t;
        }
    double best = INFINITY;
    for (int a = 0; a < ndesigns; a++)
        if (designs[by_flops[a]].loss < best) {
            best = designs[by_flops[a]].loss;
            front[nfront++] = by_flops[a];
        }

    double flops_max = 0;
    fputs("$designs << EOD\n", gp);
    for (int d = 0; d < ndesigns; d++) {
        if (d > 0)
            fputs("\n\n", gp);
        fprintf(gp, "%.9g %.9g %.9g %.9g %d\n", designs[d].flops, designs[d].loss,
                designs[d].flops_sd, designs[d].loss_sd, designs[d].n);
        if (designs[d].flops + designs[d].flops_sd > flops_max)
            flops_max = designs[d].flops + designs[d].flops_sd;
    }
    /* the front's last step runs on to the right edge: nothing past it does better */
    fputs("EOD\n$front << EOD\n", gp);
    for (int a = 0; a < nfront; a++)
        fprintf(gp, "%.9g %.9g\n", designs[front[a]].flops, designs[front[a]].loss);
    if (nfront > 0)
        fprintf(gp, "%.9g %.9g\n", flops_max, designs[front[nfront - 1]].loss);
    fputs("EOD\n", gp);
    fprintf(gp, "ndesigns = %d\narray design_title[%d]\n", ndesigns, ndesigns);
    for (int d = 0; d < ndesigns; d++) {
        int run = order[designs[d].first];
        const PlotRun *r = &runs->runs[run];
        char title[512], notes[64] = "";
        plot_short_name(r->design, title, sizeof title);
        if (!points[run].moe && !strstr(title, "dense"))
            strcat(notes, ", dense");
        if (r->noncausal)
            strcat(notes, ", non-causal");
        if (designs[d].n > 1)
            snprintf(notes + strlen(notes), sizeof notes - strlen(notes), ", %d seeds",
                     designs[d].n);
        if (notes[0])
            snprintf(title + strlen(title), sizeof title - strlen(title), " (%s)", notes + 2);
        fprintf(gp, "design_title[%d] = ", d + 1);
        plot_key_entry(ctx, plot_put_title(gp, title, ctx->title_chars));
        fputc('\n', gp);
    }
    plot_key_entry(ctx, 12);       /* "Pareto front" */
    for (int d = 0; d < ndesigns; d++) {
        int run = order[designs[d].first];
        ints[d] = runs->runs[run].design_order;
        ints[ndesigns + d] = !points[run].moe;
        ints[2 * ndesigns + d] = designs[d].n;
    }
    plot_put_int_array(gp, "design_order", ints, ndesigns);
    plot_put_int_array(gp, "design_dense", ints + ndesigns, ndesigns);
    plot_put_int_array(gp, "design_runs", ints + 2 * ndesigns, ndesigns);
    fprintf(gp, "front_points = %d\nflops_max = %.9g\n", nfront, flops_max);
    status = 0;
cleanup:
    sqlite3_finalize(st);
    sqlite3_finalize(cfg);
    free(points);
    free(designs);
    free(has);
    free(order);
    free(by_flops);
    free(front);
    free(values);
    free(ints);
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
** The latest recorded evaluation of a run, and its histogram: for every
** (token, layer) the number of routing rows, so that a stratified token's
** passes count together; tokens in token_stats that no expert took in a
** layer (expert choice) count 0.
*/
static int plot_experts_hist(PlotContext *ctx, int64_t run_id, PlotExpertsHist *h, int *found) {
    sqlite3_stmt *st = NULL;
    int status = -1, rc;
    *found = 0;
    if (plot_latest_recorded_eval(ctx, run_id, &h->eval_id, &h->step))
        return -1;
    if (h->eval_id < 0)
        return 0;
    if (plot_prepare(ctx, "routing",
                     "SELECT n, count(*) FROM (SELECT count(*) AS n FROM evals e JOIN routing r"
                     " ON r.routing_id BETWEEN e.routing_first AND e.routing_last"
                     " AND r.eval_id = e.eval_id WHERE e.eval_id = ?1"
                     " GROUP BY r.layer, r.seq, r.pos) GROUP BY n ORDER BY n", &st))
        goto cleanup;
    sqlite3_bind_int64(st, 1, h->eval_id);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        if (plot_hist_add(h, sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 1))) {
            plot_oom(ctx, "routing");
            goto cleanup;
        }
    if (rc != SQLITE_DONE) {
        plot_db_error(ctx, "routing");
        goto cleanup;
    }
    sqlite3_finalize(st);
    st = NULL;

    if (plot_prepare(ctx, "token_stats",
                     "SELECT (SELECT count(*) FROM token_stats WHERE eval_id = ?1)"
                     " * (SELECT count(DISTINCT r.layer) FROM evals e JOIN routing r"
                     " ON r.routing_id BETWEEN e.routing_first AND e.routing_last"
                     " AND r.eval_id = e.eval_id WHERE e.eval_id = ?1)", &st))
        goto cleanup;
    sqlite3_bind_int64(st, 1, h->eval_id);
    if (sqlite3_step(st) != SQLITE_ROW) {
        plot_db_error(ctx, "token_stats");
        goto cleanup;
    }
    int64_t unrouted = sqlite3_column_int64(st, 0) - h->total;
    if (unrouted > 0 && plot_hist_add(h, 0, unrouted)) {
        plot_oom(ctx, "routing");
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
static int plot_experts_per_token_data(PlotContext *ctx) {
    FILE *gp = ctx->gp;
    PlotRuns *runs = ctx->runs;
    PlotExpertsHist *hist = calloc((size_t)runs->count, sizeof *hist);
    int *has = calloc((size_t)runs->count, sizeof *has);
    int status = -1, count = runs->count, experts_max = 0;
    if (!hist || !has) {
        plot_oom(ctx, "routing");
        goto cleanup;
    }
    for (int i = 0; i < runs->count; i++)
        if (plot_experts_hist(ctx, runs->runs[i].run_id, &hist[i], &has[i]))
            goto cleanup;
    /* the histograms of runs left out are freed here, as they move */
    for (int i = 0; i < count; i++)
        if (!has[i]) {
            free(hist[i].pairs);
            hist[i].pairs = NULL;
        }
    if (plot_keep_runs(ctx, has, hist, sizeof *hist, "recorded routing", plot_record_remedy))
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
    plot_key_of_runs(ctx, 12);     /* " (mean 2.00)" */
    status = 0;
cleanup:
    for (int i = 0; hist && i < count; i++)
        free(hist[i].pairs);
    free(hist);
    free(has);
    return status;
}

/* ---- layer × expert heatmaps: "expert_load" and "sparsity" ------------- */

/*
** Writes a run's grid, row by row, as "expert row value layer" rows, where
** row numbers the run's layers from 0 and layer is the block number. sql
** gives "layer expert num den" rows ordered by layer and expert for ?1 =
** run_id and ?2 = id (bound as NULL when negative). With share_of_layer the
** value is num over the layer's total num (0 when the layer has none), and
** an expert missing from a layer counts 0; else it is num / den, and a cell
** without a row or with den 0 (an expert that ran no token has no share of
** near-zero activations) is NaN: left blank, not drawn as 0.
*/
static int plot_layer_expert_grid(PlotContext *ctx, const char *what, const char *sql,
                                  int64_t run_id, int64_t id, int share_of_layer, int *experts,
                                  int *layers, double *value_max) {
    typedef struct {
        int layer, expert;
        double num, den;
    } Cell;
    sqlite3_stmt *st = NULL;
    Cell *cells = NULL;
    double *layer_total = NULL;
    size_t n = 0, cap = 0;
    int status = -1, rc, n_experts = 0, n_layers = 0;
    if (plot_prepare(ctx, what, sql, &st))
        goto cleanup;
    sqlite3_bind_int64(st, 1, run_id);
    if (id >= 0)
        sqlite3_bind_int64(st, 2, id);
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
        c->num = sqlite3_column_double(st, 2);
        c->den = sqlite3_column_double(st, 3);
        if (c->expert >= n_experts)
            n_experts = c->expert + 1;
        if (n == 1 || c->layer != cells[n - 2].layer)
            n_layers++;
    }
    if (rc != SQLITE_DONE) {
        plot_db_error(ctx, what);
        goto cleanup;
    }
    layer_total = calloc((size_t)n_layers + 1, sizeof *layer_total);
    if (!layer_total)
        goto oom;
    for (size_t i = 0, row = 0; i < n; i++) {
        if (i > 0 && cells[i].layer != cells[i - 1].layer)
            row++;
        layer_total[row] += cells[i].num;
    }
    /* The grid row by row, experts without rows as 0; cells are sorted. */
    for (size_t i = 0, row = 0; i < n; row++) {
        int layer = cells[i].layer;
        for (int e = 0; e < n_experts; e++) {
            double value = share_of_layer ? 0.0 : NAN;
            if (i < n && cells[i].layer == layer && cells[i].expert == e) {
                const Cell *c = &cells[i++];
                if (share_of_layer)
                    value = layer_total[row] > 0 ? c->num / layer_total[row] : 0.0;
                else if (c->den > 0)
                    value = c->num / c->den;
            }
            if (value > *value_max)
                *value_max = value;
            fprintf(ctx->gp, "%d %zu ", e, row);
            plot_put_value(ctx->gp, value);
            fprintf(ctx->gp, " %d\n", layer);
        }
    }
    *experts = n_experts;
    *layers = n_layers;
    status = 0;
    goto cleanup;
oom:
    plot_oom(ctx, what);
cleanup:
    sqlite3_finalize(st);
    free(cells);
    free(layer_total);
    return status;
}

/* ---- figure "expert_load" --------------------------------------------- */

typedef struct {
    int64_t eval_id;     /* the evaluation drawn; -1: the training steps summed */
    int64_t step;        /* its step, or the last training step */
    int64_t steps;       /* training steps summed */
} PlotLoadSource;

/* The latest evaluation of the run with expert_load rows (its own router,
** not a probe), else its training steps; *found = 0 when it has neither. */
static int plot_load_source(PlotContext *ctx, int64_t run_id, PlotLoadSource *src, int *found) {
    sqlite3_stmt *st = NULL;
    int status = -1, rc;
    *found = 0;
    if (plot_prepare(ctx, "expert_load",
                     "SELECT e.eval_id, e.step FROM evals e WHERE e.run_id = ?1"
                     " AND e.router IS NULL AND e.split <> 'probe' AND e.complete = 1"
                     " AND EXISTS (SELECT 1 FROM expert_load l WHERE l.eval_id = e.eval_id)"
                     " ORDER BY e.eval_id DESC LIMIT 1", &st))
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
        plot_db_error(ctx, "expert_load");
        goto cleanup;
    }
    sqlite3_finalize(st);
    st = NULL;
    if (plot_prepare(ctx, "expert_load",
                     "SELECT count(DISTINCT step), max(step) FROM expert_load"
                     " WHERE run_id = ?1 AND eval_id IS NULL", &st))
        goto cleanup;
    sqlite3_bind_int64(st, 1, run_id);
    if (sqlite3_step(st) != SQLITE_ROW) {
        plot_db_error(ctx, "expert_load");
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
** $cells: per run (index i-1) one row per (layer, expert) cell, "expert row
** share layer", where share is the expert's part of the assignments its
** layer kept. Also panel_note[i] (what was summed), panel_experts[i],
** panel_layers[i] and value_max over every panel, for one colour scale.
*/
static int plot_expert_load_data(PlotContext *ctx) {
    FILE *gp = ctx->gp;
    PlotRuns *runs = ctx->runs;
    PlotLoadSource *src = calloc((size_t)runs->count, sizeof *src);
    int *has = calloc((size_t)runs->count, sizeof *has);
    int *experts = calloc((size_t)runs->count, sizeof *experts);
    int *layers = calloc((size_t)runs->count, sizeof *layers);
    double value_max = 0;
    int status = -1;
    if (!src || !has || !experts || !layers) {
        plot_oom(ctx, "expert_load");
        goto cleanup;
    }
    for (int i = 0; i < runs->count; i++)
        if (plot_load_source(ctx, runs->runs[i].run_id, &src[i], &has[i]))
            goto cleanup;
    if (plot_keep_runs(ctx, has, src, sizeof *src, "recorded expert load",
                       "only MoE models record it, at every training step and evaluation"))
        goto cleanup;
    fputs("$cells << EOD\n", gp);
    for (int i = 0; i < runs->count; i++) {
        if (i > 0)
            fputs("\n\n", gp);
        if (plot_layer_expert_grid(ctx, "expert_load",
                                   "SELECT layer, expert, sum(tokens), 0 FROM expert_load"
                                   " WHERE run_id = ?1 AND eval_id IS ?2 AND expert >= 0"
                                   " GROUP BY layer, expert ORDER BY layer, expert",
                                   runs->runs[i].run_id, src[i].eval_id, 1, &experts[i],
                                   &layers[i], &value_max))
            goto cleanup;
    }
    fputs("EOD\n", gp);
    fprintf(gp, "array panel_note[%d]\n", runs->count);
    for (int i = 0; i < runs->count; i++) {
        char note[128];
        if (src[i].eval_id >= 0)
            snprintf(note, sizeof note, "evaluation at step %lld", (long long)src[i].step);
        else
            snprintf(note, sizeof note, "training, %lld step%s summed",
                     (long long)src[i].steps, src[i].steps == 1 ? "" : "s");
        fprintf(gp, "panel_note[%d] = ", i + 1);
        plot_put_quoted(gp, "", note);
        fputc('\n', gp);
    }
    plot_put_int_array(gp, "panel_experts", experts, runs->count);
    plot_put_int_array(gp, "panel_layers", layers, runs->count);
    fprintf(gp, "value_max = %.6g\n", value_max > 0 ? value_max : 1.0);
    status = 0;
cleanup:
    free(src);
    free(has);
    free(experts);
    free(layers);
    return status;
}

/* ---- figure "sparsity" ------------------------------------------------ */

/*
** $cells: per run (index i-1) one row per (layer, expert) of its latest
** recorded evaluation, "expert row share layer", share the part of the
** expert's hidden activations with |a| <= eps. Also panel_note[i] (the
** evaluation's step and eps), panel_experts[i], panel_layers[i], value_max.
*/
static int plot_sparsity_data(PlotContext *ctx) {
    typedef struct {
        int64_t eval_id, step;
        double eps;
    } Source;
    FILE *gp = ctx->gp;
    PlotRuns *runs = ctx->runs;
    sqlite3_stmt *st = NULL;
    Source *src = calloc((size_t)runs->count, sizeof *src);
    int *has = calloc((size_t)runs->count, sizeof *has);
    int *experts = calloc((size_t)runs->count, sizeof *experts);
    int *layers = calloc((size_t)runs->count, sizeof *layers);
    double value_max = 0;
    int status = -1;
    if (!src || !has || !experts || !layers) {
        plot_oom(ctx, "sparsity");
        goto cleanup;
    }
    if (plot_prepare(ctx, "sparsity",
                     "SELECT (SELECT count(*) FROM sparsity WHERE eval_id = ?2 AND run_id = ?1),"
                     " (SELECT json_extract(config, '$.model.moe.sparsity_eps') FROM runs"
                     " WHERE run_id = ?1 AND json_valid(config))", &st))
        goto cleanup;
    for (int i = 0; i < runs->count; i++) {
        if (plot_latest_recorded_eval(ctx, runs->runs[i].run_id, &src[i].eval_id, &src[i].step))
            goto cleanup;
        if (src[i].eval_id < 0)
            continue;
        sqlite3_bind_int64(st, 1, runs->runs[i].run_id);
        sqlite3_bind_int64(st, 2, src[i].eval_id);
        if (sqlite3_step(st) != SQLITE_ROW) {
            plot_db_error(ctx, "sparsity");
            goto cleanup;
        }
        has[i] = sqlite3_column_int64(st, 0) > 0;
        src[i].eps = sqlite3_column_type(st, 1) == SQLITE_NULL ? NAN : sqlite3_column_double(st, 1);
        sqlite3_reset(st);
    }
    if (plot_keep_runs(ctx, has, src, sizeof *src, "recorded sparsity", plot_record_remedy))
        goto cleanup;
    fputs("$cells << EOD\n", gp);
    for (int i = 0; i < runs->count; i++) {
        if (i > 0)
            fputs("\n\n", gp);
        if (plot_layer_expert_grid(ctx, "sparsity",
                                   "SELECT layer, expert, sum(near_zero), sum(activations)"
                                   " FROM sparsity WHERE run_id = ?1 AND eval_id = ?2"
                                   " GROUP BY layer, expert ORDER BY layer, expert",
                                   runs->runs[i].run_id, src[i].eval_id, 0, &experts[i],
                                   &layers[i], &value_max))
            goto cleanup;
    }
    fputs("EOD\n", gp);
    fprintf(gp, "array panel_note[%d]\n", runs->count);
    for (int i = 0; i < runs->count; i++) {
        char note[128], eps[ML_NUMLEN];
        if (isfinite(src[i].eps))
            snprintf(note, sizeof note, "step %lld, |a| <= %s", (long long)src[i].step,
                     ml_number(eps, src[i].eps));
        else
            snprintf(note, sizeof note, "step %lld", (long long)src[i].step);
        fprintf(gp, "panel_note[%d] = ", i + 1);
        plot_put_quoted(gp, "", note);
        fputc('\n', gp);
    }
    plot_put_int_array(gp, "panel_experts", experts, runs->count);
    plot_put_int_array(gp, "panel_layers", layers, runs->count);
    fprintf(gp, "value_max = %.6g\n", value_max > 0 ? value_max : 1.0);
    status = 0;
cleanup:
    sqlite3_finalize(st);
    free(src);
    free(has);
    free(experts);
    free(layers);
    return status;
}

/* ---- figure "loss_by_experts" ----------------------------------------- */

/*
** $bins: per run (index i-1) one row per number of experts a token got
** (token_stats.experts, summed over the MoE layers), "experts_per_layer
** mean_loss ci95 share tokens": experts over the run's MoE layers, the
** mean loss of those tokens, 1.96 standard errors of that mean (0 for a
** single token), their share of the evaluation's tokens, and their count.
** From the latest recorded evaluation. Also eval_step[i], moe_layers[i],
** mean_loss[i] (over every token) and experts_max (per layer).
*/
static int plot_loss_by_experts_data(PlotContext *ctx) {
    typedef struct {
        int64_t eval_id, step;
        int layers;
    } Source;
    FILE *gp = ctx->gp;
    PlotRuns *runs = ctx->runs;
    sqlite3_stmt *count = NULL, *bins = NULL;
    Source *src = calloc((size_t)runs->count, sizeof *src);
    int *has = calloc((size_t)runs->count, sizeof *has);
    int *layers = calloc((size_t)runs->count, sizeof *layers);
    int64_t *steps = calloc((size_t)runs->count, sizeof *steps);
    double *mean_loss = calloc((size_t)runs->count, sizeof *mean_loss);
    double experts_max = 0;
    int status = -1, rc;
    if (!src || !has || !layers || !steps || !mean_loss) {
        plot_oom(ctx, "token_stats");
        goto cleanup;
    }
    if (plot_prepare(ctx, "token_stats",
                     "SELECT (SELECT count(*) FROM token_stats WHERE eval_id = ?2"
                     " AND run_id = ?1 AND loss IS NOT NULL AND experts IS NOT NULL),"
                     " (SELECT count(DISTINCT layer) FROM expert_load WHERE eval_id = ?2"
                     " AND run_id = ?1)", &count)
        || plot_prepare(ctx, "token_stats",
                        "SELECT experts, count(*), avg(loss), avg(loss * loss) FROM token_stats"
                        " WHERE eval_id = ?2 AND run_id = ?1 AND loss IS NOT NULL"
                        " AND experts IS NOT NULL GROUP BY experts ORDER BY experts", &bins))
        goto cleanup;
    for (int i = 0; i < runs->count; i++) {
        if (plot_latest_recorded_eval(ctx, runs->runs[i].run_id, &src[i].eval_id, &src[i].step))
            goto cleanup;
        if (src[i].eval_id < 0)
            continue;
        sqlite3_bind_int64(count, 1, runs->runs[i].run_id);
        sqlite3_bind_int64(count, 2, src[i].eval_id);
        if (sqlite3_step(count) != SQLITE_ROW) {
            plot_db_error(ctx, "token_stats");
            goto cleanup;
        }
        has[i] = sqlite3_column_int64(count, 0) > 0;
        src[i].layers = sqlite3_column_int(count, 1);
        if (src[i].layers < 1)
            src[i].layers = 1;
        sqlite3_reset(count);
    }
    if (plot_keep_runs(ctx, has, src, sizeof *src, "recorded per-token losses (token_stats)",
                       plot_record_remedy))
        goto cleanup;
    fputs("$bins << EOD\n", gp);
    for (int i = 0; i < runs->count; i++) {
        if (i > 0)
            fputs("\n\n", gp);
        sqlite3_bind_int64(bins, 1, runs->runs[i].run_id);
        sqlite3_bind_int64(bins, 2, src[i].eval_id);
        /* two passes over the bins: the total first, for the shares */
        int64_t total = 0;
        double loss_sum = 0;
        while ((rc = sqlite3_step(bins)) == SQLITE_ROW) {
            total += sqlite3_column_int64(bins, 1);
            loss_sum += sqlite3_column_double(bins, 2) * (double)sqlite3_column_int64(bins, 1);
        }
        if (rc != SQLITE_DONE) {
            plot_db_error(ctx, "token_stats");
            goto cleanup;
        }
        sqlite3_reset(bins);
        while ((rc = sqlite3_step(bins)) == SQLITE_ROW) {
            double experts = sqlite3_column_double(bins, 0) / src[i].layers;
            int64_t n = sqlite3_column_int64(bins, 1);
            double mean = sqlite3_column_double(bins, 2), sq = sqlite3_column_double(bins, 3);
            double var = n > 1 ? fmax(0.0, sq - mean * mean) * (double)n / (double)(n - 1) : 0.0;
            fprintf(gp, "%.6g %.9g %.6g %.6g %lld\n", experts, mean, 1.96 * sqrt(var / (double)n),
                    (double)n / (double)total, (long long)n);
            if (experts > experts_max)
                experts_max = experts;
        }
        if (rc != SQLITE_DONE) {
            plot_db_error(ctx, "token_stats");
            goto cleanup;
        }
        sqlite3_reset(bins);
        layers[i] = src[i].layers;
        steps[i] = src[i].step;
        mean_loss[i] = loss_sum / (double)total;
    }
    fputs("EOD\n", gp);
    fprintf(gp, "array eval_step[%d]\n", runs->count);
    for (int i = 0; i < runs->count; i++)
        fprintf(gp, "eval_step[%d] = %lld\n", i + 1, (long long)steps[i]);
    plot_put_int_array(gp, "moe_layers", layers, runs->count);
    plot_put_double_array(gp, "mean_loss", mean_loss, runs->count);
    fprintf(gp, "experts_max = %.6g\n", experts_max);
    plot_key_of_runs(ctx, 0);
    status = 0;
cleanup:
    sqlite3_finalize(count);
    sqlite3_finalize(bins);
    free(src);
    free(has);
    free(layers);
    free(steps);
    free(mean_loss);
    return status;
}

/* ---- figure "load_over_training" -------------------------------------- */

/* The most columns of steps a panel gets: past it, steps are summed in
** groups, so that a long run stays a light vector figure. */
#define PLOT_STEP_BINS 120

/*
** $cells: per run (index i-1) one row per (group of steps, expert) of the
** layer drawn, "step expert share half_width": the group's middle step, the
** expert's share of the layer's assignments kept over those steps (0 when
** it kept none), and half the group's width in steps. Groups are
** consecutive recorded steps, at most PLOT_STEP_BINS of them, as equal in
** count as they divide. Also panel_layer[i], panel_experts[i],
** panel_steps[i] (the steps recorded), step_max and value_max.
*/
static int plot_load_over_training_data(PlotContext *ctx) {
    FILE *gp = ctx->gp;
    PlotRuns *runs = ctx->runs;
    sqlite3_stmt *steps_st = NULL, *rows = NULL;
    PlotInts *layer_lists = calloc((size_t)runs->count, sizeof *layer_lists);
    int *has = calloc((size_t)runs->count, sizeof *has);
    int *chosen = calloc((size_t)runs->count, sizeof *chosen);
    int *experts = calloc((size_t)runs->count, sizeof *experts);
    int *nsteps = calloc((size_t)runs->count, sizeof *nsteps);
    int64_t *step_list = NULL;
    double *tokens = NULL;
    int status = -1, rc, count = runs->count;
    double value_max = 0, step_max = 0;
    if (!layer_lists || !has || !chosen || !experts || !nsteps) {
        plot_oom(ctx, "expert_load");
        goto cleanup;
    }
    /* the MoE layers of a run: those of its first recorded step */
    for (int i = 0; i < runs->count; i++) {
        if (plot_read_layers(ctx, "expert_load",
                             "SELECT DISTINCT layer FROM expert_load WHERE run_id = ?1"
                             " AND eval_id IS NULL AND step = (SELECT min(step) FROM expert_load"
                             " WHERE run_id = ?1 AND eval_id IS NULL) ORDER BY layer",
                             runs->runs[i].run_id, -1, &layer_lists[i]))
            goto cleanup;
        has[i] = layer_lists[i].n > 0;
    }
    if (plot_choose_layer(ctx, has, layer_lists, chosen, "training steps' expert load"))
        goto cleanup;
    /* layer_lists keeps its place: it is freed by the original count */
    if (plot_keep_runs(ctx, has, chosen, sizeof *chosen, "expert load recorded in training",
                       "only MoE models record it, at every training step"))
        goto cleanup;
    if (plot_prepare(ctx, "expert_load",
                     "SELECT DISTINCT step FROM expert_load WHERE run_id = ?1"
                     " AND eval_id IS NULL AND layer = ?2 ORDER BY step", &steps_st)
        || plot_prepare(ctx, "expert_load",
                        "SELECT step, expert, sum(tokens) FROM expert_load WHERE run_id = ?1"
                        " AND eval_id IS NULL AND layer = ?2 AND expert >= 0"
                        " GROUP BY step, expert ORDER BY step, expert", &rows))
        goto cleanup;
    fputs("$cells << EOD\n", gp);
    for (int i = 0; i < runs->count; i++) {
        size_t n = 0, cap = 0;
        if (i > 0)
            fputs("\n\n", gp);
        sqlite3_bind_int64(steps_st, 1, runs->runs[i].run_id);
        sqlite3_bind_int(steps_st, 2, chosen[i]);
        while ((rc = sqlite3_step(steps_st)) == SQLITE_ROW) {
            if (n == cap) {
                cap = cap ? 2 * cap : 256;
                int64_t *grown = realloc(step_list, cap * sizeof *grown);
                if (!grown) {
                    plot_oom(ctx, "expert_load");
                    goto cleanup;
                }
                step_list = grown;
            }
            step_list[n++] = sqlite3_column_int64(steps_st, 0);
        }
        sqlite3_reset(steps_st);
        if (rc != SQLITE_DONE || n == 0) {
            plot_db_error(ctx, "expert_load");
            goto cleanup;
        }
        int nbins = n < PLOT_STEP_BINS ? (int)n : PLOT_STEP_BINS, n_experts = 0;
        /* first pass: the experts; second: tokens by (group, expert) */
        sqlite3_bind_int64(rows, 1, runs->runs[i].run_id);
        sqlite3_bind_int(rows, 2, chosen[i]);
        while ((rc = sqlite3_step(rows)) == SQLITE_ROW)
            if (sqlite3_column_int(rows, 1) >= n_experts)
                n_experts = sqlite3_column_int(rows, 1) + 1;
        sqlite3_reset(rows);
        free(tokens);
        tokens = calloc((size_t)nbins * (size_t)(n_experts + 1), sizeof *tokens);
        if (!tokens) {
            plot_oom(ctx, "expert_load");
            goto cleanup;
        }
        size_t at = 0;   /* the index in step_list of the row's step */
        while ((rc = sqlite3_step(rows)) == SQLITE_ROW) {
            int64_t step = sqlite3_column_int64(rows, 0);
            while (at < n && step_list[at] < step)
                at++;
            int bin = (int)(at * (size_t)nbins / n);
            tokens[(size_t)bin * (size_t)(n_experts + 1) + (size_t)sqlite3_column_int(rows, 1)] +=
                sqlite3_column_double(rows, 2);
        }
        sqlite3_reset(rows);
        if (rc != SQLITE_DONE) {
            plot_db_error(ctx, "expert_load");
            goto cleanup;
        }
        for (int b = 0; b < nbins; b++) {
            /* the group holds step_list[first .. next-1]: the indices j with
            ** j * nbins / n == b, as the assignment above computes it */
            size_t first = ((size_t)b * n + (size_t)nbins - 1) / (size_t)nbins;
            size_t next = ((size_t)(b + 1) * n + (size_t)nbins - 1) / (size_t)nbins;
            double lo = (double)step_list[first] - 0.5;
            double hi = next < n ? (double)step_list[next] - 0.5 : (double)step_list[n - 1] + 0.5;
            double total = 0;
            const double *row = &tokens[(size_t)b * (size_t)(n_experts + 1)];
            for (int e = 0; e < n_experts; e++)
                total += row[e];
            for (int e = 0; e < n_experts; e++) {
                double share = total > 0 ? row[e] / total : 0.0;
                if (share > value_max)
                    value_max = share;
                fprintf(gp, "%.6g %d %.6g %.6g\n", (lo + hi) / 2, e, share, (hi - lo) / 2);
            }
            if (hi > step_max)
                step_max = hi;
        }
        experts[i] = n_experts;
        nsteps[i] = (int)n;
    }
    fputs("EOD\n", gp);
    plot_put_int_array(gp, "panel_layer", chosen, runs->count);
    plot_put_int_array(gp, "panel_experts", experts, runs->count);
    plot_put_int_array(gp, "panel_steps", nsteps, runs->count);
    fprintf(gp, "step_max = %.6g\nvalue_max = %.6g\n", step_max, value_max > 0 ? value_max : 1.0);
    status = 0;
cleanup:
    sqlite3_finalize(steps_st);
    sqlite3_finalize(rows);
    plot_ints_free(layer_lists, count);
    free(layer_lists);
    free(has);
    free(chosen);
    free(experts);
    free(nsteps);
    free(step_list);
    free(tokens);
    return status;
}

/* ---- figure "dropped_vs_capacity" ------------------------------------- */

typedef struct {
    double capacity;        /* moe.router.capacity_factor; 0 = dropless */
    double train, eval;     /* dropped / (kept + dropped); NaN: none recorded */
    char rule[64];          /* the router's rule, "topk k=2": one curve each */
} PlotDropPoint;

/*
** Per run: its capacity factor (runs.config), the share of its training
** steps' assignments that were dropped (expert_load rows with eval_id NULL,
** every layer) and the same for its latest evaluation under its own router.
** Runs are drawn in series, one per router rule (kind and k or p), in the
** order of their first run. $train and $eval: per series (index s-1)
** "capacity dropped" rows, one per run; $means: per series one row per
** capacity factor, "capacity train_mean eval_mean" (NaN when none), a blank
** line after dropless (0) so that no line joins it to the factors. Also
** nseries, series_title[s], capacity_max.
*/
static int plot_dropped_vs_capacity_data(PlotContext *ctx) {
    FILE *gp = ctx->gp;
    PlotRuns *runs = ctx->runs;
    sqlite3_stmt *cfg = NULL, *train = NULL, *eval = NULL;
    PlotDropPoint *points = calloc((size_t)runs->count, sizeof *points);
    int *has = calloc((size_t)runs->count, sizeof *has);
    int *series = calloc((size_t)runs->count, sizeof *series);
    double *caps = calloc((size_t)runs->count, sizeof *caps);
    int status = -1, nseries = 0;
    double capacity_max = 0;
    if (!points || !has || !series || !caps) {
        plot_oom(ctx, "expert_load");
        goto cleanup;
    }
    if (plot_prepare(ctx, "expert_load",
                     "SELECT sum(dropped), sum(tokens) + sum(dropped) FROM expert_load"
                     " WHERE run_id = ?1 AND eval_id IS NULL", &train)
        || plot_prepare(ctx, "expert_load",
                        "SELECT sum(l.dropped), sum(l.tokens) + sum(l.dropped) FROM expert_load l"
                        " WHERE l.eval_id = (SELECT e.eval_id FROM evals e WHERE e.run_id = ?1"
                        " AND e.router IS NULL AND e.split <> 'probe' AND e.complete = 1"
                        " AND EXISTS (SELECT 1 FROM expert_load x WHERE x.eval_id = e.eval_id)"
                        " ORDER BY e.eval_id DESC LIMIT 1)", &eval)
        || plot_prepare(ctx, "runs",
                        "SELECT json_extract(r, '$.capacity_factor'), json_extract(r, '$.kind'),"
                        " json_extract(r, '$.k'), json_extract(r, '$.p') FROM"
                        " (SELECT CASE WHEN json_valid(config)"
                        " THEN json_extract(config, '$.model.moe.router') END AS r"
                        " FROM runs WHERE run_id = ?1)", &cfg))
        goto cleanup;
    for (int i = 0; i < runs->count; i++) {
        PlotDropPoint *p = &points[i];
        p->train = p->eval = NAN;
        sqlite3_bind_int64(train, 1, runs->runs[i].run_id);
        sqlite3_bind_int64(eval, 1, runs->runs[i].run_id);
        if (sqlite3_step(train) != SQLITE_ROW || sqlite3_step(eval) != SQLITE_ROW) {
            plot_db_error(ctx, "expert_load");
            goto cleanup;
        }
        if (sqlite3_column_double(train, 1) > 0)
            p->train = sqlite3_column_double(train, 0) / sqlite3_column_double(train, 1);
        if (sqlite3_column_double(eval, 1) > 0)
            p->eval = sqlite3_column_double(eval, 0) / sqlite3_column_double(eval, 1);
        sqlite3_reset(train);
        sqlite3_reset(eval);
        has[i] = isfinite(p->train) || isfinite(p->eval);
    }
    if (plot_keep_runs(ctx, has, points, sizeof *points, "recorded expert load",
                       "only MoE models record it, at every training step and evaluation"))
        goto cleanup;
    for (int i = 0; i < runs->count; i++) {
        PlotDropPoint *p = &points[i];
        sqlite3_bind_int64(cfg, 1, runs->runs[i].run_id);
        has[i] = 0;
        if (sqlite3_step(cfg) == SQLITE_ROW && sqlite3_column_type(cfg, 0) != SQLITE_NULL) {
            const char *kind = (const char *)sqlite3_column_text(cfg, 1);
            char k[ML_NUMLEN], pv[ML_NUMLEN];
            p->capacity = sqlite3_column_double(cfg, 0);
            if (sqlite3_column_type(cfg, 2) != SQLITE_NULL && kind && strcmp(kind, "topk") == 0)
                snprintf(p->rule, sizeof p->rule, "topk k=%s",
                         ml_number(k, sqlite3_column_double(cfg, 2)));
            else if (sqlite3_column_type(cfg, 3) != SQLITE_NULL)
                snprintf(p->rule, sizeof p->rule, "%s p=%s", kind ? kind : "router",
                         ml_number(pv, sqlite3_column_double(cfg, 3)));
            else
                snprintf(p->rule, sizeof p->rule, "%s", kind ? kind : "router");
            has[i] = isfinite(p->capacity);
        }
        sqlite3_reset(cfg);
    }
    if (plot_keep_runs(ctx, has, points, sizeof *points, "capacity factor in its configuration",
                       "its router takes none (moe.router.capacity_factor; 0 is dropless)"))
        goto cleanup;
    /* series by rule, in order of their first run */
    for (int i = 0; i < runs->count; i++) {
        series[i] = -1;
        for (int j = 0; j < i && series[i] < 0; j++)
            if (strcmp(points[j].rule, points[i].rule) == 0)
                series[i] = series[j];
        if (series[i] < 0)
            series[i] = nseries++;
        if (points[i].capacity > capacity_max)
            capacity_max = points[i].capacity;
    }
    for (int which = 0; which < 2; which++) {
        fputs(which == 0 ? "$train << EOD\n" : "$eval << EOD\n", gp);
        for (int s = 0; s < nseries; s++) {
            int any = 0;
            if (s > 0)
                fputs("\n\n", gp);
            for (int i = 0; i < runs->count; i++) {
                double y = which == 0 ? points[i].train : points[i].eval;
                if (series[i] != s || !isfinite(y))
                    continue;
                fprintf(gp, "%.6g %.6g\n", points[i].capacity, y);
                any = 1;
            }
            if (!any)
                fputs("NaN NaN\n", gp);
        }
        fputs("EOD\n", gp);
    }
    /* means per capacity factor, by increasing factor */
    fputs("$means << EOD\n", gp);
    for (int s = 0; s < nseries; s++) {
        int ncaps = 0;
        if (s > 0)
            fputs("\n\n", gp);
        for (int i = 0; i < runs->count; i++) {
            int seen = 0;
            for (int c = 0; c < ncaps && !seen; c++)
                seen = caps[c] == points[i].capacity;
            if (series[i] == s && !seen)
                caps[ncaps++] = points[i].capacity;
        }
        for (int a = 1; a < ncaps; a++)   /* few: insertion sort */
            for (int b = a; b > 0 && caps[b - 1] > caps[b]; b--) {
                double t = caps[b - 1];
                caps[b - 1] = caps[b];
                caps[b] = t;
            }
        for (int c = 0; c < ncaps; c++) {
            double sum[2] = {0, 0};
            int n[2] = {0, 0};
            for (int i = 0; i < runs->count; i++) {
                if (series[i] != s || points[i].capacity != caps[c])
                    continue;
                if (isfinite(points[i].train))
                    sum[0] += points[i].train, n[0]++;
                if (isfinite(points[i].eval))
                    sum[1] += points[i].eval, n[1]++;
            }
            fprintf(gp, "%.6g ", caps[c]);
            plot_put_value(gp, n[0] ? sum[0] / n[0] : NAN);
            fputc(' ', gp);
            plot_put_value(gp, n[1] ? sum[1] / n[1] : NAN);
            fputc('\n', gp);
            if (caps[c] == 0 && c + 1 < ncaps)
                fputc('\n', gp);   /* dropless is no factor: no line from it to 1 */
        }
    }
    fputs("EOD\n", gp);
    fprintf(gp, "nseries = %d\narray series_title[%d]\n", nseries, nseries);
    for (int s = 0; s < nseries; s++)
        for (int i = 0; i < runs->count; i++)
            if (series[i] == s) {
                fprintf(gp, "series_title[%d] = ", s + 1);
                plot_put_quoted(gp, "", points[i].rule);
                fputc('\n', gp);
                plot_key_entry(ctx, (int)strlen(points[i].rule));
                break;
            }
    fprintf(gp, "capacity_max = %.6g\n", capacity_max);
    plot_key_entry(ctx, 8);        /* "training" */
    plot_key_entry(ctx, 10);       /* "evaluation" */
    status = 0;
cleanup:
    sqlite3_finalize(cfg);
    sqlite3_finalize(train);
    sqlite3_finalize(eval);
    free(points);
    free(has);
    free(series);
    free(caps);
    return status;
}

/* ---- figure "cooccurrence" -------------------------------------------- */

/*
** Per run, from its latest recorded evaluation: of the tokens whose first
** choice (rank 0, first pass) in layer a is expert i, the share whose first
** choice in layer b is expert j. $cells: per run (index i-1) one row per
** (i, j), "j i share count" (share NaN when layer a never chose i first),
** for every expert of the configuration (moe.experts) or of the rows.
** Layers a and b are the option's, or the run's first two MoE layers. Also
** panel_layer_a[i], panel_layer_b[i], panel_experts_a[i], panel_experts_b[i],
** value_max.
*/
static int plot_cooccurrence_data(PlotContext *ctx) {
    typedef struct {
        int64_t eval_id, step;
        int a, b;
    } Source;
    FILE *gp = ctx->gp;
    PlotRuns *runs = ctx->runs;
    sqlite3_stmt *st = NULL;
    Source *src = calloc((size_t)runs->count, sizeof *src);
    PlotInts *layer_lists = calloc((size_t)runs->count, sizeof *layer_lists);
    int *has = calloc((size_t)runs->count, sizeof *has);
    int *ints = calloc((size_t)runs->count * 4, sizeof *ints);
    int64_t *counts = NULL;
    int status = -1, rc, count = runs->count, two_layers_missing = -1;
    double value_max = 0;
    const int *given = ctx->opt->layers;
    if (!src || !layer_lists || !has || !ints) {
        plot_oom(ctx, "routing");
        goto cleanup;
    }
    for (int i = 0; i < runs->count; i++) {
        if (plot_latest_recorded_eval(ctx, runs->runs[i].run_id, &src[i].eval_id, &src[i].step))
            goto cleanup;
        if (src[i].eval_id >= 0
            && plot_eval_layers(ctx, runs->runs[i].run_id, src[i].eval_id, &layer_lists[i]))
            goto cleanup;
        has[i] = src[i].eval_id >= 0 && layer_lists[i].n > 0;
    }
    for (int i = 0; i < runs->count; i++) {
        if (!has[i])
            continue;
        char list[256];
        plot_ints_format(&layer_lists[i], list, sizeof list);
        if (given[0] != PLOT_LAYER_UNSET) {
            for (int k = 0; k < 2; k++)
                if (!plot_ints_has(&layer_lists[i], given[k])) {
                    if (runs->named) {
                        ml_error(ctx->err, "run '%s' has no MoE layer %d in its recorded "
                                 "evaluation (its MoE layers: %s)", runs->runs[i].name,
                                 given[k], list);
                        goto cleanup;
                    }
                    has[i] = 0;
                }
            src[i].a = given[0];
            src[i].b = given[1];
        } else if (layer_lists[i].n >= 2) {
            src[i].a = layer_lists[i].v[0];
            src[i].b = layer_lists[i].v[1];
        } else {
            if (runs->named) {
                ml_error(ctx->err, "run '%s' has one MoE layer (%s): cooccurrence draws two "
                         "(the layers option can name one twice)", runs->runs[i].name, list);
                goto cleanup;
            }
            two_layers_missing = i;
            has[i] = 0;
        }
    }
    int any = 0;
    for (int i = 0; i < runs->count; i++)
        any |= has[i];
    if (!any && (given[0] != PLOT_LAYER_UNSET || two_layers_missing >= 0)) {
        int i = two_layers_missing;
        for (int j = 0; i < 0 && j < runs->count; j++)
            if (layer_lists[j].n > 0)
                i = j;
        if (i >= 0) {
            char list[256];
            plot_ints_format(&layer_lists[i], list, sizeof list);
            if (given[0] != PLOT_LAYER_UNSET)
                ml_error(ctx->err, "no run in '%s' has MoE layers %d and %d in its recorded "
                         "evaluation (run '%s' has %s)", ctx->db_path, given[0], given[1],
                         runs->runs[i].name, list);
            else
                ml_error(ctx->err, "no run in '%s' has two MoE layers in its recorded evaluation "
                         "(run '%s' has %s)", ctx->db_path, runs->runs[i].name, list);
            goto cleanup;
        }
    }
    if (plot_keep_runs(ctx, has, src, sizeof *src, "recorded routing", plot_record_remedy))
        goto cleanup;
    if (plot_prepare(ctx, "routing",
                     "WITH first AS (SELECT r.layer, r.seq, r.pos, r.expert FROM evals e"
                     " JOIN routing r ON r.routing_id BETWEEN e.routing_first AND e.routing_last"
                     " AND r.eval_id = e.eval_id WHERE e.eval_id = ?1 AND r.rank = 0"
                     " AND r.pass = 0 AND r.layer IN (?2, ?3))"
                     " SELECT a.expert, b.expert, count(*) FROM first a JOIN first b"
                     " ON a.seq = b.seq AND a.pos = b.pos WHERE a.layer = ?2 AND b.layer = ?3"
                     " GROUP BY a.expert, b.expert", &st))
        goto cleanup;
    fputs("$cells << EOD\n", gp);
    for (int i = 0; i < runs->count; i++) {
        int ea = plot_config_experts(ctx, runs->runs[i].run_id), eb = ea;
        if (i > 0)
            fputs("\n\n", gp);
        sqlite3_bind_int64(st, 1, src[i].eval_id);
        sqlite3_bind_int(st, 2, src[i].a);
        sqlite3_bind_int(st, 3, src[i].b);
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {   /* the grid's size */
            if (sqlite3_column_int(st, 0) >= ea)
                ea = sqlite3_column_int(st, 0) + 1;
            if (sqlite3_column_int(st, 1) >= eb)
                eb = sqlite3_column_int(st, 1) + 1;
        }
        sqlite3_reset(st);
        free(counts);
        counts = calloc((size_t)(ea + 1) * (size_t)(eb + 1), sizeof *counts);
        if (!counts) {
            plot_oom(ctx, "routing");
            goto cleanup;
        }
        while ((rc = sqlite3_step(st)) == SQLITE_ROW)
            counts[(size_t)sqlite3_column_int(st, 0) * (size_t)eb
                   + (size_t)sqlite3_column_int(st, 1)] += sqlite3_column_int64(st, 2);
        sqlite3_reset(st);
        if (rc != SQLITE_DONE) {
            plot_db_error(ctx, "routing");
            goto cleanup;
        }
        for (int x = 0; x < ea; x++) {
            int64_t row = 0;
            for (int y = 0; y < eb; y++)
                row += counts[(size_t)x * (size_t)eb + (size_t)y];
            for (int y = 0; y < eb; y++) {
                int64_t c = counts[(size_t)x * (size_t)eb + (size_t)y];
                double share = row > 0 ? (double)c / (double)row : NAN;
                if (share > value_max)
                    value_max = share;
                fprintf(gp, "%d %d ", y, x);
                plot_put_value(gp, share);
                fprintf(gp, " %lld\n", (long long)c);
            }
        }
        if (ea == 0)
            fputs("NaN NaN NaN 0\n", gp);
        ints[i] = src[i].a;
        ints[runs->count + i] = src[i].b;
        ints[2 * runs->count + i] = ea;
        ints[3 * runs->count + i] = eb;
    }
    fputs("EOD\n", gp);
    plot_put_int_array(gp, "panel_layer_a", ints, runs->count);
    plot_put_int_array(gp, "panel_layer_b", ints + runs->count, runs->count);
    plot_put_int_array(gp, "panel_experts_a", ints + 2 * runs->count, runs->count);
    plot_put_int_array(gp, "panel_experts_b", ints + 3 * runs->count, runs->count);
    fprintf(gp, "value_max = %.6g\n", value_max > 0 ? value_max : 1.0);
    status = 0;
cleanup:
    sqlite3_finalize(st);
    plot_ints_free(layer_lists, count);
    free(layer_lists);
    free(src);
    free(has);
    free(ints);
    free(counts);
    return status;
}

/* ---- figure "byte_classes" -------------------------------------------- */

enum { PLOT_BYTE_CLASSES = 6 };
static const char *const plot_byte_class_names[PLOT_BYTE_CLASSES] = {
    "letters", "digits", "spaces", "punct.", "newlines", "other",
};

static int plot_byte_class(int byte) {
    if ((byte >= 'a' && byte <= 'z') || (byte >= 'A' && byte <= 'Z'))
        return 0;
    if (byte >= '0' && byte <= '9')
        return 1;
    if (byte == ' ' || byte == '\t')
        return 2;
    if (byte == '\n' || byte == '\r')
        return 4;
    if (byte > 32 && byte < 127)   /* what is left of printable ASCII */
        return 3;
    return 5;
}

/*
** Per run, in one layer of its latest recorded evaluation: for each class of
** input byte (letters, digits, spaces, punctuation, newlines, other bytes)
** the share of the class's tokens that each expert processed (any rank or
** pass; a row sums to the class's experts per token). The class's tokens
** are its token_stats rows, or without them its tokens in that layer's
** routing. $cells: per run (index i-1) "expert row share label" rows, row
** counting the classes present from 0 (letters first), label the class and
** its share of the tokens ("letters 71%"). Also panel_layer[i],
** panel_experts[i], panel_classes[i], value_max.
*/
static int plot_byte_classes_data(PlotContext *ctx) {
    typedef struct {
        int64_t eval_id, step;
        int layer;
    } Source;
    FILE *gp = ctx->gp;
    PlotRuns *runs = ctx->runs;
    sqlite3_stmt *routed = NULL, *tokens = NULL, *fallback = NULL;
    Source *src = calloc((size_t)runs->count, sizeof *src);
    PlotInts *layer_lists = calloc((size_t)runs->count, sizeof *layer_lists);
    int *has = calloc((size_t)runs->count, sizeof *has);
    int *chosen = calloc((size_t)runs->count, sizeof *chosen);
    int *experts = calloc((size_t)runs->count, sizeof *experts);
    int *classes = calloc((size_t)runs->count, sizeof *classes);
    int64_t *cells = NULL;
    int status = -1, rc, count = runs->count;
    double value_max = 0;
    if (!src || !layer_lists || !has || !chosen || !experts || !classes) {
        plot_oom(ctx, "routing");
        goto cleanup;
    }
    for (int i = 0; i < runs->count; i++) {
        if (plot_latest_recorded_eval(ctx, runs->runs[i].run_id, &src[i].eval_id, &src[i].step))
            goto cleanup;
        if (src[i].eval_id >= 0
            && plot_eval_layers(ctx, runs->runs[i].run_id, src[i].eval_id, &layer_lists[i]))
            goto cleanup;
        has[i] = src[i].eval_id >= 0;
    }
    if (plot_choose_layer(ctx, has, layer_lists, chosen, "recorded evaluation"))
        goto cleanup;
    for (int i = 0; i < runs->count; i++)   /* the layer moves with its run */
        src[i].layer = chosen[i];
    if (plot_keep_runs(ctx, has, src, sizeof *src, "recorded routing", plot_record_remedy))
        goto cleanup;
    for (int i = 0; i < runs->count; i++)
        chosen[i] = src[i].layer;
    if (plot_prepare(ctx, "routing",
                     "SELECT token, expert, count(*) FROM (SELECT DISTINCT r.seq, r.pos,"
                     " r.token, r.expert FROM evals e JOIN routing r"
                     " ON r.routing_id BETWEEN e.routing_first AND e.routing_last"
                     " AND r.eval_id = e.eval_id WHERE e.eval_id = ?1 AND r.layer = ?2)"
                     " GROUP BY token, expert", &routed)
        || plot_prepare(ctx, "token_stats",
                        "SELECT token, count(*) FROM token_stats WHERE eval_id = ?1"
                        " GROUP BY token", &tokens)
        || plot_prepare(ctx, "routing",
                        "SELECT token, count(*) FROM (SELECT DISTINCT r.seq, r.pos, r.token"
                        " FROM evals e JOIN routing r"
                        " ON r.routing_id BETWEEN e.routing_first AND e.routing_last"
                        " AND r.eval_id = e.eval_id WHERE e.eval_id = ?1 AND r.layer = ?2)"
                        " GROUP BY token", &fallback))
        goto cleanup;
    fputs("$cells << EOD\n", gp);
    for (int i = 0; i < runs->count; i++) {
        int64_t class_tokens[PLOT_BYTE_CLASSES] = {0}, all = 0;
        int n_experts = plot_config_experts(ctx, runs->runs[i].run_id);
        if (i > 0)
            fputs("\n\n", gp);
        for (int pass = 0; pass < 2; pass++) {   /* the grid's size, then its counts */
            sqlite3_bind_int64(routed, 1, src[i].eval_id);
            sqlite3_bind_int(routed, 2, chosen[i]);
            while ((rc = sqlite3_step(routed)) == SQLITE_ROW) {
                int e = sqlite3_column_int(routed, 1);
                if (pass == 0 && e >= n_experts)
                    n_experts = e + 1;
                if (pass == 1 && e >= 0)
                    cells[(size_t)plot_byte_class(sqlite3_column_int(routed, 0))
                          * (size_t)n_experts + (size_t)e] += sqlite3_column_int64(routed, 2);
            }
            sqlite3_reset(routed);
            if (rc != SQLITE_DONE) {
                plot_db_error(ctx, "routing");
                goto cleanup;
            }
            if (pass == 0) {
                free(cells);
                cells = calloc((size_t)PLOT_BYTE_CLASSES * (size_t)(n_experts + 1),
                               sizeof *cells);
                if (!cells) {
                    plot_oom(ctx, "routing");
                    goto cleanup;
                }
            }
        }
        for (int pass = 0; pass < 2 && all == 0; pass++) {   /* token_stats, else routing */
            sqlite3_stmt *st = pass == 0 ? tokens : fallback;
            sqlite3_bind_int64(st, 1, src[i].eval_id);
            if (pass == 1)
                sqlite3_bind_int(st, 2, chosen[i]);
            while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                class_tokens[plot_byte_class(sqlite3_column_int(st, 0))] +=
                    sqlite3_column_int64(st, 1);
                all += sqlite3_column_int64(st, 1);
            }
            sqlite3_reset(st);
            if (rc != SQLITE_DONE) {
                plot_db_error(ctx, pass == 0 ? "token_stats" : "routing");
                goto cleanup;
            }
        }
        int row = 0;
        for (int c = 0; c < PLOT_BYTE_CLASSES; c++) {
            if (class_tokens[c] == 0)
                continue;
            char label[48];   /* "letters 71%": the class's share of the tokens */
            snprintf(label, sizeof label, "%s %.0f%%", plot_byte_class_names[c],
                     100.0 * (double)class_tokens[c] / (double)all);
            for (int e = 0; e < n_experts; e++) {
                double share = (double)cells[(size_t)c * (size_t)n_experts + (size_t)e]
                               / (double)class_tokens[c];
                if (share > value_max)
                    value_max = share;
                fprintf(gp, "%d %d %.6g \"%s\"\n", e, row, share, label);
            }
            row++;
        }
        if (row == 0)
            fputs("NaN NaN NaN \"\"\n", gp);
        experts[i] = n_experts;
        classes[i] = row;
    }
    fputs("EOD\n", gp);
    plot_put_int_array(gp, "panel_layer", chosen, runs->count);
    plot_put_int_array(gp, "panel_experts", experts, runs->count);
    plot_put_int_array(gp, "panel_classes", classes, runs->count);
    fprintf(gp, "value_max = %.6g\n", value_max > 0 ? value_max : 1.0);
    status = 0;
cleanup:
    sqlite3_finalize(routed);
    sqlite3_finalize(tokens);
    sqlite3_finalize(fallback);
    plot_ints_free(layer_lists, count);
    free(layer_lists);
    free(src);
    free(has);
    free(chosen);
    free(experts);
    free(classes);
    free(cells);
    return status;
}

/* ---- figure "routing_stability" --------------------------------------- */

/*
** Per run and layer, from v_routing_stability: at each probe after the
** first, the share of the probe batch's tokens whose first choice changed
** since the previous probe. $changed: per series (a run's layer; index
** s-1) "step changed" rows by step. The layer option keeps one layer.
** nseries, series_run[s] (the run's index), series_layer[s] (its block),
** series_rank[s] (the layer's place in the run from 1, for its dash and
** marker).
*/
static int plot_routing_stability_data(PlotContext *ctx) {
    FILE *gp = ctx->gp;
    PlotRuns *runs = ctx->runs;
    sqlite3_stmt *st = NULL;
    PlotInts *layer_lists = calloc((size_t)runs->count, sizeof *layer_lists);
    int *has = calloc((size_t)runs->count, sizeof *has);
    int *chosen = calloc((size_t)runs->count, sizeof *chosen);
    int *kept_index = calloc((size_t)runs->count, sizeof *kept_index);
    PlotInts series_run = {0}, series_layer = {0}, series_rank = {0};
    int status = -1, rc, count = runs->count;
    if (!layer_lists || !has || !chosen || !kept_index) {
        plot_oom(ctx, "v_routing_stability");
        goto cleanup;
    }
    for (int i = 0; i < runs->count; i++) {
        if (plot_read_layers(ctx, "v_routing_stability",
                             "SELECT DISTINCT layer FROM v_routing_stability WHERE run_id = ?1"
                             " ORDER BY layer", runs->runs[i].run_id, -1, &layer_lists[i]))
            goto cleanup;
        has[i] = layer_lists[i].n > 0;
    }
    if (ctx->opt->layer != PLOT_LAYER_UNSET
        && plot_choose_layer(ctx, has, layer_lists, chosen, "routing probes"))
        goto cleanup;
    /* the lists stay by the original index: keep a copy of who is kept */
    for (int i = 0; i < count; i++)
        kept_index[i] = i;
    if (plot_keep_runs(ctx, has, kept_index, sizeof *kept_index,
                       "routing probes (two or more)",
                       "train it with probes, run:train{ probe = { every = N } }, which record "
                       "the routing of one validation batch every N steps")
        || plot_prepare(ctx, "v_routing_stability",
                        "SELECT step, changed FROM v_routing_stability WHERE run_id = ?1"
                        " AND layer = ?2 ORDER BY step, eval_id", &st))
        goto cleanup;
    fputs("$changed << EOD\n", gp);
    for (int i = 0; i < runs->count; i++) {
        const PlotInts *layers = &layer_lists[kept_index[i]];
        for (int l = 0; l < layers->n; l++) {
            if (ctx->opt->layer != PLOT_LAYER_UNSET && layers->v[l] != ctx->opt->layer)
                continue;
            if (series_run.n > 0)
                fputs("\n\n", gp);
            if (plot_ints_push(&series_run, i + 1) || plot_ints_push(&series_layer, layers->v[l])
                || plot_ints_push(&series_rank, l + 1)) {
                plot_oom(ctx, "v_routing_stability");
                goto cleanup;
            }
            sqlite3_bind_int64(st, 1, runs->runs[i].run_id);
            sqlite3_bind_int(st, 2, layers->v[l]);
            while ((rc = sqlite3_step(st)) == SQLITE_ROW)
                fprintf(gp, "%lld %.6g\n", (long long)sqlite3_column_int64(st, 0),
                        sqlite3_column_double(st, 1));
            sqlite3_reset(st);
            if (rc != SQLITE_DONE) {
                plot_db_error(ctx, "v_routing_stability");
                goto cleanup;
            }
        }
    }
    fputs("EOD\n", gp);
    fprintf(gp, "nseries = %d\n", series_run.n);
    plot_put_int_array(gp, "series_run", series_run.v, series_run.n);
    plot_put_int_array(gp, "series_layer", series_layer.v, series_layer.n);
    plot_put_int_array(gp, "series_rank", series_rank.v, series_rank.n);
    ctx->title_chars -= 10;        /* ", layer 12" */
    for (int k = 0; k < series_run.n; k++)
        plot_key_entry(ctx, plot_title_chars(runs->runs[series_run.v[k] - 1].title,
                                             ctx->title_chars) + 10);
    status = 0;
cleanup:
    sqlite3_finalize(st);
    plot_ints_free(layer_lists, count);
    free(layer_lists);
    free(has);
    free(chosen);
    free(kept_index);
    free(series_run.v);
    free(series_layer.v);
    free(series_rank.v);
    return status;
}

/* ---- figure "strata_flow" --------------------------------------------- */

/* The most strata a figure draws (a router's strata list is longer only
** with one expert per stratum in a wide layer). */
#define PLOT_MAX_STRATA 64

/*
** Stratified runs (moe.router.kind 'stratified'), from the latest recorded
** evaluation: for each pass p (a token at stratum p) and stratum s, the
** share of the (token, layer) pairs whose pass-p first choice is an expert
** of stratum s; experts are numbered stratum by stratum, in the sizes of
** moe.router.strata. A row sums to the share of tokens that made pass p.
** Over every MoE layer, or the one of the layer option. $cells: per run
** (index i-1) "stratum pass share" rows for s >= p (NaN below: a pass sees
** only later strata). Also panel_strata[i], panel_layer[i] (-1: all),
** pass_share[(i-1)*max_strata + p + 1], max_strata.
*/
static int plot_strata_flow_data(PlotContext *ctx) {
    typedef struct {
        int64_t eval_id, step;
        int strata, sizes[PLOT_MAX_STRATA];
        int layer;     /* -1: every layer */
        int layers;    /* MoE layers summed */
    } Source;
    FILE *gp = ctx->gp;
    PlotRuns *runs = ctx->runs;
    sqlite3_stmt *cfg = NULL, *st = NULL, *tok = NULL;
    Source *src = calloc((size_t)runs->count, sizeof *src);
    PlotInts *layer_lists = calloc((size_t)runs->count, sizeof *layer_lists);
    int *has = calloc((size_t)runs->count, sizeof *has);
    int *chosen = calloc((size_t)runs->count, sizeof *chosen);
    int *ints = calloc((size_t)runs->count * 2, sizeof *ints);
    double *pass_share = NULL;
    int status = -1, rc, count = runs->count, max_strata = 1;
    if (!src || !layer_lists || !has || !chosen || !ints) {
        plot_oom(ctx, "routing");
        goto cleanup;
    }
    if (plot_prepare(ctx, "runs",
                     "SELECT j.value FROM runs, json_each(json_extract(runs.config,"
                     " '$.model.moe.router.strata')) AS j WHERE runs.run_id = ?1"
                     " AND json_valid(runs.config) AND json_extract(runs.config,"
                     " '$.model.moe.router.kind') = 'stratified' ORDER BY j.key", &cfg))
        goto cleanup;
    for (int i = 0; i < runs->count; i++) {
        sqlite3_bind_int64(cfg, 1, runs->runs[i].run_id);
        while ((rc = sqlite3_step(cfg)) == SQLITE_ROW && src[i].strata < PLOT_MAX_STRATA)
            src[i].sizes[src[i].strata++] = sqlite3_column_int(cfg, 0);
        sqlite3_reset(cfg);
        has[i] = src[i].strata > 0;
    }
    if (plot_keep_runs(ctx, has, src, sizeof *src, "stratified layers",
                       "strata_flow draws stratified (SMoE) runs, moe.router = { kind = "
                       "'stratified', strata = {...} }, evaluated with record = true"))
        goto cleanup;
    for (int i = 0; i < runs->count; i++) {
        if (plot_latest_recorded_eval(ctx, runs->runs[i].run_id, &src[i].eval_id, &src[i].step))
            goto cleanup;
        if (src[i].eval_id >= 0
            && plot_eval_layers(ctx, runs->runs[i].run_id, src[i].eval_id, &layer_lists[i]))
            goto cleanup;
        has[i] = src[i].eval_id >= 0;
    }
    if (ctx->opt->layer != PLOT_LAYER_UNSET
        && plot_choose_layer(ctx, has, layer_lists, chosen, "recorded evaluation"))
        goto cleanup;
    for (int i = 0; i < runs->count; i++) {
        src[i].layer = ctx->opt->layer != PLOT_LAYER_UNSET ? chosen[i] : -1;
        src[i].layers = src[i].layer >= 0 ? 1 : (layer_lists[i].n > 0 ? layer_lists[i].n : 1);
    }
    if (plot_keep_runs(ctx, has, src, sizeof *src, "recorded routing", plot_record_remedy))
        goto cleanup;
    for (int i = 0; i < runs->count; i++)
        if (src[i].strata > max_strata)
            max_strata = src[i].strata;
    pass_share = calloc((size_t)runs->count * (size_t)max_strata, sizeof *pass_share);
    if (!pass_share) {
        plot_oom(ctx, "routing");
        goto cleanup;
    }
    /* ?3 = -1: every layer */
    if (plot_prepare(ctx, "routing",
                     "SELECT r.pass, r.expert, count(*) FROM evals e JOIN routing r"
                     " ON r.routing_id BETWEEN e.routing_first AND e.routing_last"
                     " AND r.eval_id = e.eval_id WHERE e.eval_id = ?1 AND r.rank = 0"
                     " AND (?2 < 0 OR r.layer = ?2) GROUP BY r.pass, r.expert", &st)
        || plot_prepare(ctx, "token_stats",
                        "SELECT count(*) FROM token_stats WHERE eval_id = ?1", &tok))
        goto cleanup;
    fputs("$cells << EOD\n", gp);
    for (int i = 0; i < runs->count; i++) {
        const Source *s = &src[i];
        double cells[PLOT_MAX_STRATA][PLOT_MAX_STRATA];
        double pass0 = 0;
        memset(cells, 0, sizeof cells);
        if (i > 0)
            fputs("\n\n", gp);
        sqlite3_bind_int64(st, 1, s->eval_id);
        sqlite3_bind_int(st, 2, s->layer);
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            int pass = sqlite3_column_int(st, 0), expert = sqlite3_column_int(st, 1);
            int stratum = 0, below = 0;
            while (stratum < s->strata && expert >= below + s->sizes[stratum])
                below += s->sizes[stratum++];
            if (pass < 0 || pass >= s->strata || stratum >= s->strata)
                continue;       /* not an expert of the configured strata */
            cells[pass][stratum] += sqlite3_column_double(st, 2);
            if (pass == 0)
                pass0 += sqlite3_column_double(st, 2);
        }
        sqlite3_reset(st);
        if (rc != SQLITE_DONE) {
            plot_db_error(ctx, "routing");
            goto cleanup;
        }
        /* every token makes pass 0: the token pairs are its tokens x layers
        ** (first choices dropped at capacity have no row) */
        sqlite3_bind_int64(tok, 1, s->eval_id);
        double pairs = 0;
        if (sqlite3_step(tok) == SQLITE_ROW)
            pairs = sqlite3_column_double(tok, 0) * s->layers;
        sqlite3_reset(tok);
        if (pairs < pass0)
            pairs = pass0;
        for (int p = 0; p < s->strata; p++) {
            double row = 0;
            for (int t = p; t < s->strata && pairs > 0; t++)
                row += cells[p][t] / pairs;
            for (int t = 0; t < s->strata; t++) {
                double share = t >= p && pairs > 0 ? cells[p][t] / pairs : NAN;
                fprintf(gp, "%d %d ", t, p);
                plot_put_value(gp, share);
                fprintf(gp, " \"pass %d (%.0f%%)\"\n", p, 100 * row);
            }
            pass_share[(size_t)i * (size_t)max_strata + (size_t)p] = row;
        }
        ints[i] = s->strata;
        ints[runs->count + i] = s->layer;
    }
    fputs("EOD\n", gp);
    plot_put_int_array(gp, "panel_strata", ints, runs->count);
    plot_put_int_array(gp, "panel_layer", ints + runs->count, runs->count);
    fprintf(gp, "max_strata = %d\n", max_strata);
    plot_put_double_array(gp, "pass_share", pass_share, runs->count * max_strata);
    status = 0;
cleanup:
    sqlite3_finalize(cfg);
    sqlite3_finalize(st);
    sqlite3_finalize(tok);
    plot_ints_free(layer_lists, count);
    free(layer_lists);
    free(src);
    free(has);
    free(chosen);
    free(ints);
    free(pass_share);
    return status;
}

/* ---- figure "sparse_curve" -------------------------------------------- */

typedef struct {
    int run;               /* index in runs */
    char kind[32], select[16];
    double x, loss;        /* the share of the FFN used, the loss */
    double k, p;           /* the rule's parameter: k (top-k) or p (threshold) */
    int64_t eval_id;
} PlotSparsePoint;

static int plot_sparse_point_cmp(const void *a, const void *b) {
    const PlotSparsePoint *x = a, *y = b;
    if (x->run != y->run)
        return x->run < y->run ? -1 : 1;
    int c = strcmp(x->kind, y->kind);
    if (c == 0)
        c = strcmp(x->select, y->select);
    if (c != 0)
        return c;
    if (x->x != y->x)
        return x->x < y->x ? -1 : 1;
    return x->eval_id < y->eval_id ? -1 : x->eval_id > y->eval_id;
}

/* The router kinds of a MoEfied model, each with its colour in style.gp's
** palette: the same in every sparse_curve. */
static int plot_router_color(const char *kind) {
    static const char *const kinds[] = {"similarity", "learned", "oracle"};
    for (int i = 0; i < 3; i++)
        if (strcmp(kind, kinds[i]) == 0)
            return i + 1;
    return strcmp(kind, "all") == 0 ? 7 : 4;   /* all: black */
}

/*
** Runs of MoEfied models (moe.bias true, moelab.moefy's): every complete
** 'val' evaluation, under the run's own router or another (evals.router),
** as a point (share of the FFN's experts a token used on average = experts
** per token / moe.experts, loss). A curve per run and rule (router kind and
** select, topk or threshold), by increasing share; an evaluation of a
** parameter evaluated again replaces the earlier one. $curves: per curve
** (index c-1) "share loss label" rows, label "k=2" or "t=0.9".
** ncurves, curve_title[c], curve_color[c] (by router kind), curve_dash[c]
** (1 top-k, 2 threshold), curve_point[c] (by run, 1 ..), curve_all[c] (the
** rule 'all': every expert, the dense FFN).
*/
static int plot_sparse_curve_data(PlotContext *ctx) {
    FILE *gp = ctx->gp;
    PlotRuns *runs = ctx->runs;
    sqlite3_stmt *cfg = NULL, *st = NULL;
    int *has = calloc((size_t)runs->count, sizeof *has);
    double *experts = calloc((size_t)runs->count, sizeof *experts);
    PlotSparsePoint *points = NULL;
    int *new_index = calloc((size_t)runs->count, sizeof *new_index);
    PlotInts color = {0}, dash = {0}, point = {0}, all = {0};
    size_t n = 0, cap = 0;
    int status = -1, rc, ncurves = 0;
    if (!has || !experts || !new_index) {
        plot_oom(ctx, "evals");
        goto cleanup;
    }
    if (plot_prepare(ctx, "runs",
                     "SELECT json_extract(config, '$.model.moe.experts') FROM runs"
                     " WHERE run_id = ?1 AND json_valid(config)"
                     " AND json_extract(config, '$.model.moe.bias') = 1", &cfg))
        goto cleanup;
    for (int i = 0; i < runs->count; i++) {
        sqlite3_bind_int64(cfg, 1, runs->runs[i].run_id);
        if (sqlite3_step(cfg) == SQLITE_ROW && sqlite3_column_double(cfg, 0) > 0) {
            experts[i] = sqlite3_column_double(cfg, 0);
            has[i] = 1;
        }
        sqlite3_reset(cfg);
    }
    if (plot_keep_runs(ctx, has, experts, sizeof *experts, "MoEfied model (moe.bias true)",
                       "sparse_curve draws dense models split into experts by moelab.moefy, "
                       "evaluated under their router and others "
                       "(run:evaluate{ router = { kind = 'similarity', k = 2 } })"))
        goto cleanup;
    if (plot_prepare(ctx, "evals",
                     "SELECT e.eval_id, e.loss, e.experts_per_token,"
                     " json_extract(x.router, '$.kind'),"
                     " coalesce(json_extract(x.router, '$.select'), 'topk'),"
                     " json_extract(x.router, '$.k'), json_extract(x.router, '$.p')"
                     " FROM evals e JOIN (SELECT e2.eval_id, CASE WHEN e2.router IS NOT NULL"
                     " AND json_valid(e2.router) THEN e2.router"
                     " ELSE json_extract(r.config, '$.model.moe.router') END AS router"
                     " FROM evals e2 JOIN runs r USING (run_id) WHERE e2.run_id = ?1) x"
                     " USING (eval_id) WHERE e.split = 'val' AND e.complete = 1"
                     " AND e.loss IS NOT NULL AND e.experts_per_token IS NOT NULL"
                     " ORDER BY e.eval_id", &st))
        goto cleanup;
    for (int i = 0; i < runs->count; i++) {
        has[i] = 0;
        sqlite3_bind_int64(st, 1, runs->runs[i].run_id);
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            if (n == cap) {
                cap = cap ? 2 * cap : 32;
                PlotSparsePoint *grown = realloc(points, cap * sizeof *grown);
                if (!grown) {
                    plot_oom(ctx, "evals");
                    goto cleanup;
                }
                points = grown;
            }
            PlotSparsePoint *p = &points[n];
            const char *kind = (const char *)sqlite3_column_text(st, 3);
            const char *select = (const char *)sqlite3_column_text(st, 4);
            p->run = i;
            p->eval_id = sqlite3_column_int64(st, 0);
            p->loss = sqlite3_column_double(st, 1);
            p->x = sqlite3_column_double(st, 2) / experts[i];
            snprintf(p->kind, sizeof p->kind, "%s", kind ? kind : "router");
            snprintf(p->select, sizeof p->select, "%s",
                     strcmp(p->kind, "all") == 0 ? "all" : select ? select : "topk");
            p->k = sqlite3_column_type(st, 5) == SQLITE_NULL ? NAN : sqlite3_column_double(st, 5);
            p->p = sqlite3_column_type(st, 6) == SQLITE_NULL ? NAN : sqlite3_column_double(st, 6);
            if (!isfinite(p->loss) || !isfinite(p->x))
                continue;
            /* the same rule and parameter again: the later evaluation counts */
            size_t j = 0;
            for (; j < n; j++) {
                const PlotSparsePoint *q = &points[j];
                int same_param = strcmp(p->select, "threshold") == 0
                                     ? q->p == p->p
                                     : strcmp(p->select, "all") == 0 || q->k == p->k;
                if (q->run == i && strcmp(q->kind, p->kind) == 0
                    && strcmp(q->select, p->select) == 0 && same_param)
                    break;
            }
            if (j < n)
                points[j] = *p;
            else
                n++;
            has[i] = 1;
        }
        sqlite3_reset(st);
        if (rc != SQLITE_DONE) {
            plot_db_error(ctx, "evals");
            goto cleanup;
        }
    }
    /* points[].run are indices before plot_keep_runs: renumber after it */
    for (int i = 0, k = 0; i < runs->count; i++)
        new_index[i] = has[i] ? k++ : -1;
    if (plot_keep_runs(ctx, has, NULL, 0, "validation evaluation",
                       "evaluate it (run:evaluate{}), and under other routers "
                       "(run:evaluate{ router = { kind = 'similarity', k = 2 } })"))
        goto cleanup;
    for (size_t j = 0; j < n; j++)
        points[j].run = new_index[points[j].run];
    qsort(points, n, sizeof *points, plot_sparse_point_cmp);

    fputs("$curves << EOD\n", gp);
    for (size_t j = 0; j < n; j++) {
        const PlotSparsePoint *p = &points[j];
        int starts = j == 0 || p->run != points[j - 1].run
                     || strcmp(p->kind, points[j - 1].kind) != 0
                     || strcmp(p->select, points[j - 1].select) != 0;
        if (starts) {
            if (j > 0)
                fputs("\n\n", gp);
            ncurves++;
            if (plot_ints_push(&color, plot_router_color(p->kind))
                || plot_ints_push(&dash, strcmp(p->select, "threshold") == 0 ? 2 : 1)
                || plot_ints_push(&point, p->run + 1)
                || plot_ints_push(&all, strcmp(p->kind, "all") == 0)) {
                plot_oom(ctx, "evals");
                goto cleanup;
            }
        }
        char label[48], v[ML_NUMLEN];
        if (strcmp(p->select, "threshold") == 0 && isfinite(p->p))
            snprintf(label, sizeof label, "t=%s", ml_number(v, p->p));
        else if (strcmp(p->select, "all") != 0 && isfinite(p->k))
            snprintf(label, sizeof label, "k=%s", ml_number(v, p->k));
        else
            label[0] = '\0';
        fprintf(gp, "%.6g %.9g \"%s\"\n", p->x, p->loss, label);
    }
    fputs("EOD\n", gp);
    fprintf(gp, "ncurves = %d\narray curve_title[%d]\n", ncurves, ncurves > 0 ? ncurves : 1);
    for (size_t j = 0, c = 0; j < n; j++) {
        const PlotSparsePoint *p = &points[j];
        if (j > 0 && p->run == points[j - 1].run && strcmp(p->kind, points[j - 1].kind) == 0
            && strcmp(p->select, points[j - 1].select) == 0)
            continue;
        char title[256];
        const char *rule = strcmp(p->select, "threshold") == 0 ? "threshold"
                           : strcmp(p->select, "all") == 0 ? "all experts (dense)"
                                                            : "top-k";
        if (strcmp(p->kind, "all") == 0)
            snprintf(title, sizeof title, "%s", rule);
        else
            snprintf(title, sizeof title, "%s, %s", p->kind, rule);
        char full[512];
        if (runs->count > 1)
            snprintf(full, sizeof full, "%s: %s", runs->runs[p->run].title, title);
        else
            snprintf(full, sizeof full, "%s", title);
        fprintf(gp, "curve_title[%zu] = ", ++c);
        plot_key_entry(ctx, plot_put_title(gp, full, ctx->title_chars));
        fputc('\n', gp);
    }
    plot_put_int_array(gp, "curve_color", color.v, ncurves);
    plot_put_int_array(gp, "curve_dash", dash.v, ncurves);
    plot_put_int_array(gp, "curve_point", point.v, ncurves);
    plot_put_int_array(gp, "curve_all", all.v, ncurves);
    status = 0;
cleanup:
    sqlite3_finalize(cfg);
    sqlite3_finalize(st);
    free(has);
    free(experts);
    free(new_index);
    free(points);
    free(color.v);
    free(dash.v);
    free(point.v);
    free(all.v);
    return status;
}

/* ---- figure "placement" ---------------------------------------------- */

/*
** Each run's latest recorded evaluation replayed with its experts on P = 2,
** 4, ..., 1024 devices by every policy (placement.h, as `moelab placement`),
** summed over its MoE layers. $placement: per series s (run i, policy p: s =
** (i-1) * npolicies + p, index s-1) "devices MB local_share imbalance
** critical_ms" rows by P; imbalance is the largest layer's. Also npolicies
** and policy_name[p].
*/
static int plot_placement_data(PlotContext *ctx) {
    static const PlacementCosts costs = {PLACEMENT_BANDWIDTH, PLACEMENT_RATE};
    FILE *gp = ctx->gp;
    PlotRuns *runs = ctx->runs;
    int64_t *evals = calloc((size_t)runs->count, sizeof *evals), step;
    int *has = calloc((size_t)runs->count, sizeof *has);
    PlacementPolicy policies[PLACEMENT_POLICIES];
    PlacementRouting routing = {0};
    PlacementResult *rows = NULL;
    int status = -1;
    if (!evals || !has) {
        plot_oom(ctx, "routing");
        goto cleanup;
    }
    for (int i = 0; i < runs->count; i++) {
        if (plot_latest_recorded_eval(ctx, runs->runs[i].run_id, &evals[i], &step))
            goto cleanup;
        has[i] = evals[i] >= 0;
    }
    if (plot_keep_runs(ctx, has, evals, sizeof *evals, "recorded routing", plot_record_remedy))
        goto cleanup;
    for (int p = 0; p < PLACEMENT_POLICIES; p++)
        policies[p] = (PlacementPolicy)p;
    fputs("$placement << EOD\n", gp);
    for (int i = 0; i < runs->count; i++) {
        if (rec_placement_routing(ctx->db, ctx->db_path, evals[i], &routing, ctx->err))
            goto cleanup;
        int per_p = routing.nlayers + 1;   /* its layers, then their total */
        PlacementResult *grown = realloc(rows, (size_t)PLACEMENT_POLICIES
                                         * PLACEMENT_DEFAULT_DEVICES * per_p * sizeof *rows);
        if (!grown) {
            plot_oom(ctx, "routing");
            goto cleanup;
        }
        rows = grown;
        if (placement_study(rows, &routing, policies, PLACEMENT_POLICIES,
                            placement_default_devices, PLACEMENT_DEFAULT_DEVICES, &costs,
                            ctx->err))
            goto cleanup;
        for (int p = 0; p < PLACEMENT_POLICIES; p++) {
            if (i > 0 || p > 0)
                fputs("\n\n", gp);
            for (int d = 0; d < PLACEMENT_DEFAULT_DEVICES; d++) {
                const PlacementResult *t =
                    &rows[(p * PLACEMENT_DEFAULT_DEVICES + d + 1) * per_p - 1];   /* the total */
                fprintf(gp, "%d %.6g %.6g %.6g %.6g\n", t->devices, (double)t->bytes * 1e-6,
                        t->local_share, t->imbalance, t->critical_ms);
            }
        }
        placement_routing_free(&routing);
    }
    fputs("EOD\n", gp);
    fprintf(gp, "npolicies = %d\narray policy_name[%d]\n", PLACEMENT_POLICIES,
            PLACEMENT_POLICIES);
    for (int p = 0; p < PLACEMENT_POLICIES; p++) {
        fprintf(gp, "policy_name[%d] = ", p + 1);
        plot_put_quoted(gp, "", placement_policy_names[p]);
        fputc('\n', gp);
    }
    plot_key_of_runs(ctx, 0);
    for (int p = 0; p < PLACEMENT_POLICIES; p++)
        plot_key_entry(ctx, (int)strlen(placement_policy_names[p]));
    status = 0;
cleanup:
    placement_routing_free(&routing);
    free(rows);
    free(evals);
    free(has);
    return status;
}

/* ---- the figures ------------------------------------------------------ */

/* In the order of PLOT_FIGURES. */
const PlotFigure plot_figures[] = {
    {"loss", plot_loss_data, 0, 0, 0},
    {"loss_vs_flops", plot_loss_vs_flops_data, 0, 0, 0},
    {"experts_per_token", plot_experts_per_token_data, 0, 0, 0},
    {"expert_load", plot_expert_load_data, 1, 0, 0},
    {"loss_by_experts", plot_loss_by_experts_data, 0, 0, 0},
    {"load_over_training", plot_load_over_training_data, 1, PLOT_READS_LAYER, 0},
    {"dropped_vs_capacity", plot_dropped_vs_capacity_data, 0, 0, 0},
    {"sparsity", plot_sparsity_data, 1, 0, 0},
    {"cooccurrence", plot_cooccurrence_data, 1, PLOT_READS_LAYERS, 0},
    {"byte_classes", plot_byte_classes_data, 1, PLOT_READS_LAYER, 0},
    {"routing_stability", plot_routing_stability_data, 0, PLOT_READS_LAYER, 0},
    {"strata_flow", plot_strata_flow_data, 1, PLOT_READS_LAYER, 0},
    {"sparse_curve", plot_sparse_curve_data, 0, 0, 0},
    {"placement", plot_placement_data, 0, 0, 1},
};

const int plot_figure_count = (int)(sizeof plot_figures / sizeof *plot_figures);
