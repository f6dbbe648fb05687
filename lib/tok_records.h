// defines: TokOptions, TokStats, TokBuffers, tok_stream, tok_encode_record, tok_decode_record, tok_buffers_free
// The record-level logic of tok(1): text records to token records with a model's tokenizer,
// and back. The policies (man/tok.1 spells them out for users):
//   - The tokens of a record are the tokens of its whole text (segments concatenated)
//     tokenized at once; a token goes to the segment where it starts; a token that also covers
//     bytes of the next segment "straddles" the boundary and is counted (TokStats.straddles).
//   - Special-token names are parsed only inside REC_SPECIAL segments; elsewhere they are text.
//   - BOS: the model's policy (tokenizer_adds_bos), or forced on/off; never twice: a record
//     whose text already begins with the BOS id (parsed in a special segment) or with the BOS
//     string (in any segment: it becomes the BOS id) gets no other.
//   - EOS: a REC_EOS segment gets the EOS id appended (unless its tokens already end with it).
//   - Output token segments keep REC_TRAINED; the BOS joins the first segment.
//   - Decoding inverts this: a segment's trailing EOS id becomes REC_EOS; segments where
//     special tokens are shown get REC_SPECIAL.
// Threads: tok_stream is a pipeline over a bounded ring of records: while some threads convert
// records, one reads the next ones and one writes the converted ones in input order (see
// tok_records.c); the output and the messages do not depend on the number of threads.
#ifndef TOK_RECORDS_H
#define TOK_RECORDS_H

#include <stdint.h>
#include <stdio.h>

#include "err.h"
#include "record.h"
#include "tokenizer.h"

typedef struct {
    int decode;          // token records -> text records
    int bos;             // -1: the model's policy; 0: never add; 1: always add
    int64_t eos_id;      // -1: the model's EOS
    int skip_special;    // decode: special tokens left out
    int plain_text;      // decode: plain text, one record per line, instead of records
    int threads;         // >= 1
} TokOptions;

typedef struct {
    uint64_t records, tokens, trained_tokens;
    uint64_t straddles;        // tokens that cross a segment boundary
    uint64_t bos_in_text;      // records whose text already began with BOS
    uint64_t bad_records;      // skipped with a message
} TokStats;

// Scratch and output of one record (reused from record to record).
typedef struct {
    char *text;                 // (text_cap) segments concatenated
    size_t text_cap;
    uint32_t *ids, *offsets;    // (ids_cap) tokens and their start offsets in text
    size_t ids_cap;
    uint32_t *tmp_ids, *tmp_offsets;   // (tmp_cap) per-segment special-token scan
    size_t tmp_cap;
    uint32_t *out_ids;          // (out_ids_cap) the output record's ids
    size_t out_ids_cap;
    RecSegment *seg;            // (seg_cap) the output record's segments
    size_t seg_cap;
    size_t *seg_end;            // (seg_end_cap) end offset of each input segment in text (encode),
    size_t seg_end_cap;         //   or count of kept ids up to each segment (decode)
    char *dec;                  // (dec_cap) decoded text
    size_t dec_cap;
    unsigned char *out;         // (out_cap) the output bytes; out_len used
    size_t out_cap, out_len;
} TokBuffers;

// One text record to one token record, written as record bytes into b->out / b->out_len;
// its counts added to st. -1 with a message about the record's content (tok_stream adds the
// stream name, offset and the record's origin).
int tok_encode_record(const Tokenizer *t, const TokOptions *o, const Record *rec, TokBuffers *b, TokStats *st,
                      Err *err);
// One token record back to text: a text record (or a line of text with o->plain_text).
int tok_decode_record(const Tokenizer *t, const TokOptions *o, const Record *rec, TokBuffers *b, TokStats *st,
                      Err *err);
void tok_buffers_free(TokBuffers *b);

// Runs one input stream (named name) through, writing to out in input order. A bad record is
// reported through warn (one message each), skipped, and counted; the run goes on.
// Returns 0 when every record was good, 1 when some were skipped, -1 on a stream or write
// error (err says which; what came before it is written).
int tok_stream(const Tokenizer *t, const TokOptions *o, FILE *in, const char *name, FILE *out,
               TokStats *st, void (*warn)(const char *msg), Err *err);

#endif
