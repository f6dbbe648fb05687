// defines: a minimal TAP producer for C unit tests (prove runs the binaries)
#ifndef TAP_H
#define TAP_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int tap_n, tap_failed;

#define ok(cond, ...) tap_ok(!!(cond), __FILE__, __LINE__, __VA_ARGS__)
#define is_int(got, want, ...) tap_is_int((long long)(got), (long long)(want), __FILE__, __LINE__, __VA_ARGS__)
#define is_str(got, want, ...) tap_is_str((got), (want), __FILE__, __LINE__, __VA_ARGS__)

static int tap_ok(int pass, const char *file, int line, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int tap_ok(int pass, const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    printf("%s %d - ", pass ? "ok" : "not ok", ++tap_n);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    if (!pass) {
        tap_failed++;
        printf("#   failed at %s:%d\n", file, line);
    }
    return pass;
}

#define tap_is_int(g, w, f, l, ...) \
    (tap_ok((g) == (w), f, l, __VA_ARGS__) ? 1 : (printf("#   got %lld, want %lld\n", (g), (w)), 0))
#define tap_is_str(g, w, f, l, ...) \
    (tap_ok(strcmp((g), (w)) == 0, f, l, __VA_ARGS__) ? 1 : (printf("#   got  '%s'\n#   want '%s'\n", (g), (w)), 0))

static inline const char *tap_testdata(void)
{
    const char *d = getenv("TESTDATA");
    return d ? d : "../shared/data";
}

static inline int done_testing(void)
{
    printf("1..%d\n", tap_n);
    return tap_failed != 0;
}

#endif
