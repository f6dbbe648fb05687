#!/bin/sh
# pack and shard from the command line: golden bytes, every output form read back the same,
# the validation split, placement modes, statistics, every rejected input, failed outputs
# leaving no set that looks whole, the man pages' EXAMPLES, and the full
# alp-fmt | tok | pack pipeline on the shared Alpaca data.
. "$(dirname "$0")/tap.sh"
for t in pack shard recs; do [ -x "$BIN/$t" ] || skip_all "$BIN/$t not built"; done
command -v jq >/dev/null || skip_all "jq not installed"
FIX=$TOP/tests/fixtures/pack
PATH=$BIN:$PATH
"$BIN/recs" load "$FIX/tiny.jsonl" >"$T/tiny.rec" || skip_all "recs load failed"
not() { if "$@"; then return 1; else return 0; fi; }

# golden: the committed fixture is what pack writes for it
run_case "tiny input packs" 0 "4 rows of 8" -- pack -s 8 -V 32 --single --seed 1 -o "$T/tiny.shard" "$T/tiny.rec"
ok "tiny input gives the golden bytes" cmp -s "$T/tiny.shard" "$FIX/tiny.shard"
run_case "the golden file verifies" 0 "ok, 4 rows in 1 shard" -- shard -c "$FIX/tiny.shard"

# round trip: every token of the trained documents comes back once, with its document's order
shard -d "$FIX/tiny.shard" | jq -c '[.ids as $i | .doc | to_entries[] | select(.value >= 0) | $i[.key]]' | jq -s -c 'add | sort' >"$T/got"
recs dump "$T/tiny.rec" | jq -c 'select([.segments[] | select(.trained) | .ids[]] | length > 0) | [.segments[].ids[]]' | jq -s -c 'add | sort' >"$T/want"
is "$(cat "$T/got")" "$(cat "$T/want")" "records -> shard -> rows keeps every token once"
is "$(shard -d -r 3 "$FIX/tiny.shard" | jq -c .target_ids)" "[-100,-100,7,8,2,-100,-100,-100]" \
    "targets are the next token of the same document, -100 on the prompt and at padding"

# a larger synthetic stream: every output form holds the same rows
awk 'BEGIN { srand(3); for (d = 1; d <= 300; d++) { n = 1 + int(rand() * 90); p = int(rand() * n);
    printf "{\"kind\":\"tokens\",\"origin\":\"gen\",\"index\":%d,\"fingerprint\":\"00000000000000ab\",\"segments\":[{\"trained\":false,\"ids\":[", d;
    for (i = 0; i < p; i++) printf "%s%d", (i ? "," : ""), int(rand() * 1000);
    printf "]},{\"trained\":true,\"ids\":[";
    for (i = p; i < n; i++) printf "%s%d", (i > p ? "," : ""), int(rand() * 1000);
    print "]}]}" } }' | recs load >"$T/gen.rec"
run_case "pack to a directory of several shards" 0 "rows of 64" -- pack -s 64 -V 1000 -z 20k -o "$T/dir" "$T/gen.rec"
ok "several shards and an index" test -f "$T/dir/shard-00001.bin" -a -f "$T/dir/index.json"
pack -q -s 64 -V 1000 -z 12.5k -o "$T/frac" "$T/gen.rec"
ok "a fractional --shard-size (12.5k): several shards, none over 12800 bytes, some over 12k" sh -c \
    'test -f "$1/shard-00001.bin" && ! find "$1" -name "shard-*.bin" -size +12800c | grep -q . &&
     find "$1" -name "shard-*.bin" -size +12288c | grep -q .' sh "$T/frac"
shard -d "$T/dir" >"$T/dir.jsonl"
for form in set.tar set.tgz set.zip; do
    run_case "pack to $form" 0 "" -- pack -q -s 64 -V 1000 -z 20k -o "$T/$form" "$T/gen.rec"
    shard -d "$T/$form" >"$T/$form.jsonl"
    ok "$form holds the same rows" cmp -s "$T/dir.jsonl" "$T/$form.jsonl"
    run_case "$form verifies" 0 "ok" -- shard -c "$T/$form"
