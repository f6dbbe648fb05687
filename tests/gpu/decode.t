#!/bin/sh
# The decode kernels (kernels/gemv.cu, kernels/decode_attention.cu) against their CPU twins
# (lib/cpu_ops.c): tests/gpu/decode_test.cu, built by make into $GPU_TESTS. Skips on a machine
# without an NVIDIA GPU.
exec sh "$(dirname "$0")/run_test.sh" decode_test
