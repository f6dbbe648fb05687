// SentencePiece-style BPE (lib/bpe_spm.c) against the references, through the fixtures that
// tests/fixtures/tok-spm/make_fixtures.py wrote with Hugging Face tokenizers (stories260K
// tokenizer.json) and sentencepiece (Llama 2 tokenizer.model); plus the shared tokenizer
// cases, loader errors, round trips and the time of pathological inputs.
#define _GNU_SOURCE
#include <jansson.h>
#include <stdint.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>

#include "bpe_spm.h"
#include "tap.h"

static char path_buf[4096];
static const char *data_path(const char *rel)
{
    snprintf(path_buf, sizeof path_buf, "%s/%s", tap_testdata(), rel);
    return path_buf;
}

static const char *fixture(const char *name)
{
    static char buf[4096];
    const char *top = getenv("TOP");
    snprintf(buf, sizeof buf, "%s/tests/fixtures/tok-spm/%s", top ? top : ".", name);
    return buf;
}

static SpmTokenizer *load_json_file(const char *path, Err *err)
{
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    if (!root) {
        snprintf(err->msg, sizeof err->msg, "%s: %s", path, je.text);
        return NULL;
    }
    SpmTokenizer *t = spm_load_json(root, path, err);
    json_decref(root);
    return t;
}

static SpmTokenizer *load_json_string(const char *text, Err *err)
{
    json_error_t je;
    json_t *root = json_loads(text, 0, &je);
    if (!root) {
        snprintf(err->msg, sizeof err->msg, "bad test json: %s", je.text);
        return NULL;
    }
    SpmTokenizer *t = spm_load_json(root, "test.json", err);
    json_decref(root);
    return t;
}

// ids of text, or n = -1 with err.
typedef struct {
    uint32_t *ids, *off;
    size_t cap;
    long n;
} Enc;

static Enc encode(const SpmTokenizer *t, const char *text, size_t len, int special, Err *err)
{
    Enc e = { 0 };
    e.n = spm_encode(t, text, len, special, &e.ids, &e.cap, 0, &e.off, err);
    return e;
}

static void enc_free(Enc *e) { free(e->ids), free(e->off); }

static int same_ids(const Enc *e, const json_t *want)
{
    if (e->n < 0 || (size_t)e->n != json_array_size(want)) return 0;
    for (long i = 0; i < e->n; i++)
        if (e->ids[i] != (uint32_t)json_integer_value(json_array_get(want, (size_t)i))) return 0;
    return 1;
}

static uint64_t fnv_ids(const uint32_t *ids, long n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (long i = 0; i < n; i++)
        for (int k = 0; k < 4; k++) h = (h ^ ((ids[i] >> (8 * k)) & 0xff)) * 0x100000001b3ull;
    return h;
}

// Same generator and ranges as make_fixtures.py.
static uint64_t rng_next(uint64_t *x)
{
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    return *x * 0x2545F4914F6CDD1Dull;
}

static const uint32_t ranges[][2] = {
    { 0x20, 0x7E }, { 0x20, 0x20 }, { 0x0A, 0x0A }, { 0x09, 0x09 }, { 0x30, 0x39 }, { 0xA0, 0xFF },
    { 0x300, 0x36F }, { 0x400, 0x4FF }, { 0x4E00, 0x9FFF }, { 0xAC00, 0xD7A3 }, { 0x1F300, 0x1FAFF },
    { 0x200D, 0x200D }, { 0xFE0F, 0xFE0F }, { 0x1, 0xD7FF }, { 0xE000, 0x10FFFF },
};

static size_t put_utf8(char *o, uint32_t cp)
{
    if (cp < 0x80) return o[0] = (char)cp, 1;
    if (cp < 0x800) return o[0] = (char)(0xc0 | cp >> 6), o[1] = (char)(0x80 | (cp & 0x3f)), 2;
    if (cp < 0x10000)
        return o[0] = (char)(0xe0 | cp >> 12), o[1] = (char)(0x80 | ((cp >> 6) & 0x3f)),
               o[2] = (char)(0x80 | (cp & 0x3f)), 3;
    return o[0] = (char)(0xf0 | cp >> 18), o[1] = (char)(0x80 | ((cp >> 12) & 0x3f)),
           o[2] = (char)(0x80 | ((cp >> 6) & 0x3f)), o[3] = (char)(0x80 | (cp & 0x3f)), 4;
}

