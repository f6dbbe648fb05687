// SentencePiece-style BPE (Llama 2, Mistral, TinyLlama, stories260K): see bpe_spm.h.
// The file reads in the order things happen: tables, loading (tokenizer.json, then the
// protobuf tokenizer.model), encoding (special-token split, normalisation, heap BPE, byte
// fallback), decoding, fingerprint.
#define _GNU_SOURCE   // qsort_r, memmem
#include "bpe_spm.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#define META "\xe2\x96\x81"   // U+2581 "▁", SentencePiece's visible space (3 bytes)
#define META_LEN 3

enum { PIECE_NORMAL = 1, PIECE_UNKNOWN = 2, PIECE_CONTROL = 3, PIECE_USER = 4, PIECE_UNUSED = 5,
       PIECE_BYTE = 6 };

// How a section of text gets its leading "▁" (the SentencePiece dummy prefix).
enum { PREFIX_NEVER, PREFIX_ALWAYS, PREFIX_FIRST, PREFIX_ALWAYS_UNLESS_SPACE };

// Decoder steps, applied in order to the list of token strings as Hugging Face does.
enum { DEC_REPLACE, DEC_BYTE_FALLBACK, DEC_FUSE, DEC_STRIP, DEC_METASPACE };
typedef struct {
    int kind;
    char *from, *to;        // DEC_REPLACE: literal pattern and its replacement
    size_t strip_start;     // DEC_STRIP: leading copies of strip_char removed (per token)
    size_t strip_stop;      // DEC_STRIP: trailing copies removed
    char strip_char;        // DEC_STRIP content (a single ASCII character)
    int metaspace_strip;    // DEC_METASPACE: first token loses its "▁"s
} DecodeStep;

typedef struct {
    char *name;             // (len) bytes as matched in text
    size_t len;
    uint32_t id;
    int special;            // matched only with parse_special; non-special ones always
} AddedToken;

// Open-addressing hash from byte strings (in pool) to ids; capacity a power of two.
typedef struct {
    uint32_t *slot;         // (cap) id + 1, 0 empty
    size_t cap;
} StrMap;

// Open-addressing hash from (left id, right id) to the merge's rank and result id; one
// 16-byte slot per entry so that a lookup touches one cache line.
typedef struct {
    uint64_t key;           // left << 32 | right, UINT64_MAX empty
    uint32_t rank;          // lower merges first
    uint32_t result;        // id of left + right
} PairSlot;
typedef struct {
    PairSlot *slot;         // (cap)
    size_t cap, n;
    uint64_t *bloom;        // (bloom_bits / 64) two bits set per pair: most pairs looked up
    size_t bloom_bits;      //   while merging are absent, and this answers them from cache
} PairMap;

struct SpmTokenizer {
    uint32_t n_vocab;       // ids 0 .. n_vocab-1 (model vocabulary and added tokens)
    char **piece;           // (n_vocab) raw piece, "▁" kept; NULL for holes
    uint32_t *piece_len;    // (n_vocab)
    char **shown;           // (n_vocab) token bytes for tokenizer_token_bytes
    uint32_t *shown_len;    // (n_vocab)
    unsigned char *type;    // (n_vocab) PIECE_*
    unsigned char *special; // (n_vocab) 1 for special added tokens / CONTROL / UNKNOWN
    int16_t *byte_value;    // (n_vocab) 0..255 for <0xNN> tokens, -1 otherwise
    int32_t byte_id[256];   // id of <0xNN>, -1 when absent
    StrMap vocab;           // model pieces (not added tokens) -> id
    StrMap names;           // every piece and added token -> id, for spm_token_id
    int32_t *bmp_id;        // (65536) id of a single code point below U+10000, -1 absent
    PairMap merges;
    uint32_t *merge_left, *merge_right, n_merge_list;   // merge order, for the fingerprint
    AddedToken *added;      // (n_added) longest first
    size_t n_added;
    unsigned char added_first[256];   // 1 when some added token starts with that byte
    int prefix;             // PREFIX_*
    int split_words;        // Metaspace split: words begin at each "▁"
    int split_safe;         // no piece holds a "▁" after another character, so no merge can
                            // cross the start of a "▁" run: BPE runs word by word (faster)
    int byte_fallback;
    int fuse_unk;
    int64_t unk_id, bos_id, eos_id;
    int adds_bos;
    DecodeStep *dec;        // (n_dec)
    size_t n_dec;
    int from_protobuf;
    uint64_t fingerprint;   // computed once, when loaded
};

// ---------------------------------------------------------------------------------------
// Tables

static uint64_t hash_bytes(const char *s, size_t len) { return XXH3_64bits(s, len); }

static size_t pow2_at_least(size_t n)
{
    size_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

static int strmap_init(StrMap *m, size_t n)
{
    m->cap = pow2_at_least(n * 2 + 1);
    m->slot = calloc(m->cap, sizeof *m->slot);
    return m->slot ? 0 : -1;
}

// Finds the slot for s: holding s, or the empty slot where it would go.
static size_t strmap_find(const StrMap *m, char *const *piece, const uint32_t *plen, const char *s,
                          size_t len)
{
    size_t i = hash_bytes(s, len) & (m->cap - 1);
    for (;;) {
        uint32_t v = m->slot[i];
        if (!v) return i;
        if (plen[v - 1] == len && memcmp(piece[v - 1], s, len) == 0) return i;
        i = (i + 1) & (m->cap - 1);
    }
}

static int64_t strmap_get(const SpmTokenizer *t, const StrMap *m, const char *s, size_t len)
{
    uint32_t v = m->slot[strmap_find(m, t->piece, t->piece_len, s, len)];
    return v ? (int64_t)v - 1 : -1;
}

// Inserts id under its piece string; an existing entry is kept (first id wins).
static void strmap_put(SpmTokenizer *t, StrMap *m, uint32_t id)
{
    size_t i = strmap_find(m, t->piece, t->piece_len, t->piece[id], t->piece_len[id]);
    if (!m->slot[i]) m->slot[i] = id + 1;
}

static uint64_t pair_key(uint32_t l, uint32_t r) { return (uint64_t)l << 32 | r; }
static size_t pair_slot(uint64_t k, size_t cap)
{
    k ^= k >> 29;
    k *= 0xbf58476d1ce4e5b9ull;
    k ^= k >> 32;
    return k & (cap - 1);
}

static uint64_t pair_mix(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ull;
    return k ^ (k >> 33);
}

static int pairmap_init(PairMap *m, size_t n)
{
    m->cap = pow2_at_least(n * 2 + 1);
    m->n = 0;
    m->slot = malloc(m->cap * sizeof *m->slot);
    m->bloom_bits = pow2_at_least(n * 16 + 64);
    m->bloom = calloc(m->bloom_bits / 64, sizeof *m->bloom);
    if (!m->slot || !m->bloom) return -1;
    for (size_t i = 0; i < m->cap; i++) m->slot[i].key = UINT64_MAX;
    return 0;
}

// Keeps the first (lowest-rank) entry for a pair, as Hugging Face does for duplicate merges.
static void pairmap_put(PairMap *m, uint32_t l, uint32_t r, uint32_t rank, uint32_t result)
{
    uint64_t k = pair_key(l, r);
    size_t i = pair_slot(k, m->cap);
    while (m->slot[i].key != UINT64_MAX) {
        if (m->slot[i].key == k) return;
        i = (i + 1) & (m->cap - 1);
    }
    m->slot[i] = (PairSlot){ k, rank, result };
    m->n++;
    uint64_t h = pair_mix(k), b1 = h & (m->bloom_bits - 1), b2 = (h >> 32) & (m->bloom_bits - 1);
    m->bloom[b1 / 64] |= 1ull << (b1 % 64);
    m->bloom[b2 / 64] |= 1ull << (b2 % 64);
}

static int pairmap_get(const PairMap *m, uint32_t l, uint32_t r, uint32_t *rank, uint32_t *result)
{
    uint64_t k = pair_key(l, r);
    uint64_t h = pair_mix(k), b1 = h & (m->bloom_bits - 1), b2 = (h >> 32) & (m->bloom_bits - 1);
    if (!(m->bloom[b1 / 64] >> (b1 % 64) & 1) || !(m->bloom[b2 / 64] >> (b2 % 64) & 1)) return 0;
    size_t i = pair_slot(k, m->cap);
    while (m->slot[i].key != UINT64_MAX) {
        if (m->slot[i].key == k) {
            *rank = m->slot[i].rank;
            *result = m->slot[i].result;
            return 1;
        }
        i = (i + 1) & (m->cap - 1);
    }
    return 0;
}

// Length of the UTF-8 sequence starting at s (at most avail bytes), 0 when invalid.
static size_t utf8_len(const unsigned char *s, size_t avail)
{
    unsigned c = s[0];
    size_t n;
    uint32_t cp, min;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) n = 2, cp = c & 0x1f, min = 0x80;
    else if (c >= 0xe0 && c <= 0xef) n = 3, cp = c & 0x0f, min = 0x800;
    else if (c >= 0xf0 && c <= 0xf4) n = 4, cp = c & 0x07, min = 0x10000;
    else return 0;
    if (avail < n) return 0;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = cp << 6 | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return n;
}

