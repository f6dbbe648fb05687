// Byte-level BPE tokenizer (lib/tokenizer.c, lib/bpe_bytelevel.c, lib/pretok.c, lib/unicode.c).
// Without shared data: the pre-tokenizer on cases whose pieces Hugging Face's Split produced,
// the Unicode classes, UTF-8 validation, a tiny tokenizer written here in both formats (merges,
// heap against scan, added tokens, offsets, decode, loader errors). With $TESTDATA: the Llama 3
// case files, the reference ids in tests/fixtures/tok/ (written by tests/tokenizer/compare.py
// from tiktoken and Hugging Face tokenizers), every Alpaca row, fingerprints, load time, threads,
// and linear time on 1 MB runs of one character.
#include <jansson.h>
#include <limits.h>
#include <omp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "bpe_bytelevel.h"
#include "pretok.h"
#include "tap.h"
#include "tokenizer.h"
#include "unicode.h"

// The repository root, for tests/fixtures/: tests run from it (make test); __FILE__ is relative.
#define TOP_DIR "."

#if defined(__SANITIZE_ADDRESS__)
#define SLOWDOWN 4   // time bounds under AddressSanitizer
#else
#define SLOWDOWN 1
#endif

// CPU time of this thread: time bounds hold on a shared, loaded machine too.
static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static char tmpdir[256];

static const char *tmp_path(const char *name)
{
    static char buf[512];
    snprintf(buf, sizeof buf, "%s/%s", tmpdir, name);
    return buf;
}

// ---- pre-tokenizer -------------------------------------------------------------------------

// Pieces as Hugging Face tokenizers' Split(Llama 3 regex, Isolated) gives them, joined by '|'.
static const struct {
    const char *text, *pieces;
} pretok_cases[] = {
    {"Hello  world\012\012 x", "Hello| | world|\012\012| x"},
    {"DON'T 'S we'RE", "DON|'T| '|S| we|'RE"},
    {"x'\305\277a", "x|'\305\277|a"},
    {"12345 \331\241\331\242\331\243\331\244", "123|45| |\331\241\331\242\331\243|\331\244"},
    {"a \011\012b", "a| \011\012|b"},
    {"  \012  x", "  \012| | x"},
    {";;;\012\012  !!x", ";;;\012\012| | !!|x"},
    {"\343\200\200\343\200\200\345\205\250\350\247\222", "\343\200\200|\343\200\200\345\205\250\350\247\222"},
    {"e\314\201 a\342\200\215b", "e|\314\201| a|\342\200\215b"},
    {"   ", "   "},
    {"x  ", "x|  "},
    {"\015\012\015\012 y", "\015\012\015\012| y"},
    {"'ll'LL've", "'ll|'LL|'ve"},
    {"a\302\240\302\240b", "a|\302\240|\302\240b"},
    {"\360\237\246\231\360\237\246\231 ok", "\360\237\246\231\360\237\246\231| ok"},
    {"x\342\200\250\342\200\251y", "x|\342\200\250|\342\200\251y"},
    {"\011\011if (x) {\012\011\011return 1;", "\011|\011if| (|x|)| {\012|\011|\011return| |1|;"},
};

static void test_pretok(void)
{
    for (size_t i = 0; i < sizeof pretok_cases / sizeof *pretok_cases; i++) {
        const char *s = pretok_cases[i].text;
        size_t len = strlen(s), pos = 0;
        char got[256] = "";
        while (pos < len) {
            size_t n = pretok_next(s + pos, len - pos);
            if (pos) strcat(got, "|");
            strncat(got, s + pos, n);
            pos += n;
        }
        is_str(got, pretok_cases[i].pieces, "pretok case %zu", i);
    }
}

static void test_unicode(void)
{
    is_int(unicode_class('a'), UNI_LETTER, "'a' is a letter");
    is_int(unicode_class('7'), UNI_NUMBER, "'7' is a number");
    is_int(unicode_class(0xB2), UNI_NUMBER, "U+00B2 superscript two is \\p{N}");
    is_int(unicode_class(0x3000), UNI_SPACE, "U+3000 is white space");
    is_int(unicode_class(0x85), UNI_SPACE, "U+0085 is white space");
    is_int(unicode_class(0x200D), UNI_OTHER, "U+200D ZWJ is other");
    is_int(unicode_class(0x1C89), UNI_LETTER, "U+1C89 (new in Unicode 16) is a letter, as the references see it");
    is_int(unicode_class(0x10FFFF), UNI_OTHER, "U+10FFFF is other");
    is_int(utf8_valid_prefix("ab\xc0\xaf", 4), 2, "overlong rejected");
    is_int(utf8_valid_prefix("a\xed\xa0\x80", 4), 1, "surrogate rejected");
    is_int(utf8_valid_prefix("\xf4\x90\x80\x80", 4), 0, "above U+10FFFF rejected");
    is_int(utf8_valid_prefix("abcdefgh\xe6\x97", 10), 8, "truncated sequence rejected");
    is_int(utf8_valid_prefix("\xf4\x8f\xbf\xbf\xef\xbf\xbf", 7), 7, "U+10FFFF and U+FFFF accepted");
    is_int(utf8_valid_prefix("\xe6\x97\xa5\xc3\xa9\xe0\x9f\xbf", 8), 5, "overlong 3-byte rejected after fast paths");
    is_int(utf8_valid_prefix("\xe6\x97", 2), 0, "truncated 3-byte sequence rejected");
    is_int(utf8_valid_prefix("\xe6\x97\x41", 3), 0, "3-byte sequence with a bad continuation rejected");
    is_int(utf8_valid_prefix("\xc3", 1), 0, "truncated 2-byte sequence rejected");
    // utf8_lead_all_letters agrees with the tables for every 3-byte lead byte.
    int leads_ok = 1;
    for (uint32_t lead = 0xE0; lead <= 0xEF && leads_ok; lead++) {
        int all = 1;
        for (uint32_t cp = (lead & 0xF) << 12; cp < ((lead & 0xF) + 1) << 12; cp++)
            if ((cp < 0xD800 || cp > 0xDFFF) && unicode_class(cp) != UNI_LETTER) all = 0;
        if (utf8_lead_all_letters((uint8_t)lead) && !all) leads_ok = 0;
    }
    ok(leads_ok, "every lead byte utf8_lead_all_letters names starts letters only");
}

// ---- a tiny tokenizer in both formats ------------------------------------------------------

