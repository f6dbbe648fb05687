#!/bin/sh
# recs(1) and recs(5): every command, every rejected input, the dump | load round trip,
# truncation, the Python writer of recs(5) and every EXAMPLES line of recs(1).
# Goldens: tests/fixtures/recs/golden.{rec,jsonl}, written by make_golden.py from the
# format's definition, independently of the C code.
. "$(dirname "$0")/tap.sh"
RECS=$BIN/recs
[ -x "$RECS" ] || skip_all "recs not built ($RECS)"
FIX=$TOP/tests/fixtures/recs
GOLD=$FIX/golden.rec
PATH=$BIN:$PATH
export PATH

# set_byte FILE OFFSET OCTAL: overwrite one byte in place.
set_byte() { printf "\\$3" | dd of="$1" bs=1 seek="$2" conv=notrunc 2>/dev/null; }

# --- command line -----------------------------------------------------------------
"$RECS" --help >"$T/help" 2>"$T/err"
is "$?:$(head -1 "$T/help"):$(wc -c <"$T/err")" "0:usage: recs dump [file ...]:0" "--help: usage on stdout, exit 0"
"$RECS" count --help >"$T/help2"
ok "count --help is the same text" cmp -s "$T/help" "$T/help2"
run_case "no command" 2 "^recs: missing command" -- "$RECS"
run_case "unknown command" 2 "^recs: unknown command 'dupm'" -- "$RECS" dupm
run_case "unknown option" 2 "^recs: dump: unknown option --frobnicate" -- "$RECS" dump --frobnicate
run_case "unknown short option" 2 "^recs: check: unknown option -x" -- "$RECS" check -x
run_case "-v only goes with check" 2 "^recs: -v goes with check" -- "$RECS" dump -v
run_case "-j only goes with count" 2 "^recs: -j goes with count" -- "$RECS" check --json
ok "usage error prints the usage on stderr" grep -q "^usage: recs dump" "$T/err"

# SYNOPSIS of recs(1) is the usage text, line for line.
MANWIDTH=200 mandoc -Tutf8 "$TOP/man/recs.1" 2>/dev/null | col -b |
    sed -n '/^SYNOPSIS/,/^[A-Z]/p' | sed '1d;$d;/^ *$/d;s/^ *//' >"$T/syn"
sed -n '/^usage:/,/^[^ u]/p' "$T/help" | sed '$d;s/^usage: //;s/^ *//' >"$T/use"
ok "man SYNOPSIS matches --help" cmp -s "$T/syn" "$T/use"
for m in recs.1 recs.5; do
    ok "$m passes mandoc -Tlint" sh -c "mandoc -Tlint -Wwarning '$TOP/man/$m' >'$T/lint' 2>&1 && ! test -s '$T/lint'"
done

# --- dump, load, golden bytes -------------------------------------------------------
"$RECS" dump "$GOLD" >"$T/dump"
ok "dump of the golden records is the golden JSONL" cmp -s "$T/dump" "$FIX/golden.jsonl"
"$RECS" load "$FIX/golden.jsonl" >"$T/load"
ok "load of the golden JSONL is the golden bytes" cmp -s "$T/load" "$GOLD"
is "$("$RECS" dump <"$GOLD" | jq -r '.kind + " " + .origin + ":" + (.index|tostring) + " " + ([.segments[].trained]|tostring)')" \
   "text alpaca_tiny.json:3 [false,true]
tokens t:7 [false,true]" "recs dump | jq reads every record"

