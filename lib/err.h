// defines: Err, err_set
// The library never prints or exits: a failing call fills an Err and returns -1
// (or NULL). Tools print err.msg behind their own name.
#ifndef ERR_H
#define ERR_H

#include <stdarg.h>
#include <stdio.h>

typedef struct {
    char msg[1024];
} Err;

// err_set formats the message and returns -1, so that `return err_set(e, ...)` reads well.
// A NULL Err is allowed (the caller does not want the message).
static inline int err_set(Err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static inline int err_set(Err *e, const char *fmt, ...)
{
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}

#endif
