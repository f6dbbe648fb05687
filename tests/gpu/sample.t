#!/bin/sh
# The GPU sampler (kernels/sample_cuda.cu) against the CPU sampler (lib/sample.c):
# tests/gpu/sample_test.cu, built by make into $GPU_TESTS. Skips on a machine without an NVIDIA
# GPU.
GPU_TESTS=${GPU_TESTS:-$(cd "$(dirname "$0")/../.." && pwd)/build/obj/test-gpu}
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "1..0 # SKIP no NVIDIA GPU (nvidia-smi -L failed)"
    exit 0
fi
if [ ! -x "$GPU_TESTS/sample_test" ]; then
    echo "1..1"
    echo "not ok 1 - $GPU_TESTS/sample_test not built (run make test-gpu)"
    exit 1
fi
exec "$GPU_TESTS/sample_test"
