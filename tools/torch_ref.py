#!/usr/bin/env python3
"""torch_ref.py -- an independent PyTorch reference for moelab checkpoints and training.

The model here is rebuilt from SPEC.md sections 1 and 4 alone, not from moelab's C
source, so that agreement between the two is evidence that both follow the contract.

  torch_ref.py loss CKPT.safetensors TEXTFILE [--json] [--truncate] [--threads N]
      Mean next-byte cross-entropy of the file's bytes (at most context + 1 of them:
      inputs bytes[:-1], targets bytes[1:]) under the checkpoint, in float32 (the
      comparison value) and in float64 (for reference).

  torch_ref.py train [--layers 4 --d-model 128 ... --save PATH.safetensors]
                     [--moe-experts 8 --moe-hidden 128 --router topk|threshold|topp
                      --k 2 --p 0.9 --balance 0.01]
      Trains the same model on data/kjv.txt with moelab's protocol (see train_main)
      and prints the validation loss and training tokens/s. With --moe-experts > 0
      every block (--moe-every) is a dropless MoE layer trained with the balance loss
      (coefficient x mean over MoE layers, added to the cross-entropy), and the
      experts per token over the validation tokens are reported too.

  torch_ref.py val CKPT.safetensors [--data data/kjv.txt] [--split val]
      Mean loss over every non-overlapping context window of the val (or train) split:
      the sampling-noise-free comparison of two checkpoints.

  torch_ref.py selftest
      Writes random small models with this file's safetensors writer, checks the file
      against the names and shapes of SPEC section 4, reloads it with this file's
      loader and checks the loss is bit-identical. Exit code 1 on any failure.

Only the standard library, numpy and torch are used (safetensors is parsed by hand).
Run it with Debian's python (/usr/bin/python3), for which python3-torch is installed.
"""

import argparse
import copy
import json
import math
import os
import struct
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class RefError(Exception):
    """Bad input (checkpoint, config, text): reported as one line, exit code 2."""


# ----------------------------------------------------------------------------
# Configuration (SPEC section 4: keys of the Lua configuration table)

TOP_KEYS = {"vocab", "context", "layers", "d_model", "heads", "norm", "activation",
            "tied", "seed", "ffn", "moe", "norm_eps"}
ROUTER_KINDS_SUPPORTED = {"topk", "threshold", "topp", "stratified", "merge", "all",
                          "similarity", "learned", "oracle"}
CONVERTED_KINDS = {"all", "similarity", "learned", "oracle"}
ROUTER_KINDS_KNOWN = ROUTER_KINDS_SUPPORTED | {"expert_choice", "hash", "stratified", "merge"}


