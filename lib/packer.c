#define _GNU_SOURCE   // mremap
#include "packer.h"

#include <archive.h>
#include <archive_entry.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "atomic.h"

// ---- input ---------------------------------------------------------------------------------

static int grow(void **p, uint64_t *cap, uint64_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    uint64_t n = *cap ? *cap : 4096;
    while (n < need)
        n *= 2;
    void *q = realloc(*p, n * elem);
    if (!q)
        return -1;
    *p = q;
    *cap = n;
    return 0;
}

// The token arrays hold the whole input (4 + 1 bytes a token): mapped directly and grown
// with mremap, which moves pages instead of copying them. (Huge pages were measured too:
// slower here, the kernel's compaction and zeroing of 2 MiB pages cost more than the faults.)
static int grow_mapped(void **p, uint64_t *cap, uint64_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    uint64_t n = *cap ? *cap : (2u << 20) / elem;
    while (n < need)
        n *= 2;
    void *q = *p ? mremap(*p, *cap * elem, n * elem, MREMAP_MAYMOVE)
                 : mmap(NULL, n * elem, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (q == MAP_FAILED)
        return -1;
    *p = q;
    *cap = n;
    return 0;
}

// dst[i] = src[i] for n ids; returns the largest (0 when n = 0). One pass instead of a
// memcpy and a vocab check; written with 4-lane vectors since -O2 does not vectorize it.
static uint32_t copy_ids(uint32_t *restrict dst, const uint32_t *restrict src, size_t n)
{
    typedef uint32_t u32x4 __attribute__((vector_size(16)));
    u32x4 hi = {0, 0, 0, 0};
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        u32x4 v;
        memcpy(&v, src + i, sizeof v);
        memcpy(dst + i, &v, sizeof v);
        u32x4 bigger = (u32x4)(v > hi);
        hi = (v & bigger) | (hi & ~bigger);
    }
    uint32_t max_id = 0;
    for (int k = 0; k < 4; k++)
        max_id = hi[k] > max_id ? hi[k] : max_id;
    for (; i < n; i++) {
        dst[i] = src[i];
        max_id = src[i] > max_id ? src[i] : max_id;
    }
    return max_id;
}

// Fault fresh anonymous pages in with one call instead of one page fault per 4 KiB (the
// kernel still zeroes them; this saves the traps, about a tenth of that cost). Best effort:
// kernels before 5.14 say EINVAL and the pages fault in as they are touched.
static void populate(void *p, size_t bytes)
{
#ifdef MADV_POPULATE_WRITE
    uintptr_t page = 4096, a = (uintptr_t)p & ~(page - 1);
    if (bytes)
        madvise((void *)a, (uintptr_t)p + bytes - a, MADV_POPULATE_WRITE);
#else
    (void)p;
    (void)bytes;
#endif
}

int pack_input_add(PackInput *in, const Record *rec, Err *err)
{
    int olen = rec->origin_len > 200 ? 200 : (int)rec->origin_len;
    if (rec->kind != REC_TOKENS)
        return err_set(err, "%.*s:%" PRIu64 ": a text record; pack needs token records", olen, rec->origin,
                       rec->origin_index);
    if (in->n_records == 0)
        in->fingerprint = rec->fingerprint;
    else if (rec->fingerprint != in->fingerprint)
        return err_set(err, "%.*s:%" PRIu64 ": tokenizer fingerprint %016" PRIx64 " differs from %016" PRIx64
                       " of the first record (records from two tokenizers)",
                       olen, rec->origin, rec->origin_index, rec->fingerprint, in->fingerprint);
    uint64_t n = 0;
    for (size_t s = 0; s < rec->nseg; s++)
        n += rec->seg[s].len;
    in->n_records++;
    if (n == 0) {
        in->n_empty++;
        return 0;
    }
    if (grow_mapped((void **)&in->ids, &in->tokens_cap, in->n_tokens + n, sizeof *in->ids) < 0 ||
        grow_mapped((void **)&in->trained, &in->trained_cap, in->n_tokens + n, 1) < 0 ||
        grow((void **)&in->doc_start, &in->docs_cap, in->n_docs + 2, sizeof *in->doc_start) < 0)
        return err_set(err, "out of memory after %" PRIu64 " tokens", in->n_tokens);
    if (in->n_tokens + n > in->populated) {   // fault the arrays in ahead, 1 Mi tokens at a time
        uint64_t cap = in->tokens_cap < in->trained_cap ? in->tokens_cap : in->trained_cap;
        uint64_t upto = in->populated + (1u << 20) > in->n_tokens + n ? in->populated + (1u << 20) : in->n_tokens + n;
        upto = upto < cap ? upto : cap;
        populate(in->ids + in->populated, (upto - in->populated) * sizeof *in->ids);
        populate(in->trained + in->populated, upto - in->populated);
        in->populated = upto;
    }
    uint64_t at = in->n_tokens;
    for (size_t s = 0; s < rec->nseg; s++) {
        const RecSegment *seg = &rec->seg[s];
        uint32_t max_id = copy_ids(in->ids + at, seg->ids, seg->len);
        if (in->vocab_size && seg->len && max_id >= in->vocab_size) {
            size_t i = 0;
            while (seg->ids[i] < in->vocab_size)
                i++;
            return err_set(err, "%.*s:%" PRIu64 ": token id %" PRIu32 " >= vocab size %" PRIu32, olen, rec->origin,
                           rec->origin_index, seg->ids[i], in->vocab_size);
        }
        memset(in->trained + at, in->all_tokens || (seg->flags & REC_TRAINED) ? 1 : 0, seg->len);
        at += seg->len;
    }
    if (in->n_docs == 0)
        in->doc_start[0] = 0;
    in->n_tokens = at;
    in->doc_start[++in->n_docs] = at;
    return 0;
}

