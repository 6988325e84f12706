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
*/
#ifndef MOELAB_PLOT_H
#define MOELAB_PLOT_H

#include "common.h"

/* The figures plot_render knows, comma-separated, for help texts. */
#define PLOT_FIGURES "loss"

/* Renders figure from the runs database db_path into out_path.
** runs_csv names the runs to draw ("top2,threshold"; NULL or "" = every run
** in the database, in the order they were started); a name recorded more
** than once means its latest run. plots_dir holds the figure scripts (NULL
** means "plots"). Errors name the unknown figure, run or extension, or carry
** gnuplot's own message. */
int plot_render(const char *figure, const char *db_path, const char *out_path,
                const char *runs_csv, const char *plots_dir, char *err);

#endif
