/*
** plot.c — plot_render of plot.h: selects runs from a database, checks the
** options, has the figure (plot_figures.c) write its data as gnuplot
** datablocks, sizes the page, and has gnuplot draw the figure script over
** them with the shared style.
**
** The gnuplot program that reaches gnuplot's standard input is:
**
**     $train << EOD ... EOD                the figure's data (figure writer)
**     set terminal pdfcairo size 3.3in,2.4in ...   from the extension and size
**     set output './results/loss.pdf'
**     page_width = 3.3; page_height = 2.4; font_pt = 8; ...   the page
**     nruns = 2
**     array run_title[2]; run_title[1] = 'top2'; ...
**     array run_design[2]; run_design[1] = 1; ...  each run's colour
**     load '/path/plots/style.gp'          the look every figure shares
**     load '/path/plots/loss.gp'           the figure script draws
**     unset output                         and the file is complete
**
** The data comes first because a figure drops the runs that lack its data
** when the runs were not named (a dense baseline has no routing to draw),
** and the page grows with the runs that remain. A run named in the run list
** that lacks the data is an error that says how to record it.
**
** Colours stay with designs: a run's design is its name without a sweep's
** "/seed=N", and its colour is picked by the order in which the design's
** first run was started in the database (run_design), so a design has the
** same colour in every figure of that database, whichever runs are drawn.
**
** The page: one column of a two-column paper is 3.3 in wide, two are 7 in;
** text is 8 pt (9 pt on the wide page) in the PDF. gnuplot's cairo
** terminals measure differently (text comes out at 4/3 x fontscale x the
** font's size, in points in the PDF, whose fontscale is 0.5 unless given,
** and in pixels in the PNG; a line width unit is 0.5 pt in the PDF and 1
** px in the PNG; a point's radius 3 pt or 3 px), so each format's
** fontscale, linewidth and pointscale bring them to one page: the PNG is
** the PDF at 300 dpi and the SVG the PDF in points (measured on gnuplot
** 5.4's output).
**
** Every string is a gnuplot single-quoted string, in which nothing but ''
** (a literal quote) is special, so paths and run names with spaces, quotes
** or backslashes arrive intact; line breaks are refused. Relative paths get
** a "./" so that a name starting with '|' or '<' is not run as a shell
** command by `set output` or `load`. gnuplot itself is started with fork and
** execvp, never through a shell.
*/
#include "plot_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "paths.h"
#include "recorder.h"

/* A page: its width, the height of a one-plot figure (without the key
** below it), the height of a row of panels, the panels a row holds, and
** the size of its text. */
typedef struct {
    const char *name;
    double width, height, panel_height;   /* inches */
    int panel_columns;
    double font_pt;
} PlotSize;

static const PlotSize plot_sizes[] = {
    {"single", 3.3, 2.4, 1.85, 2, 8},
    {"double", 7.0, 2.9, 2.3, 3, 9},
};

/* The key's rows below the axes, each this many times the text's size. */
#define PLOT_KEY_LINE 1.3

/* Per format: how a page of W x H inches becomes its terminal. */
typedef enum { PLOT_PDF, PLOT_PNG, PLOT_SVG } PlotFormatKind;

typedef struct {
    const char *extension;
    PlotFormatKind kind;
} PlotFormat;

static const PlotFormat plot_formats[] = {
    {".pdf", PLOT_PDF},
    {".png", PLOT_PNG},
    {".svg", PLOT_SVG},
};

/* The PNG's resolution. */
#define PLOT_PNG_DPI 300.0

/* ---- gnuplot strings -------------------------------------------------- */

static int plot_check_one_line(const char *what, const char *text, char *err) {
    if (strpbrk(text, "\n\r"))
        return ml_error(err, "%s contains a line break, which a figure cannot carry: "
                        "'%.*s...'", what, (int)strcspn(text, "\n\r"), text);
    return 0;
}

