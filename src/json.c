/*
** json.c — the strict JSON parser and the JSON writer of json.h.
**
** Parsing is recursive descent over (text, len) with an explicit position; no
** code looks at a byte without first checking that it lies before len. All of
** a document — nodes, decoded strings, member arrays — comes from one arena
** owned by the root, so json_free, and cleanup after an error, frees a few
** large blocks. While a container is being parsed its children wait on a
** scratch stack shared by every depth; when it closes they move into the arena
** in one exact-size piece, so containers never reallocate.
*/
#include "json.h"
#include "common.h"

#include <errno.h>
#include <locale.h>
#include <math.h>
#include <stdalign.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct JsonMember JsonMember;

struct JsonValue {
    JsonType type;
    union {
        int boolean;
        double number;
        struct { const char *s; size_t len; } string; /* NUL-terminated too */
        struct { JsonValue *items; size_t n; } array;
        struct { JsonMember *members; size_t n; } object;
    } u;
};

struct JsonMember {
    const char *key; /* NUL-terminated; key_len counts any embedded NUL */
    size_t key_len;
    JsonValue value;
};

/* ------------------------------------------------------------------------
** The arena. Small pieces are carved from 64 KiB blocks; a piece larger than
** a quarter block gets a block of its own, linked behind the current one so
** that the current block's free space is not abandoned.
*/
typedef struct ArenaBlock {
    struct ArenaBlock *next;
    size_t cap, used;
    max_align_t data[];
} ArenaBlock;

#define ARENA_BLOCK_BYTES ((size_t)64 * 1024)

/* The root is the first member, so the JsonValue* handed out is the JsonDoc*. */
typedef struct {
    JsonValue root;
    ArenaBlock *blocks;
} JsonDoc;

static void *arena_alloc(ArenaBlock **head, size_t n) {
    const size_t align = alignof(max_align_t);
    if (n > SIZE_MAX - sizeof(ArenaBlock) - align) return NULL;
    n = (n + align - 1) & ~(align - 1);

    if (n > ARENA_BLOCK_BYTES / 4) {
        ArenaBlock *big = malloc(sizeof *big + n);
        if (!big) return NULL;
        big->cap = big->used = n;
        if (*head) {
            big->next = (*head)->next;
            (*head)->next = big;
        } else {
            big->next = NULL;
            *head = big;
        }
        return big->data;
    }
    ArenaBlock *b = *head;
    if (!b || b->cap - b->used < n) {
        b = malloc(sizeof *b + ARENA_BLOCK_BYTES);
        if (!b) return NULL;
        b->cap = ARENA_BLOCK_BYTES;
        b->used = 0;
        b->next = *head;
        *head = b;
    }
    void *p = (char *)b->data + b->used;
    b->used += n;
    return p;
}

void json_free(JsonValue *v) {
    if (!v) return;
    JsonDoc *doc = (JsonDoc *)v;
    ArenaBlock *b = doc->blocks;
    while (b) {
        ArenaBlock *next = b->next;
        free(b);
        b = next;
    }
    free(doc);
}

/* ------------------------------------------------------------------------
** The parser.
*/

/* An object member waiting on the scratch stack; pos (the byte offset of its
** key) is kept only to name the place of a duplicate. */
typedef struct {
    JsonMember m;
    size_t pos;
} PendingMember;

typedef struct {
    const unsigned char *s;
    size_t len, pos;
    int depth;
    JsonDoc *doc;
    JsonValue *vals; /* scratch stack of array elements */
    size_t nvals, capvals;
    PendingMember *mems; /* scratch stack of object members */
    size_t nmems, capmems;
    char *err;
} Parser;

static int fail(Parser *p, size_t at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(Parser *p, size_t at, const char *fmt, ...) {
    char msg[ML_ERRLEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return ml_error(p->err, "invalid JSON at byte %zu: %s", at, msg);
}

static int out_of_memory(Parser *p) {
    return ml_error(p->err, "out of memory while parsing JSON (%zu bytes)", p->len);
}

/* What sits at pos, for messages: 'x', byte 0x01, or end of input. */
static const char *describe(const Parser *p, size_t pos, char buf[24]) {
    if (pos >= p->len) return "end of input";
    unsigned char c = p->s[pos];
    if (c >= 0x20 && c < 0x7f)
        snprintf(buf, 24, "'%c'", c);
    else
        snprintf(buf, 24, "byte 0x%02x", c);
    return buf;
}

/* A key made safe for a one-line message: at most 60 bytes, unprintable
** bytes shown as '?'. */
static const char *printable_key(const char *key, size_t len, char buf[64]) {
    size_t n = len < 60 ? len : 60;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)key[i];
        buf[i] = (c >= 0x20 && c != 0x7f) ? (char)c : '?';
    }
    if (len > n) {
        memcpy(buf + n, "...", 3);
        n += 3;
    }
    buf[n] = '\0';
    return buf;
}

