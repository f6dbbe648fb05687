// defines: CudaGen, CudaGenConfig, cuda_gen_create, cuda_gen_free, cuda_gen_prefill,
//          cuda_gen_decode, cuda_gen_logits, cuda_gen_stream, cuda_gen_device_bytes,
//          cuda_gen_max_batch, cuda_gen_capacity, cuda_gen_position, cuda_gen_create_random
//          (kernels/gen_cuda.cu; CPU twin lib/generate.c's Generator)
// Generation on one GPU: a Llama model (bf16 weights on the device, an optional PEFT adapter
// merged into them at load time or applied unmerged), a KV cache of max_batch slots of
// capacity tokens each, prefill of whole prompts (packed, flash attention, cuBLAS products) and
// decode steps of one token for each of rows 0..n-1, replayed as CUDA graphs: one row (one
// sequence) in five kernels a layer (cuda_gemv_row with RMSNorm, SwiGLU and the residual add
// folded in, programmatic dependent launches, and cuda_decode_attention_rope), several rows with
// cuBLAS products and the same attention kernel.
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
    // Added with gen_cuda.cu (0 = the default, so a zeroed config keeps the behaviour above):
    int cublas_min_batch; // decode steps of at least this many rows use cuBLAS instead of the GEMV
                          // kernels (0: 1, i.e. always cuBLAS: faster in whole steps on an H200,
                          // see gen_cuda.cu); 64 runs batches below 64 on the GEMV
    int gemv_products;    // below cublas_min_batch, which products use the GEMV kernels (the others
                          // cuBLAS): a mask of 1 qkv, 2 o, 4 gate|up, 8 down, 16 lm_head; 0: all
    int gemv_pdl;         // 1: the GEMV kernels are programmatic dependent launches (cuda_gemv_ex);
                          // slower as it stands (H200, 8B, batch 1: 6.82 ms a step against 5.72)
    int unfused_residual; // 1: the GEMV path adds o_proj's and down_proj's output to the residual
                          // stream with a separate kernel (two roundings); 0: in the GEMV's epilogue
    int unfused_attention;// 1: decode steps rotate q and k and store k and v with one kernel, then run
                          // cuda_decode_attention (two launches); 0: cuda_decode_attention_rope
                          // does all of it in one (same bits)
    int row_kernels;      // decode steps of ONE row: 0 the default: cuda_gemv_row for every product with
                          // RMSNorm and SwiGLU folded in, as programmatic dependent launches (five
                          // kernels a layer), where the model allows (widths multiples of 8, head_dim
                          // 64 or 128, no unmerged adapter); 1 the same without PDL; -1 as batches do
    int bench_skip;       // benchmarks only (results are garbage): leave stages out of decode steps to
                          // time them by difference: 1 attention (RoPE, cache, attention), 2 the
                          // norms, 4 SwiGLU, 8 the products; 0 for any real use
} CudaGenConfig;

// Weights are copied (the model's maps may be unmapped afterwards; a may be freed). NULL with a
// message: no device, out of memory (say how much was asked), an adapter that does not fit.
CudaGen *cuda_gen_create(const Model *m, const Adapter *a, const CudaGenConfig *cfg, Err *err);
void cuda_gen_free(CudaGen *g);
// For benchmarks and tests only: an engine for config c whose weights are random bf16 drawn on
// the device (a hash of seed and index; norms ~1 +- 0.1, projections of standard deviation
// 1/sqrt(in), embeddings 1), no adapter, no file: an 8B-shaped model without 16 GB to read.
CudaGen *cuda_gen_create_random(const ModelConfig *c, const CudaGenConfig *cfg, uint64_t seed, Err *err);

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
