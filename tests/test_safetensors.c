/*
** test_safetensors.c — tests of checkpoint writing and validation
** (src/safetensors.c): exact round trips, the bytes of the format, and a suite
** of hostile files (truncations, lying headers, random corruption) that must
** each fail with a message and never crash; run it under AddressSanitizer.
** Files live in a mkdtemp directory under /tmp, removed at the end.
** Build: gcc -std=c11 -D_GNU_SOURCE -Isrc tests/test_safetensors.c
**        src/safetensors.c src/json.c src/common.c -lcmocka -lm
*/
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "json.h"
#include "safetensors.h"

static char tmpdir[64];

static int make_tmpdir(void **state) {
    (void)state;
    strcpy(tmpdir, "/tmp/moelab_st_XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int remove_tmpdir(void **state) {
    (void)state;
    DIR *d = opendir(tmpdir);
    if (!d) return -1;
    struct dirent *e;
    char p[512];
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        snprintf(p, sizeof p, "%s/%s", tmpdir, e->d_name);
        unlink(p);
    }
    closedir(d);
    return rmdir(tmpdir);
}

static const char *tmp_path(const char *name) {
    static char p[256];
    snprintf(p, sizeof p, "%s/%s", tmpdir, name);
    return p;
}

static void write_bytes(const char *path, const void *data, size_t len) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(data, 1, len, fp), len);
    assert_int_equal(fclose(fp), 0);
}

static unsigned char *read_bytes(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    unsigned char *buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
    *len = (size_t)n;
    return buf;
}

static uint64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int k = 7; k >= 0; k--) v = v << 8 | p[k];
    return v;
}

/* A file with the given header (unpadded) and data_len bytes of data. */
static void write_st(const char *path, uint64_t header_len, const char *header, size_t data_len) {
    size_t hl = strlen(header);
    unsigned char *buf = calloc(1, 8 + hl + data_len);
    assert_non_null(buf);
    for (int k = 0; k < 8; k++) buf[k] = (unsigned char)(header_len >> (8 * k));
    memcpy(buf + 8, header, hl);
    write_bytes(path, buf, 8 + hl + data_len);
    free(buf);
}

/* Expects st_open to fail with a message containing needle. */
static void open_fails(const char *path, const char *needle) {
    StFile *f = (StFile *)1;
    char err[ML_ERRLEN] = "";
    if (st_open(path, &f, err) == 0) fail_msg("expected %s to be rejected (%s)", path, needle);
    assert_null(f);
    if (!strstr(err, needle)) fail_msg("error was \"%s\", expected \"%s\"", err, needle);
}

static void header_fails(const char *header, size_t data_len, const char *needle) {
    const char *path = tmp_path("crafted.safetensors");
    write_st(path, strlen(header), header, data_len);
    open_fails(path, needle);
}

static void header_loads(const char *header, size_t data_len) {
    const char *path = tmp_path("crafted.safetensors");
    write_st(path, strlen(header), header, data_len);
    StFile *f = NULL;
    char err[ML_ERRLEN] = "";
    if (st_open(path, &f, err)) fail_msg("expected %s to load: %s", header, err);
    st_close(f);
}

static int64_t numel(const StTensor *t) { return st_numel(t); }

/* ---------------------------------------------------------------------- */

enum { NT = 6 };
static float scalar[1], vec[5], mat[3 * 4], cube[2 * 3 * 2], quad[2 * 1 * 3 * 2];