// Ranks 0-255 are the bytes; then these (the merges list of the JSON twin, in this order).
static const char *tiny_tokens[] = {"aa", "ab", "bc", "abc", " a", "aaaa"};
static const char *tiny_merges[][2] = {{"a", "a"}, {"a", "b"}, {"b", "c"}, {"ab", "c"}, {" ", "a"}, {"aa", "aa"}};

static void base64(const unsigned char *s, size_t n, char *out)
{
    const char *a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (i + 1 < n ? (uint32_t)s[i + 1] << 8 : 0) | (i + 2 < n ? s[i + 2] : 0);
        *out++ = a[v >> 18];
        *out++ = a[(v >> 12) & 63];
        *out++ = i + 1 < n ? a[(v >> 6) & 63] : '=';
        *out++ = i + 2 < n ? a[v & 63] : '=';
    }
    *out = 0;
}

static void write_tiny_tiktoken(const char *path)
{
    FILE *f = fopen(path, "w");
    char b64[64];
    for (int c = 0; c < 256; c++) {
        unsigned char byte = (unsigned char)c;
        base64(&byte, 1, b64);
        fprintf(f, "%s %d\n", b64, c);
    }
    for (int i = 0; i < 6; i++) {
        base64((const unsigned char *)tiny_tokens[i], strlen(tiny_tokens[i]), b64);
        fprintf(f, "%s %d\n", b64, 256 + i);
    }
    fclose(f);
}

// GPT-2's byte -> character map, as UTF-8 (out: room for 3 bytes + NUL).
static void byte_char(int b, char *out)
{
    uint32_t cp = (uint32_t)b;
    if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)) {
        int n = 0;
        for (int i = 0; i < b; i++)
            if (!((i >= 33 && i <= 126) || (i >= 161 && i <= 172) || i >= 174)) n++;
        cp = 256u + (uint32_t)n;
    }
    if (cp < 0x80) snprintf(out, 4, "%c", (char)cp);
    else snprintf(out, 4, "%c%c", (char)(0xC0 | cp >> 6), (char)(0x80 | (cp & 0x3F)));
}

static char *bytelevel_string(const char *s)
{
    static char buf[4][64];
    static int k;
    char *out = buf[k++ & 3];
    out[0] = 0;
    for (; *s; s++) {
        char c[4];
        byte_char((unsigned char)*s, c);
        strcat(out, c);
    }
    return out;
}

// A tokenizer.json of the Llama 3 shape over the tiny vocabulary. mutate: 0 as is; 1 Whitespace
// pre-tokenizer; 2 WordPiece model; 3 another Split pattern; 4 a merge naming an unknown token.
static void write_tiny_json(const char *path, int mutate)
{
    json_t *vocab = json_object();
    for (int c = 0; c < 256; c++) {
        char ch[4];
        byte_char(c, ch);
        json_object_set_new(vocab, ch, json_integer(c));
    }
    for (int i = 0; i < 6; i++) json_object_set_new(vocab, bytelevel_string(tiny_tokens[i]), json_integer(256 + i));
    json_t *merges = json_array();
    for (int i = 0; i < 6; i++) {
        const char *l = bytelevel_string(tiny_merges[i][0]), *r = bytelevel_string(tiny_merges[i][1]);
        if (i % 2) {   // both forms: "a b" strings and [a, b] pairs
            json_array_append_new(merges, json_pack("[s, s]", l, r));
        } else {
            char m[64];
            snprintf(m, sizeof m, "%s %s", l, mutate == 4 && i == 0 ? "zz" : r);
            json_array_append_new(merges, json_string(m));
        }
    }
    json_t *pre = json_pack("{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, {s:s, s:b, s:b, s:b}]}", "type", "Sequence",
                            "pretokenizers", "type", "Split", "pattern", "Regex",
                            mutate == 3 ? "\\s+|\\w+" : PRETOK_LLAMA3_PATTERN, "behavior", "Isolated", "invert", 0,
                            "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets", 1, "use_regex", 0);
    if (mutate == 1) {
        json_decref(pre);
        pre = json_pack("{s:s}", "type", "Whitespace");
    }
    json_t *root = json_pack("{s:s, s:[{s:i, s:s, s:b}], s:n, s:o, s:n, s:{s:s, s:b, s:o, s:o}}", "version", "1.0",
                             "added_tokens", "id", 262, "content", "<|end|>", "special", 1, "normalizer",
                             "pre_tokenizer", pre, "post_processor", "model", "type",
                             mutate == 2 ? "WordPiece" : "BPE", "ignore_merges", 1, "vocab", vocab, "merges", merges);
    json_dump_file(root, path, 0);
    json_decref(root);
}

static long encode(const Tokenizer *t, const char *s, int special, uint32_t **ids, size_t *cap)
{
    Err err;
    return tokenizer_encode(t, s, strlen(s), special, ids, cap, 0, NULL, &err);
}

static int ids_equal(const uint32_t *got, long n, const uint32_t *want, long m)
{
    return n == m && (n == 0 || memcmp(got, want, (size_t)n * sizeof *got) == 0);
}

// The encoder (pieces cut into segments, whole characters, the piece cache, the pure-pair
// table) against the definition on random texts over alphabet: each piece of the
// pre-tokenizer is its token when it is one (whole_piece: tiktoken, ignore_merges), else the
// plain merge of its bytes. Each text is encoded twice (the second time from the cache).
static int same_as_plain(const ByteLevelBpe *b, int whole_piece, const char *const *alphabet, size_t n_alphabet,
                         int trials, unsigned seed)
{
    srand(seed);
    uint32_t *ids = NULL;
    size_t cap = 0;
    int good = 1;
    for (int trial = 0; trial < trials && good; trial++) {
        char text[512];
        size_t len = 0, parts = 1 + (size_t)rand() % 60;
        for (size_t i = 0; i < parts; i++) {
            const char *s = alphabet[(size_t)rand() % n_alphabet];
            if (len + strlen(s) >= sizeof text) break;
            memcpy(text + len, s, strlen(s));
            len += strlen(s);
        }
        uint32_t want[512];
        size_t n_want = 0;
        for (size_t pos = 0, n; pos < len; pos += n) {
            n = pretok_next(text + pos, len - pos);
            int64_t id = whole_piece ? bytelevel_token_id(b, text + pos, n) : -1;
            long got = id >= 0 ? (want[n_want] = (uint32_t)id, 1) : bytelevel_bpe_piece(b, text + pos, n, 2, want + n_want);
            if (got < 0) good = 0;
            n_want += got < 0 ? 0 : (size_t)got;
        }
        Err err = {{0}};
        for (int pass = 0; pass < 2 && good; pass++) {
            long n = bytelevel_encode(b, text, len, 0, &ids, &cap, 0, NULL, &err);
            good = n >= 0 && ids_equal(ids, n, want, (long)n_want);
        }
        if (!good) printf("# encoder differs from the plain merge on '%.*s'\n", (int)len, text);
    }
    free(ids);
    return good;
}

