# sparse_curve.gp — figure "sparse_curve": dense to sparse (MoEfication).
# A dense model's FFNs split into experts (moelab.moefy), run under routers
# that choose some of them: its validation loss against the share of the
# FFN's compute a token used (experts per token / experts). Each curve is
# one run under one router and selection rule, its points the run's
# evaluations at several k (top-k) or thresholds t, labelled; colours name
# the router (similarity, learned, oracle; black: every expert, the dense
# FFN itself), dashes the rule (solid top-k, dashed threshold), markers the
# run. Down and to the left is better.
#
# Render it with `moelab plot sparse_curve --db DB --out FILE.pdf`; the
# runs are MoEfied models (moe.bias true), evaluated with run:evaluate{}
# and under other routers, run:evaluate{ router = { kind = 'similarity',
# k = 2 } }. moelab defines, before it loads style.gp and this script
# (src/plot.c):
#   the terminal, the output file and the page (style.gp);
#   $curves                                   "share loss label" rows, curve c
#                                             in index c-1, by share;
#   ncurves, curve_title[c]                   the curves and their names;
#   curve_color[c]                            its colour (style.gp's list);
#   curve_dash[c], curve_point[c]             1 top-k, 2 threshold; its run;
#   curve_all[c]                              1: every expert (one point).

set xrange [0 : 1.05]
set xtics 0, 0.25
set format x '%.2f'
set offsets 0, 0, graph 0.08, graph 0.05
set xlabel 'share of FFN compute (experts used / experts)'
set ylabel 'validation loss (nats/byte)'
eval 'set grid xtics ytics '.grid_style
set key outside below left vertical maxrows key_rows

plot for [c = 1:ncurves] $curves index (c - 1) using 1:2 with linespoints \
         lw 1.5 dt curve_dash[c] pt (curve_all[c] ? 3 : design_marker(8 * (curve_point[c] - 1) + 1)) \
         ps (curve_all[c] ? 1.2 : 0.6) lc rgb design_color(curve_color[c]) \
         title (curve_title[c]), \
     for [c = 1:ncurves] $curves index (c - 1) using 1:2:3 with labels \
         left offset char 0.4, char 0.45 font ','.sprintf('%g', font_pt - 2) \
         tc rgb design_color(curve_color[c]) notitle