static uint32_t utf8_decode(const unsigned char *s, size_t n)
{
    if (n == 1) return s[0];
    uint32_t cp = s[0] & (n == 2 ? 0x1f : n == 3 ? 0x0f : 0x07);
    for (size_t i = 1; i < n; i++) cp = cp << 6 | (s[i] & 0x3f);
    return cp;
}

// "<0xNN>" -> NN, else -1.
static int parse_byte_piece(const char *p, size_t len)
{
    if (len != 6 || memcmp(p, "<0x", 3) != 0 || p[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = p[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10
              : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

// ---------------------------------------------------------------------------------------
// Loading: common part

static uint64_t compute_fingerprint(const SpmTokenizer *t);

static SpmTokenizer *spm_alloc(uint32_t n_vocab)
{
    SpmTokenizer *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->n_vocab = n_vocab;
    t->piece = calloc(n_vocab, sizeof *t->piece);
    t->piece_len = calloc(n_vocab, sizeof *t->piece_len);
    t->shown = calloc(n_vocab, sizeof *t->shown);
    t->shown_len = calloc(n_vocab, sizeof *t->shown_len);
    t->type = calloc(n_vocab, 1);
    t->special = calloc(n_vocab, 1);
    t->byte_value = malloc(n_vocab * sizeof *t->byte_value);
    if (!t->piece || !t->piece_len || !t->shown || !t->shown_len || !t->type || !t->special ||
        !t->byte_value) {
        spm_free(t);
        return NULL;
    }
    for (uint32_t i = 0; i < n_vocab; i++) t->byte_value[i] = -1;
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    t->unk_id = t->bos_id = t->eos_id = -1;
    return t;
}

static int set_piece(SpmTokenizer *t, uint32_t id, const char *s, size_t len, int type)
{
    free(t->piece[id]);
    t->piece[id] = malloc(len + 1);
    if (!t->piece[id]) return -1;
    memcpy(t->piece[id], s, len);
    t->piece[id][len] = 0;
    t->piece_len[id] = (uint32_t)len;
    t->type[id] = (unsigned char)type;
    return 0;
}

// After pieces are set: the shown bytes, byte tokens, hash maps, the code-point table.
static int spm_index(SpmTokenizer *t, Err *err)
{
    if (strmap_init(&t->vocab, t->n_vocab) || strmap_init(&t->names, t->n_vocab))
        return err_set(err, "out of memory");
    t->bmp_id = malloc(65536 * sizeof *t->bmp_id);
    if (!t->bmp_id) return err_set(err, "out of memory");
    t->split_safe = 1;   // until a piece says otherwise
    for (int i = 0; i < 65536; i++) t->bmp_id[i] = -1;
    for (uint32_t id = 0; id < t->n_vocab; id++) {
        if (!t->piece[id]) {   // a hole in the ids: give it an empty name so lookups stay simple
            if (set_piece(t, id, "", 0, PIECE_UNUSED)) return err_set(err, "out of memory");
            continue;
        }
        const char *p = t->piece[id];
        size_t len = t->piece_len[id];
        int b = parse_byte_piece(p, len);
        if (b >= 0 && t->type[id] != PIECE_CONTROL && !t->special[id]) {
            t->byte_value[id] = (int16_t)b;
            if (t->byte_id[b] < 0) t->byte_id[b] = (int32_t)id;
            t->type[id] = PIECE_BYTE;
        }
        // Shown bytes: specials as their names, bytes as the byte, "▁" as a space.
        char *shown = malloc(len + 1);
        size_t sl = 0;
        if (!shown) return err_set(err, "out of memory");
        if (t->byte_value[id] >= 0) {
            shown[sl++] = (char)b;
        } else if (t->special[id]) {
            memcpy(shown, p, len);
            sl = len;
        } else {
            for (size_t i = 0; i < len;) {
                if (i + META_LEN <= len && memcmp(p + i, META, META_LEN) == 0) {
                    shown[sl++] = ' ';
                    i += META_LEN;
                } else {
                    shown[sl++] = p[i++];
                }
            }
        }
        t->shown[id] = shown;
        t->shown_len[id] = (uint32_t)sl;
        strmap_put(t, &t->names, id);
        if (t->type[id] == PIECE_NORMAL || t->type[id] == PIECE_USER || t->type[id] == PIECE_UNUSED) {
            strmap_put(t, &t->vocab, id);
            for (size_t i = 1; i + META_LEN <= len; i++)
                if (memcmp(p + i, META, META_LEN) == 0 && !(i >= META_LEN && memcmp(p + i - META_LEN, META, META_LEN) == 0))
                    t->split_safe = 0;
            size_t cl = utf8_len((const unsigned char *)p, len);
            if (cl == len && cl > 0) {
                uint32_t cp = utf8_decode((const unsigned char *)p, cl);
                if (cp < 65536 && t->bmp_id[cp] < 0) t->bmp_id[cp] = (int32_t)id;
            }
        }
    }
    return 0;
}

static int add_added_token(SpmTokenizer *t, const char *name, size_t len, uint32_t id, int special)
{
    if (len == 0) return 0;
    AddedToken *a = realloc(t->added, (t->n_added + 1) * sizeof *a);
    if (!a) return -1;
    t->added = a;
    a[t->n_added].name = malloc(len);
    if (!a[t->n_added].name) return -1;
    memcpy(a[t->n_added].name, name, len);
    a[t->n_added].len = len;
    a[t->n_added].id = id;
    a[t->n_added].special = special;
    t->n_added++;
    t->added_first[(unsigned char)name[0]] = 1;
    return 0;
}

static int added_longer_first(const void *a, const void *b)
{
    const AddedToken *x = a, *y = b;
    if (x->len != y->len) return x->len < y->len ? 1 : -1;
    return x->id < y->id ? -1 : x->id > y->id;
}

static int add_decode_step(SpmTokenizer *t, DecodeStep s)
{
    DecodeStep *d = realloc(t->dec, (t->n_dec + 1) * sizeof *d);
    if (!d) return -1;
    t->dec = d;
    d[t->n_dec++] = s;
    return 0;
}

// The decoder Hugging Face's converter writes for SentencePiece models with a dummy prefix:
// Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0).
static int default_decoder(SpmTokenizer *t)
{
    DecodeStep r = { .kind = DEC_REPLACE, .from = strdup(META), .to = strdup(" ") };
    if (!r.from || !r.to || add_decode_step(t, r)) return -1;
    if (add_decode_step(t, (DecodeStep){ .kind = DEC_BYTE_FALLBACK })) return -1;
    if (add_decode_step(t, (DecodeStep){ .kind = DEC_FUSE })) return -1;
    if (t->prefix != PREFIX_NEVER &&
        add_decode_step(t, (DecodeStep){ .kind = DEC_STRIP, .strip_char = ' ', .strip_start = 1 }))
        return -1;
    return 0;
}

// ---------------------------------------------------------------------------------------
// Loading: Hugging Face tokenizer.json

static const char *json_str(const json_t *o, const char *key)
{
    return json_string_value(json_object_get(o, key));
}

int spm_json_is_sentencepiece(const json_t *root)
{
    const json_t *model = json_object_get(root, "model");
    const char *type = json_str(model, "type");
    if (!type || strcmp(type, "BPE") != 0) return 0;
    if (json_is_true(json_object_get(model, "byte_fallback"))) return 1;
    const char *pre = json_str(json_object_get(root, "pre_tokenizer"), "type");
    if (pre && strcmp(pre, "Metaspace") == 0) return 1;
    const char *dec = json_str(json_object_get(root, "decoder"), "type");
    if (dec && strcmp(dec, "Metaspace") == 0) return 1;
    const json_t *norm = json_object_get(root, "normalizer");
    const char *nt = json_str(norm, "type");
    if (nt && strcmp(nt, "Prepend") == 0) return 1;
    if (nt && strcmp(nt, "Sequence") == 0) {
        size_t i;
        const json_t *n;
        json_array_foreach(json_object_get(norm, "normalizers"), i, n) {
            const char *k = json_str(n, "type");
            if (k && strcmp(k, "Prepend") == 0) return 1;
        }
    }
    return 0;
}

// One normalizer of the supported kinds: Prepend("▁") and Replace(" " -> "▁").
static int load_normalizer(SpmTokenizer *t, const json_t *n, const char *name, int *replaced, Err *err)
{
    const char *type = json_str(n, "type");
    if (!type) return err_set(err, "%s: normalizer without a type", name);
    if (strcmp(type, "Sequence") == 0) {
        size_t i;
        const json_t *sub;
        json_array_foreach(json_object_get(n, "normalizers"), i, sub)
            if (load_normalizer(t, sub, name, replaced, err)) return -1;
        return 0;
    }
    if (strcmp(type, "Prepend") == 0) {
        const char *p = json_str(n, "prepend");
        if (!p || strcmp(p, META) != 0)
            return err_set(err, "%s: normalizer Prepend(\"%s\") is not supported (only \"" META "\")",
                           name, p ? p : "");
        t->prefix = PREFIX_ALWAYS;
        return 0;
    }
    if (strcmp(type, "Replace") == 0) {
        const char *from = json_str(json_object_get(n, "pattern"), "String");
        const char *to = json_str(n, "content");
        if (!from || !to || strcmp(from, " ") != 0 || strcmp(to, META) != 0)
            return err_set(err, "%s: normalizer Replace other than \" \" -> \"" META "\" is not supported",
                           name);
        *replaced = 1;
        return 0;
    }
    return err_set(err, "%s: normalizer %s is not supported by the SentencePiece BPE tokenizer", name, type);
}

static int load_pre_tokenizer(SpmTokenizer *t, const json_t *p, const char *name, int *replaced, Err *err)
{
    const char *type = json_str(p, "type");
    if (!type) return err_set(err, "%s: pre_tokenizer without a type", name);
    if (strcmp(type, "Sequence") == 0) {
        size_t i;
        const json_t *sub;
        json_array_foreach(json_object_get(p, "pretokenizers"), i, sub)
            if (load_pre_tokenizer(t, sub, name, replaced, err)) return -1;
        return 0;
    }
    if (strcmp(type, "Metaspace") != 0)
        return err_set(err, "%s: pre_tokenizer %s is not supported by the SentencePiece BPE tokenizer",
                       name, type);
    const char *rep = json_str(p, "replacement");
    if (rep && strcmp(rep, META) != 0)
        return err_set(err, "%s: pre_tokenizer Metaspace with replacement \"%s\" is not supported", name, rep);
    const char *scheme = json_str(p, "prepend_scheme");
    if (scheme) {
        if (strcmp(scheme, "always") == 0) t->prefix = PREFIX_ALWAYS_UNLESS_SPACE;
        else if (strcmp(scheme, "first") == 0) t->prefix = PREFIX_FIRST;
        else if (strcmp(scheme, "never") == 0) t->prefix = PREFIX_NEVER;
        else return err_set(err, "%s: pre_tokenizer Metaspace prepend_scheme \"%s\" is not supported", name, scheme);
    } else {
        // Older files: add_prefix_space (default true) means "always".
        const json_t *aps = json_object_get(p, "add_prefix_space");
        t->prefix = aps && json_is_false(aps) ? PREFIX_NEVER : PREFIX_ALWAYS_UNLESS_SPACE;
    }
    const json_t *split = json_object_get(p, "split");
    t->split_words = !split || json_is_true(split);   // absent in old files: they split
    *replaced = 1;
    return 0;
}

static int load_decoder(SpmTokenizer *t, const json_t *d, const char *name, Err *err)
{
    const char *type = json_str(d, "type");
    if (!type) return err_set(err, "%s: decoder without a type", name);
    if (strcmp(type, "Sequence") == 0) {
        size_t i;
        const json_t *sub;
        json_array_foreach(json_object_get(d, "decoders"), i, sub)
            if (load_decoder(t, sub, name, err)) return -1;
        return 0;
    }
    DecodeStep s = { 0 };
    if (strcmp(type, "Replace") == 0) {
        const char *from = json_str(json_object_get(d, "pattern"), "String");
        const char *to = json_str(d, "content");
        if (!from || !to || !*from)
            return err_set(err, "%s: decoder Replace needs a String pattern and a content", name);
        s.kind = DEC_REPLACE;
        s.from = strdup(from);
        s.to = strdup(to);
        if (!s.from || !s.to) return err_set(err, "out of memory");
    } else if (strcmp(type, "ByteFallback") == 0) {
        s.kind = DEC_BYTE_FALLBACK;
    } else if (strcmp(type, "Fuse") == 0) {
        s.kind = DEC_FUSE;
    } else if (strcmp(type, "Strip") == 0) {
        const char *c = json_str(d, "content");
        if (!c || strlen(c) != 1)
            return err_set(err, "%s: decoder Strip with a content other than one ASCII character is not supported", name);
        s.kind = DEC_STRIP;
        s.strip_char = c[0];
        s.strip_start = (size_t)json_integer_value(json_object_get(d, "start"));
        s.strip_stop = (size_t)json_integer_value(json_object_get(d, "stop"));
    } else if (strcmp(type, "Metaspace") == 0) {
        const char *scheme = json_str(d, "prepend_scheme");
        const json_t *aps = json_object_get(d, "add_prefix_space");
        s.kind = DEC_METASPACE;
        s.metaspace_strip = scheme ? strcmp(scheme, "never") != 0 : !(aps && json_is_false(aps));
    } else {
        return err_set(err, "%s: decoder %s is not supported by the SentencePiece BPE tokenizer", name, type);
    }
    if (add_decode_step(t, s)) return err_set(err, "out of memory");
    return 0;
}

// "a b" or ["a", "b"] -> the two halves.
static int merge_halves(const json_t *m, const char **a, size_t *al, const char **b, size_t *bl)
{
    if (json_is_string(m)) {
        const char *s = json_string_value(m);
        size_t len = json_string_length(m);
        const char *sp = memchr(s + (len > 0), ' ', len - (len > 0));   // a half is never empty
        if (!sp) return -1;
        *a = s, *al = (size_t)(sp - s), *b = sp + 1, *bl = len - *al - 1;
        return 0;
    }
    if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
        json_is_string(json_array_get(m, 1))) {
        *a = json_string_value(json_array_get(m, 0)), *al = json_string_length(json_array_get(m, 0));
        *b = json_string_value(json_array_get(m, 1)), *bl = json_string_length(json_array_get(m, 1));
        return 0;
    }
    return -1;
}

// BOS from a TemplateProcessing post-processor: the first item of "single" if it is a special
// token. Returns 1 when the model adds a BOS this way.
static int post_processor_bos(SpmTokenizer *t, const json_t *pp)
{
    const char *type = json_str(pp, "type");
    if (!type) return 0;
    if (strcmp(type, "Sequence") == 0) {
        size_t i;
        const json_t *sub;
        json_array_foreach(json_object_get(pp, "processors"), i, sub)
            if (post_processor_bos(t, sub)) return 1;
        return 0;
    }
    if (strcmp(type, "TemplateProcessing") != 0) return 0;
    const json_t *first = json_array_get(json_object_get(pp, "single"), 0);
    const char *tok = json_str(json_object_get(first, "SpecialToken"), "id");
    if (!tok) return 0;
    const json_t *st = json_object_get(json_object_get(pp, "special_tokens"), tok);
    const json_t *ids = json_object_get(st, "ids");
    if (json_array_size(ids) == 1 && json_is_integer(json_array_get(ids, 0))) {
        t->bos_id = json_integer_value(json_array_get(ids, 0));
    } else {
        int64_t id = strmap_get(t, &t->names, tok, strlen(tok));
        if (id < 0) return 0;
        t->bos_id = id;
    }
    return 1;
}

SpmTokenizer *spm_load_json(const json_t *root, const char *name, Err *err)
{
    const json_t *model = json_object_get(root, "model");
    const char *mtype = json_str(model, "type");
    if (!mtype || strcmp(mtype, "BPE") != 0) {
        err_set(err, "%s: model.type %s is not supported by the SentencePiece BPE tokenizer", name,
                mtype ? mtype : "(missing)");
        return NULL;
    }
    const json_t *dropout = json_object_get(model, "dropout");
    if (dropout && !json_is_null(dropout)) {
        err_set(err, "%s: model.dropout is not supported (set it to null)", name);
        return NULL;
    }
    const char *csp = json_str(model, "continuing_subword_prefix");
    const char *ews = json_str(model, "end_of_word_suffix");
    if ((csp && *csp) || (ews && *ews)) {
        err_set(err, "%s: model.%s is not supported by the SentencePiece BPE tokenizer", name,
                csp && *csp ? "continuing_subword_prefix" : "end_of_word_suffix");
        return NULL;
    }
    const json_t *vocab = json_object_get(model, "vocab");
    const json_t *merges = json_object_get(model, "merges");
    if (!json_is_object(vocab) || !json_is_array(merges)) {
        err_set(err, "%s: model.vocab (object) and model.merges (array) are required", name);
        return NULL;
    }
    // Ids run to the largest of the vocabulary and the added tokens.
    uint64_t max_id = 0;
    const char *key;
    const json_t *val;
    json_object_foreach((json_t *)vocab, key, val) {
        if (!json_is_integer(val) || json_integer_value(val) < 0 || json_integer_value(val) >= (1 << 24)) {
            err_set(err, "%s: model.vocab[\"%s\"] is not a valid id", name, key);
            return NULL;
        }
        if ((uint64_t)json_integer_value(val) > max_id) max_id = (uint64_t)json_integer_value(val);
    }
    const json_t *added = json_object_get(root, "added_tokens");
    size_t i;
    const json_t *a;
    json_array_foreach(added, i, a) {
        const json_t *id = json_object_get(a, "id");
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= (1 << 24) ||
            !json_is_string(json_object_get(a, "content"))) {
            err_set(err, "%s: added_tokens[%zu] needs an id and a content", name, i);
            return NULL;
        }
        if ((uint64_t)json_integer_value(id) > max_id) max_id = (uint64_t)json_integer_value(id);
        // Whitespace-absorbing added tokens: none in the Llama family; refused, not ignored.
        const char *flags[] = { "lstrip", "rstrip", "single_word" };
        for (int k = 0; k < 3; k++)
            if (json_is_true(json_object_get(a, flags[k]))) {
                err_set(err, "%s: added_tokens[%zu] (\"%s\"): %s is not supported", name, i,
                        json_string_value(json_object_get(a, "content")), flags[k]);
                return NULL;
            }
    }
    SpmTokenizer *t = spm_alloc((uint32_t)max_id + 1);
    if (!t) {
        err_set(err, "out of memory");
        return NULL;
    }
    json_object_foreach((json_t *)vocab, key, val) {
        // Keys may hold NUL bytes in principle; jansson object keys are C strings, fine here.
        if (set_piece(t, (uint32_t)json_integer_value(val), key, strlen(key), PIECE_NORMAL)) goto oom;
    }
    json_array_foreach(added, i, a) {
        uint32_t id = (uint32_t)json_integer_value(json_object_get(a, "id"));
        const json_t *c = json_object_get(a, "content");
        int special = json_is_true(json_object_get(a, "special"));
        if (!t->piece[id] && set_piece(t, id, json_string_value(c), json_string_length(c), PIECE_USER))
            goto oom;
        if (special) t->special[id] = 1, t->type[id] = PIECE_CONTROL;
        if (add_added_token(t, json_string_value(c), json_string_length(c), id, special)) goto oom;
    }
    if (t->n_added) qsort(t->added, t->n_added, sizeof *t->added, added_longer_first);
    t->byte_fallback = json_is_true(json_object_get(model, "byte_fallback"));
    t->fuse_unk = json_is_true(json_object_get(model, "fuse_unk"));
    t->prefix = PREFIX_NEVER;

    int replaced = 0;
    const json_t *norm = json_object_get(root, "normalizer");
    if (norm && !json_is_null(norm) && load_normalizer(t, norm, name, &replaced, err)) goto fail;
    const json_t *pre = json_object_get(root, "pre_tokenizer");
    if (pre && !json_is_null(pre) && load_pre_tokenizer(t, pre, name, &replaced, err)) goto fail;
    if (!replaced) {
        err_set(err, "%s: neither a Replace(\" \", \"" META "\") normalizer nor a Metaspace pre_tokenizer: "
                "not a SentencePiece-style tokenizer.json", name);
        goto fail;
    }
    const json_t *dec = json_object_get(root, "decoder");
    if (dec && !json_is_null(dec)) {
        if (load_decoder(t, dec, name, err)) goto fail;
    }

    if (spm_index(t, err)) goto fail;
    const char *unk = json_str(model, "unk_token");
    if (unk) t->unk_id = strmap_get(t, &t->names, unk, strlen(unk));
    if (t->unk_id >= 0) t->special[t->unk_id] = t->special[t->unk_id] || t->type[t->unk_id] == PIECE_CONTROL;
    // Merges: rank = position in the list.
    if (pairmap_init(&t->merges, json_array_size(merges))) goto oom;
    t->merge_left = malloc((json_array_size(merges) + 1) * sizeof *t->merge_left);
    t->merge_right = malloc((json_array_size(merges) + 1) * sizeof *t->merge_right);
    if (!t->merge_left || !t->merge_right) goto oom;
    char *buf = NULL;
    size_t bufcap = 0;
    json_array_foreach(merges, i, a) {
        const char *l, *r;
        size_t ll, rl;
        if (merge_halves(a, &l, &ll, &r, &rl)) {
            free(buf);
            err_set(err, "%s: model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", name, i);
            goto fail;
        }
        int64_t li = strmap_get(t, &t->vocab, l, ll), ri = strmap_get(t, &t->vocab, r, rl);
        if (ll + rl > bufcap) {
            bufcap = (ll + rl) * 2;
            char *nb = realloc(buf, bufcap);
            if (!nb) { free(buf); goto oom; }
            buf = nb;
        }
        memcpy(buf, l, ll);
        memcpy(buf + ll, r, rl);
        int64_t mi = strmap_get(t, &t->vocab, buf, ll + rl);
        if (li < 0 || ri < 0 || mi < 0) {
            free(buf);
            err_set(err, "%s: model.merges[%zu]: %s is not in the vocabulary", name, i,
                    li < 0 ? "its left part" : ri < 0 ? "its right part" : "the merged token");
            goto fail;
        }
        pairmap_put(&t->merges, (uint32_t)li, (uint32_t)ri, (uint32_t)i, (uint32_t)mi);
        t->merge_left[t->n_merge_list] = (uint32_t)li;
        t->merge_right[t->n_merge_list++] = (uint32_t)ri;
    }
    free(buf);

    int all_bytes = t->byte_fallback;
    for (int b = 0; b < 256 && all_bytes; b++) all_bytes = t->byte_id[b] >= 0;
    if (t->unk_id < 0 && !all_bytes) {
        // Hugging Face loads such a file and fails on the first unknown character; we refuse it
        // up front rather than stop in the middle of a data set.
        err_set(err, "%s: model.unk_token is %s and byte fallback does not cover all 256 bytes: "
                "some text could not be tokenized", name, unk ? "not in the vocabulary" : "missing");
        goto fail;
    }

    t->adds_bos = post_processor_bos(t, json_object_get(root, "post_processor"));
    if (t->bos_id < 0) t->bos_id = strmap_get(t, &t->names, "<s>", 3);
    t->eos_id = strmap_get(t, &t->names, "</s>", 4);
    t->fingerprint = compute_fingerprint(t);
    return t;
oom:
    err_set(err, "out of memory");
fail:
    spm_free(t);
    return NULL;
}

// ---------------------------------------------------------------------------------------
// Loading: protobuf tokenizer.model (sentencepiece_model.proto)
//   ModelProto { repeated SentencePiece pieces = 1; TrainerSpec trainer_spec = 2;
//                NormalizerSpec normalizer_spec = 3; ... }
//   SentencePiece { string piece = 1; float score = 2; Type type = 3 (default NORMAL) }
//   TrainerSpec { model_type = 3 (1 unigram, 2 bpe; default unigram); byte_fallback = 35;
//                 unk_id = 40; bos_id = 41; eos_id = 42 }
//   NormalizerSpec { name = 1; precompiled_charsmap = 2; add_dummy_prefix = 3 (default true);
//                    remove_extra_whitespaces = 4 (default true); escape_whitespaces = 5 }

typedef struct {
    const unsigned char *p, *end;
} Pb;

static int pb_varint(Pb *b, uint64_t *v)
{
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (b->p >= b->end) return -1;
        unsigned c = *b->p++;
        *v |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) return 0;
    }
    return -1;
}

