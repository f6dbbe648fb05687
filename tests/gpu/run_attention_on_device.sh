#!/bin/sh
# One call on a GPU machine: attention kernels against their CPU twin, memcheck, our timings and
# PyTorch's (SDPA flash) on the same shapes, logs under ${OUT:-/tmp/gpu-out}. Builds with nvcc
# from kernels/attention.cu and lib/cpu_ops.c only (the GPU machine may lack the headers `make`
# needs for the rest of lib/).
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /tmp/gpu-build
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
cc -O2 -std=gnu11 -Ilib -c -o /tmp/gpu-build/cpu_ops.o lib/cpu_ops.c &&
    nvcc -O3 -arch=sm_90 -std=c++17 -Ilib -Ikernels -Itests/unit -o /tmp/gpu-build/attention_test \
        tests/gpu/attention_test.cu kernels/attention.cu /tmp/gpu-build/cpu_ops.o || exit 1
B=/tmp/gpu-build/attention_test
# tensor-core instructions in the kernels (HMMA: mma.sync; none would mean a scalar fallback)
command -v cuobjdump >/dev/null 2>&1 && echo "HMMA instructions in attention_test: $(cuobjdump --dump-sass "$B" | grep -c HMMA)"
GPU_TESTS=/tmp/gpu-build sh tests/gpu/attention.t 2>&1 | tee "$OUT/attention_correctness.txt"
"$B" --bench 2>&1 | tee "$OUT/attention_bench.txt"
PYTHONUNBUFFERED=1 timeout 200 python3 tests/gpu/bench_attention_torch.py 2>&1 | tee "$OUT/attention_torch.txt"
if command -v compute-sanitizer >/dev/null 2>&1; then
    GPU_TEST_SEED=1 timeout 240 compute-sanitizer --tool memcheck --print-limit 20 "$B" >"$OUT/attention_memcheck.txt" 2>&1
    echo "memcheck exit $?: $(grep -E 'ERROR SUMMARY|^not ok' "$OUT/attention_memcheck.txt" | head -5)"
fi
echo "=== summary"
grep -c '^ok' "$OUT/attention_correctness.txt" | sed 's/^/passed: /'
grep '^not ok' "$OUT/attention_correctness.txt" || echo "no failures"
# shared-memory races (the pipelined versions refill buffers other warps may still read)
if command -v compute-sanitizer >/dev/null 2>&1; then
    GPU_TEST_SEED=1 timeout 150 compute-sanitizer --tool racecheck --print-limit 20 "$B" >"$OUT/attention_racecheck.txt" 2>&1
    echo "racecheck exit $?: $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY|^not ok' "$OUT/attention_racecheck.txt" | head -5)"
fi
