/*
** test_placement.c — the placement replay (src/placement.c) on hand-made
** routing tables whose volumes, loads and times are worked out by hand in
** the comments, and the reading of a recorded evaluation back for it
** (rec_placement_routing of recorder.h).
*/
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "placement.h"
#include "recorder.h"
#include "testutil.h"

/* A layer of at most 8 tokens, each a list of experts ending with -1. */
typedef struct {
    int64_t first[9];
    int experts[32];
    PlacementLayer layer;
} HandLayer;

static PlacementLayer *hand_layer(HandLayer *h, int block, int tokens, const int lists[][4]) {
    int k = 0;
    h->first[0] = 0;
    for (int i = 0; i < tokens; i++) {
        for (int j = 0; j < 4 && lists[i][j] >= 0; j++)
            h->experts[k++] = lists[i][j];
        h->first[i + 1] = k;
    }
    h->layer = (PlacementLayer){block, tokens, h->first, h->experts};
    return &h->layer;
}

/* 4 experts, d_model 2 (8 bytes a token each way), flops[e] an assignment;
** 1 GB/s and 1 GFLOP/s, so that 1 byte or 1 FLOP is 1e-6 ms. */
static PlacementRouting hand_routing(const double flops[4]) {
    PlacementRouting r = {.experts = 4, .d_model = 2};
    for (int e = 0; e < 4; e++)
        r.flops[e] = flops[e];
    return r;
}

static const PlacementCosts unit_costs = {1.0, 1.0};
static const double unit_flops[4] = {1, 1, 1, 1};

/* Tokens 0-1 chose experts 0 and 2, tokens 2-3 experts 1 and 3; on 2
** devices tokens 0-1 live on device 0, 2-3 on device 1. */
static const int paired[4][4] = {{0, 2, -1}, {0, 2, -1}, {1, 3, -1}, {1, 3, -1}};

static void test_layer_by_hand(void **state) {
    (void)state;
    HandLayer h;
    PlacementRouting r = hand_routing(unit_flops);
    PlacementLayer *layer = hand_layer(&h, 0, 4, paired);
    PlacementResult c, k, b, one;
    int dev[4], kdev[4];
    char err[ML_ERRLEN];

    /* contiguous: experts 0, 1 on device 0 and 2, 3 on device 1; each token
    ** has one expert away: 4 (token, device) pairs, there and back, 8 bytes
    ** each way: 64 bytes. Each device sends 2 tokens and receives 2: two
    ** phases of 2 x 8 bytes, 32e-6 ms; it computes 4 assignments, 4e-6 ms. */
    assert_int_equal(placement_layer(&c, dev, &r, layer, PLACEMENT_CONTIGUOUS, 2, &unit_costs,
                                     err), 0);
    assert_int_equal(dev[0], 0);
    assert_int_equal(dev[1], 0);
    assert_int_equal(dev[2], 1);
    assert_int_equal(dev[3], 1);
    assert_int_equal(c.assignments, 8);
    assert_int_equal(c.local, 4);
    assert_int_equal(c.remote_tokens, 4);
    assert_int_equal(c.bytes, 64);
    assert_true(c.local_share == 0.5 && c.imbalance == 1.0);
    assert_true(test_close(c.comm_ms, 32e-6, 1e-12, 0));
    assert_true(test_close(c.compute_ms, 4e-6, 1e-12, 0));
    assert_true(test_close(c.critical_ms, 36e-6, 1e-12, 0));
    assert_int_equal(c.devices, 2);
    assert_int_equal(c.policy, PLACEMENT_CONTIGUOUS);

    /* co-occurrence puts 0 with 2 and 1 with 3: every token stays home */
    assert_int_equal(placement_layer(&k, kdev, &r, layer, PLACEMENT_COOCCURRENCE, 2,
                                     &unit_costs, err), 0);
    assert_true(kdev[0] == kdev[2] && kdev[1] == kdev[3] && kdev[0] != kdev[1]);
    assert_true(k.local_share == 1.0 && k.bytes == 0 && k.comm_ms == 0.0);
    /* balanced: loads 2, 2, 2, 2, two a device */
    assert_int_equal(placement_layer(&b, NULL, &r, layer, PLACEMENT_BALANCED, 2, &unit_costs,
                                     err), 0);
    assert_true(b.imbalance == 1.0);
    assert_int_equal(placement_layer(&one, NULL, &r, layer, PLACEMENT_ROUND_ROBIN, 1,
                                     &unit_costs, err), 0);
    assert_true(one.local_share == 1.0 && one.bytes == 0);

    /* The greedy pass alone would pair 0 with 1 (the two busiest, loads 4
    ** and 4, chosen together once) and leave 2 with 3; the swaps then keep
    ** 0 with 2 and 1 with 3 (three tokens each). */
    static const int greedy[7][4] = {{0, 1, -1}, {0, 2, -1}, {0, 2, -1}, {0, 2, -1},
                                     {1, 3, -1}, {1, 3, -1}, {1, 3, -1}};
    layer = hand_layer(&h, 0, 7, greedy);
    assert_int_equal(placement_layer(&k, kdev, &r, layer, PLACEMENT_COOCCURRENCE, 2,
                                     &unit_costs, err), 0);
    assert_true(kdev[0] == kdev[2] && kdev[1] == kdev[3] && kdev[0] != kdev[1]);
    /* The first swap found (0 with 3) leaves 0 and 2 on device 1, away from
    ** tokens 0-3 (home 0), and 1 and 3 on device 0, away from tokens 4-6:
    ** the policy keeps pairs together wherever the tokens live. Every token
    ** travels to one device: 7 x 16 bytes. */
    assert_int_equal(kdev[0], 1);
    assert_int_equal(k.remote_tokens, 7);
    assert_int_equal(k.bytes, 112);

    /* a token sent to a device once however many of its experts are there:
    ** round robin on 2 devices puts experts 1 and 3 on device 1, and token 0
    ** (home 0, the only token) chose 1, 3 and 0 */
    static const int twice[1][4] = {{1, 3, 0, -1}};
    layer = hand_layer(&h, 0, 1, twice);
    assert_int_equal(placement_layer(&k, NULL, &r, layer, PLACEMENT_ROUND_ROBIN, 2,
                                     &unit_costs, err), 0);
    assert_int_equal(k.remote_tokens, 1);
    assert_int_equal(k.local, 1);
    /* 3 assignments on 2 devices, 2 on device 1: 2 / 1.5 */
    assert_true(test_close(k.imbalance, 4.0 / 3.0, 1e-12, 0));
}

