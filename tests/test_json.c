/*
** test_json.c — tests of the strict JSON parser and writer (src/json.c).
**
** Every input is parsed from a heap buffer of exactly its length, with no NUL
** after it, so that running under AddressSanitizer catches any read past len.
** Build: gcc -std=c11 -D_GNU_SOURCE -Isrc tests/test_json.c src/json.c
**        src/common.c -lcmocka -lm
*/
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "json.h"

/* Parses the first len bytes of text from an exact-size copy. */
static int parse_exact(const char *text, size_t len, JsonValue **out, char *err) {
    char *copy = malloc(len ? len : 1);
    assert_non_null(copy);
    memcpy(copy, text, len);
    int rc = json_parse(copy, len, out, err);
    free(copy);
    return rc;
}

static JsonValue *parse_ok(const char *text) {
    JsonValue *v = NULL;
    char err[ML_ERRLEN] = "";
    if (parse_exact(text, strlen(text), &v, err) != 0)
        fail_msg("expected %s to parse, got: %s", text, err);
    assert_non_null(v);
    return v;
}

/* Expects a failure whose message contains `needle` (NULL: any message). */
static void parse_fails(const char *text, size_t len, const char *needle) {
    JsonValue *v = (JsonValue *)1;
    char err[ML_ERRLEN] = "";
    if (parse_exact(text, len, &v, err) == 0) fail_msg("expected %.*s to fail", (int)len, text);
    assert_null(v);
    assert_true(strlen(err) > 0);
    assert_non_null(strstr(err, "at byte "));
    if (needle && !strstr(err, needle))
        fail_msg("error for %.*s was \"%s\", expected it to contain \"%s\"", (int)len, text, err,
                 needle);
}

static void fails(const char *text, const char *needle) { parse_fails(text, strlen(text), needle); }

/* The compact text of a value, as a string the caller frees. */
static char *written(const JsonValue *v) {
    JsonBuf b = {0};
    assert_int_equal(jb_value(&b, v), 0);
    assert_false(b.failed);
    return b.data;
}

static void test_scalars(void **state) {
    (void)state;
    JsonValue *v = parse_ok(" null ");
    assert_int_equal(json_type(v), JSON_NULL);
    json_free(v);
    v = parse_ok("true");
    assert_int_equal(json_type(v), JSON_BOOL);
    assert_int_equal(json_bool(v), 1);
    json_free(v);
    v = parse_ok("\tfalse\r\n");
    assert_int_equal(json_bool(v), 0);
    assert_int_equal(json_type(v), JSON_BOOL);
    json_free(v);
    v = parse_ok("\"hi\"");
    assert_string_equal(json_string(v), "hi");
    assert_int_equal(json_string_len(v), 2);
    json_free(v);
    v = parse_ok("42");
    assert_true(json_number(v) == 42.0);
    json_free(v);
}

static void test_numbers_match_strtod(void **state) {
    (void)state;
    static const char *cases[] = {
        "1e-5", "-0.5", "3e-3", "0.1", "0", "-0", "2.5E+10", "1e-400",
        "123456789012345678901234567890", "1.7976931348623157e308", "4.9e-324",
        "2.2250738585072011e-308", "0.30000000000000004", "9007199254740993",
        "0.1000000000000000055511151231257827021181583404541015625", "-12.5e-1",
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        JsonValue *v = parse_ok(cases[i]);
        assert_int_equal(json_type(v), JSON_NUMBER);
        double got = json_number(v), want = strtod(cases[i], NULL);
        if (memcmp(&got, &want, sizeof got) != 0)
            fail_msg("%s parsed as %.17g, strtod gives %.17g", cases[i], got, want);
        json_free(v);
    }
}

