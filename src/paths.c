/*
** paths.c — ml_plots_dir and ml_lua_dir of paths.h.
**
** The running code finds its own file with dladdr1 on one of its functions:
** the link map names the shared object (moelab.so, loaded by lua5.4's
** require) or, for the program itself, has an empty name, and then
** /proc/self/exe names it. A program in a folder called bin, or a module in
** lib/lua/5.4, is installed; the prefix is the folder above bin or lib.
*/
#include "paths.h"

#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <lua.h> /* LUA_VERSION_MAJOR and LUA_VERSION_MINOR only */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef MOELAB_PLOTS_DIR
#define MOELAB_PLOTS_DIR "plots" /* the Makefile passes the clone's absolute path */
#endif
#ifndef MOELAB_LUA_DIR
#define MOELAB_LUA_DIR "lua"
#endif

#define LUA_SUBDIR "lua/" LUA_VERSION_MAJOR "." LUA_VERSION_MINOR

static pthread_once_t found_once = PTHREAD_ONCE_INIT;
static char plots_dir[PATH_MAX + 32], lua_dir[PATH_MAX + 32];

/* Removes suffix ("/bin") from the end of path; 1 if it was there. */
static int strip_suffix(char *path, const char *suffix) {
    size_t n = strlen(path), s = strlen(suffix);
    if (n < s || strcmp(path + n - s, suffix) != 0) return 0;
    path[n - s] = '\0';
    return 1;
}

static void find_dirs(void) {
    Dl_info info;
    struct link_map *map = NULL;
    char file[PATH_MAX];
    int installed = 0;
    if (dladdr1((void *)find_dirs, &info, (void **)&map, RTLD_DL_LINKMAP) && map
        && realpath(map->l_name[0] ? map->l_name : "/proc/self/exe", file)) {
        char *slash = strrchr(file, '/');
        if (slash) {
            *slash = '\0'; /* the folder */
            installed = strip_suffix(file, "/bin") || strip_suffix(file, "/lib/" LUA_SUBDIR);
        }
    }
    if (installed) { /* file is now the prefix */
        snprintf(plots_dir, sizeof plots_dir, "%s/share/moelab/plots", file);
        snprintf(lua_dir, sizeof lua_dir, "%s/share/" LUA_SUBDIR, file);
    } else {
        snprintf(plots_dir, sizeof plots_dir, "%s", MOELAB_PLOTS_DIR);
        snprintf(lua_dir, sizeof lua_dir, "%s", MOELAB_LUA_DIR);
    }
}

const char *ml_plots_dir(void) {
    const char *env = getenv("MOELAB_PLOTS");
    if (env && *env) return env;
    pthread_once(&found_once, find_dirs);
    return plots_dir;
}

const char *ml_lua_dir(void) {
    pthread_once(&found_once, find_dirs);
    return lua_dir;
}