static void test_tiny(void)
{
    write_tiny_tiktoken(tmp_path("tiny.tiktoken"));
    mkdir(tmp_path("tinyjson"), 0755);
    write_tiny_json(tmp_path("tinyjson/tokenizer.json"), 0);
    Err err = {{0}};
    Tokenizer *tt = tokenizer_load(tmp_path("tiny.tiktoken"), &err);
    ok(tt != NULL, "tiny tiktoken file loads (%s)", err.msg);
    Tokenizer *tj = tokenizer_load(tmp_path("tinyjson"), &err);
    ok(tj != NULL, "tiny tokenizer.json directory loads (%s)", err.msg);
    if (!tt || !tj) return;
    is_str(tokenizer_kind(tt), "bpe-bytelevel", "kind");
    is_int(tokenizer_vocab_size(tj), 263, "vocab size counts the added token");
    uint32_t *ids = NULL;
    size_t cap = 0;
    struct {
        const char *text;
        uint32_t want[8];
        long n;
    } cases[] = {
        {"aaaa", {261}, 1},             // whole piece is a token
        {"aaaaaa", {261, 256}, 2},      // aa aa aa -> (aa aa) aa: leftmost first on equal rank
        {"aabc", {256, 258}, 2},        // aa (rank 256) before ab (257); then bc
        {"xabc", {'x', 259}, 2},        // ab, then ab+c
        {" aab", {' ', 256, 'b'}, 3},   // aa (256) before " a" (260) and ab (257)
        {"a ab", {'a', ' ', 257}, 3},   // pieces "a", " ab"; ab (257) before " a" (260)
        {"ab 12", {257, ' ', '1', '2'}, 4},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        long n = encode(tt, cases[i].text, 0, &ids, &cap);
        ok(ids_equal(ids, n, cases[i].want, cases[i].n), "tiktoken-style merges: '%s'", cases[i].text);
        n = encode(tj, cases[i].text, 0, &ids, &cap);
        ok(ids_equal(ids, n, cases[i].want, cases[i].n), "merges-list twin: '%s'", cases[i].text);
    }
    ok(tokenizer_fingerprint(tt) != tokenizer_fingerprint(tj), "fingerprints differ (the JSON has an added token)");

    // The same ranks written backwards, with CRLF line ends and 13 leading zeros: the same tokenizer.
    FILE *f = fopen(tmp_path("tiny.tiktoken"), "r"), *g = fopen(tmp_path("backwards.tiktoken"), "w");
    char lines[262][64];
    int n_lines = 0;
    while (n_lines < 262 && fgets(lines[n_lines], sizeof lines[0], f)) n_lines++;
    for (int i = n_lines - 1; i >= 0; i--) {
        char b64[64];
        int rank;
        if (sscanf(lines[i], "%63s %d", b64, &rank) == 2) fprintf(g, "%s 0000000000000%d\r\n", b64, rank);
    }
    fclose(f);
    fclose(g);
    Tokenizer *backwards = tokenizer_load(tmp_path("backwards.tiktoken"), &err);
    ok(n_lines == 262 && backwards && tokenizer_fingerprint(backwards) == tokenizer_fingerprint(tt),
       "ranks in any line order, CRLF, leading zeros: same fingerprint (%s)", backwards ? "loaded" : err.msg);
    int same_ids = backwards != NULL;
    for (size_t i = 0; i < sizeof cases / sizeof *cases && same_ids; i++) {
        long na = encode(tt, cases[i].text, 0, &ids, &cap);
        uint32_t first[8];
        memcpy(first, ids, (size_t)(na > 0 ? na : 0) * sizeof *ids);
        long nb = encode(backwards, cases[i].text, 0, &ids, &cap);
        same_ids = na > 0 && na <= 8 && ids_equal(first, na, ids, nb);
    }
    ok(same_ids, "ranks in any line order: same ids");
    tokenizer_free(backwards);

    // Added token: matched only with parse_special; decode shows or hides it.
    long n = encode(tj, "ab<|end|>ab", 1, &ids, &cap);
    uint32_t want_special[] = {257, 262, 257};
    ok(ids_equal(ids, n, want_special, 3), "special token parsed");
    n = encode(tj, "ab<|end|>", 0, &ids, &cap);
    ok(n > 2 && ids[1] != 262, "special token name is plain text without parse_special");
    is_int(tokenizer_token_id(tj, "<|end|>", 7), 262, "token_id of the added token");
    is_int(tokenizer_is_special(tj, 262), 1, "added token is special");
    uint32_t seq[] = {257, 262, 260};
    char *text = NULL;
    size_t tcap = 0;
    long len = tokenizer_decode(tj, seq, 3, 0, &text, &tcap, 0, &err);
    ok(len == 11 && memcmp(text, "ab<|end|> a", 11) == 0, "decode shows the special token");
    len = tokenizer_decode(tj, seq, 3, 1, &text, &tcap, 0, &err);
    ok(len == 4 && memcmp(text, "ab a", 4) == 0, "decode skips it on request");
    uint32_t bad_id = 9999;
    ok(tokenizer_decode(tj, &bad_id, 1, 0, &text, &tcap, 0, &err) < 0 && strstr(err.msg, "9999"),
       "decode rejects an unknown id (%s)", err.msg);

    // Invalid UTF-8 is an error naming the byte.
    ok(tokenizer_encode(tt, "ab\xff", 3, 0, &ids, &cap, 0, NULL, &err) < 0 && strstr(err.msg, "byte 2"),
       "invalid UTF-8 rejected (%s)", err.msg);

    // Offsets: each token starts where the previous one's bytes end; ids append after n.
    uint32_t *offsets = NULL;
    const char *s = "x aab\n\n  abc";
    ids[0] = 7;
    n = tokenizer_encode(tt, s, strlen(s), 0, &ids, &cap, 1, &offsets, &err);
    int offsets_ok = n > 1 && ids[0] == 7;
    size_t expect = 0;
    for (long i = 1; i < n && offsets_ok; i++) {
        size_t tl;
        tokenizer_token_bytes(tt, ids[i], &tl);
        offsets_ok = offsets[i] == expect;
        expect += tl;
    }
    ok(offsets_ok && expect == strlen(s), "offsets tile the text");
    free(offsets);

    // Heap merge equals the scanning merge on random pieces of a small alphabet.
    Err e2;
    ByteLevelBpe *b = bytelevel_load_tiktoken(tmp_path("tiny.tiktoken"), &e2);
    int same = b != NULL;
    srand(7);
    for (int trial = 0; trial < 2000 && same; trial++) {
        char piece[32];
        size_t plen = 1 + (size_t)rand() % 16;   // the scanning merge takes at most 16 parts
        for (size_t i = 0; i < plen; i++) piece[i] = "aabc "[rand() % 5];
        uint32_t a[32], c[32];
        long na = bytelevel_bpe_piece(b, piece, plen, 0, a), nc = bytelevel_bpe_piece(b, piece, plen, 1, c);
        same = na > 0 && ids_equal(a, na, c, nc);
    }
    ok(same, "heap merge == scanning merge on 2000 random pieces");
    static const char *const tiny_text[] = {"a", "b", "c", "aab", " ", "x", "1", "\n", "\xc3\xa9", "\xe6\x97\xa5"};
    ok(b && same_as_plain(b, 1, tiny_text, 10, 2000, 8), "encoder (segments, cache) == plain merge on 2000 random texts");
    bytelevel_free(b);
    free(ids);
    free(text);
    tokenizer_free(tt);
    tokenizer_free(tj);
}

