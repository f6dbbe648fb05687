#!/bin/sh
# Tokenizer throughput, single thread, side by side in one run on the same corpus: ours
# (lib/tokenizer.c through tests/tokenizer/tokdrv.c, from tokenizer.model and tokenizer.json),
# tiktoken encode_ordinary and Hugging Face tokenizers encode (RAYON_NUM_THREADS=1), Llama 3.
# Corpora: every instruction/input/output text of $TESTDATA/alpaca/alpaca_en_demo.json (English),
# of alpaca_zh_demo.json (Chinese), and both (mixed). Rounds alternate the encoders; the table
# shows the median MB/s of ROUNDS rounds (default 5) and our ratio to each peer. Rates are bytes
# per second of CPU time of the encoding process (ours: CLOCK_PROCESS_CPUTIME_ID in tokdrv;
# the peers: time.process_time), not wall time: on a shared machine wall time measures the
# neighbours too.
# Ours is measured after one untimed pass over the corpus (steady state: per-thread caches
# warm, as over any real data set); the peers have no such caches. The "cold" column is that
# first pass alone (empty caches), the lower bound for a corpus seen once.
# Also: load time of each tokenizer file (CPU on one thread; wall on all), and a 1 MB run of one
# character (linear time).
set -eu
TOP=$(cd "$(dirname "$0")/../.." && pwd)
TESTDATA=${TESTDATA:-$TOP/../shared/data}
ROUNDS=${ROUNDS:-5}
if [ ! -e "$TESTDATA/llama3/tokenizer.model" ] || [ ! -d "$TESTDATA/alpaca" ]; then
    echo "tok bench: shared test data not found in $TESTDATA (set TESTDATA); skipped"
    exit 0
fi
cd "$TOP"
# TOKDRV: a driver built elsewhere (e.g. static, for a machine without the -dev packages).
if [ -z "${TOKDRV:-}" ]; then
    make -s build/obj/libalp.a >/dev/null
    mkdir -p build/obj/test
    cc -O2 -std=gnu11 -Ilib tests/tokenizer/tokdrv.c build/obj/libalp.a \
        -ljansson -larchive -lxxhash -lz -lm -fopenmp -pthread -o build/obj/test/tokdrv
    TOKDRV=build/obj/test/tokdrv
fi
export TESTDATA ROUNDS TOKDRV RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY'
import json, os, statistics, subprocess, tempfile, time
data, rounds = os.environ["TESTDATA"], int(os.environ["ROUNDS"])
drv = os.environ["TOKDRV"]
model, tjson = f"{data}/llama3/tokenizer.model", f"{data}/llama3"
try:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
except ImportError:
    tiktoken = None
try:
    from tokenizers import Tokenizer
except ImportError:
    Tokenizer = None
corpora = {}
for lang in ("en", "zh"):
    rows = json.load(open(f"{data}/alpaca/alpaca_{lang}_demo.json"))
    corpora[lang] = [r[k] for r in rows for k in ("instruction", "input", "output") if r.get(k)]
corpora["mixed"] = corpora["en"] + corpora["zh"]
tmp = tempfile.mkdtemp()

def ours(tok, path, cold=False):
    out = subprocess.run([drv, tok, "-b", path, "-r", "3"], capture_output=True, text=True, check=True).stdout
    return float(out.split()[3 if cold else 0])

def rate(fn, texts):
    n = sum(len(t.encode()) for t in texts)
    t0 = time.process_time()
    for t in texts:
        fn(t)
    return n / (time.process_time() - t0) / 1e6

tt = hf = None
peer_load = {}
if tiktoken:
    pat = json.load(open(f"{data}/llama3/tokenizer.json"))["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    t0 = time.process_time()
    tt = tiktoken.Encoding("llama3", pat_str=pat, mergeable_ranks=load_tiktoken_bpe(model), special_tokens={})
    peer_load["tiktoken (tokenizer.model)"] = (time.process_time() - t0) * 1e3
if Tokenizer:
    t0 = time.process_time()
    hf = Tokenizer.from_file(f"{data}/llama3/tokenizer.json")
    peer_load["tokenizers (tokenizer.json)"] = (time.process_time() - t0) * 1e3
print(f"{'corpus':8} {'MB':>5} {'ours(model)':>11} {'ours(json)':>10} {'cold':>6} {'tiktoken':>9} {'hf':>7}  {'vs tiktoken':>11} {'cold vs tt':>10} {'vs hf':>7}"
      f"   MB/s of CPU time, median of {rounds}")
for name, texts in corpora.items():
    path = os.path.join(tmp, name + ".jsonl")
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    runs = {"model": [], "json": [], "cold": [], "tiktoken": [], "hf": []}
    for _ in range(rounds):
        runs["model"].append(ours(model, path))
        runs["cold"].append(ours(model, path, cold=True))
        runs["json"].append(ours(tjson, path))
        if tt:
            runs["tiktoken"].append(rate(tt.encode_ordinary, texts))
        if hf:
            runs["hf"].append(rate(lambda t: hf.encode(t, add_special_tokens=False), texts))
    med = {k: statistics.median(v) if v else float("nan") for k, v in runs.items()}
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"{name:8} {mb:5.2f} {med['model']:11.1f} {med['json']:10.1f} {med['cold']:6.1f} {med['tiktoken']:9.1f} {med['hf']:7.1f}"
          f"  {med['model'] / med['tiktoken']:10.1f}x {med['cold'] / med['tiktoken']:9.1f}x {med['model'] / med['hf']:6.1f}x")
