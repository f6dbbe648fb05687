#!/usr/bin/env python3
"""PyTorch / transformers equivalents of the kernels timed by `kernels_test --bench`, at the
same Llama-3-8B shapes (micro-batch 2 x 2048), on the same GPU, in the same run: what HF + PEFT
executes for each step (eager bf16 modules, full logits for the loss, fused AdamW over the
LoRA tensors, clip_grad_norm_). Medians of CUDA-event timings, microseconds.
Usage: python3 tests/gpu/bench_torch.py   (needs a CUDA GPU)
"""
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

T, C, FF, H, KV, D, V = 4096, 4096, 14336, 32, 8, 128, 128256
REPS = 30


def median_us(fn, reps=REPS):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1000)
    times.sort()
    return times[len(times) // 2]


def row(name, us):
    print(f"{name:<34} {us:10.1f}", flush=True)


def main():
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name()}")
    print(f"{'torch equivalent':<34} {'median us':>10}")
    # the two ceilings (METHOD.md): device copy bandwidth, bf16 matrix product rate
    src = torch.randn(2**28, device=dev)  # 1 GiB
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src))
    print(f"# ceiling: device copy {2 * src.numel() * 4 / us / 1e3:.0f} GB/s (read + write)")
    del src, dst
    a, b = torch.randn(8192, 8192, device=dev, dtype=bf), torch.randn(8192, 8192, device=dev, dtype=bf)
    us = median_us(lambda: a @ b, 10)
    print(f"# ceiling: bf16 matmul 8192^3 {2 * 8192**3 / us / 1e6:.0f} TFLOP/s")
    del a, b
    table = torch.randn(V, C, device=dev, dtype=bf) * 0.05
    ids = torch.randint(0, V, (1, T), device=dev)
    row("embedding forward", median_us(lambda: F.embedding(ids, table)))

    norm = LlamaRMSNorm(C, eps=1e-5).to(dev, bf)
    norm.weight.requires_grad_(False)
    x = torch.randn(1, T, C, device=dev, dtype=bf, requires_grad=True)
    row("rmsnorm forward", median_us(lambda: norm(x)))
    out = norm(x)
    dout = torch.randn_like(out)
    row("rmsnorm backward (no dweight)", median_us(lambda: torch.autograd.grad(out, x, dout, retain_graph=True)))

    pos = (torch.arange(T, device=dev) % 2048)[None]
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float) / D))
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(bf), emb.sin().to(bf)
    q = torch.randn(1, H, T, D, device=dev, dtype=bf, requires_grad=True)
    k = torch.randn(1, KV, T, D, device=dev, dtype=bf, requires_grad=True)
    row("rope forward q+k (HF, cos/sin given)", median_us(lambda: apply_rotary_pos_emb(q, k, cos, sin)))
    qo, ko = apply_rotary_pos_emb(q, k, cos, sin)
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    row("rope backward q+k", median_us(lambda: torch.autograd.grad((qo, ko), (q, k), (dq, dk), retain_graph=True)))

    gate = (torch.randn(T, FF, device=dev, dtype=bf) * 3).requires_grad_()
    up = torch.randn(T, FF, device=dev, dtype=bf, requires_grad=True)
    row("swiglu forward", median_us(lambda: F.silu(gate) * up))
    y = F.silu(gate) * up
    dy = torch.randn_like(y)
    row("swiglu backward", median_us(lambda: torch.autograd.grad(y, (gate, up), dy, retain_graph=True)))
    del gate, up, y, dy

    hidden = torch.randn(T, C, device=dev, dtype=bf, requires_grad=True)
    targets = torch.randint(0, V, (T,), device=dev)

    def ce_loss():  # what transformers' LlamaForCausalLM does: full logits, upcast, mean CE
        logits = (hidden @ table.t()).float()
        return F.cross_entropy(logits, targets)

    row("cross-entropy loss only", median_us(lambda: ce_loss(), 10))

    def ce_both():
        loss = ce_loss()
        torch.autograd.grad(loss, hidden)

    row("cross-entropy loss + dhidden", median_us(ce_both, 10))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ce_both()
    print(f"# cross-entropy (HF way) extra peak memory {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB")
    del table, hidden

    # LoRA r=16 on q,k,v,o,gate,up,down of 32 layers: 448 fp32 tensors, 41,943,040 parameters
    dims = [(C, C), (C, KV * D), (C, KV * D), (C, C), (C, FF), (C, FF), (FF, C)]
    params = []
    for _ in range(32):
        for din, dout_ in dims:
            params.append(torch.zeros(16, din, device=dev, requires_grad=True))
            params.append(torch.zeros(dout_, 16, device=dev, requires_grad=True))
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    print(f"# LoRA params {sum(p.numel() for p in params)} in {len(params)} tensors")
    row("grad norm + clip (clip_grad_norm_)", median_us(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)))
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, fused=True)
    row("adamw step (fused=True)", median_us(lambda: opt.step()))
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, foreach=True)
    row("adamw step (foreach=True)", median_us(lambda: opt.step()))


if __name__ == "__main__":
    main()
