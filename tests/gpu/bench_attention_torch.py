"""PyTorch's causal attention (F.scaled_dot_product_attention, flash backend) on the shapes of
attention_test --bench: Llama-3-8B heads (32 query, 8 kv, head_dim 128), bf16, forward and
backward, medians of CUDA-event timings, TFLOP/s counted as there (forward 4*hd*Hq*sum(len^2)/2,
backward 2.5x). Documents packed in one row are independent sequences, so a row of n documents
of length L is timed as a batch of n sequences of length L. K and V are expanded to 32 heads
before timing (what HF's repeat_kv does); enable_gqa is timed too where the flash backend takes it.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HQ, HKV, HD, REPS = 32, 8, 128, 20


def median_us(fn):
    for _ in range(3):
        fn()
    times = []
    for _ in range(REPS):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) * 1000)
    return sorted(times)[REPS // 2]


def run(name, n_docs, doc_len, gqa):
    torch.manual_seed(0)
    q = torch.randn(n_docs, HQ, doc_len, HD, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv_heads = HKV if gqa else HQ
    k = torch.randn(n_docs, kv_heads, doc_len, HD, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(n_docs, kv_heads, doc_len, HD, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(n_docs, HQ, doc_len, HD, device="cuda", dtype=torch.bfloat16)
    extra = {"enable_gqa": True} if gqa else {}
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fwd = median_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)
        bwd = median_us(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    flops = 4.0 * HD * HQ * n_docs * doc_len * doc_len / 2
    print(f"{name:<10} {fwd:12.1f} {flops / fwd / 1e6:9.0f} {bwd:12.1f} {2.5 * flops / bwd / 1e6:9.0f}"
          f"  {'enable_gqa' if gqa else 'kv expanded to 32 heads'}", flush=True)


print(f"# torch {torch.__version__}, {torch.cuda.get_device_name()}; SDPA flash backend, is_causal")
print(f"{'shape':<10} {'forward us':>12} {'TFLOP/s':>9} {'backward us':>12} {'TFLOP/s':>9}")
for name, n_docs, doc_len in (("2 x 2048", 2, 2048), ("1 x 8192", 1, 8192), ("8 x 512", 8, 512)):
    run(name, n_docs, doc_len, gqa=False)
    try:
        run(name, n_docs, doc_len, gqa=True)
    except RuntimeError as e:
        print(f"{name:<10} enable_gqa with the flash backend: {str(e).splitlines()[0][:100]}")
