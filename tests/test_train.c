/*
** test_train.c — training as a whole: AdamW against a hand computation, the
** learning-rate schedule, checkpoints round trip bit for bit, the same seed
** gives the same losses bit for bit, and a tiny model memorises a short
** text. (The same bits on any number of threads: test_threads.c.)
*/
#include "testmodel.h"

#include <omp.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <gsl/gsl_rng.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "checkpoint.h"
#include "data.h"
#include "model.h"
#include "recorder.h"
#include "safetensors.h"
#include "trainer.h"

static void test_adamw_by_hand(void **state) {
    (void)state;
    ModelConfig c = test_tiny_config();
    Model *m;
    char err[ML_ERRLEN];
    assert_int_equal(model_create(&m, &c, err), 0);
    int tokens[17];
    for (int i = 0; i < 17; i++) tokens[i] = 'a' + i;
    float loss;
    assert_int_equal(model_sequence_loss(m, tokens, 17, &loss, err), 0);
    assert_int_equal(model_backward(m, err), 0); /* allocates the gradient arena */

    const float lr = 0.01f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f;
    size_t n = m->num_parameters;
    double *p = malloc(sizeof(double) * n), *mm = calloc(n, sizeof(double)),
           *vv = calloc(n, sizeof(double));
    for (size_t i = 0; i < n; i++) p[i] = m->param_mem[i];
    for (int t = 1; t <= 3; t++) {
        test_fill(m->grad_mem, n, 0.5f, 40 + t);
        for (int k = 0; k < m->n_params; k++) {
            const ParamInfo *info = &m->params[k];
            double decay = info->ndim == 2 ? wd : 0.0;
            for (size_t j = info->offset; j < info->offset + info->numel; j++) {
                double g = m->grad_mem[j];
                mm[j] = b1 * mm[j] + (1 - b1) * g;
                vv[j] = b2 * vv[j] + (1 - b2) * g * g;
                double mhat = mm[j] / (1 - pow(b1, t)), vhat = vv[j] / (1 - pow(b2, t));
                p[j] -= lr * (mhat / (sqrt(vhat) + eps) + decay * p[j]);
            }
        }
        assert_int_equal(model_adamw_step(m, lr, b1, b2, eps, wd, err), 0);
    }
    for (size_t i = 0; i < n; i++)
        if (!test_close(m->param_mem[i], p[i], 1e-5, 1e-6))
            fail_msg("parameter %zu: AdamW %.8g, by hand %.8g", i, (double)m->param_mem[i], p[i]);
    /* a bias saw no weight decay: with zero gradients it would not move at all */
    int bias = model_find_param(m, "h.0.attn.qkv.bias");
    assert_true(bias >= 0);
    assert_int_equal(m->params[bias].decay, 0);
    assert_int_equal(m->params[model_find_param(m, "h.0.attn.qkv.weight")].decay, 1);
    free(p);
    free(mm);
    free(vv);
    model_free(m);
}

/* Three steps of c (B sequences of T tokens) on `threads` threads: with
** AdamW fused into the backward pass (model_backward_adamw) or not; params
** gets the parameters after them. Returns whether the backward updated the
** experts itself; the gradients are zero after each step either way. */
static int train_three_steps(const ModelConfig *c, int B, int T, int fused, int threads,
                             float *params) {
    Model *m;
    char err[ML_ERRLEN];
    if (model_create(&m, c, err) != 0) fail_msg("%s", err);
    int *inputs = malloc(sizeof(int) * B * T), *targets = malloc(sizeof(int) * B * T);
    assert_true(inputs && targets);
    omp_set_num_threads(threads);
    AdamwOptions o = {0.01f, 0.9f, 0.95f, 1e-8f, 0.1f};
    int updated = 0;
    for (int step = 0; step < 3; step++) {
        for (int i = 0; i < B * T; i++) {
            inputs[i] = (i * 37 + step * 11) % 256;
            targets[i] = (i * 13 + step * 5 + 1) % 256;
        }
        m->training = 1;
        if (model_forward(m, inputs, targets, B, T, err) != 0) fail_msg("%s", err);
        m->training = 0;
        if ((fused ? model_backward_adamw(m, &o, err) : model_backward(m, err)) != 0)
            fail_msg("%s", err);
        updated = m->experts_updated;
        if (model_adamw_step(m, o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, err) != 0)
            fail_msg("%s", err);
        for (size_t i = 0; i < m->num_parameters; i++)
            if (m->grad_mem[i] != 0.0f) fail_msg("gradient %zu not zero after the step", i);
    }
    trainer_set_threads(2);
    memcpy(params, m->param_mem, sizeof(float) * m->num_parameters);
    model_free(m);
    free(inputs);
    free(targets);
    return updated;
}

