#!/bin/sh
# tok(1): the shared tokenizer cases through the real tool, the BOS/EOS and boundary policies,
# threads, decode round trips, every rejected input, and the man page's examples.
# Records are made and read with recs load / recs dump.
. "$(dirname "$0")/tap.sh"

TINY=$TOP/tests/fixtures/tok-spm/tiny
[ -x "$BIN/tok" ] && [ -x "$BIN/recs" ] || skip_all "bin/tok or bin/recs not built"

# rec JSON...: one text record per argument, each a JSON array of segments.
rec() {
    _i=0
    for s in "$@"; do
        _i=$((_i + 1))
        printf '{"kind":"text","origin":"t","index":%d,"segments":%s}\n' "$_i" "$s"
    done | "$BIN/recs" load
}
# ids: the ids of each dumped tokens record on stdin, all segments joined by ",", a line each.
# segs: the same with segments separated by "|", to see where tokens went.
ids() { "$BIN/recs" dump | awk -v sep=, "$IDS_AWK"; }
segs() { "$BIN/recs" dump | awk -v sep='|' "$IDS_AWK"; }
IDS_AWK='{ out = ""; n = 0; s = $0
           while (match(s, /"ids":\[[0-9,]*\]/)) {
               v = substr(s, RSTART + 7, RLENGTH - 8)
               if (sep == "|" || v != "") out = out (n++ ? sep : "") v
               s = substr(s, RSTART + RLENGTH) }
           print out }'

# --- usage and rejected input (no shared data needed) ---------------------------------------
run_case "--help exits 0" 0 "" -- "$BIN/tok" --help
is "$("$BIN/tok" --help | head -1)" "usage: tok -m MODEL [-bBq] [-e ID] [-j N] [file ...]" "--help prints the usage"
run_case "no -m is a usage error" 2 "-m MODEL is required" -- "$BIN/tok"
run_case "unknown option" 2 "usage:" -- "$BIN/tok" -m "$TINY" --frobnicate
run_case "-j 0 is refused" 2 "--jobs" -- "$BIN/tok" -m "$TINY" -j 0
run_case "-j x is refused" 2 "--jobs" -- "$BIN/tok" -m "$TINY" -j x
run_case "--eos-id -1 is refused" 2 "--eos-id" -- "$BIN/tok" -m "$TINY" -e -1
run_case "--eos-id past the vocabulary" 2 "outside the vocabulary" -- "$BIN/tok" -m "$TINY" -e 271
run_case "-s without -d" 2 "for decoding" -- "$BIN/tok" -m "$TINY" -s
run_case "-t without -d" 2 "for decoding" -- "$BIN/tok" -m "$TINY" -t
run_case "-b with -d" 2 "for encoding" -- "$BIN/tok" -d -m "$TINY" -b
run_case "missing model directory" 1 "nonexistent.*No such file" -- "$BIN/tok" -m "$T/nonexistent"
mkdir -p "$T/empty"
run_case "directory without a tokenizer" 1 "no tokenizer.json or tokenizer.model" -- "$BIN/tok" -m "$T/empty"
mkdir -p "$T/wordpiece"
printf '{"model":{"type":"WordPiece","vocab":{"a":0}}}' >"$T/wordpiece/tokenizer.json"
run_case "unsupported tokenizer.json names the part" 1 "model.type WordPiece" -- "$BIN/tok" -m "$T/wordpiece"
mkdir -p "$T/lower"
sed 's/"type": "Prepend"/"type": "Lowercase"/' "$TINY/tokenizer.json" >"$T/lower/tokenizer.json"
run_case "unsupported normalizer names the part" 1 "normalizer Lowercase" -- "$BIN/tok" -m "$T/lower"
mkdir -p "$T/badjson"
printf '{"model": ' >"$T/badjson/tokenizer.json"
run_case "broken tokenizer.json" 1 "tokenizer.json:1" -- "$BIN/tok" -m "$T/badjson"
mkdir -p "$T/badpb"
printf '\n\177\001' >"$T/badpb/tokenizer.model"
run_case "broken protobuf tokenizer.model" 1 "protobuf parse error" -- "$BIN/tok" -m "$T/badpb"
run_case "missing input file" 1 "nope.rec" -- "$BIN/tok" -m "$TINY" "$T/nope.rec"

