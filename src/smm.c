/*
** smm.c — small matrix products through libxsmm (see smm.h).
**
** libxsmm is column-major: row-major C = op(A)·B is column-major
** Cᵀ = Bᵀ·op(A)ᵀ, so its kernel is (n × m) = (n × k)·(k × m), with B as its
** first operand and A as its second, which its flag TRANS_B transposes.
** Measured on the model's shapes (tests/bench_gemm.c, README Speed), its
** kernels beat OpenBLAS's on the small blocks of attention, where OpenBLAS's
** packing and its small-matrix path weigh most.
*/
#include "smm.h"

#include <assert.h>
#include <cblas.h>
#include <libxsmm.h>

Smm smm_plan(int transa, int m, int n, int k, int lda, int ldb, int ldc, float beta) {
    assert(m >= 1 && n >= 1 && k >= 1 && (beta == 0.0f || beta == 1.0f));
    assert(ldb >= n && ldc >= n && lda >= (transa ? m : k));
    Smm p = {NULL, transa, m, n, k, lda, ldb, ldc, beta};
    libxsmm_blasint xlda = ldb, xldb = lda, xldc = ldc;
    int flags = transa ? LIBXSMM_GEMM_FLAG_TRANS_B : LIBXSMM_GEMM_FLAG_NONE;
    int prefetch = LIBXSMM_PREFETCH_NONE;
    float one = 1.0f;
    p.kernel = (void (*)(const float *, const float *, float *, ...))libxsmm_smmdispatch(
        n, m, k, &xlda, &xldb, &xldc, &one, &beta, &flags, &prefetch);
    return p;
}

void smm_run(const Smm *p, const float *a, const float *b, float *c) {
    if (p->kernel) {
        p->kernel(b, a, c);
        return;
    }
    cblas_sgemm(CblasRowMajor, p->transa ? CblasTrans : CblasNoTrans, CblasNoTrans, p->m, p->n,
                p->k, 1.0f, a, p->lda, b, p->ldb, p->beta, c, p->ldc);
}

void smm_transpose(float *out, const float *in, int rows, int cols, int ldi, int ldo) {
    /* libxsmm's m × n is column-major: our cols × rows */
    libxsmm_otrans(out, in, sizeof(float), cols, rows, ldi, ldo);
}

const char *smm_target(void) { return libxsmm_get_target_arch(); }
