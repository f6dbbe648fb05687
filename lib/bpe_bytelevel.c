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
// Second round. Instructions of one cold pass (callgrind; deterministic, unlike time on this
// shared VM), then MB/s of the first pass in a fresh process (tests/bench/tok.sh "cold", median):
//                                                 en         zh        mixed   (M instructions)
//   before                                       50.6        58.8      109.2
//   pair table for tokenizer.model, built at
//     load (build_rank_pairs): one probe per
//     pair, no bytes hashed; the per-thread
//     1 MiB pair cache is gone                   49.0        57.1      106.1
//   pieces cut into segments (encode_segments):
//     one-character words are their token,
//     the others found in the cache              49.5        47.2       96.6
//   bigram filter 256 -> 32 KB, left/right
//     rank checks in an 8 KB bitmap, the
//     vocabulary probe inlined                   45.5        47.6       93.0
//   encode_piece inlined into the loop, the
//     new-piece path out of line                 42.8        47.5       90.3
//   segments in one pass (no array of ends,
//     no second decode of their characters)      42.7        46.5       89.2
//   a piece that was cut is not cached itself
//     (its segments are)                         42.6        44.6       87.2
//   MB/s, cold (tests/bench/tok.sh, two
//     alternating runs each), before           108-111     52-54      71-74
//                                after         103-106     65-68      81-83
//   warm (tokenizer.model), before             175-176    109-111      119
//                           after              170-188    118-121    125-128
// en's first pass is bound by the first probes of the 4 MiB vocabulary hash (whole-piece
// lookups; 40% of its samples in perf annotate), which these changes do not touch.
// Load (CPU): tokenizer.model 18-19 -> 44-46 ms (the pair table), tokenizer.json 86-91 -> 72-75 ms.
// Dropped: prefetching the next piece's vocabulary and cache slots (one piece ahead +0-2%,
// noise; 3-7 ahead: en -4-7%); merging short segments without the cache (zh +18% instructions).
//
// Load (issue 3: a serial load capped tok -j's scaling). Instructions of one load on one thread
// (callgrind, tokdrv -l with OMP_NUM_THREADS=1, whole process), CPU ms on one thread (medians of
// alternating runs on the dev VM, noisy), wall ms on its 2 cores (tests/bench/tok.sh):
//                     tokenizer.model                 tokenizer.json
//   before            266.6M   54-58 ms CPU            643.8M   87-92 ms CPU
//   after             230.5M   52-54 ms, 49 ms wall    462.4M   73-84 ms, 66 ms wall
// Changes: the fingerprint hashed in 64 KB blocks (19.1M -> 7.6M: two update calls a token
// cost ~150 instructions); tiktoken lines read in one read, tables sized at once, base64 4
// characters a step; pure pairs from the list of merges, not a pass over the 2-4 MiB pair
// table; merge results that are all ASCII skip the boundary checks and UTF-8 decoding;
// byte-level strings converted and checked in one pass; JSON strings scanned 8 bytes at a
// time, blanks of pretty-printed files 8 at a time, model.merges scanned once, not twice.
// tokenizer.model's load waits on its pair table (see build_rank_pairs) more than it computes,
// so one thread gains little; the gain is on many cores: 72% of its instructions now run on
// the load's threads (the lines, the pair table, the pairs of characters in merge results),
// 51% of tokenizer.json's (its merges, the pairs of characters; see team_run). The tokenizer
// is the same whatever the number of threads (the same tables slot for slot).
// On the H200 machine's 16 cores (tests/bench/tok.sh, the code before and after in one call,
// 2026-11-30 09:20): load wall 71 -> 54 ms (tokenizer.model), 127 -> 78 ms (tokenizer.json);
// tok on no records 0.090 -> 0.055 s; tok -j 16 on the 56 MB stream 0.202 -> 0.151 s (-j 1
// 0.67-0.95 s in that run: noisy; 6.3x over -j 1, 9.3x with the load taken off).
#include "bpe_bytelevel.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "pretok.h"
#include "unicode.h"

#ifdef _OPENMP
#include <omp.h>
#else   // (the fuzz build, without OpenMP)
static inline int omp_get_max_threads(void) { return 1; }
#endif

#define NO_ID UINT32_MAX
#define NO_RANK UINT32_MAX
#define SCAN_MAX_PARTS 16        // pieces of more parts merge with the heap, the others by scanning
#define CACHE_SLOTS (1u << 15)        // per thread, direct-mapped index of the piece cache
#define CACHE_ARENA_BYTES (4u << 20)  // per thread: the cached pieces, one after the other
#define CACHE_MAX_PIECE 1024          // longest piece cached, bytes
#define CACHE_ARENA_CHUNK (256u << 10)
#define VOCAB_BLOOM_BITS (1u << 20)
#define PURE_FILTER_BITS (1u << 18)
#define BIGRAM_FILTER_BITS (1u << 18)

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

// Pair tables: (left id, right id) -> rank, open addressing, one probe per candidate pair and no
// token bytes read. Narrow slots (every id and rank < 2^21, any real vocabulary) are one 64-bit
// word: 1 << 63 | left << 42 | right << 21 | rank, 0 = empty, so the Llama 3 table (128K pairs,
// 256K slots) is 2 MiB. Otherwise wide slots of 16 bytes.
#define PAIR_FIELD_BITS 21
#define PAIR_FIELD_MAX ((1u << PAIR_FIELD_BITS) - 1)
typedef struct {
    uint64_t key;                // left << 32 | right
    uint32_t rank_plus1;         // 0 = empty slot
    uint32_t unused;
} WidePairSlot;

typedef struct {
    uint64_t *narrow;            // (mask + 1) narrow slots, or NULL
    WidePairSlot *wide;          // (mask + 1) wide slots when narrow is NULL
    uint32_t mask;
} PairTable;

// A character that may start as one part (see find_whole_chars): its token (NO_ID when it
// may not) and the highest rank of the merges that build it. Together: one cache line.
typedef struct {
    uint32_t token, rank;
} WholeChar;

// One cached piece -> ids result in the arena: this header, ids[n_ids], then the len bytes of
// the piece, padded to 4 bytes.
typedef struct {
    uint32_t len, n_ids;
} CacheEntry;

// Heap entry of the O(n log n) merge: the pair starting at node pos.
typedef struct {
    uint32_t rank, pos, left_id, right_id;
} Candidate;

