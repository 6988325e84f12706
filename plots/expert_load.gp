# expert_load.gp — figure "expert_load": for each run a heatmap of its MoE
# layers (rows) by experts (columns), each cell coloured by the expert's share
# of the assignments its layer kept. A balanced layer is one flat colour
# (1/E everywhere); a collapsed router shows as one dark column. The data is
# the run's latest evaluation that recorded expert load, or else every
# training step summed; the panel's title says which. All panels share one
# colour scale, so that runs compare.
#
# Render it with `moelab plot expert_load --db DB --out FILE.pdf`. moelab
# defines, before it loads style.gp and this script (src/plot.c):
#   the terminal, the output file and the page (style.gp), with
#   panel_columns x panel_rows panels; plots_dir, this folder;
#   nruns, and run_title[1..nruns]            the runs' names;
#   $cells                                    datablock of "expert row share
#                                             layer" rows, run i in index i-1;
#                                             row counts the run's MoE layers
#                                             from 0, layer is the block number;
#   panel_note[i]                             'evaluation at step 1000' or
#                                             'training, 1000 steps summed';
#   panel_experts[i], panel_layers[i]         the grid of run i;
#   value_max                                 the largest share of any cell.

heat_title(i) = run_title[i]."\n".panel_note[i]
heat_x_label = 'expert'
heat_y_label = 'layer (block)'
heat_label = 'share of the layer''s assignments'
heat_columns(i) = panel_experts[i]
heat_rows(i) = panel_layers[i]
heat_max = value_max
heat_ytics = 1                 # rows named by their block: MoE layers may be every n-th
heat_ytic_chars = 2
load plots_dir.'/heatmap_panels.gp'