static void test_number_rejects(void **state) {
    (void)state;
    fails("01", "leading zero");
    fails("-01", "leading zero");
    fails("1.", "at byte 2:");
    fails(".5", "at byte 0:");
    fails("+1", "at byte 0:");
    fails("1e", "exponent");
    fails("1e+", "exponent");
    fails("-", "at byte 1:");
    fails("--1", "at byte 1:");
    fails("NaN", NULL);
    fails("Infinity", NULL);
    fails("-Infinity", NULL);
    fails("0x10", "at byte 1:");
    fails("1e400", "out of range");
    fails("-1e400", "out of range");
    fails("[1.5e]", "at byte 5:");
}

static void test_strings_and_escapes(void **state) {
    (void)state;
    JsonValue *v = parse_ok("\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\"");
    assert_string_equal(json_string(v), "a\"b\\c/d\b\f\n\r\t");
    json_free(v);

    v = parse_ok("\"caf\\u00e9 \\u20AC \\uD83D\\uDE00 \\u0041\"");
    assert_string_equal(json_string(v), "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80 A");
    json_free(v);

    v = parse_ok("\"raw \xC3\xA9 \xF0\x9F\x98\x80\"");
    assert_string_equal(json_string(v), "raw \xC3\xA9 \xF0\x9F\x98\x80");
    json_free(v);

    v = parse_ok("\"a\\u0000b\"");
    assert_int_equal(json_string_len(v), 3);
    assert_memory_equal(json_string(v), "a\0b", 4);
    json_free(v);

    v = parse_ok("\"\"");
    assert_string_equal(json_string(v), "");
    json_free(v);
}

static void test_string_rejects(void **state) {
    (void)state;
    fails("\"\\uD83D\"", "unpaired high surrogate");
    fails("\"\\uD83D\\u0041\"", "unpaired high surrogate");
    fails("\"\\uD83Dx\"", "unpaired high surrogate");
    fails("\"\\uDE00\"", "unpaired low surrogate");
    fails("\"ab\\x\"", "at byte 3:");
    fails("\"\\u12G4\"", "\\u escape");
    fails("\"\\u12\"", "\\u escape");
    fails("\"a\x01" "b\"", "control character");
    fails("\"a\tb\"", "at byte 2:");
    fails("\"a\nb\"", "control character");
    fails("\"\xC0\x80\"", "UTF-8");
    fails("\"\xFF\"", "UTF-8");
    fails("\"\xED\xA0\x80\"", "UTF-8");     /* an encoded surrogate */
    fails("\"\xF4\x90\x80\x80\"", "UTF-8"); /* past U+10FFFF */
    fails("\"\xE2\x82\"", "UTF-8");         /* cut short */
    fails("'single'", "at byte 0:");
}

static void test_unterminated(void **state) {
    (void)state;
    fails("\"abc", "unterminated string");
    fails("\"abc\\\"", "unterminated string");
    fails("\"\\", "unterminated string");
    fails("[\"a", "at byte 1:");
    fails("[1,2", "at byte 4:");
    fails("{\"a\":1", "at byte 6:");
    fails("{\"a\"", "at byte 4:");
    fails("{\"a\":", "at byte 5:");
    fails("[", "end of input");
    fails("{", "at byte 1:");
    fails("", "at byte 0:");
    fails("   ", "at byte 3:");
}

static void test_trailing_garbage(void **state) {
    (void)state;
    fails("{} x", "at byte 3:");
    fails("1 2", "at byte 2:");
    fails("[1]]", "at byte 3:");
    fails("nullx", "at byte 4:");
    fails("truefalse", "at byte 4:");
    fails("{}{}", "at byte 2:");
    fails("[1,]", "at byte 3:");
    fails("{\"a\":1,}", "at byte 7:");
    fails("[1 2]", "at byte 3:");
    fails("{\"a\" 1}", "at byte 5:");
    fails("{1:2}", "at byte 1:");
    fails("[1,,2]", "at byte 3:");
    fails("  nul", "at byte 2:");
    fails("[tru]", "at byte 1:");
    parse_fails("\"a\"\0", 4, "at byte 3:"); /* a NUL is not whitespace */
}

