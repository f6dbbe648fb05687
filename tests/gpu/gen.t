#!/bin/sh
# lora-gen --device cuda, the tool end to end on stories260K (issue 7's correctness list): the
# known greedy text from BOS, transformers' greedy text for several prompts with and without the
# adapter (merged and unmerged), the same text whatever the batch, graphs or no graphs, sampled
# text that does not depend on the batch, JSON lines in input order, and the context limit.
# The GPU runs bf16 (as transformers runs a bf16 model): where two candidate tokens are within
# bf16 rounding of each other it may take the other one, and the text parts from the float32
# reference from there on (tests/gpu/gen_test.cu checks at the engine level that such a first
# divergence is a near-tie). So a comparison with a float32 text passes when most outputs are
# identical (agree) or a single text agrees for a good stretch first (agree_text); how much
# agreed is printed either way.
# Skips on a machine without an NVIDIA GPU or without $TESTDATA.
cd "$(dirname "$0")/../.." || exit 1
. tests/gpu/tap_gpu.sh   # ROOT, BIN, TESTDATA, the TAP helpers; skips without a GPU
M=$TESTDATA/stories260K/hf
[ -f "$M/config.json" ] || skip_all "TESTDATA does not hold stories260K/hf"
[ -x "$BIN/lora-gen" ] || skip_all "$BIN/lora-gen not built"
FIX=$ROOT/tests/golden/gen
gpu() { "$BIN/lora-gen" --device cuda -m "$M" "$@"; }
cpu() { "$BIN/lora-gen" --device cpu -m "$M" "$@"; }
# same NAME A B: equal files, or a failure showing the first difference.
same() {
    if cmp -s "$2" "$3"; then pass "$1"; else
        fail "$1"; diag "$(diff "$2" "$3" | head -6)"; fi
}
# agree NAME REF GOT: as many lines, and at least two thirds of them identical (a bug in
# positions, the cache, slots or the adapter changes nearly every line from its first tokens; a
# near-tie flips one output here and there, even at its first token when sampling); prints how
# many lines are identical and the earliest point where one parts.
agree() {
    _r=$(awk 'NR == FNR { ref[FNR] = $0; n = FNR; next }
        { got[FNR] = $0; m = FNR }
        END {
            same = 0; worst = -1
            for (i = 1; i <= (n > m ? n : m); i++) {
                a = ref[i]; b = got[i]
                if (a == b) { same++; continue }
                k = 0
                while (k < length(a) && k < length(b) && substr(a, k + 1, 1) == substr(b, k + 1, 1)) k++
                if (worst < 0 || k < worst) worst = k
            }
            printf "%d of %d lines identical", same, n
            if (worst >= 0) printf "; the others part after %d bytes at the earliest", worst
            exit !(n == m && 3 * same >= 2 * n)
        }' "$2" "$3")
    _st=$?
    ok "$1 ($_r)" test $_st -eq 0
}
# agree_text NAME REF GOT MIN: one text (of many lines): identical, or identical for its first MIN
# bytes at least.
agree_text() {
    if cmp -s "$2" "$3"; then pass "$1 (identical)"; return; fi
    _at=$(cmp "$2" "$3" 2>/dev/null | sed -n 's/.* byte \([0-9]*\).*/\1/p')
    _at=${_at:-0}
    ok "$1 (identical for the first $((_at - 1)) of $(wc -c <"$2") bytes)" test "$_at" -gt "$4"
}

gpu -v -p '' -n 200 >"$T/g200" 2>"$T/err"
ok "runs on the GPU" grep -q "cuda:" "$T/err"
diag "$(cat "$T/err")"
agree_text "greedy from BOS: the known text of greedy-200.txt" "$TESTDATA/stories260K/greedy-200.txt" "$T/g200" 100
gpu -l -n 48 "$FIX/prompts.txt" >"$T/base" 2>"$T/err"
agree "base model: transformers' greedy text (float32)" "$FIX/base.txt" "$T/base"
gpu -a "$FIX/adapter" -l -n 48 "$FIX/prompts.txt" >"$T/ad" 2>"$T/err"
agree "adapter merged into the bf16 weights: transformers + peft's text" "$FIX/adapter.txt" "$T/ad"
gpu -a "$FIX/adapter" --unmerged -l -n 48 "$FIX/prompts.txt" >"$T/adu" 2>"$T/err"
agree "adapter unmerged: transformers + peft's text" "$FIX/adapter.txt" "$T/adu"

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
agree "greedy: the CPU's text" "$T/c1" "$T/b5"
S="-t 0.9 --top-p 0.95 --repetition-penalty 1.1 -s 9 -n 40 --stop the --separator --"
gpu -l $S -b 1 "$T/many" >"$T/s1" 2>"$T/err"
gpu -l $S -b 6 "$T/many" >"$T/s6" 2>"$T/err"
# cuBLAS picks its kernels by the number of rows, so logits (and near-boundary draws) may differ
# in the last bf16 bit with the batch around a prompt.
agree "sampled: --batch 6 against --batch 1" "$T/s1" "$T/s6"
cpu -l $S "$T/many" >"$T/sc" 2>"$T/err"
agree "sampled: the CPU's text for the same seed" "$T/sc" "$T/s6"
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
