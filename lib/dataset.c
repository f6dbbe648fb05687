#include "dataset.h"

#include <archive.h>
#include <archive_entry.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "packer.h"

struct Dataset {
    DatasetInfo info;
    ShardFile *shards;        // (n_shards)
    uint64_t *first_row;      // (n_shards + 1) global index of each shard's row 0; last = n_rows
    unsigned char **members;  // (n_shards) archive member bytes we own (NULL for mapped files)
    uint64_t *perm;           // (n_rows) the shuffled order of perm_epoch, or NULL
    uint64_t perm_epoch, perm_seed;
    char *path;
};

// ---- opening -------------------------------------------------------------------------------

typedef struct {
    char *name;
    unsigned char *bytes;
    size_t size;
} Member;

static void free_members(Member *m, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(m[i].name);
        free(m[i].bytes);
    }
    free(m);
}

// Every regular member of a tar or zip archive, read into memory (64-byte aligned, so rows
// keep the alignment they have in a mapped file).
static int read_archive(const char *path, Member **out, size_t *n_out, Err *err)
{
    struct archive *a = archive_read_new();
    archive_read_support_filter_all(a);
    archive_read_support_format_tar(a);
    archive_read_support_format_zip(a);
    Member *m = NULL;
    size_t n = 0;
    if (archive_read_open_filename(a, path, 1 << 16) != ARCHIVE_OK)
        goto failed;
    struct archive_entry *ent;
    int rc;
    while ((rc = archive_read_next_header(a, &ent)) == ARCHIVE_OK) {
        if (archive_entry_filetype(ent) != AE_IFREG)
            continue;
        Member *grown = realloc(m, (n + 1) * sizeof *m);
        if (!grown)
            goto oom;
        m = grown;
        m[n] = (Member){strdup(archive_entry_pathname(ent)), NULL, 0};
        n++;
        size_t cap = archive_entry_size_is_set(ent) ? (size_t)archive_entry_size(ent) : 1 << 20, len = 0;
        cap = (cap + 64) & ~(size_t)63;   // aligned_alloc wants a multiple of 64; +1 byte to see the end
        m[n - 1].bytes = aligned_alloc(64, cap);
        if (!m[n - 1].name || !m[n - 1].bytes)
            goto oom;
        for (;;) {
            if (len == cap) {
                unsigned char *b = aligned_alloc(64, 2 * cap);
                if (!b)
                    goto oom;
                memcpy(b, m[n - 1].bytes, len);
                free(m[n - 1].bytes);
                m[n - 1].bytes = b;
                cap *= 2;
            }
            la_ssize_t got = archive_read_data(a, m[n - 1].bytes + len, cap - len);
            if (got < 0)
                goto failed;
            if (got == 0)
                break;
            len += (size_t)got;
        }
        m[n - 1].size = len;
    }
    if (rc != ARCHIVE_EOF)
        goto failed;
    archive_read_free(a);
    *out = m;
    *n_out = n;
    return 0;
oom:
    archive_read_free(a);
    free_members(m, n);
    return err_set(err, "%s: out of memory reading the archive", path);
failed:
    err_set(err, "%s: %s", path, archive_error_string(a) ? archive_error_string(a) : "cannot read the archive");
    archive_read_free(a);
    free_members(m, n);
    return -1;
}

static int parse_hex64(const char *s, uint64_t *v)
{
    if (!s || strlen(s) != 16)
        return -1;
    char *end;
    errno = 0;
    *v = strtoull(s, &end, 16);
    return errno || *end ? -1 : 0;
}

static int mode_from_name(const char *s, const char *const *names, unsigned n)
{
    for (unsigned i = 0; s && i < n; i++)
        if (strcmp(s, names[i]) == 0)
            return (int)i;
    return -1;
}

typedef struct {
    char file[64];
    uint64_t rows, first_row, bytes, header_hash;
} IndexEntry;

