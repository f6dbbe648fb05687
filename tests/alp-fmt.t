#!/bin/sh
# alp-fmt: templates against the alpaca_tiny golden, the shared data sets, every bad input,
# compressed and archived inputs, stdin, SIGPIPE, the options, and the man page's EXAMPLES.
. "$(dirname "$0")/tap.sh"
A=$BIN/alp-fmt
R=$BIN/recs
F=$TOP/tests/fixtures/alp-fmt
D=$TESTDATA/alpaca
[ -x "$A" ] || skip_all "alp-fmt not built"
[ -x "$R" ] || skip_all "recs not built (it reads the records back)"
command -v jq >/dev/null 2>&1 || skip_all "jq not installed"

# rows: records on stdin as JSON lines [index, prompt, response].
rows() { "$R" dump | jq -c '[.index, .segments[0].text, .segments[1].text]'; }
# count: records on stdin.
count() { "$R" dump | wc -l | tr -d ' '; }

# The alpaca-lora prompts, spelled out independently of the C code, for expectations.
P_NO='Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n\(.instruction)\n\n### Response:\n'
P_IN='Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n\(.instruction)\n\n### Input:\n\(.input)\n\n### Response:\n'

# ---------------------------------------------------------------- command line
"$A" --help >"$T/help" 2>"$T/err"
is "$?" 0 "--help exits 0"
ok "--help prints the usage on stdout" grep -q '^usage: alp-fmt ' "$T/help"
# The man page's SYNOPSIS is the usage text (both forms), word for word.
sed -n 's/^usage: //p; s/^       alp-fmt/alp-fmt/p' "$T/help" | tr -s ' ' >"$T/usage"
MANWIDTH=300 mandoc -Tutf8 "$TOP/man/alp-fmt.1" | col -b | sed -n '/^SYNOPSIS/,/^DESCRIPTION/p' |
    sed '1d;$d;/^ *$/d;s/^ *//' | tr -s ' ' >"$T/synopsis"
is "$(cat "$T/synopsis")" "$(cat "$T/usage")" "man page SYNOPSIS matches --help"
run_case "unknown option: exit 2" 2 '^alp-fmt: ' -- "$A" --bogus
run_case "unknown template name: exit 2" 2 'unknown template "vicuna"' -- "$A" -t vicuna
run_case "--field with an unknown role: exit 2" 2 'unknown role "prompt"' -- "$A" -f prompt=q
run_case "--field without '=': exit 2" 2 'expected ROLE=KEY' -- "$A" -f instruction
run_case "--field giving two roles one key: exit 2" 2 'already holds' -- "$A" -f output=instruction
run_case "--show-template with a file: exit 2" 2 'takes no file' -- "$A" -S "$F/rows.jsonl"
if command -v script >/dev/null 2>&1; then
    script -qec "$A $F/rows.jsonl" /dev/null >"$T/tty" 2>&1
    is "$?" 2 "records to a terminal: exit 2"
    ok "records to a terminal: refused with a hint" grep -q 'hint: ' "$T/tty"
    script -qec "$A -T $F/rows.jsonl" /dev/null >"$T/tty" 2>&1
    is "$?" 0 "--text to a terminal is fine"
else
    skip "script(1) not installed: no terminal test"
fi

