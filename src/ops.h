/*
** ops.h — the transformer's kernels, forward and backward.
**
** Each op is a pair `op_forward` / `op_backward`, outputs first, dimensions
** last, in the manner of llm.c. Activations are row-major: N = B·T rows of C
** features. Backward kernels ACCUMULATE (+=) into parameter gradients, and
** into input gradients only where the comment says so; elsewhere they write.
** Nothing here allocates, and nothing here knows about Lua or SQLite.
*/
#ifndef MOELAB_OPS_H
#define MOELAB_OPS_H

#include <stddef.h>

/* x[i] = e^x[i] and x[i] = log x[i] over n floats, in place, by SLEEF's
** vector functions (1 ulp); each result depends on its value alone. */
void expf_inplace(float *x, int n);
void logf_inplace(float *x, int n);

/* out (B,T,C) = wte[inp] + wpe[t] */
void encoder_forward(float *out, const int *inp, const float *wte, const float *wpe,
                     int B, int T, int C);
/* dwte, dwpe += scatter of dout (B,T,C) */
void encoder_backward(float *dwte, float *dwpe, const float *dout, const int *inp,
                      int B, int T, int C);

/* LayerNorm over the last dim: out (N,C), mean/rstd (N) saved for backward */
void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                       const float *weight, const float *bias, int N, int C, float eps);
/* dinp += ..., dweight += ..., dbias += ... */
void layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, const float *mean,
                        const float *rstd, int N, int C);

/* RMSNorm: out = inp · rsqrt(mean(inp²) + eps) · weight; no bias */
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight,
                     int N, int C, float eps);
/* dinp += ..., dweight += ... */
void rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                      const float *weight, const float *rstd, int N, int C);

/* out (N,OC) = beta·out + inp (N,C) · weight (OC,C)ᵀ + bias (OC, may be NULL).
** beta = 0 overwrites out, beta = 1 adds to it (used for residual adds). */
void matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
                    int N, int C, int OC, float beta);
/* dinp (N,C) = dinp_beta·dinp + dout · weight  (dinp may be NULL: skipped);
** dweight (OC,C) += doutᵀ · inp; dbias (OC) += column sums of dout (may be NULL).
** scratch holds matmul_backward_scratch(N, C, OC) floats (NULL when that is 0):
** the sum over N is cut into pieces whose partial products are added in order. */
void matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                     const float *inp, const float *weight, int N, int C, int OC,
                     float dinp_beta, float *scratch);
/* Floats of scratch that matmul_backward needs for N rows; grows with N. */
size_t matmul_backward_scratch(int N, int C, int OC);

/* Causal multi-head attention.
** qkv (B,T,3C) holds q, k, v in that order along the last dim; head h uses the
** features h·hs .. (h+1)·hs of each. att (B,NH,T,T) keeps the softmax
** probabilities (below and on the diagonal; zero from the diagonal to the end
** of its block of 32 rows, and whatever was there further right); out (B,T,C).
** Scaled by 1/sqrt(hs). scratch holds attention_scratch(B, T, C) floats (each
** head's keys, transposed). */
void attention_forward(float *out, float *att, const float *qkv, int B, int T, int C, int NH,
                       float *scratch);
/* The FLOPs of attention_forward's products (the backward's are twice these):
** the scores it computes, by blocks of rows, and their weighted sum. */
double attention_flops(int B, int T, int C);
/* dqkv (B,T,3C) is overwritten; datt (B,NH,T,T) is scratch, and so is scratch
** (attention_scratch(B, T, C) floats: each head's values, transposed). */
void attention_backward(float *dqkv, float *datt, const float *dout, const float *qkv, const float *att,
                        int B, int T, int C, int NH, float *scratch);
/* Floats of scratch that attention_forward and _backward need. */
size_t attention_scratch(int B, int T, int C);

/* GELU, tanh form (as GPT-2). dinp is overwritten. */
void gelu_forward(float *out, const float *inp, size_t n);
void gelu_backward(float *dinp, const float *dout, const float *inp, size_t n);
void relu_forward(float *out, const float *inp, size_t n);
void relu_backward(float *dinp, const float *dout, const float *inp, size_t n);
/* SwiGLU: out = silu(gate) ⊙ fc. dgate and dfc are overwritten. */
void swiglu_forward(float *out, const float *gate, const float *fc, size_t n);
void swiglu_backward(float *dgate, float *dfc, const float *dout, const float *gate,
                     const float *fc, size_t n);

/* AdamW: one step's factors, the bias corrections as factors (mhat =
** m · inv_bc1, sqrt(vhat) = sqrt(v · inv_bc2)). */
typedef struct { float lr, beta1, beta2, eps, inv_bc1, inv_bc2; } AdamwStep;
/* One AdamW update of n parameters x from their gradients g, which are zeroed
** once consumed, and moments m, v; wd the weight decay. Serial (the callers
** share tensors out over threads); each element's arithmetic is its own, so
** any cut gives the same bits. */
void adamw_update(float *x, float *m, float *v, float *g, size_t n, const AdamwStep *s, float wd);

/* Softmax cross-entropy over V classes: probs (N,V), not aliasing logits;
** losses (N); targets may be NULL (probabilities only, returns 0). Returns the mean loss over the N rows. */
float crossentropy_forward(float *losses, float *probs, const float *logits,
                           const int *targets, int N, int V);
/* dlogits (N,V) = (probs - onehot(target)) · scale; overwritten. */
void crossentropy_backward(float *dlogits, const float *probs, const int *targets,
                           float scale, int N, int V);

#endif