static void skip_ws(Parser *p) {
    while (p->pos < p->len) {
        unsigned char c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

static int is_digit(const Parser *p, size_t pos) {
    return pos < p->len && p->s[pos] >= '0' && p->s[pos] <= '9';
}

static int push_value(Parser *p, const JsonValue *v) {
    if (p->nvals == p->capvals) {
        size_t cap = p->capvals ? 2 * p->capvals : 64;
        if (cap > SIZE_MAX / sizeof *p->vals) return out_of_memory(p);
        JsonValue *q = realloc(p->vals, cap * sizeof *q);
        if (!q) return out_of_memory(p);
        p->vals = q;
        p->capvals = cap;
    }
    p->vals[p->nvals++] = *v;
    return 0;
}

static int push_member(Parser *p, const PendingMember *m) {
    if (p->nmems == p->capmems) {
        size_t cap = p->capmems ? 2 * p->capmems : 64;
        if (cap > SIZE_MAX / sizeof *p->mems) return out_of_memory(p);
        PendingMember *q = realloc(p->mems, cap * sizeof *q);
        if (!q) return out_of_memory(p);
        p->mems = q;
        p->capmems = cap;
    }
    p->mems[p->nmems++] = *m;
    return 0;
}

static int parse_value(Parser *p, JsonValue *out);

/* Length of the valid UTF-8 sequence at s (at most avail bytes), or 0 when it
** is invalid: overlong forms, surrogates and code points past U+10FFFF are. */
static size_t utf8_sequence(const unsigned char *s, size_t avail) {
    unsigned char c = s[0], lo = 0x80, hi = 0xBF;
    size_t n;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0) lo = 0xA0; /* overlong */
        if (c == 0xED) hi = 0x9F; /* surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90; /* overlong */
        if (c == 0xF4) hi = 0x8F; /* past U+10FFFF */
    } else {
        return 0;
    }
    if (avail < n || s[1] < lo || s[1] > hi) return 0;
    for (size_t k = 2; k < n; k++)
        if ((s[k] & 0xC0) != 0x80) return 0;
    return n;
}

