// Byte-level BPE (Llama 3): loading the two file formats, encoding, decoding. See bpe_bytelevel.h.
//
// Speed of a first pass (issue 3: per-thread caches empty, the case of a corpus tokenized once).
// MB/s of one thread's CPU time over the Alpaca demo corpora of tests/bench/tok.sh, tokenizer.model,
// cold pass / warm pass, medians of alternating runs on the 2-core dev VM (noise ~5%):
//                                                 en            zh           mixed
//   before                                     66-70 / 157     34 / 78     55-57 / 97-100
//   Span.head: a pair of tokens of <= 8 bytes
//     together is probed from the two heads,
//     no copy of the bytes                        69-71 / 157   37.5 / 82       57 / 96
//   piece cache in an append-only arena (was
//     32K fixed 128-byte slots, 4 MiB: a page
//     fault per piece inserted); pieces up to
//     1024 bytes cached (was 52)                  87-90 / 174   43-45 / 97      65 / 106-110
//   vocabulary Bloom filter (128 KB) before
//     the probes of concat_rank and of whole
//     pieces over 8 bytes                          95 / 176       48 / 108      68 / 112-114
//   fixed per-thread tables in one mapping,
//     populated at once (MAP_POPULATE)            101-111 / 181  51-55 / 109  73-78 / 114-121
//   arena faulted in 256 KB at a time
//     (MADV_POPULATE_WRITE)                       108-113 / 178  53-57 / 116  76-78 / 116-121
// Tried and dropped: the caches on 2 MiB pages (MADV_HUGEPAGE: on this VM a first pass took
// either 90 or 34 MB/s, by luck of the host); no pair cache for pairs of <= 8 bytes (cold +0-5%,
// warm -10-15%); a 64K table of two-byte tokens (no change).
#include "bpe_bytelevel.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "pretok.h"
#include "unicode.h"

#define NO_ID UINT32_MAX
#define NO_RANK UINT32_MAX
#define SCAN_MAX_PARTS 16        // pieces of more parts merge with the heap, the others by scanning
#define CACHE_SLOTS (1u << 15)        // per thread, direct-mapped index of the piece cache
#define CACHE_ARENA_BYTES (4u << 20)  // per thread: the cached pieces, one after the other
#define CACHE_MAX_PIECE 1024          // longest piece cached, bytes
#define CACHE_ARENA_CHUNK (256u << 10)
#define PAIR_CACHE_SLOTS (1u << 16)   // per thread, for tiktoken files: 64K pairs, 1 MiB
#define VOCAB_BLOOM_BITS (1u << 20)
#define PURE_FILTER_BITS (1u << 18)

typedef struct {
    uint64_t head;               // the first min(len, 8) bytes, zero-padded (head8): a pair of short
                                 // tokens is looked up from the two heads, without the blob
    uint32_t off, len;           // token bytes: blob[off, off + len); len 0 for an unused id
} Span;

typedef struct {
    uint32_t id;
    uint8_t special;
} Added;

// A token in the vocabulary hash. Its first 8 bytes are in the slot, so a lookup of a token of
// up to 8 bytes (most of them) reads one cache line, not the slot, the span and the bytes.
typedef struct {
    uint64_t head;               // the first min(len, 8) bytes, zero-padded
    uint32_t tag_len;            // hash bits 40-63 << 8 | min(len, 255)
    uint32_t id_plus1;           // 0 = empty slot
} VocabSlot;

// A merge of tokenizer.json: one slot, one cache line to answer a lookup.
typedef struct {
    uint64_t key;                // left << 32 | right
    uint32_t rank;               // merge index + 1; 0 = empty slot
    uint32_t new_id;
} PairSlot;

// A character that may start as one part (see find_whole_chars): its token (NO_ID when it
// may not) and the highest rank of the merges that build it. Together: one cache line.
typedef struct {
    uint32_t token, rank;
} WholeChar;

// A merge of two pure tokens (see build_pure_pairs).
typedef struct {
    uint32_t left_plus1, right, rank, new_id;
} PurePair;

// One cached piece -> ids result in the arena: this header, ids[n_ids], then the len bytes of
// the piece, padded to 4 bytes.
typedef struct {
    uint32_t len, n_ids;
} CacheEntry;

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
    void *tables;                // one mapping: pairs, cache_key and cache_at (see thread_state)
    size_t tables_len;
    // Piece cache. Entries are appended to the arena, so a first pass over a text, which
    // inserts nearly every piece, touches new memory in order (a page fault per ~150 pieces)
    // instead of a 4 MiB table of fixed slots all over (a page fault per piece). When the arena
    // is full, the cache starts again empty.
    uint64_t *cache_key;         // (CACHE_SLOTS) piece hash | 1 of the slot's entry; 0 = empty
    uint32_t *cache_at;          // (CACHE_SLOTS) the slot's entry: its offset in the arena
    uint8_t *cache_arena;        // (CACHE_ARENA_BYTES) CacheEntry records
    size_t cache_used;           // arena bytes used
    size_t cache_ready;          // arena bytes faulted in (MADV_POPULATE_WRITE)
    PairCacheSlot *pairs;        // (PAIR_CACHE_SLOTS) when the rule is tiktoken's, else NULL
    uint32_t *node_id, *node_next, *node_prev;   // (work_cap) heap merge: node i = the part at byte i
    uint32_t *part_start, *part_id;              // (work_cap + 1) the initial parts of a piece
    uint32_t *piece_ids;                         // (work_cap) a piece's ids (encode_piece)
    Candidate *heap;             // (heap_cap)
    size_t work_cap, heap_cap;
    int plain;                   // merging from bytes with general lookups only (bytelevel_bpe_piece mode 2)
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
    VocabSlot *vocab_slots;      // (vocab_mask + 1) open addressing over ordinary tokens
    uint32_t vocab_mask;
    uint64_t *vocab_bloom;       // (VOCAB_BLOOM_BITS / 64) one bit per token hash: most pieces that
                                 // are not tokens are told so from 128 KB instead of the 4 MB table
    uint32_t byte_id[256];       // the token of each single byte
    // Merge rule. use_ranks: a pair merges when its concatenation is a token, rank = that id
    // (tiktoken; answered through the per-thread PairCacheSlot cache). Otherwise the merges
    // list of tokenizer.json: pair (left id, right id) -> merge index, result (pair_* below).
    int use_ranks;
    uint32_t max_token_len;      // longest ordinary token, bytes
    uint32_t n_duplicates;       // ordinary tokens whose bytes an earlier id has
    int whole_piece_lookup;      // try the piece as one token first (tiktoken; HF ignore_merges)
    PairSlot *pairs;             // (pair_mask + 1) open addressing; NULL for tiktoken files
    uint32_t pair_mask;
    uint32_t n_merges;
    int merges_follow_ranks;     // every merge's result id >= the previous one's
    // Whole characters (see find_whole_chars): for a BMP character of 2-3 bytes whose bytes
    // merge into one token, that token and the highest merge rank used (else NO_ID); by byte
    // pair (x << 8 | y), the lowest rank of a merge that could cross a character's left
    // boundary (x before, y the character's lead byte) or its right boundary (x its last byte,
    // y after) before the character is complete. NULL when not built.
    WholeChar *chars;                   // (65536) by code point
    uint32_t *left_rank, *right_rank;   // (65536) by byte pair
    // Merges between "pure" tokens (complete characters of 2-4 bytes only, such as Chinese
    // words), answered exactly by a small table (see build_pure_pairs): CJK text is long pieces
    // of such parts, and the general lookup misses the caches there. NULL when not built.
    uint8_t *is_pure;            // (n_tokens / 8 + 1) bitmap by id
    PurePair *pure_pairs;        // (pure_mask + 1) open addressing; left + 1 == 0 marks empty
    uint32_t pure_mask;
    uint64_t *pure_filter;       // (PURE_FILTER_BITS / 64) a bit per pair hash: most pairs of CJK
                                 // characters do not merge, and 32 KB says so without the table
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
    for (int c = 0; c < 256 + 68; c++) char_byte[c] = -1;
    for (int b = 0; b < 256; b++) char_byte[byte_to_char(b)] = (int16_t)b;
}

