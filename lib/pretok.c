// The Llama 3 pre-tokenizer regex, alternative by alternative (see pretok.h). Each branch below
// names the alternative it implements; ASCII takes a table lookup, the rest the Unicode tables.
// pretok.h holds the fast path (words); this file the tables it reads and the whole regex.
//
// Speed (issue 3, third round). Instructions of one cold pass of tests/bench/tok.sh's driver over
// its corpora (callgrind --toggle-collect=bytelevel_encode, tokenizer.model; deterministic), M:
//                                                       en      zh     mixed
//   before (pretok_next out of line, two code points
//     classified up front, letters a class_at each)     42.6    44.6    87.1
//   pretok_next inline in the caller's loop: words
//     (optional ASCII byte, letters by a byte table),
//     the rest out of line                              33.8    43.9    77.6
//   ASCII letters 8 at a time (SWAR) in that loop       33.1    44.1    77.2
//   utf8_valid_prefix: 4-byte loads, no decoding;
//     the slow path decodes the second code point only
//     when needed; 3-byte letters by a 64-code-point
//     block bitmap                                      33.3    41.1    74.3
//   steps by constants under branches, not i += a
//     loaded length (a chain of dependent loads per
//     character: fewer instructions, CJK slower); two
//     CJK code points per 8-byte validation load        33.5    40.1    73.5
// Of those, the pre-tokenizer: en 18.3 -> 8.1, zh ~6.0 -> 5.5; UTF-8 validation: zh 6.3 -> 2.2.
// Cold pass MB/s (tokdrv -r 1, old and new alternating, median of 9 on the loaded 2-core dev VM):
// en 99 -> 109, zh 68 -> 68-72, mixed 82 -> 86.
#include "pretok.h"

#include "unicode.h"

#define LETTER_ASCII(c) [c] = 1, [c - 'a' + 'A'] = 1
const uint8_t pretok_letter_step[256] = {
    LETTER_ASCII('a'), LETTER_ASCII('b'), LETTER_ASCII('c'), LETTER_ASCII('d'), LETTER_ASCII('e'),
    LETTER_ASCII('f'), LETTER_ASCII('g'), LETTER_ASCII('h'), LETTER_ASCII('i'), LETTER_ASCII('j'),
    LETTER_ASCII('k'), LETTER_ASCII('l'), LETTER_ASCII('m'), LETTER_ASCII('n'), LETTER_ASCII('o'),
    LETTER_ASCII('p'), LETTER_ASCII('q'), LETTER_ASCII('r'), LETTER_ASCII('s'), LETTER_ASCII('t'),
    LETTER_ASCII('u'), LETTER_ASCII('v'), LETTER_ASCII('w'), LETTER_ASCII('x'), LETTER_ASCII('y'),
    LETTER_ASCII('z'),
    // the leads of utf8_lead_all_letters (pretok_test checks every code point up to U+FFFF)
    [0xE5] = 3, [0xE6] = 3, [0xE7] = 3, [0xE8] = 3, [0xE9] = 3, [0xEB] = 3, [0xEC] = 3,
};
#undef LETTER_ASCII

// Every ASCII byte but letters, digits, \r, \n and the apostrophe (a contraction may start there).
#define R8(c) [c] = 1, [c + 1] = 1, [c + 2] = 1, [c + 3] = 1, [c + 4] = 1, [c + 5] = 1, [c + 6] = 1, [c + 7] = 1
const uint8_t pretok_prefix_byte[256] = {
    R8(0x00), [0x08] = 1, [0x09] = 1, [0x0B] = 1, [0x0C] = 1, [0x0E] = 1, [0x0F] = 1, R8(0x10), R8(0x18),
    [' '] = 1, ['!'] = 1, ['"'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['('] = 1, [')'] = 1,
    ['*'] = 1, ['+'] = 1, [','] = 1, ['-'] = 1, ['.'] = 1, ['/'] = 1, [':'] = 1, [';'] = 1, ['<'] = 1,
    ['='] = 1, ['>'] = 1, ['?'] = 1, ['@'] = 1, ['['] = 1, ['\\'] = 1, [']'] = 1, ['^'] = 1, ['_'] = 1,
    ['`'] = 1, ['{'] = 1, ['|'] = 1, ['}'] = 1, ['~'] = 1, [0x7F] = 1,
};
#undef R8

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

// Bit cp >> 6 for each block of 64 code points U+0800-U+FFFF (3 bytes in UTF-8) that are all
// letters: the lead byte's low 4 bits and the second byte's low 6 bits index it, so a letter in
// such a block (CJK, Hangul, kana and most scripts' letters) is skipped undecoded. Computed from
// unicode_class; pretok_test checks every code point of the range against the plain scanner.
static const uint64_t letter_blocks3[16] = {
    0x0000000000000000ull, 0x0f70000001fe01f0ull, 0x0007000000000000ull, 0xffffffffffff0020ull,
    0xff7fffffffffffffull, 0xffffffffffffffffull, 0xffffffffffffffffull, 0xffffffffffffffffull,
    0xffffffffffffffffull, 0xffffffffffffffffull, 0xffff400020f3ffffull, 0xffffffffffffffffull,
    0xffffffffffffffffull, 0x000000003fffffffull, 0x0000000000000000ull, 0x040f05f000000000ull,
};

// 1 when p starts a 3-byte code point of one of those blocks.
static inline int letter3_at(const uint8_t *p)
{
    if ((*p & 0xF0) != 0xE0) return 0;
    uint32_t block = (uint32_t)(*p & 0x0F) << 6 | (p[1] & 0x3F);
    return letter_blocks3[block >> 6] >> (block & 63) & 1;
}

// End of the run of code points of class cls starting at p.
static inline __attribute__((always_inline)) const uint8_t *skip_class(const uint8_t *p, const uint8_t *end, int cls)
{
    while (p < end) {
        if (cls == UNI_LETTER) {   // (valid UTF-8: a 3-byte lead has its 3 bytes)
            if (utf8_lead_all_letters(*p) || letter3_at(p)) {   // (p += a constant: see pretok.h)
                p += 3;
                continue;
            }
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

size_t pretok_letters_from(const char *text, size_t len, size_t i)
{
    const uint8_t *start = (const uint8_t *)text;
    return (size_t)(skip_class(start + i, start + len, UNI_LETTER) - start);
}

size_t pretok_next_slow(const char *text, size_t len)
{
    const uint8_t *start = (const uint8_t *)text, *end = start + len, *p = start;
    if (letter3_at(p)) return (size_t)(skip_class(p + 3, end, UNI_LETTER) - start);   // \p{L}+
    uint32_t c0, c1 = 0;
    int k0, k1 = -1;
    size_t n0 = class_at(p, &c0, &k0), n1 = 0;
    // [^\r\n\p{L}\p{N}]?\p{L}+ with no first code point: the next one is not needed.
    if (k0 == UNI_LETTER) return (size_t)(skip_class(p + n0, end, UNI_LETTER) - start);
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
    // [^\r\n\p{L}\p{N}]?\p{L}+ (k0 is not a letter, above)
    if (k0 != UNI_NUMBER && c0 != '\r' && c0 != '\n' && k1 == UNI_LETTER)
        return (size_t)(skip_class(p + n0 + n1, end, UNI_LETTER) - start);
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