static size_t random_text(uint64_t *rng, char *out)
{
    size_t n = 1 + rng_next(rng) % 400, len = 0;
    for (size_t i = 0; i < n; i++) {
        const uint32_t *r = ranges[rng_next(rng) % (sizeof ranges / sizeof ranges[0])];
        len += put_utf8(out + len, r[0] + (uint32_t)(rng_next(rng) % (r[1] - r[0] + 1)));
    }
    return len;
}

// decode(ids) == text
static int decodes_to(const SpmTokenizer *t, const Enc *e, const char *text, size_t len)
{
    Err err;
    char *out = NULL;
    size_t cap = 0;
    long n = e->n < 0 ? -1 : spm_decode(t, e->ids, (size_t)e->n, 0, &out, &cap, 0, &err);
    int ok = n >= 0 && (size_t)n == len && memcmp(out, text, len) == 0;
    free(out);
    return ok;
}

// decode(encode(text)) == text (the dummy prefix is stripped again by the decoder).
static int round_trips(const SpmTokenizer *t, const char *text, size_t len)
{
    Err err;
    Enc e = encode(t, text, len, 0, &err);
    int ok = decodes_to(t, &e, text, len);
    enc_free(&e);
    return ok;
}

static void test_adversarial(const SpmTokenizer *hf, const SpmTokenizer *sp)
{
    json_error_t je;
    FILE *f = fopen(fixture("adversarial.jsonl"), "r");
    ok(f != NULL, "fixture adversarial.jsonl opens");
    if (!f) return;
    char *line = NULL;
    size_t lc = 0;
    int n = 0, bad_hf = 0, bad_hfs = 0, bad_sp = 0, bad_dec = 0, bad_rt = 0;
    while (getline(&line, &lc, f) > 0) {
        json_t *o = json_loads(line, 0, &je);
        const json_t *tx = json_object_get(o, "text");
        const char *text = json_string_value(tx);
        size_t len = json_string_length(tx);
        Err err;
        Enc a = encode(hf, text, len, 0, &err), b = encode(hf, text, len, 1, &err),
            c = encode(sp, text, len, 0, &err);
        if (!same_ids(&a, json_object_get(o, "hf"))) bad_hf++, printf("# hf differs: %s\n", line);
        if (!same_ids(&b, json_object_get(o, "hf_special"))) bad_hfs++, printf("# hf special differs: %s\n", line);
        if (!same_ids(&c, json_object_get(o, "spm"))) bad_sp++, printf("# spm differs: %s\n", line);
        char *out = NULL;
        size_t cap = 0;
        long dn = a.n < 0 ? -1 : spm_decode(hf, a.ids, (size_t)a.n, 0, &out, &cap, 0, &err);
        const json_t *want = json_object_get(o, "hf_decode");
        if (dn < 0 || (size_t)dn != json_string_length(want) || memcmp(out, json_string_value(want), (size_t)dn))
            bad_dec++, printf("# decode differs: %s\n", line);
        // A literal "▁" decodes as a space (the reference does the same): no round trip there.
        if (!memmem(text, len, "\xe2\x96\x81", 3) && !round_trips(sp, text, len)) bad_rt++, printf("# llama2 round trip fails: %s\n", line);
        free(out);
        enc_free(&a), enc_free(&b), enc_free(&c);
        json_decref(o);
        n++;
    }
    free(line);
    fclose(f);
    ok(n > 50, "adversarial fixture has %d texts", n);
    is_int(bad_hf, 0, "stories260K tokenizer.json = HF tokenizers on adversarial text (specials as text)");
    is_int(bad_hfs, 0, "stories260K tokenizer.json = HF tokenizers on adversarial text (specials parsed)");
    is_int(bad_sp, 0, "llama2 tokenizer.model = sentencepiece on adversarial text");
    is_int(bad_dec, 0, "stories260K decode = HF decode");
    is_int(bad_rt, 0, "llama2 decode(encode(x)) == x on adversarial text");
}

