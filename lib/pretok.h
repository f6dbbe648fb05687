// defines: pretok_next, pretok_next_slow, pretok_letters_from, pretok_letter_step, pretok_prefix_byte, PRETOK_LLAMA3_PATTERN
// The Llama 3 pre-tokenizer (tiktoken cl100k-style split) as a hand-written scanner. It matches
// exactly what the references' regex engines match for
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//   \s*[\r\n]+|\s+(?!\S)|\s+
// with leftmost-first alternation. The regex matches at every position, so the pieces tile the
// text. Time is linear in the piece length (no backtracking beyond one code point).
// pretok_next is inline: its fast path (a word, or one ASCII byte then a word, whose letters are
// ASCII or CJK/Hangul, scanned by a byte table without decoding) is most pieces of English and
// Chinese text and runs in the caller's loop; everything else is pretok_next_slow, out of line.
#ifndef PRETOK_H
#define PRETOK_H

#include <stddef.h>
#include <stdint.h>

#define PRETOK_LLAMA3_PATTERN \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|" \
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

// Per lead byte: 1 for an ASCII letter, 3 for a lead byte whose every 3-byte code point is a
// letter (utf8_lead_all_letters), else 0 (not a letter, or one to decode and look up).
extern const uint8_t pretok_letter_step[256];
// Per byte: 1 for an ASCII byte that may be the optional first code point of [^\r\n\p{L}\p{N}]?\p{L}+
// and cannot start a contraction (not a letter, digit, \r, \n or ').
extern const uint8_t pretok_prefix_byte[256];

// The whole regex at text (len > 0 bytes of valid UTF-8): the length of the piece, in bytes.
size_t pretok_next_slow(const char *text, size_t len);
// End (byte index) of the run of \p{L} that continues at text + i, i < len.
size_t pretok_letters_from(const char *text, size_t len, size_t i);

// Length in bytes of the piece that starts at text. text holds len > 0 bytes of valid UTF-8.
static inline size_t pretok_next(const char *text, size_t len)
{
    const uint8_t *s = (const uint8_t *)text;
    size_t i = pretok_letter_step[s[0]];
    if (!i) {   // [^\r\n\p{L}\p{N}]? as one ASCII byte, then a letter
        if (!pretok_prefix_byte[s[0]] || len < 2 || !(i = pretok_letter_step[s[1]])) return pretok_next_slow(text, len);
        i++;
    }
    // \p{L}+: ASCII letters 8 bytes at a time (b | 0x20 in 'a'..'z', high bit clear), up to the
    // first other byte; from there byte by byte (a 3-byte lead of letters has its 3 bytes: valid
    // UTF-8). Words of CJK or Hangul (the last letter not ASCII) go byte by byte at once.
    while (s[i - 1] < 0x80 && i + 8 <= len) {
        uint64_t w;
        __builtin_memcpy(&w, s + i, 8);
        uint64_t t = (w | 0x2020202020202020ull) & 0x7F7F7F7F7F7F7F7Full;   // bytes < 0x80: no carries below
        uint64_t not_letter = ~((t + 0x1F1F1F1F1F1F1F1Full) & ~(t + 0x0505050505050505ull) & ~w) & 0x8080808080808080ull;
        if (not_letter) {
            i += (size_t)__builtin_ctzll(not_letter) >> 3;
            if (s[i] < 0x80) return i;
            break;
        }
        i += 8;
    }
    // (Each step is a constant under a predicted branch, not i += table[s[i]]: an addition
    // that waits for two loads made every character a chain of loads, and CJK text slower.)
    while (i < len) {
        size_t step = pretok_letter_step[s[i]];
        if (step == 1) i += 1;
        else if (step == 3) i += 3;
        else return s[i] < 0x80 ? i : pretok_letters_from(text, len, i);
    }
    return i;
}

#endif