// index.json (man/shard.5, "Index"): the set's settings and its files. Fills info and entries.
static int parse_index(const char *text, size_t len, const char *name, DatasetInfo *info, IndexEntry **entries,
                       uint32_t *n_entries, Err *err)
{
    json_error_t je;
    json_t *root = json_loadb(text, len, 0, &je);
    if (!root)
        return err_set(err, "%s:%d: %s", name, je.line, je.text);
    const char *format = NULL, *fp = NULL, *mode = NULL, *lng = NULL, *loss = NULL, *seed = NULL;
    json_int_t version = 0, seq_len = 0, vocab = 0, pad = -1, n_rows = -1, n_tokens = 0, n_targets = 0, n_docs = 0;
    int shuffled = 0;
    json_t *shards = NULL;
    if (json_unpack_ex(root, &je, 0, "{s:s, s:I, s:I, s:I, s:I, s:s, s:s, s:s, s:s, s:b, s:s, s:I, s:I, s:I, s:I, s:o}",
                       "format", &format, "version", &version, "seq_len", &seq_len, "vocab_size", &vocab, "pad_id",
                       &pad, "fingerprint", &fp, "pack_mode", &mode, "long", &lng, "loss", &loss, "shuffled",
                       &shuffled, "seed", &seed, "n_rows", &n_rows, "n_tokens", &n_tokens, "n_targets", &n_targets,
                       "n_docs", &n_docs, "shards", &shards) != 0) {
        err_set(err, "%s: index: %s", name, je.text);
        goto bad;
    }
    static const char *const modes[] = {"best-fit", "first-fit", "pad"}, *const longs[] = {"split", "truncate", "drop"},
                             *const losses[] = {"response", "all"};
    int m = mode_from_name(mode, modes, 3), l = mode_from_name(lng, longs, 3), o = mode_from_name(loss, losses, 2);
    if (strcmp(format, "alp-shards") != 0) {
        err_set(err, "%s: index: format \"%s\", want \"alp-shards\"", name, format);
        goto bad;
    }
    if (version != SHARD_VERSION) {
        err_set(err, "%s: index: version %lld (this reader knows version %d)", name, (long long)version, SHARD_VERSION);
        goto bad;
    }
    if (seq_len <= 0 || seq_len > SHARD_MAX_SEQ_LEN || vocab <= 0 || vocab > UINT32_MAX || pad < 0 || pad >= vocab ||
        n_rows < 0 || m < 0 || l < 0 || o < 0 || parse_hex64(fp, &info->fingerprint) < 0 ||
        parse_hex64(seed, &info->pack_seed) < 0 || !json_is_array(shards) || json_array_size(shards) == 0 ||
        json_array_size(shards) > 99999) {
        err_set(err, "%s: index: a field is out of range", name);
        goto bad;
    }
    info->seq_len = (uint32_t)seq_len;
    info->vocab_size = (uint32_t)vocab;
    info->pad_id = (uint32_t)pad;
    info->n_rows = (uint64_t)n_rows;
    info->n_tokens = (uint64_t)n_tokens;
    info->n_targets = (uint64_t)n_targets;
    info->n_docs = (uint64_t)n_docs;
    info->pack_mode = (unsigned)m;
    info->long_policy = (unsigned)l;
    info->loss_policy = (unsigned)o;
    *n_entries = (uint32_t)json_array_size(shards);
    *entries = calloc(*n_entries, sizeof **entries);
    if (!*entries) {
        err_set(err, "out of memory");
        goto bad;
    }
    for (uint32_t i = 0; i < *n_entries; i++) {
        const char *file = NULL, *hh = NULL;
        json_int_t rows = -1, first = -1, bytes = -1;
        IndexEntry *e = &(*entries)[i];
        if (json_unpack_ex(json_array_get(shards, i), &je, 0, "{s:s, s:I, s:I, s:I, s:s}", "file", &file, "rows",
                           &rows, "first_row", &first, "bytes", &bytes, "header_xxh3", &hh) != 0 ||
            rows < 0 || first < 0 || bytes < 0 || parse_hex64(hh, &e->header_hash) < 0 || strlen(file) >= sizeof e->file ||
            strchr(file, '/') || file[0] == '.') {
            err_set(err, "%s: index: shard %" PRIu32 ": bad entry", name, i);
            free(*entries);
            goto bad;
        }
        strcpy(e->file, file);
        e->rows = (uint64_t)rows;
        e->first_row = (uint64_t)first;
        e->bytes = (uint64_t)bytes;
    }
    json_decref(root);
    return 0;
bad:
    json_decref(root);
    return -1;
}

