# placement.gp — figure "placement": what each run's routing would cost with
# its experts spread over P devices (issue 13's placement studies): its
# latest recorded evaluation replayed on P = 2, 4, ..., 1024 devices by each
# placement policy, summed over the MoE layers. Left, the all-to-all volume
# (dispatch and combine); right, the most loaded device's assignments
# against the mean (the largest of any layer). Colours name the runs,
# dashes and markers the policies; the model is src/placement.h's (the
# README, "Placement studies").
#
# Render it with `moelab plot placement --db DB --out FILE.pdf`; the runs
# need an evaluation with record = true. moelab defines, before it loads
# style.gp and this script (src/plot.c):
#   the terminal, the output file and the page (style.gp);
#   nruns, run_title[i], run_design[i]        the runs, their names, colours;
#   $placement                                "devices MB local_share
#                                             imbalance critical_ms" rows,
#                                             run i and policy p in index
#                                             (i - 1) * npolicies + p - 1;
#   npolicies, policy_name[p]                 the policies;
#   key_rows                                  the key's rows (style.gp).

series(i, p) = (i - 1) * npolicies + p - 1
# A policy's dash and marker (style.gp's markers): solid with discs, dashed
# with squares, dotted with triangles, dash-dot with the fourth.
policy_dash(p) = p
policy_marker(p) = design_markers[(p - 1) % 4 + 1]

# Two panels side by side over the key, margins in inches.
axes_bottom = key_lines(key_rows) + 0.62
panel_gap = 0.8
left_in = 0.72
right_in = 0.15
panel_in = (page_width - left_in - right_in - panel_gap) / 2
set multiplot
set logscale x 2
set xrange [1.6 : 1300]
if (panel_in >= 2.2) { set xtics (2, 8, 32, 128, 512) } else { set xtics (2, 32, 1024) }
set mxtics default
set xlabel 'devices P'
eval 'set grid xtics ytics '.grid_style
unset key
set bmargin at screen inch_y(axes_bottom)
set tmargin at screen 1 - inch_y(0.15)

set lmargin at screen inch_x(left_in)
set rmargin at screen inch_x(left_in + panel_in)
set ylabel 'all-to-all volume (MB)'
set yrange [0 : *]
plot for [i = 1:nruns] for [p = 1:npolicies] $placement index series(i, p) using 1:2 \
         with linespoints lw 1.5 dt policy_dash(p) pt policy_marker(p) ps 0.5 lc rgb run_color(i)

set lmargin at screen inch_x(left_in + panel_in + panel_gap)
set rmargin at screen 1 - inch_x(right_in)
set ylabel 'most loaded device / mean'
set logscale y 10
set yrange [0.9 : *]
plot for [i = 1:nruns] for [p = 1:npolicies] $placement index series(i, p) using 1:4 \
         with linespoints lw 1.5 dt policy_dash(p) pt policy_marker(p) ps 0.5 lc rgb run_color(i)

# The key: an invisible plot as wide as both panels, its key below the axes.
unset border
unset tics
unset grid
unset xlabel
unset ylabel
unset logscale
set xrange [0 : 1]
set yrange [0 : 1]
set lmargin at screen inch_x(left_in)
set rmargin at screen 1 - inch_x(right_in)
set bmargin at screen inch_y(axes_bottom - 0.5)
set key outside below left vertical maxrows key_rows
plot for [i = 1:nruns] NaN with lines lw 2 lc rgb run_color(i) title (run_title[i]), \
     for [p = 1:npolicies] NaN with linespoints lw 1.5 dt policy_dash(p) pt policy_marker(p) \
         ps 0.5 lc rgb '#606060' title (policy_name[p])
unset multiplot
