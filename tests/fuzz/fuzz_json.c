/*
** fuzz_json.c — libFuzzer harness for the strict JSON parser (src/json.c).
**
** Every input is parsed from a heap copy of exactly its size, so that
** AddressSanitizer catches a read past len. A document that parses is walked
** with every accessor, written back with jb_value, and the written text must
** parse again and write back the same bytes: a parser and writer that
** disagree are a crash too (abort), not only a memory error.
*/
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "json.h"

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "fuzz_json: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            abort();                                                                 \
        }                                                                            \
    } while (0)

/* Reads every node through the public accessors; checks what json.h promises
** of each (NUL-terminated strings, in-range indices, lookups by key). */
static void walk(const JsonValue *v, int depth) {
    CHECK(depth <= JSON_MAX_DEPTH);
    JsonType t = json_type(v);
    CHECK(json_type_name(t) != NULL);
    switch (t) {
    case JSON_NULL:
    case JSON_BOOL:
        CHECK(json_bool(v) == 0 || json_bool(v) == 1);
        break;
    case JSON_NUMBER: {
        double x = json_number(v);
        CHECK(x == x); /* never NaN */
        break;
    }
    case JSON_STRING: {
        const char *s = json_string(v);
        size_t n = json_string_len(v);
        CHECK(s != NULL && s[n] == '\0' && strlen(s) <= n);
        break;
    }
    case JSON_ARRAY: {
        size_t n = json_array_len(v);
        for (size_t i = 0; i < n; i++) {
            const JsonValue *item = json_array_at(v, i);
            CHECK(item != NULL);
            walk(item, depth + 1);
        }
        CHECK(json_array_at(v, n) == NULL);
        CHECK(json_object_len(v) == 0 && json_object_get(v, "") == NULL);
        break;
    }
    case JSON_OBJECT: {
        size_t n = json_object_len(v);
        for (size_t i = 0; i < n; i++) {
            const char *key = json_object_key_at(v, i);
            size_t klen = json_object_key_len_at(v, i);
            const JsonValue *value = json_object_value_at(v, i);
            CHECK(key != NULL && key[klen] == '\0' && value != NULL);
            /* Keys are unique, so a key without an embedded NUL finds its own member. */
            if (strlen(key) == klen) CHECK(json_object_get(v, key) == value);
            walk(value, depth + 1);
        }
        CHECK(json_object_key_at(v, n) == NULL && json_object_value_at(v, n) == NULL);
        CHECK(json_array_len(v) == 0 && json_array_at(v, 0) == NULL);
        break;
    }
    default:
        CHECK(0);
    }
}

/* jb_value's text of v; the caller frees it. */
static char *written(const JsonValue *v, size_t *len) {
    JsonBuf b = {0};
    CHECK(jb_value(&b, v) == 0 && b.data != NULL);
    *len = b.len;
    return b.data;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size ? size : 1);
    if (!text) return 0;
    memcpy(text, data, size);
    JsonValue *doc = NULL;
    char err[ML_ERRLEN];
    int rc = json_parse(text, size, &doc, err);
    free(text);
    if (rc != 0) {
        CHECK(doc == NULL && (strstr(err, "at byte ") || strstr(err, "out of memory")));
        return 0;
    }
    CHECK(doc != NULL);
    walk(doc, 0);

    size_t n1, n2;
    char *once = written(doc, &n1);
    JsonValue *again = NULL;
    if (json_parse(once, n1, &again, err) != 0) {
        fprintf(stderr, "fuzz_json: written text does not parse: %s\n", err);
        abort();
    }
    char *twice = written(again, &n2);
    CHECK(n1 == n2 && memcmp(once, twice, n1) == 0);
    free(once);
    free(twice);
    json_free(again);
    json_free(doc);
    return 0;
}
