# sparsity.gp — figure "sparsity": for each run a heatmap of its MoE layers
# (rows) by experts (columns), each cell coloured by the share of the
# expert's hidden activations that were near zero (|a| <= eps, eps from
# moe.sparsity_eps: 0 for ReLU, 0.01 otherwise) in the run's latest recorded
# evaluation: work an expert multiplies by (almost) nothing. One colour
# scale for every panel.
#
# Render it with `moelab plot sparsity --db DB --out FILE.pdf`; the runs
# need an evaluation with record = true. moelab defines, before it loads
# style.gp and this script (src/plot.c):
#   the terminal, the output file and the page (style.gp), with
#   panel_columns x panel_rows panels; plots_dir, this folder;
#   nruns, and run_title[1..nruns]            the runs' names;
#   $cells                                    "expert row share layer" rows,
#                                             run i in index i-1; row counts
#                                             the MoE layers from 0, layer is
#                                             the block number; share NaN (a
#                                             blank cell) for an expert that
#                                             ran no token;
#   panel_note[i]                             'step 500, |a| <= 0.01';
#   panel_experts[i], panel_layers[i]         the grid of run i;
#   value_max                                 the largest share of any cell.

heat_title(i) = run_title[i]."\n".panel_note[i]
heat_x_label = 'expert'
heat_y_label = 'layer (block)'
heat_label = 'near-zero share of activations'
heat_columns(i) = panel_experts[i]
heat_rows(i) = panel_layers[i]
heat_max = value_max
heat_ytics = 1
heat_ytic_chars = 2
load plots_dir.'/heatmap_panels.gp'
