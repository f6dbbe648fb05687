#!/bin/sh
# lora-gen --device cuda, the tool end to end on stories260K (issue 7's correctness list): the
# known greedy text from BOS, transformers' greedy text for several prompts with and without the
# adapter (merged and unmerged), the same text whatever the batch, graphs or no graphs, sampled
# text that does not depend on the batch, JSON lines in input order, and the context limit.
# The GPU runs bf16: a difference from the float32 fixtures is a failure here, with the first
# differing line shown, so that a near-tie flipped by rounding is seen, not hidden.
# Skips on a machine without an NVIDIA GPU or without $TESTDATA.
cd "$(dirname "$0")/../.." || exit 1
ROOT=$(pwd)
BIN=${BIN:-$ROOT/bin}
TESTDATA=${TESTDATA:-$ROOT/../shared/data}
. "$ROOT/tests/tap.sh"   # sets TOP, BIN and TESTDATA for tests/*.t: keep ours
nvidia-smi -L >/dev/null 2>&1 || skip_all "no NVIDIA GPU (nvidia-smi -L failed)"
M=$TESTDATA/stories260K/hf
[ -f "$M/config.json" ] || skip_all "TESTDATA does not hold stories260K/hf"
[ -x "$BIN/lora-gen" ] || skip_all "$BIN/lora-gen not built"
FIX=$ROOT/tests/golden/gen
gpu() { "$BIN/lora-gen" --device cuda "$@"; }
cpu() { "$BIN/lora-gen" --device cpu "$@"; }
# same NAME A B: equal files, or a failure showing the first difference.
same() {
    if cmp -s "$2" "$3"; then pass "$1"; else
        fail "$1"; diag "$(diff "$2" "$3" | head -6)"; fi
}

gpu -v -p '' -n 200 >"$T/g200" 2>"$T/err"
ok "runs on the GPU" grep -q "cuda:" "$T/err"
diag "$(cat "$T/err")"
same "greedy from BOS reproduces greedy-200.txt" "$T/g200" "$TESTDATA/stories260K/greedy-200.txt"
gpu -l -n 48 "$FIX/prompts.txt" >"$T/base" 2>"$T/err"
same "base model: greedy text equals transformers' generate" "$T/base" "$FIX/base.txt"
gpu -a "$FIX/adapter" -l -n 48 "$FIX/prompts.txt" >"$T/ad" 2>"$T/err"
same "adapter merged into the bf16 weights: equals transformers + peft" "$T/ad" "$FIX/adapter.txt"
gpu -a "$FIX/adapter" --unmerged -l -n 48 "$FIX/prompts.txt" >"$T/adu" 2>"$T/err"
same "adapter unmerged: equals transformers + peft" "$T/adu" "$FIX/adapter.txt"

# Batches: prompts of different lengths in one batch, rows joining and leaving.
for i in 1 2 3 4 5 6 7; do printf 'Once upon a time\nThe dog\n\nA\n'; done >"$T/many"
gpu -l -n 40 -b 1 "$T/many" >"$T/b1" 2>"$T/err"
gpu -l -n 40 -b 5 "$T/many" >"$T/b5" 2>"$T/err"
same "greedy: --batch 5 equals --batch 1" "$T/b1" "$T/b5"
gpu -l -n 40 -b 28 "$T/many" >"$T/b28" 2>"$T/err"
same "greedy: --batch 28 (cuBLAS products) equals --batch 1" "$T/b1" "$T/b28"
gpu -l -n 40 -b 5 --no-graphs "$T/many" >"$T/ng" 2>"$T/err"
same "--no-graphs gives the same text" "$T/b5" "$T/ng"
cpu -l -n 40 "$T/many" >"$T/c1" 2>"$T/err"
same "greedy: the GPU's text equals the CPU's" "$T/c1" "$T/b5"
S="-t 0.9 --top-p 0.95 --repetition-penalty 1.1 -s 9 -n 40 --stop the --separator --"
gpu -l $S -b 1 "$T/many" >"$T/s1" 2>"$T/err"
gpu -l $S -b 6 "$T/many" >"$T/s6" 2>"$T/err"
same "sampled: --batch 6 equals --batch 1" "$T/s1" "$T/s6"
cpu -l $S "$T/many" >"$T/sc" 2>"$T/err"
same "sampled: the GPU's text equals the CPU's (same seed)" "$T/sc" "$T/s6"
if command -v jq >/dev/null; then
    gpu -l -j -n 30 -b 9 "$T/many" >"$T/j" 2>"$T/err"
    is "$(jq -r .index "$T/j" | tr '\n' ' ')" "$(seq 1 28 | tr '\n' ' ')" "--jsonl lines in input order"
    printf 'Once upon a time there was a little dog named Max\nThe\n' >"$T/ctx"
    gpu -l -j -c 6 -n 50 "$T/ctx" >"$T/c6" 2>"$T/err"
    is "$(jq -c '[.tokens, .stop]' "$T/c6")" '[4,"length"]' "--context 6: 4 tokens after a 2-token prompt"
    ok "... and the prompt that does not fit is an error" grep -q "ctx:1: prompt of [0-9]* tokens is longer than the context of 6" "$T/err"
else
    for i in 1 2 3; do skip "jq not installed"; done
fi
done_testing
