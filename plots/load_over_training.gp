# load_over_training.gp — figure "load_over_training": for each run, how
# one MoE layer's load moved during training. Columns are training steps
# (consecutive recorded steps summed in groups when there are more than
# 120), rows experts; a cell is the expert's share of the assignments its
# layer kept over those steps. Balanced routing is one flat colour (1/E); a
# router that collapses turns one row dark; experts that trade tokens show
# as bands that cross.
#
# Render it with `moelab plot load_over_training --db DB --out FILE.pdf
# [--layer N]` (default: the first MoE layer). moelab defines, before it
# loads style.gp and this script (src/plot.c):
#   the terminal, the output file and the page (style.gp), with
#   panel_columns x panel_rows panels;
#   nruns, and run_title[1..nruns]            the runs' names;
#   $cells                                    "step expert share half_width"
#                                             rows, run i in index i-1: the
#                                             middle step of a group of steps
#                                             and half its width;
#   panel_layer[i], panel_experts[i]          the layer drawn; its experts;
#   panel_steps[i]                            the steps recorded;
#   step_max, value_max                       the last step; the top share.

set cbrange [0 : value_max]
set cblabel 'share of the layer''s assignments' offset char 1.5, 0
set format cb '%.2f'
set format x '%.0s%c'     # 1k, 10k, 1M
set tics out nomirror scale 0.5
set mxtics 1
set mytics 1
unset key

title_in = (title_lines + 1) * line_in + 0.16
left = inch_x(0.5)
right = 1 - inch_x(0.95)
bottom = inch_y(0.45)
top = 1 - inch_y(title_in)
set multiplot layout panel_rows, panel_columns \
    margins screen left, right, bottom, top \
    spacing screen inch_x(0.55), inch_y(title_in + 0.25)

do for [i = 1:nruns] {
    set title run_title[i]."\n".sprintf('layer %d, %d steps', panel_layer[i], \
                                        panel_steps[i]) offset 0, -0.3
    set xrange [0 : *]
    set autoscale xfixmax
    set xtics 0, tick_step(step_max, floor(ticks_across / panel_columns) + 1)
    set yrange [-0.5 : panel_experts[i] - 0.5]
    set ytics 0, (panel_experts[i] <= 16 ? 1 : (panel_experts[i] <= 32 ? 4 : 8))
    if ((i - 1) % panel_columns == 0) { set ylabel 'expert' } else { unset ylabel }
    if (i > nruns - panel_columns) { set xlabel 'training step' } else { unset xlabel }
    if (i == nruns) {
        set colorbox user origin screen right + inch_x(0.1), screen bottom \
            size screen inch_x(0.09), screen top - bottom
    } else {
        unset colorbox
    }
    # a hair wider than the cell, so that no seam shows
    plot $cells index (i - 1) using 1:2:($4 * 1.02):(0.505):3 with boxxyerror fillcolor palette
}
unset multiplot
