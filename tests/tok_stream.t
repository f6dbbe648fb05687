#!/bin/sh
# tok(1)'s streaming (lib/tok_records.c, tok_stream): the output bytes, the messages and the exit
# status do not depend on -j. Records go through a ring of slots (at least 256 records) shared
# by the threads; these inputs wrap it several times, with bad records on either side of a
# wrap, a record bigger than a slot keeps (1 MiB), a stream error at the end and a write error.
# Also the UTF-8 check's offsets where its ASCII fast path (8 bytes at a time) hands over.
. "$(dirname "$0")/tap.sh"

TINY=$TOP/tests/fixtures/tok-spm/tiny
[ -x "$BIN/tok" ] && [ -x "$BIN/recs" ] || skip_all "bin/tok or bin/recs not built"
JOBS="2 3 4 8"

# 1200 text records; bad ones (invalid UTF-8, or a tokens record) at records 1, 256, 257, 513,
# 700 and 1200 (1-based, as tok counts them); record 400 is 1.2 MB of text.
awk 'BEGIN {
    big = "ab hi x "; while (length(big) < 1200000) big = big big
    for (i = 1; i <= 1200; i++) {
        if (i == 1 || i == 256 || i == 257 || i == 513 || i == 1200)
            printf "{\"kind\":\"text\",\"origin\":\"t\",\"index\":%d,\"segments\":[{\"trained\":false,\"text_hex\":\"6869ff\"}]}\n", i
        else if (i == 700)
            printf "{\"kind\":\"tokens\",\"origin\":\"t\",\"index\":%d,\"fingerprint\":\"0000000000000000\",\"segments\":[{\"trained\":false,\"ids\":[5]}]}\n", i
        else
            printf "{\"kind\":\"text\",\"origin\":\"t\",\"index\":%d,\"segments\":[{\"trained\":false,\"text\":\"hi %d ab\"},{\"trained\":true,\"eos\":true,\"text\":\"%s\"}]}\n", \
                i, i, i == 400 ? big : substr("ab hi x ab hi x ab hi x ab hi x ab", 1, 2 + i % 31)
    }
}' | "$BIN/recs" load >"$T/in.rec"

# Encoding: the same bytes, messages and status for every -j.
"$BIN/tok" -j 1 -m "$TINY" "$T/in.rec" >"$T/j1.tok" 2>"$T/j1.err"
is "$?" 1 "-j 1: bad records make exit status 1"
is "$(grep -o 'record [0-9]* (from t:[0-9]*)' "$T/j1.err" | tr '\n' ' ')" \
    "record 1 (from t:1) record 256 (from t:256) record 257 (from t:257) record 513 (from t:513) record 700 (from t:700) record 1200 (from t:1200) " \
    "-j 1: each bad record is reported once, in input order, with its index and origin"
BAD="-e 1 -e 256 -e 257 -e 513 -e 700 -e 1200"
"$BIN/recs" dump <"$T/j1.tok" | grep -o '"index":[0-9]*' | cut -d: -f2 >"$T/j1.index"
seq 1 1200 | grep -vx $BAD | cmp -s - "$T/j1.index"
ok "-j 1: the good records, in input order" [ $? -eq 0 ]
for j in $JOBS; do
    "$BIN/tok" -j "$j" -m "$TINY" "$T/in.rec" >"$T/j$j.tok" 2>"$T/j$j.err"
    is "$?" 1 "-j $j: exit status 1"
    ok "-j $j: the same output bytes as -j 1" cmp -s "$T/j1.tok" "$T/j$j.tok"
    ok "-j $j: the same messages and statistics as -j 1" cmp -s "$T/j1.err" "$T/j$j.err"
done

# Decoding the tokens back: the same bytes for every -j, and the text of the good records.
"$BIN/tok" -q -d -s -j 1 -m "$TINY" "$T/j1.tok" >"$T/d1.rec"
is "$?" 0 "-d -j 1: exit status 0"
for j in $JOBS; do
    "$BIN/tok" -q -d -s -j "$j" -m "$TINY" "$T/j1.tok" | cmp -s - "$T/d1.rec"
    ok "-d -j $j: the same output bytes as -d -j 1" [ $? -eq 0 ]
done
"$BIN/recs" dump <"$T/in.rec" | grep -v -e '"index":1,' -e '"index":256,' -e '"index":257,' -e '"index":513,' -e '"index":700,' -e '"index":1200,' >"$T/good.jsonl"
"$BIN/recs" dump <"$T/d1.rec" | cmp -s - "$T/good.jsonl"
ok "-d: the round trip gives the good input records back" [ $? -eq 0 ]

