// The record stream: streaming reader and writer. Byte layout in record.h and man/recs.5.
// The reader holds one record at a time (payload buffer grown as needed, never the whole
// input) and checks every rule of the format, in this order, so that the first message
// names the real problem: magic, version, payload length bound, payload present,
// checksum, then the header fields and the payload structure (which a correct
// checksum vouches were written that way, so they are a writer's bug, not damage).
#include "record.h"

#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack: no allocation per record
#include <xxhash.h>
#if defined(__x86_64__) && __has_include(<xxh_x86dispatch.h>)
// libxxhash's runtime-dispatched XXH3 (AVX2 / AVX-512 where present): the same hash as the
// plain entry points, which are built for x86-64's baseline SSE2, at about twice the speed.
#include <xxh_x86dispatch.h>
#endif

static const unsigned char rec_magic[3] = {'A', 'L', 'R'};

// Payload = fixed prefix (origin index, fingerprint, origin name length), origin name,
// segment table, segment data.
enum { PREFIX_SIZE = 8 + 8 + 2, SEGMENT_ENTRY_SIZE = 8 };
#define SEGMENT_FLAGS_KNOWN (REC_TRAINED | REC_EOS | REC_SPECIAL)

static uint16_t get_u16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get_u64(const unsigned char *p) { return get_u32(p) | (uint64_t)get_u32(p + 4) << 32; }
static void put_u16(unsigned char *p, uint16_t v) { p[0] = v & 0xff; p[1] = v >> 8; }
static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (v >> (8 * i)) & 0xff;
}
static void put_u64(unsigned char *p, uint64_t v)
{
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}

static uint64_t record_checksum(const unsigned char *header, const unsigned char *payload, size_t len)
{
    XXH3_state_t st;
    XXH3_INITSTATE(&st);
    XXH3_64bits_reset(&st);
    XXH3_64bits_update(&st, header, 16);
    XXH3_64bits_update(&st, payload, len);
    return XXH3_64bits_digest(&st);
}

// Rules shared by writer and reader for one segment's flags. Returns NULL when fine.
static const char *segment_flags_problem(int kind, unsigned flags)
{
    if (flags & ~(unsigned)SEGMENT_FLAGS_KNOWN)
        return "unknown segment flags";
    if (kind == REC_TOKENS && (flags & (REC_EOS | REC_SPECIAL)))
        return "EOS or SPECIAL flag on a tokens segment (text only)";
    return NULL;
}

/* ---------------------------------------------------------------- writer */

static size_t unit_size(int kind) { return kind == REC_TOKENS ? 4 : 1; }