void pack_input_free(PackInput *in)
{
    if (in->ids)
        munmap(in->ids, in->tokens_cap * sizeof *in->ids);
    if (in->trained)
        munmap(in->trained, in->trained_cap);
    free(in->doc_start);
    memset(in, 0, sizeof *in);
}

// ---- placement -----------------------------------------------------------------------------

// Trained targets of a piece: positions 1..len-1 whose token is trained (position 0 has no
// predecessor in its row).
static uint64_t piece_targets(const PackInput *in, uint64_t start, uint32_t len)
{
    const uint8_t *t = in->trained + start;
    uint64_t n = 0;
    uint32_t j = 1;
    // trained bytes are 0 or 1: eight at a time, their sum (at most 8) is the top byte of
    // the word times 0x0101..01
    for (; j + 8 <= len; j += 8) {
        uint64_t w;
        memcpy(&w, t + j, 8);
        n += (w * 0x0101010101010101ull) >> 56;
    }
    for (; j < len; j++)
        n += t[j];
    return n;
}

// Cut documents into pieces of at most T tokens by the long-document policy.
static int make_pieces(const PackInput *in, const PackSettings *s, PackPiece **out, uint64_t *n_out, PackStats *st,
                       Err *err)
{
    uint64_t cap = 0, n = 0;
    PackPiece *p = NULL;
    uint32_t T = s->seq_len;
    for (uint64_t d = 0; d < in->n_docs; d++) {
        uint64_t start = in->doc_start[d], len = in->doc_start[d + 1] - start;
        st->docs++;
        st->tokens += len;
        if (len > T) {
            if (s->long_policy == SHARD_LONG_DROP) {
                st->dropped_long_docs++;
                st->dropped_long_tokens += len;
                continue;
            }
            if (s->long_policy == SHARD_LONG_TRUNCATE) {
                st->truncated_docs++;
                st->truncated_tokens += len - T;
                len = T;
            } else {
                st->split_docs++;
            }
        }
        for (uint64_t off = 0; off < len; off += T) {
            uint32_t plen = (uint32_t)(len - off < T ? len - off : T);
            uint64_t targets = piece_targets(in, start + off, plen);
            if (targets == 0) {
                st->untrained_pieces++;
                st->untrained_tokens += plen;
                continue;
            }
            if (grow((void **)&p, &cap, n + 1, sizeof *p) < 0) {
                free(p);
                return err_set(err, "out of memory");
            }
            p[n++] = (PackPiece){start + off, plen, (uint32_t)targets};
        }
    }
    *out = p;
    *n_out = n;
    return 0;
}

// Longest first; a counting sort on length keeps ties in input order (deterministic).
static uint64_t *order_longest_first(const PackPiece *p, uint64_t n, uint32_t T)
{
    uint64_t *count = calloc((size_t)T + 2, sizeof *count), *order = malloc((n ? n : 1) * sizeof *order);
    if (!count || !order) {
        free(count);
        free(order);
        return NULL;
    }
    for (uint64_t i = 0; i < n; i++)
        count[T - p[i].len]++;   // bucket 0 = length T
    uint64_t sum = 0;
    for (uint32_t b = 0; b <= T; b++) {
        uint64_t c = count[b];
        count[b] = sum;
        sum += c;
    }
    for (uint64_t i = 0; i < n; i++)
        order[count[T - p[i].len]++] = i;
    free(count);
    return order;
}

