/*
** test_cli.c — checks the moelab command line (src/main.c) from outside, as
** a user's shell would run it: the binary named by $MOELAB (which `make test`
** and `make asan` set) is started with posix_spawn, without a shell, and its
** exit code, standard output and standard error are checked. Covered: --help,
** --version, bad commands, scripts with syntax and runtime errors, name=value
** arguments, `plot` (an unknown figure, a PNG into a path with a space and a
** quote), files that are not moelab databases, output to a full disk, the
** Lua prompt on a pipe, and Ctrl-C (SIGINT) during training and
** during plain Lua, which must exit with 130 and leave the run recorded as
** 'interrupted' with its rows.
**
** Without $MOELAB every test is skipped with a message.
*/
#include "testproc.h"

#include <sys/stat.h>

#include "common.h"

static const char *moelab;   /* the binary, or NULL: skip */

/* Starts moelab with the arguments (NULL-terminated); see testproc.h. */
static void proc_start(Proc *p, const char *input, const char *const *args) {
    proc_spawn(p, input, moelab, args);
}

/* Runs moelab to its end. */
#define MOELAB(p, input, ...) do {                                          \
        const char *const args_[] = {__VA_ARGS__, NULL};                    \
        proc_start((p), (input), args_);                                    \
        proc_finish((p), 60);                                               \
    } while (0)

/* moelab without arguments: the prompt. */
static void run_prompt(Proc *p, const char *input) {
    const char *const none[] = {NULL};
    proc_start(p, input, none);
    proc_finish(p, 60);
}


#define SKIP_WITHOUT_MOELAB() do {                                          \
        if (!moelab) skip();                                                \
    } while (0)

/* ---- files ------------------------------------------------------------- */

/* The tiny model of these tests: a training step takes well under 1 ms. One
** thread, since OpenMP barriers on a shared machine cost more than the work. */
#define TINY_PRELUDE                                                             \
    "moelab.threads(1)\n"                                                        \
    "local data = moelab.corpus{ text = string.rep('abcdefgh', 200) }\n"         \
    "local model = moelab.model{ layers = 1, d_model = 16, heads = 2, context = 16,\n" \
    "                            ffn = { hidden = 32 } }\n"                       \
    "local db = moelab.open(moelab.args.db)\n"

/* A database with one short finished run named 'tiny', made once. */
static const char *tiny_db(void) {
    static char db[512];
    if (db[0]) return db;
    char script[512];
    tmp_path(script, sizeof script, "tiny.lua");
    write_file(script, TINY_PRELUDE
               "local run = db:run{ name = 'tiny', model = model, data = data }\n"
               "local t = run:train{ steps = 20, batch = 4, lr = 1e-2, warmup = 2, threads = 1,\n"
               "                     eval_every = 5, eval_batches = 2, progress = false }\n"
               "print(t.status)\n");
    char path[512], arg[600];
    tmp_path(path, sizeof path, "tiny.db");
    snprintf(arg, sizeof arg, "db=%s", path);
    Proc p;
    MOELAB(&p, NULL, "run", script, arg);
    expect_code(&p, 0);
    assert_string_equal(p.out.data, "finished\n");
    proc_free(&p);
    snprintf(db, sizeof db, "%s", path);
    return db;
}

/* ---- the tests ---------------------------------------------------------- */

static void test_help(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    Proc p;
    MOELAB(&p, NULL, "--help");
    expect_code(&p, 0);
    expect_in("--help", p.out.data, "moelab run SCRIPT.lua");
    expect_in("--help", p.out.data, "moelab plot FIGURE");
    expect_in("--help", p.out.data, "--version");
    expect_in("--help", p.out.data, "loss");
    expect_in("--help", p.out.data, "--size single|double");
    expect_in("--help", p.out.data, "strata_flow");
    assert_int_equal(p.err.len, 0);
    proc_free(&p);
}

static void test_version(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    Proc p;
    MOELAB(&p, NULL, "--version");
    expect_code(&p, 0);
    assert_memory_equal(p.out.data, "moelab " MOELAB_VERSION, strlen("moelab " MOELAB_VERSION));
    expect_in("--version", p.out.data, "Lua 5.4");
    proc_free(&p);
}

