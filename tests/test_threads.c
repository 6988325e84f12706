/*
** test_threads.c — the same bits on any number of threads: matrix products,
** a whole forward pass (logits, loss, selections, weights) and whole training
** steps (parameters after AdamW) on 1, 2 and 3 threads. A recorded
** evaluation runs some batches on one thread fewer while its writer catches
** up (trainer.c), so it computes what an unrecorded one does only if this
** holds; and training is reproducible whatever the thread count.
**
** OpenBLAS and libxsmm pick their kernels by processor, so `make test` runs
** this program once as the environment has it and again under each
** OPENBLAS_CORETYPE that tests/run.sh is given (Haswell, the AVX2 kernels AMD
** machines use, and SkylakeX where the processor has AVX-512; with libxsmm's
** kernels of the same family), and once with libxsmm's JIT off; the first test
** checks that the kernels asked for are the ones running.
*/
#include "testmodel.h"

#include <ctype.h>
#include <omp.h>

#include "config.h"
#include "data.h"
#include "machine.h"
#include "model.h"
#include "ops.h"
#include "trainer.h"

char *openblas_get_corename(void);

static int same_name(const char *a, const char *b) {
    size_t n = strlen(a);
    int same = strlen(b) == n;
    for (size_t i = 0; same && i < n; i++)
        same = tolower((unsigned char)a[i]) == tolower((unsigned char)b[i]);
    return same;
}

static void test_kernels_as_asked(void **state) {
    (void)state;
    const char *want = getenv("OPENBLAS_CORETYPE"), *got = openblas_get_corename();
    const char *xwant = getenv("LIBXSMM_TARGET"), *xgot = machine_xsmm_target();
    print_message("OpenBLAS kernels: %s (OPENBLAS_CORETYPE %s); libxsmm kernels: %s "
                  "(LIBXSMM_TARGET %s)\n", got, want ? want : "unset", xgot,
                  xwant ? xwant : "unset");
    if (want && *want && !same_name(want, got))
        fail_msg("OPENBLAS_CORETYPE=%s but OpenBLAS runs %s", want, got);
    if (xwant && *xwant && !same_name(xwant, xgot))
        fail_msg("LIBXSMM_TARGET=%s but libxsmm runs %s", xwant, xgot);
}

/* ------------------------------------------------------------------------ */
/* matrix products                                                           */

enum { MN = 2000, MC = 96, MOC = 72 }; /* N not a multiple of the pieces' 16 rows */

typedef struct {
    float out[MN * MOC], dinp[MN * MC], dweight[MOC * MC], dbias[MOC];
} MatmulResult;

static float m_inp[MN * MC], m_w[MOC * MC], m_b[MOC], m_dout[MN * MOC];

static void matmul_on(int threads, MatmulResult *r, float *scratch) {
    test_fill(r->out, MN * MOC, 1.0f, 5); /* beta = 1 adds to these */
    test_fill(r->dinp, MN * MC, 1.0f, 6);
    test_fill(r->dweight, MOC * MC, 1.0f, 7);
    test_fill(r->dbias, MOC, 1.0f, 8);
    omp_set_num_threads(threads);
    matmul_forward(r->out, m_inp, m_w, m_b, MN, MC, MOC, 1.0f);
    matmul_backward(r->dinp, r->dweight, r->dbias, m_dout, m_inp, m_w, MN, MC, MOC, 1.0f, scratch);
    omp_set_num_threads(2);
}

/* The pieces add up to the product: against a double-precision loop. */
static void test_matmul_pieces_against_naive(void **state) {
    (void)state;
    test_fill(m_inp, MN * MC, 1.0f, 1);
    test_fill(m_w, MOC * MC, 1.0f, 2);
    test_fill(m_b, MOC, 1.0f, 3);
    test_fill(m_dout, MN * MOC, 1.0f, 4);
    size_t ns = matmul_backward_scratch(MN, MC, MOC);
    assert_true(ns > 0); /* the sum over N is cut into pieces */
    float *scratch = malloc(sizeof(float) * ns);
    MatmulResult *r = malloc(sizeof *r), *init = malloc(sizeof *init);
    assert_true(scratch && r && init);
    matmul_on(2, r, scratch);
    test_fill(init->out, MN * MOC, 1.0f, 5);
    test_fill(init->dinp, MN * MC, 1.0f, 6);
    test_fill(init->dweight, MOC * MC, 1.0f, 7);
    test_fill(init->dbias, MOC, 1.0f, 8);
    for (int n = 0; n < MN; n++)
        for (int o = 0; o < MOC; o++) {
            double s = init->out[n * MOC + o] + m_b[o];
            for (int c = 0; c < MC; c++) s += (double)m_inp[n * MC + c] * m_w[o * MC + c];
            if (!test_close(r->out[n * MOC + o], s, 1e-5, 1e-4)) fail_msg("out[%d,%d]", n, o);
        }
    for (int n = 0; n < MN; n++)
        for (int c = 0; c < MC; c++) {
            double s = init->dinp[n * MC + c];
            for (int o = 0; o < MOC; o++) s += (double)m_dout[n * MOC + o] * m_w[o * MC + c];
            if (!test_close(r->dinp[n * MC + c], s, 1e-5, 1e-4)) fail_msg("dinp[%d,%d]", n, c);
        }
    for (int o = 0; o < MOC; o++) {
        double sb = init->dbias[o];
        for (int n = 0; n < MN; n++) sb += m_dout[n * MOC + o];
        if (!test_close(r->dbias[o], sb, 1e-5, 1e-3)) fail_msg("dbias[%d]", o);
        for (int c = 0; c < MC; c++) {
            double s = init->dweight[o * MC + c];
            for (int n = 0; n < MN; n++) s += (double)m_dout[n * MOC + o] * m_inp[n * MC + c];
            if (!test_close(r->dweight[o * MC + c], s, 1e-5, 1e-3)) fail_msg("dweight[%d,%d]", o, c);
        }
    }
    free(scratch), free(r), free(init);
}

