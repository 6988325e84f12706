/*
** data.c — the byte-level corpus of data.h.
*/
#include "data.h"

#include <assert.h>
#include <errno.h>
#include <gsl/gsl_rng.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int corpus_from_bytes(Corpus **out, const uint8_t *bytes, size_t n, double split, char *err) {
    *out = NULL;
    char got[ML_NUMLEN];
    if (!(split > 0.0 && split <= 1.0))
        return ml_error(err, "corpus split must be in (0, 1], got %s", ml_number(got, split));
    if (n < 2) return ml_error(err, "corpus has %zu bytes; it needs at least 2", n);
    if ((size_t)((double)n * split) == 0)
        return ml_error(err, "corpus split %s of %zu bytes leaves the train split empty",
                        ml_number(got, split), n);
    Corpus *c = calloc(1, sizeof *c);
    if (!c || !(c->bytes = malloc(n))) {
        free(c);
        return ml_error(err, "out of memory for a corpus of %zu bytes", n);
    }
    memcpy(c->bytes, bytes, n);
    c->n = n;
    c->split = split;
    c->n_train = (size_t)((double)n * split);
    c->digest = ml_digest(c->bytes, n, ML_DIGEST_START);
    *out = c;
    return 0;
}

int corpus_load(Corpus **out, const char *path, double split, char *err) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return ml_error(err, "cannot open corpus '%s': %s", path, strerror(errno));
    uint8_t *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            cap = cap ? cap * 2 : 1 << 20;
            uint8_t *grown = realloc(buf, cap);
            if (!grown) {
                free(buf);
                fclose(f);
                return ml_error(err, "out of memory reading corpus '%s'", path);
            }
            buf = grown;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    int bad = ferror(f) ? errno : 0; /* EISDIR for a directory, which fopen takes */
    fclose(f);
    if (bad) {
        free(buf);
        return ml_error(err, "cannot read corpus '%s': %s", path, strerror(bad));
    }
    if (n < 2) {
        free(buf);
        return ml_error(err, "corpus '%s' has %zu bytes; it needs at least 2", path, n);
    }
    int rc = corpus_from_bytes(out, buf, n, split, err);
    free(buf);
    if (rc != 0) return -1;
    (*out)->path = strdup(path);
    return 0;
}

void corpus_free(Corpus *c) {
    if (!c) return;
    free(c->path);
    free(c->bytes);
    free(c);
}

size_t corpus_split_len(const Corpus *c, Split s) {
    return s == SPLIT_TRAIN ? c->n_train : c->n - c->n_train;
}

const char *corpus_split_name(Split s) { return s == SPLIT_TRAIN ? "train" : "val"; }

int corpus_check_context(const Corpus *c, Split s, int T, char *err) {
    size_t len = corpus_split_len(c, s);
    if (len < (size_t)T + 1)
        return ml_error(err, "context %d is longer than the corpus's %s split (%zu bytes): "
                        "a window needs context + 1 bytes", T, corpus_split_name(s), len);
    return 0;
}

int corpus_check_vocab(const Corpus *c, int vocab, char *err) {
    if (vocab >= 256) return 0;
    for (size_t i = 0; i < c->n; i++)
        if (c->bytes[i] >= vocab)
            return ml_error(err, "the corpus has byte %d at offset %zu, outside the model's "
                            "vocabulary (vocab = %d)", c->bytes[i], i, vocab);
    return 0;
}

void corpus_batch(const Corpus *c, Split s, void *rng, int B, int T, int *inputs, int *targets) {
    corpus_batch_part(c, s, rng, B, 0, B, T, inputs, targets);
}

/* An offset uniform in [0, windows). gsl_rng_uniform_int takes at most the
** generator's range, 2^32 − 1 for MT19937 (beyond it GSL's error handler
** aborts): a split of more windows (a corpus of over 4 GiB) draws 64 bits
** from two outputs, rejection keeping them uniform. */
static size_t window_offset(gsl_rng *rng, size_t windows) {
    unsigned long range = gsl_rng_max(rng) - gsl_rng_min(rng);
    if (windows <= range) return (size_t)gsl_rng_uniform_int(rng, windows);
    assert(gsl_rng_min(rng) == 0 && range == 0xffffffffUL); /* 32 bits an output */
    uint64_t n = windows, limit = UINT64_MAX - UINT64_MAX % n, x;
    do {
        x = (uint64_t)gsl_rng_get(rng) << 32;
        x |= gsl_rng_get(rng);
    } while (x >= limit);
    return (size_t)(x % n);
}

void corpus_batch_part(const Corpus *c, Split s, void *rng, int all, int first, int B, int T,
                       int *inputs, int *targets) {
    const uint8_t *base = c->bytes + (s == SPLIT_TRAIN ? 0 : c->n_train);
    size_t windows = corpus_split_len(c, s) - (size_t)T; /* offsets 0 .. len - T - 1 */
    for (int r = 0; r < all; r++) {
        size_t o = window_offset((gsl_rng *)rng, windows);
        int b = r - first;
        if (b < 0 || b >= B) continue;
        for (int t = 0; t < T; t++) {
            inputs[b * T + t] = base[o + t];
            targets[b * T + t] = base[o + t + 1];
        }
    }
}
