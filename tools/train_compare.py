#!/usr/bin/env python3
"""train_compare.py -- a moelab training run replayed step by step in PyTorch.

  ./moelab run tools/train_trace.lua design=top2 out=/tmp/tt
  /usr/bin/python3 tools/train_compare.py /tmp/tt

Reads PREFIX.init.safetensors (the weights before training), PREFIX.db (run
"trace": its training options, seed and per-step losses) and
PREFIX.final.safetensors (the weights after). Rebuilds the model with
tools/torch_ref.py, draws moelab's batches (gsl's mt19937 seeded with the run's
seed, one gsl_rng_uniform_int(len(train) - T) per row), and trains with
torch.optim.AdamW (decay on tensors with ndim >= 2), the warm-up/cosine
schedule down to min_lr, clip_grad_norm_ when clip > 0, and the loss
cross-entropy + balance coefficient x mean over MoE layers. A tensor that
gets no gradient (torch_ref skips an expert without tokens) is given a zero
one, as moelab steps every tensor every step: AdamW still moves it by its
momentum (and decays it). Prints, per step,
both losses and their relative difference, then the worst relative
difference |w_torch - w_moelab| / |w_torch| over the final tensors.
"""
import json
import math
import os
import sqlite3
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_ref as R  # noqa: E402


class GslMt19937:
    """gsl_rng_mt19937: gsl_rng_set and gsl_rng_uniform_int."""

    def __init__(self, seed):
        seed = seed & 0xFFFFFFFF or 4357
        self.mt = [seed]
        for i in range(1, 624):
            prev = self.mt[-1]
            self.mt.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
        self.mti = 624

    def get(self):
        mt = self.mt
        if self.mti >= 624:
            for kk in range(624):
                y = (mt[kk] & 0x80000000) | (mt[(kk + 1) % 624] & 0x7FFFFFFF)
                mt[kk] = mt[(kk + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.mti = 0
        y = mt[self.mti]
        self.mti += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y

    def uniform_int(self, n):
        scale = 0xFFFFFFFF // n
        while True:
            k = self.get() // scale
            if k < n:
                return k


def lr_at(s, o):
    if s < o["warmup"]:
        return o["lr"] * (s + 1) / o["warmup"]
    decay = o["steps"] - o["warmup"]
    if decay <= 0:
        return o["lr"]
    frac = (s - o["warmup"]) / decay
    return o["min_lr"] + 0.5 * (o["lr"] - o["min_lr"]) * (1.0 + math.cos(math.pi * frac))


def main(prefix):
    torch.set_num_threads(1)
    db = sqlite3.connect(prefix + ".db")
    config, seed = db.execute("SELECT config, seed FROM runs WHERE name = 'trace'").fetchone()
    config = json.loads(config)
    o = config["train"]
    losses = [r[0] for r in db.execute("SELECT loss FROM metrics WHERE split = 'train' "
                                       "ORDER BY step")]
    model, _ = R.load_checkpoint(prefix + ".init.safetensors")
    model.train()
    T, B = model.cfg["context"], o["batch"]
    data = open(config["data"]["path"], "rb").read()
    train = data[:int(len(data) * config["data"]["split"])]
    rng = GslMt19937(seed)
    params = list(model.named_parameters())
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"])
    worst_loss, skipped = 0.0, 0
    print("step  moelab loss  torch loss   rel diff")
    for s in range(len(losses)):
        offs = [rng.uniform_int(len(train) - T) for _ in range(B)]
        x = torch.tensor([list(train[a:a + T]) for a in offs])
        y = torch.tensor([list(train[a + 1:a + T + 1]) for a in offs])
        for group in opt.param_groups:
            group["lr"] = lr_at(s, o)
        loss = model.loss(x, y)
        aux = model.aux_loss()
        opt.zero_grad(set_to_none=True)
        (loss if aux is None else loss + aux).backward()
        unused = [p for _, p in params if p.grad is None]
        for p in unused:  # an expert without tokens: moelab steps it with a zero gradient
            p.grad = torch.zeros_like(p)
        skipped += len(unused)
        if o["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip"])
        opt.step()
        rel = abs(loss.item() - losses[s]) / abs(loss.item())
        worst_loss = max(worst_loss, rel)
        print("%4d  %.7f    %.7f    %.2e" % (s + 1, losses[s], loss.item(), rel))
    _, final = R.read_safetensors(prefix + ".final.safetensors")
    rows = []
    for name, p in model.named_parameters():
        a, b = p.detach(), final[name]
        rows.append(((a - b).norm().item() / (a.norm().item() + 1e-12), name))
    rows.sort(reverse=True)
    for rel, name in rows[:5]:
        print("%.2e  %s" % (rel, name))
    print("tensors without a gradient (an expert without tokens), stepped with zeros: %d"
          % skipped)
    # the key part of attn.qkv.bias has a zero gradient: AdamW amplifies its rounding noise
    rest = [r for r in rows if not r[1].endswith("attn.qkv.bias")]
    print("steps %d: worst relative difference of the loss %.2e, of the final weights %.2e "
          "(%s, %d tensors), %.2e but attn.qkv.bias (%s)" % (len(losses), worst_loss, rows[0][0],
          rows[0][1], len(rows), rest[0][0], rest[0][1]))
    return 1 if worst_loss > 1e-4 or rows[0][0] > 1e-3 else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
