#include "shard.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

// Rows are hashed twice (row checksum, rows_hash): the bulk hashing goes through libxxhash's
// runtime-dispatched XXH3 (AVX2 / AVX-512 where the CPU has them), the same hash at about
// twice the speed of the inlined SSE2 build (x86-64's baseline). Declared here rather than
// through <xxh_x86dispatch.h>, which does not mix with XXH_INLINE_ALL; the state is the
// same struct of the same xxHash version.
#if defined(__x86_64__) && __has_include(<xxh_x86dispatch.h>)
XXH64_hash_t XXH3_64bits_dispatch(const void *input, size_t len);
XXH_errorcode XXH3_64bits_update_dispatch(void *state, const void *input, size_t len);
static uint64_t bulk_hash(const void *p, size_t n) { return XXH3_64bits_dispatch(p, n); }
static void bulk_hash_update(void *state, const void *p, size_t n) { XXH3_64bits_update_dispatch(state, p, n); }
#else
static uint64_t bulk_hash(const void *p, size_t n) { return XXH3_64bits(p, n); }
static void bulk_hash_update(void *state, const void *p, size_t n) { XXH3_64bits_update(state, p, n); }
#endif

// Rows hold ids and flags in host order, which the format fixes as little-endian.
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "shard rows are little-endian; a big-endian host needs byte swapping here"
#endif

enum {   // header field offsets (man/shard.5)
    H_MAGIC = 0, H_VERSION = 8, H_HEADER_SIZE = 12, H_SEQ_LEN = 16, H_ROW_STRIDE = 20,
    H_N_ROWS = 24, H_VOCAB = 32, H_PAD = 36, H_FINGERPRINT = 40, H_MODE = 48, H_LONG = 49,
    H_LOSS = 50, H_FLAGS = 51, H_SHARD_INDEX = 52, H_SEED = 56, H_FIRST_ROW = 64,
    H_N_TOKENS = 72, H_N_TARGETS = 80, H_N_DOCS = 88, H_ROWS_HASH = 96, H_CHECKSUM = 248,
};
enum { R_CHECKSUM = 0, R_N_DOCS = 8, R_N_TOKENS = 12, R_N_TARGETS = 16 };

static void put32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

size_t shard_row_stride(uint32_t seq_len)
{
    return SHARD_ROW_HEADER + (((size_t)seq_len * 5 + 63) & ~(size_t)63);
}

const char *shard_mode_name(unsigned mode)
{
    static const char *names[] = {"best-fit", "first-fit", "pad"};
    return mode < 3 ? names[mode] : "unknown";
}

const char *shard_long_name(unsigned long_policy)
{
    static const char *names[] = {"split", "truncate", "drop"};
    return long_policy < 3 ? names[long_policy] : "unknown";
}

const char *shard_loss_name(unsigned loss)
{
    static const char *names[] = {"response", "all"};
    return loss < 2 ? names[loss] : "unknown";
}

// A position's target is trained when the next position holds a trained token of the same
// document piece: not padding, not the start of another piece.
static int target_trained(const uint8_t *flags, uint32_t t, uint32_t seq_len)
{
    if (t + 1 >= seq_len)
        return 0;
    uint8_t next = flags[t + 1];
    return (next & (SHARD_TOK_PAD | SHARD_TOK_DOC_START)) == 0 && (next & SHARD_TOK_TRAINED);
}

int32_t shard_row_target(const ShardRow *row, uint32_t t)
{
    return target_trained(row->flags, t, row->seq_len) ? (int32_t)row->ids[t + 1] : -100;
}

void shard_row_seal(unsigned char *buf, uint32_t seq_len, uint32_t n_docs, uint32_t n_tokens, uint32_t n_targets)
{
    size_t stride = shard_row_stride(seq_len), used = SHARD_ROW_HEADER + (size_t)seq_len * 5;
    memset(buf, 0, SHARD_ROW_HEADER);
    put32(buf + R_N_DOCS, n_docs);
    put32(buf + R_N_TOKENS, n_tokens);
    put32(buf + R_N_TARGETS, n_targets);
    memset(buf + used, 0, stride - used);
    put64(buf + R_CHECKSUM, bulk_hash(buf + 8, stride - 8));
}