/* Six tensors of 0 to 4 dimensions (one empty), filled with awkward values:
** NaN payloads, signed zeros, subnormals, infinities. */
static void sample_tensors(StTensor t[NT]) {
    static const uint32_t special[] = {0x7fc00001u, 0x80000000u, 0x00000001u, 0x7f800000u,
                                       0xff800000u, 0x3f800000u, 0x807fffffu, 0x7fbfffffu};
    float *all[] = {scalar, vec, mat, cube, quad};
    size_t sizes[] = {1, 5, 12, 12, 12};
    uint32_t x = 1;
    for (int a = 0; a < 5; a++)
        for (size_t i = 0; i < sizes[a]; i++) {
            x = x * 1664525u + 1013904223u;
            uint32_t bits = (i % 3 == 0) ? special[(x >> 8) % 8] : x;
            memcpy(&all[a][i], &bits, 4);
        }
    t[0] = (StTensor){"ln_f.bias", 0, {0}, scalar};
    t[1] = (StTensor){"h.0.ln_1.weight", 1, {5}, vec};
    t[2] = (StTensor){"h.0.attn.qkv.weight", 2, {3, 4}, mat};
    t[3] = (StTensor){"h.0.moe.experts.1.fc.weight", 3, {2, 3, 2}, cube};
    t[4] = (StTensor){"empty", 2, {0, 3}, NULL};
    t[5] = (StTensor){"wte.weight", 4, {2, 1, 3, 2}, quad};
}

static const char *config_json =
    "{\"layers\":4,\"d_model\":128,\"norm\":\"layernorm\",\"note\":\"caf\xC3\xA9 \\\"q\\\"\"}";

static void save_sample(const char *path) {
    StTensor t[NT];
    sample_tensors(t);
    const char *keys[] = {"moelab_config", "format"};
    const char *values[] = {config_json, "pt"};
    char err[ML_ERRLEN] = "";
    if (st_save(path, t, NT, keys, values, 2, err)) fail_msg("st_save: %s", err);
}

static void test_roundtrip(void **state) {
    (void)state;
    const char *path = tmp_path("model.safetensors");
    save_sample(path);
    save_sample(path); /* saving over an existing checkpoint works too */
    char tmp[300];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    assert_int_equal(access(tmp, F_OK), -1);

    StTensor want[NT];
    sample_tensors(want);
    StFile *f = NULL;
    char err[ML_ERRLEN] = "";
    if (st_open(path, &f, err)) fail_msg("st_open: %s", err);
    assert_int_equal(st_count(f), NT);
    for (int i = 0; i < NT; i++) {
        StTensor got, found;
        assert_int_equal(st_tensor_at(f, i, &got), 0);
        assert_string_equal(got.name, want[i].name);
        assert_int_equal(got.ndim, want[i].ndim);
        for (int d = 0; d < got.ndim; d++) assert_int_equal(got.shape[d], want[i].shape[d]);
        assert_int_equal(numel(&got), numel(&want[i]));
        assert_int_equal((uintptr_t)got.data % sizeof(float), 0);
        if (numel(&got)) assert_memory_equal(got.data, want[i].data, 4 * (size_t)numel(&got));
        assert_int_equal(st_find(f, want[i].name, &found), 0);
        assert_ptr_equal(found.data, got.data);
        assert_string_equal(found.name, got.name);
    }
    StTensor first, none = {0};
    st_tensor_at(f, 0, &first);
    assert_int_equal((uintptr_t)first.data % 64, 0);
    assert_int_equal(st_find(f, "missing", &none), -1);
    assert_int_equal(st_find(f, "", &none), -1);
    assert_null(none.name);
    assert_int_equal(st_tensor_at(f, NT, &none), -1);
    assert_int_equal(st_tensor_at(f, -1, &none), -1);
    assert_string_equal(st_metadata(f, "moelab_config"), config_json);
    assert_string_equal(st_metadata(f, "format"), "pt");
    assert_null(st_metadata(f, "missing"));
    st_close(f);
    st_close(NULL);
}