def normalize_config(raw):
    """Validates a moelab_config dict and returns a copy with the defaults filled in.

    Unknown top-level keys are tolerated with a warning (the SPEC lets moelab add keys).
    A dense model may have no "moe", "moe": null, or moe.experts == 0.
    """
    if not isinstance(raw, dict):
        raise RefError("moelab_config is not a JSON object")
    cfg = copy.deepcopy(raw)
    for key in ("context", "layers", "d_model", "heads"):
        if key not in cfg:
            raise RefError("moelab_config lacks the required key '%s'" % key)
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] <= 0:
            raise RefError("moelab_config: '%s' must be a positive integer, got %r" % (key, cfg[key]))
    unknown = sorted(set(cfg) - TOP_KEYS)
    if unknown:
        print("torch_ref: note: ignoring config keys not fixed by the SPEC: %s" % ", ".join(unknown),
              file=sys.stderr)
    cfg.setdefault("vocab", 256)
    cfg.setdefault("norm", "layernorm")
    cfg.setdefault("activation", "gelu")
    cfg.setdefault("tied", False)
    cfg.setdefault("norm_eps", 1e-5)
    ffn = cfg.get("ffn")
    if ffn is None:
        ffn = {}
    if not isinstance(ffn, dict):
        raise RefError("moelab_config: 'ffn' must be an object, got %r" % (ffn,))
    ffn.setdefault("hidden", 4 * cfg["d_model"])
    cfg["ffn"] = ffn
    if cfg["norm"] not in ("layernorm", "rmsnorm"):
        raise RefError("moelab_config: unknown norm %r (expected layernorm or rmsnorm)" % cfg["norm"])
    if cfg["activation"] not in ("gelu", "relu", "swiglu"):
        raise RefError("moelab_config: unknown activation %r (expected gelu, relu or swiglu)"
                       % cfg["activation"])
    if not isinstance(cfg["tied"], bool):
        raise RefError("moelab_config: 'tied' must be true or false, got %r" % (cfg["tied"],))
    if cfg["d_model"] % cfg["heads"] != 0:
        raise RefError("moelab_config: d_model %d is not divisible by heads %d"
                       % (cfg["d_model"], cfg["heads"]))
    if not isinstance(ffn["hidden"], int) or ffn["hidden"] <= 0:
        raise RefError("moelab_config: ffn.hidden must be a positive integer, got %r" % (ffn["hidden"],))
    moe = cfg.get("moe")
    if moe is not None and not isinstance(moe, dict):
        raise RefError("moelab_config: 'moe' must be an object or null, got %r" % (moe,))
    if moe is not None and moe.get("experts", 0) == 0:
        moe = None
    if moe is None:
        cfg.pop("moe", None)
        return cfg
    moe = dict(moe)
    moe.setdefault("every", 1)
    if not isinstance(moe["experts"], int) or moe["experts"] <= 0:
        raise RefError("moelab_config: moe.experts must be a positive integer, got %r" % (moe["experts"],))
    if not isinstance(moe["every"], int) or moe["every"] <= 0:
        raise RefError("moelab_config: moe.every must be a positive integer, got %r" % (moe["every"],))
    hidden = moe.get("hidden", cfg["ffn"]["hidden"])
    if isinstance(hidden, int):
        hidden = [hidden] * moe["experts"]
    if (not isinstance(hidden, list) or len(hidden) != moe["experts"]
            or not all(isinstance(h, int) and h > 0 for h in hidden)):
        raise RefError("moelab_config: moe.hidden must be a positive integer or a list of %d of them"
                       % moe["experts"])
    moe["hidden"] = hidden if len(set(hidden)) > 1 else hidden[0]
    router = dict(moe.get("router") or {})
    router.setdefault("kind", "topk")
    if router["kind"] == "topk":
        router.setdefault("k", 2)
        router.setdefault("normalize", True)
    if router["kind"] == "merge":
        router.setdefault("k", 2)
        router.setdefault("segment", 0)
        router.setdefault("token_attention", 0)
    if router["kind"] == "stratified":
        E = moe["experts"]
        router.setdefault("strata", [E // 2, E - E // 2] if E > 1 else [1])
        router.setdefault("second", "max")
    router.setdefault("capacity_factor", 0)
    moe["router"] = router
    cfg["moe"] = moe
    return cfg


def is_moe_block(cfg, layer):
    """SPEC section 1: block l (from 0) is an MoE block when (l + 1) mod every = 0."""
    moe = cfg.get("moe")
    return moe is not None and (layer + 1) % moe["every"] == 0


def expert_hidden(cfg):
    hidden = cfg["moe"]["hidden"]
    return hidden if isinstance(hidden, list) else [hidden] * cfg["moe"]["experts"]


def check_supported(cfg):
    """Fails clearly on the MoE designs this reference does not implement (yet)."""
    moe = cfg.get("moe")
    if moe is None:
        return
    router = moe["router"]
    kind = router["kind"]
    if kind not in ROUTER_KINDS_KNOWN:
        raise RefError("moelab_config: unknown router kind %r" % (kind,))
    if kind not in ROUTER_KINDS_SUPPORTED:
        raise RefError("router kind %r is not implemented in this reference "
                       "(supported: %s)" % (kind, ", ".join(sorted(ROUTER_KINDS_SUPPORTED))))
    if router.get("capacity_factor", 0) not in (0, 0.0, None):
        raise RefError("capacity_factor %r is not implemented (only dropless, 0)"
                       % (router["capacity_factor"],))
    if kind == "topk" and not (isinstance(router["k"], int) and 1 <= router["k"] <= moe["experts"]):
        raise RefError("moelab_config: router.k must be in 1..%d, got %r" % (moe["experts"], router["k"]))
    if kind in ("threshold", "topp") and "p" not in router:
        raise RefError("moelab_config: router kind %r needs the threshold 'p'" % kind)
    if kind == "stratified":
        strata = router["strata"]
        if (not isinstance(strata, list) or not all(isinstance(n, int) and n > 0 for n in strata)
                or sum(strata) != moe["experts"]):
            raise RefError("moelab_config: router.strata must be sizes adding up to %d, got %r"
                           % (moe["experts"], strata))
        if router["second"] != "max":
            raise RefError("stratified second = %r is not implemented in this reference (only "
                           "'max': a sampled second choice depends on moelab's generator)"
                           % (router["second"],))


def expected_tensors(cfg):
    """SPEC section 4, written out independently of the modules below: name -> shape."""
    V, T, d = cfg["vocab"], cfg["context"], cfg["d_model"]
    H = cfg["ffn"]["hidden"]
    rms = cfg["norm"] == "rmsnorm"
    swiglu = cfg["activation"] == "swiglu"
    out = {"wte.weight": (V, d), "wpe.weight": (T, d)}

    def norm(prefix):
        out[prefix + ".weight"] = (d,)
        if not rms:
            out[prefix + ".bias"] = (d,)

    for l in range(cfg["layers"]):
        p = "h.%d." % l
        norm(p + "ln_1")
        out[p + "attn.qkv.weight"] = (3 * d, d)
        out[p + "attn.qkv.bias"] = (3 * d,)
        out[p + "attn.proj.weight"] = (d, d)
        out[p + "attn.proj.bias"] = (d,)
        norm(p + "ln_2")
        if is_moe_block(cfg, l) and cfg["moe"]["router"]["kind"] == "stratified":
            first = 0
            for s, size in enumerate(cfg["moe"]["router"]["strata"]):
                out[p + "moe.routers.%d.weight" % s] = (cfg["moe"]["experts"] - first, d)
                if s > 0:
                    norm(p + "moe.norms.%d" % s)
                first += size
        elif is_moe_block(cfg, l) and cfg["moe"]["router"]["kind"] == "merge":
            E, He, r = cfg["moe"]["experts"], expert_hidden(cfg)[0], cfg["moe"]["router"]["token_attention"]
            out[p + "moe.gate_fc.weight"] = (E, d)
            out[p + "moe.gate_proj.weight"] = (E, He)
            if r > 0:
                out[p + "moe.tokatt_fc.down.weight"] = (d // r, d)
                out[p + "moe.tokatt_fc.up.weight"] = (d, d // r)
                out[p + "moe.tokatt_proj.down.weight"] = (max(He // r, 1), He)
                out[p + "moe.tokatt_proj.up.weight"] = (He, max(He // r, 1))
        elif is_moe_block(cfg, l) and cfg["moe"]["router"]["kind"] in CONVERTED_KINDS:
            if cfg["moe"].get("bias"):
                out[p + "moe.bias"] = (d,)
            if cfg["moe"]["router"]["kind"] in ("similarity", "learned"):
                out[p + "moe.router.weight"] = (cfg["moe"]["experts"], d)
        elif is_moe_block(cfg, l):
            out[p + "moe.router.weight"] = (cfg["moe"]["experts"], d)
        if is_moe_block(cfg, l):
            for e, He in enumerate(expert_hidden(cfg)):
                q = p + "moe.experts.%d." % e
                out[q + "fc.weight"] = (He, d)
                if cfg["moe"].get("bias"):
                    out[q + "fc.bias"] = (He,)
                out[q + "proj.weight"] = (d, He)
                if swiglu:
                    out[q + "gate.weight"] = (He, d)
        else:
            out[p + "mlp.fc.weight"] = (H, d)
            out[p + "mlp.fc.bias"] = (H,)
            out[p + "mlp.proj.weight"] = (d, H)
            out[p + "mlp.proj.bias"] = (d,)
            if swiglu:
                out[p + "mlp.gate.weight"] = (H, d)
    norm("ln_f")
    if not cfg["tied"]:
        out["lm_head.weight"] = (V, d)
    return out


# ----------------------------------------------------------------------------
# Model (SPEC section 1)

class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(cfg):
    d, eps = cfg["d_model"], cfg["norm_eps"]
    return RMSNorm(d, eps) if cfg["norm"] == "rmsnorm" else nn.LayerNorm(d, eps=eps)


def top_k(scores, k):
    """The k largest along the last dimension, in descending order, ties to the lower
    index, as moelab's routers and gates take them (torch.topk leaves the order of equal
    values unspecified: on an all-zero merged gate input it took the last experts)."""
    values, indices = scores.sort(dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def activate(kind, h, gate_out=None):
    if kind == "gelu":
        return F.gelu(h, approximate="tanh")
    if kind == "relu":
        return F.relu(h)
    return F.silu(gate_out) * h   # swiglu: silu(gate x) * (fc x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["d_model"]
        self.heads = cfg["heads"]
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, d = x.shape
        hs = d // self.heads
        q, k, v = self.qkv(x).split(d, dim=2)       # q, k, v in that order along the output dim
        # head h uses columns h*hs:(h+1)*hs
        q = q.view(B, T, self.heads, hs).transpose(1, 2)
        k = k.view(B, T, self.heads, hs).transpose(1, 2)
        v = v.view(B, T, self.heads, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, d)
        return self.proj(y)


class DenseFFN(nn.Module):
    """fc and proj with biases; SwiGLU's gate without."""

    def __init__(self, cfg):
        super().__init__()
        d, H = cfg["d_model"], cfg["ffn"]["hidden"]
        self.activation = cfg["activation"]
        self.fc = nn.Linear(d, H)
        if self.activation == "swiglu":
            self.gate = nn.Linear(d, H, bias=False)
        self.proj = nn.Linear(H, d)

    def forward(self, x):
        g = self.gate(x) if self.activation == "swiglu" else None
        return self.proj(activate(self.activation, self.fc(x), g))


class Expert(nn.Module):
    """An expert FFN: like DenseFFN but without any bias (SPEC section 1); a
    moefied model's experts (moe.bias) keep their share of the fc bias."""

    def __init__(self, d, H, activation, fc_bias=False):
        super().__init__()
        self.activation = activation
        self.fc = nn.Linear(d, H, bias=fc_bias)
        if activation == "swiglu":
            self.gate = nn.Linear(d, H, bias=False)
        self.proj = nn.Linear(H, d, bias=False)

    def forward(self, x):
        g = self.gate(x) if self.activation == "swiglu" else None
        return self.proj(activate(self.activation, self.fc(x), g))


class AllExperts(nn.Module):
    """A dense FFN split into experts (moelab.moefy): chosen experts at weight 1,
    with moe.bias the experts' fc biases and the layer's proj bias added once.
    Router "all" chooses every expert; "similarity" and "learned" choose by
    p = softmax(x W^T), "oracle" by each expert's share of the activation mass
    sum |a|; then the k largest (select "topk") or the threshold rule with p."""

    def __init__(self, cfg):
        super().__init__()
        d, moe = cfg["d_model"], cfg["moe"]
        self.router_cfg = moe["router"]
        self.activation = cfg["activation"]
        bias = bool(moe.get("bias", False))
        self.experts = nn.ModuleList(Expert(d, He, cfg["activation"], bias) for He in expert_hidden(cfg))
        if self.router_cfg["kind"] in ("similarity", "learned"):
            self.router = nn.Linear(d, moe["experts"], bias=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(d))

    def choose(self, scores):
        """scores (N, E) -> a 0/1 mask of the chosen experts."""
        r = self.router_cfg
        if r.get("select", "topk") == "topk":
            idx = top_k(scores, r.get("k", 2))[1]
            return torch.zeros_like(scores).scatter_(1, idx, 1.0)
        sorted_s, order = scores.sort(dim=-1, descending=True, stable=True)
        keep = (sorted_s.cumsum(dim=-1) - sorted_s) < float(r.get("p", 0.9))
        keep[:, 0] = True
        return torch.zeros_like(scores).scatter_(1, order, keep.to(scores.dtype))

    def forward(self, x):
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        outs = torch.stack([expert(flat) for expert in self.experts], dim=1)   # (N, E, d)
        kind = self.router_cfg["kind"]
        if kind == "all":
            mask = torch.ones(outs.shape[:2], dtype=outs.dtype)
        elif kind == "oracle":
            mass = torch.stack([activate(self.activation, e.fc(flat),
                                         e.gate(flat) if self.activation == "swiglu" else None)
                                .abs().sum(dim=-1) for e in self.experts], dim=1)
            mask = self.choose(mass / mass.sum(dim=-1, keepdim=True))
        else:
            mask = self.choose((flat.float() @ self.router.weight.float().t()).softmax(dim=-1))
        out = (outs * mask.unsqueeze(-1).to(outs.dtype)).sum(dim=1).view(B, T, d)
        return out + self.bias if hasattr(self, "bias") else out


class MoE(nn.Module):
    """Token-choice MoE layer, dropless: p = softmax(x Wr^T) in float32 (SPEC section 2).

    Implemented: topk (renormalised or raw p), threshold (raw p) and topp (renormalised).
    The input x is the block's ln_2 output and the weighted sum of the selected
    experts' outputs is added to the residual stream (an assumption: see README).
    """

    def __init__(self, cfg):
        super().__init__()
        d = cfg["d_model"]
        moe = cfg["moe"]
        self.router_cfg = moe["router"]
        self.router = nn.Linear(d, moe["experts"], bias=False)
        self.experts = nn.ModuleList(Expert(d, He, cfg["activation"]) for He in expert_hidden(cfg))

    def route(self, x, p=None):
        """x (N, d) -> (weights (N, E) with zeros for unselected experts, selected mask (N, E))."""
        r = self.router_cfg
        if p is None:
            p = self.route_probs(x)
        E = p.shape[1]
        if r["kind"] == "topk":
            vals, idx = top_k(p, r["k"])
            selected = torch.zeros_like(p, dtype=torch.bool).scatter_(1, idx, True)
            renorm = bool(r.get("normalize", True))
        else:  # threshold / topp: keep rank j while the sum of the probabilities before it is < t
            sorted_p, order = p.sort(dim=-1, descending=True, stable=True)
            before = sorted_p.cumsum(dim=-1) - sorted_p
            keep = before < float(r["p"])
            keep[:, 0] = True
            max_k = r.get("max_k")
            if max_k:
                keep[:, int(max_k):] = False
            selected = torch.zeros_like(keep).scatter_(1, order, keep)
            renorm = r["kind"] == "topp"
        w = torch.where(selected, p, torch.zeros_like(p))
        if renorm:
            w = w / w.sum(dim=-1, keepdim=True)
        assert w.shape[1] == E
        return w.to(x.dtype), selected

    def route_probs(self, x):
        return (x.float() @ self.router.weight.float().t()).softmax(dim=-1)

    def forward(self, x):
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        p = self.route_probs(flat)
        w, selected = self.route(flat, p)
        # Balance loss (Switch): E * sum_i f_i P_i, f_i = fraction of tokens whose top-1
        # expert is i (no gradient), P_i = mean of p_i over the tokens. Kept on the module
        # for the training loop (GPT.aux_loss); the returned value stays the block output.
        E = p.shape[1]
        f = torch.bincount(p.detach().argmax(dim=-1), minlength=E).to(p.dtype) / p.shape[0]
        self.balance = E * (f * p.mean(dim=0)).sum()
        self.load = selected.sum(dim=0).detach()          # assignments per expert
        self.tokens = flat.shape[0]
        # Grouped execution: per expert, gather its tokens, run it as one batch, scale by
        # the routing weights and scatter-add back (index_select / index_add_ both ways).
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = selected[:, e].nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            y = expert(flat.index_select(0, rows)) * w[:, e].index_select(0, rows).unsqueeze(1)
            out.index_add_(0, rows, y)
        return out.view(B, T, d)


class StratifiedMoE(nn.Module):
    """Stratified experts (SMoE), dropless, from SPEC section 2 alone.

    Experts are split into strata of consecutive experts; stratum s has its own router
    over the experts of strata >= s. Every token starts at stratum 0; each pass takes
    the tokens at the lowest stratum still occupied, normalises them (pass 0 with the
    block's ln_2, pass s >= 1 with its own norm), routes them top-2 (the largest p and
    the second largest, weights renormalised over the pair), adds the weighted expert
    outputs to the residual, and moves each token to 1 + the stratum of its first
    choice; a token at stratum L has left the layer.
    """

    def __init__(self, cfg):
        super().__init__()
        d = cfg["d_model"]
        moe = cfg["moe"]
        self.strata = moe["router"]["strata"]
        self.first = [sum(self.strata[:s]) for s in range(len(self.strata) + 1)]
        E = moe["experts"]
        self.routers = nn.ModuleList(nn.Linear(d, E - self.first[s], bias=False)
                                     for s in range(len(self.strata)))
        self.norms = nn.ModuleDict({str(s): make_norm(cfg) for s in range(1, len(self.strata))})
        self.experts = nn.ModuleList(Expert(d, He, cfg["activation"]) for He in expert_hidden(cfg))

    def forward_block(self, x, ln_2):
        """x (B, T, d): the residual stream before the layer; returns it after."""
        B, T, d = x.shape
        h = x.reshape(B * T, d).clone()
        state = torch.zeros(B * T, dtype=torch.long, device=x.device)
        L = len(self.strata)
        balances = []
        for s in range(L):
            rows = (state == s).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            hs = h.index_select(0, rows)
            u = ln_2(hs) if s == 0 else self.norms[str(s)](hs)
            p = (u.float() @ self.routers[s].weight.float().t()).softmax(dim=-1)
            m = self.first[s]
            top_p, top_e = top_k(p, min(2, p.shape[1]))
            # the pass's balance loss over its visible experts (MoE.forward's formula)
            Es = p.shape[1]
            f = torch.bincount(top_e[:, 0].detach(), minlength=Es).to(p.dtype) / p.shape[0]
            balances.append(Es * (f * p.mean(dim=0)).sum())
            w = top_p / top_p.sum(dim=-1, keepdim=True)
            y = torch.zeros_like(u)
            for i in range(top_e.shape[1]):
                for e in range(p.shape[1]):
                    pick = (top_e[:, i] == e).nonzero(as_tuple=True)[0]
                    if pick.numel():
                        out = self.experts[m + e](u.index_select(0, pick))
                        y.index_add_(0, pick, out * w[pick, i].unsqueeze(1).to(u.dtype))
            h = h.index_add(0, rows, y)
            first_global = top_e[:, 0] + m
            stratum = torch.bucketize(first_global, torch.tensor(self.first[1:], device=x.device),
                                      right=True)
            state = state.index_copy(0, rows, stratum + 1)
        self.balance = torch.stack(balances).mean()   # averaged over the passes that ran
        return h.view(B, T, d)


class TokenAttention(nn.Module):
    """x + Up(ReLU(Down(x))), without biases (SPEC section 2, merged experts)."""

    def __init__(self, width, reduced):
        super().__init__()
        self.down = nn.Linear(width, reduced, bias=False)
        self.up = nn.Linear(reduced, width, bias=False)

    def forward(self, x):
        return x + self.up(F.relu(self.down(x)))


class MergedMoE(nn.Module):
    """Merged experts (MEO) from SPEC section 2 alone.

    fc and proj each have a gate (d -> E on the mean of the layer input, H -> E on the
    mean of the hidden activation) taking the k largest logits with a softmax over the
    k; each linear is merged as W = sum_i g_i W_i and applied once. segment = 0 gates on
    the whole sequence; segment = S > 0 lets positions [sS, (s+1)S) use the means over
    positions [0, max(sS, 1)) only. Token attention r > 0 puts x + Up(ReLU(Down(x)))
    before each merged linear, feeding its gate and the linear.
    """

    def __init__(self, cfg):
        super().__init__()
        d, moe = cfg["d_model"], cfg["moe"]
        router = moe["router"]
        E, H = moe["experts"], expert_hidden(cfg)[0]
        if len(set(expert_hidden(cfg))) != 1:
            raise RefError("merged experts need one hidden size")
        self.k, self.segment, r = router["k"], router["segment"], router["token_attention"]
        self.activation = cfg["activation"]
        self.gate_fc = nn.Linear(d, E, bias=False)
        self.gate_proj = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(Expert(d, H, cfg["activation"]) for _ in range(E))
        if r > 0:
            self.tokatt_fc = TokenAttention(d, d // r)
            self.tokatt_proj = TokenAttention(H, max(H // r, 1))

    def merged(self, gate, mean, which):
        logits, chosen = top_k(gate(mean), self.k)
        g = logits.softmax(dim=-1)
        mats = torch.stack([getattr(self.experts[int(e)], which).weight for e in chosen])
        return (g.view(-1, 1, 1) * mats).sum(dim=0)

    def forward(self, x):
        B, T, d = x.shape
        S = self.segment or T
        xp = self.tokatt_fc(x) if hasattr(self, "tokatt_fc") else x
        out = []
        for b in range(B):
            aps, ys = [], []
            for s in range((T + S - 1) // S):
                lo, hi = s * S, min((s + 1) * S, T)
                end = T if self.segment == 0 else max(s * S, 1)
                W = self.merged(self.gate_fc, xp[b, :end].mean(dim=0), "fc")
                a = activate(self.activation, xp[b, lo:hi] @ W.t())
                ap = self.tokatt_proj(a) if hasattr(self, "tokatt_proj") else a
                aps.append(ap)
                Wp = self.merged(self.gate_proj, torch.cat(aps)[:end].mean(dim=0), "proj")
                ys.append(ap @ Wp.t())
            out.append(torch.cat(ys))
        return torch.stack(out)


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ln_2 = make_norm(cfg)
        if is_moe_block(cfg, layer) and cfg["moe"]["router"]["kind"] == "stratified":
            self.moe = StratifiedMoE(cfg)
        elif is_moe_block(cfg, layer) and cfg["moe"]["router"]["kind"] == "merge":
            self.moe = MergedMoE(cfg)
        elif is_moe_block(cfg, layer) and cfg["moe"]["router"]["kind"] in CONVERTED_KINDS:
            self.moe = AllExperts(cfg)
        elif is_moe_block(cfg, layer):
            self.moe = MoE(cfg)
        else:
            self.mlp = DenseFFN(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        if isinstance(getattr(self, "moe", None), StratifiedMoE):
            return self.moe.forward_block(x, self.ln_2)
        ffn = self.moe if hasattr(self, "moe") else self.mlp
        return x + ffn(self.ln_2(x))


class GPT(nn.Module):
    """Parameter names are exactly SPEC section 4's tensor names."""

    def __init__(self, cfg):
        super().__init__()
        check_supported(cfg)
        self.cfg = cfg
        V, T, d = cfg["vocab"], cfg["context"], cfg["d_model"]
        self.wte = nn.Embedding(V, d)
        self.wpe = nn.Embedding(T, d)
        self.h = nn.ModuleList(Block(cfg, l) for l in range(cfg["layers"]))
        self.ln_f = make_norm(cfg)
        if not cfg["tied"]:
            self.lm_head = nn.Linear(d, V, bias=False)

    def init_weights(self):
        """GPT-2 style: Linear weights and embeddings N(0, 0.02), residual output
        projections N(0, 0.02/sqrt(2*layers)), biases 0, norm weights 1."""
        resid_std = 0.02 / math.sqrt(2 * self.cfg["layers"])
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith("proj.weight"):   # attn.proj, mlp.proj, moe.experts.{e}.proj
                nn.init.normal_(p, 0.0, resid_std)
            else:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx):
        B, T = idx.shape
        if T > self.cfg["context"]:
            raise RefError("sequence of %d tokens exceeds context %d" % (T, self.cfg["context"]))
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        head = self.wte.weight if self.cfg["tied"] else self.lm_head.weight
        return x @ head.t()

    def loss(self, idx, targets):
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def moe_layers(self):
        return [b.moe for b in self.h if hasattr(b, "moe")]

    def aux_loss(self):
        """Weighted auxiliary loss of the last forward: balance coefficient times the MEAN
        over MoE layers of each layer's balance loss (as moelab adds it), or None."""
        layers = self.moe_layers()
        coef = float(((self.cfg.get("moe") or {}).get("aux") or {}).get("balance", 0) or 0)
        if not layers or coef == 0:
            return None
        return coef * torch.stack([m.balance for m in layers]).mean()

    def routing_stats(self):
        """(assignments per MoE layer, tokens) of the last forward."""
        layers = self.moe_layers()
        return [int(m.load.sum()) for m in layers], (layers[0].tokens if layers else 0)


# ----------------------------------------------------------------------------
# safetensors, by hand: u64 LE header length, JSON header, raw little-endian data

DTYPES = {"F32": (np.float32, 4), "F64": (np.float64, 8), "F16": (np.float16, 2),
          "BF16": (None, 2), "I64": (np.int64, 8), "I32": (np.int32, 4)}


def read_safetensors(path):
    """Returns (metadata dict, {name: float32 torch tensor}); RefError on a malformed file."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise RefError("cannot read checkpoint %s: %s" % (path, e.strerror))
    if len(blob) < 8:
        raise RefError("%s: not a safetensors file (%d bytes, no header length)" % (path, len(blob)))
    (hlen,) = struct.unpack("<Q", blob[:8])
    if hlen > len(blob) - 8:
        raise RefError("%s: header length %d runs past the end of the file (%d bytes)"
                       % (path, hlen, len(blob)))
    try:
        header = json.loads(blob[8:8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RefError("%s: header is not valid JSON: %s" % (path, e))
    if not isinstance(header, dict):
        raise RefError("%s: header is not a JSON object" % path)
    meta = header.pop("__metadata__", None) or {}
    data = memoryview(blob)[8 + hlen:]
    tensors = {}
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise RefError("%s: tensor %s lacks dtype/shape/data_offsets" % (path, name))
        if dtype not in DTYPES:
            raise RefError("%s: tensor %s has unsupported dtype %s" % (path, name, dtype))
        npdt, size = DTYPES[dtype]
        count = int(np.prod(shape)) if shape else 1
        if not (0 <= begin <= end <= len(data)) or end - begin != count * size:
            raise RefError("%s: tensor %s: data_offsets [%d, %d) do not fit shape %s of %s in %d data bytes"
                           % (path, name, begin, end, shape, dtype, len(data)))
        spans.append((begin, end, name))
        raw = bytes(data[begin:end])
        if dtype == "BF16":
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(npdt).newbyteorder("<")).astype(np.float32)
        tensors[name] = torch.from_numpy(arr.reshape(shape).copy())
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise RefError("%s: tensors %s and %s overlap" % (path, n0, n1))
    return meta, tensors


def write_safetensors(path, tensors, metadata):
    """tensors: {name: tensor} written as F32 in name order; metadata: {str: str}."""
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        arr = tensors[name].detach().to(torch.float32).cpu().contiguous().numpy().astype("<f4")
        raw = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * (-len(hjson) % 8)   # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for raw in chunks:
            f.write(raw)


def save_checkpoint(model, path):
    state = {k: v for k, v in model.state_dict().items()}
    write_safetensors(path, state, {"moelab_config": json.dumps(model.cfg, separators=(",", ":")),
                                    "format": "pt"})


def load_checkpoint(path):
    meta, tensors = read_safetensors(path)
    if "moelab_config" not in meta:
        raise RefError("%s: no 'moelab_config' in the safetensors metadata" % path)
    try:
        raw_cfg = json.loads(meta["moelab_config"])
    except ValueError as e:
        raise RefError("%s: moelab_config is not valid JSON: %s" % (path, e))
    cfg = normalize_config(raw_cfg)
    check_supported(cfg)
    expected = expected_tensors(cfg)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        def names(lst):
            return ", ".join(lst[:6]) + (" and %d more" % (len(lst) - 6) if len(lst) > 6 else "") or "none"
        raise RefError("%s: tensor names differ from SPEC section 4 for this config; missing: %s; "
                       "unexpected: %s" % (path, names(missing), names(extra)))
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise RefError("%s: tensor %s has shape %s, SPEC section 4 says %s"
                           % (path, name, tuple(tensors[name].shape), shape))
    model = GPT(cfg)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model, raw_cfg


# ----------------------------------------------------------------------------
# loss

def sequence_loss(model, data):
    """data: bytes, 2..context+1 of them. Returns (float32 loss, float64 loss)."""
    idx = torch.tensor(list(data), dtype=torch.long)
    x, y = idx[:-1].unsqueeze(0), idx[1:].unsqueeze(0)
    with torch.no_grad():
        l32 = model.loss(x, y).item()
        m64 = copy.deepcopy(model).double()
        l64 = m64.loss(x, y).item()
    return l32, l64


def loss_main(args):
    torch.set_num_threads(args.threads)
    model, raw_cfg = load_checkpoint(args.ckpt)
    cfg = model.cfg
    try:
        with open(args.text, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RefError("cannot read text %s: %s" % (args.text, e.strerror))
    limit = cfg["context"] + 1
    if len(data) > limit:
        if not args.truncate:
            raise RefError("%s has %d bytes; a sequence is at most context + 1 = %d bytes "
                           "(use --truncate to take the first %d)" % (args.text, len(data), limit, limit))
        data = data[:limit]
    if len(data) < 2:
        raise RefError("%s has %d bytes; need at least 2 (one input, one target)" % (args.text, len(data)))
    if max(data) >= cfg["vocab"]:
        raise RefError("%s has byte %d, outside vocab %d" % (args.text, max(data), cfg["vocab"]))
    l32, l64 = sequence_loss(model, data)
    if args.json:
        print(json.dumps({"loss": float("%.6f" % l32), "loss_f32": l32, "loss_f64": l64,
                          "predictions": len(data) - 1, "checkpoint": args.ckpt, "text": args.text}))
    else:
        print("%.6f" % l32)
        print("float64 reference: %.9f (%d predictions)" % (l64, len(data) - 1), file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------
# train

def load_corpus(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RefError("cannot read corpus %s: %s (make it with: bible \"Gen1:1-Rev22:21\" > data/kjv.txt)"
                       % (path, e.strerror))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def get_batch(split, B, T, gen):
    """Row b: offset o uniform in [0, len - T - 1]; x = data[o:o+T], y = data[o+1:o+T+1]."""
    offs = torch.randint(0, len(split) - T, (B,), generator=gen)
    x = torch.stack([split[o:o + T] for o in offs.tolist()])
    y = torch.stack([split[o + 1:o + T + 1] for o in offs.tolist()])
    return x, y


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    span = max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * (step - args.warmup) / span))


def evaluate(model, split, T, batches, batch, gen):
    """Mean loss over `batches` random batches, the standard error of that mean, and the
    experts per token of each MoE layer over those tokens (empty list for a dense model)."""
    model.eval()
    losses = []
    assign, tokens = None, 0
    with torch.no_grad():
        for _ in range(batches):
            x, y = get_batch(split, batch, T, gen)
            losses.append(model.loss(x, y).item())
            a, n = model.routing_stats()
            assign = a if assign is None else [s + t for s, t in zip(assign, a)]
            tokens += n
    model.train()
    mean = sum(losses) / batches
    var = sum((l - mean) ** 2 for l in losses) / max(1, batches - 1)
    return mean, math.sqrt(var / batches), [a / tokens for a in (assign or [])]


def train_main(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    raw = {"vocab": 256, "context": args.context, "layers": args.layers,
           "d_model": args.d_model, "heads": args.heads, "norm": args.norm,
           "activation": args.activation, "tied": args.tied,
           "norm_eps": args.norm_eps, "seed": args.seed,
           "ffn": {"hidden": args.hidden}}
    if args.moe_experts:
        if args.router == "topk":
            router = {"kind": "topk", "k": args.k, "normalize": not args.raw, "capacity_factor": 0}
        else:
            router = {"kind": args.router, "p": args.p, "capacity_factor": 0}
        raw["moe"] = {"every": args.moe_every, "experts": args.moe_experts,
                      "hidden": args.moe_hidden or args.hidden, "router": router,
                      "aux": {"balance": args.balance}}
    cfg = normalize_config(raw)
    data = load_corpus(args.data)
    n = len(data)
    cut = int(math.floor(n * 0.9))
    train, val = data[:cut], data[cut:]
    T = cfg["context"]
    model = GPT(cfg)
    model.init_weights()
    model.train()
    params = list(model.named_parameters())
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    n_params = sum(p.numel() for _, p in params)
    print("torch_ref train: torch %s, %d threads, corpus %s (%d bytes: train %d, val %d)"
          % (torch.__version__, torch.get_num_threads(), args.data, n, len(train), len(val)))
    print("config %s" % json.dumps(cfg))
    print("training: steps %d batch %d lr %g warmup %d weight_decay %g clip %g seed %d; params %d"
          % (args.steps, args.batch, args.lr, args.warmup, args.weight_decay, args.clip, args.seed, n_params))
    sys.stdout.flush()
    gen = torch.Generator().manual_seed(args.seed)
    train_seconds = 0.0
    window_t, window_loss, window_steps = 0.0, 0.0, 0
    window_aux, late_seconds = 0.0, 0.0
    moe = "moe" in cfg
    loss_val = float("nan")
    last100 = []
    step_seconds = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = get_batch(train, args.batch, T, gen)
        loss = model.loss(x, y)              # cross-entropy: the reported training loss
        aux = model.aux_loss()               # balance coefficient x mean over MoE layers
        opt.zero_grad(set_to_none=True)
        (loss if aux is None else loss + aux).backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        loss_val = loss.item()
        dt = time.perf_counter() - t0
        if not math.isfinite(loss_val):
            print("diverged at step %d (loss %r)" % (step, loss_val))
            return 1
        train_seconds += dt
        step_seconds.append(dt)
        if step >= args.timing_skip:
            late_seconds += dt
        if aux is not None:
            window_aux += aux.item()
        window_t += dt
        window_loss += loss_val
        window_steps += 1
        last100 = (last100 + [loss_val])[-100:]
        if (step + 1) % 100 == 0 or step == 0 or step + 1 == args.steps:
            print("step %5d  loss %.4f  mean %.4f  %slr %.2e  %.0f tokens/s"
                  % (step + 1, loss_val, window_loss / window_steps,
                     "aux %.5f  " % (window_aux / window_steps) if moe else "", lr,
                     window_steps * args.batch * T / window_t))
            sys.stdout.flush()
            window_t, window_loss, window_steps, window_aux = 0.0, 0.0, 0, 0.0
    val_gen = torch.Generator().manual_seed(args.seed + 1000)
    t0 = time.perf_counter()
    val_loss, val_stderr, ept = evaluate(model, val, T, args.eval_batches, args.eval_batch, val_gen)
    eval_seconds = time.perf_counter() - t0
    tokens_per_s = args.steps * args.batch * T / train_seconds
    late_steps = args.steps - args.timing_skip
    late_tps = late_steps * args.batch * T / late_seconds if late_steps > 0 and late_seconds > 0 else None
    print("val loss %.4f +- %.4f (standard error) over %d batches of %d (%.1f s); train %.1f s, %.0f tokens/s"
          % (val_loss, val_stderr, args.eval_batches, args.eval_batch, eval_seconds, train_seconds,
             tokens_per_s))
    if late_tps is not None:
        print("tokens/s over steps %d..%d: %.0f" % (args.timing_skip + 1, args.steps, late_tps))
    if ept:
        print("experts per token (val batches), by MoE layer: %s; mean %.4f"
              % (" ".join("%.4f" % v for v in ept), sum(ept) / len(ept)))
    full = None
    if args.full_val:
        t0 = time.perf_counter()
        full, windows, full_ept = full_split_loss(model, val, T)
        print("val loss over the whole val split (%d windows): %.4f (%.1f s)%s"
              % (windows, full, time.perf_counter() - t0,
                 "; experts per token %.4f" % (sum(full_ept) / len(full_ept)) if full_ept else ""))
    if args.save:
        save_checkpoint(model, args.save)
        print("saved %s" % args.save)
    out = {"val_loss": round(val_loss, 6), "val_loss_stderr": round(val_stderr, 6)}
    if full is not None:
        out["val_loss_full_split"] = round(full, 6)
    out.update({"train_loss_last": round(loss_val, 6),
                "train_loss_last100": round(sum(last100) / len(last100), 6),
                "tokens_per_s": round(tokens_per_s, 1)})
    if late_tps is not None:
        out["tokens_per_s_after_%d" % args.timing_skip] = round(late_tps, 1)
    if ept:
        out["experts_per_token"] = round(sum(ept) / len(ept), 4)
        out["experts_per_token_by_layer"] = [round(v, 4) for v in ept]
        if full is not None:
            out["experts_per_token_full_split"] = round(sum(full_ept) / len(full_ept), 4)
    out.update({"steps": args.steps, "train_seconds": round(train_seconds, 2),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "params": n_params})
    if args.step_times:
        out["step_seconds"] = [round(v, 6) for v in step_seconds]
    print(json.dumps(out))
    return 0


def full_split_loss(model, split, T, batch=64):
    """Mean loss over every non-overlapping window of a split (o = 0, T, 2T, ... while
    o + T + 1 <= len): a noise-free number, unlike the 20 random batches."""
    offsets = list(range(0, len(split) - T, T))
    total, count = 0.0, 0
    assign = None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(offsets), batch):
            offs = offsets[i:i + batch]
            x = torch.stack([split[o:o + T] for o in offs])
            y = torch.stack([split[o + 1:o + T + 1] for o in offs])
            logits = model(x)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                     reduction="sum").double().item()
            count += y.numel()
            a, _ = model.routing_stats()
            assign = a if assign is None else [s + t for s, t in zip(assign, a)]
    model.train(was_training)
    return total / count, len(offsets), [a / count for a in (assign or [])]


def val_main(args):
    torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(args.ckpt)
    data = load_corpus(args.data)
    cut = int(math.floor(len(data) * 0.9))
    split = data[cut:] if args.split == "val" else data[:cut]
    T = model.cfg["context"]
    t0 = time.perf_counter()
    loss, windows, ept = full_split_loss(model, split, T)
    out = {"split": args.split, "loss": round(loss, 6), "windows": windows,
           "tokens": windows * T, "seconds": round(time.perf_counter() - t0, 1),
           "checkpoint": args.ckpt}
    if ept:
        out["experts_per_token"] = round(sum(ept) / len(ept), 4)
        out["experts_per_token_by_layer"] = [round(v, 4) for v in ept]
    print(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------
# selftest

def selftest_main(args):
    torch.set_num_threads(args.threads)
    failures = []

    def check(ok, what):
        print("%s  %s" % ("ok  " if ok else "FAIL", what))
        if not ok:
            failures.append(what)

    variants = []
    for norm in ("layernorm", "rmsnorm"):
        for act in ("gelu", "relu", "swiglu"):
            for tied in (False, True):
                variants.append({"vocab": 256, "context": 16, "layers": 3, "d_model": 32, "heads": 4,
                                 "norm": norm, "activation": act, "tied": tied, "norm_eps": 1e-5,
                                 "seed": 7, "ffn": {"hidden": 48}})
    moe_base = {"vocab": 256, "context": 16, "layers": 4, "d_model": 32, "heads": 2, "norm": "layernorm",
                "activation": "swiglu", "tied": False, "norm_eps": 1e-5, "seed": 7, "ffn": {"hidden": 64}}
    for router in ({"kind": "topk", "k": 2, "normalize": True, "capacity_factor": 0},
                   {"kind": "topk", "k": 1, "normalize": False, "capacity_factor": 0},
                   {"kind": "threshold", "p": 0.5, "capacity_factor": 0},
                   {"kind": "topp", "p": 0.5, "max_k": 2, "capacity_factor": 0}):
        v = copy.deepcopy(moe_base)
        v["moe"] = {"every": 2, "experts": 4, "hidden": [16, 16, 32, 8] if router["kind"] == "topp" else 16,
                    "router": router}
        variants.append(v)
    text = b"In the beginning God created the heaven and the earth."
    with tempfile.TemporaryDirectory() as tmp:
        for i, raw in enumerate(variants):
            torch.manual_seed(100 + i)
            cfg = normalize_config(raw)
            model = GPT(cfg)
            model.init_weights()
            with torch.no_grad():   # non-trivial norms and biases so their loading is tested too
                for name, p in model.named_parameters():
                    if p.dim() == 1:
                        p.add_(0.1 * torch.randn_like(p))
                    elif "router" in name:
                        p.normal_(0.0, 1.0)
            model.eval()
            label = "%s/%s/%s%s" % (cfg["norm"], cfg["activation"], "tied" if cfg["tied"] else "untied",
                                    "/moe-%s" % ",".join("%s=%s" % kv for kv in sorted(cfg["moe"]["router"].items())
                                           if kv[0] != "capacity_factor") if "moe" in cfg else "")
            path = os.path.join(tmp, "m%d.safetensors" % i)
            save_checkpoint(model, path)
            seq = text[:cfg["context"] + 1]
            l32, l64 = sequence_loss(model, seq)
            # the file as written, read back with nothing but struct and json
            with open(path, "rb") as f:
                blob = f.read()
            (hlen,) = struct.unpack("<Q", blob[:8])
            header = json.loads(blob[8:8 + hlen])
            meta = header.pop("__metadata__")
            shapes = {k: tuple(v["shape"]) for k, v in header.items()}
            check(shapes == expected_tensors(cfg), "%s: names and shapes match SPEC section 4" % label)
            check(all(v["dtype"] == "F32" for v in header.values()), "%s: all tensors F32" % label)
            check((8 + hlen) % 8 == 0 and len(blob) == 8 + hlen + sum(
                4 * int(np.prod(s)) for s in shapes.values()), "%s: file layout and size" % label)
            check(json.loads(meta["moelab_config"]) == cfg, "%s: moelab_config round-trips" % label)
            reloaded, _ = load_checkpoint(path)
            r32, r64 = sequence_loss(reloaded, seq)
            check(r32 == l32 and r64 == l64, "%s: reloaded loss identical (%.6f)" % (label, r32))
            check(abs(l32 - l64) < 1e-4, "%s: float32 vs float64 loss |%.2e| < 1e-4" % (label, abs(l32 - l64)))
            # causality: changing the last byte must not change earlier logits
            with torch.no_grad():
                a = torch.tensor(list(seq[:-1])).unsqueeze(0)
                b = a.clone()
                b[0, -1] = (b[0, -1] + 1) % 256
                la, lb = model(a), model(b)
            check(torch.equal(la[:, :-1], lb[:, :-1]), "%s: attention is causal" % label)
        # the grouped MoE execution (index_select / index_add_) against every expert run on
        # every token and masked, and the balance loss against a loop over tokens
        for kind in ("topk", "threshold"):
            torch.manual_seed(11)
            raw = copy.deepcopy(moe_base)
            raw["moe"] = {"every": 1, "experts": 4, "hidden": 16, "aux": {"balance": 0.01},
                          "router": {"kind": kind, "k": 2, "p": 0.7} if kind == "threshold"
                          else {"kind": kind, "k": 2}}
            raw["activation"] = "gelu"
            moe = GPT(normalize_config(raw)).h[0].moe
            with torch.no_grad():
                moe.router.weight.normal_(0.0, 1.0)
            x = torch.randn(3, 5, 32, dtype=torch.float64)
            moe.double()
            with torch.no_grad():
                out = moe(x).reshape(15, 32)
                flat = x.reshape(15, 32)
                w, sel = moe.route(flat)
                ref = sum(w[:, e:e + 1] * ex(flat) for e, ex in enumerate(moe.experts))
                p = moe.route_probs(flat).double()
                f = [sum(1 for t in range(15) if int(p[t].argmax()) == e) / 15 for e in range(4)]
                bal = 4 * sum(f[e] * float(p[:, e].mean()) for e in range(4))
            check(torch.allclose(out, ref, atol=1e-12), "moe/%s: grouped experts equal the masked dense sum" % kind)
            check(abs(float(moe.balance) - bal) < 1e-6, "moe/%s: balance loss %.6f matches the token loop (|%.1e|)"
                  % (kind, bal, abs(float(moe.balance) - bal)))
        # ties go to the lower expert, as in moelab: a merged ReLU layer whose first
        # segment's hidden activations are all zero has proj gate logits all 0, and
        # moelab then merges experts 0 and 1 at 1/2 each
        raw = copy.deepcopy(moe_base)
        raw["activation"] = "relu"
        raw["moe"] = {"every": 1, "experts": 4, "hidden": 16,
                      "router": {"kind": "merge", "k": 2, "segment": 4}}
        torch.manual_seed(12)
        merged = GPT(normalize_config(raw)).h[0].moe
        with torch.no_grad():
            W = merged.merged(merged.gate_proj, torch.zeros(16), "proj")
            half = 0.5 * (merged.experts[0].proj.weight + merged.experts[1].proj.weight)
        check(torch.equal(top_k(torch.tensor([0.5, 0.0, 0.5, 0.0, 0.5]), 3)[1], torch.tensor([0, 2, 4])),
              "top_k: ties to the lower index")
        check(torch.allclose(W, half, atol=1e-7), "merge: an all-zero gate input merges experts 0 and 1")
        # independent check of the attention/norm/FFN math on one dense model: a naive numpy forward
        cfg = normalize_config(variants[0])
        torch.manual_seed(5)
        model = GPT(cfg)
        with torch.no_grad():   # large random weights, so that any mix-up of heads or q/k/v shows
            for p in model.parameters():
                p.normal_(0.0, 0.3)
        seq = text[:cfg["context"] + 1]
        naive = naive_numpy_loss(cfg, {k: v.detach().double().numpy() for k, v in model.state_dict().items()},
                                 seq)
        l32, l64 = sequence_loss(model, seq)
        check(abs(naive - l64) < 1e-9, "naive numpy forward agrees with the torch model (%.3e)" % abs(naive - l64))
        # malformed checkpoints are refused with a message
        bad = os.path.join(tmp, "bad.safetensors")
        with open(bad, "wb") as f:
            f.write(struct.pack("<Q", 1 << 40) + b"{}")
        try:
            load_checkpoint(bad)
            check(False, "malformed header refused")
        except RefError as e:
            check("header length" in str(e), "malformed header refused: %s" % e)
        good = os.path.join(tmp, "m0.safetensors")
        meta, tensors = read_safetensors(good)
        del tensors["ln_f.bias"]
        write_safetensors(bad, tensors, meta)
        try:
            load_checkpoint(bad)
            check(False, "missing tensor refused")
        except RefError as e:
            check("ln_f.bias" in str(e), "missing tensor refused: %s" % e)
    print("selftest: %s" % ("all passed" if not failures else "%d FAILED" % len(failures)))
    return 1 if failures else 0


def naive_numpy_loss(cfg, w, data):
    """A loop-level float64 forward of a dense layernorm/gelu model, for the selftest."""
    assert cfg["norm"] == "layernorm" and cfg["activation"] == "gelu" and "moe" not in cfg
    toks = list(data)
    xs, ys = toks[:-1], toks[1:]
    T, d, nh = len(xs), cfg["d_model"], cfg["heads"]
    hs = d // nh
    eps = cfg["norm_eps"]

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = np.stack([w["wte.weight"][t] + w["wpe.weight"][i] for i, t in enumerate(xs)])
    for l in range(cfg["layers"]):
        p = "h.%d." % l
        a = ln(x, p + "ln_1")
        qkv = a @ w[p + "attn.qkv.weight"].T + w[p + "attn.qkv.bias"]
        y = np.zeros((T, d))
        for h in range(nh):
            q = qkv[:, h * hs:(h + 1) * hs]
            k = qkv[:, d + h * hs:d + (h + 1) * hs]
            v = qkv[:, 2 * d + h * hs:2 * d + (h + 1) * hs]
            for i in range(T):
                s = np.array([q[i] @ k[j] / math.sqrt(hs) for j in range(i + 1)])
                s = np.exp(s - s.max())
                s /= s.sum()
                y[i, h * hs:(h + 1) * hs] = s @ v[:i + 1]
        x = x + y @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        m = ln(x, p + "ln_2")
        hdn = gelu(m @ w[p + "mlp.fc.weight"].T + w[p + "mlp.fc.bias"])
        x = x + hdn @ w[p + "mlp.proj.weight"].T + w[p + "mlp.proj.bias"]
    x = ln(x, "ln_f")
    logits = x @ (w["wte.weight"] if cfg["tied"] else w["lm_head.weight"]).T
    total = 0.0
    for i, t in enumerate(ys):
        z = logits[i]
        total += (np.log(np.exp(z - z.max()).sum()) + z.max()) - z[t]
    return total / len(ys)


# ----------------------------------------------------------------------------

def main(argv):
    ap = argparse.ArgumentParser(prog="torch_ref.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser("loss", help="mean next-byte loss of a text under a moelab checkpoint")
    lp.add_argument("ckpt")
    lp.add_argument("text")
    lp.add_argument("--json", action="store_true", help="print one JSON line")
    lp.add_argument("--truncate", action="store_true", help="take the first context+1 bytes of a longer file")
    lp.add_argument("--threads", type=int, default=1)
    tp = sub.add_parser("train", help="train the reference model on the KJV corpus")
    tp.add_argument("--data", default="data/kjv.txt")
    tp.add_argument("--layers", type=int, default=4)
    tp.add_argument("--d-model", type=int, default=128)
    tp.add_argument("--heads", type=int, default=4)
    tp.add_argument("--context", type=int, default=128)
    tp.add_argument("--hidden", type=int, default=512)
    tp.add_argument("--activation", choices=("gelu", "relu", "swiglu"), default="gelu")
    tp.add_argument("--norm", choices=("layernorm", "rmsnorm"), default="layernorm")
    tp.add_argument("--norm-eps", type=float, default=1e-5)
    g = tp.add_mutually_exclusive_group()
    g.add_argument("--tied", dest="tied", action="store_true")
    g.add_argument("--untied", dest="tied", action="store_false")
    tp.set_defaults(tied=False)
    tp.add_argument("--batch", type=int, default=16)
    tp.add_argument("--lr", type=float, default=3e-3)
    tp.add_argument("--warmup", type=int, default=50)
    tp.add_argument("--steps", type=int, default=1000)
    tp.add_argument("--weight-decay", type=float, default=0.0)
    tp.add_argument("--clip", type=float, default=0.0)
    tp.add_argument("--seed", type=int, default=1)
    tp.add_argument("--threads", type=int, default=2)
    tp.add_argument("--eval-batches", type=int, default=20)
    tp.add_argument("--eval-batch", type=int, default=16)
    tp.add_argument("--save", help="write the trained model as a moelab checkpoint (.safetensors)")
    tp.add_argument("--moe-experts", type=int, default=0, help="experts per MoE block (0: dense)")
    tp.add_argument("--moe-hidden", type=int, default=0, help="hidden size of each expert (default --hidden)")
    tp.add_argument("--moe-every", type=int, default=1, help="block l is MoE when (l+1) %% every == 0")
    tp.add_argument("--router", choices=("topk", "threshold", "topp"), default="topk")
    tp.add_argument("--k", type=int, default=2, help="topk: experts per token")
    tp.add_argument("--raw", action="store_true", help="topk: raw p as weights (default renormalised)")
    tp.add_argument("--p", type=float, default=0.9, help="threshold/topp: the threshold t")
    tp.add_argument("--balance", type=float, default=0.01, help="balance aux loss coefficient")
    tp.add_argument("--timing-skip", type=int, default=10,
                    help="also report tokens/s excluding the first N steps (warm-up)")
    tp.add_argument("--step-times", action="store_true",
                    help="add each training step's seconds to the JSON line (step_seconds)")
    tp.add_argument("--no-full-val", dest="full_val", action="store_false",
                    help="skip the loss over the whole val split after training")
    vp = sub.add_parser("val", help="loss of a checkpoint over all non-overlapping windows of a split")
    vp.add_argument("ckpt")
    vp.add_argument("--data", default="data/kjv.txt")
    vp.add_argument("--split", choices=("val", "train"), default="val")
    vp.add_argument("--threads", type=int, default=2)
    sp = sub.add_parser("selftest", help="writer/loader round trip and SPEC section 4 layout check")
    sp.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "loss":
            return loss_main(args)
        if args.cmd == "train":
            return train_main(args)
        if args.cmd == "val":
            return val_main(args)
        return selftest_main(args)
    except RefError as e:
        print("torch_ref: %s" % e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
