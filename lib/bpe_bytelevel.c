// Byte-level BPE (Llama 3): loading the two file formats, encoding, decoding. See bpe_bytelevel.h.
#include "bpe_bytelevel.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "pretok.h"
#include "unicode.h"

#define NO_ID UINT32_MAX
#define NO_RANK UINT32_MAX
#define SCAN_MAX_PARTS 16        // pieces of more parts merge with the heap, the others by scanning
#define CACHE_SLOTS (1u << 14)   // per thread, direct-mapped: 16384 slots of 128 bytes = 2 MiB
#define CACHE_IDS 16
#define PAIR_CACHE_SLOTS (1u << 16)   // per thread, for tiktoken files: 64K pairs, 1 MiB
#define CACHE_BYTES 52

typedef struct {
    uint32_t off, len;           // token bytes: blob[off, off + len); len 0 for an unused id
} Span;

typedef struct {
    uint32_t id;
    uint8_t special;
} Added;

// One cached piece -> ids result.
typedef struct {
    uint64_t hash;
    uint16_t len;                // piece length in bytes; 0 = empty slot
    uint8_t n_ids;
    uint32_t ids[CACHE_IDS];
    uint8_t bytes[CACHE_BYTES];
} CacheSlot;

// Heap entry of the O(n log n) merge: the pair starting at node pos.
typedef struct {
    uint32_t rank, pos, left_id, right_id, new_id;
} Candidate;

// Per-thread scratch: the cache and the merge work arrays (grown to the longest piece seen).
// tiktoken merges two parts when their concatenation is a token, at that token's rank. The
// answer for a pair of ids is cached per thread so that merging rarely hashes bytes.
typedef struct {
    uint64_t key;                // left << 32 | right, with bit 63 set when the slot is used
    uint32_t rank;               // the token of the concatenation, or NO_RANK
} PairCacheSlot;

typedef struct ThreadState {
    CacheSlot *cache;            // (CACHE_SLOTS)
    PairCacheSlot *pairs;        // (PAIR_CACHE_SLOTS) when the rule is tiktoken's, else NULL
    uint32_t *node_id, *node_next, *node_prev;   // (work_cap) heap merge: node i = the part at byte i
    uint32_t *part_start, *part_id;              // (work_cap + 1) the initial parts of a piece
    Candidate *heap;             // (heap_cap)
    size_t work_cap, heap_cap;
    struct ThreadState *next_state;
} ThreadState;

typedef struct {
    pthread_key_t key;
    pthread_mutex_t lock;        // guards the list of all thread states (freed with the model)
    ThreadState *states;
} ThreadStates;

struct ByteLevelBpe {
    uint32_t n_tokens;           // ids are 0..n_tokens-1, added tokens included
    uint32_t tok_cap;            // allocated entries of tok and is_special
    Span *tok;                   // (n_tokens)
    uint8_t *is_special;         // (n_tokens) 1 special added token, 2 other added token,
                                 // 3 vocab entry outside the byte-level alphabet (never produced)
    char *blob;                  // token bytes, all ids
    size_t blob_len, blob_cap;
    uint64_t *vocab_slots;       // open addressing over ordinary tokens: hash high 32 bits << 32 | (id + 1)
    uint32_t vocab_mask;
    uint32_t byte_id[256];       // the token of each single byte
    // Merge rule. use_ranks: a pair merges when its concatenation is a token, rank = that id
    // (tiktoken; answered through the per-thread PairCacheSlot cache). Otherwise the merges
    // list of tokenizer.json: pair (left id, right id) -> merge index, result (pair_* below).
    int use_ranks;
    uint32_t max_token_len;      // longest ordinary token, bytes
    int whole_piece_lookup;      // try the piece as one token first (tiktoken; HF ignore_merges)
    uint64_t *pair_keys;         // (pair_mask + 1) left << 32 | right; NULL for tiktoken files
    uint32_t *pair_rank;         // merge index + 1; 0 = empty slot
    uint32_t *pair_new;
    uint32_t pair_mask;
    uint32_t n_merges;
    int merges_follow_ranks;     // every merge's result id >= the previous one's
    // Whole characters (see find_whole_chars): for a BMP character of 2-3 bytes whose bytes
    // merge into one token, that token and the highest merge rank used (else NO_ID); for a
    // byte pair (x << 8 | y, y not a continuation byte) the lowest rank of a merge result
    // holding it. NULL when not built.
    uint32_t *char_token, *char_rank;   // (65536) by code point
    uint32_t *boundary_rank;            // (65536) by byte pair
    Added *added;                // added tokens, sorted by nothing; matched longest first
    size_t n_added;
    uint8_t added_first_byte[256];   // 1 when some added token starts with this byte
    int has_plain_added;         // a non-special added token exists (always matched)
    int bos_template;            // post_processor TemplateProcessing puts a special first
    int64_t bos_template_id;
    ThreadStates *threads;
};

// ---- byte-level alphabet (GPT-2's bytes_to_unicode) ---------------------------------------

// Code point that stands for byte b in tokenizer.json strings.
static uint32_t byte_to_char(int b)
{
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174) return (uint32_t)b;
    int n = 0;
    for (int i = 0; i < b; i++)
        if (!((i >= 33 && i <= 126) || (i >= 161 && i <= 172) || i >= 174)) n++;
    return 256u + (uint32_t)n;
}

// Map a byte-level string back to bytes (out has room for strlen(s) bytes). -1 when it holds a
// character outside the alphabet (such a token can never be produced from bytes).
static int16_t char_byte[256 + 68];   // inverse of byte_to_char
static void char_byte_init(void)
{
    for (int b = 0; b < 256; b++) char_byte[byte_to_char(b)] = (int16_t)b;
}

static long bytelevel_string_to_bytes(const char *s, size_t len, uint8_t *out)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, char_byte_init);
    if (utf8_valid_prefix(s, len) != len) return -1;
    const uint8_t *p = (const uint8_t *)s, *end = p + len;
    long n = 0;
    while (p < end) {
        uint32_t cp;
        p += utf8_decode(p, &cp);
        if (cp >= 256 + 68) return -1;
        out[n++] = (uint8_t)char_byte[cp];
    }
    return n;
}

// ---- vocabulary hash ---------------------------------------------------------------------

