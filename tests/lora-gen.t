#!/bin/sh
# lora-gen: the known stories260K greedy text, transformers' greedy text with and without an
# adapter (fixtures from tests/golden/gen_reference.py), every kind of input, the stopping rules,
# sampling, the man page's examples, and each error.
. "$(dirname "$0")/tap.sh"
[ -x "$BIN/lora-gen" ] || skip_all "lora-gen not built"
# These are the CPU path's tests (exact, float32): pinned to the CPU, so that a machine with a
# GPU (where --device auto picks it) runs them too. tests/gpu/gen.t tests the GPU path.
G="$T/lora-gen-cpu"
printf '#!/bin/sh\nexec "%s" --device cpu "$@"\n' "$BIN/lora-gen" >"$G" && chmod +x "$G"
FIX="$TOP/tests/golden/gen"

# ---- usage errors (exit 2): need no model ------------------------------------------------
run_case "no model" 2 "model directory is required" -- "$G" -p x
run_case "bad --device" 2 "--device: expected cpu, cuda or auto" -- "$G" -m . --device tpu -p x
run_case "bad --temperature" 2 "--temperature: .* is not a number" -- "$G" -m . -t warm -p x
run_case "negative --temperature" 2 "--temperature: .-1. is not a number" -- "$G" -m . -t -1 -p x
run_case "bad --top-p" 2 "top-p must be in" -- "$G" -m . --top-p 1.5 -p x
run_case "bad --min-p" 2 "min-p must be in" -- "$G" -m . --min-p 2 -p x
run_case "bad --top-k" 2 "--top-k: .* is not a whole number" -- "$G" -m . -k -3 -p x
run_case "bad --repetition-penalty" 2 "repetition penalty must be" -- "$G" -m . --repetition-penalty 0 -p x
run_case "bad --max-new-tokens" 2 "--max-new-tokens: .* is not a whole number" -- "$G" -m . -n -1 -p x
run_case "bad --seed" 2 "--seed: expected a non-negative integer" -- "$G" -m . -s -5 -p x
run_case "bad --stop-id" 2 "--stop-id: .* is not a whole number" -- "$G" -m . --stop-id x -p x
run_case "empty --stop" 2 "--stop: the text must not be empty" -- "$G" -m . --stop '' -p x
run_case "--stop not UTF-8" 2 "--stop: the text is not valid UTF-8" -- "$G" -m . --stop "$(printf '\377')" -p x
run_case "-p with files" 2 "-p gives the prompts" -- "$G" -m . -p x somefile
run_case "--device cuda without CUDA or a GPU" 1 "not available in this build|no CUDA device found|config.json" \
    -- "$G" -m . --device cuda -p x
run_case "bad --batch" 2 "--batch: .* is not a whole number|--batch: .*out of range|--batch" -- "$G" -m . -b 0 -p x
run_case "bad --context" 2 "--context" -- "$G" -m . -c x -p x
run_case "missing model directory" 1 "no-such-model" -- "$G" -m "$T/no-such-model" -p x

have_testdata stories260K/hf/config.json || { diag "stories260K missing: the model tests are skipped"; done_testing; }
M="$TESTDATA/stories260K/hf"

# ---- the proofs --------------------------------------------------------------------------
"$G" -m "$M" -p '' -n 200 >"$T/g200" 2>"$T/err"
ok "greedy from BOS reproduces greedy-200.txt byte for byte" cmp -s "$T/g200" "$TESTDATA/stories260K/greedy-200.txt"
echo | "$G" -m "$M" -l -n 200 >"$T/g200l" 2>"$T/err"
ok "an empty line is the same BOS-only prompt" cmp -s "$T/g200l" "$TESTDATA/stories260K/greedy-200.txt"
"$G" -m "$M" -l -n 48 "$FIX/prompts.txt" >"$T/base" 2>"$T/err"
ok "base model: greedy text equals transformers' generate" cmp -s "$T/base" "$FIX/base.txt"
"$G" -m "$M" -a "$FIX/adapter" -l -n 48 "$FIX/prompts.txt" >"$T/ad" 2>"$T/err"
ok "with the adapter (merged): greedy text equals transformers + peft" cmp -s "$T/ad" "$FIX/adapter.txt"
"$G" -m "$M" -a "$FIX/adapter" --unmerged -l -n 48 "$FIX/prompts.txt" >"$T/adu" 2>"$T/err"
ok "with the adapter (unmerged): the same text" cmp -s "$T/adu" "$FIX/adapter.txt"
# Regenerating the fixtures with torch takes 10 to 80 seconds: only on request.
if [ "${GOLDEN_CHECK:-0}" != 1 ]; then
    skip "fixtures not regenerated with transformers (set GOLDEN_CHECK=1)"
