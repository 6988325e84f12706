# heatmap_panels.gp — the panels of a heatmap figure, one per run, with
# one colour scale and one colour bar at the right (expert_load, sparsity,
# cooccurrence, byte_classes, strata_flow). Not a figure itself: a figure's
# script sets the variables below and loads it (load plots_dir.'/...').
#
# The figure sets:
#   $cells                  "x y value label" rows, run i in index i-1; cell
#                           (x, y) of the grid; NaN leaves a cell blank;
#                           label names row y when heat_ytics is 1
#   heat_title(i)           the title of run i's panel
#   heat_x_label, heat_y_label, heat_label   the axes' and the colour bar's
#   heat_columns(i), heat_rows(i)            the grid of run i
#   heat_max                the top of the colour scale (the bottom is 0)
# and may set (defaults below):
#   heat_format             the colour bar's numbers ('%.2f')
#   heat_ytics              1: rows named by the label column; 0: numbers
#   heat_reverse            1: row 0 at the top, as a matrix reads
#   heat_ytic_chars         the longest row name, in characters (2)
#   heat_annotate           1: each cell shows its value, in heat_cell_format
#   heat_cell_format        ('%.2f'), of the value times heat_cell_scale (1)
#   heat_xtic_step(n)       the step of the x tics for n columns
#   heat_title_lines        the lines of the longest title (title_lines + 1)
# moelab defines the page (style.gp), panel_columns and panel_rows.

if (!exists("heat_format")) heat_format = '%.2f'
if (!exists("heat_ytics")) heat_ytics = 0
if (!exists("heat_reverse")) heat_reverse = 0
if (!exists("heat_ytic_chars")) heat_ytic_chars = 2
if (!exists("heat_cell_scale")) heat_cell_scale = 1
# inches left of a panel: its row names, and the y label when it has one
heat_left = heat_ytic_chars * 0.6 * font_pt / 72 + 0.12 + (heat_y_label ne '' ? line_in : 0)
if (!exists("heat_annotate")) heat_annotate = 0
if (!exists("heat_cell_format")) heat_cell_format = '%.2f'
# Every expert numbered while that stays legible, else every 4th or 8th.
if (!exists("heat_xtic_step")) heat_xtic_step(n) = (n <= 16 ? 1 : (n <= 32 ? 4 : 8))
heat_ytic_step(n) = (n <= 16 ? 1 : (n <= 32 ? 4 : 8))

set cbrange [0 : heat_max]
set cblabel heat_label offset char 1.5, 0
set format cb heat_format
set border 3 front lw 1.2 lc rgb '#303030'
set tics out nomirror scale 0.5
set mxtics 1
set mytics 1
unset key

# Margins in inches, the same whatever the page: room for the row names and
# the y label left, the x tics and label below, a two-line title above each
# panel, and the colour bar with its numbers and label at the right.
if (!exists("heat_title_lines")) heat_title_lines = title_lines + 1
title_in = heat_title_lines * line_in + 0.16
left = inch_x(heat_left + 0.1)
right = 1 - inch_x(0.95)
bottom = inch_y(0.45)
top = 1 - inch_y(title_in)
set multiplot layout panel_rows, panel_columns \
    margins screen left, right, bottom, top \
    spacing screen inch_x(heat_left + 0.18), inch_y(title_in + 0.25)

do for [i = 1:nruns] {
    set title heat_title(i) offset 0, -0.3
    set xrange [-0.5 : heat_columns(i) - 0.5]
    if (heat_reverse) {
        set yrange [heat_rows(i) - 0.5 : -0.5]
    } else {
        set yrange [-0.5 : heat_rows(i) - 0.5]
    }
    set xtics 0, heat_xtic_step(heat_columns(i)) scale 0.5
    set ytics 0, heat_ytic_step(heat_rows(i)) scale 0.5
    # The axis labels once: y in the first column, x in the last row.
    if ((i - 1) % panel_columns == 0) { set ylabel heat_y_label } else { unset ylabel }
    if (i > nruns - panel_columns) { set xlabel heat_x_label } else { unset xlabel }
    if (i == nruns) {
        set colorbox user origin screen right + inch_x(0.1), screen bottom \
            size screen inch_x(0.09), screen top - bottom
    } else {
        unset colorbox
    }
    # A box per cell, a hair wider than half a cell so that no seam shows.
    if (heat_ytics) {
        if (heat_annotate) {
            plot $cells index (i - 1) using 1:2:(0.505):(0.505):3:ytic(4) \
                     with boxxyerror fillcolor palette, \
                 '' index (i - 1) using 1:2:(sprintf(heat_cell_format, heat_cell_scale * $3)): \
                     ($3 > 0.55 * heat_max ? 0xffffff : 0x202020) \
                     with labels tc rgb variable
        } else {
            plot $cells index (i - 1) using 1:2:(0.505):(0.505):3:ytic(4) \
                     with boxxyerror fillcolor palette
        }
    } else {
        plot $cells index (i - 1) using 1:2:(0.505):(0.505):3 \
                 with boxxyerror fillcolor palette
    }
}
unset multiplot
