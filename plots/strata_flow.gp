# strata_flow.gp — figure "strata_flow": how tokens move through the strata
# of stratified (SMoE) layers, in each run's latest recorded evaluation.
# Every token starts at stratum 0; a pass routes the tokens at the lowest
# stratum still occupied, and each goes on to 1 + the stratum of its first
# choice (it leaves past the last). Row p (pass p), column s: the share of
# (token, layer) pairs whose first choice in pass p is an expert of stratum
# s; the row's total, in its name, is the share of tokens that made pass p.
# Below the diagonal is blank: a pass sees only later strata.
#
# Render it with `moelab plot strata_flow --db DB --out FILE.pdf [--layer
# N]` (default: every MoE layer together); the runs need stratified
# routers (kind 'stratified') and an evaluation with record = true. moelab
# defines, before it loads style.gp and this script (src/plot.c):
#   the terminal, the output file and the page (style.gp), with
#   panel_columns x panel_rows panels; plots_dir, this folder;
#   nruns, and run_title[1..nruns]            the runs' names;
#   $cells                                    "stratum pass share label" rows,
#                                             run i in index i-1;
#   panel_strata[i], panel_layer[i]           its strata; its layer (-1: all);
#   max_strata                                the most strata of any run;
#   pass_share[(i-1)*max_strata + p + 1]      the share that made pass p.

heat_title(i) = run_title[i]."\n".(panel_layer[i] < 0 ? 'every MoE layer' : \
                                   sprintf('layer %d', panel_layer[i]))
heat_x_label = 'stratum of the first choice'
heat_y_label = ''
heat_label = 'share of (token, layer) pairs'
heat_columns(i) = panel_strata[i]
heat_rows(i) = panel_strata[i]
heat_max = 1
heat_format = '%.1f'
heat_ytics = 1
heat_reverse = 1
heat_annotate = 1
heat_cell_format = '%.0f%%'
heat_cell_scale = 100
heat_ytic_chars = 13    # "pass 0 (100%)"
load plots_dir.'/heatmap_panels.gp'
