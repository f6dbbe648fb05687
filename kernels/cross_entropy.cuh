// defines: cuda_cross_entropy_workspace_bytes, cuda_fused_cross_entropy (kernels/cross_entropy.cu;
//          CPU twin cpu_fused_cross_entropy)
#ifndef CROSS_ENTROPY_CUH
#define CROSS_ENTROPY_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
// Device bytes of scratch that cuda_fused_cross_entropy needs. With Tb = min(T, token_chunk)
// and n = min(V, vocab_chunk): Tb * n * 4 (fp32 logits of one block of tokens and one chunk of
// the vocabulary, then their bf16 gradients in place) + Tb * C * 4 when the vocabulary takes more
// than one chunk (fp32 d(hidden) accumulated over chunks) + Tb * 12, each part 256-byte aligned.
size_t cuda_cross_entropy_workspace_bytes(int T, int C, int V, int token_chunk, int vocab_chunk);

// Cross-entropy of the output projection, fused so that the (T, V) logits never exist. Tokens go
// in blocks of token_chunk rows; within a block, the vocabulary in chunks of vocab_chunk
// entries: logits (hidden (T, C) bf16 times rows of weight (V, C) bf16, through cuBLAS with fp32
// accumulation and fp32 output) feed an online log-sum-exp; then each chunk's
// d(logits) = grad_scale * (softmax - onehot) (bf16) gives d(hidden) += d(logits) . weight_chunk.
// With vocab_chunk >= V (one chunk) the logits are computed once: two products of 2*T*V*C flops;
// with several chunks the second pass recomputes them: three products, a smaller workspace.
// targets (T) int32: the next token, or negative (-100) for untrained positions, which get loss
// 0 and gradient 0. losses (T) fp32: logsumexp - logit[target]. dhidden (T, C) bf16 may be NULL
// (evaluation: the loss only). The caller checks targets < V (as the shards guarantee).
// blas is a cublasHandle_t; its stream is set to `stream`.
int cuda_fused_cross_entropy(float *losses, bf16_t *dhidden, const bf16_t *hidden, const bf16_t *weight,
                             const int32_t *targets, int T, int C, int V, int token_chunk, int vocab_chunk,
                             float grad_scale, void *workspace, size_t workspace_bytes, GpuBlas blas,
                             GpuStream stream, Err *err);
KERNELS_EXTERN_C_END

#endif