printf '{"kind":"text","origin":"data.jsonl","index":7,"segments":[{"trained":false,"text_hex":"6869ff"}]}\n' |
    "$BIN/recs" load >"$T/badutf8.rec"
INPUT=$T/badutf8.rec run_case "invalid UTF-8 names the record's origin and offset" 1 \
    "<stdin>: byte 0: record 1 \(from data.jsonl:7\): segment 1: invalid UTF-8 at byte 2" -- "$BIN/tok" -m "$TINY"
rec '[{"trained":false,"text":"hi"}]' >"$T/good.rec"
cat "$T/good.rec" "$T/badutf8.rec" "$T/good.rec" >"$T/mixed.rec"
"$BIN/tok" -m "$TINY" -q "$T/mixed.rec" >"$T/mixed.out" 2>"$T/mixed.err"
is "$? $(ids <"$T/mixed.out" | tr '\n' ' ')" "1 1,266 1,266 " "a bad record is skipped, the others go through, exit 1"
ok "the skipped count is reported" grep -q "1 bad records skipped" "$T/mixed.err"
"$BIN/tok" -m "$TINY" -q <"$T/good.rec" >"$T/good.tok"
INPUT=$T/good.tok run_case "token records are the wrong kind for encoding" 1 "a tokens record" -- "$BIN/tok" -m "$TINY"
INPUT=$T/good.rec run_case "text records are the wrong kind for decoding" 1 "a text record" -- "$BIN/tok" -d -m "$TINY"
head -c 30 "$T/good.rec" >"$T/trunc.rec"
INPUT=$T/trunc.rec run_case "a truncated stream is an error" 1 "trunc|<stdin>" -- "$BIN/tok" -m "$TINY"
printf '{"kind":"tokens","origin":"t","index":1,"fingerprint":"0000000000000000","segments":[{"trained":false,"ids":[5000]}]}\n' |
    "$BIN/recs" load >"$T/range.tok"
INPUT=$T/range.tok run_case "decode: id out of range" 1 "out of range" -- "$BIN/tok" -d -m "$TINY"
printf '{"kind":"tokens","origin":"t","index":1,"fingerprint":"0123456789abcdef","segments":[{"trained":false,"ids":[5]}]}\n' |
    "$BIN/recs" load >"$T/other.tok"
INPUT=$T/other.tok run_case "decode: tokens of another tokenizer" 1 "another tokenizer" -- "$BIN/tok" -d -m "$TINY"
if command -v script >/dev/null 2>&1; then
    script -qec "$BIN/tok -m $TINY <$T/good.rec" /dev/null >"$T/tty.out" 2>&1
    ok "binary output to a terminal is refused" grep -q "refusing to write binary records to a terminal" "$T/tty.out"
else
    skip "script(1) not installed: terminal refusal not tested"
fi

# --- policies on the tiny tokenizer (ids: 1 <s>, 2 </s>, 259 ▁, 264 ▁h, 266 ▁hi, 269 ▁ab) ----
is "$(rec '[{"trained":false,"text":"hi"}]' | "$BIN/tok" -q -m "$TINY" | ids)" "1,266" "BOS added as the model does"
is "$(rec '[{"trained":false,"text":"hi"}]' | "$BIN/tok" -q -B -m "$TINY" | ids)" "266" "--no-bos"
is "$(rec '[{"trained":false,"special":true,"text":"<s>hi"}]' | "$BIN/tok" -q -m "$TINY" | ids)" "1,266" \
    "no double BOS when a special segment begins with <s>"
is "$(rec '[{"trained":false,"text":"<s>hi"}]' | "$BIN/tok" -q -m "$TINY" | ids)" "1,266" \
    "no double BOS when plain text begins with the BOS string: it becomes the BOS id"
