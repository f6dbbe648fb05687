// libFuzzer target for the tokenizer loaders and the byte-level encoder.
// Build and run (clang; not part of `make`):
//   clang -g -O1 -fsanitize=fuzzer,address,undefined -Ilib tests/fuzz/tokenizer_fuzz.c \
//       lib/tokenizer.c lib/bpe_bytelevel.c lib/bpe_spm.c lib/pretok.c lib/unicode.c \
//       -ljansson -lxxhash -lm -pthread -o build/fuzz_tokenizer
//   mkdir -p build/fuzz-corpus && build/fuzz_tokenizer build/fuzz-corpus -max_total_time=600
// The first byte picks what the rest is:
//   0: a tokenizer.json (loaded; when it loads, some text is encoded and decoded);
//   1: a tiktoken rank file (same);
//   2..255: text for the encoder of a fixed tokenizer: the Llama 3 one when FUZZ_TOKENIZER names
//      it (e.g. FUZZ_TOKENIZER=$TESTDATA/llama3/tokenizer.model), else a small one made here.
//      Valid UTF-8 must round-trip, decode(encode(x)) == x, with specials parsed or not;
//      invalid UTF-8 must be refused. Any crash, leak or mismatch is a finding (abort).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tokenizer.h"
#include "unicode.h"

static Tokenizer *fixed;
static char scratch[64];

static void make_fixed(void)
{
    const char *path = getenv("FUZZ_TOKENIZER");
    Err err;
    if (path) {
        fixed = tokenizer_load(path, &err);
        if (!fixed) {
            fprintf(stderr, "fuzz: %s\n", err.msg);
            abort();
        }
        return;
    }
    // A small rank file: the 256 bytes, then a few merges, ranks in order.
    char name[] = "/tmp/fuzz_tiktoken.XXXXXX";
    int fd = mkstemp(name);
    FILE *f = fdopen(fd, "w");
    const char *a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const char *merges[] = {"aa", "ab", "th", "the", " t", " the", "in", "ing", "\xe6\x97", "\xe6\x97\xa5"};
    int rank = 0;
    for (int i = 0; i < 256 + 10; i++) {
        const unsigned char *s = i < 256 ? (const unsigned char[]){(unsigned char)i} : (const unsigned char *)merges[i - 256];
        size_t n = i < 256 ? 1 : strlen(merges[i - 256]);
        for (size_t k = 0; k < n; k += 3) {
            uint32_t v = (uint32_t)s[k] << 16 | (k + 1 < n ? (uint32_t)s[k + 1] << 8 : 0) | (k + 2 < n ? s[k + 2] : 0);
            fprintf(f, "%c%c%c%c", a[v >> 18], a[(v >> 12) & 63], k + 1 < n ? a[(v >> 6) & 63] : '=',
                    k + 2 < n ? a[v & 63] : '=');
        }
        fprintf(f, " %d\n", rank++);
    }
    fclose(f);
    fixed = tokenizer_load(name, &err);
    unlink(name);
    if (!fixed) abort();
}

static void round_trip(const Tokenizer *t, const uint8_t *text, size_t len)
{
    uint32_t *ids = NULL, *offsets = NULL;
    size_t cap = 0, out_cap = 0;
    char *out = NULL;
    Err err;
    int valid = utf8_valid_prefix((const char *)text, len) == len;
    for (int special = 0; special < 2; special++) {
        long n = tokenizer_encode(t, (const char *)text, len, special, &ids, &cap, 0, &offsets, &err);
        if (!valid) {
            if (n >= 0) abort();   // invalid UTF-8 must be refused
            break;
        }
        if (n < 0) abort();
        long m = tokenizer_decode(t, ids, (size_t)n, 0, &out, &out_cap, 0, &err);
        if (!strcmp(tokenizer_kind(t), "bpe-bytelevel") && (m != (long)len || (len && memcmp(out, text, len))))
            abort();   // byte-level: decode(encode(x)) == x
        for (long i = 1; i < n; i++)
            if (offsets[i] < offsets[i - 1] || offsets[i] >= len) abort();
    }
    free(ids);
    free(offsets);
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!size) return 0;
    if (data[0] >= 2) {
        if (!fixed) make_fixed();
        round_trip(fixed, data + 1, size - 1);
        return 0;
    }
    // A loader input goes through a file, as tokenizer_load reads paths.
    snprintf(scratch, sizeof scratch, "/tmp/fuzz_tok_%d.%s", (int)getpid(), data[0] == 0 ? "json" : "model");
    FILE *f = fopen(scratch, "wb");
    if (!f) return 0;
    fwrite(data + 1, 1, size - 1, f);
    fclose(f);
    Err err;
    Tokenizer *t = tokenizer_load(scratch, &err);
    unlink(scratch);
    if (t) {
        const char *sample = "Hello, world! 123 \xe6\x97\xa5\xe6\x9c\xac <|end_of_text|>\n\n  x";
        round_trip(t, (const uint8_t *)sample, strlen(sample));
        tokenizer_free(t);
    }
    return 0;
}
