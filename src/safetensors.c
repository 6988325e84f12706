/*
** safetensors.c — writing and validating safetensors checkpoints (see
** safetensors.h for the format).
**
** st_open trusts nothing in a file: every length and offset is checked against
** the bytes actually read before anything points into them, with unsigned
** 64-bit arithmetic that is checked for overflow. The header is parsed by the
** strict parser of json.c (which also rejects duplicate tensor names); the
** parsed header stays alive inside the StFile, because tensor names and
** metadata strings point into it.
*/
#include "safetensors.h"
#include "common.h"
#include "json.h"

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Tensor data is read and written in place as host floats. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors stores little-endian data; moelab supports little-endian hosts only"
#endif

#define ST_DATA_ALIGN 64
#define ST_METADATA_KEY "__metadata__"
/* Largest integer a JSON number (a double) holds exactly. */
#define ST_MAX_EXACT_INT 9007199254740992.0

typedef struct {
    StTensor t;
    uint64_t begin, end; /* byte offsets into the data buffer */
} StEntry;

struct StFile {
    JsonValue *header;     /* owns the tensor names and metadata strings */
    const JsonValue *meta; /* the __metadata__ object, or NULL */
    unsigned char *data;   /* the data buffer, ST_DATA_ALIGN-aligned */
    size_t data_len;
    int n;
    StEntry *entries;  /* (n) in header order */
    StEntry **by_name; /* (n) sorted by name, for st_find */
};

int64_t st_numel(const StTensor *t) {
    int64_t numel = 1;
    for (int d = 0; d < t->ndim; d++) numel *= t->shape[d];
    return numel;
}

/* A name made safe for a one-line message: at most 64 bytes (not cutting a
** UTF-8 sequence), control bytes shown as '?'. */
static const char *shown(const char *s, char buf[72]) {
    size_t n = strlen(s);
    int cut = n > 64;
    if (cut) {
        n = 64;
        while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80) n--;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        buf[i] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
    }
    if (cut) {
        memcpy(buf + n, "...", 3);
        n += 3;
    }
    buf[n] = '\0';
    return buf;
}

/* ------------------------------------------------------------------------
** Writing.
*/

/* Checks what the header cannot express or the reader would reject, and
** returns the tensor's byte size in *bytes. */
static int check_tensor(const StTensor *t, int i, uint64_t *bytes, char *err) {
    char nb[72];
    if (!t->name || !t->name[0]) return ml_error(err, "st_save: tensor %d has no name", i);
    if (strcmp(t->name, ST_METADATA_KEY) == 0)
        return ml_error(err, "st_save: '%s' is reserved and cannot name a tensor", ST_METADATA_KEY);
    if (t->ndim < 0 || t->ndim > ST_MAX_DIMS)
        return ml_error(err, "st_save: tensor '%s' has %d dimensions; 0 to %d are allowed",
                        shown(t->name, nb), t->ndim, ST_MAX_DIMS);
    uint64_t numel = 1;
    for (int d = 0; d < t->ndim; d++) {
        int64_t dim = t->shape[d];
        if (dim < 0 || (double)dim > ST_MAX_EXACT_INT)
            return ml_error(err, "st_save: tensor '%s' has dimension %d of size %" PRId64,
                            shown(t->name, nb), d, dim);
        if (dim && numel > UINT64_MAX / 4 / (uint64_t)dim)
            return ml_error(err, "st_save: tensor '%s' is too large", shown(t->name, nb));
        numel *= (uint64_t)dim;
    }
    if (numel && !t->data)
        return ml_error(err, "st_save: tensor '%s' has no data", shown(t->name, nb));
    *bytes = 4 * numel;
    return 0;
}

