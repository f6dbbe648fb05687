#!/bin/sh
# Instructions of one cold pass of the byte-level tokenizer (bytelevel_encode and what it calls)
# over the corpora of tests/bench/tok.sh (Alpaca English, Chinese, both), counted by callgrind:
# unlike times, the counts do not move with the machine's load, so they compare two builds of
# lib/ on a shared machine. Needs valgrind; skips without it or without $TESTDATA.
#   sh tests/bench/tok_instructions.sh     (TOKDRV: a driver built elsewhere, as in tok.sh)
set -eu
TOP=$(cd "$(dirname "$0")/../.." && pwd)
TESTDATA=${TESTDATA:-$TOP/../shared/data}
command -v valgrind >/dev/null || { echo "tok_instructions: valgrind not installed; skipped"; exit 0; }
[ -d "$TESTDATA/alpaca" ] || { echo "tok_instructions: no $TESTDATA/alpaca; skipped"; exit 0; }
cd "$TOP"
if [ -z "${TOKDRV:-}" ]; then
    make -s build/obj/libalp.a >/dev/null
    mkdir -p build/obj/test
    cc -O2 -g -std=gnu11 -Ilib tests/tokenizer/tokdrv.c build/obj/libalp.a \
        -ljansson -larchive -lxxhash -lz -lm -fopenmp -pthread -o build/obj/test/tokdrv
    TOKDRV=build/obj/test/tokdrv
fi
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
TESTDATA=$TESTDATA python3 - "$t" <<'PY'
import json, os, sys
data, out = os.environ["TESTDATA"], sys.argv[1]
corpora = {}
for lang in ("en", "zh"):
    rows = json.load(open(f"{data}/alpaca/alpaca_{lang}_demo.json"))
    corpora[lang] = [r[k] for r in rows for k in ("instruction", "input", "output") if r.get(k)]
corpora["mixed"] = corpora["en"] + corpora["zh"]
for name, texts in corpora.items():
    with open(f"{out}/{name}.jsonl", "w") as f:
        for x in texts:
            f.write(json.dumps({"text": x}) + "\n")
PY
echo "corpus  instructions (millions) in bytelevel_encode, one cold pass, tokenizer.model"
for c in en zh mixed; do
    valgrind --tool=callgrind --toggle-collect=bytelevel_encode --callgrind-out-file="$t/cg.$c" \
        "$TOKDRV" "$TESTDATA/llama3/tokenizer.model" <"$t/$c.jsonl" >/dev/null 2>"$t/log.$c"
    ir=$(callgrind_annotate "$t/cg.$c" 2>/dev/null | sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)
    printf '%-7s %8.1f\n' "$c" "$(echo "${ir:-0}" | awk '{print $1 / 1e6}')"
done
