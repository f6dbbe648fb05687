#!/bin/sh
# One call on a GPU machine: correctness of every kernel, our timings, PyTorch's timings, with
# logs under ${OUT:-/tmp/gpu-out}. Uses build/obj/test-gpu/kernels_test when it runs there
# (carried from a build machine), else builds it with nvcc from kernels/ and lib/cpu_ops.c only
# (the GPU machine may lack the other libraries' headers that `make` needs).
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
B=build/obj/test-gpu/kernels_test
if [ ! -x "$B" ] || ldd "$B" | grep -q 'not found'; then
    echo "# building kernels_test here"
    mkdir -p /tmp/gpu-build && cc -O2 -std=gnu11 -Ilib -c -o /tmp/gpu-build/cpu_ops.o lib/cpu_ops.c &&
        nvcc -O3 -arch=sm_90 -std=c++17 -Ilib -Ikernels -Itests/unit -o /tmp/gpu-build/kernels_test \
            tests/gpu/kernels_test.cu kernels/embedding.cu kernels/rmsnorm.cu kernels/rope.cu kernels/swiglu.cu \
            kernels/cross_entropy.cu kernels/adamw.cu /tmp/gpu-build/cpu_ops.o -lcublas || exit 1
    B=/tmp/gpu-build/kernels_test
fi
GPU_TESTS=$(dirname "$B") sh tests/gpu/kernels.t 2>&1 | tee "$OUT/correctness.txt"
# bad memory accesses in the kernels at the awkward sizes (compute-sanitizer works on Firecracker
# machines; skipped where it is missing)
if command -v compute-sanitizer >/dev/null 2>&1; then
    GPU_TEST_SEED=1 timeout 300 compute-sanitizer --tool memcheck --print-limit 20 "$B" >"$OUT/memcheck.txt" 2>&1
    echo "memcheck exit $?: $(grep -E 'ERROR SUMMARY|^not ok' "$OUT/memcheck.txt" | head -5)"
fi
"$B" --bench 2>&1 | tee "$OUT/bench.txt"
PYTHONUNBUFFERED=1 python3 tests/gpu/bench_torch.py 2>&1 | tee "$OUT/torch.txt"
echo "=== summary"
grep -c '^ok' "$OUT/correctness.txt" | sed 's/^/passed: /'
grep '^not ok' "$OUT/correctness.txt" || echo "no failures"
cat "$OUT/bench.txt"
