/*
** ops.c — the transformer's kernels (see ops.h for the contract of each).
**
** Matrix products go to OpenBLAS's cblas_sgemm, cut into pieces by their
** shape alone (see matmul_forward); the small ones, attention's blocks and
** the backward pieces of small weights, to libxsmm's kernels (smm.h).
** Everything else is a plain loop, parallelised with OpenMP only over
** independent rows, (batch, head) pairs, elements or, for the norms'
** parameter gradients and the bias gradients, slices of columns, each
** element's arithmetic the same whoever computes it. So the forward and the
** backward pass give the same bits on any number of threads
** (tests/test_threads.c checks 1, 2 and 3 threads on both of OpenBLAS's and
** libxsmm's x86-64 kernel families we meet; a recorded evaluation relies on
** it). The build compiles ISO C (-std=c11), in which gcc contracts no a·b + c
** into a fused multiply-add, so a vectorised loop and its scalar remainder
** round alike. Sums along a row (norms, softmax) are `omp simd` reductions,
** in the vector lanes' order that the build fixes: a strict left-to-right
** float sum cannot vectorise, and cost the layer norms a 128-step dependency
** chain per row.
*/
#include "ops.h"

#include <assert.h>
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <sleef.h>
#include <string.h>

#include "smm.h"

/*
** e^x by SLEEF's vectorised expf (1.0 ulp), the vector width the build targets
** (AVX-512, AVX2, SSE2; the scalar function elsewhere). Measured on the
** element-wise GELU (README, Speed), SLEEF's expf beats the degree-7
** polynomial this file had by 1.4-1.6x (0.30 against 0.48 ns an element with
** AVX-512, 0.61 against 0.87 with AVX2) and SLEEF's own tanhf, whose
** accurate path is slower, by 3.5x.
**
** expf_inplace (and logf_inplace, the same for SLEEF's logf) takes whole
** vectors; a tail shorter than one goes through the same
** vector function from a padded copy, so each element's result depends on its
** value alone, never on where it sits in an array or a thread's slice: the
** forward and the backward pass keep the same bits on any number of threads.
*/
#if defined(__AVX512F__)
#include <immintrin.h>
#define VEC_WIDTH 16
#define VEC_EXP(dst, src) _mm512_storeu_ps(dst, Sleef_expf16_u10avx512f(_mm512_loadu_ps(src)))
#define VEC_LOG(dst, src) _mm512_storeu_ps(dst, Sleef_logf16_u10avx512f(_mm512_loadu_ps(src)))
#elif defined(__AVX2__)
#include <immintrin.h>
#define VEC_WIDTH 8
#define VEC_EXP(dst, src) _mm256_storeu_ps(dst, Sleef_expf8_u10avx2(_mm256_loadu_ps(src)))
#define VEC_LOG(dst, src) _mm256_storeu_ps(dst, Sleef_logf8_u10avx2(_mm256_loadu_ps(src)))
#elif defined(__SSE2__)
#include <immintrin.h>
#define VEC_WIDTH 4
#define VEC_EXP(dst, src) _mm_storeu_ps(dst, Sleef_expf4_u10sse2(_mm_loadu_ps(src)))
#define VEC_LOG(dst, src) _mm_storeu_ps(dst, Sleef_logf4_u10sse2(_mm_loadu_ps(src)))
#else
#define VEC_WIDTH 1
#define VEC_EXP(dst, src) (*(dst) = Sleef_expf_u10(*(src)))
#define VEC_LOG(dst, src) (*(dst) = Sleef_logf_u10(*(src)))
#endif

/* f(x[i]) for i < n, in place, by whole vectors (VEC, one macro above) */
#define VEC_APPLY(VEC, x, n) do {                                          \
        int i_ = 0;                                                        \
        for (; i_ + VEC_WIDTH <= (n); i_ += VEC_WIDTH) VEC((x) + i_, (x) + i_); \
        if (i_ < (n)) {                                                    \
            float pad_[VEC_WIDTH];                                         \
            for (int j_ = 0; j_ < VEC_WIDTH; j_++) pad_[j_] = 1.0f;        \
            memcpy(pad_, (x) + i_, sizeof(float) * (size_t)((n) - i_));    \
            VEC(pad_, pad_);                                               \
            memcpy((x) + i_, pad_, sizeof(float) * (size_t)((n) - i_));    \
        }                                                                  \
    } while (0)

