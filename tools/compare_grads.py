#!/usr/bin/env python3
"""compare_grads.py -- moelab's gradients against PyTorch autograd on one batch.

  make build/dump_grads
  build/dump_grads CKPT.safetensors data/kjv.txt /tmp/g.safetensors
  /usr/bin/python3 tools/compare_grads.py CKPT.safetensors data/kjv.txt /tmp/g.safetensors

Rebuilds the checkpoint with tools/torch_ref.py (SPEC section 4 alone), takes the
same batch as dump_grads (4 sequences at offsets 0, 5000, 10000, 15000), backpropagates
cross-entropy plus the weighted auxiliary loss, and prints the relative difference
|g_torch - g_moelab| / |g_torch| of every tensor, worst first. Exit code 1 if any is
above 1e-4.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_ref as R  # noqa: E402


def main(ckpt, text, grads):
    model, _ = R.load_checkpoint(ckpt)
    T = model.cfg["context"]
    buf = open(text, "rb").read(15000 + T + 1)
    x = torch.tensor([[buf[b * 5000 + t] for t in range(T)] for b in range(4)])
    y = torch.tensor([[buf[b * 5000 + t + 1] for t in range(T)] for b in range(4)])
    loss = model.loss(x, y)
    aux = model.aux_loss()
    print("torch loss %.7f aux %.7f" % (loss.item(), aux.item() if aux is not None else 0.0))
    (loss + (aux if aux is not None else 0)).backward()
    _, g = R.read_safetensors(grads)
    rows = []
    for name, p in model.named_parameters():
        a = p.grad if p.grad is not None else torch.zeros_like(p)
        b = g[name]
        rows.append(((a - b).norm().item() / (a.norm().item() + 1e-12), name))
    rows.sort(reverse=True)
    for rel, name in rows[:10]:
        print("%.2e  %s" % (rel, name))
    print("worst relative difference %.2e over %d tensors" % (rows[0][0], len(rows)))
    return 1 if rows[0][0] > 1e-4 else 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
