/*
** plot_internal.h — what plot.c (runs, options, page, gnuplot) and
** plot_figures.c (each figure's data) share; not part of the API.
*/
#ifndef MOELAB_PLOT_INTERNAL_H
#define MOELAB_PLOT_INTERNAL_H

#include <sqlite3.h>
#include <stdint.h>
#include <stdio.h>

#include "plot.h"

typedef struct {
    int64_t run_id;
    char *name;
    char *title;         /* as figures show it: the name with a sweep's dotted keys
                         ** shortened ("sweep/capacity_factor=1/seed=1"), and
                         ** " (run 7)", " (non-causal)" where they apply */
    char *design;        /* the name without a sweep's "/seed=N": the seeds of one design */
    int design_order;    /* 1 + the order of the design's first run in the database:
                         ** its colour in every figure (style.gp) */
    int name_repeats;    /* another selected run has the same name */
    int noncausal;       /* runs.causal = 0: its titles say so */
} PlotRun;

typedef struct {
    PlotRun *runs;
    int count;
    int named;           /* chosen by name, not "every run" */
} PlotRuns;

/* What a figure's data writer works with. */
typedef struct {
    FILE *gp;                  /* the gnuplot program being written */
    sqlite3 *db;
    const char *db_path;
    PlotRuns *runs;            /* the writer may drop runs without data (plot_keep_runs) */
    const PlotOptions *opt;    /* checked: layers are PLOT_LAYER_UNSET or >= 0 */
    char *err;
    int title_chars;           /* the characters a key entry's title may take */
    int key_entries;           /* out: entries of the key below the axes, which */
    int key_chars;             /* out: take up to this many characters; plot.c sets
                               ** key_rows and makes the page taller for them */
} PlotContext;

typedef int (*PlotDataWriter)(PlotContext *ctx);

enum { PLOT_READS_LAYER = 1, PLOT_READS_LAYERS = 2 };

typedef struct {
    const char *name;            /* also the script's name: plots_dir/NAME.gp */
    PlotDataWriter write_data;
    int panels;                  /* one panel per run, not one plot */
    int reads;                   /* PLOT_READS_*: the options it takes */
    int wide;                    /* two columns wide unless the size option says
                                 ** otherwise (plots side by side) */
} PlotFigure;

/* plot_figures.c: every figure, in the order of PLOT_FIGURES. */
extern const PlotFigure plot_figures[];
extern const int plot_figure_count;

/* prefix + text as one gnuplot single-quoted string. */
void plot_put_quoted(FILE *gp, const char *prefix, const char *text);

/* A name as figures show it: in a sweep's "key=value" parts, dotted keys by
** their last part ("sweep/moe.router.k=2/seed=1" as "sweep/k=2/seed=1"). */
void plot_short_name(const char *name, char *out, size_t size);

/* text as a gnuplot string of at most max_chars characters: a longer one
** keeps its closing " (...)" notes and loses, to an ellipsis, the middle of
** what comes before them. Returns the characters written. */
int plot_put_title(FILE *gp, const char *text, int max_chars);

/* The characters plot_put_title would write. */
int plot_title_chars(const char *text, int max_chars);

/* "array NAME[n]" and its values, one a line. */
void plot_put_int_array(FILE *gp, const char *name, const int *values, int n);
void plot_put_double_array(FILE *gp, const char *name, const double *values, int n);

int plot_db_error(const PlotContext *ctx, const char *what);
int plot_prepare(const PlotContext *ctx, const char *what, const char *sql, sqlite3_stmt **st);

/*
** Keeps the runs that have a figure's data (has[i]), in order, and their
** entries of the writer's per-run array info (elements of size bytes;
** info may be NULL) alike. A named run without the data is an error: "run
** 'x' has no <missing>: <remedy>"; when every run was selected, runs
** without it are left out, and it is an error only if none has it.
*/
int plot_keep_runs(PlotContext *ctx, const int *has, void *info, size_t size,
                   const char *missing, const char *remedy);

/* The latest evaluation of a run that recorded routing (record = true) under
** its own router, on a split other than 'probe', and complete; *eval_id = -1
** when there is none. */
int plot_latest_recorded_eval(const PlotContext *ctx, int64_t run_id, int64_t *eval_id,
                              int64_t *step);

#endif
