// defines: ShardHeader, ShardRow, ShardWriter, ShardFile and their functions (format, write, map, verify)
// One shard file (man/shard.5 is the byte-exact specification; this is its C face).
// All integers little-endian. A file is a 256-byte header followed by n_rows rows of a fixed
// stride (a multiple of 64), so row i starts at header_size + i * row_stride.
//
//   row  0  8  u64 XXH3-64 (seed 0) of row bytes 8 .. row_stride (header rest, ids, flags, zero fill)
//        8  4  u32 document pieces starting in the row
//       12  4  u32 tokens that are not padding
//       16  4  u32 trained targets (positions whose target is not -100)
//       20 44  zero
//       64 4T  u32 ids[T]
//   64+4T  T   u8 token flags[T]: SHARD_TOK_TRAINED | SHARD_TOK_DOC_START | SHARD_TOK_PAD
//              then zero up to row_stride = 64 + roundup(5T, 64)
#ifndef SHARD_H
#define SHARD_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "err.h"

#define SHARD_MAGIC "ALPSHARD"
#define SHARD_VERSION 1
#define SHARD_HEADER_SIZE 256
#define SHARD_ROW_HEADER 64
#define SHARD_MAX_SEQ_LEN (1u << 20)   // 1 Mi tokens per row: larger is corruption

enum {   // per-token flags
    SHARD_TOK_TRAINED = 1u << 0,    // the token is in a trained segment (a response)
    SHARD_TOK_DOC_START = 1u << 1,  // the first token of a document piece
    SHARD_TOK_PAD = 1u << 2,        // padding (id = pad_id); never trained, never a document
};
enum { SHARD_MODE_BEST_FIT = 0, SHARD_MODE_FIRST_FIT = 1, SHARD_MODE_PAD = 2 };  // how rows were filled
enum { SHARD_LONG_SPLIT = 0, SHARD_LONG_TRUNCATE = 1, SHARD_LONG_DROP = 2 };     // documents longer than a row
enum { SHARD_LOSS_RESPONSE = 0, SHARD_LOSS_ALL = 1 };                             // which tokens train
enum { SHARD_FLAG_SHUFFLED = 1u << 0 };                                           // header flags

typedef struct {
    uint32_t version;       // SHARD_VERSION
    uint32_t header_size;   // offset of row 0
    uint32_t seq_len;       // T
    uint32_t row_stride;    // bytes per row
    uint64_t n_rows;
    uint32_t vocab_size;
    uint32_t pad_id;
    uint64_t fingerprint;   // tokenizer fingerprint of the records packed (0 unknown)
    uint8_t pack_mode;      // SHARD_MODE_*
    uint8_t long_policy;    // SHARD_LONG_*
    uint8_t loss_policy;    // SHARD_LOSS_*
    uint8_t flags;          // SHARD_FLAG_*
    uint32_t shard_index;   // position of this file in its set, 0-based
    uint64_t seed;          // pack's shuffle seed
    uint64_t first_row;     // global index of row 0 within the set
    uint64_t n_tokens;      // non-padding tokens in the file
    uint64_t n_targets;     // trained targets in the file
    uint64_t n_docs;        // document pieces in the file
    uint64_t rows_hash;     // XXH3-64 of all row bytes (header_size .. end of file)
} ShardHeader;

typedef struct {
    uint32_t seq_len;         // T
    const uint32_t *ids;      // (T)
    const uint8_t *flags;     // (T) SHARD_TOK_*
    uint32_t n_docs, n_tokens, n_targets;
} ShardRow;

size_t shard_row_stride(uint32_t seq_len);
const char *shard_mode_name(unsigned mode);   // "best-fit", "first-fit", "pad"
const char *shard_long_name(unsigned long_policy);   // "split", "truncate", "drop"
const char *shard_loss_name(unsigned loss);   // "response", "all"

