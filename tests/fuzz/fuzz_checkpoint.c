/*
** fuzz_checkpoint.c — libFuzzer harness for the checkpoint loader: the
** safetensors reader (st_open and its accessors, src/safetensors.c) and
** checkpoint_load (src/checkpoint.c) on the same bytes.
**
** Both read from a path, so each input is written to one temporary file per
** process, unlinked at once and reached through /proc/self/fd: nothing is left
** behind when the fuzzer stops or crashes. A file st_open accepts has every
** tensor read in full and found again by name; a checkpoint that loads runs a
** forward pass, so that whatever the loader lets through (a hash map's expert
** ids, say) is used as a real run would use it. MOELAB_MAX_MEMORY bounds what
** a configuration may claim (1 GB), as a user's machine does.
*/
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checkpoint.h"
#include "common.h"
#include "config.h"
#include "model.h"
#include "safetensors.h"

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "fuzz_checkpoint: %s:%d: check failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                          \
            abort();                                                                 \
        }                                                                            \
    } while (0)

static int input_fd = -1;
static char input_path[64];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    char tmpl[] = "/tmp/moelab_fuzz_ckpt_XXXXXX";
    input_fd = mkstemp(tmpl);
    if (input_fd < 0 || unlink(tmpl) != 0) {
        perror("fuzz_checkpoint: temporary file");
        abort();
    }
    snprintf(input_path, sizeof input_path, "/proc/self/fd/%d", input_fd);
    /* checkpoint_load checks the file before it allocates the model, and
    ** refuses a model or batch over this: the harness measures the loader,
    ** not malloc */
    setenv("MOELAB_MAX_MEMORY", "1G", 1);
    return 0;
}

static void write_input(const uint8_t *data, size_t size) {
    CHECK(ftruncate(input_fd, 0) == 0);
    size_t done = 0;
    while (done < size) {
        ssize_t n = pwrite(input_fd, data + done, size - done, (off_t)done);
        CHECK(n > 0);
        done += (size_t)n;
    }
}

/* Every tensor read in full, and found again by its name. */
static void walk_tensors(const StFile *f) {
    int n = st_count(f);
    CHECK(n >= 0);
    uint32_t mix = 0;
    for (int i = 0; i < n; i++) {
        StTensor t, by_name;
        CHECK(st_tensor_at(f, i, &t) == 0);
        CHECK(t.name != NULL && t.ndim >= 0 && t.ndim <= ST_MAX_DIMS);
        int64_t numel = st_numel(&t);
        CHECK(numel >= 0);
        for (int64_t k = 0; k < numel; k++) {
            uint32_t bits;
            memcpy(&bits, &t.data[k], sizeof bits);
            mix ^= bits;
        }
        CHECK(st_find(f, t.name, &by_name) == 0 && by_name.data == t.data);
    }
    StTensor none;
    CHECK(st_tensor_at(f, n, &none) == -1 && st_tensor_at(f, -1, &none) == -1);
    (void)st_metadata(f, "format");
    volatile uint32_t sink = mix;
    (void)sink;
}

/* A forward pass over a few tokens of the loaded model. */
static void run_model(Model *m) {
    const ModelConfig *c = &m->config;
    int n = c->context + 1 < 4 ? c->context + 1 : 4, tokens[4];
    for (int i = 0; i < n; i++) tokens[i] = (7 * i + 3) % c->vocab;
    float loss;
    char err[ML_ERRLEN];
    if (model_sequence_loss(m, tokens, n, &loss, err) != 0 && !strstr(err, "would need about")) {
        fprintf(stderr, "fuzz_checkpoint: a loaded model does not run: %s\n", err);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    write_input(data, size);
    StFile *f = NULL;
    char err[ML_ERRLEN] = "";
    if (st_open(input_path, &f, err) != 0) {
        CHECK(f == NULL && err[0] != '\0');
        return 0;
    }
    walk_tensors(f);
    st_close(f);

    /* both ways of loading: refusing non-finite weights, and taking them */
    Model *m = NULL;
    if (checkpoint_load(&m, input_path, size > 0 && (data[size - 1] & 1), err) != 0) {
        CHECK(m == NULL && err[0] != '\0');
        return 0;
    }
    CHECK(m != NULL);
    run_model(m);
    model_free(m);
    return 0;
}
