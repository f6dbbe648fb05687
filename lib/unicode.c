// Unicode character classes for the pre-tokenizer, and UTF-8 validation.
#include "unicode.h"

#include "unicode_tables.inc"

size_t utf8_valid_prefix(const char *text, size_t len)
{
    const uint8_t *s = (const uint8_t *)text;
    size_t i = 0;
    while (i < len) {
        // ASCII fast path: eight bytes at a time while none has its high bit set.
        while (i + 8 <= len) {
            uint64_t w;
            __builtin_memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ull) break;
            i += 8;
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
        if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
            if (i + 2 >= len || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80) return i;
            i += 3;
            continue;
        }
        size_t need;
        uint32_t min;
        if (b >= 0xC2 && b <= 0xDF) { need = 1; min = 0x80; }
        else if (b >= 0xE0 && b <= 0xEF) { need = 2; min = 0x800; }
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