void shard_row_encode(unsigned char *buf, uint32_t seq_len, const uint32_t *ids, const uint8_t *flags)
{
    unsigned char *row_ids = buf + SHARD_ROW_HEADER, *row_flags = row_ids + (size_t)seq_len * 4;
    // ids and flags may already sit in place (shard_writer_row): copy only from elsewhere
    if ((const unsigned char *)ids != row_ids)
        memcpy(row_ids, ids, (size_t)seq_len * 4);
    if (flags != row_flags)
        memcpy(row_flags, flags, seq_len);
    uint32_t n_docs = 0, n_pad = 0, n_targets = 0;
    for (uint32_t t = 0; t < seq_len; t++) {
        uint8_t f = row_flags[t];
        n_docs += (f & SHARD_TOK_DOC_START) != 0;
        n_pad += (f & SHARD_TOK_PAD) != 0;
        // position t-1's target is trained (see target_trained)
        n_targets += t > 0 && (f & (SHARD_TOK_TRAINED | SHARD_TOK_DOC_START | SHARD_TOK_PAD)) == SHARD_TOK_TRAINED;
    }
    shard_row_seal(buf, seq_len, n_docs, seq_len - n_pad, n_targets);
}

void shard_header_encode(const ShardHeader *h, unsigned char out[SHARD_HEADER_SIZE])
{
    memset(out, 0, SHARD_HEADER_SIZE);
    memcpy(out + H_MAGIC, SHARD_MAGIC, 8);
    put32(out + H_VERSION, h->version);
    put32(out + H_HEADER_SIZE, h->header_size);
    put32(out + H_SEQ_LEN, h->seq_len);
    put32(out + H_ROW_STRIDE, h->row_stride);
    put64(out + H_N_ROWS, h->n_rows);
    put32(out + H_VOCAB, h->vocab_size);
    put32(out + H_PAD, h->pad_id);
    put64(out + H_FINGERPRINT, h->fingerprint);
    out[H_MODE] = h->pack_mode;
    out[H_LONG] = h->long_policy;
    out[H_LOSS] = h->loss_policy;
    out[H_FLAGS] = h->flags;
    put32(out + H_SHARD_INDEX, h->shard_index);
    put64(out + H_SEED, h->seed);
    put64(out + H_FIRST_ROW, h->first_row);
    put64(out + H_N_TOKENS, h->n_tokens);
    put64(out + H_N_TARGETS, h->n_targets);
    put64(out + H_N_DOCS, h->n_docs);
    put64(out + H_ROWS_HASH, h->rows_hash);
    put64(out + H_CHECKSUM, XXH3_64bits(out, H_CHECKSUM));
}

int shard_header_decode(const unsigned char *buf, size_t len, ShardHeader *h, const char *name, Err *err)
{
    memset(h, 0, sizeof *h);
    if (len < SHARD_HEADER_SIZE)
        return err_set(err, "%s: header: truncated (%zu bytes, want at least %d)", name, len, SHARD_HEADER_SIZE);
    if (memcmp(buf, SHARD_MAGIC, 8) != 0)
        return err_set(err, "%s: header: bad magic (not a shard file)", name);
    h->version = get32(buf + H_VERSION);
    if (h->version != SHARD_VERSION)
        return err_set(err, "%s: header: format version %" PRIu32 " (this reader knows version %d)", name,
                       h->version, SHARD_VERSION);
    uint64_t want = get64(buf + H_CHECKSUM), got = XXH3_64bits(buf, H_CHECKSUM);
    if (want != got)
        return err_set(err, "%s: header: checksum mismatch (stored %016" PRIx64 ", computed %016" PRIx64 ")",
                       name, want, got);
    h->header_size = get32(buf + H_HEADER_SIZE);
    h->seq_len = get32(buf + H_SEQ_LEN);
    h->row_stride = get32(buf + H_ROW_STRIDE);
    h->n_rows = get64(buf + H_N_ROWS);
    h->vocab_size = get32(buf + H_VOCAB);
    h->pad_id = get32(buf + H_PAD);
    h->fingerprint = get64(buf + H_FINGERPRINT);
    h->pack_mode = buf[H_MODE];
    h->long_policy = buf[H_LONG];
    h->loss_policy = buf[H_LOSS];
    h->flags = buf[H_FLAGS];
    h->shard_index = get32(buf + H_SHARD_INDEX);
    h->seed = get64(buf + H_SEED);
    h->first_row = get64(buf + H_FIRST_ROW);
    h->n_tokens = get64(buf + H_N_TOKENS);
    h->n_targets = get64(buf + H_N_TARGETS);
    h->n_docs = get64(buf + H_N_DOCS);
    h->rows_hash = get64(buf + H_ROWS_HASH);
    if (h->header_size < SHARD_HEADER_SIZE || h->header_size % 64)
        return err_set(err, "%s: header: header size %" PRIu32 " (want a multiple of 64, at least %d)", name,
                       h->header_size, SHARD_HEADER_SIZE);
    if (h->seq_len == 0 || h->seq_len > SHARD_MAX_SEQ_LEN)
        return err_set(err, "%s: header: seq_len %" PRIu32 " out of range (1..%u)", name, h->seq_len,
                       SHARD_MAX_SEQ_LEN);
    if (h->row_stride != shard_row_stride(h->seq_len))
        return err_set(err, "%s: header: row stride %" PRIu32 " does not match seq_len %" PRIu32 " (want %zu)",
                       name, h->row_stride, h->seq_len, shard_row_stride(h->seq_len));
    if (h->vocab_size == 0 || h->pad_id >= h->vocab_size)
        return err_set(err, "%s: header: pad id %" PRIu32 " not below vocab size %" PRIu32, name, h->pad_id,
                       h->vocab_size);
    if (h->pack_mode > SHARD_MODE_PAD || h->long_policy > SHARD_LONG_DROP || h->loss_policy > SHARD_LOSS_ALL ||
        (h->flags & ~SHARD_FLAG_SHUFFLED))
        return err_set(err, "%s: header: unknown pack settings (mode %u, long %u, loss %u, flags %u)", name,
                       h->pack_mode, h->long_policy, h->loss_policy, h->flags);
    if (h->n_rows > (UINT64_MAX - h->header_size) / h->row_stride)
        return err_set(err, "%s: header: row count %" PRIu64 " too large", name, h->n_rows);
    return 0;
}

