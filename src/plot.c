/*
** plot.c — plot_render of plot.h: selects runs from a database, writes their
** data as gnuplot datablocks, and has gnuplot draw a figure script over them.
**
** The gnuplot program that reaches gnuplot's standard input is:
**
**     set terminal pdfcairo ...            from the output's extension
**     set output './results/loss.pdf'
**     nruns = 2
**     array run_title[2]; run_title[1] = 'top2'; ...
**     $train << EOD ... EOD                the figure's data (figure writer)
**     load '/path/plots/loss.gp'           the figure script draws
**     unset output                         and the file is complete
**
** Every string is a gnuplot single-quoted string, in which nothing but ''
** (a literal quote) is special, so paths and run names with spaces, quotes
** or backslashes arrive intact; line breaks are refused. Relative paths get
** a "./" so that a name starting with '|' or '<' is not run as a shell
** command by `set output` or `load`. gnuplot itself is started with fork and
** execvp, never through a shell.
*/
#include "plot.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "recorder.h"

typedef struct {
    int64_t run_id;
    char *name;
    int name_repeats;    /* another selected run has the same name */
} PlotRun;

typedef struct {
    PlotRun *runs;
    int count;
} PlotRuns;

/* Writes a figure's datablocks and variables; fails when the selected runs
** have nothing to draw. */
typedef int (*PlotDataWriter)(FILE *gp, sqlite3 *db, const char *db_path,
                              const PlotRuns *runs, char *err);

typedef struct {
    const char *name;            /* also the script's name: plots_dir/NAME.gp */
    PlotDataWriter write_data;
} PlotFigure;

/* The page is width x height, taller by per_run for each run past the
** third, so that the legend of many runs does not squeeze the axes. */
typedef struct {
    const char *extension;
    const char *terminal;
    double width, height, per_run;
    const char *unit;
    const char *options;
} PlotFormat;

static int plot_loss_data(FILE *gp, sqlite3 *db, const char *db_path,
                          const PlotRuns *runs, char *err);

static const PlotFigure plot_figures[] = {
    {"loss", plot_loss_data},
};

/* Sized for a paper: the PDF fits one column of a two-column page, the PNG
** is that figure at 300 dpi, the SVG suits a web page. noenhanced keeps '_'
** and '^' in run names literal. */
static const PlotFormat plot_formats[] = {
    {".pdf", "pdfcairo", 3.5, 2.6, 0.13, "in",
     "font 'Sans,8' linewidth 1 rounded noenhanced"},
    {".png", "pngcairo", 1050, 780, 39, "",
     "font 'Sans,20' linewidth 2 pointscale 2 rounded noenhanced"},
    {".svg", "svg", 700, 520, 26, "",
     "dynamic font 'Sans,13' linewidth 1 rounded noenhanced background '#ffffff'"},
};

/* ---- gnuplot strings -------------------------------------------------- */

static int plot_check_one_line(const char *what, const char *text, char *err) {
    if (strpbrk(text, "\n\r"))
        return ml_error(err, "%s contains a line break, which a figure cannot carry: "
                        "'%.*s...'", what, (int)strcspn(text, "\n\r"), text);
    return 0;
}

/* prefix + text as one gnuplot single-quoted string. */
static void plot_put_quoted(FILE *gp, const char *prefix, const char *text) {
    fputc('\'', gp);
    fputs(prefix, gp);
    for (const char *c = text; *c; c++) {
        if (*c == '\'')
            fputc('\'', gp);
        fputc(*c, gp);
    }
    fputc('\'', gp);
}

static void plot_put_path(FILE *gp, const char *path) {
    plot_put_quoted(gp, path[0] == '/' ? "" : "./", path);
}

/* ---- which runs ------------------------------------------------------- */

static void plot_free_runs(PlotRuns *runs) {
    for (int i = 0; i < runs->count; i++)
        free(runs->runs[i].name);
    free(runs->runs);
    runs->runs = NULL;
    runs->count = 0;
}

