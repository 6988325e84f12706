/*
** test_install.c — checks `make install` and `make uninstall` from outside,
** as a user would: installs into a temporary prefix (whose name holds a
** space), then
**   - the stock lua5.4, with LUA_CPATH and LUA_PATH pointing into the prefix
**     and nowhere else, loads moelab.so with `require "moelab"`, finds every
**     function, builds a tiny MoE model, trains it one step to a finite loss,
**     loads moelab.report and moelab.sweep, and draws a figure from the
**     installed plot scripts (a missing one is named by its installed path);
**   - the installed program answers --version, names the installed folders
**     in --help, finds the installed Lua helpers without LUA_PATH (a script's
**     require, `moelab report`), and plots from the installed scripts;
**   - both still find their files after the prefix is moved;
**   - `make uninstall` with the same PREFIX leaves no file behind, and a
**     DESTDIR install and uninstall stay inside DESTDIR.
**
** `make test` and `make asan` set MOELAB_SRC (the source tree), MOELAB_MAKE
** and the BUILD, BIN and OPT that built it, so that the install copies what
** the tests built; MOELAB_LUA names the interpreter (lua5.4) and
** MOELAB_LUA_PRELOAD the sanitizer runtimes that an interpreter built
** without them must preload to load a module built with them. Without
** MOELAB_SRC every test is skipped with a message.
*/
#include "testutil.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

extern char **environ;

static const char *src_dir;  /* the source tree, or NULL: skip */
static char tmpdir[256];
static char prefix[512];     /* tmpdir/"pre fix" */
static int installed;        /* test_install succeeded */

/* ---- child processes ------------------------------------------------------ */

typedef struct {
    char *out;   /* standard output and standard error, interleaved */
    int code;    /* exit code, or 128 + signal */
} Result;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The environment of a child: the NAME=value strings of extra (NULL-terminated,
** may be NULL), then ours without what would change the result (make's
** jobserver and flags, Lua's own search paths, MOELAB_PLOTS, a preload). */
static char **child_env(const char *const *extra) {
    static const char *const drop[] = {"MAKEFLAGS=", "MFLAGS=", "MAKELEVEL=", "MAKEOVERRIDES=",
                                       "LUA_PATH=", "LUA_CPATH=", "LUA_PATH_5_4=",
                                       "LUA_CPATH_5_4=", "LUA_INIT=", "LUA_INIT_5_4=",
                                       "MOELAB_PLOTS=", "LD_PRELOAD=", NULL};
    size_t n = 0, m = 0;
    while (environ[n]) n++;
    while (extra && extra[m]) m++;
    char **env = calloc(n + m + 1, sizeof *env);
    assert_non_null(env);
    size_t k = 0;
    for (size_t i = 0; i < m; i++) env[k++] = (char *)extra[i]; /* getenv takes the first */
    for (size_t i = 0; i < n; i++) {
        int keep = 1;
        for (int d = 0; drop[d] && keep; d++) keep = strncmp(environ[i], drop[d], strlen(drop[d])) != 0;
        if (keep) env[k++] = environ[i];
    }
    env[k] = NULL;
    return env;
}

/* Runs argv (NULL-terminated; argv[0] looked up in PATH) with the extra
** environment, standard input from /dev/null; kills it after timeout_s. */
static Result run(const char *const *argv, const char *const *extra_env, double timeout_s) {
    Result r = {0};
    int out[2];
    if (pipe(out)) fail_msg("pipe: %s", strerror(errno));
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_adddup2(&fa, out[1], 2);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    posix_spawn_file_actions_addclose(&fa, out[1]);
    char **env = child_env(extra_env);
    pid_t pid;
    int rc = posix_spawnp(&pid, argv[0], &fa, NULL, (char *const *)argv, env);
    posix_spawn_file_actions_destroy(&fa);
    free(env);
    close(out[1]);
    if (rc != 0) {
        close(out[0]);
        fail_msg("cannot start %s: %s", argv[0], strerror(rc));
    }
    size_t len = 0, cap = 8192;
    r.out = malloc(cap);
    assert_non_null(r.out);
    double end = now_s() + timeout_s;
    for (;;) {
        struct pollfd p = {out[0], POLLIN, 0};
        int ready = poll(&p, 1, 200);
        if (ready < 0 && errno != EINTR) fail_msg("poll: %s", strerror(errno));
        if (ready > 0) {
            if (cap - len < 4097) {
                cap *= 2;
                r.out = realloc(r.out, cap);
                assert_non_null(r.out);
            }
            ssize_t n = read(out[0], r.out + len, cap - len - 1);
            if (n == 0 || (n < 0 && errno != EINTR)) break;
            if (n > 0) len += (size_t)n;
        }
        if (now_s() > end) {
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
            r.out[len] = '\0';
            fail_msg("%s did not finish within %.0f s; output:\n%s", argv[0], timeout_s, r.out);
        }
    }
    r.out[len] = '\0';
    close(out[0]);
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) fail_msg("waitpid: %s", strerror(errno));
    r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return r;
}

