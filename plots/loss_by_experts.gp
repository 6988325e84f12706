# loss_by_experts.gp — figure "loss_by_experts": does compute go to the
# tokens that need it? Each run's latest recorded evaluation, its tokens
# grouped by the experts they got (token_stats.experts: summed over the MoE
# layers, shown per layer). Above: the mean loss of each group, with 95%
# intervals (1.96 standard errors; groups of fewer than 10 tokens are left
# out there); below: each group's share of the tokens. A threshold router
# that spends more on hard tokens rises to the right; top-k is one point.
#
# Render it with `moelab plot loss_by_experts --db DB --out FILE.pdf`; the
# runs need an evaluation with record = true. moelab defines, before it
# loads style.gp and this script (src/plot.c):
#   the terminal, the output file and the page (style.gp);
#   nruns, run_title[i], run_design[i]        the runs, their names, colours;
#   $bins                                     "experts_per_layer mean_loss
#                                             ci95 share tokens" rows, run i
#                                             in index i-1;
#   eval_step[i], moe_layers[i], mean_loss[i] the evaluation's step, the MoE
#                                             layers, the mean over tokens;
#   key_rows                                  the key's rows (style.gp);
#   experts_max                               the largest x.

min_tokens = 10
x_pad = (experts_max > 0 ? 0.06 * experts_max : 0.5)
set xrange [-x_pad : experts_max + x_pad]
set format x '%g'

# Two plots sharing x: the loss above (two thirds), the shares below, the
# key under both; margins in inches line their axes up.
key_height = key_lines(key_rows) + 0.1
left = inch_x(0.55)
right = 1 - inch_x(0.12)
bottom = inch_y(key_height + 0.45)
split = bottom + inch_y(0.65)
set multiplot
set lmargin at screen left
set rmargin at screen right

set tmargin at screen 1 - inch_y(0.08)
set bmargin at screen split + inch_y(0.12)
set format x ''
unset xlabel
set ylabel 'loss (nats/byte)'
eval 'set grid xtics ytics '.grid_style
unset key
plot for [i = 1:nruns] $bins index (i - 1) \
         using 1:($5 >= min_tokens ? $2 : NaN):3 with yerrorlines lw 2 dt run_dash(i) \
         pt run_marker(i) ps 0.6 lc rgb run_color(i) notitle

# The shares below, and under them the key, drawn entry by entry: gnuplot
# cuts a key outside a plot with fixed margins (or placed at a point) to
# the rows its plot has room for.
set tmargin at screen split
set bmargin at screen bottom
set format x '%g'
set xlabel 'experts per token and MoE layer'
set ylabel 'share of tokens' offset char 0.5, 0
set yrange [0 : *]
set ytics 0, 0.5 format '%.1f'
set ytics add ('1' 1)
key_columns = ceil(1.0 * nruns / key_rows)
key_x(i) = left + ((i - 1) / key_rows) * (right - left) / key_columns
key_y(i) = inch_y(key_height - 0.1 - (((i - 1) % key_rows) + 0.5) * line_in)
do for [i = 1:nruns] {
    set arrow i from screen key_x(i), screen key_y(i) \
        to screen key_x(i) + inch_x(0.22), screen key_y(i) nohead \
        lw 1.5 dt run_dash(i) lc rgb run_color(i)
    set label i run_title[i] at screen key_x(i) + inch_x(0.3), screen key_y(i) \
        left front
    set object i circle at screen key_x(i) + inch_x(0.11), screen key_y(i) \
        size screen inch_x(0.025) fillcolor rgb run_color(i) fillstyle solid noborder front
}
plot for [i = 1:nruns] $bins index (i - 1) using 1:4 with linespoints lw 1.5 \
         dt run_dash(i) pt run_marker(i) ps 0.5 lc rgb run_color(i) notitle
unset multiplot
