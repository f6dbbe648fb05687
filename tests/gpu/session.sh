#!/bin/sh
# One call on a GPU machine with binaries built elsewhere (`make` on a machine with nvcc and the
# -dev packages): the GPU tests and any of the benchmarks, each under a time limit cut to what is
# left of a budget, logs under $OUT, one summary line a step.
#   sh tests/gpu/session.sh STEP...
# Steps: tests (every tests/gpu/*.t: prove with GPU_TESTS=build/obj/test-gpu), NAME.t (one of
# them), bench-NAME (NAME_test --bench: gen, sample, decode, engine, ...), gen (tests/bench/gpu_gen.sh), train
# (tests/bench/gpu_train.sh), tok (tests/bench/tok.sh with the prebuilt driver), memcheck-NAME
# (NAME_test under compute-sanitizer: gen, sample, decode, kernels, engine), profile-engine (a training
# step's time by operation, and its products alone: ENGINE_TEST_PROFILE = the layers, default 2;
# ENGINE_TEST_WHOLE_ROWS=1, one document a row as in the benchmark; GPU clocks and power beside it;
# tests/bench/profile_ceiling.py reads its output), ncu-gen (kernel durations of
# a few decode steps, Nsight Compute), ncu-attention (one decode-attention launch in full).
# Environment: TOOL_LIBS (folders of shared libraries the tools need and the machine lacks, put on
# LD_LIBRARY_PATH for our binaries), TESTDATA, GPU_RUN_BUDGET_S (default 580), OUT.
set -u
cd "$(dirname "$0")/../.." || exit 1
START=$(date +%s)
BUDGET=${GPU_RUN_BUDGET_S:-580}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export GPU_TESTS=${GPU_TESTS:-$(pwd)/build/obj/test-gpu}
export BIN=${BIN:-$(pwd)/bin}
export TESTDATA=${TESTDATA:-$(pwd)/../shared/data}
export PATH="$PATH:/usr/local/cuda/bin"
LIBS=${TOOL_LIBS:+$TOOL_LIBS:}/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
status=0

# step LIMIT NAME CMD...: CMD into $OUT/NAME.txt for at most LIMIT seconds (and what is left).
step() {
    limit=$1 name=$2
    shift 2
    left=$((START + BUDGET - $(date +%s)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "$name: skipped, out of time"
        return 124
    fi
    t0=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    echo "$name: exit $rc after $(($(date +%s) - t0)) s (limit $limit s)"
    [ $rc -eq 0 ] || status=1
    return $rc
}

for s in "$@"; do
    case $s in
    tests) step 300 tests env LD_LIBRARY_PATH="$LIBS" prove -v tests/gpu/*.t ;;
    *.t) step 200 "$s" env LD_LIBRARY_PATH="$LIBS" prove -v "tests/gpu/$s" ;;
    bench-*) step 200 "$s" env LD_LIBRARY_PATH="$LIBS" "$GPU_TESTS/${s#bench-}_test" --bench ;;
    gen) step 420 gen env TOOL_LIBS="${TOOL_LIBS:-}" sh tests/bench/gpu_gen.sh ;;
    train) step 560 train env TOOL_LIBS="${TOOL_LIBS:-}" sh tests/bench/gpu_train.sh ;;
    tok)   # the libraries for the driver only: Python must keep the machine's own
        mkdir -p "$OUT/wrap"
        for t in "$(pwd)/build/obj/test/tokdrv" "$BIN/tok" "$BIN/alp-fmt"; do
            printf '#!/bin/sh\nLD_LIBRARY_PATH="%s" exec "%s" "$@"\n' "$LIBS" "$t" >"$OUT/wrap/$(basename "$t")"
            chmod +x "$OUT/wrap/$(basename "$t")"
        done
        step 200 tok env TOKDRV="$OUT/wrap/tokdrv" BIN="$OUT/wrap" sh tests/bench/tok.sh ;;
    profile-engine)   # where a training step's time goes (llama3-8b dims, 2 layers), the products alone;
        # clocks, power and throttle reasons sampled every 250 ms meanwhile (profile-engine-smi.csv)
        nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
            --format=csv -lms 250 >"$OUT/profile-engine-smi.csv" 2>&1 &
        smi=$!
        step 420 "$s" env LD_LIBRARY_PATH="$LIBS" ENGINE_TEST_PROFILE=${ENGINE_TEST_PROFILE:-2} "$GPU_TESTS/engine_test" --bench
        kill $smi ;;
    ncu-gen)   # every kernel's duration in 3 plain decode steps (cuBLAS, then GEMV products), as CSV
        step 300 ncu-gen env LD_LIBRARY_PATH="$LIBS" GEN_TEST_PROFILE=1 ncu --clock-control none --cache-control none \
            --metrics gpu__time_duration.sum --csv "$GPU_TESTS/gen_test" --bench ;;
    ncu-attention)   # Nsight Compute's full report of one decode-attention launch (stall reasons)
        step 200 ncu-attention env LD_LIBRARY_PATH="$LIBS" GEN_TEST_PROFILE=1 ncu --clock-control none --set full \
            -k regex:decode_attention_kernel --launch-skip 40 --launch-count 1 "$GPU_TESTS/gen_test" --bench ;;
    memcheck-*)   # memcheck-NAME: NAME_test under compute-sanitizer's memcheck
        t=${s#memcheck-}_test
        step 200 "$s" env LD_LIBRARY_PATH="$LIBS" compute-sanitizer --tool memcheck --error-exitcode 9 "$GPU_TESTS/$t" ;;
    *) echo "session.sh: unknown step $s" >&2; status=2 ;;
    esac
done
exit $status