is "$(rec '[{"trained":false,"text":"<s>hi"}]' | "$BIN/tok" -q -b -m "$TINY" | ids)" "1,266" "--bos does not double it either"
is "$(rec '[{"trained":false,"text":"hi</s>"}]' | "$BIN/tok" -q -B -m "$TINY" | ids)" "266,63,50,118,65" \
    "special names in plain segments are text"
is "$(rec '[{"trained":false,"special":true,"text":"hi</s>"}]' | "$BIN/tok" -q -B -m "$TINY" | ids)" "266,2" \
    "special names in special segments are tokens"
is "$(rec '[{"trained":false,"text":"hi"},{"trained":true,"eos":true,"text":" ab"}]' | "$BIN/tok" -q -m "$TINY" | segs)" \
    "1,266|269,2" "EOS appended to the eos segment, BOS with the first"
is "$(rec '[{"trained":false,"text":"hi"},{"trained":true,"eos":true,"text":" ab"}]' | "$BIN/tok" -q -e 7 -m "$TINY" | segs)" \
    "1,266|269,7" "--eos-id"
is "$(rec '[{"trained":true,"eos":true,"special":true,"text":"hi</s>"}]' | "$BIN/tok" -q -B -m "$TINY" | segs)" \
    "266,2" "no double EOS when the text ends with it"
is "$(rec '[{"trained":false,"text":""},{"trained":true,"eos":true,"text":""}]' | "$BIN/tok" -q -m "$TINY" | segs)" \
    "1|2" "empty segments: BOS and EOS only"
"$BIN/recs" dump <"$T/good.tok" | grep -q '"fingerprint":"[0-9a-f]\{16\}"' && ! "$BIN/recs" dump <"$T/good.tok" | grep -q '"fingerprint":"0000000000000000"'
ok "token records carry the tokenizer fingerprint" [ $? -eq 0 ]
is "$(rec '[{"trained":false,"text":"x"},{"trained":true,"eos":true,"text":"y"}]' | "$BIN/tok" -q -m "$TINY" | "$BIN/recs" dump |
      grep -o '"trained":[a-z]*' | tr '\n' ' ')" '"trained":false "trained":true ' "segments keep their trained flags"

# Boundaries: "h" + "i" is "▁hi" (one token) at once: it starts in the first segment.
rec '[{"trained":false,"text":"h"},{"trained":true,"eos":true,"text":"i"}]' '[{"trained":false,"text":"hi"},{"trained":true,"text":" ab"}]' >"$T/straddle.rec"
"$BIN/tok" -m "$TINY" <"$T/straddle.rec" >"$T/straddle.tok" 2>"$T/straddle.err"
is "$(segs <"$T/straddle.tok" | tr '\n' ' ')" "1,266|2 1,266|269 " "a straddling token goes to the segment where it starts"
ok "the straddle count is reported" grep -q "1 straddling a segment boundary" "$T/straddle.err"
ok "the totals are reported" grep -q "2 records, 6 tokens (2 trained)" "$T/straddle.err"

# Threads: identical output for any -j, in input order.
i=0
while [ $i -lt 300 ]; do
    printf '{"kind":"text","origin":"t","index":%d,"segments":[{"trained":false,"text":"hi %d ab"},{"trained":true,"eos":true,"text":"%s"}]}\n' \
        $i $i "$(printf 'ab hi x%.0s' $(seq 1 $((i % 7 + 1))))"
    i=$((i + 1))
