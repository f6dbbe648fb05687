// defines: StTensorOut, safetensors_write
// Writing a safetensors file (the reader is lib/safetensors.h). Layout, as the format defines it:
//   bytes 0..7    u64 little-endian N, the length of the JSON header
//   bytes 8..8+N  JSON object: {"__metadata__": {str: str}, name: {"dtype", "shape",
//                 "data_offsets": [begin, end]}, ...}, padded with spaces so that 8 + N is a
//                 multiple of 8 (data stays aligned for memory-mapped readers)
//   then          the tensors' bytes, little-endian, row-major, offsets relative to 8 + N
// What we emit: tensors in the order given, contiguous, no holes, keys in the order given, no
// whitespace in the JSON, so the bytes depend only on the inputs (resume tests compare bytes).
#ifndef SAFETENSORS_WRITE_H
#define SAFETENSORS_WRITE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "err.h"

#define ST_MAX_DIMS 8

typedef struct {
    const char *name;
    const char *dtype;          // "F32", "F16", "BF16", "I64", "U8", ... (as the format names them)
    int ndim;                   // 0..ST_MAX_DIMS
    int64_t shape[ST_MAX_DIMS];
    const void *data;           // nbytes bytes, already little-endian
    size_t nbytes;              // must equal the product of shape times the dtype's width
} StTensorOut;

// Write n tensors and the optional metadata (n_meta key/value string pairs: meta[2i], meta[2i+1])
// to f. -1 on a bad tensor (unknown dtype, size mismatch, duplicate or empty name) or a failed
// write; the message names path (used only in messages) and the tensor.
int safetensors_write(FILE *f, const char *path, const StTensorOut *t, size_t n,
                      const char *const *meta, size_t n_meta, Err *err);

// Same, into path atomically (lib/atomic.h).
int safetensors_write_file(const char *path, const StTensorOut *t, size_t n,
                           const char *const *meta, size_t n_meta, Err *err);

#endif