// Best fit: open rows kept in buckets by free room (0..T), a bitmap over the buckets finds
// the smallest room >= the piece in T/64 word steps. bin[i] receives the row of piece i.
static uint64_t place_best_fit(const PackPiece *p, const uint64_t *order, uint64_t n, uint32_t T, uint64_t *bin)
{
    size_t words = ((size_t)T + 64) / 64;
    int64_t *head = malloc(((size_t)T + 1) * sizeof *head), *next = malloc((n ? n : 1) * sizeof *next);
    uint32_t *room = malloc((n ? n : 1) * sizeof *room);
    uint64_t *bits = calloc(words, sizeof *bits);
    uint64_t n_bins = 0;
    if (!head || !next || !room || !bits)
        goto out;
    for (uint32_t c = 0; c <= T; c++)
        head[c] = -1;
    for (uint64_t k = 0; k < n; k++) {
        uint32_t s = p[order[k]].len;
        int64_t b = -1;
        for (size_t w = s / 64; w < words && b < 0; w++) {
            uint64_t m = bits[w];
            if (w == s / 64)
                m &= ~0ull << (s % 64);
            if (m) {
                uint32_t c = (uint32_t)(w * 64 + (size_t)__builtin_ctzll(m));
                b = head[c];
                head[c] = next[b];
                if (head[c] < 0)
                    bits[c / 64] &= ~(1ull << (c % 64));
            }
        }
        if (b < 0) {
            b = (int64_t)n_bins++;
            room[b] = T;
        }
        room[b] -= s;
        bin[order[k]] = (uint64_t)b;
        if (room[b] > 0) {
            uint32_t c = room[b];
            next[b] = head[c];
            head[c] = b;
            bits[c / 64] |= 1ull << (c % 64);
        }
    }
out:
    free(head);
    free(next);
    free(room);
    free(bits);
    return (head && next && room && bits) ? n_bins : UINT64_MAX;
}

// First fit: a max-tree over the rows' free room (unopened rows have room T), so the
// leftmost row that holds the piece is found in log2(n) steps.
static uint64_t place_first_fit(const PackPiece *p, const uint64_t *order, uint64_t n, uint32_t T, uint64_t *bin)
{
    uint64_t P = 1;
    while (P < n)
        P *= 2;
    uint32_t *tree = malloc(2 * P * sizeof *tree);
    if (!tree)
        return UINT64_MAX;
    for (uint64_t i = 0; i < P; i++)
        tree[P + i] = i < n ? T : 0;
    for (uint64_t i = P - 1; i >= 1; i--)
        tree[i] = tree[2 * i] > tree[2 * i + 1] ? tree[2 * i] : tree[2 * i + 1];
    uint64_t n_bins = 0;
    for (uint64_t k = 0; k < n; k++) {
        uint32_t s = p[order[k]].len;
        uint64_t node = 1;
        while (node < P)
            node = tree[2 * node] >= s ? 2 * node : 2 * node + 1;
        uint64_t b = node - P;
        bin[order[k]] = b;
        if (b + 1 > n_bins)
            n_bins = b + 1;
        tree[node] -= s;
        for (node /= 2; node >= 1; node /= 2)
            tree[node] = tree[2 * node] > tree[2 * node + 1] ? tree[2 * node] : tree[2 * node + 1];
    }
    free(tree);
    return n_bins;
}

int pack_plan(const PackInput *in, const PackSettings *s, PackPlan *plan, Err *err)
{
    memset(plan, 0, sizeof *plan);
    if (s->seq_len == 0 || s->seq_len > SHARD_MAX_SEQ_LEN)
        return err_set(err, "seq_len %" PRIu32 " out of range (1..%u)", s->seq_len, SHARD_MAX_SEQ_LEN);
    PackPiece *pieces = NULL;
    uint64_t n = 0;
    if (make_pieces(in, s, &pieces, &n, &plan->stats, err) < 0)
        return -1;
    uint64_t *bin = malloc((n ? n : 1) * sizeof *bin), *order = NULL, n_bins = 0;
    if (!bin)
        goto oom;
    if (s->mode == SHARD_MODE_PAD) {
        for (uint64_t i = 0; i < n; i++)
            bin[i] = i;
        n_bins = n;
    } else {
        order = order_longest_first(pieces, n, s->seq_len);
        if (!order)
            goto oom;
        n_bins = s->mode == SHARD_MODE_FIRST_FIT ? place_first_fit(pieces, order, n, s->seq_len, bin)
                                                : place_best_fit(pieces, order, n, s->seq_len, bin);
        if (n_bins == UINT64_MAX)
            goto oom;
    }
    // Group pieces by row, keeping placement order (longest first) within each row.
    plan->row_first = calloc(n_bins + 2, sizeof *plan->row_first);
    plan->pieces = malloc((n ? n : 1) * sizeof *plan->pieces);
    if (!plan->row_first || !plan->pieces)
        goto oom;
    for (uint64_t i = 0; i < n; i++)
        plan->row_first[bin[i] + 2]++;
    for (uint64_t r = 2; r < n_bins + 2; r++)
        plan->row_first[r] += plan->row_first[r - 1];
    for (uint64_t k = 0; k < n; k++) {
        uint64_t i = order ? order[k] : k;
        plan->pieces[plan->row_first[bin[i] + 1]++] = pieces[i];
    }
    plan->n_rows = n_bins;
    plan->n_pieces = n;
    plan->stats.rows = n_bins;
    for (uint64_t i = 0; i < n; i++) {
        plan->stats.row_tokens += pieces[i].len;
        plan->stats.targets += pieces[i].targets;
    }
    free(pieces);
    free(bin);
    free(order);
    return 0;
oom:
    free(pieces);
    free(bin);
    free(order);
    pack_plan_free(plan);
    return err_set(err, "out of memory placing %" PRIu64 " pieces", n);
}

