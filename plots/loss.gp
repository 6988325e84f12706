# loss.gp — figure "loss": training and validation loss against tokens seen,
# one colour per design (the seeds of a sweep share it); training as a thin,
# light line, validation as points joined by a line in the same colour.
#
# Render it with `moelab plot loss --db DB --out FILE.pdf`. moelab defines,
# before it loads style.gp and this script (src/plot.c):
#   the terminal, the output file and the page (style.gp);
#   nruns, run_title[i], run_design[i]        the runs, their names, colours;
#   $train, $val                              datablocks of "tokens loss" rows,
#                                             run i in index i-1 (a run with no
#                                             rows there has one NaN row);
#   has_train[i], has_val[i]                  1 when run i has such rows;
#   key_rows                                  the key's rows (style.gp);
#   tokens_min, tokens_max                    smallest positive and largest x.

# A log axis when the curve spans two decades or more: a training curve
# falls fastest early on. Tick labels read 1k, 10k, 1M; points at 0 tokens
# (an evaluation before training) have no place on it and are left out.
if (tokens_min > 0 && tokens_max / tokens_min >= 100) {
    set logscale x 10
    set autoscale xfix
    set format x '%.0s%c'     # 1k, 10k, 1M
    x_value(t) = (t > 0 ? t : NaN)
} else {
    x_unit = (tokens_max >= 1e6 ? 1e6 : (tokens_max >= 1e3 ? 1e3 : 1))
    x_suffix = (x_unit == 1e6 ? 'M' : (x_unit == 1e3 ? 'k' : ''))
    set format x '%g'.x_suffix
    set xtics tick_step(tokens_max / x_unit, ticks_across)
    set xtics add ('0' 0)
    x_value(t) = t / x_unit
}

set xlabel 'tokens seen (bytes)'
set ylabel 'loss (nats/byte)'
eval 'set grid xtics ytics '.grid_style
# The key sits below the axes, where it hides no curve: an entry per run,
# then what the two kinds of line are. (moelab makes the page taller for
# the key's rows.)
set key outside below left vertical maxrows key_rows

plot for [i=1:nruns] $train index (i - 1) using (x_value($1)):2 \
         with lines lw 1.2 dt run_dash(i) lc rgb faint(run_color(i)) notitle, \
     for [i=1:nruns] $val index (i - 1) using (x_value($1)):2 \
         with linespoints lw 2 dt run_dash(i) pt run_marker(i) ps 0.5 lc rgb run_color(i) \
         title (run_title[i]), \
     NaN with lines lw 1.2 lc rgb faint(0x606060) title 'training', \
     NaN with linespoints lw 2 pt 7 ps 0.5 lc rgb '#606060' title 'validation'