static int plot_add_run(PlotRuns *runs, int64_t run_id, const char *name, char *err) {
    for (int i = 0; i < runs->count; i++)
        if (runs->runs[i].run_id == run_id)
            return 0;                       /* named twice: draw once */
    PlotRun *grown = realloc(runs->runs, (size_t)(runs->count + 1) * sizeof *grown);
    if (!grown)
        return ml_error(err, "out of memory selecting runs");
    runs->runs = grown;
    PlotRun *run = &runs->runs[runs->count];
    run->run_id = run_id;
    run->name_repeats = 0;
    run->name = strdup(name ? name : "");
    if (!run->name)
        return ml_error(err, "out of memory selecting runs");
    runs->count++;
    return 0;
}

/* "a, b, c" for an error message: the names of the database's runs. */
static void plot_list_run_names(sqlite3 *db, char *out, size_t size) {
    sqlite3_stmt *st = NULL;
    size_t used = 0;
    out[0] = '\0';
    if (sqlite3_prepare_v2(db, "SELECT name FROM runs GROUP BY name ORDER BY min(run_id)",
                           -1, &st, NULL) != SQLITE_OK)
        goto cleanup;
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(st, 0);
        int n = snprintf(out + used, size - used, "%s%s", used ? ", " : "", name ? name : "");
        if (n < 0 || (size_t)n >= size - used) {
            if (size > 4)
                strcpy(out + size - 4, "...");
            break;
        }
        used += (size_t)n;
    }
cleanup:
    sqlite3_finalize(st);
}

static int plot_select_all_runs(sqlite3 *db, const char *db_path, PlotRuns *runs, char *err) {
    sqlite3_stmt *st = NULL;
    int status = -1, rc;
    if (sqlite3_prepare_v2(db, "SELECT run_id, name FROM runs ORDER BY run_id", -1, &st,
                           NULL) != SQLITE_OK) {
        ml_error(err, "'%s': cannot list runs: %s", db_path, sqlite3_errmsg(db));
        goto cleanup;
    }
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        if (plot_add_run(runs, sqlite3_column_int64(st, 0),
                         (const char *)sqlite3_column_text(st, 1), err))
            goto cleanup;
    if (rc != SQLITE_DONE) {
        ml_error(err, "'%s': cannot list runs: %s", db_path, sqlite3_errmsg(db));
        goto cleanup;
    }
    if (runs->count == 0) {
        ml_error(err, "'%s' has no runs to plot", db_path);
        goto cleanup;
    }
    status = 0;
cleanup:
    sqlite3_finalize(st);
    return status;
}

