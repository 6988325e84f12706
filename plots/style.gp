# style.gp — the look every moelab figure shares, loaded by moelab before
# the figure's own script (src/plot.c). Change a colour or a font here and
# every figure follows.
#
# moelab defines, before it loads this file:
#   the terminal and the output file: a vector PDF 3.3 in wide (one column,
#     --size single) or 7 in (two, --size double), text font_pt points (8 or
#     9); a PNG of the same page at 300 dpi; an SVG of it in points;
#   page_width, page_height                   the page, in inches;
#   font_pt                                   the text size, in points;
#   panel_columns, panel_rows                 the grid of a figure of panels;
#   key_rows                                  the rows of the key below the
#                                             axes (its entries fill them
#                                             column by column: maxrows);
#   key_width                                 what the key's width needs
#                                             (characters; see src/plot.c);
#   title_lines                               the most lines a run's title
#                                             takes (in panel titles);
#   nruns, run_title[i]                       the runs drawn and their names;
#   run_design[i]                             the run's design (its name but
#                                             for a sweep's "/seed=N") as the
#                                             order of the design's first run
#                                             in the database: its colour.
#
# Line widths: lw 1 is 0.5 pt; lw 2 is 1 pt.

# Okabe & Ito's colours (Color Universal Design, 2008): they stay apart for
# readers with any common colour-vision deficiency and in grey print. Yellow
# (#F0E442) is too light on white and is left out; black and grey close the
# list. A design keeps its colour in every figure of a database: design d
# (run_design) takes colour d; past eight, the colours come round again
# with another marker and dash.
array okabe_ito[8] = [0x0072B2, 0xD55E00, 0x009E73, 0xCC79A7, \
                      0xE69F00, 0x56B4E9, 0x000000, 0x999999]
array design_markers[4] = [7, 5, 9, 13]      # disc, square, triangle, pentagon
design_color(d) = okabe_ito[(d - 1) % 8 + 1]
design_marker(d) = design_markers[((d - 1) / 8) % 4 + 1]
design_dash(d) = ((d - 1) / 8) % 4 + 1
run_color(i) = design_color(run_design[i])
run_marker(i) = design_marker(run_design[i])
run_dash(i) = design_dash(run_design[i])
# The same colour, mostly see-through (gnuplot's alpha byte is transparency).
faint(color) = color + 0x8C000000

# Axes: left and bottom only, ticks out; text and lines in near-black.
set border 3 front lw 1.2 lc rgb '#303030'
set tics nomirror out scale 0.6 front
set xtics nomirror
set ytics nomirror
set mxtics default
set mytics default
unset grid
# Figures that want a grid take this one: light, behind the data.
grid_style = "back lw 0.8 lc rgb '#e8e8e8'"
set key noopaque nobox reverse Left samplen 2 spacing 1.05 width key_width height 0.6 textcolor rgb '#202020'
set style fill solid 1.0 noborder
set pointsize 0.8
set errorbars small
set datafile missing 'NaN'

# Heatmaps: viridis, light (little) to dark (much); readable in grey and by
# colour-blind readers, and no value looks like a special one.
set palette defined (0 '#fde725', 0.25 '#5ec962', 0.5 '#21918c', 0.75 '#3b528b', \
                     1 '#440154')
set cbtics scale 0.5 out nomirror

# Margins and offsets in inches, whatever the page.
inch_x(x) = x / page_width
inch_y(y) = y / page_height
# A line of text, and a key below the axes of n lines, in inches.
line_in = 1.3 * font_pt / 72.0
key_lines(n) = n * line_in

# A tick step of 1, 2 or 5 times a power of ten that cuts span into at most
# n steps: few enough tick labels for a column's width.
tick_step(span, n) = (_s = span / n, _m = 10 ** floor(log10(_s)), \
                      (_s / _m <= 1 ? 1 : (_s / _m <= 2 ? 2 : (_s / _m <= 5 ? 5 : 10))) * _m)
# How many ticks fit across: about one per 0.55 in of axis.
ticks_across = floor((page_width - 0.8) / 0.55)
