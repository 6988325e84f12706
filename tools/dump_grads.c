/*
** dump_grads.c — the gradients moelab computes for one fixed batch, written as
** safetensors under the parameter names, so that tools/compare_grads.py can
** check them against PyTorch autograd on the same checkpoint.
**
**   make build/dump_grads
**   build/dump_grads CKPT.safetensors TEXT OUT.safetensors
**
** The batch: 4 sequences of context bytes from TEXT at offsets 0, 5000, 10000
** and 15000 (inputs) and the bytes after them (targets). The gradient is that
** of the mean cross-entropy plus the weighted auxiliary losses.
*/
#include <stdio.h>
#include <stdlib.h>

#include "checkpoint.h"
#include "safetensors.h"
#include "trainer.h"

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: dump_grads CKPT.safetensors TEXT OUT.safetensors\n");
        return 2;
    }
    char err[ML_ERRLEN];
    Model *m;
    trainer_set_threads(0);
    if (checkpoint_load(&m, argv[1], 0, err) != 0) {
        fprintf(stderr, "dump_grads: %s\n", err);
        return 1;
    }
    int B = 4, T = m->config.context, span = 15000 + T + 1;
    unsigned char *text = malloc((size_t)span);
    FILE *f = fopen(argv[2], "rb");
    if (!f || fread(text, 1, (size_t)span, f) != (size_t)span) {
        fprintf(stderr, "dump_grads: '%s' needs at least %d bytes\n", argv[2], span);
        return 1;
    }
    fclose(f);
    int *in = malloc(sizeof(int) * (size_t)B * T), *tg = malloc(sizeof(int) * (size_t)B * T);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            in[b * T + t] = text[b * 5000 + t];
            tg[b * T + t] = text[b * 5000 + t + 1];
        }
    if (model_forward(m, in, tg, B, T, err) != 0 || (model_zero_grad(m), model_backward(m, err)) != 0) {
        fprintf(stderr, "dump_grads: %s\n", err);
        return 1;
    }
    printf("loss %.7f aux %.7f\n", m->mean_loss, m->aux_loss);
    StTensor *ts = calloc((size_t)m->n_params, sizeof *ts);
    for (int i = 0; i < m->n_params; i++) {
        const ParamInfo *p = &m->params[i];
        ts[i] = (StTensor){.name = p->name, .ndim = p->ndim, .shape = {p->shape[0], p->shape[1]},
                           .data = m->grad_mem + p->offset};
    }
    if (st_save(argv[3], ts, m->n_params, NULL, NULL, 0, err) != 0) {
        fprintf(stderr, "dump_grads: %s\n", err);
        return 1;
    }
    free(ts);
    free(in);
    free(tg);
    free(text);
    model_free(m);
    return 0;
}