done | "$BIN/recs" load >"$T/many.rec"
"$BIN/tok" -q -j 1 -m "$TINY" <"$T/many.rec" >"$T/j1.tok"
"$BIN/tok" -q -j 2 -m "$TINY" <"$T/many.rec" >"$T/j2.tok"
"$BIN/tok" -q -j 7 -m "$TINY" <"$T/many.rec" >"$T/j7.tok"
ok "-j 1 and -j 2 give identical bytes" cmp -s "$T/j1.tok" "$T/j2.tok"
ok "-j 1 and -j 7 give identical bytes" cmp -s "$T/j1.tok" "$T/j7.tok"
is "$("$BIN/recs" dump <"$T/j2.tok" | sed -n '300p' | grep -o '"index":[0-9]*')" '"index":299' "output in input order"
cat "$T/many.rec" "$T/many.rec" >"$T/many2.rec"
"$BIN/tok" -q -m "$TINY" "$T/many.rec" - <"$T/many.rec" >"$T/files.tok"
"$BIN/tok" -q -m "$TINY" <"$T/many2.rec" >"$T/cat.tok"
ok "several files (and -) are read in order" cmp -s "$T/files.tok" "$T/cat.tok"

# Decode: the round trip text -> tokens -> text, and the views of special tokens.
"$BIN/tok" -q -d -s -m "$TINY" <"$T/j1.tok" >"$T/back.rec"
ok "decode round trip (-s): the same text records" cmp -s "$T/back.rec" "$T/many.rec"
"$BIN/tok" -q -d -s -j 2 -m "$TINY" <"$T/j1.tok" | cmp -s - "$T/back.rec"
ok "decode with -j 2 gives the same bytes" [ $? -eq 0 ]
is "$(rec '[{"trained":false,"text":"hi"},{"trained":true,"eos":true,"text":" ab z"}]' | "$BIN/tok" -q -m "$TINY" | "$BIN/tok" -q -d -t -m "$TINY")" \
    "<s> hi ab z</s>" "decode -t shows special tokens"
is "$(rec '[{"trained":false,"text":"hi"},{"trained":true,"eos":true,"text":" ab z"}]' | "$BIN/tok" -q -m "$TINY" | "$BIN/tok" -q -d -t -s -m "$TINY")" \
    "hi ab z" "decode -t -s hides them"
