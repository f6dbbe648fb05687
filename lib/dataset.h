// defines: Dataset, DatasetInfo, DatasetCursor, DatasetBatch and the dataset_* reader functions
// The reader lora-train uses: a shard set (man/shard.5) opened as one array of rows, visited
// in a reproducible shuffled order per epoch, split across ranks, handed out as micro-batches
// in the layout the varlen attention kernels want.
//
// Targets (man/shard.5, "Targets"): within a row, the target of position t is the token at
// t+1 when t+1 holds a token of the SAME document piece (not a document start, not padding)
// and that token lies in a trained segment; otherwise DATASET_IGNORE (-100). This equals the
// Hugging Face convention (labels = input_ids with -100 on the prompt, shifted left by one)
// applied to each document separately: the last token of a document never predicts the first
// token of the next one.
#ifndef DATASET_H
#define DATASET_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "shard.h"

#define DATASET_IGNORE (-100)   // target of a position the loss does not train on

typedef struct Dataset Dataset;

typedef struct {
    uint32_t seq_len;          // T: tokens per row
    uint32_t vocab_size;       // every id is < vocab_size
    uint32_t pad_id;           // id stored at padding positions
    uint64_t fingerprint;      // tokenizer fingerprint (as in the token records; 0 = unknown)
    uint64_t n_rows;           // rows in the whole set
    uint32_t n_shards;         // files (or archive members) in the set
    uint64_t n_tokens;         // non-padding tokens in the set
    uint64_t n_targets;        // trained targets in the set (positions whose target != -100)
    uint64_t n_docs;           // document pieces in the set
    unsigned pack_mode;        // SHARD_MODE_* the set was packed with
    unsigned long_policy;      // SHARD_LONG_*
    unsigned loss_policy;      // SHARD_LOSS_*
    uint64_t pack_seed;        // the seed pack shuffled rows with
} DatasetInfo;

// Threads: dataset_row and dataset_fill_batch only read and may run concurrently;
// dataset_next_batch and dataset_cursor_row cache the current epoch's order in the Dataset,
// so one thread (the data loader) calls them.

// Open a shard set: a directory holding index.json (man/shard.5), one shard file, or a tar or
// zip archive of a set (read into memory; plain files are memory-mapped). Headers, sizes and
// the index are checked here (cheap); row checksums by dataset_verify. NULL with a message.
Dataset *dataset_open(const char *path, Err *err);
void dataset_close(Dataset *d);
const DatasetInfo *dataset_info(const Dataset *d);

// Verify every row checksum and each file's whole-rows hash. -1 with the first bad
// file and row named ("shard-00001.bin: row 17: checksum mismatch").
int dataset_verify(const Dataset *d, Err *err);

// Row i of the whole set (0 <= i < n_rows), O(1); pointers stay valid until dataset_close.
int dataset_row(const Dataset *d, uint64_t i, ShardRow *row, Err *err);

// Where a reader stands: plain data, so a checkpoint can save and restore it byte for byte.
// The order of an epoch depends only on (seed, epoch, n_rows): never on threads or timing.
typedef struct {
    uint64_t seed;       // shuffle seed
    uint64_t epoch;      // 0-based
    uint64_t position;   // rows of THIS rank already handed out in this epoch
    uint32_t rank;       // this reader's rank r, 0 <= r < n_ranks
    uint32_t n_ranks;    // R, data-parallel readers; 1 for a single process
    uint32_t shuffle;    // 1: shuffled order per epoch; 0: rows in stored order (evaluation)
    uint32_t reserved;   // zero
} DatasetCursor;

void dataset_cursor_init(DatasetCursor *c, uint64_t seed, int shuffle, uint32_t rank, uint32_t n_ranks);
// Rows per epoch for a rank: rank r takes the epoch order's positions r, r+R, r+2R, ...
// The ranks' rows are disjoint and together are every row; counts differ by at most one
// (a trainer stepping in lockstep uses dataset_rank_rows(d, R-1, R), the smallest).
uint64_t dataset_rank_rows(const Dataset *d, uint32_t rank, uint32_t n_ranks);
// The global row index the cursor points at (the next row it will hand out).
uint64_t dataset_cursor_row(Dataset *d, const DatasetCursor *c);

// A micro-batch of B rows of T tokens, flattened row-major to B*T positions.
typedef struct {
    int B, T;                 // capacity: rows and seq_len
    int n_rows;               // rows filled from data (< B only at the end of an epoch; the
                              // rest are all padding with every target ignored)
    int32_t *tokens;          // (B, T) input ids; pad_id at padding
    int32_t *targets;         // (B, T) next token of the same document, or DATASET_IGNORE
    uint8_t *loss_mask;       // (B, T) 1 where targets[i] != DATASET_IGNORE, else 0
    int32_t *positions;       // (B, T) position in its document piece, 0 at each document start
    int32_t *cu_seqlens;      // (n_seqs + 1) cumulative lengths over the flattened B*T positions:
                              // cu_seqlens[0] = 0, cu_seqlens[n_seqs] = B*T. One sequence per
                              // document piece, and one per run of padding at a row's end, so
                              // a row end is always a boundary. Capacity B*T + 1.
    int n_seqs;               // sequences in cu_seqlens
    int max_seqlen;           // longest sequence (flash-attention varlen wants it)
    long n_targets;           // trained targets in the batch (the loss divides by the sum of
                              // these over the accumulated micro-batches)
    uint64_t *row_ids;        // (B) global row index of each filled row (UINT64_MAX if padding)
} DatasetBatch;

int dataset_batch_alloc(DatasetBatch *b, int B, int T, Err *err);
void dataset_batch_free(DatasetBatch *b);

// Fill b with the next b->B rows of the cursor's rank and advance it. A batch never spans two
// epochs: the last one of an epoch may be short (b->n_rows < B), after which the cursor moves
// to position 0 of epoch + 1. Returns b->n_rows (>= 1), or -1 on error (b->T != seq_len,
// a rank with no rows).
int dataset_next_batch(Dataset *d, DatasetCursor *c, DatasetBatch *b, Err *err);
// Fill b from explicit global row indices (n <= b->B), e.g. for evaluation. Returns n or -1.
int dataset_fill_batch(const Dataset *d, const uint64_t *rows, int n, DatasetBatch *b, Err *err);

#endif