void expf_inplace(float *x, int n) { VEC_APPLY(VEC_EXP, x, n); }
void logf_inplace(float *x, int n) { VEC_APPLY(VEC_LOG, x, n); }

/* The element-wise activations work in chunks of this many elements, with a
** chunk's exponentials in a buffer on the stack (in L1). */
#define ELEMWISE_CHUNK 1024

/* Rows [*lo, *hi) of n for this thread, in equal contiguous slices. */
static void thread_slice(int n, int *lo, int *hi) {
    int nt = omp_get_num_threads(), id = omp_get_thread_num();
    *lo = (int)((long)n * id / nt);
    *hi = (int)((long)n * (id + 1) / nt);
}

void encoder_forward(float *out, const int *inp, const float *wte, const float *wpe,
                     int B, int T, int C) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            float *o = out + ((size_t)b * T + t) * C;
            const float *e = wte + (size_t)inp[b * T + t] * C;
            const float *p = wpe + (size_t)t * C;
            for (int i = 0; i < C; i++) o[i] = e[i] + p[i];
        }
}

void encoder_backward(float *dwte, float *dwpe, const float *dout, const int *inp,
                      int B, int T, int C) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *d = dout + ((size_t)b * T + t) * C;
            float *de = dwte + (size_t)inp[b * T + t] * C;
            float *dp = dwpe + (size_t)t * C;
            for (int i = 0; i < C; i++) {
                de[i] += d[i];
                dp[i] += d[i];
            }
        }
}

void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *weight, const float *bias, int N, int C, float eps) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float m = 0.0f;
#pragma omp simd reduction(+ : m)
        for (int i = 0; i < C; i++) m += x[i];
        m /= C;
        float v = 0.0f;
#pragma omp simd reduction(+ : v)
        for (int i = 0; i < C; i++) {
            float d = x[i] - m;
            v += d * d;
        }
        v /= C;
        float s = 1.0f / sqrtf(v + eps);
        float *o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) o[i] = (x[i] - m) * s * weight[i] + bias[i];
        mean[n] = m;
        rstd[n] = s;
    }
}

/* The norms' parameter gradients, dweight += Σ_n (x - mean) rstd · dout and
** dbias += Σ_n dout: a sum over rows, each column in one thread and one order
** (the threads take slices of the columns). RMS norm passes no mean (0) and
** no dbias. */
static void norm_param_backward(float *dweight, float *dbias, const float *dout,
                                const float *inp, const float *mean, const float *rstd,
                                int N, int C) {
#pragma omp parallel
    {
        int lo, hi;
        thread_slice(C, &lo, &hi);
        for (int n = 0; n < N; n++) {
            const float *d = dout + (size_t)n * C;
            const float *x = inp + (size_t)n * C;
            float m = mean ? mean[n] : 0.0f, s = rstd[n];
            for (int i = lo; i < hi; i++) dweight[i] += (x[i] - m) * s * d[i];
            if (dbias)
                for (int i = lo; i < hi; i++) dbias[i] += d[i];
        }
    }
}

void layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, const float *mean,
                        const float *rstd, int N, int C) {
    /* input gradients: rows are independent */
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *d = dout + (size_t)n * C;
        const float *x = inp + (size_t)n * C;
        float m = mean[n], s = rstd[n];
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
#pragma omp simd reduction(+ : dnorm_mean, dnorm_norm_mean)
        for (int i = 0; i < C; i++) {
            float norm = (x[i] - m) * s;
            float dnorm = weight[i] * d[i];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= C;
        dnorm_norm_mean /= C;
        float *di = dinp + (size_t)n * C;
        for (int i = 0; i < C; i++) {
            float norm = (x[i] - m) * s;
            float dnorm = weight[i] * d[i];
            di[i] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
        }
    }
    norm_param_backward(dweight, dbias, dout, inp, mean, rstd, N, C);
}

void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight,
                     int N, int C, float eps) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float ms = 0.0f;
#pragma omp simd reduction(+ : ms)
        for (int i = 0; i < C; i++) ms += x[i] * x[i];
        float s = 1.0f / sqrtf(ms / C + eps);
        float *o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) o[i] = x[i] * s * weight[i];
        rstd[n] = s;
    }
}

void rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                      const float *weight, const float *rstd, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *d = dout + (size_t)n * C;
        const float *x = inp + (size_t)n * C;
        float s = rstd[n];
        /* y_i = x_i s w_i, s = (mean x² + eps)^-1/2, ds/dx_j = -s³ x_j / C */
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int i = 0; i < C; i++) dot += d[i] * weight[i] * x[i];
        float k = dot * s * s * s / C;
        float *di = dinp + (size_t)n * C;
        for (int i = 0; i < C; i++) di[i] += d[i] * weight[i] * s - k * x[i];
    }
    norm_param_backward(dweight, NULL, dout, inp, NULL, rstd, N, C);
}

/*
** Matrix products are cut into pieces by their shape alone, never by the
** number of threads: each piece is one single-threaded sgemm, the same call
** with the same pointers whatever the team, and the threads only share the
** pieces out. OpenBLAS computes a row differently depending on where it sits
** in a call (edge kernels for the last rows of a panel, small-matrix paths
** chosen by size), so slicing rows per thread gave last-bit differences
** between one thread and two on its AVX2 kernels. Cut by shape, a product's
** result does not depend on the thread count, by construction.
**
** Rows of out and dinp are cut into pieces of about MATMUL_PIECE_ROWS rows:
** each piece re-packs only the weight, which is small. dweight sums over the
** N rows, and cutting its own rows would make every piece re-pack all of inp,
** so the sum is cut instead, in pieces of about MATMUL_PIECE_SUM rows whose
** partial products (in scratch) are added in piece order. Measured on the
** model's shapes (tests/bench_moe.c), either costs a few percent of one
** sgemm's rate on one thread.
*/
#define MATMUL_PIECE_ROWS 256
#define MATMUL_PIECE_SUM 512

/* matmul_backward's pieces go to libxsmm's kernels (smm.h) when the weight
** has at most this many elements, to OpenBLAS's above. Measured through
** run:train (README, Speed): +3% a step at d_model 128 (weights up to
** 384 x 128) and +2% at 256 on the AVX-512 kernels, no change on the AVX2
** path; with every weight, -5% at d_model 512, where libxsmm's kernels, which
** do not pack their operands, lose to OpenBLAS's on 512 x 1536 and the like.
** (matmul_forward's products, C = A·Bᵀ, stay on OpenBLAS: libxsmm 1.17 would
** need the weight transposed first.) */
#define MATMUL_XSMM_WEIGHT 65536

/* How many pieces n rows are cut into: about `rows` each, a multiple of 4
** when more than one (so that 2 or 4 threads share them evenly), and no
** piece under 16 rows. Grows with n. */
static int piece_count(int n, int rows) {
    int p = (n + rows - 1) / rows;
    if (p > 1) p = (p + 3) / 4 * 4;
    while (p > 1 && n < 16 * p) p--;
    return p;
}

/* Rows [*lo, *hi) of piece i of p over n rows; inner boundaries fall on
** multiples of 16, whole panels of the sgemm kernels. */
static void piece_range(int n, int p, int i, int *lo, int *hi) {
    *lo = i == 0 ? 0 : (int)((long)n * i / p) / 16 * 16;
    *hi = i == p - 1 ? n : (int)((long)n * (i + 1) / p) / 16 * 16;
}

/* A product's plan for each size of piece (piece_range gives at most three:
** the first, the middle ones, which differ by at most 16 rows, and the last),
** made once per call before the threads start. */
typedef struct {
    int n, rows[4];
    Smm plan[4];
} PiecePlans;

static void piece_plans_add(PiecePlans *pp, int rows, Smm plan) {
    for (int i = 0; i < pp->n; i++)
        if (pp->rows[i] == rows) return;
    assert(pp->n < 4);
    pp->rows[pp->n] = rows;
    pp->plan[pp->n++] = plan;
}

static const Smm *piece_plan(const PiecePlans *pp, int rows) {
    for (int i = 0; i < pp->n; i++)
        if (pp->rows[i] == rows) return &pp->plan[i];
    assert(0 && "a piece without a plan");
    return NULL;
}

size_t matmul_backward_scratch(int N, int C, int OC) {
    int p = piece_count(N, MATMUL_PIECE_SUM);
    return p > 1 ? (size_t)p * OC * C : 0;
}

void matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
                    int N, int C, int OC, float beta) {
    if (N == 0) return;
    int pieces = piece_count(N, MATMUL_PIECE_ROWS);
#pragma omp parallel for schedule(static) if (pieces > 1)
    for (int i = 0; i < pieces; i++) {
        int lo, hi;
        piece_range(N, pieces, i, &lo, &hi);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, hi - lo, OC, C, 1.0f,
                    inp + (size_t)lo * C, C, weight, C, beta, out + (size_t)lo * OC, OC);
        if (bias)
            for (int n = lo; n < hi; n++) {
                float *o = out + (size_t)n * OC;
                for (int j = 0; j < OC; j++) o[j] += bias[j];
            }
    }
}

void matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                     const float *inp, const float *weight, int N, int C, int OC,
                     float dinp_beta, float *scratch) {
    if (N == 0) return;
    int rows = dinp ? piece_count(N, MATMUL_PIECE_ROWS) : 0;
    int sums = piece_count(N, MATMUL_PIECE_SUM);
    size_t wn = (size_t)OC * C;
    assert(sums == 1 || scratch);
    int xsmm = wn <= MATMUL_XSMM_WEIGHT;
    /* dinp's pieces: dinp (rows, C) = dout (rows, OC) · weight (OC, C); dweight's:
    ** (OC, C) = dout (rows, OC)ᵀ · inp (rows, C), into dweight itself when
    ** there is one piece, else into scratch */
    PiecePlans dinp_plans = {0}, dweight_plans = {0};
    for (int i = 0; xsmm && i < rows + sums; i++) {
        int lo, hi;
        if (i < rows) {
            piece_range(N, rows, i, &lo, &hi);
            piece_plans_add(&dinp_plans, hi - lo, smm_plan(0, hi - lo, C, OC, OC, C, C, dinp_beta));
        } else {
            piece_range(N, sums, i - rows, &lo, &hi);
            piece_plans_add(&dweight_plans, hi - lo,
                            smm_plan(1, OC, C, hi - lo, OC, C, C, sums == 1 ? 1.0f : 0.0f));
        }
    }
#pragma omp parallel
    {
        /* the pieces of dinp's rows, then those of dweight's sum over N */
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < rows + sums; i++) {
            int lo, hi;
            if (i < rows) {
                piece_range(N, rows, i, &lo, &hi);
                const float *d = dout + (size_t)lo * OC;
                float *di = dinp + (size_t)lo * C;
                if (xsmm)
                    smm_run(piece_plan(&dinp_plans, hi - lo), d, weight, di);
                else
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, hi - lo, C, OC, 1.0f,
                                d, OC, weight, C, dinp_beta, di, C);
            } else {
                piece_range(N, sums, i - rows, &lo, &hi);
                int only = sums == 1; /* a single piece adds to dweight itself */
                const float *d = dout + (size_t)lo * OC, *x = inp + (size_t)lo * C;
                float *dw = only ? dweight : scratch + (i - rows) * wn;
                if (xsmm)
                    smm_run(piece_plan(&dweight_plans, hi - lo), d, x, dw);
                else
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, hi - lo, 1.0f,
                                d, OC, x, C, only ? 1.0f : 0.0f, dw, C);
            }
        }
        /* dweight += the partial products, in piece order; dbias += column sums
        ** of dout, each column in row order. Both are split by element, so
        ** each element's arithmetic is the same on any number of threads. */
        if (sums > 1) {
#pragma omp for schedule(static)
            for (size_t j = 0; j < wn; j++) {
                float s = scratch[j];
                for (int i = 1; i < sums; i++) s += scratch[i * wn + j];
                dweight[j] += s;
            }
        }
        if (dbias) {
            int lo, hi;
            thread_slice(OC, &lo, &hi);
            for (int n = 0; n < N; n++) {
                const float *d = dout + (size_t)n * OC;
                for (int j = lo; j < hi; j++) dbias[j] += d[j];
            }
        }
    }
}

/*
** Causal attention computes only what the mask keeps, in blocks: the rows of
** a head's scores go in blocks of ATT_BLOCK, and rows [t0, t1) meet the keys
** and values [0, t1) alone, so about half of the T x T products is skipped
** (37% at T 128, 48% at T 1024). In the backward pass the gradients of the
** keys and values go in blocks of columns [j0, j1), which rows [j0, T) alone
** reach.
**
** The blocks' products are small (32 x t1 x hs and the like) and go to
** libxsmm's kernels (smm.h), 1.28x OpenBLAS's on these shapes on one thread
** (weighted by calls; README, Speed), +3 to +6% a training step. Its JIT
** does not transpose the second operand of q kᵀ and d vᵀ, so each head first
** transposes its keys (forward) or values (backward) into scratch. The
** kernels are looked up once per call, one per block and product, before the
** threads start; each block's product has pointers and sizes that depend on T
** and the block, never on the thread.
*/
#define ATT_BLOCK 32

