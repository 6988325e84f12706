/*
** safetensors.h — moelab's checkpoints: safetensors files of F32 tensors.
**
** The format is the one PyTorch's `safetensors` library reads: an 8-byte
** little-endian header length N, N bytes of JSON header, then the data buffer.
** The header maps each tensor name to {"dtype","shape","data_offsets"} (byte
** offsets into the data buffer) and may hold "__metadata__", an object of
** string -> string; moelab stores its configuration there as "moelab_config".
**
** st_save writes a whole file atomically (a temporary file, then rename).
** st_open reads a whole file and validates every part of it before returning,
** the way the reference implementation does and a little more: one dtype (F32),
** at most 4 dimensions, tensors that tile the data buffer exactly (no overlap,
** no gap, nothing after the last). A file that passes can be read without
** further checks; one that fails gets a message naming the problem and tensor.
*/
#ifndef MOELAB_SAFETENSORS_H
#define MOELAB_SAFETENSORS_H

#include <stdint.h>

#define ST_MAX_DIMS 4
#define ST_MAX_HEADER_BYTES 100000000 /* the reference implementation's limit */

/* One F32 tensor, row-major. ndim may be 0 (a scalar, one element). */
typedef struct {
    const char *name;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    float *data;
} StTensor;

/* Writes n tensors, contiguous in the order given, and n_meta metadata pairs
** (keys and values NUL-terminated UTF-8; n_meta may be 0). The header is padded
** with spaces to a multiple of 8 bytes. Writes `path.tmp`, syncs it and renames
** it over path, so a crash never leaves a partial checkpoint at path. */
int st_save(const char *path, const StTensor *tensors, int n,
            const char *const *meta_keys, const char *const *meta_values, int n_meta,
            char *err);

/* A validated file in memory. Its data buffer is 64-byte aligned, so every
** tensor's data pointer is aligned for float. */
typedef struct StFile StFile;

int st_open(const char *path, StFile **out, char *err);
void st_close(StFile *f); /* NULL is fine */

/* The metadata value for key, or NULL. Valid until st_close. */
const char *st_metadata(const StFile *f, const char *key);

/* Tensors in header order. out->name and out->data point into f, valid until
** st_close; the data may be modified in place. Both return -1 (and leave out
** untouched) when i is out of range or no tensor has that name. */
int st_count(const StFile *f);
int st_tensor_at(const StFile *f, int i, StTensor *out);
int st_find(const StFile *f, const char *name, StTensor *out);

/* Elements in a tensor: the product of its shape (1 for a scalar). */
int64_t st_numel(const StTensor *t);

#endif