// The stories260K tokenizer.json with a Metaspace pre-tokenizer instead of its normaliser, as
// make_fixtures.py makes the variants.
static const char *const variant_name[] = { "first", "always_split", "legacy" };
static const char *const variant_json[][2] = {
    { "{\"type\":\"Metaspace\",\"replacement\":\"\xe2\x96\x81\",\"prepend_scheme\":\"first\",\"split\":false}",
      "{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"ByteFallback\"},{\"type\":\"Metaspace\",\"replacement\":\"\xe2\x96\x81\",\"prepend_scheme\":\"first\",\"split\":false}]}" },
    { "{\"type\":\"Metaspace\",\"replacement\":\"\xe2\x96\x81\",\"prepend_scheme\":\"always\",\"split\":true}",
      "{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"ByteFallback\"},{\"type\":\"Metaspace\",\"replacement\":\"\xe2\x96\x81\",\"prepend_scheme\":\"always\",\"split\":true}]}" },
    { "{\"type\":\"Metaspace\",\"replacement\":\"\xe2\x96\x81\",\"add_prefix_space\":true}",
      "{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"ByteFallback\"},{\"type\":\"Metaspace\",\"replacement\":\"\xe2\x96\x81\",\"add_prefix_space\":true}]}" },
};

static void test_metaspace_variants(void)
{
    for (int v = 0; v < 3; v++) {
        Err err;
        json_t *root = json_load_file(data_path("stories260K/hf/tokenizer.json"), 0, NULL);
        json_object_set_new(root, "normalizer", json_null());
        json_object_set_new(root, "pre_tokenizer", json_loads(variant_json[v][0], 0, NULL));
        json_object_set_new(root, "decoder", json_loads(variant_json[v][1], 0, NULL));
        SpmTokenizer *t = spm_load_json(root, "variant", &err);
        json_decref(root);
        ok(t != NULL, "Metaspace variant %s loads%s%s", variant_name[v], t ? "" : ": ", t ? "" : err.msg);
        if (!t) continue;
        FILE *f = fopen(fixture("adversarial.jsonl"), "r");
        char *line = NULL, key[64];
        size_t lc = 0;
        int n = 0, bad = 0, bad_dec = 0;
        while (f && getline(&line, &lc, f) > 0) {
            json_t *o = json_loads(line, 0, NULL);
            const json_t *tx = json_object_get(o, "text");
            Enc e = encode(t, json_string_value(tx), json_string_length(tx), 1, &err);
            if (!same_ids(&e, json_object_get(o, variant_name[v]))) bad++, printf("# %s differs: %s", variant_name[v], line);
            snprintf(key, sizeof key, "%s_decode", variant_name[v]);
            const json_t *want = json_object_get(o, key);
            char *out = NULL;
            size_t cap = 0;
            long dn = e.n < 0 ? -1 : spm_decode(t, e.ids, (size_t)e.n, 0, &out, &cap, 0, &err);
            if (dn < 0 || (size_t)dn != json_string_length(want) || memcmp(out, json_string_value(want), (size_t)dn))
                bad_dec++, printf("# %s decode differs: %s", variant_name[v], line);
            free(out);
            enc_free(&e);
            json_decref(o);
            n++;
        }
        free(line);
        if (f) fclose(f);
        ok(n > 50 && bad == 0, "Metaspace %s = HF tokenizers on %d adversarial texts (specials parsed)", variant_name[v], n);
        is_int(bad_dec, 0, "Metaspace %s decode = HF decode", variant_name[v]);
        spm_free(t);
    }
}

static void test_alpaca(const SpmTokenizer *hf, const SpmTokenizer *sp)
{
    FILE *f = fopen(fixture("alpaca.txt"), "r");
    ok(f != NULL, "fixture alpaca.txt opens");
    if (!f) return;
    char name[256], last[256] = "";
    json_t *data = NULL;
    unsigned long idx;
    char hh[17], hs[17];
    int n = 0, bad_hf = 0, bad_sp = 0, missing = 0;
    while (fscanf(f, "%255s %lu %16s %16s", name, &idx, hh, hs) == 4) {
        if (strcmp(name, last) != 0) {
            json_decref(data);
            char rel[300];
            snprintf(rel, sizeof rel, "alpaca/%s", name);
            data = json_load_file(data_path(rel), 0, NULL);
            snprintf(last, sizeof last, "%s", name);
        }
        const json_t *r = json_array_get(data, idx);
        if (!r) {
            missing++;
            continue;
        }
        const char *fields[3] = { "instruction", "input", "output" };
        char *text = NULL;
        size_t tl = 0;
        FILE *m = open_memstream(&text, &tl);
        for (int k = 0; k < 3; k++) {
            const json_t *v = json_object_get(r, fields[k]);
            if (k) fputc('\n', m);
            fwrite(json_string_value(v) ? json_string_value(v) : "", 1, json_string_length(v), m);
        }
        fclose(m);
        Err err;
        Enc a = encode(hf, text, tl, 0, &err), b = encode(sp, text, tl, 0, &err);
        char got[17];
        snprintf(got, sizeof got, "%016llx", (unsigned long long)fnv_ids(a.ids, a.n));
        if (a.n < 0 || strcmp(got, hh) != 0) bad_hf++, printf("# hf differs on %s %lu\n", name, idx);
        snprintf(got, sizeof got, "%016llx", (unsigned long long)fnv_ids(b.ids, b.n));
        if (b.n < 0 || strcmp(got, hs) != 0) bad_sp++, printf("# spm differs on %s %lu\n", name, idx);
        enc_free(&a), enc_free(&b);
        free(text);
        n++;
    }
    json_decref(data);
    fclose(f);
    ok(n > 4000 && missing == 0, "alpaca: %d records compared, %d missing", n, missing);
    is_int(bad_hf, 0, "stories260K tokenizer.json = HF tokenizers on every alpaca record");
    is_int(bad_sp, 0, "llama2 tokenizer.model = sentencepiece on every alpaca record");
}

