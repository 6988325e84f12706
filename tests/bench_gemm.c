/*
** bench_gemm.c — OpenBLAS against libraries made for small matrices (BLIS,
** libxsmm, oneDNN) on the model's own sgemm shapes, one thread each (issue 11;
** `make bench-gemm`). Not a test: it reports, and the reader judges.
**
** Each shape is one call that src/ops.c or src/moe/layer.c makes, with the
** same transposes, leading dimensions, alpha and beta (row-major): the pieces
** of 256 rows of matmul_forward and of matmul_backward's dinp, dweight's pieces
** of the sum over 512 rows, attention's products per (batch, head) in blocks of
** 32 rows (keys [0, t1) for rows [t0, t1); columns for the key and value
** gradients), and one
** call per expert. `per step` counts the calls in one forward + backward step
** of the top-2 reference model (4 layers, d_model 128, 4 heads, context 128,
** batch 16, 8 experts of hidden 128, so about 512 rows an expert, vocabulary
** 256); a second group is the MoE layer of `make bench`'s section 1 (d_model
** 512, hidden 1024, 8 experts, top-2, 4096 tokens), per forward + backward; a
** third the expert products of the reference model with 64 experts (about 64
** rows an expert), per step.
**
** The machine is shared, so the libraries take turns: each sample times a
** batch of calls of every library in a rotating order, and the statistics
** are over samples (median, quartiles; the ratio to OpenBLAS is taken per
** sample, between neighbours in time). Operands stay in cache between calls,
** as they largely do in the model's pieces. OpenBLAS runs the kernels that
** OPENBLAS_CORETYPE names (or detects); BLIS its skx or haswell ones (main).
**
**   bench_gemm [samples (31)] [milliseconds a sample (4)]
*/
#include <blis.h> /* its cblas.h declares cblas_sgemm as OpenBLAS's does */
#include <dlfcn.h>
#include <libxsmm.h>
#include <math.h>
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "machine.h"

/* OpenBLAS's own, which cblas.h would declare (BLIS's cblas.h is in use) */
void openblas_set_num_threads(int num_threads);
char *openblas_get_corename(void);
char *openblas_get_config(void);

enum { OPENBLAS, BLIS, XSMM, ONEDNN, LIBS };
static const char *const lib_name[LIBS] = {"OpenBLAS", "BLIS", "libxsmm", "oneDNN"};

/* One cblas_sgemm call of the model, row-major. */
typedef struct {
    const char *what;     /* the product, as ops.c and moe/layer.c name it */
    char transa, transb;  /* 'N' or 'T' */
    int M, N, K, lda, ldb, ldc;
    float alpha, beta;
    int per_step;         /* calls in one forward + backward step of its model */
    int group;            /* 0: the reference model; 1: the d_model 512 layer */
} Shape;

enum { L = 4, B = 16, T = 128, NH = 4, C = 128, C3 = 3 * 128, HS = 32, E = 8, H = 128, V = 256 };
enum { ROWS = 256, SUM = 512, EROWS = 512 };         /* pieces; rows an expert (top-2) */
enum { ROW_PIECES = 2048 / ROWS, SUM_PIECES = 2048 / SUM, HEADS = B * NH };
enum { D5 = 512, H5 = 1024, N5 = 4096, E5ROWS = N5 * 2 / E }; /* bench_moe section 1 */
enum { E64 = 64, E64ROWS = 2048 * 2 / E64 };                    /* 64 experts */
/* causal attention in blocks of ATT rows (ops.c's ATT_BLOCK): rows [t0, t1)
** against keys [0, t1); the key and value gradients by columns [j0, j0 + ATT)
** over rows [j0, T) */
enum { ATT = 32 };
#define SCALE 0.17677669529663687f /* 1/sqrt(HS): attention's scores */

