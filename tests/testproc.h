/*
** testproc.h — a program run from a test as a user's shell would run it:
** started with posix_spawnp, without a shell, its standard output and error
** read through pipes while it runs, its exit code (or 128 + signal) kept.
** Used by test_cli (moelab's commands) and test_mpi (moelab under mpirun).
*/
#ifndef MOELAB_TESTPROC_H
#define MOELAB_TESTPROC_H

#include "testutil.h"

#include <errno.h>
#include <ftw.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

extern char **environ;

/* ---- the test's scratch folder, and what the programs leave in it ---------- */

static char tmpdir[256];

/* /tmp/moelab-NAME-XXXXXX; 0, or -1 with a message. */
static inline int tmpdir_make(const char *name) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/moelab-%s-XXXXXX", name);
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        tmpdir[0] = '\0';
        return -1;
    }
    return 0;
}

static inline int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* Removes it, unless MOELAB_KEEP_TMP is set. */
static inline void tmpdir_remove(const char *name) {
    if (!tmpdir[0]) return;
    if (getenv("MOELAB_KEEP_TMP")) {
        fprintf(stderr, "%s: keeping %s\n", name, tmpdir);
        return;
    }
    nftw(tmpdir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static inline const char *tmp_path(char *buf, size_t n, const char *name) {
    snprintf(buf, n, "%s/%s", tmpdir, name);
    return buf;
}

static inline void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) fail_msg("cannot write %s: %s", path, strerror(errno));
    fputs(text, f);
    fclose(f);
}

static inline sqlite3 *db_open(const char *path) {
    sqlite3 *db = NULL;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK)
        fail_msg("cannot open %s: %s", path, db ? sqlite3_errmsg(db) : "out of memory");
    return db;
}

static inline int64_t db_int(sqlite3 *db, const char *sql) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
        fail_msg("prepare '%s': %s", sql, sqlite3_errmsg(db));
    if (sqlite3_step(st) != SQLITE_ROW) fail_msg("no row from '%s'", sql);
    int64_t v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

static inline const char *db_text(sqlite3 *db, const char *sql, char *buf, size_t n) {
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
        fail_msg("prepare '%s': %s", sql, sqlite3_errmsg(db));
    if (sqlite3_step(st) != SQLITE_ROW) fail_msg("no row from '%s'", sql);
    const unsigned char *s = sqlite3_column_text(st, 0);
    snprintf(buf, n, "%s", s ? (const char *)s : "(NULL)");
    sqlite3_finalize(st);
    return buf;
}

/* ---- child processes ---------------------------------------------------- */


typedef struct {
    char *data;
    size_t len, cap;
    int fd;     /* -1 once at end of file */
} Stream;

typedef struct {
    pid_t pid;
    Stream out, err;
    int code;       /* exit code, or 128 + signal */
    int signaled;
} Proc;

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline void stream_read(Stream *s) {
    if (s->cap - s->len < 4097) {
        s->cap *= 2;
        s->data = realloc(s->data, s->cap);
        assert_non_null(s->data);
    }
    ssize_t n = read(s->fd, s->data + s->len, s->cap - s->len - 1);
    if (n > 0) s->len += (size_t)n;
    else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
        close(s->fd);
        s->fd = -1;
    }
    s->data[s->len] = '\0';
}

/* Reads whatever the child wrote within timeout_ms; 0 once both streams end. */
static inline int proc_pump(Proc *p, int timeout_ms) {
    struct pollfd fds[2];
    Stream *streams[2];
    int n = 0;
    if (p->out.fd >= 0) { fds[n] = (struct pollfd){p->out.fd, POLLIN, 0}; streams[n++] = &p->out; }
    if (p->err.fd >= 0) { fds[n] = (struct pollfd){p->err.fd, POLLIN, 0}; streams[n++] = &p->err; }
    if (n == 0) return 0;
    int r = poll(fds, (nfds_t)n, timeout_ms);
    if (r < 0 && errno != EINTR) fail_msg("poll: %s", strerror(errno));
    for (int i = 0; i < n && r > 0; i++)
        if (fds[i].revents) stream_read(streams[i]);
    return 1;
}