# Hard cases, written by hand: bytes that are not UTF-8 (text_hex, origin_hex), NUL and
# control characters, non-ASCII, empty segments, no segments, SPECIAL, a large index.
cat >"$T/hard.jsonl" <<'EOF'
{"kind":"text","origin_hex":"ff00","index":9223372036854775807,"segments":[{"trained":false,"special":true,"text":"<|eot_id|> \u0000\u0001\t\"\\ é 中 🦙"},{"trained":true,"eos":true,"text_hex":"c328ff"}]}
{"kind":"text","origin":"","index":0,"segments":[]}
{"kind":"text","origin":"x","index":1,"segments":[{"trained":true,"text":""},{"trained":false,"eos":true,"special":true,"text":"\u001f"}]}
{"kind":"tokens","origin":"y","index":2,"fingerprint":"ffffffffffffffff","segments":[{"trained":true,"ids":[]},{"trained":false,"ids":[0,4294967295]}]}
EOF
"$RECS" load "$T/hard.jsonl" >"$T/hard.rec"
is "$?" 0 "load of hard cases"
"$RECS" dump "$T/hard.rec" >"$T/hard.dump"
ok "hard cases: load | dump gives back the canonical lines" cmp -s "$T/hard.dump" "$T/hard.jsonl"
"$RECS" load "$T/hard.dump" >"$T/hard2.rec"
ok "hard cases: dump | load is byte-identical" cmp -s "$T/hard2.rec" "$T/hard.rec"
# (jq reads numbers as doubles: an index above 2^53 would not survive it, so none here.)
sed "s/9223372036854775807/5/" "$T/hard.jsonl" | "$RECS" load >"$T/hard-jq.rec"
"$RECS" dump "$T/hard-jq.rec" | jq -c . | "$RECS" load >"$T/hard3.rec"
ok "dump | jq -c . | load is byte-identical" cmp -s "$T/hard3.rec" "$T/hard-jq.rec"
jq -c '{segments, fingerprint, origin, kind, index} | with_entries(select(.value != null))' "$FIX/golden.jsonl" |
    "$RECS" load >"$T/reordered.rec"
ok "keys in any order load the same bytes" cmp -s "$T/reordered.rec" "$GOLD"
echo '{"kind":"text","segments":[{"trained":false,"text":"a"}]}' | "$RECS" load | "$RECS" dump >"$T/defaults.jsonl"
is "$(cat "$T/defaults.jsonl")" '{"kind":"text","origin":"","index":0,"segments":[{"trained":false,"text":"a"}]}' \
   "load: origin and index default to empty and 0"

# A larger stream: 3000 records, read and written in one pass each.
awk 'BEGIN { for (i = 1; i <= 3000; i++) {
    printf "{\"kind\":\"%s\",\"origin\":\"gen\",\"index\":%d,", i % 3 ? "text" : "tokens", i
    if (i % 3) printf "\"segments\":[{\"trained\":false,\"text\":\"prompt %d\"},{\"trained\":true,\"eos\":true,\"text\":\"%0" (i % 200) "d\"}]}\n", i, i
    else printf "\"fingerprint\":\"%016x\",\"segments\":[{\"trained\":true,\"ids\":[%d,%d,%d]}]}\n", i, i, i + 1, i + 2 } }' >"$T/big.jsonl"
"$RECS" load "$T/big.jsonl" >"$T/big.rec" && "$RECS" dump "$T/big.rec" >"$T/big.dump"
ok "3000 records: load | dump gives back the lines" cmp -s "$T/big.dump" "$T/big.jsonl"
is "$("$RECS" count -j "$T/big.rec" | jq -c '[.records, .by_kind.text.records, .by_kind.tokens.records, .tokens]')" \
   "[3000,2000,1000,3000]" "3000 records: count"
"$RECS" dump "$T/big.rec" 2>"$T/err" | head -1 >/dev/null
is "$(cat "$T/err")" "" "dump | head -1: quiet (SIGPIPE)"

# --- check and count ----------------------------------------------------------------
run_case "check of a good stream" 0 "" -- "$RECS" check "$GOLD"
is "$(wc -c <"$T/out")" 0 "check is silent on success"
cat "$GOLD" "$GOLD" >"$T/twice.rec"
is "$("$RECS" check -v "$T/twice.rec" - <"$GOLD")" "$T/twice.rec: ok: 4 records, 320 bytes
<stdin>: ok: 2 records, 160 bytes" "check -v: one line per input; cat a a is a stream"
: >"$T/empty.rec"
is "$("$RECS" count "$T/empty.rec"; echo "exit $?")" "0 records (0 text, 0 tokens), 0 segments, 0 text bytes (0 trained, 0 EOS), 0 tokens (0 trained)
exit 0" "empty stream: 0 records, exit 0"
# Expected counts computed from the golden JSONL with jq (bytes: the golden text is ASCII).
want=$(jq -s -c '{records: length,
    segments: (map(.segments|length)|add),
    text_bytes: ([.[]|select(.kind=="text")|.segments[].text|length]|add),
    tokens: ([.[]|select(.kind=="tokens")|.segments[].ids|length]|add),
    trained_tokens: ([.[]|select(.kind=="tokens")|.segments[]|select(.trained)|.ids|length]|add)}' "$FIX/golden.jsonl")