static const Shape shapes[] = {
    /* forward */
    {"qkv", 'N', 'T', ROWS, C3, C, C, C, C3, 1, 0, ROW_PIECES * L, 0},
    {"attention scores 1", 'N', 'T', ATT, 32, HS, C3, C3, T, SCALE, 0, HEADS * L, 0},
    {"attention scores 2", 'N', 'T', ATT, 64, HS, C3, C3, T, SCALE, 0, HEADS * L, 0},
    {"attention scores 3", 'N', 'T', ATT, 96, HS, C3, C3, T, SCALE, 0, HEADS * L, 0},
    {"attention scores 4", 'N', 'T', ATT, 128, HS, C3, C3, T, SCALE, 0, HEADS * L, 0},
    {"attention a.v 1", 'N', 'N', ATT, HS, 32, T, C3, C, 1, 0, HEADS * L, 0},
    {"attention a.v 2", 'N', 'N', ATT, HS, 64, T, C3, C, 1, 0, HEADS * L, 0},
    {"attention a.v 3", 'N', 'N', ATT, HS, 96, T, C3, C, 1, 0, HEADS * L, 0},
    {"attention a.v 4", 'N', 'N', ATT, HS, 128, T, C3, C, 1, 0, HEADS * L, 0},
    {"attproj", 'N', 'T', ROWS, C, C, C, C, C, 1, 1, ROW_PIECES * L, 0},
    {"router", 'N', 'T', ROWS, E, C, C, C, E, 1, 0, ROW_PIECES * L, 0},
    {"expert fc, proj", 'N', 'T', EROWS, H, C, C, C, H, 1, 0, 2 * E * L, 0},
    {"lm_head", 'N', 'T', ROWS, V, C, C, C, V, 1, 0, ROW_PIECES, 0},
    /* backward */
    {"lm_head dinp", 'N', 'N', ROWS, C, V, V, C, C, 1, 0, ROW_PIECES, 0},
    {"lm_head dweight", 'T', 'N', V, C, SUM, V, C, C, 1, 0, SUM_PIECES, 0},
    {"expert dact, dx", 'N', 'N', EROWS, H, C, C, H, H, 1, 0, 2 * E * L, 0},
    {"expert dproj, dfc", 'T', 'N', C, H, EROWS, C, H, H, 1, 1, 2 * E * L, 0},
    {"router dinp", 'N', 'N', ROWS, C, E, E, C, C, 1, 0, ROW_PIECES * L, 0},
    {"router dweight", 'T', 'N', E, C, SUM, E, C, C, 1, 0, SUM_PIECES * L, 0},
    {"attproj dinp", 'N', 'N', ROWS, C, C, C, C, C, 1, 0, ROW_PIECES * L, 0},
    {"attproj dweight", 'T', 'N', C, C, SUM, C, C, C, 1, 0, SUM_PIECES * L, 0},
    {"attention da 1", 'N', 'T', ATT, 32, HS, C, C3, T, 1, 0, HEADS * L, 0},
    {"attention da 2", 'N', 'T', ATT, 64, HS, C, C3, T, 1, 0, HEADS * L, 0},
    {"attention da 3", 'N', 'T', ATT, 96, HS, C, C3, T, 1, 0, HEADS * L, 0},
    {"attention da 4", 'N', 'T', ATT, 128, HS, C, C3, T, 1, 0, HEADS * L, 0},
    {"attention dq 1", 'N', 'N', ATT, HS, 32, T, C3, C3, 1, 0, HEADS * L, 0},
    {"attention dq 2", 'N', 'N', ATT, HS, 64, T, C3, C3, 1, 0, HEADS * L, 0},
    {"attention dq 3", 'N', 'N', ATT, HS, 96, T, C3, C3, 1, 0, HEADS * L, 0},
    {"attention dq 4", 'N', 'N', ATT, HS, 128, T, C3, C3, 1, 0, HEADS * L, 0},
    {"attention dv 1", 'T', 'N', ATT, HS, 128, T, C, C3, 1, 0, HEADS * L, 0},
    {"attention dv 2", 'T', 'N', ATT, HS, 96, T, C, C3, 1, 0, HEADS * L, 0},
    {"attention dv 3", 'T', 'N', ATT, HS, 64, T, C, C3, 1, 0, HEADS * L, 0},
    {"attention dv 4", 'T', 'N', ATT, HS, 32, T, C, C3, 1, 0, HEADS * L, 0},
    {"attention dk 1", 'T', 'N', ATT, HS, 128, T, C3, C3, 1, 0, HEADS * L, 0},
    {"attention dk 2", 'T', 'N', ATT, HS, 96, T, C3, C3, 1, 0, HEADS * L, 0},
    {"attention dk 3", 'T', 'N', ATT, HS, 64, T, C3, C3, 1, 0, HEADS * L, 0},
    {"attention dk 4", 'T', 'N', ATT, HS, 32, T, C3, C3, 1, 0, HEADS * L, 0},
    {"qkv dinp", 'N', 'N', ROWS, C, C3, C3, C, C, 1, 0, ROW_PIECES * L, 0},
    {"qkv dweight", 'T', 'N', C3, C, SUM, C3, C, C, 1, 0, SUM_PIECES * L, 0},
    /* the d_model 512 MoE layer, forward then backward */
    {"router", 'N', 'T', ROWS, E, D5, D5, D5, E, 1, 0, N5 / ROWS, 1},
    {"expert fc", 'N', 'T', E5ROWS, H5, D5, D5, D5, H5, 1, 0, E, 1},
    {"expert proj", 'N', 'T', E5ROWS, D5, H5, H5, H5, D5, 1, 0, E, 1},
    {"expert dact", 'N', 'N', E5ROWS, H5, D5, D5, H5, H5, 1, 0, E, 1},
    {"expert dproj", 'T', 'N', D5, H5, E5ROWS, D5, H5, H5, 1, 1, E, 1},
    {"expert dfc", 'T', 'N', H5, D5, E5ROWS, H5, D5, D5, 1, 1, E, 1},
    {"expert dx", 'N', 'N', E5ROWS, D5, H5, H5, D5, D5, 1, 0, E, 1},
    {"router dinp", 'N', 'N', ROWS, D5, E, E, D5, D5, 1, 0, N5 / ROWS, 1},
    {"router dweight", 'T', 'N', E, D5, SUM, E, D5, D5, 1, 0, N5 / SUM, 1},
    /* the reference model's experts with 64 of them, forward then backward */
    {"expert fc, proj", 'N', 'T', E64ROWS, H, C, C, C, H, 1, 0, 2 * E64 * L, 2},
    {"expert dact, dx", 'N', 'N', E64ROWS, H, C, C, H, H, 1, 0, 2 * E64 * L, 2},
    {"expert dproj, dfc", 'T', 'N', C, H, E64ROWS, C, H, H, 1, 1, 2 * E64 * L, 2},
};
enum { SHAPES = sizeof shapes / sizeof shapes[0], GROUPS = 3 };
static const char *const group_name[GROUPS] = {
    "top-2 reference model, one training step (forward + backward)",
    "d_model 512 MoE layer (make bench, section 1), forward + backward",
    "the reference model's expert products with 64 experts (64 rows an expert), one step"};

