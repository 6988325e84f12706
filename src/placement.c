/*
** placement.c — the placement replay of placement.h: per layer, the load of
** each expert and how often tokens chose two experts together (counted once
** per layer), the experts' devices by a policy, and the traffic, load and
** critical path of every routing decision with the experts there.
*/
#include "placement.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *const placement_policy_names[PLACEMENT_POLICIES] = {
    "contiguous", "round_robin", "balanced", "cooccurrence"};

const int placement_default_devices[PLACEMENT_DEFAULT_DEVICES] = {2,  4,   8,   16,  32,
                                                                  64, 128, 256, 512, 1024};

int placement_policy(const char *name) {
    for (int p = 0; p < PLACEMENT_POLICIES; p++)
        if (strcmp(name, placement_policy_names[p]) == 0)
            return p;
    return -1;
}

int placement_shape(PlacementRouting *r, const ModelConfig *c, char *err) {
    if (!c->moe.enabled || c->moe.experts < 1)
        return ml_error(err, "the run has no MoE layers");
    int matrices = c->activation == ACT_SWIGLU ? 3 : 2;
    r->experts = c->moe.experts;
    r->d_model = c->d_model;
    for (int e = 0; e < r->experts; e++)
        r->flops[e] = 2.0 * matrices * c->d_model * c->moe.hidden[e];
    return 0;
}

void placement_routing_free(PlacementRouting *r) {
    if (!r)
        return;
    for (int l = 0; l < r->nlayers; l++) {
        free(r->layers[l].first);
        free(r->layers[l].experts);
    }
    free(r->layers);
    r->layers = NULL;
    r->nlayers = 0;
}

/* ---- the replay ------------------------------------------------------- */

/* What a replay works in: E experts, up to P devices, the counts of nlayers
** layers (each counted once, for every policy and P). */
typedef struct {
    int E, P;
    int64_t *counts;      /* (nlayers, E + E²) each layer's load and co */
    int64_t *load;        /* (E) the current layer's assignments per expert */
    int64_t *co;          /* (E, E) its tokens' choices of e together with f; 0 on the diagonal */
    int64_t *affinity;    /* (E, min(P, E)) co summed over the experts a device holds */
    int64_t *held_load;   /* (min(P, E)) the load of the experts a device holds */
    int *held;            /* (min(P, E)) the experts it holds */
    int *order;           /* (E) experts by falling load */
    int *device;          /* (E) each expert's device */
    int64_t *dev_load, *sent, *received;  /* (P) per device */
    double *compute;      /* (P) FLOPs per device */
} PlacementWork;

static void placement_work_free(PlacementWork *w) {
    free(w->counts);
    free(w->affinity);
    free(w->held_load);
    free(w->held);
    free(w->order);
    free(w->device);
    free(w->dev_load);
    free(w->sent);
    free(w->received);
    free(w->compute);
}

/* load and co of one layer; a token's passes may choose an expert twice,
** and each of its ordered pairs of rows counts. */
static void placement_count(int64_t *load, int64_t *co, const PlacementLayer *layer, int E) {
    memset(load, 0, (size_t)E * sizeof *load);
    memset(co, 0, (size_t)E * (size_t)E * sizeof *co);
    for (int64_t i = 0; i < layer->tokens; i++) {
        const int *ex = layer->experts + layer->first[i];
        int n = (int)(layer->first[i + 1] - layer->first[i]);
        for (int a = 0; a < n; a++) {
            load[ex[a]]++;
            for (int b = 0; b < n; b++)
                if (ex[b] != ex[a])
                    co[(size_t)ex[a] * E + ex[b]]++;
        }
    }
}

/* Makes layer l (of those counted) the current one. */
static void placement_work_layer(PlacementWork *w, int l) {
    w->load = w->counts + (size_t)l * ((size_t)w->E + (size_t)w->E * w->E);
    w->co = w->load + w->E;
}

