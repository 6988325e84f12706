/*
** main.c — the moelab command line: run a Lua experiment, render a figure,
** print a database's runs (report), or open a Lua prompt with the moelab
** module loaded.
**
** Scripts run under lua_pcall with a message handler that adds a traceback,
** as lua.c does. Ctrl-C outside training stops the script at the next Lua
** instruction (training has its own handler that ends the step cleanly); in
** both cases open runs are recorded as 'interrupted' and the exit code is 130.
** SIGTERM and SIGHUP are handled the same way (exit codes 143 and 129).
*/
#include <lauxlib.h>
#include <lualib.h>
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "dist.h"
#include "lmoelab.h"
#include "paths.h"
#include "plot.h"
#include "trainer.h"

/* GOMP_SPINCOUNT unless the user sets it (prefer_short_spinning, below) */
#define MOELAB_SPINCOUNT "300"

static const char *usage =
    "moelab " MOELAB_VERSION " — a workbench for Mixture-of-Experts routing research\n"
    "\n"
    "usage:\n"
    "  moelab run SCRIPT.lua [name=value ...]   run an experiment script; the pairs\n"
    "                                           reach it as the table moelab.args\n"
    "  moelab plot FIGURE --db DB [--out FILE] [--runs NAME,...] [--layer N]\n"
    "              [--layers A,B] [--size single|double] [--gnuplot FILE]\n"
    "                                           render a figure; .pdf, .png or .svg by\n"
    "                                           FILE's extension (default: FIGURE.pdf\n"
    "                                           beside DB); a layer is a block number;\n"
    "                                           single: 3.3 in wide, double: 7 in;\n"
    "                                           --gnuplot also saves gnuplot's input;\n"
    "                                           NAME may hold * as a wildcard.\n"
    "                                           FIGURE is one of\n"
    "@FIGURES@"
    "  moelab report DB [--runs NAME,...] [--format text|csv|markdown]\n"
    "                                           one row per run (seeds of a sweep\n"
    "                                           folded into mean ± spread); NAME\n"
    "                                           may hold * as a wildcard\n"
    "  moelab placement DB --devices P[,P...] [--policy contiguous|round_robin|\n"
    "              balanced|cooccurrence|all] [--run NAME] [--eval ID]\n"
    "              [--bandwidth GB/s] [--rate GFLOP/s] [--format text|csv|markdown]\n"
    "                                           replay a recorded evaluation's routing\n"
    "                                           with the experts on P devices: per\n"
    "                                           layer, all-to-all volume, local share,\n"
    "                                           load imbalance, critical path (README)\n"
    "  moelab                                   a Lua prompt with moelab loaded\n"
    "  moelab --help | --version\n"
    "\n"
    "Environment: MOELAB_PLOTS overrides the folder of gnuplot scripts;\n"
    "MOELAB_MAX_MEMORY caps a model's memory (e.g. 8G); GOMP_SPINCOUNT and\n"
    "OMP_WAIT_POLICY as for OpenMP (default here: GOMP_SPINCOUNT=" MOELAB_SPINCOUNT ", a short\n"
    "spin before sleeping). Training uses every core unless the script calls\n"
    "moelab.threads(n).\n";

/* The usage, with "@FIGURES@" replaced by PLOT_FIGURES wrapped to fit. */
static void show_usage(FILE *f) {
    const char *at = strstr(usage, "@FIGURES@");
    fwrite(usage, 1, (size_t)(at - usage), f);
    const char *list = PLOT_FIGURES;
    int column = 0;
    while (*list) {
        int len = (int)strcspn(list, ",");
        if (column > 0 && column + len + 2 > 79) {
            fputs(",\n", f);
            column = 0;
        } else if (column > 0) {
            fputs(", ", f);
            column += 2;
        }
        if (column == 0)
            column = fprintf(f, "%43s", "");
        column += fprintf(f, "%.*s", len, list);
        list += len + (list[len] == ',');
    }
    fputs("\n", f);
    fputs(at + strlen("@FIGURES@"), f);
}

static lua_State *globalL;
static volatile sig_atomic_t interrupted;

/* As lua.c: on Ctrl-C, set a hook that raises an error at the next instruction. */
static void lstop(lua_State *L, lua_Debug *ar) {
    (void)ar;
    lua_sethook(L, NULL, 0, 0);
    luaL_error(L, "interrupted by %s", trainer_signal_name(interrupted));
}