is "$("$RECS" count -j "$GOLD" | jq -c '{records, segments, text_bytes, tokens, trained_tokens}')" "$want" "count -j matches the golden"
is "$("$RECS" count "$GOLD")" "2 records (1 text, 1 tokens), 4 segments, 11 text bytes (5 trained, 1 EOS), 4 tokens (2 trained)" "count: one human line"

# --- rejected records ---------------------------------------------------------------
INPUT=$FIX/golden.jsonl run_case "JSON is not records: bad magic, with a hint" 1 \
    "^recs: <stdin>: byte 0: record 0: bad magic 7b 22 6b .*looks like JSON" -- "$RECS" check
# Every cut that is not between records is caught; the one between records is a valid
# shorter stream (recs(5), Truncation).
size=$(wc -c <"$GOLD") caught=0 cuts=0
i=1; while [ "$i" -lt "$size" ]; do
    if [ "$i" -ne 85 ]; then
        cuts=$((cuts + 1))
        head -c "$i" "$GOLD" | "$RECS" check 2>"$T/err"
        [ $? -eq 1 ] && grep -Eq "truncated (header|payload)" "$T/err" && caught=$((caught + 1))
    fi
    i=$((i + 1))
done
is "$caught" "$cuts" "every head -c cut inside a record is detected ($cuts cuts)"
head -c 100 "$GOLD" >"$T/cut.rec"
run_case "head -c 100: truncated header of record 1" 1 "^recs: $T/cut.rec: byte 85: record 1: truncated header: 15 of 24 bytes" -- "$RECS" check "$T/cut.rec"
head -c 150 "$GOLD" >"$T/cut.rec"
run_case "head -c 150: truncated payload of record 1" 1 "byte 85: record 1: truncated payload: 41 of 51 bytes" -- "$RECS" dump "$T/cut.rec"
is "$(jq -r .index "$T/out")" "3" "dump of a cut stream still prints the records before the cut"
cp "$GOLD" "$T/flip.rec"; set_byte "$T/flip.rec" 80 101
run_case "a changed byte: checksum mismatch" 1 "byte 0: record 0: checksum mismatch" -- "$RECS" check "$T/flip.rec"
cp "$GOLD" "$T/long.rec"; set_byte "$T/long.rec" 11 100
run_case "absurd payload length" 1 "byte 0: record 0: absurd payload length" -- "$RECS" count "$T/long.rec"
cp "$GOLD" "$T/v2.rec"; set_byte "$T/v2.rec" 88 002
run_case "future version" 1 "byte 85: record 1: written by a newer version 2 of the format; this reader knows 1" -- "$RECS" check "$T/v2.rec"
printf 'hello\n' >"$T/text.rec"
run_case "plain text: bad magic, says so" 1 "bad magic 68 65 6c .*looks like text" -- "$RECS" check "$T/text.rec"
# (unknown kind, flags, reserved bytes and malformed payloads: tests/unit/record_test.c)

# A bad file is reported, and the run goes on.
run_case "check: a missing file among good ones" 1 "^recs: $T/nope.rec: No such file" -- "$RECS" check -v "$GOLD" "$T/nope.rec" "$T/twice.rec"
is "$(cat "$T/out")" "$GOLD: ok: 2 records, 160 bytes
$T/twice.rec: ok: 4 records, 320 bytes" "check: the good files around it are still checked"
run_case "count: a cut file among good ones" 1 "truncated" -- "$RECS" count -j "$GOLD" "$T/cut.rec" "$GOLD"
is "$(jq .records "$T/out")" 5 "count: records before the cut are counted"

