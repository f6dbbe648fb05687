// The shard format and the reader API: the committed golden file read by raw offsets as
// man/shard.5 gives them and rebuilt byte for byte; sets written as directories, single
// files, tar and zip read back row for row; every corruption found (header, rows, whole-rows
// hash, index); epochs shuffled reproducibly, a cursor resumed, ranks disjoint and complete;
// batches (targets, mask, positions, cu_seqlens) checked against the source documents.
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "dataset.h"
#include "packer.h"
#include "tap.h"

static char dir[256];

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    rewind(f);
    unsigned char *b = malloc(*len + 1);
    if (fread(b, 1, *len, f) != *len)
        *len = 0;
    fclose(f);
    return b;
}

static void spit(const char *path, const void *b, size_t len)
{
    FILE *f = fopen(path, "wb");
    fwrite(b, 1, len, f);
    fclose(f);
}

static uint32_t le32(const unsigned char *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t le64(const unsigned char *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }
static void set64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i)); }

// ---- the tiny golden input (same documents as tests/fixtures/pack/tiny.jsonl) ----------------

static void add(PackInput *in, const uint32_t *prompt, size_t np, const uint32_t *resp, size_t nr)
{
    RecSegment seg[2] = {{0, np, NULL, prompt}, {REC_TRAINED, nr, NULL, resp}};
    Record rec = {REC_TOKENS, in->n_records + 1, 0xab, "tiny.jsonl", 10, 2, seg};
    Err err;
    if (pack_input_add(in, &rec, &err) < 0)
        printf("# %s\n", err.msg);
}

static void tiny_input(PackInput *in)
{
    static const uint32_t p1[] = {1, 5, 6}, r1[] = {7, 8, 2}, p2[] = {1, 9}, r2[] = {10, 11, 12, 13, 2},
                          p3[] = {1, 14}, r3[] = {15, 16, 17, 18, 19, 20, 21, 22, 23, 2}, p4[] = {1, 24, 25, 26};
    add(in, p1, 3, r1, 3);
    add(in, p2, 2, r2, 5);
    add(in, p3, 2, r3, 10);
    add(in, p4, 4, r1, 0);   // prompt only: dropped
}

static void test_golden(const char *fixtures)
{
    char path[512];
    snprintf(path, sizeof path, "%s/tiny.shard", fixtures);
    size_t len = 0;
    unsigned char *g = slurp(path, &len);
    if (!ok(g != NULL, "golden file %s present", path))
        return;
    // Raw offsets from man/shard.5, independent of lib/shard.c.
    ok(memcmp(g, "ALPSHARD", 8) == 0, "golden: magic at 0");
    is_int(le32(g + 8), 1, "golden: version at 8");
    is_int(le32(g + 12), 256, "golden: header size at 12");
    is_int(le32(g + 16), 8, "golden: seq_len at 16");
    is_int(le32(g + 20), 128, "golden: row stride at 20 = 64 + roundup(5 * 8, 64)");
    uint64_t rows = le64(g + 24);
    is_int(len, 256 + rows * 128, "golden: file size = header + rows x stride");
    is_int(le32(g + 32), 32, "golden: vocab size at 32");
    is_int(le32(g + 36), 0, "golden: pad id at 36");
    is_int(le64(g + 40), 0xab, "golden: fingerprint at 40");
    is_int(le64(g + 248), XXH3_64bits(g, 248), "golden: header checksum at 248 = XXH3 of bytes 0..247");
    is_int(le64(g + 96), XXH3_64bits(g + 256, len - 256), "golden: rows hash at 96 = XXH3 of all rows");
    int rows_ok = 1;
    uint64_t tokens = 0;
    for (uint64_t r = 0; r < rows; r++) {
        const unsigned char *row = g + 256 + r * 128;
        rows_ok &= le64(row) == XXH3_64bits(row + 8, 120);
        tokens += le32(row + 12);
    }
    ok(rows_ok, "golden: each row's checksum at row+0 = XXH3 of row bytes 8..stride");
    is_int(tokens, le64(g + 72), "golden: row token counts add up to the header's");
    is_int(tokens, 3 + 3 + 2 + 5 + 2 + 10, "golden: every token of the trained documents is in a row");

    // The same documents packed here give the same bytes.
    PackInput in = {.vocab_size = 32};
    tiny_input(&in);
    PackSettings s = {8, SHARD_MODE_BEST_FIT, SHARD_LONG_SPLIT};
    PackPlan plan;
    uint64_t *train, *val, n_train;
    Err err;
    pack_plan(&in, &s, &plan, &err);
    pack_split(&plan, 1, 1, 0, &train, &n_train, &val, &err);
    ShardHeader set = {.seq_len = 8, .vocab_size = 32, .pad_id = 0, .fingerprint = 0xab, .flags = SHARD_FLAG_SHUFFLED, .seed = 1};
    char out[512];
    snprintf(out, sizeof out, "%s/tiny.shard", dir);
    for (unsigned threads = 1; threads <= 3; threads++) {   // rows built on 1, 2, 3 threads
        PackOutput o = {out, 1, 0, threads, threads};   // batches of 1..3 rows
        ok(pack_write_set(&in, &plan, train, n_train, &set, &o, &err) == 0,
           "tiny input written as a single file (%u threads)", threads);
        size_t len2 = 0;
        unsigned char *mine = slurp(out, &len2);
        ok(mine && len2 == len && memcmp(mine, g, len) == 0, "tiny input packs to the golden bytes (%u threads)",
           threads);
        free(mine);
    }
    free(train);
    free(val);
    pack_plan_free(&plan);
    pack_input_free(&in);
    free(g);
}

