/*
** checkpoint.c — model checkpoints as safetensors (checkpoint.h).
*/
#include "checkpoint.h"

#include <stdlib.h>
#include <string.h>

#include "safetensors.h"

int checkpoint_save(const Model *m, const char *path, char *err) {
    StTensor *ts = calloc((size_t)m->n_params, sizeof *ts);
    char *config = config_to_json(&m->config);
    if (!ts || !config) {
        free(ts);
        free(config);
        return ml_error(err, "out of memory saving '%s'", path);
    }
    for (int i = 0; i < m->n_params; i++) {
        const ParamInfo *p = &m->params[i];
        ts[i].name = p->name;
        ts[i].ndim = p->ndim;
        ts[i].shape[0] = p->shape[0];
        ts[i].shape[1] = p->shape[1];
        ts[i].data = m->param_mem + p->offset;
    }
    const char *keys[] = {"moelab_config", "format"};
    const char *values[] = {config, "pt"};
    int rc = st_save(path, ts, m->n_params, keys, values, 2, err);
    free(ts);
    free(config);
    return rc;
}

int checkpoint_load(Model **out, const char *path, char *err) {
    *out = NULL;
    StFile *f = NULL;
    Model *m = NULL;
    char inner[ML_ERRLEN];
    if (st_open(path, &f, inner) != 0) return ml_error(err, "cannot load checkpoint: %s", inner);
    const char *json = st_metadata(f, "moelab_config");
    if (!json) {
        st_close(f);
        return ml_error(err, "'%s' is a safetensors file without moelab_config metadata: "
                        "not a moelab checkpoint", path);
    }
    ModelConfig c;
    config_defaults(&c);
    if (config_from_checkpoint_json(&c, json, strlen(json), inner) != 0 || model_create(&m, &c, inner) != 0) {
        st_close(f);
        return ml_error(err, "'%s': bad moelab_config: %s", path, inner);
    }
    for (int i = 0; i < m->n_params; i++) {
        const ParamInfo *p = &m->params[i];
        StTensor t;
        if (st_find(f, p->name, &t) != 0) {
            ml_error(err, "'%s' has no tensor '%s'", path, p->name);
            goto fail;
        }
        int ok = t.ndim == p->ndim && t.shape[0] == p->shape[0] &&
                 (p->ndim == 1 || t.shape[1] == p->shape[1]);
        if (!ok) {
            ml_error(err, "'%s': tensor '%s' has the wrong shape (expected %d x %d)", path,
                     p->name, p->shape[0], p->ndim == 2 ? p->shape[1] : 1);
            goto fail;
        }
        memcpy(m->param_mem + p->offset, t.data, sizeof(float) * p->numel);
    }
    if (st_count(f) != m->n_params) {
        for (int i = 0; i < st_count(f); i++) {
            StTensor t;
            st_tensor_at(f, i, &t);
            if (model_find_param(m, t.name) < 0) {
                ml_error(err, "'%s': tensor '%s' does not belong to a model of this "
                         "configuration", path, t.name);
                goto fail;
            }
        }
    }
    st_close(f);
    *out = m;
    return 0;
fail:
    st_close(f);
    model_free(m);
    return -1;
}