static void test_depth_limit(void **state) {
    (void)state;
    enum { N = 10000 };
    char *bomb = malloc(2 * N);
    assert_non_null(bomb);
    memset(bomb, '[', N);
    memset(bomb + N, ']', N);
    parse_fails(bomb, N, "deeper than 64");
    parse_fails(bomb, 2 * N, "deeper than 64");

    /* Exactly JSON_MAX_DEPTH levels parse; one more does not. */
    int d = JSON_MAX_DEPTH;
    memcpy(bomb + d, bomb + N, (size_t)d);
    JsonValue *v = NULL;
    char err[ML_ERRLEN];
    assert_int_equal(parse_exact(bomb, 2 * (size_t)d, &v, err), 0);
    json_free(v);
    memset(bomb, '[', N);
    memset(bomb + d + 1, ']', (size_t)d + 1);
    parse_fails(bomb, 2 * (size_t)d + 2, "at byte 64:");

    /* Objects count too. */
    char *obj = malloc(5 * N);
    assert_non_null(obj);
    for (int i = 0; i < N; i++) memcpy(obj + 5 * i, "{\"a\":", 5);
    parse_fails(obj, 5 * N, "deeper than 64");
    free(obj);
    free(bomb);
}

static void test_duplicate_keys(void **state) {
    (void)state;
    fails("{\"a\":1,\"b\":2,\"a\":3}", "at byte 13: duplicate key \"a\"");
    fails("{\"x\":{\"k\":1,\"k\":1}}", "at byte 12: duplicate key \"k\"");

    /* A large object takes the sorting path; the earliest repeat is named. */
    JsonBuf b = {0};
    jb_puts(&b, "{");
    for (int i = 0; i < 100; i++) jb_printf(&b, "%s\"k%d\":%d", i ? "," : "", i, i);
    size_t cut = b.len;
    jb_puts(&b, ",\"k57\":0,\"k3\":0}");
    JsonValue *v = NULL;
    char err[ML_ERRLEN] = "";
    assert_int_equal(parse_exact(b.data, b.len, &v, err), -1);
    char want[64];
    snprintf(want, sizeof want, "at byte %zu: duplicate key \"k57\"", cut + 1);
    if (!strstr(err, want)) fail_msg("got \"%s\", wanted \"%s\"", err, want);

    /* Without the repeats it parses, in order. */
    b.data[cut] = '}';
    assert_int_equal(parse_exact(b.data, cut + 1, &v, err), 0);
    assert_int_equal(json_object_len(v), 100);
    assert_string_equal(json_object_key_at(v, 57), "k57");
    assert_true(json_number(json_object_get(v, "k99")) == 99.0);
    json_free(v);
    jb_free(&b);

    /* Keys that differ only after an embedded NUL are different keys. */
    v = parse_ok("{\"a\\u0000b\":1,\"a\\u0000c\":2}");
    assert_int_equal(json_object_len(v), 2);
    assert_int_equal(json_object_key_len_at(v, 1), 3);
    json_free(v);
    fails("{\"a\\u0000b\":1,\"a\\u0000b\":2}", "duplicate key");
}

static void test_not_nul_terminated(void **state) {
    (void)state;
    static const char *ok[] = {"123", "-0.5e-3", "[1,2]", "{\"k\":[true,false,null]}",
                               "\"\\u20ac\"", "0", "true", "  7  "};
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) json_free(parse_ok(ok[i]));
    static const char *bad[] = {"tru", "\"ab", "-", "1e", "[1", "{\"a", "\"\\u12", "\"\\uD83D\\u",
                                "\"\xE2\x82", "nul", "fals", "\"\\"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) fails(bad[i], NULL);

    /* Only len bytes count, whatever follows them. */
    JsonValue *v = NULL;
    char err[ML_ERRLEN];
    assert_int_equal(json_parse("[1,2]garbage", 5, &v, err), 0);
    assert_int_equal(json_array_len(v), 2);
    json_free(v);
    assert_int_equal(json_parse("12345", 2, &v, err), 0);
    assert_true(json_number(v) == 12.0);
    json_free(v);
}

