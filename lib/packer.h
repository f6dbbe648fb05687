// defines: PackInput, PackSettings, PackPiece, PackPlan, PackStats, PackOutput and the pack_* functions
// pack's logic: collect token records into documents, place document pieces into rows of
// seq_len tokens (best-fit or first-fit decreasing, or one per row), shuffle and split the
// rows, and write them as a shard set (man/shard.5) to a directory, one file, or an archive.
//
// Placement policy (man/pack.1):
//   - a document no longer than a row is one piece, never split;
//   - a longer one is split into pieces of seq_len tokens and a remainder (the default),
//     truncated to its first seq_len tokens (pack --truncate), or dropped (pack --drop);
//   - a piece without any trained target is dropped and counted (its row would teach nothing);
//   - pieces are placed longest first (a stable counting sort, ties in input order); best fit
//     puts a piece in the open row with the least room that still holds it (ties: the most
//     recently touched row), first fit in the earliest opened such row; pad mode gives every
//     piece a row of its own. Padding fills the end of a row.
#ifndef PACKER_H
#define PACKER_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "record.h"
#include "shard.h"

// The documents read so far: every token once, in input order.
typedef struct {
    uint32_t *ids;          // (n_tokens) ids of all documents, concatenated
    uint8_t *trained;       // (n_tokens) 1 where the token is in a trained segment
    uint64_t n_tokens, tokens_cap, trained_cap;
    uint64_t populated;     // tokens of both arrays faulted in ahead of use (>= n_tokens)
    uint64_t *doc_start;    // (n_docs + 1) document d is ids[doc_start[d] .. doc_start[d+1])
    uint64_t n_docs, docs_cap;
    uint64_t fingerprint;   // of the first record; every record must match it
    uint64_t n_records;     // records accepted (documents, empty ones included)
    uint64_t n_empty;       // records without any token (skipped)
    uint32_t vocab_size;    // ids must be below it; 0 = not checked
    int all_tokens;         // train on every token (SHARD_LOSS_ALL)
} PackInput;

// Add one record as a document. Errors (wrong kind, another fingerprint, id >= vocab size)
// name the record's origin: "alpaca.json:12: token id 99999 >= vocab size 32000".
int pack_input_add(PackInput *in, const Record *rec, Err *err);
void pack_input_free(PackInput *in);

typedef struct {
    uint32_t seq_len;       // T
    unsigned mode;          // SHARD_MODE_*
    unsigned long_policy;   // SHARD_LONG_*
} PackSettings;

typedef struct {
    uint64_t start;         // offset into PackInput.ids
    uint32_t len;           // tokens, 1 .. seq_len
    uint32_t targets;       // trained targets: positions 1..len-1 whose token is trained
} PackPiece;

typedef struct {
    uint64_t docs;              // documents considered (non-empty)
    uint64_t tokens;            // their tokens
    uint64_t split_docs;        // longer than a row, split
    uint64_t truncated_docs;    // longer than a row, truncated
    uint64_t truncated_tokens;  // tokens cut off by truncation
    uint64_t dropped_long_docs; // longer than a row, dropped
    uint64_t dropped_long_tokens;
    uint64_t untrained_pieces;  // pieces with no trained target, dropped
    uint64_t untrained_tokens;
    uint64_t rows;              // rows produced
    uint64_t row_tokens;        // tokens placed into rows (not padding)
    uint64_t targets;           // trained targets in the rows
} PackStats;

typedef struct {
    PackPiece *pieces;      // (n_pieces) grouped by row, in placement order within a row
    uint64_t *row_first;    // (n_rows + 1): row r holds pieces row_first[r] .. row_first[r+1]-1
    uint64_t n_rows, n_pieces;
    PackStats stats;
} PackPlan;

int pack_plan(const PackInput *in, const PackSettings *s, PackPlan *plan, Err *err);
void pack_plan_free(PackPlan *plan);

// The ids and flags of row r (T of each): its pieces in order, then padding.
void pack_row_fill(const PackInput *in, const PackPlan *plan, uint64_t r, uint32_t seq_len, uint32_t pad_id,
                   uint32_t *ids, uint8_t *flags);

// A seeded permutation of 0..n-1 (Fisher-Yates driven by splitmix64; depends only on n and
// seed). lib/dataset.c uses the same one for its epochs.
void pack_permutation(uint64_t *perm, uint64_t n, uint64_t seed);

// Choose validation rows: a seeded permutation of the rows; its first n_val entries are the
// validation set, the rest the training set. shuffle = 0 puts each set back in row order.
// Both arrays are allocated here (caller frees). n_val <= plan->n_rows.
int pack_split(const PackPlan *plan, uint64_t seed, int shuffle, uint64_t n_val, uint64_t **train,
               uint64_t *n_train, uint64_t **val, Err *err);

// Where a shard set goes.
typedef struct {
    const char *path;         // directory; NAME.tar, NAME.tar.gz, NAME.tgz, NAME.zip; "-" = tar to stdout
    int single;               // one shard file at path, no index
    uint64_t rows_per_shard;  // 0 = all rows in one shard
    unsigned threads;         // build rows on this many threads (0 or 1: this one); same bytes for any
    uint64_t batch_rows;      // rows built per write to a file (0: about 512 KiB of them)
} PackOutput;

// Write rows (indices into plan, in this order) as a shard set. settings: the header fields
// that describe the set (seq_len, vocab_size, pad_id, fingerprint, pack_mode, long_policy,
// loss_policy, flags, seed). Every file is written under a temporary name and renamed; a
// directory's index.json goes last (and an old one is removed first), so a failed run never
// leaves a set that looks complete.
int pack_write_set(const PackInput *in, const PackPlan *plan, const uint64_t *rows, uint64_t n_rows,
                   const ShardHeader *settings, const PackOutput *out, Err *err);

#endif