/* runs_csv: names separated by commas, spaces around them ignored. */
static int plot_select_named_runs(sqlite3 *db, const char *db_path, const char *runs_csv,
                                  PlotRuns *runs, char *err) {
    sqlite3_stmt *st = NULL;
    char *names = strdup(runs_csv), *save = NULL;
    int status = -1;
    if (!names) {
        ml_error(err, "out of memory selecting runs");
        goto cleanup;
    }
    if (sqlite3_prepare_v2(db, "SELECT run_id FROM runs WHERE name = ?1"
                           " ORDER BY run_id DESC LIMIT 1", -1, &st, NULL) != SQLITE_OK) {
        ml_error(err, "'%s': cannot look up runs: %s", db_path, sqlite3_errmsg(db));
        goto cleanup;
    }
    for (char *name = strtok_r(names, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
        name += strspn(name, " \t");
        size_t len = strlen(name);
        while (len > 0 && (name[len - 1] == ' ' || name[len - 1] == '\t'))
            name[--len] = '\0';
        if (len == 0)
            continue;
        sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
        int rc = sqlite3_step(st);
        if (rc == SQLITE_DONE) {
            char known[256];
            plot_list_run_names(db, known, sizeof known);
            ml_error(err, "no run named '%s' in '%s' (its runs: %s)", name, db_path,
                     known[0] ? known : "none");
            goto cleanup;
        }
        if (rc != SQLITE_ROW) {
            ml_error(err, "'%s': cannot look up run '%s': %s", db_path, name,
                     sqlite3_errmsg(db));
            goto cleanup;
        }
        int64_t run_id = sqlite3_column_int64(st, 0);
        sqlite3_reset(st);
        if (plot_add_run(runs, run_id, name, err))
            goto cleanup;
    }
    if (runs->count == 0) {
        ml_error(err, "no run names in '%s'", runs_csv);
        goto cleanup;
    }
    status = 0;
cleanup:
    sqlite3_finalize(st);
    free(names);
    return status;
}

static int plot_select_runs(sqlite3 *db, const char *db_path, const char *runs_csv,
                            PlotRuns *runs, char *err) {
    int all = !runs_csv || runs_csv[strspn(runs_csv, " \t")] == '\0';
    if (all ? plot_select_all_runs(db, db_path, runs, err)
            : plot_select_named_runs(db, db_path, runs_csv, runs, err))
        return -1;
    for (int i = 0; i < runs->count; i++) {
        char what[64];
        snprintf(what, sizeof what, "the name of run %lld", (long long)runs->runs[i].run_id);
        if (plot_check_one_line(what, runs->runs[i].name, err))
            return -1;
        for (int j = 0; j < runs->count; j++)
            if (j != i && strcmp(runs->runs[i].name, runs->runs[j].name) == 0)
                runs->runs[i].name_repeats = 1;
    }
    return 0;
}

/* nruns and run_title[1..nruns]: what every figure script receives. */
static void plot_put_run_titles(FILE *gp, const PlotRuns *runs) {
    fprintf(gp, "nruns = %d\narray run_title[%d]\n", runs->count, runs->count);
    for (int i = 0; i < runs->count; i++) {
        const PlotRun *run = &runs->runs[i];
        char title[64] = "";
        if (run->name_repeats)   /* same name twice: tell them apart */
            snprintf(title, sizeof title, " (run %lld)", (long long)run->run_id);
        fprintf(gp, "run_title[%d] = ", i + 1);
        plot_put_quoted(gp, "", run->name);
        if (title[0]) {
            fputs(" . ", gp);
            plot_put_quoted(gp, "", title);
        }
        fputc('\n', gp);
    }
}

/* ---- figure "loss" ---------------------------------------------------- */

/*
** $train and $val: per run (index i-1 for run i) the rows "tokens loss" of
** metrics with that split, in step order; a run without rows gets one
** "NaN NaN" row so that the block indices stay aligned. Also has_train[i],
** has_val[i] (0 or 1), tokens_min (the smallest positive x, 0 if none) and
** tokens_max.
*/
static int plot_loss_data(FILE *gp, sqlite3 *db, const char *db_path,
                          const PlotRuns *runs, char *err) {
    static const char *splits[] = {"train", "val"};
    sqlite3_stmt *st = NULL;
    int *has_rows = calloc((size_t)runs->count * 2, sizeof *has_rows);
    double tokens_min = INFINITY, tokens_max = 0;
    int64_t points = 0;
    int status = -1;
    if (!has_rows) {
        ml_error(err, "out of memory reading metrics");
        goto cleanup;
    }
    if (sqlite3_prepare_v2(db, "SELECT tokens, loss FROM metrics"
                           " WHERE run_id = ?1 AND split = ?2"
                           " AND tokens IS NOT NULL AND loss IS NOT NULL"
                           " ORDER BY step, rowid", -1, &st, NULL) != SQLITE_OK) {
        ml_error(err, "'%s': cannot read metrics: %s", db_path, sqlite3_errmsg(db));
        goto cleanup;
    }
    for (int s = 0; s < 2; s++) {
        fprintf(gp, "$%s << EOD\n", splits[s]);
        for (int i = 0; i < runs->count; i++) {
            int *has = &has_rows[s * runs->count + i];
            if (i > 0)
                fputs("\n\n", gp);              /* next index */
            sqlite3_bind_int64(st, 1, runs->runs[i].run_id);
            sqlite3_bind_text(st, 2, splits[s], -1, SQLITE_STATIC);
            int rc;
            while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
                int64_t tokens = sqlite3_column_int64(st, 0);
                double loss = sqlite3_column_double(st, 1);
                if (!isfinite(loss))
                    continue;                   /* a diverged step */
                fprintf(gp, "%lld %.9g\n", (long long)tokens, loss);
                if (tokens > 0 && tokens < tokens_min)
                    tokens_min = (double)tokens;
                if (tokens > tokens_max)
                    tokens_max = (double)tokens;
                *has = 1;
                points++;
            }
            if (rc != SQLITE_DONE) {
                ml_error(err, "'%s': cannot read metrics: %s", db_path, sqlite3_errmsg(db));
                goto cleanup;
            }
            sqlite3_reset(st);
            if (!*has)
                fputs("NaN NaN\n", gp);
        }
        fputs("EOD\n", gp);
    }
    if (points == 0) {
        ml_error(err, "'%s' has no train or val loss metrics for the selected run%s (%s%s)",
                 db_path, runs->count > 1 ? "s" : "", runs->runs[0].name,
                 runs->count > 1 ? ", ..." : "");
        goto cleanup;
    }
    for (int s = 0; s < 2; s++) {
        fprintf(gp, "array has_%s[%d]\n", splits[s], runs->count);
        for (int i = 0; i < runs->count; i++)
            fprintf(gp, "has_%s[%d] = %d\n", splits[s], i + 1, has_rows[s * runs->count + i]);
    }
    fprintf(gp, "tokens_min = %.1f\ntokens_max = %.1f\n",
            isfinite(tokens_min) ? tokens_min : 0.0, tokens_max);
    status = 0;
cleanup:
    sqlite3_finalize(st);
    free(has_rows);
    return status;
}

