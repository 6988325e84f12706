/*
** test_mpi.c — data and expert parallelism over MPI ranks (dist.h), from
** outside: the binary named by $MOELAB under `mpirun -np 2 --oversubscribe`
** (and --allow-run-as-root as root, as CI runs), against the same script in
** one process, and this program as its own MPI worker. Covered: 2 ranks with
** batch 8 end with the parameters of 1 rank with batch 16 after 5 steps, to
** 1e-5, for a top-2 layer with balance, z and CV² losses, for a stratified
** one, and under expert parallelism with clipping; the ranks' models are the
** same bits; the database rank 0 writes holds what one process's holds
** (losses to 1e-5, every routing and token row of a recorded evaluation split
** over the ranks); one step's gradients under expert parallelism are data
** parallelism's for each design; the traffic table; a rank keeps only its
** own experts' training state; a rank that fails, exits or is killed, or
** ranks that part ways, stop the others instead of leaving them waiting; a
** signal on one rank stops every rank, named; os.exit(0) on every rank ends
** the job as the script's end does;
** ranks holding different models or reading different corpora are refused
** alike; a plain moelab is one rank and says nothing of MPI.
**
** Without $MOELAB every test is skipped with a message; without mpirun they fail.
*/
#include "testproc.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint.h"
#include "dist.h"
#include "model.h"
#include "trainer.h"

static const char *moelab;  /* the binary, or NULL: skip */
static int have_mpirun;
static const char *self;    /* this program, for its workers */

/* make installs openmpi-bin: without mpirun the tests fail, they do not skip */
#define SKIP_WITHOUT_MPI()                                                           \
    do {                                                                             \
        if (!moelab) skip();                                                         \
        if (!have_mpirun) fail_msg("no mpirun: `make deps` installs openmpi-bin");   \
    } while (0)

/* A corpus of words, so that 5 steps move the loss. */
static void write_corpus(const char *path) {
    static const char *const words[] = {"the", "of", "and", "to", "in", "that", "he", "shall",
                                        "unto", "for", "his", "lord", "they", "be", "is", "him"};
    FILE *f = fopen(path, "wb");
    if (!f) fail_msg("cannot write %s", path);
    uint64_t s = 7;
    for (int i = 0; i < 20000; i++) fprintf(f, "%s ", words[test_rand(&s) % 16]);
    fclose(f);
}

/* Trains 5 steps (batch from the arguments), evaluates 6 batches recorded,
** saves the model, and writes each rank's loss of a fixed text, in full. */
static const char *const dp_script =
    "local a = moelab.args\n"
    "moelab.threads(1)\n"
    "local data = moelab.corpus{ path = a.corpus, split = 0.9 }\n"
    "local model = moelab.model{ layers = 2, d_model = 32, heads = 2, context = 32,\n"
    "  moe = { experts = 4, hidden = 32, router = load('return ' .. a.router)(),\n"
    "          aux = { balance = 0.01, z = 0.001, cv2 = 0.01 }, parallel = a.parallel,\n"
    "          placement = a.placement and load('return ' .. a.placement)() }, seed = 3 }\n"
    "local db = moelab.open(a.db)\n"
    "local run = db:run{ name = 'dp', model = model, data = data }\n"
    "run:train{ steps = 5, batch = a.batch, lr = 3e-3, warmup = 1, eval_batches = 2, eval_batch = 4,\n"
    "           clip = tonumber(a.clip or 0) }\n"
    "if a.replace then -- experts to other ranks, or data parallel: the moments follow\n"
    "  if a.replace == 'data' then model:parallel('data')\n"
    "  else model:parallel('experts', load('return ' .. a.replace)()) end\n"
    "  run:train{ steps = 3, batch = a.batch, lr = 3e-3, eval_batches = 0, weight_decay = 0.1,\n"
    "             clip = tonumber(a.clip or 0) }\n"
    "end\n"
    "local e = run:evaluate{ batches = 6, batch = 4, record = true }\n"
    "model:save(a.out)\n"
    "local rows = db:query('select count(*) as n from routing where eval_id = ?', e.eval_id)\n"
    "assert(rows[1].n > 0, 'every rank reads rank 0 rows')\n"
    "local f = assert(io.open(a.out .. '.rank' .. moelab.rank, 'w'))\n"
    "f:write(string.format('%.17g %d %d', model:loss('and the lord shall be'), moelab.ranks, rows[1].n))\n"
    "f:close()\n";

static void mpirun_moelab(Proc *p, int np, const char *const *args, double timeout_s) {
    const char *argv[40];
    int n = 0;
    char nps[16];
    snprintf(nps, sizeof nps, "%d", np);
    argv[n++] = "-np";
    argv[n++] = nps;
    argv[n++] = "--oversubscribe";
    if (geteuid() == 0) argv[n++] = "--allow-run-as-root";
    argv[n++] = moelab;
    for (int i = 0; args[i]; i++) {
        assert_true(n < 39);
        argv[n++] = args[i];
    }
    argv[n] = NULL;
    proc_spawn(p, NULL, "mpirun", argv);
    proc_finish(p, timeout_s);
}

static void expect_ok(const Proc *p, const char *what) {
    if (p->code != 0)
        fail_msg("%s: exit code %d; stdout:\n%s\nstderr:\n%s", what, p->code, p->out.data, p->err.data);
}

static Model *load(const char *path) {
    Model *m = NULL;
    char err[ML_ERRLEN];
    if (checkpoint_load(&m, path, 0, err) != 0) fail_msg("%s: %s", path, err);
    return m;
}

static double file_number(const char *path, int field) {
    FILE *f = fopen(path, "r");
    if (!f) fail_msg("cannot read %s", path);
    double v[3] = {0};
    if (fscanf(f, "%lf %lf %lf", &v[0], &v[1], &v[2]) != 3) fail_msg("%s: not three numbers", path);
    fclose(f);
    return v[field];
}