static void test_random(const SpmTokenizer *hf, const SpmTokenizer *sp)
{
    FILE *f = fopen(fixture("random.txt"), "r");
    ok(f != NULL, "fixture random.txt opens");
    if (!f) return;
    uint64_t rng = 0x5eed5eed;
    char text[400 * 4 + 1], hh[17], hs[17], got[17];
    unsigned long idx;
    int n = 0, bad_hf = 0, bad_sp = 0, bad_rt = 0;
    size_t bytes = 0;
    while (fscanf(f, "%lu %16s %16s", &idx, hh, hs) == 3) {
        size_t len = random_text(&rng, text);
        bytes += len;
        Err err;
        Enc a = encode(hf, text, len, 0, &err), b = encode(sp, text, len, 0, &err);
        snprintf(got, sizeof got, "%016llx", (unsigned long long)fnv_ids(a.ids, a.n));
        if (a.n < 0 || strcmp(got, hh) != 0) bad_hf++, printf("# hf differs on random text %lu\n", idx);
        snprintf(got, sizeof got, "%016llx", (unsigned long long)fnv_ids(b.ids, b.n));
        if (b.n < 0 || strcmp(got, hs) != 0) bad_sp++, printf("# spm differs on random text %lu\n", idx);
        if (!memmem(text, len, "\xe2\x96\x81", 3) && (!round_trips(sp, text, len) || !round_trips(hf, text, len)))
            bad_rt++;
        enc_free(&a), enc_free(&b);
        n++;
    }
    fclose(f);
    ok(n >= 6000, "random unicode: %d texts, %zu bytes", n, bytes);
    is_int(bad_hf, 0, "stories260K tokenizer.json = HF tokenizers on random unicode");
    is_int(bad_sp, 0, "llama2 tokenizer.model = sentencepiece on random unicode");
    is_int(bad_rt, 0, "decode(encode(x)) == x on random unicode (both tokenizers)");
}

