// Record stream: golden bytes (made by tests/fixtures/recs/make_golden.py, independently
// of this code), write -> read round trips, and one case per rule the reader enforces,
// each checking that the message names the stream, the byte offset and the record index.
#include "record.h"
#include "tap.h"

#include <stdint.h>
#include <xxhash.h>

static const unsigned char golden_text[85] = {
    0x41, 0x4c, 0x52, 0x01, 0x01, 0x00, 0x02, 0x00, 0x3d, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0xf9, 0x26, 0xda, 0x0b, 0xc8, 0xf7, 0x82, 0x90,
    0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x61, 0x6c, 0x70, 0x61, 0x63, 0x61,
    0x5f, 0x74, 0x69, 0x6e, 0x79, 0x2e, 0x6a, 0x73, 0x6f, 0x6e, 0x00, 0x00,
    0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x05, 0x00,
    0x00, 0x00, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x0a, 0x57, 0x6f, 0x72, 0x6c,
    0x64,
};
static const unsigned char golden_tokens[75] = {
    0x41, 0x4c, 0x52, 0x01, 0x02, 0x00, 0x02, 0x00, 0x33, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x58, 0x16, 0x5d, 0x91, 0x46, 0x9c, 0x77, 0x0d,
    0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xef, 0xcd, 0xab, 0x89,
    0x67, 0x45, 0x23, 0x01, 0x01, 0x00, 0x74, 0x00, 0x00, 0x00, 0x00, 0x02,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x01,
    0x00, 0x00, 0x00, 0xc3, 0x3a, 0x00, 0x00, 0x72, 0x0c, 0x00, 0x00, 0x02,
    0x00, 0x00, 0x00,
};

static const RecSegment text_segments[] = {
    {.flags = 0, .len = 6, .text = "Hello\n"},
    {.flags = REC_TRAINED | REC_EOS, .len = 5, .text = "World"},
};
static const Record text_record = {
    .kind = REC_TEXT, .origin_index = 3, .origin = "alpaca_tiny.json", .origin_len = 16,
    .nseg = 2, .seg = text_segments,
};
static const uint32_t prompt_ids[] = {1, 15043}, response_ids[] = {3186, 2};
static const RecSegment token_segments[] = {
    {.flags = 0, .len = 2, .ids = prompt_ids},
    {.flags = REC_TRAINED, .len = 2, .ids = response_ids},
};
static const Record tokens_record = {
    .kind = REC_TOKENS, .origin_index = 7, .fingerprint = 0x0123456789ABCDEFull, .origin = "t",
    .origin_len = 1, .nseg = 2, .seg = token_segments,
};

// A stream in memory: the golden text record followed by `second` (n bytes).
static unsigned char stream[1 << 16];
static size_t stream_len;
static void make_stream(const unsigned char *second, size_t n)
{
    memcpy(stream, golden_text, sizeof golden_text);
    memcpy(stream + sizeof golden_text, second, n);
    stream_len = sizeof golden_text + n;
}

// Recompute a record's checksum after editing it, so that the edit, not the checksum,
// is what the reader sees.
static void rehash(unsigned char *rec)
{
    uint32_t payload_len = rec[8] | rec[9] << 8 | rec[10] << 16 | (uint32_t)rec[11] << 24;
    XXH3_state_t *st = XXH3_createState();
    XXH3_64bits_reset(st);
    XXH3_64bits_update(st, rec, 16);
    XXH3_64bits_update(st, rec + 24, payload_len);
    uint64_t h = XXH3_64bits_digest(st);
    XXH3_freeState(st);
    for (int i = 0; i < 8; i++)
        rec[16 + i] = (unsigned char)(h >> (8 * i));
}