done
pack -q -s 64 -V 1000 -z 20k -o - "$T/gen.rec" >"$T/stream.tar"
ok "a tar stream on stdout lists the shards and the index last" \
    test "$(tar -tf "$T/stream.tar" | tail -1)" = index.json
shard -d "$T/stream.tar" >"$T/stream.jsonl"
ok "the tar stream holds the same rows" cmp -s "$T/dir.jsonl" "$T/stream.jsonl"
# a named file is read through a mapping, stdin with read(): the same bytes either way, and
# a tar written to a pipe is the tar written to a file padded to a 10240-byte block
pack -q -s 64 -V 1000 -z 20k -o - <"$T/gen.rec" >"$T/stdin.tar"
ok "a file and stdin pack to the same tar stream" cmp -s "$T/stream.tar" "$T/stdin.tar"
cat "$T/gen.rec" | pack -q -s 64 -V 1000 -z 20k -o - | cat >"$T/pipe.tar"
ok "a tar stream written to a pipe ends on a 10240-byte block" test $(($(wc -c <"$T/pipe.tar") % 10240)) -eq 0
pack -q -s 64 -V 1000 -z 20k -o "$T/named.tar" "$T/gen.rec"
ok "a tar stream to a pipe holds the bytes of a tar file" \
    cmp -s "$T/named.tar" "$(head -c "$(wc -c <"$T/named.tar")" "$T/pipe.tar" >"$T/pipe.head" && echo "$T/pipe.head")"
tar -cf "$T/retar.tar" -C "$T" dir
shard -d "$T/retar.tar" >"$T/retar.jsonl"
ok "a directory set archived with tar -c reads as the same rows" cmp -s "$T/dir.jsonl" "$T/retar.jsonl"
run_case "pack to one file" 0 "" -- pack -q -s 64 -V 1000 --single -o "$T/one.bin" "$T/gen.rec"
shard -d "$T/one.bin" >"$T/one.jsonl"
ok "one file holds the same rows" cmp -s "$T/dir.jsonl" "$T/one.jsonl"
is "$(shard -j "$T/dir" | jq -c '[.seq_len, .vocab_size, .pad_id, .fingerprint, .pack_mode, .loss]')" \
    '[64,1000,0,"00000000000000ab","best-fit","response"]' "shard -j shows the settings"
is "$(shard -j "$T/dir" | jq .rows)" "$(wc -l <"$T/dir.jsonl" | tr -d ' ')" "shard -j counts the rows"
is "$(shard -j "$T/dir" | jq .tokens)" "$(jq -s 'map(.tokens) | add' "$T/dir.jsonl")" "shard -j counts the tokens"
is "$(shard -j "$T/dir" | jq .targets)" "$(jq -s '[.[].target_ids[] | select(. != -100)] | length' "$T/dir.jsonl")" \
    "shard -j counts the trained targets"
run_case "shard prints the settings as text" 0 "" -- shard "$T/dir"
ok "the text names the fill ratio" grep -q "fill" "$T/out"
pack -q -s 64 -V 1000 -z 8k -o "$T/dir2" "$T/gen.rec"
pack -q -s 64 -V 1000 -z 20k -o "$T/dir2" "$T/gen.rec"
ok "the same input and options give the same bytes (and a rerun removes shards it no longer needs)" diff -r "$T/dir" "$T/dir2"
pack -q -s 64 -V 1000 --seed 9 -o "$T/dir3" "$T/gen.rec"
shard -d "$T/dir3" >"$T/dir3.jsonl"
ok "another seed gives another row order" not cmp -s "$T/dir.jsonl" "$T/dir3.jsonl"
is "$(sort "$T/dir3.jsonl" | jq -c '.ids' | sort | md5sum)" "$(sort "$T/dir.jsonl" | jq -c '.ids' | sort | md5sum)" \
    "... with the same rows"

