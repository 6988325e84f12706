# byte_classes.gp — figure "byte_classes": for each run, which experts take
# which kinds of bytes in one MoE layer of its latest recorded evaluation.
# Rows are classes of the input byte (letters, digits, spaces, punctuation,
# newlines, other bytes; each with its share of the tokens), columns
# experts; a cell is the share of the class's tokens that the expert
# processed (any rank or pass, so a row sums to the class's experts per
# token). A router that specialises by byte class shows dark cells apart
# from each other's.
#
# Render it with `moelab plot byte_classes --db DB --out FILE.pdf [--layer
# N]` (default: the first MoE layer); the runs need an evaluation with
# record = true. moelab defines, before it loads style.gp and this script
# (src/plot.c):
#   the terminal, the output file and the page (style.gp), with
#   panel_columns x panel_rows panels; plots_dir, this folder;
#   nruns, and run_title[1..nruns]            the runs' names;
#   $cells                                    "expert row share label" rows,
#                                             run i in index i-1, label the
#                                             class ("letters 71%");
#   panel_layer[i], panel_experts[i], panel_classes[i]   the grid of run i;
#   value_max                                 the largest share of any cell.

heat_title(i) = run_title[i]."\n".sprintf('layer %d', panel_layer[i])
heat_x_label = 'expert'
heat_y_label = ''
heat_label = 'share of the class''s tokens'
heat_columns(i) = panel_experts[i]
heat_rows(i) = panel_classes[i]
heat_max = value_max
heat_ytics = 1
heat_reverse = 1
heat_ytic_chars = 14    # "punctuation 12%"
load plots_dir.'/heatmap_panels.gp'