// Read the whole in-memory stream named "s"; returns what the last rec_read returned
// and leaves its message in err.
static int read_all(const unsigned char *buf, size_t n, int *records, Err *err)
{
    FILE *f = fmemopen((void *)buf, n, "rb");
    RecReader *r = rec_reader_open(f, "s", err);
    Record rec;
    int rc;
    *records = 0;
    while ((rc = rec_read(r, &rec, err)) == 1)
        (*records)++;
    rec_reader_close(r);
    fclose(f);
    return rc;
}

// The second record of the stream is bad: reading fails after exactly one record, and
// the message starts "s: byte OFFSET: record 1: " and contains `what`.
static void expect_error(const char *name, unsigned long offset, const char *what)
{
    Err err = {{0}};
    int records;
    int rc = read_all(stream, stream_len, &records, &err);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "s: byte %lu: record 1: ", offset);
    ok(rc == -1 && records == 1 && strncmp(err.msg, prefix, strlen(prefix)) == 0 && strstr(err.msg, what),
       "%s: rejected with \"%s...%s\"", name, prefix, what);
    if (rc != -1 || !strstr(err.msg, what) || strncmp(err.msg, prefix, strlen(prefix)) != 0)
        printf("#   rc %d, records %d, message: %s\n", rc, records, err.msg);
}

static int same_record(const Record *a, const Record *b)
{
    if (a->kind != b->kind || a->origin_index != b->origin_index || a->fingerprint != b->fingerprint ||
        a->origin_len != b->origin_len || (a->origin_len && memcmp(a->origin, b->origin, a->origin_len) != 0) ||
        a->nseg != b->nseg)
        return 0;
    for (size_t i = 0; i < a->nseg; i++) {
        const RecSegment *s = &a->seg[i], *t = &b->seg[i];
        if (s->flags != t->flags || s->len != t->len)
            return 0;
        if (s->len == 0)
            continue;
        if (a->kind == REC_TEXT ? memcmp(s->text, t->text, s->len) != 0
                                : memcmp(s->ids, t->ids, s->len * sizeof *s->ids) != 0)
            return 0;
    }
    return 1;
}

static void test_golden(void)
{
    unsigned char buf[256];
    Err err;
    long n = rec_encode(&text_record, NULL, 0, &err);
    is_int(n, sizeof golden_text, "rec_encode sizes the text record");
    ok(rec_encode(&text_record, buf, sizeof buf, &err) == n && memcmp(buf, golden_text, n) == 0,
       "text record encodes to the golden bytes");
    n = rec_encode(&tokens_record, buf, sizeof buf, &err);
    ok(n == sizeof golden_tokens && memcmp(buf, golden_tokens, n) == 0, "tokens record encodes to the golden bytes");
    is_int(rec_encode(&text_record, buf, 10, &err), sizeof golden_text, "too small a buffer: size only");

    make_stream(golden_tokens, sizeof golden_tokens);
    FILE *f = fmemopen(stream, stream_len, "rb");
    RecReader *r = rec_reader_open(f, "golden", &err);
    Record rec;
    ok(rec_read(r, &rec, &err) == 1 && same_record(&rec, &text_record), "golden text record reads back");
    is_int(rec_reader_offset(r), sizeof golden_text, "offset after one record");
    ok(rec_read(r, &rec, &err) == 1 && same_record(&rec, &tokens_record), "golden tokens record reads back");
    is_int(rec_read(r, &rec, &err), 0, "clean end of stream");
    is_int(rec_reader_index(r), 2, "two records read");
    is_int(rec_reader_offset(r), stream_len, "offset at the end");
    rec_reader_close(r);
    fclose(f);
}