# validation split
run_case "a validation split by count" 0 "validation rows" -- pack -s 64 -V 1000 -C 5 -O "$T/val" -o "$T/train" "$T/gen.rec"
total=$(shard -j "$T/dir" | jq .rows)
is "$(( $(shard -j "$T/train" | jq .rows) + $(shard -j "$T/val" | jq .rows) ))" "$total" "train + validation = all rows"
is "$(shard -j "$T/val" | jq .rows)" 5 "5 validation rows"
shard -d "$T/train" | jq -c .ids >"$T/a"
shard -d "$T/val" | jq -c .ids >>"$T/a"
is "$(sort "$T/a" | md5sum)" "$(jq -c .ids "$T/dir.jsonl" | sort | md5sum)" "the two sets hold every row once"
run_case "a validation split by fraction" 0 "" -- pack -q -s 64 -V 1000 -F 0.1 -O "$T/valf.tar" -o "$T/trainf" "$T/gen.rec"
is "$(shard -j "$T/valf.tar" | jq .rows)" "$(( (total + 5) / 10 ))" "--val-fraction 0.1 takes a tenth of the rows, rounded"

# modes
pack -s 64 -V 1000 -o "$T/bf" "$T/gen.rec" 2>"$T/bf.err"
pack -s 64 -V 1000 -f -o "$T/ff" "$T/gen.rec" 2>"$T/ff.err"
pack -s 64 -V 1000 -p -o "$T/pad" "$T/gen.rec" 2>"$T/pad.err"
ok "first fit is reported" grep -q "(first-fit): fill" "$T/ff.err"
is "$(shard -j "$T/pad" | jq '[.rows, .docs] | .[0] == .[1]')" true "--pad puts one document piece in each row"
bf=$(shard -j "$T/bf" | jq .fill) pad=$(shard -j "$T/pad" | jq .fill)
ok "packing fills rows better than padding ($bf > $pad)" awk "BEGIN { exit !($bf > $pad) }"
ok "statistics name documents, split, fill and trained fraction" grep -q "split" "$T/bf.err"
run_case "--truncate counts truncated documents" 0 "[1-9][0-9]* truncated" -- pack -s 32 -V 1000 -t -o "$T/tr" "$T/gen.rec"
run_case "--drop counts dropped documents" 0 "[1-9][0-9]* dropped" -- pack -s 32 -V 1000 -d -o "$T/dr" "$T/gen.rec"
is "$(shard -d "$T/dr" | jq -s '[.[].tokens] | max <= 32')" true "no row over seq_len"
run_case "prompt-only documents are reported as all -100" 0 "no trained target \(all labels -100\)" -- \
    pack -s 8 -V 32 -o "$T/t2" "$T/tiny.rec"
run_case "--all-tokens keeps prompt-only documents" 0 "" -- pack -s 8 -V 32 -a -o "$T/all" "$T/tiny.rec"
ok "... and reports nothing dropped" not grep -q "no trained target" "$T/err"
is "$(shard -j "$T/all" | jq -c '[.loss, .tokens]')" "[\"all\",$(recs count -j "$T/tiny.rec" | jq .tokens)]" \
    "--all-tokens: every token is in the rows"
run_case "--quiet prints nothing" 0 "" -- pack -q -s 8 -V 32 -o "$T/q" "$T/tiny.rec"
ok "... really nothing" test ! -s "$T/err"

