# experts_per_token.gp — figure "experts_per_token": how many experts a
# token received in a MoE layer, as a histogram over every (token, layer)
# pair of each run's latest recorded evaluation; one colour per run, the
# runs' boxes side by side. Top-2 is a single bar at 2; a threshold router
# spreads out, and its mean (in the legend) is its compute per token. A
# stratified token counts every pass; a token that no expert chose (expert
# choice) counts 0.
#
# Render it with `moelab plot experts_per_token --db DB --out FILE.pdf`.
# moelab defines, before it loads this script (src/plot.c):
#   the terminal and the output file;
#   nruns, and run_title[1..nruns]            the legend's run names;
#   $hist                                     datablock of "experts fraction"
#                                             rows, run i in index i-1, for
#                                             experts 0 .. the run's largest;
#   mean_experts[i]                           experts per token and layer;
#   eval_step[i]                              the step of the evaluation;
#   experts_max                               the largest count of any run.

array palette[8] = [0x0072B2, 0xD55E00, 0x009E73, 0xCC79A7, \
                    0xE69F00, 0x56B4E9, 0x000000, 0x999999]
run_color(i) = palette[(i - 1) % 8 + 1]

# nruns boxes share each unit of x, with a gap between counts.
box_width = 0.8 / nruns
box_x(x, i) = x - 0.4 + box_width * (i - 0.5)
set boxwidth box_width absolute
set style fill solid 0.85 border lc rgb '#ffffff'

set xrange [-0.6 : experts_max + 0.6]
x_step = (experts_max <= 16 ? 1 : (experts_max <= 40 ? 4 : 8))
set xtics 0, x_step
set yrange [0 : *]
set xlabel 'experts per token and layer'
set ylabel 'fraction of (token, layer) pairs'
set border 3 lw 0.8
set tics nomirror out scale 0.6
set grid ytics lw 0.5 lc rgb '#e0e0e0'
set key outside below center vertical maxrows nruns samplen 1.5 spacing 1.05

plot for [i = 1:nruns] $hist index (i - 1) using (box_x($1, i)):2 \
         with boxes lc rgb run_color(i) \
         title sprintf('%s (mean %.2f)', run_title[i], mean_experts[i])