// A shard of the set must be the one the index names, in its place, with the set's settings.
static int check_member(const ShardFile *s, const IndexEntry *e, uint32_t i, const DatasetInfo *info, Err *err)
{
    uint64_t hh;
    memcpy(&hh, s->base + 248, 8);
    if (hh != e->header_hash || s->size != e->bytes || s->h.n_rows != e->rows || s->h.first_row != e->first_row ||
        s->h.shard_index != i)
        return err_set(err, "%s: does not match the index (another run's shard?)", s->name);
    if (s->h.seq_len != info->seq_len || s->h.vocab_size != info->vocab_size || s->h.pad_id != info->pad_id ||
        s->h.fingerprint != info->fingerprint)
        return err_set(err, "%s: seq_len, vocab, pad id or fingerprint differ from the index", s->name);
    return 0;
}

static Dataset *dataset_new(const char *path, uint32_t n_shards)
{
    Dataset *d = calloc(1, sizeof *d);
    if (!d)
        return NULL;
    d->shards = calloc(n_shards, sizeof *d->shards);
    d->first_row = calloc(n_shards + 1, sizeof *d->first_row);
    d->members = calloc(n_shards, sizeof *d->members);
    d->path = strdup(path);
    d->info.n_shards = n_shards;
    if (!d->shards || !d->first_row || !d->members || !d->path) {
        dataset_close(d);
        return NULL;
    }
    return d;
}

static int finish_set(Dataset *d, Err *err)
{
    uint64_t rows = 0;
    for (uint32_t i = 0; i < d->info.n_shards; i++) {
        d->first_row[i] = rows;
        rows += d->shards[i].h.n_rows;
    }
    d->first_row[d->info.n_shards] = rows;
    if (rows != d->info.n_rows)
        return err_set(err, "%s: index says %" PRIu64 " rows, the shards hold %" PRIu64, d->path, d->info.n_rows, rows);
    if (rows == 0)
        return err_set(err, "%s: no rows", d->path);
    return 0;
}

static Dataset *open_single(const char *path, Err *err)
{
    Dataset *d = dataset_new(path, 1);
    if (!d) {
        err_set(err, "out of memory");
        return NULL;
    }
    if (shard_map(&d->shards[0], path, err) < 0) {
        dataset_close(d);
        return NULL;
    }
    const ShardHeader *h = &d->shards[0].h;
    d->info = (DatasetInfo){h->seq_len, h->vocab_size, h->pad_id, h->fingerprint, h->n_rows, 1, h->n_tokens,
                            h->n_targets, h->n_docs, h->pack_mode, h->long_policy, h->loss_policy, h->seed};
    if (finish_set(d, err) < 0) {
        dataset_close(d);
        return NULL;
    }
    return d;
}

static Dataset *open_directory(const char *path, Err *err)
{
    size_t plen = strlen(path) + 80;
    char *p = malloc(plen);
    if (!p) {
        err_set(err, "out of memory");
        return NULL;
    }
    snprintf(p, plen, "%s/index.json", path);
    FILE *f = fopen(p, "rb");
    if (!f) {
        err_set(err, "%s: %s (not a complete shard set)", p, strerror(errno));
        free(p);
        return NULL;
    }
    char *text = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            char *t = realloc(text, cap = cap ? 2 * cap : 65536);
            if (!t)
                break;
            text = t;
        }
        size_t got = fread(text + len, 1, cap - len, f);
        if (got == 0)
            break;
        len += got;
    }
    fclose(f);
    DatasetInfo info = {0};
    IndexEntry *entries = NULL;
    uint32_t n = 0;
    Dataset *d = NULL;
    if (!text || parse_index(text, len, p, &info, &entries, &n, err) < 0)
        goto done;
    d = dataset_new(path, n);
    if (!d) {
        err_set(err, "out of memory");
        goto done;
    }
    d->info = info;
    d->info.n_shards = n;
    for (uint32_t i = 0; i < n; i++) {
        snprintf(p, plen, "%s/%s", path, entries[i].file);
        if (shard_map(&d->shards[i], p, err) < 0 || check_member(&d->shards[i], &entries[i], i, &d->info, err) < 0 ||
            (i + 1 == n && finish_set(d, err) < 0)) {
            dataset_close(d);
            d = NULL;
            goto done;
        }
    }