// Most lookups are of a few bytes (a word, a pair of parts): those get a multiply-xor hash of
// two 8-byte loads; longer ones XXH3.
static inline uint64_t hash_bytes(const void *p, size_t n)
{
    if (n > 16) return XXH3_64bits(p, n);
    const uint8_t *s = p;
    uint64_t lo, hi;
    if (n >= 8) {   // two overlapping loads cover 8..16 bytes
        memcpy(&lo, s, 8);
        memcpy(&hi, s + n - 8, 8);
    } else if (n >= 4) {
        uint32_t a, c;
        memcpy(&a, s, 4);
        memcpy(&c, s + n - 4, 4);
        lo = a;
        hi = c;
    } else {
        lo = n ? (uint64_t)s[0] << 16 | (uint64_t)s[n / 2] << 8 | s[n - 1] : 0;
        hi = 0;
    }
    uint64_t h = (lo ^ 0x9E3779B97F4A7C15ull) * 0xBF58476D1CE4E5B9ull;
    h ^= (hi + n) * 0x94D049BB133111EBull;
    h ^= h >> 31;
    h *= 0xD6E8FEB86659FD93ull;
    return h ^ (h >> 32);
}

static inline uint32_t vocab_find_hashed(const ByteLevelBpe *b, const void *p, size_t n, uint64_t h)
{
    uint32_t tag = (uint32_t)(h >> 32);
    for (uint32_t i = (uint32_t)h & b->vocab_mask;; i = (i + 1) & b->vocab_mask) {
        uint64_t s = b->vocab_slots[i];
        if (!s) return NO_ID;
        if ((uint32_t)(s >> 32) == tag) {
            uint32_t id = (uint32_t)s - 1;
            if (b->tok[id].len == n && memcmp(b->blob + b->tok[id].off, p, n) == 0) return id;
        }
    }
}

static inline uint32_t vocab_find(const ByteLevelBpe *b, const void *p, size_t n)
{
    return vocab_find_hashed(b, p, n, hash_bytes(p, n));
}

// Index every ordinary token with bytes (first id wins on duplicates).
static int vocab_build(ByteLevelBpe *b, Err *err)
{
    uint32_t cap = 1024;
    while (cap < 2 * b->n_tokens) cap <<= 1;
    b->vocab_slots = calloc(cap, sizeof *b->vocab_slots);
    if (!b->vocab_slots) return err_set(err, "out of memory");
    b->vocab_mask = cap - 1;
    for (uint32_t id = 0; id < b->n_tokens; id++) {
        if (!b->tok[id].len || b->is_special[id]) continue;
        if (b->tok[id].len > b->max_token_len) b->max_token_len = b->tok[id].len;
        const char *p = b->blob + b->tok[id].off;
        uint64_t h = hash_bytes(p, b->tok[id].len);
        if (vocab_find_hashed(b, p, b->tok[id].len, h) != NO_ID) continue;
        uint32_t i = (uint32_t)h & b->vocab_mask;
        while (b->vocab_slots[i]) i = (i + 1) & b->vocab_mask;
        b->vocab_slots[i] = (h >> 32) << 32 | (uint64_t)(id + 1);
    }
    for (int c = 0; c < 256; c++) {
        uint8_t byte = (uint8_t)c;
        b->byte_id[c] = vocab_find(b, &byte, 1);
    }
    return 0;
}

// ---- merges (tokenizer.json) -------------------------------------------------------------

static inline uint32_t pair_slot(uint64_t key, uint32_t mask)
{
    return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & mask;
}

static inline int pair_find(const ByteLevelBpe *b, uint32_t left, uint32_t right, uint32_t *rank, uint32_t *new_id)
{
    uint64_t key = (uint64_t)left << 32 | right;
    for (uint32_t i = pair_slot(key, b->pair_mask);; i = (i + 1) & b->pair_mask) {
        if (!b->pair_rank[i]) return 0;
        if (b->pair_keys[i] == key) {
            *rank = b->pair_rank[i] - 1;
            *new_id = b->pair_new[i];
            return 1;
        }
    }
}

// ---- token table -------------------------------------------------------------------------

static int ensure_tokens(ByteLevelBpe *b, uint32_t n, Err *err)
{
    if (n <= b->n_tokens) return 0;
    if (n > b->tok_cap) {
        uint32_t cap = n > 2 * b->tok_cap ? n : 2 * b->tok_cap;
        Span *tok = realloc(b->tok, (size_t)cap * sizeof *tok);
        if (!tok) return err_set(err, "out of memory");
        b->tok = tok;
        uint8_t *sp = realloc(b->is_special, cap);
        if (!sp) return err_set(err, "out of memory");
        b->is_special = sp;
        b->tok_cap = cap;
    }
    memset(b->tok + b->n_tokens, 0, (size_t)(n - b->n_tokens) * sizeof *b->tok);
    memset(b->is_special + b->n_tokens, 0, n - b->n_tokens);
    b->n_tokens = n;
    return 0;
}

static int set_token_bytes(ByteLevelBpe *b, uint32_t id, const void *p, size_t len, Err *err)
{
    if (len > UINT32_MAX / 2 || b->blob_len + len > UINT32_MAX) return err_set(err, "token %u too long", id);
    if (b->blob_len + len > b->blob_cap) {
        size_t cap = b->blob_cap ? b->blob_cap : 1 << 20;
        while (cap < b->blob_len + len) cap *= 2;
        char *blob = realloc(b->blob, cap);
        if (!blob) return err_set(err, "out of memory");
        b->blob = blob;
        b->blob_cap = cap;
    }
    memcpy(b->blob + b->blob_len, p, len);
    b->tok[id].off = (uint32_t)b->blob_len;
    b->tok[id].len = (uint32_t)len;
    b->blob_len += len;
    return 0;
}

int bytelevel_add_token(ByteLevelBpe *b, uint32_t id, const char *s, size_t len, int special, Err *err)
{
    if (!len) return err_set(err, "added token %u is empty", id);
    if (id == NO_ID) return err_set(err, "added token id %u out of range", id);
    if (ensure_tokens(b, id + 1, err) < 0 || set_token_bytes(b, id, s, len, err) < 0) return -1;
    size_t i = 0;
    while (i < b->n_added && b->added[i].id != id) i++;
    if (i == b->n_added) {
        Added *a = realloc(b->added, (b->n_added + 1) * sizeof *a);
        if (!a) return err_set(err, "out of memory");
        b->added = a;
        b->n_added++;
    }
    b->added[i] = (Added){id, (uint8_t)(special ? 1 : 0)};
    b->is_special[id] = special ? 1 : 2;
    b->added_first_byte[(uint8_t)s[0]] = 1;
    if (!special) b->has_plain_added = 1;
    return 0;
}

int bytelevel_add_llama3_specials(ByteLevelBpe *b, Err *err)
{
    static const char *named[11] = {
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    };
    char name[64];
    for (uint32_t i = 0; i < 256; i++) {
        const char *s = name;
        if (i < 11) s = named[i];
        else snprintf(name, sizeof name, "<|reserved_special_token_%u|>", i - 11 + 3);
        if (bytelevel_add_token(b, 128000 + i, s, strlen(s), 1, err) < 0) return -1;
    }
    return 0;
}