// Reads one field: its number, wire type, and value (varint or fixed) or bytes.
static int pb_field(Pb *b, uint32_t *field, int *wire, uint64_t *v, const unsigned char **data, size_t *len)
{
    uint64_t tag;
    if (pb_varint(b, &tag)) return -1;
    *field = (uint32_t)(tag >> 3);
    *wire = (int)(tag & 7);
    switch (*wire) {
    case 0: return pb_varint(b, v);
    case 1:
        if (b->end - b->p < 8) return -1;
        memcpy(v, b->p, 8);
        b->p += 8;
        return 0;
    case 5: {
        if (b->end - b->p < 4) return -1;
        uint32_t x;
        memcpy(&x, b->p, 4);
        *v = x;
        b->p += 4;
        return 0;
    }
    case 2:
        if (pb_varint(b, v) || *v > (uint64_t)(b->end - b->p)) return -1;
        *data = b->p;
        *len = (size_t)*v;
        b->p += *len;
        return 0;
    default: return -1;
    }
}

int spm_is_protobuf(const unsigned char *head, size_t len)
{
    // Field 1, wire type 2 (a SentencePiece message) comes first in every model sentencepiece writes.
    return len >= 2 && head[0] == 0x0a;
}

typedef struct {
    const unsigned char *piece;
    size_t len;
    float score;
    int type;
} PbPiece;