/* extra: more arguments of both runs (expert parallelism: the one process
** ignores it), or NULL */
static void one_against_two(const char *name, const char *router, const char *const *extra) {
    char corpus[512], script[512], db1[512], db2[512], out1[512], out2[512];
    tmp_path(corpus, sizeof corpus, "corpus.txt");
    write_corpus(corpus);
    tmp_path(script, sizeof script, "dp.lua");
    write_file(script, dp_script);
    char file[128];
    snprintf(file, sizeof file, "%s-one.db", name);
    tmp_path(db1, sizeof db1, file);
    snprintf(file, sizeof file, "%s-two.db", name);
    tmp_path(db2, sizeof db2, file);
    snprintf(file, sizeof file, "%s-one.safetensors", name);
    tmp_path(out1, sizeof out1, file);
    snprintf(file, sizeof file, "%s-two.safetensors", name);
    tmp_path(out2, sizeof out2, file);
    char a_corpus[600], a_router[200], a_db1[600], a_db2[600], a_out1[600], a_out2[600];
    snprintf(a_corpus, sizeof a_corpus, "corpus=%s", corpus);
    snprintf(a_router, sizeof a_router, "router=%s", router);
    snprintf(a_db1, sizeof a_db1, "db=%s", db1);
    snprintf(a_db2, sizeof a_db2, "db=%s", db2);
    snprintf(a_out1, sizeof a_out1, "out=%s", out1);
    snprintf(a_out2, sizeof a_out2, "out=%s", out2);

    Proc p;
    const char *one[12] = {"run", script, a_corpus, a_router, a_db1, a_out1, "batch=16"};
    for (int i = 0, n = 7; extra && extra[i]; i++) one[n++] = extra[i]; /* one process: no effect */
    proc_spawn(&p, NULL, moelab, one);
    proc_finish(&p, 120);
    expect_ok(&p, "one process");
    proc_free(&p);
    const char *two[12] = {"run", script, a_corpus, a_router, a_db2, a_out2, "batch=8"};
    for (int i = 0, n = 7; extra && extra[i]; i++) two[n++] = extra[i];
    mpirun_moelab(&p, 2, two, 120);
    expect_ok(&p, "two ranks");
    proc_free(&p);

    /* the parameters, to 1e-5 */
    Model *m1 = load(out1), *m2 = load(out2);
    assert_int_equal(m1->num_parameters, m2->num_parameters);
    double worst = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < m1->num_parameters; i++) {
        double d = fabs((double)m1->param_mem[i] - m2->param_mem[i]);
        if (d > worst) worst = d, at = i;
    }
    if (worst > 1e-5) fail_msg("%s: parameter %zu differs by %g", name, at, worst);
    model_free(m1);
    model_free(m2);

    /* both ranks hold the same model: the same loss to the last bit */
    char r0[600], r1[600];
    snprintf(r0, sizeof r0, "%s.rank0", out2);
    snprintf(r1, sizeof r1, "%s.rank1", out2);
    assert_true(file_number(r0, 0) == file_number(r1, 0));
    assert_int_equal((int)file_number(r0, 1), 2);
    assert_int_equal((int)file_number(r1, 2), (int)file_number(r0, 2)); /* rank 1 read rank 0's rows */

    /* rank 0's database holds what one process's does */
    sqlite3 *a = db_open(db1), *b = db_open(db2);
    const char *counts[] = {"select count(*) from runs",
                            "select count(*) from metrics",
                            "select count(*) from routing",
                            "select count(*) from token_stats",
                            "select sum(tokens) from expert_load",
                            "select sum(activations) from sparsity",
                            "select max(tokens) from metrics where split = 'train'"};
    for (size_t i = 0; i < sizeof counts / sizeof *counts; i++)
        if (db_int(a, counts[i]) != db_int(b, counts[i]))
            fail_msg("%s: '%s' is %lld for one process, %lld for two ranks", name, counts[i],
                     (long long)db_int(a, counts[i]), (long long)db_int(b, counts[i]));
    char ta[64], tb[64];
    const char *losses[] = {"select loss from metrics where split = 'train' and step = 5",
                            "select aux_loss from metrics where split = 'train' and step = 5",
                            "select loss from evals order by eval_id desc limit 1",
                            "select sum(loss) from token_stats"};
    for (size_t i = 0; i < sizeof losses / sizeof *losses; i++) {
        double x = atof(db_text(a, losses[i], ta, sizeof ta)), y = atof(db_text(b, losses[i], tb, sizeof tb));
        if (!test_close(x, y, 1e-5, 1e-7)) fail_msg("%s: '%s': %s against %s", name, losses[i], ta, tb);
    }
    expect_in("train config", db_text(b, "select json_extract(config, '$.train.ranks') from runs", tb, sizeof tb), "2");
    sqlite3_close(a);
    sqlite3_close(b);
}

/* ---- gradients, by this program started as a worker ---------------------- */

/* A worker process's model of the JSON config and its trainer, over a text
** of 12 letters drawn from text_seed (tests/test_mpi.c's own workers); any
** failure stops every rank. */
typedef struct {
    Corpus *corpus;
    Model *m;
    Trainer t;
} Worker;

static void worker_start(Worker *w, const char *json, uint64_t text_seed, const char *name) {
    static char text[60000];
    for (size_t i = 0; i < sizeof text; i++) text[i] = (char)('a' + test_rand(&text_seed) % 12);
    char err[ML_ERRLEN];
    ModelConfig c;
    w->corpus = NULL;
    w->m = NULL;
    config_defaults(&c);
    if (config_from_json(&c, json, strlen(json), err) != 0 ||
        corpus_from_bytes(&w->corpus, (const uint8_t *)text, sizeof text, 0.9, err) != 0 ||
        model_create(&w->m, &c, err) != 0 ||
        trainer_init(&w->t, w->m, w->corpus, NULL, 0, name, 5, err) != 0)
        dist_fail(err);
}

static int worker_end(Worker *w) {
    trainer_free(&w->t);
    model_free(w->m);
    corpus_free(w->corpus);
    dist_finalize();
    return 0;
}

/* `test_mpi --gradients OUT BATCH CONFIG` (under mpirun or not): one
** training step's gradients of the model CONFIG (JSON) on batch BATCH a
** rank, as trainer_gradients gives them, written by rank 0 to OUT as the
** loss and then every gradient, in floats. */
static int gradients_worker(int argc, char **argv) {
    char err[ML_ERRLEN];
    if (argc != 5 || dist_init(&argc, &argv, err) != 0) {
        fprintf(stderr, "test_mpi --gradients OUT BATCH CONFIG: %s\n", argc != 5 ? "usage" : err);
        return 2;
    }
    Worker w;
    worker_start(&w, argv[4], 11, "grads");
    Model *m = w.m;
    float loss;
    double flops;
    model_zero_grad(m);
    if (trainer_gradients(&w.t, atoi(argv[3]), NULL, &loss, &flops, err) != 0) dist_fail(err);
    if (dist_rank() == 0) {
        FILE *f = fopen(argv[2], "wb");
        if (!f || fwrite(&loss, sizeof loss, 1, f) != 1 ||
            fwrite(m->grad_mem, sizeof(float), m->num_parameters, f) != m->num_parameters)
            dist_fail("cannot write the gradients");
        fclose(f);
    }
    return worker_end(&w);
}

/* How many of the whole pages inside n floats at x are resident. */
static size_t resident_pages(const float *x, size_t n, size_t *pages) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = ((uintptr_t)x + page - 1) / page * page, b = ((uintptr_t)(x + n)) / page * page;
    *pages = b > a ? (b - a) / page : 0;
    if (*pages == 0) return 0;
    unsigned char vec[4096];
    size_t in = 0;
    for (size_t at = 0; at < *pages; at += sizeof vec) {
        size_t k = *pages - at < sizeof vec ? *pages - at : sizeof vec;
        if (mincore((void *)(a + at * page), k * page, vec) != 0) return (size_t)-1;
        for (size_t i = 0; i < k; i++) in += vec[i] & 1;
    }
    return in;
}