/* The JSON header, padded with spaces to a multiple of 8 bytes. */
static int build_header(JsonBuf *h, const StTensor *tensors, const uint64_t *bytes, int n,
                        const char *const *meta_keys, const char *const *meta_values,
                        int n_meta) {
    jb_puts(h, "{");
    if (n_meta > 0) {
        jb_string(h, ST_METADATA_KEY);
        jb_puts(h, ":{");
        for (int i = 0; i < n_meta; i++) {
            if (i) jb_puts(h, ",");
            jb_string(h, meta_keys[i]);
            jb_puts(h, ":");
            jb_string(h, meta_values[i]);
        }
        jb_puts(h, "}");
    }
    uint64_t offset = 0;
    for (int i = 0; i < n; i++) {
        const StTensor *t = &tensors[i];
        if (i || n_meta > 0) jb_puts(h, ",");
        jb_string(h, t->name);
        jb_puts(h, ":{\"dtype\":\"F32\",\"shape\":[");
        for (int d = 0; d < t->ndim; d++)
            jb_printf(h, d ? ",%" PRId64 : "%" PRId64, t->shape[d]);
        jb_printf(h, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", offset, offset + bytes[i]);
        offset += bytes[i];
    }
    jb_puts(h, "}");
    while (h->len % 8) jb_puts(h, " ");
    return h->failed ? -1 : 0;
}

int st_save(const char *path, const StTensor *tensors, int n,
            const char *const *meta_keys, const char *const *meta_values, int n_meta,
            char *err) {
    if (n < 0 || n_meta < 0 || (n && !tensors) || (n_meta && (!meta_keys || !meta_values)))
        return ml_error(err, "st_save: invalid arguments for %s", path);
    for (int i = 0; i < n_meta; i++) {
        if (!meta_keys[i] || !meta_values[i])
            return ml_error(err, "st_save: metadata pair %d is NULL", i);
        for (int j = 0; j < i; j++)
            if (strcmp(meta_keys[i], meta_keys[j]) == 0)
                return ml_error(err, "st_save: metadata key '%s' given twice", meta_keys[i]);
    }

    uint64_t *bytes = malloc((size_t)(n ? n : 1) * sizeof *bytes);
    char *tmp = malloc(strlen(path) + 5);
    JsonBuf h = {0};
    FILE *fp = NULL;
    int rc = -1, created = 0;
    if (!bytes || !tmp) {
        ml_error(err, "st_save: out of memory");
        goto done;
    }
    for (int i = 0; i < n; i++) {
        if (check_tensor(&tensors[i], i, &bytes[i], err)) goto done;
        /* Quadratic, but checkpoints hold hundreds of tensors, not millions. */
        for (int j = 0; j < i; j++)
            if (strcmp(tensors[i].name, tensors[j].name) == 0) {
                char nb[72];
                ml_error(err, "st_save: tensor name '%s' given twice", shown(tensors[i].name, nb));
                goto done;
            }
    }
    if (build_header(&h, tensors, bytes, n, meta_keys, meta_values, n_meta)) {
        ml_error(err, "st_save: out of memory building the header for %s", path);
        goto done;
    }
    if (h.len > ST_MAX_HEADER_BYTES) {
        ml_error(err, "st_save: header for %s would be %zu bytes, over the %d-byte limit",
                 path, h.len, ST_MAX_HEADER_BYTES);
        goto done;
    }

    sprintf(tmp, "%s.tmp", path);
    fp = fopen(tmp, "wb");
    if (!fp) {
        ml_error(err, "cannot create %s: %s", tmp, strerror(errno));
        goto done;
    }
    created = 1;
    unsigned char len8[8];
    for (int k = 0; k < 8; k++) len8[k] = (unsigned char)((uint64_t)h.len >> (8 * k));
    int ok = fwrite(len8, 1, 8, fp) == 8 && fwrite(h.data, 1, h.len, fp) == h.len;
    for (int i = 0; ok && i < n; i++)
        ok = bytes[i] == 0 || fwrite(tensors[i].data, 1, bytes[i], fp) == bytes[i];
    /* Sync before the rename, so that after a crash path holds either the old
    ** checkpoint or the whole new one. */
    ok = ok && fflush(fp) == 0 && fsync(fileno(fp)) == 0;
    if (!ok) {
        ml_error(err, "cannot write %s: %s", tmp, strerror(errno));
        goto done;
    }
    int closed = fclose(fp);
    fp = NULL;
    if (closed != 0) {
        ml_error(err, "cannot write %s: %s", tmp, strerror(errno));
        goto done;
    }
    if (rename(tmp, path) != 0) {
        ml_error(err, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        goto done;
    }
    rc = 0;

done:
    if (fp) fclose(fp);
    if (rc && created) remove(tmp);
    free(tmp);
    free(bytes);
    jb_free(&h);
    return rc;
}

/* ------------------------------------------------------------------------
** Reading.
*/

void st_close(StFile *f) {
    if (!f) return;
    json_free(f->header);
    free(f->data);
    free(f->entries);
    free(f->by_name);
    free(f);
}

/* Reads exactly n bytes, or says why not. */
static int read_exact(FILE *fp, void *dst, size_t n, const char *path, const char *what,
                      char *err) {
    if (n == 0 || fread(dst, 1, n, fp) == n) return 0;
    if (ferror(fp)) return ml_error(err, "%s: cannot read the %s: %s", path, what, strerror(errno));
    return ml_error(err, "%s: file ended while reading the %s (did it change?)", path, what);
}

/* "a number", "an object", ... for messages. */
static const char *a_type(const JsonValue *v) {
    switch (json_type(v)) {
    case JSON_NULL: return "null";
    case JSON_BOOL: return "a boolean";
    case JSON_NUMBER: return "a number";
    case JSON_STRING: return "a string";
    case JSON_ARRAY: return "an array";
    case JSON_OBJECT: return "an object";
    default: return "missing";
    }
}

/* A JSON number that is an integer from 0 to 2^53, as an unsigned. */
static int as_count(const JsonValue *v, uint64_t *out) {
    if (json_type(v) != JSON_NUMBER) return -1;
    double x = json_number(v);
    if (!(x >= 0 && x <= ST_MAX_EXACT_INT) || x != floor(x)) return -1;
    *out = (uint64_t)x;
    return 0;
}

static int check_metadata(const JsonValue *meta, const char *path, char *err) {
    if (json_type(meta) != JSON_OBJECT)
        return ml_error(err, "%s: %s is %s, not an object of strings", path, ST_METADATA_KEY,
                        a_type(meta));
    char nb[72];
    for (size_t i = 0; i < json_object_len(meta); i++) {
        const char *key = json_object_key_at(meta, i);
        const JsonValue *v = json_object_value_at(meta, i);
        if (strlen(key) != json_object_key_len_at(meta, i))
            return ml_error(err, "%s: a %s key contains a NUL byte", path, ST_METADATA_KEY);
        if (json_type(v) != JSON_STRING)
            return ml_error(err, "%s: %s value '%s' is %s, not a string", path, ST_METADATA_KEY,
                            shown(key, nb), a_type(v));
        if (strlen(json_string(v)) != json_string_len(v))
            return ml_error(err, "%s: %s value '%s' contains a NUL byte", path, ST_METADATA_KEY,
                            shown(key, nb));
    }
    return 0;
}

/* One tensor entry of the header: dtype, shape, and offsets within a data
** buffer of data_len bytes. */
static int check_entry(StEntry *e, const char *name, const JsonValue *info, size_t data_len,
                       const char *path, char *err) {
    char nb[72], db[72];
    const char *nm = shown(name, nb);
    if (json_type(info) != JSON_OBJECT)
        return ml_error(err, "%s: tensor '%s' is described by %s, not an object", path, nm,
                        a_type(info));

    const JsonValue *dtype = json_object_get(info, "dtype");
    if (!dtype) return ml_error(err, "%s: tensor '%s' has no dtype", path, nm);
    if (json_type(dtype) != JSON_STRING)
        return ml_error(err, "%s: tensor '%s' has a dtype that is %s, not a string", path, nm,
                        a_type(dtype));
    if (strcmp(json_string(dtype), "F32") != 0 || json_string_len(dtype) != 3)
        return ml_error(err, "%s: tensor '%s' has dtype %s; moelab reads F32 only", path, nm,
                        shown(json_string(dtype), db));

    const JsonValue *shape = json_object_get(info, "shape");
    if (!shape) return ml_error(err, "%s: tensor '%s' has no shape", path, nm);
    if (json_type(shape) != JSON_ARRAY)
        return ml_error(err, "%s: tensor '%s' has a shape that is %s, not an array", path, nm,
                        a_type(shape));
    size_t ndim = json_array_len(shape);
    if (ndim > ST_MAX_DIMS)
        return ml_error(err, "%s: tensor '%s' has %zu dimensions; moelab reads at most %d", path,
                        nm, ndim, ST_MAX_DIMS);
    uint64_t numel = 1;
    e->t.ndim = (int)ndim;
    for (size_t d = 0; d < ndim; d++) {
        uint64_t dim;
        if (as_count(json_array_at(shape, d), &dim))
            return ml_error(err, "%s: tensor '%s' has shape[%zu] that is not a non-negative integer",
                            path, nm, d);
        if (dim && numel > UINT64_MAX / 4 / dim)
            return ml_error(err, "%s: tensor '%s' has a shape whose size overflows", path, nm);
        numel *= dim;
        e->t.shape[d] = (int64_t)dim;
    }

    const JsonValue *off = json_object_get(info, "data_offsets");
    if (!off) return ml_error(err, "%s: tensor '%s' has no data_offsets", path, nm);
    if (json_array_len(off) != 2 || as_count(json_array_at(off, 0), &e->begin) ||
        as_count(json_array_at(off, 1), &e->end))
        return ml_error(err, "%s: tensor '%s' has data_offsets that are not [begin, end] "
                        "non-negative integers", path, nm);
    if (e->begin > e->end)
        return ml_error(err, "%s: tensor '%s' has data_offsets [%" PRIu64 ", %" PRIu64
                        "] with begin after end", path, nm, e->begin, e->end);
    if (e->end > data_len)
        return ml_error(err, "%s: tensor '%s' ends at byte %" PRIu64 ", past the end of the %zu-byte "
                        "data buffer", path, nm, e->end, data_len);
    if (e->end - e->begin != 4 * numel)
        return ml_error(err, "%s: tensor '%s' has data_offsets spanning %" PRIu64 " bytes, but its "
                        "shape holds %" PRIu64 " F32 values (%" PRIu64 " bytes)", path, nm,
                        e->end - e->begin, numel, 4 * numel);
    e->t.name = name;
    return 0;
}

static int by_offsets(const void *a, const void *b) {
    const StEntry *x = *(const StEntry *const *)a, *y = *(const StEntry *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return (x->end > y->end) - (x->end < y->end);
}

static int by_name(const void *a, const void *b) {
    return strcmp((*(const StEntry *const *)a)->t.name, (*(const StEntry *const *)b)->t.name);
}

/* The tensors must tile the data buffer: sorted by offset, each begins where
** the previous one ended, and the last ends at the end of the buffer. This is
** the reference implementation's rule; it also makes every offset a multiple
** of 4, hence every data pointer aligned for float. */
static int check_layout(StFile *f, const char *path, char *err) {
    char nb[72], pb[72];
    StEntry **order = f->by_name; /* borrowed; sorted by name afterwards */
    for (int i = 0; i < f->n; i++) order[i] = &f->entries[i];
    qsort(order, (size_t)f->n, sizeof *order, by_offsets);
    uint64_t covered = 0;
    for (int i = 0; i < f->n; i++) {
        const StEntry *e = order[i];
        if (e->begin < covered)
            return ml_error(err, "%s: tensors '%s' and '%s' overlap in the data buffer", path,
                            shown(order[i - 1]->t.name, pb), shown(e->t.name, nb));
        if (e->begin > covered)
            return ml_error(err, "%s: %" PRIu64 " unused bytes before tensor '%s' in the data "
                            "buffer", path, e->begin - covered, shown(e->t.name, nb));
        covered = e->end;
    }
    if (covered != f->data_len)
        return ml_error(err, "%s: the data buffer has %zu bytes but the tensors cover %" PRIu64,
                        path, f->data_len, covered);
    for (int i = 0; i < f->n; i++) {
        StEntry *e = &f->entries[i];
        assert(e->begin % 4 == 0);
        e->t.data = (float *)(void *)(f->data + e->begin);
    }
    qsort(order, (size_t)f->n, sizeof *order, by_name);
    return 0;
}

/* Everything in the header, against the data buffer already in f. */
static int check_header(StFile *f, const char *path, char *err) {
    const JsonValue *root = f->header;
    if (json_type(root) != JSON_OBJECT)
        return ml_error(err, "%s: header is %s, not a JSON object", path,
                        a_type(root));
    size_t n = json_object_len(root);
    f->meta = json_object_get(root, ST_METADATA_KEY);
    if (f->meta && check_metadata(f->meta, path, err)) return -1;
    if (f->meta) n--;
    if (n > INT32_MAX) return ml_error(err, "%s: too many tensors (%zu)", path, n);

    f->entries = calloc(n ? n : 1, sizeof *f->entries);
    f->by_name = calloc(n ? n : 1, sizeof *f->by_name);
    if (!f->entries || !f->by_name) return ml_error(err, "%s: out of memory", path);
    for (size_t i = 0; i < json_object_len(root); i++) {
        const char *name = json_object_key_at(root, i);
        const JsonValue *info = json_object_value_at(root, i);
        if (info == f->meta) continue;
        if (strlen(name) != json_object_key_len_at(root, i))
            return ml_error(err, "%s: a tensor name contains a NUL byte", path);
        if (check_entry(&f->entries[f->n], name, info, f->data_len, path, err)) return -1;
        f->n++;
    }
    return check_layout(f, path, err);
}

int st_open(const char *path, StFile **out, char *err) {
    *out = NULL;
    char *header = NULL;
    int rc = -1;
    StFile *f = calloc(1, sizeof *f);
    if (!f) return ml_error(err, "%s: out of memory", path);
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        ml_error(err, "cannot open %s: %s", path, strerror(errno));
        goto done;
    }
    struct stat st;
    if (fstat(fileno(fp), &st) != 0) {
        ml_error(err, "cannot stat %s: %s", path, strerror(errno));
        goto done;
    }
    if (!S_ISREG(st.st_mode)) {
        ml_error(err, "%s: not a regular file", path);
        goto done;
    }
    uint64_t size = (uint64_t)st.st_size;
    if (size < 8) {
        ml_error(err, "%s: file is %" PRIu64 " bytes, too short for the 8-byte header length",
                 path, size);
        goto done;
    }
    unsigned char len8[8];
    if (read_exact(fp, len8, 8, path, "header length", err)) goto done;
    uint64_t n = 0;
    for (int k = 7; k >= 0; k--) n = n << 8 | len8[k];
    if (n > size - 8) {
        ml_error(err, "%s: header length %" PRIu64 " runs past the end of the file (%" PRIu64
                 " bytes); not a safetensors file, or truncated", path, n, size);
        goto done;
    }
    if (n > ST_MAX_HEADER_BYTES) {
        ml_error(err, "%s: header length %" PRIu64 " is over the %d-byte limit", path, n,
                 ST_MAX_HEADER_BYTES);
        goto done;
    }
    if (size - 8 - n > SIZE_MAX - ST_DATA_ALIGN) {
        ml_error(err, "%s: file too large for this machine", path);
        goto done;
    }
    header = malloc(n ? n : 1);
    f->data_len = (size_t)(size - 8 - n);
    /* aligned_alloc wants a size that is a multiple of the alignment. */
    size_t cap = (f->data_len + ST_DATA_ALIGN) / ST_DATA_ALIGN * ST_DATA_ALIGN;
    f->data = aligned_alloc(ST_DATA_ALIGN, cap);
    if (!header || !f->data) {
        ml_error(err, "%s: out of memory reading %" PRIu64 " bytes", path, size);
        goto done;
    }
    if (read_exact(fp, header, n, path, "header", err) ||
        read_exact(fp, f->data, f->data_len, path, "data", err))
        goto done;

    char jerr[ML_ERRLEN];
    if (json_parse(header, n, &f->header, jerr)) {
        ml_error(err, "%s: header: %s", path, jerr);
        goto done;
    }
    if (check_header(f, path, err)) goto done;
    rc = 0;

done:
    if (fp) fclose(fp);
    free(header);
    if (rc) {
        st_close(f);
        return -1;
    }
    *out = f;
    return 0;
}

const char *st_metadata(const StFile *f, const char *key) {
    return json_string(json_object_get(f->meta, key));
}

int st_count(const StFile *f) { return f->n; }

int st_tensor_at(const StFile *f, int i, StTensor *out) {
    if (i < 0 || i >= f->n) return -1;
    *out = f->entries[i].t;
    return 0;
}

int st_find(const StFile *f, const char *name, StTensor *out) {
    int lo = 0, hi = f->n;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(name, f->by_name[mid]->t.name);
        if (c == 0) {
            *out = f->by_name[mid]->t;
            return 0;
        }
        if (c < 0) hi = mid;
        else lo = mid + 1;
    }
    return -1;
}
