// defines: cuda_decode_attention, cuda_decode_attention_rope, cuda_decode_attention_workspace_bytes
//          (kernels/decode_attention.cu; CPU twin cpu_decode_attention)
// Attention of one new query per sequence over its KV cache (the decode step of generation),
// with grouped-query attention: query head h reads kv head h / (n_heads / n_kv_heads), as HF's
// repeat_kv does.
//
// Cache layout (contiguous, one slot per sequence of the batch):
//   k_cache, v_cache (batch, n_kv_heads, max_seq, head_dim) bf16
// so that one head's keys of one sequence are one contiguous stretch (streamed with 16-byte
// loads). Position p of sequence b, kv head j lives at ((b * n_kv_heads + j) * max_seq + p) *
// head_dim. cuda_decode_attention reads a cache that the caller has written (the new token's k,
// after RoPE, and v at position lens[b] - 1); cuda_decode_attention_rope writes them itself from
// the qkv product's rows, which is what a decode step wants: one launch a layer.
#ifndef DECODE_ATTENTION_CUH
#define DECODE_ATTENTION_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
// Bytes of workspace for these sizes: a counter per (sequence, kv head), then the partial results
// of the key splits (flash-decoding), (batch, n_heads, splits, head_dim + 2) fp32. max_len is the
// bound given to the call. Zero the workspace once before its first use: each call leaves its
// counters at zero again. Calls that share a workspace must not run concurrently.
size_t cuda_decode_attention_workspace_bytes(int batch, int n_heads, int n_kv_heads, int head_dim, int max_len);

// out (batch, n_heads, head_dim) = softmax(q k^T * scale) v over positions [0, lens[b]) of
// each sequence b. q (batch, n_heads, head_dim) bf16, RoPE applied; lens (batch) int32 on the
// device (so that a captured CUDA graph replays with new lengths), each in [0, max_len]
// (0 gives a zero row); max_len <= max_seq is a bound the host knows (the cache's capacity for
// a graph, or the longest sequence now) that sets the number of key splits. head_dim 64 or
// 128; n_heads a multiple of n_kv_heads, at most 8 query heads per kv head. fp32 softmax and
// accumulation, one bf16 rounding of the output.
int cuda_decode_attention(bf16_t *out, const bf16_t *q, const bf16_t *k_cache, const bf16_t *v_cache,
                          const int32_t *lens, int batch, int n_heads, int n_kv_heads, int head_dim, int max_seq,
                          int max_len, float scale, void *workspace, size_t workspace_bytes, GpuStream stream,
                          Err *err);

// The same after storing each sequence's new token: qkv (batch, (n_heads + 2 n_kv_heads) head_dim)
// bf16 rows as the stacked q|k|v product gives them, before RoPE. For each row b with lens[b] >
// pos[b] (an active row: lens = pos + 1), k (rotated by RoPE at position pos[b] with inv_freq
// (head_dim / 2), rope_pair) and v are written into the caches at pos[b]; then q, rotated
// the same way (one bf16 rounding), attends over [0, lens[b]). Rows with lens[b] == pos[b] store
// nothing. Results equal the rope kernel + cache store + cuda_decode_attention, bit for bit.
// pdl 1: a programmatic dependent launch that reads lens, pos and the cache's older positions
// before the previous kernel in the stream is done, and qkv only after (kernels/gen_cuda.cu).
int cuda_decode_attention_rope(bf16_t *out, const bf16_t *qkv, bf16_t *k_cache, bf16_t *v_cache, const int32_t *pos,
                               const int32_t *lens, const float *inv_freq, int batch, int n_heads, int n_kv_heads,
                               int head_dim, int max_seq, int max_len, float scale, void *workspace,
                               size_t workspace_bytes, int pdl, GpuStream stream, Err *err);
KERNELS_EXTERN_C_END

#endif
