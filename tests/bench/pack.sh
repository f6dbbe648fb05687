#!/bin/sh
# pack throughput in tokens/s on a large synthetic token stream (target: >= 100 M tokens/s,
# disk-bound). A small C generator (built here from lib/record.c) writes BENCH_TOKENS tokens
# of token records into $TMPDIR; pack reads them into each output form. Every row gives
# tokens/s on wall-clock time and on CPU time (user + system, all threads): the machine may
# be shared, and then CPU time is the steadier guide. The floors are what the disk and a
# pipe cost with no packing at all: cat of the input (read), cat of it through a pipe, and
# cat of pack's own output set into a file with fsync (write). pack is disk-bound when its
# wall time comes near read + write floor. Writing a directory fsyncs every shard, so its
# wall time includes the disk's; the tar stream to /dev/null shows pack's own speed.
set -u
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
BIN=${BIN:-$top/bin}
tokens=${BENCH_TOKENS:-100000000}
seq_len=${BENCH_SEQ_LEN:-2048}
work=$(mktemp -d "${TMPDIR:-/tmp}/packbench.XXXXXX")
trap 'rm -rf "$work"' EXIT
case $BIN in *" "*) echo "bench: BIN must not contain spaces: $BIN" >&2; exit 1 ;; esac
[ -x "$BIN/pack" ] || { echo "pack: $BIN/pack not built" >&2; exit 1; }

cat >"$work/gen.c" <<'EOF'
// Token records: documents of 20..1500 tokens, a prompt then a response, ids < 32000.
#include <stdlib.h>
#include "record.h"
int main(int argc, char **argv)
{
    unsigned long long want = strtoull(argv[1], NULL, 10), made = 0, s = 1;
    static uint32_t ids[1500];
    for (unsigned long long d = 1; made < want; d++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        size_t n = 20 + (s >> 33) % 1481, p = (s >> 20) % n;
        for (size_t i = 0; i < n; i++)
            ids[i] = (uint32_t)((s >> 11) + i * 2654435761u) % 32000;
        RecSegment seg[2] = {{0, p, NULL, ids}, {REC_TRAINED, n - p, NULL, ids + p}};
        Record rec = {REC_TOKENS, d, 0xab, "bench", 5, 2, seg};
        if (rec_write(stdout, &rec, NULL) < 0)
            return 1;
        made += n;
    }
    (void)argc;
    return fflush(stdout) != 0;
}
EOF
cc -O2 -I"$top/lib" -o "$work/gen" "$work/gen.c" "$top/lib/record.c" -ljansson -lxxhash || exit 1
"$work/gen" "$tokens" >"$work/in.rec" || exit 1
n=$(stat -c %s "$work/in.rec")

# rate NAME CMD...: run once; a table row of wall-clock and CPU (user + system, all threads)
# time, the rates they give over the input's tokens, and the peak resident memory of the
# largest process. The machine may be shared: CPU time is the steadier.
rate() {
    name=$1; shift
    if ! /usr/bin/time -f "%e %U %S %M" -o "$work/time" "$@"; then echo "bench: $name failed" >&2; return 1; fi
    read -r wall user sys rss <"$work/time"
    awk -v n="$name" -v t="$tokens" -v w="$wall" -v u="$user" -v s="$sys" -v m="$rss" 'BEGIN {
        w = w < 0.01 ? 0.01 : w; c = u + s < 0.01 ? 0.01 : u + s
        printf "%-34s %7.2f %9.1f %7.2f %9.1f %7d\n", n, w, t / w / 1e6, c, t / c / 1e6, m / 1024 }'
}
[ -x /usr/bin/time ] || { echo "bench: /usr/bin/time (GNU time) is needed" >&2; exit 1; }
pack="$BIN/pack -q -s $seq_len -V 32000"   # split into words on purpose: no spaces in these
echo "input: $tokens tokens, $((n / 1000000)) MB of token records, seq_len $seq_len, $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"
printf '%-34s %7s %9s %7s %9s %7s\n' "run" "wall s" "M tok/s" "cpu s" "M tok/s" "RSS MB"
rate "floor: cat input (read)" sh -c "cat '$work/in.rec' >/dev/null"
rate "floor: cat input | cat" sh -c "cat '$work/in.rec' | cat >/dev/null"
rate "pack best-fit -> tar stdout" sh -c "$pack -o - '$work/in.rec' >/dev/null"
rate "cat | pack best-fit -> tar (+cat)" sh -c "cat '$work/in.rec' | $pack -o - >/dev/null"
rate "pack best-fit -> dir" $pack -o "$work/bf" "$work/in.rec"
out=$(du -sm "$work/bf" | cut -f1)
rate "floor: cat set > file, fsync" sh -c "cat '$work/bf'/shard-*.bin >'$work/copy' && sync '$work/copy'"
rm -rf "$work/bf" "$work/copy"
rate "pack first-fit -> dir" $pack -f -o "$work/ff" "$work/in.rec"
rm -rf "$work/ff"
rate "pack pad -> dir" $pack -p -o "$work/pad" "$work/in.rec"
rm -rf "$work/pad"
echo "output: $out MB of shards (best-fit)"
"$BIN/pack" -s "$seq_len" -V 32000 -o "$work/bf" "$work/in.rec" 2>&1 | sed -n 's/^pack: \([0-9]* rows.*\)/stats: \1/p'