static void same_on_both_ranks(const Model *m, const char *when) {
    uint64_t h = 1469598103934665603ULL;
    const unsigned char *b = (const unsigned char *)m->param_mem;
    for (size_t i = 0; i < m->num_parameters * sizeof(float); i++) h = (h ^ b[i]) * 1099511628211ULL;
    int hs[2] = {(int)(h & 0x7fffffff), (int)(h >> 33)}, all[4];
    dist_allgather_int(hs, 2, all);
    char msg[128];
    snprintf(msg, sizeof msg, "the ranks' parameters differ %s", when);
    if (all[0] != all[2] || all[1] != all[3]) dist_fail(msg);
}

/* Under expert parallelism with expert e on rank rank_of[e]: this rank's
** gradients and AdamW moments of other ranks' experts must take no memory
** (no whole page of them resident) and hold zeros, its own experts' moments
** must be resident. Counts the tensors looked at into *mine and *theirs. */
static void expect_sharded(const Model *m, const int *rank_of, const char *when, int *mine,
                           int *theirs) {
    char err[ML_ERRLEN];
    int me = dist_rank();
    for (int i = 0; i < m->n_params; i++) {
        const ParamInfo *p = &m->params[i];
        if (p->expert < 0) continue;
        int own = rank_of[p->expert] == me;
        float *arenas[3] = {m->grad_mem, m->adam_m, m->adam_v};
        for (int a = 0; a < 3; a++) {
            size_t pages, in = resident_pages(arenas[a] + p->offset, p->numel, &pages);
            if (pages == 0) continue;
            if (!own && in != 0) {
                snprintf(err, sizeof err, "%s: %s: %zu of %zu pages of arena %d resident on rank %d",
                         when, p->name, in, pages, a, me);
                dist_fail(err);
            }
            if (own && a > 0 && in != pages) {
                snprintf(err, sizeof err, "%s: %s: own moments not resident on rank %d", when,
                         p->name, me);
                dist_fail(err);
            }
            for (size_t j = 0; !own && j < p->numel; j++)
                if (arenas[a][p->offset + j] != 0.0f) {
                    snprintf(err, sizeof err, "%s: another rank's expert was trained here", when);
                    dist_fail(err);
                }
            own ? (*mine)++ : (*theirs)++;
        }
    }
}

/* `test_mpi --sharded` under mpirun -np 2: trains an expert-parallel model
** 3 steps through trainer_train; then each rank's gradients and AdamW
** moments of the other rank's experts must never have been touched (no page
** of them resident, every value zero), its own experts' moments must be
** (resident), model_memory must count only what it keeps, and both ranks
** must hold the same parameters, bit for bit. The same after 3 more steps
** with the experts placed the other way round (the moments moved: what a
** rank no longer trains is given back), after 3 steps of data parallelism,
** and after 3 more of expert parallelism. */
static int sharded_worker(int argc, char **argv) {
    char err[ML_ERRLEN];
    if (dist_init(&argc, &argv, err) != 0 || dist_size() != 2) {
        fprintf(stderr, "test_mpi --sharded: under mpirun -np 2: %s\n", err);
        return 2;
    }
    const char *json = "{\"layers\":2,\"d_model\":32,\"heads\":2,\"context\":32,\"seed\":3,"
                       "\"moe\":{\"experts\":4,\"hidden\":512,\"router\":{\"kind\":\"topk\",\"k\":2},"
                       "\"parallel\":\"experts\"}}";
    Worker w;
    worker_start(&w, json, 13, "sharded");
    Model *m = w.m;
    Trainer *t = &w.t;
    TrainOptions o;
    TrainResult res;
    train_options_defaults(&o);
    o.steps = 3;
    o.batch = 4;
    o.eval_batches = 0;
    o.progress = 0;
    o.clip = 0.1f;
    int mine = 0, theirs = 0;
    if (trainer_train(t, &o, &res, err) != 0) dist_fail(err);
    const int contiguous[4] = {0, 0, 1, 1}, swapped[4] = {1, 1, 0, 0}; /* E/N a rank by default */
    expect_sharded(m, contiguous, "after expert-parallel training", &mine, &theirs);
    if (mine == 0 || theirs == 0) dist_fail("no whole page to look at");
    /* model:memory counts what this rank keeps */
    size_t kept = 0;
    for (int i = 0; i < m->n_params; i++)
        if (m->params[i].expert < 0 || m->params[i].expert * 2 / 4 == dist_rank()) kept += m->params[i].numel;
    ModelMemory mem;
    model_memory(m, 4, 1, &mem);
    if (mem.gradients != kept * sizeof(float) || mem.optimizer != 2 * kept * sizeof(float) ||
        kept >= m->num_parameters)
        dist_fail("model_memory does not count this rank's experts only");
    /* the same bits on both ranks: the weights came back from their ranks */
    same_on_both_ranks(m, "after expert-parallel training");
    /* another placement: each rank's moments go to the other, and what it
    ** trained before takes no memory any more */
    m->config.moe.n_placement = 4;
    memcpy(m->config.moe.placement, swapped, sizeof swapped);
    if (trainer_train(t, &o, &res, err) != 0) dist_fail(err);
    expect_sharded(m, swapped, "after the experts changed ranks", &mine, &theirs);
    same_on_both_ranks(m, "after the experts changed ranks");
    /* then data parallel: every rank needs every expert's moments, which
    ** come from the ranks that kept them; else the ranks drift apart */
    m->config.moe.parallel_experts = 0;
    m->config.moe.n_placement = 0;
    if (trainer_train(t, &o, &res, err) != 0) dist_fail(err);
    same_on_both_ranks(m, "after data-parallel training that followed");
    /* and expert parallel again: the others' state is given back */
    m->config.moe.parallel_experts = 1;
    if (trainer_train(t, &o, &res, err) != 0) dist_fail(err);
    expect_sharded(m, contiguous, "after expert parallelism again", &mine, &theirs);
    same_on_both_ranks(m, "after expert parallelism again");
    if (dist_rank() == 0) printf("sharded: %d own and %d others' expert arenas looked at\n", mine, theirs);
    return worker_end(&w);
}

/* under expert parallelism a rank keeps the training state of its own
** experts only: the others' gradients and moments take no memory here */
static void test_expert_parallel_shards_training_state(void **state) {
    (void)state;
    SKIP_WITHOUT_MPI();
    const char *argv[] = {"-np", "2", "--oversubscribe", geteuid() == 0 ? "--allow-run-as-root" : "-q",
                          self, "--sharded", NULL};
    Proc p;
    proc_spawn(&p, NULL, "mpirun", argv);
    proc_finish(&p, 120);
    expect_ok(&p, "sharded training state");
    expect_in("sharded", p.out.data, "own and");
    proc_free(&p);
}

