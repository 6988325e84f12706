/*
** testmodel.h — what the model tests share (test_train.c, test_moe.c,
** test_threads.c): a tiny configuration and the checkpoint round trip.
*/
#ifndef MOELAB_TESTMODEL_H
#define MOELAB_TESTMODEL_H

#include <unistd.h>

#include "checkpoint.h"
#include "model.h"
#include "testutil.h"

/* A tiny dense model: 2 layers of width 16, context 16, hidden 32. */
static inline ModelConfig test_tiny_config(void) {
    ModelConfig c;
    config_defaults(&c);
    c.vocab = 256;
    c.context = 16;
    c.layers = 2;
    c.d_model = 16;
    c.heads = 2;
    c.ffn_hidden = 32;
    return c;
}

/* Saves m to a temporary file and loads it back: the same tensors, bit for
** bit, the same configuration, and the same loss on text (17 bytes). */
static inline void test_save_load_same(Model *m, const char *text) {
    Model *back;
    char err[ML_ERRLEN], dir[] = "/tmp/moelab_ckpt_XXXXXX", path[256];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    if (checkpoint_save(m, path, err) != 0) fail_msg("%s", err);
    if (checkpoint_load(&back, path, 0, err) != 0) fail_msg("%s", err);
    assert_int_equal(back->num_parameters, m->num_parameters);
    assert_int_equal(back->n_params, m->n_params);
    assert_memory_equal(back->param_mem, m->param_mem, sizeof(float) * m->num_parameters);
    assert_memory_equal(&back->config, &m->config, sizeof(ModelConfig));
    int tokens[17];
    for (int i = 0; i < 17; i++) tokens[i] = (unsigned char)text[i];
    float a, b;
    assert_int_equal(model_sequence_loss(m, tokens, 17, &a, err), 0);
    assert_int_equal(model_sequence_loss(back, tokens, 17, &b, err), 0);
    assert_true(a == b);
    model_free(back);
    unlink(path);
    rmdir(dir);
}

#endif