static void test_matmul_same_on_any_thread_count(void **state) {
    (void)state;
    size_t ns = matmul_backward_scratch(MN, MC, MOC);
    float *scratch = malloc(sizeof(float) * ns);
    MatmulResult *r1 = malloc(sizeof *r1), *r = malloc(sizeof *r);
    assert_true(scratch && r1 && r);
    matmul_on(1, r1, scratch);
    for (int threads = 2; threads <= 3; threads++) {
        matmul_on(threads, r, scratch);
        assert_memory_equal(r1, r, sizeof *r);
    }
    free(scratch), free(r1), free(r);
}

/* ------------------------------------------------------------------------ */
/* the forward pass                                                          */

/* A model for the thread-count test: small, with a threshold router, or at
** the size of the benchmarked evaluation (d 128, context 128, top-2). */
static ModelConfig thread_test_config(int big) {
    ModelConfig c = test_tiny_config();
    c.context = big ? 128 : 32;
    c.d_model = big ? 128 : 32;
    c.heads = big ? 4 : 2;
    c.seed = 11;
    c.moe.enabled = 1;
    c.moe.experts = big ? 8 : 6;
    for (int e = 0; e < c.moe.experts; e++) c.moe.hidden[e] = big ? 128 : 16 + 8 * (e % 3);
    c.moe.hidden_list = !big;
    c.moe.kind = big ? ROUTER_TOPK : ROUTER_THRESHOLD;
    c.moe.k = 2;
    c.moe.p = 0.7f;
    c.moe.sparsity_eps = 0.01f;
    return c;
}

/* Runs one forward pass of c on B sequences on `threads` threads and copies
** out the logits, the mean loss and every MoE layer's selections (experts
** ending with -1). */
static void forward_on(const ModelConfig *c, int B, int threads, float *logits, float *loss,
                       int *experts, float *weights, size_t slots) {
    char err[ML_ERRLEN];
    Model *m;
    if (model_create(&m, c, err) != 0) fail_msg("%s", err);
    int T = c->context, N = B * T;
    int *inputs = malloc(sizeof(int) * N), *targets = malloc(sizeof(int) * N);
    assert_true(inputs && targets);
    for (int i = 0; i < N; i++) {
        inputs[i] = (i * 37 + i / 7) % 256;
        targets[i] = (i * 11 + 3) % 256;
    }
    omp_set_num_threads(threads);
    int rc = model_forward(m, inputs, targets, B, T, err);
    trainer_set_threads(2);
    if (rc != 0) fail_msg("%s", err);
    memcpy(logits, m->acts.logits, sizeof(float) * N * 256);
    *loss = m->mean_loss;
    size_t k = 0;
    for (int l = 0; l < c->layers; l++) {
        const MoeState *st = &m->moe[l].tc;
        for (int t = 0; t < N; t++)
            for (int i = 0; i < st->sel_count[t]; i++) {
                assert_true(k < slots);
                experts[k] = st->sel_expert[(size_t)t * st->slots + i];
                weights[k++] = st->sel_weight[(size_t)t * st->slots + i];
            }
    }
    experts[k] = -1;
    free(inputs);
    free(targets);
    model_free(m);
}