int shard_writer_init(ShardWriter *w, const ShardHeader *settings, Err *err)
{
    memset(w, 0, sizeof *w);
    w->h = *settings;
    w->h.version = SHARD_VERSION;
    w->h.header_size = SHARD_HEADER_SIZE;
    if (w->h.seq_len == 0 || w->h.seq_len > SHARD_MAX_SEQ_LEN)
        return err_set(err, "seq_len %" PRIu32 " out of range (1..%u)", w->h.seq_len, SHARD_MAX_SEQ_LEN);
    w->h.row_stride = (uint32_t)shard_row_stride(w->h.seq_len);
    w->h.n_rows = w->h.n_tokens = w->h.n_targets = w->h.n_docs = 0;
    w->row_buf = aligned_alloc(64, w->h.row_stride);
    XXH3_state_t *st = XXH3_createState();
    w->hash_state = st;
    if (!w->row_buf || !st) {
        shard_writer_free(w);
        return err_set(err, "out of memory");
    }
    XXH3_64bits_reset(st);
    return 0;
}

void shard_writer_row(ShardWriter *w, uint32_t **ids, uint8_t **flags)
{
    *ids = (uint32_t *)(w->row_buf + SHARD_ROW_HEADER);
    *flags = w->row_buf + SHARD_ROW_HEADER + (size_t)w->h.seq_len * 4;
}

void shard_writer_add_sealed(ShardWriter *w, const unsigned char *rows, uint64_t n)
{
    size_t stride = w->h.row_stride;
    bulk_hash_update(w->hash_state, rows, n * stride);   // one call: the same hash as row by row
    for (uint64_t k = 0; k < n; k++) {
        const unsigned char *row = rows + k * stride;
        w->h.n_docs += get32(row + R_N_DOCS);
        w->h.n_tokens += get32(row + R_N_TOKENS);
        w->h.n_targets += get32(row + R_N_TARGETS);
    }
    w->h.n_rows += n;
}

void shard_writer_add_in_place(ShardWriter *w, unsigned char *row)
{
    uint32_t T = w->h.seq_len;
    shard_row_encode(row, T, (const uint32_t *)(row + SHARD_ROW_HEADER), row + SHARD_ROW_HEADER + (size_t)T * 4);
    shard_writer_add_sealed(w, row, 1);
}

const unsigned char *shard_writer_add(ShardWriter *w, const uint32_t *ids, const uint8_t *flags)
{
    uint32_t T = w->h.seq_len;
    if (ids != (const uint32_t *)(w->row_buf + SHARD_ROW_HEADER))
        memcpy(w->row_buf + SHARD_ROW_HEADER, ids, (size_t)T * 4);
    if (flags != w->row_buf + SHARD_ROW_HEADER + (size_t)T * 4)
        memcpy(w->row_buf + SHARD_ROW_HEADER + (size_t)T * 4, flags, T);
    shard_writer_add_in_place(w, w->row_buf);
    return w->row_buf;
}