static void test_bad_commands(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    Proc p;
    MOELAB(&p, NULL, "frobnicate");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "unknown command 'frobnicate'");
    expect_in("stderr", p.err.data, "usage");
    assert_int_equal(p.out.len, 0);
    proc_free(&p);

    MOELAB(&p, NULL, "run");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "missing SCRIPT.lua");
    proc_free(&p);

    char script[512];
    tmp_path(script, sizeof script, "empty.lua");
    write_file(script, "");
    MOELAB(&p, NULL, "run", script, "=5");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "'=5' is not name=value");
    proc_free(&p);
    MOELAB(&p, NULL, "run", script, "novalue");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "'novalue'");
    proc_free(&p);

    /* an empty script is a fine script */
    MOELAB(&p, NULL, "run", script);
    expect_code(&p, 0);
    proc_free(&p);

    char missing[512];
    tmp_path(missing, sizeof missing, "missing-script.lua");
    MOELAB(&p, NULL, "run", missing);
    expect_code(&p, 1);
    expect_in("stderr", p.err.data, "missing-script.lua");
    proc_free(&p);

    MOELAB(&p, NULL, "plot", "loss");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "--db");
    proc_free(&p);
    MOELAB(&p, NULL, "plot", "loss", "--db");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "needs a value");
    proc_free(&p);
    MOELAB(&p, NULL, "plot", "loss", "--colour", "red");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "--colour");
    proc_free(&p);
}

static void test_syntax_error(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    char script[512];
    tmp_path(script, sizeof script, "syntax.lua");
    write_file(script, "local a = 1\nlocal b = = 2\nprint('not reached')\n");
    Proc p;
    MOELAB(&p, NULL, "run", script);
    expect_code(&p, 1);
    expect_in("stderr", p.err.data, "syntax.lua:2:");
    expect_in("stderr", p.err.data, "'='");
    assert_null(strstr(p.out.data, "not reached"));
    proc_free(&p);
}

static void test_runtime_error(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    char script[512];
    tmp_path(script, sizeof script, "runtime.lua");
    write_file(script, "local function inner() error('deep trouble') end\n"
                       "local function outer() inner() end\n"
                       "print('before')\n"
                       "outer()\n"
                       "print('after')\n");
    Proc p;
    MOELAB(&p, NULL, "run", script);
    expect_code(&p, 1);
    assert_string_equal(p.out.data, "before\n");
    expect_in("stderr", p.err.data, "runtime.lua:1: deep trouble");
    expect_in("stderr", p.err.data, "stack traceback");
    expect_in("stderr", p.err.data, "runtime.lua:2:"); /* outer, in the traceback */
    expect_in("stderr", p.err.data, "runtime.lua:4:"); /* the main chunk */
    proc_free(&p);

    /* an error from the module names the script line too */
    write_file(script, "\nmoelab.model{ d_modle = 16 }\n");
    MOELAB(&p, NULL, "run", script);
    expect_code(&p, 1);
    expect_in("stderr", p.err.data, "runtime.lua:2:");
    expect_in("stderr", p.err.data, "'d_model'");
    proc_free(&p);

    /* an error value that is not a string */
    write_file(script, "error({})\n");
    MOELAB(&p, NULL, "run", script);
    expect_code(&p, 1);
    expect_in("stderr", p.err.data, "table");
    proc_free(&p);
}

static void test_args(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    char script[512];
    tmp_path(script, sizeof script, "args.lua");
    write_file(script, "local a = moelab.args\n"
                       "assert(require('moelab').args == a)\n"
                       "print(type(a), math.type(a.n), a.n + 1, math.type(a.lr), a.lr * 1000,\n"
                       "      a.name, type(a.flag), tostring(a.flag), a.empty == '', a.expr, arg[0])\n"
                       "local n = 0 for _ in pairs(a) do n = n + 1 end\n"
                       "print(n)\n");
    Proc p;
    MOELAB(&p, NULL, "run", script, "n=12", "lr=3e-3", "name=top2", "flag=false", "empty=", "expr=a=b");
    expect_code(&p, 0);
    char expected[1024];
    snprintf(expected, sizeof expected,
             "table\tinteger\t13\tfloat\t3.0\ttop2\tboolean\tfalse\ttrue\ta=b\t%s\n6\n", script);
    assert_string_equal(p.out.data, expected);
    proc_free(&p);

    /* without arguments, the table is there and empty */
    write_file(script, "print(type(moelab.args), next(moelab.args))\n");
    MOELAB(&p, NULL, "run", script);
    expect_code(&p, 0);
    assert_string_equal(p.out.data, "table\tnil\n");
    proc_free(&p);
}

