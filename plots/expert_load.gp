# expert_load.gp — figure "expert_load": for each run a heatmap of its MoE
# layers (rows) by experts (columns), each cell coloured by the expert's share
# of the assignments its layer kept. A balanced layer is one flat colour
# (1/E everywhere); a collapsed router shows as one bright column. The data is
# the run's latest evaluation that recorded expert load, or else every
# training step summed; the panel's title says which. All panels share one
# colour scale, so that runs compare.
#
# Render it with `moelab plot expert_load --db DB --out FILE.pdf`. moelab
# defines, before it loads this script (src/plot.c):
#   the terminal and the output file, page_scale_x and page_scale_y (the page
#   against a one-panel figure), panel_columns and panel_rows;
#   nruns, and run_title[1..nruns]            the runs' names;
#   $load                                     datablock of "expert row share
#                                             layer" rows, run i in index i-1;
#                                             row counts the run's MoE layers
#                                             from 0, layer is the block number;
#   panel_note[i]                             'evaluation at step 1000' or
#                                             'training, 1000 steps summed';
#   panel_experts[i], panel_layers[i]         the grid of run i;
#   share_max                                 the largest share of any cell.

# Sequential, light to dark (viridis), readable in grey as well.
set palette defined (0 '#fde725', 0.25 '#5ec962', 0.5 '#21918c', 0.75 '#3b528b', \
                     1 '#440154')
set cbrange [0:share_max]
set cblabel 'share of assignments'
set cbtics scale 0.5
set format cb '%.2f'

set xlabel 'expert'
set tics out nomirror scale 0.5
set border 3 lw 0.8
set style fill solid 1.0 noborder
unset key

# Margins in fractions of the page, kept the same size in inches whatever
# the page: room for the axis labels left and below, the titles above, and
# one colour bar at the right for every panel.
left = 0.14 / page_scale_x
right = 1 - 0.2 / page_scale_x
bottom = 0.16 / page_scale_y
top = 1 - 0.1 / page_scale_y
set multiplot layout panel_rows, panel_columns \
    margins screen left, right, bottom, top \
    spacing screen 0.07 / page_scale_x, 0.3 / page_scale_y

do for [i = 1:nruns] {
    set title run_title[i].', '.panel_note[i]
    set xrange [-0.5 : panel_experts[i] - 0.5]
    set yrange [-0.5 : panel_layers[i] - 0.5]
    # Every expert numbered while that stays legible, else every 4th or 8th.
    x_step = (panel_experts[i] <= 16 ? 1 : (panel_experts[i] <= 32 ? 4 : 8))
    set xtics 0, x_step
    # The axis label once a row: the panels' own tics name their layers.
    if ((i - 1) % panel_columns == 0) { set ylabel 'layer' } else { unset ylabel }
    if (i == nruns) {
        set colorbox user origin screen right + 0.05 / page_scale_x, screen bottom \
            size screen 0.025 / page_scale_x, screen top - bottom
    } else {
        unset colorbox
    }
    # A box per cell, a hair wider than half a cell so that no seam shows;
    # the y tics name the blocks, as MoE layers may be every n-th block.
    plot $load index (i - 1) using 1:2:(0.505):(0.505):3:ytic(4) \
         with boxxyerror fillcolor palette
}
unset multiplot
