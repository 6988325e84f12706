# dropped_vs_capacity.gp — figure "dropped_vs_capacity": how much a
# capacity limit drops. Each run's capacity factor (moe.router.capacity_factor,
# 0 = dropless) against the share of its assignments that were dropped,
# over all its training steps (filled markers, solid line through the
# means at each factor) and in its latest evaluation (open markers, dashed).
# One colour per router rule (kind and k or p): runs of one rule at several
# factors make one curve; the seeds of a sweep add markers at the same x.
#
# Render it with `moelab plot dropped_vs_capacity --db DB --out FILE.pdf`;
# every MoE run records its drops. moelab defines, before it loads style.gp
# and this script (src/plot.c):
#   the terminal, the output file and the page (style.gp);
#   $train, $eval                             "capacity dropped" rows, one per
#                                             run, series s in index s-1;
#   $means                                    "capacity train eval" means per
#                                             factor, series s in index s-1;
#   nseries, series_title[s]                  the router rules;
#   capacity_max                              the largest factor.

x_max = (capacity_max > 0 ? capacity_max : 1)
set xrange [-0.05 * x_max : 1.08 * x_max]
set yrange [0 : *]
set xtics add ('dropless' 0)
set format y '%.2f'
set xlabel 'capacity factor'
set ylabel 'assignments dropped (share)'
eval 'set grid xtics ytics '.grid_style
set key outside below left vertical maxrows key_rows

plot for [s = 1:nseries] $means index (s - 1) using 1:2 with lines lw 2 \
         lc rgb design_color(s) notitle, \
     for [s = 1:nseries] $means index (s - 1) using 1:3 with lines lw 1.5 dt 2 \
         lc rgb design_color(s) notitle, \
     for [s = 1:nseries] $train index (s - 1) using 1:2 with points pt 7 ps 0.7 \
         lc rgb design_color(s) notitle, \
     for [s = 1:nseries] $eval index (s - 1) using 1:2 with points pt 6 ps 0.7 lw 1.5 \
         lc rgb design_color(s) notitle, \
     for [s = 1:nseries] NaN with linespoints lw 2 pt 7 ps 0.7 lc rgb design_color(s) \
         title (series_title[s]), \
     NaN with linespoints lw 2 pt 7 ps 0.7 lc rgb '#606060' title 'training', \
     NaN with linespoints lw 1.5 dt 2 pt 6 ps 0.7 lc rgb '#606060' title 'evaluation'
