#!/bin/sh
# Every tool: --help on stdout with exit 0, usage errors exit 2 with "prog: ..." on stderr,
# a man page, and the same long options in --help and in the man page.
. "$(dirname "$0")/tap.sh"
tools=$(cd "$TOP/tools" && ls *.c | sed 's/\.c$//' | grep -v '^cli$')
[ -n "$tools" ] || skip_all "no tools"
for t in $tools; do
    if [ ! -x "$BIN/$t" ]; then skip "$t not built"; continue; fi
    "$BIN/$t" --help >"$T/help" 2>"$T/err"; st=$?
    is "$st" 0 "$t --help exits 0"
    ok "$t --help writes usage to stdout only" test -s "$T/help" -a ! -s "$T/err"
    run_case "$t rejects an unknown option with exit 2" 2 "^$t: " -- "$BIN/$t" --no-such-option
    man=$(ls "$TOP/man/$t".1 2>/dev/null)
    if [ -z "$man" ]; then fail "$t has a man page in section 1"; continue; fi
    pass "$t has a man page"
    MANWIDTH=200 mandoc -Tutf8 "$man" 2>/dev/null | col -b >"$T/man"
    grep -o -- '--[a-z][a-z0-9-]*' "$T/help" | sort -u >"$T/hopts"
    grep -o -- '--[a-z][a-z0-9-]*' "$T/man" | sort -u >"$T/mopts"
    # SYNOPSIS: from its heading to the next section heading (a line starting with a capital).
    sed -n '/^SYNOPSIS/,/^[A-Z]/p' "$T/man" | sed '1d;$d' | grep -o -- '--[a-z][a-z0-9-]*' | sort -u >"$T/sopts"
    missing=$(comm -23 "$T/hopts" "$T/mopts" | tr '\n' ' ')
    is "$missing" "" "$t: every option of --help is in the man page"
    extra=$(comm -13 "$T/hopts" "$T/sopts" | tr '\n' ' ')
    is "$extra" "" "$t: every option of the SYNOPSIS is in --help"
done
done_testing