/* AdamW fused into the backward pass gives the same bits as after it, on
** any number of threads: GELU experts of which most get no rows (16 experts,
** 8 assignments), SwiGLU experts with RMSNorm and a dense block; stratified
** layers leave their experts to model_adamw_step. */
static void test_adamw_fused(void **state) {
    (void)state;
    for (int kind = 0; kind < 3; kind++) {
        ModelConfig c = test_tiny_config();
        c.moe.enabled = 1;
        c.moe.every = 1;
        c.moe.experts = 16;
        for (int e = 0; e < 16; e++) c.moe.hidden[e] = 8 + 8 * (e % 2);
        c.moe.hidden_list = 1;
        c.moe.kind = ROUTER_TOPK;
        c.moe.k = 2;
        c.moe.aux_balance = 0.01f;
        c.moe.sparsity_eps = 0.01f;
        int B = 1, T = 4;
        if (kind == 1) {
            c.activation = ACT_SWIGLU;
            c.norm = NORM_RMSNORM;
            c.moe.every = 2;
            c.moe.k = 1;
            B = 2, T = 16;
        }
        if (kind == 2) {
            c.moe.experts = 4;
            c.moe.kind = ROUTER_STRATIFIED;
            c.moe.n_strata = 2;
            c.moe.strata[0] = c.moe.strata[1] = 2;
            B = 2, T = 16;
        }
        Model *plan;
        char err[ML_ERRLEN];
        if (model_plan(&plan, &c, err) != 0) fail_msg("%s", err);
        size_t n = plan->num_parameters;
        model_free(plan);
        float *plain = malloc(sizeof(float) * n), *fused = malloc(sizeof(float) * n);
        assert_true(plain && fused);
        assert_int_equal(train_three_steps(&c, B, T, 0, 2, plain), 0);
        for (int threads = 1; threads <= 3; threads++) {
            assert_int_equal(train_three_steps(&c, B, T, 1, threads, fused), kind != 2);
            assert_memory_equal(plain, fused, sizeof(float) * n);
        }
        free(plain);
        free(fused);
    }
}

static void test_lr_schedule(void **state) {
    (void)state;
    TrainOptions o;
    train_options_defaults(&o);
    o.steps = 100;
    o.warmup = 10;
    o.lr = 1.0f;
    o.min_lr = 0.0f;
    assert_true(test_close(trainer_lr(&o, 0), 0.1, 1e-6, 0));
    assert_true(test_close(trainer_lr(&o, 9), 1.0, 1e-6, 0));
    assert_true(test_close(trainer_lr(&o, 10), 1.0, 1e-6, 0));
    assert_true(test_close(trainer_lr(&o, 55), 0.5, 1e-6, 0)); /* half way down the cosine */
    assert_true(trainer_lr(&o, 99) < 0.001f && trainer_lr(&o, 99) > 0.0f);
    for (int s = 11; s < 100; s++) assert_true(trainer_lr(&o, s) <= trainer_lr(&o, s - 1));
}

static void roundtrip(NormKind norm, ActKind act, int tied) {
    ModelConfig c = test_tiny_config();
    c.norm = norm;
    c.activation = act;
    c.tied = tied;
    c.seed = 7;
    Model *m;
    char err[ML_ERRLEN];
    assert_int_equal(model_create(&m, &c, err), 0);
    test_fill(m->param_mem, m->num_parameters, 0.3f, 99); /* every tensor non-trivial */
    test_save_load_same(m, "In the beginningI");
    model_free(m);
}

static void test_checkpoint_roundtrip(void **state) {
    (void)state;
    roundtrip(NORM_LAYERNORM, ACT_GELU, 0);
    roundtrip(NORM_RMSNORM, ACT_SWIGLU, 1);
    roundtrip(NORM_LAYERNORM, ACT_RELU, 1);
}

