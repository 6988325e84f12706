/*
** make_seeds.c — the fuzzers' seed corpora, made from real checkpoints.
**
** Builds a few tiny models of different kinds (dense, SwiGLU and RMSNorm,
** MoE with top-k, hash, stratified, threshold, expert-choice, merge and
** all-expert routers), each from a configuration written as a user would
** write it, and saves them with checkpoint_save. Into DIR it writes:
**   checkpoint/NAME.safetensors  the checkpoint
**   config/NAME.json             its moelab_config (config_to_json)
**   config/NAME-user.json        the configuration as written below
**   json/NAME-config.json, json/NAME-header.json (the safetensors header)
** and a few hand-written JSON documents into json/. Sizes are tiny (width 8,
** one or two layers, context 8, a vocab of 16 to 256) so that the fuzzers'
** mutations land in the header more often than in the weights.
** Usage: make_seeds DIR
*/
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "checkpoint.h"
#include "common.h"
#include "config.h"
#include "model.h"

static const struct {
    const char *name, *config;
} models[] = {
    {"dense", "{\"vocab\":256,\"context\":8,\"layers\":2,\"d_model\":8,\"heads\":2,"
              "\"ffn\":{\"hidden\":16}}"},
    {"dense-swiglu-rmsnorm-tied",
     "{\"vocab\":16,\"context\":8,\"layers\":1,\"d_model\":8,\"heads\":1,\"norm\":\"rmsnorm\","
     "\"activation\":\"swiglu\",\"tied\":true,\"ffn\":{\"hidden\":8}}"},
    {"moe-topk", "{\"vocab\":32,\"context\":8,\"layers\":2,\"d_model\":8,\"heads\":2,"
                 "\"moe\":{\"experts\":4,\"hidden\":8,\"router\":{\"kind\":\"topk\",\"k\":2,"
                 "\"capacity_factor\":1.25},\"aux\":{\"balance\":0.01,\"z\":0.001}}}"},
    {"moe-hash", "{\"vocab\":32,\"context\":8,\"layers\":2,\"d_model\":8,\"heads\":2,"
                 "\"moe\":{\"every\":2,\"experts\":4,\"hidden\":8,\"router\":{\"kind\":\"hash\"}}}"},
    {"moe-stratified-swiglu-rmsnorm",
     "{\"vocab\":16,\"context\":8,\"layers\":1,\"d_model\":8,\"heads\":2,\"norm\":\"rmsnorm\","
     "\"activation\":\"swiglu\",\"moe\":{\"experts\":4,\"hidden\":[4,4,8,8],"
     "\"router\":{\"kind\":\"stratified\",\"strata\":[2,2]}}}"},
    {"moe-threshold", "{\"vocab\":16,\"context\":8,\"layers\":1,\"d_model\":8,\"heads\":2,"
                      "\"moe\":{\"experts\":4,\"hidden\":8,\"router\":{\"kind\":\"threshold\","
                      "\"p\":0.5,\"max_k\":3}}}"},
    {"moe-expert-choice", "{\"vocab\":16,\"context\":8,\"layers\":1,\"d_model\":8,\"heads\":2,"
                          "\"moe\":{\"experts\":4,\"hidden\":8,\"router\":{\"kind\":\"expert_choice\","
                          "\"capacity_factor\":2}}}"},
    {"moe-merge", "{\"vocab\":16,\"context\":8,\"layers\":1,\"d_model\":8,\"heads\":2,"
                  "\"activation\":\"relu\",\"moe\":{\"experts\":2,\"hidden\":8,"
                  "\"router\":{\"kind\":\"merge\",\"segment\":4,\"token_attention\":4}}}"},
    {"moe-all-bias", "{\"vocab\":16,\"context\":8,\"layers\":1,\"d_model\":8,\"heads\":2,"
                     "\"moe\":{\"experts\":2,\"hidden\":8,\"bias\":true,\"router\":{\"kind\":\"all\"}}}"},
};