elif python3 -c 'import torch, transformers, peft' 2>/dev/null; then
    python3 "$TOP/tests/golden/gen_reference.py" --model "$M" --out "$FIX" --check >"$T/py" 2>&1
    st=$?
    ok "the fixtures still agree with transformers (gen_reference.py --check)" test $st -eq 0
    [ $st -eq 0 ] || diag "$(tail -5 "$T/py")"
else
    skip "torch, transformers or peft not installed: fixtures not regenerated"
fi

# ---- inputs ------------------------------------------------------------------------------
if [ -x "$BIN/recs" ]; then
    "$BIN/recs" load "$FIX/records.jsonl" >"$T/recs" &&
        "$G" -m "$M" -a "$FIX/adapter" -n 48 "$T/recs" >"$T/out" 2>"$T/err"
    ok "text records of several lines: equal to transformers + peft" cmp -s "$T/out" "$FIX/records-adapter.txt"
    "$G" -m "$M" -a "$FIX/adapter" -n 48 <"$T/recs" >"$T/out2" 2>"$T/err"
    ok "records on standard input" cmp -s "$T/out2" "$FIX/records-adapter.txt"
    # A record of a finished conversation: only the trailing trained segment is dropped.
    printf '%s\n' '{"kind":"text","origin":"chat","index":1,"segments":[{"trained":false,"text":"Once upon"},{"trained":true,"text":" a time"}]}' |
        "$BIN/recs" load >"$T/chat"
    "$G" -m "$M" -n 20 "$T/chat" >"$T/out" 2>"$T/err"
    "$G" -m "$M" -n 20 -p "Once upon" >"$T/want" 2>"$T/err"
    ok "the trailing response of a record is not part of the prompt" cmp -s "$T/out" "$T/want"
    printf '%s\n' '{"kind":"text","origin":"s","index":1,"segments":[{"trained":false,"special":true,"text":"<s>Once upon"}]}' |
        "$BIN/recs" load >"$T/special"
    "$G" -m "$M" -n 20 "$T/special" >"$T/out" 2>"$T/err"
    ok "a BOS written in a special segment is not doubled" cmp -s "$T/out" "$T/want"
    printf '%s\n' '{"kind":"tokens","origin":"t","index":3,"fingerprint":"0000000000000000","segments":[{"trained":false,"ids":[1,2]}]}' |
        "$BIN/recs" load >"$T/tokrec"
    run_case "a tokens record is refused" 1 "t:3.*a tokens record" -- "$G" -m "$M" -n 5 "$T/tokrec"
    head -c 30 "$T/recs" >"$T/trunc"
    run_case "a truncated record stream is an error" 1 "lora-gen: .*trunc" -- "$G" -m "$M" -n 5 "$T/trunc"
else
    for i in 1 2 3 4 5 6; do skip "recs not built"; done
fi
printf 'Once upon a time\n' >"$T/plain"
run_case "plain text without --lines is refused with a hint" 1 "hint: .*--lines" -- "$G" -m "$M" -n 5 "$T/plain"
printf 'Once upon a time\n\377bad\nThe dog\n' >"$T/badline"
run_case "an invalid UTF-8 line names file and line" 1 "badline:2: " -- "$G" -m "$M" -l -n 5 "$T/badline"
lines=$(grep -c . "$T/out")
is "$lines" 2 "the other lines are still generated"
i=0; while [ $i -lt 100 ]; do printf 'Once upon a time there was a dog. '; i=$((i + 1)); done >"$T/long"
printf '\nThe dog\n' >>"$T/long"
run_case "a prompt longer than the context names file and line" 1 "long:1: prompt of [0-9]+ tokens is longer than the model's context of 512" \
    -- "$G" -m "$M" -l -n 5 --separator=SEP "$T/long"
"$G" -m "$M" -n 5 -p 'The dog' >"$T/want" 2>/dev/null
"$G" -m "$M" -l -n 5 "$T/long" >"$T/out" 2>/dev/null
ok "a bad prompt prints nothing, not even a separator" cmp -s "$T/out" "$T/want"
run_case "a missing input file" 1 "no-such-file" -- "$G" -m "$M" -l "$T/no-such-file"
run_case "--no-bos with an empty prompt" 1 "empty prompt" -- "$G" -m "$M" --no-bos -p ''
"$G" -m "$M" --bos -n 10 -p 'Once upon a time' >"$T/bos" 2>/dev/null
"$G" -m "$M" -n 10 -p 'Once upon a time' >"$T/dflt" 2>/dev/null
ok "--bos is the tokenizer's default here" cmp -s "$T/bos" "$T/dflt"
"$G" -m "$M" --no-bos -n 10 -p 'Once upon a time' >"$T/nobos" 2>/dev/null
ok "--no-bos generates from the text alone" test -s "$T/nobos"