# ---------------------------------------------------------------- the golden: alpaca_tiny
if have_testdata alpaca/alpaca_tiny.json; then
    "$A" "$D/alpaca_tiny.json" 2>"$T/err" | "$R" dump >"$T/tiny.jsonl"
    jq -c '.segments | map(.text) | join("")' "$T/tiny.jsonl" >"$T/got"
    jq -c '.[].text' "$D/alpaca_tiny.json" >"$T/want"
    ok "alpaca_tiny: every row's text reproduced (prompt + response)" cmp -s "$T/got" "$T/want"
    is "$(wc -l <"$T/got" | tr -d ' ')" 100 "alpaca_tiny: 100 records"
    is "$(jq -s -c '[.[].index] == [range(1; 101)]' "$T/tiny.jsonl")" true "alpaca_tiny: index = element number"
    is "$(jq -c '[.kind, .origin, (.segments | length), .segments[0].trained, .segments[1].trained, .segments[1].eos,
                  ([.segments[] | .special // false] | any)]' "$T/tiny.jsonl" | sort -u)" \
       "[\"text\",\"$D/alpaca_tiny.json\",2,false,true,true,false]" \
       "alpaca_tiny: prompt untrained, response trained + EOS, never special"
    is "$(grep -c 'ignoring field "text"' "$T/err")" 1 "alpaca_tiny: the extra field \"text\" reported once"
    # unsloth: the with-input prompt for every row, an empty input section where there is none
    "$A" -t unsloth "$D/alpaca_tiny.json" 2>/dev/null | rows >"$T/got"
    jq -c "to_entries[] | [.key + 1, (.value | .input |= (. // \"\") | \"$P_IN\"), .value.output]" \
        "$D/alpaca_tiny.json" >"$T/want"
    ok "unsloth: every row in the with-input prompt" cmp -s "$T/got" "$T/want"
else
    skip "alpaca_tiny golden: no shared data"
fi

# ---------------------------------------------------------------- the other shared data sets
if have_testdata alpaca/alpaca_zh_demo.json; then
    "$A" "$D/alpaca_zh_demo.json" 2>"$T/err" | rows >"$T/got"
    is "$(wc -l <"$T/got" | tr -d ' ')" 1000 "Chinese data: 1000 records"
    is "$(sed -n 1p "$T/got")" "$(jq -c ".[0] | [1, \"$P_NO\", .output]" "$D/alpaca_zh_demo.json")" \
       "Chinese data: row 1 formatted"
    n=$(jq '[.[] | .input != ""] | index(true)' "$D/alpaca_zh_demo.json")
    is "$(sed -n "$((n + 1))p" "$T/got")" "$(jq -c ".[$n] | [$n + 1, \"$P_IN\", .output]" "$D/alpaca_zh_demo.json")" \
       "Chinese data: the first row with an input formatted"
    ok "Chinese data: nothing on stderr" test ! -s "$T/err"
    "$A" -t "$F/zh-template.json" "$D/alpaca_zh_demo.json" | rows | sed -n "$((n + 1))p" >"$T/got"
    is "$(jq -r '.[1]' "$T/got")" "$(jq -r ".[$n] | \"下面是一条指令和一段输入。请写出恰当的回答。\n\n### 指令：\n\(.instruction)\n\n### 输入：\n\(.input)\n\n### 回答：\n\"" "$D/alpaca_zh_demo.json")" \
       "Chinese template file on the Chinese data"
else
    skip "Chinese data: no shared data"
fi
if have_testdata alpaca/gpteacher-toolformer-similarity-0.6.json; then
    "$A" "$D/gpteacher-toolformer-similarity-0.6.json" 2>"$T/err" | rows >"$T/got"
    is "$(wc -l <"$T/got" | tr -d ' ')" 2396 "gpteacher: 2396 records"
    is "$(cat "$T/err")" "alp-fmt: $D/gpteacher-toolformer-similarity-0.6.json:7432: ignoring field \"example_input\" (not one of the template's fields; reported once)" \
       "gpteacher: the extra field example_input reported once, with the line of its row"
    jq -c "to_entries[] | [.key + 1, (.value | if .input != \"\" then \"$P_IN\" else \"$P_NO\" end), .value.output]" \
        "$D/gpteacher-toolformer-similarity-0.6.json" >"$T/want"
    ok "gpteacher: every row as jq formats it" cmp -s "$T/got" "$T/want"
else
    skip "gpteacher: no shared data"
fi

# ---------------------------------------------------------------- our own rows (no shared data needed)
"$A" "$F/rows.jsonl" | rows >"$T/rows"
jq -c "[input_line_number, (if (.input // \"\") != \"\" then \"$P_IN\" else \"$P_NO\" end), .output]" \
    "$F/rows.jsonl" >"$T/want"
ok "JSON Lines: each row as jq formats it, index = line" cmp -s "$T/rows" "$T/want"
is "$("$A" "$F/rows.jsonl" | "$R" dump | jq -r 'select(.index == 4) | .segments[1].text')" \
   "</s> ends it; <|eot_id|> is Llama 3's." "special-token text stays text"
ok "special-token text: no segment is marked special" \
   sh -c "'$A' '$F/rows.jsonl' | '$R' dump | jq -e -s '[.[].segments[] | .special // false] | any | not' >/dev/null"
jq -s . "$F/rows.jsonl" >"$T/array.json"
"$A" "$T/array.json" | rows | jq -c '.[1:]' >"$T/got"
jq -c '.[1:]' "$T/rows" >"$T/want"
ok "a pretty-printed JSON array gives the same rows" cmp -s "$T/got" "$T/want"
sed 's/$/\r/' "$F/rows.jsonl" >"$T/crlf.jsonl"
ok "CRLF line ends" sh -c "'$A' '$T/crlf.jsonl' | '$R' dump | jq -c '[.index, .segments[0].text, .segments[1].text]' | cmp -s - '$T/rows'"
{ echo; cat "$F/rows.jsonl"; echo; echo '   '; } >"$T/blank.jsonl"
is "$("$A" "$T/blank.jsonl" | rows | jq -c '.[0]' | tr '\n' ' ')" "2 3 4 5 6 " "blank lines are passed over and still counted as lines"
printf '\357\273\277' | cat - "$T/array.json" >"$T/bom.json"
is "$("$A" "$T/bom.json" | count)" 5 "a UTF-8 byte order mark is allowed"
: >"$T/empty.json"
run_case "empty input: no records, exit 0" 0 "" -- "$A" "$T/empty.json"
ok "empty input: nothing written" test ! -s "$T/out"
printf '[ ]\n' >"$T/empty-array.json"
run_case "empty array: exit 0" 0 "" -- "$A" "$T/empty-array.json"

# ---------------------------------------------------------------- options
"$A" -p "$F/questions.jsonl" | "$R" dump >"$T/got"
is "$(jq -c '[.segments[1].text, .segments[1].trained, (.segments[1].eos // false)]' "$T/got" | sort -u)" \
   '["",true,false]' "--prompt-only: an empty trained response without EOS"
is "$(jq -r '.segments[0].text' "$T/got" | sed -n 2,100p | grep -c '### Input:')" 1 \
   "--prompt-only: rows without output are fine, input used where given"
"$A" -T "$F/rows.jsonl" >"$T/text"
is "$(sed -n '/==> .*rows.jsonl:2 <==/,/^==>/p' "$T/text" | sed '$d')" \
   "$(printf '==> %s:2 <==\nBelow is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nIdentify the odd one out.\n\n### Input:\nTwitter, Instagram, Telegram\n\n### Response:\nTelegram\n' "$F/rows.jsonl")" \
   "--text: a header, then prompt and response"
is "$(grep -c '^==> ' "$T/text")" 5 "--text: one header per row"
"$A" -k -t "$F/zh-template.json" -f instruction=question -f input=context -f output=answer "$F/qa.jsonl" 2>"$T/err" | rows >"$T/got"
is "$(jq -c '.[0]' "$T/got" | tr '\n' ' ')" "1 2 4 " "--field remaps keys (the row without an answer skipped)"
is "$(sed -n 2p "$T/got")" '[2,"下面是一条指令和一段输入。请写出恰当的回答。\n\n### 指令：\n把下面的句子翻译成英文。\n\n### 输入：\n我喜欢读书。\n\n### 回答：\n","I like reading books."]' \
   "--field with a Chinese template: the prompt"
ok "--skip-bad: the count by reason" grep -q 'skipped 1 of 4 rows: 1 missing "answer"' "$T/err"
"$A" -S >"$T/alpaca-template.json"
is "$(jq -r '.prompt_no_input' "$T/alpaca-template.json")" "$(printf "$P_NO" | sed 's/\\(\.instruction)/{instruction}/')" \
   "--show-template: the alpaca prompt without input, verbatim"
"$A" -S -t unsloth >"$T/unsloth.json"
is "$(jq -c 'keys' "$T/unsloth.json")" '["description","prompt_input","response_split"]' "--show-template: unsloth has one prompt"
"$A" -t "$T/unsloth.json" "$F/rows.jsonl" >"$T/u1"
"$A" -t unsloth "$F/rows.jsonl" >"$T/u2"
ok "--show-template writes a template file that formats the same" cmp -s "$T/u1" "$T/u2"
printf '{"prompt_input": "Q: {instruction}{{literal}}\\n", "response_split": "Q:"}\n' >"$T/only-input.json"
is "$("$A" -t "$T/only-input.json" "$F/rows.jsonl" | rows | jq -r '.[1]' | sed -n 1p)" "Q: Give three tips for staying healthy.{literal}" \
   "a template with only prompt_input serves every row; {{ }} are braces"

# ---------------------------------------------------------------- bad input
bad() {  # bad NAME PATTERN CONTENT (printf format): the file bad.jsonl fails with exit 1
    printf "$3" >"$T/bad.jsonl"
    run_case "$1" 1 "$2" -- "$A" -T "$T/bad.jsonl"
}
G='{"instruction": "a", "output": "b"}\n'
bad "malformed JSON line" "^alp-fmt: $T/bad.jsonl:2: malformed JSON \\(column 35\\): unexpected end of line" "$G"'{"instruction": "a", "output": "b"\n'
bad "malformed JSON: hint about one object per line" "hint: JSON Lines hold one object per line" "{\n\"instruction\": \"a\"}\n"
bad "missing output" ':1: missing field "output"' '{"instruction": "a"}\n'
bad "missing instruction" ':1: missing field "instruction"' '{"output": "a", "Instruction": "b"}\n'
bad "instruction not a string" 'field "instruction" is a number, not a string' '{"instruction": 1, "output": "b"}\n'
bad "output not a string" 'field "output" is an array, not a string' '{"instruction": "a", "output": ["b"]}\n'
bad "output null" 'field "output" is null, not a string' '{"instruction": "a", "output": null}\n'
bad "input not a string" 'field "input" is an object, not a string' '{"instruction": "a", "input": {}, "output": "b"}\n'
bad "a field twice" 'field "output" appears twice' '{"instruction": "a", "output": "b", "output": "c"}\n'
bad "not an object" ':2: expected an object, found an array' "$G"'[1, 2]\n'
bad "more after the object" 'more after the object' '{"instruction": "a", "output": "b"} {}\n'
bad "bad escape" 'unknown escape' '{"instruction": "a\\q", "output": "b"}\n'
bad "raw control character" 'unescaped control character' '{"instruction": "a\tb", "output": "b"}\n'
bad "bad number in an extra field" 'bad number' '{"instruction": "a", "output": "b", "n": 1.}\n'
bad "lone surrogate" 'lone surrogate .uD800' '{"instruction": "\\ud800", "output": "b"}\n'
bad "binary input" 'not JSON Lines or a JSON array: starts with byte 0x01' '\001\002\003'
run_case "invalid UTF-8" 1 "bad-utf8.jsonl:1: invalid UTF-8 \\(byte 0xE9 at column 21\\)" -- "$A" -T "$F/bad-utf8.jsonl"
ok "a bad row suggests --skip-bad" grep -q 'hint: --skip-bad' "$T/err"
bad "array: trailing comma" "bad.jsonl:2: malformed JSON: '\\]' after ','" '[{"instruction": "a", "output": "b"},\n]'
bad "array: not closed" 'the array is not closed' '[{"instruction": "a", "output": "b"}'
bad "array: more after it" "more after the array" '[] []'
bad "array: element not an object" 'bad.jsonl:2: element 2: expected an object, found a string' '[{"instruction": "a", "output": "b"},\n "x"]'
bad "array: element missing output" 'bad.jsonl:3: element 2: missing field "output"' '[{"instruction": "a", "output": "b"},\n\n {"instruction": "a"}]'
printf '[{"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}]' >"$T/broken.json"
run_case "array: broken JSON ends the run even with --skip-bad" 1 'broken.json:2: malformed JSON \(column 22\)' -- "$A" -k "$T/broken.json"
ok "array: the hint says why" grep -q 'cannot be resynchronised' "$T/err"
printf '[{"instruction": "a", "output": "b"}, {"output": "x"}, 3, {"instruction": "c", "output": "d"}]' >"$T/skip.json"
run_case "array: bad elements skipped with --skip-bad" 0 'skipped 2 of 4 rows: 1 missing "instruction", 1 not an object' -- "$A" -k "$T/skip.json"
is "$(rows <"$T/out" | jq -c '.[0]' | tr '\n' ' ')" "1 4 " "array: the good elements keep their element numbers"
# every reason at once, skipped and counted
{ printf "$G"; printf '{"instruction": "a"\n'; printf '{"output": "b"}\n'; printf '{"instruction": 2, "output": "b"}\n'
  printf '{"instruction": "a", "output": "b", "instruction": "c"}\n'; printf '"x"\n'; cat "$F/bad-utf8.jsonl"; printf "$G"; } >"$T/mixed.jsonl"
run_case "--skip-bad: exit 0" 0 '' -- "$A" -k "$T/mixed.jsonl"
is "$(tail -n 1 "$T/err")" 'alp-fmt: skipped 6 of 8 rows: 1 malformed JSON, 1 missing "instruction", 1 "instruction" not a string, 1 "instruction" twice, 1 not an object, 1 invalid UTF-8' \
   "--skip-bad: counts by reason"
is "$(grep -c ': skipped: ' "$T/err")" 6 "--skip-bad: each skipped row named"
is "$(rows <"$T/out" | jq -c '.[0]' | tr '\n' ' ')" "1 8 " "--skip-bad: the good rows written"
run_case "a missing file: exit 1, the others still read" 1 'nonexistent.json: No such file or directory' -- \
    "$A" "$T/nonexistent.json" "$F/rows.jsonl"
is "$(count <"$T/out")" 5 "a missing file: the other file's rows written"
run_case "a directory: exit 1" 1 'is a directory' -- "$A" "$T"
run_case "template with an unknown placeholder: exit 1" 1 'unknown placeholder \{question\}' -- "$A" -t "$F/bad-template.json" "$F/rows.jsonl"
run_case "template file missing: exit 1" 1 'no-such-template.json' -- "$A" -t "$T/no-such-template.json" "$F/rows.jsonl"
printf '{"prompt_input": "{instruction}", "promt_no_input": "x"}\n' >"$T/t.json"
run_case "template key misspelt: exit 1" 1 'unknown template key "promt_no_input"' -- "$A" -t "$T/t.json" -S

# Differential: random rows, 40% damaged, against Python's json module (see differential.py).
if command -v python3 >/dev/null 2>&1; then
    mkdir -p "$T/diff"
    python3 "$F/differential.py" 20261130 3000 "$T/diff"
    for form in jsonl:rows.jsonl array:rows.json; do
        "$A" -k "$T/diff/${form#*:}" 2>/dev/null | rows >"$T/diff/got"
        jq -c . "$T/diff/want-${form%%:*}" >"$T/diff/want"
        ok "differential against Python json (${form%%:*}, $(wc -l <"$T/diff/want" | tr -d ' ') rows kept)" \
           cmp -s "$T/diff/got" "$T/diff/want"
    done
else
    skip "python3 not installed: no differential test"
fi

# ---------------------------------------------------------------- compressed, archived, stdin
for z in gzip xz zstd bzip2; do
    if ! command -v $z >/dev/null 2>&1; then skip "$z not installed"; continue; fi
    $z -c <"$F/rows.jsonl" >"$T/rows.jsonl.z"
    "$A" "$T/rows.jsonl.z" | rows >"$T/got"
    ok "$z-compressed input" cmp -s "$T/got" "$T/rows"
done
gzip -c "$F/rows.jsonl" | head -c 100 >"$T/truncated.gz"
run_case "truncated gzip input: exit 1" 1 'truncated.gz: truncated gzip input' -- "$A" "$T/truncated.gz"
mkdir -p "$T/tree/data"
cp "$F/rows.jsonl" "$T/tree/data/train.jsonl"
cp "$T/array.json" "$T/tree/data/valid.json"
echo "not data" >"$T/tree/data/README"
(cd "$T/tree" && tar cf "$T/data.tar" data/train.jsonl data/README data/valid.json && gzip -c "$T/data.tar" >"$T/data.tgz")
"$A" "$T/data.tar" 2>"$T/err" | "$R" dump >"$T/got"
is "$(jq -r '.origin' "$T/got" | uniq | tr '\n' ' ')" "$T/data.tar:data/train.jsonl $T/data.tar:data/valid.json " \
   "tar: the JSON members in order, origin archive:member"
is "$(jq -c '[.index, .segments[0].text, .segments[1].text]' "$T/got" | sed -n 1,5p)" "$(cat "$T/rows")" "tar: the rows"
ok "tar: other members named and passed over" grep -q 'passing over archive member "data/README"' "$T/err"
is "$("$A" "$T/data.tgz" 2>/dev/null | count)" 10 "tar.gz: both members"
is "$("$A" "$T/data.tgz:data/valid.json" | "$R" dump | jq -r .origin | uniq)" "$T/data.tgz:data/valid.json" "archive:member selects one member"
run_case "archive:member not named .json is read when asked for" 1 'README:1: malformed JSON' -- "$A" "$T/data.tar:data/README"
run_case "archive:member that is not there: exit 1" 1 'no member named "data/nope.json"' -- "$A" "$T/data.tar:data/nope.json"
if command -v zip >/dev/null 2>&1; then
    (cd "$T/tree" && zip -q "$T/data.zip" data/train.jsonl data/valid.json)
elif command -v python3 >/dev/null 2>&1; then
    (cd "$T/tree" && python3 -m zipfile -c "$T/data.zip" data)
fi
if [ -f "$T/data.zip" ]; then
    is "$("$A" "$T/data.zip" 2>/dev/null | "$R" dump | jq -c '[.index, .segments[0].text, .segments[1].text]' | sed -n 1,5p)" \
       "$(cat "$T/rows")" "zip: the rows"
    is "$("$A" - <"$T/data.zip" 2>/dev/null | "$R" dump | jq -r .origin | sort -u | tr '\n' ' ')" \
       "<stdin>:data/train.jsonl <stdin>:data/valid.json " "zip on stdin"
else
    skip "zip: neither zip nor python3 to make one"
fi
"$A" <"$F/rows.jsonl" | "$R" dump >"$T/got"
is "$(jq -c '[.index, .segments[0].text, .segments[1].text]' "$T/got")" "$(cat "$T/rows")" "stdin with no operand"
is "$(jq -r .origin "$T/got" | uniq)" "<stdin>" "stdin: origin <stdin>"
is "$(gzip -c "$F/rows.jsonl" | "$A" - | count)" 5 "stdin as -, gzip-compressed"

# ---------------------------------------------------------------- | head: SIGPIPE is quiet
i=0
while [ $i -lt 12 ]; do cat "$F/rows.jsonl" "$F/rows.jsonl" "$F/rows.jsonl" "$F/rows.jsonl"; i=$((i + 1)); done >"$T/r48.jsonl"
i=0
while [ $i -lt 50 ]; do cat "$T/r48.jsonl"; i=$((i + 1)); done >"$T/big.jsonl"
for mode in "" -T; do
    ( "$A" $mode "$T/big.jsonl" 2>"$T/pipe-err"; echo $? >"$T/pipe-status" ) | head -c 100 >/dev/null
    st=$(cat "$T/pipe-status")
    ok "| head -c 100 ${mode:-records}: killed by SIGPIPE or done (status $st)" test "$st" = 141 -o "$st" = 0
    ok "| head -c 100 ${mode:-records}: no error message" test ! -s "$T/pipe-err"
done

# ---------------------------------------------------------------- the man page's EXAMPLES
mkdir -p "$T/ex/data"
jq -s . "$F/rows.jsonl" >"$T/ex/alpaca_data.json"
gzip -c "$F/rows.jsonl" >"$T/ex/alpaca_data.jsonl.gz"
cp "$F/zh-template.json" "$F/qa.jsonl" "$F/questions.jsonl" "$T/ex/"
cp "$T/ex/alpaca_data.json" "$T/ex/data/train.json"
(cd "$T/ex" && tar czf data.tar.gz data/train.json)
sed -n '/^\.Sh EXAMPLES/,/^\.Sh /p' "$TOP/man/alp-fmt.1" | sed -n 's/^\$ //p' >"$T/examples"
is "$(wc -l <"$T/examples" | tr -d ' ')" 7 "man page: 7 example commands found"
while IFS= read -r cmd; do
    (cd "$T/ex" && PATH="$BIN:$PATH" sh -c "$cmd" >"$T/ex-out" 2>"$T/ex-err")
    st=$?
    out=$(ls "$T/ex" | tr '\n' ' ')
    ok "man EXAMPLE exits 0: $cmd" test "$st" -eq 0
    case $cmd in
    *'> '*) f=${cmd##*> }; ok "man EXAMPLE wrote $f" test -s "$T/ex/$f" ;;
    *) ok "man EXAMPLE printed something: $cmd" test -s "$T/ex-out" ;;
    esac
done <"$T/examples"
is "$(jq -c 'keys' "$T/ex/my-template.json")" '["description","prompt_input","prompt_no_input","response_split"]' \
   "man EXAMPLE: the template file has alpaca-lora's keys"
is "$("$R" dump "$T/ex/qa.rec" | wc -l | tr -d ' ')" 3 "man EXAMPLE: the Chinese rows, one skipped"
# the template in the man page text is the fixture's
sed -n '/^    "prompt_input"/p' "$TOP/man/alp-fmt.1" | sed 's/\\en/\\n/g; s/,$//' >"$T/man-prompt"
is "$(cat "$T/man-prompt")" "$(grep '"prompt_input"' "$F/zh-template.json" | sed 's/,$//')" "man page: the Chinese template shown is the fixture"

done_testing