/* Room for r's layers on up to P devices, and their counts. */
static int placement_work_init(PlacementWork *w, const PlacementRouting *r, int P, char *err) {
    int E = r->experts;
    size_t e = (size_t)E, p = (size_t)P, d = (size_t)(P < E ? P : E);
    size_t layers = (size_t)(r->nlayers > 0 ? r->nlayers : 1);
    memset(w, 0, sizeof *w);
    w->E = E;
    w->P = P;
    w->counts = malloc(layers * (e + e * e) * sizeof *w->counts);
    w->affinity = malloc(e * d * sizeof *w->affinity);
    w->held_load = malloc(d * sizeof *w->held_load);
    w->held = malloc(d * sizeof *w->held);
    w->order = malloc(e * sizeof *w->order);
    w->device = malloc(e * sizeof *w->device);
    w->dev_load = malloc(p * sizeof *w->dev_load);
    w->sent = malloc(p * sizeof *w->sent);
    w->received = malloc(p * sizeof *w->received);
    w->compute = malloc(p * sizeof *w->compute);
    if (!w->counts || !w->affinity || !w->held_load || !w->held || !w->order || !w->device
        || !w->dev_load || !w->sent || !w->received || !w->compute) {
        placement_work_free(w);
        return ml_error(err, "out of memory for a placement replay on %d devices", P);
    }
    for (int l = 0; l < r->nlayers; l++) {
        placement_work_layer(w, l);
        placement_count(w->load, w->co, &r->layers[l], E);
    }
    return 0;
}

/* Adds expert e's pairs to device d's affinity of every expert. */
static void placement_affinity_add(PlacementWork *w, int e, int d, int64_t sign) {
    int D = w->P < w->E ? w->P : w->E;
    for (int f = 0; f < w->E; f++)
        w->affinity[(size_t)f * D + d] += sign * w->co[(size_t)f * w->E + e];
}

/* w->device for one layer whose load and co are in w. */
static void placement_assign(PlacementWork *w, PlacementPolicy policy) {
    int E = w->E, P = w->P, D = P < E ? P : E, cap = (E + P - 1) / P;
    int *device = w->device;
    if (policy == PLACEMENT_CONTIGUOUS || policy == PLACEMENT_ROUND_ROBIN) {
        for (int e = 0; e < E; e++)
            device[e] = policy == PLACEMENT_CONTIGUOUS ? (int)((int64_t)e * P / E) : e % P;
        return;
    }
    /* the experts by falling load, ties by number (an insertion sort: E is small) */
    for (int e = 0; e < E; e++) {
        int j = e;
        for (; j > 0 && w->load[w->order[j - 1]] < w->load[e]; j--)
            w->order[j] = w->order[j - 1];
        w->order[j] = e;
    }
    memset(w->held, 0, (size_t)D * sizeof *w->held);
    memset(w->held_load, 0, (size_t)D * sizeof *w->held_load);
    memset(w->affinity, 0, (size_t)E * D * sizeof *w->affinity);
    for (int i = 0; i < E; i++) {
        int e = w->order[i], best = -1;
        int64_t best_affinity = -1;
        for (int d = 0; d < D; d++) {
            if (w->held[d] >= cap)
                continue;
            int64_t a = policy == PLACEMENT_COOCCURRENCE ? w->affinity[(size_t)e * D + d] : 0;
            if (best < 0 || a > best_affinity
                || (a == best_affinity && w->held_load[d] < w->held_load[best])) {
                best = d;
                best_affinity = a;
            }
        }
        device[e] = best;
        w->held[best]++;
        w->held_load[best] += w->load[e];
        if (policy == PLACEMENT_COOCCURRENCE)
            placement_affinity_add(w, e, best, 1);
    }
    if (policy != PLACEMENT_COOCCURRENCE)
        return;
    /* then, while swapping two experts of different devices keeps more of the
    ** tokens' pairs on one device, the swap that keeps the most (the first of
    ** equals; at most E² swaps) */
    for (int swaps = 0; swaps < E * E; swaps++) {
        int64_t best_gain = 0;
        int sa = -1, sb = -1;
        for (int a = 0; a < E; a++)
            for (int b = a + 1; b < E; b++) {
                int da = device[a], db = device[b];
                if (da == db)
                    continue;
                int64_t gain = w->affinity[(size_t)a * D + db] + w->affinity[(size_t)b * D + da]
                               - w->affinity[(size_t)a * D + da]
                               - w->affinity[(size_t)b * D + db] - 2 * w->co[(size_t)a * E + b];
                if (gain > best_gain) {
                    best_gain = gain;
                    sa = a;
                    sb = b;
                }
            }
        if (sa < 0)
            break;
        int da = device[sa], db = device[sb];
        placement_affinity_add(w, sa, da, -1);
        placement_affinity_add(w, sb, db, -1);
        placement_affinity_add(w, sa, db, 1);
        placement_affinity_add(w, sb, da, 1);
        device[sa] = db;
        device[sb] = da;
    }
}