# Load: CPU time on one thread (OMP_NUM_THREADS=1; with more threads the CPU time adds theirs up),
# and the wall time of the whole tokdrv -l process on all threads (the load uses them).
one_thread = dict(os.environ, OMP_NUM_THREADS="1")
for tok in (model, f"{data}/llama3/tokenizer.json"):
    ms = statistics.median([float(subprocess.run([drv, tok, "-l"], capture_output=True, text=True, check=True,
                                                 env=one_thread).stdout) for _ in range(5)])
    walls = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run([drv, tok, "-l"], capture_output=True, check=True)
        walls.append((time.perf_counter() - t0) * 1e3)
    print(f"load {os.path.basename(tok)}: {ms:.0f} ms of CPU on one thread, {statistics.median(walls):.0f} ms wall "
          f"on {os.cpu_count()} threads (whole process; medians of 5)")
for name, ms in peer_load.items():
    print(f"load {name}: {ms:.0f} ms of CPU (once)")
for ch in ("a", " ", "1", "\n", "日"):
    path = os.path.join(tmp, "run.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"text": ch * (1000000 // len(ch.encode()))}) + "\n")
    mbs = ours(model, path)
    print(f"1 MB of {ch!r}: ours {1 / mbs * 1e3:.0f} ms", end="")
    if tt and ch != " " and ch != "a":
        print(f", tiktoken {1 / rate(tt.encode_ordinary, [ch * (1000000 // len(ch.encode()))]) * 1e3:.0f} ms", end="")
    print()
PY
# Threads: the tok tool end to end (records in, records out, to a file) on the shared Alpaca data
# (16 copies, ~56 MB), -j 1, 2, 4, 8 ... up to the number of cores; wall time, median of
# TROUNDS runs (default 3). "load" is tok on an empty stream (starting, loading the tokenizer:
# serial); "stream" is the rest, the part the threads share. The output bytes must not
# depend on -j.
BIN=${BIN:-$TOP/bin}
if [ -x "$BIN/tok" ] && [ -x "$BIN/alp-fmt" ]; then
    t=$(mktemp -d)
    for f in alpaca_en_demo alpaca_zh_demo gpteacher-toolformer-similarity-0.6; do
        "$BIN/alp-fmt" "$TESTDATA/alpaca/$f.json"
    done >"$t/one.rec" 2>/dev/null
    # 16 copies, ~56 MB: enough work that the threads, not loading the tokenizer, set the time
    for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do cat "$t/one.rec"; done >"$t/in.rec"
    : >"$t/empty.rec"
    n=$(nproc)
    jobs=1
    for j in 2 4 8 16 32 64 128; do
        if [ "$j" -lt "$n" ]; then jobs="$jobs $j"; fi
    done
    if [ "$n" -gt 1 ]; then jobs="$jobs $n"; fi
    echo "threads: $n cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    # wall OUT CMD...: runs CMD with stdout to OUT; prints its wall seconds (by date(1))
    wall() { o=$1; shift; s0=$(date +%s.%N); "$@" >"$o"; s1=$(date +%s.%N); echo "$s0 $s1" | awk '{ printf "%.4f\n", $2 - $1 }'; }
    median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
    for r in $(seq "${TROUNDS:-3}"); do
        wall /dev/null "$BIN/tok" -q -j 1 -m "$TESTDATA/llama3/tokenizer.model" "$t/empty.rec" >"$t/load.$r"
    done
    load=$(cat "$t"/load.* | median)
    for j in $jobs; do
        for r in $(seq "${TROUNDS:-3}"); do
            wall "$t/out$j.rec" "$BIN/tok" -q -j "$j" -m "$TESTDATA/llama3/tokenizer.model" "$t/in.rec"
        done | median | awk -v j="$j" '{ print j, $1 }'
        cmp -s "$t/out1.rec" "$t/out$j.rec" || echo "$j" >>"$t/differs"
        if [ "$j" != 1 ]; then rm -f "$t/out$j.rec"; fi
    done | awk -v mb="$(wc -c <"$t/in.rec")" -v load="$load" '
        { j[NR] = $1; s[NR] = $2 }
        END {
            printf "load (tok on no records): %.3f s\n", load
            printf "%-9s %8s %11s %8s %14s\n", "", "wall s", "MB/s", "speedup", "stream speedup"
            for (i = 1; i <= NR; i++)
                if (s[i] - load > 0.001)
                    printf "tok -j %-3s %7.3f %11.1f %7.2fx %13.2fx\n", j[i], s[i], mb / 1e6 / s[i], s[1] / s[i],
                        (s[1] - load) / (s[i] - load)
                else
                    printf "tok -j %-3s %7.3f %11.1f %7.2fx %14s\n", j[i], s[i], mb / 1e6 / s[i], s[1] / s[i], "-"
        }'
    echo "(MB/s: of input records, wall time, median of ${TROUNDS:-3}; stream speedup: with the load taken off)"
    if [ -e "$t/differs" ]; then
        echo "tok bench: OUTPUT DIFFERS between -j 1 and -j $(cat "$t/differs" | tr '\n' ' ')"
    else
        echo "output identical for -j $jobs"
    fi
    rm -rf "$t"
fi
