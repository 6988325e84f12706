/*
** smm.h — small matrix products through libxsmm's JIT kernels (issue 11).
**
** A product is planned once (smm_plan looks up, or at its first request
** JIT-compiles, libxsmm's kernel for the shape) and then run on any number of
** operands (smm_run calls the kernel directly). Where libxsmm has no kernel
** (no JIT on this processor, or LIBXSMM_TARGET=generic) the plan runs
** cblas_sgemm instead, so a product gives the same bits whoever runs it
** either way. Row-major, as everywhere in moelab; alpha is 1, beta 0 or 1,
** and B is never transposed: libxsmm 1.17's JIT does not transpose that
** operand, so a caller that needs Bᵀ transposes it first (smm_transpose).
*/
#ifndef MOELAB_SMM_H
#define MOELAB_SMM_H

typedef struct {
    void (*kernel)(const float *a, const float *b, float *c, ...); /* libxsmm's, or NULL */
    int transa, m, n, k, lda, ldb, ldc;
    float beta;
} Smm;

/* C (m,n; ldc) = beta·C + op(A) · B, op(A) (m,k) being A (m,k; lda) or, with
** transa, Aᵀ of A (k,m; lda); B (k,n; ldb); beta is 0 or 1. */
Smm smm_plan(int transa, int m, int n, int k, int lda, int ldb, int ldc, float beta);
void smm_run(const Smm *p, const float *a, const float *b, float *c);

/* out (cols, rows; ldo) = inᵀ of in (rows, cols; ldi) */
void smm_transpose(float *out, const float *in, int rows, int cols, int ldi, int ldo);

/* The target of libxsmm's kernels ("skx", "hsw", ...; LIBXSMM_TARGET sets it). */
const char *smm_target(void);

#endif
