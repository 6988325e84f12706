/*
** fuzz_config.c — libFuzzer harness for the configuration reader
** (config_from_json and config_from_checkpoint_json in src/config.c).
**
** Both readers get the input as it is. A configuration either reader accepts
** must pass config_validate, and its JSON form (config_to_json, what a
** checkpoint stores) must read back, strictly, as the same configuration:
** what moelab accepts it must be able to save and load.
*/
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "config.h"

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "fuzz_config: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
            abort();                                                                 \
        }                                                                            \
    } while (0)

static void read_with(int (*reader)(ModelConfig *, const char *, size_t, char *),
                      const char *text, size_t size) {
    ModelConfig c;
    char err[ML_ERRLEN] = "";
    config_defaults(&c);
    if (reader(&c, text, size, err) != 0) {
        CHECK(err[0] != '\0');
        return;
    }
    if (config_validate(&c, err) != 0) {
        fprintf(stderr, "fuzz_config: accepted, then refused by config_validate: %s\n", err);
        abort();
    }
    char *json = config_to_json(&c);
    CHECK(json != NULL);
    ModelConfig back;
    config_defaults(&back);
    if (config_from_json(&back, json, strlen(json), err) != 0) {
        fprintf(stderr, "fuzz_config: config_to_json's text does not read back: %s\n%s\n", err,
                json);
        abort();
    }
    /* config_defaults zeroes both structs first, padding included. */
    if (memcmp(&c, &back, sizeof c) != 0) {
        fprintf(stderr, "fuzz_config: config_to_json's text reads back differently:\n%s\n", json);
        abort();
    }
    free(json);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size ? size : 1); /* exact size: no NUL after it */
    if (!text) return 0;
    memcpy(text, data, size);
    read_with(config_from_json, text, size);
    read_with(config_from_checkpoint_json, text, size);
    free(text);
    return 0;
}