static void test_empty_file(void **state) {
    (void)state;
    const char *path = tmp_path("empty.safetensors");
    char err[ML_ERRLEN] = "";
    assert_int_equal(st_save(path, NULL, 0, NULL, NULL, 0, err), 0);
    size_t len;
    unsigned char *bytes = read_bytes(path, &len);
    assert_int_equal(len, 16);
    assert_memory_equal(bytes, "\x08\0\0\0\0\0\0\0{}      ", 16);
    free(bytes);
    StFile *f = NULL;
    assert_int_equal(st_open(path, &f, err), 0);
    assert_int_equal(st_count(f), 0);
    assert_null(st_metadata(f, "moelab_config"));
    StTensor t;
    assert_int_equal(st_find(f, "x", &t), -1);
    st_close(f);
}

/* The bytes the reference implementation writes for the same tensors (from
** its own serialization tests): same key order, same padding, same data. */
static void expect_reference_bytes(const char *name, int ndim, const int64_t *shape,
                                   const char *const *meta, const char *json) {
    float data[6] = {0, 1, 2, 3, 4, 5};
    StTensor t = {name, ndim, {0}, data};
    for (int d = 0; d < ndim; d++) t.shape[d] = shape[d];
    const char *path = tmp_path("reference.safetensors");
    char err[ML_ERRLEN] = "";
    int n = name ? 1 : 0;
    if (st_save(path, &t, n, meta, meta ? meta + 1 : NULL, meta ? 1 : 0, err))
        fail_msg("st_save: %s", err);

    size_t jl = strlen(json), padded = (jl + 7) / 8 * 8, data_len = n ? 24 : 0;
    unsigned char *want = malloc(8 + padded + data_len);
    assert_non_null(want);
    for (int k = 0; k < 8; k++) want[k] = (unsigned char)((uint64_t)padded >> (8 * k));
    memcpy(want + 8, json, jl);
    memset(want + 8 + jl, ' ', padded - jl);
    for (size_t i = 0; i < data_len / 4; i++) { /* little-endian IEEE 754 */
        uint32_t bits;
        memcpy(&bits, &data[i], 4);
        for (int k = 0; k < 4; k++) want[8 + padded + 4 * i + k] = (unsigned char)(bits >> (8 * k));
    }
    size_t len;
    unsigned char *got = read_bytes(path, &len);
    assert_int_equal(len, 8 + padded + data_len);
    assert_memory_equal(got, want, len);
    free(got);
    free(want);
}

static void test_reference_bytes(void **state) {
    (void)state;
    const int64_t s3[] = {1, 2, 3}, s4[] = {1, 1, 2, 3};
    expect_reference_bytes("attn.0", 3, s3, NULL,
                           "{\"attn.0\":{\"dtype\":\"F32\",\"shape\":[1,2,3],\"data_offsets\":[0,24]}}");
    expect_reference_bytes("attn0", 4, s4, NULL,
                           "{\"attn0\":{\"dtype\":\"F32\",\"shape\":[1,1,2,3],\"data_offsets\":[0,24]}}");
    const char *meta[] = {"framework", "pt"};
    expect_reference_bytes(NULL, 0, NULL, meta, "{\"__metadata__\":{\"framework\":\"pt\"}}");
}