double attention_flops(int B, int T, int C) {
    double pairs = 0.0; /* Σ over row blocks of rows × keys */
    for (int t0 = 0; t0 < T; t0 += ATT_BLOCK) {
        int t1 = t0 + ATT_BLOCK < T ? t0 + ATT_BLOCK : T;
        pairs += (double)(t1 - t0) * t1;
    }
    return 2.0 * 2.0 * B * pairs * C; /* scores and their weighted sum, every head */
}

size_t attention_scratch(int B, int T, int C) { return (size_t)B * T * C; }

void attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH,
                       float *scratch) {
    assert(C % NH == 0);
    int hs = C / NH, C3 = 3 * C, blocks = (T + ATT_BLOCK - 1) / ATT_BLOCK;
    float scale = 1.0f / sqrtf((float)hs);
    /* block i: scores (rows, t1) = q (rows, hs) · kᵀ (hs, t1); out = a · v */
    Smm scores[blocks], weighted[blocks];
    for (int i = 0; i < blocks; i++) {
        int t0 = i * ATT_BLOCK, t1 = t0 + ATT_BLOCK < T ? t0 + ATT_BLOCK : T;
        scores[i] = smm_plan(0, t1 - t0, t1, hs, C3, T, T, 0.0f);
        weighted[i] = smm_plan(0, t1 - t0, hs, t1, T, C3, C, 0.0f);
    }
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const float *q = qkv + (size_t)b * T * C3 + h * hs;
            const float *k = q + C, *v = q + 2 * C;
            float *kt = scratch + ((size_t)b * NH + h) * hs * T; /* kᵀ (hs, T) */
            float *a = att + ((size_t)b * NH + h) * T * T;
            smm_transpose(kt, k, T, hs, C3, T);
            for (int i = 0; i < blocks; i++) {
                int t0 = i * ATT_BLOCK, t1 = t0 + ATT_BLOCK < T ? t0 + ATT_BLOCK : T;
                /* scores of rows [t0, t1) against keys [0, t1), then a causal
                ** softmax of the scaled scores row by row (zero past the
                ** diagonal, up to t1) */
                smm_run(&scores[i], q + (size_t)t0 * C3, kt, a + (size_t)t0 * T);
                for (int t = t0; t < t1; t++) {
                    float *row = a + (size_t)t * T;
                    float maxv = -INFINITY;
#pragma omp simd reduction(max : maxv)
                    for (int t2 = 0; t2 <= t; t2++) maxv = row[t2] > maxv ? row[t2] : maxv;
                    for (int t2 = 0; t2 <= t; t2++) row[t2] = (row[t2] - maxv) * scale;
                    expf_inplace(row, t + 1);
                    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                    for (int t2 = 0; t2 <= t; t2++) sum += row[t2];
                    float inv = 1.0f / sum;
                    for (int t2 = 0; t2 <= t; t2++) row[t2] *= inv;
                    for (int t2 = t + 1; t2 < t1; t2++) row[t2] = 0.0f;
                }
                smm_run(&weighted[i], a + (size_t)t0 * T, v,
                        out + ((size_t)b * T + t0) * C + h * hs);
            }
        }
}

