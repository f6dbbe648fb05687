// Unicode character classes for the pre-tokenizer, and UTF-8 validation.
#include "unicode.h"

#include "unicode_tables.inc"

// 1 for a lead byte of 3 bytes that allows every continuation 80-BF: not E0 (overlongs), not ED
// (surrogates).
static const uint8_t lead3_any[256] = {
    [0xE1] = 1, [0xE2] = 1, [0xE3] = 1, [0xE4] = 1, [0xE5] = 1, [0xE6] = 1, [0xE7] = 1, [0xE8] = 1,
    [0xE9] = 1, [0xEA] = 1, [0xEB] = 1, [0xEC] = 1, [0xEE] = 1, [0xEF] = 1,
};

size_t utf8_valid_prefix(const char *text, size_t len)
{
    const uint8_t *s = (const uint8_t *)text;
    size_t i = 0;
    while (i < len) {
        // Eight bytes at a time: all ASCII, or two 3-byte code points (CJK text) checked with
        // one mask. i advances by constants under predicted branches, never by a loaded value
        // (that made each step wait for two loads).
        while (i + 8 <= len) {
            uint64_t w;
            __builtin_memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ull)) {
                i += 8;
                continue;
            }
            if ((lead3_any[w & 0xFF] & lead3_any[w >> 24 & 0xFF]) && (w & 0xC0C000C0C000ull) == 0x808000808000ull) {
                i += 6;
                continue;
            }
            break;
        }
        if (i >= len) break;
        uint8_t b = s[i];
        if (b < 0x80) { i++; continue; }
        // Fast paths: 2-byte sequences, and 3-byte ones whose lead byte allows every
        // continuation (not E0: overlongs; not ED: surrogates), as in CJK text.
        if (b >= 0xC2 && b <= 0xDF) {
            if (i + 1 >= len || (s[i + 1] & 0xC0) != 0x80) return i;
            i += 2;
            continue;
        }
        if (lead3_any[b]) {
            if (i + 2 >= len || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80) return i;
            i += 3;
            continue;
        }
        size_t need;
        uint32_t min;
        if (b >= 0xE0 && b <= 0xEF) { need = 2; min = 0x800; }
        else if (b >= 0xF0 && b <= 0xF4) { need = 3; min = 0x10000; }
        else return i;
        if (len - i < need + 1) return i;
        uint32_t cp = b & (0x3F >> need);
        for (size_t k = 1; k <= need; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return i;
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
        i += need + 1;
    }
    return len;
}
