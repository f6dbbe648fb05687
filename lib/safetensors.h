// defines: DType, Tensor, dtype_name, dtype_size, tensor_numel, tensor_to_f32,
//          SafeTensors, safetensors_open, safetensors_close, safetensors_find
// Reading safetensors files (the writer is lib/safetensors_write.h). A file is memory-mapped,
// never copied; every tensor is a typed view (Tensor) into the map. Layout:
//   bytes 0..7    u64 little-endian N, the JSON header's length
//   bytes 8..8+N  JSON object {"__metadata__": {str: str}?, name: {"dtype": str,
//                 "shape": [int...], "data_offsets": [begin, end]}, ...}
//   then          the data; offsets are relative to byte 8 + N
// What we accept, and what we refuse with a message naming the file and the tensor:
//   - N >= 2, 8 + N <= file size, N <= 100 MB; the header is one JSON object (trailing spaces
//     allowed, as writers pad for alignment);
//   - dtype F32, F16 or BF16 (anything else is refused where a model or adapter needs it: the
//     view is still listed with dtype DTYPE_OTHER so that metadata-only readers can go on);
//   - shape: 0..TENSOR_MAX_DIMS non-negative ints; end - begin == numel * dtype size;
//   - 0 <= begin <= end <= file size - 8 - N; no two tensors' byte ranges overlap.
// Holes between tensors are allowed (the format does not forbid them).
#ifndef SAFETENSORS_H
#define SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

// Storage types of weights. New kinds (4-bit NF4 blocks with their absmax scales, a bf16 copy
// on a GPU) join here; code that wants float32 calls tensor_to_f32, which is the one place
// that knows every encoding.
typedef enum {
    DTYPE_F32,
    DTYPE_F16,
    DTYPE_BF16,
    DTYPE_OTHER,   // present in a file, not usable as a weight (I64, U8, ...)
} DType;

#define TENSOR_MAX_DIMS 4

// A typed view of an n-dimensional row-major array; data points into a mapping or a buffer
// that someone else owns (the Tensor never frees it).
typedef struct {
    DType dtype;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    const void *data;        // numel * dtype_size(dtype) bytes, little-endian
} Tensor;

const char *dtype_name(DType d);     // "F32", "F16", "BF16", "other"
size_t dtype_size(DType d);          // bytes per element; 0 for DTYPE_OTHER
int64_t tensor_numel(const Tensor *t);
// Convert n elements starting at element `first` into float32 (exact for F16/BF16). The
// caller has checked dtype != DTYPE_OTHER and the range.
void tensor_to_f32(const Tensor *t, int64_t first, int64_t n, float *out);

typedef struct {
    char *name;
    Tensor tensor;
    char dtype_str[16];       // as written in the file ("F32", "I64", ...)
    uint64_t begin, end;      // byte offsets relative to the data section
} SafeTensorEntry;

typedef struct {
    char *path;
    void *map;                // whole file, read-only
    size_t map_size;
    int n_tensors;
    SafeTensorEntry *tensors; // (n_tensors), in header order
} SafeTensors;

// Map and validate a file. NULL with a message "PATH: ..." (naming the tensor where one is at
// fault) when the file cannot be read or its header breaks a rule above.
SafeTensors *safetensors_open(const char *path, Err *err);
void safetensors_close(SafeTensors *st);
// The entry named name, or NULL.
const SafeTensorEntry *safetensors_find(const SafeTensors *st, const char *name);

#endif