long rec_encode(const Record *rec, unsigned char *buf, size_t cap, Err *err)
{
    if (rec->kind != REC_TEXT && rec->kind != REC_TOKENS)
        return err_set(err, "record: unknown kind %d", rec->kind);
    if (rec->kind == REC_TEXT && rec->fingerprint != 0)
        return err_set(err, "record: text record with a tokenizer fingerprint (only tokens records carry one)");
    if (rec->origin_len > REC_MAX_ORIGIN)
        return err_set(err, "record: origin name of %zu bytes (at most %d)", rec->origin_len, REC_MAX_ORIGIN);
    if (rec->origin_len && !rec->origin)
        return err_set(err, "record: origin length %zu without origin bytes", rec->origin_len);
    if (rec->nseg > REC_MAX_SEGMENTS)
        return err_set(err, "record: %zu segments (at most %d)", rec->nseg, REC_MAX_SEGMENTS);
    if (rec->nseg && !rec->seg)
        return err_set(err, "record: %zu segments without a segment array", rec->nseg);
    size_t unit = unit_size(rec->kind);
    uint64_t payload = PREFIX_SIZE + rec->origin_len + (uint64_t)SEGMENT_ENTRY_SIZE * rec->nseg;
    for (size_t i = 0; i < rec->nseg; i++) {
        const RecSegment *s = &rec->seg[i];
        const char *problem = segment_flags_problem(rec->kind, s->flags);
        if (problem)
            return err_set(err, "record: segment %zu: %s (flags 0x%x)", i, problem, s->flags);
        if (s->len > UINT32_MAX || s->len > REC_MAX_PAYLOAD)
            return err_set(err, "record: segment %zu: length %zu too large", i, s->len);
        if (s->len && (rec->kind == REC_TEXT ? (const void *)s->text : (const void *)s->ids) == NULL)
            return err_set(err, "record: segment %zu: length %zu without data", i, s->len);
        payload += (uint64_t)s->len * unit;
        if (payload > REC_MAX_PAYLOAD)
            break;
    }
    if (payload > REC_MAX_PAYLOAD)
        return err_set(err, "record: payload over %u bytes (the format's limit)", REC_MAX_PAYLOAD);
    size_t total = REC_HEADER_SIZE + (size_t)payload;
    if (!buf || cap < total)
        return (long)total;

    unsigned char *h = buf, *p = buf + REC_HEADER_SIZE;
    memcpy(h, rec_magic, 3);
    h[3] = REC_VERSION;
    h[4] = (unsigned char)rec->kind;
    h[5] = 0;
    put_u16(h + 6, (uint16_t)rec->nseg);
    put_u32(h + 8, (uint32_t)payload);
    put_u32(h + 12, 0);

    put_u64(p, rec->origin_index);
    put_u64(p + 8, rec->fingerprint);
    put_u16(p + 16, (uint16_t)rec->origin_len);
    unsigned char *q = p + PREFIX_SIZE;
    if (rec->origin_len)
        memcpy(q, rec->origin, rec->origin_len);
    q += rec->origin_len;
    for (size_t i = 0; i < rec->nseg; i++, q += SEGMENT_ENTRY_SIZE) {
        q[0] = (unsigned char)rec->seg[i].flags;
        q[1] = q[2] = q[3] = 0;
        put_u32(q + 4, (uint32_t)rec->seg[i].len);
    }
    for (size_t i = 0; i < rec->nseg; i++) {
        const RecSegment *s = &rec->seg[i];
        if (rec->kind == REC_TEXT) {
            if (s->len)
                memcpy(q, s->text, s->len);
            q += s->len;
        } else {
            for (size_t k = 0; k < s->len; k++, q += 4)
                put_u32(q, s->ids[k]);
        }
    }
    put_u64(h + 16, record_checksum(h, p, (size_t)payload));
    return (long)total;
}

int rec_write(FILE *f, const Record *rec, Err *err)
{
    // Small records (the common case) are encoded on the stack; larger ones in a
    // buffer of their own size, freed at once (the writer keeps no state).
    unsigned char local[8192];
    long size = rec_encode(rec, NULL, 0, err);
    if (size < 0)
        return -1;
    unsigned char *buf = (size_t)size <= sizeof local ? local : malloc((size_t)size);
    if (!buf)
        return err_set(err, "record: out of memory for a %ld-byte record", size);
    rec_encode(rec, buf, (size_t)size, err);
    size_t wrote = fwrite(buf, 1, (size_t)size, f);
    if (buf != local)
        free(buf);
    if (wrote != (size_t)size || ferror(f))
        return err_set(err, "write error: %s", strerror(errno));
    return 0;
}

/* ---------------------------------------------------------------- reader */

struct RecReader {
    FILE *f;
    char *name;
    uint64_t offset;          // bytes consumed so far (start of the next record)
    uint64_t index;           // records read so far (index of the next record, from 0)
    int failed;               // a reader that failed stays failed: the stream position is lost
    unsigned char header[REC_HEADER_SIZE];
    unsigned char *payload;   // (payload_cap) bytes; holds the current record's payload
    size_t payload_cap;
    RecSegment *seg;          // (seg_cap) segments of the current record
    size_t seg_cap;
    uint32_t *ids;            // (ids_cap) the current tokens record's ids, decoded and aligned
    size_t ids_cap;
    char saved_msg[sizeof(Err)];  // the message of the failure, repeated on later calls
};

