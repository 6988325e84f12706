# routing_stability.gp — figure "routing_stability": when does routing
# settle? For runs trained with probes (run:train{ probe = { every = N } },
# which record the routing of one fixed validation batch every N steps),
# the share of the probe's tokens whose first-choice expert changed since
# the previous probe (the view v_routing_stability), against the training
# step: a line per run (its design's colour) and MoE layer (its dash and
# marker).
#
# Render it with `moelab plot routing_stability --db DB --out FILE.pdf
# [--layer N]` (default: every MoE layer). moelab defines, before it loads
# style.gp and this script (src/plot.c):
#   the terminal, the output file and the page (style.gp);
#   nruns, run_title[i], run_design[i]        the runs, their names, colours;
#   $changed                                  "step changed" rows, series s
#                                             (a run's layer) in index s-1;
#   nseries, series_run[s], series_layer[s]   the series' run and layer;
#   series_rank[s]                            the layer's place in its run;
#   key_rows                                  the key's rows.

array layer_markers[6] = [7, 5, 9, 11, 13, 15]
layer_marker(r) = layer_markers[(r - 1) % 6 + 1]
layer_dash(r) = (r - 1) % 5 + 1

set xrange [0 : *]
set yrange [0 : *]
set format x '%.0s%c'     # 1k, 10k, 1M
set format y '%.2f'
set xlabel 'training step'
set ylabel 'first choices changed (share)'
eval 'set grid xtics ytics '.grid_style
set key outside below left vertical maxrows key_rows

plot for [s = 1:nseries] $changed index (s - 1) using 1:2 with linespoints \
         lw 1.5 dt layer_dash(series_rank[s]) pt layer_marker(series_rank[s]) ps 0.5 \
         lc rgb run_color(series_run[s]) \
         title sprintf('%s, layer %d', run_title[series_run[s]], series_layer[s])
