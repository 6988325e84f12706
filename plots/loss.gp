# loss.gp — figure "loss": training and validation loss against tokens seen,
# one colour per run; training as a thin, light line, validation as points
# joined by a line in the same colour.
#
# Render it with `moelab plot loss --db DB --out FILE.pdf`. moelab defines,
# before it loads this script (src/plot.c):
#   the terminal and the output file;
#   nruns, and run_title[1..nruns]            the legend's run names;
#   $train, $val                              datablocks of "tokens loss" rows,
#                                             run i in index i-1 (a run with no
#                                             rows there has one NaN row);
#   has_train[i], has_val[i]                  1 when run i has such rows;
#   tokens_min, tokens_max                    smallest positive and largest x.

# Okabe–Ito colours, which stay apart for colour-blind readers and in grey.
array palette[8] = [0x0072B2, 0xD55E00, 0x009E73, 0xCC79A7, \
                    0xE69F00, 0x56B4E9, 0x000000, 0x999999]
run_color(i) = palette[(i - 1) % 8 + 1]
# The same colour, 45% transparent (gnuplot's alpha byte counts transparency).
train_color(i) = run_color(i) + 0x73000000

# A log axis when the curve spans two decades or more: a training curve
# falls fastest early on. Tick labels read 1k, 10k, 1M; points at 0 tokens
# (an evaluation before training) have no place on it and are left out.
if (tokens_min > 0 && tokens_max / tokens_min >= 100) {
    set logscale x 10
    set autoscale xfix
    set format x '%.0s%c'
    x_value(t) = (t > 0 ? t : NaN)
} else {
    x_unit = (tokens_max >= 1e6 ? 1e6 : (tokens_max >= 1e3 ? 1e3 : 1))
    x_suffix = (x_unit == 1e6 ? 'M' : (x_unit == 1e3 ? 'k' : ''))
    set format x '%g'.x_suffix
    x_value(t) = t / x_unit
}

set xlabel 'tokens seen'
set ylabel 'loss (nats/byte)'
set border 3 lw 0.8
set tics nomirror out scale 0.6
set mxtics
set grid xtics ytics lw 0.5 lc rgb '#e0e0e0'
# The legend sits below the axes, where it hides no curve: one row per run,
# train and val side by side. (moelab makes the page taller for many runs.)
set key outside below center vertical maxrows nruns samplen 2.5 spacing 1.05

plot for [i=1:nruns] $train index (i - 1) using (x_value($1)):2 \
         with lines lw 1 lc rgb train_color(i) \
         title (has_train[i] ? run_title[i].' train' : ''), \
     for [i=1:nruns] $val index (i - 1) using (x_value($1)):2 \
         with linespoints lw 1.5 pt 7 ps 0.45 lc rgb run_color(i) \
         title (has_val[i] ? run_title[i].' val' : '')