static void test_roundtrip_nested(void **state) {
    (void)state;
    const char *text =
        "{ \"layers\": 4, \"d_model\" : 128, \"norm\": \"layernorm\", \"tied\": false,\n"
        "  \"moe\": {\"every\": 1, \"experts\": 8,\n"
        "           \"router\": {\"kind\": \"topk\", \"k\": 2, \"capacity_factor\": 0},\n"
        "           \"aux\": {\"balance\": 0.01, \"z\": 1e-3}},\n"
        "  \"lr\": 3e-3, \"list\": [[], {}, [null, true, -0.5, \"\\u00e9\\n\\\"\"]],\n"
        "  \"zeta\": \"last\" }";
    const char *compact =
        "{\"layers\":4,\"d_model\":128,\"norm\":\"layernorm\",\"tied\":false,"
        "\"moe\":{\"every\":1,\"experts\":8,\"router\":{\"kind\":\"topk\",\"k\":2,"
        "\"capacity_factor\":0},\"aux\":{\"balance\":0.01,\"z\":0.001}},"
        "\"lr\":0.003,\"list\":[[],{},[null,true,-0.5,\"\xC3\xA9\\n\\\"\"]],\"zeta\":\"last\"}";
    JsonValue *v = parse_ok(text);
    char *out = written(v);
    assert_string_equal(out, compact);

    /* Writing is a fixed point of parse-then-write. */
    JsonValue *again = parse_ok(out);
    char *out2 = written(again);
    assert_string_equal(out2, out);

    /* Accessors see the same tree. */
    const JsonValue *router = json_object_get(json_object_get(v, "moe"), "router");
    assert_string_equal(json_string(json_object_get(router, "kind")), "topk");
    assert_true(json_number(json_object_get(router, "k")) == 2.0);
    assert_true(json_number(json_object_get(v, "lr")) == 3e-3);
    assert_int_equal(json_object_len(v), 8);
    assert_string_equal(json_object_key_at(v, 0), "layers");
    assert_string_equal(json_object_key_at(v, 7), "zeta");
    const JsonValue *list = json_object_get(v, "list");
    assert_int_equal(json_array_len(list), 3);
    assert_int_equal(json_type(json_array_at(list, 0)), JSON_ARRAY);
    assert_int_equal(json_array_len(json_array_at(list, 0)), 0);
    assert_int_equal(json_type(json_array_at(list, 1)), JSON_OBJECT);
    assert_int_equal(json_object_len(json_array_at(list, 1)), 0);
    free(out);
    free(out2);
    json_free(again);
    json_free(v);
}

