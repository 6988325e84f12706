/*
** machine.h — what a speed figure is measured on, and the yardstick it is
** measured against: the processor's name, the OpenBLAS and libxsmm kernels
** in use, the threads, sgemm's rate on this machine now, a clock, and peak memory.
** Every figure moelab's benchmarks print comes with these (README, Speed).
*/
#ifndef MOELAB_MACHINE_H
#define MOELAB_MACHINE_H

#include <stddef.h>

/* The `model name` of /proc/cpuinfo ("unknown" where there is none). */
const char *machine_cpu_model(void);
/* OpenBLAS's kernel family (openblas_get_corename: "Haswell", "SkylakeX"...). */
const char *machine_blas_core(void);
/* libxsmm's kernel target for the small products ("hsw", "skx", "cpx"...;
** "generic": none, OpenBLAS computes them). */
const char *machine_xsmm_target(void);
/* The threads moelab computes with (moelab.threads, else every core). */
int machine_threads(void);

/* sgemm's GFLOP/s on n x n x n (C = A·Bᵀ, as the model's forward products)
** with OpenBLAS on `threads` threads, timed `repeats` times after one
** warm-up: the median, the lowest and the highest. */
typedef struct {
    double median, min, max;
} MachineRate;
int machine_sgemm_gflops(int n, int threads, int repeats, MachineRate *out, char *err);

/* Seconds on a monotonic clock. */
double machine_clock(void);
/* This process's peak resident memory so far, in bytes (VmHWM; 0 if unknown). */
size_t machine_peak_rss(void);

#endif
