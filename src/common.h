/*
** common.h — what every layer of moelab shares: the error convention.
**
** Library code never exits. A function that can fail returns 0 on success and
** -1 on failure, and writes a one-line message naming what is wrong into the
** caller's buffer `err` (ML_ERRLEN bytes; may be NULL). Broken invariants, such
** as a shape mismatch between two of our own arrays, are asserts instead.
*/
#ifndef MOELAB_COMMON_H
#define MOELAB_COMMON_H

#include <stddef.h>
#include <stdint.h>

#define ML_ERRLEN 512
#define MOELAB_VERSION "0.1.0"

/* Formats a message into err (when not NULL) and returns -1, so that error
** paths read `return ml_error(err, "...", ...);`. */
int ml_error(char *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* A number as a message shows it: the shortest text that reads back as x
** (3, 1.5, 1e+300, 9.223372036854776e+18), or as the float x is when x is
** one (0.003, not 0.003000000026077032), or nan, inf, -inf. Writes into
** buf, ML_NUMLEN bytes, and returns it. */
#define ML_NUMLEN 32
const char *ml_number(char *buf, double x);

/* Makes *p hold at least n elements of size elem (one when n is 0), keeping
** its contents; 0, or -1 when out of memory (then *p is unchanged). The
** caller keeps the capacity. ML_GROW(ptr, n) for a typed pointer. */
int ml_grow(void **p, size_t n, size_t elem);
#define ML_GROW(ptr, n) ml_grow((void **)&(ptr), (n), sizeof *(ptr))

/* A 64-bit digest of n bytes, continuing from h (ML_DIGEST_START to begin):
** FNV-1a over 8-byte words (each product's high half folded down), then
** the tail's bytes. Not cryptographic; it
** tells copies of a model or a corpus apart (the ranks', lmoelab.c). */
#define ML_DIGEST_START 14695981039346656037ULL
uint64_t ml_digest(const void *p, size_t n, uint64_t h);

/* The memory moelab lets a model and its batches take: MOELAB_MAX_MEMORY
** (bytes, or with a suffix K, M, G or T) when set, else the machine's
** physical memory. ml_memory_check refuses need bytes over it, with a
** message naming what needs them and the estimate. */
size_t ml_memory_limit(void);
int ml_memory_check(size_t need, const char *what, char *err);

#endif