run_case "--stop-id beyond the vocabulary" 2 "--stop-id 512: the vocabulary has 512 tokens" -- "$G" -m "$M" --stop-id 512 -p x
"$G" -m "$M" -p '' -n 200 2>"$T/err" | head -c 4 >"$T/out"
is "$(cat "$T/out")" "Once" "a reader that goes away early (| head)"
ok "... ends lora-gen quietly" test ! -s "$T/err"

# ---- output and stopping -----------------------------------------------------------------
"$G" -m "$M" -n 8 -p 'The dog' -p 'The cat' --separator '-----' >"$T/sep" 2>/dev/null
is "$(sed -n 2p "$T/sep")" "-----" "--separator sits between two outputs"
is "$(wc -l <"$T/sep" | tr -d ' ')" 3 "each output ends with a newline"
if command -v jq >/dev/null; then
    "$G" -m "$M" -a "$FIX/adapter" -l -j -n 48 "$FIX/prompts.txt" >"$T/j" 2>"$T/err"
    is "$(jq -r '[.tokens, .stop, .output] | @json' "$T/j")" \
       "$(jq -r '[.tokens, .stop, .output] | @json' "$FIX/adapter.jsonl")" "--jsonl: tokens, stop and output equal transformers'"
    is "$(jq -r '"\(.origin):\(.index)"' "$T/j" | tail -1)" "$FIX/prompts.txt:5" "--jsonl: origin and index name the line"
    is "$(jq -r .prompt "$T/j" | sed -n 2p)" "Once upon a time" "--jsonl: the prompt"
    "$G" -m "$M" -j -n 200 -p '' --stop ' little' >"$T/s" 2>/dev/null
    is "$(jq -r .output "$T/s")" "Once upon a time, there was a" "--stop ends the output before the text"
    is "$(jq -r .stop "$T/s")" "stop-string" "--stop: stop is stop-string"
    first=$(jq -r '.ids[1]' "$FIX/base.jsonl" | head -1)
    "$G" -m "$M" -j -n 20 -p '' --stop-id "$first" >"$T/s" 2>/dev/null
    is "$(jq -r '[.output, .tokens, .stop] | @json' "$T/s")" '["",1,"eos"]' "--stop-id stops at once on the first greedy token"
    i=0; while [ $i -lt 50 ]; do printf 'Once upon a time there was a dog. '; i=$((i + 1)); done >"$T/near"
    "$G" -m "$M" -j -l -n 100 "$T/near" >"$T/s" 2>/dev/null
    is "$(jq -c '[.stop, .tokens < 100]' "$T/s")" '["length",true]' "the context of max_position_embeddings ends the output"
    "$G" -m "$M" -j -n 0 -p 'Once' >"$T/s" 2>/dev/null
    is "$(jq -r '[.output, .tokens, .stop] | @json' "$T/s")" '["",0,"length"]' "--max-new-tokens 0"
    "$G" -m "$M" -j -n 500 -p '' >"$T/s" 2>/dev/null
    is "$(jq -c '[.stop, .tokens, .output]' "$T/s")" "$(jq -c '[.stop, .tokens, .output]' "$FIX/eos.jsonl")" \
        "an EOS id of generation_config.json ends the output where transformers' does"
else
    for i in 1 2 3 4 5 6 7 8 9; do skip "jq not installed"; done
fi