void pack_plan_free(PackPlan *plan)
{
    free(plan->pieces);
    free(plan->row_first);
    memset(plan, 0, sizeof *plan);
}

// ids[0..n) = id, four at a time (padding is most of a row in pad mode; -O2 stores one by one).
static void fill_ids(uint32_t *ids, uint32_t id, size_t n)
{
    typedef uint32_t u32x4 __attribute__((vector_size(16)));
    u32x4 v = {id, id, id, id};
    size_t i = 0;
    for (; i + 4 <= n; i += 4)
        memcpy(ids + i, &v, sizeof v);
    for (; i < n; i++)
        ids[i] = id;
}

// Fill row r's ids and flags (T of each) and return its counts, taken from the plan (the
// pieces' lengths and trained targets: the same numbers shard_row_encode counts from the flags).
static void fill_row(const PackInput *in, const PackPlan *plan, uint64_t r, uint32_t seq_len, uint32_t pad_id,
                     uint32_t *ids, uint8_t *flags, uint32_t *n_docs, uint32_t *n_tokens, uint32_t *n_targets)
{
    uint32_t t = 0, targets = 0;
    uint64_t first = plan->row_first[r], end = plan->row_first[r + 1];
    for (uint64_t k = first; k < end; k++) {
        const PackPiece *pc = &plan->pieces[k];
        memcpy(ids + t, in->ids + pc->start, (size_t)pc->len * 4);
        // trained[] holds 0 or 1 and SHARD_TOK_TRAINED is 1: the flags are a copy
        _Static_assert(SHARD_TOK_TRAINED == 1, "trained bytes double as flags");
        memcpy(flags + t, in->trained + pc->start, pc->len);
        flags[t] |= SHARD_TOK_DOC_START;
        t += pc->len;
        targets += pc->targets;
    }
    *n_docs = (uint32_t)(end - first);
    *n_tokens = t;
    *n_targets = targets;
    fill_ids(ids + t, pad_id, seq_len - t);
    memset(flags + t, SHARD_TOK_PAD, seq_len - t);
}

void pack_row_fill(const PackInput *in, const PackPlan *plan, uint64_t r, uint32_t seq_len, uint32_t pad_id,
                   uint32_t *ids, uint8_t *flags)
{
    uint32_t docs, tokens, targets;
    fill_row(in, plan, r, seq_len, pad_id, ids, flags, &docs, &tokens, &targets);
}

