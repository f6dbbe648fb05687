#!/bin/sh
# The GPU generation engine (kernels/gen_cuda.cu) against the CPU Generator (lib/generate.c):
# tests/gpu/gen_test.cu, built by make into $GPU_TESTS. Skips on a machine without an NVIDIA GPU.
# stories260K's greedy decoding is compared when $TESTDATA holds it. Timings: gen_test --bench.
cd "$(dirname "$0")/../.." || exit 1
GPU_TESTS=${GPU_TESTS:-$(pwd)/build/obj/test-gpu}
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "1..0 # SKIP no NVIDIA GPU (nvidia-smi -L failed)"
    exit 0
fi
if [ ! -x "$GPU_TESTS/gen_test" ]; then
    echo "1..1"
    echo "not ok 1 - $GPU_TESTS/gen_test not built (run make test-gpu)"
    exit 1
fi
exec "$GPU_TESTS/gen_test"