/* A shape's operands, and what libxsmm needs for it. libxsmm is
** column-major: row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ,
** so its kernel is (N × M) = (N × K)·(K × M) with A and B swapped. Its JIT
** kernels (1.17) transpose their second operand but not their first, take
** alpha 1 only and beta 0 or 1: where row-major B is transposed, each call
** transposes it into xsmm_bt first, and alpha is applied afterwards, both
** inside the timing. */
typedef struct {
    const Shape *s;
    float *a, *b, *c;
    int xsmm_ok;    /* libxsmm_smmdispatch gave a kernel */
    float *xsmm_bt; /* Bᵀ, where row-major B is transposed */
} Case;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static float *alloc_floats(size_t n) {
    float *p = aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
    if (!p) {
        fprintf(stderr, "bench_gemm: out of memory\n");
        exit(1);
    }
    return p;
}

static void fill(float *x, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = (float)(seed >> 8) / 16777216.0f - 0.5f;
    }
}

static size_t a_size(const Shape *s) { return (size_t)(s->transa == 'N' ? s->M : s->K) * s->lda; }
static size_t b_size(const Shape *s) { return (size_t)(s->transb == 'N' ? s->K : s->N) * s->ldb; }
static size_t c_size(const Shape *s) { return (size_t)s->M * s->ldc; }

/* The kernel for a shape: JIT-compiled at the first request, then found in
** libxsmm's registry. Each call asks again, as a drop-in sgemm would. */
static libxsmm_smmfunction xsmm_kernel(const Shape *s) {
    libxsmm_blasint lda = s->transb == 'T' ? s->N : s->ldb, ldb = s->lda, ldc = s->ldc;
    int flags = s->transa == 'T' ? LIBXSMM_GEMM_FLAG_TRANS_B : LIBXSMM_GEMM_FLAG_NONE;
    int prefetch = LIBXSMM_PREFETCH_NONE;
    float one = 1.0f, beta = s->beta;
    return libxsmm_smmdispatch(s->N, s->M, s->K, &lda, &ldb, &ldc, &one, &beta, &flags,
                               &prefetch);
}

