/*
** data.h — a byte-level corpus with a train/validation split, and random
** (B, T) batches drawn from either side.
**
** The split is positional: the first floor(n · split) bytes train, the rest
** validate. A batch row is a window at an offset drawn uniformly from
** [0, len - T - 1]: inputs are its first T bytes, targets the T after them.
*/
#ifndef MOELAB_DATA_H
#define MOELAB_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

typedef enum { SPLIT_TRAIN = 0, SPLIT_VAL = 1 } Split;

typedef struct {
    char *path;
    uint8_t *bytes;
    size_t n;       /* all bytes */
    size_t n_train; /* bytes [0, n_train) train; [n_train, n) validate */
    double split;
    uint64_t digest; /* ml_digest of the bytes: the ranks check they read one corpus */
} Corpus;

/* Reads a whole file; split in (0, 1]. */
int corpus_load(Corpus **out, const char *path, double split, char *err);
/* A corpus over bytes already in memory (copied). */
int corpus_from_bytes(Corpus **out, const uint8_t *bytes, size_t n, double split, char *err);
void corpus_free(Corpus *c);

size_t corpus_split_len(const Corpus *c, Split s);
const char *corpus_split_name(Split s);

/* Checks that windows of T + 1 bytes fit in the split. */
int corpus_check_context(const Corpus *c, Split s, int T, char *err);

/* Checks that every byte is a token of a vocabulary of `vocab` ids (a model
** may have fewer than 256); the message names the first that is not. */
int corpus_check_vocab(const Corpus *c, int vocab, char *err);

/* Fills inputs and targets (B, T) from random windows of the split; rng is a
** gsl_rng* (kept opaque here so that callers need not include GSL). */
void corpus_batch(const Corpus *c, Split s, void *rng, int B, int T, int *inputs, int *targets);
/* Rows first .. first + B − 1 of the batch of `all` rows that corpus_batch
** would draw: the rng moves by all draws (a slice of a batch cut over ranks,
** dist.h). */
void corpus_batch_part(const Corpus *c, Split s, void *rng, int all, int first, int B, int T,
                       int *inputs, int *targets);

#endif
