#!/bin/sh
# The CUDA training step (kernels/engine_cuda.cu) against the CPU reference engine
# (lib/engine_cpu.c): tests/gpu/engine_test.cu, built by make into $GPU_TESTS. Skips on a machine
# without an NVIDIA GPU. stories260K is compared when $TESTDATA holds it.
exec sh "$(dirname "$0")/run_test.sh" engine_test
