/*
** lmoelab.h — the `moelab` Lua module.
**
** luaopen_moelab is what `require "moelab"` calls. The host (main.c) sets
** moelab.args, and reports how a script ended with lmoelab_script_ended, so that
** runs still open are closed with the right status: failed on an error,
** interrupted on Ctrl-C, finished otherwise.
*/
#ifndef MOELAB_LMOELAB_H
#define MOELAB_LMOELAB_H

#include <lua.h>

/* The one symbol that moelab.so exports (the objects are compiled with
** -fvisibility=hidden), for the `require` of a stock lua5.4. */
__attribute__((visibility("default"))) int luaopen_moelab(lua_State *L);

/* Registers the module in package.preload and puts moelab's own Lua library
** first in package.path (ml_lua_dir() of paths.h: the installed share/lua/5.4
** or the build tree's lua/). The program calls this; a stock lua5.4 that
** loads moelab.so finds the library through its own package.path. */
void lmoelab_preload(lua_State *L);

/* Before a call the ranks make together (db:query, run:train, os.exit...):
** every rank checks that all are at `what` from the same script line
** (dist_agree), and all stop saying where each was when not. Nothing on one
** process. */
void lmoelab_agree(lua_State *L, const char *what);

/* Marks how the script ended; error_msg NULL means it ended well. */
void lmoelab_script_ended(lua_State *L, const char *error_msg, int interrupted);

#endif