static int by_score_then_id(const void *a, const void *b, void *ctx)
{
    const PbPiece *pieces = ctx;
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    if (pieces[x].score != pieces[y].score) return pieces[x].score > pieces[y].score ? -1 : 1;
    return x < y ? -1 : x > y;
}

typedef struct {
    uint32_t merged, left, right;
    float score;
} PbMerge;

static int merge_order(const void *a, const void *b)
{
    const PbMerge *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    if (x->merged != y->merged) return x->merged < y->merged ? -1 : 1;
    if (x->left != y->left) return x->left < y->left ? -1 : 1;
    return x->right < y->right ? -1 : x->right > y->right;
}

SpmTokenizer *spm_load_model(const char *path, Err *err)
{
    SpmTokenizer *t = NULL;
    PbPiece *pieces = NULL;
    PbMerge *ml = NULL;
    uint32_t *order = NULL;
    unsigned char *file = NULL;
    size_t n = 0, pcap = 0, cap = 0, flen = 0;
    FILE *f = fopen(path, "rb");
    if (!f) {
        err_set(err, "%s: %s", path, strerror(errno));
        return NULL;
    }
    for (;;) {
        if (flen == cap) {
            cap = cap ? cap * 2 : 1 << 20;
            unsigned char *nf = realloc(file, cap);
            if (!nf) { fclose(f); free(file); err_set(err, "out of memory"); return NULL; }
            file = nf;
        }
        size_t got = fread(file + flen, 1, cap - flen, f);
        flen += got;
        if (got == 0) break;
    }
    int rerr = ferror(f);
    fclose(f);
    if (rerr) {
        free(file);
        err_set(err, "%s: read error", path);
        return NULL;
    }
    int model_type = 1, byte_fallback = 0, add_dummy_prefix = 1, remove_ws = 1, escape_ws = 1;
    int64_t unk_id = 0, bos_id = 1, eos_id = 2;
    const char *normalizer_name = NULL;
    size_t normalizer_name_len = 0, charsmap_len = 0;
    Pb b = { file, file + flen };
    while (b.p < b.end) {
        uint32_t field;
        int wire;
        uint64_t v;
        const unsigned char *data = NULL;
        size_t len = 0;
        if (pb_field(&b, &field, &wire, &v, &data, &len)) goto bad;
        if (wire != 2) continue;
        Pb sub = { data, data + len };
        if (field == 1) {
            PbPiece p = { .type = PIECE_NORMAL };
            while (sub.p < sub.end) {
                const unsigned char *d = NULL;
                size_t dl = 0;
                if (pb_field(&sub, &field, &wire, &v, &d, &dl)) goto bad;
                if (field == 1 && wire == 2) p.piece = d, p.len = dl;
                else if (field == 2 && wire == 5) { uint32_t x = (uint32_t)v; memcpy(&p.score, &x, 4); }
                else if (field == 3 && wire == 0) p.type = (int)v;
            }
            if (!p.piece || p.type < 1 || p.type > 6) goto bad;
            if (n == pcap) {
                pcap = pcap ? pcap * 2 : 1024;
                PbPiece *np = realloc(pieces, pcap * sizeof *np);
                if (!np) goto oom;
                pieces = np;
            }
            pieces[n++] = p;
        } else if (field == 2) {
            while (sub.p < sub.end) {
                const unsigned char *d;
                size_t dl;
                if (pb_field(&sub, &field, &wire, &v, &d, &dl)) goto bad;
                if (wire != 0) continue;
                if (field == 3) model_type = (int)v;
                else if (field == 35) byte_fallback = v != 0;
                else if (field == 40) unk_id = (int32_t)v;
                else if (field == 41) bos_id = (int32_t)v;
                else if (field == 42) eos_id = (int32_t)v;
            }
        } else if (field == 3) {
            while (sub.p < sub.end) {
                const unsigned char *d = NULL;
                size_t dl = 0;
                if (pb_field(&sub, &field, &wire, &v, &d, &dl)) goto bad;
                if (field == 1 && wire == 2) normalizer_name = (const char *)d, normalizer_name_len = dl;
                else if (field == 2 && wire == 2) charsmap_len = dl;
                else if (field == 3 && wire == 0) add_dummy_prefix = v != 0;
                else if (field == 4 && wire == 0) remove_ws = v != 0;
                else if (field == 5 && wire == 0) escape_ws = v != 0;
            }
        }
    }
    if (n == 0) goto bad;
    if (model_type != 2) {
        err_set(err, "%s: trainer_spec.model_type %s is not supported (only BPE)", path,
                model_type == 1 ? "UNIGRAM" : model_type == 3 ? "WORD" : model_type == 4 ? "CHAR" : "unknown");
        goto fail;
    }
    if (charsmap_len > 0 || (normalizer_name && !(normalizer_name_len == 8 && memcmp(normalizer_name, "identity", 8) == 0))) {
        err_set(err, "%s: normalizer_spec %.*s is not supported (only identity)", path,
                (int)normalizer_name_len, normalizer_name ? normalizer_name : "(precompiled)");
        goto fail;
    }
    if (remove_ws || !escape_ws) {
        err_set(err, "%s: normalizer_spec.%s is not supported", path,
                remove_ws ? "remove_extra_whitespaces" : "escape_whitespaces = false");
        goto fail;
    }
    t = spm_alloc((uint32_t)n);
    if (!t) goto oom;
    t->from_protobuf = 1;
    for (size_t i = 0; i < n; i++) {
        if (set_piece(t, (uint32_t)i, (const char *)pieces[i].piece, pieces[i].len, pieces[i].type)) goto oom;
        if (pieces[i].type == PIECE_CONTROL || pieces[i].type == PIECE_UNKNOWN) {
            t->special[i] = 1;
            if (add_added_token(t, (const char *)pieces[i].piece, pieces[i].len, (uint32_t)i, 1)) goto oom;
        }
    }
    if (t->n_added) qsort(t->added, t->n_added, sizeof *t->added, added_longer_first);
    t->byte_fallback = byte_fallback;
    t->fuse_unk = 1;
    t->prefix = add_dummy_prefix ? PREFIX_ALWAYS : PREFIX_NEVER;
    t->unk_id = unk_id >= 0 && unk_id < (int64_t)n ? unk_id : -1;
    t->bos_id = bos_id >= 0 && bos_id < (int64_t)n ? bos_id : -1;
    t->eos_id = eos_id >= 0 && eos_id < (int64_t)n ? eos_id : -1;
    t->adds_bos = t->bos_id >= 0;
    if (spm_index(t, err)) goto fail;
    if (default_decoder(t)) goto oom;
    int all_bytes = t->byte_fallback;
    for (int b = 0; b < 256 && all_bytes; b++) all_bytes = t->byte_id[b] >= 0;
    if (t->unk_id < 0 && !all_bytes) {
        err_set(err, "%s: trainer_spec.unk_id is out of range and byte fallback does not cover all 256 bytes", path);
        goto fail;
    }

    // Merges, as sentencepiece applies them: a pair of symbols merges when their concatenation
    // is a piece; the higher that piece's score, the earlier (equal scores: leftmost first,
    // which the heap's position tie-break gives). rank = position of the merged piece in score
    // order, equal scores sharing a rank.
    order = malloc(n * sizeof *order);
    if (!order) goto oom;
    for (uint32_t i = 0; i < n; i++) order[i] = i;
    qsort_r(order, n, sizeof *order, by_score_then_id, pieces);
    uint32_t *rank_of = malloc(n * sizeof *rank_of);
    if (!rank_of) goto oom;
    for (size_t i = 0, r = 0; i < n; i++) {
        if (i > 0 && pieces[order[i]].score != pieces[order[i - 1]].score) r = i;
        rank_of[order[i]] = (uint32_t)r;
    }
    size_t nml = 0, mlcap = 0;
    for (uint32_t id = 0; id < n; id++) {
        int ty = t->type[id];
        if (ty != PIECE_NORMAL && ty != PIECE_USER && ty != PIECE_UNUSED) continue;
        const char *p = t->piece[id];
        size_t len = t->piece_len[id];
        for (size_t cut = utf8_len((const unsigned char *)p, len); cut > 0 && cut < len;) {
            int64_t l = strmap_get(t, &t->vocab, p, cut), r = strmap_get(t, &t->vocab, p + cut, len - cut);
            if (l >= 0 && r >= 0) {
                if (nml == mlcap) {
                    mlcap = mlcap ? mlcap * 2 : 4096;
                    PbMerge *nm = realloc(ml, mlcap * sizeof *nm);
                    if (!nm) { free(rank_of); goto oom; }
                    ml = nm;
                }
                ml[nml++] = (PbMerge){ id, (uint32_t)l, (uint32_t)r, pieces[id].score };
            }
            size_t cl = utf8_len((const unsigned char *)p + cut, len - cut);
            if (!cl) break;
            cut += cl;
        }
    }
    // The fingerprint's merge list follows transformers' SentencePieceExtractor order (score
    // descending, then merged id, then left and right ids), so a converted tokenizer.json of
    // the same model hashes the same.
    if (nml) qsort(ml, nml, sizeof *ml, merge_order);
    if (pairmap_init(&t->merges, nml)) { free(rank_of); goto oom; }
    t->merge_left = malloc((nml + 1) * sizeof *t->merge_left);
    t->merge_right = malloc((nml + 1) * sizeof *t->merge_right);
    if (!t->merge_left || !t->merge_right) { free(rank_of); goto oom; }
    for (size_t i = 0; i < nml; i++) {
        pairmap_put(&t->merges, ml[i].left, ml[i].right, rank_of[ml[i].merged], ml[i].merged);
        t->merge_left[i] = ml[i].left;
        t->merge_right[i] = ml[i].right;
    }
    t->n_merge_list = (uint32_t)nml;
    t->fingerprint = compute_fingerprint(t);
    free(rank_of);
    free(ml);
    free(order);
    free(pieces);
    free(file);
    return t;
bad:
    err_set(err, "%s: not a valid SentencePiece model (protobuf parse error)", path);
    goto fail;
oom:
    err_set(err, "out of memory");
fail:
    spm_free(t);
    free(ml);
    free(order);
    free(pieces);
    free(file);
    return NULL;
}