/* Two layers, two policies, P = 2 and 4: the rows' order and the totals. */
static void test_study_by_hand(void **state) {
    (void)state;
    static const int skewed[4][4] = {{0, -1}, {0, -1}, {0, -1}, {3, -1}};
    static const double flops[4] = {1, 1, 1, 10};
    HandLayer ha, hb;
    PlacementRouting r = hand_routing(flops);
    PlacementLayer layers[2] = {*hand_layer(&ha, 1, 4, paired), *hand_layer(&hb, 3, 4, skewed)};
    r.layers = layers;
    r.nlayers = 2;
    const PlacementPolicy policies[2] = {PLACEMENT_CONTIGUOUS, PLACEMENT_ROUND_ROBIN};
    const int devices[2] = {2, 4};
    PlacementResult rows[2 * 2 * 3];
    char err[ML_ERRLEN];
    assert_int_equal(placement_study(rows, &r, policies, 2, devices, 2, &unit_costs, err), 0);
    for (int p = 0; p < 2; p++)
        for (int d = 0; d < 2; d++) {
            const PlacementResult *row = &rows[(p * 2 + d) * 3];
            assert_int_equal(row[0].policy, policies[p]);
            assert_int_equal(row[2].devices, devices[d]);
            assert_int_equal(row[0].layer, 1);
            assert_int_equal(row[1].layer, 3);
            assert_int_equal(row[2].layer, PLACEMENT_ALL_LAYERS);
            assert_int_equal(row[2].assignments, 12);
        }

    /* contiguous on 2 devices. Layer 1 as in test_layer_by_hand, but
    ** expert 3 costs 10: device 1 computes 2 + 2 x 10 = 22 FLOPs. Layer 3:
    ** experts 0, 1 on device 0; tokens 0-2 chose 0, token 3 (home 1) chose 3:
    ** token 2 alone goes away (16 bytes); device 0 holds 3 assignments and
    ** device 1 one, 3 / 2 = 1.5 the mean; device 1 computes 10 FLOPs; one
    ** token each way, 2 x 8 bytes = 16e-6 ms. */
    const PlacementResult *c2 = &rows[0];
    assert_int_equal(c2[0].bytes, 64);
    assert_true(test_close(c2[0].compute_ms, 22e-6, 1e-12, 0));
    assert_int_equal(c2[1].local, 3);
    assert_int_equal(c2[1].bytes, 16);
    assert_true(c2[1].imbalance == 1.5);
    assert_true(test_close(c2[1].compute_ms, 10e-6, 1e-12, 0));
    assert_true(test_close(c2[1].comm_ms, 16e-6, 1e-12, 0));
    /* the total: sums, and the largest imbalance */
    assert_int_equal(c2[2].local, 7);
    assert_true(test_close(c2[2].local_share, 7.0 / 12.0, 1e-15, 0));
    assert_int_equal(c2[2].remote_tokens, 5);
    assert_int_equal(c2[2].bytes, 80);
    assert_true(c2[2].imbalance == 1.5);
    assert_true(test_close(c2[2].compute_ms, 32e-6, 1e-12, 0));
    assert_true(test_close(c2[2].comm_ms, 48e-6, 1e-12, 0));
    assert_true(test_close(c2[2].critical_ms, 80e-6, 1e-12, 0));

    /* contiguous on 4 devices: expert e on device e, token i at home on i.
    ** Layer 1: tokens 0 and 3 keep one expert each, 6 pairs go away (96
    ** bytes). Layer 3: tokens 1, 2 go to device 0 (32 bytes); loads 3, 0,
    ** 0, 1, mean 1. */
    const PlacementResult *c4 = &rows[3];
    assert_int_equal(c4[0].local, 2);
    assert_int_equal(c4[0].bytes, 96);
    assert_true(c4[0].imbalance == 1.0);
    assert_int_equal(c4[1].bytes, 32);
    assert_true(c4[1].imbalance == 3.0);
    assert_int_equal(c4[2].bytes, 128);
    assert_true(c4[2].imbalance == 3.0);

    /* round robin on 2 devices: experts 0, 2 on device 0 and 1, 3 on 1.
    ** Layer 1 stays home. Layer 3: token 2 (home 1) goes to device 0. */
    const PlacementResult *r2 = &rows[6];
    assert_int_equal(r2[0].bytes, 0);
    assert_true(r2[0].local_share == 1.0);
    assert_int_equal(r2[1].bytes, 16);
    assert_int_equal(r2[2].bytes, 16);
    assert_int_equal(r2[2].local, 11);
}