is "$(rec '[{"trained":false,"text":"hi"}]' | "$BIN/tok" -q -m "$TINY" | "$BIN/tok" -q -d -m "$TINY" | "$BIN/recs" dump | grep -o '"special":true,"text":"[^"]*"')" \
    '"special":true,"text":"<s> hi"' "decoded segments that show special tokens are marked special"

# --- the man page's EXAMPLES (MODEL: stories260K; data.json: an Alpaca file) ---------------
if have_testdata alpaca/alpaca_en_demo.json && have_testdata stories260K/hf/tokenizer.json && [ -x "$BIN/alp-fmt" ]; then
    MODEL=$TESTDATA/stories260K/hf
    ln -s "$TESTDATA/alpaca/alpaca_en_demo.json" "$T/data.json"
    PATH=$BIN:$PATH
    (cd "$T" && alp-fmt data.json | tok -m "$MODEL" > data.tok) 2>"$T/ex1.err"
    ok "example 1: alp-fmt data.json | tok -m MODEL > data.tok" grep -q "^tok: 999 records" "$T/ex1.err"
    (cd "$T" && tok -d -t -s -m "$MODEL" data.tok) >"$T/ex2.txt" 2>/dev/null
    is "$(grep -c '^### Response:$' "$T/ex2.txt")" 999 "example 2: tok -d -t -s -m MODEL data.tok"
    (cd "$T" && alp-fmt data.json | tok -m "$MODEL" | tok -d -s -m "$MODEL" | recs dump) >"$T/ex3.jsonl" 2>/dev/null
    (cd "$T" && alp-fmt data.json | recs dump) >"$T/ex3.want" 2>/dev/null
    ok "example 3: alp-fmt | tok | tok -d -s | recs dump gives alp-fmt's records back" cmp -s "$T/ex3.jsonl" "$T/ex3.want"
    (cd "$T" && alp-fmt data.json | tok -m "$MODEL" | recs dump | head -1) >"$T/ex4.jsonl" 2>/dev/null
    ok "example 4: alp-fmt data.json | tok -m MODEL | recs dump | head -1" \
        grep -q '^{"kind":"tokens","origin":"data.json","index":1,"fingerprint":"[0-9a-f]*","segments":\[{"trained":false,"ids":\[1,' "$T/ex4.jsonl"
    (cd "$T" && alp-fmt data.json | tok -q -j 1 -m "$MODEL") >"$T/a1.tok"
    (cd "$T" && alp-fmt data.json | tok -q -j 2 -m "$MODEL") >"$T/a2.tok"
    ok "alpaca through stories260K: -j 1 = -j 2" cmp -s "$T/a1.tok" "$T/a2.tok"
    tok -q -B -m "$MODEL" "$T/data.tok" >/dev/null 2>&1
    ok "tokens fed back to tok are refused" [ $? -eq 1 ]
else
    skip "examples: shared data (alpaca, stories260K) or alp-fmt not found"
fi

# --- the shared tokenizer cases through the tool --------------------------------------------
# Each encode-like case becomes one text record (text in a special segment: the cases parse
# special-token names); one run with --bos and one with --no-bos; each case takes the run its
# "bos" asks for. Decode cases become token records, decoded as records; a trailing EOS comes
# back as the eos flag and is put back in the text to compare.
# run_cases NAME MODEL FILE [EXCLUDE_REGEX]
run_cases() {
    _name=$1 _model=$2 _file=$3 _exclude=${4:-'^$'}
    grep -vE "$_exclude" "$_file" >"$T/cases"
    # (optimistic_count is a feature of llama3-tokenizer-js, not a tokenization: left out.)
    grep -E '"kind":"(encode|special|chat_encode_message|chat_encode_dialog_prompt)"' "$T/cases" >"$T/enc.cases"
    grep -E '"kind":"decode"' "$T/cases" >"$T/dec.cases"
    TXT='"(([^"\\]|\\.)*)"'
    HDR='{"trained":false,"special":true,"text":"<|start_header_id|>\1<|end_header_id|>\\n\\n"},{"trained":false,"text":"\2"},{"trained":false,"special":true,"text":"<|eot_id|>"}'
    n=0
    : >"$T/enc.jsonl"
    while IFS= read -r line; do
        n=$((n + 1))
        case $line in
        *'"kind":"chat_encode_message"'*)
            segs=$(printf '%s' "$line" | sed -E 's/.*"message":(\{[^}]*\}).*/\1/' |
                   sed -E 's/\{"role":"([a-z]+)","content":'"$TXT"'\}/'"$HDR"'/')
            ;;
        *'"kind":"chat_encode_dialog_prompt"'*)
            segs=$(printf '%s' "$line" | sed -E 's/.*"dialog":\[([^]]*)\].*/\1/' |
                   sed -E 's/\{"role":"([a-z]+)","content":'"$TXT"'\}/'"$HDR"'/g')
            segs="$segs"',{"trained":false,"special":true,"text":"<|start_header_id|>assistant<|end_header_id|>\n\n"}'
            ;;
        *)
            text=$(printf '%s' "$line" | sed -E 's/.*"text":'"$TXT"'.*/\1/')
            eos=; case $line in *'"eos":true'*) eos='"eos":true,' ;; esac
            segs='{"trained":false,'"$eos"'"special":true,"text":"'"$text"'"}'
            ;;
        esac
        printf '{"kind":"text","origin":"case","index":%d,"segments":[%s]}\n' "$n" "$segs" >>"$T/enc.jsonl"
    done <"$T/enc.cases"
    "$BIN/recs" load <"$T/enc.jsonl" >"$T/enc.rec" || { fail "$_name: cases load as records"; return; }
    "$BIN/tok" -q -b -m "$_model" <"$T/enc.rec" | ids >"$T/enc.bos"
    "$BIN/tok" -q -B -m "$_model" <"$T/enc.rec" | ids >"$T/enc.nobos"
    n=0 bad=0
    while IFS= read -r line; do
        n=$((n + 1))
        case $line in
        *'"bos":true'* | *'"kind":"chat_encode_dialog_prompt"'*) got=$(sed -n "${n}p" "$T/enc.bos") ;;
        *) got=$(sed -n "${n}p" "$T/enc.nobos") ;;
        esac
        want=$(printf '%s' "$line" | sed -E 's/.*"ids":\[([0-9, ]*)\].*/\1/' | tr -d ' ')
        [ "$got" = "$want" ] || { bad=$((bad + 1)); diag "$_name case $n: got $got" "want $want" "$(printf '%s' "$line" | head -c 200)"; }
    done <"$T/enc.cases"
    is "$bad" 0 "$_name: $n encode cases through tok give the reference ids"
    [ -s "$T/dec.cases" ] || return 0
    sed -E 's/.*"ids":\[([0-9, ]*)\].*/{"kind":"tokens","origin":"case","index":1,"fingerprint":"0000000000000000","segments":[{"trained":false,"ids":[\1]}]}/' \
        "$T/dec.cases" | "$BIN/recs" load >"$T/dec.tok"
    eos_name=$(printf '{"kind":"tokens","origin":"e","index":1,"fingerprint":"0000000000000000","segments":[{"trained":false,"ids":[%s]}]}\n' \
        "$(rec '[{"trained":true,"eos":true,"text":""}]' | "$BIN/tok" -q -B -m "$_model" | ids)" |
        "$BIN/recs" load | "$BIN/tok" -q -d -t -m "$_model")
    "$BIN/tok" -q -d -m "$_model" <"$T/dec.tok" | "$BIN/recs" dump |
        sed -E 's/.*"eos":true,("special":true,)?"text":"(([^"\\]|\\.)*)".*/\2'"$eos_name"'/; s/.*"text":"(([^"\\]|\\.)*)".*/\1/' >"$T/dec.got"
    n=0 bad=0
    while IFS= read -r line; do
        n=$((n + 1))
        want=$(printf '%s' "$line" | sed -E 's/.*"text":'"$TXT"'.*/\1/')
        got=$(sed -n "${n}p" "$T/dec.got")
        [ "$got" = "$want" ] || { bad=$((bad + 1)); diag "$_name decode case $n: got $got" "want $want"; }
    done <"$T/dec.cases"
    is "$bad" 0 "$_name: $n decode cases through tok -d give the reference text"
}