// The whole of a file, NUL-terminated (NULL when unreadable).
static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)n + 1);
    *len = text ? fread(text, 1, (size_t)n, f) : 0;
    if (text) text[*len] = 0;
    fclose(f);
    return text;
}

// Both loaders of a tokenizer.json text: the scanner's (NULL when it falls back) and jansson's.
static void load_both(const char *text, size_t len, ByteLevelBpe **fast, int *fallback, ByteLevelBpe **tree)
{
    Err err = {{0}};
    *fast = bytelevel_load_json_text(text, len, "t.json", fallback, &err);
    json_error_t je;
    json_t *root = json_loadb(text, len, 0, &je);
    *tree = root ? bytelevel_load_json(root, "t.json", &err) : NULL;
    json_decref(root);
}

// Same ids for random texts over alphabet (NUL-separated UTF-8 strings), in every merge mode
// of bytelevel_bpe_piece: the heap, the plain merge from bytes, and the other tokenizer's heap.
static int same_merges(const ByteLevelBpe *a, const ByteLevelBpe *b, const char *const *alphabet, size_t n_alphabet,
                       int trials, unsigned seed)
{
    srand(seed);
    for (int trial = 0; trial < trials; trial++) {
        char text[512];
        size_t len = 0, parts = 1 + (size_t)rand() % 40;
        for (size_t i = 0; i < parts; i++) {
            const char *s = alphabet[(size_t)rand() % n_alphabet];
            if (len + strlen(s) >= sizeof text) break;
            memcpy(text + len, s, strlen(s));
            len += strlen(s);
        }
        uint32_t x[512], y[512], z[512];
        long nx = bytelevel_bpe_piece(a, text, len, 1, x), ny = bytelevel_bpe_piece(a, text, len, 2, y);
        long nz = bytelevel_bpe_piece(b, text, len, 1, z);
        if (nx < 0 || !ids_equal(x, nx, y, ny) || !ids_equal(x, nx, z, nz)) {
            printf("# merges differ on '%.*s'\n", (int)len, text);
            return 0;
        }
    }
    return 1;
}

// bytelevel_load_json_text reads what jansson reads, and falls back on anything unusual.
static void test_json_scanner(void)
{
    write_tiny_json(tmp_path("scan.json"), 0);
    size_t len;
    char *text = slurp(tmp_path("scan.json"), &len);
    json_error_t je;
    json_t *root = json_loadb(text, len, 0, &je);
    static const char *const tiny_alphabet[] = {"a", "b", "c", " ", "x", "1", "\n"};
    // Layouts: as dumped; indented with every non-ASCII character escaped (\u0120 for the
    // space's character); merges before vocab.
    char *variants[3] = {text, json_dumps(root, JSON_INDENT(2) | JSON_ENSURE_ASCII), NULL};
    json_t *model = json_object_get(root, "model"), *reordered = json_object();
    json_object_set(reordered, "merges", json_object_get(model, "merges"));
    json_object_set(reordered, "type", json_object_get(model, "type"));
    json_object_set(reordered, "vocab", json_object_get(model, "vocab"));
    json_object_set_new(root, "model", reordered);
    variants[2] = json_dumps(root, JSON_COMPACT);
    const char *names[] = {"as dumped", "indented, \\u escapes", "merges before vocab"};
    for (int k = 0; k < 3; k++) {
        ByteLevelBpe *fast, *tree;
        int fallback;
        load_both(variants[k], strlen(variants[k]), &fast, &fallback, &tree);
        ok(fast && tree && bytelevel_fingerprint(fast) == bytelevel_fingerprint(tree) &&
               same_merges(fast, tree, tiny_alphabet, 7, 300, 11),
           "tokenizer.json scanner, %s: read without falling back, same tokenizer as jansson's", names[k]);
        bytelevel_free(fast);
        bytelevel_free(tree);
    }
    // Unusual text: the scanner hands it back, jansson's path decides.
    struct {
        const char *find, *replace, *what;
        int loads;
    } unusual[] = {
        {"\"vocab\": {", "\"vocab\": {\"!\": 300, ", "a key twice (jansson keeps the last)", 1},
        {"\"!\": 33", "\"!\": 33.0", "an id written as a real", 0},
        {"\"vocab\": {", "\"vocab\": {\"\\u0000\": 300, ", "a key holding NUL", 0},
        {"\"merges\": [", "\"merges\": [\"a b c\", ", "a merge of three parts", 0},
        {"\"model\": {", "\"model\": {\"vocab\": {}, ", "model.vocab twice", 1},
    };
    for (size_t i = 0; i < sizeof unusual / sizeof *unusual; i++) {
        const char *at = strstr(text, unusual[i].find);
        if (!at) {
            ok(0, "fixture has %s", unusual[i].find);
            continue;
        }
        size_t head = (size_t)(at - text), find_len = strlen(unusual[i].find), rep_len = strlen(unusual[i].replace);
        char *bad = malloc(len + rep_len + 1);
        memcpy(bad, text, head);
        memcpy(bad + head, unusual[i].replace, rep_len);
        memcpy(bad + head + rep_len, at + find_len, len - head - find_len + 1);
        ByteLevelBpe *fast, *tree;
        int fallback;
        load_both(bad, strlen(bad), &fast, &fallback, &tree);
        ok(!fast && fallback && (tree != NULL) == unusual[i].loads, "tokenizer.json scanner falls back on %s (jansson: %s)",
           unusual[i].what, tree ? "loads" : "rejects");
        bytelevel_free(fast);
        bytelevel_free(tree);
        free(bad);
    }
    json_decref(root);
    free(variants[1]);
    free(variants[2]);
    free(text);
}

