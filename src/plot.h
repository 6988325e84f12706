/*
** plot.h — moelab's figures: data from a run database, drawn by gnuplot.
**
** A figure is a gnuplot script, plots_dir/FIGURE.gp, that draws from
** datablocks and variables which the C side defines first (the terminal,
** the output file, the page, the data of the selected runs, their titles
** and colours), after plots_dir/style.gp, the look that every figure shares.
** Each script's header comment lists what it receives. gnuplot runs as a
** child process without a shell, reading everything on its standard input,
** so no temporary files are made. The output format follows out_path's
** extension: .pdf (pdfcairo, vector), .png (pngcairo, the same page at 300
** dpi) or .svg (the same page, scalable).
**
** The figures (every "latest evaluation" is the run's own router on a
** non-probe split; counterfactual evaluations and probes count only where
** named):
**   loss                training and validation loss against tokens seen
**   loss_vs_flops       Pareto view: per design (the seeds of a sweep,
**                       "NAME/seed=N", as one) its validation loss against
**                       FFN FLOPs per token, mean ± sample std over seeds,
**                       and the front of the designs no other beats on both
**   experts_per_token   histogram of the experts a token got per MoE layer,
**                       latest recorded evaluation (record = true)
**   expert_load         per run a heatmap, layer × expert, of each expert's
**                       share of its layer's assignments (latest evaluation
**                       that recorded them, else all training steps summed)
**   loss_by_experts     per-token loss against the experts the token got
**                       (token_stats of the latest recorded evaluation)
**   load_over_training  per run a heatmap, training step × expert, of the
**                       share of one layer's assignments (expert_load rows
**                       of training steps); option layer
**   dropped_vs_capacity share of assignments dropped against the capacity
**                       factor (runs.config), training and evaluation
**   sparsity            per run a heatmap, layer × expert, of the share of
**                       near-zero expert activations (latest recorded
**                       evaluation)
**   cooccurrence        per run: of the tokens whose first choice in layer
**                       a is expert i, the share whose first choice in layer
**                       b is j; option layers (default the first two MoE
**                       layers)
**   byte_classes        per run: letters, digits, spaces, punctuation,
**                       newlines (other bytes if any) against experts, the
**                       share of each class's tokens an expert processed, in
**                       one layer; option layer
**   routing_stability   share of first choices that changed since the
**                       previous probe (v_routing_stability) against step,
**                       a line per run and layer; option layer
**   strata_flow         stratified runs: per pass, the share of tokens whose
**                       first choice lands in each stratum; option layer
**   sparse_curve        MoEfied models: loss against the share of FFN
**                       compute, a curve per run and router rule from its
**                       evaluations under several k or thresholds
**   placement           the latest recorded evaluation replayed with the
**                       experts on 2 to 1024 devices by each placement
**                       policy (placement.h): all-to-all volume and the
**                       most loaded device against the mean, against P
** With every run selected (PlotOptions.runs NULL), runs without a figure's
** data (a dense baseline in expert_load) are left out; a run named in runs
** that lacks it is an error saying how to record it.
*/
#ifndef MOELAB_PLOT_H
#define MOELAB_PLOT_H

#include <limits.h>

#include "common.h"

/* The figures plot_render knows, comma-separated, for help texts. */
#define PLOT_FIGURES                                                                   \
    "loss,loss_vs_flops,experts_per_token,expert_load,loss_by_experts,"                \
    "load_over_training,dropped_vs_capacity,sparsity,cooccurrence,byte_classes,"       \
    "routing_stability,strata_flow,sparse_curve,placement"

/* A layer option left to the figure's default. */
#define PLOT_LAYER_UNSET INT_MIN

typedef struct {
    const char *runs;       /* names, comma-separated ("top2,threshold"); NULL or "":
                            ** every run in the database, in the order they were
                            ** started; a name recorded more than once means its
                            ** latest run */
    int layer;              /* a block number, counted from 0 (the figures that draw
                            ** one layer); PLOT_LAYER_UNSET: the figure's default */
    int layers[2];          /* two block numbers (cooccurrence); PLOT_LAYER_UNSET:
                            ** the default */
    const char *size;       /* "single" (one column, 3.3 in wide) or "double" (two,
                            ** 7 in); NULL: single, double for panels of several runs */
    const char *plots_dir;  /* the scripts; NULL: ml_plots_dir() of paths.h ($MOELAB_PLOTS,
                            ** else the installed or the build tree's plots folder) */
    const char *gnuplot_out;/* also save the program gnuplot is given (data
                            ** included, `gnuplot FILE` draws it again); NULL: no */
} PlotOptions;

#define PLOT_OPTIONS_INIT \
    {NULL, PLOT_LAYER_UNSET, {PLOT_LAYER_UNSET, PLOT_LAYER_UNSET}, NULL, NULL, NULL}

/* Renders figure from the runs database db_path into out_path; options may
** be NULL (every default). Errors name the unknown figure, run, option or
** extension, say how to record the data a run lacks, or carry gnuplot's own
** message. */
int plot_render(const char *figure, const char *db_path, const char *out_path,
                const PlotOptions *options, char *err);

#endif