// Build a row in a buffer of shard_row_stride(T) bytes from ids and flags: fills the row
// header (counts, checksum) and zero fill. Counts are derived from the flags.
void shard_row_encode(unsigned char *buf, uint32_t seq_len, const uint32_t *ids, const uint8_t *flags);
// The last step of shard_row_encode, for a caller that knows the counts (pack, from its plan):
// ids and flags already in place at buf + 64 and buf + 64 + 4T; writes the row header with
// these counts, the zero fill and the checksum. Wrong counts make a row the verifier rejects.
void shard_row_seal(unsigned char *buf, uint32_t seq_len, uint32_t n_docs, uint32_t n_tokens, uint32_t n_targets);
// The target of position t of a row (man/shard.5, "Targets"): next id or -100.
int32_t shard_row_target(const ShardRow *row, uint32_t t);

// One row as a line of JSON for jq (man/shard.1): {"row":i,"docs":..,"tokens":..,"targets":..,
// "ids":[T],"target_ids":[T],"doc":[T] (piece number in the row, -1 at padding),"pos":[T],
// "trained":[T] (the token's own trained flag, 0/1)}. -1 on a write error.
int shard_row_write_json(FILE *f, uint64_t index, const ShardRow *row);

// Header bytes: encode (computes the header checksum) and decode (checks magic, version,
// checksum, stride and limits; "name: header: ..." messages).
void shard_header_encode(const ShardHeader *h, unsigned char out[SHARD_HEADER_SIZE]);
int shard_header_decode(const unsigned char *buf, size_t len, ShardHeader *h, const char *name, Err *err);

// Writer: encodes rows one at a time and keeps the header's counts and the running hash; the
// caller writes the bytes (a file: header placeholder, rows, then the final header at offset 0;
// an archive member: the size is known beforehand, the header goes last into a seek-back
// buffer, see lib/packer.c).
typedef struct {
    ShardHeader h;            // settings in; counts and hash filled as rows are added
    void *hash_state;         // running XXH3 of the row bytes
    unsigned char *row_buf;   // (row_stride) scratch
} ShardWriter;

// version/header_size/row_stride are filled in; the caller sets seq_len, vocab_size,
// pad_id, fingerprint, pack_mode, long_policy, loss_policy, flags, shard_index, seed, first_row.
int shard_writer_init(ShardWriter *w, const ShardHeader *settings, Err *err);
// Where to build the next row in place: (T) ids and (T) flags inside w->row_buf; then call
// shard_writer_add with these pointers (saves a copy).
void shard_writer_row(ShardWriter *w, uint32_t **ids, uint8_t **flags);
// Encode one row into w->row_buf, update counts and the running hash; returns the row bytes
// (row_stride of them) for the caller to write.
const unsigned char *shard_writer_add(ShardWriter *w, const uint32_t *ids, const uint8_t *flags);
// The same for a row built in the caller's memory (row_stride bytes, ids at 64, flags at
// 64 + 4T): encoded where it lies.
void shard_writer_add_in_place(ShardWriter *w, unsigned char *row);
// Add n rows already sealed (shard_row_encode or shard_row_seal), back to back in memory
// (n * row_stride bytes): counts and the running hash, in one pass over a whole batch.
void shard_writer_add_sealed(ShardWriter *w, const unsigned char *rows, uint64_t n);
// The final header (counts, rows_hash) into out.
void shard_writer_header(ShardWriter *w, unsigned char out[SHARD_HEADER_SIZE]);
void shard_writer_free(ShardWriter *w);

// A shard in memory: a mapped plain file, or bytes the caller owns (an archive member).
typedef struct {
    ShardHeader h;
    const unsigned char *base;   // (size) bytes, header at 0
    size_t size;
    void *map;                   // mmap base when mapped (NULL otherwise)
    char *name;                  // for messages
} ShardFile;

// Map and check a shard file (header, size = header_size + n_rows * row_stride).
int shard_map(ShardFile *s, const char *path, Err *err);
// Check shard bytes already in memory (not copied; must outlive s).
int shard_from_memory(ShardFile *s, const unsigned char *bytes, size_t size, const char *name, Err *err);
void shard_unmap(ShardFile *s);
int shard_row(const ShardFile *s, uint64_t i, ShardRow *row, Err *err);
// Verify one row's checksum and its structure (flags defined, padding only at the end, ids
// < vocab_size, pad ids, counts); -1 naming the row.
int shard_verify_row(const ShardFile *s, uint64_t i, Err *err);
// Every row, then the whole-rows hash.
int shard_verify(const ShardFile *s, Err *err);

#endif