/* Ctrl-C, SIGTERM and SIGHUP alike: the script stops, its open runs are
** recorded as 'interrupted', and moelab exits with 128 + the signal. */
static void laction(int sig) {
    signal(sig, SIG_DFL);
    interrupted = sig;
    trainer_interrupt = sig; /* training about to start stops at once */
    lua_sethook(globalL, lstop, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

static int msghandler(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

/* Calls the function below nargs arguments; on error prints the message with
** its traceback and records how the script ended. */
static int docall(lua_State *L, int nargs, int nres) {
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, msghandler);
    lua_insert(L, base);
    globalL = L;
    signal(SIGINT, laction);
    signal(SIGTERM, laction);
    signal(SIGHUP, laction);
    int status = lua_pcall(L, nargs, nres, base);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    lua_remove(L, base);
    return status;
}

static void report(lua_State *L, int status) {
    if (status != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        FILE *f = dist_errors();
        if (dist_active()) fprintf(f, "moelab: [rank %d of %d] ", dist_rank(), dist_size());
        else fputs("moelab: ", f);
        fprintf(f, "%s\n", msg ? msg : "(error without a message)");
        fflush(f);
        lua_pop(L, 1);
    }
}

static lua_State *new_state(void) {
    lua_State *L = luaL_newstate();
    if (!L) {
        fprintf(stderr, "moelab: cannot create a Lua state: out of memory\n");
        exit(1);
    }
    luaL_openlibs(L);
    lmoelab_preload(L);
    return L;
}

/* Loads the module as the global `moelab` and returns it on the stack. */
static int load_module(lua_State *L) {
    lua_getglobal(L, "require");
    lua_pushstring(L, "moelab");
    int status = docall(L, 1, 1);
    if (status != LUA_OK) {
        report(L, status);
        return -1;
    }
    lua_pushvalue(L, -1);
    lua_setglobal(L, "moelab");
    return 0;
}

/* "12" → integer, "3e-3" → number, anything else stays a string. */
static void push_arg_value(lua_State *L, const char *v) {
    if (*v && lua_stringtonumber(L, v) != 0) return;
    if (strcmp(v, "true") == 0) lua_pushboolean(L, 1);
    else if (strcmp(v, "false") == 0) lua_pushboolean(L, 0);
    else lua_pushstring(L, v);
}

/* os.exit, under mpirun (one rank or several) and without it. One rank's
** exit stops the others (mpirun ends the job when a process leaves without
** finishing MPI), as before. A successful exit is the script's end, which
** every rank must reach alike: the ranks agree on it, from the same line,
** and finish MPI, so that `os.exit(0)` at the end of a script ends the job
** as running off its end does, instead of mpirun calling the exit improper
** and failing the job (with `mpirun -np 1` too, where MPI is started). */
static int os_exit_ranks(lua_State *L) {
    int success = lua_isboolean(L, 1) ? lua_toboolean(L, 1)
                                      : luaL_optinteger(L, 1, EXIT_SUCCESS) == EXIT_SUCCESS;
    if (success) {
        lmoelab_agree(L, "os.exit");
        lmoelab_script_ended(L, NULL, 0);
        if (lua_toboolean(L, 2)) lua_close(L); /* runs closed as at the script's end */
        fflush(stdout);
        dist_finalize();
        exit(EXIT_SUCCESS);
    }
    lua_pushvalue(L, lua_upvalueindex(1)); /* Lua's own */
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 0);
    return 0;
}

static int cmd_run(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "moelab run: missing SCRIPT.lua\n\n");
        show_usage(stderr);
        return 2;
    }
    const char *script = argv[2];
    /* under mpirun: one of several ranks (dist.h); rank 0 alone prints */
    char err[ML_ERRLEN];
    if (dist_init(&argc, &argv, err) != 0) {
        fprintf(stderr, "moelab run: %s\n", err);
        return 1;
    }
    if (dist_quiet(err) != 0) dist_fail(err);
    lua_State *L = new_state();
    if (load_module(L) != 0) {
        lua_close(L);
        return 1;
    }
    lua_getfield(L, -1, "args");
    for (int i = 3; i < argc; i++) {
        const char *eq = strchr(argv[i], '=');
        if (!eq || eq == argv[i]) {
            fprintf(stderr, "moelab run: argument '%s' is not name=value\n", argv[i]);
            lua_close(L);
            return 2;
        }
        lua_pushlstring(L, argv[i], (size_t)(eq - argv[i]));
        push_arg_value(L, eq + 1);
        lua_settable(L, -3);
    }
    lua_pop(L, 2);
    lua_pushstring(L, script);
    lua_setfield(L, LUA_REGISTRYINDEX, "moelab.script");
    /* the global `arg`, as lua.c sets it: arg[0] is the script */
    lua_createtable(L, argc - 3, 1);
    for (int i = 2; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - 2);
    }
    lua_setglobal(L, "arg");
    /* always: under `mpirun -np 1` MPI is started but dist_active() is 0 */
    lua_getglobal(L, "os");
    lua_getfield(L, -1, "exit");
    lua_pushcclosure(L, os_exit_ranks, 1);
    lua_setfield(L, -2, "exit");
    lua_pop(L, 1);

    int status = luaL_loadfile(L, script);
    if (status == LUA_OK) status = docall(L, 0, 0);
    int rc = 0;
    if (status != LUA_OK) {
        const char *msg = lua_tostring(L, -1);
        int was_interrupted = interrupted || (msg && strstr(msg, "interrupted by "));
        lmoelab_script_ended(L, msg, was_interrupted);
        /* an error every rank raised alike (rank 0's outcome, dist.h) is
        ** said once: rank 0 stops the others before they say it again */
        if (dist_rank() != 0) usleep(500 * 1000);
        report(L, status);
        int sig = interrupted ? interrupted : trainer_stopped_by ? trainer_stopped_by : SIGINT;
        rc = was_interrupted ? 128 + sig : 1;
    } else {
        dist_agree("the end of the script", script); /* no rank left behind in a call */
        lmoelab_script_ended(L, NULL, 0);
    }
    lua_close(L); /* closes open runs with the status set above */
    /* a rank that stops early stops the others, which may wait for it */
    if (rc != 0 && dist_active()) dist_fail("the script stopped");
    dist_finalize();
    return rc;
}

