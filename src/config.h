/*
** config.h — the model configuration: its fields, defaults, validation and its
** JSON form.
**
** The JSON form is the one contract for configurations: the Lua binding turns a
** configuration table into JSON and calls config_from_json, and a checkpoint
** stores config_to_json's output under the metadata key `moelab_config`. So there
** is one validator, and every message about a bad key or value comes from here.
*/
#ifndef MOELAB_CONFIG_H
#define MOELAB_CONFIG_H

#include <stdint.h>

#include "common.h"

typedef enum { NORM_LAYERNORM = 0, NORM_RMSNORM = 1 } NormKind;
typedef enum { ACT_GELU = 0, ACT_RELU = 1, ACT_SWIGLU = 2 } ActKind;

#define MOE_MAX_EXPERTS 256
#define MOE_MAX_RANKS 1024   /* of an expert placement */

typedef enum {
    ROUTER_TOPK = 0,          /* the k largest p; renormalised or raw */
    ROUTER_THRESHOLD = 1,     /* XMoE: ranks while the mass before them < p; raw weights */
    ROUTER_TOPP = 2,          /* the threshold rule, renormalised weights */
    ROUTER_EXPERT_CHOICE = 3, /* each expert takes its top C tokens; non-causal */
    ROUTER_HASH = 4,          /* a fixed random map of token ids; weight 1 */
    ROUTER_STRATIFIED = 5,    /* SMoE: strata of experts, top-2 per pass (moe/stratified.c) */
    ROUTER_MERGE = 6,         /* MEO: experts merged per sequence or segment (moe/merge.c) */
    ROUTER_ALL = 7,           /* every expert, weight 1: a dense FFN split into experts (moefy.c) */
    ROUTER_SIMILARITY = 8,    /* a moefied layer's experts by x · centroid, top-k or threshold, weight 1 */
    ROUTER_LEARNED = 9,       /* the same, its router fitted to the groups' activation mass (moefy.c) */
    ROUTER_ORACLE = 10,       /* every expert run, the ones with the most activation mass kept */
} RouterKind;

typedef struct {
    int enabled;        /* a `moe` table was given */
    int every;          /* block l is MoE when (l + 1) % every == 0 */
    int experts;        /* E */
    int hidden[MOE_MAX_EXPERTS]; /* H_e, one per expert */
    int hidden_list;    /* hidden was given as a list (HMoE): written back as one */
    int bias;           /* experts have fc biases and the layer a proj bias (moefied dense FFNs) */
    RouterKind kind;
    int k;              /* topk: experts per token; capacity's k for the others */
    float p;            /* threshold / topp: the probability mass t */
    int max_k;          /* threshold / topp: at most this many experts; 0 = no cap */
    int normalize;      /* topk: renormalise the weights over the k */
    float capacity_factor; /* token choice: 0 = dropless; expert choice: c (0 = k) */
    int min_capacity;
    float noise;        /* std of Gaussian noise added to router logits in training */
    int n_strata;       /* stratified: the number of strata L */
    int strata[MOE_MAX_EXPERTS]; /* stratified: experts per stratum, in order */
    int second_sample;  /* stratified: the second choice Gumbel-sampled, not the 2nd largest p */
    int segment;        /* merge: 0 = gate on the whole sequence (not causal), S > 0 = causal
                        ** segments of S positions gated on the means before them */
    int token_attention; /* merge: r > 0 adds x + Up(ReLU(Down(x))), width / r wide */
    int select_threshold; /* similarity: the threshold rule on p (t = p), not the k largest */
    float aux_balance, aux_z, aux_cv2, aux_p_penalty, aux_entropy; /* coefficients; 0 = off */
    float sparsity_eps; /* |a| <= eps counts as a near-zero activation; < 0: default */
    /* expert parallelism over MPI ranks (dist.h): each expert's products run
    ** on one rank, placement[e] (n_placement = E), or E/N contiguous a rank
    ** (n_placement = 0); tokens travel to them and back (moe/parallel.c) */
    int parallel_experts;
    int n_placement;
    int placement[MOE_MAX_EXPERTS];
} MoeConfig;

typedef struct {
    int vocab;       /* 256: bytes */
    int context;     /* maximum sequence length T */
    int layers;
    int d_model;
    int heads;
    NormKind norm;
    ActKind activation;
    int tied;        /* LM head shares wte */
    uint64_t seed;   /* initialisation (and the default training seed) */
    int ffn_hidden;  /* dense FFN hidden size; 0 in a config means 4 × d_model */
    float norm_eps;  /* 1e-5 */
    float init_std;  /* 0.02; residual projections use init_std / sqrt(2 · layers) */
    MoeConfig moe;
} ModelConfig;

/* Whether block l (from 0) has an MoE layer. */
int config_is_moe_block(const ModelConfig *c, int l);
const char *config_router_name(RouterKind k);

/* Fills every field with its default. */
void config_defaults(ModelConfig *c);

/* Checks values against each other; the message names the value and why. */
int config_validate(const ModelConfig *c, char *err);

/* Resets the router keys that the router does not read to their defaults, so
** that two configurations that mean the same are the same bytes. */
void config_canonical(ModelConfig *c);

/* Parses a JSON object of configuration keys over the defaults. An unknown key
** is an error that names it and the nearest valid key. */
int config_from_json(ModelConfig *c, const char *json, size_t len, char *err);

/* The same for a checkpoint's configuration: router keys that its router does
** not read are ignored (files written before routers stored only their own). */
int config_from_checkpoint_json(ModelConfig *c, const char *json, size_t len, char *err);

/* The message for a value that cannot reach config_from_json, because JSON
** cannot carry it (NaN, infinities): it names the key's path ("moe.router.p",
** "moe.hidden[2]"), the value and what the key takes. Returns -1. */
int config_number_error(const char *path, double x, char *err);

/* Writes the configuration as JSON with every default filled in; returns a
** malloc'd string or NULL when out of memory. */
char *config_to_json(const ModelConfig *c);

/* A model's router replaced for a counterfactual evaluation: the keys of the
** JSON object (a user's table: strict, as config_from_json) over c's own
** router, or over the defaults of another kind when "kind" names one; c is
** changed only when the result validates. config_router_to_json writes a
** router's own keys as the configuration does (caller frees). */
int config_router_from_json(ModelConfig *c, const char *json, size_t len, char *err);
char *config_router_to_json(const MoeConfig *m);

/* Names of enum values, for messages and JSON. */
const char *config_norm_name(NormKind k);
const char *config_activation_name(ActKind k);

/* The valid key closest to `key` among `keys` (Levenshtein), for messages. */
const char *config_nearest_key(const char *key, const char *const *keys, int n);

#endif