// The shared Llama 2 cases: encode with BOS.
static void test_cases(const SpmTokenizer *sp)
{
    const char *files[] = { "tokenizer-cases/llama2-llama2c-cases.jsonl", "tokenizer-cases/llama2-tokenizer-js-tests.jsonl" };
    for (int k = 0; k < 2; k++) {
        FILE *f = fopen(data_path(files[k]), "r");
        if (!f) {
            printf("ok %d # SKIP %s not found\n", ++tap_n, data_path(files[k]));
            continue;
        }
        char *line = NULL;
        size_t lc = 0;
        int n = 0, bad = 0;
        while (getline(&line, &lc, f) > 0) {
            json_t *o = json_loads(line, 0, NULL);
            const char *kind = json_string_value(json_object_get(o, "kind"));
            if (!kind || strcmp(kind, "encode") != 0) {
                json_decref(o);
                continue;
            }
            const json_t *tx = json_object_get(o, "text");
            Enc e = { 0 };
            Err err;
            if (json_is_true(json_object_get(o, "bos"))) {
                e.cap = 16;
                e.ids = malloc(e.cap * sizeof *e.ids);
                e.off = malloc(e.cap * sizeof *e.off);
                e.ids[0] = (uint32_t)spm_bos_id(sp);
                e.n = spm_encode(sp, json_string_value(tx), json_string_length(tx), 0, &e.ids, &e.cap, 1, &e.off, &err);
            } else {
                e = encode(sp, json_string_value(tx), json_string_length(tx), 0, &err);
            }
            if (!same_ids(&e, json_object_get(o, "ids"))) bad++, printf("# differs: %s", line);
            enc_free(&e);
            json_decref(o);
            n++;
        }
        free(line);
        fclose(f);
        ok(n > 0 && bad == 0, "%s: %d encode cases, %d differ", files[k], n, bad);
    }
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);   // CPU time: other load on the machine does not count
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Time stays O(n log n): a 1 MB run of one character costs about 20x a 64 KB run, far from
// the 256x of a quadratic merge (the bound, 64x, leaves room for sanitizers and caches);
// the ids equal the references' (runs.txt).
static void test_long_runs(const SpmTokenizer *sp, const SpmTokenizer *hf)
{
    FILE *f = fopen(fixture("runs.txt"), "r");
    ok(f != NULL, "fixture runs.txt opens");
    if (!f) return;
    unsigned cp;
    size_t count;
    char hh[17], hs[17], got_h[17], got_s[17];
    while (fscanf(f, "%x %zu %16s %16s", &cp, &count, hh, hs) == 4) {
        char ch[4];
        size_t cl = put_utf8(ch, cp), len = count * cl, small = count / 16 * cl;
        char *text = malloc(len);
        for (size_t i = 0; i < count; i++) memcpy(text + i * cl, ch, cl);
        Err err;
        double t0 = now();
        Enc a = encode(sp, text, small, 0, &err);
        double t1 = now();
        Enc b = encode(sp, text, len, 0, &err);
        double t2 = now();
        Enc c = encode(hf, text, len, 0, &err);
        double ratio = (t2 - t1) / (t1 - t0 + 1e-6);
        snprintf(got_s, sizeof got_s, "%016llx", (unsigned long long)fnv_ids(b.ids, b.n));
        snprintf(got_h, sizeof got_h, "%016llx", (unsigned long long)fnv_ids(c.ids, c.n));
        // (A run that takes under 0.3 s CPU passes outright: quadratic would take minutes.)
        ok(a.n > 0 && (ratio < 64 || t2 - t1 < 0.3), "llama2: run of %zu x U+%04X in %.3f s (%.1fx the 1/16 length)", count, cp,
           t2 - t1, ratio);
        ok(strcmp(got_s, hs) == 0 && strcmp(got_h, hh) == 0, "run of U+%04X: ids equal sentencepiece and HF", cp);
        ok(decodes_to(sp, &b, text, len) && decodes_to(hf, &c, text, len), "run of U+%04X round-trips", cp);
        enc_free(&a), enc_free(&b), enc_free(&c);
        free(text);
    }
    fclose(f);
}

static void test_offsets(const SpmTokenizer *hf)
{
    Err err;
    const char *text = "hi </s> x";
    Enc e = encode(hf, text, strlen(text), 1, &err);
    // HF: tokens ['▁h', 'i', '▁', '</s>', '▁', '▁', 'x'] at offsets 0 1 2 3 7 7 8
    uint32_t want[] = { 0, 1, 2, 3, 7, 7, 8 };
    int good = e.n == 7;
    for (int i = 0; good && i < 7; i++) good = e.off[i] == want[i];
    ok(good, "offsets of \"hi </s> x\" are 0 1 2 3 7 7 8");
    size_t cap = e.cap;
    long n2 = spm_encode(hf, "ab", 2, 0, &e.ids, &cap, (size_t)e.n, &e.off, &err);
    ok(n2 > e.n && e.off[e.n] == 0, "appending keeps earlier ids and offsets");
    enc_free(&e);
    Enc bad = encode(hf, "ok\xff", 3, 0, &err);
    ok(bad.n == -1 && strstr(err.msg, "invalid UTF-8 at byte 2"), "invalid UTF-8 is refused: %s", err.msg);
    enc_free(&bad);
}