// ---- a bigger random set ------------------------------------------------------------------------

enum { T = 64 };
static PackInput big;
static PackPlan big_plan;
static uint64_t *big_rows, big_n;   // set row k = plan row big_rows[k]

static void make_big(void)
{
    uint64_t s = 99;
    uint32_t ids[400];
    big.vocab_size = 50000;
    for (int d = 0; d < 600; d++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        uint32_t len = 1 + (uint32_t)((s >> 33) % (d % 17 == 0 ? 3 * T : T / 2)), prompt = (uint32_t)((s >> 20) % len);
        for (uint32_t i = 0; i < len; i++)
            ids[i] = (uint32_t)((s >> 7) + i * 7919u) % 50000;
        add(&big, ids, prompt, ids + prompt, len - prompt);
    }
    PackSettings ps = {T, SHARD_MODE_BEST_FIT, SHARD_LONG_SPLIT};
    Err err;
    uint64_t *val;
    pack_plan(&big, &ps, &big_plan, &err);
    pack_split(&big_plan, 5, 1, 0, &big_rows, &big_n, &val, &err);
    free(val);
}

static int write_big_threads(const char *name, int single, uint64_t per_shard, unsigned threads, uint64_t batch_rows)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    ShardHeader set = {.seq_len = T, .vocab_size = 50000, .pad_id = 2, .fingerprint = 0xab, .flags = SHARD_FLAG_SHUFFLED, .seed = 5};
    PackOutput o = {path, single, per_shard, threads, batch_rows};
    Err err;
    int rc = pack_write_set(&big, &big_plan, big_rows, big_n, &set, &o, &err);
    if (rc < 0)
        printf("# %s\n", err.msg);
    return rc;
}

static int write_big(const char *name, int single, uint64_t per_shard)
{
    return write_big_threads(name, single, per_shard, 1, 0);
}

// Rows built on several threads are the bytes built on one: single files, a directory set
// (rows written in batches, the next built while the last is written) and a tar (whole
// members in memory).
static void test_threads_same_bytes(void)
{
    static const char *names[] = {"one.shard", "set/shard-00000.bin", "set/shard-00003.bin", "set/index.json", "set.tar"};
    static const char *outs[] = {"one.shard", "set", "set", "set", "set.tar"};
    for (unsigned threads = 2; threads <= 5; threads += 3) {
        for (int i = 0; i < 5; i++) {
            char a[600], b[600];
            snprintf(a, sizeof a, "%s/%s", dir, names[i]);
            snprintf(b, sizeof b, "%s/mt-%s", dir, names[i]);
            size_t la = 0, lb = 0;
            unsigned char *one = NULL, *many = NULL;
            char mt[64];
            snprintf(mt, sizeof mt, "mt-%s", outs[i]);
            // batches of 2 rows: a shard of 7 rows is 4 writes, built ahead while the last is written
            int wrote = write_big_threads(outs[i], i == 0, 7, 1, 0) == 0 && (one = slurp(a, &la)) != NULL &&
                        write_big_threads(mt, i == 0, 7, threads, 2) == 0 && (many = slurp(b, &lb)) != NULL;
            ok(wrote && la == lb && la > 0 && memcmp(one, many, la) == 0, "%s: %u threads write the bytes of one",
               names[i], threads);
            free(one);
            free(many);
        }
    }
}