// ---- order ---------------------------------------------------------------------------------

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void pack_permutation(uint64_t *perm, uint64_t n, uint64_t seed)
{
    uint64_t state = seed;
    for (uint64_t i = 0; i < n; i++)
        perm[i] = i;
    for (uint64_t i = n; i > 1; i--) {
        // j uniform in [0, i): the high half of a 64x64-bit product (Lemire), bias < i/2^64
        uint64_t j = (uint64_t)(((unsigned __int128)splitmix64(&state) * i) >> 64);
        uint64_t tmp = perm[i - 1];
        perm[i - 1] = perm[j];
        perm[j] = tmp;
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

int pack_split(const PackPlan *plan, uint64_t seed, int shuffle, uint64_t n_val, uint64_t **train,
               uint64_t *n_train, uint64_t **val, Err *err)
{
    uint64_t n = plan->n_rows;
    if (n_val > n)
        return err_set(err, "validation split of %" PRIu64 " rows, but only %" PRIu64 " rows", n_val, n);
    uint64_t *perm = malloc((n ? n : 1) * sizeof *perm), *v = malloc((n_val ? n_val : 1) * sizeof *v);
    if (!perm || !v) {
        free(perm);
        free(v);
        return err_set(err, "out of memory");
    }
    pack_permutation(perm, n, seed);
    memcpy(v, perm, n_val * sizeof *v);
    memmove(perm, perm + n_val, (n - n_val) * sizeof *perm);
    if (!shuffle) {
        qsort(v, n_val, sizeof *v, cmp_u64);
        qsort(perm, n - n_val, sizeof *perm, cmp_u64);
    }
    *train = perm;
    *n_train = n - n_val;
    *val = v;
    return 0;
}

// ---- output --------------------------------------------------------------------------------

typedef struct {
    char name[32];           // member / file name
    uint64_t rows, first_row, bytes;
    uint64_t header_hash;
} ShardEntry;

typedef struct {
    const PackInput *in;
    const PackPlan *plan;
    const ShardHeader *settings;
    unsigned threads;            // rows are built on this many threads
    unsigned char *batch[2];     // (batch_rows, row_stride) each: rows built here, then written at once;
                                 // the second (threads > 1) is built while the first is written
    uint64_t batch_rows;
} RowSource;

enum { BATCH_BYTES = 512 << 10 };   // rows per write() to a file: large writes from a buffer that stays in cache
enum { MAX_THREADS = 16 };

// Build rows[0..n) (plan row numbers) at out, one row_stride apart, each sealed (header,
// zero fill, checksum). Counts come from the plan, not from scanning the flags.
static void build_rows(const RowSource *src, const uint64_t *rows, uint64_t n, unsigned char *out)
{
    const PackPlan *plan = src->plan;
    uint32_t T = src->settings->seq_len, pad_id = src->settings->pad_id;
    size_t stride = shard_row_stride(T);
    for (uint64_t k = 0; k < n; k++) {
        unsigned char *row = out + k * stride;
        uint32_t docs, tokens, targets;
        fill_row(src->in, plan, rows[k], T, pad_id, (uint32_t *)(row + SHARD_ROW_HEADER),
                 row + SHARD_ROW_HEADER + (size_t)T * 4, &docs, &tokens, &targets);
        shard_row_seal(row, T, docs, tokens, targets);
    }
}

typedef struct {
    const RowSource *src;
    unsigned threads;
    const uint64_t *rows;
    uint64_t n;
    unsigned char *out;
} BuildJob;

static void build_rows_parallel(const RowSource *src, unsigned threads, const uint64_t *rows, uint64_t n,
                                unsigned char *out);

static void *build_job(void *arg)
{
    BuildJob *j = arg;
    build_rows_parallel(j->src, j->threads, j->rows, j->n, j->out);
    return NULL;
}

// build_rows on that many threads, each building a contiguous part of the rows. A row's
// bytes depend only on the plan, so the output is the same for any thread count. A thread
// that cannot be started leaves its part to this one.
static void build_rows_parallel(const RowSource *src, unsigned threads, const uint64_t *rows, uint64_t n,
                                unsigned char *out)
{
    size_t stride = shard_row_stride(src->settings->seq_len);
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (threads > n)
        threads = n ? (unsigned)n : 1;
    if (threads == 1) {
        build_rows(src, rows, n, out);
        return;
    }
    BuildJob jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (unsigned i = 0; i < threads; i++) {
        uint64_t a = n * i / threads, b = n * (i + 1) / threads;
        jobs[i] = (BuildJob){src, 1, rows + a, b - a, out + a * stride};
    }
    for (unsigned i = 1; i < threads; i++)
        started[i] = pthread_create(&tid[i], NULL, build_job, &jobs[i]) == 0;
    build_job(&jobs[0]);
    for (unsigned i = 1; i < threads; i++) {
        if (started[i])
            pthread_join(tid[i], NULL);
        else
            build_job(&jobs[i]);
    }
}

// Start the disk writing the file's bytes written since the last call, once 8 MiB have
// gathered, without waiting: the shard's final fsync then finds most of it on the disk
// already, instead of the whole shard's writing starting there. Best effort (Linux only).
static void start_writeback(FILE *f, off_t *kicked)
{
#ifdef SYNC_FILE_RANGE_WRITE
    off_t at = ftello(f);
    if (at >= 0 && at - *kicked >= (8 << 20)) {
        sync_file_range(fileno(f), *kicked, at - *kicked, SYNC_FILE_RANGE_WRITE);
        *kicked = at;
    }
#else
    (void)f;
    (void)kicked;
#endif
}

// Write one shard's rows to a FILE, with the header written last at offset 0 (seekable) or
// into mem (an archive member built in memory). Fills e.
static int write_shard(RowSource *src, const uint64_t *rows, uint64_t n, uint32_t shard_index, uint64_t first_row,
                       FILE *f, unsigned char *mem, ShardEntry *e, Err *err)
{
    ShardHeader h = *src->settings;
    h.shard_index = shard_index;
    h.first_row = first_row;
    ShardWriter w;
    if (shard_writer_init(&w, &h, err) < 0)
        return -1;
    unsigned char header[SHARD_HEADER_SIZE] = {0};
    size_t stride = w.h.row_stride;
    if (f) {   // rows built a batch at a time in reused buffers, each batch one large fwrite
        if (fwrite(header, 1, sizeof header, f) != sizeof header)
            goto write_failed;
        // With a second buffer, the next batch is built on the other threads while this one
        // hashes and writes the last: the rows hash needs the batches in order, the building not.
        unsigned char *ready = src->batch[0], *spare = src->batch[1];
        off_t kicked = 0;   // bytes handed to the disk so far
        uint64_t k = 0, m = n < src->batch_rows ? n : src->batch_rows;
        build_rows_parallel(src, src->threads, rows, m, ready);
        while (k < n) {
            uint64_t k_next = k + m, m_next = n - k_next < src->batch_rows ? n - k_next : src->batch_rows;
            BuildJob next = {src, src->threads > 1 ? src->threads - 1 : 1, rows + k_next, m_next, spare};
            pthread_t tid;
            int async = spare && m_next && pthread_create(&tid, NULL, build_job, &next) == 0;
            shard_writer_add_sealed(&w, ready, m);
            int wrote = fwrite(ready, stride, m, f) == m;
            start_writeback(f, &kicked);
            if (async) {
                pthread_join(tid, NULL);
                next.out = ready;   // the buffers trade places
                ready = spare;
                spare = next.out;
            } else if (m_next) {
                build_rows_parallel(src, src->threads, rows + k_next, m_next, ready);
            }
            if (!wrote)
                goto write_failed;
            k = k_next;
            m = m_next;
        }
    } else {   // built in place in the member's memory
        build_rows_parallel(src, src->threads, rows, n, mem + SHARD_HEADER_SIZE);
        shard_writer_add_sealed(&w, mem + SHARD_HEADER_SIZE, n);
    }
    shard_writer_header(&w, header);
    if (f) {
        if (fseek(f, 0, SEEK_SET) != 0 || fwrite(header, 1, sizeof header, f) != sizeof header)
            goto write_failed;
    } else {
        memcpy(mem, header, sizeof header);
    }
    e->rows = n;
    e->first_row = first_row;
    e->bytes = SHARD_HEADER_SIZE + n * stride;
    memcpy(&e->header_hash, header + 248, 8);
    shard_writer_free(&w);
    return 0;
write_failed:
    shard_writer_free(&w);
    return err_set(err, "%s: write failed: %s", e->name, strerror(errno));
}

static char *index_json(const ShardHeader *s, const ShardEntry *e, uint32_t n_shards, uint64_t n_rows,
                        const PackStats *totals)
{
    char fp[17], seed[17], hh[17];
    snprintf(fp, sizeof fp, "%016" PRIx64, s->fingerprint);
    snprintf(seed, sizeof seed, "%016" PRIx64, s->seed);
    json_t *shards = json_array();
    for (uint32_t i = 0; i < n_shards; i++) {
        snprintf(hh, sizeof hh, "%016" PRIx64, e[i].header_hash);
        json_array_append_new(shards, json_pack("{s:s, s:I, s:I, s:I, s:s}", "file", e[i].name, "rows",
                                                (json_int_t)e[i].rows, "first_row", (json_int_t)e[i].first_row,
                                                "bytes", (json_int_t)e[i].bytes, "header_xxh3", hh));
    }
    json_t *root = json_pack("{s:s, s:i, s:I, s:I, s:I, s:s, s:s, s:s, s:s, s:b, s:s, s:I, s:I, s:I, s:I, s:o}",
                             "format", "alp-shards", "version", SHARD_VERSION, "seq_len", (json_int_t)s->seq_len,
                             "vocab_size", (json_int_t)s->vocab_size, "pad_id", (json_int_t)s->pad_id,
                             "fingerprint", fp, "pack_mode", shard_mode_name(s->pack_mode), "long",
                             shard_long_name(s->long_policy), "loss", shard_loss_name(s->loss_policy), "shuffled",
                             (s->flags & SHARD_FLAG_SHUFFLED) != 0, "seed", seed, "n_rows", (json_int_t)n_rows,
                             "n_tokens", (json_int_t)totals->row_tokens, "n_targets", (json_int_t)totals->targets,
                             "n_docs", (json_int_t)totals->docs, "shards", shards);
    char *text = root ? json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
    json_decref(root);
    return text;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

static int write_archive(RowSource *src, const uint64_t *rows, ShardEntry *e, uint32_t n_shards,
                         const uint64_t *bounds, uint64_t n_rows, const PackStats *totals, const PackOutput *out,
                         Err *err)
{
    const char *path = out->path;
    int to_stdout = strcmp(path, "-") == 0;
    AtomicFile af = {0};
    if (!to_stdout && atomic_open(&af, path, err) < 0)
        return -1;
    struct archive *a = archive_write_new();
    int rc = ARCHIVE_OK;
    if (ends_with(path, ".zip"))
        rc = archive_write_set_format_zip(a);
    else
        rc = archive_write_set_format_pax_restricted(a);
    int gzip = ends_with(path, ".tar.gz") || ends_with(path, ".tgz"), plain_tar = !gzip && !ends_with(path, ".zip");
    if (rc == ARCHIVE_OK && gzip)
        rc = archive_write_add_filter_gzip(a);
    // A plain tar goes out in 1000 KiB writes instead of libarchive's default 10 KiB blocks;
    // the end is padded as before (to a multiple of 10240 bytes, or not at all where libarchive
    // chose so for a regular file), so the bytes are the same.
    enum { TAR_BLOCK = 10240, TAR_WRITE = 100 * TAR_BLOCK };
    if (rc == ARCHIVE_OK && plain_tar)
        rc = archive_write_set_bytes_per_block(a, TAR_WRITE);
    if (rc == ARCHIVE_OK)
        rc = to_stdout ? archive_write_open_fd(a, 1) : archive_write_open_FILE(a, af.f);
    if (rc == ARCHIVE_OK && plain_tar && archive_write_get_bytes_in_last_block(a) <= 0)
        rc = archive_write_set_bytes_in_last_block(a, TAR_BLOCK);
    unsigned char *mem = NULL;   // one shard, built in memory: an archive member's size comes first
    uint64_t mem_cap = 0;
    char *index = NULL;
    if (rc != ARCHIVE_OK)
        goto archive_failed;
    size_t stride = shard_row_stride(src->settings->seq_len);
    for (uint32_t i = 0; i < n_shards && rc == ARCHIVE_OK; i++) {
        uint64_t n = bounds[i + 1] - bounds[i];
        if (!mem) {   // sized for the first shard, the largest: reused for the others
            void *m = NULL;
            if (grow_mapped(&m, &mem_cap, SHARD_HEADER_SIZE + n * stride, 1) == 0) {
                mem = m;
                populate(mem, SHARD_HEADER_SIZE + n * stride);
            }
        }
        if (!mem) {
            err_set(err, "%s: out of memory for a shard of %" PRIu64 " rows", path, n);
            goto failed;
        }
        if (write_shard(src, rows + bounds[i], n, i, bounds[i], NULL, mem, &e[i], err) < 0)
            goto failed;
        struct archive_entry *ent = archive_entry_new();
        archive_entry_set_pathname(ent, e[i].name);
        archive_entry_set_size(ent, (la_int64_t)e[i].bytes);
        archive_entry_set_filetype(ent, AE_IFREG);
        archive_entry_set_perm(ent, 0644);
        rc = archive_write_header(a, ent);
        archive_entry_free(ent);
        if (rc == ARCHIVE_OK && archive_write_data(a, mem, e[i].bytes) != (la_ssize_t)e[i].bytes)
            rc = ARCHIVE_FATAL;
    }
    if (rc != ARCHIVE_OK)
        goto archive_failed;
    index = index_json(src->settings, e, n_shards, n_rows, totals);
    if (!index) {
        err_set(err, "%s: cannot build index.json", path);
        goto failed;
    }
    struct archive_entry *ent = archive_entry_new();
    archive_entry_set_pathname(ent, "index.json");
    archive_entry_set_size(ent, (la_int64_t)strlen(index));
    archive_entry_set_filetype(ent, AE_IFREG);
    archive_entry_set_perm(ent, 0644);
    rc = archive_write_header(a, ent);
    archive_entry_free(ent);
    if (rc == ARCHIVE_OK && archive_write_data(a, index, strlen(index)) != (la_ssize_t)strlen(index))
        rc = ARCHIVE_FATAL;
    if (rc == ARCHIVE_OK)
        rc = archive_write_close(a);
    if (rc != ARCHIVE_OK)
        goto archive_failed;
    archive_write_free(a);
    if (mem)
        munmap(mem, mem_cap);
    free(index);
    return to_stdout ? 0 : atomic_commit(&af, err);
archive_failed:
    err_set(err, "%s: write failed: %s", to_stdout ? "standard output" : path,
            archive_error_string(a) ? archive_error_string(a) : strerror(errno));
failed:
    archive_write_free(a);
    if (mem)
        munmap(mem, mem_cap);
    free(index);
    if (!to_stdout)
        atomic_abort(&af);
    return -1;
}

static int write_file_shard(RowSource *src, const char *path, const uint64_t *rows, uint64_t n, uint32_t index,
                            uint64_t first_row, ShardEntry *e, Err *err)
{
    AtomicFile af;
    if (atomic_open(&af, path, err) < 0)
        return -1;
    if (write_shard(src, rows, n, index, first_row, af.f, NULL, e, err) < 0) {
        atomic_abort(&af);
        return -1;
    }
    return atomic_commit(&af, err);
}

int pack_write_set(const PackInput *in, const PackPlan *plan, const uint64_t *rows, uint64_t n_rows,
                   const ShardHeader *settings, const PackOutput *out, Err *err)
{
    if (n_rows == 0)
        return err_set(err, "%s: no rows to write", out->path);
    uint64_t per = out->rows_per_shard && !out->single ? out->rows_per_shard : n_rows;
    uint64_t n_shards64 = (n_rows + per - 1) / per;
    if (n_shards64 > 99999)
        return err_set(err, "%s: %" PRIu64 " shards is too many (at most 99999): raise the shard size", out->path,
                       n_shards64);
    uint32_t n_shards = (uint32_t)n_shards64;
    ShardEntry *e = calloc(n_shards, sizeof *e);
    uint64_t *bounds = malloc((n_shards + 1) * sizeof *bounds);
    RowSource src = {in, plan, settings, out->threads, {NULL, NULL}, 0};
    char *path = NULL, *index = NULL;
    int rc = -1;
    if (!e || !bounds || !(path = malloc(strlen(out->path) + 64))) {
        err_set(err, "out of memory");
        goto done;
    }
    for (uint32_t i = 0; i <= n_shards; i++)
        bounds[i] = (uint64_t)i * per < n_rows ? (uint64_t)i * per : n_rows;
    for (uint32_t i = 0; i < n_shards; i++)
        snprintf(e[i].name, sizeof e[i].name, "shard-%05" PRIu32 ".bin", i);
    PackStats totals = {0};
    totals.row_tokens = totals.targets = totals.docs = 0;
    for (uint64_t k = 0; k < n_rows; k++) {   // the set's own counts (train or validation part)
        uint64_t r = rows[k];
        for (uint64_t p = plan->row_first[r]; p < plan->row_first[r + 1]; p++) {
            totals.row_tokens += plan->pieces[p].len;
            totals.targets += plan->pieces[p].targets;
            totals.docs++;
        }
    }
    const char *o = out->path;
    int archive = !out->single && (strcmp(o, "-") == 0 || ends_with(o, ".tar") || ends_with(o, ".zip") ||
                                   ends_with(o, ".tar.gz") || ends_with(o, ".tgz"));
    if (!archive) {   // files are written from a batch buffer (archives build whole members instead)
        size_t stride = shard_row_stride(settings->seq_len);
        src.batch_rows = out->batch_rows ? out->batch_rows : BATCH_BYTES / stride ? BATCH_BYTES / stride : 1;
        if (src.batch_rows > per)
            src.batch_rows = per;
        src.batch[0] = malloc(src.batch_rows * stride);
        src.batch[1] = out->threads > 1 ? malloc(src.batch_rows * stride) : NULL;
        if (!src.batch[0] || (out->threads > 1 && !src.batch[1])) {
            err_set(err, "out of memory for %" PRIu64 " rows of %zu bytes", src.batch_rows, stride);
            goto done;
        }
    }
    if (out->single) {
        snprintf(e[0].name, sizeof e[0].name, "%s", "shard");
        rc = write_file_shard(&src, o, rows, n_rows, 0, 0, &e[0], err);
    } else if (archive) {
        rc = write_archive(&src, rows, e, n_shards, bounds, n_rows, &totals, out, err);
    } else {
        struct stat st;
        if (mkdir(o, 0777) != 0 && !(errno == EEXIST && stat(o, &st) == 0 && S_ISDIR(st.st_mode))) {
            err_set(err, "%s: cannot create directory: %s", o, strerror(errno));
            goto done;
        }
        sprintf(path, "%s/index.json", o);
        if (unlink(path) != 0 && errno != ENOENT) {
            err_set(err, "%s: cannot remove the old index: %s", path, strerror(errno));
            goto done;
        }
        for (uint32_t i = 0; i < n_shards; i++) {
            sprintf(path, "%s/%s", o, e[i].name);
            if (write_file_shard(&src, path, rows + bounds[i], bounds[i + 1] - bounds[i], i, bounds[i], &e[i], err) <
                0)
                goto done;
        }
        index = index_json(settings, e, n_shards, n_rows, &totals);
        sprintf(path, "%s/index.json", o);
        AtomicFile af;
        if (!index) {
            err_set(err, "%s: cannot build the index", path);
            goto done;
        }
        if (atomic_open(&af, path, err) < 0)
            goto done;
        fputs(index, af.f);
        fputc('\n', af.f);
        rc = atomic_commit(&af, err);
        // shards an earlier, larger run left behind are in no index: remove them
        for (uint32_t i = n_shards; rc == 0 && i < 99999; i++) {
            sprintf(path, "%s/shard-%05" PRIu32 ".bin", o, i);
            if (unlink(path) != 0)
                break;
        }
    }
done:
    free(src.batch[0]);
    free(src.batch[1]);
    free(e);
    free(bounds);
    free(path);
    free(index);
    return rc;
}
