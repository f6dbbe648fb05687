#!/bin/sh
# Record stream speed: recs check / dump / load in MB/s on a generated stream of Alpaca-
# sized text records, beside peers run on the same bytes in the same run: cat (the I/O
# floor) for reading records, jq -c . for reading and writing the same JSON lines.
# RECS_BENCH_RECORDS sets the size (default 100000 records, about 60 MB of JSONL).
set -u
BIN=${BIN:-$(cd "$(dirname "$0")/../.." && pwd)/bin}
RECS=$BIN/recs
[ -x "$RECS" ] || { echo "recs-bench: $RECS not built" >&2; exit 1; }
n=${RECS_BENCH_RECORDS:-100000}
T=$(mktemp -d "${TMPDIR:-/tmp}/recsbench.XXXXXX")
trap 'rm -rf "$T"' EXIT

awk -v n="$n" 'BEGIN {
    body = "The quick brown fox jumps over the lazy dog; "
    for (i = 1; i <= n; i++) {
        prompt = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\\n\\n### Instruction:\\nItem " i "\\n\\n### Response:\\n"
        resp = ""; for (k = 0; k < 4 + i % 9; k++) resp = resp body
        printf "{\"kind\":\"text\",\"origin\":\"bench.json\",\"index\":%d,\"segments\":[{\"trained\":false,\"text\":\"%s\"},{\"trained\":true,\"eos\":true,\"text\":\"%s\"}]}\n", i, prompt, resp
    } }' >"$T/in.jsonl"
"$RECS" load "$T/in.jsonl" >"$T/in.rec" || exit 1

# seconds CMD...: wall time of the command, stdin and stdout as given by the caller.
seconds() {
    s=$(date +%s.%N)
    "$@" || echo "recs-bench: failed: $*" >&2
    e=$(date +%s.%N)
    echo "$s $e" | awk '{ printf "%.3f", $2 - $1 }'
}
mb() { wc -c <"$1" | awk '{ printf "%.1f", $1 / 1e6 }'; }
rate() { awk -v b="$(wc -c <"$1")" -v s="$2" 'BEGIN { printf "%.0f", (s > 0 ? b / 1e6 / s : 0) }'; }

cat "$T/in.rec" >/dev/null  # warm the page cache
t_cat=$(seconds sh -c "cat '$T/in.rec' >/dev/null")
t_check=$(seconds "$RECS" check "$T/in.rec")
t_dump=$(seconds sh -c "'$RECS' dump '$T/in.rec' >'$T/out.jsonl'")
t_load=$(seconds sh -c "'$RECS' load '$T/in.jsonl' >'$T/out.rec'")
cmp -s "$T/out.rec" "$T/in.rec" || echo "recs-bench: round trip differs" >&2
if command -v jq >/dev/null 2>&1; then
    t_jq=$(seconds sh -c "jq -c . '$T/in.jsonl' >/dev/null")
else
    t_jq=
fi

echo "records: $n; stream $(mb "$T/in.rec") MB; JSONL $(mb "$T/in.jsonl") MB"
printf '%-34s %8s %8s\n' "what" "seconds" "MB/s"
printf '%-34s %8s %8s\n' "cat records (I/O floor)" "$t_cat" "$(rate "$T/in.rec" "$t_cat")"
printf '%-34s %8s %8s\n' "recs check (records in)" "$t_check" "$(rate "$T/in.rec" "$t_check")"
printf '%-34s %8s %8s\n' "recs dump (records in)" "$t_dump" "$(rate "$T/in.rec" "$t_dump")"
printf '%-34s %8s %8s\n' "recs load (JSONL in)" "$t_load" "$(rate "$T/in.jsonl" "$t_load")"
if [ -n "$t_jq" ]; then
    printf '%-34s %8s %8s\n' "jq -c . (same JSONL in, peer)" "$t_jq" "$(rate "$T/in.jsonl" "$t_jq")"
    awk -v a="$t_jq" -v b="$t_load" -v c="$t_dump" 'BEGIN {
        printf "recs load is %.1fx jq -c .; recs dump is %.1fx jq -c .\n", (b > 0 ? a / b : 0), (c > 0 ? a / c : 0) }'
else
    echo "jq not installed: no peer for the JSON side"
fi