/* The gradients of CONFIG over a batch of 16 sequences: one process, 2 ranks
** with 8 each; returns the floats (loss first) and their count. */
static float *gradients(const char *config, int ranks, size_t *n) {
    char out[512], name[64];
    static int runs;
    snprintf(name, sizeof name, "grads-%d", runs++);
    tmp_path(out, sizeof out, name);
    char batch[16];
    snprintf(batch, sizeof batch, "%d", 16 / ranks);
    const char *const args[] = {"--gradients", out, batch, config, NULL};
    Proc p;
    if (ranks == 1) {
        proc_spawn(&p, NULL, self, args);
        proc_finish(&p, 120);
    } else {
        const char *argv[] = {"-np", "2", "--oversubscribe", geteuid() == 0 ? "--allow-run-as-root" : "-q",
                              self, "--gradients", out, batch, config, NULL};
        proc_spawn(&p, NULL, "mpirun", argv);
        proc_finish(&p, 120);
    }
    expect_ok(&p, config);
    proc_free(&p);
    FILE *f = fopen(out, "rb");
    if (!f) fail_msg("no gradients from %s", config);
    size_t cap = 1 << 22;
    float *g = malloc(sizeof(float) * cap);
    *n = fread(g, sizeof(float), cap, f);
    fclose(f);
    return g;
}

/* max |a − b| ≤ 1e-5 and ‖a − b‖ ≤ 1e-4 ‖a‖, the loss first */
static void expect_same_gradients(const char *what, const float *a, const float *b, size_t n) {
    if (!test_close(a[0], b[0], 1e-5, 1e-6)) fail_msg("%s: loss %.9g against %.9g", what, a[0], b[0]);
    double worst = 0.0, diff = 0.0, norm = 0.0;
    size_t at = 0;
    for (size_t i = 1; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > worst) worst = d, at = i;
        diff += d * d;
        norm += (double)a[i] * a[i];
    }
    if (worst > 1e-5 || sqrt(diff) > 1e-4 * sqrt(norm))
        fail_msg("%s: gradient %zu differs by %g; |a - b| / |a| = %g", what, at - 1, worst,
                 sqrt(diff / norm));
}

/* expert parallelism moves the experts' products, not the results: its
** gradients are data parallelism's and one process's, for each design */
static void test_expert_parallel_gradients(void **state) {
    (void)state;
    SKIP_WITHOUT_MPI();
    static const char *const designs[] = {
        "\"router\":{\"kind\":\"topk\",\"k\":2},\"aux\":{\"balance\":0.01,\"z\":0.001,\"cv2\":0.01}",
        "\"router\":{\"kind\":\"threshold\",\"p\":0.8}",
        "\"router\":{\"kind\":\"topk\",\"k\":1,\"capacity_factor\":1}",
        "\"router\":{\"kind\":\"stratified\",\"strata\":[1,1,2]}",
        "\"hidden\":[16,24,40,48],\"router\":{\"kind\":\"topp\",\"p\":0.7},\"aux\":{\"p_penalty\":0.01}",
        "\"router\":{\"kind\":\"topk\",\"k\":2},\"placement\":[1,0,0,1]",
    };
    for (size_t d = 0; d < sizeof designs / sizeof *designs; d++) {
        char dp[1024], ep[1024];
        const char *base = "{\"layers\":2,\"d_model\":32,\"heads\":2,\"context\":32,\"seed\":3,"
                           "\"moe\":{\"experts\":4,%s%s%s}}";
        int placed = strstr(designs[d], "placement") != NULL;
        const char *hidden = strstr(designs[d], "hidden") ? "" : "\"hidden\":32,";
        snprintf(dp, sizeof dp, base, hidden, placed ? "\"router\":{\"kind\":\"topk\",\"k\":2}" : designs[d], "");
        snprintf(ep, sizeof ep, base, hidden, designs[d], ",\"parallel\":\"experts\"");
        size_t n1, n2, n3;
        float *one = gradients(dp, 1, &n1), *data = gradients(dp, 2, &n2), *experts = gradients(ep, 2, &n3);
        assert_int_equal(n1, n2);
        assert_int_equal(n1, n3);
        if (!strstr(designs[d], "capacity")) /* capacity is per rank's slice */
            expect_same_gradients(dp, one, data, n1);
        expect_same_gradients(ep, data, experts, n1);
        free(one);
        free(data);
        free(experts);
    }
}

/* what an expert-parallel run records: every assignment once in traffic, as
** crossing exactly when its token's rank (its slice of the batch) is not its
** expert's (E/N contiguous a rank), and the communication's share of wall_ms */
static void test_traffic_recorded(void **state) {
    (void)state;
    SKIP_WITHOUT_MPI();
    char corpus[512], script[512], db[512], out[512];
    tmp_path(corpus, sizeof corpus, "corpus.txt");
    write_corpus(corpus);
    tmp_path(script, sizeof script, "dp.lua");
    write_file(script, dp_script);
    tmp_path(db, sizeof db, "traffic.db");
    tmp_path(out, sizeof out, "traffic.safetensors");
    char a_corpus[600], a_db[600], a_out[600];
    snprintf(a_corpus, sizeof a_corpus, "corpus=%s", corpus);
    snprintf(a_db, sizeof a_db, "db=%s", db);
    snprintf(a_out, sizeof a_out, "out=%s", out);
    const char *const args[] = {"run", script, a_corpus, a_db, a_out, "batch=8", "parallel=experts",
                                "router={ kind = 'topk', k = 2 }", NULL};
    Proc p;
    mpirun_moelab(&p, 2, args, 120);
    expect_ok(&p, "expert parallel");
    proc_free(&p);
    sqlite3 *d = db_open(db);
    /* the recorded evaluation: batch 4, rank 0 has sequences 0-1 of each,
    ** experts 0-1 live on rank 0 */
    const char *eval = "(SELECT MAX(eval_id) FROM evals WHERE split = 'val')";
    char sql[512];
    snprintf(sql, sizeof sql, "SELECT COUNT(*) FROM routing WHERE eval_id = %s", eval);
    int64_t assignments = db_int(d, sql);
    snprintf(sql, sizeof sql, "SELECT COUNT(*) FROM routing WHERE eval_id = %s "
                              "AND (seq %% 4) / 2 <> expert / 2", eval);
    int64_t crossed = db_int(d, sql);
    assert_true(assignments > 0 && crossed > 0 && crossed < assignments);
    snprintf(sql, sizeof sql, "SELECT SUM(tokens) FROM traffic WHERE eval_id = %s", eval);
    assert_int_equal(db_int(d, sql), assignments);
    snprintf(sql, sizeof sql, "SELECT SUM(tokens) FROM traffic WHERE eval_id = %s AND src_rank <> dst_rank", eval);
    assert_int_equal(db_int(d, sql), crossed);
    /* 32 floats there and back for each that crossed */
    snprintf(sql, sizeof sql, "SELECT SUM(bytes) FROM traffic WHERE eval_id = %s", eval);
    assert_int_equal(db_int(d, sql), crossed * 2 * 32 * 4);
    snprintf(sql, sizeof sql, "SELECT SUM(assignments - kept) FROM v_traffic_local WHERE eval_id = %s", eval);
    assert_int_equal(db_int(d, sql), crossed);
    /* each training step: as many as expert_load kept; backward moves them again */
    for (int step = 1; step <= 5; step++) {
        char a[256], b[256];
        snprintf(a, sizeof a, "SELECT SUM(tokens) FROM traffic WHERE eval_id IS NULL AND step = %d", step);
        snprintf(b, sizeof b, "SELECT SUM(tokens) FROM expert_load WHERE eval_id IS NULL AND step = %d", step);
        assert_int_equal(db_int(d, a), db_int(d, b));
    }
    assert_int_equal(db_int(d, "SELECT COUNT(*) FROM traffic WHERE eval_id IS NULL"), 5 * 2 * 2 * 2);
    assert_int_equal(db_int(d, "SELECT SUM(bytes) = 4 * 32 * 4 * SUM(CASE WHEN src_rank <> dst_rank "
                               "THEN tokens END) FROM traffic WHERE eval_id IS NULL"), 1);
    /* the communication's time, a part of the steps' */
    assert_int_equal(db_int(d, "SELECT COUNT(*) FROM metrics WHERE split = 'train' AND comm_ms > 0 "
                               "AND comm_ms < wall_ms"), 5);
    sqlite3_close(d);
}