void plot_put_quoted(FILE *gp, const char *prefix, const char *text) {
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

void plot_put_int_array(FILE *gp, const char *name, const int *values, int n) {
    fprintf(gp, "array %s[%d]\n", name, n > 0 ? n : 1);
    for (int i = 0; i < n; i++)
        fprintf(gp, "%s[%d] = %d\n", name, i + 1, values[i]);
}

void plot_put_double_array(FILE *gp, const char *name, const double *values, int n) {
    fprintf(gp, "array %s[%d]\n", name, n > 0 ? n : 1);
    for (int i = 0; i < n; i++)
        fprintf(gp, isfinite(values[i]) ? "%s[%d] = %.9g\n" : "%s[%d] = NaN\n", name, i + 1,
                values[i]);
}

/* Characters of text in a line of width inches. gnuplot's cairo terminals
** reckon a character 0.55 em wide when they lay out a key, and drop a key
** that does not fit; 0.58 leaves room. (Its SVG terminal reckons 0.75 em:
** key_width takes the difference back, see plot_render.) */
#define PLOT_CHAR_EM 0.58
static int plot_chars_across(double inches, double font_pt) {
    int n = (int)(inches * 72.0 / (PLOT_CHAR_EM * font_pt));
    return n > 8 ? n : 8;
}

/* UTF-8 characters in the first n bytes of text. */
static int plot_utf8_chars(const char *text, size_t n) {
    int chars = 0;
    for (size_t i = 0; i < n && text[i]; i++)
        chars += ((unsigned char)text[i] & 0xC0) != 0x80;
    return chars;
}

/* The byte offset of character index chars in text. */
static size_t plot_utf8_offset(const char *text, int chars) {
    size_t i = 0;
    for (int c = 0; text[i]; i++) {
        if (((unsigned char)text[i] & 0xC0) != 0x80 && c++ == chars)
            break;
    }
    return i;
}

void plot_short_name(const char *name, char *out, size_t size) {
    size_t used = 0;
    const char *c = name;
    /* key characters are copied only after the '=' that ends a key, so the
    ** key's text since the last '/', ',' or '.' is held back */
    while (*c && used + 1 < size) {
        size_t part = strcspn(c, "/,");
        const char *eq = memchr(c, '=', part);
        const char *from = c;
        if (eq)                               /* "moe.router.k=2": from "k=2" */
            for (const char *d = c; d < eq; d++)
                if (*d == '.')
                    from = d + 1;
        size_t n = part - (size_t)(from - c);
        if (n > size - 1 - used)
            n = size - 1 - used;
        memcpy(out + used, from, n);
        used += n;
        c += part;
        if (*c && used + 1 < size)
            out[used++] = *c++;
    }
    out[used] = '\0';
}

/* Where text's closing notes start: the " (...)" groups that end it
** (" (non-causal)", " (2 seeds)"); strlen(text) when it has none. */
static size_t plot_notes_start(const char *text) {
    size_t end = strlen(text);
    while (end > 0 && text[end - 1] == ')') {
        size_t open = end - 1;
        while (open > 0 && text[open] != '(')
            open--;
        if (open < 1 || text[open] != '(' || text[open - 1] != ' ')
            break;
        end = open - 1;
    }
    return end;
}

/* text shortened to at most max_chars characters (see plot_put_title), a
** copy the caller frees; NULL when out of memory. */
static char *plot_fit_title(const char *text, int max_chars) {
    static const char ellipsis[] = "\u2026";   /* one character, three bytes */
    int n = plot_utf8_chars(text, strlen(text));
    if (n <= max_chars || max_chars < 8)
        return strdup(text);
    /* the notes stay whole when they leave room; the name before them loses
    ** its middle: it keeps its first '/' part when that is short (a sweep's
    ** prefix) and as much of its end as fits (where a sweep's name says
    ** which values and seed it ran) */
    size_t notes = plot_notes_start(text);
    int note_chars = plot_utf8_chars(text + notes, strlen(text + notes));
    int name_chars = n - note_chars, room = max_chars - note_chars - 1;
    if (room < 6) {                 /* the notes too: from the whole text */
        notes = strlen(text);
        name_chars = n;
        room = max_chars - 1;
    }
    const char *slash = memchr(text, '/', notes);
    int head = slash ? plot_utf8_chars(text, (size_t)(slash - text) + 1) : room;
    if (head > room / 3)
        head = room / 4;
    size_t head_bytes = plot_utf8_offset(text, head);
    size_t tail_at = plot_utf8_offset(text, name_chars - (room - head));
    char *cut = malloc(head_bytes + sizeof ellipsis + (notes - tail_at) + strlen(text + notes));
    if (!cut)
        return NULL;
    memcpy(cut, text, head_bytes);
    memcpy(cut + head_bytes, ellipsis, sizeof ellipsis - 1);
    memcpy(cut + head_bytes + sizeof ellipsis - 1, text + tail_at, notes - tail_at);
    strcpy(cut + head_bytes + sizeof ellipsis - 1 + (notes - tail_at), text + notes);
    return cut;
}

int plot_title_chars(const char *text, int max_chars) {
    char *fit = plot_fit_title(text, max_chars);
    int n = plot_utf8_chars(fit ? fit : text, strlen(fit ? fit : text));
    free(fit);
    return n;
}

int plot_put_title(FILE *gp, const char *text, int max_chars) {
    char *fit = plot_fit_title(text, max_chars);   /* a title: not worth failing for */
    plot_put_quoted(gp, "", fit ? fit : text);
    int n = plot_utf8_chars(fit ? fit : text, strlen(fit ? fit : text));
    free(fit);
    return n;
}

/* text wrapped to lines of at most width characters, broken after a '/',
** ',' or ' ' where it can be, as a gnuplot expression joining the lines with
** "\n"; at most 3 lines, the last shortened as plot_put_title does. With gp
** NULL, only counts. Returns the lines. */
static int plot_put_wrapped(FILE *gp, const char *text, int width) {
    int lines = 0;
    const char *c = text;
    while (*c) {
        int left = plot_utf8_chars(c, strlen(c));
        size_t take = strlen(c);
        if (left > width && lines < 2) {
            size_t limit = plot_utf8_offset(c, width), brk = 0;
            for (size_t i = 1; i < limit; i++)
                if (c[i - 1] == '/' || c[i - 1] == ',' || c[i - 1] == ' ')
                    brk = i;
            take = brk ? brk : limit;
        }
        if (gp) {
            char *line = strndup(c, take);
            if (!line)
                return lines > 0 ? lines : 1;
            if (lines > 0)
                fputs(" . \"\\n\" . ", gp);
            plot_put_title(gp, line, width);
            free(line);
        }
        lines++;
        c += take;
    }
    if (lines == 0 && gp)
        plot_put_quoted(gp, "", "");
    return lines > 0 ? lines : 1;
}

/* ---- which runs ------------------------------------------------------- */

static void plot_free_runs(PlotRuns *runs) {
    for (int i = 0; i < runs->count; i++) {
        free(runs->runs[i].name);
        free(runs->runs[i].title);
        free(runs->runs[i].design);
    }
    free(runs->runs);
    runs->runs = NULL;
    runs->count = 0;
}

/* A copy of name without a sweep's trailing "/seed=N" (moelab.sweep names
** the seeds of one design "<prefix>/<values>/seed=N"). */
static char *plot_design_name(const char *name) {
    size_t len = strlen(name);
    const char *suffix = NULL;
    for (const char *c = name; (c = strstr(c, "/seed=")) != NULL; c++)
        suffix = c;
    if (suffix && suffix[6] && strspn(suffix + 6, "0123456789") == strlen(suffix + 6))
        len = (size_t)(suffix - name);
    return strndup(name, len);
}

static int plot_add_run(PlotRuns *runs, int64_t run_id, const char *name, int noncausal,
                        char *err) {
    for (int i = 0; i < runs->count; i++)
        if (runs->runs[i].run_id == run_id)
            return 0;                       /* named twice: draw once */
    PlotRun *grown = realloc(runs->runs, (size_t)(runs->count + 1) * sizeof *grown);
    if (!grown)
        return ml_error(err, "out of memory selecting runs");
    runs->runs = grown;
    PlotRun *run = &runs->runs[runs->count];
    memset(run, 0, sizeof *run);
    run->run_id = run_id;
    run->noncausal = noncausal;
    run->name = strdup(name ? name : "");
    run->design = run->name ? plot_design_name(run->name) : NULL;
    runs->count++;
    if (!run->name || !run->design)
        return ml_error(err, "out of memory selecting runs");
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
    if (sqlite3_prepare_v2(db, "SELECT run_id, name, causal = 0 FROM runs ORDER BY run_id", -1,
                           &st, NULL) != SQLITE_OK) {
        ml_error(err, "'%s': cannot list runs: %s", db_path, sqlite3_errmsg(db));
        goto cleanup;
    }
    while ((rc = sqlite3_step(st)) == SQLITE_ROW)
        if (plot_add_run(runs, sqlite3_column_int64(st, 0),
                         (const char *)sqlite3_column_text(st, 1), sqlite3_column_int(st, 2), err))
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

/* The latest run of each name that matches pattern, a name in which * stands
** for anything (as `moelab report --runs` reads it), in the order they
** started; an error when none does. */
static int plot_select_pattern(sqlite3 *db, const char *db_path, const char *pattern,
                               PlotRuns *runs, char *err) {
    /* a GLOB in which only * is special: ? and [ match themselves */
    size_t n = strlen(pattern);
    char *glob = malloc(3 * n + 1), *g = glob;
    if (!glob) return ml_error(err, "out of memory selecting runs");
    for (const char *c = pattern; *c; c++) {
        if (*c == '?' || *c == '[') {
            *g++ = '[';
            *g++ = *c;
            *g++ = ']';
        } else {
            *g++ = *c;
        }
    }
    *g = '\0';
    sqlite3_stmt *st = NULL;
    int status = -1, found = 0, rc;
    if (sqlite3_prepare_v2(db, "SELECT run_id, causal = 0, name FROM runs WHERE run_id IN"
                           " (SELECT MAX(run_id) FROM runs GROUP BY name) AND name GLOB ?1"
                           " ORDER BY run_id", -1, &st, NULL) != SQLITE_OK) {
        ml_error(err, "'%s': cannot look up runs: %s", db_path, sqlite3_errmsg(db));
        goto cleanup;
    }
    sqlite3_bind_text(st, 1, glob, -1, SQLITE_STATIC);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        found++;
        if (plot_add_run(runs, sqlite3_column_int64(st, 0), (const char *)sqlite3_column_text(st, 2),
                         sqlite3_column_int(st, 1), err))
            goto cleanup;
    }
    if (rc != SQLITE_DONE) {
        ml_error(err, "'%s': cannot look up runs: %s", db_path, sqlite3_errmsg(db));
        goto cleanup;
    }
    if (!found) {
        char known[256];
        plot_list_run_names(db, known, sizeof known);
        ml_error(err, "no run matches '%s' in '%s' (its runs: %s)", pattern, db_path,
                 known[0] ? known : "none");
        goto cleanup;
    }
    status = 0;
cleanup:
    sqlite3_finalize(st);
    free(glob);
    return status;
}

/* runs_csv: names separated by commas, spaces around them ignored; a name
** with * in it is a pattern (plot_select_pattern). */
static int plot_select_named_runs(sqlite3 *db, const char *db_path, const char *runs_csv,
                                  PlotRuns *runs, char *err) {
    sqlite3_stmt *st = NULL;
    char *names = strdup(runs_csv), *save = NULL;
    int status = -1;
    if (!names) {
        ml_error(err, "out of memory selecting runs");
        goto cleanup;
    }
    if (sqlite3_prepare_v2(db, "SELECT run_id, causal = 0 FROM runs WHERE name = ?1"
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
        if (strchr(name, '*')) {
            if (plot_select_pattern(db, db_path, name, runs, err)) goto cleanup;
            continue;
        }
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
        int noncausal = sqlite3_column_int(st, 1);
        sqlite3_reset(st);
        if (plot_add_run(runs, run_id, name, noncausal, err))
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

/* Each run's design_order: 1 + the place of its design among the designs of
** the database's runs in the order they were started. */
static int plot_order_designs(sqlite3 *db, const char *db_path, PlotRuns *runs, char *err) {
    sqlite3_stmt *st = NULL;
    char **designs = NULL;
    int count = 0, cap = 0, status = -1, rc = SQLITE_DONE, left = runs->count;
    if (sqlite3_prepare_v2(db, "SELECT name FROM runs ORDER BY run_id", -1, &st, NULL)
        != SQLITE_OK) {
        ml_error(err, "'%s': cannot list runs: %s", db_path, sqlite3_errmsg(db));
        goto cleanup;
    }
    while (left > 0 && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(st, 0);
        char *design = plot_design_name(name ? name : "");
        if (!design)
            goto oom;
        int known = 0;
        for (int d = 0; d < count && !known; d++)
            known = strcmp(designs[d], design) == 0;
        if (known) {
            free(design);
            continue;
        }
        if (count == cap) {
            cap = cap ? 2 * cap : 16;
            char **grown = realloc(designs, (size_t)cap * sizeof *grown);
            if (!grown) {
                free(design);
                goto oom;
            }
            designs = grown;
        }
        designs[count++] = design;
        for (int i = 0; i < runs->count; i++)
            if (!runs->runs[i].design_order && strcmp(runs->runs[i].design, design) == 0) {
                runs->runs[i].design_order = count;
                left--;
            }
    }
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        ml_error(err, "'%s': cannot list runs: %s", db_path, sqlite3_errmsg(db));
        goto cleanup;
    }
    status = 0;
    goto cleanup;
oom:
    ml_error(err, "out of memory ordering designs");
cleanup:
    sqlite3_finalize(st);
    for (int d = 0; d < count; d++)
        free(designs[d]);
    free(designs);
    return status;
}

static int plot_select_runs(sqlite3 *db, const char *db_path, const char *runs_csv,
                            PlotRuns *runs, char *err) {
    int all = !runs_csv || runs_csv[strspn(runs_csv, " \t")] == '\0';
    runs->named = !all;
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
    for (int i = 0; i < runs->count; i++) {
        PlotRun *run = &runs->runs[i];
        size_t size = strlen(run->name) + 64;
        run->title = malloc(size);
        if (!run->title)
            return ml_error(err, "out of memory selecting runs");
        plot_short_name(run->name, run->title, size);
        if (run->name_repeats)   /* same name twice: tell them apart */
            snprintf(run->title + strlen(run->title), size - strlen(run->title), " (run %lld)",
                     (long long)run->run_id);
        if (run->noncausal)      /* its loss may look at later bytes */
            snprintf(run->title + strlen(run->title), size - strlen(run->title),
                     " (non-causal)");
    }
    return plot_order_designs(db, db_path, runs, err);
}

int plot_keep_runs(PlotContext *ctx, const int *has, void *info, size_t size,
                   const char *missing, const char *remedy) {
    PlotRuns *runs = ctx->runs;
    int kept = 0;
    for (int i = 0; i < runs->count; i++)
        if (!has[i] && runs->named)
            return ml_error(ctx->err, "run '%s' has no %s: %s", runs->runs[i].name, missing,
                            remedy);
    for (int i = 0; i < runs->count; i++) {
        if (!has[i]) {
            free(runs->runs[i].name);
            free(runs->runs[i].title);
            free(runs->runs[i].design);
            continue;
        }
        if (kept != i && info)
            memcpy((char *)info + (size_t)kept * size, (char *)info + (size_t)i * size, size);
        runs->runs[kept++] = runs->runs[i];
    }
    int had = runs->count;
    runs->count = kept;
    if (kept == 0)
        return ml_error(ctx->err, "no run in '%s' has %s (%d run%s looked at): %s", ctx->db_path,
                        missing, had, had == 1 ? "" : "s", remedy);
    return 0;
}

int plot_db_error(const PlotContext *ctx, const char *what) {
    return ml_error(ctx->err, "'%s': cannot read %s: %s", ctx->db_path, what,
                    sqlite3_errmsg(ctx->db));
}

int plot_prepare(const PlotContext *ctx, const char *what, const char *sql, sqlite3_stmt **st) {
    if (sqlite3_prepare_v2(ctx->db, sql, -1, st, NULL) != SQLITE_OK)
        return plot_db_error(ctx, what);
    return 0;
}

int plot_latest_recorded_eval(const PlotContext *ctx, int64_t run_id, int64_t *eval_id,
                              int64_t *step) {
    sqlite3_stmt *st = NULL;
    int status = -1, rc;
    *eval_id = -1;
    *step = 0;
    if (plot_prepare(ctx, "evals",
                     "SELECT eval_id, step FROM evals WHERE run_id = ?1"
                     " AND routing_first IS NOT NULL AND router IS NULL AND split <> 'probe'"
                     " AND complete = 1 ORDER BY eval_id DESC LIMIT 1", &st))
        return -1;
    sqlite3_bind_int64(st, 1, run_id);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *eval_id = sqlite3_column_int64(st, 0);
        *step = sqlite3_column_int64(st, 1);
    } else if (rc != SQLITE_DONE) {
        plot_db_error(ctx, "evals");
        goto cleanup;
    }
    status = 0;
cleanup:
    sqlite3_finalize(st);
    return status;
}

/*
** nruns, run_title[1..nruns] and run_design[1..nruns]: what every figure
** script receives. A title fits a key entry of title_chars characters, or
** with panel_chars > 0 is wrapped to panel titles of that width; title_lines
** is the most lines a title takes.
*/
static void plot_put_runs(FILE *gp, const PlotRuns *runs, int title_chars, int panel_chars) {
    int title_lines = 1;
    fprintf(gp, "nruns = %d\narray run_title[%d]\narray run_design[%d]\n", runs->count,
            runs->count, runs->count);
    for (int i = 0; i < runs->count; i++) {
        const PlotRun *run = &runs->runs[i];
        fprintf(gp, "run_title[%d] = ", i + 1);
        if (panel_chars > 0) {
            int lines = plot_put_wrapped(gp, run->title, panel_chars);
            if (lines > title_lines)
                title_lines = lines;
        } else {
            plot_put_title(gp, run->title, title_chars);
        }
        fprintf(gp, "\nrun_design[%d] = %d\n", i + 1, run->design_order);
    }
    fprintf(gp, "title_lines = %d\n", title_lines);
}

/* ---- running gnuplot -------------------------------------------------- */

static int plot_line_says_where(const char *line, const char *line_end) {
    for (const char *c = strstr(line, "line "); c && c < line_end; c = strstr(c + 1, "line "))
        if (c[5] >= '0' && c[5] <= '9')
            return 1;
    return 0;
}

/* A line that says where and is a warning: '"loss.gp" line 46: warning: ...' */
static int plot_line_is_warning(const char *line, const char *line_end) {
    const char *w = strstr(line, ": warning:");
    return w && w < line_end;
}

/*
** gnuplot's error as one line: from the first line that says where and is
** not a warning ("line 0:", '"loss.gp" line 12:'; its echo of the command
** and the caret above are left out) to the next line that says where, or
** the end; lines joined by "; " and spaces collapsed. gnuplot reading its
** standard input goes on after an error in a loaded file, so what comes
** later is often an echo of the first. Without such a line, the last few
** lines are searched for any that says where, and else the last line is
** the error.
*/
static void plot_error_message(const char *text, char *out, size_t size) {
    const char *end = text + strlen(text);
    while (end > text && (end[-1] == '\n' || end[-1] == '\r' || end[-1] == ' '))
        end--;
    const char *start = NULL, *stop = end;
    for (const char *line = text; line < end;) {
        const char *line_end = memchr(line, '\n', (size_t)(end - line));
        if (!line_end)
            line_end = end;
        if (plot_line_says_where(line, line_end)) {
            if (start) {
                stop = line;
                break;
            }
            if (!plot_line_is_warning(line, line_end))
                start = line;
        }
        line = line_end + 1;
    }
    if (!start) {
        start = end;
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
    }
    end = stop;
    while (end > start && (end[-1] == '\n' || end[-1] == '\r' || end[-1] == ' '))
        end--;
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

/* ---- options and page ------------------------------------------------- */

static const PlotFigure *plot_find_figure(const char *name) {
    for (int i = 0; name && i < plot_figure_count; i++)
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

/* "a, b and c": the figures that read an option. */
static void plot_list_figures_reading(int reads, char *out, size_t size) {
    int n = 0, total = 0;
    for (int i = 0; i < plot_figure_count; i++)
        total += (plot_figures[i].reads & reads) != 0;
    out[0] = '\0';
    for (int i = 0; i < plot_figure_count; i++) {
        if (!(plot_figures[i].reads & reads))
            continue;
        n++;
        size_t used = strlen(out);
        snprintf(out + used, size - used, "%s%s", n == 1 ? "" : n == total ? " and " : ", ",
                 plot_figures[i].name);
    }
}

/* The options a figure does not read are refused, and layers are block
** numbers; whether a run has the layer, the figure checks. */
static int plot_check_options(const PlotFigure *fig, const PlotOptions *opt, char *err) {
    char which[256];
    if (opt->layer != PLOT_LAYER_UNSET) {
        if (!(fig->reads & PLOT_READS_LAYER)) {
            plot_list_figures_reading(PLOT_READS_LAYER, which, sizeof which);
            return ml_error(err, "figure '%s' draws no single layer: the layer option is for %s",
                            fig->name, which);
        }
        if (opt->layer < 0)
            return ml_error(err, "layer %d: layers are block numbers, counted from 0",
                            opt->layer);
    }
    if (opt->layers[0] != PLOT_LAYER_UNSET || opt->layers[1] != PLOT_LAYER_UNSET) {
        if (!(fig->reads & PLOT_READS_LAYERS)) {
            plot_list_figures_reading(PLOT_READS_LAYERS, which, sizeof which);
            return ml_error(err, "figure '%s' draws no pair of layers: the layers option is "
                            "for %s", fig->name, which);
        }
        for (int i = 0; i < 2; i++)
            if (opt->layers[i] == PLOT_LAYER_UNSET || opt->layers[i] < 0)
                return ml_error(err, "layers must be two block numbers, counted from 0 (A,B)");
    }
    return 0;
}

static const PlotSize *plot_find_size(const char *name, char *err) {
    for (size_t i = 0; i < sizeof plot_sizes / sizeof *plot_sizes; i++)
        if (strcmp(plot_sizes[i].name, name) == 0)
            return &plot_sizes[i];
    ml_error(err, "unknown size '%s': use single (one column, %g in wide) or double "
             "(two columns, %g in)", name, plot_sizes[0].width, plot_sizes[1].width);
    return NULL;
}

/* The page, once the figure knows its runs: one plot, or panels a row (as
** many as fit the page) and row after row, each taller by the lines its
** titles take past one; the key below adds its rows. */
typedef struct {
    double width, height, font_pt;
    int columns, rows;
    int panel_chars;     /* a panel title's line; 0: not panels */
    int key_rows;
} PlotPage;

/* The room a key entry's title has on a page of that size: the width but
** the margin left of the axes, where a key below them starts, less the
** line sample. */
static int plot_title_room(const PlotSize *size) {
    return plot_chars_across(size->width - 0.85, size->font_pt) - 3;
}

static PlotPage plot_page(const PlotSize *size, const PlotFigure *fig, const PlotRuns *runs,
                          const PlotContext *ctx) {
    double line = PLOT_KEY_LINE * size->font_pt / 72.0;
    PlotPage page = {size->width, size->height, size->font_pt, 1, 1, 0, 1};
    if (fig->panels) {
        int n = runs->count, lines = 1;
        page.columns = n < size->panel_columns ? n : size->panel_columns;
        page.rows = (n + page.columns - 1) / page.columns;
        /* left of a panel its y tics, right of the page the colour bar */
        page.panel_chars = plot_chars_across((size->width - 1.0) / page.columns - 0.15,
                                             size->font_pt);
        for (int i = 0; i < n; i++) {
            int l = plot_put_wrapped(NULL, runs->runs[i].title, page.panel_chars);
            if (l > lines)
                lines = l;
        }
        page.height = (size->panel_height + (lines - 1) * line) * page.rows + 0.25;
    }
    if (ctx->key_entries > 0) {
        int room = plot_chars_across(size->width - 0.85, size->font_pt);
        int per = room / (ctx->key_chars + 6);   /* an entry: its title, the sample, a gap */
        if (per < 1)
            per = 1;
        if (per > ctx->key_entries)
            per = ctx->key_entries;
        page.key_rows = (ctx->key_entries + per - 1) / per;
        page.height += page.key_rows * line + 0.1;   /* and a gap below the axis label */
    }
    return page;
}

/* The terminal for a page of W x H inches; see the header comment. */
static void plot_put_terminal(FILE *gp, const PlotFormat *format, const PlotPage *page) {
    double s = PLOT_PNG_DPI / 72.0;   /* pixels per point */
    switch (format->kind) {
    case PLOT_PDF:
        fprintf(gp, "set terminal pdfcairo size %.4gin,%.4gin font 'Sans,%g' fontscale 0.75"
                " linewidth 1 rounded noenhanced\n", page->width, page->height, page->font_pt);
        break;
    case PLOT_PNG:
        fprintf(gp, "set terminal pngcairo size %d,%d font 'Sans,%g' fontscale %.4g"
                " linewidth %.4g pointscale %.4g rounded noenhanced\n",
                (int)lround(page->width * PLOT_PNG_DPI), (int)lround(page->height * PLOT_PNG_DPI),
                page->font_pt, 0.75 * s, 0.5 * s, s);
        break;
    case PLOT_SVG:
        fprintf(gp, "set terminal svg size %d,%d dynamic font 'Sans,%g' linewidth 0.5"
                " rounded noenhanced background '#ffffff'\n", (int)lround(page->width * 72),
                (int)lround(page->height * 72), page->font_pt);
        break;
    }
}

/* Whether path names the database file itself (by another spelling, too):
** writing the figure or its program there would destroy the database. */
static int plot_is_database(const char *path, const char *db_path) {
    struct stat a, b;
    return path && *path && stat(path, &a) == 0 && stat(db_path, &b) == 0
           && a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

static int plot_save_program(const char *path, const char *script, size_t length, char *err) {
    FILE *f = fopen(path, "w");
    if (!f)
        return ml_error(err, "cannot write the gnuplot program to '%s': %s", path,
                        strerror(errno));
    size_t wrote = fwrite(script, 1, length, f);
    int failed = wrote != length || ferror(f);
    if (fclose(f) || failed)
        return ml_error(err, "cannot write the gnuplot program to '%s': %s", path,
                        strerror(errno));
    return 0;
}

/* ---- plot_render ------------------------------------------------------ */

int plot_render(const char *figure, const char *db_path, const char *out_path,
                const PlotOptions *options, char *err) {
    static const PlotOptions defaults = PLOT_OPTIONS_INIT;
    const PlotOptions *opt = options ? options : &defaults;
    Recorder *rec = NULL;
    PlotRuns runs = {0};
    char *script = NULL, *gp_file = NULL, *style_file = NULL;
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
    const PlotSize *size = NULL;
    if (opt->size && !(size = plot_find_size(opt->size, err)))
        goto cleanup;
    if (plot_check_options(fig, opt, err))
        goto cleanup;
    const char *plots_dir = opt->plots_dir;
    if (!plots_dir || !*plots_dir) plots_dir = ml_plots_dir(); /* paths.h */
    if (plot_check_one_line("the output path", out_path, err)
        || plot_check_one_line("the plots directory", plots_dir, err)
        || (opt->runs && plot_check_one_line("the run list", opt->runs, err)))
        goto cleanup;

    if (asprintf(&gp_file, "%s/%s.gp", plots_dir, fig->name) < 0) {
        gp_file = NULL;
        ml_error(err, "out of memory");
        goto cleanup;
    }
    if (asprintf(&style_file, "%s/style.gp", plots_dir) < 0) {
        style_file = NULL;
        ml_error(err, "out of memory");
        goto cleanup;
    }
    if (access(gp_file, R_OK) != 0) {
        ml_error(err, "cannot read the script of figure '%s', '%s': %s", fig->name,
                 gp_file, strerror(errno));
        goto cleanup;
    }
    if (access(style_file, R_OK) != 0) {
        ml_error(err, "cannot read the figures' style, '%s': %s", style_file, strerror(errno));
        goto cleanup;
    }

    if (plot_is_database(out_path, db_path) || plot_is_database(opt->gnuplot_out, db_path)) {
        ml_error(err, "'%s' is the database itself: give the figure and its gnuplot program "
                 "other files", plot_is_database(out_path, db_path) ? out_path : opt->gnuplot_out);
        goto cleanup;
    }
    if (rec_open_readonly(&rec, db_path, err)
        || plot_select_runs(rec_db(rec), db_path, opt->runs, &runs, err))
        goto cleanup;

    gp = open_memstream(&script, &script_length);
    if (!gp) {
        ml_error(err, "out of memory");
        goto cleanup;
    }
    /* a one-plot figure knows its page now; one of panels when it knows its runs */
    PlotContext ctx = {gp, rec_db(rec), db_path, &runs, opt, err,
                       plot_title_room(size ? size : &plot_sizes[fig->wide]), 0, 0};
    if (fig->write_data(&ctx))
        goto cleanup;
    if (!size)   /* one column, unless the figure is wide or panels of several runs need two */
        size = &plot_sizes[fig->wide || (fig->panels && runs.count > 1) ? 1 : 0];
    PlotPage page = plot_page(size, fig, &runs, &ctx);
    plot_put_terminal(gp, format, &page);
    fputs("set output ", gp);
    plot_put_path(gp, out_path);
    /* gnuplot's SVG terminal reckons text wider than it is (0.75 em a
    ** character against 0.55) and would drop a key that fits */
    int key_width = format->kind == PLOT_SVG ? -(int)ceil(0.27 * ctx.key_chars) : 0;
    fprintf(gp, "\npage_width = %.4g\npage_height = %.4g\nfont_pt = %g\n"
            "panel_columns = %d\npanel_rows = %d\nkey_rows = %d\nkey_width = %d\n",
            page.width, page.height, page.font_pt, page.columns, page.rows, page.key_rows,
            key_width);
    fputs("plots_dir = ", gp);
    plot_put_path(gp, plots_dir);
    fputc('\n', gp);
    plot_put_runs(gp, &runs, ctx.title_chars, page.panel_chars);
    fputs("load ", gp);
    plot_put_path(gp, style_file);
    fputs("\nload ", gp);
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

    if (opt->gnuplot_out && *opt->gnuplot_out
        && plot_save_program(opt->gnuplot_out, script, script_length, err))
        goto cleanup;
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
    free(style_file);
    plot_free_runs(&runs);
    rec_close(rec);
    return status;
}