static ByteLevelBpe *bytelevel_new(Err *err)
{
    ByteLevelBpe *b = calloc(1, sizeof *b);
    ThreadStates *ts = calloc(1, sizeof *ts);
    if (!b || !ts) goto oom;
    if (pthread_key_create(&ts->key, NULL) != 0) goto oom;
    pthread_mutex_init(&ts->lock, NULL);
    b->threads = ts;
    b->bos_template_id = -1;
    return b;
oom:
    free(b);
    free(ts);
    err_set(err, "out of memory");
    return NULL;
}

void bytelevel_free(ByteLevelBpe *b)
{
    if (!b) return;
    if (b->threads) {
        for (ThreadState *s = b->threads->states, *next; s; s = next) {
            next = s->next_state;
            free(s->cache);
            free(s->pairs);
            free(s->node_id);
            free(s->node_next);
            free(s->node_prev);
            free(s->part_start);
            free(s->part_id);
            free(s->heap);
            free(s);
        }
        pthread_key_delete(b->threads->key);
        pthread_mutex_destroy(&b->threads->lock);
        free(b->threads);
    }
    free(b->tok);
    free(b->is_special);
    free(b->blob);
    free(b->vocab_slots);
    free(b->pair_keys);
    free(b->pair_rank);
    free(b->pair_new);
    free(b->added);
    free(b->char_token);
    free(b->char_rank);
    free(b->boundary_rank);
    free(b);
}

static int find_whole_chars(ByteLevelBpe *b, Err *err);

// ---- tiktoken rank file ------------------------------------------------------------------

static int8_t base64_value[256];   // -1 outside the alphabet
static void base64_init(void)
{
    memset(base64_value, -1, sizeof base64_value);
    const char *alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (int i = 0; i < 64; i++) base64_value[(uint8_t)alphabet[i]] = (int8_t)i;
}

static long base64_decode(const char *s, size_t len, uint8_t *out)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, base64_init);
    if (len % 4) return -1;
    long n = 0;
    for (size_t i = 0; i < len; i += 4) {
        int pad = (s[i + 3] == '=') + (s[i + 2] == '=' && s[i + 3] == '=');
        if (pad && i + 4 != len) return -1;
        uint32_t v = 0;
        for (int k = 0; k < 4; k++) {
            int d = (k >= 4 - pad) ? 0 : base64_value[(uint8_t)s[i + k]];
            if (d < 0) return -1;
            v = v << 6 | (uint32_t)d;
        }
        out[n++] = (uint8_t)(v >> 16);
        if (pad < 2) out[n++] = (uint8_t)(v >> 8);
        if (pad < 1) out[n++] = (uint8_t)v;
    }
    return n;
}

static char *read_file(const char *path, size_t *len, Err *err)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        err_set(err, "%s: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    for (;;) {
        if (!buf) break;
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        char *bigger = realloc(buf, cap * 2 + 1);
        if (!bigger) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = bigger;
        cap *= 2;
    }
    if (!buf || ferror(f)) {
        err_set(err, "%s: %s", path, buf ? "read error" : "out of memory");
        free(buf);
        fclose(f);
        return NULL;
    }
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

ByteLevelBpe *bytelevel_load_tiktoken(const char *path, Err *err)
{
    size_t len;
    char *text = read_file(path, &len, err);
    if (!text) return NULL;
    ByteLevelBpe *b = bytelevel_new(err);
    if (!b) goto fail;
    b->use_ranks = 1;
    b->whole_piece_lookup = 1;
    uint8_t bytes[1024];
    size_t line = 0;
    for (char *p = text, *end = text + len; p < end;) {
        char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol) eol = end;
        line++;
        char *q = eol;
        if (q > p && q[-1] == '\r') q--;
        if (q == p) {   // an empty line (the last one) carries nothing
            p = eol + 1;
            continue;
        }
        char *space = memchr(p, ' ', (size_t)(q - p));
        char *num_end = space ? space + 1 : NULL;
        long rank = -1;
        if (space && num_end < q) {   // decimal digits up to the end of the line
            rank = 0;
            while (num_end < q && *num_end >= '0' && *num_end <= '9' && rank < (1L << 30))
                rank = rank * 10 + (*num_end++ - '0');
        }
        long n = -1;
        if (space && (size_t)(space - p) <= 4 * sizeof bytes / 3)
            n = base64_decode(p, (size_t)(space - p), bytes);
        if (!space || num_end != q || rank < 0 || rank >= (1L << 30) || n <= 0) {
            err_set(err, "%s:%zu: not a tiktoken rank line (\"base64 rank\")", path, line);
            goto fail;
        }
        if (ensure_tokens(b, (uint32_t)rank + 1, err) < 0) goto fail;
        if (b->tok[rank].len) {
            err_set(err, "%s:%zu: rank %ld appears twice", path, line, rank);
            goto fail;
        }
        if (set_token_bytes(b, (uint32_t)rank, bytes, (size_t)n, err) < 0) goto fail;
        p = eol + 1;
    }
    free(text);
    text = NULL;
    if (!b->n_tokens) {
        err_set(err, "%s: no tokens", path);
        goto fail;
    }
    if (vocab_build(b, err) < 0) goto fail;
    for (int c = 0; c < 256; c++)
        if (b->byte_id[c] == NO_ID) {
            err_set(err, "%s: byte 0x%02x has no token (a byte-level vocabulary needs all 256)", path, c);
            goto fail;
        }
    if (find_whole_chars(b, err) < 0) goto fail;
    return b;
fail:
    free(text);
    bytelevel_free(b);
    return NULL;
}

// ---- tokenizer.json ----------------------------------------------------------------------

static const char *type_of(const json_t *o)
{
    const char *t = json_string_value(json_object_get(o, "type"));
    return t ? t : "(none)";
}

int bytelevel_json_is_bytelevel(const json_t *root)
{
    const json_t *model = json_object_get(root, "model");
    if (!model || strcmp(type_of(model), "BPE") != 0) return 0;
    if (json_is_true(json_object_get(model, "byte_fallback"))) return 0;
    const json_t *pre = json_object_get(root, "pre_tokenizer");
    if (!strcmp(type_of(pre), "ByteLevel")) return 1;
    if (!strcmp(type_of(pre), "Sequence")) {
        size_t i;
        json_t *p;
        json_array_foreach(json_object_get(pre, "pretokenizers"), i, p)
            if (!strcmp(type_of(p), "ByteLevel")) return 1;
    }
    return 0;
}

