# experts_per_token.gp — figure "experts_per_token": how many experts a
# token received in a MoE layer, as a histogram over every (token, layer)
# pair of each run's latest recorded evaluation; one colour per design, the
# runs' boxes side by side. Top-2 is a single bar at 2; a threshold router
# spreads out, and its mean (in the key) is its compute per token. A
# stratified token counts every pass; a token that no expert chose (expert
# choice) counts 0.
#
# Render it with `moelab plot experts_per_token --db DB --out FILE.pdf`.
# moelab defines, before it loads style.gp and this script (src/plot.c):
#   the terminal, the output file and the page (style.gp);
#   nruns, run_title[i], run_design[i]        the runs, their names, colours;
#   $hist                                     datablock of "experts fraction"
#                                             rows, run i in index i-1, for
#                                             experts 0 .. the run's largest;
#   mean_experts[i]                           experts per token and layer;
#   eval_step[i]                              the step of the evaluation;
#   experts_max                               the largest count of any run.

# nruns boxes share each unit of x, with a gap between counts.
box_width = 0.8 / nruns
box_x(x, i) = x - 0.4 + box_width * (i - 0.5)
set boxwidth box_width absolute
set style fill solid 0.9 border lc rgb '#ffffff'

set xrange [-0.6 : experts_max + 0.6]
x_step = (experts_max <= 16 ? 1 : (experts_max <= 40 ? 4 : 8))
set xtics 0, x_step
set mxtics 1
set yrange [0 : *]
set xlabel 'experts per token and MoE layer'
set ylabel 'share of (token, layer) pairs'
eval 'set grid ytics '.grid_style
set key outside below left vertical maxrows key_rows samplen 1.5

plot for [i = 1:nruns] $hist index (i - 1) using (box_x($1, i)):2 \
         with boxes lc rgb run_color(i) \
         title sprintf('%s (mean %.2f)', run_title[i], mean_experts[i])
