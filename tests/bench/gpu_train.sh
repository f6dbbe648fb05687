#!/bin/sh
# Issue 6's benchmark, one command on a machine with an NVIDIA GPU (an H200):
#   tests/bench/gpu_train.sh
# 1. random token shards (recs load | pack -V 128256) for each sequence length;
# 2. tests/bench/gpu_train_peer.py: a bf16 matmul rate, a Llama-3-8B-shaped model with random bf16
#    weights written to $W/model (HF directory), then HF transformers + PEFT (LoRA r 16, alpha 16,
#    all seven projections, SDPA, gradient checkpointing, fused AdamW) on each shape;
# 3. lora-train --device cuda on the same model and shapes (-a 1, $STEPS steps; the first 2 are
#    warm-up and not timed), once per recompute mode: --recompute layer and mlp (memory at or
#    below the peer's), peer (--recompute auto --memory-limit the peer's peak bytes on that
#    shape: the fastest plan within the peer's memory) and --recompute none (faster, more
#    memory), a row each;
# 4. one table: tokens/s, ratio to the peer, peak GPU memory, achieved TFLOP/s of the FLOP model
#    against the measured matmul rate.
# Every stage runs under a time limit; a stage that fails or runs out of time is a row of the
# table ("out of memory", "time limit"), and the others still run. Skips (exit 0) without a GPU.
# Environment: GPU_TRAIN_SHAPES (2x2048,8x512,1x8192), GPU_TRAIN_RECOMPUTE (layer,mlp,peer,none),
# GPU_TRAIN_STEPS (6), GPU_TRAIN_DIR
# (/tmp/gpu_train), PEER_LIMIT (300 s), OURS_LIMIT (150 s a shape), PYTHON (python3), TOOL_LIBS
# (folders of shared libraries put on LD_LIBRARY_PATH for our tools only, not for Python: the
# device machine lacks libarchive and friends, see kernels/NOTES.md);
# GPU_TRAIN_TINY=1 GPU_TRAIN_DEVICE=cpu: a 2-layer 64-wide model on the CPU (smoke test).
cd "$(dirname "$0")/../.." || exit 1
ROOT=$(pwd)
BIN=${BIN:-$ROOT/bin}
DEVICE=${GPU_TRAIN_DEVICE:-cuda}
if [ "$DEVICE" = cuda ] && ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_train.sh: skipped: no NVIDIA GPU (nvidia-smi -L failed)"
    exit 0
fi
for t in recs pack lora-train; do
    [ -x "$BIN/$t" ] || { echo "gpu_train.sh: $BIN/$t not built (make)" >&2; exit 1; }
done
PY=${PYTHON:-python3}
TOOL_LD_PATH=${TOOL_LIBS:+$TOOL_LIBS:}${LD_LIBRARY_PATH:-}
HELPER=$ROOT/tests/bench/gpu_train_peer.py
SHAPES=${GPU_TRAIN_SHAPES:-2x2048,8x512,1x8192}
MODES=$(echo "${GPU_TRAIN_RECOMPUTE:-layer,mlp,peer,none}" | tr ',' ' ')
STEPS=${GPU_TRAIN_STEPS:-6}
PEER_LIMIT=${PEER_LIMIT:-300}
OURS_LIMIT=${OURS_LIMIT:-150}
W=${GPU_TRAIN_DIR:-/tmp/gpu_train}
VOCAB=128256
TINY=
if [ -n "$GPU_TRAIN_TINY" ]; then TINY=--tiny; VOCAB=512; fi
RES=$W/results.jsonl
rm -rf "$W" && mkdir -p "$W" || exit 1
shapes=$(echo "$SHAPES" | tr ',' ' ')
say() { echo "gpu_train.sh: $(date -u +%H:%M:%S) $*" >&2; }