static void test_plot(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    const char *db = tiny_db();
    char never[512];
    tmp_path(never, sizeof never, "never-written.pdf");
    Proc p;
    MOELAB(&p, NULL, "plot", "nosuchfigure", "--db", db, "--out", never);
    assert_int_not_equal(p.code, 0);
    expect_in("stderr", p.err.data, "nosuchfigure");
    proc_free(&p);

    char missing[512];
    tmp_path(missing, sizeof missing, "missing.db");
    MOELAB(&p, NULL, "plot", "loss", "--db", missing);
    assert_int_not_equal(p.code, 0);
    expect_in("stderr", p.err.data, "missing.db");
    proc_free(&p);

    MOELAB(&p, NULL, "plot", "loss", "--db", db, "--runs", "nosuchrun", "--out", never);
    assert_int_not_equal(p.code, 0);
    expect_in("stderr", p.err.data, "nosuchrun");
    proc_free(&p);
    /* the database given as the figure's gnuplot program (or as the figure)
    ** is refused: plot only reads it */
    struct stat before, after;
    assert_int_equal(stat(db, &before), 0);
    MOELAB(&p, NULL, "plot", "loss", "--db", db, "--out", never, "--gnuplot", db);
    expect_code(&p, 1);
    expect_in("stderr", p.err.data, "is the database itself");
    proc_free(&p);
    assert_int_equal(stat(db, &after), 0);
    assert_int_equal(after.st_size, before.st_size);
    assert_int_equal(after.st_mtime, before.st_mtime);
    MOELAB(&p, NULL, "report", db);
    expect_code(&p, 0);
    proc_free(&p);
    /* an empty --runs (a shell variable left unset) is not "every run" */
    MOELAB(&p, NULL, "plot", "loss", "--db", db, "--runs", "", "--out", never);
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "--runs names no run");
    proc_free(&p);
    assert_int_equal(access(never, F_OK), -1);

    /* a PNG into a folder with a space and a file name with a quote */
    char dir[512], out[600];
    tmp_path(dir, sizeof dir, "dir with space");
    mkdir(dir, 0755);
    snprintf(out, sizeof out, "%s/it's.png", dir);
    MOELAB(&p, NULL, "plot", "loss", "--db", db, "--out", out, "--runs", "tiny");
    expect_code(&p, 0);
    expect_in("stdout", p.out.data, out);
    proc_free(&p);
    FILE *f = fopen(out, "rb");
    if (!f) fail_msg("%s was not written", out);
    unsigned char head[8] = {0};
    size_t got = fread(head, 1, 8, f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    assert_int_equal(got, 8);
    assert_memory_equal(head, "\x89PNG\r\n\x1a\n", 8);
    assert_true(size > 1000);

    /* the options: a layer for a figure of one layer, a page size; refused
    ** with the option's name before anything is drawn */
    MOELAB(&p, NULL, "plot", "loss", "--db", db, "--out", never, "--layer", "x1");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "--layer must be a block number");
    proc_free(&p);
    MOELAB(&p, NULL, "plot", "cooccurrence", "--db", db, "--out", never, "--layers", "1");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "--layers must be two block numbers");
    proc_free(&p);
    MOELAB(&p, NULL, "plot", "loss", "--db", db, "--out", never, "--layer", "1");
    assert_int_not_equal(p.code, 0);
    expect_in("stderr", p.err.data, "figure 'loss' draws no single layer");
    proc_free(&p);
    MOELAB(&p, NULL, "plot", "loss", "--db", db, "--out", never, "--size", "huge");
    assert_int_not_equal(p.code, 0);
    expect_in("stderr", p.err.data, "unknown size 'huge'");
    proc_free(&p);
    assert_int_equal(access(never, F_OK), -1);
    /* --gnuplot saves what gnuplot was given, which draws the figure again */
    char program[512];
    tmp_path(program, sizeof program, "loss.gnuplot");
    MOELAB(&p, NULL, "plot", "loss", "--db", db, "--out", out, "--size", "double",
           "--gnuplot", program);
    expect_code(&p, 0);
    proc_free(&p);
    f = fopen(program, "r");
    if (!f) fail_msg("%s was not written", program);
    char line[256];
    int terminal = 0;
    while (fgets(line, sizeof line, f))
        terminal |= strncmp(line, "set terminal pngcairo size 2100,", 32) == 0;
    fclose(f);
    assert_true(terminal);   /* double: 7 in at 300 dpi */

    /* without --out: FIGURE.pdf beside the database */
    MOELAB(&p, NULL, "plot", "loss", "--db", db);
    expect_code(&p, 0);
    char pdf[512];
    tmp_path(pdf, sizeof pdf, "loss.pdf");
    expect_in("stdout", p.out.data, pdf);
    proc_free(&p);
    f = fopen(pdf, "rb");
    if (!f) fail_msg("%s was not written", pdf);
    got = fread(head, 1, 5, f);
    fclose(f);
    assert_int_equal(got, 5);
    assert_memory_equal(head, "%PDF-", 5);
}