void spm_free(SpmTokenizer *t)
{
    if (!t) return;
    for (uint32_t i = 0; i < t->n_vocab; i++) {
        if (t->piece) free(t->piece[i]);
        if (t->shown) free(t->shown[i]);
    }
    free(t->piece);
    free(t->piece_len);
    free(t->shown);
    free(t->shown_len);
    free(t->type);
    free(t->special);
    free(t->byte_value);
    free(t->vocab.slot);
    free(t->names.slot);
    free(t->bmp_id);
    free(t->merges.slot);
    free(t->merges.bloom);
    free(t->merge_left);
    free(t->merge_right);
    for (size_t i = 0; i < t->n_added; i++) free(t->added[i].name);
    free(t->added);
    for (size_t i = 0; i < t->n_dec; i++) {
        free(t->dec[i].from);
        free(t->dec[i].to);
    }
    free(t->dec);
    free(t);
}

// ---------------------------------------------------------------------------------------
// Encoding

// Per-call scratch, grown as needed (a Tokenizer is shared by threads; scratch is not).
typedef struct {
    char *norm;             // (norm_cap) normalised bytes of one section
    uint32_t *norm_off;     // (norm_cap) original byte offset of each normalised byte
    size_t norm_cap;
    struct Sym { int32_t prev, next; uint32_t id, start, len; } *sym;   // (sym_cap)
    size_t sym_cap;
    struct Cand { uint32_t rank, pos, len, result; } *heap;             // (heap_cap); len: bytes of the pair
    size_t heap_cap, heap_n;
} Scratch;