// Per-thread scratch: the cache and the merge work arrays (grown to the longest piece seen).
typedef struct ThreadState {
    void *tables;                // one mapping: cache_key and cache_at (see thread_state)
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
    // (tiktoken; answered from the pairs table built at load, see build_rank_pairs). Otherwise
    // the merges list of tokenizer.json: pair (left id, right id) -> merge index, whose result
    // is merge_result[index].
    int use_ranks;
    uint32_t max_token_len;      // longest ordinary token, bytes
    uint32_t n_duplicates;       // ordinary tokens whose bytes an earlier id has
    int whole_piece_lookup;      // try the piece as one token first (tiktoken; HF ignore_merges)
    PairTable pairs;             // every pair that may merge -> its rank
    uint32_t *merge_result;      // (n_merges) tokenizer.json: the token merge r makes; NULL for tiktoken
    uint32_t n_merges;
    int merges_follow_ranks;     // every merge's result id >= the previous one's
    // Whole characters (see find_whole_chars): for a BMP character of 2-3 bytes whose bytes
    // merge into one token, that token and the highest merge rank used (else NO_ID); by byte
    // pair (x << 8 | y), the lowest rank of a merge that could cross a character's left
    // boundary (x before, y the character's lead byte) or its right boundary (x its last byte,
    // y after) before the character is complete. NULL when not built.
    WholeChar *chars;                   // (65536) by code point
    uint32_t *left_rank, *right_rank;   // (65536) by byte pair
    // A bit per pair of characters (c1 << 21 | c2, hashed) that follow each other inside some
    // merge result, and by byte pair, 1 when left_rank and right_rank are both NO_RANK (see
    // encode_segments); NULL when not built.
    uint64_t *bigram_filter;            // (BIGRAM_FILTER_BITS / 64)
    uint64_t *no_partial;               // (65536 / 64)
    // Merges between "pure" tokens (complete characters of 2-4 bytes only, such as Chinese
    // words), answered exactly by a small table (see build_pure_pairs): CJK text is long pieces
    // of such parts, and the general lookup misses the caches there. NULL when not built.
    uint8_t *is_pure;            // (n_tokens / 8 + 1) bitmap by id
    PairTable pure_pairs;        // the pairs of two pure tokens, a copy of those entries of pairs
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

// ---- threads for the loaders ------------------------------------------------------------
// The parts of a load that split over threads (the lines of a tiktoken file, the pair table
// built from them, the merges of a tokenizer.json) run on a team of plain threads that ends
// with the load: an OpenMP team's idle threads spin for milliseconds after each region, CPU
// time that whatever follows the load would be charged with. As many threads as OpenMP would
// use (OMP_NUM_THREADS, else the cores), at most LOAD_THREADS_MAX.
#define LOAD_THREADS_MAX 32

typedef struct Team Team;
typedef void TeamFn(void *arg, Team *team, int thread);   // thread: 0 (the caller) .. team->n - 1

struct Team {
    int wanted;                  // threads asked for
    int n;                       // threads running, the caller included
    TeamFn *fn;
    void *arg;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int started, waiting;        // the gate: threads wait until the team's size is known
    unsigned generation;         // of team_barrier
};

// Waits until all n threads of the team are here.
static void team_barrier(Team *t)
{
    pthread_mutex_lock(&t->lock);
    unsigned generation = t->generation;
    if (++t->waiting == t->n) {
        t->waiting = 0;
        t->generation++;
        pthread_cond_broadcast(&t->cond);
    } else {
        while (generation == t->generation) pthread_cond_wait(&t->cond, &t->lock);
    }
    pthread_mutex_unlock(&t->lock);
}

typedef struct {
    Team *team;
    int thread;
} TeamMember;

static void *team_thread(void *p)
{
    TeamMember *m = p;
    Team *t = m->team;
    pthread_mutex_lock(&t->lock);
    while (!t->started) pthread_cond_wait(&t->cond, &t->lock);
    pthread_mutex_unlock(&t->lock);
    t->fn(t->arg, t, m->thread);
    return NULL;
}

static int load_threads(void)
{
    int n = omp_get_max_threads();
    return n < 1 ? 1 : n > LOAD_THREADS_MAX ? LOAD_THREADS_MAX : n;
}

// Runs fn(arg, team, thread) on up to n threads, the caller's as thread 0, and returns when all
// have returned. Fewer threads when some cannot be started: fn must share out its work by
// team->n, which is set before any of them runs.
static void team_run(int n, TeamFn *fn, void *arg)
{
    Team t = {.wanted = n, .n = 1, .fn = fn, .arg = arg};
    pthread_t ids[LOAD_THREADS_MAX];
    TeamMember members[LOAD_THREADS_MAX];
    pthread_mutex_init(&t.lock, NULL);
    pthread_cond_init(&t.cond, NULL);
    for (int k = 1; k < n && k < LOAD_THREADS_MAX; k++) {
        members[k] = (TeamMember){&t, k};
        if (pthread_create(&ids[k], NULL, team_thread, &members[k]) != 0) break;
        t.n++;
    }
    pthread_mutex_lock(&t.lock);
    t.started = 1;
    pthread_cond_broadcast(&t.cond);
    pthread_mutex_unlock(&t.lock);
    fn(arg, &t, 0);
    for (int k = 1; k < t.n; k++) pthread_join(ids[k], NULL);
    pthread_cond_destroy(&t.cond);
    pthread_mutex_destroy(&t.lock);
}

// This thread's share [*lo, *hi) of [0, n).
static void team_share(const Team *t, int thread, size_t n, size_t *lo, size_t *hi)
{
    *lo = n * (size_t)thread / (size_t)t->n;
    *hi = n * (size_t)(thread + 1) / (size_t)t->n;
}

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
// character outside the alphabet (such a token can never be produced from bytes), and -1 when
// s is not valid UTF-8: the alphabet is U+0021..U+0143, so each of its characters is one byte,
// or two with a lead byte C2..C5, and anything else fails here. One pass, validation included.
static int16_t char_byte[256 + 68];   // inverse of byte_to_char, -1 outside the alphabet
static int16_t single_byte[256];      // byte c: char_byte[c] below 0x80, -2 for a lead C2..C5, else -1
static int16_t double_byte[4 << 6];   // (lead - 0xC2) << 6 | continuation & 0x3F: char_byte of it
static void char_byte_init(void)
{
    for (int c = 0; c < 256 + 68; c++) char_byte[c] = -1;
    for (int b = 0; b < 256; b++) char_byte[byte_to_char(b)] = (int16_t)b;
    for (int c = 0; c < 256; c++) single_byte[c] = c < 0x80 ? char_byte[c] : c >= 0xC2 && c <= 0xC5 ? -2 : -1;
    for (int i = 0; i < 4 << 6; i++) {
        int cp = (0xC2 + (i >> 6) - 0xC0) << 6 | (i & 0x3F);
        double_byte[i] = cp < 256 + 68 ? char_byte[cp] : -1;
    }
}

// (char_byte_init must have run: bytelevel_new does it.)
static long bytelevel_string_to_bytes(const char *s, size_t len, uint8_t *out)
{
    const uint8_t *p = (const uint8_t *)s, *end = p + len;
    long n = 0;
    while (p < end) {
        int v = single_byte[*p];
        if (v >= 0) {
            out[n++] = (uint8_t)v;
            p++;
            continue;
        }
        if (v == -1 || end - p < 2 || (p[1] & 0xC0) != 0x80) return -1;
        v = double_byte[(p[0] - 0xC2) << 6 | (p[1] & 0x3F)];
        if (v < 0) return -1;
        out[n++] = (uint8_t)v;
        p += 2;
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

static inline __attribute__((always_inline)) uint32_t vocab_find_hashed(const ByteLevelBpe *b, const void *p, size_t n,
                                                                        uint64_t h)
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

// ---- pair tables ------------------------------------------------------------------------

static inline uint32_t pair_slot(uint64_t key, uint32_t mask)
{
    return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & mask;
}

// A narrow slot without its rank: 1 << 42 | left << 21 | right.
static inline uint64_t narrow_key(uint32_t left, uint32_t right)
{
    return 1ull << (2 * PAIR_FIELD_BITS) | (uint64_t)left << PAIR_FIELD_BITS | right;
}

static __attribute__((noinline)) uint32_t wide_lookup(const PairTable *t, uint32_t left, uint32_t right)
{
    uint64_t key = (uint64_t)left << 32 | right;
    for (uint32_t i = pair_slot(key, t->mask);; i = (i + 1) & t->mask) {
        const WidePairSlot *p = &t->wide[i];
        if (!p->rank_plus1) return NO_RANK;
        if (p->key == key) return p->rank_plus1 - 1;
    }
}

// The rank of pair (left, right), NO_RANK when it does not merge. left and right are token ids;
// ids past a narrow table's fields are never in it.
static inline uint32_t pair_lookup(const PairTable *t, uint32_t left, uint32_t right)
{
    if (__builtin_expect(!t->narrow, 0)) return wide_lookup(t, left, right);
    if ((left | right) > PAIR_FIELD_MAX) return NO_RANK;
    uint64_t key = narrow_key(left, right);
    for (uint32_t i = pair_slot(key, t->mask);; i = (i + 1) & t->mask) {
        uint64_t s = t->narrow[i];
        if (s >> PAIR_FIELD_BITS == key) return (uint32_t)s & PAIR_FIELD_MAX;
        if (!s) return NO_RANK;
    }
}

// Room for n pairs (load <= 2/3); narrow unless an id or rank up to max_value does not fit.
static int pair_table_alloc(PairTable *t, size_t n, uint32_t max_value, Err *err)
{
    uint32_t cap = 1024;
    while (cap < n + n / 2) cap <<= 1;
    if (max_value < PAIR_FIELD_MAX) t->narrow = calloc(cap, sizeof *t->narrow);
    else t->wide = calloc(cap, sizeof *t->wide);
    if (!t->narrow && !t->wide) return err_set(err, "out of memory");
    t->mask = cap - 1;
    return 0;
}

// Add a pair unless it has a rank already (a repeated merge keeps its first, lowest rank).
static void pair_table_insert(PairTable *t, uint32_t left, uint32_t right, uint32_t rank)
{
    if (t->narrow) {
        uint64_t key = narrow_key(left, right);
        uint32_t i = pair_slot(key, t->mask);
        while (t->narrow[i] && t->narrow[i] >> PAIR_FIELD_BITS != key) i = (i + 1) & t->mask;
        if (t->narrow[i]) return;
        t->narrow[i] = key << PAIR_FIELD_BITS | rank;
    } else {
        uint64_t key = (uint64_t)left << 32 | right;
        uint32_t i = pair_slot(key, t->mask);
        while (t->wide[i].rank_plus1 && t->wide[i].key != key) i = (i + 1) & t->mask;
        if (t->wide[i].rank_plus1) return;
        t->wide[i] = (WidePairSlot){key, rank + 1, 0};
    }
}

// Slot i of a table: 1 and its pair and rank, or 0 when empty.
static inline int pair_table_entry(const PairTable *t, uint32_t i, uint32_t *left, uint32_t *right, uint32_t *rank)
{
    if (t->narrow) {
        uint64_t s = t->narrow[i];
        *left = (uint32_t)(s >> (2 * PAIR_FIELD_BITS)) & PAIR_FIELD_MAX;
        *right = (uint32_t)(s >> PAIR_FIELD_BITS) & PAIR_FIELD_MAX;
        *rank = (uint32_t)s & PAIR_FIELD_MAX;
        return s != 0;
    }
    *left = (uint32_t)(t->wide[i].key >> 32);
    *right = (uint32_t)t->wide[i].key;
    *rank = t->wide[i].rank_plus1 - 1;
    return t->wide[i].rank_plus1 != 0;
}

// The token a merge of rank r makes: tiktoken's rank is the token's id.
static inline uint32_t merge_result(const ByteLevelBpe *b, uint32_t rank)
{
    return b->merge_result ? b->merge_result[rank] : rank;
}

// ---- token table -------------------------------------------------------------------------

// Room for ids below cap (tok and is_special), n_tokens unchanged.
static int reserve_tokens(ByteLevelBpe *b, uint32_t cap, Err *err)
{
    if (cap <= b->tok_cap) return 0;
    Span *tok = realloc(b->tok, (size_t)cap * sizeof *tok);
    if (!tok) return err_set(err, "out of memory");
    b->tok = tok;
    uint8_t *sp = realloc(b->is_special, cap);
    if (!sp) return err_set(err, "out of memory");
    b->is_special = sp;
    b->tok_cap = cap;
    return 0;
}

// Ids up to n - 1 exist (new ones empty). Inline: the loaders call it once per token.
static inline int ensure_tokens(ByteLevelBpe *b, uint32_t n, Err *err)
{
    if (n <= b->n_tokens) return 0;
    if (n > b->tok_cap && reserve_tokens(b, n > 2 * b->tok_cap ? n : 2 * b->tok_cap, err) < 0) return -1;
    for (uint32_t id = b->n_tokens; id < n; id++) {   // (mostly one id: the next)
        b->tok[id] = (Span){0, 0, 0};
        b->is_special[id] = 0;
    }
    b->n_tokens = n;
    return 0;
}

// Room for more bytes in the blob.
static int reserve_blob(ByteLevelBpe *b, size_t more, Err *err)
{
    if (b->blob_len + more <= b->blob_cap) return 0;
    if (more > UINT32_MAX || b->blob_len + more > UINT32_MAX) return err_set(err, "vocabulary too large");
    size_t cap = b->blob_cap ? b->blob_cap : 1 << 20;
    while (cap < b->blob_len + more) cap *= 2;
    char *blob = realloc(b->blob, cap);
    if (!blob) return err_set(err, "out of memory");
    b->blob = blob;
    b->blob_cap = cap;
    return 0;
}

static inline int set_token_bytes(ByteLevelBpe *b, uint32_t id, const void *p, size_t len, Err *err)
{
    if (len > UINT32_MAX / 2 || b->blob_len + len > UINT32_MAX) return err_set(err, "token %u too long", id);
    if (b->blob_len + len > b->blob_cap && reserve_blob(b, len, err) < 0) return -1;
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
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, char_byte_init);
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
    free(b->pairs.narrow);
    free(b->pairs.wide);
    free(b->merge_result);
    free(b->added);
    free(b->is_pure);
    free(b->pure_pairs.narrow);
    free(b->pure_pairs.wide);
    free(b->pure_filter);
    free(b->chars);
    free(b->left_rank);
    free(b->right_rank);
    free(b->bigram_filter);
    free(b->no_partial);
    free(b);
}

static int build_rank_pairs(ByteLevelBpe *b, uint32_t **merges, size_t *n_merges, Err *err);
static int find_whole_chars(ByteLevelBpe *b, const uint32_t *merges, size_t n_merges, Err *err);

// ---- tiktoken rank file ------------------------------------------------------------------

static int8_t base64_value[256];   // -1 outside the alphabet
static void base64_init(void)
{
    memset(base64_value, -1, sizeof base64_value);
    const char *alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (int i = 0; i < 64; i++) base64_value[(uint8_t)alphabet[i]] = (int8_t)i;
}

// base64_value must be set up (base64_init). Groups before the last one hold no padding.
static inline long base64_decode(const char *s, size_t len, uint8_t *out)
{
    if (len % 4 || !len) return len ? -1 : 0;
    long n = 0;
    size_t i = 0;
    for (; i + 4 < len; i += 4) {
        int v0 = base64_value[(uint8_t)s[i]], v1 = base64_value[(uint8_t)s[i + 1]];
        int v2 = base64_value[(uint8_t)s[i + 2]], v3 = base64_value[(uint8_t)s[i + 3]];
        if ((v0 | v1 | v2 | v3) < 0) return -1;   // (also a '=' before the last group)
        uint32_t v = (uint32_t)v0 << 18 | (uint32_t)v1 << 12 | (uint32_t)v2 << 6 | (uint32_t)v3;
        out[n] = (uint8_t)(v >> 16), out[n + 1] = (uint8_t)(v >> 8), out[n + 2] = (uint8_t)v;
        n += 3;
    }
    int pad = (s[i + 3] == '=') + (s[i + 2] == '=' && s[i + 3] == '=');
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) {
        int d = (k >= 4 - pad) ? 0 : base64_value[(uint8_t)s[i + k]];
        if (d < 0) return -1;
        v = v << 6 | (uint32_t)d;
    }
    out[n++] = (uint8_t)(v >> 16);
    if (pad < 2) out[n++] = (uint8_t)(v >> 8);
    if (pad < 1) out[n++] = (uint8_t)v;
    return n;
}

// The whole file, NUL-terminated, in one read when its size is known.
static char *read_file(const char *path, size_t *len, Err *err)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        err_set(err, "%s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    size_t cap = 1 << 16, n = 0;
    if (fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0) cap = (size_t)st.st_size + 1;
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

// Lines [start, end) of a tiktoken file decoded by one thread: its tokens' ranks and bytes, in
// the order of the lines, up to the first malformed line.
typedef struct {
    const char *start, *end;     // whole lines
    size_t n_lines;              // lines read, the empty ones and a malformed one included
    size_t n;                    // tokens
    uint32_t *rank, *len, *line; // (n) rank, byte count, line (0 = the chunk's first)
    uint8_t *bytes;              // (sum of len) their bytes, one after the other
    long bad_line;               // the malformed line, -1 when none
    int oom;
} RankLines;

// Decodes the "base64 rank" lines of c (see bytelevel_load_tiktoken).
static void read_rank_lines(RankLines *c)
{
    size_t cap = 1;
    for (const char *p = c->start; p < c->end && (p = memchr(p, '\n', (size_t)(c->end - p))); p++) cap++;
    c->rank = malloc(cap * sizeof *c->rank);
    c->len = malloc(cap * sizeof *c->len);
    c->line = malloc(cap * sizeof *c->line);
    c->bytes = malloc((size_t)(c->end - c->start) / 4 * 3 + 4);
    c->bad_line = -1;
    if (!c->rank || !c->len || !c->line || !c->bytes) {
        c->oom = 1;
        return;
    }
    size_t used = 0;
    for (const char *p = c->start, *end = c->end; p < end;) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol) eol = end;
        size_t line = c->n_lines++;
        const char *q = eol;
        if (q > p && q[-1] == '\r') q--;
        if (q == p) {   // an empty line (the last one) carries nothing
            p = eol + 1;
            continue;
        }
        // "base64 rank": the rank's digits end the line, after a space (a space inside the
        // base64 part fails its decoding, so this is the first space of a valid line).
        const char *digits = q;
        while (digits > p && digits[-1] >= '0' && digits[-1] <= '9') digits--;
        long rank = 0, n = -1;
        for (const char *d = digits; d < q && rank < (1L << 30); d++) rank = rank * 10 + (*d - '0');
        const char *space = digits - 1;
        if (digits > p && digits < q && *space == ' ' && (size_t)(space - p) <= 4 * 1024 / 3)
            n = base64_decode(p, (size_t)(space - p), c->bytes + used);
        if (n <= 0 || rank >= (1L << 30)) {
            c->bad_line = (long)line;
            return;
        }
        c->rank[c->n] = (uint32_t)rank;
        c->len[c->n] = (uint32_t)n;
        c->line[c->n++] = (uint32_t)line;
        used += (size_t)n;
        p = eol + 1;
    }
}

