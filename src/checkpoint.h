/*
** checkpoint.h — a model to and from a safetensors file (SPEC §4).
**
** The file holds every registered parameter under its SPEC name and shape
** (nn.Linear layout, out × in) and the whole configuration, every default
** filled in, as JSON under the metadata key `moelab_config`. A tied LM head is
** stored once, as wte.weight.
*/
#ifndef MOELAB_CHECKPOINT_H
#define MOELAB_CHECKPOINT_H

#include "model.h"

int checkpoint_save(const Model *m, const char *path, char *err);

/* Builds a new model from a checkpoint. Everything in the file is checked
** before the model's memory is allocated, so a hostile or damaged file costs
** no more than reading it. Fails with a message naming what is wrong: not a
** safetensors file, no or bad moelab_config, a missing tensor, a tensor of
** the wrong shape, a tensor this configuration does not have, a non-finite
** weight (unless allow_nonfinite, for inspecting a diverged model), or a
** model larger than the memory allowed (ml_memory_check). */
int checkpoint_load(Model **out, const char *path, int allow_nonfinite, char *err);

#endif
