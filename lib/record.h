// defines: Record, RecSegment, RecReader, rec_read, rec_write, rec_encode, rec_to_json, RecJsonParser, RecStats
// The record stream shared by alp-fmt, tok, pack and lora-gen. The byte-exact
// specification is man/recs.5; this header is its C face.
//
// A stream is a concatenation of records, no stream header (cat a b is a stream).
// Record = 24-byte header + payload, all integers little-endian:
//   header  0  4  magic "ALR" followed by the format version byte (1)
//           4  1  kind: 1 text (UTF-8 segments), 2 tokens (u32 id segments)
//           5  1  flags: none defined in version 1; writers emit 0, readers reject others
//           6  2  u16 segment count
//           8  4  u32 payload length in bytes (at most REC_MAX_PAYLOAD)
//          12  4  reserved, zero
//          16  8  u64 XXH3-64 (seed 0) of header bytes 0..15 followed by the payload
//   payload:
//           u64 origin index (line of a JSONL file, element of a JSON array, 1-based; 0 unknown)
//           u64 tokenizer fingerprint (tokens records; 0 in text records)
//           u16 origin name length N, then N bytes of origin name (e.g. a file name)
//           segment count x { u8 flags, u8[3] zero, u32 length } (length in bytes for text,
//                                                                 in ids for tokens)
//           the segments' data, in order, concatenated (text bytes or u32 ids)
//   segment flags: bit 0 REC_TRAINED (the loss trains on it: a response)
//                  bit 1 REC_EOS     (text only: the model's end-of-sequence token follows)
//                  bit 2 REC_SPECIAL (text only: special-token names in it are control tokens)
#ifndef RECORD_H
#define RECORD_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "err.h"

#define REC_VERSION 1
#define REC_HEADER_SIZE 24
#define REC_MAX_PAYLOAD (1u << 28)  // 256 MiB: larger lengths are corruption, not data
#define REC_MAX_SEGMENTS 65535
#define REC_MAX_ORIGIN 65535

enum { REC_TEXT = 1, REC_TOKENS = 2 };
enum { REC_TRAINED = 1u << 0, REC_EOS = 1u << 1, REC_SPECIAL = 1u << 2 };

typedef struct {
    unsigned flags;        // REC_TRAINED | REC_EOS | REC_SPECIAL
    size_t len;            // bytes (text) or ids (tokens)
    const char *text;      // (len) bytes, kind REC_TEXT; not NUL-terminated
    const uint32_t *ids;   // (len) ids, kind REC_TOKENS
} RecSegment;

typedef struct {
    int kind;                 // REC_TEXT or REC_TOKENS
    uint64_t origin_index;    // 1-based line or element; 0 unknown
    uint64_t fingerprint;     // tokenizer fingerprint (tokens); 0 for text
    const char *origin;       // (origin_len) bytes, not NUL-terminated
    size_t origin_len;
    size_t nseg;
    const RecSegment *seg;    // (nseg)
} Record;

// Reader: streaming, holds one record at a time. Pointers in a Record it hands out
// stay valid until the next rec_read or rec_reader_close. Token ids are decoded into an
// aligned array of the reader's (in the stream they sit at any alignment).
typedef struct RecReader RecReader;
// name is used in messages (NULL: "<stdin>"); it is copied.
RecReader *rec_reader_open(FILE *f, const char *name, Err *err);
// Returns 1 with a record, 0 at a clean end of stream, -1 on error; the message names
// the stream, the byte offset (of the record, or of the bad field) and the record's
// index from 0 ("name: byte 48: record 2: ..."). Every checksum and rule of recs(5) is
// checked. After an error every later call fails the same way (the position is lost).
int rec_read(RecReader *r, Record *rec, Err *err);
uint64_t rec_reader_offset(const RecReader *r);   // bytes consumed so far
uint64_t rec_reader_index(const RecReader *r);    // records read so far
void rec_reader_close(RecReader *r);              // does not fclose the FILE

// Writer: validates the record (kind, flags, limits) and writes it; -1 on error
// (including a failed write, as reported by ferror).
int rec_write(FILE *f, const Record *rec, Err *err);

// Encode into a caller buffer: returns the record's size; when buf is NULL or cap
// too small nothing is written (call once to size, once to fill). -1 on invalid record.
long rec_encode(const Record *rec, unsigned char *buf, size_t cap, Err *err);

// The JSONL face of a record (recs dump / recs load; the keys are in man/recs.1):
//   {"kind":"text","origin":"a.json","index":12,"segments":[{"trained":false,"text":"..."},
//    {"trained":true,"eos":true,"text":"..."}]}
//   {"kind":"tokens","origin":"a.json","index":12,"fingerprint":"<16 hex>","segments":[{"trained":true,"ids":[1,2]}]}
// Bytes that are not UTF-8 are spelled "text_hex" / "origin_hex" (lowercase hex), so the
// round trip is lossless. rec_to_json writes one line (with its newline).
int rec_to_json(FILE *f, const Record *rec, Err *err);
// Parses one JSON object of that form. The Record's pointers stay valid until the next
// call with the same parser or its free. Unknown keys are errors (a typo loses nothing).
typedef struct RecJsonParser RecJsonParser;
RecJsonParser *rec_json_parser_new(void);
int rec_from_json(RecJsonParser *p, const char *json, size_t len, Record *rec, Err *err);
void rec_json_parser_free(RecJsonParser *p);

// Counts over records, per kind. Text is counted in bytes, tokens in ids.
typedef struct {
    uint64_t text_records, text_segments, text_bytes, trained_text_bytes, eos_segments;
    uint64_t token_records, token_segments, tokens, trained_tokens;
} RecStats;
void rec_stats_add(RecStats *s, const Record *rec);

#endif