// TeamFn: the chunks of RankLines in arg (team_run's n of them), shared out over the team.
static void read_rank_chunks(void *arg, Team *team, int thread)
{
    RankLines *chunks = arg;
    for (int k = thread; k < team->wanted; k += team->n) read_rank_lines(&chunks[k]);
}

ByteLevelBpe *bytelevel_load_tiktoken(const char *path, Err *err)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, base64_init);
    size_t len;
    char *text = read_file(path, &len, err);
    if (!text) return NULL;
    int threads = len >= (1 << 18) ? load_threads() : 1;
    RankLines *chunks = calloc((size_t)threads, sizeof *chunks);
    ByteLevelBpe *b = bytelevel_new(err);
    if (!b || !chunks) goto fail;
    b->use_ranks = 1;
    b->whole_piece_lookup = 1;
    // The lines, cut into a run per thread at line ends, decoded on all threads; then stored by
    // rank in the order of the lines, one thread: the same tokenizer, and the same first error.
    for (int k = 0; k < threads; k++) {
        const char *start = k ? chunks[k - 1].end : text, *end = text + len * (size_t)(k + 1) / (size_t)threads;
        if (end < start) end = start;
        if (k + 1 < threads) {
            const char *eol = memchr(end, '\n', (size_t)(text + len - end));
            end = eol ? eol + 1 : text + len;
        }
        chunks[k].start = start;
        chunks[k].end = k + 1 < threads ? end : text + len;
    }
    team_run(threads, read_rank_chunks, chunks);   // (a thread that did not start: its chunk is read by another)
    size_t n_tokens = 0, line = 1;   // (line: of the chunk's first)
    for (int k = 0; k < threads; k++) {
        if (chunks[k].oom) {
            err_set(err, "out of memory");
            goto fail;
        }
        n_tokens += chunks[k].n;
    }
    // Sized at once: ranks are 0, 1, 2, ... in the files there are.
    if (reserve_tokens(b, n_tokens < (1u << 30) ? (uint32_t)n_tokens : 1u << 30, err) < 0 ||
        reserve_blob(b, len / 4 * 3 + 4, err) < 0)
        goto fail;
    for (int k = 0; k < threads; k++) {
        const RankLines *c = &chunks[k];
        const uint8_t *bytes = c->bytes;
        for (size_t i = 0; i < c->n; i++) {
            uint32_t rank = c->rank[i];
            if (ensure_tokens(b, rank + 1, err) < 0) goto fail;
            if (b->tok[rank].len) {
                err_set(err, "%s:%zu: rank %u appears twice", path, line + c->line[i], rank);
                goto fail;
            }
            if (set_token_bytes(b, rank, bytes, c->len[i], err) < 0) goto fail;
            bytes += c->len[i];
        }
        if (c->bad_line >= 0) {
            err_set(err, "%s:%zu: not a tiktoken rank line (\"base64 rank\")", path, line + (size_t)c->bad_line);
            goto fail;
        }
        line += c->n_lines;
    }
    for (int k = 0; k < threads; k++) free(chunks[k].rank), free(chunks[k].len), free(chunks[k].line), free(chunks[k].bytes);
    free(chunks);
    chunks = NULL;
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
    uint32_t *merges = NULL;
    size_t n_merges = 0;
    int rc = build_rank_pairs(b, &merges, &n_merges, err) < 0 || find_whole_chars(b, merges, n_merges, err) < 0;
    free(merges);
    if (rc) goto fail;
    return b;
