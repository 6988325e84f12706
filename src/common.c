/*
** common.c — the error helper of common.h.
*/
#include "common.h"

#include <stdarg.h>
#include <stdio.h>

int ml_error(char *err, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, ML_ERRLEN, fmt, ap);
        va_end(ap);
    }
    return -1;
}