static void test_round_trip(void)
{
    // Many segments, a large text (beyond rec_write's stack buffer), an empty segment,
    // bytes that are not UTF-8, no origin; then a tokens record with many ids.
    enum { BIG = 100000, NSEG = 300 };
    static char big[BIG];
    static uint32_t ids[BIG];
    static RecSegment segs[NSEG];
    for (int i = 0; i < BIG; i++) {
        big[i] = (char)(i * 7 + 3);
        ids[i] = (uint32_t)i * 2654435761u;
    }
    for (int i = 0; i < NSEG; i++)
        segs[i] = (RecSegment){.flags = i % 2 ? REC_TRAINED : (i % 3 ? REC_SPECIAL : 0), .len = (size_t)(i * 3) % 101,
                               .text = big + i};
    segs[NSEG - 1] = (RecSegment){.flags = REC_TRAINED | REC_EOS, .len = BIG - 1000, .text = big + 1000};
    Record text = {.kind = REC_TEXT, .origin_index = UINT64_MAX, .nseg = NSEG, .seg = segs};
    RecSegment token_segs[2] = {{.flags = 0, .len = 0, .ids = NULL}, {.flags = REC_TRAINED, .len = BIG, .ids = ids}};
    Record tokens = {.kind = REC_TOKENS, .fingerprint = 42, .origin = "x\xff", .origin_len = 2, .nseg = 2, .seg = token_segs};

    FILE *f = tmpfile();
    Err err = {{0}};
    int rc = 0;
    for (int i = 0; i < 3; i++)
        rc |= rec_write(f, &text, &err) | rec_write(f, &tokens, &err) | rec_write(f, &text_record, &err);
    ok(rc == 0, "rec_write of 9 records: %s", rc ? err.msg : "ok");
    rewind(f);
    RecReader *r = rec_reader_open(f, "tmp", &err);
    Record rec;
    int same = 0, n = 0;
    while (rec_read(r, &rec, &err) == 1) {
        const Record *want = n % 3 == 0 ? &text : n % 3 == 1 ? &tokens : &text_record;
        same += same_record(&rec, want);
        n++;
    }
    is_int(n, 9, "9 records read back");
    is_int(same, 9, "each equals what was written");
    rec_reader_close(r);
    fclose(f);

    // The same large record cut inside its payload, past the first 64 KiB read.
    unsigned char *one = malloc(200000);
    long size = rec_encode(&text, one, 200000, &err);
    f = fmemopen(one, (size_t)size - 10, "rb");
    r = rec_reader_open(f, "cut", &err);
    char want[96];
    snprintf(want, sizeof want, "cut: byte 0: record 0: truncated payload: %ld of %ld bytes", size - 34, size - 24);
    ok(rec_read(r, &rec, &err) == -1 && strncmp(err.msg, want, strlen(want)) == 0, "large record cut short: %s", err.msg);
    rec_reader_close(r);
    fclose(f);
    // A header that claims 192 MiB (under the limit) on a short stream: a truncated payload.
    // (rec_read's buffer grows with the bytes that arrive; memory is not measured here.)
    one[8] = 0, one[9] = 0, one[10] = 0x80, one[11] = 0x0b;  // 0x0b800000 = 192 MiB
    f = fmemopen(one, (size_t)size, "rb");
    r = rec_reader_open(f, "lie", &err);
    snprintf(want, sizeof want, "lie: byte 0: record 0: truncated payload: %ld of 192937984 bytes", size - 24);
    ok(rec_read(r, &rec, &err) == -1 && strncmp(err.msg, want, strlen(want)) == 0, "a lying length: %s", err.msg);
    rec_reader_close(r);
    fclose(f);
    free(one);

    f = fopen("/dev/null", "rb");
    r = rec_reader_open(f, "empty", &err);
    is_int(rec_read(r, &rec, &err), 0, "empty stream: 0 records, no error");
    rec_reader_close(r);
    fclose(f);
}