done:
    free(entries);
    free(text);
    free(p);
    return d;
}

static Dataset *open_archive(const char *path, Err *err)
{
    Member *m = NULL;
    size_t n = 0;
    if (read_archive(path, &m, &n, err) < 0)
        return NULL;
    Dataset *d = NULL;
    IndexEntry *entries = NULL;
    uint32_t n_entries = 0;
    DatasetInfo info = {0};
    // index.json at the top, or under one directory ("train/index.json", "./index.json", as
    // tar -c of a set's directory makes): its shards are named relative to it
    size_t ix = 0, prefix = 0;
    for (; ix < n; ix++) {
        const char *slash = strrchr(m[ix].name, '/');
        if (strcmp(slash ? slash + 1 : m[ix].name, "index.json") == 0) {
            prefix = slash ? (size_t)(slash + 1 - m[ix].name) : 0;
            break;
        }
    }
    if (ix == n) {
        err_set(err, "%s: no index.json in the archive (not a shard set)", path);
        goto done;
    }
    char name[4096];
    snprintf(name, sizeof name, "%s: index.json", path);
    if (parse_index((const char *)m[ix].bytes, m[ix].size, name, &info, &entries, &n_entries, err) < 0)
        goto done;
    d = dataset_new(path, n_entries);
    if (!d) {
        err_set(err, "out of memory");
        goto done;
    }
    d->info = info;
    d->info.n_shards = n_entries;
    for (uint32_t i = 0; i < n_entries; i++) {
        size_t k = 0;
        while (k < n && !(strncmp(m[k].name, m[ix].name, prefix) == 0 && strcmp(m[k].name + prefix, entries[i].file) == 0))
            k++;
        snprintf(name, sizeof name, "%s: %s", path, entries[i].file);
        if (k == n) {
            err_set(err, "%s: missing from the archive", name);
            goto fail;
        }
        d->members[i] = m[k].bytes;   // the Dataset owns it from now on
        m[k].bytes = NULL;
        if (shard_from_memory(&d->shards[i], d->members[i], m[k].size, name, err) < 0 ||
            check_member(&d->shards[i], &entries[i], i, &d->info, err) < 0)
            goto fail;
    }
    if (finish_set(d, err) < 0)
        goto fail;
    goto done;
fail:
    dataset_close(d);
    d = NULL;
done:
    free(entries);
    free_members(m, n);
    return d;
}

Dataset *dataset_open(const char *path, Err *err)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        err_set(err, "%s: %s", path, strerror(errno));
        return NULL;
    }
    if (S_ISDIR(st.st_mode))
        return open_directory(path, err);
    FILE *f = fopen(path, "rb");
    if (!f) {
        err_set(err, "%s: %s", path, strerror(errno));
        return NULL;
    }
    char magic[8] = {0};
    size_t got = fread(magic, 1, 8, f);
    fclose(f);
    if (got == 8 && memcmp(magic, SHARD_MAGIC, 8) == 0)
        return open_single(path, err);
    return open_archive(path, err);
}

void dataset_close(Dataset *d)
{
    if (!d)
        return;
    for (uint32_t i = 0; d->shards && i < d->info.n_shards; i++) {
        shard_unmap(&d->shards[i]);
        if (d->members)
            free(d->members[i]);
    }
    free(d->shards);
    free(d->members);
    free(d->first_row);
    free(d->perm);
    free(d->path);
    free(d);
}

const DatasetInfo *dataset_info(const Dataset *d)
{
    return &d->info;
}