void shard_writer_header(ShardWriter *w, unsigned char out[SHARD_HEADER_SIZE])
{
    w->h.rows_hash = XXH3_64bits_digest(w->hash_state);
    shard_header_encode(&w->h, out);
}

void shard_writer_free(ShardWriter *w)
{
    if (w->hash_state)
        XXH3_freeState(w->hash_state);
    free(w->row_buf);
    w->hash_state = NULL;
    w->row_buf = NULL;
}

int shard_from_memory(ShardFile *s, const unsigned char *bytes, size_t size, const char *name, Err *err)
{
    memset(s, 0, sizeof *s);
    s->name = strdup(name);
    if (!s->name)
        return err_set(err, "%s: out of memory", name);
    if (shard_header_decode(bytes, size, &s->h, name, err) < 0) {
        shard_unmap(s);
        return -1;
    }
    uint64_t want = s->h.header_size + s->h.n_rows * s->h.row_stride;
    if (want != size) {
        err_set(err, "%s: %s: %zu bytes, header says %" PRIu64 " (%" PRIu64 " rows of %" PRIu32 ")", name,
                size < want ? "truncated" : "trailing bytes", size, want, s->h.n_rows, s->h.row_stride);
        shard_unmap(s);
        return -1;
    }
    s->base = bytes;
    s->size = size;
    return 0;
}

int shard_map(ShardFile *s, const char *path, Err *err)
{
    memset(s, 0, sizeof *s);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return err_set(err, "%s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return err_set(err, "%s: not a regular file", path);
    }
    size_t size = (size_t)st.st_size;
    void *map = NULL;
    if (size > 0) {
        map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) {
            int e = errno;
            close(fd);
            return err_set(err, "%s: mmap: %s", path, strerror(e));
        }
    }
    close(fd);
    static const unsigned char empty[1];
    if (shard_from_memory(s, map ? map : empty, size, path, err) < 0) {
        if (map)
            munmap(map, size);
        return -1;
    }
    s->map = map;
    return 0;
}

void shard_unmap(ShardFile *s)
{
    if (s->map)
        munmap(s->map, s->size);
    free(s->name);
    memset(s, 0, sizeof *s);
}

int shard_row(const ShardFile *s, uint64_t i, ShardRow *row, Err *err)
{
    if (i >= s->h.n_rows)
        return err_set(err, "%s: row %" PRIu64 " out of range (%" PRIu64 " rows)", s->name, i, s->h.n_rows);
    const unsigned char *p = s->base + s->h.header_size + i * s->h.row_stride;
    row->seq_len = s->h.seq_len;
    row->ids = (const uint32_t *)(p + SHARD_ROW_HEADER);   // 64-byte aligned in a mapping
    row->flags = p + SHARD_ROW_HEADER + (size_t)s->h.seq_len * 4;
    row->n_docs = get32(p + R_N_DOCS);
    row->n_tokens = get32(p + R_N_TOKENS);
    row->n_targets = get32(p + R_N_TARGETS);
    return 0;
}