static void test_corruptions(void)
{
    unsigned char bad[sizeof golden_tokens + 64];
    const unsigned long at = sizeof golden_text;  // the bad record's offset in the stream
#define EDIT(expr)                                        \
    do {                                                  \
        memcpy(bad, golden_tokens, sizeof golden_tokens); \
        expr;                                             \
    } while (0)

    EDIT(bad[0] = 'X');
    make_stream(bad, sizeof golden_tokens);
    expect_error("bad magic", at, "bad magic 58 4c 52");
    const char *json = "{\"instruction\": \"say hi\", \"output\": \"hi\"}\n";
    make_stream((const unsigned char *)json, strlen(json));
    expect_error("JSON instead of records", at, "looks like JSON");
    const char *text = "hello world, this is text\n";
    make_stream((const unsigned char *)text, strlen(text));
    expect_error("text instead of records", at, "looks like text");
    make_stream(golden_tokens, 10);
    expect_error("truncated header", at, "truncated header: 10 of 24 bytes");
    make_stream(golden_tokens, 2);
    expect_error("truncated inside the magic", at, "truncated header: 2 of 24");
    make_stream(golden_tokens, sizeof golden_tokens - 1);
    expect_error("truncated payload", at, "truncated payload: 50 of 51 bytes");
    make_stream(golden_tokens, 24);
    expect_error("header without payload", at, "truncated payload: 0 of 51 bytes");
    EDIT(bad[60] ^= 1);
    make_stream(bad, sizeof golden_tokens);
    expect_error("one bit flipped in the payload", at, "checksum mismatch");
    EDIT(bad[20] ^= 0x80);
    make_stream(bad, sizeof golden_tokens);
    expect_error("one bit flipped in the checksum", at, "checksum mismatch");
    EDIT(bad[11] = 0x40);
    make_stream(bad, sizeof golden_tokens);
    expect_error("absurd payload length", at, "absurd payload length 1073741875");
    EDIT((bad[4] = 9, rehash(bad)));
    make_stream(bad, sizeof golden_tokens);
    expect_error("unknown kind", at + 4, "unknown kind 9");
    EDIT((bad[5] = 1, rehash(bad)));
    make_stream(bad, sizeof golden_tokens);
    expect_error("unknown record flags", at + 5, "unknown record flags 0x01");
    EDIT((bad[14] = 1, rehash(bad)));
    make_stream(bad, sizeof golden_tokens);
    expect_error("reserved bytes", at + 12, "reserved header bytes 12..15 not zero");
    EDIT(bad[3] = 2);
    make_stream(bad, sizeof golden_tokens);
    expect_error("future version", at, "written by a newer version 2 of the format; this reader knows 1");
    EDIT(bad[3] = 0);
    make_stream(bad, sizeof golden_tokens);
    expect_error("version 0", at, "version byte 0");

    // Payload structure (offsets: payload at +24, origin length at +40, table at +43).
    EDIT((bad[24 + 16] = 200, rehash(bad)));
    make_stream(bad, sizeof golden_tokens);
    expect_error("origin past the end", at + 40, "origin name of 200 bytes runs past the payload end");
    EDIT((bad[6] = 9, rehash(bad)));
    make_stream(bad, sizeof golden_tokens);
    expect_error("segment table past the end", at + 43, "table of 9 segments runs past");
    EDIT((bad[43 + 8 + 4] = 1, rehash(bad)));
    make_stream(bad, sizeof golden_tokens);
    expect_error("segment lengths short of the payload", at + 24, "segments hold 12 bytes but 16 follow");
    EDIT((bad[43 + 8 + 4] = 3, rehash(bad)));
    make_stream(bad, sizeof golden_tokens);
    expect_error("segment lengths past the payload", at + 24, "segments hold 20 bytes but 16 follow");
    EDIT((bad[43] = 0x10, rehash(bad)));
    make_stream(bad, sizeof golden_tokens);
    expect_error("unknown segment flags", at + 43, "segment 0: unknown segment flags (flags 0x10)");
    EDIT((bad[43 + 8] = REC_TRAINED | REC_EOS, rehash(bad)));
    make_stream(bad, sizeof golden_tokens);
    expect_error("EOS on a tokens segment", at + 51, "segment 1: EOS or SPECIAL flag on a tokens segment");
    EDIT((bad[43] = REC_SPECIAL, rehash(bad)));
    make_stream(bad, sizeof golden_tokens);
    expect_error("SPECIAL on a tokens segment", at + 43, "segment 0: EOS or SPECIAL flag on a tokens segment");
    EDIT((bad[43 + 2] = 1, rehash(bad)));
    make_stream(bad, sizeof golden_tokens);
    expect_error("segment reserved bytes", at + 44, "segment 0: reserved bytes not zero");
    EDIT((bad[4] = REC_TEXT, rehash(bad)));
    make_stream(bad, sizeof golden_tokens);
    expect_error("text record with a fingerprint", at + 32, "text record with a tokenizer fingerprint");
    {   // a payload shorter than its fixed prefix
        unsigned char tiny[24 + 10] = {'A', 'L', 'R', 1, REC_TEXT, 0, 0, 0, 10};
        rehash(tiny);
        make_stream(tiny, sizeof tiny);
        expect_error("payload shorter than its prefix", at + 24, "shorter than its 18-byte prefix");
    }
#undef EDIT

    // A failed reader stays failed (the position in the stream is lost).
    make_stream(golden_tokens, 10);
    FILE *f = fmemopen(stream, stream_len, "rb");
    Err err;
    RecReader *r = rec_reader_open(f, "s", &err);
    Record rec;
    rec_read(r, &rec, &err);
    rec_read(r, &rec, &err);
    ok(rec_read(r, &rec, &err) == -1 && strstr(err.msg, "truncated header"), "errors are sticky");
    rec_reader_close(r);
    fclose(f);
}