/* Reads the header of a saved file by hand, as another implementation would. */
static void test_header_layout(void **state) {
    (void)state;
    const char *path = tmp_path("layout.safetensors");
    save_sample(path);
    size_t len;
    unsigned char *bytes = read_bytes(path, &len);
    assert_true(len >= 8);
    uint64_t n = le64(bytes);
    assert_int_equal(n % 8, 0);
    assert_true(8 + n <= len);
    assert_int_equal(bytes[8], '{');

    JsonValue *h = NULL;
    char err[ML_ERRLEN] = "";
    if (json_parse((const char *)bytes + 8, n, &h, err)) fail_msg("header: %s", err);
    assert_int_equal(json_type(h), JSON_OBJECT);
    const JsonValue *meta = json_object_get(h, "__metadata__");
    assert_int_equal(json_type(meta), JSON_OBJECT);
    assert_string_equal(json_string(json_object_get(meta, "moelab_config")), config_json);

    StTensor want[NT];
    sample_tensors(want);
    assert_int_equal(json_object_len(h), NT + 1);
    uint64_t offset = 0;
    for (int i = 0; i < NT; i++) {
        const JsonValue *e = json_object_get(h, want[i].name);
        assert_int_equal(json_type(e), JSON_OBJECT);
        assert_string_equal(json_string(json_object_get(e, "dtype")), "F32");
        const JsonValue *shape = json_object_get(e, "shape");
        assert_int_equal(json_array_len(shape), want[i].ndim);
        for (int d = 0; d < want[i].ndim; d++)
            assert_true(json_number(json_array_at(shape, d)) == (double)want[i].shape[d]);
        const JsonValue *off = json_object_get(e, "data_offsets");
        assert_int_equal(json_array_len(off), 2);
        uint64_t b = (uint64_t)json_number(json_array_at(off, 0));
        uint64_t end = (uint64_t)json_number(json_array_at(off, 1));
        assert_int_equal(b, offset); /* contiguous, in the order given */
        assert_int_equal(end - b, 4 * (uint64_t)numel(&want[i]));
        for (int64_t k = 0; k < numel(&want[i]); k++) {
            uint32_t bits;
            memcpy(&bits, &want[i].data[k], 4);
            const unsigned char *p = bytes + 8 + n + b + 4 * k;
            assert_int_equal(p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24, bits);
        }
        offset = end;
    }
    assert_int_equal(8 + n + offset, len);
    json_free(h);
    free(bytes);
}

static void test_save_rejects(void **state) {
    (void)state;
    const char *path = tmp_path("rejected.safetensors");
    float x[4] = {0};
    char err[ML_ERRLEN];
    StTensor dup[2] = {{"a", 1, {4}, x}, {"a", 1, {4}, x}};
    assert_int_equal(st_save(path, dup, 2, NULL, NULL, 0, err), -1);
    assert_non_null(strstr(err, "given twice"));
    StTensor five = {"t", 5, {1, 1, 1, 1}, x};
    assert_int_equal(st_save(path, &five, 1, NULL, NULL, 0, err), -1);
    assert_non_null(strstr(err, "5 dimensions"));
    StTensor neg = {"t", 2, {2, -2}, x};
    assert_int_equal(st_save(path, &neg, 1, NULL, NULL, 0, err), -1);
    StTensor reserved = {"__metadata__", 1, {4}, x};
    assert_int_equal(st_save(path, &reserved, 1, NULL, NULL, 0, err), -1);
    StTensor nodata = {"t", 1, {4}, NULL};
    assert_int_equal(st_save(path, &nodata, 1, NULL, NULL, 0, err), -1);
    assert_int_equal(access(path, F_OK), -1);

    StTensor ok = {"t", 1, {4}, x};
    assert_int_equal(st_save("/nonexistent-dir/x.safetensors", &ok, 1, NULL, NULL, 0, err), -1);
    assert_non_null(strstr(err, "/nonexistent-dir/x.safetensors.tmp"));
    assert_non_null(strstr(err, "No such file"));
}

static void test_open_rejects_unreadable(void **state) {
    (void)state;
    open_fails(tmp_path("does-not-exist"), "No such file");
    open_fails(tmpdir, "not a regular file");
}

/* Every proper prefix of a valid file is invalid, and must say so. */
static void test_truncated_everywhere(void **state) {
    (void)state;
    const char *full = tmp_path("full.safetensors"), *cut = tmp_path("cut.safetensors");
    StTensor t[2] = {{"a", 2, {2, 2}, (float[]){1, 2, 3, 4}}, {"b", 1, {3}, (float[]){5, 6, 7}}};
    const char *k[] = {"moelab_config"}, *v[] = {"{\"layers\":1}"};
    char err[ML_ERRLEN] = "";
    assert_int_equal(st_save(full, t, 2, k, v, 1, err), 0);
    size_t len;
    unsigned char *bytes = read_bytes(full, &len);
    for (size_t n = 0; n < len; n++) {
        write_bytes(cut, bytes, n);
        StFile *f = (StFile *)1;
        err[0] = '\0';
        if (st_open(cut, &f, err) == 0) fail_msg("prefix of %zu/%zu bytes was accepted", n, len);
        assert_null(f);
        assert_true(strlen(err) > 0);
        assert_non_null(strstr(err, cut));
    }
    free(bytes);
}