fail:
    for (int k = 0; chunks && k < threads; k++)
        free(chunks[k].rank), free(chunks[k].len), free(chunks[k].line), free(chunks[k].bytes);
    free(chunks);
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
    long na = bytelevel_string_to_bytes(a, alen, buf);
    if (na < 0) return -1;
    long nc = bytelevel_string_to_bytes(c, clen, buf + na);
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

// The merges, in rank order: (n, 3) left id, right id, result id.
static int insert_merges(ByteLevelBpe *b, const uint32_t *merges, size_t n, Err *err)
{
    uint32_t max_value = n > PAIR_FIELD_MAX ? UINT32_MAX : (uint32_t)n;
    for (size_t k = 0; k < 3 * n; k++)
        if (merges[k] > max_value) max_value = merges[k];
    b->merge_result = malloc((n ? n : 1) * sizeof *b->merge_result);
    if (!b->merge_result) return err_set(err, "out of memory");
    if (pair_table_alloc(&b->pairs, n, max_value, err) < 0) return -1;
    b->merges_follow_ranks = 1;
    for (size_t r = 0; r < n; r++) {
        const uint32_t *m = merges + 3 * r;
        if (r && m[2] < m[-1]) b->merges_follow_ranks = 0;   // m[-1]: the previous result
        b->merge_result[r] = m[2];
        pair_table_insert(&b->pairs, m[0], m[1], (uint32_t)r);
    }
    b->n_merges = (uint32_t)n;
    return 0;
}

// The merges from the tree; their ids (n, 3) in *out as read_merges_span gives them.
static int load_merges(ByteLevelBpe *b, const json_t *merges, const char *name, uint32_t **out, size_t *count, Err *err)
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
    *out = ids;
    *count = n;
    return insert_merges(b, ids, n, err);
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
    const char **merge_at;       // (n_merges) where each entry of model.merges starts
    size_t n_merges, merge_cap;
} ModelSpans;

static const uint8_t json_space[256] = {[' '] = 1, ['\n'] = 1, ['\t'] = 1, ['\r'] = 1};

