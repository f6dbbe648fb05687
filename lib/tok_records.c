// tok(1)'s record logic: see tok_records.h for the policies.
#define _GNU_SOURCE
#include "tok_records.h"

#include <errno.h>
#include <omp.h>
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
// Streams: a window of records read, converted in parallel, written in order.

typedef struct {
    Record rec;                 // pointing into the copies below
    RecSegment *seg;            // (seg_cap)
    size_t seg_cap;
    unsigned char *data;        // (data_cap) origin, then every segment's bytes
    size_t data_cap;
    uint64_t offset, index;     // where the record starts in its stream; its 1-based number
    int failed;
    Err err;
    TokBuffers buf;
    TokStats st;
} Slot;

// Copies a record (whose pointers die at the next rec_read) into the slot.
static int slot_fill(Slot *s, const Record *r)
{
    size_t unit = r->kind == REC_TOKENS ? sizeof(uint32_t) : 1, bytes = r->origin_len;
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
    return 0;
}

static void slot_free(Slot *s)
{
    free(s->seg);
    free(s->data);
    tok_buffers_free(&s->buf);
}

#define WINDOW_RECORDS 256           // records in flight at most
#define WINDOW_BYTES (64u << 20)     // and at most this much input (one bigger record still goes)

int tok_stream(const Tokenizer *t, const TokOptions *o, FILE *in, const char *name, FILE *out, TokStats *st,
               void (*warn)(const char *msg), Err *err)
{
    RecReader *r = rec_reader_open(in, name, err);
    if (!r) return -1;
    Slot *slots = calloc(WINDOW_RECORDS, sizeof *slots);
    if (!slots) {
        rec_reader_close(r);
        return err_set(err, "out of memory");
    }
    int status = 0, done = 0;
    while (!done) {
        size_t n = 0, bytes = 0;
        while (n < WINDOW_RECORDS && bytes < WINDOW_BYTES) {
            Record rec;
            uint64_t offset = rec_reader_offset(r);
            int rc = rec_read(r, &rec, err);
            if (rc <= 0) {
                done = 1;
                if (rc < 0) status = -1;   // written after what came before it
                break;
            }
            if (slot_fill(&slots[n], &rec)) {
                done = 1;
                status = err_set(err, "out of memory");
                break;
            }
            slots[n].offset = offset;
            slots[n].index = rec_reader_index(r);
            for (size_t k = 0; k < rec.nseg; k++) bytes += rec.seg[k].len;
            n++;
        }
        #pragma omp parallel for schedule(dynamic, 1) num_threads(o->threads)
        for (size_t i = 0; i < n; i++) {
            Slot *s = &slots[i];
            memset(&s->st, 0, sizeof s->st);
            s->failed = (o->decode ? tok_decode_record(t, o, &s->rec, &s->buf, &s->st, &s->err)
                                   : tok_encode_record(t, o, &s->rec, &s->buf, &s->st, &s->err)) < 0;
        }
        for (size_t i = 0; i < n; i++) {
            Slot *s = &slots[i];
            if (s->failed) {
                char msg[sizeof s->err.msg + 512];
                snprintf(msg, sizeof msg, "%s: byte %llu: record %llu (from %.*s:%llu): %s", name,
                         (unsigned long long)s->offset, (unsigned long long)s->index, (int)s->rec.origin_len,
                         s->rec.origin, (unsigned long long)s->rec.origin_index, s->err.msg);
                warn(msg);
                st->bad_records++;
                if (status == 0) status = 1;
                continue;
            }
            st->records += s->st.records;
            st->tokens += s->st.tokens;
            st->trained_tokens += s->st.trained_tokens;
            st->straddles += s->st.straddles;
            st->bos_in_text += s->st.bos_in_text;
            if (fwrite(s->buf.out, 1, s->buf.out_len, out) != s->buf.out_len) {
                Err werr;
                err_set(&werr, "write error: %s", strerror(errno));
                *err = werr;
                status = -1;
                done = 1;
                break;
            }
        }
    }
    for (size_t i = 0; i < WINDOW_RECORDS; i++) slot_free(&slots[i]);
    free(slots);
    rec_reader_close(r);
    return status;
}