// Every single-bit change anywhere in a stream is caught: the checksum covers every
// byte but itself, and a change to it or to the length shows as a mismatch or a cut.
static void test_every_bit_flip(void)
{
    make_stream(golden_tokens, sizeof golden_tokens);
    static unsigned char copy[sizeof golden_text + sizeof golden_tokens];
    int caught = 0, tried = 0;
    for (size_t i = 0; i < stream_len; i++)
        for (int bit = 0; bit < 8; bit++) {
            memcpy(copy, stream, stream_len);
            copy[i] ^= (unsigned char)(1u << bit);
            Err err;
            int records;
            caught += read_all(copy, stream_len, &records, &err) == -1;
            tried++;
        }
    is_int(caught, tried, "all %d single-bit changes of the golden stream are rejected", tried);
}

static void test_writer_rejects(void)
{
    Err err = {{0}};
    unsigned char buf[256];
    Record rec = text_record;
    rec.kind = 3;
    ok(rec_encode(&rec, buf, sizeof buf, &err) == -1 && strstr(err.msg, "unknown kind 3"), "writer: unknown kind");
    rec = text_record;
    rec.fingerprint = 5;
    ok(rec_encode(&rec, buf, sizeof buf, &err) == -1 && strstr(err.msg, "fingerprint"), "writer: text fingerprint");
    RecSegment segs[2] = {token_segments[0], token_segments[1]};
    rec = tokens_record;
    rec.seg = segs;
    segs[1].flags = REC_TRAINED | REC_EOS;
    ok(rec_encode(&rec, buf, sizeof buf, &err) == -1 && strstr(err.msg, "segment 1: EOS or SPECIAL"),
       "writer: EOS on tokens");
    segs[1].flags = 0x20;
    ok(rec_encode(&rec, buf, sizeof buf, &err) == -1 && strstr(err.msg, "unknown segment flags"),
       "writer: unknown segment flags");
    segs[1].flags = REC_TRAINED;
    segs[1].len = REC_MAX_PAYLOAD / 4;
    ok(rec_encode(&rec, NULL, 0, &err) == -1 && strstr(err.msg, "payload over"), "writer: payload over the limit");
    rec = text_record;
    rec.origin_len = REC_MAX_ORIGIN + 1;
    ok(rec_encode(&rec, NULL, 0, &err) == -1 && strstr(err.msg, "origin name"), "writer: origin too long");
    rec = text_record;
    rec.nseg = REC_MAX_SEGMENTS + 1;
    ok(rec_encode(&rec, NULL, 0, &err) == -1 && strstr(err.msg, "segments (at most"), "writer: too many segments");

    FILE *full = fopen("/dev/full", "wb");
    if (full) {
        setvbuf(full, NULL, _IONBF, 0);
        ok(rec_write(full, &text_record, &err) == -1 && strstr(err.msg, "write error"), "writer: failed write reported");
        fclose(full);
    } else {
        printf("ok %d # SKIP /dev/full not available\n", ++tap_n);
    }
}

