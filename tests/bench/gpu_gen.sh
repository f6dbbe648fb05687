#!/bin/sh
# Issue 7's benchmark, one command on a machine with an NVIDIA GPU (an H200):
#   tests/bench/gpu_gen.sh
# 1. tests/bench/gpu_gen_peer.py: a Llama-3-8B-shaped model with random bf16 weights and the
#    Llama 3 tokenizer ($TESTDATA/llama3), a random PEFT adapter (r 16, the seven projections),
#    and prompts of exactly 128 and 2048 tokens;
# 2. transformers' generate on them (greedy, bf16, SDPA, KV cache): batch 1 with the adapter
#    unmerged and merged, time to first token at 2048, batch 64;
# 3. lora-gen --device cuda -v on the same model, adapter and prompts (merged, unmerged, without
#    CUDA graphs; 2048-token prompt with -n 1; 64 prompts with -b 64);
# 4. one table: each measure for both, the ratio, and lora-gen's achieved bandwidth at batch 1
#    against the device copy rate measured in the same run.
# Every stage runs under a time limit; a failed stage is a row of the table. Skips (exit 0)
# without a GPU. Environment: GPU_GEN_DIR (/tmp/gpu_gen), PEER_LIMIT (300 s), OURS_LIMIT (120 s a
# run), PYTHON (python3), TOOL_LIBS (folders of shared libraries for our tools only, as in
# tests/bench/gpu_train.sh), TESTDATA (../shared/data), GPU_GEN_TINY=1 (a 2-layer model: smoke test).
cd "$(dirname "$0")/../.." || exit 1
ROOT=$(pwd)
BIN=${BIN:-$ROOT/bin}
TESTDATA=${TESTDATA:-$ROOT/../shared/data}
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_gen.sh: skipped: no NVIDIA GPU (nvidia-smi -L failed)"
    exit 0
fi
[ -x "$BIN/lora-gen" ] || { echo "gpu_gen.sh: $BIN/lora-gen not built (make)" >&2; exit 1; }
[ -f "$TESTDATA/llama3/tokenizer.json" ] || { echo "gpu_gen.sh: no $TESTDATA/llama3/tokenizer.json" >&2; exit 1; }
PY=${PYTHON:-python3}
TOOL_LD_PATH=${TOOL_LIBS:+$TOOL_LIBS:}${LD_LIBRARY_PATH:-}
HELPER=$ROOT/tests/bench/gpu_gen_peer.py
PEER_LIMIT=${PEER_LIMIT:-300}
OURS_LIMIT=${OURS_LIMIT:-120}
W=${GPU_GEN_DIR:-/tmp/gpu_gen}
TINY=
[ -n "$GPU_GEN_TINY" ] && TINY=--tiny
RES=$W/results.jsonl
say() { echo "gpu_gen.sh: $(date -u +%H:%M:%S) $*" >&2; }
rm -rf "$W" && mkdir -p "$W" || exit 1

say "model, adapter and prompts in $W"
PYTHONUNBUFFERED=1 timeout 300 "$PY" "$HELPER" model "$W/model" "$W/adapter" "$TESTDATA/llama3" $TINY >"$W/model.log" 2>&1 ||
    { say "model stage failed:"; tail -n 5 "$W/model.log" >&2; exit 1; }
"$PY" "$HELPER" prompts "$W/model" 128 64 >"$W/p128" && "$PY" "$HELPER" prompts "$W/model" 2048 4 >"$W/p2048" ||
    { say "prompts failed"; exit 1; }
head -n 1 "$W/p128" >"$W/p128x1"

say "peer: transformers' generate (limit ${PEER_LIMIT}s)"
PYTHONUNBUFFERED=1 timeout "$PEER_LIMIT" "$PY" "$HELPER" peer "$W/model" "$W/adapter" "$RES" "$W/p128" "$W/p2048" $TINY \
    >"$W/peer.log" 2>&1 || { say "peer stage ended with status $?; its log:"; tail -n 5 "$W/peer.log" >&2; }

# ours MEASURE ARGS...: one lora-gen run; its -v summary becomes a result.
ours() {
    _m=$1; shift
    say "lora-gen $_m: $*"
    timeout "$OURS_LIMIT" env "LD_LIBRARY_PATH=$TOOL_LD_PATH" "$BIN/lora-gen" --device cuda -v -m "$W/model" -l "$@" \
        >"$W/$_m.out" 2>"$W/$_m.err"
    _rc=$?
    [ $_rc -eq 0 ] || echo "lora-gen: exit status $_rc$([ $_rc -eq 124 ] && echo " (time limit ${OURS_LIMIT}s)")" >>"$W/$_m.err"
    "$PY" "$HELPER" ours "$_m" "$W/$_m.err" "$RES" >/dev/null
}
ours decode_b1 -a "$W/adapter" -b 1 -c 512 -n 256 "$W/p128x1"
ours decode_b1_unmerged -a "$W/adapter" --unmerged -b 1 -c 512 -n 256 "$W/p128x1"
ours decode_b1_nographs -a "$W/adapter" --no-graphs -b 1 -c 512 -n 256 "$W/p128x1"
ours ttft_2048 -a "$W/adapter" -b 1 -c 2100 -n 1 "$W/p2048"
ours decode_b64 -a "$W/adapter" -b 64 -c 512 -n 256 "$W/p128"

echo
"$PY" "$HELPER" table "$RES" "$W/model"