typedef struct {
    uint32_t **ids, **offsets;
    size_t *cap, n;
} Out;

static int out_push(Out *o, uint32_t id, uint32_t off)
{
    if (o->n == *o->cap) {
        size_t nc = *o->cap ? *o->cap * 2 : 256;
        uint32_t *ni = realloc(*o->ids, nc * sizeof *ni);
        if (!ni) return -1;
        *o->ids = ni;
        if (o->offsets) {
            uint32_t *no = realloc(*o->offsets, nc * sizeof *no);
            if (!no) return -1;
            *o->offsets = no;
        }
        *o->cap = nc;
    }
    (*o->ids)[o->n] = id;
    if (o->offsets) (*o->offsets)[o->n] = off;
    o->n++;
    return 0;
}

static int cand_before(const struct Cand *a, const struct Cand *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static int heap_push(Scratch *s, struct Cand c)
{
    if (s->heap_n == s->heap_cap) {
        size_t nc = s->heap_cap ? s->heap_cap * 2 : 256;
        struct Cand *nh = realloc(s->heap, nc * sizeof *nh);
        if (!nh) return -1;
        s->heap = nh;
        s->heap_cap = nc;
    }
    size_t i = s->heap_n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!cand_before(&c, &s->heap[parent])) break;
        s->heap[i] = s->heap[parent];
        i = parent;
    }
    s->heap[i] = c;
    return 0;
}

static struct Cand heap_pop(Scratch *s)
{
    struct Cand top = s->heap[0], last = s->heap[--s->heap_n];
    size_t i = 0, n = s->heap_n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && cand_before(&s->heap[c + 1], &s->heap[c])) c++;
        if (!cand_before(&s->heap[c], &last)) break;
        s->heap[i] = s->heap[c];
        i = c;
    }
    if (n) s->heap[i] = last;
    return top;
}

static int add_candidate(const SpmTokenizer *t, Scratch *s, int32_t left)
{
    if (left < 0) return 0;
    int32_t right = s->sym[left].next;
    if (right < 0) return 0;
    uint32_t rank, result;
    if (!pairmap_get(&t->merges, s->sym[left].id, s->sym[right].id, &rank, &result)) return 0;
    return heap_push(s, (struct Cand){ rank, (uint32_t)left, s->sym[left].len + s->sym[right].len, result });
}

static int64_t char_id(const SpmTokenizer *t, const char *c, size_t len)
{
    if (len <= 3) {
        uint32_t cp = utf8_decode((const unsigned char *)c, len);
        if (cp < 65536) return t->bmp_id[cp];
    }
    return strmap_get(t, &t->vocab, c, len);
}

#define SYM_UNK UINT32_MAX   // a symbol for the unknown token (no byte fallback available)