RecReader *rec_reader_open(FILE *f, const char *name, Err *err)
{
    RecReader *r = calloc(1, sizeof *r);
    if (!r || !(r->name = strdup(name ? name : "<stdin>"))) {
        free(r);
        err_set(err, "%s: out of memory", name ? name : "<stdin>");
        return NULL;
    }
    r->f = f;
    return r;
}

void rec_reader_close(RecReader *r)
{
    if (!r)
        return;
    free(r->name);
    free(r->payload);
    free(r->seg);
    free(r->ids);
    free(r);
}

uint64_t rec_reader_offset(const RecReader *r) { return r->offset; }
uint64_t rec_reader_index(const RecReader *r) { return r->index; }

// Fail the read of the current record: the message names stream, byte offset of the
// record (or of the field, when given) and the record's index.
static int fail_at(RecReader *r, Err *err, uint64_t offset, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int fail_at(RecReader *r, Err *err, uint64_t offset, const char *fmt, ...)
{
    char what[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    snprintf(r->saved_msg, sizeof r->saved_msg, "%s: byte %llu: record %llu: %s", r->name,
             (unsigned long long)offset, (unsigned long long)r->index, what);
    r->failed = 1;
    return err_set(err, "%s", r->saved_msg);
}

// Read up to n bytes; returns how many arrived (short only at end of input), -1 on error.
static long read_full(RecReader *r, unsigned char *buf, size_t n)
{
    size_t got = fread(buf, 1, n, r->f);
    if (got < n && ferror(r->f))
        return -1;
    return (long)got;
}

// What is the input, when it is not records? Only said when it helps the user.
static const char *guess_non_record_input(const unsigned char *b, size_t n)
{
    size_t i = 0;
    if (n >= 3 && b[0] == 0xef && b[1] == 0xbb && b[2] == 0xbf)
        i = 3;  // UTF-8 byte order mark
    while (i < n && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r'))
        i++;
    if (i < n && (b[i] == '{' || b[i] == '['))
        return "the input looks like JSON, not records: make records with alp-fmt, or with recs load from recs dump output";
    if (n >= 2 && b[0] == 0x1f && b[1] == 0x8b)
        return "the input looks gzip-compressed: decompress it first (zcat)";
    for (size_t k = 0; k < n; k++)
        if (b[k] < 0x09 || (b[k] > 0x0d && b[k] < 0x20) || b[k] == 0x7f)
            return NULL;
    return "the input looks like text, not records";
}

static int grow(void **buf, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : 64;
    while (n < need)
        n *= 2;
    void *p = realloc(*buf, n * elem);
    if (!p)
        return -1;
    *buf = p;
    *cap = n;
    return 0;
}

int rec_read(RecReader *r, Record *rec, Err *err)
{
    if (r->failed)
        return err_set(err, "%s", r->saved_msg);
    const uint64_t at = r->offset;
    unsigned char *h = r->header;

    long got = read_full(r, h, REC_HEADER_SIZE);
    if (got < 0)
        return fail_at(r, err, at, "read error: %s", strerror(errno));
    if (got == 0)
        return 0;  // clean end of stream (an empty stream is a valid stream of 0 records)
    size_t magic_seen = (size_t)got < 3 ? (size_t)got : 3;
    if (memcmp(h, rec_magic, magic_seen) != 0) {
        const char *guess = guess_non_record_input(h, (size_t)got);
        return fail_at(r, err, at, "bad magic %02x %02x %02x (want 41 4c 52, \"ALR\")%s%s", h[0],
                       got > 1 ? h[1] : 0, got > 2 ? h[2] : 0, guess ? "; " : "", guess ? guess : "");
    }
    if (got >= 4 && h[3] > REC_VERSION)
        return fail_at(r, err, at, "written by a newer version %u of the format; this reader knows %d",
                       h[3], REC_VERSION);
    if (got >= 4 && h[3] == 0)
        return fail_at(r, err, at, "bad magic: version byte 0 (want %d)", REC_VERSION);
    if (got < REC_HEADER_SIZE)
        return fail_at(r, err, at, "truncated header: %ld of %d bytes (the stream was cut short)", got,
                       REC_HEADER_SIZE);

    uint32_t payload_len = get_u32(h + 8);
    if (payload_len > REC_MAX_PAYLOAD)
        return fail_at(r, err, at, "absurd payload length %u (at most %u): corrupt header", payload_len,
                       REC_MAX_PAYLOAD);
    // The buffer grows with the bytes that arrive, at most doubling, so that a length that
    // lies (a damaged header on a short stream) costs no more memory than the data.
    size_t have = 0;  // payload bytes read
    while (have < payload_len) {
        size_t want = have * 2 > 65536 ? have * 2 : 65536;
        if (want > payload_len)
            want = payload_len;
        if (grow((void **)&r->payload, &r->payload_cap, want, 1) < 0)
            return fail_at(r, err, at, "out of memory for a %u-byte payload", payload_len);
        got = read_full(r, r->payload + have, want - have);
        if (got < 0)
            return fail_at(r, err, at, "read error: %s", strerror(errno));
        have += (size_t)got;
        if (have < want)
            return fail_at(r, err, at, "truncated payload: %zu of %u bytes (the stream was cut short)", have,
                           payload_len);
    }
    if (grow((void **)&r->payload, &r->payload_cap, 1, 1) < 0)  // a buffer even for an empty payload
        return fail_at(r, err, at, "out of memory");
    unsigned char *p = r->payload;
    uint64_t stored = get_u64(h + 16), computed = record_checksum(h, p, payload_len);
    if (stored != computed)
        return fail_at(r, err, at, "checksum mismatch (stored %016llx, computed %016llx): corrupt record",
                       (unsigned long long)stored, (unsigned long long)computed);

    // The checksum holds: what follows was written this way, by a writer breaking the rules.
    int kind = h[4];
    if (kind != REC_TEXT && kind != REC_TOKENS)
        return fail_at(r, err, at + 4, "unknown kind %d (1 text, 2 tokens)", kind);
    if (h[5] != 0)
        return fail_at(r, err, at + 5, "unknown record flags 0x%02x (none defined in version %d)", h[5],
                       REC_VERSION);
    if (get_u32(h + 12) != 0)
        return fail_at(r, err, at + 12, "reserved header bytes 12..15 not zero");
    size_t nseg = get_u16(h + 6);

    const uint64_t pay_at = at + REC_HEADER_SIZE;
    if (payload_len < PREFIX_SIZE)
        return fail_at(r, err, pay_at, "malformed payload: %u bytes, shorter than its %d-byte prefix",
                       payload_len, PREFIX_SIZE);
    rec->kind = kind;
    rec->origin_index = get_u64(p);
    rec->fingerprint = get_u64(p + 8);
    rec->origin_len = get_u16(p + 16);
    rec->origin = (const char *)p + PREFIX_SIZE;
    if (kind == REC_TEXT && rec->fingerprint != 0)
        return fail_at(r, err, pay_at + 8, "malformed payload: text record with a tokenizer fingerprint");
    uint64_t table_at = PREFIX_SIZE + (uint64_t)rec->origin_len;
    if (table_at > payload_len)
        return fail_at(r, err, pay_at + 16, "malformed payload: origin name of %zu bytes runs past the payload end",
                       rec->origin_len);
    uint64_t data_at = table_at + (uint64_t)SEGMENT_ENTRY_SIZE * nseg;
    if (data_at > payload_len)
        return fail_at(r, err, pay_at + table_at, "malformed payload: table of %zu segments runs past the payload end",
                       nseg);

    if (grow((void **)&r->seg, &r->seg_cap, nseg ? nseg : 1, sizeof *r->seg) < 0)
        return fail_at(r, err, at, "out of memory for %zu segments", nseg);
    size_t unit = unit_size(kind);
    uint64_t data_len = 0;
    for (size_t i = 0; i < nseg; i++) {
        const unsigned char *e = p + table_at + SEGMENT_ENTRY_SIZE * i;
        const uint64_t e_at = pay_at + table_at + SEGMENT_ENTRY_SIZE * i;
        const char *problem = segment_flags_problem(kind, e[0]);
        if (problem)
            return fail_at(r, err, e_at, "malformed payload: segment %zu: %s (flags 0x%02x)", i, problem, e[0]);
        if (e[1] | e[2] | e[3])
            return fail_at(r, err, e_at + 1, "malformed payload: segment %zu: reserved bytes not zero", i);
        r->seg[i].flags = e[0];
        r->seg[i].len = get_u32(e + 4);
        data_len += (uint64_t)r->seg[i].len * unit;
    }
    if (data_at + data_len != payload_len)
        return fail_at(r, err, pay_at, "malformed payload: segments hold %llu bytes but %llu follow the segment table",
                       (unsigned long long)data_len, (unsigned long long)(payload_len - data_at));

    // Point the segments at their data. Token ids are decoded into an aligned array
    // (in the payload they sit at any offset, little-endian).
    if (kind == REC_TOKENS && grow((void **)&r->ids, &r->ids_cap, data_len / 4 ? data_len / 4 : 1, 4) < 0)
        return fail_at(r, err, at, "out of memory for %llu token ids", (unsigned long long)(data_len / 4));
    const unsigned char *d = p + data_at;
    uint32_t *ids = r->ids;
    for (size_t i = 0; i < nseg; i++) {
        RecSegment *s = &r->seg[i];
        if (kind == REC_TEXT) {
            s->text = (const char *)d;
            s->ids = NULL;
            d += s->len;
        } else {
            s->text = NULL;
            s->ids = ids;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            memcpy(ids, d, s->len * 4);   // the stream's byte order is the host's: a plain copy
            ids += s->len;
            d += s->len * 4;
#else
            for (size_t k = 0; k < s->len; k++, d += 4)
                *ids++ = get_u32(d);
#endif
        }
    }
    rec->nseg = nseg;
    rec->seg = r->seg;
    r->offset += REC_HEADER_SIZE + payload_len;
    r->index++;
    return 1;
}

/* ---------------------------------------------------------------- JSONL face */

// Strict UTF-8 as RFC 3629 (and jansson, which reads it back) define it: no overlong
// forms, no surrogates, nothing above U+10FFFF.
static int is_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        unsigned min, cp;
        if (c >= 0xc2 && c <= 0xdf)
            need = 1, min = 0x80, cp = c & 0x1f;
        else if (c >= 0xe0 && c <= 0xef)
            need = 2, min = 0x800, cp = c & 0x0f;
        else if (c >= 0xf0 && c <= 0xf4)
            need = 3, min = 0x10000, cp = c & 0x07;
        else
            return 0;
        if (n - i <= need)
            return 0;
        for (size_t k = 1; k <= need; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return 0;
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += need + 1;
    }
    return 1;
}

// Writes "key":"escaped" or, for bytes that are not UTF-8, "key_hex":"hex".
static void json_bytes(FILE *f, const char *key, const char *s, size_t n)
{
    const unsigned char *b = (const unsigned char *)s;
    if (n && !is_utf8(b, n)) {
        static const char hex[] = "0123456789abcdef";
        fprintf(f, "\"%s_hex\":\"", key);
        for (size_t i = 0; i < n; i++) {
            putc(hex[b[i] >> 4], f);
            putc(hex[b[i] & 15], f);
        }
        putc('"', f);
        return;
    }
    fprintf(f, "\"%s\":\"", key);
    size_t run = 0;  // start of the bytes not yet written that need no escape
    for (size_t i = 0; i < n; i++) {
        unsigned c = b[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        fwrite(b + run, 1, i - run, f);
        run = i + 1;
        switch (c) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\n': fputs("\\n", f); break;
        case '\r': fputs("\\r", f); break;
        case '\t': fputs("\\t", f); break;
        case '\b': fputs("\\b", f); break;
        case '\f': fputs("\\f", f); break;
        default: fprintf(f, "\\u%04x", c);
        }
    }
    fwrite(b + run, 1, n - run, f);
    putc('"', f);
}

int rec_to_json(FILE *f, const Record *rec, Err *err)
{
    fprintf(f, "{\"kind\":\"%s\",", rec->kind == REC_TEXT ? "text" : "tokens");
    json_bytes(f, "origin", rec->origin, rec->origin_len);
    fprintf(f, ",\"index\":%llu,", (unsigned long long)rec->origin_index);
    if (rec->kind == REC_TOKENS)
        fprintf(f, "\"fingerprint\":\"%016llx\",", (unsigned long long)rec->fingerprint);
    fputs("\"segments\":[", f);
    for (size_t i = 0; i < rec->nseg; i++) {
        const RecSegment *s = &rec->seg[i];
        fprintf(f, "%s{\"trained\":%s,", i ? "," : "", s->flags & REC_TRAINED ? "true" : "false");
        if (s->flags & REC_EOS)
            fputs("\"eos\":true,", f);
        if (s->flags & REC_SPECIAL)
            fputs("\"special\":true,", f);
        if (rec->kind == REC_TEXT) {
            json_bytes(f, "text", s->text, s->len);
        } else {
            fputs("\"ids\":[", f);
            for (size_t k = 0; k < s->len; k++)
                fprintf(f, k ? ",%u" : "%u", (unsigned)s->ids[k]);
            putc(']', f);
        }
        putc('}', f);
    }
    fputs("]}\n", f);
    if (ferror(f))
        return err_set(err, "write error: %s", strerror(errno));
    return 0;
}

struct RecJsonParser {
    json_t *root;             // the current line's document; strings point into it
    RecSegment *seg;          // (seg_cap)
    size_t seg_cap;
    unsigned char *bytes;     // (bytes_cap) decoded hex: origin_hex and text_hex
    size_t bytes_cap;
    uint32_t *ids;            // (ids_cap) every segment's ids, in order
    size_t ids_cap;
};

RecJsonParser *rec_json_parser_new(void) { return calloc(1, sizeof(RecJsonParser)); }

void rec_json_parser_free(RecJsonParser *p)
{
    if (!p)
        return;
    json_decref(p->root);
    free(p->seg);
    free(p->bytes);
    free(p->ids);
    free(p);
}

static int hex_digit(int c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

// Decodes the hex string v onto p->bytes + *used (sized beforehand); returns where it starts.
static const char *append_hex(RecJsonParser *p, size_t *used, json_t *v, const char *what, Err *err)
{
    const char *h = json_string_value(v);
    size_t n = json_string_length(v);
    if (n % 2) {
        err_set(err, "%s: odd number of hex digits", what);
        return NULL;
    }
    const char *start = (const char *)p->bytes + *used;
    for (size_t i = 0; i < n; i += 2) {
        int hi = hex_digit(h[i]), lo = hex_digit(h[i + 1]);
        if (hi < 0 || lo < 0) {
            err_set(err, "%s: not a hex digit at position %zu", what, hi < 0 ? i : i + 1);
            return NULL;
        }
        p->bytes[(*used)++] = (unsigned char)(hi << 4 | lo);
    }
    return start;
}

// Sizes p->bytes and p->ids for everything this document can decode into them, so that
// pointers into them stay put while the record is assembled.
static int size_buffers(RecJsonParser *p, json_t *root, json_t *segs, Err *err)
{
    size_t bytes = json_string_length(json_object_get(root, "origin_hex")) / 2 + 1, ids = 1;
    for (size_t i = 0; i < json_array_size(segs); i++) {
        json_t *s = json_array_get(segs, i);
        bytes += json_string_length(json_object_get(s, "text_hex")) / 2;
        ids += json_array_size(json_object_get(s, "ids"));
    }
    if (grow((void **)&p->bytes, &p->bytes_cap, bytes, 1) < 0 || grow((void **)&p->ids, &p->ids_cap, ids, sizeof *p->ids) < 0)
        return err_set(err, "out of memory");
    return 0;
}

static int json_flag(json_t *seg, const char *key, int required, size_t i, Err *err)
{
    json_t *v = json_object_get(seg, key);
    if (!v)
        return required ? err_set(err, "segment %zu: missing \"%s\" (true or false)", i, key) : 0;
    if (!json_is_boolean(v))
        return err_set(err, "segment %zu: \"%s\" must be true or false", i, key);
    return json_is_true(v);
}

int rec_from_json(RecJsonParser *p, const char *json, size_t len, Record *rec, Err *err)
{
    json_decref(p->root);
    json_error_t jerr;
    p->root = json_loadb(json, len, JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES, &jerr);
    if (!p->root)
        return err_set(err, "invalid JSON: %s (column %d)", jerr.text, jerr.column);
    json_t *root = p->root;
    if (!json_is_object(root))
        return err_set(err, "not a JSON object");
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v)
    {
        static const char *const known[] = {"kind", "origin", "origin_hex", "index", "fingerprint", "segments"};
        size_t k = 0;
        while (k < sizeof known / sizeof *known && strcmp(key, known[k]) != 0)
            k++;
        if (k == sizeof known / sizeof *known)
            return err_set(err, "unknown key \"%s\"", key);
    }

    memset(rec, 0, sizeof *rec);
    const char *kind = json_string_value(json_object_get(root, "kind"));
    if (!kind)
        return err_set(err, "missing \"kind\" (\"text\" or \"tokens\")");
    if (strcmp(kind, "text") == 0)
        rec->kind = REC_TEXT;
    else if (strcmp(kind, "tokens") == 0)
        rec->kind = REC_TOKENS;
    else
        return err_set(err, "unknown kind \"%s\" (\"text\" or \"tokens\")", kind);

    json_t *segs = json_object_get(root, "segments");
    if (!json_is_array(segs))
        return err_set(err, "missing \"segments\" (an array)");
    if (size_buffers(p, root, segs, err) < 0)
        return -1;
    size_t used = 0;  // bytes of p->bytes in use by this record
    json_t *origin = json_object_get(root, "origin"), *origin_hex = json_object_get(root, "origin_hex");
    if (origin && origin_hex)
        return err_set(err, "both \"origin\" and \"origin_hex\"");
    if ((origin && !json_is_string(origin)) || (origin_hex && !json_is_string(origin_hex)))
        return err_set(err, "\"%s\" must be a string", origin ? "origin" : "origin_hex");
    if (origin) {
        rec->origin = json_string_value(origin);
        rec->origin_len = json_string_length(origin);
    } else if (origin_hex) {
        if (!(rec->origin = append_hex(p, &used, origin_hex, "\"origin_hex\"", err)))
            return -1;
        rec->origin_len = used;
    }

    json_t *index = json_object_get(root, "index");
    if (index && (!json_is_integer(index) || json_integer_value(index) < 0))
        return err_set(err, "\"index\" must be an integer from 0");
    rec->origin_index = index ? (uint64_t)json_integer_value(index) : 0;

    json_t *fp = json_object_get(root, "fingerprint");
    if (fp) {
        const char *h = json_string_value(fp);
        if (rec->kind != REC_TOKENS)
            return err_set(err, "\"fingerprint\" in a text record (only tokens records carry one)");
        if (!h || json_string_length(fp) != 16)
            return err_set(err, "\"fingerprint\" must be a string of 16 hex digits");
        for (int i = 0; i < 16; i++) {
            int d = hex_digit(h[i]);
            if (d < 0)
                return err_set(err, "\"fingerprint\" must be a string of 16 hex digits");
            rec->fingerprint = rec->fingerprint << 4 | (uint64_t)d;
        }
    }

    size_t nseg = json_array_size(segs);
    if (nseg > REC_MAX_SEGMENTS)
        return err_set(err, "%zu segments (at most %d)", nseg, REC_MAX_SEGMENTS);
    if (grow((void **)&p->seg, &p->seg_cap, nseg ? nseg : 1, sizeof *p->seg) < 0)
        return err_set(err, "out of memory");
    size_t nids = 0;
    for (size_t i = 0; i < nseg; i++) {
        json_t *s = json_array_get(segs, i);
        RecSegment *out = &p->seg[i];
        memset(out, 0, sizeof *out);
        if (!json_is_object(s))
            return err_set(err, "segment %zu: not an object", i);
        json_object_foreach(s, key, v)
        {
            static const char *const known[] = {"trained", "eos", "special", "text", "text_hex", "ids"};
            size_t k = 0;
            while (k < sizeof known / sizeof *known && strcmp(key, known[k]) != 0)
                k++;
            if (k == sizeof known / sizeof *known)
                return err_set(err, "segment %zu: unknown key \"%s\"", i, key);
        }
        int trained = json_flag(s, "trained", 1, i, err), eos = json_flag(s, "eos", 0, i, err),
            special = json_flag(s, "special", 0, i, err);
        if (trained < 0 || eos < 0 || special < 0)
            return -1;
        out->flags = (trained ? REC_TRAINED : 0) | (eos ? REC_EOS : 0) | (special ? REC_SPECIAL : 0);
        json_t *text = json_object_get(s, "text"), *text_hex = json_object_get(s, "text_hex"),
               *ids = json_object_get(s, "ids");
        if (rec->kind == REC_TEXT) {
            if (ids)
                return err_set(err, "segment %zu: \"ids\" in a text record", i);
            if (!text == !text_hex)
                return err_set(err, "segment %zu: needs one of \"text\" and \"text_hex\"", i);
            if (!json_is_string(text ? text : text_hex))
                return err_set(err, "segment %zu: \"%s\" must be a string", i, text ? "text" : "text_hex");
            if (text) {
                out->text = json_string_value(text);
                out->len = json_string_length(text);
            } else {
                char what[64];
                snprintf(what, sizeof what, "segment %zu: \"text_hex\"", i);
                size_t before = used;
                if (!(out->text = append_hex(p, &used, text_hex, what, err)))
                    return -1;
                out->len = used - before;
            }
        } else {
            if (text || text_hex)
                return err_set(err, "segment %zu: text in a tokens record", i);
            if (!json_is_array(ids))
                return err_set(err, "segment %zu: missing \"ids\" (an array of token ids)", i);
            size_t n = json_array_size(ids);
            for (size_t k = 0; k < n; k++) {
                json_t *id = json_array_get(ids, k);
                if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) > UINT32_MAX)
                    return err_set(err, "segment %zu: id %zu: not an integer from 0 to 4294967295", i, k);
                p->ids[nids + k] = (uint32_t)json_integer_value(id);
            }
            out->ids = p->ids + nids;
            out->len = n;
            nids += n;
        }
    }
    rec->nseg = nseg;
    rec->seg = p->seg;
    // The writer's rules (flags per kind, limits) are checked here too, so that the error
    // names the line rather than surfacing at write time.
    return rec_encode(rec, NULL, 0, err) < 0 ? -1 : 0;
}

void rec_stats_add(RecStats *s, const Record *rec)
{
    for (size_t i = 0; i < rec->nseg; i++) {
        const RecSegment *g = &rec->seg[i];
        if (rec->kind == REC_TEXT) {
            s->text_bytes += g->len;
            s->trained_text_bytes += g->flags & REC_TRAINED ? g->len : 0;
            s->eos_segments += !!(g->flags & REC_EOS);
        } else {
            s->tokens += g->len;
            s->trained_tokens += g->flags & REC_TRAINED ? g->len : 0;
        }
    }
    if (rec->kind == REC_TEXT) {
        s->text_records++;
        s->text_segments += rec->nseg;
    } else {
        s->token_records++;
        s->token_segments += rec->nseg;
    }
}
