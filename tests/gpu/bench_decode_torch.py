#!/usr/bin/env python3
"""PyTorch's decode-time products at the shapes `decode_test --bench` times, on the same GPU in the
same run: F.linear (what HF's LlamaForCausalLM runs for each projection during generate) at batch
1..64, with the weights rotated over copies totalling more than the L2 as decode_test does, and
SDPA over a GQA KV cache for one query. Microseconds per call: medians of 15 timings of 20
back-to-back calls. Usage: python3 tests/gpu/bench_decode_torch.py   (needs a CUDA GPU)
"""
import torch
import torch.nn.functional as F


def median_us(fn, reps=15, inner=20):
    for i in range(inner):
        fn(i)
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(inner):
            fn(i)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1000 / inner)
    times.sort()
    return times[len(times) // 2]


def main():
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name()}")
    src = torch.empty(2**29, device=dev, dtype=bf).fill_(1)  # 1 GiB
    dst = torch.empty_like(src)
    us = median_us(lambda i: dst.copy_(src), 9, 3)
    copy = 2 * src.numel() * 2 / us / 1e3
    print(f"# ceiling: device copy {copy:.0f} GB/s (read + write)")
    del src, dst
    shapes = [(4096, 4096, "q/o 4096->4096"), (1024, 4096, "k/v 4096->1024"), (14336, 4096, "gate/up 4096->14336"),
              (4096, 14336, "down 14336->4096"), (128256, 4096, "lm_head 4096->128256")]
    print(f"{'shape (in->out)':<22} {'batch':>5} {'kernel':<22} {'us/call':>9} {'GB/s':>9} {'of copy':>7}")
    for out, inn, name in shapes:
        nbytes = out * inn * 2
        n = max(2, min(16, (512 << 20) // nbytes + 1))
        ws = [torch.randn(out, inn, device=dev, dtype=bf) * 0.02 for _ in range(n)]
        for batch in (1, 2, 8, 16, 32, 64):
            x = torch.randn(batch, inn, device=dev, dtype=bf)
            us = median_us(lambda i: F.linear(x, ws[i % n]))
            gbs = nbytes / us / 1e3
            print(f"{name:<22} {batch:>5} {'torch F.linear':<22} {us:9.2f} {gbs:9.0f} {100 * gbs / copy:6.1f}%", flush=True)
        del ws
    H, KV, D = 32, 8, 128
    print(f"{'decode attention (32/8 heads x 128)':<44} {'us/call':>9} {'GB/s':>9}")
    for batch, length in ((1, 2048), (1, 8192), (64, 2048)):
        k = torch.randn(batch, KV, length, D, device=dev, dtype=bf)
        v = torch.randn_like(k)
        q = torch.randn(batch, H, 1, D, device=dev, dtype=bf)
        us = median_us(lambda i: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        gbs = 2 * k.numel() * 2 / us / 1e3
        print(f"{'torch SDPA (enable_gqa) b%d len %d' % (batch, length):<44} {us:9.2f} {gbs:9.0f}", flush=True)


if __name__ == "__main__":
    main()