// The pre-tokenizer must be exactly Llama 3's: Sequence[Split(pattern, Isolated), ByteLevel
// without its own regex or prefix space].
static int check_pre_tokenizer(const json_t *root, const char *name, Err *err)
{
    const json_t *pre = json_object_get(root, "pre_tokenizer");
    if (strcmp(type_of(pre), "Sequence") != 0) {
        if (!strcmp(type_of(pre), "ByteLevel"))
            return err_set(err, "%s: pre_tokenizer ByteLevel with its own regex (GPT-2 style) is not supported "
                                "(only Llama 3's Sequence[Split, ByteLevel])", name);
        return err_set(err, "%s: pre_tokenizer type %s is not supported", name, type_of(pre));
    }
    const json_t *list = json_object_get(pre, "pretokenizers");
    if (json_array_size(list) != 2)
        return err_set(err, "%s: pre_tokenizer Sequence of %zu parts is not supported (want Split, ByteLevel)",
                       name, json_array_size(list));
    const json_t *split = json_array_get(list, 0), *bl = json_array_get(list, 1);
    if (strcmp(type_of(split), "Split") != 0)
        return err_set(err, "%s: pre_tokenizer type %s is not supported", name, type_of(split));
    const char *pattern = json_string_value(json_object_get(json_object_get(split, "pattern"), "Regex"));
    if (!pattern || strcmp(pattern, PRETOK_LLAMA3_PATTERN) != 0)
        return err_set(err, "%s: pre_tokenizer Split pattern is not supported (only the Llama 3 regex)", name);
    const char *behavior = json_string_value(json_object_get(split, "behavior"));
    if (!behavior || strcmp(behavior, "Isolated") != 0 || json_is_true(json_object_get(split, "invert")))
        return err_set(err, "%s: pre_tokenizer Split behavior %s is not supported (only Isolated)", name,
                       behavior ? behavior : "(none)");
    if (strcmp(type_of(bl), "ByteLevel") != 0)
        return err_set(err, "%s: pre_tokenizer type %s is not supported", name, type_of(bl));
    if (json_is_true(json_object_get(bl, "use_regex")))
        return err_set(err, "%s: pre_tokenizer ByteLevel use_regex true is not supported", name);
    if (json_is_true(json_object_get(bl, "add_prefix_space")))
        return err_set(err, "%s: pre_tokenizer ByteLevel add_prefix_space true is not supported", name);
    return 0;
}

// A merge as "a b" or ["a", "b"]: both parts as bytes, then their ids.
static int merge_ids(const ByteLevelBpe *b, const json_t *m, uint32_t *left, uint32_t *right, uint32_t *merged)
{
    const char *a, *c;
    size_t alen, clen;
    if (json_is_string(m)) {
        a = json_string_value(m);
        const char *space = strchr(a, ' ');
        if (!space || strchr(space + 1, ' ')) return -1;
        alen = (size_t)(space - a);
        c = space + 1;
        clen = strlen(c);
    } else if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
               json_is_string(json_array_get(m, 1))) {
        a = json_string_value(json_array_get(m, 0));
        alen = json_string_length(json_array_get(m, 0));
        c = json_string_value(json_array_get(m, 1));
        clen = json_string_length(json_array_get(m, 1));
    } else
        return -1;
    uint8_t buf[1024];
    if (alen + clen > sizeof buf) return -1;
    long na = bytelevel_string_to_bytes(a, alen, buf);
    if (na < 0) return -1;
    long nc = bytelevel_string_to_bytes(c, clen, buf + na);
    if (nc < 0) return -1;
    *left = vocab_find(b, buf, (size_t)na);
    *right = vocab_find(b, buf + na, (size_t)nc);
    *merged = vocab_find(b, buf, (size_t)(na + nc));
    return (*left == NO_ID || *right == NO_ID || *merged == NO_ID) ? -2 : 0;
}

// Pair table of cap >= 2 * n slots.
static int pairs_alloc(ByteLevelBpe *b, size_t n, Err *err)
{
    uint32_t cap = 1024;
    while (cap < 2 * n) cap <<= 1;
    b->pair_keys = malloc(cap * sizeof *b->pair_keys);
    b->pair_rank = calloc(cap, sizeof *b->pair_rank);
    b->pair_new = malloc(cap * sizeof *b->pair_new);
    if (!b->pair_keys || !b->pair_rank || !b->pair_new) return err_set(err, "out of memory");
    b->pair_mask = cap - 1;
    return 0;
}

// Add a merge unless the pair has one already (a repeated merge keeps its first, lowest rank).
static void pair_insert(ByteLevelBpe *b, uint32_t left, uint32_t right, uint32_t rank, uint32_t new_id)
{
    uint64_t key = (uint64_t)left << 32 | right;
    uint32_t i = pair_slot(key, b->pair_mask);
    while (b->pair_rank[i] && b->pair_keys[i] != key) i = (i + 1) & b->pair_mask;
    if (b->pair_rank[i]) return;
    b->pair_keys[i] = key;
    b->pair_rank[i] = rank + 1;
    b->pair_new[i] = new_id;
}

static int load_merges(ByteLevelBpe *b, const json_t *merges, const char *name, Err *err)
{
    size_t n = json_array_size(merges);
    if (pairs_alloc(b, n, err) < 0) return -1;
    b->merges_follow_ranks = 1;
    uint32_t previous_result = 0;
    for (size_t r = 0; r < n; r++) {
        uint32_t left, right, merged;
        int rc = merge_ids(b, json_array_get(merges, r), &left, &right, &merged);
        if (rc == -1) return err_set(err, "%s: model.merges[%zu] is not \"a b\" or [a, b] of byte-level strings", name, r);
        if (rc == -2) return err_set(err, "%s: model.merges[%zu] names a token not in model.vocab", name, r);
        if (merged < previous_result) b->merges_follow_ranks = 0;
        previous_result = merged;
        pair_insert(b, left, right, (uint32_t)r, merged);
    }
    b->n_merges = (uint32_t)n;
    return 0;
}

// post_processor: TemplateProcessing (alone or in a Sequence) whose "single" starts with a
// SpecialToken is a BOS the model adds.
static void read_post_processor(ByteLevelBpe *b, const json_t *post)
{
    if (!strcmp(type_of(post), "Sequence")) {
        size_t i;
        json_t *p;
        json_array_foreach(json_object_get(post, "processors"), i, p) read_post_processor(b, p);
        return;
    }
    if (strcmp(type_of(post), "TemplateProcessing") != 0) return;
    const json_t *first = json_array_get(json_object_get(post, "single"), 0);
    const json_t *special = json_object_get(first, "SpecialToken");
    const char *name = json_string_value(json_object_get(special, "id"));
    if (!name) return;
    b->bos_template = 1;
    b->bos_template_id = bytelevel_token_id(b, name, strlen(name));
}

