// defines: the command-line conventions every tool shares (header only: each tool is one file)
// Messages read "prog: what went wrong" on stderr; exit 0 success, 1 runtime or data error,
// 2 usage error. stdout carries data only.
#ifndef CLI_H
#define CLI_H

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { EXIT_OK = 0, EXIT_DATA = 1, EXIT_USAGE = 2 };

// The program name in messages, set by cli_init.
static const char *prog = "?";

// What each function does:
//   cli_init          set the program name, restore the default SIGPIPE action (a reader that
//                     went away, as in `| head`, ends us quietly)
//   cli_error/hint    "prog: msg" / "prog: hint: msg" on stderr
//   cli_die           cli_error, then exit with the status
//   cli_help          --help: usage text on stdout, exit 0 (usage text is data, shared with errors)
//   cli_usage_error   "prog: msg" and the usage text on stderr, exit 2
//   cli_parse_long/double  option values: a whole number in [lo, hi] or a finite number in
//                     [lo, hi] (hi_open: below hi); anything else is a usage error naming the option
//   cli_parse_size    a positive byte count: a number (a fraction too) with an optional suffix
//                     k, M, G or T (powers of 1024): 64M, 22.4G; else a usage error naming the option
//   cli_refuse_tty    binary output to a terminal is refused with a hint; 0 when stdout is fine
//   cli_open_in       "-" or NULL is stdin; on failure prints the error and returns NULL
//   cli_finish_stdout flush stdout, check for a write error; returns the exit status to use
// Header-only: every function is static (each tool is a single file), CLI_FN keeps unused ones quiet.
#define CLI_FN __attribute__((unused)) static
#define CLI_PRINTF(f, a) __attribute__((format(printf, f, a)))
CLI_FN void cli_error(const char *fmt, ...) CLI_PRINTF(1, 2);
CLI_FN void cli_hint(const char *fmt, ...) CLI_PRINTF(1, 2);
CLI_FN _Noreturn void cli_die(int status, const char *fmt, ...) CLI_PRINTF(2, 3);
CLI_FN _Noreturn void cli_usage_error(const char *usage, const char *fmt, ...) CLI_PRINTF(2, 3);
CLI_FN int cli_finish_stdout(int status);
CLI_FN void cli_init(const char *name)
{
    const char *slash = strrchr(name, '/');
    prog = slash ? slash + 1 : name;
    signal(SIGPIPE, SIG_DFL);
}

CLI_FN void vmessage(const char *lead, const char *fmt, va_list ap)
{
    fprintf(stderr, "%s: %s", prog, lead);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

CLI_FN void cli_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vmessage("", fmt, ap);
    va_end(ap);
}

CLI_FN void cli_hint(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vmessage("hint: ", fmt, ap);
    va_end(ap);
}

CLI_FN _Noreturn void cli_die(int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vmessage("", fmt, ap);
    va_end(ap);
    exit(status);
}

CLI_FN _Noreturn void cli_help(const char *usage)
{
    fputs(usage, stdout);
    exit(cli_finish_stdout(EXIT_OK));
}

CLI_FN _Noreturn void cli_usage_error(const char *usage, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vmessage("", fmt, ap);
    va_end(ap);
    fputs(usage, stderr);
    exit(EXIT_USAGE);
}

CLI_FN long cli_parse_long(const char *usage, const char *opt, const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < lo || v > hi)
        cli_usage_error(usage, "%s: '%s' is not a whole number from %ld to %ld", opt, s, lo, hi);
    return v;
}

CLI_FN double cli_parse_double(const char *usage, const char *opt, const char *s, double lo, double hi, int hi_open)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !isfinite(v) || v < lo || v > hi || (hi_open && v == hi))
        cli_usage_error(usage, "%s: '%s' is not a number in [%g, %g%s", opt, s, lo, hi, hi_open ? ")" : "]");
    return v;
}

CLI_FN unsigned long long cli_parse_size(const char *usage, const char *opt, const char *s)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    int shift = 0;
    switch (*end) {
    case 'k': case 'K': shift = 10; break;
    case 'm': case 'M': shift = 20; break;
    case 'g': case 'G': shift = 30; break;
    case 't': case 'T': shift = 40; break;
    }
    if (shift)
        end++;
    v = round(ldexp(v, shift));
    if (errno || end == s || *end || !(s[0] >= '0' && s[0] <= '9') || !(v >= 1) || v > 1.8e19)
        cli_usage_error(usage, "%s: want a positive size like 64M or 22.4G: '%s'", opt, s);
    return (unsigned long long)v;
}

CLI_FN int cli_refuse_tty(const char *hint)
{
    if (!isatty(STDOUT_FILENO))
        return 0;
    cli_error("refusing to write binary records to a terminal");
    if (hint)
        cli_hint("%s", hint);
    return -1;
}

FILE *cli_open_in(const char *path)
{
    if (!path || strcmp(path, "-") == 0)
        return stdin;
    FILE *f = fopen(path, "rb");
    if (!f)
        cli_error("%s: %s", path, strerror(errno));
    return f;
}

CLI_FN int cli_finish_stdout(int status)
{
    if (fflush(stdout) != 0 || ferror(stdout)) {
        if (errno == EPIPE)
            return status;
        cli_error("write error on standard output: %s", strerror(errno));
        return EXIT_DATA;
    }
    return status;
}

#endif