static void expect_code(const Result *r, int code, const char *what) {
    if (r->code != code) fail_msg("%s: exit code %d, expected %d; output:\n%s", what, r->code, code, r->out);
}

static void expect_in(const Result *r, const char *needle, const char *what) {
    if (!strstr(r->out, needle)) fail_msg("%s: output does not contain '%s':\n%s", what, needle, r->out);
}

/* make -C SRC TARGET NAME=value... with the BUILD, BIN and OPT of the tests. */
static Result run_make(const char *target, const char *var1, const char *var2) {
    static char build[600], bin[600], opt[600];
    const char *argv[12];
    int n = 0;
    const char *make = getenv("MOELAB_MAKE");
    argv[n++] = make && *make ? make : "make";
    argv[n++] = "--no-print-directory";
    argv[n++] = "-C";
    argv[n++] = src_dir;
    const char *env;
    if ((env = getenv("BUILD")) && *env) argv[n++] = (snprintf(build, sizeof build, "BUILD=%s", env), build);
    if ((env = getenv("BIN")) && *env) argv[n++] = (snprintf(bin, sizeof bin, "BIN=%s", env), bin);
    if ((env = getenv("OPT")) && *env) argv[n++] = (snprintf(opt, sizeof opt, "OPT=%s", env), opt);
    argv[n++] = target;
    if (var1) argv[n++] = var1;
    if (var2) argv[n++] = var2;
    argv[n] = NULL;
    return run(argv, NULL, 600);
}

/* ---- files ------------------------------------------------------------- */

static const char *path_in(char *buf, size_t n, const char *dir, const char *name) {
    snprintf(buf, n, "%s/%s", dir, name);
    return buf;
}

static void expect_file(const char *dir, const char *name, int executable) {
    char path[1024];
    struct stat st;
    path_in(path, sizeof path, dir, name);
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) fail_msg("not installed: %s", path);
    if (executable && access(path, X_OK) != 0) fail_msg("not executable: %s", path);
}

static int leftovers;
static char first_leftover[1024];

static int count_non_dirs(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)ftw;
    if (flag != FTW_D && flag != FTW_DP && flag != FTW_DNR) {
        if (!leftovers++) snprintf(first_leftover, sizeof first_leftover, "%s", path);
    }
    return 0;
}

/* Fails unless the tree under dir holds folders only. */
static void expect_no_files(const char *dir) {
    leftovers = 0;
    if (nftw(dir, count_non_dirs, 16, FTW_PHYS) != 0 && errno != ENOENT)
        fail_msg("cannot walk %s: %s", dir, strerror(errno));
    if (leftovers) fail_msg("%d files left under %s, such as %s", leftovers, dir, first_leftover);
}

static void expect_absent(const char *dir, const char *name) {
    char path[1024];
    if (access(path_in(path, sizeof path, dir, name), F_OK) == 0) fail_msg("still there: %s", path);
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) fail_msg("cannot write %s: %s", path, strerror(errno));
    fputs(text, f);
    fclose(f);
}

#define SKIP_WITHOUT_SOURCE() do {                                          \
        if (!src_dir) skip();                                               \
    } while (0)

#define NEED_INSTALL() do {                                                 \
        SKIP_WITHOUT_SOURCE();                                              \
        if (!installed) fail_msg("make install failed (test_make_install)"); \
    } while (0)

/* ---- the stock interpreter ------------------------------------------------ */

