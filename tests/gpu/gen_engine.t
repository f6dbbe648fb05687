#!/bin/sh
# The GPU generation engine (kernels/gen_cuda.cu) against the CPU Generator (lib/generate.c):
# tests/gpu/gen_test.cu, built by make into $GPU_TESTS. Skips on a machine without an NVIDIA GPU.
# stories260K's greedy decoding is compared when $TESTDATA holds it. Timings: gen_test --bench.
exec sh "$(dirname "$0")/run_test.sh" gen_test