// The JSON face: the golden records as tests/fixtures/recs/golden.jsonl spells them
// (written by make_golden.py with Python's json module).
static void test_json(void)
{
    static const char *const lines[2] = {
        "{\"kind\":\"text\",\"origin\":\"alpaca_tiny.json\",\"index\":3,\"segments\":[{\"trained\":false,"
        "\"text\":\"Hello\\n\"},{\"trained\":true,\"eos\":true,\"text\":\"World\"}]}\n",
        "{\"kind\":\"tokens\",\"origin\":\"t\",\"index\":7,\"fingerprint\":\"0123456789abcdef\",\"segments\":["
        "{\"trained\":false,\"ids\":[1,15043]},{\"trained\":true,\"ids\":[3186,2]}]}\n",
    };
    const Record *records[2] = {&text_record, &tokens_record};
    const unsigned char *golden[2] = {golden_text, golden_tokens};
    const size_t golden_size[2] = {sizeof golden_text, sizeof golden_tokens};
    RecJsonParser *parser = rec_json_parser_new();
    for (int i = 0; i < 2; i++) {
        char out[512] = {0};
        FILE *f = fmemopen(out, sizeof out - 1, "w");
        Err err = {{0}};
        ok(rec_to_json(f, records[i], &err) == 0, "rec_to_json of the golden %s record", i ? "tokens" : "text");
        fclose(f);
        is_str(out, lines[i], "... is the golden JSON line");
        Record rec;
        unsigned char buf[256];
        ok(rec_from_json(parser, lines[i], strlen(lines[i]), &rec, &err) == 0 &&
               rec_encode(&rec, buf, sizeof buf, &err) == (long)golden_size[i] && memcmp(buf, golden[i], golden_size[i]) == 0,
           "rec_from_json of the golden line encodes to the golden bytes");
    }
    Err err = {{0}};
    Record rec;
    const char *hex = "{\"kind\":\"text\",\"origin_hex\":\"ff\",\"segments\":[{\"trained\":true,\"text_hex\":\"00c3\"}]}";
    ok(rec_from_json(parser, hex, strlen(hex), &rec, &err) == 0 && rec.origin_len == 1 && (unsigned char)rec.origin[0] == 0xff &&
           rec.nseg == 1 && rec.seg[0].len == 2 && memcmp(rec.seg[0].text, "\0\xc3", 2) == 0,
       "origin_hex and text_hex decode to their bytes");
    const char *bad = "{\"kind\":\"text\",\"segments\":[{\"trained\":true,\"txet\":\"a\"}]}";
    ok(rec_from_json(parser, bad, strlen(bad), &rec, &err) == -1 && strstr(err.msg, "segment 0: unknown key \"txet\""),
       "an unknown key is an error: %s", err.msg);
    rec_json_parser_free(parser);

    RecStats stats = {0};
    rec_stats_add(&stats, &text_record);
    rec_stats_add(&stats, &tokens_record);
    ok(stats.text_records == 1 && stats.text_segments == 2 && stats.text_bytes == 11 && stats.trained_text_bytes == 5 &&
           stats.eos_segments == 1 && stats.token_records == 1 && stats.tokens == 4 && stats.trained_tokens == 2,
       "rec_stats_add counts records, segments, bytes, tokens and trained ones");
}

int main(void)
{
    test_golden();
    test_round_trip();
    test_corruptions();
    test_every_bit_flip();
    test_writer_rejects();
    test_json();
    return done_testing();
}