/* moelab report: a table, CSV or Markdown of the runs; --runs filters them;
** bad options and files are named, exit 2. */
static void test_report(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    const char *db = tiny_db();
    Proc p;
    MOELAB(&p, NULL, "report", db);
    expect_code(&p, 0);
    expect_in("stdout", p.out.data, "val loss");
    expect_in("stdout", p.out.data, "tiny");
    expect_in("stdout", p.out.data, "finished");
    proc_free(&p);
    MOELAB(&p, NULL, "report", db, "--format", "csv");
    expect_code(&p, 0);
    expect_in("stdout", p.out.data, "name,design,n,params_total");
    expect_in("stdout", p.out.data, "\ntiny,");
    proc_free(&p);
    MOELAB(&p, NULL, "report", db, "--format", "markdown", "--runs", "ti*");
    expect_code(&p, 0);
    expect_in("stdout", p.out.data, "| run | design |");
    expect_in("stdout", p.out.data, "| tiny |");
    proc_free(&p);
    MOELAB(&p, NULL, "report", db, "--runs", "nosuchrun");
    assert_int_not_equal(p.code, 0);
    expect_in("stderr", p.err.data, "no run matches");
    proc_free(&p);
    /* no names at all is not "every run"; spaces around a name, as plot */
    MOELAB(&p, NULL, "report", db, "--runs", "");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "--runs names no run");
    proc_free(&p);
    MOELAB(&p, NULL, "report", db, "--runs", " , ");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "--runs names no run");
    proc_free(&p);
    MOELAB(&p, NULL, "report", db, "--runs", "nosuchrun, tiny");
    expect_code(&p, 0);
    expect_in("stdout", p.out.data, "tiny");
    proc_free(&p);
    MOELAB(&p, NULL, "report", db, "--format", "xml");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "'xml'");
    proc_free(&p);
    MOELAB(&p, NULL, "report", db, "--colour");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "--colour");
    proc_free(&p);
    char missing[512];
    tmp_path(missing, sizeof missing, "missing.db");
    MOELAB(&p, NULL, "report", missing);
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "missing.db");
    proc_free(&p);
}

/* moelab placement: a recorded MoE evaluation replayed on 1 and 4 devices
** by every policy; usage errors exit 2. */
static void test_placement(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    char script[512], path[512], arg[600];
    tmp_path(script, sizeof script, "placement.lua");
    write_file(script, "moelab.threads(1)\n"
               "local data = moelab.corpus{ text = string.rep('abcdefgh', 200) }\n"
               "local model = moelab.model{ layers = 1, d_model = 16, heads = 2, context = 16,\n"
               "                            moe = { experts = 4, hidden = 8 } }\n"
               "local db = moelab.open(moelab.args.db)\n"
               "local run = db:run{ name = 'moe', model = model, data = data }\n"
               "run:train{ steps = 3, batch = 4, threads = 1, eval_batches = 0, progress = false }\n"
               "run:evaluate{ batches = 2, batch = 4, record = true }\n");
    tmp_path(path, sizeof path, "placement.db");
    snprintf(arg, sizeof arg, "db=%s", path);
    Proc p;
    MOELAB(&p, NULL, "run", script, arg);
    expect_code(&p, 0);
    proc_free(&p);
    MOELAB(&p, NULL, "placement", path, "--devices", "1,4", "--policy", "all", "--format", "csv");
    expect_code(&p, 0);
    expect_in("stdout", p.out.data, "policy,devices,layer,assignments,local");
    expect_in("stdout", p.out.data, "\ncontiguous,1,all,256,1.000,0.000,");
    expect_in("stdout", p.out.data, "\ncooccurrence,4,all,256,");
    proc_free(&p);
    MOELAB(&p, NULL, "placement", path);
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "need --devices");
    proc_free(&p);
    /* not an evaluation id: refused, not replaced by the latest evaluation */
    MOELAB(&p, NULL, "placement", path, "--devices", "4", "--eval", "1.5");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "--eval takes an evaluation id");
    proc_free(&p);
    /* no device count at all: refused, not an empty table */
    MOELAB(&p, NULL, "placement", path, "--devices", ",");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "--devices names no device count");
    proc_free(&p);
    MOELAB(&p, NULL, "placement", path, "--devices", "4", "--policy", "random");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "unknown policy 'random'");
    proc_free(&p);
    MOELAB(&p, NULL, "placement", tiny_db(), "--devices", "4");
    expect_code(&p, 2);
    expect_in("stderr", p.err.data, "no recorded evaluation");
    proc_free(&p);
}