ByteLevelBpe *bytelevel_load_json(const json_t *root, const char *name, Err *err)
{
    const json_t *model = json_object_get(root, "model");
    if (strcmp(type_of(model), "BPE") != 0) {
        err_set(err, "%s: model.type %s is not supported", name, type_of(model));
        return NULL;
    }
    const json_t *norm = json_object_get(root, "normalizer");
    if (norm && !json_is_null(norm)) {
        err_set(err, "%s: normalizer type %s is not supported with a byte-level BPE", name, type_of(norm));
        return NULL;
    }
    if (check_pre_tokenizer(root, name, err) < 0) return NULL;
    const json_t *v;
    if ((v = json_object_get(model, "dropout")) && !json_is_null(v) && json_number_value(v) != 0) {
        err_set(err, "%s: model.dropout is not supported", name);
        return NULL;
    }
    const char *fields[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++)
        if ((v = json_object_get(model, fields[i])) && json_string_length(v)) {
            err_set(err, "%s: model.%s is not supported", name, fields[i]);
            return NULL;
        }
    const json_t *vocab = json_object_get(model, "vocab"), *merges = json_object_get(model, "merges");
    if (!json_is_object(vocab) || !json_is_array(merges)) {
        err_set(err, "%s: model.vocab (object) and model.merges (array) are required", name);
        return NULL;
    }
    ByteLevelBpe *b = bytelevel_new(err);
    if (!b) return NULL;
    b->whole_piece_lookup = json_is_true(json_object_get(model, "ignore_merges"));
    const char *key;
    json_t *value;
    uint8_t buf[1024];
    json_object_foreach((json_t *)vocab, key, value) {
        json_int_t id = json_integer_value(value);
        if (!json_is_integer(value) || id < 0 || id >= (1 << 30)) {
            err_set(err, "%s: model.vocab[\"%.40s\"] is not a token id", name, key);
            goto fail;
        }
        size_t klen = strlen(key);
        long n = klen <= sizeof buf ? bytelevel_string_to_bytes(key, klen, buf) : -1;
        if (ensure_tokens(b, (uint32_t)id + 1, err) < 0) goto fail;
        // A key outside the byte-level alphabet can never be produced; keep its text for decode.
        int rc = n > 0 ? set_token_bytes(b, (uint32_t)id, buf, (size_t)n, err)
                       : set_token_bytes(b, (uint32_t)id, key, klen, err);
        if (rc < 0) goto fail;
        if (n <= 0) b->is_special[id] = 3;   // unreachable: kept out of the lookup
    }
    size_t i;
    json_t *a;
    json_array_foreach(json_object_get(root, "added_tokens"), i, a) {
        const char *content = json_string_value(json_object_get(a, "content"));
        json_t *idv = json_object_get(a, "id");
        if (!content || !json_is_integer(idv) || json_integer_value(idv) < 0 || json_integer_value(idv) >= (1 << 30)) {
            err_set(err, "%s: added_tokens[%zu] needs an id and a content", name, i);
            goto fail;
        }
        const char *flags[] = {"lstrip", "rstrip", "single_word"};
        for (int k = 0; k < 3; k++)
            if (json_is_true(json_object_get(a, flags[k]))) {
                err_set(err, "%s: added_tokens[%zu] (%s): %s true is not supported", name, i, content, flags[k]);
                goto fail;
            }
        if (bytelevel_add_token(b, (uint32_t)json_integer_value(idv), content, strlen(content),
                                json_is_true(json_object_get(a, "special")), err) < 0)
            goto fail;
    }
    if (vocab_build(b, err) < 0) goto fail;
    for (int c = 0; c < 256; c++)
        if (b->byte_id[c] == NO_ID) {
            err_set(err, "%s: byte 0x%02x has no token in model.vocab (a byte-level vocabulary needs all 256)", name, c);
            goto fail;
        }
    if (load_merges(b, merges, name, err) < 0 || find_whole_chars(b, err) < 0) goto fail;
    read_post_processor(b, json_object_get(root, "post_processor"));
    return b;
fail:
    bytelevel_free(b);
    return NULL;
}

// ---- merging -----------------------------------------------------------------------------

// Rank and result of merging two adjacent parts (tokens left, right); NO_RANK when they do not merge.
static inline uint32_t pair_rank(const ByteLevelBpe *b, PairCacheSlot *cache, uint32_t left, uint32_t right,
                                 uint32_t *new_id)
{
    uint32_t rank;
    if (!b->use_ranks) return pair_find(b, left, right, &rank, new_id) ? rank : NO_RANK;
    uint64_t key = (uint64_t)left << 32 | right | 1ull << 63;
    PairCacheSlot *slot = NULL;
    if (cache) {
        slot = &cache[pair_slot(key, PAIR_CACHE_SLOTS - 1)];
        if (slot->key == key) return *new_id = slot->rank;
    }
    const Span *l = &b->tok[left], *r = &b->tok[right];
    rank = NO_RANK;
    if (l->len + r->len <= b->max_token_len) {
        char both[512];
        if (l->len + r->len <= sizeof both) {
            memcpy(both, b->blob + l->off, l->len);
            memcpy(both + l->len, b->blob + r->off, r->len);
            rank = vocab_find(b, both, l->len + r->len);
        }
    }
    if (slot) *slot = (PairCacheSlot){key, rank};
    return *new_id = rank;
}

// The parts merging starts from: one per byte, except that a character may be one part when
// merges across its boundaries in this text all rank above its own (see find_whole_chars).
// Fills start[] and id[] (room for len each); returns the number of parts.
static size_t initial_parts(const ByteLevelBpe *b, const uint8_t *piece, size_t len, uint32_t *start, uint32_t *id)
{
    size_t m = 0;
    for (size_t i = 0; i < len;) {
        uint8_t c = piece[i];
        if (b->char_token && c >= 0xC2 && c < 0xF0) {
            uint32_t cp;
            size_t n = utf8_decode(piece + i, &cp);
            uint32_t rank = b->char_rank[cp];
            if (b->char_token[cp] != NO_ID && (i == 0 || b->boundary_rank[piece[i - 1] << 8 | c] > rank) &&
                (i + n == len || b->boundary_rank[piece[i + n - 1] << 8 | piece[i + n]] > rank)) {
                start[m] = (uint32_t)i;
                id[m++] = b->char_token[cp];
                i += n;
                continue;
            }
        }
        start[m] = (uint32_t)i;
        id[m++] = b->byte_id[c];
        i++;
    }
    return m;
}

