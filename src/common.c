/*
** common.c — the error and buffer helpers of common.h.
*/
#include "common.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int ml_grow(void **p, size_t n, size_t elem) {
    void *q = realloc(*p, (n ? n : 1) * elem);
    if (!q) return -1;
    *p = q;
    return 0;
}

uint64_t ml_digest(const void *p, size_t n, uint64_t h) {
    const unsigned char *b = p;
    const uint64_t prime = 1099511628211ULL;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, b + i, 8);
        h = (h ^ w) * prime;
        /* a product moves bits up only: without this, differences in bit 63
        ** alone (two floats' signs) would cancel in pairs */
        h ^= h >> 32;
    }
    for (; i < n; i++) h = (h ^ b[i]) * prime;
    return h;
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

size_t ml_memory_limit(void) {
    const char *env = getenv("MOELAB_MAX_MEMORY");
    if (env && *env) {
        char *end;
        double v = strtod(env, &end);
        double unit = *end == 'K' || *end == 'k' ? 1024.0
                      : *end == 'M' || *end == 'm' ? 1048576.0
                      : *end == 'G' || *end == 'g' ? 1073741824.0
                      : *end == 'T' || *end == 't' ? 1099511627776.0 : 1.0;
        if (v > 0 && v * unit < 1.8e19) return (size_t)(v * unit);
    }
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    return pages > 0 && page > 0 ? (size_t)pages * (size_t)page : SIZE_MAX;
}

int ml_memory_check(size_t need, const char *what, char *err) {
    size_t limit = ml_memory_limit();
    if (need <= limit) return 0;
    return ml_error(err, "%s would need about %.3g GiB of memory, more than the %.3g GiB "
                    "allowed (the machine's memory, or MOELAB_MAX_MEMORY)", what,
                    need / 1073741824.0, limit / 1073741824.0);
}

const char *ml_number(char *buf, double x) {
    if (isnan(x)) return strcpy(buf, "nan"); /* 0/0 has its sign bit set: not "-nan" */
    if (isinf(x)) return strcpy(buf, x > 0 ? "inf" : "-inf");
    /* whole numbers as written: 300, not the shorter 3e+02 */
    if (x == trunc(x) && fabs(x) < 1e15) {
        snprintf(buf, ML_NUMLEN, "%.0f", x);
        return buf;
    }
    /* a float32 option (lr = 0.003 is 0.003000000026077032 as a double) shows
    ** as the float it is: the shortest text that reads back as that float */
    int is_float = (double)(float)x == x && x != trunc(x); /* larger integers read exactly */
    for (int digits = 1; digits <= 17; digits++) {
        snprintf(buf, ML_NUMLEN, "%.*g", digits, x);
        double back = strtod(buf, NULL);
        if (back == x || (is_float && (float)back == (float)x)) break;
    }
    return buf;
}
