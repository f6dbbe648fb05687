#!/bin/sh
# run_test.sh PROGRAM: what each tests/gpu/NAME.t that runs a test program does: skip (TAP, exit 0)
# on a machine without an NVIDIA GPU, fail when $GPU_TESTS/PROGRAM is not built (make test-gpu),
# else run it from the repository root (its TAP is the test's).
cd "$(dirname "$0")/../.." || exit 1
GPU_TESTS=${GPU_TESTS:-$(pwd)/build/obj/test-gpu}
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "1..0 # SKIP no NVIDIA GPU (nvidia-smi -L failed)"
    exit 0
fi
if [ ! -x "$GPU_TESTS/$1" ]; then
    echo "1..1"
    echo "not ok 1 - $GPU_TESTS/$1 not built (run make test-gpu)"
    exit 1
fi
exec "$GPU_TESTS/$1"