static void test_two_ranks_train_as_one_process(void **state) {
    (void)state;
    SKIP_WITHOUT_MPI();
    one_against_two("topk", "{ kind = 'topk', k = 2 }", NULL);
}

/* expert parallelism: each rank trains its own experts (their gradients,
** clipped by the whole model's norm, and AdamW moments only there) and
** hands their weights to the others when training ends; the parameters are
** still one process's, for the default placement and a scattered one */
static void test_expert_parallel_trains_as_one_process(void **state) {
    (void)state;
    SKIP_WITHOUT_MPI();
    const char *const contiguous[] = {"parallel=experts", "clip=0.1", NULL};
    one_against_two("ep", "{ kind = 'topk', k = 2 }", contiguous);
    const char *const scattered[] = {"parallel=experts", "placement={ 1, 0, 0, 1 }", "clip=0.1", NULL};
    one_against_two("ep-placed", "{ kind = 'topk', k = 2 }", scattered);
}

/* a later train call under another placement, or data parallel: the AdamW
** moments go from the ranks that kept them to those that train the experts
** now, and the parameters are still one process's */
static void test_expert_parallel_moments_follow_the_experts(void **state) {
    (void)state;
    SKIP_WITHOUT_MPI();
    const char *const moved[] = {"parallel=experts", "replace={ 1, 1, 0, 0 }", "clip=0.1", NULL};
    one_against_two("ep-moved", "{ kind = 'topk', k = 2 }", moved);
    const char *const data[] = {"parallel=experts", "replace=data", "clip=0.1", NULL};
    one_against_two("ep-then-data", "{ kind = 'topk', k = 2 }", data);
}

/* the passes of a stratified layer hold different tokens on each rank: its
** auxiliary losses and their gradients must still be the whole batch's */
static void test_two_ranks_stratified(void **state) {
    (void)state;
    SKIP_WITHOUT_MPI();
    one_against_two("strata", "{ kind = 'stratified', strata = { 1, 1, 2 } }", NULL);
}

/* rank 1 stops (an error, an exit without MPI, a SIGKILL) while rank 0 waits
** for it in a collective: the job ends, with a message, not a hang */
static void test_a_rank_that_dies_stops_the_others(void **state) {
    (void)state;
    SKIP_WITHOUT_MPI();
    static const char *const deaths[] = {
        "error('rank 1 gave up')",
        "os.exit(3)",
        "os.execute('kill -9 $PPID')",
    };
    static const char *const said[] = {"[rank 1 of 2] ", "non-zero", "rank 1"}; /* ours, mpirun's */
    char corpus[512], script[512], db[512];
    tmp_path(corpus, sizeof corpus, "die-corpus.txt");
    write_corpus(corpus);
    tmp_path(script, sizeof script, "die.lua");
    for (int i = 0; i < 3; i++) {
        char text[2048];
        snprintf(text, sizeof text,
                 "moelab.threads(1)\n"
                 "local data = moelab.corpus{ path = moelab.args.corpus }\n"
                 "local model = moelab.model{ layers = 1, d_model = 16, heads = 2, context = 16,\n"
                 "  moe = { experts = 2, hidden = 16, router = { kind = 'topk', k = 1 } } }\n"
                 "local db = moelab.open(moelab.args.db)\n"
                 "local run = db:run{ name = 'die', model = model, data = data }\n"
                 "run:train{ steps = 3, batch = 2 }\n"
                 "if moelab.rank == 1 then %s end\n"
                 "run:train{ steps = 100000, batch = 2 }\n",
                 deaths[i]);
        write_file(script, text);
        char a_corpus[600], a_db[600], name[32];
        snprintf(name, sizeof name, "die%d.db", i);
        tmp_path(db, sizeof db, name);
        snprintf(a_corpus, sizeof a_corpus, "corpus=%s", corpus);
        snprintf(a_db, sizeof a_db, "db=%s", db);
        const char *const args[] = {"run", script, a_corpus, a_db, NULL};
        Proc p;
        double t0 = now_s();
        mpirun_moelab(&p, 2, args, 60);
        if (p.code == 0) fail_msg("'%s' on rank 1: mpirun exited 0; stderr:\n%s", deaths[i], p.err.data);
        if (now_s() - t0 > 30) fail_msg("'%s' on rank 1: the job took %.0f s to stop", deaths[i], now_s() - t0);
        expect_in("stderr", p.err.data, said[i]);
        proc_free(&p);
    }
}

/* SIGTERM on one rank mid-training (a scheduler ending one node): every rank
** stops at the same step, and the run is recorded as interrupted by SIGTERM,
** not by a Ctrl-C no one pressed. */
static void test_a_signal_on_one_rank_is_named(void **state) {
    (void)state;
    SKIP_WITHOUT_MPI();
    char corpus[512], script[512], db[512], a_corpus[600], a_db[600];
    tmp_path(corpus, sizeof corpus, "term-corpus.txt");
    write_corpus(corpus);
    tmp_path(script, sizeof script, "term.lua");
    write_file(script,
               "moelab.threads(1)\n"
               "local data = moelab.corpus{ path = moelab.args.corpus }\n"
               "local model = moelab.model{ layers = 1, d_model = 16, heads = 2, context = 16 }\n"
               "local db = moelab.open(moelab.args.db)\n"
               "local run = db:run{ name = 'term', model = model, data = data }\n"
               "run:train{ steps = 2, batch = 2, eval_batches = 0 }\n"
               "if moelab.rank == 1 then os.execute('(sleep 1; kill -TERM $PPID) &') end\n"
               "run:train{ steps = 1000000, batch = 2, eval_batches = 0 }\n");
    tmp_path(db, sizeof db, "term.db");
    snprintf(a_corpus, sizeof a_corpus, "corpus=%s", corpus);
    snprintf(a_db, sizeof a_db, "db=%s", db);
    const char *const args[] = {"run", script, a_corpus, a_db, NULL};
    Proc p;
    mpirun_moelab(&p, 2, args, 60);
    if (p.code == 0) fail_msg("SIGTERM on rank 1: mpirun exited 0; stderr:\n%s", p.err.data);
    expect_in("stderr", p.err.data, "interrupted by SIGTERM at step");
    proc_free(&p);
    sqlite3 *d = db_open(db);
    char text[256];
    expect_in("the run", db_text(d, "SELECT status || ': ' || error FROM runs", text, sizeof text),
              "interrupted: interrupted by SIGTERM at step");
    sqlite3_close(d);
}

