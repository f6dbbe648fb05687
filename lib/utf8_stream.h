// defines: Utf8Stream, utf8_stream_feed, utf8_stream_finish, utf8_sequence, utf8_valid
// Text that arrives in pieces (one token at a time, where a byte-fallback token carries one byte
// of a multi-byte character) made safe to print after every piece: each output is valid UTF-8.
// An incomplete sequence at the end of a piece is held back until the bytes that complete it
// arrive; a byte that can never be part of a valid sequence becomes U+FFFD (EF BF BD), as the
// Hugging Face ByteFallback decoder does; at the end, held-back bytes each become U+FFFD.
#ifndef UTF8_STREAM_H
#define UTF8_STREAM_H

#include <stddef.h>

typedef struct {
    unsigned char held[4];   // an incomplete sequence waiting for its continuation bytes
    size_t nheld;
} Utf8Stream;

// Append the printable part of held + in[0..n) to out (room for 3 * (n + 4) bytes is enough);
// returns the number of bytes written.
size_t utf8_stream_feed(Utf8Stream *s, const char *in, size_t n, char *out);
// Flush what is still held (as U+FFFD per byte); returns the number of bytes written (<= 12).
size_t utf8_stream_finish(Utf8Stream *s, char *out);

// Length of the sequence starting at s[0..n): 1..4 when complete and valid, 0 when s is a valid
// but incomplete prefix, -1 when invalid (overlong, surrogate, above U+10FFFF, bad byte).
int utf8_sequence(const unsigned char *s, size_t n);
// 1 when s[0..n) is entirely valid UTF-8, else 0.
int utf8_valid(const char *s, size_t n);

#endif