// Quadratic merge for short pieces, as tiktoken's byte_pair_merge: parts (start, id) with the
// rank of each part and its right neighbour; merge the lowest rank, leftmost on ties.
// start[] (m + 1, start[m] == len) and id[] hold the initial parts and are overwritten.
static long merge_scan(const ByteLevelBpe *b, ThreadState *ts, uint32_t *start, uint32_t *id, size_t m,
                       uint32_t *out)
{
    uint32_t rank[SCAN_MAX_PARTS], next_id[SCAN_MAX_PARTS];
    for (size_t i = 0; i + 1 < m; i++) rank[i] = pair_rank(b, ts->pairs, id[i], id[i + 1], &next_id[i]);
    while (m > 1) {
        size_t best = 0;
        uint32_t best_rank = NO_RANK;
        for (size_t i = 0; i + 1 < m; i++)
            if (rank[i] < best_rank) {
                best_rank = rank[i];
                best = i;
            }
        if (best_rank == NO_RANK) break;
        id[best] = next_id[best];
        // Drop part best + 1.
        memmove(start + best + 1, start + best + 2, (m - best - 1) * sizeof *start);
        memmove(id + best + 1, id + best + 2, (m - best - 2) * sizeof *id);
        memmove(rank + best + 1, rank + best + 2, (m - best - 2) * sizeof *rank);
        memmove(next_id + best + 1, next_id + best + 2, (m - best - 2) * sizeof *next_id);
        m--;
        if (best + 1 < m)
            rank[best] = pair_rank(b, ts->pairs, id[best], id[best + 1], &next_id[best]);
        if (best > 0)
            rank[best - 1] = pair_rank(b, ts->pairs, id[best - 1], id[best], &next_id[best - 1]);
    }
    memcpy(out, id, m * sizeof *id);
    return (long)m;
}

static inline int candidate_less(const Candidate *x, const Candidate *y)
{
    return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

static int heap_push(ThreadState *ts, size_t *n, Candidate c)
{
    if (*n == ts->heap_cap) {
        size_t cap = ts->heap_cap ? ts->heap_cap * 2 : 256;
        Candidate *h = realloc(ts->heap, cap * sizeof *h);
        if (!h) return -1;
        ts->heap = h;
        ts->heap_cap = cap;
    }
    Candidate *h = ts->heap;
    size_t i = (*n)++;
    while (i > 0 && candidate_less(&c, &h[(i - 1) / 2])) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h[i] = c;
    return 0;
}

static Candidate heap_pop(ThreadState *ts, size_t *n)
{
    Candidate *h = ts->heap, top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= *n) break;
        if (child + 1 < *n && candidate_less(&h[child + 1], &h[child])) child++;
        if (!candidate_less(&h[child], &last)) break;
        h[i] = h[child];
        i = child;
    }
    if (*n) h[i] = last;
    return top;
}

// The same merge order with a heap of candidate pairs over a linked list of parts: O(n log n).
// Node i is the part starting at byte i; a candidate is stale once either part has changed.
static long merge_heap(const ByteLevelBpe *b, ThreadState *ts, const uint32_t *start, const uint32_t *part_id,
                       size_t m, uint32_t *out)
{
    uint32_t *id = ts->node_id, *next = ts->node_next, *prev = ts->node_prev;
    for (size_t k = 0; k < m; k++) {
        id[start[k]] = part_id[k];
        prev[start[k]] = k ? start[k - 1] : NO_ID;
        next[start[k]] = k + 1 < m ? start[k + 1] : NO_ID;
    }
    const uint32_t first = 0;
    size_t heap_n = 0;
#define PUSH_PAIR(left)                                                                        \
    do {                                                                                       \
        uint32_t l_ = (left), r_ = next[l_];                                                   \
        Candidate c_ = {0, l_, id[l_], id[r_], 0};                                             \
        c_.rank = pair_rank(b, ts->pairs, id[l_], id[r_], &c_.new_id);                         \
        if (c_.rank != NO_RANK && heap_push(ts, &heap_n, c_) < 0) return -1;                   \
    } while (0)
    for (uint32_t i = first; next[i] != NO_ID; i = next[i]) PUSH_PAIR(i);
    while (heap_n) {
        Candidate c = heap_pop(ts, &heap_n);
        uint32_t l = c.pos, r = next[l];
        if (id[l] != c.left_id || r == NO_ID || id[r] != c.right_id || prev[l] == l) continue;
        id[l] = c.new_id;
        next[l] = next[r];
        if (next[r] != NO_ID) prev[next[r]] = l;
        prev[r] = r;   // marks r dead (its own predecessor)
        if (prev[l] != NO_ID) PUSH_PAIR(prev[l]);
        if (next[l] != NO_ID) PUSH_PAIR(l);
    }
#undef PUSH_PAIR
    long count = 0;
    for (uint32_t i = first; i != NO_ID; i = next[i]) out[count++] = id[i];
    return count;
}


// ---- whole characters ---------------------------------------------------------------------
// Chinese text is long runs of 3-byte characters that are tokens themselves. Merging may start
// from such a character c instead of its bytes, with the same result, when no merge across one
// of c's boundaries can come before the merges that build c. Let r be the highest rank among the
// merges that turn c's bytes alone into its token. A merge across a boundary has a result that
// holds the two bytes on either side of it; if every merge result holding that byte pair ranks
// above r, then while c is incomplete some merge of c (rank <= r) always beats every merge
// across its boundaries, so c completes first whatever the text around it, and starting from c
// changes nothing else (the other merges see the same candidates in the same order). The
// tables are built once at load; the check per character is two lookups (initial_parts).

static inline void lower(uint32_t *slot, uint32_t rank)
{
    if (rank < *slot) *slot = rank;
}