static void test_header_length(void **state) {
    (void)state;
    const char *path = tmp_path("length.safetensors");
    write_st(path, UINT64_MAX, "{}", 0);
    open_fails(path, "runs past the end of the file");
    write_st(path, (uint64_t)1 << 63, "{}", 0);
    open_fails(path, "runs past the end of the file");
    write_st(path, 3, "{}", 0); /* one byte past the end */
    open_fails(path, "runs past the end of the file");
    write_bytes(path, "\x02\0\0\0", 4);
    open_fails(path, "too short");
    write_st(path, 0, "", 0);
    open_fails(path, "header: invalid JSON at byte 0");

    /* A header length over the limit, in a (sparse) file long enough for it. */
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    uint64_t n = ST_MAX_HEADER_BYTES + 1;
    unsigned char len8[8];
    for (int k = 0; k < 8; k++) len8[k] = (unsigned char)(n >> (8 * k));
    assert_int_equal(fwrite(len8, 1, 8, fp), 8);
    assert_int_equal(ftruncate(fileno(fp), (off_t)(8 + n + 16)), 0);
    fclose(fp);
    open_fails(path, "over the 100000000-byte limit");
    unlink(path);
}

static void test_bad_headers(void **state) {
    (void)state;
    header_fails("{\"a\":", 0, "header: invalid JSON at byte 5");
    header_fails("[]", 0, "header is an array, not a JSON object");
    header_fails("{\"a\":{}}\xff", 0, "header: invalid JSON at byte 8");
    header_fails("{\"a\":1}", 0, "tensor 'a' is described by a number, not an object");
    header_fails("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "tensor 'a' has no dtype");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "tensor 'a' has no shape");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "tensor 'a' has no data_offsets");
    header_fails("{\"a\":{\"dtype\":32,\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                 "dtype that is a number");
    header_fails("{\"x\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4,
                 "tensor 'x' has dtype BF16; moelab reads F32 only");
    header_fails("{\"x\":{\"dtype\":\"F32\\u0000\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                 "moelab reads F32 only");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":{},\"data_offsets\":[0,4]}}", 4,
                 "shape that is an object, not an array");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4,
                 "shape[0] that is not a non-negative integer");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[2, 1.5],\"data_offsets\":[0,12]}}", 12,
                 "shape[1]");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}", 4, "shape[0]");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,4]}}", 4, "shape[0]");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
                 "5 dimensions; moelab reads at most 4");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],"
                 "\"data_offsets\":[0,4]}}", 4, "overflows");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":4}}", 4,
                 "not [begin, end]");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, "not [begin, end]");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8,
                 "not [begin, end]");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4,
                 "not [begin, end]");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[\"0\",4]}}", 4,
                 "not [begin, end]");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", 8,
                 "begin after end");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4,
                 "tensor 'a' ends at byte 8, past the end of the 4-byte data buffer");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,1e30]}}", 4,
                 "not [begin, end]");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4,
                 "tensor 'a' has data_offsets spanning 4 bytes, but its shape holds 2 F32 values");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                 "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12,
                 "tensors 'a' and 'b' overlap");
    header_fails("{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]},"
                 "\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}}", 12, "overlap");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                 "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "overlap");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                 "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}", 20,
                 "4 unused bytes before tensor 'b'");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12,
                 "unused bytes before tensor 'a'");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 12,
                 "the data buffer has 12 bytes but the tensors cover 8");
    header_fails("{}", 4, "the data buffer has 4 bytes");
    header_fails("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                 "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8,
                 "duplicate key \"a\"");
    header_fails("{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                 "tensor name contains a NUL");
    header_fails("{\"__metadata__\":\"x\"}", 0, "__metadata__ is a string, not an object");
    header_fails("{\"__metadata__\":{\"k\":1}}", 0, "__metadata__ value 'k' is a number");
    header_fails("{\"__metadata__\":{\"k\":\"a\\u0000\"}}", 0, "contains a NUL");
    header_fails("{\"__metadata__\":{\"k\\u0000\":\"a\"}}", 0, "key contains a NUL");
    header_fails("{\"line\\nbreak\":{\"dtype\":\"I8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
                 "tensor 'line?break' has dtype I8");

    /* And what the format allows: padding, extra keys, zero-size tensors. */
    header_loads("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":[]}}   ", 8);
    header_loads("{\"z\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[0,0]},"
                 "\"a\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]},"
                 "\"y\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]}}", 4);
    header_loads("{\"__metadata__\":{}}", 0);
}