// BPE over one word of normalised text: norm[a, b). Symbols start as characters (or their
// <0xNN> bytes when the character is not a piece), then the lowest-ranked adjacent pair is
// merged until none is left; ties go to the leftmost pair.
static int bpe_word(const SpmTokenizer *t, Scratch *s, size_t a, size_t b, Out *o)
{
    size_t ns = 0;
    if (b - a > s->sym_cap) {
        struct Sym *nsym = realloc(s->sym, (b - a) * sizeof *nsym);
        if (!nsym) return -1;
        s->sym = nsym;
        s->sym_cap = b - a;
    }
    for (size_t i = a; i < b;) {
        size_t cl = utf8_len((const unsigned char *)s->norm + i, b - i);
        if (!cl) cl = 1;   // cannot happen: the input was validated
        int64_t id = char_id(t, s->norm + i, cl);
        if (id >= 0) {
            s->sym[ns++] = (struct Sym){ 0, 0, (uint32_t)id, (uint32_t)i, (uint32_t)cl };
        } else {
            int all = t->byte_fallback;
            for (size_t k = 0; all && k < cl; k++) all = t->byte_id[(unsigned char)s->norm[i + k]] >= 0;
            if (all) {
                for (size_t k = 0; k < cl; k++)
                    s->sym[ns++] = (struct Sym){ 0, 0, (uint32_t)t->byte_id[(unsigned char)s->norm[i + k]],
                                                 (uint32_t)(i + k), 1 };
            } else if (t->fuse_unk && ns > 0 && s->sym[ns - 1].id == SYM_UNK) {
                s->sym[ns - 1].len += (uint32_t)cl;
            } else {
                s->sym[ns++] = (struct Sym){ 0, 0, SYM_UNK, (uint32_t)i, (uint32_t)cl };
            }
        }
        i += cl;
    }
    for (size_t i = 0; i < ns; i++) {
        s->sym[i].prev = (int32_t)i - 1;
        s->sym[i].next = i + 1 < ns ? (int32_t)i + 1 : -1;
    }
    s->heap_n = 0;
    for (size_t i = 0; i + 1 < ns; i++)
        if (s->sym[i].id != SYM_UNK && s->sym[i + 1].id != SYM_UNK && add_candidate(t, s, (int32_t)i)) return -1;
    while (s->heap_n > 0) {
        struct Cand c = heap_pop(s);
        struct Sym *l = &s->sym[c.pos];
        if (l->len == 0 || l->next < 0) continue;   // merged away, or nothing on the right now
        struct Sym *r = &s->sym[l->next];
        // Stale when a side changed since it was queued. Symbols only grow and keep their
        // start, so the pair's byte length tells (as sentencepiece checks it).
        if (l->len + r->len != c.len) continue;
        l->id = c.result;
        l->len += r->len;
        r->len = 0;
        l->next = r->next;
        if (l->next >= 0) s->sym[l->next].prev = (int32_t)c.pos;
        if ((l->prev >= 0 && s->sym[l->prev].id != SYM_UNK && add_candidate(t, s, l->prev)) ||
            add_candidate(t, s, (int32_t)c.pos))
            return -1;
    }
    for (int32_t i = ns ? 0 : -1; i >= 0; i = s->sym[i].next) {
        const struct Sym *y = &s->sym[i];
        if (y->id == SYM_UNK) {
            if (t->unk_id < 0) return -2;
            if (out_push(o, (uint32_t)t->unk_id, s->norm_off[y->start])) return -1;
        } else if (out_push(o, y->id, s->norm_off[y->start])) {
            return -1;
        }
    }
    return 0;
}

// One section of text between added tokens: text[a, b), normalised then BPE'd.
// at_start: the section begins at offset 0 of the whole input (for Metaspace "first").
static int encode_section(const SpmTokenizer *t, Scratch *s, const char *text, size_t a, size_t b,
                          int at_start, Out *o)
{
    if (a == b) return 0;
    size_t need = (b - a) * META_LEN + META_LEN;
    if (need > s->norm_cap) {
        char *nn = realloc(s->norm, need);
        uint32_t *no = realloc(s->norm_off, need * sizeof *no);
        if (nn) s->norm = nn;
        if (no) s->norm_off = no;
        if (!nn || !no) return -1;
        s->norm_cap = need;
    }
    size_t m = 0;
    // Metaspace prepends only when the replaced text does not already begin with "▁".
    int starts_with_space = text[a] == ' ' || (b - a >= META_LEN && memcmp(text + a, META, META_LEN) == 0);
    int prepend = t->prefix == PREFIX_ALWAYS ||
                  (t->prefix == PREFIX_ALWAYS_UNLESS_SPACE && !starts_with_space) ||
                  (t->prefix == PREFIX_FIRST && at_start && !starts_with_space);
    if (prepend) {
        memcpy(s->norm, META, META_LEN);
        for (int k = 0; k < META_LEN; k++) s->norm_off[m + k] = (uint32_t)a;
        m += META_LEN;
    }
    for (size_t i = a; i < b; i++) {
        if (text[i] == ' ') {
            memcpy(s->norm + m, META, META_LEN);
            for (int k = 0; k < META_LEN; k++) s->norm_off[m + k] = (uint32_t)i;
            m += META_LEN;
        } else {
            s->norm[m] = text[i];
            s->norm_off[m++] = (uint32_t)i;
        }
    }
    if (!t->split_words && !t->split_safe) return bpe_word(t, s, 0, m, o);
    if (!t->split_words) {
        // Words start at each "▁" that follows another character; merges never cross that.
        size_t w = 0;
        for (size_t i = 1; i + META_LEN <= m; i++) {
            if (memcmp(s->norm + i, META, META_LEN) == 0 &&
                !(i >= META_LEN && memcmp(s->norm + i - META_LEN, META, META_LEN) == 0)) {
                int rc = bpe_word(t, s, w, i, o);
                if (rc) return rc;
                w = i;
                i += META_LEN - 1;
            }
        }
        return bpe_word(t, s, w, m, o);
    }
    // Metaspace split: each word starts at a "▁" (the delimiter goes with what follows).
    size_t w = 0;
    for (size_t i = META_LEN; i + META_LEN <= m; i++) {
        if (memcmp(s->norm + i, META, META_LEN) == 0) {
            int rc = bpe_word(t, s, w, i, o);
            if (rc) return rc;
            w = i;
            i += META_LEN - 1;
        }
    }
    return bpe_word(t, s, w, m, o);
}

// The added token matching at text[i], longest first; NULL when none.
static const AddedToken *match_added(const SpmTokenizer *t, const char *text, size_t len, size_t i,
                                     int parse_special)
{
    if (!t->added_first[(unsigned char)text[i]]) return NULL;
    for (size_t k = 0; k < t->n_added; k++) {
        const AddedToken *a = &t->added[k];
        if ((!a->special || parse_special) && a->len <= len - i && memcmp(text + i, a->name, a->len) == 0)
            return a;
    }
    return NULL;
}

long spm_encode(const SpmTokenizer *t, const char *text, size_t len, int parse_special,
                uint32_t **ids, size_t *cap, size_t n, uint32_t **offsets, Err *err)
{
    if (len > UINT32_MAX / 4) return err_set(err, "text of %zu bytes is too long to tokenize", len);
    for (size_t i = 0; i < len;) {
        size_t cl = utf8_len((const unsigned char *)text + i, len - i);
        if (!cl) return err_set(err, "invalid UTF-8 at byte %zu", i);
        i += cl;
    }
    if (offsets && *offsets == NULL && *ids != NULL) {   // keep both arrays at one capacity
        *offsets = malloc((*cap ? *cap : 1) * sizeof **offsets);
        if (!*offsets) return err_set(err, "out of memory");
    }
    Out o = { ids, offsets, cap, n };
    Scratch s = { 0 };
    int rc = 0;
    size_t start = 0;
    for (size_t i = 0; i < len && rc == 0;) {
        const AddedToken *a = t->n_added ? match_added(t, text, len, i, parse_special) : NULL;
        if (!a) {
            i++;
            continue;
        }
        rc = encode_section(t, &s, text, start, i, start == 0, &o);
        if (rc == 0 && out_push(&o, a->id, (uint32_t)i)) rc = -1;
        i += a->len;
        start = i;
    }
    if (rc == 0) rc = encode_section(t, &s, text, start, len, start == 0, &o);
    free(s.norm);
    free(s.norm_off);
    free(s.sym);
    free(s.heap);
    if (rc == -2) return err_set(err, "a character has no token and the model has no unknown token");
    if (rc) return err_set(err, "out of memory");
    return (long)o.n;
}

// ---------------------------------------------------------------------------------------
// Decoding: token strings through the decoder steps, then concatenated.

typedef struct {
    char *s;
    size_t len;
} Str;

static int str_set(Str *x, const char *s, size_t len)
{
    char *p = malloc(len + 1);
    if (!p) return -1;
    memcpy(p, s, len);
    p[len] = 0;
    free(x->s);
    x->s = p;
    x->len = len;
    return 0;
}