/* A block number of --layer or --layers: digits only, at most INT_MAX. */
static int parse_layer(const char *text, const char **end, int *layer) {
    long long v = 0;
    const char *c = text;
    if (*c < '0' || *c > '9') return -1;
    for (; *c >= '0' && *c <= '9'; c++) {
        v = 10 * v + (*c - '0');
        if (v > INT_MAX) return -1;
    }
    *end = c;
    *layer = (int)v;
    return 0;
}

static int cmd_plot(int argc, char **argv) {
    const char *figure = NULL, *db = NULL, *out = NULL, *layer = NULL, *layers = NULL;
    PlotOptions opt = PLOT_OPTIONS_INIT;
    for (int i = 2; i < argc; i++) {
        const char **slot = NULL;
        if (strcmp(argv[i], "--db") == 0) slot = &db;
        else if (strcmp(argv[i], "--out") == 0) slot = &out;
        else if (strcmp(argv[i], "--runs") == 0) slot = &opt.runs;
        else if (strcmp(argv[i], "--layer") == 0) slot = &layer;
        else if (strcmp(argv[i], "--layers") == 0) slot = &layers;
        else if (strcmp(argv[i], "--size") == 0) slot = &opt.size;
        else if (strcmp(argv[i], "--gnuplot") == 0) slot = &opt.gnuplot_out;
        else if (argv[i][0] == '-') {
            fprintf(stderr, "moelab plot: unknown option '%s'\n\n", argv[i]);
            show_usage(stderr);
            return 2;
        } else if (!figure) {
            figure = argv[i];
            continue;
        } else {
            fprintf(stderr, "moelab plot: unexpected argument '%s'\n", argv[i]);
            return 2;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "moelab plot: %s needs a value\n", argv[i]);
            return 2;
        }
        *slot = argv[++i];
    }
    if (!figure || !db) {
        fprintf(stderr, "moelab plot: need FIGURE and --db DB\n\n");
        show_usage(stderr);
        return 2;
    }
    /* an empty list would draw every run, as if --runs were not given */
    if (opt.runs && opt.runs[strspn(opt.runs, " \t")] == '\0') {
        fprintf(stderr, "moelab plot: --runs names no run, got '%s'\n", opt.runs);
        return 2;
    }
    const char *end = NULL;
    if (layer && (parse_layer(layer, &end, &opt.layer) || *end)) {
        fprintf(stderr, "moelab plot: --layer must be a block number (0, 1, ...), got '%s'\n",
                layer);
        return 2;
    }
    if (layers && (parse_layer(layers, &end, &opt.layers[0]) || *end != ','
                   || parse_layer(end + 1, &end, &opt.layers[1]) || *end)) {
        fprintf(stderr, "moelab plot: --layers must be two block numbers, A,B (as 0,1), "
                "got '%s'\n", layers);
        return 2;
    }
    char default_out[4096];
    if (!out) {
        const char *slash = strrchr(db, '/');
        int dir_len = slash ? (int)(slash - db + 1) : 0;
        snprintf(default_out, sizeof default_out, "%.*s%s.pdf", dir_len, db, figure);
        out = default_out;
    }
    if (access(db, R_OK) != 0) {
        fprintf(stderr, "moelab plot: cannot read database '%s'\n", db);
        return 1;
    }
    char err[ML_ERRLEN];
    if (plot_render(figure, db, out, &opt, err) != 0) {
        fprintf(stderr, "moelab plot: %s\n", err);
        return 1;
    }
    printf("%s\n", out);
    return 0;
}