/* Files that are not moelab databases, given to the commands that read one:
** each is named with what is wrong (report and placement: a usage error,
** exit 2, without a traceback), and none is changed. */
static void test_unreadable_databases(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    char text[512], dir[512], newer[512], never[512];
    tmp_path(never, sizeof never, "never-drawn.pdf");
    tmp_path(text, sizeof text, "notes.txt");
    write_file(text, "not a database, only some notes written by hand\n");
    tmp_path(dir, sizeof dir, "a-folder.db");
    mkdir(dir, 0755);
    tmp_path(newer, sizeof newer, "newer.db");
    sqlite3 *db = NULL;
    assert_int_equal(sqlite3_open(newer, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, "CREATE TABLE runs(run_id INTEGER PRIMARY KEY);"
                                      "PRAGMA user_version = 999;", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
    const struct { const char *path, *says; } cases[] = {
        {text, "is not a SQLite database"},
        {dir, "is a directory"},
        {newer, "has schema version 999"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        Proc p;
        MOELAB(&p, NULL, "report", cases[i].path);
        expect_code(&p, 2);
        expect_in("stderr", p.err.data, cases[i].says);
        assert_null(strstr(p.err.data, "traceback"));
        proc_free(&p);
        MOELAB(&p, NULL, "placement", cases[i].path, "--devices", "2");
        expect_code(&p, 2);
        expect_in("stderr", p.err.data, cases[i].says);
        assert_null(strstr(p.err.data, "traceback"));
        proc_free(&p);
        MOELAB(&p, NULL, "plot", "loss", "--db", cases[i].path, "--out", never);
        expect_code(&p, 1);
        expect_in("stderr", p.err.data, cases[i].says);
        proc_free(&p);
    }
    struct stat st;
    assert_int_equal(stat(text, &st), 0);
    assert_int_equal(st.st_size, 48);
    assert_int_equal(access(never, F_OK), -1);
}

/* Runs moelab with its stdout on /dev/full (a full disk) and stderr on
** err_path; returns the exit code. */
static int run_to_full_disk(const char *err_path, const char *const *args) {
    int out = open("/dev/full", O_WRONLY), err = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out < 0 || err < 0) fail_msg("cannot open /dev/full or %s", err_path);
    const char *argv[16] = {moelab};
    for (int i = 0; args[i] && i < 14; i++) argv[i + 1] = args[i];
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out, 1);
    posix_spawn_file_actions_adddup2(&fa, err, 2);
    pid_t pid;
    if (posix_spawn(&pid, moelab, &fa, NULL, (char *const *)argv, environ) != 0)
        fail_msg("cannot start %s", moelab);
    posix_spawn_file_actions_destroy(&fa);
    close(out);
    close(err);
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* Output that cannot be written (a report redirected to a full disk) fails
** the command and says so, rather than exit 0 with the table lost. */
static void test_output_write_error(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    if (access("/dev/full", W_OK) != 0) skip();
    char err_path[512];
    tmp_path(err_path, sizeof err_path, "full.err");
    const char *report[] = {"report", tiny_db(), "--format", "csv", NULL};
    const char *help[] = {"--help", NULL};
    const char *const *cases[] = {report, help};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_int_equal(run_to_full_disk(err_path, cases[i]), 1);
        char text[4096] = "";
        FILE *f = fopen(err_path, "r");
        assert_non_null(f);
        size_t n = fread(text, 1, sizeof text - 1, f);
        fclose(f);
        text[n] = '\0';
        expect_in("stderr", text, "cannot write standard output: No space left on device");
    }
}

/* A small corpus of 400 numbered lines at data (a temporary path). */
static void small_corpus(char *data, size_t n) {
    char text[100];
    tmp_path(data, n, "small-corpus.txt");
    FILE *f = fopen(data, "w");
    assert_non_null(f);
    for (int i = 0; i < 400; i++) {
        snprintf(text, sizeof text, "%d In the beginning God created the heaven and the earth.\n", i);
        fputs(text, f);
    }
    fclose(f);
}

/* Each seed paper's experiment runs alone, a few steps of one seed on a small
** corpus: its sweep, report, Markdown and every figure it asks for. */
static void test_experiments_run(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    const char *src = getenv("MOELAB_SRC") ? getenv("MOELAB_SRC") : ".";
    static const char *const names[][2] = {{"xmoe", "xmoe"}, {"hmoe", "hmoe"}, {"smoe", "smoe"},
                                           {"meo", "meo"}, {"dense_to_sparse", "d2s"},
                                           {"routers", "routers"}};
    char data[512], out[512], script[700], data_arg[600], out_arg[600], md[700];
    small_corpus(data, sizeof data);
    tmp_path(out, sizeof out, "experiments-out");
    snprintf(data_arg, sizeof data_arg, "data=%s", data);
    snprintf(out_arg, sizeof out_arg, "out=%s", out);
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(script, sizeof script, "%s/experiments/%s.lua", src, names[i][0]);
        Proc p;
        MOELAB(&p, NULL, "run", script, "steps=2", "seeds=1", "eval_batches=1", "fit_steps=2",
               "fresh=true", data_arg, out_arg);
        if (p.code != 0) fail_msg("%s: exit %d\n%s", names[i][0], p.code, p.err.data);
        expect_in("stdout", p.out.data, "finished");
        proc_free(&p);
        snprintf(md, sizeof md, "%s/%s.md", out, names[i][1]);
        if (access(md, R_OK) != 0) fail_msg("%s wrote no %s", names[i][0], md);
    }
}

