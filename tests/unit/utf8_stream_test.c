// Streaming UTF-8 (lib/utf8_stream.h): every piece printed is valid, whatever the chunking, and
// the text that comes out is the same as when the bytes arrive all at once.
#include <stdint.h>

#include "tap.h"
#include "utf8_stream.h"

#define FFFD "\xEF\xBF\xBD"

// Feed s in chunks of `chunk` bytes; out gets everything (finish included). Returns its length,
// or -1 when some piece on its own was not valid UTF-8.
static long feed_chunked(const char *s, size_t n, size_t chunk, char *out)
{
    Utf8Stream u = {0};
    size_t w = 0;
    for (size_t i = 0; i < n; i += chunk) {
        size_t k = n - i < chunk ? n - i : chunk;
        size_t got = utf8_stream_feed(&u, s + i, k, out + w);
        if (!utf8_valid(out + w, got))
            return -1;
        w += got;
    }
    size_t got = utf8_stream_finish(&u, out + w);
    if (!utf8_valid(out + w, got))
        return -1;
    return (long)(w + got);
}

static void check(const char *name, const char *in, size_t n, const char *want)
{
    char out[256];
    for (size_t chunk = 1; chunk <= n; chunk++) {
        long len = feed_chunked(in, n, chunk, out);
        if (len < 0 || (size_t)len != strlen(want) || memcmp(out, want, (size_t)len) != 0) {
            ok(0, "%s (chunks of %zu)", name, chunk);
            return;
        }
    }
    ok(1, "%s, in chunks of every size", name);
}

int main(void)
{
    Utf8Stream u = {0};
    char out[64];
    is_int(utf8_stream_feed(&u, "\xC3", 1, out), 0, "a lead byte alone is held back");
    is_int(utf8_stream_feed(&u, "\xA9", 1, out), 2, "its continuation releases the character");
    ok(memcmp(out, "\xC3\xA9", 2) == 0, "the character is intact");
    is_int(utf8_stream_feed(&u, "\xF0\x9F", 2, out), 0, "half a 4-byte sequence is held back");
    is_int(utf8_stream_finish(&u, out), 6, "at the end held bytes become one U+FFFD each");

    check("ASCII passes through", "hello", 5, "hello");
    check("multi-byte characters", "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80!", 15,
          "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80!");
    check("an invalid byte becomes U+FFFD", "a\xFF" "b", 3, "a" FFFD "b");
    check("a lead byte followed by ASCII", "\xE2" "A", 2, FFFD "A");
    check("a stray continuation byte", "x\x80y", 3, "x" FFFD "y");
    check("overlong encodings are refused", "\xC0\x80", 2, FFFD FFFD);
    check("surrogates are refused", "\xED\xA0\x80", 3, FFFD FFFD FFFD);
    check("code points above U+10FFFF are refused", "\xF4\x90\x80\x80", 4, FFFD FFFD FFFD FFFD);
    check("a truncated sequence at the end", "ok\xE2\x82", 4, "ok" FFFD FFFD);

    is_int(utf8_valid("caf\xC3\xA9", 5), 1, "utf8_valid accepts valid text");
    is_int(utf8_valid("caf\xC3", 4), 0, "utf8_valid refuses a truncated character");

    // Random bytes (biased towards UTF-8 lead and continuation bytes), random chunking: every
    // piece valid, and the same result as one whole feed.
    uint64_t x = 88172645463325252ull;
    int all_valid = 1, all_same = 1;
    for (int round = 0; round < 2000; round++) {
        char in[40], whole[200], pieces[200];
        size_t n = 1 + round % 40;
        for (size_t i = 0; i < n; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            static const unsigned char pick[] = {'a', 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x80, 0xFF, 0xED};
            in[i] = (char)pick[x % sizeof pick];
        }
        long a = feed_chunked(in, n, n, whole);
        long b = feed_chunked(in, n, 1 + (x >> 32) % 3, pieces);
        all_valid &= a >= 0 && b >= 0;
        all_same &= a == b && a >= 0 && memcmp(whole, pieces, (size_t)a) == 0;
    }
    ok(all_valid, "random bytes: every piece is valid UTF-8");
    ok(all_same, "random bytes: chunking does not change the text");
    return done_testing();
}