static void test_errors(void **state) {
    (void)state;
    HandLayer h;
    PlacementRouting r = hand_routing(unit_flops);
    PlacementLayer *layer = hand_layer(&h, 2, 4, paired);
    PlacementResult out;
    char err[ML_ERRLEN];
    assert_int_equal(placement_layer(&out, NULL, &r, layer, PLACEMENT_BALANCED, 0, &unit_costs,
                                     err), -1);
    assert_non_null(strstr(err, "devices must be whole numbers between 1 and 1048576, got 0"));
    assert_int_equal(placement_layer(&out, NULL, &r, layer, PLACEMENT_BALANCED,
                                     PLACEMENT_MAX_DEVICES + 1, &unit_costs, err), -1);
    PlacementCosts slow = {0, 1};
    assert_int_equal(placement_layer(&out, NULL, &r, layer, PLACEMENT_BALANCED, 2, &slow, err),
                     -1);
    assert_non_null(strstr(err, "bandwidth and rate must be positive"));
    h.experts[3] = 4;
    assert_int_equal(placement_layer(&out, NULL, &r, layer, PLACEMENT_BALANCED, 2, &unit_costs,
                                     err), -1);
    assert_non_null(strstr(err, "layer 2 routes a token to expert 4; the model has 4"));
    h.experts[3] = 3;
    r.flops[1] = NAN;
    assert_int_equal(placement_layer(&out, NULL, &r, layer, PLACEMENT_BALANCED, 2, &unit_costs,
                                     err), -1);
    assert_non_null(strstr(err, "expert 1's FLOPs"));

    for (int p = 0; p < PLACEMENT_POLICIES; p++)
        assert_int_equal(placement_policy(placement_policy_names[p]), p);
    assert_int_equal(placement_policy("random"), -1);
}