/* ---- running gnuplot -------------------------------------------------- */

static int plot_line_says_where(const char *line, const char *line_end) {
    for (const char *c = strstr(line, "line "); c && c < line_end; c = strstr(c + 1, "line "))
        if (c[5] >= '0' && c[5] <= '9')
            return 1;
    return 0;
}

/* gnuplot's error as one line: from the last line that says where ("line 0:",
** '"loss.gp" line 12:'; its echo of the command and the caret above are left
** out) to the end, lines joined by "; " and spaces collapsed. Only the last
** few lines are searched; without such a line, the last line is the error. */
static void plot_error_message(const char *text, char *out, size_t size) {
    const char *end = text + strlen(text);
    while (end > text && (end[-1] == '\n' || end[-1] == '\r' || end[-1] == ' '))
        end--;
    const char *start = end;
    while (start > text && start[-1] != '\n')
        start--;
    const char *line = start, *line_end = end;
    for (int looked = 0; looked < 4; looked++) {
        if (plot_line_says_where(line, line_end)) {
            start = line;
            break;
        }
        if (line == text)
            break;
        line_end = line - 1;
        line = line_end;
        while (line > text && line[-1] != '\n')
            line--;
    }
    size_t used = 0;
    const char *pending = "";    /* separator owed before the next word */
    for (const char *c = start; c < end; c++) {
        if (*c == '\n') {
            pending = used ? "; " : "";
        } else if (*c == ' ' || *c == '\t' || *c == '\r') {
            if (used && !*pending)
                pending = " ";
        } else {
            size_t need = strlen(pending) + 1;
            if (used + need >= size)
                break;
            memcpy(out + used, pending, need - 1);
            used += need - 1;
            out[used++] = *c;
            pending = "";
        }
    }
    out[used] = '\0';
}

/* Keeps the last part of what gnuplot says, which holds its error. */
static void plot_keep_messages(char *buf, size_t *used, size_t cap, const char *data, size_t n) {
    if (n >= cap)
        data += n - (cap - 1), n = cap - 1;
    if (*used + n >= cap) {
        size_t drop = *used + n - (cap - 1);
        memmove(buf, buf + drop, *used - drop);
        *used -= drop;
    }
    memcpy(buf + *used, data, n);
    *used += n;
    buf[*used] = '\0';
}

