// defines: cuda_attention_forward, cuda_attention_backward, cuda_attention_backward_workspace_bytes,
//          cuda_attention_set_version, cuda_attention_forward_plain, cuda_attention_backward_plain,
//          ATTENTION_PLAIN_MAX_HEAD_DIM
//          (kernels/attention.cu; CPU twins cpu_attention_forward, cpu_attention_backward)
#ifndef ATTENTION_CUH
#define ATTENTION_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
// Flash-style causal attention with GQA over variable-length sequences packed in T positions:
// query t of head h sees keys [cu_seqlens[s], t] of its own sequence s, of kv head
// h / (n_heads / n_kv_heads), scaled by 1/sqrt(head_dim); the (T, T) scores never exist.
// q, out (T, n_heads, head_dim) bf16; k, v (T, n_kv_heads, head_dim) bf16; 16-byte aligned.
// cu_seqlens (n_seqs + 1) int32 on the device, ascending, cu_seqlens[0] = 0 and
// cu_seqlens[n_seqs] = T (lib/dataset.h's batch; not checked here: that would need a copy
// back). lse (T, n_heads) fp32 receives each query's natural-log softmax denominator for the
// backward. head_dim 64 or 128; n_heads a multiple of n_kv_heads.
int cuda_attention_forward(bf16_t *out, float *lse, const bf16_t *q, const bf16_t *k, const bf16_t *v,
                           const int32_t *cu_seqlens, int n_seqs, int T, int n_heads, int n_kv_heads,
                           int head_dim, GpuStream stream, Err *err);

// Bytes of device workspace the backward needs: fp32 accumulators for dq (T, n_heads, head_dim),
// dk and dv (T, n_kv_heads, head_dim each), D = rowsum(dout * out) (T, n_heads), each
// position's sequence start (T int32), and for version 5 the log-sum-exps and D transposed to
// (n_heads, T rounded up to 64) and the starts padded to that length.
size_t cuda_attention_backward_workspace_bytes(int T, int n_heads, int n_kv_heads, int head_dim);

// dq (T, n_heads, head_dim), dk, dv (T, n_kv_heads, head_dim), bf16, written (not added to);
// dk and dv are summed over the query heads of each kv group. dout, out, lse as from the
// forward; shapes and cu_seqlens as there. workspace: at least
// cuda_attention_backward_workspace_bytes, 16-byte aligned.
int cuda_attention_backward(bf16_t *dq, bf16_t *dk, bf16_t *dv, const bf16_t *dout, const bf16_t *q,
                            const bf16_t *k, const bf16_t *v, const bf16_t *out, const float *lse,
                            const int32_t *cu_seqlens, int n_seqs, int T, int n_heads, int n_kv_heads,
                            int head_dim, void *workspace, size_t workspace_bytes, GpuStream stream,
                            Err *err);

// The kernel lab's switch, for tests and benchmarks (not thread-safe; process-wide): version 3
// runs mma.sync kernels (fragments by ldmatrix, 128-query forward blocks, one backward block per
// (key tile, query head), the exponent through ex2.approx); version 4 is version 3 with, for
// head_dim 128 on a compute capability 9.0 device, a forward of Hopper's own instructions (wgmma
// products, TMA copies); version 5 (the default, fastest on an H200) has the backward of those
// instructions too. Elsewhere versions 4 and 5 run version 3's kernels. kernels/NOTES.md has each
// one's timings (versions 1 and 2, the first kernels, were removed). Outputs agree to bf16
// rounding. Returns the previous version, or -1 (and changes nothing) for an unknown one.
#define ATTENTION_FIRST_VERSION 3
#define ATTENTION_VERSIONS 5
int cuda_attention_set_version(int version);
// Version 5's backward: how many of a kv head's query heads one block walks (a divisor of
// n_heads / n_kv_heads; all of them: dk, dv written whole, without fp32 accumulators). 0, the
// default: all of them when the documents average at most 4096 positions, else 1 (NOTES, issue 6
// part 7: the longer walk thrashes L2 at 1 x 8192). For benchmarks; returns the previous value.
int cuda_attention_set_heads_per_block(int n);

// Plain kernels for any head_dim up to ATTENTION_PLAIN_MAX_HEAD_DIM (kernels/attention_plain.cu;
// one thread per (query, head), fp32: for the tiny test models, not for speed). Same layouts and
// masking, but each position's document start is given directly: query t sees keys
// [seq_start[t], t]. The backward ADDS dk and dv into fp32 accumulators (T, n_kv_heads,
// head_dim) that the caller zeroes; dq is written.
#define ATTENTION_PLAIN_MAX_HEAD_DIM 128
int cuda_attention_forward_plain(bf16_t *out, float *lse, const bf16_t *q, const bf16_t *k, const bf16_t *v,
                                 const int32_t *seq_start, int T, int n_heads, int n_kv_heads, int head_dim,
                                 GpuStream stream, Err *err);
int cuda_attention_backward_plain(bf16_t *dq, float *dk, float *dv, const bf16_t *dout, const bf16_t *q,
                                  const bf16_t *k, const bf16_t *v, const bf16_t *out, const float *lse,
                                  const int32_t *seq_start, int T, int n_heads, int n_kv_heads, int head_dim,
                                  GpuStream stream, Err *err);
KERNELS_EXTERN_C_END

#endif
