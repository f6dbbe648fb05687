// tok(1)'s record logic: see tok_records.h for the policies.
#define _GNU_SOURCE
#include "tok_records.h"

#include <errno.h>
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

// Grows *p (elements of size elem) to hold at least need; -1 when out of memory.
static int grow(void *p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return 0;
    size_t nc = *cap ? *cap : 64;
    while (nc < need) nc *= 2;
    void *np = realloc(*(void **)p, nc * elem);
    if (!np) return -1;
    *(void **)p = np;
    *cap = nc;
    return 0;
}

// ids and offsets share one capacity (tokenizer_encode's contract).
static int grow_ids(uint32_t **ids, uint32_t **offsets, size_t *cap, size_t need)
{
    if (need <= *cap && *ids && *offsets) return 0;
    size_t nc = *cap ? *cap : 256;
    while (nc < need) nc *= 2;
    uint32_t *a = realloc(*ids, nc * sizeof *a);
    if (!a) return -1;
    *ids = a;
    uint32_t *b = realloc(*offsets, nc * sizeof *b);
    if (!b) return -1;
    *offsets = b;
    *cap = nc;
    return 0;
}

// Offset of the first byte that is not valid UTF-8, or len when all is well.
static size_t utf8_bad_at(const unsigned char *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        // ASCII, most of the text, eight bytes at a time (this check was 15% of tok -j 1's
        // instructions on Alpaca byte by byte).
        uint64_t word;
        if (len - i >= sizeof word) {
            memcpy(&word, s + i, sizeof word);
            if (!(word & 0x8080808080808080ull)) {
                i += sizeof word;
                continue;
            }
        }
        unsigned c = s[i];
        size_t n;
        uint32_t cp, min;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf) n = 2, cp = c & 0x1f, min = 0x80;
        else if (c >= 0xe0 && c <= 0xef) n = 3, cp = c & 0x0f, min = 0x800;
        else if (c >= 0xf0 && c <= 0xf4) n = 4, cp = c & 0x07, min = 0x10000;
        else return i;
        if (len - i < n) return i;
        for (size_t k = 1; k < n; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return i;
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return i;
        i += n;
    }
    return len;
}

