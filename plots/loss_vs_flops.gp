# loss_vs_flops.gp — figure "loss_vs_flops": the Pareto view. One marker per
# design (a run, or the seeds of a sweep, "NAME/seed=N", as one): its latest
# validation loss against the FFN FLOPs it spends per token, with error
# bars of one sample standard deviation over its seeds where it has
# several. Down and to the left is better; the grey staircase joins the
# designs that no design of fewer FLOPs matches in loss (the Pareto front).
# FFN FLOPs: the MoE layers' as executed (router included, 2 per
# multiply-add) plus the dense FFN blocks', so a dense model sits at its
# FFN's cost.
#
# Render it with `moelab plot loss_vs_flops --db DB --out FILE.pdf`. moelab
# defines, before it loads style.gp and this script (src/plot.c):
#   the terminal, the output file and the page (style.gp);
#   $designs                                  one "flops loss flops_sd
#                                             loss_sd runs" row per design,
#                                             design d in index d-1;
#   $front                                    the front's "flops loss" rows,
#                                             by increasing FLOPs, the last
#                                             loss again at flops_max;
#   ndesigns, design_title[d]                 the designs and their names
#                                             (with "(dense)", seeds);
#   design_order[d]                           the design's colour (style.gp);
#   design_dense[d], design_runs[d]           1 for a dense model; its seeds;
#   front_points, flops_max                   the front's size; the largest x.

x_unit = (flops_max >= 1e6 ? 1e6 : (flops_max >= 1e3 ? 1e3 : 1))
x_unit_name = (x_unit == 1e6 ? ' (millions)' : (x_unit == 1e3 ? ' (thousands)' : ''))
set xrange [0 : *]
set offsets graph 0.02, graph 0.05, graph 0.08, graph 0.08
set format x '%g'
set xtics tick_step(flops_max / x_unit, ticks_across)
set xlabel 'FFN FLOPs per token'.x_unit_name
set ylabel 'validation loss (nats/byte)'
eval 'set grid xtics ytics '.grid_style
set key outside below left vertical maxrows key_rows

# The front first, behind the markers; a step line: a design's loss holds
# until the next design of the front, which spends more and does better.
plot $front using ($1 / x_unit):2 with steps lw 1.5 dt 2 lc rgb '#909090' \
         title 'Pareto front', \
     for [d = 1:ndesigns] $designs index (d - 1) \
         using ($1 / x_unit):2:($3 / x_unit):4 with xyerrorbars \
         pt (design_dense[d] ? 4 : design_marker(design_order[d])) ps 0.8 lw 1.5 \
         lc rgb design_color(design_order[d]) \
         title (design_title[d])