static long string_to_bytes_valid(const char *s, size_t len, uint8_t *out);

static long bytelevel_string_to_bytes(const char *s, size_t len, uint8_t *out)
{
    if (utf8_valid_prefix(s, len) != len) return -1;
    return string_to_bytes_valid(s, len, out);
}

// The same for s known to be valid UTF-8.
static long string_to_bytes_valid(const char *s, size_t len, uint8_t *out)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, char_byte_init);
    const uint8_t *p = (const uint8_t *)s, *end = p + len;
    long n = 0;
    while (p < end) {
        uint32_t cp;
        p += utf8_decode(p, &cp);
        if (cp >= 256 + 68 || char_byte[cp] < 0) return -1;
        out[n++] = (uint8_t)char_byte[cp];
    }
    return n;
}

// ---- vocabulary hash ---------------------------------------------------------------------

// Most lookups are of a few bytes (a word, a pair of parts): those get a multiply-xor hash of
// at most two 8-byte loads; longer ones XXH3.
static inline uint64_t mix_hash(uint64_t lo, uint64_t hi, size_t n)
{
    uint64_t h = (lo ^ 0x9E3779B97F4A7C15ull) * 0xBF58476D1CE4E5B9ull;
    h ^= (hi + n) * 0x94D049BB133111EBull;
    h ^= h >> 31;
    h *= 0xD6E8FEB86659FD93ull;
    return h ^ (h >> 32);
}

static inline uint64_t head8(const void *p, size_t n);

// The hash of n <= 8 bytes is a function of their head8 value alone (concat_rank builds that
// value from two tokens' heads, without their bytes).
static inline uint64_t hash_head(uint64_t head, size_t n) { return mix_hash(head, 0, n); }

static inline uint64_t hash_bytes(const void *p, size_t n)
{
    if (n > 16) return XXH3_64bits(p, n);
    if (n <= 8) return hash_head(head8(p, n), n);
    const uint8_t *s = p;
    uint64_t lo, hi;   // two overlapping loads cover 9..16 bytes
    memcpy(&lo, s, 8);
    memcpy(&hi, s + n - 8, 8);
    return mix_hash(lo, hi, n);
}

// memcmp(x, y, n) == 0 without a call for the short strings most tokens are.
static inline int same_bytes(const void *x, const void *y, size_t n)
{
    const uint8_t *a = x, *c = y;
    if (n >= 8 && n <= 16) {
        uint64_t a0, a1, c0, c1;
        memcpy(&a0, a, 8), memcpy(&a1, a + n - 8, 8), memcpy(&c0, c, 8), memcpy(&c1, c + n - 8, 8);
        return ((a0 ^ c0) | (a1 ^ c1)) == 0;
    }
    if (n >= 4 && n < 8) {
        uint32_t a0, a1, c0, c1;
        memcpy(&a0, a, 4), memcpy(&a1, a + n - 4, 4), memcpy(&c0, c, 4), memcpy(&c1, c + n - 4, 4);
        return ((a0 ^ c0) | (a1 ^ c1)) == 0;
    }
    if (n < 4) return n == 0 || (a[0] == c[0] && a[n / 2] == c[n / 2] && a[n - 1] == c[n - 1]);
    return memcmp(a, c, n) == 0;
}

// The first min(n, 8) bytes of p, zero-padded, without reading past p + n: on a little-endian
// machine the overlapping loads below put each byte in its own place, so equal heads of equal
// lengths up to 8 mean equal bytes (vocab_find_hashed relies on it).
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "head8 assumes a little-endian machine");
static inline uint64_t head8(const void *p, size_t n)
{
    const uint8_t *s = p;
    uint64_t x;
    if (n >= 8) {
        memcpy(&x, s, 8);
        return x;
    }
    if (n >= 4) {   // two overlapping loads, the second shifted into place
        uint32_t lo, hi;
        memcpy(&lo, s, 4);
        memcpy(&hi, s + n - 4, 4);
        return lo | (uint64_t)hi << (8 * (n - 4));
    }
    if (!n) return 0;
    return s[0] | (uint64_t)s[n / 2] << (8 * (n / 2)) | (uint64_t)s[n - 1] << (8 * (n - 1));
}

static inline uint32_t tag_len(uint64_t h, size_t n)
{
    return (uint32_t)(h >> 40) << 8 | (uint32_t)(n < 255 ? n : 255);
}

static inline int vocab_maybe(const ByteLevelBpe *b, uint64_t h);

// The token of n <= 8 bytes whose head8 value is head, or NO_ID.
static inline uint32_t vocab_find_head(const ByteLevelBpe *b, uint64_t head, size_t n)
{
    uint64_t h = hash_head(head, n);
    if (!vocab_maybe(b, h)) return NO_ID;
    uint32_t tl = tag_len(h, n);
    for (uint32_t i = (uint32_t)h & b->vocab_mask;; i = (i + 1) & b->vocab_mask) {
        const VocabSlot *s = &b->vocab_slots[i];
        if (!s->id_plus1) return NO_ID;
        if (s->tag_len == tl && s->head == head) return s->id_plus1 - 1;
    }
}

static inline uint32_t vocab_find_hashed(const ByteLevelBpe *b, const void *p, size_t n, uint64_t h)
{
    uint32_t tl = tag_len(h, n);
    uint64_t head = head8(p, n);
    for (uint32_t i = (uint32_t)h & b->vocab_mask;; i = (i + 1) & b->vocab_mask) {
        const VocabSlot *s = &b->vocab_slots[i];
        if (!s->id_plus1) return NO_ID;
        if (s->tag_len == tl && s->head == head) {
            uint32_t id = s->id_plus1 - 1;
            if (n <= 8 || (b->tok[id].len == n && same_bytes(b->blob + b->tok[id].off, p, n))) return id;
        }
    }
}