static void test_load_errors(void)
{
    struct {
        int mutate;
        const char *want;
    } cases[] = {
        {1, "pre_tokenizer type Whitespace is not supported"},
        {2, "model.type WordPiece is not supported"},
        {3, "pre_tokenizer Split pattern is not supported"},
        {4, "model.merges[0] names a token not in model.vocab"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        write_tiny_json(tmp_path("bad.json"), cases[i].mutate);
        Err err = {{0}};
        Tokenizer *t = tokenizer_load(tmp_path("bad.json"), &err);
        ok(!t && strstr(err.msg, cases[i].want) && strstr(err.msg, "bad.json"), "rejected: %s", err.msg);
        tokenizer_free(t);
    }
    const char *bad_lines[][2] = {
        {"IQ== 0\nnot-base64!! 1\n", ":2: not a tiktoken rank line"},
        {"IQ== 0\nIQ== x\n", ":2: not a tiktoken rank line"},
        {"IQ== 0\nIg== 0\n", "rank 0 appears twice"},
        {"IQ== 0\n", "byte 0x00 has no token"},
        // the line reader looks for the rank from the end of the line: each part of a line checked
        {"IQ== 0\nIg==  1\n", ":2: not a tiktoken rank line"},            // two spaces
        {"IQ== 0\nIg== 1 \n", ":2: not a tiktoken rank line"},            // a space after the rank
        {"IQ== 0\nIg==1\n", ":2: not a tiktoken rank line"},              // no space
        {"IQ== 0\n 1\n", ":2: not a tiktoken rank line"},                 // no base64
        {"IQ== 0\nIg== 12345678901\n", ":2: not a tiktoken rank line"},   // 11 digits
        {"IQ== 0\nIg== 1073741824\n", ":2: not a tiktoken rank line"},    // 2^30
        {"IQ== 0\nI g= 1\n", ":2: not a tiktoken rank line"},             // a space in the base64
        {"IQ== 0\nIg==IQ== 1\n", ":2: not a tiktoken rank line"},         // padding before the last group
        {"IQ== 0\nI=g= 1\n", ":2: not a tiktoken rank line"},             // padding inside a group
        {"IQ== 0\nIg= 1\n", ":2: not a tiktoken rank line"},              // not a multiple of 4
        {"IQ== 0\nIg== 1\nIw== 1\n", ":3: rank 1 appears twice"},
    };
    for (size_t i = 0; i < sizeof bad_lines / sizeof *bad_lines; i++) {
        FILE *f = fopen(tmp_path("bad.tiktoken"), "w");
        fputs(bad_lines[i][0], f);
        fclose(f);
        Err err = {{0}};
        Tokenizer *t = tokenizer_load(tmp_path("bad.tiktoken"), &err);
        ok(!t && strstr(err.msg, bad_lines[i][1]), "rejected tiktoken file: %s", err.msg);
        tokenizer_free(t);
    }
    Err err = {{0}};
    Tokenizer *t = tokenizer_load(tmp_path("no-such-file"), &err);
    ok(!t && strstr(err.msg, "no-such-file"), "missing path: %s", err.msg);
    mkdir(tmp_path("empty"), 0755);
    t = tokenizer_load(tmp_path("empty"), &err);
    ok(!t && strstr(err.msg, "no tokenizer.json or tokenizer.model"), "empty directory: %s", err.msg);
}

// ---- shared data: Llama 3 ------------------------------------------------------------------

// dir/sub/name (sub may be NULL) in one of four rotating buffers.
static char *path_in(const char *dir, const char *sub, const char *name)
{
    static char buf[4][1024];
    static int k;
    char *p = buf[k++ & 3];
    snprintf(p, sizeof buf[0], "%s/%s%s%s", dir, sub ? sub : "", sub ? "/" : "", name);
    return p;
}

static void diag_case(const char *label, const char *text)
{
    printf("#   %s: mismatch on '%.60s'\n", label, text);
}

// ids of a JSON array into a fresh buffer; returns the count.
static long json_ids(const json_t *a, uint32_t **out)
{
    size_t n = json_array_size(a);
    *out = malloc((n + 1) * sizeof **out);
    for (size_t i = 0; i < n; i++) (*out)[i] = (uint32_t)json_integer_value(json_array_get(a, i));
    return (long)n;
}

// The encode and decode cases of a case file: bos/eos fields add the tokenizer's own ids.
static void run_case_file(const Tokenizer *t, const char *path, const char *label)
{
    FILE *f = fopen(path, "r");
    char line[65536];
    int encode_ok = 0, encode_n = 0, decode_ok = 0, decode_n = 0;
    uint32_t *ids = NULL;
    size_t cap = 0;
    char *text = NULL;
    size_t tcap = 0;
    while (f && fgets(line, sizeof line, f)) {
        json_t *c = json_loads(line, 0, NULL);
        const char *kind = json_string_value(json_object_get(c, "kind"));
        uint32_t *want;
        long m = json_ids(json_object_get(c, "ids"), &want);
        const json_t *tv = json_object_get(c, "text");
        Err err;
        if (kind && !strcmp(kind, "encode")) {
            size_t n = 0;
            if (json_is_true(json_object_get(c, "bos"))) {
                if (n + 1 > cap) ids = realloc(ids, (cap = 64) * sizeof *ids);
                ids[n++] = (uint32_t)tokenizer_bos_id(t);
            }
            long got = tokenizer_encode(t, json_string_value(tv), json_string_length(tv), 1, &ids, &cap, n, NULL, &err);
            if (got >= 0 && json_is_true(json_object_get(c, "eos"))) {
                if ((size_t)got + 1 > cap) ids = realloc(ids, (cap = (size_t)got + 1) * sizeof *ids);
                ids[got++] = (uint32_t)tokenizer_eos_id(t);
            }
            encode_n++;
            if (ids_equal(ids, got, want, m)) encode_ok++;
            else diag_case(label, json_string_value(tv));
        } else if (kind && !strcmp(kind, "decode")) {
            long len = tokenizer_decode(t, want, (size_t)m, 0, &text, &tcap, 0, &err);
            decode_n++;
            if (len == (long)json_string_length(tv) && memcmp(text, json_string_value(tv), (size_t)len) == 0) decode_ok++;
            else diag_case(label, json_string_value(tv));
        } else if (kind && !strcmp(kind, "special")) {
            encode_n++;
            if (tokenizer_token_id(t, json_string_value(tv), json_string_length(tv)) == want[0]) encode_ok++;
        }
        free(want);
        json_decref(c);
    }
    if (f) fclose(f);
    ok(encode_n > 0 && encode_ok == encode_n, "%s: %d/%d encode cases", label, encode_ok, encode_n);
    if (decode_n) ok(decode_ok == decode_n, "%s: %d/%d decode cases", label, decode_ok, decode_n);
    free(ids);
    free(text);
}

// Fixture of {"text", "ids", "ids_special"?} lines (gzip): both parse modes must equal the references.
static void run_fixture(const Tokenizer *t, const char *name, const char *label)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/fixtures/tok/%s", TOP_DIR, name);
    gzFile f = gzopen(path, "rb");
    if (!f) {
        ok(0, "%s: cannot open %s", label, path);
        return;
    }
    static char line[1 << 20];
    int n = 0, good = 0;
    uint32_t *ids = NULL;
    size_t cap = 0;
    while (gzgets(f, line, sizeof line)) {
        json_t *c = json_loads(line, JSON_ALLOW_NUL, NULL);
        const json_t *tv = json_object_get(c, "text");
        uint32_t *want, *want_special;
        long m = json_ids(json_object_get(c, "ids"), &want);
        const json_t *ws = json_object_get(c, "ids_special");
        long ms = json_ids(ws ? ws : json_object_get(c, "ids"), &want_special);
        Err err;
        long got = tokenizer_encode(t, json_string_value(tv), json_string_length(tv), 0, &ids, &cap, 0, NULL, &err);
        int plain = ids_equal(ids, got, want, m);
        got = tokenizer_encode(t, json_string_value(tv), json_string_length(tv), 1, &ids, &cap, 0, NULL, &err);
        int special = ids_equal(ids, got, want_special, ms);
        n++;
        if (plain && special) good++;
        else diag_case(label, json_string_value(tv));
        free(want);
        free(want_special);
        json_decref(c);
    }
    gzclose(f);
    ok(n > 0 && good == n, "%s: %d/%d texts equal the references (ordinary and special)", label, good, n);
    free(ids);
}

