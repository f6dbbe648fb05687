// defines: CudaGen, CudaGenConfig, cuda_gen_create, cuda_gen_free, cuda_gen_prefill,
//          cuda_gen_decode, cuda_gen_logits, cuda_gen_stream, cuda_gen_device_bytes,
//          cuda_gen_max_batch, cuda_gen_capacity (kernels/gen_cuda.cu; CPU twin lib/generate.c's Generator)
// Generation on one GPU: a Llama model (bf16 weights on the device, an optional PEFT adapter
// merged into them at load time or applied unmerged), a KV cache of max_batch slots of
// capacity tokens each, prefill of whole prompts (packed, flash attention, cuBLAS products) and
// decode steps of one token for each of rows 0..n-1 (bandwidth-bound GEMV kernels, split-KV
// decode attention, replayed as CUDA graphs).
//
// A slot is one sequence. Prefill starts slots afresh at position 0 (whatever they held); a
// decode step appends one token to each of rows (slots) 0..n-1, skipping the rows whose
// `active` flag is 0 (they keep their cache and produce garbage logits that the caller ignores).
// Logits are fp32, (rows, vocab), on the device, valid until the next call.
#ifndef GEN_CUDA_CUH
#define GEN_CUDA_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
#include "adapter.h"
#include "model.h"

typedef struct CudaGen CudaGen;

typedef struct {
    int max_batch;        // slots (rows of a decode step), >= 1
    int capacity;         // tokens per slot (prompt + output), >= 1, <= the model's context
    int max_prefill;      // most prompt tokens of one prefill call (all its prompts together)
    int merge_adapter;    // 1: W + scale B A at load time (bf16); 0: unmerged (exact adapter)
    int use_graphs;       // 1: decode steps replay captured CUDA graphs; 0: plain launches
} CudaGenConfig;

// Weights are copied (the model's maps may be unmapped afterwards; a may be freed). NULL with a
// message: no device, out of memory (say how much was asked), an adapter that does not fit.
CudaGen *cuda_gen_create(const Model *m, const Adapter *a, const CudaGenConfig *cfg, Err *err);
void cuda_gen_free(CudaGen *g);

// Prefill n prompts into slots[0..n-1] (distinct): ids packed back to back (host), prompt i is
// ids[cu[i] .. cu[i+1]), each 1..capacity tokens, cu[n] <= max_prefill. Afterwards the logits of
// each prompt's LAST token are row i of cuda_gen_logits (n rows), and slot slots[i] holds
// cu[i+1]-cu[i] positions.
int cuda_gen_prefill(CudaGen *g, const int *slots, const uint32_t *ids, const int *cu, int n, Err *err);

// One decode step over rows 0..n-1 (n <= max_batch): row b feeds ids[b] at the next position of
// slot b when active[b] (host arrays). An active slot that is full (capacity) is an error.
// Afterwards row b of cuda_gen_logits holds slot b's next-token logits.
int cuda_gen_decode(CudaGen *g, const uint32_t *ids, const uint8_t *active, int n, Err *err);

// (rows, vocab) fp32 device logits of the last prefill or decode call.
float *cuda_gen_logits(CudaGen *g);
GpuStream cuda_gen_stream(CudaGen *g);
size_t cuda_gen_device_bytes(const CudaGen *g);
int cuda_gen_max_batch(const CudaGen *g);
int cuda_gen_capacity(const CudaGen *g);
// Positions slot holds now (prompt + decoded tokens).
int cuda_gen_position(const CudaGen *g, int slot);
KERNELS_EXTERN_C_END

#endif
