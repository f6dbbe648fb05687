#!/bin/sh
# The CUDA kernels (kernels/) against their CPU twins (lib/cpu_ops.c): tests/gpu/kernels_test.cu,
# built by make into $GPU_TESTS. Skips on a machine without an NVIDIA GPU.
exec sh "$(dirname "$0")/run_test.sh" kernels_test