static void test_queries(const SpmTokenizer *hf, const SpmTokenizer *sp)
{
    size_t len;
    const char *b = spm_token_bytes(sp, 13, &len);
    ok(b && len == 1 && b[0] == '\n', "llama2 token 13 is the byte \\n");
    b = spm_token_bytes(sp, 306, &len);
    ok(b && len == 2 && memcmp(b, " I", 2) == 0, "llama2 token 306 (\"\xe2\x96\x81I\") shows as \" I\"");
    ok(spm_token_bytes(sp, 32000, &len) == NULL, "id out of range has no bytes");
    ok(spm_is_special(sp, 1) && spm_is_special(sp, 2) && !spm_is_special(sp, 13), "llama2 specials: <s> </s>");
    is_int(spm_bos_id(sp), 1, "llama2 BOS");
    is_int(spm_eos_id(sp), 2, "llama2 EOS");
    ok(spm_adds_bos(sp) && spm_adds_bos(hf), "both add BOS");
    is_int(spm_vocab_size(sp), 32000, "llama2 vocabulary");
    is_int(spm_vocab_size(hf), 512, "stories260K vocabulary");
    is_int(spm_token_id(hf, "</s>", 4), 2, "token_id(</s>)");
    is_int(spm_token_id(hf, "nope-not-here", 13), -1, "token_id of an unknown string");
    ok(spm_fingerprint(hf) != spm_fingerprint(sp) && spm_fingerprint(hf) != 0, "fingerprints differ");
    char *out = NULL;
    size_t cap = 0;
    uint32_t ids[] = { 1, 306, 4658, 2 };
    long n = spm_decode(sp, ids, 4, 1, &out, &cap, 0, NULL);
    ok(n == 9 && strcmp(out, "I believe") == 0, "decode skipping specials: '%s'", out ? out : "");
    n = spm_decode(sp, ids, 4, 0, &out, &cap, 0, NULL);
    ok(n > 0 && strcmp(out, "<s> I believe</s>") == 0, "decode showing specials: '%s'", out ? out : "");
    uint32_t badid = 99999;
    Err err;
    ok(spm_decode(sp, &badid, 1, 0, &out, &cap, 0, &err) == -1 && strstr(err.msg, "out of range"),
       "decode refuses an id out of range");
    free(out);
}