/* tests/audit_records.lua: a recorded evaluation of one tiny run per router
** and expert design, its tables checked against each other and the SPEC's
** rules (it names every invariant that fails). */
static void test_audit_records(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    const char *src = getenv("MOELAB_SRC") ? getenv("MOELAB_SRC") : ".";
    char data[512], data_arg[600], script[700];
    small_corpus(data, sizeof data);
    snprintf(data_arg, sizeof data_arg, "data=%s", data);
    snprintf(script, sizeof script, "%s/tests/audit_records.lua", src);
    Proc p;
    MOELAB(&p, NULL, "run", script, data_arg);
    if (p.code != 0) fail_msg("audit_records: exit %d\n%s", p.code, p.err.data);
    expect_in("stdout", p.out.data, "every invariant holds");
    proc_free(&p);
}

/* designs.lua design=moefy evaluates the dense model on the run that trained
** it: a second run of the name would hide the trained one (the report and the
** figures take the latest of a name) and show the dense model untrained. */
static void test_designs_moefy_one_dense_run(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    const char *src = getenv("MOELAB_SRC") ? getenv("MOELAB_SRC") : ".";
    char data[512], db[512], ckpt[512], script[700], data_arg[600], db_arg[600], ckpt_arg[600];
    small_corpus(data, sizeof data);
    tmp_path(db, sizeof db, "designs.db");
    tmp_path(ckpt, sizeof ckpt, "designs.safetensors");
    snprintf(script, sizeof script, "%s/experiments/designs.lua", src);
    snprintf(data_arg, sizeof data_arg, "data=%s", data);
    snprintf(db_arg, sizeof db_arg, "db=%s", db);
    snprintf(ckpt_arg, sizeof ckpt_arg, "checkpoint=%s", ckpt);
    Proc p;
    MOELAB(&p, NULL, "run", script, "design=moefy", "steps=2", "fit_steps=1", data_arg, db_arg, ckpt_arg);
    if (p.code != 0) fail_msg("designs.lua: exit %d\n%s", p.code, p.err.data);
    proc_free(&p);
    MOELAB(&p, NULL, "report", db, "--runs", "moefy-dense", "--format", "csv");
    expect_code(&p, 0);
    /* the one dense run, trained: its tokens are 2 steps of 16 x 128 */
    expect_in("stdout", p.out.data, "\nmoefy-dense,dense (ffn 512),1,875264,875264,4096,");
    proc_free(&p);
}

/* The prompt on a pipe: no banner, no "> ", just what the lines print. */
static void test_prompt(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    Proc p;
    run_prompt(&p, "return 1+1\nprint(moelab.version)\n");
    expect_code(&p, 0);
    assert_string_equal(p.out.data, "2\n" MOELAB_VERSION "\n");
    proc_free(&p);

    /* expressions print, a chunk may span lines, an error does not end it,
    ** and globals persist from line to line */
    run_prompt(&p, "x = 20\n"
               "for i = 1, 2 do\n"
               "  print('line ' .. i)\n"
               "end\n"
               "error('oops')\n"
               "x + 1, type(moelab.model)\n"
               "moelab.model{ d_modle = 1 }\n"
               "'still here'\n");
    expect_code(&p, 0);
    assert_string_equal(p.out.data, "line 1\nline 2\n21\tfunction\nstill here\n");
    expect_in("stderr", p.err.data, "oops");
    expect_in("stderr", p.err.data, "'d_model'");
    proc_free(&p);

    /* a line longer than any buffer is one chunk: the end of its comment
    ** is not run as code */
    char input[20000];
    int n = snprintf(input, sizeof input, "x = 5 -- a long comment ");
    memset(input + n, '.', 12000);
    snprintf(input + n + 12000, sizeof input - (size_t)(n + 12000), " x = 7\nprint(x)\n");
    run_prompt(&p, input);
    expect_code(&p, 0);
    assert_string_equal(p.out.data, "5\n");
    assert_string_equal(p.err.data, "");
    proc_free(&p);
}

