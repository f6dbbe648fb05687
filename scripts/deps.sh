#!/bin/sh
# Install the Debian packages the build and tests need; does nothing when all are present.
#   libjansson-dev   JSON (alp-fmt input, tokenizer.json, config.json, recs dump)
#   libarchive-dev   compressed and archived input, tar/zip shard sets
#   libxxhash-dev    record and shard checksums, tokenizer fingerprints
#   zlib1g-dev       zlib (gzip)
#   jq               pipelines and tests read JSONL with it
#   mandoc           man page lint (mandoc -Tlint)
#   zstd xz-utils bzip2 zip  compressors and archivers used by the tests of compressed input
#   bsdextrautils    col(1), used to read rendered man pages in tests
# and the Python module xxhash (pip), for the Python writer example of recs(5) that a test runs
set -e
pkgs="libjansson-dev libarchive-dev libxxhash-dev zlib1g-dev jq mandoc zstd xz-utils bzip2 zip bsdextrautils make gcc"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "deps: installing:$missing" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
else
    echo "deps: all present" >&2
fi
# The recs(5) Python example needs the xxhash module.
if command -v python3 >/dev/null && ! python3 -c 'import xxhash' 2>/dev/null; then
    python3 -m pip install -q xxhash 2>/dev/null || echo "deps: python3 xxhash module not installed (the recs(5) Python test will skip)" >&2
fi