/* The forward pass gives the same numbers, bit for bit, on one, two and
** three threads. */
static void test_forward_same_on_any_thread_count(void **state) {
    (void)state;
    for (int big = 0; big <= 1; big++) {
        ModelConfig c = thread_test_config(big);
        int B = big ? 16 : 5, N = B * c.context;
        size_t slots = (size_t)N * c.moe.experts * c.layers + 1;
        float *l1 = malloc(sizeof(float) * N * 256), *l2 = malloc(sizeof(float) * N * 256);
        int *e1 = malloc(sizeof(int) * slots), *e2 = malloc(sizeof(int) * slots);
        float *w1 = malloc(sizeof(float) * slots), *w2 = malloc(sizeof(float) * slots);
        float loss1, loss2;
        assert_true(l1 && l2 && e1 && e2 && w1 && w2);
        forward_on(&c, B, 1, l1, &loss1, e1, w1, slots);
        size_t n = 0;
        while (e1[n] >= 0) n++;
        assert_true(n >= (size_t)2 * N * c.layers);
        if (!big) assert_true(n > (size_t)2 * N * c.layers); /* the threshold took more */
        for (int threads = 2; threads <= 3; threads++) {
            forward_on(&c, B, threads, l2, &loss2, e2, w2, slots);
            assert_memory_equal(e1, e2, sizeof(int) * (n + 1));
            assert_memory_equal(w1, w2, sizeof(float) * n);
            assert_memory_equal(l1, l2, sizeof(float) * N * 256);
            assert_memory_equal(&loss1, &loss2, sizeof loss1);
        }
        free(l1), free(l2), free(e1), free(e2), free(w1), free(w2);
    }
}

/* ------------------------------------------------------------------------ */
/* training                                                                  */

/* Trains c for `steps` steps through trainer_train on `threads` threads and
** returns a copy of its parameters. */
static float *train_on(const ModelConfig *c, const Corpus *corpus, int steps, int batch,
                       int threads, size_t *n) {
    char err[ML_ERRLEN];
    Model *m;
    Trainer t;
    if (model_create(&m, c, err) != 0) fail_msg("%s", err);
    if (trainer_init(&t, m, (Corpus *)corpus, NULL, 0, "threads", 3, err) != 0) fail_msg("%s", err);
    TrainOptions o;
    train_options_defaults(&o);
    o.steps = steps;
    o.batch = batch;
    o.warmup = 1;
    o.clip = 1.0f;
    o.weight_decay = 0.1f;
    o.threads = threads;
    o.progress = 0;
    TrainResult res;
    int rc = trainer_train(&t, &o, &res, err);
    trainer_set_threads(2);
    if (rc != 0) fail_msg("%s", err);
    *n = m->num_parameters;
    float *p = malloc(sizeof(float) * *n);
    assert_non_null(p);
    memcpy(p, m->param_mem, sizeof(float) * *n);
    trainer_free(&t);
    model_free(m);
    return p;
}

/* Training steps give the same parameters, bit for bit, on one, two and
** three threads: a model of dense and MoE blocks (top-2, balance and z
** losses, GELU, layer norm, batch of 1024 tokens, so every product is cut
** into several pieces), a threshold model with SwiGLU, RMS norm and
** capacity, and a stratified model with Gumbel-sampled second choices. */
static void test_train_step_same_on_any_thread_count(void **state) {
    (void)state;
    char err[ML_ERRLEN];
    uint8_t text[1 << 16];
    for (size_t i = 0; i < sizeof text; i++) text[i] = (uint8_t)("In the beginning God "[i % 21] + i / 997 % 3);
    Corpus *corpus;
    assert_int_equal(corpus_from_bytes(&corpus, text, sizeof text, 0.9, err), 0);
    for (int kind = 0; kind < 3; kind++) {
        ModelConfig c = thread_test_config(kind >= 1);
        if (kind == 0) {
            c.activation = ACT_SWIGLU;
            c.norm = NORM_RMSNORM;
            c.moe.capacity_factor = 1.25f;
        } else if (kind == 2) { /* stratified, sampled second choices, capacity */
            c.moe.kind = ROUTER_STRATIFIED;
            c.moe.n_strata = 2;
            c.moe.strata[0] = c.moe.strata[1] = 4;
            c.moe.second_sample = 1;
            c.moe.capacity_factor = 1.0f;
            c.moe.aux_balance = 0.01f;
        } else {
            c.layers = 2;
            c.moe.every = 2;
            c.ffn_hidden = 256;
            c.moe.aux_balance = 0.01f;
            c.moe.aux_z = 0.001f;
        }
        int batch = kind >= 1 ? 8 : 4, steps = 3;
        size_t n1, n;
        float *p1 = train_on(&c, corpus, steps, batch, 1, &n1);
        for (int threads = 2; threads <= 3; threads++) {
            float *p = train_on(&c, corpus, steps, batch, threads, &n);
            assert_int_equal(n, n1);
            assert_memory_equal(p1, p, sizeof(float) * n);
            free(p);
        }
        free(p1);
    }
    corpus_free(corpus);
}

/* OpenBLAS single-threaded inside our threads, as the Lua module sets it */
static int setup_threads(void **state) {
    (void)state;
    trainer_set_threads(2);
    return 0;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kernels_as_asked),
        cmocka_unit_test(test_matmul_pieces_against_naive),
        cmocka_unit_test(test_matmul_same_on_any_thread_count),
        cmocka_unit_test(test_forward_same_on_any_thread_count),
        cmocka_unit_test(test_train_step_same_on_any_thread_count),
    };
    return cmocka_run_group_tests_name("threads", tests, setup_threads, NULL);
}