# --- rejected JSON lines --------------------------------------------------------------
# Each bad line comes second, after a good one: the message names file:2.
good=$(head -1 "$FIX/golden.jsonl")
while IFS='|' read -r name pattern line; do
    printf '%s\n%s\n' "$good" "$line" >"$T/bad.jsonl"
    run_case "load rejects $name" 1 "^recs: $T/bad.jsonl:2: $pattern" -- "$RECS" load "$T/bad.jsonl"
done <<'EOF'
invalid JSON|invalid JSON: .*column|{"kind":"text",
a non-object|not a JSON object|[1,2]
an unknown key|unknown key "colour"|{"kind":"text","colour":1,"segments":[]}
a duplicate key|invalid JSON: duplicate object key|{"kind":"text","kind":"text","segments":[]}
a missing kind|missing "kind"|{"segments":[]}
an unknown kind|unknown kind "image"|{"kind":"image","segments":[]}
missing segments|missing "segments"|{"kind":"text"}
a segment that is not an object|segment 0: not an object|{"kind":"text","segments":[1]}
an unknown segment key|segment 0: unknown key "train"|{"kind":"text","segments":[{"train":true,"text":""}]}
a missing trained flag|segment 0: missing "trained"|{"kind":"text","segments":[{"text":"a"}]}
a trained flag that is not boolean|segment 0: "trained" must be true or false|{"kind":"text","segments":[{"trained":1,"text":"a"}]}
text and text_hex both|segment 0: needs one of "text" and "text_hex"|{"kind":"text","segments":[{"trained":true,"text":"a","text_hex":"61"}]}
a text segment without text|segment 0: needs one of "text" and "text_hex"|{"kind":"text","segments":[{"trained":true}]}
text that is not a string|segment 0: "text" must be a string|{"kind":"text","segments":[{"trained":true,"text":5}]}
an odd text_hex|segment 0: "text_hex": odd number of hex digits|{"kind":"text","segments":[{"trained":true,"text_hex":"616"}]}
a non-hex text_hex|segment 0: "text_hex": not a hex digit at position 1|{"kind":"text","segments":[{"trained":true,"text_hex":"6g"}]}
ids in a text record|segment 0: "ids" in a text record|{"kind":"text","segments":[{"trained":true,"ids":[1]}]}
text in a tokens record|segment 0: text in a tokens record|{"kind":"tokens","segments":[{"trained":true,"text":"a"}]}
a tokens segment without ids|segment 0: missing "ids"|{"kind":"tokens","segments":[{"trained":true}]}
a negative id|segment 0: id 1: not an integer from 0 to 4294967295|{"kind":"tokens","segments":[{"trained":true,"ids":[1,-1]}]}
an id past 32 bits|segment 0: id 0: not an integer|{"kind":"tokens","segments":[{"trained":true,"ids":[4294967296]}]}
a fractional id|segment 0: id 0: not an integer|{"kind":"tokens","segments":[{"trained":true,"ids":[1.5]}]}
EOS on tokens|record: segment 0: EOS or SPECIAL flag on a tokens segment|{"kind":"tokens","segments":[{"trained":true,"eos":true,"ids":[1]}]}
a short fingerprint|"fingerprint" must be a string of 16 hex digits|{"kind":"tokens","fingerprint":"abc","segments":[]}
a non-hex fingerprint|"fingerprint" must be a string of 16 hex digits|{"kind":"tokens","fingerprint":"000000000000000z","segments":[]}
a fingerprint in a text record|"fingerprint" in a text record|{"kind":"text","fingerprint":"0000000000000001","segments":[]}
a negative index|"index" must be an integer from 0|{"kind":"text","index":-1,"segments":[]}
an index past 63 bits|invalid JSON: too big integer|{"kind":"text","index":18446744073709551615,"segments":[]}
an origin that is not a string|"origin" must be a string|{"kind":"text","origin":7,"segments":[]}
origin and origin_hex both|both "origin" and "origin_hex"|{"kind":"text","origin":"a","origin_hex":"61","segments":[]}
EOF
printf '%s\n{\n' "$good" >"$T/bad.jsonl"
"$RECS" load "$T/bad.jsonl" "$FIX/golden.jsonl" >"$T/partial.rec" 2>"$T/err"
is "$?:$("$RECS" count "$T/partial.rec" | cut -d, -f1)" "1:3 records (2 text" \
   "load: lines before a bad line are written, the next file is still read"
if command -v script >/dev/null 2>&1; then
    script -qec "$RECS load $FIX/golden.jsonl; echo status \$?" /dev/null </dev/null >"$T/tty" 2>&1
    ok "load refuses a terminal (exit 2, with a hint)" sh -c "grep -q 'refusing to write binary records to a terminal' '$T/tty' && grep -q 'hint:' '$T/tty' && grep -q 'status 2' '$T/tty'"
else
    skip "script(1) not found: cannot test the terminal refusal"
fi

# --- recs(5) EXAMPLES: the Python writer, run as written in the man page --------------
awk '/^\.\\" tests\/recs.t runs this program/ { grab = 1; next }
     grab && /^\.Bd/ { inblock = 1; next }
     inblock && /^\.Ed/ { exit }
     inblock { gsub(/\\e/, "\\"); print }' "$TOP/man/recs.5" >"$T/writer.py"
ok "recs(5) holds a Python writer of 15 to 30 lines" test "$(wc -l <"$T/writer.py")" -ge 15 -a "$(wc -l <"$T/writer.py")" -le 30
if ! command -v python3 >/dev/null 2>&1; then
    skip "python3 not found: the recs(5) Python writer is not run"
elif ! python3 -c 'import xxhash' 2>/dev/null; then
    skip "python3 has no xxhash module (pip install xxhash): the recs(5) Python writer is not run"
else
    # The shell lines after it in EXAMPLES, run as written.
    sed -n '/^\.Sh EXAMPLES/,/^\.Sh SEE/p' "$TOP/man/recs.5" | awk '/^\.Bd/ { n++; next } /^\.Ed/ { next } n == 2 && !/^\./' >"$T/py.sh"
    is "$(cat "$T/py.sh")" "python3 writer.py | recs check
python3 writer.py | recs dump" "recs(5) EXAMPLES: the pipelines after the writer"
    (cd "$T" && sh -e py.sh >py.out 2>py.err)
    is "$?:$(cat "$T/py.err")" "0:" "recs(5) EXAMPLES run: the C reader accepts the Python writer's records"
    is "$(cat "$T/py.out")" '{"kind":"text","origin":"writer.py","index":1,"segments":[{"trained":false,"text":"Say hi.\n"},{"trained":true,"eos":true,"text":"Hi!"}]}
{"kind":"tokens","origin":"writer.py","index":1,"fingerprint":"000000000000feed","segments":[{"trained":false,"ids":[1,14350]},{"trained":true,"ids":[6324,2]}]}' \
       "recs(5) EXAMPLES: recs dump shows what the Python writer wrote"
fi

# --- recs(1) EXAMPLES: every line, in order, in a directory holding train.rec -----------
sed -n '/^\.Sh EXAMPLES/,/^\.Sh SEE/p' "$TOP/man/recs.1" |
    awk '/^\.Bd/ { inblock = 1; next } /^\.Ed/ { inblock = 0 } inblock' | sed 's/\\e/\\/g' >"$T/ex.sh"
mkdir "$T/ex" && cp "$GOLD" "$T/ex/train.rec"
# One row per EXAMPLES line: exit status | what stdout must be (empty: nothing).
cat >"$T/ex.want" <<'EOF'
0|World
0|2 records (1 text, 1 tokens), 4 segments, 11 text bytes (5 trained, 1 EOS), 4 tokens (2 trained)
0|2
0|
0|<stdin>: ok: 3 records, 235 bytes
0|
1|
EOF
is "$(wc -l <"$T/ex.sh" | tr -d ' ')" "$(wc -l <"$T/ex.want" | tr -d ' ')" "recs(1) EXAMPLES: one expectation per line"
n=0
while IFS= read -r line; do
    n=$((n + 1))
    want=$(sed -n "${n}p" "$T/ex.want")
    out=$(cd "$T/ex" && sh -c "$line" 2>"$T/ex.err")
    got="$?|$out"
    is "$got" "$want" "recs(1) EXAMPLES: $line"
done <"$T/ex.sh"
ok "recs(1) EXAMPLES: the cut stream's error names the truncation" grep -q "truncated header" "$T/ex.err"
done_testing
