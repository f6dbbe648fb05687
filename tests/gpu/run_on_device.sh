#!/bin/sh
# One call on a GPU machine for the GPU test programs: kernels_test (training kernels),
# attention_test (flash attention), decode_test (GEMV, decode attention).
#   sh tests/gpu/run_on_device.sh [kernels] [attention] [decode]     (default: all three)
# Builds them with nvcc from kernels/*.cu and lib/cpu_ops.c only (the GPU machine may lack the
# jansson/libarchive/xxhash headers that `make` needs for the rest of lib/), then for each: its TAP
# tests (tests/gpu/NAME.t), its --bench table, PyTorch's table on the same shapes
# (tests/gpu/bench*_torch.py, when torch imports), compute-sanitizer memcheck (and racecheck on
# attention_test: its pipelined versions refill shared buffers other warps may still read) when
# compute-sanitizer is installed. Sanitizers go last. Logs: ${OUT:-/tmp/gpu-out}/NAME_*.txt; stdout
# gets one line a step and a summary. Every step is cut to what is left of GPU_RUN_BUDGET_S
# seconds (default 560, under a 600 s device call), a step with under 15 s left is skipped, so
# the summary always comes. Exit 1 on a build failure, a failed test, or a sanitizer error.
set -u
cd "$(dirname "$0")/../.." || exit 1
START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET_S:-560}
OUT=${OUT:-/tmp/gpu-out}
BUILD=${GPU_BUILD:-/tmp/gpu-build}
NAMES=${*:-kernels attention decode}
NVFLAGS="-O3 -arch=sm_90 -std=c++17 -Ilib -Ikernels"  # the Makefile's, less the warnings
# attention.cu as the Makefile builds it: for sm_90a (its wgmma kernels), and compute_90 PTX
NVFLAGS_ATTENTION="-O3 -std=c++17 -Ilib -Ikernels -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_90,code=compute_90"
for name in $NAMES; do
    case $name in
    kernels | attention | decode) ;;
    *) echo "usage: sh tests/gpu/run_on_device.sh [kernels] [attention] [decode]" >&2 && exit 2 ;;
    esac
done
mkdir -p "$OUT" "$BUILD/kernels" || exit 1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH="$PATH:/usr/local/cuda/bin"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"

# step LIMIT LOG CMD...: CMD's stdout and stderr into LOG, for at most LIMIT seconds and at most
# what is left of the budget; prints one line and returns CMD's exit status (124: timed out).
step() {
    limit=$1 log=$2
    shift 2
    left=$((START + BUDGET - $(date +%s)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        echo "# skipped, out of time budget: $*" | tee "$log"
        return 124
    fi
    t0=$(date +%s)
    timeout "$limit" "$@" >"$log" 2>&1
    rc=$?
    echo "$(basename "$log"): exit $rc after $(($(date +%s) - t0)) s (limit $limit s)"
    return $rc
}

# ---- build: the kernels in parallel into one archive; each test takes the objects it calls
t0=$(date +%s)
rm -f "$BUILD"/kernels/*.o "$BUILD"/libkernels.a "$BUILD"/*_test "$BUILD"/failed
cc -O2 -std=gnu11 -Ilib -c -o "$BUILD/cpu_ops.o" lib/cpu_ops.c || exit 1
for cu in kernels/*.cu; do
    obj=$BUILD/kernels/$(basename "$cu" .cu).o
    flags=$NVFLAGS
    [ "$cu" = kernels/attention.cu ] && flags=$NVFLAGS_ATTENTION
    # shellcheck disable=SC2086 # flags is a list of flags
    { nvcc $flags -c -o "$obj" "$cu" || echo "$cu" >>"$BUILD/failed"; } &
done
wait
[ -e "$BUILD/failed" ] && echo "build failed: $(cat "$BUILD/failed")" && exit 1
ar rcs "$BUILD/libkernels.a" "$BUILD"/kernels/*.o || exit 1
for name in $NAMES; do
    # shellcheck disable=SC2086
    { nvcc $NVFLAGS -Itests/unit -o "$BUILD/${name}_test" "tests/gpu/${name}_test.cu" "$BUILD/cpu_ops.o" \
        "$BUILD/libkernels.a" -lcublas || echo "${name}_test" >>"$BUILD/failed"; } &
done
wait
[ -e "$BUILD/failed" ] && echo "build failed: $(cat "$BUILD/failed")" && exit 1
echo "built $NAMES in $BUILD in $(($(date +%s) - t0)) s"
# tensor-core instructions in the attention kernels (HMMA: mma.sync; none would mean a scalar
# fallback)
case " $NAMES " in *" attention "*)
    command -v cuobjdump >/dev/null 2>&1 &&
        echo "HMMA instructions in attention_test: $(cuobjdump --dump-sass "$BUILD/attention_test" | grep -c HMMA)" ;;
esac

torch_script() {
    case $1 in
    kernels) echo tests/gpu/bench_torch.py ;;
    *) echo "tests/gpu/bench_$1_torch.py" ;;
    esac
}

# ---- tests, our tables, PyTorch's
status=0
for name in $NAMES; do
    step 300 "$OUT/${name}_correctness.txt" env GPU_TESTS="$BUILD" sh "tests/gpu/$name.t" || status=1
done
for name in $NAMES; do
    step 200 "$OUT/${name}_bench.txt" "$BUILD/${name}_test" --bench
done
if python3 -c 'import torch' >/dev/null 2>&1; then
    for name in $NAMES; do
        step 200 "$OUT/${name}_torch.txt" env PYTHONUNBUFFERED=1 python3 "$(torch_script "$name")"
    done
else
    echo "# no PyTorch: its tables skipped"
fi

# ---- sanitizers: bad memory accesses at the awkward sizes; shared-memory races in attention
if command -v compute-sanitizer >/dev/null 2>&1; then
    for name in $NAMES; do
        case $name in kernels) limit=300 ;; attention) limit=240 ;; *) limit=120 ;; esac
        step $limit "$OUT/${name}_memcheck.txt" \
            env GPU_TEST_SEED=1 compute-sanitizer --tool memcheck --print-limit 20 "$BUILD/${name}_test"
    done
    case " $NAMES " in *" attention "*)
        step 150 "$OUT/attention_racecheck.txt" \
            env GPU_TEST_SEED=1 compute-sanitizer --tool racecheck --print-limit 20 "$BUILD/attention_test" ;;
    esac
else
    echo "# no compute-sanitizer: memcheck skipped"
fi

# ---- summary
echo "=== summary ($(($(date +%s) - START)) s; logs in $OUT)"
for name in $NAMES; do
    log=$OUT/${name}_correctness.txt
    echo "$name: $(grep -c '^ok' "$log") passed, $(grep -c '^not ok' "$log") failed; plan $(grep -m1 '^1\.\.' "$log")"
    grep '^not ok' "$log"
    for tool in memcheck racecheck; do
        log=$OUT/${name}_$tool.txt
        [ -e "$log" ] || continue
        found=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|^not ok|skipped' "$log" | head -5 | tr '\n' ' ')
        echo "  $tool: ${found:-no summary line (cut short by its time limit?)}"
        grep -Eq 'ERROR SUMMARY: [1-9]|RACECHECK SUMMARY: [1-9]|^not ok' "$log" && status=1
    done
done
exit $status