/* JSON the configurations above do not reach: scalars, escapes, surrogate
** pairs, empty containers, edge numbers. */
static const char *const documents[] = {
    "{}",
    "[]",
    "null",
    " true ",
    "-0.5e-3",
    "1.7976931348623157e308",
    "123456789012345678901234567890",
    "\"a\\u00e9\\ud83d\\ude00\\n\\t\\\"\\\\\\/\"",
    "\"\\u0000\"",
    "[1,[2,[3,{}]],{\"a\":[]},\"x\"]",
    "{\"a\":1,\"b\":{\"c\":[true,false,null]},\"\":-0}",
    ("{\"__metadata__\":{\"format\":\"pt\"},\"w\":{\"dtype\":\"F32\",\"shape\":[2,1],"
     "\"data_offsets\":[0,8]}}"),
};

static int write_file(const char *dir, const char *sub, const char *name, const void *data,
                      size_t len) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s/%s", dir, sub, name);
    FILE *fp = fopen(path, "wb");
    int ok = fp && fwrite(data, 1, len, fp) == len;
    if (fp && fclose(fp) != 0) ok = 0;
    if (!ok) fprintf(stderr, "make_seeds: cannot write %s: %s\n", path, strerror(errno));
    return ok ? 0 : -1;
}

/* The JSON header of the safetensors file at path, into the json corpus. */
static int copy_header(const char *path, const char *dir, const char *name) {
    FILE *fp = fopen(path, "rb");
    unsigned char len8[8];
    if (!fp || fread(len8, 1, 8, fp) != 8) {
        if (fp) fclose(fp);
        fprintf(stderr, "make_seeds: cannot read %s\n", path);
        return -1;
    }
    size_t n = 0;
    for (int k = 7; k >= 0; k--) n = n << 8 | len8[k];
    char *header = malloc(n ? n : 1);
    int rc = header && fread(header, 1, n, fp) == n ? 0 : -1;
    fclose(fp);
    if (rc == 0) rc = write_file(dir, "json", name, header, n);
    else fprintf(stderr, "make_seeds: cannot read the header of %s\n", path);
    free(header);
    return rc;
}

static int make_model(const char *dir, const char *name, const char *user_json) {
    char err[ML_ERRLEN], path[1024], file[256];
    ModelConfig c;
    Model *m = NULL;
    config_defaults(&c);
    if (config_from_json(&c, user_json, strlen(user_json), err) != 0 ||
        model_create(&m, &c, err) != 0) {
        fprintf(stderr, "make_seeds: %s: %s\n", name, err);
        return -1;
    }
    snprintf(path, sizeof path, "%s/checkpoint/%s.safetensors", dir, name);
    int rc = checkpoint_save(m, path, err);
    if (rc) fprintf(stderr, "make_seeds: %s: %s\n", name, err);
    char *json = config_to_json(&m->config);
    if (!json) rc = -1;
    if (rc == 0) {
        snprintf(file, sizeof file, "%s.json", name);
        rc = write_file(dir, "config", file, json, strlen(json));
    }
    if (rc == 0) {
        snprintf(file, sizeof file, "%s-user.json", name);
        rc = write_file(dir, "config", file, user_json, strlen(user_json));
    }
    if (rc == 0) {
        snprintf(file, sizeof file, "%s-config.json", name);
        rc = write_file(dir, "json", file, json, strlen(json));
    }
    if (rc == 0) {
        snprintf(file, sizeof file, "%s-header.json", name);
        rc = copy_header(path, dir, file);
    }
    free(json);
    model_free(m);
    return rc;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: make_seeds DIR\n");
        return 2;
    }
    const char *dir = argv[1];
    const char *subs[] = {"", "/checkpoint", "/config", "/json"};
    for (int i = 0; i < 4; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s%s", dir, subs[i]);
        if (mkdir(path, 0777) != 0 && errno != EEXIST) {
            fprintf(stderr, "make_seeds: cannot create %s: %s\n", path, strerror(errno));
            return 1;
        }
    }
    int failed = 0;
    for (size_t i = 0; i < sizeof models / sizeof models[0]; i++)
        failed |= make_model(dir, models[i].name, models[i].config) != 0;
    for (size_t i = 0; i < sizeof documents / sizeof documents[0]; i++) {
        char file[64];
        snprintf(file, sizeof file, "document-%02zu.json", i);
        failed |= write_file(dir, "json", file, documents[i], strlen(documents[i])) != 0;
    }
    if (failed) return 1;
    printf("make_seeds: %zu checkpoints, their configurations and %zu JSON documents in %s\n",
           sizeof models / sizeof models[0], sizeof documents / sizeof documents[0], dir);
    return 0;
}
