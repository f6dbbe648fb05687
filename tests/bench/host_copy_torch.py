"""Host <-> device copy rates on this machine (torch, pinned host memory, 1 GiB, mean of 5 after a
warm-up): to the host, from it, and both at once on two streams. The numbers behind the
host-offload arithmetic in kernels/NOTES.md (issue 6, part 6).
usage: python3 tests/bench/host_copy_torch.py
"""
import time

import torch

N = 1 << 30  # bytes


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main():
    d = torch.empty(N // 2, dtype=torch.bfloat16, device="cuda").normal_()
    d2 = torch.empty_like(d)
    h = torch.empty(N // 2, dtype=torch.bfloat16).pin_memory()
    h2 = torch.empty(N // 2, dtype=torch.bfloat16).pin_memory()
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def both():
        with torch.cuda.stream(s1):
            h.copy_(d, non_blocking=True)
        with torch.cuda.stream(s2):
            d2.copy_(h2, non_blocking=True)

    d2h = timed(lambda: h.copy_(d, non_blocking=True))
    h2d = timed(lambda: d2.copy_(h, non_blocking=True))
    bt = timed(both)
    print("%s: to the host %.1f GB/s, from it %.1f GB/s, both at once %.1f GB/s each"
          % (torch.cuda.get_device_name(), N / d2h / 1e9, N / h2d / 1e9, N / bt / 1e9))


if __name__ == "__main__":
    main()
