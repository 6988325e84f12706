/*
** placement.h — what a recorded evaluation's routing would cost with the
** experts placed on P devices (issue 13, item 4): a replay of every routing
** decision, no cluster needed. `moelab placement`, require("moelab.placement")
** and the figure `placement` all replay through here; the routing comes from
** a database through rec_placement_routing (recorder.h).
**
** The model (README, "Placement studies"), per MoE layer:
**   * Tokens live where the batch is split: the N tokens of the evaluation, in
**     (seq, pos) order, go to the P devices in equal contiguous shares; token
**     i's home is floor(i * P / N).
**   * Each expert lives on one device, by the policy: "contiguous" (expert e
**     on floor(e * P / E)), "round_robin" (e mod P), "balanced" (the experts
**     by falling load, each to the least loaded device with room) or
**     "cooccurrence" (the experts by falling load, each to the device with
**     room whose experts this layer's tokens choose together with it most
**     often, ties to the least loaded; then swaps of two experts while one
**     keeps more of the tokens' pairs on one device). A device holds at most
**     ceil(E / P).
**   * A token goes once to each other device that holds any of its experts
**     (dispatch) and comes back from it (combine): d_model floats of 4 bytes
**     each way. The all-to-all volume counts both.
**   * A device's compute is its assignments times the forward FLOPs of its
**     experts (2 per multiply-add over fc and proj, 3 matrices for SwiGLU)
**     at `rate` GFLOP/s; its communication, per phase, the larger of what it
**     sends and receives at `bandwidth` GB/s. The layer's critical path is
**     the slowest device's compute plus the slowest device's dispatch and
**     combine: nothing overlaps.
*/
#ifndef MOELAB_PLACEMENT_H
#define MOELAB_PLACEMENT_H

#include <stdint.h>

#include "common.h"
#include "config.h"

typedef enum {
    PLACEMENT_CONTIGUOUS = 0,
    PLACEMENT_ROUND_ROBIN = 1,
    PLACEMENT_BALANCED = 2,
    PLACEMENT_COOCCURRENCE = 3,
    PLACEMENT_POLICIES = 4
} PlacementPolicy;

/* "contiguous", "round_robin", "balanced", "cooccurrence": by PlacementPolicy. */
extern const char *const placement_policy_names[PLACEMENT_POLICIES];

/* The policy of that name, or -1. */
int placement_policy(const char *name);

/* The device counts a study takes when given none, and the figure draws:
** 2, 4, 8, ..., 1024. */
#define PLACEMENT_DEFAULT_DEVICES 10
extern const int placement_default_devices[PLACEMENT_DEFAULT_DEVICES];

/* The most devices a replay takes (it keeps a few numbers per device). */
#define PLACEMENT_MAX_DEVICES 1048576

/* A device's link, GB/s each way, and its expert compute, GFLOP/s, when not given. */
#define PLACEMENT_BANDWIDTH 25.0
#define PLACEMENT_RATE 100.0

/* One MoE layer's routing: token i (of N, in (seq, pos) order) chose the
** experts experts[first[i] .. first[i + 1] - 1], every pass of it. */
typedef struct {
    int layer;            /* its block number */
    int64_t tokens;       /* N */
    int64_t *first;       /* (N + 1) */
    int *experts;         /* (first[N]) each in [0, E) */
} PlacementLayer;

/* An evaluation's routing and the model shape that its costs need. */
typedef struct {
    int experts;                    /* E */
    int d_model;
    double flops[MOE_MAX_EXPERTS];  /* (E) forward FLOPs of one assignment to expert e */
    int nlayers;
    PlacementLayer *layers;         /* (nlayers) by block number */
} PlacementRouting;

typedef struct {
    double bandwidth;     /* GB/s, a device's link each way */
    double rate;          /* GFLOP/s, a device's expert compute */
} PlacementCosts;

/* A result row's layer when it is the total over the layers. */
#define PLACEMENT_ALL_LAYERS (-1)

/* One layer replayed on P devices by one policy, or the total over layers. */
typedef struct {
    PlacementPolicy policy;
    int devices;          /* P */
    int layer;            /* block number, or PLACEMENT_ALL_LAYERS */
    int64_t assignments;  /* routing decisions */
    int64_t local;        /* of them, to an expert on the token's home device */
    int64_t remote_tokens;/* (token, device) pairs sent away */
    int64_t bytes;        /* all-to-all volume: dispatch and combine */
    double local_share;   /* local / assignments (0 without assignments) */
    double imbalance;     /* the most loaded device's assignments / the mean;
                          ** in a total, the largest of its layers' */
    double compute_ms, comm_ms, critical_ms;  /* in a total, the sums of its layers' */
} PlacementResult;

/* Sets r's experts, d_model and flops from a model's configuration; an
** error for a model without MoE layers. */
int placement_shape(PlacementRouting *r, const ModelConfig *c, char *err);

/* Replays one layer of r on P devices by policy; device (E, may be NULL)
** receives each expert's device. Errors: P or the costs out of range, an
** expert outside [0, E), out of memory. */
int placement_layer(PlacementResult *out, int *device, const PlacementRouting *r,
                    const PlacementLayer *layer, PlacementPolicy policy, int P,
                    const PlacementCosts *costs, char *err);

/*
** Replays every layer of r for each policy and each device count. rows
** holds npolicies × ndevices × (nlayers + 1): for each policy, for each P,
** the layers in order and then their total (PLACEMENT_ALL_LAYERS). Errors
** as placement_layer's.
*/
int placement_study(PlacementResult *rows, const PlacementRouting *r,
                    const PlacementPolicy *policies, int npolicies, const int *devices,
                    int ndevices, const PlacementCosts *costs, char *err);

/* Frees r's layers (not r); r may be NULL. */
void placement_routing_free(PlacementRouting *r);

#endif