/* Empty containers as whole documents: the parser's scratch stacks are still
** unallocated then (clang's UBSan caught NULL + 0 in the duplicate-key check
** on "{}"), and the accessors must read nothing from the empty member lists. */
static void test_empty_containers(void **state) {
    (void)state;
    const char *texts[] = {"{}", "[]", " { } ", "\t[ ]\n", "[{}]", "{\"a\":{}}", "[[],[]]"};
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        JsonValue *v = parse_ok(texts[i]);
        char *out = written(v);
        JsonValue *again = parse_ok(out);
        char *out2 = written(again);
        assert_string_equal(out2, out);
        free(out);
        free(out2);
        json_free(again);
        json_free(v);
    }

    JsonValue *obj = parse_ok("{}");
    assert_int_equal(json_type(obj), JSON_OBJECT);
    assert_int_equal(json_object_len(obj), 0);
    assert_null(json_object_key_at(obj, 0));
    assert_int_equal(json_object_key_len_at(obj, 0), 0);
    assert_null(json_object_value_at(obj, 0));
    assert_null(json_object_get(obj, ""));
    assert_null(json_object_get(obj, "a"));
    assert_int_equal(json_array_len(obj), 0);
    char *text = written(obj);
    assert_string_equal(text, "{}");
    free(text);
    json_free(obj);

    JsonValue *arr = parse_ok("[]");
    assert_int_equal(json_type(arr), JSON_ARRAY);
    assert_int_equal(json_array_len(arr), 0);
    assert_null(json_array_at(arr, 0));
    assert_int_equal(json_object_len(arr), 0);
    text = written(arr);
    assert_string_equal(text, "[]");
    free(text);
    json_free(arr);

    JsonValue *nested = parse_ok("{\"a\":{},\"b\":[]}");
    const JsonValue *a = json_object_get(nested, "a"), *b = json_object_get(nested, "b");
    assert_int_equal(json_type(a), JSON_OBJECT);
    assert_int_equal(json_object_len(a), 0);
    assert_null(json_object_get(a, "a"));
    assert_int_equal(json_type(b), JSON_ARRAY);
    assert_null(json_array_at(b, 0));
    json_free(nested);
}

static void test_accessors_on_wrong_types(void **state) {
    (void)state;
    JsonValue *v = parse_ok("{\"n\":1,\"s\":\"x\",\"a\":[1]}");
    const JsonValue *n = json_object_get(v, "n"), *s = json_object_get(v, "s");
    const JsonValue *a = json_object_get(v, "a");
    assert_null(json_object_get(v, "missing"));
    assert_null(json_object_get(n, "n"));
    assert_int_equal(json_type(NULL), JSON_NONE);
    assert_null(json_string(n));
    assert_true(json_number(s) == 0.0);
    assert_int_equal(json_bool(n), 0);
    assert_int_equal(json_array_len(v), 0);
    assert_int_equal(json_object_len(a), 0);
    assert_null(json_array_at(a, 1));
    assert_non_null(json_array_at(a, 0));
    assert_null(json_object_key_at(v, 3));
    assert_null(json_object_value_at(v, 3));
    assert_true(json_number(json_object_value_at(v, 0)) == 1.0);
    assert_string_equal(json_type_name(JSON_OBJECT), "object");
    json_free(v);
    json_free(NULL);
}

static void number_is(double x, const char *want) {
    JsonBuf b = {0};
    assert_int_equal(jb_number(&b, x), 0);
    assert_string_equal(b.data, want);
    jb_free(&b);
}

static void test_writer_numbers(void **state) {
    (void)state;
    number_is(3, "3");
    number_is(-0.5, "-0.5");
    number_is(0.1, "0.1");
    number_is(1e-5, "1e-05");
    number_is(3e-3, "0.003");
    number_is(1e300, "1e+300");
    number_is(123456789, "123456789");
    number_is(0.1 + 0.2, "0.30000000000000004");
    number_is(-0.0, "-0");

    JsonBuf b = {0};
    assert_int_equal(jb_number(&b, NAN), -1);
    assert_true(b.failed);
    assert_int_equal(jb_puts(&b, "x"), -1); /* failure is sticky */
    jb_free(&b);
    assert_int_equal(jb_number(&b, INFINITY), -1);
    jb_free(&b);
    assert_int_equal(jb_number(&b, -INFINITY), -1);
    jb_free(&b);

    /* Random finite doubles come back bit for bit through the parser. */
    uint64_t s = 0x9E3779B97F4A7C15u;
    for (int i = 0; i < 20000; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        double x;
        memcpy(&x, &s, sizeof x);
        if (!isfinite(x)) continue;
        jb_free(&b);
        assert_int_equal(jb_number(&b, x), 0);
        JsonValue *v = NULL;
        char err[ML_ERRLEN];
        if (json_parse(b.data, b.len, &v, err)) fail_msg("%s: %s", b.data, err);
        double y = json_number(v);
        if (memcmp(&x, &y, sizeof x) != 0) fail_msg("%.17g written as %s", x, b.data);
        json_free(v);
    }
    jb_free(&b);
}