# ---- sampling ----------------------------------------------------------------------------
"$G" -m "$M" -t 0.9 -s 11 -n 60 -p 'Once upon a time' >"$T/a" 2>/dev/null
"$G" -m "$M" -t 0.9 -s 11 -n 60 -p 'Once upon a time' >"$T/b" 2>/dev/null
"$G" -m "$M" -t 0.9 -s 12 -n 60 -p 'Once upon a time' >"$T/c" 2>/dev/null
ok "the same seed gives the same text" cmp -s "$T/a" "$T/b"
ok "another seed gives another text" test "$(cat "$T/a")" != "$(cat "$T/c")"
"$G" -m "$M" -k 1 -s 3 -n 48 -l "$FIX/prompts.txt" >"$T/k1" 2>/dev/null
ok "top-k 1 is greedy" cmp -s "$T/k1" "$FIX/base.txt"
"$G" -m "$M" -t 0.5 -g -n 48 -l "$FIX/prompts.txt" >"$T/g" 2>/dev/null
ok "--greedy wins over a temperature" cmp -s "$T/g" "$FIX/base.txt"
"$G" -m "$M" -t 3 --top-p 0.95 --min-p 0.01 --repetition-penalty 1.3 -s 5 -n 200 -p '' >"$T/hot" 2>"$T/err"
ok "hot sampling with every filter runs" test -s "$T/hot"
ok "its output is valid UTF-8" iconv -f UTF-8 -t UTF-8 "$T/hot" -o /dev/null
"$G" -m "$M" --repetition-penalty 1.5 -n 48 -p 'Once upon a time' >"$T/rp" 2>/dev/null
ok "a repetition penalty changes the greedy text" test "$(cat "$T/rp")" != "$(sed -n 3p "$FIX/base.txt")"

# ---- many prompts at once (--batch): the same outputs, in input order ---------------------
"$G" -m "$M" -b 3 -n 48 -l "$FIX/prompts.txt" >"$T/b3" 2>"$T/err"
ok "--batch 3: greedy text still equals transformers'" cmp -s "$T/b3" "$FIX/base.txt"
"$G" -m "$M" -a "$FIX/adapter" -b 8 -n 48 -l "$FIX/prompts.txt" >"$T/b8" 2>"$T/err"
ok "--batch 8 with the adapter: equal to transformers + peft" cmp -s "$T/b8" "$FIX/adapter.txt"
# Sampled outputs depend only on the seed and the prompt's index, not on the batch around it;
# prompts of different lengths end at different steps, so later ones overtake earlier ones.
for i in 1 2 3 4 5 6 7; do printf 'Once upon a time\nThe dog\n\nA\n'; done >"$T/many"
"$G" -m "$M" -l -t 0.9 --top-p 0.95 --repetition-penalty 1.1 -s 9 -n 40 --stop ' the' --separator '--' "$T/many" >"$T/s1" 2>/dev/null
"$G" -m "$M" -l -t 0.9 --top-p 0.95 --repetition-penalty 1.1 -s 9 -n 40 --stop ' the' --separator '--' -b 5 "$T/many" >"$T/s5" 2>/dev/null
ok "sampled text with --batch 5 equals --batch 1, in the same order" cmp -s "$T/s1" "$T/s5"
is "$(grep -c -- '^--$' "$T/s5")" 27 "28 outputs, 27 separators"
if command -v jq >/dev/null; then
    "$G" -m "$M" -l -j -t 0.9 -s 9 -n 40 "$T/many" >"$T/j1" 2>/dev/null
    "$G" -m "$M" -l -j -t 0.9 -s 9 -n 40 -b 6 "$T/many" >"$T/j6" 2>/dev/null
    ok "--jsonl with --batch 6 equals --batch 1" cmp -s "$T/j1" "$T/j6"
    is "$(jq -r .index "$T/j6" | tr '\n' ' ')" "$(seq 1 28 | tr '\n' ' ')" "--jsonl lines in input order"
else
    for i in 1 2; do skip "jq not installed"; done
fi
printf 'Once upon a time there was a little dog named Max\nThe\n' >"$T/ctx"
run_case "--context: a prompt that does not fit names file and line" 1 "ctx:1: prompt of [0-9]+ tokens is longer than the context of 6" \
    -- "$G" -m "$M" -l -c 6 -n 5 "$T/ctx"
is "$(grep -c . "$T/out")" 1 "... and the other prompt is answered"
if command -v jq >/dev/null; then
    "$G" -m "$M" -l -j -c 6 -n 50 "$T/ctx" 2>/dev/null | jq -c '[.tokens, .stop]' >"$T/c6"
    is "$(cat "$T/c6")" '[4,"length"]' "--context 6: a 2-token prompt gets 4 tokens, then length"
else
    skip "jq not installed"
fi

