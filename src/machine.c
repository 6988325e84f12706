/*
** machine.c — the machine a speed figure is measured on (see machine.h).
*/
#include "machine.h"

#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"
#include "smm.h"

void openblas_set_num_threads(int num_threads);
char *openblas_get_corename(void);

const char *machine_cpu_model(void) {
    static char name[256];
    if (name[0]) return name;
    snprintf(name, sizeof name, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[512];
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "model name", 10) == 0) {
            const char *v = strchr(line, ':');
            if (v) snprintf(name, sizeof name, "%s", v + (v[1] == ' ' ? 2 : 1));
            name[strcspn(name, "\n")] = 0;
            break;
        }
    if (f) fclose(f);
    return name;
}

const char *machine_blas_core(void) { return openblas_get_corename(); }

const char *machine_xsmm_target(void) { return smm_target(); }

int machine_threads(void) { return omp_get_max_threads(); }

double machine_clock(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

size_t machine_peak_rss(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    size_t kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %zu kB", &kb) == 1) break;
    if (f) fclose(f);
    return kb * 1024;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int machine_sgemm_gflops(int n, int threads, int repeats, MachineRate *out, char *err) {
    if (n < 1 || n > 16384 || threads < 1 || repeats < 1 || repeats > 1000)
        return ml_error(err, "sgemm: need 1 <= n <= 16384, threads >= 1, 1 <= repeats <= 1000");
    size_t nn = (size_t)n * n;
    float *a = malloc(sizeof(float) * nn), *b = malloc(sizeof(float) * nn),
          *c = malloc(sizeof(float) * nn);
    double *t = malloc(sizeof(double) * (size_t)repeats);
    if (!a || !b || !c || !t) {
        free(a); free(b); free(c); free(t);
        return ml_error(err, "sgemm: out of memory for %d x %d matrices", n, n);
    }
    unsigned seed = 1;
    for (size_t i = 0; i < nn; i++) {
        seed = seed * 1664525u + 1013904223u;
        a[i] = (float)(seed >> 8) / 16777216.0f - 0.5f;
        b[i] = (float)(seed >> 9) / 8388608.0f - 0.5f;
    }
    /* OpenBLAS's own threads, as sgemm alone would run; the model keeps it
    ** single-threaded inside its OpenMP threads (trainer_set_threads) */
    openblas_set_num_threads(threads);
    for (int r = -1; r < repeats; r++) {
        double t0 = machine_clock();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        if (r >= 0) t[r] = machine_clock() - t0;
    }
    openblas_set_num_threads(1);
    qsort(t, (size_t)repeats, sizeof *t, cmp_double);
    double flops = 2.0 * n * (double)n * n / 1e9;
    out->median = flops / (repeats % 2 ? t[repeats / 2] : 0.5 * (t[repeats / 2 - 1] + t[repeats / 2]));
    out->min = flops / t[repeats - 1];
    out->max = flops / t[0];
    free(a); free(b); free(c); free(t);
    return 0;
}