// 0 when no token has hash h (bits 44-63 pick the bit; the slot index uses the low bits).
static inline int vocab_maybe(const ByteLevelBpe *b, uint64_t h)
{
    uint32_t bit = (uint32_t)(h >> 44);
    return b->vocab_bloom[bit >> 6] >> (bit & 63) & 1;
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
    b->vocab_bloom = calloc(VOCAB_BLOOM_BITS / 64, sizeof *b->vocab_bloom);
    if (!b->vocab_slots || !b->vocab_bloom) return err_set(err, "out of memory");
    b->vocab_mask = cap - 1;
    for (uint32_t id = 0; id < b->n_tokens; id++) {
        if (!b->tok[id].len || b->is_special[id]) continue;
        if (b->tok[id].len > b->max_token_len) b->max_token_len = b->tok[id].len;
        const char *p = b->blob + b->tok[id].off;
        uint64_t h = hash_bytes(p, b->tok[id].len);
        if (vocab_find_hashed(b, p, b->tok[id].len, h) != NO_ID) {
            b->n_duplicates++;
            continue;
        }
        uint32_t i = (uint32_t)h & b->vocab_mask;
        while (b->vocab_slots[i].id_plus1) i = (i + 1) & b->vocab_mask;
        b->vocab_slots[i] = (VocabSlot){head8(p, b->tok[id].len), tag_len(h, b->tok[id].len), id + 1};
        b->vocab_bloom[h >> 44 >> 6] |= 1ull << (h >> 44 & 63);
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
        const PairSlot *p = &b->pairs[i];
        if (!p->rank) return 0;
        if (p->key == key) {
            *rank = p->rank - 1;
            *new_id = p->new_id;
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
    b->tok[id].head = head8(p, len);
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
            munmap(s->tables, s->tables_len);
            munmap(s->cache_arena, CACHE_ARENA_BYTES);
            free(s->node_id);
            free(s->node_next);
            free(s->node_prev);
            free(s->part_start);
            free(s->part_id);
            free(s->piece_ids);
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
    free(b->vocab_bloom);
    free(b->pairs);
    free(b->added);
    free(b->is_pure);
    free(b->pure_pairs);
    free(b->pure_filter);
    free(b->chars);
    free(b->left_rank);
    free(b->right_rank);
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

// The ids of a merge's parts a and c (byte-level strings) and of their concatenation: 0; -1
// when a part is not a byte-level string, -2 when one of the three is not a token. *merged
// holds a guess on entry (the previous merge's result): converted files list the merges by
// result, so checking it and the next id first spares most of the third lookup.
static int merge_part_ids(const ByteLevelBpe *b, const char *a, size_t alen, const char *c, size_t clen,
                          uint32_t *left, uint32_t *right, uint32_t *merged)
{
    uint8_t buf[1024];
    if (alen + clen > sizeof buf) return -1;
    long na = string_to_bytes_valid(a, alen, buf);   // (JSON strings are valid UTF-8)
    if (na < 0) return -1;
    long nc = string_to_bytes_valid(c, clen, buf + na);
    if (nc < 0) return -1;
    *left = vocab_find(b, buf, (size_t)na);
    *right = vocab_find(b, buf + na, (size_t)nc);
    size_t n = (size_t)(na + nc);
    uint32_t guess = b->n_duplicates ? NO_ID - 1 : *merged;
    if (n && guess < b->n_tokens && b->tok[guess].len == n && !b->is_special[guess] && !memcmp(b->blob + b->tok[guess].off, buf, n))
        *merged = guess;
    else if (n && guess + 1 < b->n_tokens && b->tok[guess + 1].len == n && !b->is_special[guess + 1] &&
             !memcmp(b->blob + b->tok[guess + 1].off, buf, n))
        *merged = guess + 1;
    else
        *merged = vocab_find(b, buf, n);
    return (*left == NO_ID || *right == NO_ID || *merged == NO_ID) ? -2 : 0;
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
    return merge_part_ids(b, a, alen, c, clen, left, right, merged);
}

// Pair table of cap >= 2 * n slots.
static int pairs_alloc(ByteLevelBpe *b, size_t n, Err *err)
{
    uint32_t cap = 1024;
    while (cap < 2 * n) cap <<= 1;
    b->pairs = calloc(cap, sizeof *b->pairs);
    if (!b->pairs) return err_set(err, "out of memory");
    b->pair_mask = cap - 1;
    return 0;
}

// Add a merge unless the pair has one already (a repeated merge keeps its first, lowest rank).
static void pair_insert(ByteLevelBpe *b, uint32_t left, uint32_t right, uint32_t rank, uint32_t new_id)
{
    uint64_t key = (uint64_t)left << 32 | right;
    uint32_t i = pair_slot(key, b->pair_mask);
    while (b->pairs[i].rank && b->pairs[i].key != key) i = (i + 1) & b->pair_mask;
    if (b->pairs[i].rank) return;
    b->pairs[i] = (PairSlot){key, rank + 1, new_id};
}

// The merges, in rank order: (n, 3) left id, right id, result id.
static int insert_merges(ByteLevelBpe *b, const uint32_t *merges, size_t n, Err *err)
{
    if (pairs_alloc(b, n, err) < 0) return -1;
    b->merges_follow_ranks = 1;
    for (size_t r = 0; r < n; r++) {
        const uint32_t *m = merges + 3 * r;
        if (r && m[2] < m[-1]) b->merges_follow_ranks = 0;   // m[-1]: the previous result
        pair_insert(b, m[0], m[1], (uint32_t)r, m[2]);
    }
    b->n_merges = (uint32_t)n;
    return 0;
}

static int load_merges(ByteLevelBpe *b, const json_t *merges, const char *name, Err *err)
{
    size_t n = json_array_size(merges);
    uint32_t *ids = malloc((n ? n : 1) * 3 * sizeof *ids);
    if (!ids) return err_set(err, "out of memory");
    uint32_t merged = 0;
    for (size_t r = 0; r < n; r++) {
        int rc = merge_ids(b, json_array_get(merges, r), &ids[3 * r], &ids[3 * r + 1], &merged);
        ids[3 * r + 2] = merged;
        if (rc < 0) {
            free(ids);
            if (rc == -1) return err_set(err, "%s: model.merges[%zu] is not \"a b\" or [a, b] of byte-level strings", name, r);
            return err_set(err, "%s: model.merges[%zu] names a token not in model.vocab", name, r);
        }
    }
    int rc = insert_merges(b, ids, n, err);
    free(ids);
    return rc;
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

// ---- tokenizer.json without a tree for model.vocab and model.merges -----------------------
// jansson takes ~175 ms to build (and free) the tree of Llama 3's 9 MB file, nearly all of it
// for the 128K vocab entries and 280K merges. bytelevel_load_json_text finds those two values
// with a scanner, hands jansson the rest (the text with them emptied to {} and []), and reads
// them itself. Anything it does not expect (a duplicate key, an escape that decodes to NUL,
// a value of another type, a bad entry) sends the caller back to jansson and
// bytelevel_load_json, which accept or reject it with the usual message.

typedef struct {
    const char *vocab, *merges;  // the text of model.vocab ("{...}") and model.merges ("[...]")
    size_t vocab_len, merges_len;
} ModelSpans;

static inline const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')) p++;
    return p;
}

static int hex4(const char *p, uint32_t *v)
{
    *v = 0;
    for (int i = 0; i < 4; i++) {
        int c = (unsigned char)p[i], d = c >= '0' && c <= '9' ? c - '0' : (c | 0x20) >= 'a' && (c | 0x20) <= 'f' ? (c | 0x20) - 'a' + 10 : -1;
        if (d < 0) return -1;
        *v = *v << 4 | (uint32_t)d;
    }
    return 0;
}

// The JSON string whose opening quote is at p: its UTF-8 value into out (room for cap bytes,
// length in *len) unless out is NULL. Returns the position after the closing quote, or NULL
// for anything unusual (invalid, too long, a NUL, a lone surrogate, invalid UTF-8).
static const char *scan_string(const char *p, const char *end, char *out, size_t cap, size_t *len)
{
    size_t n = 0;
    p++;
    for (;;) {
        const char *q = p;
        while (q < end && *q != '"' && *q != '\\' && (unsigned char)*q >= 0x20) q++;
        if (out) {
            if (n + (size_t)(q - p) > cap) return NULL;
            memcpy(out + n, p, (size_t)(q - p));
        }
        n += (size_t)(q - p);
        p = q;
        if (p >= end || (unsigned char)*p < 0x20) return NULL;
        if (*p == '"') break;
        if (end - p < 2) return NULL;   // a backslash
        char e = p[1], c = 0;
        p += 2;
        uint32_t cp;
        switch (e) {
        case '"': case '\\': case '/': c = e; break;
        case 'b': c = '\b'; break;
        case 'f': c = '\f'; break;
        case 'n': c = '\n'; break;
        case 'r': c = '\r'; break;
        case 't': c = '\t'; break;
        case 'u':
            if (end - p < 4 || hex4(p, &cp) < 0 || cp == 0 || (cp >= 0xDC00 && cp <= 0xDFFF)) return NULL;
            p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                uint32_t lo;
                if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || hex4(p + 2, &lo) < 0 || lo < 0xDC00 || lo > 0xDFFF)
                    return NULL;
                p += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            break;
        default:
            return NULL;
        }
        char buf[4];
        size_t k;
        if (c) buf[0] = c, k = 1;
        else if (cp < 0x80) buf[0] = (char)cp, k = 1;
        else if (cp < 0x800) buf[0] = (char)(0xC0 | cp >> 6), buf[1] = (char)(0x80 | (cp & 0x3F)), k = 2;
        else if (cp < 0x10000)
            buf[0] = (char)(0xE0 | cp >> 12), buf[1] = (char)(0x80 | ((cp >> 6) & 0x3F)), buf[2] = (char)(0x80 | (cp & 0x3F)), k = 3;
        else
            buf[0] = (char)(0xF0 | cp >> 18), buf[1] = (char)(0x80 | ((cp >> 12) & 0x3F)),
            buf[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), buf[3] = (char)(0x80 | (cp & 0x3F)), k = 4;
        if (out) {
            if (n + k > cap) return NULL;
            memcpy(out + n, buf, k);
        }
        n += k;
    }
    if (out) {   // (skipped strings are left to jansson, which checks them)
        if (utf8_valid_prefix(out, n) != n) return NULL;
        *len = n;
    }
    return p + 1;
}

// End of the JSON value at p (not validated beyond strings and nesting: jansson reads the
// rest), or NULL.
static const char *skip_value(const char *p, const char *end)
{
    if (p >= end) return NULL;
    if (*p == '"') return scan_string(p, end, NULL, 0, NULL);
    if (*p != '{' && *p != '[') {
        while (p < end && !strchr(",}] \t\r\n", *p)) p++;
        return p;
    }
    int depth = 0;
    while (p < end) {
        if (*p == '"') {
            if (!(p = scan_string(p, end, NULL, 0, NULL))) return NULL;
            continue;
        }
        if (*p == '{' || *p == '[') depth++;
        else if ((*p == '}' || *p == ']') && --depth == 0) return p + 1;
        p++;
    }
    return NULL;
}

// Calls member(key, key_len, value) for each member of the object at p; returns the end of the
// object or NULL. member returns the end of the value or NULL.
typedef const char *MemberFn(const char *key, size_t key_len, const char *value, const char *end, ModelSpans *sp);

static const char *scan_object(const char *p, const char *end, MemberFn *member, ModelSpans *sp)
{
    p = skip_ws(p, end);
    if (p >= end || *p != '{') return NULL;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') return p + 1;
    for (;;) {
        if (p >= end || *p != '"') return NULL;
        const char *key = p + 1, *q = scan_string(p, end, NULL, 0, NULL);
        if (!q) return NULL;
        size_t key_len = (size_t)(q - 1 - key);   // raw: an escaped "model" just misses the fast path
        p = skip_ws(q, end);
        if (p >= end || *p != ':') return NULL;
        p = skip_ws(p + 1, end);
        if (!(p = member(key, key_len, p, end, sp))) return NULL;
        p = skip_ws(p, end);
        if (p < end && *p == '}') return p + 1;
        if (p >= end || *p != ',') return NULL;
        p = skip_ws(p + 1, end);
    }
}

static int key_is(const char *key, size_t key_len, const char *want)
{
    return key_len == strlen(want) && !memcmp(key, want, key_len);
}

static const char *model_member(const char *key, size_t key_len, const char *value, const char *end, ModelSpans *sp)
{
    const char *after = skip_value(value, end);
    if (!after) return NULL;
    if (key_is(key, key_len, "vocab") || key_is(key, key_len, "merges")) {
        int is_vocab = key[0] == 'v';
        const char **where = is_vocab ? &sp->vocab : &sp->merges;
        if (*where || *value != (is_vocab ? '{' : '[')) return NULL;   // twice, or not the usual type
        *where = value;
        *(is_vocab ? &sp->vocab_len : &sp->merges_len) = (size_t)(after - value);
    }
    return after;
}

static const char *top_member(const char *key, size_t key_len, const char *value, const char *end, ModelSpans *sp)
{
    if (key_is(key, key_len, "model") && *value == '{') {
        if (sp->vocab || sp->merges) return NULL;   // a second "model"
        return scan_object(value, end, model_member, sp);
    }
    return skip_value(value, end);
}

// model.vocab from its text into b, as the jansson path does. 0, or -1 when unusual.
static int read_vocab_span(ByteLevelBpe *b, const char *p, size_t len, Err *err)
{
    const char *end = p + len;
    char key[2048];
    uint8_t buf[sizeof key];
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') return 0;
    for (;;) {
        size_t klen;
        if (p >= end || *p != '"' || !(p = scan_string(p, end, key, sizeof key, &klen))) return -1;
        p = skip_ws(p, end);
        if (p >= end || *p != ':') return -1;
        p = skip_ws(p + 1, end);
        uint32_t id = 0;
        const char *digits = p;
        while (p < end && *p >= '0' && *p <= '9' && id < (1u << 30)) id = id * 10 + (uint32_t)(*p++ - '0');
        if (p == digits || id >= (1u << 30) || (*digits == '0' && p - digits > 1)) return -1;
        if (p < end && (*p == '.' || *p == 'e' || *p == 'E' || (*p >= '0' && *p <= '9'))) return -1;
        long n = klen ? string_to_bytes_valid(key, klen, buf) : -1;
        if (ensure_tokens(b, id + 1, err) < 0) return -2;
        int rc = n > 0 ? set_token_bytes(b, id, buf, (size_t)n, err) : set_token_bytes(b, id, key, klen, err);
        if (rc < 0) return -2;
        if (n <= 0) b->is_special[id] = 3;
        p = skip_ws(p, end);
        if (p < end && *p == '}') return skip_ws(p + 1, end) == end ? 0 : -1;
        if (p >= end || *p != ',') return -1;
        p = skip_ws(p + 1, end);
    }
}

// model.merges from its text: (n, 3) ids in *out. 0, -1 when unusual, -2 out of memory.
static int read_merges_span(const ByteLevelBpe *b, const char *p, size_t len, uint32_t **out, size_t *count)
{
    const char *end = p + len;
    char s1[2048], s2[2048];
    size_t n = 0, cap = 0;
    uint32_t *ids = NULL, merged = 0;
    p = skip_ws(p + 1, end);
    if (p < end && *p == ']') goto done;
    for (;;) {
        const char *a = s1, *c;
        size_t alen, clen;
        if (p < end && *p == '"') {
            if (!(p = scan_string(p, end, s1, sizeof s1, &alen))) goto unusual;
            const char *space = memchr(s1, ' ', alen);
            if (!space || memchr(space + 1, ' ', alen - (size_t)(space + 1 - s1))) goto unusual;
            c = space + 1;
            clen = alen - (size_t)(c - s1);
            alen = (size_t)(space - s1);
        } else if (p < end && *p == '[') {
            p = skip_ws(p + 1, end);
            if (p >= end || *p != '"' || !(p = scan_string(p, end, s1, sizeof s1, &alen))) goto unusual;
            p = skip_ws(p, end);
            if (p >= end || *p != ',') goto unusual;
            p = skip_ws(p + 1, end);
            if (p >= end || *p != '"' || !(p = scan_string(p, end, s2, sizeof s2, &clen))) goto unusual;
            p = skip_ws(p, end);
            if (p >= end || *p != ']') goto unusual;
            p++;
            c = s2;
        } else
            goto unusual;
        if (n == cap) {
            cap = cap ? 2 * cap : 1 << 16;
            uint32_t *bigger = realloc(ids, cap * 3 * sizeof *ids);
            if (!bigger) {
                free(ids);
                return -2;
            }
            ids = bigger;
        }
        if (merge_part_ids(b, a, alen, c, clen, &ids[3 * n], &ids[3 * n + 1], &merged) < 0) goto unusual;
        ids[3 * n++ + 2] = merged;
        p = skip_ws(p, end);
        if (p < end && *p == ']') break;
        if (p >= end || *p != ',') goto unusual;
        p = skip_ws(p + 1, end);
    }
    if (skip_ws(p + 1, end) != end) goto unusual;
done:
    *out = ids;
    *count = n;
    return 0;
unusual:
    free(ids);
    return -1;
}

static ByteLevelBpe *load_json_model(const json_t *root, const ModelSpans *spans, const char *name, int *unusual,
                                     Err *err);

ByteLevelBpe *bytelevel_load_json_text(const char *text, size_t len, const char *name, int *fallback, Err *err)
{
    *fallback = 1;
    ModelSpans sp = {0};
    const char *end = scan_object(text, text + len, top_member, &sp);
    if (!end || skip_ws(end, text + len) != text + len || !sp.vocab || !sp.merges) return NULL;
    // The text with the two values emptied, for jansson.
    char *skeleton = malloc(len + 1);
    if (!skeleton) return NULL;
    const char *first = sp.vocab < sp.merges ? sp.vocab : sp.merges, *second = sp.vocab < sp.merges ? sp.merges : sp.vocab;
    size_t first_len = first == sp.vocab ? sp.vocab_len : sp.merges_len;
    size_t second_len = second == sp.vocab ? sp.vocab_len : sp.merges_len, n = 0;
    const char *pieces[3][2] = {{text, first}, {first + first_len, second}, {second + second_len, text + len}};
    for (int k = 0; k < 3; k++) {
        memcpy(skeleton + n, pieces[k][0], (size_t)(pieces[k][1] - pieces[k][0]));
        n += (size_t)(pieces[k][1] - pieces[k][0]);
        if (k < 2) {
            skeleton[n++] = *(k ? second : first);
            skeleton[n++] = *(k ? second : first) == '{' ? '}' : ']';
        }
    }
    json_error_t je;
    json_t *root = json_loadb(skeleton, n, 0, &je);
    free(skeleton);
    if (!root) return NULL;
    ByteLevelBpe *b = NULL;
    if (bytelevel_json_is_bytelevel(root)) {
        int unusual = 0;
        b = load_json_model(root, &sp, name, &unusual, err);
        if (!b && !unusual) *fallback = 0;   // an error jansson's path would report the same way
    }
    json_decref(root);
    return b;
}

ByteLevelBpe *bytelevel_load_json(const json_t *root, const char *name, Err *err)
{
    int unusual = 0;
    return load_json_model(root, NULL, name, &unusual, err);
}

// The loader of both paths: model.vocab and model.merges from the tree, or, when spans is not
// NULL, from their text (then *unusual = 1 when that text holds something unexpected).
static ByteLevelBpe *load_json_model(const json_t *root, const ModelSpans *spans, const char *name, int *unusual,
                                     Err *err)
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
    if (spans) {
        int rc = read_vocab_span(b, spans->vocab, spans->vocab_len, err);
        if (rc == -1) *unusual = 1;
        if (rc < 0) goto fail;
    }
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
    if (spans && b->n_duplicates) {   // a key given twice: jansson keeps the last
        *unusual = 1;
        goto fail;
    }
    for (int c = 0; c < 256; c++)
        if (b->byte_id[c] == NO_ID) {
            err_set(err, "%s: byte 0x%02x has no token in model.vocab (a byte-level vocabulary needs all 256)", name, c);
            goto fail;
        }
    if (spans) {
        uint32_t *ids = NULL;
        size_t n = 0;
        int rc = read_merges_span(b, spans->merges, spans->merges_len, &ids, &n);
        if (rc == -1) *unusual = 1;
        if (rc == -2) err_set(err, "out of memory");
        if (rc < 0 || insert_merges(b, ids, n, err) < 0) {
            free(ids);
            goto fail;
        }
        free(ids);
    } else if (load_merges(b, merges, name, err) < 0)
        goto fail;
    if (find_whole_chars(b, err) < 0) goto fail;
    read_post_processor(b, json_object_get(root, "post_processor"));
    return b;
fail:
    bytelevel_free(b);
    return NULL;
}

// ---- merging -----------------------------------------------------------------------------

static inline int is_pure(const ByteLevelBpe *b, uint32_t id) { return b->is_pure[id >> 3] >> (id & 7) & 1; }

static inline uint32_t pure_slot(uint32_t left, uint32_t right, uint32_t mask)
{
    return pair_slot((uint64_t)left << 32 | right, mask);
}

// Bits 46-63 of the same multiplicative hash (the slot uses bits 32 up).
static inline uint32_t pure_filter_bit(uint32_t left, uint32_t right)
{
    return (uint32_t)((((uint64_t)left << 32 | right) * 0x9E3779B97F4A7C15ull) >> 46) & (PURE_FILTER_BITS - 1);
}

// Rank and result of merging two adjacent parts (tokens left, right); NO_RANK when they do not merge.
// tiktoken's rule for a pair missing from the thread's cache: is the concatenation a token.
static __attribute__((noinline)) uint32_t concat_rank(const ByteLevelBpe *b, PairCacheSlot *slot, uint64_t key,
                                                      uint32_t left, uint32_t right)
{
    const Span *l = &b->tok[left], *r = &b->tok[right];
    uint32_t rank = NO_RANK;
    if (l->len + r->len <= 8)   // (both len >= 1: the shift is at most 56)
        rank = vocab_find_head(b, l->head | r->head << (8 * l->len), l->len + r->len);
    else if (l->len + r->len <= b->max_token_len) {
        char both[512];
        if (l->len + r->len <= sizeof both) {
            memcpy(both, b->blob + l->off, l->len);
            memcpy(both + l->len, b->blob + r->off, r->len);
            uint64_t h = hash_bytes(both, l->len + r->len);
            if (vocab_maybe(b, h)) rank = vocab_find_hashed(b, both, l->len + r->len, h);
        }
    }
    if (slot) *slot = (PairCacheSlot){key, rank};
    return rank;
}

// plain: without the pure-pair table (tests compare the two). Inline: it runs for every pair
// of adjacent parts; the rare slow path (concat_rank) is not.
static inline __attribute__((always_inline)) uint32_t pair_rank(const ByteLevelBpe *b, PairCacheSlot *cache, int plain,
                                                                uint32_t left, uint32_t right, uint32_t *new_id)
{
    uint32_t rank;
    if (!plain && b->pure_pairs && is_pure(b, left) && is_pure(b, right)) {
        uint32_t bit = pure_filter_bit(left, right);
        if (!(b->pure_filter[bit >> 6] >> (bit & 63) & 1)) return NO_RANK;
        for (uint32_t i = pure_slot(left, right, b->pure_mask);; i = (i + 1) & b->pure_mask) {
            const PurePair *p = &b->pure_pairs[i];
            if (!p->left_plus1) return NO_RANK;
            if (p->left_plus1 == left + 1 && p->right == right) {
                *new_id = p->new_id;
                return p->rank;
            }
        }
    }
    if (!b->use_ranks) return pair_find(b, left, right, &rank, new_id) ? rank : NO_RANK;
    uint64_t key = (uint64_t)left << 32 | right | 1ull << 63;
    PairCacheSlot *slot = NULL;
    if (cache) {
        slot = &cache[pair_slot(key, PAIR_CACHE_SLOTS - 1)];
        if (slot->key == key) return *new_id = slot->rank;
    }
    return *new_id = concat_rank(b, slot, key, left, right);
}

// The parts merging starts from: one per byte, except that a character may be one part when
// merges across its boundaries in this text all rank above its own (see find_whole_chars).
// Fills start[] and id[] (room for len each); returns the number of parts.
static size_t initial_parts(const ByteLevelBpe *b, int plain, const uint8_t *piece, size_t len, uint32_t *start,
                            uint32_t *id)
{
    size_t m = 0;
    for (size_t i = 0; i < len;) {
        uint8_t c = piece[i];
        if (b->chars && !plain && c >= 0xC2 && c < 0xF0) {
            uint32_t cp;
            size_t n = utf8_decode(piece + i, &cp);
            WholeChar wc = b->chars[cp];
            uint32_t rank = wc.rank;
            if (wc.token != NO_ID && (i == 0 || b->left_rank[piece[i - 1] << 8 | c] > rank) &&
                (i + n == len || b->right_rank[piece[i + n - 1] << 8 | piece[i + n]] > rank)) {
                start[m] = (uint32_t)i;
                id[m++] = wc.token;
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
    for (size_t i = 0; i + 1 < m; i++) rank[i] = pair_rank(b, ts->pairs, ts->plain, id[i], id[i + 1], &next_id[i]);
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
            rank[best] = pair_rank(b, ts->pairs, ts->plain, id[best], id[best + 1], &next_id[best]);
        if (best > 0)
            rank[best - 1] = pair_rank(b, ts->pairs, ts->plain, id[best - 1], id[best], &next_id[best - 1]);
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
        c_.rank = pair_rank(b, ts->pairs, ts->plain, id[l_], id[r_], &c_.new_id);                         \
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
// merges that turn c's bytes alone into its token. Before the first merge across one of c's
// boundaries, the parts inside c are c's alone, so that first merge joins a part ending at c's
// start with a proper prefix of c (its result ends in an incomplete character whose lead byte
// is c's and holds the byte before c just before it), or a proper suffix of c (the result
// starts with continuation bytes, c's last byte among them) with a part starting after c.
// If every merge result of the first shape with that byte pair, and every one of the second
// shape with its pair, ranks above r, then while c is incomplete some merge of c (rank <= r)
// always beats every merge across its boundaries, so c completes first whatever the text
// around it, and starting from c changes nothing else (the other merges see the same
// candidates in the same order). The tables are built once at load; the check per character
// is two lookups (initial_parts).

static inline void lower(uint32_t *slot, uint32_t rank)
{
    if (rank < *slot) *slot = rank;
}

// Length of the UTF-8 sequence that starts with lead byte c (>= 0xC0).
static inline uint32_t utf8_length(uint8_t c) { return c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2; }

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

// ---- pure pairs ----------------------------------------------------------------------------
// A token is pure when its bytes are one or more complete UTF-8 characters of 2-4 bytes. The
// concatenation of two pure tokens is pure, so every merge of two pure tokens comes from a pure
// result: for tiktoken files, each pure token of two or more characters split at each character
// boundary where both halves are tokens (about 10K tokens and 20K lookups for Llama 3); for
// tokenizer.json, the merges whose two sides are pure. A pair of pure tokens missing from the
// table does not merge, so the table answers every such pair exactly, from a few hundred KB
// instead of the multi-MB vocabulary hash and token bytes.

static int token_is_pure(const uint8_t *t, uint32_t len)
{
    if (!len) return 0;
    for (uint32_t k = 0; k < len;) {
        uint32_t n = t[k] >= 0xF0 ? 4 : t[k] >= 0xE0 ? 3 : t[k] >= 0xC0 ? 2 : 0;
        if (!n || k + n > len) return 0;
        for (uint32_t j = 1; j < n; j++)
            if ((t[k + j] & 0xC0) != 0x80) return 0;
        k += n;
    }
    return 1;
}

static void pure_insert(ByteLevelBpe *b, uint32_t left, uint32_t right, uint32_t rank, uint32_t new_id)
{
    uint32_t i = pure_slot(left, right, b->pure_mask);
    for (;; i = (i + 1) & b->pure_mask) {
        PurePair *p = &b->pure_pairs[i];
        if (!p->left_plus1) break;
        if (p->left_plus1 == left + 1 && p->right == right) {
            if (rank >= p->rank) return;   // a pair keeps its lowest rank
            break;
        }
    }
    b->pure_pairs[i] = (PurePair){left + 1, right, rank, new_id};
    uint32_t bit = pure_filter_bit(left, right);
    b->pure_filter[bit >> 6] |= 1ull << (bit & 63);
}

static int build_pure_pairs(ByteLevelBpe *b, Err *err)
{
    b->is_pure = calloc(b->n_tokens / 8 + 1, 1);
    if (!b->is_pure) return err_set(err, "out of memory");
    size_t n_pairs = 0;
    for (uint32_t id = 0; id < b->n_tokens; id++) {
        const uint8_t *t = (const uint8_t *)b->blob + b->tok[id].off;
        if (b->is_special[id] || !token_is_pure(t, b->tok[id].len)) continue;
        b->is_pure[id >> 3] |= (uint8_t)(1u << (id & 7));
        for (uint32_t k = 1; k < b->tok[id].len; k++) n_pairs += (t[k] & 0xC0) != 0x80;   // character boundaries
    }
    if (!b->use_ranks) n_pairs = b->n_merges;   // at most
    uint32_t cap = 1024;
    while (cap < n_pairs + n_pairs / 2) cap <<= 1;   // load <= 2/3: 32K slots, 512 KB for Llama 3
    b->pure_pairs = calloc(cap, sizeof *b->pure_pairs);
    b->pure_filter = calloc(PURE_FILTER_BITS / 64, sizeof *b->pure_filter);
    if (!b->pure_pairs || !b->pure_filter) return err_set(err, "out of memory");
    b->pure_mask = cap - 1;
    if (!b->use_ranks) {
        for (uint32_t i = 0; i <= b->pair_mask; i++) {
            const PairSlot *p = &b->pairs[i];
            if (!p->rank) continue;
            uint32_t left = (uint32_t)(p->key >> 32), right = (uint32_t)p->key;
            if (is_pure(b, left) && is_pure(b, right)) pure_insert(b, left, right, p->rank - 1, p->new_id);
        }
        return 0;
    }
    for (uint32_t id = 0; id < b->n_tokens; id++) {
        if (!is_pure(b, id)) continue;
        const uint8_t *t = (const uint8_t *)b->blob + b->tok[id].off;
        uint32_t len = b->tok[id].len;
        if (vocab_find(b, t, len) != id) continue;   // a duplicate: merges give the first id
        for (uint32_t k = 1; k < len; k++) {
            if ((t[k] & 0xC0) == 0x80) continue;
            uint32_t left = vocab_find(b, t, k), right = left == NO_ID ? NO_ID : vocab_find(b, t + k, len - k);
            if (right != NO_ID) pure_insert(b, left, right, id, id);
        }
    }
    return 0;
}

static int find_whole_chars(ByteLevelBpe *b, Err *err)
{
    if (build_pure_pairs(b, err) < 0) return -1;
    b->chars = malloc(65536 * sizeof *b->chars);
    b->left_rank = malloc(65536 * sizeof *b->left_rank);
    b->right_rank = malloc(65536 * sizeof *b->right_rank);
    if (!b->chars || !b->left_rank || !b->right_rank) return err_set(err, "out of memory");
    memset(b->left_rank, 0xFF, 65536 * sizeof *b->left_rank);   // NO_RANK
    memset(b->right_rank, 0xFF, 65536 * sizeof *b->right_rank);
    // Every merge result: tiktoken's are all tokens (rank = id); else the merges list.
    for (uint32_t i = 0, n = b->use_ranks ? b->n_tokens : b->pair_mask + 1; i < n; i++) {
        uint32_t id = i, rank = i;
        if (!b->use_ranks) {
            if (!b->pairs[i].rank) continue;
            id = b->pairs[i].new_id;
            rank = b->pairs[i].rank - 1;
        } else if (b->is_special[id])
            continue;
        const uint8_t *t = (const uint8_t *)b->blob + b->tok[id].off;
        uint32_t len = b->tok[id].len, k;
        if (len < 2) continue;
        // Ends in an incomplete character after a byte: a left-boundary crossing.
        for (k = len; k > 0 && (t[k - 1] & 0xC0) == 0x80; k--) continue;
        if (k >= 2 && t[k - 1] >= 0xC0 && len - (k - 1) < utf8_length(t[k - 1])) lower(&b->left_rank[t[k - 2] << 8 | t[k - 1]], rank);
        // Starts with continuation bytes, then a byte: a right-boundary crossing.
        for (k = 0; k < len && (t[k] & 0xC0) == 0x80; k++) continue;
        if (k >= 1 && k < len) lower(&b->right_rank[t[k - 1] << 8 | t[k]], rank);
    }
    memset(b->chars, 0xFF, 65536 * sizeof *b->chars);   // token NO_ID
    // The tokens that are one BMP character of 2-3 bytes (the first id of duplicates).
    for (uint32_t token = 0; token < b->n_tokens; token++) {
        const uint8_t *t = (const uint8_t *)b->blob + b->tok[token].off;
        size_t n = b->tok[token].len;
        if (b->is_special[token] || n < 2 || n > 3 || t[0] < 0xC2 || utf8_length(t[0]) != n) continue;
        uint32_t cp;
        uint8_t s[16] = {0};   // 16: hash_bytes may read 8 bytes from its argument
        utf8_decode(t, &cp);
        if ((cp >= 0xD800 && cp <= 0xDFFF) || utf8_encode_bmp(cp, s) != n || memcmp(s, t, n) != 0) continue;
        if (b->chars[cp].token != NO_ID || (b->n_duplicates && vocab_find(b, s, n) != token)) continue;
        // Merge the bytes alone (as merge_scan does), noting the highest rank used.
        uint32_t start[4] = {0, 1, 2, 3}, id[3] = {b->byte_id[s[0]], b->byte_id[s[1]], b->byte_id[s[2]]};
        size_t m = n;
        uint32_t highest = 0;
        start[n] = (uint32_t)n;
        while (m > 1) {
            uint32_t best_rank = NO_RANK, best_id = NO_ID, new_id;
            size_t best = 0;
            for (size_t i = 0; i + 1 < m; i++) {
                uint32_t r = pair_rank(b, NULL, 0, id[i], id[i + 1], &new_id);
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
            b->chars[cp] = (WholeChar){token, highest};
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
    // The fixed tables (1.4 MiB) in one mapping, populated at once: lookups hit them all over,
    // and a page fault on first touch of each of their ~350 pages costs more than this.
    size_t key_len = CACHE_SLOTS * sizeof *ts->cache_key, at_len = CACHE_SLOTS * sizeof *ts->cache_at;
    size_t pairs_len = b->use_ranks ? PAIR_CACHE_SLOTS * sizeof *ts->pairs : 0;
    ts->tables_len = key_len + at_len + pairs_len;
    char *tables = mmap(NULL, ts->tables_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    // The arena: untouched until used, faulted in as it fills.
    void *arena = mmap(NULL, CACHE_ARENA_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ts->cache_arena = arena == MAP_FAILED ? NULL : arena;
    if (tables == MAP_FAILED || !ts->cache_arena) {
        if (tables != MAP_FAILED) munmap(tables, ts->tables_len);
        if (ts->cache_arena) munmap(ts->cache_arena, CACHE_ARENA_BYTES);
        free(ts);
        return NULL;
    }
    ts->tables = tables;   // (zero as mapped)
    ts->pairs = b->use_ranks ? (PairCacheSlot *)tables : NULL;
    ts->cache_key = (uint64_t *)(tables + pairs_len);
    ts->cache_at = (uint32_t *)(tables + pairs_len + key_len);
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
    uint32_t **arrays[] = {&ts->node_id, &ts->node_next, &ts->node_prev, &ts->part_start, &ts->part_id,
                           &ts->piece_ids};
    for (size_t k = 0; k < sizeof arrays / sizeof *arrays; k++) {
        uint32_t *p = realloc(*arrays[k], cap * sizeof *p);
        if (!p) return -1;
        *arrays[k] = p;
    }
    ts->work_cap = cap;
    return 0;
}

// BPE of a piece of len >= 1 bytes into out (room for len ids); the number of ids or -1.
// use_heap: -1 choose by size, 0 scan (at most SCAN_MAX_PARTS parts), 1 heap; ts->plain: see
// bytelevel_bpe_piece.
static long merge_piece(const ByteLevelBpe *b, ThreadState *ts, const uint8_t *piece, size_t len, int use_heap,
                        uint32_t *out)
{
    if (grow_work(ts, len) < 0) return -1;
    size_t m = initial_parts(b, ts->plain, piece, len, ts->part_start, ts->part_id);
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
    ts->plain = use_heap == 2;
    long n = merge_piece(b, ts, (const uint8_t *)piece, len, use_heap == 2 ? 1 : use_heap, out);
    ts->plain = 0;
    return n;
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
    memcpy(*o->ids + o->n, ids, count * sizeof *ids);
    if (o->offsets)   // (token lengths are a random read each: only when asked for)
        for (size_t i = 0; i < count; i++) {
            (*o->offsets)[o->n + i] = (uint32_t)at;
            at += b->tok[ids[i]].len;
        }
    o->n += count;
    return 0;
}

// Remember piece -> ids (count of them) in the thread's cache, at index slot i.
static void cache_insert(ThreadState *ts, size_t i, uint64_t key, const uint8_t *piece, size_t len, const uint32_t *ids,
                         size_t count)
{
    size_t need = sizeof(CacheEntry) + count * sizeof *ids + (len + 3) / 4 * 4;
    if (need > CACHE_ARENA_BYTES / 16) return;
    if (ts->cache_used + need > CACHE_ARENA_BYTES) {   // full: start again
        memset(ts->cache_key, 0, CACHE_SLOTS * sizeof *ts->cache_key);
        ts->cache_used = 0;
    }
#ifdef MADV_POPULATE_WRITE
    // Fault in the arena ahead, a chunk at a time: one call instead of a fault per page.
    if (ts->cache_used + need > ts->cache_ready && ts->cache_ready < CACHE_ARENA_BYTES) {
        madvise(ts->cache_arena + ts->cache_ready, CACHE_ARENA_CHUNK, MADV_POPULATE_WRITE);   // (advice)
        ts->cache_ready += CACHE_ARENA_CHUNK;
    }
#endif
    CacheEntry *e = (CacheEntry *)(ts->cache_arena + ts->cache_used);
    e->len = (uint32_t)len;
    e->n_ids = (uint32_t)count;
    memcpy(e + 1, ids, count * sizeof *ids);
    memcpy((uint32_t *)(e + 1) + count, piece, len);
    ts->cache_key[i] = key;
    ts->cache_at[i] = (uint32_t)ts->cache_used;
    ts->cache_used += need;
}

static int encode_piece(const ByteLevelBpe *b, ThreadState *ts, const uint8_t *piece, size_t len, size_t at, Output *o)
{
    if (len == 1) return output_tokens(b, o, &b->byte_id[piece[0]], 1, at);
    uint64_t h = len <= CACHE_MAX_PIECE || len <= b->max_token_len ? hash_bytes(piece, len) : 0;
    if (b->whole_piece_lookup && len <= b->max_token_len && (len <= 8 || vocab_maybe(b, h))) {
        uint32_t id = vocab_find_hashed(b, piece, len, h);
        if (id != NO_ID) return output_tokens(b, o, &id, 1, at);
    }
    uint64_t key = h | 1;
    size_t slot = (size_t)(h >> 20) & (CACHE_SLOTS - 1);   // (the low bits picked the vocabulary slot)
    if (len <= CACHE_MAX_PIECE && ts->cache_key[slot] == key) {
        const CacheEntry *e = (const CacheEntry *)(ts->cache_arena + ts->cache_at[slot]);
        const uint32_t *ids = (const uint32_t *)(e + 1);
        if (e->len == len && memcmp(ids + e->n_ids, piece, len) == 0) return output_tokens(b, o, ids, e->n_ids, at);
    }
    if (grow_work(ts, len) < 0) return -1;
    uint32_t *ids = ts->piece_ids;
    long count = merge_piece(b, ts, piece, len, -1, ids);
    if (count < 0 || output_tokens(b, o, ids, (size_t)count, at) < 0) return -1;
    if (len <= CACHE_MAX_PIECE) cache_insert(ts, slot, key, piece, len, ids, (size_t)count);
    return 0;
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
            if (b->pairs[i].rank) {
                uint64_t entry[2] = {b->pairs[i].key, b->pairs[i].rank};
                XXH3_64bits_update(&st, entry, sizeof entry);
            }
    return XXH3_64bits_digest(&st);
}
