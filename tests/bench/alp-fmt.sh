#!/bin/sh
# alp-fmt speed: MB/s of JSON Lines in, beside jq -c doing the same formatting (the alpaca
# template's two prompts, the output as the response) on the same input in the same run.
# The input is the shared Alpaca data sets (English, Chinese, gpteacher) as JSON Lines,
# repeated to ALP_BENCH_MB (default 50) MB in $TMPDIR; without the shared data, generated rows.
set -u
TOP=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$TOP/bin}
A=$BIN/alp-fmt
D=${TESTDATA:-$TOP/../shared/data}/alpaca
[ -x "$A" ] || { echo "alp-fmt-bench: $A not built" >&2; exit 1; }
command -v jq >/dev/null 2>&1 || { echo "alp-fmt-bench: jq not installed: no peer to compare with" >&2; exit 1; }
mb_wanted=${ALP_BENCH_MB:-50}
T=$(mktemp -d "${TMPDIR:-/tmp}/alpfmtbench.XXXXXX")
trap 'rm -rf "$T"' EXIT

if [ -f "$D/alpaca_en_demo.json" ]; then
    src="shared Alpaca data (en, zh, gpteacher)"
    for f in alpaca_en_demo.json alpaca_zh_demo.json gpteacher-toolformer-similarity-0.6.json; do
        [ -f "$D/$f" ] && jq -c '.[]' "$D/$f"
    done >"$T/base.jsonl"
else
    src="generated rows (no shared data)"
    awk 'BEGIN { for (i = 1; i <= 5000; i++) {
        out = ""; for (k = 0; k < 3 + i % 7; k++) out = out "The answer, in short, is this.\\n"
        printf "{\"instruction\": \"Explain item %d.\", \"input\": \"%s\", \"output\": \"%s\"}\n", i, (i % 3 ? "" : "context " i), out } }' >"$T/base.jsonl"
fi
: >"$T/in.jsonl"
while [ "$(wc -c <"$T/in.jsonl")" -lt $((mb_wanted * 1000000)) ]; do
    cat "$T/base.jsonl" >>"$T/in.jsonl"
done

# The same formatting in jq: the alpaca-lora prompts, a JSON object per row.
P_NO='Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n\(.instruction)\n\n### Response:\n'
P_IN='Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n\(.instruction)\n\n### Input:\n\(.input)\n\n### Response:\n'
JQ_PROG="{prompt: (if (.input // \"\") != \"\" then \"$P_IN\" else \"$P_NO\" end), response: .output}"

# seconds CMD...: wall time of the command.
seconds() {
    s=$(date +%s.%N)
    "$@" || echo "alp-fmt-bench: failed: $*" >&2
    e=$(date +%s.%N)
    echo "$s $e" | awk '{ printf "%.3f", $2 - $1 }'
}
best() {  # best N CMD...: the shortest of N runs
    n=$1; shift; b=""
    i=0
    while [ $i -lt "$n" ]; do
        t=$(seconds "$@")
        if [ -z "$b" ]; then b=$t; else b=$(awk -v a="$b" -v c="$t" 'BEGIN { print (c + 0 < a + 0) ? c : a }'); fi
        i=$((i + 1))
    done
    echo "$b"
}
bytes=$(wc -c <"$T/in.jsonl")
rows=$(wc -l <"$T/in.jsonl" | tr -d ' ')
cat "$T/in.jsonl" >/dev/null   # warm the page cache

t_jq=$(best 1 sh -c "jq -c '$JQ_PROG' '$T/in.jsonl' >'$T/jq.out'")
t_rec=$(best 3 sh -c "'$A' '$T/in.jsonl' 2>/dev/null >'$T/alp.rec'")
t_pipe=$(best 3 sh -c "'$A' '$T/in.jsonl' 2>/dev/null | cat >/dev/null")
t_text=$(best 3 sh -c "'$A' -T '$T/in.jsonl' 2>/dev/null >/dev/null")
gzip -1 -c "$T/in.jsonl" >"$T/in.jsonl.gz"
t_gz=$(best 3 sh -c "'$A' '$T/in.jsonl.gz' 2>/dev/null >/dev/null")
t_zcat=$(best 3 sh -c "gzip -dc '$T/in.jsonl.gz' >/dev/null")

[ "$(wc -l <"$T/jq.out" | tr -d ' ')" = "$rows" ] || echo "alp-fmt-bench: jq wrote a different number of rows" >&2

echo "input: $src, $(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1e6 }') MB JSON Lines, $rows rows"
awk -v b="$bytes" -v jq="$t_jq" -v rec="$t_rec" -v pipe="$t_pipe" -v text="$t_text" -v gz="$t_gz" -v zcat="$t_zcat" 'BEGIN {
    printf "%-40s %8s %9s %8s\n", "command (MB of JSON Lines in)", "seconds", "MB/s", "vs jq"
    row("jq -c (the same formatting, JSON out)", jq)
    row("alp-fmt (records to a file)", rec)
    row("alp-fmt | cat (records through a pipe)", pipe)
    row("alp-fmt --text", text)
    row("alp-fmt on the gzip -1 of it", gz)
    row("gzip -dc alone (the floor for the above)", zcat)
}
function row(name, s) {
    rate = s > 0 ? b / 1e6 / s : 0
    printf "%-40s %8.3f %9.0f %7.1fx\n", name, s, rate, (s > 0 ? jq / s : 0)
}'