/* Ctrl-C while run:train works: exit 130, the run 'interrupted', its rows kept. */
static void test_sigint_during_training(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    char script[512], db[512], arg[600];
    tmp_path(script, sizeof script, "long.lua");
    tmp_path(db, sizeof db, "long.db");
    snprintf(arg, sizeof arg, "db=%s", db);
    write_file(script, TINY_PRELUDE
               "local run = db:run{ name = 'long', model = model, data = data }\n"
               "print('training') io.stdout:flush()\n"
               "run:train{ steps = 100000000, batch = 4, lr = 1e-3, threads = 1, progress = false,\n"
               "           eval_batches = 0 }\n"
               "print('not reached')\n");
    Proc p;
    const char *const args[] = {"run", script, arg, NULL};
    proc_start(&p, NULL, args);
    proc_wait_for(&p, "training\n", 60);
    double until = now_s() + 1.0;
    while (now_s() < until) proc_pump(&p, 50);
    kill(p.pid, SIGINT);
    proc_finish(&p, 30);
    expect_code(&p, 130);
    assert_null(strstr(p.out.data, "not reached"));
    expect_in("stderr", p.err.data, "interrupted");
    proc_free(&p);

    sqlite3 *d = db_open(db);
    char buf[512];
    assert_string_equal(db_text(d, "SELECT status FROM runs", buf, sizeof buf), "interrupted");
    assert_int_equal(db_int(d, "SELECT finished_at IS NOT NULL FROM runs"), 1);
    int64_t rows = db_int(d, "SELECT count(*) FROM metrics WHERE split = 'train'");
    if (rows <= 0) fail_msg("no training rows kept after Ctrl-C");
    assert_int_equal(db_int(d, "SELECT max(step) FROM metrics WHERE split = 'train'"), rows);
    sqlite3_close(d);
}

/* Ctrl-C during a long recorded run:evaluate stops it at the next batch: the
** evaluation's rows are rolled back, the run is 'interrupted', exit 130. */
static void test_sigint_during_evaluation(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    char script[512], db[512], arg[600];
    tmp_path(script, sizeof script, "eval.lua");
    tmp_path(db, sizeof db, "eval.db");
    snprintf(arg, sizeof arg, "db=%s", db);
    write_file(script, TINY_PRELUDE
               "local run = db:run{ name = 'eval', model = model, data = data }\n"
               "run:train{ steps = 2, batch = 4, threads = 1, progress = false, eval_batches = 0 }\n"
               "print('evaluating') io.stdout:flush()\n"
               "run:evaluate{ batches = 1000000, batch = 4, record = true }\n"
               "print('not reached')\n");
    Proc p;
    const char *const args[] = {"run", script, arg, NULL};
    proc_start(&p, NULL, args);
    proc_wait_for(&p, "evaluating\n", 60);
    double until = now_s() + 0.5;
    while (now_s() < until) proc_pump(&p, 50);
    double sent = now_s();
    kill(p.pid, SIGINT);
    proc_finish(&p, 30);
    if (now_s() - sent > 10) fail_msg("the evaluation took %.1f s to stop", now_s() - sent);
    expect_code(&p, 130);
    assert_null(strstr(p.out.data, "not reached"));
    expect_in("stderr", p.err.data, "during an evaluation");
    proc_free(&p);
    sqlite3 *d = db_open(db);
    char buf[512];
    assert_string_equal(db_text(d, "SELECT status FROM runs", buf, sizeof buf), "interrupted");
    assert_int_equal(db_int(d, "SELECT count(*) FROM evals"), 0);
    assert_int_equal(db_int(d, "SELECT count(*) FROM routing"), 0);
    assert_int_equal(db_int(d, "SELECT count(*) FROM metrics WHERE split = 'train'"), 2);
    sqlite3_close(d);
}