int dataset_verify(const Dataset *d, Err *err)
{
    for (uint32_t i = 0; i < d->info.n_shards; i++)
        if (shard_verify(&d->shards[i], err) < 0)
            return -1;
    return 0;
}

int dataset_row(const Dataset *d, uint64_t i, ShardRow *row, Err *err)
{
    if (i >= d->info.n_rows)
        return err_set(err, "%s: row %" PRIu64 " out of range (%" PRIu64 " rows)", d->path, i, d->info.n_rows);
    uint32_t lo = 0, hi = d->info.n_shards;   // the shard s with first_row[s] <= i < first_row[s+1]
    while (hi - lo > 1) {
        uint32_t mid = (lo + hi) / 2;
        if (d->first_row[mid] <= i)
            lo = mid;
        else
            hi = mid;
    }
    return shard_row(&d->shards[lo], i - d->first_row[lo], row, err);
}

// ---- order ---------------------------------------------------------------------------------

void dataset_cursor_init(DatasetCursor *c, uint64_t seed, int shuffle, uint32_t rank, uint32_t n_ranks)
{
    memset(c, 0, sizeof *c);
    c->seed = seed;
    c->shuffle = shuffle != 0;
    c->rank = rank;
    c->n_ranks = n_ranks ? n_ranks : 1;
}

uint64_t dataset_rank_rows(const Dataset *d, uint32_t rank, uint32_t n_ranks)
{
    uint64_t n = d->info.n_rows;
    if (n_ranks == 0 || rank >= n_ranks || rank >= n)
        return 0;
    return (n - rank + n_ranks - 1) / n_ranks;
}

// Epoch e's order is pack_permutation(n_rows, seed ^ (golden * (e + 1))): a different
// shuffle per epoch, all from one seed.
static const uint64_t *epoch_order(Dataset *d, uint64_t seed, uint64_t epoch)
{
    if (d->perm && d->perm_epoch == epoch && d->perm_seed == seed)
        return d->perm;
    if (!d->perm && !(d->perm = malloc(d->info.n_rows * sizeof *d->perm)))
        return NULL;
    pack_permutation(d->perm, d->info.n_rows, seed ^ (0x9e3779b97f4a7c15ull * (epoch + 1)));
    d->perm_epoch = epoch;
    d->perm_seed = seed;
    return d->perm;
}

uint64_t dataset_cursor_row(Dataset *d, const DatasetCursor *c)
{
    uint64_t p = c->rank + c->position * c->n_ranks;
    if (p >= d->info.n_rows)
        return UINT64_MAX;
    if (!c->shuffle)
        return p;
    const uint64_t *order = epoch_order(d, c->seed, c->epoch);
    return order ? order[p] : UINT64_MAX;
}

// ---- batches -------------------------------------------------------------------------------

int dataset_batch_alloc(DatasetBatch *b, int B, int T, Err *err)
{
    memset(b, 0, sizeof *b);
    if (B <= 0 || T <= 0 || (size_t)B * (size_t)T > INT32_MAX - 1)
        return err_set(err, "batch of %d rows of %d tokens: out of range", B, T);
    size_t n = (size_t)B * T;
    b->B = B;
    b->T = T;
    b->tokens = malloc(n * sizeof *b->tokens);
    b->targets = malloc(n * sizeof *b->targets);
    b->loss_mask = malloc(n);
    b->positions = malloc(n * sizeof *b->positions);
    b->cu_seqlens = malloc((n + 1) * sizeof *b->cu_seqlens);
    b->row_ids = malloc((size_t)B * sizeof *b->row_ids);
    if (!b->tokens || !b->targets || !b->loss_mask || !b->positions || !b->cu_seqlens || !b->row_ids) {
        dataset_batch_free(b);
        return err_set(err, "out of memory for a batch of %d x %d", B, T);
    }
    return 0;
}

void dataset_batch_free(DatasetBatch *b)
{
    free(b->tokens);
    free(b->targets);
    free(b->loss_mask);
    free(b->positions);
    free(b->cu_seqlens);
    free(b->row_ids);
    memset(b, 0, sizeof *b);
}