static void gemm(int lib, const Case *c) {
    const Shape *s = c->s;
    switch (lib) {
    case OPENBLAS:
        cblas_sgemm(CblasRowMajor, s->transa == 'T' ? CblasTrans : CblasNoTrans,
                    s->transb == 'T' ? CblasTrans : CblasNoTrans, s->M, s->N, s->K, s->alpha,
                    c->a, s->lda, c->b, s->ldb, s->beta, c->c, s->ldc);
        break;
    case BLIS: {
        float alpha = s->alpha, beta = s->beta;
        bli_sgemm(s->transa == 'T' ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE,
                  s->transb == 'T' ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, s->M, s->N, s->K, &alpha,
                  c->a, s->lda, 1, c->b, s->ldb, 1, &beta, c->c, s->ldc, 1);
        break;
    }
    case XSMM: {
        const float *first = c->b;
        if (c->xsmm_bt) { /* row-major B (N × K) → column-major N × K, leading dimension N */
            libxsmm_otrans(c->xsmm_bt, c->b, sizeof(float), s->K, s->N, s->ldb, s->N);
            first = c->xsmm_bt;
        }
        xsmm_kernel(s)(first, c->a, c->c);
        if (s->alpha != 1.0f) /* beta is 0 wherever alpha is not 1 */
            for (int i = 0; i < s->M; i++)
                for (int j = 0; j < s->N; j++) c->c[(size_t)i * s->ldc + j] *= s->alpha;
        break;
    }
    case ONEDNN:
        if (dnnl_sgemm(s->transa, s->transb, s->M, s->N, s->K, s->alpha, c->a, s->lda, c->b,
                       s->ldb, s->beta, c->c, s->ldc) != dnnl_success) {
            fprintf(stderr, "bench_gemm: dnnl_sgemm failed on %s\n", s->what);
            exit(1);
        }
        break;
    }
}

static int available(int lib, const Case *c) { return lib != XSMM || c->xsmm_ok; }

/* max |C - C_openblas| over max |C_openblas|, on the M × N entries */
static double rel_diff(const Shape *s, const float *c, const float *ref) {
    double d = 0, m = 0;
    for (int i = 0; i < s->M; i++)
        for (int j = 0; j < s->N; j++) {
            size_t k = (size_t)i * s->ldc + j;
            d = fmax(d, fabs((double)c[k] - ref[k]));
            m = fmax(m, fabs((double)ref[k]));
        }
    return m > 0 ? d / m : d;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct { double median, q1, q3, min, max; } Stats;

static Stats stats_of(const double *x, int n) {
    double *v = malloc(sizeof(double) * (size_t)n);
    memcpy(v, x, sizeof(double) * (size_t)n);
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    Stats st = {n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]), v[(n - 1) / 4],
                v[n - 1 - (n - 1) / 4], v[0], v[n - 1]};
    free(v);
    return st;
}

/* Per shape and library: GFLOP/s over the samples, the ratio to OpenBLAS's
** neighbouring sample, the difference from OpenBLAS's result, and whether a
** second call gave the same bits. */
typedef struct {
    int ok;
    Stats rate, ratio;
    double diff;
    int repeatable;
} Result;