/* os.exit(0) at the end of a script, on every rank (with or without closing
** the state): the job ends with 0 and the run finished, as when the script
** runs off its end, not as an improper exit mpirun fails, under 2 ranks and
** under `mpirun -np 1` (MPI started, one rank); a successful exit on one
** rank while the other trains stops both, saying where each was. */
static void test_os_exit_on_every_rank_ends_the_job(void **state) {
    (void)state;
    SKIP_WITHOUT_MPI();
    static const char *const exits[] = {"os.exit(0)", "os.exit(true, true)",
                                        "if moelab.rank == 1 then os.exit() end\n"
                                        "run:train{ steps = 2, batch = 2, eval_batches = 0 }"};
    char corpus[512], script[512], db[512], a_corpus[600], a_db[600];
    tmp_path(corpus, sizeof corpus, "exit-corpus.txt");
    write_corpus(corpus);
    tmp_path(script, sizeof script, "exit.lua");
    snprintf(a_corpus, sizeof a_corpus, "corpus=%s", corpus);
    for (int i = 0; i < 5; i++) { /* 3 and 4: the first two under one rank */
        int np = i < 3 ? 2 : 1;
        const char *exit_call = exits[i < 3 ? i : i - 3];
        char text[1024], name[32];
        snprintf(text, sizeof text,
                 "moelab.threads(1)\n"
                 "local data = moelab.corpus{ path = moelab.args.corpus }\n"
                 "local model = moelab.model{ layers = 1, d_model = 16, heads = 2, context = 16 }\n"
                 "local db = moelab.open(moelab.args.db)\n"
                 "local run = db:run{ name = 'exit', model = model, data = data }\n"
                 "run:train{ steps = 2, batch = 2, eval_batches = 0 }\n"
                 "%s\n", exit_call);
        write_file(script, text);
        snprintf(name, sizeof name, "exit%d.db", i);
        tmp_path(db, sizeof db, name);
        snprintf(a_db, sizeof a_db, "db=%s", db);
        const char *const args[] = {"run", script, a_corpus, a_db, NULL};
        Proc p;
        mpirun_moelab(&p, np, args, 60);
        if (i != 2) {
            expect_ok(&p, exit_call);
            sqlite3 *d = db_open(db);
            char status[64];
            assert_string_equal(db_text(d, "SELECT status FROM runs", status, sizeof status),
                                "finished");
            sqlite3_close(d);
        } else {
            if (p.code == 0) fail_msg("os.exit on rank 1: mpirun exited 0; stderr:\n%s", p.err.data);
            expect_in("stderr", p.err.data, "rank 1 at os.exit (");
        }
        proc_free(&p);
    }
}

/* Ranks that part ways (an error one rank raises and catches, a call on one
** rank only, a rank that ends the script while the other makes a call):
** every rank stops within seconds, saying where each one was, instead of
** running each other's collectives or waiting forever. */
static void test_ranks_out_of_step_stop_saying_where(void **state) {
    (void)state;
    SKIP_WITHOUT_MPI();
    static const char *const partings[] = {
        /* rank 1 skips the first query: it would get the second's rows */
        "pcall(function() if moelab.rank == 1 then error('only here') end\n"
        "  db:query('SELECT 1 AS x') end)\n"
        "db:query('SELECT 2 AS x')\n",
        /* rank 1 ends the script while rank 0 trains */
        "if moelab.rank == 0 then run:train{ steps = 2, batch = 2 } end\n",
        /* the same call from the same line, but not the same training: rank
        ** 0 would end it while rank 1 waits for its third step's gradients */
        "run:train{ steps = 2 + moelab.rank, batch = 2, eval_batches = 0 }\n",
        /* nor the same evaluation: rank 1's second batch meets rank 0's end */
        "run:evaluate{ batches = 1 + moelab.rank, batch = 2 }\n",
        /* nor the same batch: the ranks would draw overlapping rows, count
        ** rank 0's tokens only and average unequal batches' gradients */
        "run:train{ steps = 2, batch = 2 + moelab.rank, eval_batches = 0 }\n",
    };
    static const char *const said[] = {"rank 0 at db:query (", "rank 1 at the end of the script",
                                       "rank 1 at run:train (3 steps",
                                       "rank 1 at run:evaluate (2 batches of 2",
                                       "rank 1 at run:train (2 steps of batch 3"};
    char corpus[512], script[512], db[512];
    tmp_path(corpus, sizeof corpus, "part-corpus.txt");
    write_corpus(corpus);
    tmp_path(script, sizeof script, "part.lua");
    for (int i = 0; i < (int)(sizeof partings / sizeof *partings); i++) {
        char text[2048];
        snprintf(text, sizeof text,
                 "moelab.threads(1)\n"
                 "local data = moelab.corpus{ path = moelab.args.corpus }\n"
                 "local model = moelab.model{ layers = 1, d_model = 16, heads = 2, context = 16 }\n"
                 "local db = moelab.open(moelab.args.db)\n"
                 "local run = db:run{ name = 'part', model = model, data = data }\n"
                 "%s", partings[i]);
        write_file(script, text);
        char a_corpus[600], a_db[600], name[32];
        snprintf(name, sizeof name, "part%d.db", i);
        tmp_path(db, sizeof db, name);
        snprintf(a_corpus, sizeof a_corpus, "corpus=%s", corpus);
        snprintf(a_db, sizeof a_db, "db=%s", db);
        const char *const args[] = {"run", script, a_corpus, a_db, NULL};
        Proc p;
        double t0 = now_s();
        mpirun_moelab(&p, 2, args, 60);
        if (p.code == 0) fail_msg("parting %d: mpirun exited 0; stderr:\n%s", i, p.err.data);
        if (now_s() - t0 > 30) fail_msg("parting %d: the job took %.0f s to stop", i, now_s() - t0);
        expect_in("stderr", p.err.data, "the ranks are at different calls");
        expect_in("stderr", p.err.data, said[i]);
        proc_free(&p);
    }
}

