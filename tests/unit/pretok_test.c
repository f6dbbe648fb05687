// Differential test of the pre-tokenizer (lib/pretok.h, lib/pretok.c) and UTF-8 validation
// (lib/unicode.c): the fast scanner must cut every text into exactly the pieces of a plain one,
// written here the obvious way (decode each code point, look up its class, follow the regex
// alternatives in order; it is the scanner tests/fixtures/tok agreed with before the fast path).
// Texts: random strings over an alphabet of boundary cases, random code points of all of
// Unicode, and with $TESTDATA every Alpaca text. utf8_valid_prefix against a plain validator on
// random bytes and on mutated valid text.
#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pretok.h"
#include "tap.h"
#include "unicode.h"

// ---- the reference: one code point at a time ----------------------------------------------------

static size_t ref_decode(const uint8_t *s, uint32_t *cp)
{
    if (s[0] < 0x80) { *cp = s[0]; return 1; }
    if (s[0] < 0xE0) { *cp = (uint32_t)(s[0] & 0x1F) << 6 | (s[1] & 0x3F); return 2; }
    if (s[0] < 0xF0) { *cp = (uint32_t)(s[0] & 0x0F) << 12 | (uint32_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F); return 3; }
    *cp = (uint32_t)(s[0] & 0x07) << 18 | (uint32_t)(s[1] & 0x3F) << 12 | (uint32_t)(s[2] & 0x3F) << 6 | (s[3] & 0x3F);
    return 4;
}

static size_t ref_class_at(const uint8_t *s, const uint8_t *end, uint32_t *cp, int *cls)
{
    if (s >= end) { *cp = UINT32_MAX; *cls = -1; return 0; }
    size_t n = ref_decode(s, cp);
    *cls = unicode_class(*cp);
    return n;
}

static const uint8_t *ref_skip(const uint8_t *p, const uint8_t *end, int cls)
{
    uint32_t cp;
    int c;
    size_t n;
    while ((n = ref_class_at(p, end, &cp, &c)) && c == cls) p += n;
    return p;
}

static int ref_lower(uint32_t cp) { return cp < 0x80 ? (int)(cp | 0x20) : -1; }

static size_t ref_pretok(const char *text, size_t len)
{
    const uint8_t *start = (const uint8_t *)text, *end = start + len, *p = start;
    uint32_t c0, c1;
    int k0, k1;
    size_t n0 = ref_class_at(p, end, &c0, &k0), n1 = ref_class_at(p + n0, end, &c1, &k1);
    if (c0 == '\'' && n1) {   // (?i:'s|'t|'re|'ve|'m|'ll|'d), U+017F LONG S folds to s
        int l1 = ref_lower(c1);
        if (l1 == 's' || l1 == 't' || l1 == 'm' || l1 == 'd' || c1 == 0x17F) return n0 + n1;
        if ((l1 == 'r' || l1 == 'v' || l1 == 'l') && p + n0 + n1 < end && ref_lower(p[n0 + n1]) == (l1 == 'l' ? 'l' : 'e'))
            return n0 + n1 + 1;
    }
    if (k0 == UNI_LETTER) return (size_t)(ref_skip(p + n0, end, UNI_LETTER) - start);
    if (k0 != UNI_NUMBER && c0 != '\r' && c0 != '\n' && k1 == UNI_LETTER)
        return (size_t)(ref_skip(p + n0 + n1, end, UNI_LETTER) - start);
    if (k0 == UNI_NUMBER) {   // \p{N}{1,3}
        p += n0;
        for (int i = 1; i < 3; i++) {
            uint32_t cp;
            int c;
            size_t n = ref_class_at(p, end, &cp, &c);
            if (!n || c != UNI_NUMBER) break;
            p += n;
        }
        return (size_t)(p - start);
    }
    if (k0 == UNI_OTHER || (c0 == ' ' && k1 == UNI_OTHER)) {   // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
        p = ref_skip(k0 == UNI_OTHER ? p + n0 : p + n0 + n1, end, UNI_OTHER);
        while (p < end && (*p == '\r' || *p == '\n')) p++;
        return (size_t)(p - start);
    }
    const uint8_t *last_newline = NULL, *last_start = p;   // white space
    uint32_t cp;
    int c;
    size_t n;
    while ((n = ref_class_at(p, end, &cp, &c)) && c == UNI_SPACE) {
        if (cp == '\r' || cp == '\n') last_newline = p;
        last_start = p;
        p += n;
    }
    if (last_newline) return (size_t)(last_newline + 1 - start);   // \s*[\r\n]+
    if (p == end) return len;                                      // \s+(?!\S)
    if (last_start > start) return (size_t)(last_start - start);
    return (size_t)(p - start);                                    // \s+
}