/*
** Feeds script to a gnuplot child and collects its messages (stderr; its
** stdout goes to /dev/null, since a terminal that cannot open its output
** file writes the figure there instead). The child's stdin is
** one end of a socket pair so that writes use MSG_NOSIGNAL: if gnuplot dies
** early we get EPIPE instead of a SIGPIPE that would end the caller. Writing
** and reading are interleaved with poll, so a gnuplot that prints a lot
** while we still write cannot deadlock us.
*/
static int plot_run_gnuplot(const char *script, size_t length, const char *out_path,
                            char *err) {
    int input[2] = {-1, -1}, stderr_pipe[2] = {-1, -1}, exec_report[2] = {-1, -1};
    int devnull = -1;
    char messages[8192] = "";
    size_t messages_used = 0;
    int status = -1;
    pid_t pid = -1;

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, input)
        || pipe2(stderr_pipe, O_CLOEXEC) || pipe2(exec_report, O_CLOEXEC)
        || (devnull = open("/dev/null", O_WRONLY | O_CLOEXEC)) < 0) {
        ml_error(err, "cannot start gnuplot: %s", strerror(errno));
        goto cleanup;
    }
    pid = fork();
    if (pid < 0) {
        ml_error(err, "cannot start gnuplot: fork: %s", strerror(errno));
        goto cleanup;
    }
    if (pid == 0) {
        /* Only async-signal-safe calls between fork and exec. */
        char *argv[] = {"gnuplot", NULL};
        if (dup2(input[1], STDIN_FILENO) >= 0 && dup2(devnull, STDOUT_FILENO) >= 0
            && dup2(stderr_pipe[1], STDERR_FILENO) >= 0)
            execvp("gnuplot", argv);
        int e = errno;
        ssize_t unused = write(exec_report[1], &e, sizeof e);
        (void)unused;
        _exit(127);
    }
    close(input[1]);
    close(stderr_pipe[1]);
    close(exec_report[1]);
    input[1] = stderr_pipe[1] = exec_report[1] = -1;

    /* exec_report closes on a successful exec, or carries exec's errno. */
    int exec_errno = 0;
    ssize_t got;
    while ((got = read(exec_report[0], &exec_errno, sizeof exec_errno)) < 0 && errno == EINTR)
        ;
    if (got == (ssize_t)sizeof exec_errno) {
        if (exec_errno == ENOENT)
            ml_error(err, "gnuplot not found; install gnuplot-nox (apt-get install gnuplot-nox)");
        else
            ml_error(err, "cannot run gnuplot: %s", strerror(exec_errno));
        goto cleanup;
    }

    fcntl(input[0], F_SETFL, fcntl(input[0], F_GETFL) | O_NONBLOCK);
    size_t written = 0;
    while (input[0] >= 0 || stderr_pipe[0] >= 0) {
        struct pollfd fds[2] = {{.fd = input[0], .events = POLLOUT},
                                {.fd = stderr_pipe[0], .events = POLLIN}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            ml_error(err, "talking to gnuplot: poll: %s", strerror(errno));
            goto cleanup;
        }
        if (input[0] >= 0 && fds[0].revents) {
            ssize_t n = send(input[0], script + written, length - written, MSG_NOSIGNAL);
            if (n > 0)
                written += (size_t)n;
            /* EPIPE: gnuplot stopped reading; its exit status says why. */
            if ((n < 0 && errno != EAGAIN && errno != EINTR) || written == length) {
                close(input[0]);
                input[0] = -1;
            }
        }
        if (stderr_pipe[0] >= 0 && fds[1].revents) {
            char chunk[4096];
            ssize_t n = read(stderr_pipe[0], chunk, sizeof chunk);
            if (n > 0)
                plot_keep_messages(messages, &messages_used, sizeof messages, chunk, (size_t)n);
            else if (n == 0 || errno != EINTR) {
                close(stderr_pipe[0]);
                stderr_pipe[0] = -1;
            }
        }
    }

    int wstatus = 0;
    pid_t waited;
    while ((waited = waitpid(pid, &wstatus, 0)) < 0 && errno == EINTR)
        ;
    pid = -1;
    if (waited < 0) {
        ml_error(err, "cannot wait for gnuplot: %s", strerror(errno));
        goto cleanup;
    }
    char last[400];
    plot_error_message(messages, last, sizeof last);
    if (WIFSIGNALED(wstatus)) {
        ml_error(err, "gnuplot was killed by signal %d%s%s", WTERMSIG(wstatus),
                 last[0] ? ": " : "", last);
        goto cleanup;
    }
    if (WEXITSTATUS(wstatus) != 0) {
        ml_error(err, "gnuplot failed to render '%s' (exit status %d): %s", out_path,
                 WEXITSTATUS(wstatus), last[0] ? last : "no message");
        goto cleanup;
    }
    if (written != length) {
        ml_error(err, "gnuplot stopped reading its input early%s%s",
                 last[0] ? ": " : "", last);
        goto cleanup;
    }
    status = 0;
cleanup:
    for (int i = 0; i < 2; i++) {
        if (input[i] >= 0)
            close(input[i]);
        if (stderr_pipe[i] >= 0)
            close(stderr_pipe[i]);
        if (exec_report[i] >= 0)
            close(exec_report[i]);
    }
    if (devnull >= 0)
        close(devnull);
    if (pid > 0)
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
    return status;
}