int dataset_fill_batch(const Dataset *d, const uint64_t *rows, int n, DatasetBatch *b, Err *err)
{
    if ((uint32_t)b->T != d->info.seq_len)
        return err_set(err, "%s: batch seq_len %d, shards have %" PRIu32, d->path, b->T, d->info.seq_len);
    if (n < 0 || n > b->B)
        return err_set(err, "%d rows for a batch of %d", n, b->B);
    int T = b->T, seqs = 0, max_len = 0, start = 0;
    long targets = 0;
    b->cu_seqlens[0] = 0;
    for (int r = 0; r < b->B; r++) {
        int32_t *tok = b->tokens + (size_t)r * T, *tgt = b->targets + (size_t)r * T, *pos = b->positions + (size_t)r * T;
        uint8_t *mask = b->loss_mask + (size_t)r * T;
        int base = r * T;
        if (r >= n) {   // filler row: one padding sequence, nothing trained
            b->row_ids[r] = UINT64_MAX;
            for (int t = 0; t < T; t++) {
                tok[t] = (int32_t)d->info.pad_id;
                tgt[t] = DATASET_IGNORE;
                mask[t] = 0;
                pos[t] = t;
            }
            b->cu_seqlens[++seqs] = base + T;
            max_len = T > max_len ? T : max_len;
            continue;
        }
        ShardRow row;
        if (dataset_row(d, rows[r], &row, err) < 0)
            return -1;
        b->row_ids[r] = rows[r];
        start = base;
        for (int t = 0; t < T; t++) {
            uint8_t f = row.flags[t];
            // a sequence ends before a document start and before the first padding position
            int boundary = t > 0 && ((f & SHARD_TOK_DOC_START) || ((f & SHARD_TOK_PAD) && !(row.flags[t - 1] & SHARD_TOK_PAD)));
            if (boundary) {
                b->cu_seqlens[++seqs] = base + t;
                max_len = base + t - start > max_len ? base + t - start : max_len;
                start = base + t;
            }
            tok[t] = (int32_t)row.ids[t];
            pos[t] = base + t - start;
            tgt[t] = shard_row_target(&row, (uint32_t)t);
            mask[t] = tgt[t] != DATASET_IGNORE;
            targets += mask[t];
        }
        b->cu_seqlens[++seqs] = base + T;
        max_len = base + T - start > max_len ? base + T - start : max_len;
    }
    b->n_rows = n;
    b->n_seqs = seqs;
    b->max_seqlen = max_len;
    b->n_targets = targets;
    return n;
}

int dataset_next_batch(Dataset *d, DatasetCursor *c, DatasetBatch *b, Err *err)
{
    if (c->n_ranks == 0 || c->rank >= c->n_ranks)
        return err_set(err, "rank %" PRIu32 " of %" PRIu32 ": out of range", c->rank, c->n_ranks);
    uint64_t per_rank = dataset_rank_rows(d, c->rank, c->n_ranks);
    if (per_rank == 0)
        return err_set(err, "%s: %" PRIu64 " rows leave none for rank %" PRIu32 " of %" PRIu32, d->path,
                       d->info.n_rows, c->rank, c->n_ranks);
    if (c->position >= per_rank) {   // a cursor saved at the very end of an epoch
        c->epoch++;
        c->position = 0;
    }
    uint64_t left = per_rank - c->position;
    int n = left < (uint64_t)b->B ? (int)left : b->B;
    uint64_t rows[n];
    for (int k = 0; k < n; k++) {
        DatasetCursor at = *c;
        at.position += (uint64_t)k;
        rows[k] = dataset_cursor_row(d, &at);
        if (rows[k] == UINT64_MAX)
            return err_set(err, "out of memory for the epoch order of %" PRIu64 " rows", d->info.n_rows);
    }
    if (dataset_fill_batch(d, rows, n, b, err) < 0)
        return -1;
    c->position += (uint64_t)n;
    if (c->position == per_rank) {
        c->epoch++;
        c->position = 0;
    }
    return n;
}
