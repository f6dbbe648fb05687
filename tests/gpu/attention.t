#!/bin/sh
# The flash attention kernels (kernels/attention.cu) against their CPU twin (lib/cpu_ops.c):
# tests/gpu/attention_test.cu, built by make into $GPU_TESTS. Skips on a machine without an
# NVIDIA GPU.
exec sh "$(dirname "$0")/run_test.sh" attention_test