# bad input: rejected, nothing written
printf '%s\n' '{"kind":"text","origin":"a.json","index":3,"segments":[{"trained":true,"text":"hi"}]}' | recs load >"$T/text.rec"
run_case "a text record is refused" 1 "a.json:3: a text record" -- pack -s 8 -V 32 -o "$T/x" "$T/text.rec"
ok "... with a hint to run tok" grep -q "hint: .*tok" "$T/err"
ok "... and nothing written" test ! -e "$T/x"
sed 's/00000000000000ab/00000000000000cd/' "$FIX/tiny.jsonl" | tail -1 | recs load >"$T/other.rec"
cat "$T/tiny.rec" "$T/other.rec" >"$T/mixed.rec"
run_case "records from two tokenizers are refused" 1 "fingerprint 00000000000000cd differs" -- pack -s 8 -V 32 -o "$T/x" "$T/mixed.rec"
run_case "a token id at the vocab size is refused" 1 "tiny.jsonl:3: token id 23 >= vocab size 23" -- pack -s 8 -V 23 -o "$T/x" "$T/tiny.rec"
head -c 150 "$T/tiny.rec" >"$T/cut.rec"
run_case "a truncated stream is refused with the reader's location" 1 "cut.rec: byte [0-9]+" -- pack -s 8 -V 32 -o "$T/x" "$T/cut.rec"
run_case "a missing input is refused" 1 "nope.rec: No such file" -- pack -s 8 -V 32 -o "$T/x" "$T/nope.rec"
ok "no output after any of them" test ! -e "$T/x"
pack -q -s 8 -V 32 -o "$T/keep" "$T/tiny.rec"
cp "$T/keep/index.json" "$T/keep.idx"
run_case "bad input over an existing set" 1 "" -- pack -s 8 -V 23 -o "$T/keep" "$T/tiny.rec"
ok "... leaves the old set as it was" cmp -s "$T/keep/index.json" "$T/keep.idx"
run_case "nothing to write" 1 "no rows to write" -- sh -c "tail -1 '$FIX/tiny.jsonl' | recs load | pack -s 8 -V 32 -o '$T/x'"
run_case "a validation split that takes every row" 1 "leaves no training rows" -- pack -s 8 -V 32 -C 4 -O "$T/v" -o "$T/x" "$T/tiny.rec"

# outputs that cannot be written
: >"$T/file"
run_case "an output under a regular file" 1 "cannot create directory" -- pack -s 8 -V 32 -o "$T/file/set" "$T/tiny.rec"
mkdir -p "$T/blocked/index.json"
run_case "an old index that cannot be removed" 1 "cannot remove the old index" -- pack -s 8 -V 32 -o "$T/blocked" "$T/tiny.rec"
ok "... and no shard written" test ! -e "$T/blocked/shard-00000.bin"
run_case "an archive in a missing directory" 1 "cannot create" -- pack -s 8 -V 32 -o "$T/no/such/set.tar" "$T/tiny.rec"
if [ -w /dev/full ]; then
    run_case "a tar stream to a full disk" 1 "write failed" -- sh -c "pack -s 8 -V 32 -o - '$T/tiny.rec' >/dev/full"
else
    skip "/dev/full not available"
fi
# a disk that fills up mid-shard (a file size limit stands in for it: no tmpfs to fill here)
run_case "a shard that cannot be written whole" 1 "write failed" -- sh -c "ulimit -f 40; exec pack -s 64 -V 1000 -o '$T/full' '$T/gen.rec'"
ok "... leaves no shard and no index" test -z "$(ls "$T/full")"
run_case "an archive that cannot be written whole" 1 "write failed" -- sh -c "ulimit -f 40; exec pack -s 64 -V 1000 -o '$T/full.tar' '$T/gen.rec'"
ok "... leaves no archive" test ! -e "$T/full.tar"
ok "no temporary files left behind" test -z "$(find "$T" -name '*.tmp.*')"

# usage errors
run_case "--seq-len is required" 2 "seq-len is required" -- pack -V 32 -o "$T/x" "$T/tiny.rec"
run_case "--output is required" 2 "output is required" -- pack -s 8 -V 32 "$T/tiny.rec"
run_case "a vocab size is required" 2 "vocab size is needed" -- pack -s 8 -o "$T/x" "$T/tiny.rec"
run_case "a bad number" 2 "not a number" -- pack -s 8x -V 32 -o "$T/x"
run_case "a split without an output" 2 "needs --val-output" -- pack -s 8 -V 32 -C 1 -o "$T/x"
run_case "--val-output alone" 2 "without --val-fraction" -- pack -s 8 -V 32 -O "$T/v" -o "$T/x"
run_case "fraction and count together" 2 "exclude each other" -- pack -s 8 -V 32 -F 0.1 -C 1 -O "$T/v" -o "$T/x"
run_case "a fraction out of range" 2 "between 0 and 1" -- pack -s 8 -V 32 -F 1.5 -O "$T/v" -o "$T/x"
run_case "a pad id above the vocab" 2 "not below the vocab" -- pack -s 8 -V 32 -P 32 -o "$T/x"
run_case "a bad shard size" 2 "shard-size" -- pack -s 8 -V 32 -z 12Q -o "$T/x"
run_case "--single to stdout" 2 "give it a name" -- pack -s 8 -V 32 -1 -o -

