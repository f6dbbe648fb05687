# Sourced by the shell tests of tests/gpu after `cd` to the repository root: tests/tap.sh's helpers
# with BIN and TESTDATA of the repository (tap.sh's own defaults are relative to tests/), and a
# skip on a machine without an NVIDIA GPU. Sets ROOT.
ROOT=$(pwd)
BIN=${BIN:-$ROOT/bin}
TESTDATA=${TESTDATA:-$ROOT/../shared/data}
. "$ROOT/tests/tap.sh"
nvidia-smi -L >/dev/null 2>&1 || skip_all "no NVIDIA GPU (nvidia-smi -L failed)"