static void measure(const Shape *s, int samples, double sample_seconds, Result *res) {
    Case c = {s, alloc_floats(a_size(s)), alloc_floats(b_size(s)), alloc_floats(c_size(s)),
              xsmm_kernel(s) != NULL,
              s->transb == 'T' ? alloc_floats((size_t)s->N * s->K) : NULL};
    float *c0 = alloc_floats(c_size(s)), *ref = alloc_floats(c_size(s)),
          *first = alloc_floats(c_size(s));
    fill(c.a, a_size(s), 1);
    fill(c.b, b_size(s), 2);
    fill(c0, c_size(s), 3);
    size_t cbytes = sizeof(float) * c_size(s);

    for (int lib = 0; lib < LIBS; lib++) {
        res[lib].ok = available(lib, &c);
        if (!res[lib].ok) continue;
        memcpy(c.c, c0, cbytes);
        gemm(lib, &c);
        memcpy(first, c.c, cbytes);
        if (lib == OPENBLAS) memcpy(ref, c.c, cbytes);
        memcpy(c.c, c0, cbytes);
        gemm(lib, &c);
        res[lib].repeatable = memcmp(first, c.c, cbytes) == 0;
        res[lib].diff = rel_diff(s, first, ref);
    }

    /* calls per sample, from OpenBLAS's best of a few after a warm-up */
    for (int lib = 0; lib < LIBS; lib++)
        for (int r = 0; r < 3 && res[lib].ok; r++) gemm(lib, &c);
    double best = 1e30;
    for (int r = 0; r < 5; r++) {
        double t0 = now();
        gemm(OPENBLAS, &c);
        best = fmin(best, now() - t0);
    }
    int calls = (int)fmax(1.0, sample_seconds / best);
    double flops = 2.0 * s->M * s->N * s->K * calls;

    double *rate = malloc(sizeof(double) * (size_t)samples * LIBS);
    for (int k = 0; k < samples; k++)
        for (int j = 0; j < LIBS; j++) {
            int lib = (j + k) % LIBS;
            if (!res[lib].ok) continue;
            double t0 = now();
            for (int r = 0; r < calls; r++) gemm(lib, &c);
            rate[lib * samples + k] = flops / (now() - t0) / 1e9;
        }
    double *ratio = malloc(sizeof(double) * (size_t)samples);
    for (int lib = 0; lib < LIBS; lib++) {
        if (!res[lib].ok) continue;
        res[lib].rate = stats_of(rate + lib * samples, samples);
        for (int k = 0; k < samples; k++) ratio[k] = rate[lib * samples + k] / rate[k];
        res[lib].ratio = stats_of(ratio, samples);
    }
    free(ratio);
    free(rate);
    free(c.a), free(c.b), free(c.c), free(c.xsmm_bt), free(c0), free(ref), free(first);
}

static void print_load(const char *when) {
    char buf[128] = "?";
    FILE *f = fopen("/proc/loadavg", "r");
    if (f && fgets(buf, sizeof buf, f)) buf[strcspn(buf, "\n")] = 0;
    if (f) fclose(f);
    printf("load average %s: %s\n", when, buf);
}

/* the shared object a symbol comes from: cblas_sgemm is in both OpenBLAS and BLIS */
static const char *provider(void *symbol) {
    Dl_info info;
    return dladdr(symbol, &info) && info.dli_fname ? info.dli_fname : "?";
}

static const char *dnnl_isa_name(dnnl_cpu_isa_t isa) {
    switch (isa) {
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    default: return "other";
    }
}