static void test_checkpoint_names(void **state) {
    /* the SPEC §4 names and nn.Linear shapes (out × in) */
    (void)state;
    ModelConfig c = test_tiny_config();
    c.activation = ACT_SWIGLU;
    Model *m;
    char err[ML_ERRLEN];
    assert_int_equal(model_create(&m, &c, err), 0);
    struct { const char *name; int d0, d1; } want[] = {
        {"wte.weight", 256, 16},          {"wpe.weight", 16, 16},
        {"h.0.ln_1.weight", 16, 0},       {"h.0.ln_1.bias", 16, 0},
        {"h.0.attn.qkv.weight", 48, 16},  {"h.0.attn.qkv.bias", 48, 0},
        {"h.0.attn.proj.weight", 16, 16}, {"h.0.attn.proj.bias", 16, 0},
        {"h.1.ln_2.weight", 16, 0},       {"h.1.mlp.fc.weight", 32, 16},
        {"h.1.mlp.fc.bias", 32, 0},       {"h.1.mlp.gate.weight", 32, 16},
        {"h.1.mlp.proj.weight", 16, 32},  {"h.1.mlp.proj.bias", 16, 0},
        {"ln_f.weight", 16, 0},           {"ln_f.bias", 16, 0},
        {"lm_head.weight", 256, 16},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        int k = model_find_param(m, want[i].name);
        if (k < 0) fail_msg("no tensor %s", want[i].name);
        assert_int_equal(m->params[k].shape[0], want[i].d0);
        assert_int_equal(m->params[k].shape[1], want[i].d1);
    }
    assert_int_equal(model_find_param(m, "h.0.mlp.gate.bias"), -1);
    model_free(m);
}