/* Errors every rank raises alike, caught by the script, and calls made on
** one rank only: the ranks go on together (no crash on the ranks without a
** database, no abort, no hang), on 3 ranks holding 4 experts unevenly. */
static const char *const alike_script =
    "moelab.threads(1)\n"
    "local a = moelab.args\n"
    "local data = moelab.corpus{ path = a.corpus, split = 0.9 }\n"
    "local function model(router, placement)\n"
    "  return moelab.model{ layers = 1, d_model = 16, heads = 2, context = 16, seed = 3,\n"
    "    moe = { experts = 4, hidden = 16, router = router, parallel = 'experts', placement = placement } }\n"
    "end\n"
    "local function fails(what, f, ...)\n"
    "  local ok, err = pcall(f, ...)\n"
    "  assert(not ok, what .. ': no error')\n"
    "  assert(tostring(err):find(what, 1, true), tostring(err))\n"
    "end\n"
    "local db = moelab.open(a.db)\n"
    "local m = model({ kind = 'topk', k = 2 })\n"
    "local run = db:run{ name = 'alike', model = m, data = data }\n"
    "fails('lr must be', run.train, run, { steps = 1, batch = 2, lr = -1 })\n"
    "fails('eval_batch 1', run.train, run, { steps = 1, batch = 1, eval_batches = 1 })\n"
    "fails('probe: batch 2', run.train, run, { steps = 1, batch = 2, eval_batches = 0,\n"
    "                                          probe = { every = 1, batch = 2 } })\n"
    "local far = model({ kind = 'topk', k = 2 }, { 0, 0, 7, 7 })\n"
    "local run2 = db:run{ name = 'far', model = far, data = data }\n"
    "fails('on rank 7', run2.train, run2, { steps = 1, batch = 2 })\n"
    "local hash = model({ kind = 'hash' })\n"
    "local run3 = db:run{ name = 'hash', model = hash, data = data }\n"
    "fails('oracle', run3.evaluate, run3, { batches = 1, batch = 3, router = { kind = 'oracle', k = 1 } })\n"
    "local orc = moelab.model{ layers = 1, d_model = 16, heads = 2, context = 16,\n"
    "  moe = { experts = 4, hidden = 16, router = { kind = 'oracle', k = 1 } } }\n"
    "local run4 = db:run{ name = 'oracle', model = orc, data = data }\n"
    "fails('not training', run4.train, run4, { steps = 1, batch = 2 })\n"
    "db:query([[CREATE TRIGGER no_finish BEFORE UPDATE OF status ON runs\n"
    "           WHEN NEW.status = 'finished' BEGIN SELECT RAISE(ABORT, 'no finishing'); END]])\n"
    "fails('no finishing', run.train, run, { steps = 1, batch = 2, eval_batches = 0 })\n"
    "db:query('DROP TRIGGER no_finish')\n"
    "local e = run:evaluate{ batches = 1, batch = 3, record = true }\n"
    "assert(#moelab.placement_study(db, e.eval_id, { devices = 2 }) == 2)\n"
    "if moelab.rank == 0 then assert(m:loss('and the lord') > 0) end\n"
    "run:train{ steps = 1, batch = 2, eval_batches = 0 }\n"
    /* what reads activations of a layer's own rows is not left with an
    ** exchange's: a recorded evaluation's sparsity after model:parallel("data"),
    ** fit_router's targets (the same fit as over data parallelism) */
    "m:parallel('data')\n"
    "local d = run:evaluate{ batches = 1, batch = 3, record = true }\n"
    "local q = 'SELECT (SELECT SUM(activations) FROM sparsity WHERE eval_id = ?) AS a, '\n"
    "  .. '(SELECT 16 * COUNT(*) FROM routing WHERE eval_id = ?) AS b'\n"
    "local r = db:query(q, d.eval_id, d.eval_id)[1]\n"
    "assert(r.a == r.b, r.a .. ' activations for ' .. r.b)\n"
    "local dense = moelab.model{ layers = 1, d_model = 16, heads = 2, context = 16, seed = 3 }\n"
    "local fits = {}\n"
    "for _, mode in ipairs{ 'data', 'experts' } do\n"
    "  local moe = moelab.moefy(dense, { experts = 4, method = 'random', router = { kind = 'learned' } })\n"
    "  moe:parallel(mode)\n"
    "  fits[mode] = moelab.fit_router(moe, data, { steps = 3, batch = 4 }).recall\n"
    "end\n"
    "assert(fits.data == fits.experts, fits.data .. ' against ' .. fits.experts)\n";

static void test_errors_raised_alike_leave_the_ranks_together(void **state) {
    (void)state;
    SKIP_WITHOUT_MPI();
    char corpus[512], script[512], db[512], a_corpus[600], a_db[600];
    tmp_path(corpus, sizeof corpus, "alike-corpus.txt");
    write_corpus(corpus);
    tmp_path(script, sizeof script, "alike.lua");
    write_file(script, alike_script);
    tmp_path(db, sizeof db, "alike.db");
    snprintf(a_corpus, sizeof a_corpus, "corpus=%s", corpus);
    snprintf(a_db, sizeof a_db, "db=%s", db);
    const char *const args[] = {"run", script, a_corpus, a_db, NULL};
    Proc p;
    mpirun_moelab(&p, 3, args, 120);
    expect_ok(&p, "errors raised alike");
    proc_free(&p);
    sqlite3 *d = db_open(db);
    char text[64];
    expect_in("statuses", db_text(d, "SELECT group_concat(name || '=' || status, ',') FROM "
                                     "(SELECT name, status FROM runs ORDER BY run_id)",
                                  text, sizeof text),
              "alike=finished,far=failed,hash=finished,oracle=failed");
    sqlite3_close(d);
}