/* moelab report: lua/moelab/report.lua's main, with the arguments after
** "report"; its return value is the exit code. */
/* A command written in Lua: require(module).main(args) with the arguments
** after the command's name; it returns the exit code. Its own errors start
** with "moelab COMMAND:" and are usage errors (exit 2, no traceback). */
static int cmd_lua_tool(int argc, char **argv, const char *module, const char *prefix) {
    lua_State *L = new_state();
    if (load_module(L) != 0) {
        lua_close(L);
        return 1;
    }
    lua_pop(L, 1);
    lua_getglobal(L, "require");
    lua_pushstring(L, module);
    int status = docall(L, 1, 1);
    if (status == LUA_OK) {
        lua_getfield(L, -1, "main");
        lua_remove(L, -2);
        lua_createtable(L, argc - 2, 0);
        for (int i = 2; i < argc; i++) {
            lua_pushstring(L, argv[i]);
            lua_rawseti(L, -2, i - 1);
        }
        status = docall(L, 1, 1);
    }
    int rc = 1;
    if (status == LUA_OK) {
        rc = (int)lua_tointeger(L, -1);
    } else {
        const char *msg = lua_tostring(L, -1);
        if (msg && strncmp(msg, prefix, strlen(prefix)) == 0) { /* ours: no traceback */
            const char *nl = strchr(msg, '\n');
            fprintf(stderr, "%.*s (moelab --help for usage)\n", nl ? (int)(nl - msg) : (int)strlen(msg),
                    msg);
            rc = 2;
        } else {
            report(L, status);
        }
    }
    lua_close(L);
    return rc;
}