int shard_verify_row(const ShardFile *s, uint64_t i, Err *err)
{
    ShardRow row;
    if (shard_row(s, i, &row, err) < 0)
        return -1;
    const unsigned char *p = s->base + s->h.header_size + i * s->h.row_stride;
    uint64_t want = get64(p + R_CHECKSUM), got = bulk_hash(p + 8, s->h.row_stride - 8);
    if (want != got)
        return err_set(err, "%s: row %" PRIu64 ": checksum mismatch (stored %016" PRIx64 ", computed %016" PRIx64 ")",
                       s->name, i, want, got);
    // A matching checksum means these are the bytes the writer emitted; the structure check
    // catches a writer that emitted nonsense (or a forged checksum).
    uint32_t T = s->h.seq_len, docs = 0, tokens = 0, targets = 0;
    int in_pad = 0;
    for (uint32_t t = 0; t < T; t++) {
        uint8_t f = row.flags[t];
        if (f & ~(SHARD_TOK_TRAINED | SHARD_TOK_DOC_START | SHARD_TOK_PAD))
            return err_set(err, "%s: row %" PRIu64 ": position %" PRIu32 ": unknown flags 0x%02x", s->name, i, t, f);
        if (f & SHARD_TOK_PAD) {
            if (f != SHARD_TOK_PAD || row.ids[t] != s->h.pad_id)
                return err_set(err, "%s: row %" PRIu64 ": position %" PRIu32 ": padding with flags 0x%02x, id %" PRIu32,
                               s->name, i, t, f, row.ids[t]);
            in_pad = 1;
            continue;
        }
        if (in_pad)
            return err_set(err, "%s: row %" PRIu64 ": position %" PRIu32 ": token after padding", s->name, i, t);
        if (t == 0 && !(f & SHARD_TOK_DOC_START))
            return err_set(err, "%s: row %" PRIu64 ": position 0 does not start a document", s->name, i);
        if (row.ids[t] >= s->h.vocab_size)
            return err_set(err, "%s: row %" PRIu64 ": position %" PRIu32 ": id %" PRIu32 " >= vocab size %" PRIu32,
                           s->name, i, t, row.ids[t], s->h.vocab_size);
        docs += (f & SHARD_TOK_DOC_START) != 0;
        tokens++;
        targets += target_trained(row.flags, t, T);
    }
    if (tokens == 0)
        return err_set(err, "%s: row %" PRIu64 ": no tokens", s->name, i);
    if (docs != row.n_docs || tokens != row.n_tokens || targets != row.n_targets)
        return err_set(err, "%s: row %" PRIu64 ": counts (%" PRIu32 " docs, %" PRIu32 " tokens, %" PRIu32
                       " targets) do not match its data (%" PRIu32 ", %" PRIu32 ", %" PRIu32 ")",
                       s->name, i, row.n_docs, row.n_tokens, row.n_targets, docs, tokens, targets);
    return 0;
}

int shard_verify(const ShardFile *s, Err *err)
{
    uint64_t docs = 0, tokens = 0, targets = 0;
    for (uint64_t i = 0; i < s->h.n_rows; i++) {
        if (shard_verify_row(s, i, err) < 0)
            return -1;
        ShardRow row = {0};
        shard_row(s, i, &row, NULL);
        docs += row.n_docs;
        tokens += row.n_tokens;
        targets += row.n_targets;
    }
    uint64_t got = bulk_hash(s->base + s->h.header_size, s->size - s->h.header_size);
    if (got != s->h.rows_hash)
        return err_set(err, "%s: rows hash mismatch (header %016" PRIx64 ", computed %016" PRIx64 ")", s->name,
                       s->h.rows_hash, got);
    if (docs != s->h.n_docs || tokens != s->h.n_tokens || targets != s->h.n_targets)
        return err_set(err, "%s: header counts do not match the rows", s->name);
    return 0;
}

int shard_row_write_json(FILE *f, uint64_t index, const ShardRow *row)
{
    uint32_t T = row->seq_len;
    fprintf(f, "{\"row\":%" PRIu64 ",\"docs\":%" PRIu32 ",\"tokens\":%" PRIu32 ",\"targets\":%" PRIu32 ",\"ids\":[",
            index, row->n_docs, row->n_tokens, row->n_targets);
    for (uint32_t t = 0; t < T; t++)
        fprintf(f, t ? ",%" PRIu32 : "%" PRIu32, row->ids[t]);
    fputs("],\"target_ids\":[", f);
    for (uint32_t t = 0; t < T; t++)
        fprintf(f, t ? ",%" PRId32 : "%" PRId32, shard_row_target(row, t));
    fputs("],\"doc\":[", f);
    int doc = -1;
    for (uint32_t t = 0; t < T; t++) {
        doc += (row->flags[t] & SHARD_TOK_DOC_START) != 0;
        fprintf(f, t ? ",%d" : "%d", row->flags[t] & SHARD_TOK_PAD ? -1 : doc);
    }
    fputs("],\"pos\":[", f);
    uint32_t pos = 0;
    for (uint32_t t = 0; t < T; t++) {
        if (row->flags[t] & SHARD_TOK_DOC_START || (t && (row->flags[t] & SHARD_TOK_PAD) && !(row->flags[t - 1] & SHARD_TOK_PAD)))
            pos = 0;
        fprintf(f, t ? ",%" PRIu32 : "%" PRIu32, pos++);
    }
    fputs("],\"trained\":[", f);
    for (uint32_t t = 0; t < T; t++)
        fprintf(f, t ? ",%d" : "%d", (row->flags[t] & SHARD_TOK_TRAINED) != 0);
    fputs("]}\n", f);
    return ferror(f) ? -1 : 0;
}
