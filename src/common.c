/*
** common.c — the error and buffer helpers of common.h.
*/
#include "common.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

int ml_grow(void **p, size_t n, size_t elem) {
    void *q = realloc(*p, (n ? n : 1) * elem);
    if (!q) return -1;
    *p = q;
    return 0;
}

int ml_error(char *err, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, ML_ERRLEN, fmt, ap);
        va_end(ap);
    }
    return -1;
}
