// defines: Input, input_open, input_next, input_name, input_member, input_read, input_is_archive,
//          input_wanted_member, input_close
// Opening inputs the way every tool reads them: a file or stdin ("-" or NULL), plain or
// compressed (gzip, bzip2, xz, lzma, zstd, lz4; detected from the bytes, not the name), or the
// regular-file members of a tar or zip archive (itself possibly compressed), all through
// libarchive. A path "archive.tar:member" that does not exist as a file selects that one member.
//
// Usage: input_open, then while (input_next(...) == 1) { input_read(...) until 0 }, input_close.
// A plain or compressed file is one stream; an archive yields one stream per regular member.
#ifndef INPUT_H
#define INPUT_H

#include <stddef.h>
#include <sys/types.h>

#include "err.h"

typedef struct Input Input;

// Opens and detects the format (reads ahead a little). NULL with a message on failure.
Input *input_open(const char *path, Err *err);
// Steps to the next stream: 1 when there is one, 0 when all are done, -1 on error.
int input_next(Input *in, Err *err);
// The current stream's name for messages and record origins: the path as given ("<stdin>"
// for stdin), or "archive.tar:member/name.json" for an archive member.
const char *input_name(const Input *in);
// The current member's name inside the archive (NULL for a plain or compressed file).
const char *input_member(const Input *in);
// Reads up to cap bytes of the current stream: the count, 0 at its end, -1 on error.
ssize_t input_read(Input *in, void *buf, size_t cap, Err *err);
// 1 when the input is a tar or zip archive (known after the first input_next).
int input_is_archive(const Input *in);
// The member asked for with "archive:member", or NULL when all are read.
const char *input_wanted_member(const Input *in);
void input_close(Input *in);

#endif