/* SIGTERM while run:train works, SIGHUP while plain Lua runs and while
** run:train works: as Ctrl-C, the runs 'interrupted' with a message, exit
** 128 + the signal (143, 129). (SIGHUP is signal 1, which the trainer once
** took for Ctrl-C: exit 130, "interrupted by Ctrl-C".) */
static void test_sigterm_and_sighup(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    char script[512], db[512], arg[600];
    for (int v = 0; v < 3; v++) {
        int sig = v == 0 ? SIGTERM : SIGHUP;
        int training = v != 1;
        tmp_path(script, sizeof script, v == 0 ? "term.lua" : v == 1 ? "hup.lua" : "hup-train.lua");
        tmp_path(db, sizeof db, v == 0 ? "term.db" : v == 1 ? "hup.db" : "hup-train.db");
        snprintf(arg, sizeof arg, "db=%s", db);
        write_file(script, training ? TINY_PRELUDE
                   "local run = db:run{ name = 'long', model = model, data = data }\n"
                   "print('busy') io.stdout:flush()\n"
                   "run:train{ steps = 100000000, batch = 4, lr = 1e-3, threads = 1,\n"
                   "           progress = false, eval_batches = 0 }\n"
                   : TINY_PRELUDE
                   "local open = db:run{ name = 'long', model = model, data = data }\n"
                   "print('busy') io.stdout:flush()\n"
                   "while true do end\n");
        Proc p;
        const char *const args[] = {"run", script, arg, NULL};
        proc_start(&p, NULL, args);
        proc_wait_for(&p, "busy\n", 60);
        double until = now_s() + 0.5;
        while (now_s() < until) proc_pump(&p, 50);
        kill(p.pid, sig);
        proc_finish(&p, 30);
        expect_code(&p, 128 + sig);
        expect_in("stderr", p.err.data, sig == SIGTERM ? "interrupted by SIGTERM" : "interrupted by SIGHUP");
        proc_free(&p);
        sqlite3 *d = db_open(db);
        char buf[512];
        assert_string_equal(db_text(d, "SELECT status FROM runs", buf, sizeof buf), "interrupted");
        assert_int_equal(db_int(d, "SELECT finished_at IS NOT NULL FROM runs"), 1);
        sqlite3_close(d);
    }
}

/* Ctrl-C while plain Lua runs: the same, through the interpreter's hook. */
static void test_sigint_in_lua(void **state) {
    (void)state;
    SKIP_WITHOUT_MOELAB();
    char script[512], db[512], arg[600];
    tmp_path(script, sizeof script, "loop.lua");
    tmp_path(db, sizeof db, "loop.db");
    snprintf(arg, sizeof arg, "db=%s", db);
    write_file(script, TINY_PRELUDE
               "local done = db:run{ name = 'done', model = model, data = data }\n"
               "done:train{ steps = 3, batch = 4, threads = 1, progress = false, eval_batches = 0 }\n"
               "local open = db:run{ name = 'open', model = model, data = data }\n"
               "print('looping') io.stdout:flush()\n"
               "while true do end\n");
    Proc p;
    const char *const args[] = {"run", script, arg, NULL};
    proc_start(&p, NULL, args);
    proc_wait_for(&p, "looping\n", 60);
    double until = now_s() + 0.3;
    while (now_s() < until) proc_pump(&p, 50);
    kill(p.pid, SIGINT);
    proc_finish(&p, 30);
    expect_code(&p, 130);
    expect_in("stderr", p.err.data, "interrupted");
    proc_free(&p);

    sqlite3 *d = db_open(db);
    char buf[512];
    assert_string_equal(db_text(d, "SELECT status FROM runs WHERE name = 'open'", buf, sizeof buf),
                        "interrupted");
    assert_string_equal(db_text(d, "SELECT status FROM runs WHERE name = 'done'", buf, sizeof buf),
                        "finished");
    assert_int_equal(db_int(d, "SELECT count(*) FROM metrics WHERE split = 'train'"), 3);
    sqlite3_close(d);
}

/* ---- main --------------------------------------------------------------- */

static int group_setup(void **state) {
    (void)state;
    const char *env = getenv("MOELAB");
    if (!env || !*env) {
        fprintf(stderr, "test_cli: MOELAB is not set (make test sets it to ./moelab); "
                        "skipping every test\n");
        return 0;
    }
    if (access(env, X_OK) != 0) {
        fprintf(stderr, "test_cli: MOELAB=%s is not an executable\n", env);
        return -1;
    }
    moelab = env;
    signal(SIGPIPE, SIG_IGN);
    return tmpdir_make("test_cli");
}

static int group_teardown(void **state) {
    (void)state;
    tmpdir_remove("test_cli");
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_help),
        cmocka_unit_test(test_version),
        cmocka_unit_test(test_bad_commands),
        cmocka_unit_test(test_syntax_error),
        cmocka_unit_test(test_runtime_error),
        cmocka_unit_test(test_args),
        cmocka_unit_test(test_plot),
        cmocka_unit_test(test_report),
        cmocka_unit_test(test_placement),
        cmocka_unit_test(test_unreadable_databases),
        cmocka_unit_test(test_output_write_error),
        cmocka_unit_test(test_experiments_run),
        cmocka_unit_test(test_audit_records),
        cmocka_unit_test(test_designs_moefy_one_dense_run),
        cmocka_unit_test(test_prompt),
        cmocka_unit_test(test_sigint_during_training),
        cmocka_unit_test(test_sigint_in_lua),
        cmocka_unit_test(test_sigterm_and_sighup),
        cmocka_unit_test(test_sigint_during_evaluation),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