/* Every function of the module, a tiny MoE model trained one step, the
** pure-Lua helpers, and a figure from the installed plot scripts. */
static const char *lua_check =
    "local prefix, tmp = os.getenv('MOELAB_TEST_PREFIX'), os.getenv('MOELAB_TEST_TMP')\n"
    "local m = require 'moelab'\n"
    "local so = package.searchpath('moelab', package.cpath)\n"
    "assert(so == prefix .. '/lib/lua/5.4/moelab.so', 'moelab.so from ' .. tostring(so))\n"
    "for _, f in ipairs{ 'corpus', 'model', 'load', 'open', 'plot', 'threads', 'moefy',\n"
    "                    'fit_router', 'sweep' } do\n"
    "  assert(type(m[f]) == 'function', 'moelab.' .. f .. ' is missing')\n"
    "end\n"
    "assert(type(m.version) == 'string' and type(m.args) == 'table')\n"
    "m.threads(1)\n"
    "local data = m.corpus{ text = string.rep('In the beginning God created the heaven. ', 20),\n"
    "                       split = 0.8 }\n"
    "local model = m.model{ layers = 1, d_model = 16, heads = 2, context = 16, seed = 1,\n"
    "                       moe = { experts = 4, hidden = 16, router = { kind = 'topk', k = 2 } } }\n"
    "local db = m.open(tmp .. '/lua.db')\n"
    "local run = db:run{ name = 'one', model = model, data = data }\n"
    "local t = run:train{ steps = 1, batch = 2, lr = 1e-3, warmup = 0 }\n"
    "assert(t.steps == 1, 'steps ' .. tostring(t.steps))\n"
    "assert(t.loss > 0 and t.loss < math.huge, 'loss ' .. tostring(t.loss))\n"
    "run:close()\n"
    "local report = require 'moelab.report'\n"
    "local rpath = package.searchpath('moelab.report', package.path)\n"
    "assert(rpath == prefix .. '/share/lua/5.4/moelab/report.lua', 'report from ' .. tostring(rpath))\n"
    "assert(type(require('moelab.sweep').run) == 'function', 'moelab.sweep')\n"
    "print(report.format_table({ { name = 'one', loss = t.loss } },\n"
    "                          { { 'name', 'run' }, { 'loss', 'loss', '%.4f' } }))\n"
    "local gp = prefix .. '/share/moelab/plots/loss.gp'\n"
    "assert(os.rename(gp, gp .. '.away'))\n"
    "local ok, err = pcall(m.plot, { db = db, figure = 'loss', out = tmp .. '/lua.png' })\n"
    "assert(os.rename(gp .. '.away', gp))\n"
    "assert(not ok and err:find(gp, 1, true), 'plot without loss.gp: ' .. tostring(err))\n"
    "m.plot{ db = db, figure = 'loss', out = tmp .. '/lua.png' }\n"
    "assert(io.open(tmp .. '/lua.png'), 'no figure')\n"
    "db:close()\n"
    "print(string.format('stock lua: loss %.4f', t.loss))\n";

static Result run_stock_lua(const char *pfx) {
    char cpath[700], lpath[700], env_prefix[600], env_tmp[300], preload[700];
    snprintf(cpath, sizeof cpath, "LUA_CPATH=%s/lib/lua/5.4/?.so", pfx);
    snprintf(lpath, sizeof lpath, "LUA_PATH=%s/share/lua/5.4/?.lua", pfx);
    snprintf(env_prefix, sizeof env_prefix, "MOELAB_TEST_PREFIX=%s", pfx);
    snprintf(env_tmp, sizeof env_tmp, "MOELAB_TEST_TMP=%s", tmpdir);
    const char *extra[7] = {cpath, lpath, env_prefix, env_tmp, NULL, NULL, NULL};
    const char *pre = getenv("MOELAB_LUA_PRELOAD");
    if (pre && *pre) {
        /* Without leak checks: libgomp leaks 8 bytes when it is loaded by
        ** dlopen rather than at start, and gnuplot inherits the preload.
        ** test_lua checks the module's own leaks under the sanitizers. */
        extra[4] = (snprintf(preload, sizeof preload, "LD_PRELOAD=%s", pre), preload);
        extra[5] = "ASAN_OPTIONS=detect_leaks=0";
    }
    const char *lua = getenv("MOELAB_LUA");
    const char *argv[] = {lua && *lua ? lua : "lua5.4", "-e", lua_check, NULL};
    return run(argv, extra, 120);
}