static size_t utf8_encode(uint32_t cp, char *dst) {
    if (cp < 0x80) {
        dst[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        dst[0] = (char)(0xC0 | (cp >> 6));
        dst[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        dst[0] = (char)(0xE0 | (cp >> 12));
        dst[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        dst[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    dst[0] = (char)(0xF0 | (cp >> 18));
    dst[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    dst[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    dst[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* The four hex digits at s[at..at+4), which must lie before end. */
static int read_hex4(const Parser *p, size_t at, size_t end, uint32_t *cp) {
    if (at > end || end - at < 4) return -1;
    uint32_t v = 0;
    for (size_t k = 0; k < 4; k++) {
        unsigned char c = p->s[at + k];
        uint32_t d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return -1;
        v = v << 4 | d;
    }
    *cp = v;
    return 0;
}

/* A string at p->pos (which holds the opening quote), decoded into the arena.
** First pass: find the closing quote. Second pass: decode and validate. The
** decoded text is never longer than the raw text (an escape of 6 or 12 bytes
** yields at most 3 or 4), so one allocation of the raw size suffices. */
static int parse_string(Parser *p, const char **out, size_t *out_len) {
    const size_t start = p->pos;
    size_t i = start + 1;
    for (;;) {
        if (i >= p->len) return fail(p, start, "unterminated string");
        unsigned char c = p->s[i];
        if (c == '"') break;
        if (c == '\\') {
            i += 2; /* may step past len; the test above catches it */
            continue;
        }
        if (c < 0x20)
            return fail(p, i, "control character 0x%02x in string (must be escaped)", c);
        i++;
    }
    const size_t end = i; /* the closing quote */

    char *dst = arena_alloc(&p->doc->blocks, end - start);
    if (!dst) return out_of_memory(p);
    size_t o = 0;
    i = start + 1;
    while (i < end) {
        unsigned char c = p->s[i];
        if (c < 0x80 && c != '\\') {
            dst[o++] = (char)c;
            i++;
            continue;
        }
        if (c >= 0x80) {
            size_t n = utf8_sequence(p->s + i, end - i);
            if (!n) return fail(p, i, "invalid UTF-8 in string");
            memcpy(dst + o, p->s + i, n);
            o += n;
            i += n;
            continue;
        }
        /* A backslash: the first pass guarantees i + 1 < end. */
        unsigned char e = p->s[i + 1];
        switch (e) {
        case '"': case '\\': case '/': dst[o++] = (char)e; break;
        case 'b': dst[o++] = '\b'; break;
        case 'f': dst[o++] = '\f'; break;
        case 'n': dst[o++] = '\n'; break;
        case 'r': dst[o++] = '\r'; break;
        case 't': dst[o++] = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            if (read_hex4(p, i + 2, end, &cp))
                return fail(p, i, "invalid \\u escape (needs four hex digits)");
            if (cp >= 0xDC00 && cp <= 0xDFFF)
                return fail(p, i, "unpaired low surrogate \\u%04X", (unsigned)cp);
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (i + 7 >= end || p->s[i + 6] != '\\' || p->s[i + 7] != 'u' ||
                    read_hex4(p, i + 8, end, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                    return fail(p, i, "unpaired high surrogate \\u%04X", (unsigned)cp);
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                i += 6;
            }
            o += utf8_encode(cp, dst + o);
            i += 4;
            break;
        }
        default: {
            char buf[24];
            return fail(p, i, "invalid escape: backslash followed by %s",
                        describe(p, i + 1, buf));
        }
        }
        i += 2;
    }
    dst[o] = '\0';
    *out = dst;
    *out_len = o;
    p->pos = end + 1;
    return 0;
}

/* The JSON number grammar, checked byte by byte; the value then comes from
** strtod on a NUL-terminated copy, so it is exactly what strtod gives. */
static int parse_number(Parser *p, JsonValue *out) {
    const size_t start = p->pos;
    size_t i = start;
    if (p->s[i] == '-') i++;
    if (!is_digit(p, i)) return fail(p, i, "invalid number: expected a digit");
    if (p->s[i] == '0') {
        i++;
        if (is_digit(p, i)) return fail(p, start, "invalid number: leading zero");
    } else {
        while (is_digit(p, i)) i++;
    }
    if (i < p->len && p->s[i] == '.') {
        i++;
        if (!is_digit(p, i)) return fail(p, i, "invalid number: expected a digit after '.'");
        while (is_digit(p, i)) i++;
    }
    if (i < p->len && (p->s[i] == 'e' || p->s[i] == 'E')) {
        i++;
        if (i < p->len && (p->s[i] == '+' || p->s[i] == '-')) i++;
        if (!is_digit(p, i)) return fail(p, i, "invalid number: expected a digit in the exponent");
        while (is_digit(p, i)) i++;
    }

    size_t n = i - start;
    char small[64];
    char *buf = n < sizeof small ? small : malloc(n + 1);
    if (!buf) return out_of_memory(p);
    memcpy(buf, p->s + start, n);
    buf[n] = '\0';
    /* strtod follows the C locale's decimal point; JSON's is always '.'. */
    const char *dp = localeconv()->decimal_point;
    if (dp[0] != '.' && dp[0] != '\0' && dp[1] == '\0') {
        char *dot = strchr(buf, '.');
        if (dot) *dot = dp[0];
    }
    char *stop;
    errno = 0;
    double x = strtod(buf, &stop);
    int range = errno == ERANGE && isinf(x);
    int whole = stop == buf + n;
    if (buf != small) free(buf);
    if (range) return fail(p, start, "number out of range of a double");
    if (!whole) return fail(p, start, "number not readable in this locale");
    out->type = JSON_NUMBER;
    out->u.number = x;
    p->pos = i;
    return 0;
}

static int parse_literal(Parser *p, const char *word, JsonValue *out, JsonType type, int b) {
    size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n) != 0)
        return fail(p, p->pos, "invalid literal (expected %s)", word);
    p->pos += n;
    out->type = type;
    out->u.boolean = b;
    return 0;
}

static int key_order(const void *a, const void *b) {
    const PendingMember *x = *(const PendingMember *const *)a;
    const PendingMember *y = *(const PendingMember *const *)b;
    if (x->m.key_len != y->m.key_len) return x->m.key_len < y->m.key_len ? -1 : 1;
    int c = memcmp(x->m.key, y->m.key, x->m.key_len);
    if (c) return c;
    return (x->pos > y->pos) - (x->pos < y->pos);
}

static int same_key(const PendingMember *x, const PendingMember *y) {
    return x->m.key_len == y->m.key_len && memcmp(x->m.key, y->m.key, x->m.key_len) == 0;
}

/* Rejects a key seen twice among the n members at mems[base], naming the
** earliest second occurrence. Small objects compare all pairs; large ones
** sort pointers so that hostile input cannot make this quadratic. */
static int check_duplicates(Parser *p, size_t base, size_t n) {
    if (n < 2) return 0; /* and p->mems may still be NULL: no NULL + 0 */
    const PendingMember *m = p->mems + base;
    const PendingMember *dup = NULL;
    if (n <= 16) {
        for (size_t i = 1; i < n && !dup; i++)
            for (size_t j = 0; j < i; j++)
                if (same_key(&m[i], &m[j])) {
                    dup = &m[i];
                    break;
                }
    } else {
        const PendingMember **idx = malloc(n * sizeof *idx);
        if (!idx) return out_of_memory(p);
        for (size_t i = 0; i < n; i++) idx[i] = &m[i];
        qsort(idx, n, sizeof *idx, key_order);
        for (size_t i = 1; i < n; i++)
            if (same_key(idx[i], idx[i - 1]) && (!dup || idx[i]->pos < dup->pos))
                dup = idx[i];
        free(idx);
    }
    if (!dup) return 0;
    char buf[64];
    return fail(p, dup->pos, "duplicate key \"%s\"",
                printable_key(dup->m.key, dup->m.key_len, buf));
}

static int enter(Parser *p) {
    if (++p->depth > JSON_MAX_DEPTH)
        return fail(p, p->pos, "nesting deeper than %d levels", JSON_MAX_DEPTH);
    p->pos++; /* the opening bracket */
    skip_ws(p);
    return 0;
}

static int parse_array(Parser *p, JsonValue *out) {
    const size_t start = p->pos, base = p->nvals;
    char buf[24];
    if (enter(p)) return -1;
    if (p->pos < p->len && p->s[p->pos] == ']') {
        p->pos++;
    } else {
        for (;;) {
            JsonValue v;
            if (parse_value(p, &v) || push_value(p, &v)) return -1;
            skip_ws(p);
            if (p->pos < p->len && p->s[p->pos] == ',') {
                p->pos++;
                continue;
            }
            if (p->pos < p->len && p->s[p->pos] == ']') {
                p->pos++;
                break;
            }
            return fail(p, p->pos, "expected ',' or ']' in the array opened at byte %zu, found %s",
                        start, describe(p, p->pos, buf));
        }
    }
    size_t n = p->nvals - base;
    JsonValue *items = NULL;
    if (n) {
        items = arena_alloc(&p->doc->blocks, n * sizeof *items);
        if (!items) return out_of_memory(p);
        memcpy(items, p->vals + base, n * sizeof *items);
    }
    p->nvals = base;
    p->depth--;
    out->type = JSON_ARRAY;
    out->u.array.items = items;
    out->u.array.n = n;
    return 0;
}

static int parse_object(Parser *p, JsonValue *out) {
    const size_t start = p->pos, base = p->nmems;
    char buf[24];
    if (enter(p)) return -1;
    if (p->pos < p->len && p->s[p->pos] == '}') {
        p->pos++;
    } else {
        for (;;) {
            PendingMember pm;
            skip_ws(p);
            pm.pos = p->pos;
            if (p->pos >= p->len || p->s[p->pos] != '"')
                return fail(p, p->pos, "expected a string key in the object opened at byte %zu, found %s",
                            start, describe(p, p->pos, buf));
            if (parse_string(p, &pm.m.key, &pm.m.key_len)) return -1;
            skip_ws(p);
            if (p->pos >= p->len || p->s[p->pos] != ':')
                return fail(p, p->pos, "expected ':' after an object key, found %s",
                            describe(p, p->pos, buf));
            p->pos++;
            if (parse_value(p, &pm.m.value) || push_member(p, &pm)) return -1;
            skip_ws(p);
            if (p->pos < p->len && p->s[p->pos] == ',') {
                p->pos++;
                continue;
            }
            if (p->pos < p->len && p->s[p->pos] == '}') {
                p->pos++;
                break;
            }
            return fail(p, p->pos, "expected ',' or '}' in the object opened at byte %zu, found %s",
                        start, describe(p, p->pos, buf));
        }
    }
    size_t n = p->nmems - base;
    if (check_duplicates(p, base, n)) return -1;
    JsonMember *members = NULL;
    if (n) {
        members = arena_alloc(&p->doc->blocks, n * sizeof *members);
        if (!members) return out_of_memory(p);
        for (size_t i = 0; i < n; i++) members[i] = p->mems[base + i].m;
    }
    p->nmems = base;
    p->depth--;
    out->type = JSON_OBJECT;
    out->u.object.members = members;
    out->u.object.n = n;
    return 0;
}

static int parse_value(Parser *p, JsonValue *out) {
    char buf[24];
    skip_ws(p);
    if (p->pos >= p->len) return fail(p, p->pos, "expected a value, found end of input");
    switch (p->s[p->pos]) {
    case '{': return parse_object(p, out);
    case '[': return parse_array(p, out);
    case '"':
        out->type = JSON_STRING;
        return parse_string(p, &out->u.string.s, &out->u.string.len);
    case 't': return parse_literal(p, "true", out, JSON_BOOL, 1);
    case 'f': return parse_literal(p, "false", out, JSON_BOOL, 0);
    case 'n': return parse_literal(p, "null", out, JSON_NULL, 0);
    case '-': case '0': case '1': case '2': case '3': case '4':
    case '5': case '6': case '7': case '8': case '9':
        return parse_number(p, out);
    default:
        return fail(p, p->pos, "expected a value, found %s", describe(p, p->pos, buf));
    }
}

int json_parse(const char *text, size_t len, JsonValue **out, char *err) {
    *out = NULL;
    if (!text && len) return ml_error(err, "json_parse: NULL text of length %zu", len);
    JsonDoc *doc = calloc(1, sizeof *doc);
    if (!doc) return ml_error(err, "out of memory while parsing JSON");
    Parser p = {.s = (const unsigned char *)text, .len = len, .doc = doc, .err = err};
    int rc = parse_value(&p, &doc->root);
    if (rc == 0) {
        skip_ws(&p);
        if (p.pos < p.len) {
            char buf[24];
            rc = fail(&p, p.pos, "unexpected %s after the JSON value", describe(&p, p.pos, buf));
        }
    }
    free(p.vals);
    free(p.mems);
    if (rc) {
        json_free(&doc->root);
        return -1;
    }
    *out = &doc->root;
    return 0;
}

/* ------------------------------------------------------------------------
** Accessors.
*/

JsonType json_type(const JsonValue *v) { return v ? v->type : JSON_NONE; }

const char *json_type_name(JsonType t) {
    switch (t) {
    case JSON_NULL: return "null";
    case JSON_BOOL: return "boolean";
    case JSON_NUMBER: return "number";
    case JSON_STRING: return "string";
    case JSON_ARRAY: return "array";
    case JSON_OBJECT: return "object";
    default: return "nothing";
    }
}

int json_bool(const JsonValue *v) { return v && v->type == JSON_BOOL && v->u.boolean; }

double json_number(const JsonValue *v) {
    return v && v->type == JSON_NUMBER ? v->u.number : 0.0;
}

const char *json_string(const JsonValue *v) {
    return v && v->type == JSON_STRING ? v->u.string.s : NULL;
}

size_t json_string_len(const JsonValue *v) {
    return v && v->type == JSON_STRING ? v->u.string.len : 0;
}

size_t json_array_len(const JsonValue *v) {
    return v && v->type == JSON_ARRAY ? v->u.array.n : 0;
}

const JsonValue *json_array_at(const JsonValue *v, size_t i) {
    return i < json_array_len(v) ? &v->u.array.items[i] : NULL;
}

size_t json_object_len(const JsonValue *v) {
    return v && v->type == JSON_OBJECT ? v->u.object.n : 0;
}

const char *json_object_key_at(const JsonValue *v, size_t i) {
    return i < json_object_len(v) ? v->u.object.members[i].key : NULL;
}

size_t json_object_key_len_at(const JsonValue *v, size_t i) {
    return i < json_object_len(v) ? v->u.object.members[i].key_len : 0;
}

const JsonValue *json_object_value_at(const JsonValue *v, size_t i) {
    return i < json_object_len(v) ? &v->u.object.members[i].value : NULL;
}

const JsonValue *json_object_get(const JsonValue *v, const char *key) {
    if (!key) return NULL;
    size_t n = json_object_len(v), klen = strlen(key);
    for (size_t i = 0; i < n; i++) {
        const JsonMember *m = &v->u.object.members[i];
        if (m->key_len == klen && memcmp(m->key, key, klen) == 0) return &m->value;
    }
    return NULL;
}

/* ------------------------------------------------------------------------
** The writer.
*/

static int jb_reserve(JsonBuf *b, size_t extra) {
    if (b->failed) return -1;
    if (extra > SIZE_MAX / 2 - b->len) {
        b->failed = 1;
        return -1;
    }
    size_t need = b->len + extra + 1; /* + the NUL */
    if (need <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d) {
        b->failed = 1;
        return -1;
    }
    b->data = d;
    b->cap = cap;
    return 0;
}

static int jb_putn(JsonBuf *b, const char *s, size_t n) {
    if (jb_reserve(b, n)) return -1;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

static int jb_null_string(JsonBuf *b) {
    b->failed = 1;
    return -1;
}

int jb_puts(JsonBuf *b, const char *s) { return s ? jb_putn(b, s, strlen(s)) : jb_null_string(b); }

int jb_printf(JsonBuf *b, const char *fmt, ...) {
    char small[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->failed = 1;
        return -1;
    }
    if ((size_t)n < sizeof small) return jb_putn(b, small, (size_t)n);
    if (jb_reserve(b, (size_t)n)) return -1;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

/* Quotes and escapes n bytes; runs of plain bytes are copied whole. */
static int jb_string_n(JsonBuf *b, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    if (jb_putn(b, "\"", 1)) return -1;
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char u[7];
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        default:
            if (c < 0x20) {
                memcpy(u, "\\u00", 4);
                u[4] = hex[c >> 4];
                u[5] = hex[c & 15];
                u[6] = '\0';
                esc = u;
            }
        }
        if (!esc) continue;
        if (jb_putn(b, s + run, i - run) || jb_puts(b, esc)) return -1;
        run = i + 1;
    }
    if (jb_putn(b, s + run, n - run)) return -1;
    return jb_putn(b, "\"", 1);
}

int jb_string(JsonBuf *b, const char *s) {
    return s ? jb_string_n(b, s, strlen(s)) : jb_null_string(b);
}

int jb_number(JsonBuf *b, double x) {
    if (b->failed) return -1;
    if (!isfinite(x)) {
        b->failed = 1;
        return -1;
    }
    /* 15 significant digits print every decimal of up to 15 digits exactly
    ** (%g drops trailing zeros, so 0.1 stays "0.1"); 17 always round-trip. */
    char buf[40];
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, x);
        if (strtod(buf, NULL) == x) break;
    }
    const char *dp = localeconv()->decimal_point;
    if (dp[0] != '.' && dp[0] != '\0' && dp[1] == '\0') {
        char *c = strchr(buf, dp[0]);
        if (c) *c = '.';
    }
    return jb_puts(b, buf);
}

int jb_value(JsonBuf *b, const JsonValue *v) {
    switch (json_type(v)) {
    case JSON_NULL: return jb_puts(b, "null");
    case JSON_BOOL: return jb_puts(b, v->u.boolean ? "true" : "false");
    case JSON_NUMBER: return jb_number(b, v->u.number);
    case JSON_STRING: return jb_string_n(b, v->u.string.s, v->u.string.len);
    case JSON_ARRAY:
        jb_puts(b, "[");
        for (size_t i = 0; i < v->u.array.n; i++) {
            if (i) jb_puts(b, ",");
            jb_value(b, &v->u.array.items[i]);
        }
        return jb_puts(b, "]");
    case JSON_OBJECT:
        jb_puts(b, "{");
        for (size_t i = 0; i < v->u.object.n; i++) {
            const JsonMember *m = &v->u.object.members[i];
            if (i) jb_puts(b, ",");
            jb_string_n(b, m->key, m->key_len);
            jb_puts(b, ":");
            jb_value(b, &m->value);
        }
        return jb_puts(b, "}");
    default:
        b->failed = 1;
        return -1;
    }
}

void jb_free(JsonBuf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
    b->failed = 0;
}

/* A float as the shortest decimal that reads back as the same float, so that
** 1e-5f is written 1e-05 rather than 9.9999997473787516e-06. */
int jb_float(JsonBuf *b, float x) {
    char text[32];
    for (int digits = 1; digits <= 9; digits++) {
        snprintf(text, sizeof text, "%.*g", digits, (double)x);
        if ((float)strtod(text, NULL) == x) break;
    }
    return jb_number(b, strtod(text, NULL));
}
