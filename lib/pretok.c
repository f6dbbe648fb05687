// The Llama 3 pre-tokenizer regex, alternative by alternative (see pretok.h). Each branch below
// names the alternative it implements; ASCII takes a table lookup, the rest the Unicode tables.
#include "pretok.h"

#include <stdint.h>

#include "unicode.h"

// Class of the code point at s, its value and its length in bytes.
static inline size_t class_at(const uint8_t *s, uint32_t *cp, int *cls)
{
    static const uint8_t ascii_class[128] = {
        ['\t'] = UNI_SPACE, ['\n'] = UNI_SPACE, ['\v'] = UNI_SPACE, ['\f'] = UNI_SPACE,
        ['\r'] = UNI_SPACE, [' '] = UNI_SPACE,
        ['0'] = UNI_NUMBER, ['1'] = UNI_NUMBER, ['2'] = UNI_NUMBER, ['3'] = UNI_NUMBER,
        ['4'] = UNI_NUMBER, ['5'] = UNI_NUMBER, ['6'] = UNI_NUMBER, ['7'] = UNI_NUMBER,
        ['8'] = UNI_NUMBER, ['9'] = UNI_NUMBER,
#define L(c) [c] = UNI_LETTER, [c - 'a' + 'A'] = UNI_LETTER
        L('a'), L('b'), L('c'), L('d'), L('e'), L('f'), L('g'), L('h'), L('i'), L('j'), L('k'),
        L('l'), L('m'), L('n'), L('o'), L('p'), L('q'), L('r'), L('s'), L('t'), L('u'), L('v'),
        L('w'), L('x'), L('y'), L('z'),
#undef L
    };
    if (*s < 0x80) {
        *cp = *s;
        *cls = ascii_class[*s];
        return 1;
    }
    size_t n = utf8_decode(s, cp);
    *cls = unicode_class(*cp);
    return n;
}

// End of the run of code points of class cls starting at p.
static inline const uint8_t *skip_class(const uint8_t *p, const uint8_t *end, int cls)
{
    while (p < end) {
        if (cls == UNI_LETTER && utf8_lead_all_letters(*p)) {   // (valid UTF-8: 3 bytes are there)
            p += 3;
            continue;
        }
        uint32_t cp;
        int c;
        size_t n = class_at(p, &cp, &c);
        if (c != cls) break;
        p += n;
    }
    return p;
}

static inline int lower_ascii(uint32_t cp) { return cp < 0x80 ? (int)(cp | 0x20) : -1; }

size_t pretok_next(const char *text, size_t len)
{
    const uint8_t *start = (const uint8_t *)text, *end = start + len, *p = start;
    uint32_t c0, c1 = 0;
    int k0, k1 = -1;
    size_t n0 = class_at(p, &c0, &k0), n1 = 0;
    if (p + n0 < end) n1 = class_at(p + n0, &c1, &k1);

    // (?i:'s|'t|'re|'ve|'m|'ll|'d): case-insensitive, so U+017F LONG S matches 's' too.
    if (c0 == '\'' && n1) {
        int l1 = lower_ascii(c1);
        if (l1 == 's' || l1 == 't' || l1 == 'm' || l1 == 'd' || c1 == 0x17F) return n0 + n1;
        if ((l1 == 'r' || l1 == 'v' || l1 == 'l') && p + n0 + n1 < end) {
            int l2 = lower_ascii(p[n0 + n1]);
            if (l2 == (l1 == 'l' ? 'l' : 'e')) return n0 + n1 + 1;
        }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if (k0 == UNI_LETTER) return (size_t)(skip_class(p + n0, end, UNI_LETTER) - start);
    if (k0 != UNI_NUMBER && c0 != '\r' && c0 != '\n' && k1 == UNI_LETTER)
        return (size_t)(skip_class(p + n0 + n1, end, UNI_LETTER) - start);
    // \p{N}{1,3}
    if (k0 == UNI_NUMBER) {
        p += n0;
        for (int i = 1; i < 3 && p < end; i++) {
            uint32_t cp;
            int c;
            size_t n = class_at(p, &cp, &c);
            if (c != UNI_NUMBER) break;
            p += n;
        }
        return (size_t)(p - start);
    }
    // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    if (k0 == UNI_OTHER || (c0 == ' ' && k1 == UNI_OTHER)) {
        p = skip_class(k0 == UNI_OTHER ? p + n0 : p + n0 + n1, end, UNI_OTHER);
        while (p < end && (*p == '\r' || *p == '\n')) p++;
        return (size_t)(p - start);
    }
    // k0 is white space. \s*[\r\n]+ : up to the last \r or \n of the white-space run.
    const uint8_t *last_newline = NULL, *last_start = p;
    while (p < end) {
        uint32_t cp;
        int c;
        size_t n = class_at(p, &cp, &c);
        if (c != UNI_SPACE) break;
        if (cp == '\r' || cp == '\n') last_newline = p;
        last_start = p;
        p += n;
    }
    if (last_newline) return (size_t)(last_newline + 1 - start);
    // \s+(?!\S) : all of a run that ends the text, else all but its last code point.
    if (p == end) return len;
    if (last_start > start) return (size_t)(last_start - start);
    // \s+ : a single white-space code point before a non-space.
    return (size_t)(p - start);
}
