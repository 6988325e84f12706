# cooccurrence.gp — figure "cooccurrence": for each run, how a token's
# first choice in one MoE layer goes with its first choice in another, in
# the run's latest recorded evaluation. Row i, column j: of the tokens whose
# first-choice expert in layer a is i, the share whose first choice in
# layer b is j (a row sums to 1; a blank row: layer a never chose i first).
# Independent layers give 1/E everywhere; experts that pass tokens to each
# other show as dark cells.
#
# Render it with `moelab plot cooccurrence --db DB --out FILE.pdf [--layers
# A,B]` (default: the first two MoE layers); the runs need an evaluation
# with record = true. moelab defines, before it loads style.gp and this
# script (src/plot.c):
#   the terminal, the output file and the page (style.gp), with
#   panel_columns x panel_rows panels; plots_dir, this folder;
#   nruns, and run_title[1..nruns]            the runs' names;
#   $cells                                    "j i share tokens" rows, run i
#                                             in index i-1;
#   panel_layer_a[i], panel_layer_b[i]        the two layers (blocks);
#   panel_experts_a[i], panel_experts_b[i]    the grid of run i;
#   value_max                                 the largest share of any cell.

heat_title(i) = run_title[i]."\n".sprintf('layer a = %d, layer b = %d', \
                                          panel_layer_a[i], panel_layer_b[i])
heat_x_label = 'expert in layer b (first choice)'
heat_y_label = 'expert in layer a (first choice)'
heat_label = 'share of the row''s tokens'
heat_columns(i) = panel_experts_b[i]
heat_rows(i) = panel_experts_a[i]
heat_max = value_max
heat_reverse = 1
heat_ytic_chars = 2
load plots_dir.'/heatmap_panels.gp'