// 1 when pretok_next and the reference cut text the same; else prints the first difference.
static int same_pieces(const char *text, size_t len, const char *what)
{
    for (size_t pos = 0; pos < len;) {
        size_t got = pretok_next(text + pos, len - pos), want = ref_pretok(text + pos, len - pos);
        if (got != want) {
            printf("# %s: at byte %zu of %zu, piece of %zu bytes, want %zu: '%.*s'\n", what, pos, len, got, want,
                   (int)(want < 40 ? want : 40), text + pos);
            return 0;
        }
        pos += got;
    }
    return 1;
}

static size_t put_utf8(uint32_t cp, char *out)
{
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xC0 | cp >> 6); out[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | cp >> 12); out[1] = (char)(0x80 | (cp >> 6 & 0x3F)); out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | cp >> 18); out[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    out[2] = (char)(0x80 | (cp >> 6 & 0x3F)); out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

// Code points at the edges of the classes and of the fast paths: ASCII of every class, the
// apostrophe and contraction letters, U+017F, letters and non-letters of each UTF-8 length,
// CJK and Hangul (the undecoded letter leads) next to CJK punctuation, marks, NBSP, U+3000,
// U+2028, U+0085, non-ASCII digits, emoji.
static const uint32_t alphabet[] = {
    'a', 'Z', 's', 't', 'l', 'L', 'e', 'r', 'v', 'm', 'd', 'D', '\'', '0', '9', ' ', ' ', '\t', '\n', '\r', '\v',
    '\f', '.', ',', '!', '(', '_', '\\', 0x7F, 0x01, 0x17F, 0xE9, 0x85, 0xA0, 0xB2, 0x301, 0x660, 0x669, 0x4E2D,
    0x6587, 0x9FFF, 0x5000, 0xAC00, 0xB000, 0xCFFF, 0xD7A3, 0x3002, 0xFF0C, 0xFF01, 0x3000, 0x2028, 0x2029,
    0x200D, 0x4DBF, 0x4DC0, 0x3042, 0x30A2, 0x1F600, 0x1D7CE, 0x10000, 0xFFFF, 0x10FFFF, 0x4E00, 0x3041, 0xE000, 0x1C89, 0xFF10, 0x2160,
};

static uint32_t random_cp(void)
{
    for (;;) {
        uint32_t cp = (uint32_t)rand() % 0x110000;
        if (rand() % 2) cp &= 0xFFFF;                  // the BMP more often
        if (rand() % 4 == 0) cp &= 0x7FF;
        if (cp < 0xD800 || cp > 0xDFFF) return cp;
    }
}

static void test_random(void)
{
    srand(3);
    char text[1024];
    int good = 1;
    for (int trial = 0; trial < 20000 && good; trial++) {
        size_t len = 0, n = 1 + (size_t)rand() % 40;
        for (size_t i = 0; i < n; i++) {
            uint32_t cp = trial % 4 == 3 ? random_cp() : alphabet[(size_t)rand() % (sizeof alphabet / sizeof *alphabet)];
            len += put_utf8(cp, text + len);
        }
        good = same_pieces(text, len, "random text");
    }
    ok(good, "pretok_next cuts 20000 random texts as the reference does");
    // Runs of each alphabet entry after each other entry (pieces that end at the text's end).
    good = 1;
    for (size_t a = 0; a < sizeof alphabet / sizeof *alphabet && good; a++)
        for (size_t b = 0; b < sizeof alphabet / sizeof *alphabet && good; b++)
            for (size_t run = 1; run <= 3 && good; run++) {
                size_t first = put_utf8(alphabet[a], text), len = first;
                for (size_t i = 0; i < run; i++) len += put_utf8(alphabet[b], text + len);
                good = same_pieces(text, len, "pair") && same_pieces(text + first, len - first, "run");
            }
    ok(good, "every pair of boundary code points, runs of 1-3");
    // Every code point of 1-3 bytes between letters, after a space, and in a run of its own.
    good = 1;
    for (uint32_t cp = 1; cp < 0x10000 && good; cp++) {
        if (cp >= 0xD800 && cp <= 0xDFFF) continue;
        size_t len = 0;
        text[len++] = 'a';
        len += put_utf8(cp, text + len);
        text[len++] = 'b';
        text[len++] = ' ';
        len += put_utf8(cp, text + len);
        len += put_utf8(cp, text + len);
        len += put_utf8(0x4E2D, text + len);
        len += put_utf8(cp, text + len);
        good = same_pieces(text, len, "code point");
    }
    ok(good, "every code point U+0001-U+FFFF among letters, spaces and CJK");
}

static void test_alpaca(void)
{
    const char *names[] = {"alpaca_en_demo", "alpaca_zh_demo"};
    for (size_t f = 0; f < 2; f++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/alpaca/%s.json", tap_testdata(), names[f]);
        json_error_t je;
        json_t *rows = json_load_file(path, 0, &je);
        if (!rows) {
            printf("ok %d # SKIP shared test data not found: %s (set TESTDATA)\n", ++tap_n, path);
            continue;
        }
        int good = 1;
        size_t n_texts = 0, i;
        json_t *row;
        json_array_foreach(rows, i, row) {
            const char *keys[] = {"instruction", "input", "output"};
            for (size_t k = 0; k < 3 && good; k++) {
                json_t *v = json_object_get(row, keys[k]);
                if (!json_is_string(v) || !json_string_length(v)) continue;
                good = same_pieces(json_string_value(v), json_string_length(v), names[f]);
                n_texts++;
            }
        }
        ok(good && n_texts > 100, "%s: %zu texts cut as the reference does", names[f], n_texts);
        json_decref(rows);
    }
}

// ---- UTF-8 validation ---------------------------------------------------------------------------

static size_t ref_valid_prefix(const uint8_t *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        uint8_t b = s[i];
        size_t need;
        uint32_t min, cp;
        if (b < 0x80) { i++; continue; }
        if (b >= 0xC2 && b <= 0xDF) { need = 1; min = 0x80; }
        else if (b >= 0xE0 && b <= 0xEF) { need = 2; min = 0x800; }
        else if (b >= 0xF0 && b <= 0xF4) { need = 3; min = 0x10000; }
        else return i;
        if (len - i < need + 1) return i;
        cp = b & (0x3F >> need);
        for (size_t k = 1; k <= need; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return i;
            cp = cp << 6 | (s[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
        i += need + 1;
    }
    return len;
}

static void test_utf8(void)
{
    srand(5);
    uint8_t buf[256];
    int good = 1;
    for (int trial = 0; trial < 200000 && good; trial++) {
        size_t len = 0, n = (size_t)rand() % 24;
        while (len < n) {   // valid code points of every length, then one byte changed or cut
            char tmp[4];
            size_t k = put_utf8(trial % 3 ? alphabet[(size_t)rand() % (sizeof alphabet / sizeof *alphabet)] : random_cp(), tmp);
            memcpy(buf + len, tmp, k);
            len += k;
        }
        if (len && rand() % 2) buf[(size_t)rand() % len] = (uint8_t)rand();
        if (len && rand() % 4 == 0) len -= 1 + (size_t)rand() % (len < 3 ? len : 3);
        size_t got = utf8_valid_prefix((const char *)buf, len), want = ref_valid_prefix(buf, len);
        if (got != want) {
            printf("# trial %d: %zu bytes, valid prefix %zu, want %zu\n", trial, len, got, want);
            good = 0;
        }
    }
    ok(good, "utf8_valid_prefix agrees with a plain validator on 200000 mutated texts");
    good = 1;
    for (uint32_t b0 = 0xC0; b0 < 0x100 && good; b0++)   // every lead byte before every pair
        for (uint32_t b1 = 0x70; b1 < 0xC8 && good; b1 += 7)
            for (uint32_t b2 = 0x78; b2 < 0xC8 && good; b2 += 9) {
                uint8_t s[6] = {(uint8_t)b0, (uint8_t)b1, (uint8_t)b2, 0x80, 'a', 'b'};
                for (size_t len = 1; len <= 6 && good; len++)
                    good = utf8_valid_prefix((const char *)s, len) == ref_valid_prefix(s, len);
                if (!good) printf("# bytes %02x %02x %02x\n", b0, b1, b2);
            }
    ok(good, "utf8_valid_prefix: every lead byte with near-boundary continuations, every length");
}

int main(void)
{
    test_random();
    test_alpaca();
    test_utf8();
    return done_testing();
}