/* A model's FLOPs per assignment: 2 per multiply-add, over fc and proj (and
** SwiGLU's gate), at each expert's hidden size. */
static void test_shape(void **state) {
    (void)state;
    ModelConfig c;
    PlacementRouting r = {0};
    char err[ML_ERRLEN];
    config_defaults(&c);
    c.d_model = 16;
    assert_int_equal(placement_shape(&r, &c, err), -1);
    assert_non_null(strstr(err, "no MoE layers"));
    c.moe.enabled = 1;
    c.moe.experts = 2;
    c.moe.hidden[0] = 8;
    c.moe.hidden[1] = 24;
    c.activation = ACT_SWIGLU;
    assert_int_equal(placement_shape(&r, &c, err), 0);
    assert_int_equal(r.experts, 2);
    assert_int_equal(r.d_model, 16);
    assert_true(r.flops[0] == 2.0 * 3 * 16 * 8 && r.flops[1] == 2.0 * 3 * 16 * 24);
}

/* A recorded evaluation read back: rows written in any order come out by
** layer and (seq, pos), a token's passes together; the shape comes from the
** run's configuration. */
static void test_read_recorded(void **state) {
    (void)state;
    Recorder *rec = NULL;
    int64_t run_id, eval_id;
    char err[ML_ERRLEN];
    assert_int_equal(rec_open(&rec, ":memory:", err), 0);
    assert_int_equal(rec_run_begin(rec, "moe", NULL,
                                   "{\"model\":{\"layers\":2,\"d_model\":8,\"heads\":2,"
                                   "\"moe\":{\"experts\":4,\"hidden\":4}}}",
                                   1, 0, 0, 1, &run_id, err), 0);
    assert_int_equal(rec_eval(rec, run_id, 0, "val", 0, NAN, NAN, NAN, &eval_id, err), 0);
    /* layer, seq, pos, token, rank, expert, pass */
    const RecRouting rows[] = {
        {1, 1, 0, 'b', 0, 3, 0, 1}, {0, 0, 1, 'a', 0, 2, 0, 1}, {0, 0, 0, 'x', 1, 1, 0, 1},
        {0, 0, 0, 'x', 0, 0, 0, 1}, {1, 0, 0, 'x', 0, 2, 0, 1}, {0, 0, 0, 'x', 0, 3, 1, 1},
    };
    assert_int_equal(rec_routing(rec, run_id, eval_id, rows, sizeof rows / sizeof *rows, err),
                     0);
    assert_int_equal(rec_eval_result(rec, eval_id, 3, 1.0, 0, 2, err), 0);
    assert_int_equal(rec_flush(rec, err), 0);
    PlacementRouting r;
    assert_int_equal(rec_placement_routing(rec_db(rec), "mem", eval_id, &r, err), 0);
    assert_int_equal(r.experts, 4);
    assert_int_equal(r.d_model, 8);
    assert_true(r.flops[2] == 2.0 * 2 * 8 * 4);
    assert_int_equal(r.nlayers, 2);
    /* layer 0: (0, 0) chose 0 and 1 in pass 0, then 3; (0, 1) chose 2 */
    assert_int_equal(r.layers[0].layer, 0);
    assert_int_equal(r.layers[0].tokens, 2);
    assert_int_equal(r.layers[0].first[1], 3);
    assert_int_equal(r.layers[0].first[2], 4);
    const int want0[4] = {0, 1, 3, 2};
    for (int k = 0; k < 4; k++)
        assert_int_equal(r.layers[0].experts[k], want0[k]);
    /* layer 1: (0, 0) chose 2, (1, 0) chose 3 */
    assert_int_equal(r.layers[1].layer, 1);
    assert_int_equal(r.layers[1].tokens, 2);
    assert_int_equal(r.layers[1].experts[0], 2);
    assert_int_equal(r.layers[1].experts[1], 3);
    placement_routing_free(&r);
    assert_int_equal(rec_placement_routing(rec_db(rec), "mem", eval_id + 1, &r, err), -1);
    assert_non_null(strstr(err, "'mem' has no evaluation"));
    rec_close(rec);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layer_by_hand),
        cmocka_unit_test(test_study_by_hand),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_shape),
        cmocka_unit_test(test_read_recorded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