/* A Lua prompt. Lines that form an expression print its values; an incomplete
** chunk asks for more lines, as in lua.c. */
static int cmd_prompt(void) {
    lua_State *L = new_state();
    if (load_module(L) != 0) {
        lua_close(L);
        return 1;
    }
    lua_pop(L, 1);
    int tty = isatty(STDIN_FILENO);
    if (tty) printf("moelab %s — Lua prompt; `moelab` is loaded. Ctrl-D leaves.\n", MOELAB_VERSION);
    /* whole lines, however long: a line cut in two would run as two chunks
    ** (the rest of a long comment as code) */
    char *line = NULL;
    size_t line_size = 0;
    for (;;) {
        if (tty) {
            fputs("> ", stdout);
            fflush(stdout);
        }
        if (getline(&line, &line_size, stdin) < 0) break;
        lua_pushstring(L, line);
        int status;
        for (;;) {
            const char *chunk = lua_tostring(L, -1);
            lua_pushfstring(L, "return %s", chunk);
            status = luaL_loadbuffer(L, lua_tostring(L, -1), lua_rawlen(L, -1), "=stdin");
            lua_remove(L, -2);
            if (status == LUA_OK) break;
            lua_pop(L, 1);
            status = luaL_loadbuffer(L, chunk, strlen(chunk), "=stdin");
            if (status != LUA_ERRSYNTAX) break;
            const char *msg = lua_tostring(L, -1);
            size_t lmsg = strlen(msg);
            if (lmsg < 5 || strcmp(msg + lmsg - 5, "<eof>") != 0) break;
            lua_pop(L, 1); /* incomplete: read another line */
            if (tty) {
                fputs(">> ", stdout);
                fflush(stdout);
            }
            if (getline(&line, &line_size, stdin) < 0) {
                status = LUA_OK + 100;
                break;
            }
            lua_pushstring(L, line);
            lua_concat(L, 2);
        }
        if (status == LUA_OK + 100) break;
        lua_remove(L, -2); /* the chunk's text */
        if (status == LUA_OK) {
            int base = lua_gettop(L);
            status = docall(L, 0, LUA_MULTRET);
            if (status == LUA_OK) {
                int n = lua_gettop(L) - base + 1;
                if (n > 0) {
                    lua_getglobal(L, "print");
                    lua_insert(L, -(n + 1));
                    if (lua_pcall(L, n, 0, 0) != LUA_OK) report(L, LUA_ERRRUN);
                }
                continue;
            }
        }
        report(L, status);
        interrupted = 0;
    }
    free(line);
    if (tty) putchar('\n');
    lmoelab_script_ended(L, NULL, 0);
    lua_close(L);
    return 0;
}

/* How OpenMP threads wait between parallel regions. Spinning long collapses
** when another process shares the cores (libgomp's default, 300,000 spins:
** 5,700 against 37,000 tokens/s with one busy neighbour at 100,000 spins);
** sleeping at once (OMP_WAIT_POLICY=passive) costs every region a wake-up,
** 10-23% of the top-2 reference model's training on an idle machine. A short
** spin of MOELAB_SPINCOUNT keeps nearly all of the idle speed and loses 5%
** beside a busy neighbour (README, Speed). libgomp reads this before main
** runs, so moelab sets GOMP_SPINCOUNT and starts itself again, once, unless
** the user chose a policy or a count. */
static void prefer_short_spinning(char **argv) {
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT")) return;
    setenv("GOMP_SPINCOUNT", MOELAB_SPINCOUNT, 1);
    execv("/proc/self/exe", argv);
    /* if that failed, go on with the default policy */
}

/* What could not be written to stdout (a report redirected to a full disk
** or a closed descriptor) fails the command, as coreutils do: a truncated
** table or CSV must not exit 0. rc is the command's own exit code. */
static int finish_stdout(int rc) {
    int failed = ferror(stdout);
    if (fflush(stdout) == 0 && !failed)
        return rc;
    fprintf(stderr, "moelab: cannot write standard output: %s\n", strerror(errno));
    return rc != 0 ? rc : 1;
}

static int run_command(int argc, char **argv) {
    if (argc < 2) return cmd_prompt();
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        show_usage(stdout);
        printf("\nFiles: figure scripts in %s,\n"
               "Lua helpers (moelab.report, moelab.sweep, ...) in %s/moelab.\n"
               "See moelab(1).\n", ml_plots_dir(), ml_lua_dir());
        return 0;
    }
    if (strcmp(cmd, "--version") == 0 || strcmp(cmd, "-v") == 0) {
        printf("moelab %s (%s)\n", MOELAB_VERSION, LUA_RELEASE);
        return 0;
    }
    if (strcmp(cmd, "run") == 0) return cmd_run(argc, argv);
    if (strcmp(cmd, "plot") == 0) return cmd_plot(argc, argv);
    if (strcmp(cmd, "report") == 0)
        return cmd_lua_tool(argc, argv, "moelab.report", "moelab report:");
    if (strcmp(cmd, "placement") == 0)
        return cmd_lua_tool(argc, argv, "moelab.placement", "moelab placement:");
    fprintf(stderr, "moelab: unknown command '%s'\n\n", cmd);
    show_usage(stderr);
    return 2;
}

int main(int argc, char **argv) {
    prefer_short_spinning(argv);
    return finish_stdout(run_command(argc, argv));
}