# A stream cut short after many records: what came before is written, then the error; exit 1.
cp "$T/in.rec" "$T/cut.rec"
head -c 30 "$T/in.rec" >>"$T/cut.rec"
"$BIN/tok" -j 1 -m "$TINY" "$T/cut.rec" >"$T/c1.tok" 2>"$T/c1.err"
is "$?" 1 "cut stream, -j 1: exit status 1"
ok "cut stream, -j 1: the records before the cut are written" cmp -s "$T/c1.tok" "$T/j1.tok"
ok "cut stream, -j 1: the error names the stream's last record" grep -q "cut.rec: byte [0-9]*: record 1200: truncated" "$T/c1.err"
for j in $JOBS; do
    "$BIN/tok" -j "$j" -m "$TINY" "$T/cut.rec" >"$T/c$j.tok" 2>"$T/c$j.err"
    is "$?" 1 "cut stream, -j $j: exit status 1"
    ok "cut stream, -j $j: the same output and messages as -j 1" cmp -s "$T/c1.tok" "$T/c$j.tok" && cmp -s "$T/c1.err" "$T/c$j.err"
done

# A write error (a full device) stops the run with exit 1 for every -j.
if [ -w /dev/full ]; then
    "$BIN/tok" -j 1 -m "$TINY" "$T/in.rec" >/dev/full 2>"$T/full1.err"
    is "$?" 1 "write error, -j 1: exit status 1"
    ok "write error, -j 1: says so, with the reason" grep -q "write error: No space left on device" "$T/full1.err"
    for j in $JOBS; do
        "$BIN/tok" -j "$j" -m "$TINY" "$T/in.rec" >/dev/full 2>"$T/full$j.err"
        is "$?" 1 "write error, -j $j: exit status 1"
        ok "write error, -j $j: the same messages as -j 1" cmp -s "$T/full1.err" "$T/full$j.err"
    done
else
    skip "/dev/full not writable: write errors not tested"
fi

# Invalid UTF-8 found after, inside and at the end of 8-byte ASCII runs: the offset of the first
# bad byte in its segment (text_hex: "abcdefghijklmnop" is 16 bytes, e6 97 a5 is one character).
utf8_case() {   # HEX BYTE: the segment's bytes, and the offset tok must name
    printf '{"kind":"text","origin":"u","index":1,"segments":[{"trained":false,"text":"ok"},{"trained":true,"text_hex":"%s"}]}\n' "$1" |
        "$BIN/recs" load >"$T/u.rec"
    INPUT=$T/u.rec run_case "invalid UTF-8 at byte $2 of $1" 1 "record 1 \\(from u:1\\): segment 2: invalid UTF-8 at byte $2 of the segment\$" \
        -- "$BIN/tok" -q -j 2 -m "$TINY"
}
ASCII16=6162636465666768696a6b6c6d6e6f70
utf8_case "${ASCII16}ff71" 16
utf8_case "${ASCII16}61ff" 17
utf8_case "6162636465666768c3" 8
utf8_case "e697a5${ASCII16}80" 19
utf8_case "${ASCII16}e697a561626364656667ed" 26
utf8_case "${ASCII16}eda080${ASCII16}" 16
printf '{"kind":"text","origin":"u","index":1,"segments":[{"trained":false,"text_hex":"%s"}]}\n' "${ASCII16}e697a5${ASCII16}f09f9880${ASCII16}" |
    "$BIN/recs" load >"$T/u.rec"
"$BIN/tok" -q -m "$TINY" <"$T/u.rec" | "$BIN/tok" -q -d -s -m "$TINY" | "$BIN/recs" dump | grep -q '"text":"abcdefghijklmnop日abcdefghijklmnop😀abcdefghijklmnop"'
ok "valid UTF-8 around ASCII runs goes through and back" [ $? -eq 0 ]

# No records at all: nothing out, exit 0.
: >"$T/empty.rec"
"$BIN/tok" -j 4 -m "$TINY" "$T/empty.rec" >"$T/empty.tok" 2>"$T/empty.err"
is "$? $(wc -c <"$T/empty.tok")" "0 0" "an empty stream: exit 0, no output"
ok "an empty stream: 0 records reported" grep -q "^tok: 0 records" "$T/empty.err"
done_testing