// The segment holding byte offset off (segments as their end offsets, (nseg) of them);
// empty segments never hold a byte. Offsets at or past the end go to the last segment.
static size_t segment_of(const size_t *seg_end, size_t nseg, size_t off)
{
    size_t lo = 0, hi = nseg - 1;
    while (lo < hi) {   // first segment whose end is past off
        size_t mid = (lo + hi) / 2;
        if (seg_end[mid] > off) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

void tok_buffers_free(TokBuffers *b)
{
    free(b->text);
    free(b->ids);
    free(b->offsets);
    free(b->tmp_ids);
    free(b->tmp_offsets);
    free(b->out_ids);
    free(b->seg);
    free(b->seg_end);
    free(b->dec);
    free(b->out);
    memset(b, 0, sizeof *b);
}

// tokenizer_encode of text[from, to) appended at n, offsets made absolute.
static long encode_span(const Tokenizer *t, TokBuffers *b, size_t from, size_t to, int parse_special, size_t n,
                        Err *err)
{
    if (grow_ids(&b->ids, &b->offsets, &b->ids_cap, n + 1)) return err_set(err, "out of memory");
    long m = tokenizer_encode(t, b->text + from, to - from, parse_special, &b->ids, &b->ids_cap, n, &b->offsets, err);
    if (m < 0) return -1;
    if (from)
        for (size_t i = n; i < (size_t)m; i++) b->offsets[i] += (uint32_t)from;
    return m;
}

// Tokens of text[skip, total) with special-token names parsed only inside special segments.
// One call over the whole text when that alone respects the rule (the usual case); otherwise
// the text is cut at the special tokens found in special segments and the stretches between
// them are tokenized without parsing.
static long tokenize_record(const Tokenizer *t, const Record *rec, TokBuffers *b, size_t skip, size_t total, Err *err)
{
    int any_special = 0, all_special = 1;
    for (size_t k = 0; k < rec->nseg; k++) {
        if (rec->seg[k].flags & REC_SPECIAL) any_special = 1;
        else if (rec->seg[k].len) all_special = 0;
    }
    long n = encode_span(t, b, skip, total, any_special, 0, err);
    if (n < 0 || !any_special || all_special) return n;
    int respected = 1;
    for (long i = 0; i < n && respected; i++) {
        if (!tokenizer_is_special(t, b->ids[i])) continue;
        size_t k = segment_of(b->seg_end, rec->nseg, b->offsets[i]), len = 0;
        tokenizer_token_bytes(t, b->ids[i], &len);
        respected = (rec->seg[k].flags & REC_SPECIAL) && b->offsets[i] + len <= b->seg_end[k];
    }
    if (respected) return n;

    n = 0;
    size_t pos = skip;
    for (size_t k = 0; k < rec->nseg; k++) {
        size_t start = k ? b->seg_end[k - 1] : 0, end = b->seg_end[k];
        if (!(rec->seg[k].flags & REC_SPECIAL) || start == end) continue;
        if (grow_ids(&b->tmp_ids, &b->tmp_offsets, &b->tmp_cap, 1)) return err_set(err, "out of memory");
        long m = tokenizer_encode(t, b->text + start, end - start, 1, &b->tmp_ids, &b->tmp_cap, 0, &b->tmp_offsets, err);
        if (m < 0) return -1;
        for (long j = 0; j < m; j++) {
            size_t at = start + b->tmp_offsets[j], len = 0;
            if (!tokenizer_is_special(t, b->tmp_ids[j]) || at < pos) continue;
            tokenizer_token_bytes(t, b->tmp_ids[j], &len);
            if ((n = encode_span(t, b, pos, at, 0, (size_t)n, err)) < 0) return -1;
            if (grow_ids(&b->ids, &b->offsets, &b->ids_cap, (size_t)n + 1)) return err_set(err, "out of memory");
            b->ids[n] = b->tmp_ids[j];
            b->offsets[n++] = (uint32_t)at;
            pos = at + len;
        }
    }
    return encode_span(t, b, pos, total, 0, (size_t)n, err);
}

// Encodes the finished Record into b->out.
static int emit_record(const Record *out, TokBuffers *b, Err *err)
{
    long size = rec_encode(out, NULL, 0, err);
    if (size < 0) return -1;
    if (grow(&b->out, &b->out_cap, (size_t)size, 1)) return err_set(err, "out of memory");
    if (rec_encode(out, b->out, b->out_cap, err) != size) return -1;
    b->out_len = (size_t)size;
    return 0;
}

int tok_encode_record(const Tokenizer *t, const TokOptions *o, const Record *rec, TokBuffers *b, TokStats *st,
                      Err *err)
{
    if (rec->kind != REC_TEXT) return err_set(err, "a tokens record: tok wants text records (tok -d decodes tokens)");
    size_t total = 0, nseg = rec->nseg;
    if (grow(&b->seg_end, &b->seg_end_cap, nseg + 1, sizeof *b->seg_end) ||
        grow(&b->seg, &b->seg_cap, nseg + 1, sizeof *b->seg))
        return err_set(err, "out of memory");
    for (size_t k = 0; k < nseg; k++) {
        size_t bad = utf8_bad_at((const unsigned char *)rec->seg[k].text, rec->seg[k].len);
        if (bad < rec->seg[k].len)
            return err_set(err, "segment %zu: invalid UTF-8 at byte %zu of the segment", k + 1, bad);
        total += rec->seg[k].len;
        b->seg_end[k] = total;
    }
    if (total > UINT32_MAX / 2) return err_set(err, "text of %zu bytes is too long", total);
    if (grow(&b->text, &b->text_cap, total + 1, 1)) return err_set(err, "out of memory");
    for (size_t k = 0, at = 0; k < nseg; at += rec->seg[k].len, k++)
        if (rec->seg[k].len) memcpy(b->text + at, rec->seg[k].text, rec->seg[k].len);

    // A BOS string at the very start of plain text becomes the BOS id (never a double BOS);
    // in a special segment the tokenizer parses it itself.
    int64_t bos = tokenizer_bos_id(t);
    size_t skip = 0;
    if (bos >= 0 && nseg > 0 && total > 0) {
        size_t bl = 0, k0 = segment_of(b->seg_end, nseg, 0);
        const char *bs = tokenizer_token_bytes(t, (uint32_t)bos, &bl);
        if (bs && bl > 0 && bl <= b->seg_end[k0] && memcmp(b->text, bs, bl) == 0 && !(rec->seg[k0].flags & REC_SPECIAL))
            skip = bl;
    }
    long n = tokenize_record(t, rec, b, skip, total, err);
    if (n < 0) return -1;

    int text_has_bos = skip > 0 || (n > 0 && bos >= 0 && b->ids[0] == (uint32_t)bos);
    int add_bos = bos >= 0 && (skip > 0 || (!text_has_bos && (o->bos == 1 || (o->bos == -1 && tokenizer_adds_bos(t)))));
    int64_t eos = o->eos_id >= 0 ? o->eos_id : tokenizer_eos_id(t);
    if (grow(&b->out_ids, &b->out_ids_cap, (size_t)n + nseg + 1, sizeof *b->out_ids)) return err_set(err, "out of memory");
    size_t m = 0, ti = 0, straddles = 0, trained = 0;
    if (add_bos) b->out_ids[m++] = (uint32_t)bos;
    for (size_t k = 0; k < nseg; k++) {
        size_t start = k == 0 ? 0 : m, end = b->seg_end[k];
        // A token belongs to the segment where it starts; the last segment takes the rest.
        while (ti < (size_t)n && (b->offsets[ti] < end || k + 1 == nseg)) {
            size_t tend = ti + 1 < (size_t)n ? b->offsets[ti + 1] : total;
            if (tend > end && k + 1 < nseg) straddles++;
            b->out_ids[m++] = b->ids[ti++];
        }
        if (rec->seg[k].flags & REC_EOS) {
            if (eos < 0) return err_set(err, "segment %zu wants an EOS but the model has none (give --eos-id)", k + 1);
            if (m == start || b->out_ids[m - 1] != (uint32_t)eos) b->out_ids[m++] = (uint32_t)eos;
        }
        b->seg[k] = (RecSegment){ .flags = rec->seg[k].flags & REC_TRAINED, .len = m - start };
        if (rec->seg[k].flags & REC_TRAINED) trained += m - start;
    }
    size_t at = 0;
    for (size_t k = 0; k < nseg; k++) {
        b->seg[k].ids = b->out_ids + at;
        at += b->seg[k].len;
    }
    if (nseg == 0 && add_bos) {   // no segment to carry the BOS: it stays out
        m = 0;
    }
    Record out = { .kind = REC_TOKENS, .origin_index = rec->origin_index, .fingerprint = tokenizer_fingerprint(t),
                   .origin = rec->origin, .origin_len = rec->origin_len, .nseg = nseg, .seg = b->seg };
    if (emit_record(&out, b, err)) return -1;
    st->records++;
    st->tokens += m;
    st->trained_tokens += trained;
    st->straddles += straddles;
    st->bos_in_text += text_has_bos;
    return 0;
}

int tok_decode_record(const Tokenizer *t, const TokOptions *o, const Record *rec, TokBuffers *b, TokStats *st,
                      Err *err)
{
    if (rec->kind != REC_TOKENS) return err_set(err, "a text record: tok -d wants token records");
    uint64_t fp = tokenizer_fingerprint(t);
    if (rec->fingerprint != 0 && rec->fingerprint != fp)
        return err_set(err, "tokens of another tokenizer (fingerprint %016llx, this model's %016llx)",
                       (unsigned long long)rec->fingerprint, (unsigned long long)fp);
    size_t nseg = rec->nseg, total = 0;
    int64_t eos = o->eos_id >= 0 ? o->eos_id : tokenizer_eos_id(t);
    uint32_t vocab = tokenizer_vocab_size(t);
    for (size_t k = 0; k < nseg; k++) total += rec->seg[k].len;
    if (grow(&b->out_ids, &b->out_ids_cap, total + 1, sizeof *b->out_ids) ||
        grow(&b->seg_end, &b->seg_end_cap, nseg + 1, sizeof *b->seg_end) ||
        grow(&b->seg, &b->seg_cap, nseg + 1, sizeof *b->seg))
        return err_set(err, "out of memory");
    // The kept ids, in order; seg_end[k] = how many belong to segments 0..k.
    size_t m = 0;
    for (size_t k = 0; k < nseg; k++) {
        const RecSegment *s = &rec->seg[k];
        size_t len = s->len;
        unsigned flags = s->flags & REC_TRAINED;
        // The EOS closing a segment is the eos flag again (plain text shows it like any token).
        if (!o->plain_text && len > 0 && eos >= 0 && s->ids[len - 1] == (uint32_t)eos) flags |= REC_EOS, len--;
        for (size_t i = 0; i < len; i++) {
            if (s->ids[i] >= vocab)
                return err_set(err, "segment %zu: token id %u is out of range (vocabulary %u)", k + 1, s->ids[i], vocab);
            int special = tokenizer_is_special(t, s->ids[i]);
            if (special && o->skip_special) continue;
            if (special) flags |= REC_SPECIAL;
            b->out_ids[m++] = s->ids[i];
        }
        b->seg_end[k] = m;
        b->seg[k] = (RecSegment){ .flags = flags };
    }
    // Segment k's text is decoded with the id before it as context and that id's own text
    // taken off the front, so that what the decoder does at the start of a text (strip the
    // prefix space) happens only where the record starts. When the context's text is not a
    // prefix (a character split across the boundary), the segment is decoded alone.
    size_t text_total = 0;
    char *ctx = NULL;
    size_t ctx_cap = 0;
    for (size_t k = 0; k < nseg; k++) {
        size_t from = k ? b->seg_end[k - 1] : 0, to = b->seg_end[k], skip = 0;
        long d;
        int with_context = from > 0;
        if (with_context) {
            long c = tokenizer_decode(t, b->out_ids + from - 1, 1, 0, &ctx, &ctx_cap, 0, err);
            d = c < 0 ? -1 : tokenizer_decode(t, b->out_ids + from - 1, to - from + 1, 0, &b->dec, &b->dec_cap, 0, err);
            if (c < 0 || d < 0) {
                free(ctx);
                return -1;
            }
            if ((size_t)c <= (size_t)d && memcmp(b->dec, ctx, (size_t)c) == 0) skip = (size_t)c;
            else with_context = 0;
        }
        if (!with_context) {
            d = tokenizer_decode(t, b->out_ids + from, to - from, 0, &b->dec, &b->dec_cap, 0, err);
            if (d < 0) {
                free(ctx);
                return -1;
            }
        }
        size_t plen = (size_t)d - skip;
        if (grow(&b->text, &b->text_cap, text_total + plen + 1, 1)) {
            free(ctx);
            return err_set(err, "out of memory");
        }
        memcpy(b->text + text_total, b->dec + skip, plen);
        b->seg[k].len = plen;
        text_total += plen;
    }
    free(ctx);
    size_t at = 0;
    for (size_t k = 0; k < nseg; k++) {
        b->seg[k].text = b->text + at;
        at += b->seg[k].len;
    }
    if (o->plain_text) {
        if (grow(&b->out, &b->out_cap, text_total + 1, 1)) return err_set(err, "out of memory");
        memcpy(b->out, b->text, text_total);
        b->out[text_total] = '\n';
        b->out_len = text_total + 1;
    } else {
        Record out = { .kind = REC_TEXT, .origin_index = rec->origin_index, .origin = rec->origin,
                       .origin_len = rec->origin_len, .nseg = nseg, .seg = b->seg };
        if (emit_record(&out, b, err)) return -1;
    }
    st->records++;
    st->tokens += total;
    return 0;
}

// ---------------------------------------------------------------------------------------
// Streams: a pipeline, so that reading and writing overlap the converting.
//
// Records flow through a ring of slots; record k of the stream (from 0) lives in
// slots[k % ring]. Three counters, in records from the stream's start, split the ring:
//
//     written <= claimed <= read,   read - written <= ring
//     [written, claimed)  claimed by a converter: being converted, or converted and waiting
//                         for the records before it to be written
//     [claimed, read)     read, waiting for a converter
//
// Every thread runs the same loop and takes the first open job of:
//   1. write the converted records at the head of the ring, in input order (one writer at a time);
//   2. read records into free slots (one reader at a time);
//   3. claim the next few records and convert them.
// So with N threads one may be reading and one writing while the rest convert; with one thread
// the loop reads, converts and writes in turn, as a plain loop would. Writing goes first because
// it frees slots, reading next because the converters starve without it. A thread with nothing
// to do sleeps until a counter moves. The output does not depend on the number of threads: each
// record is converted on its own, and written in input order; a bad record is reported by the
// writer in its turn, so the messages come in input order too, and a read error is returned
// after everything read before it is written.
// (It replaced windows of 256 records read, converted by an OpenMP loop and written one after
// the other: there the reading and the writing, a sixth of tok -j 1, left all but one thread
// idle, and the threads spun at the loop's barriers: tok -j 2 on 56 MB took 0.42 s against
// 0.34 s now on 2 idle cores, and 3.6 s against 0.9 s with another busy process on one of them.)
// Memory is bounded: ring records and about RING_BYTES of input in flight (one bigger record
// still goes), one TokBuffers per thread. The ring holds RING_PER_THREAD records per thread, so
// that converters do not starve while the reader or the writer takes its turn, and no more:
// records fall out of the caches between being read and being converted (tok -j 1 on 56 MB of
// Alpaca records: 0.61 s with 256 slots, 0.65 s with 1024, 0.71 s with 4096).

#define RING_PER_THREAD 64
#define RING_MIN 256
#define RING_MAX 4096
#define RING_BYTES (64u << 20)
#define IO_BATCH 64                  // records read or written at most before a turn is given back
#define CONVERT_CHUNK 8              // records a converter claims at most (fewer near the end)
#define SLOT_KEEP_BYTES (1u << 20)   // a slot's buffers bigger than this are freed once written

typedef struct {
    Record rec;                 // pointing into the copies below
    RecSegment *seg;            // (seg_cap)
    size_t seg_cap;
    unsigned char *data;        // (data_cap) origin, then every segment's bytes
    size_t data_cap, bytes;     // bytes: of data used, counted against RING_BYTES
    uint64_t offset, index;     // where the record starts in its stream; its 1-based number
    int converted;              // out (or err, when failed) is ready to be written
    int failed;
    Err err;
    unsigned char *out;         // (out_cap) the output record's bytes, out_len of them
    size_t out_cap, out_len;    //   (taken from the converting thread's TokBuffers)
    TokStats st;
} Slot;

// Copies a record (whose pointers die at the next rec_read) into the slot.
static int slot_fill(Slot *s, const Record *r)
{
    size_t unit = r->kind == REC_TOKENS ? sizeof(uint32_t) : 1, bytes = r->origin_len + sizeof(uint32_t);
    for (size_t k = 0; k < r->nseg; k++) bytes += r->seg[k].len * unit + sizeof(uint32_t);
    if (grow(&s->data, &s->data_cap, bytes + 1, 1) || grow(&s->seg, &s->seg_cap, r->nseg + 1, sizeof *s->seg)) return -1;
    s->rec = *r;
    memcpy(s->data, r->origin, r->origin_len);
    s->rec.origin = (const char *)s->data;
    size_t at = (r->origin_len + sizeof(uint32_t) - 1) / sizeof(uint32_t) * sizeof(uint32_t);   // ids aligned
    for (size_t k = 0; k < r->nseg; k++) {
        s->seg[k] = r->seg[k];
        size_t len = r->seg[k].len * unit;
        if (len) memcpy(s->data + at, r->kind == REC_TOKENS ? (const void *)r->seg[k].ids : (const void *)r->seg[k].text, len);
        if (r->kind == REC_TOKENS) s->seg[k].ids = (const uint32_t *)(s->data + at);
        else s->seg[k].text = (const char *)(s->data + at);
        at += (len + sizeof(uint32_t) - 1) / sizeof(uint32_t) * sizeof(uint32_t);
    }
    s->rec.seg = s->seg;
    s->bytes = at;
    return 0;
}

// After the slot's record is written: buffers grown for an unusually big record are given back.
static void slot_trim(Slot *s)
{
    if (s->data_cap > SLOT_KEEP_BYTES) free(s->data), s->data = NULL, s->data_cap = 0;
    if (s->out_cap > SLOT_KEEP_BYTES) free(s->out), s->out = NULL, s->out_cap = 0;
}

static void slot_free(Slot *s)
{
    free(s->seg);
    free(s->data);
    free(s->out);
}

typedef struct {
    const Tokenizer *t;
    const TokOptions *o;
    RecReader *reader;
    const char *name;           // of the input stream, for messages
    FILE *out;
    TokStats *st;               // the caller's totals (added to by the writer)
    void (*warn)(const char *msg);
    Slot *slots;                // (ring)
    size_t ring;

    pthread_mutex_t lock;       // guards everything below
    pthread_cond_t moved;       // broadcast when a counter or a role changes and someone sleeps
    uint64_t written, claimed, read;   // see above
    size_t bytes_in_flight;     // Slot.bytes of the records in [written, read)
    int reading, writing;       // the reader's and the writer's job are taken
    int sleeping;               // threads waiting on moved
    int end_of_input;           // nothing more to read: end of stream, a read error, or stop
    int stop;                   // a write failed: convert and write nothing more

    // Owned by whoever holds the reader's (read_*) or the writer's (the rest) job.
    int read_failed, write_failed, bad_records;
    int write_errno;            // errno of the failed write (the caller's thread may not have seen it)
    Err read_err, write_err;
} Pipeline;

static void wake(Pipeline *p)
{
    if (p->sleeping) pthread_cond_broadcast(&p->moved);
}

// Reads up to max records (and about max_bytes of them) into the slots of records from, from+1,
// ...; returns how many, their bytes in *bytes; *end set at the end of the stream or an error.
static size_t read_records(Pipeline *p, uint64_t from, size_t max, size_t max_bytes, size_t *bytes, int *end)
{
    size_t n = 0;
    *bytes = 0;
    while (n < max && *bytes < max_bytes) {
        Slot *s = &p->slots[(from + n) % p->ring];
        Record rec;
        uint64_t offset = rec_reader_offset(p->reader);
        int rc = rec_read(p->reader, &rec, &p->read_err);
        if (rc <= 0) {
            *end = 1;
            p->read_failed = rc < 0;   // reported after the records before it are written
            break;
        }
        if (slot_fill(s, &rec)) {
            *end = 1;
            p->read_failed = 1;
            err_set(&p->read_err, "out of memory");
            break;
        }
        s->offset = offset;
        s->index = rec_reader_index(p->reader);
        s->converted = 0;
        *bytes += s->bytes;
        n++;
    }
    return n;
}

static void convert_record(const Pipeline *p, Slot *s, TokBuffers *b)
{
    memset(&s->st, 0, sizeof s->st);
    s->failed = (p->o->decode ? tok_decode_record(p->t, p->o, &s->rec, b, &s->st, &s->err)
                              : tok_encode_record(p->t, p->o, &s->rec, b, &s->st, &s->err)) < 0;
    if (s->failed) return;
    // The output moves to the slot; the thread keeps the slot's old buffer for its next record.
    unsigned char *out = s->out;
    size_t cap = s->out_cap;
    s->out = b->out, s->out_cap = b->out_cap, s->out_len = b->out_len;
    b->out = out, b->out_cap = cap, b->out_len = 0;
}

// Writes records [from, to) in order: a bad one is reported and counted instead. With discard
// (after a write error) nothing is written or counted. -1 on a write error (p->write_err).
static int write_records(Pipeline *p, uint64_t from, uint64_t to, int discard)
{
    for (uint64_t k = from; k < to; k++) {
        Slot *s = &p->slots[k % p->ring];
        if (discard) continue;
        if (s->failed) {
            char msg[sizeof s->err.msg + 512];
            snprintf(msg, sizeof msg, "%s: byte %llu: record %llu (from %.*s:%llu): %s", p->name,
                     (unsigned long long)s->offset, (unsigned long long)s->index, (int)s->rec.origin_len,
                     s->rec.origin, (unsigned long long)s->rec.origin_index, s->err.msg);
            p->warn(msg);
            p->st->bad_records++;
            p->bad_records = 1;
        } else {
            p->st->records += s->st.records;
            p->st->tokens += s->st.tokens;
            p->st->trained_tokens += s->st.trained_tokens;
            p->st->straddles += s->st.straddles;
            p->st->bos_in_text += s->st.bos_in_text;
            if (fwrite(s->out, 1, s->out_len, p->out) != s->out_len) {
                p->write_errno = errno;
                err_set(&p->write_err, "write error: %s", strerror(errno));
                return -1;
            }
        }
        slot_trim(s);
    }
    return 0;
}

// One thread's share of the stream: see the top of this section. b: the thread's scratch.
static void pipeline_run(Pipeline *p, TokBuffers *b)
{
    int threads = omp_get_num_threads();
    pthread_mutex_lock(&p->lock);
    for (;;) {
        if (!p->writing && p->written < p->claimed && p->slots[p->written % p->ring].converted) {
            uint64_t from = p->written, to = from + 1;
            while (to < p->claimed && to - from < IO_BATCH && p->slots[to % p->ring].converted) to++;
            int discard = p->stop;
            p->writing = 1;
            pthread_mutex_unlock(&p->lock);
            int failed = write_records(p, from, to, discard) < 0;
            pthread_mutex_lock(&p->lock);
            if (failed) p->write_failed = p->stop = p->end_of_input = 1;
            for (uint64_t k = from; k < to; k++) p->bytes_in_flight -= p->slots[k % p->ring].bytes;
            p->written = to;
            p->writing = 0;
            wake(p);
        } else if (!p->reading && !p->end_of_input && p->read - p->written < p->ring &&
                   p->bytes_in_flight < RING_BYTES) {
            uint64_t from = p->read;
            size_t room = p->ring - (size_t)(p->read - p->written), bytes = 0;
            size_t max_bytes = RING_BYTES - p->bytes_in_flight;
            int end = 0;
            p->reading = 1;
            pthread_mutex_unlock(&p->lock);
            size_t n = read_records(p, from, room < IO_BATCH ? room : IO_BATCH, max_bytes, &bytes, &end);
            pthread_mutex_lock(&p->lock);
            p->read += n;
            p->bytes_in_flight += bytes;
            if (end) p->end_of_input = 1;
            p->reading = 0;
            wake(p);
        } else if (p->claimed < p->read) {
            // A share of what waits, so that the last records of the stream spread over the threads.
            uint64_t waiting = p->read - p->claimed, n = waiting / (uint64_t)threads;
            n = n < 1 ? 1 : n > CONVERT_CHUNK ? CONVERT_CHUNK : n;
            uint64_t from = p->claimed, to = from + n;
            int discard = p->stop;
            p->claimed = to;
            pthread_mutex_unlock(&p->lock);
            for (uint64_t k = from; k < to && !discard; k++) convert_record(p, &p->slots[k % p->ring], b);
            pthread_mutex_lock(&p->lock);
            for (uint64_t k = from; k < to; k++) p->slots[k % p->ring].converted = 1;
            if (!p->writing && p->written < p->claimed && p->slots[p->written % p->ring].converted) wake(p);
        } else if (p->end_of_input && !p->reading && p->written == p->read) {
            break;   // all read, converted and written
        } else {
            p->sleeping++;
            pthread_cond_wait(&p->moved, &p->lock);
            p->sleeping--;
        }
    }
    pthread_mutex_unlock(&p->lock);
}

int tok_stream(const Tokenizer *t, const TokOptions *o, FILE *in, const char *name, FILE *out, TokStats *st,
               void (*warn)(const char *msg), Err *err)
{
    RecReader *r = rec_reader_open(in, name, err);
    if (!r) return -1;
    Pipeline p = { .t = t, .o = o, .reader = r, .name = name, .out = out, .st = st, .warn = warn };
    p.ring = (size_t)o->threads * RING_PER_THREAD;
    p.ring = p.ring < RING_MIN ? RING_MIN : p.ring > RING_MAX ? RING_MAX : p.ring;
    p.slots = calloc(p.ring, sizeof *p.slots);
    if (!p.slots) {
        rec_reader_close(r);
        return err_set(err, "out of memory");
    }
    pthread_mutex_init(&p.lock, NULL);
    pthread_cond_init(&p.moved, NULL);
    #pragma omp parallel num_threads(o->threads)
    {
        TokBuffers b = { 0 };
        pipeline_run(&p, &b);
        tok_buffers_free(&b);
    }
    pthread_cond_destroy(&p.moved);
    pthread_mutex_destroy(&p.lock);
    for (size_t i = 0; i < p.ring; i++) slot_free(&p.slots[i]);
    free(p.slots);
    rec_reader_close(r);
    if (p.write_failed) {   // errno as the write left it, for the caller's own checks of out
        errno = p.write_errno;
        return *err = p.write_err, -1;
    }
    if (p.read_failed) return *err = p.read_err, -1;
    return p.bad_records ? 1 : 0;
}
