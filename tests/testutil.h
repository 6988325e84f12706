/*
** testutil.h — what the cmocka tests share: includes, a seeded random fill,
** and a relative comparison for finite-difference gradient checks.
*/
#ifndef MOELAB_TESTUTIL_H
#define MOELAB_TESTUTIL_H

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* xorshift: tests need reproducible numbers, not good ones */
static inline uint32_t test_rand(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return (uint32_t)(*s >> 11);
}

static inline float test_uniform(uint64_t *s) { /* in [-1, 1) */
    return (float)(test_rand(s) % 2000001) / 1000000.0f - 1.0f;
}

static inline void test_fill(float *x, size_t n, float scale, uint64_t seed) {
    uint64_t s = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) x[i] = scale * test_uniform(&s);
}

/* |a - b| <= atol + rtol · max(|a|, |b|) */
static inline int test_close(double a, double b, double rtol, double atol) {
    return fabs(a - b) <= atol + rtol * fmax(fabs(a), fabs(b));
}

#endif