# 1. Shards: per sequence length, enough rows for STEPS steps of the largest batch at that length.
for seq in $(for s in $shapes; do echo "${s#*x}"; done | sort -un); do
    rows=0
    for s in $shapes; do [ "${s#*x}" = "$seq" ] && [ "${s%x*}" -gt "$rows" ] && rows=${s%x*}; done
    rows=$((rows * STEPS))
    say "shards: $rows rows of $seq random ids"
    timeout 120 "$PY" "$HELPER" tokens "$seq" "$rows" "$VOCAB" "$seq" | timeout 120 env "LD_LIBRARY_PATH=$TOOL_LD_PATH" "$BIN/recs" load |
        timeout 120 env "LD_LIBRARY_PATH=$TOOL_LD_PATH" "$BIN/pack" -q -s "$seq" -V "$VOCAB" -a -o "$W/shards-$seq" ||
        say "shards for $seq failed"
done

# 2. Matmul rate, the model, the peer.
say "peer: matmul, model to $W/model, HF + PEFT on $SHAPES (limit ${PEER_LIMIT}s)"
PYTHONUNBUFFERED=1 timeout "$PEER_LIMIT" "$PY" "$HELPER" peer "$W/model" "$RES" "$SHAPES" $TINY --device "$DEVICE" \
    >"$W/peer.log" 2>&1
rc=$?
[ $rc -eq 0 ] || { say "peer stage ended with status $rc (124: time limit); its log:"; tail -n 5 "$W/peer.log" >&2; }
for s in $shapes; do
    grep -q "\"peer\", \"shape\": \"$s\"" "$RES" 2>/dev/null ||
        echo "{\"stage\": \"peer\", \"shape\": \"$s\", \"error\": \"$([ $rc -eq 124 ] && echo "time limit (${PEER_LIMIT}s)" || echo "stage failed, status $rc")\"}" >>"$RES"
done

# 3. lora-train on each shape and recompute mode, with nvidia-smi sampling the device's memory in
#    use meanwhile.
for s in $shapes; do
    for mode in $MODES; do
        b=${s%x*} seq=${s#*x} tag=$s-$mode
        if [ ! -f "$W/model/config.json" ]; then
            echo "no model: the model stage failed" >"$W/nomodel"
            echo "{\"stage\": \"ours\", \"shape\": \"$s\", \"recompute\": \"$mode\", \"rc\": 1, \"metrics\": \"\", \"err\": \"$W/nomodel\"}" >>"$RES"
            continue
        fi
        args="--recompute $mode"
        if [ "$mode" = peer ]; then   # within the peer's peak memory on this shape
            limit=$(grep "\"peer\", \"shape\": \"$s\"" "$RES" | sed -n 's/.*"peak_bytes": \([0-9]*\).*/\1/p')
            [ -n "$limit" ] || { say "no peer memory for $s: $mode skipped"; continue; }
            args="--recompute auto --memory-limit $limit"
        fi
        say "lora-train --device $DEVICE $args $s, $STEPS steps (limit ${OURS_LIMIT}s)"
        smi_pid=
        if [ "$DEVICE" = cuda ]; then
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$W/smi-$tag" 2>/dev/null &
            smi_pid=$!
        fi
        timeout "$OURS_LIMIT" env "LD_LIBRARY_PATH=$TOOL_LD_PATH" "$BIN/lora-train" -m "$W/model" -i "$W/shards-$seq" \
            -o "$W/adapter-$tag" -r 16 --alpha 16 -b "$b" -a 1 -n "$STEPS" --warmup-steps 1 --device "$DEVICE" \
            $args --metrics "$W/metrics-$tag.jsonl" 2>"$W/ours-$tag.err"
        rc=$?
        [ -n "$smi_pid" ] && kill "$smi_pid" 2>/dev/null && wait "$smi_pid" 2>/dev/null
        smi=$(sort -n "$W/smi-$tag" 2>/dev/null | tail -n 1 | tr -dc 0-9)
        grep "; on " "$W/ours-$tag.err" | head -n 1 >&2
        tail -n 2 "$W/ours-$tag.err" >&2
        echo "{\"stage\": \"ours\", \"shape\": \"$s\", \"recompute\": \"$mode\", \"rc\": $rc, \"limit\": $OURS_LIMIT, \"smi_mib\": ${smi:-0}, \"metrics\": \"$W/metrics-$tag.jsonl\", \"err\": \"$W/ours-$tag.err\"}" >>"$RES"
    done
done

# 4. The table.
"$PY" "$HELPER" table "$RES" "$W/model"