if have_testdata tokenizer-cases/llama2-llama2c-cases.jsonl && have_testdata llama2/tokenizer.model; then
    run_cases "llama2 (llama2.c)" "$TESTDATA/llama2" "$TESTDATA/tokenizer-cases/llama2-llama2c-cases.jsonl"
    run_cases "llama2 (llama-tokenizer-js)" "$TESTDATA/llama2" "$TESTDATA/tokenizer-cases/llama2-tokenizer-js-tests.jsonl"
else
    skip "Llama 2 cases: shared data not found"
fi
if have_testdata tokenizer-cases/llama3-tokenizer-js-tests.jsonl && have_testdata llama3/tokenizer.model; then
    # llama3-tokenizer-js and Meta's own cases. The bare tiktoken file (no tokenizer_config.json
    # beside it) names specials as Llama 3.1 does.
    mkdir -p "$T/llama31"
    ln -s "$TESTDATA/llama3/tokenizer.model" "$T/llama31/tokenizer.model"
    cat "$TESTDATA/tokenizer-cases/llama3-tokenizer-js-tests.jsonl" "$TESTDATA/tokenizer-cases/meta-official-cases.jsonl" >"$T/llama3.cases"
    run_cases "llama3.1 tiktoken" "$T/llama31/tokenizer.model" "$T/llama3.cases"
    # The HF directory has Llama 3.0 names: the cases with 3.1 names are left out there, and so
    # are the reserved-token cases (their names are numbered as in 3.1).
    L31='12800[48]|128010|finetune_right_pad|eom_id|python_tag|reserved_special_token'
    run_cases "llama3 tokenizer.json" "$TESTDATA/llama3" "$T/llama3.cases" "$L31"
else
    skip "Llama 3 cases: shared data not found"
fi

done_testing