void attention_backward(float *dqkv, float *datt, const float *dout, const float *qkv,
                        const float *att, int B, int T, int C, int NH, float *scratch) {
    int hs = C / NH, C3 = 3 * C, blocks = (T + ATT_BLOCK - 1) / ATT_BLOCK;
    float scale = 1.0f / sqrtf((float)hs);
    /* by rows [t0, t1): da = d vᵀ (by vᵀ, transposed into scratch), dq = dscore k;
    ** by columns [j0, j1) over rows [j0, T): dv = aᵀ d, dk = dscoreᵀ q */
    Smm da_plan[blocks], dq_plan[blocks], dv_plan[blocks], dk_plan[blocks];
    for (int i = 0; i < blocks; i++) {
        int t0 = i * ATT_BLOCK, t1 = t0 + ATT_BLOCK < T ? t0 + ATT_BLOCK : T;
        da_plan[i] = smm_plan(0, t1 - t0, t1, hs, C, T, T, 0.0f);
        dq_plan[i] = smm_plan(0, t1 - t0, hs, t1, T, C3, C3, 0.0f);
        dv_plan[i] = smm_plan(1, t1 - t0, hs, T - t0, T, C, C3, 0.0f);
        dk_plan[i] = smm_plan(1, t1 - t0, hs, T - t0, T, C3, C3, 0.0f);
    }
    /* each (b, h) writes only its own rows and head columns of dqkv */
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const float *q = qkv + (size_t)b * T * C3 + h * hs;
            const float *k = q + C, *v = q + 2 * C;
            float *vt = scratch + ((size_t)b * NH + h) * hs * T; /* vᵀ (hs, T) */
            float *dq = dqkv + (size_t)b * T * C3 + h * hs;
            float *dk = dq + C, *dv = dq + 2 * C;
            const float *a = att + ((size_t)b * NH + h) * T * T;
            float *da = datt + ((size_t)b * NH + h) * T * T;
            const float *d = dout + (size_t)b * T * C + h * hs;
            smm_transpose(vt, v, T, hs, C3, T);
            /* by rows: da = d vᵀ, the softmax backward in place,
            ** dscore = a (da - Σ a da) · scale, and dq = dscore k */
            for (int i = 0; i < blocks; i++) {
                int t0 = i * ATT_BLOCK, t1 = t0 + ATT_BLOCK < T ? t0 + ATT_BLOCK : T;
                smm_run(&da_plan[i], d + (size_t)t0 * C, vt, da + (size_t)t0 * T);
                for (int t = t0; t < t1; t++) {
                    const float *arow = a + (size_t)t * T;
                    float *drow = da + (size_t)t * T;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int t2 = 0; t2 <= t; t2++) dot += arow[t2] * drow[t2];
                    for (int t2 = 0; t2 <= t; t2++) drow[t2] = arow[t2] * (drow[t2] - dot) * scale;
                    for (int t2 = t + 1; t2 < t1; t2++) drow[t2] = 0.0f;
                }
                smm_run(&dq_plan[i], da + (size_t)t0 * T, k, dq + (size_t)t0 * C3);
            }
            /* by columns [j0, j1), which rows [j0, T) reach */
            for (int i = 0; i < blocks; i++) {
                int j0 = i * ATT_BLOCK;
                smm_run(&dv_plan[i], a + (size_t)j0 * T + j0, d + (size_t)j0 * C,
                        dv + (size_t)j0 * C3);
                smm_run(&dk_plan[i], da + (size_t)j0 * T + j0, q + (size_t)j0 * C3,
                        dk + (size_t)j0 * C3);
            }
        }
}

#define GELU_SCALE 0.7978845608028654f /* sqrt(2/pi) */

/* t = tanh(sqrt(2/pi) (x + 0.044715 x³)) over one chunk of n elements, as
** 1 - 2 / (e^{2u} + 1), which saturates cleanly at ±1 */
static void gelu_tanh(float *t, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) t[i] = 2.0f * GELU_SCALE * (x[i] + 0.044715f * x[i] * x[i] * x[i]);
    expf_inplace(t, (int)n);
    for (size_t i = 0; i < n; i++) t[i] = 1.0f - 2.0f / (t[i] + 1.0f);
}

void gelu_forward(float *out, const float *inp, size_t n) {
    size_t chunks = (n + ELEMWISE_CHUNK - 1) / ELEMWISE_CHUNK;
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < chunks; c++) {
        size_t lo = c * ELEMWISE_CHUNK, len = n - lo < ELEMWISE_CHUNK ? n - lo : ELEMWISE_CHUNK;
        const float *x = inp + lo;
        float t[ELEMWISE_CHUNK];
        gelu_tanh(t, x, len);
        for (size_t i = 0; i < len; i++) out[lo + i] = 0.5f * x[i] * (1.0f + t[i]);
    }
}

void gelu_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    size_t chunks = (n + ELEMWISE_CHUNK - 1) / ELEMWISE_CHUNK;
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < chunks; c++) {
        size_t lo = c * ELEMWISE_CHUNK, len = n - lo < ELEMWISE_CHUNK ? n - lo : ELEMWISE_CHUNK;
        const float *x = inp + lo;
        float t[ELEMWISE_CHUNK];
        gelu_tanh(t, x, len);
        for (size_t i = 0; i < len; i++) {
            float sech2 = 1.0f - t[i] * t[i];
            float local = 0.5f * (1.0f + t[i]) +
                          x[i] * 0.5f * sech2 * GELU_SCALE * (1.0f + 3.0f * 0.044715f * x[i] * x[i]);
            dinp[lo + i] = local * dout[lo + i];
        }
    }
}