# shard: bad sets and usage
cp "$FIX/tiny.shard" "$T/bad.shard"
printf 'Z' | dd of="$T/bad.shard" bs=1 seek=400 conv=notrunc 2>/dev/null
run_case "shard -c finds a corrupt row" 1 "row 1: checksum mismatch" -- shard -c "$T/bad.shard"
run_case "shard refuses a file that is no shard" 1 "not a shard set|bad magic|Unrecognized" -- shard "$T/tiny.rec"
run_case "shard: a row out of range" 1 "row 9 out of range" -- shard -d -r 9 "$FIX/tiny.shard"
run_case "shard: a bad range" 2 "--rows" -- shard -d -r 3-1 "$FIX/tiny.shard"
run_case "shard: --rows without --dump" 2 "goes with --dump" -- shard -r 1 "$FIX/tiny.shard"
run_case "shard: no set named" 2 "no shard set" -- shard
run_case "shard: a missing set" 1 "No such file" -- shard "$T/none"
is "$(shard -d -r 1- "$FIX/tiny.shard" | jq -s 'map(.row) | join(",")' -r)" "1,2,3" "shard -r FIRST- dumps to the end"

# EXAMPLES of the man pages
cd "$T" || exit 1
cp "$FIX/tiny.jsonl" tokens.jsonl
cp "$T/tiny.rec" tokens.rec
run_case "pack(1) example 2" 0 "" -- sh -c 'recs load tokens.jsonl | pack -s 256 --vocab-size 32000 --pad --truncate -o data.tar'
run_case "pack(1) example 3" 0 "" -- sh -c 'pack -s 128 --vocab-size 32000 -o - tokens.rec | tar -t'
ok "... lists the shard and the index" grep -q "^index.json" "$T/out"
pack -q -s 8 -V 32 -o train tokens.rec
run_case "shard(1) example 1" 0 "" -- sh -c "shard -c train && shard -d train | jq -s 'map(select(.docs > 1)) | length'"
is "$(cat "$T/out")" "$(shard -d train | jq -c 'select(.docs > 1)' | wc -l | tr -d ' ')" "... counts the rows with several documents"
run_case "shard(1) example 2" 0 "" -- sh -c "shard -d -r 3 train | jq -c '[.target_ids[] | select(. != -100)]'"
if [ -x "$BIN/tok" ] && [ -x "$BIN/alp-fmt" ] && have_testdata alpaca/alpaca_tiny.json && have_testdata stories260K/hf; then
    ln -s "$TESTDATA/alpaca/alpaca_tiny.json" alpaca.json
    ln -s "$TESTDATA/stories260K/hf" model
    run_case "pack(1) example 1: alp-fmt | tok | pack on alpaca_tiny.json" 0 "training rows" -- \
        sh -c 'alp-fmt alpaca.json | tok -m model | pack -s 512 -m model -o train --val-fraction 0.02 --val-output val'
    diag "$(cat "$T/err")"
    run_case "... the training set verifies" 0 "ok" -- shard -c train
    run_case "... the validation set verifies" 0 "ok" -- shard -c val
    is "$(shard -j train | jq -r .fingerprint)" "$(alp-fmt alpaca.json 2>/dev/null | tok -q -m model 2>/dev/null | recs dump | head -1 | jq -r .fingerprint)" \
        "... the shards carry tok's fingerprint"
    is "$(shard -j train | jq -c '[.vocab_size, .pad_id]')" "[512,2]" "-m takes vocab size 512 and pad id (EOS) 2 from config.json"
    run_case "-m refuses records of another tokenizer" 1 "records were made by tokenizer 00000000000000ab" -- \
        pack -s 8 -m model -o other tokens.rec
else
    skip "pack(1) example 1 and the alp-fmt | tok | pack pipeline: needs bin/tok, bin/alp-fmt and TESTDATA"
fi
done_testing