static uint64_t fnv1a64(const uint32_t *ids, size_t n, uint64_t h)
{
    for (size_t i = 0; i < n; i++)
        for (int k = 0; k < 4; k++) {
            h ^= (ids[i] >> (8 * k)) & 0xff;
            h *= 0x100000001b3ull;
        }
    return h;
}

// Every Alpaca row: instruction, input, output, text (when present) as ordinary text, then the
// alpaca-lora prompt + "<|end_of_text|>" with specials parsed; hashed as compare.py does.
static void run_alpaca(const Tokenizer *t, const char *data, const char *label)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/fixtures/tok/alpaca-ids.txt.gz", TOP_DIR);
    gzFile f = gzopen(path, "rb");
    char line[512], file[256] = "";
    json_t *rows = NULL;
    int n = 0, good = 0;
    uint32_t *ids = NULL;
    size_t cap = 0;
    char *prompt = NULL;
    while (f && gzgets(f, line, sizeof line)) {
        char name[256];
        long row, count;
        unsigned long long want;
        if (sscanf(line, "%255s %ld %ld %llx", name, &row, &count, &want) != 4) break;
        if (strcmp(name, file) != 0) {
            json_decref(rows);
            rows = json_load_file(path_in(data, "alpaca", name), 0, NULL);
            snprintf(file, sizeof file, "%s", name);
        }
        const json_t *r = json_array_get(rows, (size_t)row);
        const char *fields[] = {"instruction", "input", "output", "text"};
        size_t total = 0;
        uint64_t h = 0xcbf29ce484222325ull;
        Err err;
        for (int k = 0; k < 4; k++) {
            const json_t *v = json_object_get(r, fields[k]);
            if (k == 3 && !v) continue;
            const char *s = v ? json_string_value(v) : "";
            long got = tokenizer_encode(t, s, v ? json_string_length(v) : 0, 0, &ids, &cap, 0, NULL, &err);
            if (got < 0) break;
            h = fnv1a64(ids, (size_t)got, h);
            total += (size_t)got;
        }
        const char *ins = json_string_value(json_object_get(r, "instruction"));
        const char *in = json_string_value(json_object_get(r, "input"));
        const char *out = json_string_value(json_object_get(r, "output"));
        ins = ins ? ins : "";
        out = out ? out : "";
        size_t need = strlen(ins) + (in ? strlen(in) : 0) + strlen(out) + 400;
        prompt = realloc(prompt, need);
        if (in && *in)
            snprintf(prompt, need,
                     "Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n%s"
                     "\n\n### Input:\n%s\n\n### Response:\n%s<|end_of_text|>", ins, in, out);
        else
            snprintf(prompt, need,
                     "Below is an instruction that describes a task. Write a response that appropriately completes "
                     "the request.\n\n### Instruction:\n%s\n\n### Response:\n%s<|end_of_text|>", ins, out);
        long got = tokenizer_encode(t, prompt, strlen(prompt), 1, &ids, &cap, 0, NULL, &err);
        if (got >= 0) {
            h = fnv1a64(ids, (size_t)got, h);
            total += (size_t)got;
        }
        n++;
        if (got >= 0 && (long)total == count && h == want) good++;
        else if (n - good <= 3) printf("#   %s: %s row %ld differs\n", label, name, row);
    }
    if (f) gzclose(f);
    json_decref(rows);
    ok(n > 4000 && good == n, "%s: %d/%d Alpaca rows equal the references", label, good, n);
    free(ids);
    free(prompt);
}

typedef struct {
    const Tokenizer *t;
    const char *text;
    size_t len;
    const uint32_t *want;
    long n;
    int ok;
} ThreadJob;

