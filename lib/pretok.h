// defines: pretok_next, PRETOK_LLAMA3_PATTERN
// The Llama 3 pre-tokenizer (tiktoken cl100k-style split) as a hand-written scanner. It matches
// exactly what the references' regex engines match for
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//   \s*[\r\n]+|\s+(?!\S)|\s+
// with leftmost-first alternation. The regex matches at every position, so the pieces tile the
// text. Time is linear in the piece length (no backtracking beyond one code point).
#ifndef PRETOK_H
#define PRETOK_H

#include <stddef.h>

#define PRETOK_LLAMA3_PATTERN \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|" \
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

// Length in bytes of the piece that starts at text. text holds len > 0 bytes of valid UTF-8.
size_t pretok_next(const char *text, size_t len);

#endif