/* Seeded random corruption of a valid file, mostly in its header: each
** result must load (and then be fully readable) or fail with a message. */
static void test_random_corruption(void **state) {
    (void)state;
    const char *good = tmp_path("good.safetensors"), *bad = tmp_path("bad.safetensors");
    save_sample(good);
    size_t len;
    unsigned char *orig = read_bytes(good, &len);
    uint64_t hlen = le64(orig);
    unsigned char *buf = malloc(len);
    assert_non_null(buf);
    uint64_t s = 0x2545F4914F6CDD1Du;
    int loaded = 0, rejected = 0;
    for (int iter = 0; iter < 600; iter++) {
        memcpy(buf, orig, len);
        int flips = 1 + iter % 3;
        for (int k = 0; k < flips; k++) {
            s ^= s << 13, s ^= s >> 7, s ^= s << 17;
            size_t at = iter % 10 == 0 ? (size_t)(s >> 16) % len          /* anywhere */
                                       : 8 + (size_t)((s >> 16) % hlen); /* the header */
            if (iter % 4 == 0)
                buf[at] ^= (unsigned char)(1u << (s % 8)); /* one bit */
            else
                buf[at] = (unsigned char)("0123456789[]{}\",:-.e \\"[(s >> 40) % 23] ^
                                          (iter % 7 == 0 ? (s >> 48) & 0xff : 0));
        }
        write_bytes(bad, buf, len);
        StFile *f = NULL;
        char err[ML_ERRLEN] = "";
        if (st_open(bad, &f, err) == 0) {
            loaded++;
            double sum = 0;
            for (int i = 0; i < st_count(f); i++) {
                StTensor t;
                assert_int_equal(st_tensor_at(f, i, &t), 0);
                assert_true(t.ndim >= 0 && t.ndim <= ST_MAX_DIMS);
                for (int64_t e = 0; e < st_numel(&t); e++) sum += fabs(t.data[e]) > 1 ? 1 : 0;
                StTensor same;
                assert_int_equal(st_find(f, t.name, &same), 0);
            }
            (void)sum;
            st_close(f);
        } else {
            rejected++;
            assert_null(f);
            if (!strstr(err, bad)) fail_msg("message without the path: %s", err);
        }
    }
    assert_true(rejected > 0);
    assert_true(loaded > 0); /* some flips land in padding, names or data */
    free(buf);
    free(orig);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_empty_file),
        cmocka_unit_test(test_reference_bytes),
        cmocka_unit_test(test_header_layout),
        cmocka_unit_test(test_save_rejects),
        cmocka_unit_test(test_open_rejects_unreadable),
        cmocka_unit_test(test_truncated_everywhere),
        cmocka_unit_test(test_header_length),
        cmocka_unit_test(test_bad_headers),
        cmocka_unit_test(test_random_corruption),
    };
    return cmocka_run_group_tests(tests, make_tmpdir, remove_tmpdir);
}