static int step_replace(Str *tok, size_t n, const DecodeStep *d)
{
    size_t fl = strlen(d->from), tl = strlen(d->to);
    for (size_t i = 0; i < n; i++) {
        if (!memmem(tok[i].s, tok[i].len, d->from, fl)) continue;
        char *out = malloc(tok[i].len / fl * tl + tok[i].len + 1);
        size_t m = 0;
        if (!out) return -1;
        for (size_t k = 0; k < tok[i].len;) {
            if (k + fl <= tok[i].len && memcmp(tok[i].s + k, d->from, fl) == 0) {
                memcpy(out + m, d->to, tl);
                m += tl;
                k += fl;
            } else {
                out[m++] = tok[i].s[k++];
            }
        }
        free(tok[i].s);
        tok[i].s = out;
        tok[i].len = m;
    }
    return 0;
}

static int valid_utf8(const char *s, size_t len)
{
    for (size_t i = 0; i < len;) {
        size_t cl = utf8_len((const unsigned char *)s + i, len - i);
        if (!cl) return 0;
        i += cl;
    }
    return 1;
}

// Runs of <0xNN> tokens become their bytes when those form valid UTF-8, else one U+FFFD each.
static int step_byte_fallback(Str *tok, size_t *n)
{
    size_t w = 0;
    for (size_t i = 0; i < *n;) {
        if (parse_byte_piece(tok[i].s, tok[i].len) < 0) {
            tok[w++] = tok[i++];
            continue;
        }
        size_t j = i;
        while (j < *n && parse_byte_piece(tok[j].s, tok[j].len) >= 0) j++;
        // The run's bytes overwrite the first token's string (6 bytes of "<0xNN>" each >= 1).
        char *bytes = malloc(j - i + 1);
        if (!bytes) return -1;
        for (size_t k = i; k < j; k++) bytes[k - i] = (char)parse_byte_piece(tok[k].s, tok[k].len);
        if (valid_utf8(bytes, j - i)) {
            free(tok[i].s);
            tok[i] = (Str){ bytes, j - i };
            for (size_t k = i + 1; k < j; k++) free(tok[k].s);
            tok[w++] = tok[i];
        } else {
            free(bytes);
            for (size_t k = i; k < j; k++) {
                if (str_set(&tok[k], "\xef\xbf\xbd", 3)) return -1;
                tok[w++] = tok[k];
            }
        }
        i = j;
    }
    *n = w;
    return 0;
}

static int step_fuse(Str *tok, size_t *n)
{
    if (*n <= 1) return 0;
    size_t total = 0;
    for (size_t i = 0; i < *n; i++) total += tok[i].len;
    char *all = malloc(total + 1);
    if (!all) return -1;
    size_t m = 0;
    for (size_t i = 0; i < *n; i++) {
        memcpy(all + m, tok[i].s, tok[i].len);
        m += tok[i].len;
        free(tok[i].s);
    }
    all[m] = 0;
    tok[0] = (Str){ all, m };
    *n = 1;
    return 0;
}

static void step_strip(Str *tok, size_t n, const DecodeStep *d)
{
    for (size_t i = 0; i < n; i++) {
        size_t a = 0, b = tok[i].len;
        while (a < d->strip_start && a < b && tok[i].s[a] == d->strip_char) a++;
        for (size_t k = 0; k < d->strip_stop && b > a && tok[i].s[b - 1] == d->strip_char; k++) b--;
        memmove(tok[i].s, tok[i].s + a, b - a);
        tok[i].len = b - a;
    }
}

// Metaspace decoder: "▁" -> " ", except in the first token, where each "▁" is dropped.
static int step_metaspace(Str *tok, size_t n, const DecodeStep *d)
{
    for (size_t i = 0; i < n; i++) {
        size_t m = 0;
        for (size_t k = 0; k < tok[i].len;) {
            if (k + META_LEN <= tok[i].len && memcmp(tok[i].s + k, META, META_LEN) == 0) {
                if (!(i == 0 && d->metaspace_strip)) tok[i].s[m++] = ' ';
                k += META_LEN;
            } else {
                tok[i].s[m++] = tok[i].s[k++];
            }
        }
        tok[i].len = m;
    }
    return 0;
}

long spm_decode(const SpmTokenizer *t, const uint32_t *ids, size_t n, int skip_special,
                char **out, size_t *cap, size_t len, Err *err)
{
    Str *tok = calloc(n ? n : 1, sizeof *tok);
    size_t nt = 0;
    long rc = -1;
    if (!tok) return err_set(err, "out of memory");
    for (size_t i = 0; i < n; i++) {
        if (ids[i] >= t->n_vocab) {
            err_set(err, "token id %u is out of range (vocabulary %u)", ids[i], t->n_vocab);
            goto done;
        }
        if (skip_special && t->special[ids[i]]) continue;
        if (str_set(&tok[nt], t->piece[ids[i]], t->piece_len[ids[i]])) goto oom;
        nt++;
    }
    for (size_t k = 0; k < t->n_dec; k++) {
        const DecodeStep *d = &t->dec[k];
        int e = 0;
        switch (d->kind) {
        case DEC_REPLACE: e = step_replace(tok, nt, d); break;
        case DEC_BYTE_FALLBACK: e = step_byte_fallback(tok, &nt); break;
        case DEC_FUSE: e = step_fuse(tok, &nt); break;
        case DEC_STRIP: step_strip(tok, nt, d); break;
        case DEC_METASPACE: e = step_metaspace(tok, nt, d); break;
        }
        if (e) goto oom;
    }
    size_t total = len;
    for (size_t i = 0; i < nt; i++) total += tok[i].len;
    if (total + 1 > *cap) {
        size_t nc = total + 1 > *cap * 2 ? total + 1 : *cap * 2;
        char *no = realloc(*out, nc);
        if (!no) goto oom;
        *out = no;
        *cap = nc;
    }
    for (size_t i = 0; i < nt; i++) {
        memcpy(*out + len, tok[i].s, tok[i].len);
        len += tok[i].len;
    }
    (*out)[len] = 0;
    rc = (long)len;
    goto done;
oom:
    err_set(err, "out of memory");
done:
    for (size_t i = 0; i < nt; i++) free(tok[i].s);
    free(tok);
    return rc;
}

// ---------------------------------------------------------------------------------------
// Queries

const char *spm_token_bytes(const SpmTokenizer *t, uint32_t id, size_t *len)
{
    if (id >= t->n_vocab) return NULL;
    *len = t->shown_len[id];
    return t->shown[id];
}

int spm_is_special(const SpmTokenizer *t, uint32_t id) { return id < t->n_vocab && t->special[id]; }

int64_t spm_token_id(const SpmTokenizer *t, const char *s, size_t len)
{
    return strmap_get(t, &t->names, s, len);
}

uint32_t spm_vocab_size(const SpmTokenizer *t) { return t->n_vocab; }
int64_t spm_bos_id(const SpmTokenizer *t) { return t->bos_id; }
int64_t spm_eos_id(const SpmTokenizer *t) { return t->eos_id; }
int spm_adds_bos(const SpmTokenizer *t) { return t->adds_bos; }

uint64_t spm_fingerprint(const SpmTokenizer *t) { return t->fingerprint; }

static uint64_t compute_fingerprint(const SpmTokenizer *t)
{
    XXH3_state_t *st = XXH3_createState();
    if (!st) return 0;
    XXH3_64bits_reset(st);
    // The prefix policies that encode alike outside special tokens hash alike.
    const char *kind = "bpe-sentencepiece";
    XXH3_64bits_update(st, kind, strlen(kind) + 1);
    uint32_t head[4] = { t->n_vocab, (uint32_t)t->prefix, (uint32_t)t->split_words, (uint32_t)t->byte_fallback };
    XXH3_64bits_update(st, head, sizeof head);
    for (uint32_t id = 0; id < t->n_vocab; id++) {
        uint32_t rec[2] = { t->piece_len[id], t->special[id] };
        XXH3_64bits_update(st, rec, sizeof rec);
        XXH3_64bits_update(st, t->piece[id], t->piece_len[id]);
    }
    XXH3_64bits_update(st, &t->n_merge_list, sizeof t->n_merge_list);
    for (uint32_t i = 0; i < t->n_merge_list; i++) {
        uint32_t pair[2] = { t->merge_left[i], t->merge_right[i] };
        XXH3_64bits_update(st, pair, sizeof pair);
    }
    uint64_t h = XXH3_64bits_digest(st);
    XXH3_freeState(st);
    return h;
}
