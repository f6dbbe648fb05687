// defines: AtomicFile, atomic_open, atomic_commit, atomic_abort
// An output file that either appears whole under its name or not at all: written to a
// temporary name in the same directory, flushed, fsynced, then renamed into place.
#ifndef ATOMIC_H
#define ATOMIC_H

#include <stdio.h>

#include "err.h"

typedef struct {
    FILE *f;           // write here
    char *path;        // final name
    char *tmp;         // temporary name beside it
} AtomicFile;

int atomic_open(AtomicFile *a, const char *path, Err *err);
// Flush, check for write errors (disk full), fsync, rename, fsync the directory.
int atomic_commit(AtomicFile *a, Err *err);
// Close and remove the temporary file; safe to call after a failed commit.
void atomic_abort(AtomicFile *a);

#endif
