# TAP helpers for shell tests. Source it: . "$(dirname "$0")/tap.sh"
# Provides: plan N | plan_auto; ok COND NAME; is GOT WANT NAME; run_case; skip_all; done_testing.
# Environment: BIN (the tools under test, default ./bin), TESTDATA (shared real inputs).
set -u
TOP=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$TOP/bin}
TESTDATA=${TESTDATA:-$TOP/../shared/data}
T=$(mktemp -d "${TMPDIR:-/tmp}/alptest.XXXXXX")
trap 'rm -rf "$T"' EXIT
_n=0
_failed=0

plan() { echo "1..$1"; }
skip_all() { echo "1..0 # SKIP $*"; exit 0; }
# have_testdata PATH: true when the shared file exists; otherwise says so once.
have_testdata() {
    [ -e "$TESTDATA/$1" ] && return 0
    echo "# shared test data not found: $TESTDATA/$1 (set TESTDATA)" >&2
    return 1
}
pass() { _n=$((_n + 1)); echo "ok $_n - $1"; }
fail() { _n=$((_n + 1)); _failed=$((_failed + 1)); echo "not ok $_n - $1"; }
skip() { _n=$((_n + 1)); echo "ok $_n # SKIP $1"; }
diag() { printf '%s\n' "$@" | sed 's/^/# /'; }
# ok: run a command; pass when it exits 0.
ok() { _name=$1; shift; if "$@"; then pass "$_name"; else fail "$_name"; fi; }
# is GOT WANT NAME: string equality, diff shown on failure.
is() {
    if [ "$1" = "$2" ]; then pass "$3"; else
        fail "$3"; diag "got:  $(printf '%s' "$1" | head -c 400)" "want: $(printf '%s' "$2" | head -c 400)"; fi
}
# run_case NAME STATUS STDERR_PATTERN -- CMD...: the command (stdin from $INPUT if set)
# exits with STATUS and its stderr matches the extended regex STDERR_PATTERN ("" = any).
run_case() {
    _name=$1 _want=$2 _pat=$3; shift 4
    if [ -n "${INPUT:-}" ]; then "$@" <"$INPUT" >"$T/out" 2>"$T/err"; else "$@" </dev/null >"$T/out" 2>"$T/err"; fi
    _st=$?
    if [ "$_st" -ne "$_want" ]; then fail "$_name (exit $_st, want $_want)"; diag "$(head -c 600 "$T/err")"; return; fi
    if [ -n "$_pat" ] && ! grep -Eq -- "$_pat" "$T/err"; then
        fail "$_name (stderr does not match /$_pat/)"; diag "$(head -c 600 "$T/err")"; return; fi
    pass "$_name"
}
done_testing() { echo "1..$_n"; [ "$_failed" -eq 0 ]; exit $?; }
