/*
** plot.h — moelab's figures: data from a run database, drawn by gnuplot.
**
** A figure is a gnuplot script, plots_dir/FIGURE.gp, that draws from
** datablocks and variables which the C side defines first (the terminal,
** the output file, the data of the selected runs, their titles); each
** script's header comment lists what it receives. gnuplot runs as a child
** process without a shell, reading everything on its standard input, so no
** temporary files are made. The output format follows out_path's extension:
** .pdf (pdfcairo), .png (pngcairo) or .svg.
**
** The figures:
**   loss               training and validation loss against tokens seen
**   expert_load        per run a heatmap, layer × expert, of each expert's share
**                      of its layer's assignments (latest evaluation that
**                      recorded them, else all training steps summed)
**   experts_per_token  histogram of the experts a token got per MoE layer, in
**                      the latest recorded evaluation (record = true) of each run
**   loss_vs_flops      latest validation loss against MoE FLOPs per token, one
**                      point per run; dense runs at 0
** With every run selected (runs_csv NULL), runs without a figure's data (a
** dense baseline in expert_load) are left out; a run named in runs_csv that
** lacks it is an error saying how to record it.
*/
#ifndef MOELAB_PLOT_H
#define MOELAB_PLOT_H

#include "common.h"

/* The figures plot_render knows, comma-separated, for help texts. */
#define PLOT_FIGURES "loss,expert_load,experts_per_token,loss_vs_flops"

/* Renders figure from the runs database db_path into out_path.
** runs_csv names the runs to draw ("top2,threshold"; NULL or "" = every run
** in the database, in the order they were started); a name recorded more
** than once means its latest run. plots_dir holds the figure scripts (NULL
** means ml_plots_dir() of paths.h: $MOELAB_PLOTS, else the installed or the
** build tree's plots folder). Errors name the unknown figure, run or
** extension, or carry gnuplot's own message. */
int plot_render(const char *figure, const char *db_path, const char *out_path,
                const char *runs_csv, const char *plots_dir, char *err);

#endif