/* Ranks at the same calls that hold different models (a seed or a router
** that depends on the rank), read different corpora (another file, another
** split) or pass different options (lr, an evaluation's seed): every
** rank raises the same error, which a pcall catches on each, instead of
** training on an average of models or data that no record names; options
** that differ only as -0.0 and 0.0 are the same. */
static const char *const inputs_script =
    "moelab.threads(1)\n"
    "local a = moelab.args\n"
    "local function fails(what, f, ...)\n"
    "  local ok, err = pcall(f, ...)\n"
    "  assert(not ok, what .. ': no error')\n"
    "  assert(tostring(err):find(what, 1, true), tostring(err))\n"
    "end\n"
    "local same = moelab.corpus{ path = a.corpus, split = 0.9 }\n"
    "local function model(seed)\n"
    "  return moelab.model{ layers = 1, d_model = 16, heads = 2, context = 16, seed = seed,\n"
    "    moe = { experts = 2, hidden = 16, router = { kind = 'topk', k = 1 }, parallel = a.parallel } }\n"
    "end\n"
    "local db = moelab.open(a.db)\n"
    "local run = db:run{ name = 'fine', model = model(3), data = same }\n"
    "run:train{ steps = 2, batch = 2, eval_batches = 1 }\n"
    "local seeded = db:run{ name = 'seeded', model = model(3 + moelab.rank), data = same }\n"
    "fails('run:train: the ranks hold different models: the configuration or parameters of rank 1',\n"
    "      seeded.train, seeded, { steps = 1, batch = 2 })\n"
    "fails('run:evaluate: the ranks hold different models', seeded.evaluate, seeded, { batches = 1, batch = 2 })\n"
    "local routed = model(3)\n"
    "if moelab.rank == 1 then routed = moelab.model{ layers = 1, d_model = 16, heads = 2, context = 16,\n"
    "  seed = 3, moe = { experts = 2, hidden = 16, router = { kind = 'threshold', p = 0.5 },\n"
    "                    parallel = a.parallel } } end\n"
    "local other = db:run{ name = 'routed', model = routed, data = same }\n"
    "fails('the ranks hold different models: the configuration or parameters of rank 1', other.train,\n"
    "      other, { steps = 1, batch = 2 })\n"
    "fails('the ranks hold different models', run.evaluate, run, { batches = 1, batch = 2,\n"
    "      router = { kind = 'topk', k = 1 + moelab.rank } })\n"
    "fails('run:train: the ranks were given different options: the lr, min_lr', run.train, run,\n"
    "      { steps = 1, batch = 2, lr = 1e-3 * (1 + moelab.rank) })\n"
    "fails('run:evaluate: the ranks were given different options: the seed or split of rank 1',\n"
    "      run.evaluate, run, { batches = 1, batch = 2, seed = moelab.rank })\n"
    "local file = moelab.corpus{ path = moelab.rank == 0 and a.corpus or a.other, split = 0.9 }\n"
    "local read = db:run{ name = 'file', model = model(3), data = file }\n"
    "fails('the ranks read different corpora: the bytes or split of rank 1', read.train, read,\n"
    "      { steps = 1, batch = 2 })\n"
    "local split = moelab.corpus{ path = a.corpus, split = moelab.rank == 0 and 0.9 or 0.8 }\n"
    "local cut = db:run{ name = 'split', model = model(3), data = split }\n"
    "fails('the ranks read different corpora', cut.evaluate, cut, { batches = 1, batch = 2 })\n"
    "run:evaluate{ batches = 1, batch = 2, router = { kind = 'topk', k = 1 } }\n"
    "run:train{ steps = 1, batch = 2, eval_batches = 0 }\n"
    "-- -0.0 is 0.0: the same training, not different options\n"
    "local zero = moelab.rank == 0 and 0.0 or -0.0\n"
    "run:train{ steps = 1, batch = 2, eval_batches = 0, weight_decay = zero, clip = zero }\n";

static void test_ranks_with_different_inputs_refuse(void **state) {
    (void)state;
    SKIP_WITHOUT_MPI();
    char corpus[512], other[512], script[512], db[512], a_corpus[600], a_other[600], a_db[600];
    tmp_path(corpus, sizeof corpus, "inputs-corpus.txt");
    write_corpus(corpus);
    tmp_path(other, sizeof other, "inputs-other.txt");
    FILE *f = fopen(other, "wb");
    if (!f) fail_msg("cannot write %s", other);
    for (int i = 0; i < 2000; i++) fputs("in the beginning ", f);
    fclose(f);
    tmp_path(script, sizeof script, "inputs.lua");
    write_file(script, inputs_script);
    snprintf(a_corpus, sizeof a_corpus, "corpus=%s", corpus);
    snprintf(a_other, sizeof a_other, "other=%s", other);
    static const char *const parallel[] = {"parallel=data", "parallel=experts"};
    for (int i = 0; i < 2; i++) {
        char name[32];
        snprintf(name, sizeof name, "inputs%d.db", i);
        tmp_path(db, sizeof db, name);
        snprintf(a_db, sizeof a_db, "db=%s", db);
        const char *const args[] = {"run", script, a_corpus, a_other, a_db, parallel[i], NULL};
        Proc p;
        mpirun_moelab(&p, 2, args, 60);
        expect_ok(&p, parallel[i]);
        proc_free(&p);
    }
}

/* without mpirun: one rank, no MPI, nothing said about it */
static void test_plain_moelab_is_one_rank(void **state) {
    (void)state;
    if (!moelab) skip();
    char script[512];
    tmp_path(script, sizeof script, "plain.lua");
    write_file(script, "print(moelab.rank, moelab.ranks)\n");
    const char *const args[] = {"run", script, NULL};
    Proc p;
    proc_spawn(&p, NULL, moelab, args);
    proc_finish(&p, 60);
    expect_ok(&p, "plain moelab");
    assert_string_equal(p.out.data, "0\t1\n");
    assert_string_equal(p.err.data, "");
    proc_free(&p);
}

static int group_setup(void **state) {
    (void)state;
    const char *env = getenv("MOELAB");
    if (!env || !*env) {
        fprintf(stderr, "test_mpi: MOELAB is not set (make test sets it to ./moelab); "
                        "skipping every test\n");
        return 0;
    }
    moelab = env;
    have_mpirun = system("mpirun --version > /dev/null 2>&1") == 0;
    /* under `make asan`: Open MPI's memory kept to the end is not a leak of
    ** ours (tests/lsan_mpi.supp); the slow unwinder follows its stacks
    ** through its unloaded components back into its libraries, by name */
    const char *src = getenv("MOELAB_SRC");
    char supp[1024];
    snprintf(supp, sizeof supp, "suppressions=%s/tests/lsan_mpi.supp", src ? src : ".");
    setenv("LSAN_OPTIONS", supp, 0);
    setenv("ASAN_OPTIONS", "fast_unwind_on_malloc=0", 0);
    signal(SIGPIPE, SIG_IGN);
    return tmpdir_make("test_mpi");
}

static int group_teardown(void **state) {
    (void)state;
    tmpdir_remove("test_mpi");
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--gradients") == 0) return gradients_worker(argc, argv);
    if (argc > 1 && strcmp(argv[1], "--sharded") == 0) return sharded_worker(argc, argv);
    self = argv[0];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_expert_parallel_gradients),
        cmocka_unit_test(test_traffic_recorded),
        cmocka_unit_test(test_plain_moelab_is_one_rank),
        cmocka_unit_test(test_two_ranks_train_as_one_process),
        cmocka_unit_test(test_two_ranks_stratified),
        cmocka_unit_test(test_expert_parallel_trains_as_one_process),
        cmocka_unit_test(test_expert_parallel_moments_follow_the_experts),
        cmocka_unit_test(test_expert_parallel_shards_training_state),
        cmocka_unit_test(test_a_rank_that_dies_stops_the_others),
        cmocka_unit_test(test_a_signal_on_one_rank_is_named),
        cmocka_unit_test(test_os_exit_on_every_rank_ends_the_job),
        cmocka_unit_test(test_ranks_out_of_step_stop_saying_where),
        cmocka_unit_test(test_errors_raised_alike_leave_the_ranks_together),
        cmocka_unit_test(test_ranks_with_different_inputs_refuse),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
