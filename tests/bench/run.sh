#!/bin/sh
# make bench: run every benchmark script beside this one. Each measures a tool against a
# peer in the same run (jq, tiktoken, Hugging Face tokenizers, ...) and prints a table of
# rates and ratios; a peer that is not installed is reported as such, not guessed.
set -u
here=$(cd "$(dirname "$0")" && pwd)
status=0
for b in "$here"/*.sh; do
    [ "$(basename "$b")" = run.sh ] && continue
    echo "== $(basename "$b" .sh)"
    sh "$b" || { echo "bench: $(basename "$b") failed" >&2; status=1; }
    echo
done
exit $status
