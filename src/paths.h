/*
** paths.h — where moelab finds its own files: the gnuplot figure scripts and
** the pure-Lua helpers (moelab.report, moelab.sweep).
**
** The same objects make the program ./moelab, the Lua module moelab.so and
** the test programs, so where the files are is decided when they are looked
** for, not when the objects are compiled:
**   installed   the code runs from PREFIX/bin/moelab or from
**               PREFIX/lib/lua/5.4/moelab.so (symbolic links resolved): the
**               files are in PREFIX/share/moelab/plots and PREFIX/share/lua/5.4,
**               where `make install` put them, wherever PREFIX is now;
**   build tree  anywhere else (./moelab, build/moelab.so, build/test_*): the
**               clone's plots/ and lua/, MOELAB_PLOTS_DIR and MOELAB_LUA_DIR
**               as the Makefile compiled them in.
** $MOELAB_PLOTS, when set and not empty, overrides the plots folder in both.
*/
#ifndef MOELAB_PATHS_H
#define MOELAB_PATHS_H

/* The folder of the figure scripts (FIGURE.gp), without a trailing slash. */
const char *ml_plots_dir(void);

/* The folder that holds moelab/report.lua and moelab/sweep.lua, for
** package.path ("DIR/?.lua"). */
const char *ml_lua_dir(void);

#endif
