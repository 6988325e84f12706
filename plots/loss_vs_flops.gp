# loss_vs_flops.gp — figure "loss_vs_flops": each run's latest validation
# loss against the MoE FLOPs it spent per token, one labelled point per run.
# Down and to the left is better: a router that reaches the same loss with
# fewer FLOPs sits left of the others. Dense runs spend no MoE FLOPs and sit
# on the line x = 0, labelled "(dense)".
#
# Render it with `moelab plot loss_vs_flops --db DB --out FILE.pdf`. moelab
# defines, before it loads this script (src/plot.c):
#   the terminal and the output file;
#   nruns, and run_title[1..nruns]            the runs' names;
#   $points                                   datablock of one "flops loss"
#                                             row per run, run i in index i-1;
#   dense[i]                                  1 when run i has no MoE FLOPs;
#   flops_max                                 the largest x.

array palette[8] = [0x0072B2, 0xD55E00, 0x009E73, 0xCC79A7, \
                    0xE69F00, 0x56B4E9, 0x000000, 0x999999]
run_color(i) = palette[(i - 1) % 8 + 1]
point_label(i) = run_title[i].(dense[i] ? ' (dense)' : '')

# A linear axis from 0, in thousands or millions of FLOPs, with room on the
# left for the dense points' markers and on the right for the last label.
x_unit = (flops_max >= 1e6 ? 1e6 : (flops_max >= 1e3 ? 1e3 : 1))
x_unit_name = (x_unit == 1e6 ? ' (millions)' : (x_unit == 1e3 ? ' (thousands)' : ''))
x_span = (flops_max > 0 ? flops_max / x_unit : 1)
set xrange [-0.06 * x_span : 1.3 * x_span]
set format x '%g'
if (flops_max <= 0) { set xtics ('0' 0) }   # dense runs only
set offsets 0, 0, graph 0.12, graph 0.12
set yzeroaxis lt 1 lw 0.5 lc rgb '#999999'

set xlabel 'MoE FLOPs per token'.x_unit_name
set ylabel 'validation loss (nats/byte)'
set border 3 lw 0.8
set tics nomirror out scale 0.6
set grid xtics ytics lw 0.5 lc rgb '#e0e0e0'
unset key

plot for [i = 1:nruns] $points index (i - 1) using ($1 / x_unit):2 \
         with points pt 7 ps 0.8 lc rgb run_color(i), \
     for [i = 1:nruns] $points index (i - 1) using ($1 / x_unit):2:(point_label(i)) \
         with labels left offset char 0.7, 0.35 tc rgb run_color(i)
