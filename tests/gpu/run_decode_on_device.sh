#!/bin/sh
# One call on a GPU machine: the decode kernels (GEMV, decode attention) against their CPU twins,
# memcheck, our timing table with cuBLAS beside it, PyTorch's; logs under ${OUT:-/tmp/gpu-out}.
# Builds with nvcc from kernels/gemv.cu, kernels/decode_attention.cu and lib/cpu_ops.c only (the
# GPU machine may lack the headers `make` needs for the rest of lib/).
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /tmp/gpu-build
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
# a decode_test built elsewhere (build/obj/test-gpu, carried) is used when it runs here
B=build/obj/test-gpu/decode_test
if [ ! -x "$B" ] || ldd "$B" | grep -q 'not found'; then
    echo "# building decode_test here"
    cc -O2 -std=gnu11 -Ilib -c -o /tmp/gpu-build/cpu_ops.o lib/cpu_ops.c &&
        nvcc -O3 -arch=sm_90 -std=c++17 -Ilib -Ikernels -Itests/unit -o /tmp/gpu-build/decode_test \
            tests/gpu/decode_test.cu kernels/gemv.cu kernels/decode_attention.cu /tmp/gpu-build/cpu_ops.o -lcublas ||
        exit 1
    B=/tmp/gpu-build/decode_test
fi
GPU_TESTS=$(dirname "$B") sh tests/gpu/decode.t 2>&1 | tee "$OUT/decode_correctness.txt"
"$B" --bench 2>&1 | tee "$OUT/decode_bench.txt"
PYTHONUNBUFFERED=1 timeout 150 python3 tests/gpu/bench_decode_torch.py 2>&1 | tee "$OUT/decode_torch.txt"
if command -v compute-sanitizer >/dev/null 2>&1; then
    GPU_TEST_SEED=1 timeout 120 compute-sanitizer --tool memcheck --print-limit 20 "$B" >"$OUT/decode_memcheck.txt" 2>&1
    echo "memcheck exit $?: $(grep -E 'ERROR SUMMARY|^not ok' "$OUT/decode_memcheck.txt" | head -5)"
fi
echo "=== summary"
grep -c '^ok' "$OUT/decode_correctness.txt" | sed 's/^/passed: /'
grep '^not ok' "$OUT/decode_correctness.txt" || echo "no failures"