static void *encode_repeatedly(void *arg)
{
    ThreadJob *j = arg;
    uint32_t *ids = NULL;
    size_t cap = 0;
    Err err;
    j->ok = 1;
    for (int r = 0; r < 20 && j->ok; r++) {
        long n = tokenizer_encode(j->t, j->text, j->len, r & 1, &ids, &cap, 0, NULL, &err);
        j->ok = ids_equal(ids, n, j->want, j->n);
    }
    free(ids);
    return NULL;
}

// Four threads share one Tokenizer; each must get the single-threaded ids every time.
static void test_threads(const Tokenizer *t)
{
    static const char *texts[] = {
        "The quick brown fox jumps over the lazy dog. 1234567 DON'T\n\n  stop",
        "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\xe3\x81\xae\xe3\x83\x86\xe3\x82\xad\xe3\x82\xb9\xe3\x83\x88 and "
        "\xe4\xb8\xad\xe6\x96\x87\xe6\x96\x87\xe6\x9c\xac, mixed",
        "\xf0\x9f\x91\xa8\xe2\x80\x8d\xf0\x9f\x91\xa9\xe2\x80\x8d\xf0\x9f\x91\xa7 family \t\t tabs",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    };
    ThreadJob jobs[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        uint32_t *ids = NULL;
        size_t cap = 0;
        Err err;
        jobs[i] = (ThreadJob){t, texts[i], strlen(texts[i]), NULL, 0, 0};
        jobs[i].n = tokenizer_encode(t, texts[i], strlen(texts[i]), 0, &ids, &cap, 0, NULL, &err);
        jobs[i].want = ids;
    }
    for (int i = 0; i < 4; i++) pthread_create(&th[i], NULL, encode_repeatedly, &jobs[i]);
    int all = 1;
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        all &= jobs[i].ok;
        free((void *)jobs[i].want);
    }
    ok(all, "4 threads sharing one tokenizer get the single-threaded ids");
}

// Time to encode n bytes of one character repeated.
static double time_run(const Tokenizer *t, const char *ch, size_t n)
{
    size_t cl = strlen(ch);
    char *s = malloc(n + 4);
    size_t len = 0;
    while (len + cl <= n) {
        memcpy(s + len, ch, cl);
        len += cl;
    }
    uint32_t *ids = NULL;
    size_t cap = 0;
    Err err;
    double t0 = now();
    long got = tokenizer_encode(t, s, len, 0, &ids, &cap, 0, NULL, &err);
    double dt = now() - t0;
    free(s);
    free(ids);
    return got > 0 ? dt : 1e9;
}

static void test_linear(const Tokenizer *t)
{
    const char *chars[] = {"a", " ", "1", "\n", "\xe6\x97\xa5", "'"};
    for (int i = 0; i < 6; i++) {
        double small = time_run(t, chars[i], 1 << 18), big = time_run(t, chars[i], 1 << 20);
        // Linear up to the log factor of the heap and caches: 4x the input takes 4-8x the time;
        // quadratic (tiktoken on such pieces) would be 16x. Tiny times are noise.
        ok(big < 5.0 * SLOWDOWN && (big < 0.05 || big < 11 * small),
           "1 MB of char %d in %.0f ms (256 KB: %.0f ms): linear", i, big * 1e3, small * 1e3);
    }
}

// Llama 3's merges three ways: the encoder's heap (whole characters, pure-pair table), the
// plain merge from bytes, and the other loader (tokenizer.model against tokenizer.json read
// by the scanner, and the scanner against jansson's tree), on random text rich in CJK, other
// scripts and the punctuation around them.
static void test_llama3_merges(const char *llama3)
{
    static const char *const alphabet[] = {
        "的", "一", "是", "了", "我", "不", "人", "在", "他", "有", "这", "个", "上", "们", "来", "到", "时",
        "大", "地", "为", "子", "中", "你", "说", "生", "国", "年", "着", "就", "那", "和", "要", "她", "出",
        "也", "得", "里", "后", "自", "以", "会", "家", "可", "下", "而", "过", "天", "去", "能", "对", "小",
        "多", "然", "于", "心", "学", "么", "之", "都", "好", "看", "起", "发", "当", "没", "成", "只", "如",
        "事", "把", "还", "用", "第", "样", "道", "想", "作", "种", "开", "美", "总", "从", "无", "情", "己",
        "面", "最", "女", "但", "现", "前", "些", "所", "同", "日", "手", "又", "行", "意", "动", "龘", "齉",
        "鬱", "灪", "。", "，", "、", "：", "“", "”", "（", "）", "！", "？", "《", "》", "·", "…", "—",
        "日本", "語", "の", "テ", "キ", "ス", "ト", "は", "で", "す", "한", "국", "어", "입", "니", "다",
        "при", "вет", "мир", "ы", "й", "α", "β", "γ", "ω", "ά", "é", "è", "ü", "ß", "ñ", "ç", "ø", "å",
        "ع", "ر", "ب", "ي", "ה", "ש", "ל", "ו", "ม", "า", "ก", "क", "ा", "न", "\u0301", "\u200d", "🦙", "👍",
        "\u00a0", "\u3000", " ", "  ", "a", "b", "e", "s", "t", "the", "ing", "1", "2", "0", "x", "'", "\n", ".",
    };
    size_t n_alphabet = sizeof alphabet / sizeof *alphabet;
    Err err = {{0}};
    ByteLevelBpe *model = bytelevel_load_tiktoken(path_in(llama3, NULL, "tokenizer.model"), &err);
    size_t len = 0;
    char *text = slurp(path_in(llama3, NULL, "tokenizer.json"), &len);
    ByteLevelBpe *fast = NULL, *tree = NULL;
    int fallback = 0;
    if (text) load_both(text, len, &fast, &fallback, &tree);
    free(text);
    ok(model && fast && tree, "Llama 3 loads: tokenizer.model, tokenizer.json by the scanner and by jansson");
    // Loading uses threads (the pair table of tokenizer.model, the merges of tokenizer.json):
    // one thread and several give the same tokenizer.
    int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    ByteLevelBpe *model1 = bytelevel_load_tiktoken(path_in(llama3, NULL, "tokenizer.model"), &err);
    text = slurp(path_in(llama3, NULL, "tokenizer.json"), &len);
    ByteLevelBpe *fast1 = text ? bytelevel_load_json_text(text, len, "tokenizer.json", &fallback, &err) : NULL;
    int many = threads > 4 ? threads : 4;   // (more threads than cores is fine: the result is what counts)
    omp_set_num_threads(many);
    ByteLevelBpe *model4 = bytelevel_load_tiktoken(path_in(llama3, NULL, "tokenizer.model"), &err);
    ByteLevelBpe *fast4 = text ? bytelevel_load_json_text(text, len, "tokenizer.json", &fallback, &err) : NULL;
    free(text);
    omp_set_num_threads(threads);
    ok(model1 && fast1 && model4 && fast4 && bytelevel_fingerprint(model1) == bytelevel_fingerprint(model4) &&
       bytelevel_fingerprint(fast1) == bytelevel_fingerprint(fast4), "one thread or %d: same fingerprints", many);
    if (model1 && fast1 && model4 && fast4) {
        ok(same_merges(model1, model4, alphabet, n_alphabet, 1000, 6), "tokenizer.model: one thread == %d threads", many);
        ok(same_merges(fast1, fast4, alphabet, n_alphabet, 1000, 7), "tokenizer.json: one thread == %d threads", many);
    }
    bytelevel_free(model1);
    bytelevel_free(model4);
    bytelevel_free(fast1);
    bytelevel_free(fast4);
    if (model && fast && tree) {
        ok(bytelevel_fingerprint(fast) == bytelevel_fingerprint(tree), "scanner and jansson: same fingerprint");
        ok(same_merges(model, fast, alphabet, n_alphabet, 3000, 1), "tokenizer.model: heap == plain == tokenizer.json");
        ok(same_merges(fast, tree, alphabet, n_alphabet, 3000, 2), "tokenizer.json: heap == plain == jansson's tree");
        ok(same_merges(tree, model, alphabet, n_alphabet, 1000, 3), "jansson's tree: heap == plain == tokenizer.model");
        ok(same_as_plain(model, 1, alphabet, n_alphabet, 2000, 4), "tokenizer.model: encoder (segments, cache) == plain");
        ok(same_as_plain(fast, 1, alphabet, n_alphabet, 2000, 5), "tokenizer.json: encoder (segments, cache) == plain");
    }
    bytelevel_free(model);
    bytelevel_free(fast);
    bytelevel_free(tree);
}

