#!/bin/sh
# The GPU sampler (kernels/sample_cuda.cu) against the CPU sampler (lib/sample.c):
# tests/gpu/sample_test.cu, built by make into $GPU_TESTS. Skips on a machine without an NVIDIA
# GPU.
exec sh "$(dirname "$0")/run_test.sh" sample_test