/* ---- tests ---------------------------------------------------------------- */

static void test_make_install(void **state) {
    (void)state;
    SKIP_WITHOUT_SOURCE();
    char var[600];
    snprintf(var, sizeof var, "PREFIX=%s", prefix);
    Result r = run_make("install", var, NULL);
    expect_code(&r, 0, "make install");
    free(r.out);
    expect_file(prefix, "bin/moelab", 1);
    expect_file(prefix, "lib/lua/5.4/moelab.so", 0);
    expect_file(prefix, "share/lua/5.4/moelab/report.lua", 0);
    expect_file(prefix, "share/lua/5.4/moelab/sweep.lua", 0);
    expect_file(prefix, "share/man/man1/moelab.1", 0);
    static const char *const figures[] = {"loss", "expert_load", "experts_per_token",
                                          "loss_vs_flops"};
    for (size_t i = 0; i < sizeof figures / sizeof *figures; i++) {
        char name[128];
        snprintf(name, sizeof name, "share/moelab/plots/%s.gp", figures[i]);
        expect_file(prefix, name, 0);
    }
    installed = 1;
}

static void test_stock_lua_requires_moelab(void **state) {
    (void)state;
    NEED_INSTALL();
    Result r = run_stock_lua(prefix);
    expect_code(&r, 0, "lua5.4 with the installed module");
    expect_in(&r, "stock lua: loss ", "lua5.4");
    free(r.out);
}

static void test_installed_program(void **state) {
    (void)state;
    NEED_INSTALL();
    char moelab[700], want[700];
    path_in(moelab, sizeof moelab, prefix, "bin/moelab");

    const char *version[] = {moelab, "--version", NULL};
    Result r = run(version, NULL, 60);
    expect_code(&r, 0, "moelab --version");
    expect_in(&r, "moelab " MOELAB_VERSION " (Lua 5.4", "moelab --version");
    free(r.out);

    const char *help[] = {moelab, "--help", NULL};
    r = run(help, NULL, 60);
    expect_code(&r, 0, "moelab --help");
    expect_in(&r, path_in(want, sizeof want, prefix, "share/moelab/plots,"), "moelab --help");
    expect_in(&r, path_in(want, sizeof want, prefix, "share/lua/5.4/moelab."), "moelab --help");
    free(r.out);

    /* the helpers without LUA_PATH, and a database to plot */
    char script[400], db[400], png[400];
    path_in(script, sizeof script, tmpdir, "program.lua");
    path_in(db, sizeof db, tmpdir, "program.db");
    path_in(png, sizeof png, tmpdir, "program.png");
    write_file(script,
               "local report = require 'moelab.report'\n"
               "print('report: ' .. package.searchpath('moelab.report', package.path))\n"
               "moelab.threads(1)\n"
               "local data = moelab.corpus{ text = string.rep('And God said. ', 40), split = 0.8 }\n"
               "local model = moelab.model{ layers = 1, d_model = 16, heads = 2, context = 16 }\n"
               "local db = moelab.open(moelab.args.db)\n"
               "local t = db:run{ name = 'one', model = model, data = data }:train{ steps = 1, batch = 2 }\n"
               "assert(t.loss > 0 and t.loss < math.huge)\n");
    char db_arg[420];
    snprintf(db_arg, sizeof db_arg, "db=%s", db);
    const char *run_script[] = {moelab, "run", script, db_arg, NULL};
    r = run(run_script, NULL, 120);
    expect_code(&r, 0, "moelab run");
    char report[700];
    snprintf(report, sizeof report, "report: %s/share/lua/5.4/moelab/report.lua", prefix);
    expect_in(&r, report, "moelab run");
    free(r.out);

    /* moelab report is the installed moelab.report's main */
    const char *report_db[] = {moelab, "report", db, NULL};
    r = run(report_db, NULL, 60);
    expect_code(&r, 0, "moelab report");
    expect_in(&r, "one", "moelab report");
    free(r.out);

    /* the figure scripts: a missing one is named by its installed path */
    char gp[700], away[720];
    path_in(gp, sizeof gp, prefix, "share/moelab/plots/loss.gp");
    snprintf(away, sizeof away, "%s.away", gp);
    assert_int_equal(rename(gp, away), 0);
    const char *plot[] = {moelab, "plot", "loss", "--db", db, "--out", png, NULL};
    r = run(plot, NULL, 60);
    assert_int_equal(rename(away, gp), 0);
    expect_code(&r, 1, "moelab plot without loss.gp");
    expect_in(&r, gp, "moelab plot without loss.gp");
    free(r.out);
    r = run(plot, NULL, 60);
    expect_code(&r, 0, "moelab plot");
    free(r.out);
    assert_int_equal(access(png, R_OK), 0);
}