// Utf-8 bytes of a BMP code point >= 0x80; returns the length (2 or 3).
static size_t utf8_encode_bmp(uint32_t cp, uint8_t *s)
{
    if (cp < 0x800) {
        s[0] = (uint8_t)(0xC0 | cp >> 6);
        s[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    s[0] = (uint8_t)(0xE0 | cp >> 12);
    s[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    s[2] = (uint8_t)(0x80 | (cp & 0x3F));
    return 3;
}

static int find_whole_chars(ByteLevelBpe *b, Err *err)
{
    b->char_token = malloc(65536 * sizeof *b->char_token);
    b->char_rank = malloc(65536 * sizeof *b->char_rank);
    b->boundary_rank = malloc(65536 * sizeof *b->boundary_rank);
    if (!b->char_token || !b->char_rank || !b->boundary_rank) return err_set(err, "out of memory");
    memset(b->boundary_rank, 0xFF, 65536 * sizeof *b->boundary_rank);   // NO_RANK
    // Every merge result: tiktoken's are all tokens (rank = id); else the merges list.
    for (uint32_t i = 0, n = b->use_ranks ? b->n_tokens : b->pair_mask + 1; i < n; i++) {
        uint32_t id = i, rank = i;
        if (!b->use_ranks) {
            if (!b->pair_rank[i]) continue;
            id = b->pair_new[i];
            rank = b->pair_rank[i] - 1;
        } else if (b->is_special[id])
            continue;
        const uint8_t *t = (const uint8_t *)b->blob + b->tok[id].off;
        for (uint32_t k = 0; k + 1 < b->tok[id].len; k++)
            if ((t[k + 1] & 0xC0) != 0x80) lower(&b->boundary_rank[t[k] << 8 | t[k + 1]], rank);
    }
    for (uint32_t cp = 0; cp < 65536; cp++) {
        b->char_token[cp] = NO_ID;
        if (cp < 0x80 || (cp >= 0xD800 && cp <= 0xDFFF)) continue;
        uint8_t s[16] = {0};   // 16: hash_bytes may read 8 bytes from its argument
        size_t n = utf8_encode_bmp(cp, s);
        uint32_t token = vocab_find(b, s, n);
        if (token == NO_ID) continue;
        // Merge the bytes alone (as merge_scan does), noting the highest rank used.
        uint32_t start[4] = {0, 1, 2, 3}, id[3] = {b->byte_id[s[0]], b->byte_id[s[1]], b->byte_id[s[2]]};
        size_t m = n;
        uint32_t highest = 0;
        start[n] = (uint32_t)n;
        while (m > 1) {
            uint32_t best_rank = NO_RANK, best_id = NO_ID, new_id;
            size_t best = 0;
            for (size_t i = 0; i + 1 < m; i++) {
                uint32_t r = pair_rank(b, NULL, id[i], id[i + 1], &new_id);
                if (r < best_rank) {
                    best_rank = r;
                    best = i;
                    best_id = new_id;
                }
            }
            if (best_rank == NO_RANK) break;
            if (best_rank > highest) highest = best_rank;
            id[best] = best_id;
            for (size_t i = best + 1; i + 1 < m; i++) {
                id[i] = id[i + 1];
                start[i] = start[i + 1];
            }
            start[m - 1] = start[m];
            m--;
        }
        if (m == 1 && id[0] == token) {
            b->char_token[cp] = token;
            b->char_rank[cp] = highest;
        }
    }
    return 0;
}

static ThreadState *thread_state(const ByteLevelBpe *b)
{
    ThreadStates *all = b->threads;
    ThreadState *ts = pthread_getspecific(all->key);
    if (ts) return ts;
    ts = calloc(1, sizeof *ts);
    if (!ts) return NULL;
    ts->cache = calloc(CACHE_SLOTS, sizeof *ts->cache);
    if (b->use_ranks) ts->pairs = calloc(PAIR_CACHE_SLOTS, sizeof *ts->pairs);
    if (!ts->cache || (b->use_ranks && !ts->pairs)) {
        free(ts->cache);
        free(ts->pairs);
        free(ts);
        return NULL;
    }
    pthread_mutex_lock(&all->lock);
    ts->next_state = all->states;
    all->states = ts;
    pthread_mutex_unlock(&all->lock);
    pthread_setspecific(all->key, ts);
    return ts;
}

// Room in the thread's work arrays for a piece of len bytes.
static int grow_work(ThreadState *ts, size_t len)
{
    if (len + 1 <= ts->work_cap) return 0;
    size_t cap = len + 1 > 2 * ts->work_cap ? len + 1 : 2 * ts->work_cap;
    uint32_t **arrays[] = {&ts->node_id, &ts->node_next, &ts->node_prev, &ts->part_start, &ts->part_id};
    for (size_t k = 0; k < sizeof arrays / sizeof *arrays; k++) {
        uint32_t *p = realloc(*arrays[k], cap * sizeof *p);
        if (!p) return -1;
        *arrays[k] = p;
    }
    ts->work_cap = cap;
    return 0;
}

// BPE of a piece of len >= 1 bytes into out (room for len ids); the number of ids or -1.
// use_heap: -1 choose by size, 0 scan (at most SCAN_MAX_PARTS parts), 1 heap.
static long merge_piece(const ByteLevelBpe *b, ThreadState *ts, const uint8_t *piece, size_t len, int use_heap,
                        uint32_t *out)
{
    if (grow_work(ts, len) < 0) return -1;
    size_t m = initial_parts(b, piece, len, ts->part_start, ts->part_id);
    ts->part_start[m] = (uint32_t)len;
    if (use_heap < 0) use_heap = m > SCAN_MAX_PARTS;
    if (!use_heap && m > SCAN_MAX_PARTS) return -1;
    return use_heap ? merge_heap(b, ts, ts->part_start, ts->part_id, m, out)
                    : merge_scan(b, ts, ts->part_start, ts->part_id, m, out);
}

long bytelevel_bpe_piece(const ByteLevelBpe *b, const char *piece, size_t len, int use_heap, uint32_t *out)
{
    ThreadState *ts = thread_state(b);
    if (!ts) return -1;
    if (!len) return 0;
    return merge_piece(b, ts, (const uint8_t *)piece, len, use_heap, out);
}

// ---- encoding ----------------------------------------------------------------------------

typedef struct {
    uint32_t **ids, **offsets;
    size_t *cap, n;
} Output;

static int output_reserve(Output *o, size_t more)
{
    if (o->n + more <= *o->cap) return 0;
    size_t cap = *o->cap ? *o->cap : 256;
    while (cap < o->n + more) cap *= 2;
    uint32_t *ids = realloc(*o->ids, cap * sizeof *ids);
    if (!ids) return -1;
    *o->ids = ids;
    if (o->offsets) {
        uint32_t *off = realloc(*o->offsets, cap * sizeof *off);
        if (!off) return -1;
        *o->offsets = off;
    }
    *o->cap = cap;
    return 0;
}

// Append ids that spell the piece at byte offset `at`, each token's offset from its length.
static inline int output_tokens(const ByteLevelBpe *b, Output *o, const uint32_t *ids, size_t count, size_t at)
{
    if (o->n + count > *o->cap && output_reserve(o, count) < 0) return -1;
    for (size_t i = 0; i < count; i++) {
        (*o->ids)[o->n] = ids[i];
        if (o->offsets) (*o->offsets)[o->n] = (uint32_t)at;
        at += b->tok[ids[i]].len;
        o->n++;
    }
    return 0;
}

static int encode_piece(const ByteLevelBpe *b, ThreadState *ts, const uint8_t *piece, size_t len, size_t at, Output *o)
{
    if (len == 1) return output_tokens(b, o, &b->byte_id[piece[0]], 1, at);
    uint64_t h = hash_bytes(piece, len);
    if (b->whole_piece_lookup) {
        uint32_t id = vocab_find_hashed(b, piece, len, h);
        if (id != NO_ID) return output_tokens(b, o, &id, 1, at);
    }
    CacheSlot *slot = NULL;
    if (len <= CACHE_BYTES) {
        slot = &ts->cache[h & (CACHE_SLOTS - 1)];
        if (slot->hash == h && slot->len == len && memcmp(slot->bytes, piece, len) == 0)
            return output_tokens(b, o, slot->ids, slot->n_ids, at);
    }
    uint32_t small[64];
    uint32_t *ids = small;
    if (len > 64) {
        ids = malloc(len * sizeof *ids);
        if (!ids) return -1;
    }
    long count = merge_piece(b, ts, piece, len, -1, ids);
    int rc = count < 0 ? -1 : output_tokens(b, o, ids, (size_t)count, at);
    if (rc == 0 && slot && count <= CACHE_IDS) {
        slot->hash = h;
        slot->len = (uint16_t)len;
        slot->n_ids = (uint8_t)count;
        memcpy(slot->ids, ids, (size_t)count * sizeof *ids);
        memcpy(slot->bytes, piece, len);
    }
    if (ids != small) free(ids);
    return rc;
}

// Text without added tokens: pieces, then each piece to ids.
static int encode_ordinary(const ByteLevelBpe *b, ThreadState *ts, const char *text, size_t len, size_t at, Output *o)
{
    size_t pos = 0;
    while (pos < len) {
        size_t n = pretok_next(text + pos, len - pos);
        if (encode_piece(b, ts, (const uint8_t *)text + pos, n, at + pos, o) < 0) return -1;
        pos += n;
    }
    return 0;
}

// The added token that starts at text (longest match), or NO_ID.
static uint32_t match_added(const ByteLevelBpe *b, const char *text, size_t len, int parse_special)
{
    uint32_t best = NO_ID;
    size_t best_len = 0;
    for (size_t i = 0; i < b->n_added; i++) {
        const Added *a = &b->added[i];
        if (a->special && !parse_special) continue;
        size_t n = b->tok[a->id].len;
        if (n > best_len && n <= len && memcmp(b->blob + b->tok[a->id].off, text, n) == 0) {
            best = a->id;
            best_len = n;
        }
    }
    return best;
}

long bytelevel_encode(const ByteLevelBpe *b, const char *text, size_t len, int parse_special,
                      uint32_t **ids, size_t *cap, size_t n, uint32_t **offsets, Err *err)
{
    size_t valid = utf8_valid_prefix(text, len);
    if (valid != len) return err_set(err, "invalid UTF-8 at byte %zu", valid);
    if (len > UINT32_MAX) return err_set(err, "text of %zu bytes is too long (offsets are 32-bit)", len);
    ThreadState *ts = thread_state(b);
    if (!ts) return err_set(err, "out of memory");
    if (offsets && !*offsets && *cap) {   // ids grown earlier without offsets: catch up
        *offsets = malloc(*cap * sizeof **offsets);
        if (!*offsets) return err_set(err, "out of memory");
    }
    Output o = {ids, offsets, cap, n};
    int rc = 0;
    if (b->n_added && (parse_special || b->has_plain_added)) {
        size_t chunk = 0;
        for (size_t i = 0; i < len && rc == 0; i++) {
            if (!b->added_first_byte[(uint8_t)text[i]]) continue;
            uint32_t id = match_added(b, text + i, len - i, parse_special);
            if (id == NO_ID) continue;
            rc = encode_ordinary(b, ts, text + chunk, i - chunk, chunk, &o);
            if (rc == 0) rc = output_tokens(b, &o, &id, 1, i);
            chunk = i + b->tok[id].len;
            i = chunk - 1;
        }
        if (rc == 0) rc = encode_ordinary(b, ts, text + chunk, len - chunk, chunk, &o);
    } else
        rc = encode_ordinary(b, ts, text, len, 0, &o);
    if (rc < 0) return err_set(err, "out of memory");
    return (long)o.n;
}

// ---- decoding and queries ----------------------------------------------------------------

long bytelevel_decode(const ByteLevelBpe *b, const uint32_t *ids, size_t n, int skip_special,
                      char **out, size_t *cap, size_t len, Err *err)
{
    for (size_t i = 0; i < n; i++) {
        if (ids[i] >= b->n_tokens || !b->tok[ids[i]].len)
            return err_set(err, "token id %u is not in the vocabulary (%u ids)", ids[i], b->n_tokens);
        if (skip_special && b->is_special[ids[i]] == 1) continue;
        const Span *t = &b->tok[ids[i]];
        if (len + t->len + 1 > *cap) {
            size_t c = *cap ? *cap : 256;
            while (c < len + t->len + 1) c *= 2;
            char *p = realloc(*out, c);
            if (!p) return err_set(err, "out of memory");
            *out = p;
            *cap = c;
        }
        memcpy(*out + len, b->blob + t->off, t->len);
        len += t->len;
    }
    if (*out) (*out)[len] = 0;
    return (long)len;
}

const char *bytelevel_token_bytes(const ByteLevelBpe *b, uint32_t id, size_t *len)
{
    if (id >= b->n_tokens || !b->tok[id].len) return NULL;
    *len = b->tok[id].len;
    return b->blob + b->tok[id].off;
}

int bytelevel_is_special(const ByteLevelBpe *b, uint32_t id)
{
    return id < b->n_tokens && b->is_special[id] == 1;
}

int64_t bytelevel_token_id(const ByteLevelBpe *b, const char *s, size_t len)
{
    for (size_t i = 0; i < b->n_added; i++) {
        const Span *t = &b->tok[b->added[i].id];
        if (t->len == len && memcmp(b->blob + t->off, s, len) == 0) return b->added[i].id;
    }
    uint32_t id = len ? vocab_find(b, s, len) : NO_ID;
    return id == NO_ID ? -1 : (int64_t)id;
}

uint32_t bytelevel_vocab_size(const ByteLevelBpe *b) { return b->n_tokens; }

int bytelevel_adds_bos_template(const ByteLevelBpe *b, int64_t *bos_id)
{
    *bos_id = b->bos_template_id;
    return b->bos_template;
}

uint64_t bytelevel_fingerprint(const ByteLevelBpe *b)
{
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    const char *kind = "bpe-bytelevel\n" PRETOK_LLAMA3_PATTERN "\n";
    XXH3_64bits_update(&st, kind, strlen(kind));
    uint8_t lookup = (uint8_t)b->whole_piece_lookup;
    XXH3_64bits_update(&st, &lookup, 1);
    for (uint32_t id = 0; id < b->n_tokens; id++) {
        uint32_t head[2] = {b->tok[id].len, b->is_special[id] == 1};
        XXH3_64bits_update(&st, head, sizeof head);
        XXH3_64bits_update(&st, b->blob + b->tok[id].off, b->tok[id].len);
    }
    if (!b->use_ranks && !b->merges_follow_ranks)
        for (uint32_t i = 0; i <= b->pair_mask; i++)
            if (b->pair_rank[i]) {
                uint64_t entry[2] = {b->pair_keys[i], b->pair_rank[i]};
                XXH3_64bits_update(&st, entry, sizeof entry);
            }
    return XXH3_64bits_digest(&st);
}