/* Starts prog with the arguments (NULL-terminated); input, when not NULL, is
** its whole standard input (otherwise /dev/null). */
static inline void proc_spawn(Proc *p, const char *input, const char *prog, const char *const *args) {
    memset(p, 0, sizeof *p);
    int out[2], err[2], in[2];
    if (pipe(out) || pipe(err) || pipe(in)) fail_msg("pipe: %s", strerror(errno));
    char *argv[32];
    int argc = 0;
    argv[argc++] = (char *)prog;
    for (int i = 0; args[i]; i++) {
        assert_true(argc < 31);
        argv[argc++] = (char *)args[i];
    }
    argv[argc] = NULL;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_adddup2(&fa, err[1], 2);
    int fds[6] = {in[0], in[1], out[0], out[1], err[0], err[1]};
    for (int i = 0; i < 6; i++) posix_spawn_file_actions_addclose(&fa, fds[i]);
    posix_spawnattr_t at;
    posix_spawnattr_init(&at);
    sigset_t none, dflt;
    sigemptyset(&none);
    sigemptyset(&dflt);
    sigaddset(&dflt, SIGINT);
    sigaddset(&dflt, SIGPIPE);
    posix_spawnattr_setsigmask(&at, &none);
    posix_spawnattr_setsigdefault(&at, &dflt);
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    int rc = posix_spawnp(&p->pid, prog, &fa, &at, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    close(in[0]);
    close(out[1]);
    close(err[1]);
    if (rc != 0) fail_msg("cannot start %s: %s", prog, strerror(rc));
    if (input) {
        size_t n = strlen(input), done = 0;
        while (done < n) {
            ssize_t w = write(in[1], input + done, n - done);
            if (w < 0 && errno == EINTR) continue;
            if (w < 0) break; /* the child did not read it all: its output says why */
            done += (size_t)w;
        }
    }
    close(in[1]);
    p->out.fd = out[0];
    p->err.fd = err[0];
    p->out.cap = p->err.cap = 8192;
    p->out.data = calloc(1, p->out.cap);
    p->err.data = calloc(1, p->err.cap);
    assert_true(p->out.data && p->err.data);
}

/* Reads until out holds needle; fails after timeout_s. */
static inline void proc_wait_for(Proc *p, const char *needle, double timeout_s) {
    double end = now_s() + timeout_s;
    while (!strstr(p->out.data, needle)) {
        if (now_s() > end || !proc_pump(p, 100)) {
            kill(p->pid, SIGKILL);
            waitpid(p->pid, NULL, 0);
            fail_msg("the program did not print '%s' within %.0f s; stdout:\n%s\nstderr:\n%s", needle,
                     timeout_s, p->out.data, p->err.data);
        }
    }
}

/* Reads to the end and waits for the exit; kills the child after timeout_s. */
static inline void proc_finish(Proc *p, double timeout_s) {
    double end = now_s() + timeout_s;
    while (proc_pump(p, 100))
        if (now_s() > end) {
            kill(p->pid, SIGKILL);
            waitpid(p->pid, NULL, 0);
            fail_msg("the program did not finish within %.0f s; stdout:\n%s\nstderr:\n%s", timeout_s,
                     p->out.data, p->err.data);
        }
    int status;
    while (waitpid(p->pid, &status, 0) < 0)
        if (errno != EINTR) fail_msg("waitpid: %s", strerror(errno));
    p->signaled = WIFSIGNALED(status);
    p->code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static inline void proc_free(Proc *p) {
    free(p->out.data);
    free(p->err.data);
}

static inline void expect_code(const Proc *p, int code) {
    if (p->code != code)
        fail_msg("exit code %d, expected %d; stdout:\n%s\nstderr:\n%s", p->code, code, p->out.data,
                 p->err.data);
}

static inline void expect_in(const char *what, const char *text, const char *needle) {
    if (!strstr(text, needle)) fail_msg("%s does not contain '%s':\n%s", what, needle, text);
}

#endif