/* The files are found from where the program and the module are, so a
** prefix that moved keeps working. */
static void test_moved_prefix(void **state) {
    (void)state;
    NEED_INSTALL();
    char moved[600], moelab[700], want[700];
    path_in(moved, sizeof moved, tmpdir, "moved");
    assert_int_equal(rename(prefix, moved), 0);
    path_in(moelab, sizeof moelab, moved, "bin/moelab");
    const char *help[] = {moelab, "--help", NULL};
    Result r = run(help, NULL, 60);
    Result l = run_stock_lua(moved);
    assert_int_equal(rename(moved, prefix), 0);
    expect_code(&r, 0, "moved moelab --help");
    expect_in(&r, path_in(want, sizeof want, moved, "share/moelab/plots,"), "moved moelab --help");
    expect_code(&l, 0, "lua5.4 with the moved module");
    free(r.out);
    free(l.out);
}

static void test_make_uninstall(void **state) {
    (void)state;
    NEED_INSTALL();
    char var[600];
    snprintf(var, sizeof var, "PREFIX=%s", prefix);
    Result r = run_make("uninstall", var, NULL);
    expect_code(&r, 0, "make uninstall");
    free(r.out);
    expect_no_files(prefix);
    expect_absent(prefix, "share/moelab");
    expect_absent(prefix, "share/lua/5.4/moelab");
}

/* DESTDIR stages an install: everything lands under DESTDIR/PREFIX. */
static void test_destdir(void **state) {
    (void)state;
    SKIP_WITHOUT_SOURCE();
    char stage[400], destdir[600], staged[800];
    path_in(stage, sizeof stage, tmpdir, "stage");
    snprintf(destdir, sizeof destdir, "DESTDIR=%s", stage);
    Result r = run_make("install", destdir, "PREFIX=/opt/moelab");
    expect_code(&r, 0, "make install DESTDIR=...");
    free(r.out);
    snprintf(staged, sizeof staged, "%s/opt/moelab", stage);
    expect_file(staged, "bin/moelab", 1);
    expect_file(staged, "lib/lua/5.4/moelab.so", 0);
    expect_file(staged, "share/moelab/plots/loss.gp", 0);
    r = run_make("uninstall", destdir, "PREFIX=/opt/moelab");
    expect_code(&r, 0, "make uninstall DESTDIR=...");
    free(r.out);
    expect_no_files(stage);
}

/* ---- main --------------------------------------------------------------- */

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int group_setup(void **state) {
    (void)state;
    const char *env = getenv("MOELAB_SRC");
    if (!env || !*env) {
        fprintf(stderr, "test_install: MOELAB_SRC is not set (make test sets it to the source "
                        "tree); skipping every test\n");
        return 0;
    }
    src_dir = env;
    signal(SIGPIPE, SIG_IGN);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/moelab-test-install-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return -1;
    }
    snprintf(prefix, sizeof prefix, "%s/pre fix", tmpdir);
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    if (!tmpdir[0]) return 0;
    if (getenv("MOELAB_KEEP_TMP")) {
        fprintf(stderr, "test_install: keeping %s\n", tmpdir);
        return 0;
    }
    nftw(tmpdir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_make_install),
        cmocka_unit_test(test_stock_lua_requires_moelab),
        cmocka_unit_test(test_installed_program),
        cmocka_unit_test(test_moved_prefix),
        cmocka_unit_test(test_make_uninstall),
        cmocka_unit_test(test_destdir),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
