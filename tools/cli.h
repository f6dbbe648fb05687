// defines: the command-line conventions every tool shares
// Messages read "prog: what went wrong" on stderr; exit 0 success, 1 runtime or
// data error, 2 usage error. stdout carries data only.
#ifndef CLI_H
#define CLI_H

#include <stdio.h>

enum { EXIT_OK = 0, EXIT_DATA = 1, EXIT_USAGE = 2 };

extern const char *prog;

// Set the program name, restore the default SIGPIPE action (a reader that went
// away, as in `| head`, ends us quietly).
void cli_init(const char *name);
void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void cli_hint(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
_Noreturn void cli_die(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
// Usage text is data: --help prints it to stdout and exits 0; a usage error prints
// "prog: message" and the text to stderr and exits 2.
_Noreturn void cli_help(const char *usage);
_Noreturn void cli_usage_error(const char *usage, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
// Binary output to a terminal is refused with a hint; returns 0 when stdout is fine.
int cli_refuse_tty(const char *hint);
// "-" or NULL is stdin. On failure prints the error and returns NULL.
FILE *cli_open_in(const char *path);
// Option values: a whole number in [lo, hi], or a finite number in [lo, hi] (hi_open: below
// hi); anything else is a usage error naming the option ("--rank: '4x' is not ...").
long cli_parse_long(const char *usage, const char *opt, const char *s, long lo, long hi);
double cli_parse_double(const char *usage, const char *opt, const char *s, double lo, double hi, int hi_open);
// Flush stdout and check for a write error; returns the exit status to use.
int cli_finish_stdout(int status);

#endif