static void test_writer_strings(void **state) {
    (void)state;
    const char *raw = "a\"b\\c\n\x01\x1f\t\xC3\xA9/";
    JsonBuf b = {0};
    assert_int_equal(jb_string(&b, raw), 0);
    assert_string_equal(b.data, "\"a\\\"b\\\\c\\n\\u0001\\u001f\\t\xC3\xA9/\"");
    JsonValue *v = parse_ok(b.data);
    assert_string_equal(json_string(v), raw);
    json_free(v);
    jb_free(&b);

    /* jb_printf beyond its stack buffer; jb_puts of nothing. */
    char big[1000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    assert_int_equal(jb_printf(&b, "[\"%s\",%d]", big, 7), 0);
    assert_int_equal(jb_puts(&b, ""), 0);
    assert_int_equal(b.len, 1005);
    v = parse_ok(b.data);
    assert_int_equal(json_string_len(json_array_at(v, 0)), 999);
    json_free(v);
    jb_free(&b);
    assert_null(b.data);
}

/* Seeded random edits of a valid document: each must parse (and then write
** and re-parse) or fail with an offset; never crash or over-read. */
static void test_mutations(void **state) {
    (void)state;
    const char *seed =
        "{\"a\":[1,2.5e-3,-0,true,false,null],\"b\":{\"c\":\"d\\u00e9\\uD83D\\uDE00\\n\"},"
        "\"e\":[[[[]]]],\"f\":\"\xC3\xA9\",\"g\":12345678901234567890}";
    const char alphabet[] = "{}[]\",:\\u0123456789.eE+-tfnl \x01\x80\xC3\xED\xFF";
    size_t n = strlen(seed);
    uint64_t s = 12345;
    int parsed = 0;
    for (int iter = 0; iter < 5000; iter++) {
        char *buf = malloc(n);
        assert_non_null(buf);
        memcpy(buf, seed, n);
        size_t len = n;
        int edits = 1 + iter % 4;
        for (int k = 0; k < edits; k++) {
            s ^= s << 13, s ^= s >> 7, s ^= s << 17;
            size_t at = (size_t)(s >> 8) % len;
            switch (s % 3) {
            case 0: buf[at] = alphabet[(s >> 40) % (sizeof alphabet - 1)]; break;
            case 1: buf[at] = (char)(s >> 32); break;
            case 2: len = at; break; /* truncate */
            }
            if (len == 0) break;
        }
        JsonValue *v = NULL;
        char err[ML_ERRLEN] = "";
        if (json_parse(buf, len, &v, err) == 0) {
            parsed++;
            char *out = written(v);
            JsonValue *again = parse_ok(out);
            json_free(again);
            free(out);
            json_free(v);
        } else {
            assert_null(v);
            assert_non_null(strstr(err, "at byte"));
        }
        free(buf);
    }
    assert_true(parsed > 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_scalars),
        cmocka_unit_test(test_numbers_match_strtod),
        cmocka_unit_test(test_number_rejects),
        cmocka_unit_test(test_strings_and_escapes),
        cmocka_unit_test(test_string_rejects),
        cmocka_unit_test(test_unterminated),
        cmocka_unit_test(test_trailing_garbage),
        cmocka_unit_test(test_depth_limit),
        cmocka_unit_test(test_duplicate_keys),
        cmocka_unit_test(test_not_nul_terminated),
        cmocka_unit_test(test_roundtrip_nested),
        cmocka_unit_test(test_empty_containers),
        cmocka_unit_test(test_accessors_on_wrong_types),
        cmocka_unit_test(test_writer_numbers),
        cmocka_unit_test(test_writer_strings),
        cmocka_unit_test(test_mutations),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
