#!/usr/bin/env python3
"""Write the PyTorch goldens that tests/unit/cpu_ops_test.c compares lib/cpu_ops.c with.

Usage: python3 tests/golden/make_ops_goldens.py [OUTDIR]   (default tests/fixtures/ops)

One file per operation, OUTDIR/<op>.bin: a sequence of named tensors, each
    u32 name length, name bytes (ASCII), u32 type (0 float32, 1 int32), u32 element count,
    then the elements, all little-endian.
Inputs are random float32 of small awkward sizes (seeded); outputs are computed by PyTorch /
transformers in float64 from those float32 inputs (RoPE's cos/sin in float32, as transformers
does), then stored as float32.
"""
import os
import struct
import sys

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb


def write(path, tensors):
    with open(path, "wb") as f:
        for name, t in tensors.items():
            t = t.detach().contiguous().reshape(-1)
            kind = 1 if t.dtype in (torch.int32, torch.int64) else 0
            t = t.to(torch.int32 if kind else torch.float32)
            f.write(struct.pack("<I", len(name)) + name.encode())
            f.write(struct.pack("<II", kind, t.numel()))
            f.write(t.numpy().astype("<i4" if kind else "<f4").tobytes())


def rand(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale)


def embedding():
    V, C, T = 11, 7, 9
    table = rand(V, C)
    ids = torch.randint(0, V, (T,), dtype=torch.int32)
    out = F.embedding(ids.long(), table.double())
    return {"table": table, "ids": ids, "out": out}


def rmsnorm():
    T, C, eps = 5, 13, 1e-5
    x, w, dout = rand(T, C, scale=2.0), 1 + rand(C, scale=0.1), rand(T, C)
    norm = LlamaRMSNorm(C, eps=eps).double()
    with torch.no_grad():
        norm.weight.copy_(w.double())
    x64 = x.double().requires_grad_()
    out = norm(x64)
    out.backward(dout.double())
    return {"x": x, "weight": w, "dout": dout, "out": out, "dx": x64.grad, "dweight": norm.weight.grad}


def rope(kind):
    T, H, D = 7, 3, 16
    params = {"rope_type": "default", "rope_theta": 10000.0}
    if kind == "llama3":
        # small original context so that all three frequency bands of llama3 scaling occur
        params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    elif kind == "linear":
        params = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    config = LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=H, head_dim=D,
                         max_position_embeddings=8192, rope_parameters=params)
    rot = LlamaRotaryEmbedding(config)
    # two documents packed in one row: positions restart at 0; large ones exercise the angles
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], dtype=torch.int32)
    if kind == "llama3":
        pos = torch.tensor([[0, 1, 2, 3000, 0, 1, 8191]], dtype=torch.int32)
    x, dout = rand(T, H, D), rand(T, H, D)
    x64 = x.double().requires_grad_()
    cos, sin = rot(x64, pos.long())  # (1, T, D), computed in float32, cast to float64
    q = x64.transpose(0, 1).unsqueeze(0)  # (1, H, T, D)
    out, _ = apply_rotary_pos_emb(q, q, cos, sin)
    out = out.squeeze(0).transpose(0, 1)  # (T, H, D)
    out.backward(dout.double())
    dims = torch.tensor([T, H, D], dtype=torch.int32)
    scaling = {"default": [0, 0, 0, 0, 0], "linear": [1, 4.0, 0, 0, 0],
               "llama3": [2, 8.0, 1.0, 4.0, 64]}[kind]
    return {"dims": dims, "theta": torch.tensor([params["rope_theta"]]),
            "scaling": torch.tensor(scaling, dtype=torch.float32), "inv_freq": rot.inv_freq, "pos": pos[0],
            "x": x, "dout": dout, "out": out, "dx": x64.grad}


def swiglu():
    n = 37
    g, u, dout = rand(n, scale=3.0), rand(n), rand(n)
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    out = F.silu(g64) * u64
    out.backward(dout.double())
    return {"gate": g, "up": u, "dout": dout, "out": out, "dgate": g64.grad, "dup": u64.grad}


def cross_entropy():
    T, C, V = 6, 10, 53
    h, w = rand(T, C), rand(V, C, scale=0.5)
    targets = torch.randint(0, V, (T,), dtype=torch.int32)
    targets[2] = -100  # a prompt position: not trained
    targets[4] = V - 1  # the last vocab entry, in the short last chunk
    h64 = h.double().requires_grad_()
    logits = h64 @ w.double().t()
    losses = F.cross_entropy(logits, targets.long(), ignore_index=-100, reduction="none")
    trained = int((targets >= 0).sum())
    (losses.sum() / trained).backward()
    return {"dims": torch.tensor([T, C, V], dtype=torch.int32), "hidden": h, "weight": w,
            "targets": targets, "losses": losses, "dhidden": h64.grad}


def adamw():
    n, steps, lr, wd, max_norm = 29, 3, 1e-2, 0.01, 1.0
    p0 = rand(n)
    # gradient norms about 0.5, 2.7 and 1.1 of max_norm 1: the first step is not clipped
    grads = [rand(n, scale=s) for s in (0.1, 0.5, 0.2)]
    p = torch.nn.Parameter(p0.double().clone())
    opt = torch.optim.AdamW([p], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    norms = []
    for g in grads:
        p.grad = g.double().clone()
        norms.append(float(torch.nn.utils.clip_grad_norm_([p], max_norm)))
        opt.step()
    return {"config": torch.tensor([lr, wd, max_norm], dtype=torch.float32), "param0": p0,
            "grads": torch.stack(grads), "norms": torch.tensor(norms), "param": p.detach(),
            "exp_avg": opt.state[p]["exp_avg"], "exp_avg_sq": opt.state[p]["exp_avg_sq"]}


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "fixtures", "ops")
    os.makedirs(outdir, exist_ok=True)
    torch.manual_seed(20261130)
    ops = {"embedding": embedding, "rmsnorm": rmsnorm, "rope_default": lambda: rope("default"),
           "rope_linear": lambda: rope("linear"), "rope_llama3": lambda: rope("llama3"),
           "swiglu": swiglu, "cross_entropy": cross_entropy, "adamw": adamw}
    for name, fn in ops.items():
        write(os.path.join(outdir, name + ".bin"), fn())


if __name__ == "__main__":
    main()