/* Loads path in a child process: its exit status says whether the load
** failed with a message containing want, and *peak_mb its peak memory. */
static int load_in_child(const char *path, const char *want, long *peak_mb) {
    pid_t pid = fork();
    if (pid == 0) {
        Model *m;
        char err[ML_ERRLEN] = "";
        int rc = checkpoint_load(&m, path, 0, err);
        _exit(rc == -1 && strstr(err, want) ? 0 : (fprintf(stderr, "load: %s\n", err), 1));
    }
    int status;
    struct rusage ru;
    if (wait4(pid, &status, 0, &ru) != pid) return -1;
    *peak_mb = ru.ru_maxrss / 1024;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* A file of a few hundred bytes whose configuration claims a model of 4 GB:
** refused for its missing tensors before anything of that size is
** allocated (it used to allocate and initialise the model first, 100 s). */
static void test_checkpoint_checked_before_allocation(void **state) {
    (void)state;
    char dir[] = "/tmp/moelab_hostile_XXXXXX", path[256], err[ML_ERRLEN];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/huge.safetensors", dir);
    const char *keys[] = {"moelab_config"};
    const char *values[] = {"{\"vocab\":4194304,\"d_model\":256,\"heads\":1,\"layers\":1,"
                            "\"context\":16,\"tied\":false}"};
    if (st_save(path, NULL, 0, keys, values, 1, err) != 0) fail_msg("%s", err);
    long peak_mb = 0;
    assert_int_equal(load_in_child(path, "has no tensor 'wte.weight'", &peak_mb), 0);
    if (peak_mb > 512) fail_msg("loading a 200-byte file took %ld MB", peak_mb);
    unlink(path);
    rmdir(dir);
}

/* A model, or a checkpoint, or a batch larger than the memory allowed is
** refused with the estimate; MOELAB_MAX_MEMORY stands in for a small machine. */
static void test_memory_estimate_refused(void **state) {
    (void)state;
    ModelConfig c = test_tiny_config();
    Model *m, *back;
    char err[ML_ERRLEN], dir[] = "/tmp/moelab_mem_XXXXXX", path[256];
    assert_int_equal(model_create(&m, &c, err), 0);
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    if (checkpoint_save(m, path, err) != 0) fail_msg("%s", err);
    size_t need = model_memory_bytes(m, 4, 1);
    assert_true(need > m->num_parameters * 4 * sizeof(float));
    setenv("MOELAB_MAX_MEMORY", "16K", 1); /* less than the parameters need */
    assert_int_equal(model_create(&back, &c, err), -1);
    assert_non_null(strstr(err, "would need about"));
    assert_int_equal(checkpoint_load(&back, path, 0, err), -1);
    assert_non_null(strstr(err, "m.safetensors"));
    assert_non_null(strstr(err, "GiB"));
    setenv("MOELAB_MAX_MEMORY", "2M", 1); /* the model, not a batch of 64 */
    assert_int_equal(model_check_batch(m, 1, 16, 0, err), 0);
    assert_int_equal(model_check_batch(m, 64, 16, 1, err), -1);
    assert_non_null(strstr(err, "a batch of 64 sequences of 16 tokens"));
    int tokens[64 * 16] = {0};
    assert_int_equal(model_forward(m, tokens, tokens, 64, 16, err), -1);
    unsetenv("MOELAB_MAX_MEMORY");
    assert_int_equal(model_check_batch(m, 64, 16, 1, err), 0);
    /* a batch whose token count passes an int's range is refused, not overflowed */
    assert_int_equal(model_check_batch(m, 1 << 20, 16, 0, err), -1);
    assert_non_null(strstr(err, "16777216 tokens"));
    assert_int_equal(model_forward(m, tokens, NULL, 1 << 28, 16, err), -1);
    model_free(m);
    unlink(path);
    rmdir(dir);
}

/* Trains a fresh model for `steps` on a synthetic corpus, recording into an
** in-memory database, and returns the recorded training losses. */
static void train_losses(int steps, double *losses) {
    ModelConfig c = test_tiny_config();
    c.seed = 5;
    char err[ML_ERRLEN], text[4096];
    for (size_t i = 0; i < sizeof text; i++) text[i] = "abcdefghij klmnop"[(i * 7 + i / 13) % 17];
    Corpus *corpus;
    Model *m;
    Recorder *rec;
    Trainer t;
    int64_t run_id;
    assert_int_equal(corpus_from_bytes(&corpus, (const uint8_t *)text, sizeof text, 0.9, err), 0);
    assert_int_equal(model_create(&m, &c, err), 0);
    assert_int_equal(rec_open(&rec, ":memory:", err), 0);
    assert_int_equal(rec_run_begin(rec, "det", NULL, NULL, 5, 0, 0, 1, &run_id, err), 0);
    assert_int_equal(trainer_init(&t, m, corpus, rec, run_id, "det", 5, err), 0);
    TrainOptions o;
    train_options_defaults(&o);
    o.steps = steps;
    o.batch = 4;
    o.warmup = 2;
    o.progress = 0;
    o.eval_batches = 2;
    TrainResult res;
    if (trainer_train(&t, &o, &res, err) != 0) fail_msg("%s", err);
    assert_string_equal(res.status, "finished");
    sqlite3_stmt *st;
    assert_int_equal(sqlite3_prepare_v2(rec_db(rec),
        "SELECT loss FROM metrics WHERE split = 'train' ORDER BY step", -1, &st, NULL), SQLITE_OK);
    int n = 0;
    while (sqlite3_step(st) == SQLITE_ROW) losses[n++] = sqlite3_column_double(st, 0);
    sqlite3_finalize(st);
    assert_int_equal(n, steps);
    trainer_free(&t);
    rec_close(rec);
    model_free(m);
    corpus_free(corpus);
}

static void test_determinism(void **state) {
    (void)state;
    double a[12], b[12];
    trainer_set_threads(2);
    train_losses(12, a);
    train_losses(12, b);
    for (int i = 0; i < 12; i++)
        if (memcmp(&a[i], &b[i], sizeof(double)) != 0)
            fail_msg("step %d: %.17g vs %.17g", i + 1, a[i], b[i]);
    assert_true(a[11] < a[0]); /* and it learns */
}

static void test_memorise(void **state) {
    /* a short text, repeated: a tiny model learns it by heart */
    (void)state;
    const char *line = "In the beginning God created the heaven and the earth. ";
    char text[2048];
    size_t len = strlen(line);
    for (size_t i = 0; i < sizeof text; i++) text[i] = line[i % len];
    ModelConfig c = test_tiny_config();
    c.context = 32;
    c.d_model = 32;
    c.heads = 4;
    c.ffn_hidden = 64;
    char err[ML_ERRLEN];
    Corpus *corpus;
    Model *m;
    Trainer t;
    assert_int_equal(corpus_from_bytes(&corpus, (const uint8_t *)text, sizeof text, 0.9, err), 0);
    assert_int_equal(model_create(&m, &c, err), 0);
    assert_int_equal(trainer_init(&t, m, corpus, NULL, 0, "memorise", 1, err), 0);
    TrainOptions o;
    train_options_defaults(&o);
    o.steps = 400;
    o.batch = 8;
    o.lr = 1e-2f;
    o.warmup = 20;
    o.progress = 0;
    TrainResult res;
    if (trainer_train(&t, &o, &res, err) != 0) fail_msg("%s", err);
    /* the validation split is the same text: near-zero loss there too */
    if (!(res.val_loss < 0.1)) fail_msg("validation loss %.4f after memorising", res.val_loss);
    /* and greedy sampling reproduces the text */
    int prompt[8], out[8 + 40];
    for (int i = 0; i < 8; i++) prompt[i] = (unsigned char)line[i];
    assert_int_equal(model_sample(m, prompt, 8, 40, 0.0f, 0, 1, out, err), 0);
    for (int i = 0; i < 48; i++) assert_int_equal(out[i], (unsigned char)line[i % len]);
    trainer_free(&t);
    model_free(m);
    corpus_free(corpus);
}

/* trainer_evaluate's options, as a C caller may pass them: each bad one named
** with its value. */
static void test_evaluate_options(void **state) {
    (void)state;
    char text[512], err[ML_ERRLEN];
    for (size_t i = 0; i < sizeof text; i++) text[i] = (char)('a' + i % 7);
    ModelConfig c = test_tiny_config();
    Corpus *corpus;
    Model *m;
    Trainer t;
    assert_int_equal(corpus_from_bytes(&corpus, (const uint8_t *)text, sizeof text, 0.5, err), 0);
    assert_int_equal(model_create(&m, &c, err), 0);
    assert_int_equal(trainer_init(&t, m, corpus, NULL, 0, "options", 1, err), 0);
    EvalOptions o;
    EvalResult res;
    eval_options_defaults(&o);
    o.batch = 0;
    assert_int_equal(trainer_evaluate(&t, &o, &res, err), -1);
    if (!strstr(err, "evaluate: batch must be at least 1, got 0")) fail_msg("%s", err);
    eval_options_defaults(&o);
    o.batches = -3;
    assert_int_equal(trainer_evaluate(&t, &o, &res, err), -1);
    if (!strstr(err, "evaluate: batches must be at least 1, got -3")) fail_msg("%s", err);
    trainer_free(&t);
    model_free(m);
    corpus_free(corpus);
}

/* eval_every asks for evaluations during training, which need a window of
** the validation split: without one they were skipped, no validation curve
** and val_loss NaN, without a word. A validation split too short (or none,
** split = 1) still trains without evaluations when none is asked for. */
static void test_train_eval_every_needs_val_window(void **state) {
    (void)state;
    char text[160], err[ML_ERRLEN];
    for (size_t i = 0; i < sizeof text; i++) text[i] = (char)('a' + i % 7);
    ModelConfig c = test_tiny_config(); /* context 16 */
    Corpus *tiny_val, *no_val;
    Model *m;
    Trainer t;
    /* 152 bytes train, 8 validate: fewer than context + 1 */
    assert_int_equal(corpus_from_bytes(&tiny_val, (const uint8_t *)text, sizeof text, 0.95, err), 0);
    assert_int_equal(corpus_from_bytes(&no_val, (const uint8_t *)text, sizeof text, 1.0, err), 0);
    assert_int_equal(model_create(&m, &c, err), 0);
    TrainOptions o;
    TrainResult res;
    train_options_defaults(&o);
    o.steps = 2;
    o.batch = 2;
    o.progress = 0;
    o.eval_every = 1;
    assert_int_equal(trainer_init(&t, m, tiny_val, NULL, 0, "tiny val", 1, err), 0);
    assert_int_equal(trainer_train(&t, &o, &res, err), -1);
    if (!strstr(err, "train: eval_every: context 16 is longer than the corpus's val split (8 bytes)"))
        fail_msg("%s", err);
    assert_int_equal(res.steps, 0); /* refused before any step */
    o.eval_every = 0; /* none asked for: it trains without */
    if (trainer_train(&t, &o, &res, err) != 0) fail_msg("%s", err);
    assert_true(isnan(res.val_loss));
    trainer_free(&t);
    assert_int_equal(trainer_init(&t, m, no_val, NULL, 0, "no val", 1, err), 0);
    if (trainer_train(&t, &o, &res, err) != 0) fail_msg("%s", err);
    assert_true(isnan(res.val_loss));
    o.eval_every = 1;
    assert_int_equal(trainer_train(&t, &o, &res, err), -1);
    if (!strstr(err, "train: eval_every: context 16 is longer than the corpus's val split (0 bytes)"))
        fail_msg("%s", err);
    o.eval_batches = 0; /* no evaluations at all: eval_every says nothing */
    if (trainer_train(&t, &o, &res, err) != 0) fail_msg("%s", err);
    trainer_free(&t);
    model_free(m);
    corpus_free(tiny_val);
    corpus_free(no_val);
}

/* The corpus digest (the ranks compare it, lmoelab.c) tells apart corpora
** that differ only in the top bit of two 8-byte words (bytes 7 and 15: 'a'
** against 0xE1, á in Latin-1): a word-wise FNV-1a step moves differences up
** only, so two in bit 63 cancelled and the corpora were taken for one. */
static void test_corpus_digest_top_bits(void **state) {
    (void)state;
    uint8_t a[16], b[16];
    memset(a, 'a', sizeof a);
    memcpy(b, a, sizeof b);
    b[7] ^= 0x80;
    b[15] ^= 0x80;
    Corpus *ca = NULL, *cb = NULL;
    char err[ML_ERRLEN];
    assert_int_equal(corpus_from_bytes(&ca, a, sizeof a, 1.0, err), 0);
    assert_int_equal(corpus_from_bytes(&cb, b, sizeof b, 1.0, err), 0);
    assert_true(ca->digest != cb->digest);
    b[7] ^= 0x80; /* one top bit: told apart before too */
    assert_true(ml_digest(a, sizeof a, ML_DIGEST_START) != ml_digest(b, sizeof b, ML_DIGEST_START));
    corpus_free(ca);
    corpus_free(cb);
}

/* A split of more than 2^32 − 1 windows (a corpus of over 4 GiB): its
** offsets were drawn by gsl_rng_uniform_int, which takes at most 2^32 − 1,
** and GSL's error handler aborted the process at the first batch. Untouched
** pages of an anonymous mapping read as zeros and take no memory: only the
** 64 MiB past 2^32 are written, each byte its position's low bits + 1. */
static void test_corpus_batch_beyond_32_bits(void **state) {
    (void)state;
    size_t low = (size_t)1 << 32, high = (size_t)1 << 26, n = low + high;
    uint8_t *bytes = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                          -1, 0);
    if (bytes == MAP_FAILED) skip();
    for (size_t i = low; i < n; i++) bytes[i] = (uint8_t)(1 + i % 251);
    Corpus c = {.bytes = bytes, .n = n, .n_train = n, .split = 1.0};
    enum { B = 1024, T = 2 };
    static int inputs[B * T], targets[B * T];
    gsl_rng *rng = gsl_rng_alloc(gsl_rng_mt19937);
    gsl_rng_set(rng, 1);
    corpus_batch(&c, SPLIT_TRAIN, rng, B, T, inputs, targets);
    gsl_rng_free(rng);
    int beyond = 0; /* rows drawn past 2^32: about B / 65 */
    for (int b = 0; b < B; b++) {
        const int *in = inputs + b * T, *tg = targets + b * T;
        assert_int_equal(tg[0], in[1]); /* targets: the next bytes */
        if (in[0] == 0) continue;
        beyond++;
        assert_int_equal(tg[T - 1], 1 + (in[T - 1] - 1 + 1) % 251);
    }
    if (beyond < 4) fail_msg("%d rows of %d past 2^32", beyond, B);
    munmap(bytes, n);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_adamw_by_hand),
        cmocka_unit_test(test_adamw_fused),
        cmocka_unit_test(test_lr_schedule),
        cmocka_unit_test(test_checkpoint_roundtrip),
        cmocka_unit_test(test_checkpoint_names),
        cmocka_unit_test(test_checkpoint_checked_before_allocation),
        cmocka_unit_test(test_memory_estimate_refused),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_memorise),
        cmocka_unit_test(test_evaluate_options),
        cmocka_unit_test(test_train_eval_every_needs_val_window),
        cmocka_unit_test(test_corpus_batch_beyond_32_bits),
        cmocka_unit_test(test_corpus_digest_top_bits),
    };
    return cmocka_run_group_tests_name("training", tests, NULL, NULL);
}
