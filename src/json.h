/*
** json.h — a small, strict JSON reader and a growable buffer to write JSON.
**
** moelab reads JSON from places it does not control (safetensors headers,
** configurations stored in a results database), so the parser is strict
** (RFC 8259, nothing more: no comments, no trailing commas, no NaN) and safe on
** hostile input: it never reads past `len` (the text need not be NUL-terminated),
** limits nesting to JSON_MAX_DEPTH, rejects duplicate object keys, invalid UTF-8
** and lone surrogates, and names the byte offset of every error.
**
** A parsed document is a tree of JsonValue nodes, all owned by the root that
** json_parse returns; json_free(root) releases the whole tree at once. Nodes are
** opaque; read them with the accessors below, which accept NULL and values of
** the wrong type (returning NULL, 0 or JSON_NONE), so that lookups chain:
**     json_number(json_object_get(cfg, "d_model"))
** Object members keep their order in the text.
*/
#ifndef MOELAB_JSON_H
#define MOELAB_JSON_H

#include <stddef.h>

#define JSON_MAX_DEPTH 64

typedef enum {
    JSON_NONE = 0, /* no value: what json_type(NULL) returns */
    JSON_NULL,
    JSON_BOOL,
    JSON_NUMBER,
    JSON_STRING,
    JSON_ARRAY,
    JSON_OBJECT
} JsonType;

typedef struct JsonValue JsonValue;

/* Parses exactly len bytes of text (surrounding whitespace allowed) into *out.
** On failure *out is NULL and err says what is wrong and at which byte offset. */
int json_parse(const char *text, size_t len, JsonValue **out, char *err);

/* Frees a whole document. v must be a root returned by json_parse (or NULL). */
void json_free(JsonValue *v);

JsonType json_type(const JsonValue *v);
const char *json_type_name(JsonType t); /* "null", "number", ... for messages */

int json_bool(const JsonValue *v);      /* 0 unless v is true */
double json_number(const JsonValue *v); /* 0.0 unless v is a number */
/* Decoded UTF-8, NUL-terminated. A string may hold "\u0000", so the byte
** length is json_string_len, and strlen may be shorter. NULL unless a string. */
const char *json_string(const JsonValue *v);
size_t json_string_len(const JsonValue *v);

size_t json_array_len(const JsonValue *v);                 /* 0 unless an array */
const JsonValue *json_array_at(const JsonValue *v, size_t i); /* NULL if out of range */

size_t json_object_len(const JsonValue *v); /* 0 unless an object */
const char *json_object_key_at(const JsonValue *v, size_t i);
size_t json_object_key_len_at(const JsonValue *v, size_t i);
const JsonValue *json_object_value_at(const JsonValue *v, size_t i);
/* The member named key, or NULL. A linear scan: fine for the objects moelab
** reads; index them yourself if you look up many keys in a large object. */
const JsonValue *json_object_get(const JsonValue *v, const char *key);

/*
** JsonBuf — a growable, always NUL-terminated string to emit JSON into.
** Start from a zeroed struct (JsonBuf b = {0};). A failure (out of memory, or a
** number JSON cannot hold: NaN or infinity) sets `failed`, after which every
** call does nothing, so a writer can emit a whole document and check once.
** Each call also returns 0, or -1 when the buffer has failed.
*/
typedef struct {
    char *data; /* NUL-terminated text; NULL until something is written */
    size_t len, cap;
    int failed;
} JsonBuf;

int jb_puts(JsonBuf *b, const char *s);
int jb_printf(JsonBuf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
int jb_string(JsonBuf *b, const char *s); /* "quoted", with JSON escapes */
/* The shortest text that reads back as exactly x: 3, -0.5, 0.001, 1e-05.
** NaN and infinity fail the buffer. */
int jb_number(JsonBuf *b, double x);
/* A float as the shortest decimal that reads back as that float (1e-05, 0.9). */
int jb_float(JsonBuf *b, float x);
/* A whole parsed value, compactly (no spaces), members in their order. */
int jb_value(JsonBuf *b, const JsonValue *v);
void jb_free(JsonBuf *b); /* frees data and zeroes the struct */

#endif
