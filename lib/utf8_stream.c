#include "utf8_stream.h"

#include <string.h>

int utf8_sequence(const unsigned char *s, size_t n)
{
    if (n == 0)
        return 0;
    unsigned c = s[0];
    int len;
    unsigned lo = 0x80, hi = 0xBF;   // the range allowed for the second byte
    if (c < 0x80)
        return 1;
    else if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0)
            lo = 0xA0;   // no overlongs
        if (c == 0xED)
            hi = 0x9F;   // no surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0)
            lo = 0x90;
        if (c == 0xF4)
            hi = 0x8F;   // nothing above U+10FFFF
    } else
        return -1;
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n)
            return 0;
        unsigned b = s[i];
        if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF))
            return -1;
    }
    return len;
}

int utf8_valid(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        int k = utf8_sequence(u + i, n - i);
        if (k <= 0)
            return 0;
        i += (size_t)k;
    }
    return 1;
}

static const char replacement[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

size_t utf8_stream_feed(Utf8Stream *s, const char *in, size_t n, char *out)
{
    size_t w = 0, i = 0;
    const unsigned char *u = (const unsigned char *)in;
    // First settle the held bytes, taking continuation bytes from the input one at a time.
    while (s->nheld > 0) {
        int k = utf8_sequence(s->held, s->nheld);
        if (k > 0) {
            memcpy(out + w, s->held, (size_t)k);
            w += (size_t)k;
            s->nheld -= (size_t)k;
            memmove(s->held, s->held + k, s->nheld);
        } else if (k < 0) {
            // The lead byte cannot start a valid sequence with what followed: replace it alone and
            // reconsider the bytes after it.
            memcpy(out + w, replacement, 3);
            w += 3;
            memmove(s->held, s->held + 1, --s->nheld);
        } else if (i < n) {
            s->held[s->nheld++] = u[i++];
        } else {
            return w;   // still incomplete, nothing more in this piece
        }
    }
    while (i < n) {
        int k = utf8_sequence(u + i, n - i);
        if (k > 0) {
            memcpy(out + w, u + i, (size_t)k);
            w += (size_t)k;
            i += (size_t)k;
        } else if (k < 0) {
            memcpy(out + w, replacement, 3);
            w += 3;
            i++;
        } else {
            s->nheld = n - i;   // an incomplete but valid prefix: fewer than 4 bytes
            memcpy(s->held, u + i, s->nheld);
            break;
        }
    }
    return w;
}

size_t utf8_stream_finish(Utf8Stream *s, char *out)
{
    size_t w = 0;
    for (size_t i = 0; i < s->nheld; i++, w += 3)
        memcpy(out + w, replacement, 3);
    s->nheld = 0;
    return w;
}