static void test_llama3(const char *data)
{
    char *llama3 = strdup(path_in(data, NULL, "llama3"));
    Err err = {{0}};
    double t0 = now();
    Tokenizer *model = tokenizer_load(path_in(llama3, NULL, "tokenizer.model"), &err);
    double load_ms = (now() - t0) * 1e3;
    ok(model != NULL, "tokenizer.model loads (%s)", err.msg);
    ok(load_ms < 100.0 * SLOWDOWN, "tokenizer.model (128K ranks) loads in %.1f ms", load_ms);
    t0 = now();
    Tokenizer *json = tokenizer_load(llama3, &err);
    printf("# tokenizer.json loads in %.0f ms\n", (now() - t0) * 1e3);
    ok(json != NULL, "model directory (tokenizer.json) loads (%s)", err.msg);
    if (!model || !json) return;
    is_int(tokenizer_vocab_size(json), 128256, "vocabulary of 128256");
    is_int(tokenizer_bos_id(json), 128000, "BOS from tokenizer_config.json");
    is_int(tokenizer_eos_id(json), 128001, "EOS from tokenizer_config.json");
    is_int(tokenizer_adds_bos(json), 0, "this tokenizer.json's ByteLevel post-processor adds no BOS");
    is_int(tokenizer_adds_bos(model), 1, "tokenizer.model: BOS added, as Meta's code does");
    ok(tokenizer_fingerprint(json) == tokenizer_fingerprint(model),
       "same fingerprint from tokenizer.json and tokenizer.model + tokenizer_config.json");

    // tokenizer.model alone: the built-in Llama 3.1 special-token names (llama3-tokenizer-js uses them).
    mkdir(tmp_path("l31"), 0755);
    char *target = realpath(path_in(llama3, NULL, "tokenizer.model"), NULL);
    if (!target || symlink(target, tmp_path("l31/tokenizer.model")) != 0) perror("symlink");
    free(target);
    Tokenizer *l31 = tokenizer_load(tmp_path("l31"), &err);
    ok(l31 != NULL, "tokenizer.model without tokenizer_config.json loads (%s)", err.msg);
    if (l31) {
        is_int(tokenizer_token_id(l31, "<|eom_id|>", 10), 128008, "Llama 3.1 table: <|eom_id|> is 128008");
        ok(tokenizer_fingerprint(l31) != tokenizer_fingerprint(model), "3.1 names give another fingerprint");
        run_case_file(l31, path_in(data, "tokenizer-cases", "llama3-tokenizer-js-tests.jsonl"),
                      "llama3-tokenizer-js (tokenizer.model, 3.1 names)");
        tokenizer_free(l31);
    }
    const char *meta = path_in(data, "tokenizer-cases", "meta-official-cases.jsonl");
    run_case_file(json, meta, "meta official (tokenizer.json)");
    run_case_file(model, meta, "meta official (tokenizer.model)");

    test_llama3_merges(llama3);

    run_fixture(json, "adversarial.jsonl.gz", "adversarial (tokenizer.json)");
    run_fixture(model, "adversarial.jsonl.gz", "adversarial (tokenizer.model)");
    run_fixture(json, "random-unicode.jsonl.gz", "random Unicode (tokenizer.json)");
    run_fixture(model, "random-unicode.jsonl.gz", "random Unicode (tokenizer.model)");
    run_alpaca(model, data, "alpaca (tokenizer.model)");
    if (SLOWDOWN == 1) run_alpaca(json, data, "alpaca (tokenizer.json)");   // kept short under sanitizers
    test_threads(model);
    test_threads(json);
    test_linear(model);
    tokenizer_free(model);
    tokenizer_free(json);
    free(llama3);
}

int main(void)
{
    snprintf(tmpdir, sizeof tmpdir, "%s/toktest.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_pretok();
    test_unicode();
    test_tiny();
    test_load_errors();
    test_json_scanner();
    const char *data = tap_testdata();
    char probe[1024];
    snprintf(probe, sizeof probe, "%s/llama3/tokenizer.model", data);
    if (access(probe, R_OK) == 0) test_llama3(data);
    else printf("ok %d # SKIP shared test data not found: %s (set TESTDATA)\n", ++tap_n, probe);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) printf("# could not remove %s\n", tmpdir);
    return done_testing();
}