int main(int argc, char **argv) {
    int samples = argc > 1 ? atoi(argv[1]) : 31;
    double sample_ms = argc > 2 ? atof(argv[2]) : 4.0;
    if (samples < 3 || sample_ms <= 0) {
        fprintf(stderr, "usage: bench_gemm [samples >= 3] [milliseconds a sample]\n");
        return 2;
    }
    /* BLIS 0.9.0 takes an AVX-512 AMD processor for none it knows and runs its
    ** generic C kernels (a third of OpenBLAS's rate here); its skx (AVX-512)
    ** or haswell (AVX2) sub-configuration is what it would be fairly judged on.
    ** Read at BLIS's first call; BLIS_ARCH_TYPE in the environment wins. */
    char arch[16];
    snprintf(arch, sizeof arch, "%d",
             __builtin_cpu_supports("avx512f") ? BLIS_ARCH_SKX : BLIS_ARCH_HASWELL);
    int blis_arch_given = getenv("BLIS_ARCH_TYPE") != NULL;
    if (!blis_arch_given) setenv("BLIS_ARCH_TYPE", arch, 1);
    openblas_set_num_threads(1);
    bli_thread_set_num_threads(1);
    omp_set_num_threads(1); /* oneDNN's OpenMP runtime */
    libxsmm_init();

    const char *coretype = getenv("OPENBLAS_CORETYPE");
    const dnnl_version_t *dv = dnnl_version();
    printf("bench_gemm: single-threaded sgemm on the model's shapes, %d samples of ~%.0f ms\n",
           samples, sample_ms);
    printf("CPU: %s\n", machine_cpu_model());
    printf("OpenBLAS: %s, kernels %s (OPENBLAS_CORETYPE=%s); cblas_sgemm from %s\n",
           openblas_get_config(), openblas_get_corename(), coretype ? coretype : "unset",
           provider((void *)cblas_sgemm));
    printf("BLIS %s, sub-configuration %s (BLIS_ARCH_TYPE=%s, %s)\n", bli_info_get_version_str(),
           bli_arch_string(bli_arch_query_id()), getenv("BLIS_ARCH_TYPE"),
           blis_arch_given ? "from the environment" : "set by bench_gemm");
    printf("libxsmm %s, target %s (JIT kernels, libxsmm_smmdispatch at every call)\n",
           LIBXSMM_VERSION, libxsmm_get_target_arch());
    printf("oneDNN %d.%d.%d, ISA %s (dnnl_sgemm)\n", dv->major, dv->minor, dv->patch,
           dnnl_isa_name(dnnl_get_effective_cpu_isa()));
    print_load("at start");

    static Result res[SHAPES][LIBS];
    for (int i = 0; i < SHAPES; i++) measure(&shapes[i], samples, sample_ms * 1e-3, res[i]);

    for (int g = 0; g < GROUPS; g++) {
        printf("\n%s\n", group_name[g]);
        printf("GFLOP/s, median (quartiles); op, M N K as cblas_sgemm takes them\n");
        printf("%-24s %2s %4s %4s %4s %5s", "product", "op", "M", "N", "K", "calls");
        for (int lib = 0; lib < LIBS; lib++) printf(" %19s", lib_name[lib]);
        printf("\n");
        for (int i = 0; i < SHAPES; i++) {
            const Shape *s = &shapes[i];
            if (s->group != g) continue;
            printf("%-24s %c%c %4d %4d %4d %5d", s->what, s->transa, s->transb, s->M, s->N, s->K,
                   s->per_step);
            for (int lib = 0; lib < LIBS; lib++) {
                const Result *r = &res[i][lib];
                if (!r->ok) printf(" %19s", "n/a");
                else printf(" %5.1f (%5.1f-%5.1f)", r->rate.median, r->rate.q1, r->rate.q3);
            }
            printf("\n");
        }
        printf("against OpenBLAS: median of the per-sample ratios (min-max); "
               "max |diff| / max |C|; * if a second call gave other bits\n");
        printf("%-24s %2s %4s %4s %4s", "product", "op", "M", "N", "K");
        for (int lib = 1; lib < LIBS; lib++) printf(" %26s", lib_name[lib]);
        printf("\n");
        for (int i = 0; i < SHAPES; i++) {
            const Shape *s = &shapes[i];
            if (s->group != g) continue;
            printf("%-24s %c%c %4d %4d %4d", s->what, s->transa, s->transb, s->M, s->N, s->K);
            for (int lib = 1; lib < LIBS; lib++) {
                const Result *r = &res[i][lib];
                if (!r->ok) printf(" %26s", "n/a");
                else
                    printf(" %4.2f (%4.2f-%4.2f) %7.1e%c", r->ratio.median, r->ratio.min,
                           r->ratio.max, r->diff, r->repeatable ? ' ' : '*');
            }
            printf("\n");
        }
        /* weighted: the step's sgemm FLOPs over its sgemm time at each shape's
        ** median (and quartile) rate */
        printf("weighted by calls per step: GFLOP/s at the medians (at the lower-upper "
               "quartiles), sgemm ms a step, speed against OpenBLAS\n");
        double base_ms = 0;
        for (int lib = 0; lib < LIBS; lib++) {
            double flops = 0, t = 0, t_q1 = 0, t_q3 = 0;
            int complete = 1;
            for (int i = 0; i < SHAPES; i++) {
                const Shape *s = &shapes[i];
                if (s->group != g) continue;
                if (!res[i][lib].ok) {
                    complete = 0;
                    continue;
                }
                double f = 2.0 * s->M * s->N * s->K * s->per_step / 1e9;
                flops += f;
                t += f / res[i][lib].rate.median;
                t_q1 += f / res[i][lib].rate.q1;
                t_q3 += f / res[i][lib].rate.q3;
            }
            if (lib == OPENBLAS) base_ms = t * 1e3;
            printf("  %-9s %6.1f (%5.1f-%5.1f) GFLOP/s  %7.2f ms  %5.2fx%s\n", lib_name[lib],
                   flops / t, flops / t_q1, flops / t_q3, t * 1e3, base_ms / (t * 1e3),
                   complete ? "" : "  (shapes marked n/a left out)");
        }
    }
    printf("\n");
    print_load("at end");
    libxsmm_finalize();
    return 0;
}