# ---- the adapter's errors ----------------------------------------------------------------
# A PEFT adapter written by hand: q_proj only, rank R, A (R, IN), B (OUT, R), LAYERS layers.
le64() { n=$1; i=0; while [ $i -lt 8 ]; do printf "\\$(printf %03o $((n & 255)))"; n=$((n >> 8)); i=$((i + 1)); done; }
make_adapter() { # dir r config_r in out layers
    d=$1 r=$2 cr=$3 in=$4 out=$5 layers=$6
    mkdir -p "$d"
    printf '{"peft_type":"LORA","r":%s,"lora_alpha":4,"lora_dropout":0.0,"target_modules":["q_proj"],"bias":"none","task_type":"CAUSAL_LM"}\n' "$cr" >"$d/adapter_config.json"
    hdr="{" off=0 l=0
    while [ $l -lt "$layers" ]; do
        na=$((r * in * 4)) nb=$((out * r * 4))
        hdr="$hdr\"base_model.model.model.layers.$l.self_attn.q_proj.lora_A.weight\":{\"dtype\":\"F32\",\"shape\":[$r,$in],\"data_offsets\":[$off,$((off + na))]},"
        off=$((off + na))
        hdr="$hdr\"base_model.model.model.layers.$l.self_attn.q_proj.lora_B.weight\":{\"dtype\":\"F32\",\"shape\":[$out,$r],\"data_offsets\":[$off,$((off + nb))]},"
        off=$((off + nb)) l=$((l + 1))
    done
    hdr="${hdr%,}}"
    { le64 ${#hdr}; printf '%s' "$hdr"; head -c "$off" /dev/zero; } >"$d/adapter_model.safetensors"
}
make_adapter "$T/zero" 2 2 64 64 5
"$G" -m "$M" -a "$T/zero" -n 48 -l "$FIX/prompts.txt" >"$T/z" 2>"$T/err"
ok "a zero adapter (B = 0) leaves the base model's text" cmp -s "$T/z" "$FIX/base.txt"
run_case "a missing adapter directory" 1 "no-such-adapter" -- "$G" -m "$M" -a "$T/no-such-adapter" -p x
make_adapter "$T/other" 2 2 32 32 5
run_case "an adapter for another base names the tensor" 1 "q_proj.lora_A.*shape \[2, 32\]" -- "$G" -m "$M" -a "$T/other" -p x
make_adapter "$T/rank" 3 2 64 64 5
run_case "tensors of another rank than the config's" 1 "q_proj.lora_A.weight.*r = 2" -- "$G" -m "$M" -a "$T/rank" -p x
make_adapter "$T/layers" 2 2 64 64 7
run_case "an adapter with more layers than the model" 1 "layers" -- "$G" -m "$M" -a "$T/layers" -p x
mkdir -p "$T/ia3" && cp "$T/zero/adapter_model.safetensors" "$T/ia3/" &&
    printf '{"peft_type":"IA3","target_modules":["q_proj"]}\n' >"$T/ia3/adapter_config.json"
run_case "an adapter that is not LoRA" 1 "peft_type" -- "$G" -m "$M" -a "$T/ia3" -p x

# ---- the man page's examples -------------------------------------------------------------
mkdir -p "$T/ex" && ln -s "$TESTDATA/stories260K" "$T/ex/stories260K" 2>/dev/null; ln -s "$FIX/adapter" "$T/ex/adapter"
printf 'Once upon a time\nThe dog\n' >"$T/ex/starts.txt"
(cd "$T/ex" && "$G" -m stories260K/hf -p '' -n 200) >"$T/e1" 2>/dev/null
ok "EXAMPLES: the known greedy text" cmp -s "$T/e1" "$TESTDATA/stories260K/greedy-200.txt"
if [ -x "$BIN/alp-fmt" ]; then
    printf '[{"instruction":"Tell me about a dog.","input":"","output":""},{"instruction":"Name a color.","input":"red","output":""}]\n' >"$T/ex/questions.json"
    (cd "$T/ex" && PATH="$BIN:$PATH" && alp-fmt --prompt-only questions.json | lora-gen -m stories260K/hf -a adapter -n 64) >"$T/e2" 2>"$T/err"
    ok "EXAMPLES: alp-fmt --prompt-only | lora-gen" test $? -eq 0 -a "$(grep -c '^$' "$T/e2")" -ge 1
else
    skip "alp-fmt not built"
fi
(cd "$T/ex" && "$G" -m stories260K/hf -l -t 0.8 --top-p 0.9 -s 7 -n 50 starts.txt) >"$T/e3" 2>/dev/null
ok "EXAMPLES: sampling from lines" test $? -eq 0 -a -s "$T/e3"
if command -v jq >/dev/null; then
    (cd "$T/ex" && "$G" -m stories260K/hf -l -j starts.txt | jq -c 'select(.stop == "eos")') >"$T/e4" 2>/dev/null
    ok "EXAMPLES: --jsonl | jq" test $? -eq 0
else
    skip "jq not installed"
fi
done_testing