void relu_forward(float *out, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = inp[i] > 0.0f ? inp[i] : 0.0f;
}

void relu_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) dinp[i] = inp[i] > 0.0f ? dout[i] : 0.0f;
}

/* sigmoid(g) = 1 / (1 + e^{-g}) */
void swiglu_forward(float *out, const float *gate, const float *fc, size_t n) {
    size_t chunks = (n + ELEMWISE_CHUNK - 1) / ELEMWISE_CHUNK;
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < chunks; c++) {
        size_t lo = c * ELEMWISE_CHUNK, len = n - lo < ELEMWISE_CHUNK ? n - lo : ELEMWISE_CHUNK;
        const float *g = gate + lo;
        float e[ELEMWISE_CHUNK];
        for (size_t i = 0; i < len; i++) e[i] = -g[i];
        expf_inplace(e, (int)len);
        for (size_t i = 0; i < len; i++) out[lo + i] = g[i] / (1.0f + e[i]) * fc[lo + i];
    }
}

void swiglu_backward(float *dgate, float *dfc, const float *dout, const float *gate,
                     const float *fc, size_t n) {
    size_t chunks = (n + ELEMWISE_CHUNK - 1) / ELEMWISE_CHUNK;
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < chunks; c++) {
        size_t lo = c * ELEMWISE_CHUNK, len = n - lo < ELEMWISE_CHUNK ? n - lo : ELEMWISE_CHUNK;
        const float *g = gate + lo;
        float e[ELEMWISE_CHUNK];
        for (size_t i = 0; i < len; i++) e[i] = -g[i];
        expf_inplace(e, (int)len);
        for (size_t i = 0; i < len; i++) {
            float sig = 1.0f / (1.0f + e[i]);
            float silu = g[i] * sig;
            dfc[lo + i] = dout[lo + i] * silu;
            dgate[lo + i] = dout[lo + i] * fc[lo + i] * sig * (1.0f + g[i] * (1.0f - sig));
        }
    }
}

float crossentropy_forward(float *losses, float *probs, const float *logits,
                           const int *targets, int N, int V) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *l = logits + (size_t)n * V;
        float *p = probs + (size_t)n * V;
        float maxv = -INFINITY;
#pragma omp simd reduction(max : maxv)
        for (int i = 0; i < V; i++) maxv = l[i] > maxv ? l[i] : maxv;
        for (int i = 0; i < V; i++) p[i] = l[i] - maxv;
        expf_inplace(p, V);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < V; i++) sum += p[i];
        float inv = 1.0f / sum;
        for (int i = 0; i < V; i++) p[i] *= inv;
        /* -log p[target] from the logits, accurate even when p underflows */
        if (targets) losses[n] = logf(sum) - (l[targets[n]] - maxv);
    }
    if (!targets) return 0.0f;
    double total = 0.0;
    for (int n = 0; n < N; n++) total += losses[n];
    return (float)(total / N);
}

void crossentropy_backward(float *dlogits, const float *probs, const int *targets,
                           float scale, int N, int V) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *p = probs + (size_t)n * V;
        float *d = dlogits + (size_t)n * V;
        for (int i = 0; i < V; i++) d[i] = p[i] * scale;
        d[targets[n]] -= scale;
    }
}

/* ------------------------------------------------------------------------ */
/* AdamW                                                                     */

void adamw_update(float *x, float *m, float *v, float *g, size_t n, const AdamwStep *s, float wd) {
    const float lr = s->lr, beta1 = s->beta1, beta2 = s->beta2, eps = s->eps;
    const float inv_bc1 = s->inv_bc1, inv_bc2 = s->inv_bc2;
    for (size_t j = 0; j < n; j++) {
        m[j] = beta1 * m[j] + (1.0f - beta1) * g[j];
        v[j] = beta2 * v[j] + (1.0f - beta2) * g[j] * g[j];
        float mhat = m[j] * inv_bc1, vhat = v[j] * inv_bc2;
        x[j] -= lr * (mhat / (sqrtf(vhat) + eps) + wd * x[j]);
        g[j] = 0.0f;
    }
}