/* ---- plot_render ------------------------------------------------------ */

static const PlotFigure *plot_find_figure(const char *name) {
    for (size_t i = 0; name && i < sizeof plot_figures / sizeof *plot_figures; i++)
        if (strcmp(plot_figures[i].name, name) == 0)
            return &plot_figures[i];
    return NULL;
}

static const PlotFormat *plot_find_format(const char *out_path) {
    const char *dot = strrchr(out_path, '.');
    if (!dot || strchr(dot, '/'))
        return NULL;
    for (size_t i = 0; i < sizeof plot_formats / sizeof *plot_formats; i++)
        if (strcasecmp(dot, plot_formats[i].extension) == 0)
            return &plot_formats[i];
    return NULL;
}

int plot_render(const char *figure, const char *db_path, const char *out_path,
                const char *runs_csv, const char *plots_dir, char *err) {
    Recorder *rec = NULL;
    PlotRuns runs = {0};
    char *script = NULL, *gp_file = NULL;
    size_t script_length = 0;
    FILE *gp = NULL;
    int status = -1;

    const PlotFigure *fig = plot_find_figure(figure);
    if (!fig) {
        ml_error(err, "unknown figure '%s' (known figures: " PLOT_FIGURES ")",
                 figure ? figure : "(none)");
        goto cleanup;
    }
    if (!db_path || !*db_path || !out_path || !*out_path) {
        ml_error(err, "figure '%s' needs a database and an output file", figure);
        goto cleanup;
    }
    const PlotFormat *format = plot_find_format(out_path);
    if (!format) {
        ml_error(err, "cannot tell the format of '%s' from its extension: "
                 "use .pdf, .png or .svg", out_path);
        goto cleanup;
    }
    if (!plots_dir || !*plots_dir)
        plots_dir = "plots";
    if (plot_check_one_line("the output path", out_path, err)
        || plot_check_one_line("the plots directory", plots_dir, err)
        || (runs_csv && plot_check_one_line("the run list", runs_csv, err)))
        goto cleanup;

    if (asprintf(&gp_file, "%s/%s.gp", plots_dir, fig->name) < 0) {
        gp_file = NULL;
        ml_error(err, "out of memory");
        goto cleanup;
    }
    if (access(gp_file, R_OK) != 0) {
        ml_error(err, "cannot read the script of figure '%s', '%s': %s", fig->name,
                 gp_file, strerror(errno));
        goto cleanup;
    }

    if (rec_open_readonly(&rec, db_path, err)
        || plot_select_runs(rec_db(rec), db_path, runs_csv, &runs, err))
        goto cleanup;

    gp = open_memstream(&script, &script_length);
    if (!gp) {
        ml_error(err, "out of memory");
        goto cleanup;
    }
    double height = format->height + format->per_run * (runs.count > 3 ? runs.count - 3 : 0);
    fprintf(gp, "set terminal %s size %g%s,%g%s %s\nset output ", format->terminal,
            format->width, format->unit, height, format->unit, format->options);
    plot_put_path(gp, out_path);
    fputc('\n', gp);
    plot_put_run_titles(gp, &runs);
    if (fig->write_data(gp, rec_db(rec), db_path, &runs, err))
        goto cleanup;
    fputs("load ", gp);
    plot_put_path(gp, gp_file);
    fputs("\nunset output\n", gp);
    int failed = ferror(gp);
    if (fclose(gp) || failed) {
        gp = NULL;
        ml_error(err, "out of memory writing the gnuplot script");
        goto cleanup;
    }
    gp = NULL;
    rec_close(rec);
    rec = NULL;

    /* Remove an old figure, so that a file left behind proves this one. */
    struct stat st;
    if (stat(out_path, &st) == 0 && S_ISREG(st.st_mode))
        unlink(out_path);
    if (plot_run_gnuplot(script, script_length, out_path, err))
        goto cleanup;
    if (stat(out_path, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size == 0) {
        ml_error(err, "gnuplot exited without writing '%s'", out_path);
        goto cleanup;
    }
    status = 0;
cleanup:
    if (gp)
        fclose(gp);
    free(script);
    free(gp_file);
    plot_free_runs(&runs);
    rec_close(rec);
    return status;
}