/* Replays one layer with the experts on w->device. */
static void placement_replay(PlacementResult *out, PlacementWork *w, const PlacementRouting *r,
                             const PlacementLayer *layer, const PlacementCosts *costs) {
    int P = w->P;
    int64_t N = layer->tokens, assignments = 0, local = 0, remote = 0;
    memset(w->dev_load, 0, (size_t)P * sizeof *w->dev_load);
    memset(w->sent, 0, (size_t)P * sizeof *w->sent);
    memset(w->received, 0, (size_t)P * sizeof *w->received);
    memset(w->compute, 0, (size_t)P * sizeof *w->compute);
    for (int64_t i = 0; i < N; i++) {
        int home = (int)(i * P / N);
        const int *ex = layer->experts + layer->first[i];
        int n = (int)(layer->first[i + 1] - layer->first[i]);
        for (int a = 0; a < n; a++) {
            int d = w->device[ex[a]], seen = 0;
            assignments++;
            w->dev_load[d]++;
            w->compute[d] += r->flops[ex[a]];
            if (d == home) {
                local++;
                continue;
            }
            for (int b = 0; b < a && !seen; b++)    /* the token went there already */
                seen = w->device[ex[b]] == d;
            if (!seen) {
                remote++;
                w->sent[home]++;
                w->received[d]++;
            }
        }
    }
    int64_t max_load = 0, max_comm = 0;
    double max_compute = 0, token_bytes = 4.0 * r->d_model;
    for (int d = 0; d < P; d++) {
        if (w->dev_load[d] > max_load)
            max_load = w->dev_load[d];
        if (w->compute[d] > max_compute)
            max_compute = w->compute[d];
        if (w->sent[d] > max_comm)
            max_comm = w->sent[d];
        if (w->received[d] > max_comm)
            max_comm = w->received[d];
    }
    double mean_load = (double)assignments / P;
    out->devices = P;
    out->layer = layer->layer;
    out->assignments = assignments;
    out->local = local;
    out->remote_tokens = remote;
    out->bytes = 2 * remote * 4 * (int64_t)r->d_model;
    out->local_share = assignments > 0 ? (double)local / (double)assignments : 0.0;
    out->imbalance = mean_load > 0 ? (double)max_load / mean_load : 0.0;
    out->compute_ms = max_compute / (costs->rate * 1e9) * 1e3;
    out->comm_ms = 2.0 * (double)max_comm * token_bytes / (costs->bandwidth * 1e9) * 1e3;
    out->critical_ms = out->compute_ms + out->comm_ms;
}

