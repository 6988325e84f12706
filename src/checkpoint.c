/*
** checkpoint.c — model checkpoints as safetensors (checkpoint.h).
*/
#include "checkpoint.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/router.h"
#include "safetensors.h"

/* The hash router's token map of layer l, h.{l}.moe.hash_map (V): expert ids
** as float32 (SPEC §4 allows int32 or float32; moelab reads float32, as its
** safetensors reader takes F32 tensors only), so a loaded model routes as
** the saved one did. Checkpoints written before it was stored have none; the
** map is then the one derived from the seed, as it was when they were saved. */
static void hash_map_name(char *buf, size_t n, int l) { snprintf(buf, n, "h.%d.moe.hash_map", l); }

int checkpoint_save(const Model *m, const char *path, char *err) {
    const ModelConfig *c = &m->config;
    int maps = m->hash_map ? m->n_moe_layers : 0, n = m->n_params + maps;
    StTensor *ts = calloc((size_t)n, sizeof *ts);
    char *config = config_to_json(c);
    float *ids = maps ? malloc(sizeof(float) * (size_t)maps * c->vocab) : NULL;
    char(*names)[64] = maps ? malloc(sizeof *names * (size_t)maps) : NULL;
    if (!ts || !config || (maps && (!ids || !names))) {
        free(ts);
        free(config);
        free(ids);
        free(names);
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
    for (int l = 0, k = 0; maps && l < c->layers; l++) {
        if (!config_is_moe_block(c, l)) continue;
        float *map = ids + (size_t)k * c->vocab;
        for (int v = 0; v < c->vocab; v++) map[v] = (float)m->hash_map[(size_t)l * c->vocab + v];
        hash_map_name(names[k], sizeof names[k], l);
        ts[m->n_params + k] = (StTensor){.name = names[k], .ndim = 1, .shape = {c->vocab}, .data = map};
        k++;
    }
    const char *keys[] = {"moelab_config", "format"};
    const char *values[] = {config, "pt"};
    int rc = st_save(path, ts, n, keys, values, 2, err);
    free(ts);
    free(config);
    free(ids);
    free(names);
    return rc;
}

/* The hash map of layer l in f, checked, in *t; *found is 0 when the file
** has none (the map then stays the one derived from the seed). */
static int find_hash_map(const Model *m, const StFile *f, const char *path, int l, StTensor *t,
                         int *found, char *err) {
    const ModelConfig *c = &m->config;
    char name[64];
    hash_map_name(name, sizeof name, l);
    *found = 0;
    if (st_find(f, name, t) != 0) return 0;
    if (t->ndim != 1 || t->shape[0] != c->vocab)
        return ml_error(err, "'%s': tensor '%s' has the wrong shape (expected %d)", path, name,
                        c->vocab);
    for (int v = 0; v < c->vocab; v++) {
        float e = t->data[v];
        if (!(e >= 0.0f && e < (float)c->moe.experts && e == (float)(int)e))
            return ml_error(err, "'%s': tensor '%s' maps token %d to %g, not an expert id "
                            "(0 to %d)", path, name, v, e, c->moe.experts - 1);
    }
    *found = 1;
    return 0;
}

static int has_hash_maps(const Model *m) {
    return m->config.moe.enabled && m->config.moe.kind == ROUTER_HASH;
}

/* Checks every tensor of f against the planned model m before anything is
** allocated for it: each parameter present with its shape (and finite unless
** allowed), the hash maps well formed, and no tensor the model lacks. */
static int check_tensors(const Model *m, const StFile *f, const char *path, int allow_nonfinite,
                         char *err) {
    for (int i = 0; i < m->n_params; i++) {
        const ParamInfo *p = &m->params[i];
        StTensor t;
        if (st_find(f, p->name, &t) != 0) return ml_error(err, "'%s' has no tensor '%s'", path, p->name);
        int ok = t.ndim == p->ndim && t.shape[0] == p->shape[0] &&
                 (p->ndim == 1 || t.shape[1] == p->shape[1]);
        if (!ok)
            return ml_error(err, "'%s': tensor '%s' has the wrong shape (expected %d x %d)", path,
                            p->name, p->shape[0], p->ndim == 2 ? p->shape[1] : 1);
        if (allow_nonfinite) continue;
        size_t bad = 0, first = 0;
        for (size_t j = p->numel; j-- > 0;)
            if (!isfinite(t.data[j])) {
                bad++;
                first = j;
            }
        if (bad)
            return ml_error(err, "'%s': tensor '%s' has %zu non-finite values (the first at "
                            "element %zu is %g); load it with {nonfinite = true} to inspect it",
                            path, p->name, bad, first, t.data[first]);
    }
    int maps = 0;
    for (int l = 0; has_hash_maps(m) && l < m->config.layers; l++) {
        StTensor t;
        int found;
        if (!config_is_moe_block(&m->config, l)) continue;
        if (find_hash_map(m, f, path, l, &t, &found, err) != 0) return -1;
        maps += found;
    }
    if (st_count(f) == m->n_params + maps) return 0;
    for (int i = 0; i < st_count(f); i++) {
        StTensor t;
        st_tensor_at(f, i, &t);
        int map = 0; /* one of the maps counted above */
        for (int l = 0; has_hash_maps(m) && l < m->config.layers && !map; l++) {
            char name[64];
            hash_map_name(name, sizeof name, l);
            map = config_is_moe_block(&m->config, l) && strcmp(t.name, name) == 0;
        }
        if (model_find_param(m, t.name) < 0 && !map)
            return ml_error(err, "'%s': tensor '%s' does not belong to a model of this "
                            "configuration", path, t.name);
    }
    return 0;
}

int checkpoint_load(Model **out, const char *path, int allow_nonfinite, char *err) {
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
    if (config_from_checkpoint_json(&c, json, strlen(json), inner) != 0 || model_plan(&m, &c, inner) != 0) {
        st_close(f);
        return ml_error(err, "'%s': bad moelab_config: %s", path, inner);
    }
    if (check_tensors(m, f, path, allow_nonfinite, err) != 0) goto fail;
    if (model_allocate(m, inner) != 0) {
        ml_error(err, "'%s': %s", path, inner);
        goto fail;
    }
    for (int i = 0; i < m->n_params; i++) {
        const ParamInfo *p = &m->params[i];
        StTensor t;
        st_find(f, p->name, &t);
        memcpy(m->param_mem + p->offset, t.data, sizeof(float) * p->numel);
    }
    for (int l = 0; has_hash_maps(m) && l < m->config.layers; l++) {
        StTensor t;
        int found;
        if (!config_is_moe_block(&m->config, l)) continue;
        find_hash_map(m, f, path, l, &t, &found, NULL);
        for (int v = 0; found && v < m->config.vocab; v++)
            m->hash_map[(size_t)l * m->config.vocab + v] = (int)t.data[v];
    }
    st_close(f);
    *out = m;
    return 0;
fail:
    st_close(f);
    model_free(m);
    return -1;
}