static inline const char *skip_ws(const char *p, const char *end)
{
    // (pretty-printed files indent every entry: runs of 8 spaces at a time)
    while (end - p >= 8 && !memcmp(p, "        ", 8)) p += 8;
    while (p < end && json_space[(uint8_t)*p]) p++;
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

// The end of the run at p of string bytes that need no care (not '"', '\\' or below 0x20):
// 8 bytes at a time (a byte-wise loop was most of the time of the scan).
static inline const char *plain_run(const char *p, const char *end)
{
    const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
    while (end - p >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        uint64_t quote = v ^ (ones * '"'), slash = v ^ (ones * '\\');
        // A zero byte in quote or slash, or a byte below 0x20 in v: the high bit of such a byte
        // is set, and of no byte before the first such one (a borrow only moves up), so the
        // lowest set bit is the first byte that needs care (little-endian).
        uint64_t special = (((quote - ones) & ~quote) | ((slash - ones) & ~slash) | ((v - ones * 0x20) & ~v)) & highs;
        if (special) return p + (__builtin_ctzll(special) >> 3);
        p += 8;
    }
    while (p < end && *p != '"' && *p != '\\' && (unsigned char)*p >= 0x20) p++;
    return p;
}

// The JSON string whose opening quote is at p: its value into out (room for cap bytes, length
// in *len) unless out is NULL. Returns the position after the closing quote, or NULL for
// anything unusual (invalid, too long, a NUL, a lone surrogate). Raw bytes are copied as they
// are: the caller checks that they are valid UTF-8 (skipped strings are left to jansson).
static const char *scan_string(const char *p, const char *end, char *out, size_t cap, size_t *len)
{
    size_t n = 0;
    p++;
    for (;;) {
        const char *q = plain_run(p, end);
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
    if (out) *len = n;   // (not checked for valid UTF-8: the callers' conversion does)
    return p + 1;
}

// scan_string(p, end, NULL, 0, NULL), without its call for the plain strings most are.
static inline const char *skip_string(const char *p, const char *end)
{
    const char *q = plain_run(p + 1, end);
    if (q < end && *q == '"') return q + 1;
    return scan_string(p, end, NULL, 0, NULL);
}

// The bytes skip_value stops at inside an object or array: '"', '{', '[', '}', ']'.
static const uint8_t json_structural[256] = {['"'] = 1, ['{'] = 1, ['['] = 1, ['}'] = 1, [']'] = 1};

// End of the JSON value at p (not validated beyond strings and nesting: jansson reads the
// rest), or NULL.
static const char *skip_value(const char *p, const char *end)
{
    if (p >= end) return NULL;
    if (*p == '"') return skip_string(p, end);
    if (*p != '{' && *p != '[') {
        while (p < end && !strchr(",}] \t\r\n", *p)) p++;
        return p;
    }
    int depth = 0;
    while (p < end) {
        while (p < end && !json_structural[(uint8_t)*p]) p = skip_ws(p + 1, end);   // (numbers, commas, blanks)
        if (p >= end) break;
        if (*p == '"') {
            if (!(p = skip_string(p, end))) return NULL;
            continue;
        }
        if (*p == '{' || *p == '[') depth++;
        else if (--depth == 0) return p + 1;   // '}' or ']'
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
        const char *key = p + 1, *q = skip_string(p, end);
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

// skip_value for model.merges (p at its '['), noting where each entry starts in sp (so that
// read_merges_span can give the entries to threads); NULL also for an entry that is not a
// string or an array, and out of memory (then jansson's path reads the file).
static const char *skip_merges(const char *p, const char *end, ModelSpans *sp)
{
    if (sp->merge_at) return NULL;   // a second "merges"
    p = skip_ws(p + 1, end);
    if (p < end && *p == ']') return p + 1;
    for (;;) {
        if (sp->n_merges == sp->merge_cap) {
            sp->merge_cap = sp->merge_cap ? 2 * sp->merge_cap : 1 << 16;
            const char **bigger = realloc(sp->merge_at, sp->merge_cap * sizeof *bigger);
            if (!bigger) return NULL;
            sp->merge_at = bigger;
        }
        sp->merge_at[sp->n_merges++] = p;
        if (p >= end || (*p != '"' && *p != '[') || !(p = skip_value(p, end))) return NULL;
        p = skip_ws(p, end);
        if (p < end && *p == ']') return p + 1;
        if (p >= end || *p != ',') return NULL;
        p = skip_ws(p + 1, end);
    }
}

static const char *model_member(const char *key, size_t key_len, const char *value, const char *end, ModelSpans *sp)
{
    int merges = key_is(key, key_len, "merges") && *value == '[';
    const char *after = merges ? skip_merges(value, end, sp) : skip_value(value, end);
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
        long n = klen ? bytelevel_string_to_bytes(key, klen, buf) : -1;
        if (n < 0 && utf8_valid_prefix(key, klen) != klen) return -1;   // (scan_string does not check)
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

// One entry of model.merges at p ("a b" or ["a", "b"]): its ids in ids[0..2] (ids[2]: the
// result; *merged: the guess of merge_part_ids). Returns the end of the entry, NULL when unusual.
static const char *read_merge(const ByteLevelBpe *b, const char *p, const char *end, uint32_t *ids, uint32_t *merged)
{
    char s1[2048], s2[2048];
    const char *a = s1, *c;
    size_t alen, clen;
    if (p < end && *p == '"') {
        if (!(p = scan_string(p, end, s1, sizeof s1, &alen))) return NULL;
        const char *space = memchr(s1, ' ', alen);
        if (!space || memchr(space + 1, ' ', alen - (size_t)(space + 1 - s1))) return NULL;
        c = space + 1;
        clen = alen - (size_t)(c - s1);
        alen = (size_t)(space - s1);
    } else if (p < end && *p == '[') {
        p = skip_ws(p + 1, end);
        if (p >= end || *p != '"' || !(p = scan_string(p, end, s1, sizeof s1, &alen))) return NULL;
        p = skip_ws(p, end);
        if (p >= end || *p != ',') return NULL;
        p = skip_ws(p + 1, end);
        if (p >= end || *p != '"' || !(p = scan_string(p, end, s2, sizeof s2, &clen))) return NULL;
        p = skip_ws(p, end);
        if (p >= end || *p != ']') return NULL;
        p++;
        c = s2;
    } else
        return NULL;
    if (merge_part_ids(b, a, alen, c, clen, &ids[0], &ids[1], merged) < 0) return NULL;
    ids[2] = *merged;
    return p;
}

typedef struct {
    const ByteLevelBpe *b;
    const ModelSpans *sp;
    uint32_t *ids;               // (n_merges, 3)
    int bad;                     // an entry was unusual
} MergesWork;

// TeamFn: this thread's share of the merges.
static void read_merges_share(void *arg, Team *team, int thread)
{
    MergesWork *w = arg;
    const char *end = w->sp->merges + w->sp->merges_len;
    size_t lo, hi;
    uint32_t merged = 0;
    team_share(team, thread, w->sp->n_merges, &lo, &hi);
    for (size_t r = lo; r < hi; r++)
        if (!read_merge(w->b, w->sp->merge_at[r], end, &w->ids[3 * r], &merged)) {
            __atomic_store_n(&w->bad, 1, __ATOMIC_RELAXED);
            return;
        }
}

// model.merges from its text, its entries found by skip_merges: (n, 3) ids in *out. 0, -1 when
// unusual, -2 out of memory. The entries on all threads: converting their strings and looking
// up their three tokens is most of the time of the load (each thread's guess of the result
// starts from 0: it only spares lookups).
static int read_merges_span(const ByteLevelBpe *b, const ModelSpans *sp, uint32_t **out, size_t *count)
{
    size_t n = sp->n_merges;
    uint32_t *ids = malloc((n ? n : 1) * 3 * sizeof *ids);
    if (!ids) return -2;
    MergesWork w = {b, sp, ids, 0};
    team_run(n >= 8192 ? load_threads() : 1, read_merges_share, &w);
    int bad = w.bad;
    if (bad) {
        free(ids);
        return -1;
    }
    *out = ids;
    *count = n;
    return 0;
}

static ByteLevelBpe *load_json_model(const json_t *root, const ModelSpans *spans, const char *name, int *unusual,
                                     Err *err);

ByteLevelBpe *bytelevel_load_json_text(const char *text, size_t len, const char *name, int *fallback, Err *err)
{
    *fallback = 1;
    ModelSpans sp = {0};
    const char *end = scan_object(text, text + len, top_member, &sp);
    char *skeleton = NULL;
    ByteLevelBpe *b = NULL;
    if (!end || skip_ws(end, text + len) != text + len || !sp.vocab || !sp.merges) goto done;
    // The text with the two values emptied, for jansson.
    if (!(skeleton = malloc(len + 1))) goto done;
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
    if (root && bytelevel_json_is_bytelevel(root)) {
        int unusual = 0;
        b = load_json_model(root, &sp, name, &unusual, err);
        if (!b && !unusual) *fallback = 0;   // an error jansson's path would report the same way
    }
    json_decref(root);
done:
    free(skeleton);
    free(sp.merge_at);
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
    uint32_t *ids = NULL;   // (n, 3) left, right, result of each merge, in rank order
    size_t n = 0;
    if (spans) {
        int rc = read_merges_span(b, spans, &ids, &n);
        if (rc == -1) *unusual = 1;
        if (rc == -2) err_set(err, "out of memory");
        if (rc < 0 || insert_merges(b, ids, n, err) < 0) {
            free(ids);
            goto fail;
        }
    } else if (load_merges(b, merges, name, &ids, &n, err) < 0) {
        free(ids);
        goto fail;
    }
    int rc = find_whole_chars(b, ids, n, err);
    free(ids);
    if (rc < 0) goto fail;
    read_post_processor(b, json_object_get(root, "post_processor"));
    return b;
fail:
    bytelevel_free(b);
    return NULL;
}

// ---- merging -----------------------------------------------------------------------------

static inline int is_pure(const ByteLevelBpe *b, uint32_t id) { return b->is_pure[id >> 3] >> (id & 7) & 1; }

// Bits 46-63 of a multiplicative hash of the pair.
static inline uint32_t pure_filter_bit(uint32_t left, uint32_t right)
{
    return (uint32_t)((((uint64_t)left << 32 | right) * 0x9E3779B97F4A7C15ull) >> 46) & (PURE_FILTER_BITS - 1);
}

// tiktoken's rule itself, for the plain merge (tests check the pair table against it): the
// rank of a pair is the token of the two parts' concatenation, NO_RANK when that is no token.
static __attribute__((noinline)) uint32_t concat_rank(const ByteLevelBpe *b, uint32_t left, uint32_t right)
{
    const Span *l = &b->tok[left], *r = &b->tok[right];
    if (l->len + r->len <= 8)   // (both len >= 1: the shift is at most 56)
        return vocab_find_head(b, l->head | r->head << (8 * l->len), l->len + r->len);
    char both[512];
    if (l->len + r->len > b->max_token_len || l->len + r->len > sizeof both) return NO_RANK;
    memcpy(both, b->blob + l->off, l->len);
    memcpy(both + l->len, b->blob + r->off, r->len);
    return vocab_find(b, both, l->len + r->len);
}

// Rank of merging two adjacent parts (tokens left, right); NO_RANK when they do not merge (the
// token made: merge_result). plain: by the definition (tiktoken: concat_rank) and without the
// pure-pair table; tests compare the two. Inline: it runs for every pair of adjacent parts.
static inline __attribute__((always_inline)) uint32_t pair_rank(const ByteLevelBpe *b, int plain, uint32_t left,
                                                                uint32_t right)
{
    if (!plain && b->is_pure && is_pure(b, left) && is_pure(b, right)) {
        uint32_t bit = pure_filter_bit(left, right);
        if (!(b->pure_filter[bit >> 6] >> (bit & 63) & 1)) return NO_RANK;
        return pair_lookup(&b->pure_pairs, left, right);
    }
    if (plain && b->use_ranks) return concat_rank(b, left, right);
    return pair_lookup(&b->pairs, left, right);
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
    uint32_t rank[SCAN_MAX_PARTS];
    for (size_t i = 0; i + 1 < m; i++) rank[i] = pair_rank(b, ts->plain, id[i], id[i + 1]);
    while (m > 1) {
        size_t best = 0;
        uint32_t best_rank = NO_RANK;
        for (size_t i = 0; i + 1 < m; i++)
            if (rank[i] < best_rank) {
                best_rank = rank[i];
                best = i;
            }
        if (best_rank == NO_RANK) break;
        id[best] = merge_result(b, best_rank);
        // Drop part best + 1.
        memmove(start + best + 1, start + best + 2, (m - best - 1) * sizeof *start);
        memmove(id + best + 1, id + best + 2, (m - best - 2) * sizeof *id);
        memmove(rank + best + 1, rank + best + 2, (m - best - 2) * sizeof *rank);
        m--;
        if (best + 1 < m) rank[best] = pair_rank(b, ts->plain, id[best], id[best + 1]);
        if (best > 0) rank[best - 1] = pair_rank(b, ts->plain, id[best - 1], id[best]);
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
        Candidate c_ = {pair_rank(b, ts->plain, id[l_], id[r_]), l_, id[l_], id[r_]};          \
        if (c_.rank != NO_RANK && heap_push(ts, &heap_n, c_) < 0) return -1;                   \
    } while (0)
    for (uint32_t i = first; next[i] != NO_ID; i = next[i]) PUSH_PAIR(i);
    while (heap_n) {
        Candidate c = heap_pop(ts, &heap_n);
        uint32_t l = c.pos, r = next[l];
        if (id[l] != c.left_id || r == NO_ID || id[r] != c.right_id || prev[l] == l) continue;
        id[l] = merge_result(b, c.rank);
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

// The filter bit of a pair of code points (the top bits of a multiplicative hash).
static inline uint32_t bigram_bit(uint32_t c1, uint32_t c2)
{
    return (uint32_t)((((uint64_t)c1 << 21 | c2) * 0x9E3779B97F4A7C15ull) >> 43) & (BIGRAM_FILTER_BITS - 1);
}

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
// result. The entries of the pair table whose two sides are pure (about 10K for Llama 3) are
// copied into a small table with a 32 KB filter: CJK text is long pieces of such parts, most of
// their pairs do not merge, and the filter says so from L1 instead of the 2 MiB table.

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

// merges: (n_merges, 3) left, right, x in rank order; the rank is x for tiktoken (the token)
// and the row for tokenizer.json. The same pairs as the entries of b->pairs, without a pass over
// its 2-4 MiB of slots; a repeated pair keeps its first (lowest) rank, as there.
static int build_pure_pairs(ByteLevelBpe *b, const uint32_t *merges, size_t n_merges, Err *err)
{
    b->is_pure = calloc(b->n_tokens / 8 + 1, 1);
    b->pure_filter = calloc(PURE_FILTER_BITS / 64, sizeof *b->pure_filter);
    if (!b->is_pure || !b->pure_filter) return err_set(err, "out of memory");
    for (uint32_t id = 0; id < b->n_tokens; id++) {
        const uint8_t *t = (const uint8_t *)b->blob + b->tok[id].off;
        // (ASCII tokens, most of them, fail on their first byte)
        if (!b->is_special[id] && b->tok[id].len && t[0] >= 0xC0 && token_is_pure(t, b->tok[id].len))
            b->is_pure[id >> 3] |= (uint8_t)(1u << (id & 7));
    }
    size_t n_pairs = 0;
    for (size_t r = 0; r < n_merges; r++)
        if (is_pure(b, merges[3 * r]) && is_pure(b, merges[3 * r + 1])) n_pairs++;
    if (pair_table_alloc(&b->pure_pairs, n_pairs, b->pairs.narrow ? 0 : UINT32_MAX, err) < 0) return -1;
    for (size_t r = 0; r < n_merges; r++) {
        uint32_t left = merges[3 * r], right = merges[3 * r + 1];
        if (!is_pure(b, left) || !is_pure(b, right)) continue;
        pair_table_insert(&b->pure_pairs, left, right, b->use_ranks ? merges[3 * r + 2] : (uint32_t)r);
        uint32_t bit = pure_filter_bit(left, right);
        b->pure_filter[bit >> 6] |= 1ull << (bit & 63);
    }
    return 0;
}

// ---- the pair table of a tiktoken file -------------------------------------------------------
// tiktoken merges two adjacent parts when their concatenation is a token, lowest token first.
// Every part that exists during a merge is a token T whose own bytes merge to T alone, by the
// same merges in the same order (the merges inside T never involve its neighbours, and each one
// was the lowest, leftmost pair, so it also is among T's pairs alone); in particular T is always
// made from the same pair, the two parts left just before the last merge of T's bytes alone.
// So a pair whose concatenation is a token T but which is not T's pair never merges: it never
// is the lowest pair (if it were, T would be made from it), and leaving it out changes no
// choice. The table holds, for each token T that its own bytes merge to, T's pair -> T, and
// answers every pair with one probe, no bytes hashed. Built by length, so that merging T's bytes
// finds the pairs of all shorter tokens: T's pair is what is left when no shorter merge applies
// (two parts; more: T is never made).
//
// Tokens of one length do not depend on each other (their merges only use the pairs of shorter
// tokens), so the tokens of a length merge on the load's threads, each into its own slot of
// pair_left/right; the pairs go into the table after the whole length, one thread, in the order
// of the tokens, so the table is the same slot for slot whatever the number of threads.
// Llama 3: 128K tokens, 575K merge steps, 105M instructions, ~28 ms on one core of the dev VM,
// about half of it waiting for the probes of the 2 MiB table.
// Tried and dropped: 16 tokens merging in turns on one thread, the probe of each step
// prefetched for the next turn (no gain: the prefetches stalled as the loads had); the table on
// 2 MiB pages (MADV_HUGEPAGE: -10% here, but with THP defrag=madvise a fault may compact
// memory for milliseconds).

// The pair of token (bytes, len >= 3): its bytes merged as merge_scan does, stopping at two
// parts, in *left, *right; NO_ID when they stop at more. id, rank: room for len entries.
static void token_pair(const ByteLevelBpe *b, const PairTable *pairs, const uint32_t *byte_pair, const uint8_t *bytes,
                       uint32_t len, uint32_t *id, uint32_t *rank, uint32_t *left, uint32_t *right)
{
    uint32_t m = len;
    for (uint32_t i = 0; i < m; i++) id[i] = b->byte_id[bytes[i]];
    for (uint32_t i = 0; i + 1 < m; i++) rank[i] = byte_pair[bytes[i] << 8 | bytes[i + 1]];
    *left = *right = NO_ID;
    while (m > 2) {
        uint32_t best = 0, best_rank = NO_RANK;
        for (uint32_t i = 0; i + 1 < m; i++)
            if (rank[i] < best_rank) {
                best_rank = rank[i];
                best = i;
            }
        if (best_rank == NO_RANK) return;
        id[best] = best_rank;
        for (uint32_t i = best + 1; i + 1 < m; i++) id[i] = id[i + 1];   // parts after the pair, one to the left
        for (uint32_t i = best + 1; i + 2 < m; i++) rank[i] = rank[i + 1];
        m--;
        if (best + 1 < m) rank[best] = pair_lookup(pairs, id[best], id[best + 1]);
        if (best > 0) rank[best - 1] = pair_lookup(pairs, id[best - 1], id[best]);
    }
    *left = id[0];
    *right = id[1];
}

typedef struct {
    ByteLevelBpe *b;
    const uint32_t *order;       // (n) ordinary tokens by length
    const uint32_t *end_of;      // (max_len + 2) end_of[len]: where the tokens of len end in order
    uint32_t *byte_pair;         // (65536) two bytes -> their token
    uint32_t *pair_left, *pair_right;   // (n) the pair of order[k]
    uint32_t *scratch;           // (threads, 2, max_len + 1) id and rank of each thread
    size_t n;
} RankBuild;

// The pairs of order[lo, hi) (tokens of len >= 2 bytes) that fall to this thread.
static void rank_build_range(RankBuild *w, int thread, size_t lo, size_t hi, uint32_t len)
{
    const ByteLevelBpe *b = w->b;
    uint32_t *id = w->scratch + (size_t)thread * 2 * (b->max_token_len + 1), *rank = id + b->max_token_len + 1;
    for (size_t k = lo; k < hi; k++) {
        const uint8_t *bytes = (const uint8_t *)b->blob + b->tok[w->order[k]].off;
        if (len > 2) {
            token_pair(b, &b->pairs, w->byte_pair, bytes, len, id, rank, &w->pair_left[k], &w->pair_right[k]);
            continue;
        }
        w->pair_left[k] = b->byte_id[bytes[0]];
        w->pair_right[k] = b->byte_id[bytes[1]];
        w->byte_pair[bytes[0] << 8 | bytes[1]] = w->order[k];
    }
}

// TeamFn: lengths in turn. A length of many tokens is shared out (between two barriers: its
// merges read the pairs of the shorter ones, all in the table); the others, and every insert,
// are thread 0's, in the order of the tokens.
static void rank_build_share(void *arg, Team *team, int thread)
{
    RankBuild *w = arg;
    for (size_t lo = 0; lo < w->n;) {
        uint32_t len = w->b->tok[w->order[lo]].len;
        size_t hi = w->end_of[len];
        int shared = len > 2 && hi - lo >= 1024 && team->n > 1;
        if (shared) {
            size_t a, z;
            team_barrier(team);   // (thread 0's inserts so far are done)
            team_share(team, thread, hi - lo, &a, &z);
            rank_build_range(w, thread, lo + a, lo + z, len);
            team_barrier(team);
        }
        if (thread == 0) {
            if (!shared) rank_build_range(w, 0, lo, hi, len);
            for (size_t k = lo; k < hi; k++)
                if (w->pair_left[k] != NO_ID) pair_table_insert(&w->b->pairs, w->pair_left[k], w->pair_right[k], w->order[k]);
        }
        lo = hi;
    }
}

// Builds b->pairs; *merges (n_merges, 3): left, right, token of each pair, by token.
static int build_rank_pairs(ByteLevelBpe *b, uint32_t **merges, size_t *n_merges, Err *err)
{
    uint32_t max_len = b->max_token_len, n_tokens = b->n_tokens;
    int threads = load_threads();
    uint32_t *first = calloc((size_t)max_len + 2, sizeof *first), *order = NULL, *scratch = NULL;
    uint32_t *pair_left = NULL, *pair_right = NULL;
    uint32_t *byte_pair = malloc(65536 * sizeof *byte_pair);   // the first pairs of a token: two bytes -> token
    int rc = -1;
    *merges = NULL;
    *n_merges = 0;
    if (!first || !byte_pair) goto oom;
    memset(byte_pair, 0xFF, 65536 * sizeof *byte_pair);   // NO_RANK
    // Ordinary tokens of >= 2 bytes (the first id of duplicates) by length: order[first[len]...].
    size_t n = 0;
    for (uint32_t t = 0; t < n_tokens; t++) {
        uint32_t len = b->tok[t].len;
        if (len < 2 || b->is_special[t]) continue;
        if (b->n_duplicates && vocab_find(b, b->blob + b->tok[t].off, len) != t) continue;
        first[len + 1]++;
        n++;
    }
    for (uint32_t len = 1; len <= max_len + 1; len++) first[len] += first[len - 1];
    order = malloc((n ? n : 1) * sizeof *order);
    pair_left = malloc((n ? n : 1) * sizeof *pair_left);   // by position in order
    pair_right = malloc((n ? n : 1) * sizeof *pair_right);
    scratch = malloc((size_t)threads * 2 * ((size_t)max_len + 1) * sizeof *scratch);   // id, rank of each thread
    if (!order || !pair_left || !pair_right || !scratch) goto oom;
    for (uint32_t t = 0; t < n_tokens; t++) {
        uint32_t len = b->tok[t].len;
        if (len < 2 || b->is_special[t]) continue;
        if (b->n_duplicates && vocab_find(b, b->blob + b->tok[t].off, len) != t) continue;
        order[first[len]++] = t;   // (first[len] ends as the start of len + 1)
    }
    if (pair_table_alloc(&b->pairs, n, n_tokens, err) < 0) goto done;
    RankBuild w = {b, order, first, byte_pair, pair_left, pair_right, scratch, n};
    team_run(threads, rank_build_share, &w);
    // The pairs by token (rank order) for build_pure_pairs.
    size_t n_pairs = 0;
    for (size_t k = 0; k < n; k++) n_pairs += pair_left[k] != NO_ID;
    uint32_t *by_token = malloc((size_t)n_tokens * 2 * sizeof *by_token);
    *merges = malloc((n_pairs ? n_pairs : 1) * 3 * sizeof **merges);
    if (!by_token || !*merges) {
        free(by_token);
        goto oom;
    }
    memset(by_token, 0xFF, (size_t)n_tokens * 2 * sizeof *by_token);
    for (size_t k = 0; k < n; k++) {
        by_token[2 * order[k]] = pair_left[k];
        by_token[2 * order[k] + 1] = pair_right[k];
    }
    for (uint32_t t = 0; t < n_tokens; t++)
        if (by_token[2 * t] != NO_ID) {
            uint32_t *row = *merges + 3 * *n_merges;
            row[0] = by_token[2 * t], row[1] = by_token[2 * t + 1], row[2] = t;
            ++*n_merges;
        }
    free(by_token);
    rc = 0;
    goto done;
oom:
    err_set(err, "out of memory");
done:
    free(first);
    free(byte_pair);
    free(order);
    free(pair_left);
    free(pair_right);
    free(scratch);
    return rc;
}

typedef struct {
    const ByteLevelBpe *b;
    uint64_t *bigram;            // (threads, BIGRAM_FILTER_BITS / 64) a filter per thread
    uint32_t *non_ascii;         // (n) ranks of the results with a byte >= 0x80, each thread's from start[thread]
    size_t start[LOAD_THREADS_MAX], n_non_ascii[LOAD_THREADS_MAX];
    size_t n;                    // merge results (by rank)
    int threads;                 // the team's (set by its thread 0)
} CharPairsWork;

// TeamFn: for this thread's share of the merge results, the pairs of adjacent characters in its
// filter, and the results that are not all ASCII in its part of non_ascii.
static void char_pairs_share(void *arg, Team *team, int thread)
{
    CharPairsWork *w = arg;
    const ByteLevelBpe *b = w->b;
    uint64_t *filter = w->bigram + (size_t)thread * BIGRAM_FILTER_BITS / 64;
    size_t lo, hi, m = 0;
    team_share(team, thread, w->n, &lo, &hi);
    if (thread == 0) w->threads = team->n;
    w->start[thread] = lo;
    for (size_t i = lo; i < hi; i++) {
        uint32_t id = merge_result(b, (uint32_t)i);
        if (b->is_special[id]) continue;
        const uint8_t *t = (const uint8_t *)b->blob + b->tok[id].off;
        uint32_t len = b->tok[id].len, k;
        if (len < 2) continue;
        uint8_t high = 0;   // all ASCII (most results): no boundary crossings, bytes are characters
        for (k = 0; k < len; k++) high |= t[k];
        if (high < 0x80) {
            for (k = 1; k < len; k++) {
                uint32_t bit = bigram_bit(t[k - 1], t[k]);
                filter[bit >> 6] |= 1ull << (bit & 63);
            }
            continue;
        }
        w->non_ascii[lo + m++] = (uint32_t)i;
        // Its complete characters after any leading continuation bytes, pair by pair (a result
        // that is not a piece of valid UTF-8 never appears in text: its pairs after the fault
        // do not matter).
        for (k = 0; k < len && (t[k] & 0xC0) == 0x80; k++) continue;
        uint32_t prev = NO_ID;
        while (k < len) {
            uint32_t n = t[k] < 0x80 ? 1 : t[k] < 0xC0 ? 0 : t[k] < 0xE0 ? 2 : t[k] < 0xF0 ? 3 : t[k] < 0xF8 ? 4 : 0;
            if (!n || k + n > len) break;
            uint32_t j = 1, cp;
            while (j < n && (t[k + j] & 0xC0) == 0x80) j++;
            if (j < n) break;
            utf8_decode(t + k, &cp);
            if (prev != NO_ID) {
                uint32_t bit = bigram_bit(prev, cp);
                filter[bit >> 6] |= 1ull << (bit & 63);
            }
            prev = cp;
            k += n;
        }
    }
    w->n_non_ascii[thread] = m;
}

// merges: as build_pure_pairs takes them.
static int find_whole_chars(ByteLevelBpe *b, const uint32_t *merges, size_t n_merges, Err *err)
{
    if (build_pure_pairs(b, merges, n_merges, err) < 0) return -1;
    b->chars = malloc(65536 * sizeof *b->chars);
    b->left_rank = malloc(65536 * sizeof *b->left_rank);
    b->right_rank = malloc(65536 * sizeof *b->right_rank);
    b->bigram_filter = calloc(BIGRAM_FILTER_BITS / 64, sizeof *b->bigram_filter);
    b->no_partial = calloc(65536 / 64, sizeof *b->no_partial);
    if (!b->chars || !b->left_rank || !b->right_rank || !b->bigram_filter || !b->no_partial)
        return err_set(err, "out of memory");
    memset(b->left_rank, 0xFF, 65536 * sizeof *b->left_rank);   // NO_RANK
    memset(b->right_rank, 0xFF, 65536 * sizeof *b->right_rank);
    // Every merge result: tiktoken's are tokens (rank = id; all of them, a superset of those
    // the pair table makes, which only makes the bounds lower), tokenizer.json's are the merges
    // list's (a repeated merge adds nothing). The pairs of characters on all threads, each into
    // its own filter; then the boundary crossings of the results that are not all ASCII.
    size_t n = b->use_ranks ? b->n_tokens : b->n_merges;
    int threads = n >= 16384 ? load_threads() : 1;
    CharPairsWork w = {b, calloc((size_t)threads * BIGRAM_FILTER_BITS / 64, sizeof *w.bigram),
                       malloc((n ? n : 1) * sizeof *w.non_ascii), {0}, {0}, n, 1};
    if (!w.bigram || !w.non_ascii) {
        free(w.bigram);
        free(w.non_ascii);
        return err_set(err, "out of memory");
    }
    team_run(threads, char_pairs_share, &w);
    for (int k = 0; k < w.threads; k++)
        for (size_t i = 0; i < BIGRAM_FILTER_BITS / 64; i++) b->bigram_filter[i] |= w.bigram[(size_t)k * BIGRAM_FILTER_BITS / 64 + i];
    for (int k = 0; k < w.threads; k++)
        for (size_t j = 0; j < w.n_non_ascii[k]; j++) {
            uint32_t rank = w.non_ascii[w.start[k] + j], id = merge_result(b, rank), len = b->tok[id].len, at;
            const uint8_t *t = (const uint8_t *)b->blob + b->tok[id].off;
            // Ends in an incomplete character after a byte: a left-boundary crossing.
            for (at = len; at > 0 && (t[at - 1] & 0xC0) == 0x80; at--) continue;
            if (at >= 2 && t[at - 1] >= 0xC0 && len - (at - 1) < utf8_length(t[at - 1]))
                lower(&b->left_rank[t[at - 2] << 8 | t[at - 1]], rank);
            // Starts with continuation bytes, then a byte: a right-boundary crossing.
            for (at = 0; at < len && (t[at] & 0xC0) == 0x80; at++) continue;
            if (at >= 1 && at < len) lower(&b->right_rank[t[at - 1] << 8 | t[at]], rank);
        }
    free(w.bigram);
    free(w.non_ascii);
    for (uint32_t xy = 0; xy < 65536; xy++)
        if (b->left_rank[xy] == NO_RANK && b->right_rank[xy] == NO_RANK) b->no_partial[xy >> 6] |= 1ull << (xy & 63);
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
            uint32_t best_rank = NO_RANK;
            size_t best = 0;
            for (size_t i = 0; i + 1 < m; i++) {
                uint32_t r = pair_rank(b, 0, id[i], id[i + 1]);
                if (r < best_rank) {
                    best_rank = r;
                    best = i;
                }
            }
            if (best_rank == NO_RANK) break;
            if (best_rank > highest) highest = best_rank;
            id[best] = merge_result(b, best_rank);
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
    // The fixed tables (384 KiB) in one mapping, populated at once: lookups hit them all over,
    // and a page fault on first touch of each of their ~100 pages costs more than this.
    size_t key_len = CACHE_SLOTS * sizeof *ts->cache_key, at_len = CACHE_SLOTS * sizeof *ts->cache_at;
    ts->tables_len = key_len + at_len;
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
    ts->cache_key = (uint64_t *)tables;
    ts->cache_at = (uint32_t *)(tables + key_len);
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

// The cache slot of a piece with hash h (the low bits picked the vocabulary slot).
static inline size_t cache_slot(uint64_t h) { return (size_t)(h >> 20) & (CACHE_SLOTS - 1); }

// The cached entry of piece (len <= CACHE_MAX_PIECE, hash h), or NULL.
static inline const CacheEntry *cache_find(const ThreadState *ts, const uint8_t *piece, size_t len, uint64_t h)
{
    size_t slot = cache_slot(h);
    if (ts->cache_key[slot] != (h | 1)) return NULL;
    const CacheEntry *e = (const CacheEntry *)(ts->cache_arena + ts->cache_at[slot]);
    return e->len == len && same_bytes((const uint32_t *)(e + 1) + e->n_ids, piece, len) ? e : NULL;
}

static inline int output_cached(const ByteLevelBpe *b, Output *o, const CacheEntry *e, size_t at)
{
    return output_tokens(b, o, (const uint32_t *)(e + 1), e->n_ids, at);
}

// BPE of a piece not in the cache (h: its hash when len <= CACHE_MAX_PIECE), cached.
static int merge_and_cache(const ByteLevelBpe *b, ThreadState *ts, const uint8_t *piece, size_t len, uint64_t h,
                           size_t at, Output *o)
{
    if (grow_work(ts, len) < 0) return -1;
    uint32_t *ids = ts->piece_ids;
    long count = merge_piece(b, ts, piece, len, -1, ids);
    if (count < 0 || output_tokens(b, o, ids, (size_t)count, at) < 0) return -1;
    if (len <= CACHE_MAX_PIECE) cache_insert(ts, cache_slot(h), h | 1, piece, len, ids, (size_t)count);
    return 0;
}

// One token starting at byte offset at.
static inline int output_one(Output *o, uint32_t id, size_t at)
{
    if (o->n == *o->cap && output_reserve(o, 1) < 0) return -1;
    (*o->ids)[o->n] = id;
    if (o->offsets) (*o->offsets)[o->n] = (uint32_t)at;
    o->n++;
    return 0;
}

// ---- segments ------------------------------------------------------------------------------
// A piece may be cut between two characters c1 and c2 when no merge result can span that
// boundary: then no pair across it ever merges, and BPE of the piece is BPE of the two sides
// apart (each side's merges are the lowest, leftmost of its own pairs). A result spanning the
// boundary either holds c1 and c2 whole, one after the other (the bigram filter, built from
// every merge result's characters at load), or starts inside c1 (continuation bytes, c1's last
// byte x, then c2's first byte y: right_rank[x y] is set) or ends inside c2 (x, then c2's lead
// byte y starting an incomplete character: left_rank[x y] is set); no_partial says neither.
// In Chinese most pairs of characters are in no token, so a long piece of new text falls into
// words of a few characters: a word that is one character is its token (chars), the others
// repeat, and the cache finds them on a first pass where the whole piece is new.

// One segment of n bytes (cp: its character when it is one, else NO_ID): a byte or a whole
// character as its token, others through the cache.
static int encode_segment(const ByteLevelBpe *b, ThreadState *ts, const uint8_t *seg, size_t n, uint32_t cp, size_t at,
                          Output *o)
{
    if (n == 1) return output_one(o, b->byte_id[seg[0]], at);
    uint32_t token = cp != NO_ID && n <= 3 ? b->chars[cp].token : NO_ID;   // (n <= 3: cp < 65536)
    if (token != NO_ID) return output_one(o, token, at);
    uint64_t h = n <= CACHE_MAX_PIECE ? hash_bytes(seg, n) : 0;
    const CacheEntry *e = n <= CACHE_MAX_PIECE ? cache_find(ts, seg, n, h) : NULL;
    return e ? output_cached(b, o, e, at) : merge_and_cache(b, ts, seg, n, h, at, o);
}

// The piece segment by segment, cut where no merge result spans the boundary (see above):
// 1, or 0 when it has no cut (nothing output), -1 out of memory.
static int encode_segments(const ByteLevelBpe *b, ThreadState *ts, const uint8_t *piece, size_t len, size_t at,
                           Output *o)
{
    uint32_t prev, cp;
    size_t start = 0, i = utf8_decode(piece, &prev);
    uint32_t start_cp = prev;   // the segment's character while it has one, else NO_ID
    while (i < len) {
        size_t n = utf8_decode(piece + i, &cp);
        uint32_t xy = (uint32_t)piece[i - 1] << 8 | piece[i], bit = bigram_bit(prev, cp);
        if ((b->no_partial[xy >> 6] >> (xy & 63) & 1) && !(b->bigram_filter[bit >> 6] >> (bit & 63) & 1)) {
            if (encode_segment(b, ts, piece + start, i - start, start_cp, at + start, o) < 0) return -1;
            start = i;
            start_cp = cp;
        } else {
            start_cp = NO_ID;
        }
        prev = cp;
        i += n;
    }
    if (!start) return 0;
    return encode_segment(b, ts, piece + start, len - start, start_cp, at + start, o) < 0 ? -1 : 1;
}

// A piece that is neither a token nor cached (h: its hash when len <= CACHE_MAX_PIECE): cut
// into segments, or else merged whole and cached. A piece that was cut is not cached itself,
// its segments are: long Chinese pieces seldom repeat, and caching them too filled the arena
// (cold zh +13%, warm mixed 115 -> 130 MB/s without them). Out of line: it needs many
// registers, and encode_piece, which runs for every piece, would save them all on each call.
static __attribute__((noinline)) int encode_new_piece(const ByteLevelBpe *b, ThreadState *ts, const uint8_t *piece,
                                                      size_t len, uint64_t h, size_t at, Output *o)
{
    if (len >= 4 && b->bigram_filter) {
        int rc = encode_segments(b, ts, piece, len, at, o);
        if (rc != 0) return rc < 0 ? -1 : 0;
    }
    return merge_and_cache(b, ts, piece, len, h, at, o);
}

// Every piece: a byte, a token (whole-piece lookup), a cached piece, or a new one. Inlined into
// the loop over pieces: as a call it saved and restored registers for each piece.
static inline __attribute__((always_inline)) int encode_piece(const ByteLevelBpe *b, ThreadState *ts,
                                                              const uint8_t *piece, size_t len, size_t at, Output *o)
{
    if (len == 1) return output_one(o, b->byte_id[piece[0]], at);
    uint64_t h = len <= CACHE_MAX_PIECE || len <= b->max_token_len ? hash_bytes(piece, len) : 0;
    if (b->whole_piece_lookup && len <= b->max_token_len && (len <= 8 || vocab_maybe(b, h))) {
        uint32_t id = vocab_find_hashed(b, piece, len, h);
        if (id != NO_ID) return output_one(o, id, at);
    }
    if (len <= CACHE_MAX_PIECE) {
        const CacheEntry *e = cache_find(ts, piece, len, h);
        if (e) return output_cached(b, o, e, at);
    }
    return encode_new_piece(b, ts, piece, len, h, at, o);
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

// The merges of a tokenizer.json into a fingerprint, as the first version did: entries {left
// << 32 | right, rank + 1} in the slot order of its pair table (2^k >= 2 * n_merges slots, at
// least 1024, pair_slot, linear probing, filled in rank order), so that fingerprints stay the
// same. -1 out of memory.
static int fingerprint_merges(const ByteLevelBpe *b, XXH3_state_t *st)
{
    uint32_t cap = 1024;
    while (cap < 2 * (size_t)b->n_merges) cap <<= 1;
    uint64_t *by_rank = calloc(b->n_merges ? b->n_merges : 1, sizeof *by_rank);
    uint64_t (*slots)[2] = calloc(cap, sizeof *slots);
    if (!by_rank || !slots) {
        free(by_rank);
        free(slots);
        return -1;
    }
    uint32_t left, right, rank;
    for (uint32_t i = 0; i <= b->pairs.mask; i++)   // (each pair once, at its lowest rank)
        if (pair_table_entry(&b->pairs, i, &left, &right, &rank))
            by_rank[rank] = (uint64_t)left << 32 | right | 1ull << 63;
    for (uint32_t r = 0; r < b->n_merges; r++) {
        if (!by_rank[r]) continue;
        uint64_t key = by_rank[r] & ~(1ull << 63);
        uint32_t i = pair_slot(key, cap - 1);
        while (slots[i][1]) i = (i + 1) & (cap - 1);
        slots[i][0] = key;
        slots[i][1] = r + 1;
    }
    for (uint32_t i = 0; i < cap; i++)
        if (slots[i][1]) XXH3_64bits_update(st, slots[i], sizeof slots[i]);
    free(by_rank);
    free(slots);
    return 0;
}

uint64_t bytelevel_fingerprint(const ByteLevelBpe *b)
{
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    const char *kind = "bpe-bytelevel\n" PRETOK_LLAMA3_PATTERN "\n";
    XXH3_64bits_update(&st, kind, strlen(kind));
    uint8_t lookup = (uint8_t)b->whole_piece_lookup;
    XXH3_64bits_update(&st, &lookup, 1);
    // Per token: its length and special flag (two uint32), then its bytes. Gathered into 64 KB
    // blocks: one update call per token pair costs ~150 instructions (19M for Llama 3), and the
    // streamed hash of the blocks equals that of the same bytes given piece by piece.
    enum { BLOCK = 1 << 16 };
    uint8_t *block = malloc(BLOCK);
    size_t used = 0;
    for (uint32_t id = 0; id < b->n_tokens; id++) {
        uint32_t head[2] = {b->tok[id].len, b->is_special[id] == 1};
        if (!block || b->tok[id].len > BLOCK - sizeof head) {   // (no memory, or a huge token)
            if (used) XXH3_64bits_update(&st, block, used);
            used = 0;
            XXH3_64bits_update(&st, head, sizeof head);
            XXH3_64bits_update(&st, b->blob + b->tok[id].off, b->tok[id].len);
            continue;
        }
        if (used + sizeof head + b->tok[id].len > BLOCK) {
            XXH3_64bits_update(&st, block, used);
            used = 0;
        }
        memcpy(block + used, head, sizeof head);
        memcpy(block + used + sizeof head, b->blob + b->tok[id].off, b->tok[id].len);
        used += sizeof head + b->tok[id].len;
    }
    if (used) XXH3_64bits_update(&st, block, used);
    free(block);
    if (!b->use_ranks && !b->merges_follow_ranks && fingerprint_merges(b, &st) < 0) return 0;
    return XXH3_64bits_digest(&st);
}