// Row k of a set equals what the packer placed there.
static int rows_match(Dataset *d)
{
    uint32_t ids[T];
    uint8_t flags[T];
    for (uint64_t k = 0; k < big_n; k++) {
        ShardRow row;
        if (dataset_row(d, k, &row, NULL) < 0)
            return 0;
        pack_row_fill(&big, &big_plan, big_rows[k], T, 2, ids, flags);
        if (memcmp(ids, row.ids, sizeof ids) || memcmp(flags, row.flags, T))
            return 0;
    }
    return 1;
}

static Dataset *open_at(const char *name, Err *err)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return dataset_open(path, err);
}

static void test_round_trip(void)
{
    static const char *names[] = {"set", "one.shard", "set.tar", "set.zip", "set.tar.gz"};
    for (int i = 0; i < 5; i++) {
        ok(write_big(names[i], i == 1, 7) == 0, "%s written", names[i]);
        Err err;
        Dataset *d = open_at(names[i], &err);
        if (!ok(d != NULL, "%s opens", names[i])) {
            printf("# %s\n", err.msg);
            continue;
        }
        const DatasetInfo *in = dataset_info(d);
        ok(in->n_rows == big_n && in->seq_len == T && in->pad_id == 2 && in->vocab_size == 50000 &&
           in->fingerprint == 0xab && in->n_tokens == big_plan.stats.row_tokens && in->n_targets == big_plan.stats.targets,
           "%s: settings and counts read back", names[i]);
        is_int(in->n_shards, i == 1 ? 1 : (big_n + 6) / 7, "%s: shard count", names[i]);
        ok(rows_match(d), "%s: every row reads back as packed", names[i]);
        ok(dataset_verify(d, &err) == 0, "%s: verifies", names[i]);
        dataset_close(d);
    }
}

// ---- corruption -----------------------------------------------------------------------------

static void expect_fail(const char *what, const char *name, int verify, const char *want)
{
    Err err = {{0}};
    Dataset *d = open_at(name, &err);
    int failed_open = d == NULL;
    if (d && verify && dataset_verify(d, &err) < 0) {
        dataset_close(d);
        d = NULL;
    }
    ok(!d && strstr(err.msg, want), "%s is detected%s: %s", what, failed_open ? " at open" : " by verify", err.msg);
    dataset_close(d);
}