/* The checks of placement_layer and placement_study. */
static int placement_check(const PlacementRouting *r, const int *devices, int ndevices,
                           const PlacementCosts *costs, char *err) {
    if (r->experts < 1 || r->experts > MOE_MAX_EXPERTS || r->d_model < 1)
        return ml_error(err, "a placement replay needs 1 to %d experts and d_model >= 1, "
                        "got %d and %d", MOE_MAX_EXPERTS, r->experts, r->d_model);
    for (int e = 0; e < r->experts; e++)
        if (!(r->flops[e] >= 0 && isfinite(r->flops[e])))
            return ml_error(err, "expert %d's FLOPs must be finite and >= 0, got %g", e,
                            r->flops[e]);
    if (ndevices < 1) /* an empty list would give no rows, and no word why */
        return ml_error(err, "devices must list at least one device count, got none");
    for (int i = 0; i < ndevices; i++)
        if (devices[i] < 1 || devices[i] > PLACEMENT_MAX_DEVICES)
            return ml_error(err, "devices must be whole numbers between 1 and %d, got %d",
                            PLACEMENT_MAX_DEVICES, devices[i]);
    if (!(costs->bandwidth > 0 && costs->rate > 0 && isfinite(costs->bandwidth)
          && isfinite(costs->rate)))
        return ml_error(err, "bandwidth and rate must be positive, got %g and %g",
                        costs->bandwidth, costs->rate);
    for (int l = 0; l < r->nlayers; l++) {
        const PlacementLayer *layer = &r->layers[l];
        int64_t n = layer->tokens > 0 ? layer->first[layer->tokens] : 0;
        for (int64_t k = 0; k < n; k++)
            if (layer->experts[k] < 0 || layer->experts[k] >= r->experts)
                return ml_error(err, "layer %d routes a token to expert %d; the model has %d",
                                layer->layer, layer->experts[k], r->experts);
    }
    return 0;
}

int placement_layer(PlacementResult *out, int *device, const PlacementRouting *r,
                    const PlacementLayer *layer, PlacementPolicy policy, int P,
                    const PlacementCosts *costs, char *err) {
    PlacementRouting one = *r;
    one.nlayers = 1;
    one.layers = (PlacementLayer *)layer;
    PlacementWork w;
    if (placement_check(&one, &P, 1, costs, err) || placement_work_init(&w, &one, P, err))
        return -1;
    placement_work_layer(&w, 0);
    placement_assign(&w, policy);
    placement_replay(out, &w, r, layer, costs);
    out->policy = policy;
    if (device)
        memcpy(device, w.device, (size_t)r->experts * sizeof *device);
    placement_work_free(&w);
    return 0;
}

int placement_study(PlacementResult *rows, const PlacementRouting *r,
                    const PlacementPolicy *policies, int npolicies, const int *devices,
                    int ndevices, const PlacementCosts *costs, char *err) {
    int max_P = 1;
    PlacementWork w;
    if (placement_check(r, devices, ndevices, costs, err))
        return -1;
    for (int i = 0; i < ndevices; i++)
        if (devices[i] > max_P)
            max_P = devices[i];
    if (placement_work_init(&w, r, max_P, err))
        return -1;
    PlacementResult *row = rows;
    for (int p = 0; p < npolicies; p++)
        for (int i = 0; i < ndevices; i++) {
            PlacementResult total = {.policy = policies[p], .devices = devices[i],
                                     .layer = PLACEMENT_ALL_LAYERS};
            w.P = devices[i];
            for (int l = 0; l < r->nlayers; l++, row++) {
                placement_work_layer(&w, l);
                placement_assign(&w, policies[p]);
                placement_replay(row, &w, r, &r->layers[l], costs);
                row->policy = policies[p];
                total.assignments += row->assignments;
                total.local += row->local;
                total.remote_tokens += row->remote_tokens;
                total.bytes += row->bytes;
                if (row->imbalance > total.imbalance)
                    total.imbalance = row->imbalance;
                total.compute_ms += row->compute_ms;
                total.comm_ms += row->comm_ms;
            }
            total.local_share = total.assignments > 0
                                    ? (double)total.local / (double)total.assignments : 0.0;
            total.critical_ms = total.compute_ms + total.comm_ms;
            *row++ = total;
        }
    placement_work_free(&w);
    return 0;
}