static void test_bad_files(void)
{
    Err err;
    struct { const char *json, *want; } cases[] = {
        { "{\"model\":{\"type\":\"WordPiece\",\"vocab\":{}}}", "model.type WordPiece" },
        { "{\"normalizer\":{\"type\":\"Lowercase\"},\"model\":{\"type\":\"BPE\",\"byte_fallback\":true,\"vocab\":{\"a\":0},\"merges\":[]}}",
          "normalizer Lowercase" },
        { "{\"pre_tokenizer\":{\"type\":\"ByteLevel\"},\"normalizer\":{\"type\":\"Prepend\",\"prepend\":\"\xe2\x96\x81\"},"
          "\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}", "pre_tokenizer ByteLevel" },
        { "{\"pre_tokenizer\":{\"type\":\"Metaspace\"},\"decoder\":{\"type\":\"WordPiece\"},"
          "\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}", "decoder WordPiece" },
        { "{\"pre_tokenizer\":{\"type\":\"Metaspace\"},\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1},\"merges\":[\"a b\"]}}",
          "model.merges[0]: the merged token is not in the vocabulary" },
        { "{\"pre_tokenizer\":{\"type\":\"Metaspace\"},\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[7]}}",
          "merges[0]" },
        { "{\"model\":{\"type\":\"BPE\",\"byte_fallback\":true,\"vocab\":{\"a\":0},\"merges\":[]}}",
          "not a SentencePiece-style" },
        { "{\"pre_tokenizer\":{\"type\":\"Metaspace\"},\"model\":{\"type\":\"BPE\",\"dropout\":0.1,\"vocab\":{\"a\":0},\"merges\":[]}}",
          "dropout" },
        { "{\"pre_tokenizer\":{\"type\":\"Metaspace\"},\"added_tokens\":[{\"id\":1,\"content\":\"<m>\",\"lstrip\":true}],"
          "\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}",
          "added_tokens[0] (\"<m>\"): lstrip is not supported" },
        { "{\"pre_tokenizer\":{\"type\":\"Metaspace\"},\"model\":{\"type\":\"BPE\",\"byte_fallback\":true,\"vocab\":{\"a\":0,\"<0x61>\":1},\"merges\":[]}}",
          "model.unk_token is missing and byte fallback does not cover all 256 bytes" },
        { "{\"pre_tokenizer\":{\"type\":\"Metaspace\",\"prepend_scheme\":\"sometimes\"},\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}",
          "prepend_scheme" },
        { "{\"normalizer\":{\"type\":\"Replace\",\"pattern\":{\"String\":\"x\"},\"content\":\"y\"},\"model\":{\"type\":\"BPE\",\"byte_fallback\":true,\"vocab\":{\"a\":0},\"merges\":[]}}",
          "normalizer Replace" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        SpmTokenizer *t = load_json_string(cases[i].json, &err);
        ok(!t && strstr(err.msg, cases[i].want), "rejected: %s", err.msg);
        spm_free(t);
    }
    SpmTokenizer *t = load_json_string("{\"pre_tokenizer\":{\"type\":\"Metaspace\",\"prepend_scheme\":\"first\",\"split\":false},"
                                       "\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"vocab\":{\"\xe2\x96\x81\":0,\"a\":1,\"\xe2\x96\x81" "a\":2,\"<unk>\":3},"
                                       "\"merges\":[[\"\xe2\x96\x81\",\"a\"]]}}", &err);
    ok(t != NULL, "a Metaspace tokenizer.json with [a, b] merges loads");
    if (t) {
        Enc e = encode(t, "a a", 3, 0, &err);
        ok(e.n == 2 && e.ids[0] == 2 && e.ids[1] == 2, "Metaspace: \"a a\" is two \"\xe2\x96\x81" "a\"");
        enc_free(&e);
        json_t *bf = json_loads("{\"model\":{\"type\":\"BPE\",\"byte_fallback\":true}}", 0, NULL);
        ok(spm_json_is_sentencepiece(bf), "byte_fallback BPE is recognised");
        json_decref(bf);
        spm_free(t);
    }
    char tmpl[] = "/tmp/spm_test.XXXXXX";
    int fd = mkstemp(tmpl);
    const unsigned char junk[] = { 0x0a, 0x7f, 0x01 };
    ok(fd >= 0 && write(fd, junk, sizeof junk) == (ssize_t)sizeof junk, "wrote a truncated protobuf");
    if (fd >= 0) close(fd);
    t = spm_load_model(tmpl, &err);
    ok(!t && strstr(err.msg, "protobuf parse error"), "truncated protobuf refused: %s", err.msg);
    // A minimal valid model of the default (UNIGRAM) type: one piece "a".
    const unsigned char unigram[] = { 0x0a, 0x03, 0x0a, 0x01, 'a' };
    fd = open(tmpl, O_WRONLY | O_TRUNC);
    ok(fd >= 0 && write(fd, unigram, sizeof unigram) == (ssize_t)sizeof unigram, "wrote a unigram model");
    if (fd >= 0) close(fd);
    t = spm_load_model(tmpl, &err);
    ok(!t && strstr(err.msg, "UNIGRAM"), "unigram model refused: %s", err.msg);
    unlink(tmpl);
    t = spm_load_model("/nonexistent/tokenizer.model", &err);
    ok(!t && strstr(err.msg, "No such file"), "missing file: %s", err.msg);
    ok(spm_is_protobuf((const unsigned char *)"\x0a\x0b", 2) && !spm_is_protobuf((const unsigned char *)"IQ== 0", 6),
       "protobuf vs tiktoken detection");
}

int main(void)
{
    test_bad_files();
    Err err;
    if (access(data_path("stories260K/hf/tokenizer.json"), R_OK) || access(data_path("llama2/tokenizer.model"), R_OK)) {
        printf("# SKIP shared test data not found under %s (set TESTDATA)\n", tap_testdata());
        return done_testing();
    }
    SpmTokenizer *hf = load_json_file(data_path("stories260K/hf/tokenizer.json"), &err);
    ok(hf != NULL, "stories260K tokenizer.json loads%s%s", hf ? "" : ": ", hf ? "" : err.msg);
    SpmTokenizer *sp = spm_load_model(data_path("llama2/tokenizer.model"), &err);
    ok(sp != NULL, "llama2 tokenizer.model loads%s%s", sp ? "" : ": ", sp ? "" : err.msg);
    if (!hf || !sp) return done_testing();
    test_cases(sp);
    test_queries(hf, sp);
    test_offsets(hf);
    test_adversarial(hf, sp);
    test_metaspace_variants();
    test_alpaca(hf, sp);
    test_random(hf, sp);
    test_long_runs(sp, hf);
    spm_free(hf);
    spm_free(sp);
    return done_testing();
}
