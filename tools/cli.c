#include "cli.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

const char *prog = "?";

void cli_init(const char *name)
{
    const char *slash = strrchr(name, '/');
    prog = slash ? slash + 1 : name;
    signal(SIGPIPE, SIG_DFL);
}

static void vmessage(const char *lead, const char *fmt, va_list ap)
{
    fprintf(stderr, "%s: %s", prog, lead);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

void cli_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vmessage("", fmt, ap);
    va_end(ap);
}

void cli_hint(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vmessage("hint: ", fmt, ap);
    va_end(ap);
}

void cli_die(int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vmessage("", fmt, ap);
    va_end(ap);
    exit(status);
}

void cli_help(const char *usage)
{
    fputs(usage, stdout);
    exit(cli_finish_stdout(EXIT_OK));
}

void cli_usage_error(const char *usage, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vmessage("", fmt, ap);
    va_end(ap);
    fputs(usage, stderr);
    exit(EXIT_USAGE);
}

long cli_parse_long(const char *usage, const char *opt, const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < lo || v > hi)
        cli_usage_error(usage, "%s: '%s' is not a whole number from %ld to %ld", opt, s, lo, hi);
    return v;
}

double cli_parse_double(const char *usage, const char *opt, const char *s, double lo, double hi, int hi_open)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !isfinite(v) || v < lo || v > hi || (hi_open && v == hi))
        cli_usage_error(usage, "%s: '%s' is not a number in [%g, %g%s", opt, s, lo, hi, hi_open ? ")" : "]");
    return v;
}

int cli_refuse_tty(const char *hint)
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

int cli_finish_stdout(int status)
{
    if (fflush(stdout) != 0 || ferror(stdout)) {
        if (errno == EPIPE)
            return status;
        cli_error("write error on standard output: %s", strerror(errno));
        return EXIT_DATA;
    }
    return status;
}