// Copy the set to "bad", apply one change, check the reader names it, and put it back.
static void corrupt(const char *what, const char *file, long off, unsigned char xor_, int fix_row, int fix_header,
                    int verify, const char *want)
{
    char path[600], cmd[1400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s/bad' && cp -r '%s/set' '%s/bad'", dir, dir, dir);
    if (system(cmd) != 0)
        return;
    snprintf(path, sizeof path, "%s/bad/%s", dir, file);
    size_t len;
    unsigned char *b = slurp(path, &len);
    if (off < 0)
        off += (long)len;
    b[off] ^= xor_;
    size_t stride = shard_row_stride(T);
    if (fix_row) {   // recompute the row checksum so only a deeper check can tell
        size_t r = ((size_t)off - 256) / stride;
        unsigned char *row = b + 256 + r * stride;
        set64(row, XXH3_64bits(row + 8, stride - 8));
        if (fix_row > 1)
            set64(b + 96, XXH3_64bits(b + 256, len - 256));
    }
    if (fix_header)
        set64(b + 248, XXH3_64bits(b, 248));
    spit(path, b, len);
    free(b);
    expect_fail(what, "bad", verify, want);
}

static void test_corruption(void)
{
    size_t stride = shard_row_stride(T);
    long row3 = 256 + 3 * (long)stride;
    corrupt("a flipped magic byte", "shard-00001.bin", 0, 1, 0, 0, 0, "bad magic");
    corrupt("a changed header field", "shard-00001.bin", 16, 1, 0, 0, 0, "header: checksum mismatch");
    corrupt("a header checksum byte", "shard-00001.bin", 250, 0x40, 0, 0, 0, "header: checksum mismatch");
    corrupt("a future format version", "shard-00000.bin", 8, 3, 0, 1, 0, "format version 2");
    corrupt("a row count that does not match the size", "shard-00000.bin", 24, 1, 0, 1, 0, "header says");
    corrupt("a token id changed in a row", "shard-00001.bin", row3 + 64 + 4 * 5, 0x10, 0, 0, 1, "row 3: checksum mismatch");
    corrupt("a row checksum byte", "shard-00001.bin", row3 + 1, 0x01, 0, 0, 1, "row 3: checksum mismatch");
    corrupt("a row's padding changed", "shard-00002.bin", row3 + (long)stride - 1, 0x01, 0, 0, 1, "row 3: checksum mismatch");
    corrupt("a row changed with its checksum redone", "shard-00001.bin", row3 + 64, 0x01, 1, 0, 1, "rows hash mismatch");
    corrupt("a forged row with every checksum redone", "shard-00001.bin", row3 + 64 + 2, 0xff, 2, 1, 1,
            "does not match the index");
    corrupt("a shard header rewritten with a good checksum", "shard-00002.bin", 56, 0x01, 0, 1, 0, "does not match the index");

    // A shard file whose rows and checksums are all consistent but whose content breaks the
    // structure rules: a token id above the vocab, opened on its own (no index to compare).
    char path[600];
    snprintf(path, sizeof path, "%s/set/shard-00001.bin", dir);
    size_t len;
    unsigned char *b = slurp(path, &len);
    b[row3 + 64 + 2] ^= 0xff;
    unsigned char *row = b + row3;
    set64(row, XXH3_64bits(row + 8, stride - 8));
    set64(b + 96, XXH3_64bits(b + 256, len - 256));
    set64(b + 248, XXH3_64bits(b, 248));
    snprintf(path, sizeof path, "%s/forged.shard", dir);
    spit(path, b, len);
    expect_fail("an id above the vocab under good checksums", "forged.shard", 1, ">= vocab size 50000");
    // truncated and padded files
    spit(path, b, len - 7);
    expect_fail("a truncated shard", "forged.shard", 0, "truncated");
    b = realloc(b, len + 64);
    memset(b + len, 0, 64);
    spit(path, b, len + 64);
    expect_fail("trailing bytes after the rows", "forged.shard", 0, "trailing bytes");
    spit(path, b, 100);
    expect_fail("a file shorter than a header", "forged.shard", 0, "header: truncated");
    free(b);

    // index problems
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s/bad' && cp -r '%s/set' '%s/bad'", dir, dir, dir);
    snprintf(path, sizeof path, "%s/bad/index.json", dir);
    if (system(cmd) == 0 && (b = slurp(path, &len)) != NULL) {
        char *h = strstr((char *)b, "\"header_xxh3\": \"");
        if (h) {
            h += strlen("\"header_xxh3\": \"");
            *h = *h == '0' ? '1' : '0';
        }
        spit(path, b, len);
        free(b);
        expect_fail("a changed header hash in the index", "bad", 0, "does not match the index");
    }
    snprintf(cmd, sizeof cmd, "rm -rf '%s/bad' && cp -r '%s/set' '%s/bad' && rm '%s/bad/shard-00002.bin'", dir, dir, dir, dir);
    if (system(cmd) == 0)
        expect_fail("a missing shard file", "bad", 0, "shard-00002.bin: No such file");
    snprintf(cmd, sizeof cmd, "rm -rf '%s/bad' && cp -r '%s/set' '%s/bad' && rm '%s/bad/index.json'", dir, dir, dir, dir);
    if (system(cmd) == 0)
        expect_fail("a set without its index (still being written)", "bad", 0, "not a complete shard set");
    snprintf(cmd, sizeof cmd, "rm -rf '%s/bad' && cp -r '%s/set' '%s/bad' && sed -i 's/\"n_rows\": /\"n_rows\": 1/' '%s/bad/index.json'",
             dir, dir, dir, dir);
    if (system(cmd) == 0)
        expect_fail("a wrong row total in the index", "bad", 0, "rows, the shards hold");
    snprintf(cmd, sizeof cmd, "rm -rf '%s/bad' && cp -r '%s/set' '%s/bad' && sed -i 's/\"version\": 1/\"version\": 2/' '%s/bad/index.json'",
             dir, dir, dir, dir);
    if (system(cmd) == 0)
        expect_fail("a future index version", "bad", 0, "index: version 2");
    snprintf(cmd, sizeof cmd, "rm -rf '%s/bad' && cp -r '%s/set' '%s/bad' && echo '{' > '%s/bad/index.json'", dir, dir, dir, dir);
    if (system(cmd) == 0)
        expect_fail("an index that is not JSON", "bad", 0, "index.json:");
    snprintf(cmd, sizeof cmd, "rm -rf '%s/bad' && cp -r '%s/set' '%s/bad' && cp '%s/bad/shard-00000.bin' '%s/bad/shard-00001.bin'",
             dir, dir, dir, dir, dir);
    if (system(cmd) == 0)
        expect_fail("a shard in the wrong place", "bad", 0, "does not match the index");
}

// Every byte of a shard file is under some checksum, so any single flipped byte must be
// caught by open or verify (and nothing may crash: the suite runs under ASan).
static void test_every_flip_detected(void)
{
    char path[600];
    snprintf(path, sizeof path, "%s/one.shard", dir);
    size_t len;
    unsigned char *good = slurp(path, &len);
    if (!ok(good != NULL, "single shard for the flip test"))
        return;
    uint64_t s = 2024;
    int missed = 0, tried = 0;
    snprintf(path, sizeof path, "%s/flip.shard", dir);
    for (int k = 0; k < 300; k++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        size_t off = k < 256 ? (size_t)k : (size_t)((s >> 17) % len);   // the whole header, then anywhere
        unsigned char bit = (unsigned char)(1u << ((s >> 40) % 8));
        good[off] ^= bit;
        spit(path, good, len);
        good[off] ^= bit;
        Err err;
        Dataset *d = dataset_open(path, &err);
        if (d && dataset_verify(d, &err) == 0) {
            missed++;
            printf("# flip at byte %zu (bit 0x%02x) not detected\n", off, bit);
        }
        dataset_close(d);
        tried++;
    }
    is_int(missed, 0, "each of %d single-bit flips (every header byte, then random) is detected", tried);
    // truncation at any length is detected too
    int trunc_missed = 0;
    for (size_t cut = 0; cut < len; cut += 97) {
        spit(path, good, cut);
        Err err;
        Dataset *d = dataset_open(path, &err);
        trunc_missed += d != NULL;
        dataset_close(d);
    }
    is_int(trunc_missed, 0, "a shard cut at any length is refused");
    free(good);
}

static void test_index_truncations(void)
{
    char src[600], path[600], cmd[1400];
    snprintf(src, sizeof src, "%s/set/index.json", dir);
    size_t len;
    unsigned char *idx = slurp(src, &len);
    if (!ok(idx != NULL, "index for the truncation test"))
        return;
    snprintf(cmd, sizeof cmd, "rm -rf '%s/cut' && cp -r '%s/set' '%s/cut'", dir, dir, dir);
    int opened = 0, tried = 0;
    if (system(cmd) == 0) {
        snprintf(path, sizeof path, "%s/cut/index.json", dir);
        for (size_t n = 0; n + 2 < len; n += 7, tried++) {   // every proper prefix but the final "}\n"
            spit(path, idx, n);
            Err err;
            Dataset *d = open_at("cut", &err);
            opened += d != NULL;
            dataset_close(d);
        }
    }
    is_int(opened, 0, "an index cut short is refused (%d lengths)", tried);
    free(idx);
}

// ---- the reader API -------------------------------------------------------------------------

// Check one batch against the packer's plan: tokens, HF-style targets per document, mask,
// positions, cu_seqlens; returns 1 when all agree.
static int check_batch(const DatasetBatch *b, const char *what)
{
    int Tn = b->T, seq = 0;
    long targets = 0;
    if (b->cu_seqlens[0] != 0 || b->cu_seqlens[b->n_seqs] != b->B * Tn)
        return ok(0, "%s: cu_seqlens ends", what);
    for (int r = 0; r < b->B; r++) {
        const int32_t *tok = b->tokens + r * Tn, *tgt = b->targets + r * Tn, *pos = b->positions + r * Tn;
        int32_t want_tok[T], want_tgt[T], want_pos[T], starts[T + 1], n_starts = 0, o = 0;
        if (r < b->n_rows) {
            uint64_t plan_row = big_rows[b->row_ids[r]];
            for (uint64_t k = big_plan.row_first[plan_row]; k < big_plan.row_first[plan_row + 1]; k++) {
                const PackPiece *p = &big_plan.pieces[k];
                starts[n_starts++] = o;
                for (uint32_t j = 0; j < p->len; j++, o++) {
                    want_tok[o] = (int32_t)big.ids[p->start + j];
                    // labels = ids with -100 where untrained, shifted left by one, per document
                    want_tgt[o] = j + 1 < p->len && big.trained[p->start + j + 1] ? (int32_t)big.ids[p->start + j + 1] : -100;
                    want_pos[o] = (int32_t)j;
                }
            }
        }
        if (o < Tn)
            starts[n_starts++] = o;   // the padding run
        for (int t = o; t < Tn; t++) {
            want_tok[t] = 2;
            want_tgt[t] = -100;
            want_pos[t] = t - o;
        }
        for (int t = 0; t < Tn; t++) {
            if (tok[t] != want_tok[t] || tgt[t] != want_tgt[t] || pos[t] != want_pos[t] ||
                b->loss_mask[r * Tn + t] != (want_tgt[t] != -100))
                return ok(0, "%s: row %d position %d: token %d/%d target %d/%d pos %d/%d", what, r, t, tok[t],
                          want_tok[t], tgt[t], want_tgt[t], pos[t], want_pos[t]);
            targets += want_tgt[t] != -100;
        }
        for (int i = 0; i < n_starts; i++)
            if (b->cu_seqlens[seq++] != r * Tn + starts[i])
                return ok(0, "%s: row %d: cu_seqlens[%d] = %d, want %d", what, r, seq - 1, b->cu_seqlens[seq - 1],
                          r * Tn + starts[i]);
    }
    if (seq != b->n_seqs || targets != b->n_targets)
        return ok(0, "%s: %d sequences (want %d), %ld targets (want %ld)", what, b->n_seqs, seq, b->n_targets, targets);
    return 1;
}

static void test_reader(void)
{
    Err err;
    Dataset *d = open_at("set", &err), *d2 = open_at("set.tar", &err);
    if (!ok(d && d2, "set opens for the reader tests"))
        return;
    uint64_t n = dataset_info(d)->n_rows;

    // epochs: each a permutation, reproducible, different from the next
    DatasetCursor c, c2;
    dataset_cursor_init(&c, 77, 1, 0, 1);
    dataset_cursor_init(&c2, 77, 1, 0, 1);
    DatasetBatch b, b2;
    dataset_batch_alloc(&b, 5, T, &err);
    dataset_batch_alloc(&b2, 5, T, &err);
    uint64_t *order[2] = {calloc(n, 8), calloc(n, 8)};
    int batches_ok = 1, same = 1, short_seen = 0;
    for (int e = 0; e < 2; e++) {
        uint64_t got = 0;
        while (c.epoch == (uint64_t)e) {
            int k = dataset_next_batch(d, &c, &b, &err), k2 = dataset_next_batch(d2, &c2, &b2, &err);
            same &= k == k2 && memcmp(b.row_ids, b2.row_ids, (size_t)k * 8) == 0;
            short_seen |= k < 5;
            for (int i = 0; i < k; i++)
                order[e][got++] = b.row_ids[i];
            batches_ok &= check_batch(&b, "epoch batch");
        }
        uint8_t *hit = calloc(n, 1);
        int perm = got == n;
        for (uint64_t i = 0; i < got && perm; i++)
            perm &= order[e][i] < n && !hit[order[e][i]]++;
        ok(perm, "epoch %d visits every row once (%lu rows)", e, (unsigned long)got);
        free(hit);
    }
    ok(batches_ok, "every batch's tokens, targets, mask, positions and cu_seqlens match the source documents");
    ok(same, "two readers with one seed (a directory and a tar) hand out the same rows");
    ok(memcmp(order[0], order[1], n * 8) != 0, "epoch 1 is shuffled differently from epoch 0");
    ok(short_seen == (n % 5 != 0), "the last batch of an epoch is short only when rows run out");
    // a short batch's filler rows train nothing
    if (n % 5) {
        DatasetCursor e = {77, 0, n - (n % 5), 0, 1, 1, 0};
        int k = dataset_next_batch(d, &e, &b, &err);
        ok(k == (int)(n % 5) && e.epoch == 1 && e.position == 0 && check_batch(&b, "short batch"),
           "the short last batch has %d rows, padding rows ignored, and moves the cursor to the next epoch", k);
    }

    // resume: save the cursor after 3 batches, continue; a fresh reader from the saved cursor
    // hands out the same batches
    dataset_cursor_init(&c, 3, 1, 0, 1);
    for (int i = 0; i < 3; i++)
        dataset_next_batch(d, &c, &b, &err);
    DatasetCursor saved;
    memcpy(&saved, &c, sizeof saved);
    int32_t *expect = malloc(40 * 5 * T * 4);
    for (int i = 0; i < 40; i++) {
        dataset_next_batch(d, &c, &b, &err);
        memcpy(expect + i * 5 * T, b.targets, 5 * T * 4);
    }
    Dataset *fresh = open_at("set.zip", &err);
    int resumed = fresh != NULL;
    for (int i = 0; i < 40 && resumed; i++) {
        dataset_next_batch(fresh, &saved, &b2, &err);
        resumed &= memcmp(expect + i * 5 * T, b2.targets, 5 * T * 4) == 0;
    }
    ok(resumed && memcmp(&saved, &c, sizeof c) == 0, "a restored cursor continues exactly (40 batches, across an epoch end)");
    dataset_close(fresh);
    free(expect);

    // no shuffle: stored order
    dataset_cursor_init(&c, 3, 0, 0, 1);
    dataset_next_batch(d, &c, &b, &err);
    ok(b.row_ids[0] == 0 && b.row_ids[4] == 4, "shuffle off hands out rows in stored order");

    // ranks: disjoint and complete
    for (uint32_t R = 1; R <= 4; R++) {
        uint8_t *hit = calloc(n, 1);
        int disjoint = 1;
        uint64_t total = 0;
        for (uint32_t r = 0; r < R; r++) {
            DatasetCursor rc;
            dataset_cursor_init(&rc, 11, 1, r, R);
            uint64_t per = dataset_rank_rows(d, r, R);
            total += per;
            while (rc.epoch == 0) {
                int k = dataset_next_batch(d, &rc, &b, &err);
                for (int i = 0; i < k; i++)
                    disjoint &= !hit[b.row_ids[i]]++;
            }
        }
        uint64_t covered = 0;
        for (uint64_t i = 0; i < n; i++)
            covered += hit[i];
        ok(disjoint && covered == n && total == n, "%u ranks: rows disjoint and complete (%lu rows)", R, (unsigned long)n);
        free(hit);
    }
    DatasetCursor bad;
    dataset_cursor_init(&bad, 1, 1, 5, 2);
    ok(dataset_next_batch(d, &bad, &b, &err) < 0, "a rank outside 0..R-1 is refused: %s", err.msg);
    DatasetBatch wrong;
    dataset_batch_alloc(&wrong, 2, T + 1, &err);
    dataset_cursor_init(&c, 1, 1, 0, 1);
    ok(dataset_next_batch(d, &c, &wrong, &err) < 0 && strstr(err.msg, "seq_len"), "a batch of another seq_len is refused: %s",
       err.msg);
    dataset_batch_free(&wrong);
    ShardRow row;
    ok(dataset_row(d, n, &row, &err) < 0, "row n_rows is out of range: %s", err.msg);
    dataset_batch_free(&b);
    dataset_batch_free(&b2);
    free(order[0]);
    free(order[1]);
    dataset_close(d);
    dataset_close(d2);
}

int main(int argc, char **argv)
{
    (void)argc;
    snprintf(dir, sizeof dir, "%s/shardtest.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(dir)) {
        printf("1..0 # SKIP cannot make a temporary directory\n");
        return 0;
    }
    // fixtures beside the sources: tests/unit/../fixtures/pack (prove runs from the top)
    const char *fixtures = getenv("PACK_FIXTURES") ? getenv("PACK_FIXTURES") : "tests/fixtures/pack";
    (void)argv;
    test_golden(fixtures);
    make_big();
    test_round_trip();
    test_threads_same_bytes();
    test_corruption();
    test_every_flip_detected();
    test_index_truncations();
    test_reader();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        printf("# could not remove %s\n", dir);
    free(big_rows);
    pack_plan_free(&big_plan);
    pack_input_free(&big);
    return done_testing();
}
