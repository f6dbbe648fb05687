// defines: cpu_embedding_forward, cpu_rmsnorm_forward, cpu_rmsnorm_backward, cpu_rope_forward,
//          cpu_rope_backward, cpu_swiglu_forward, cpu_swiglu_backward, cpu_fused_cross_entropy,
//          cpu_adamw_step, cpu_grad_norm_squared, cpu_clip_coef, cpu_attention_forward,
//          cpu_attention_backward, cpu_gemv, cpu_decode_attention
// The CPU twins of the CUDA kernels in kernels/: float32, plain loops, the ground truth that
// tests/gpu/ compares each kernel with (tests/unit/cpu_ops_test.c checks them against PyTorch).
// Layouts are row-major (tokens, features); T tokens, C features. Nothing here allocates
// except cpu_fused_cross_entropy (one row of logits) and cpu_attention_forward (one row of
// scores), prints or exits.
#ifndef CPU_OPS_H
#define CPU_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// out (T, C) = table[ids[t]] for table (V, C). ids must lie in [0, V): the caller checks.
void cpu_embedding_forward(float *out, const int32_t *ids, const float *table, int T, int C);

// HF LlamaRMSNorm: out = weight * (x * rsqrt(mean(x^2) + eps)). x, out (T, C); weight (C);
// rstd (T) receives rsqrt(mean(x^2) + eps) for the backward pass.
void cpu_rmsnorm_forward(float *out, float *rstd, const float *x, const float *weight, int T, int C,
                         float eps);
// dx (T, C) from dout (T, C); dweight (C) is ADDED to (gradients accumulate over layers and
// micro-batches) and may be NULL when the norm is frozen. rstd (T) from the forward pass.
void cpu_rmsnorm_backward(float *dx, float *dweight, const float *dout, const float *x,
                          const float *weight, const float *rstd, int T, int C);

// RoPE of HF Llama (rotate-half): within each head, pair (i, i + head_dim/2) is rotated by the
// angle (float)pos[t] * inv_freq[i]. x, out (T, n_heads, head_dim); pos (T) are per-token
// position ids (they restart at 0 for each document of a packed row); inv_freq (head_dim / 2),
// with any rope scaling already applied (model.h: rope_inv_freq). out may equal x.
void cpu_rope_forward(float *out, const float *x, const int32_t *pos, const float *inv_freq, int T,
                      int n_heads, int head_dim);
// The backward of a rotation is the rotation by the opposite angle: dx from dout, same shapes.
void cpu_rope_backward(float *dx, const float *dout, const int32_t *pos, const float *inv_freq, int T,
                       int n_heads, int head_dim);

// out (n) = silu(gate) * up, elementwise; n = tokens * intermediate size.
void cpu_swiglu_forward(float *out, const float *gate, const float *up, size_t n);
// dgate, dup (n) from dout (n).
void cpu_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                         size_t n);

// Cross-entropy of the output projection without the (T, V) logits: logits of token t are
// hidden[t] . weight[v] for hidden (T, C) and weight (V, C), visited in chunks of vocab_chunk
// entries (an online log-sum-exp, then a second pass for the gradient, as the kernel does).
// targets (T): the next token, or any negative value (-100) for a position that is not trained.
// losses (T) receives logsumexp - logit[target] (0 for untrained positions). dhidden (T, C),
// when not NULL, receives grad_scale * d(sum of losses)/d(hidden) (grad_scale = 1 / trained
// tokens of the whole batch gives the mean). Returns the number of trained positions, or -1
// when a target is >= V or vocab_chunk < 1 or memory runs out.
int cpu_fused_cross_entropy(float *losses, float *dhidden, const float *hidden, const float *weight,
                            const int32_t *targets, int T, int C, int V, int vocab_chunk, float grad_scale);

// One torch.optim.AdamW step (decoupled weight decay, bias correction, eps outside the square
// root) on n float32 parameters. step counts this update (1 for the first). Each gradient is
// multiplied by grad_scale first (the clipping coefficient, 1 when not clipping).
// The hyperparameters are doubles because torch derives its float32 coefficients (1 - beta2,
// 1 - lr * weight_decay) in Python floats: 1 - 0.999f is 1.3e-5 away from 0.001f.
void cpu_adamw_step(float *param, const float *grad, float *m, float *v, size_t n, long step, double lr,
                    double beta1, double beta2, double eps, double weight_decay, float grad_scale);
// Sum of squares of n gradients, accumulated in double (sum over buffers, then sqrt, gives the
// global L2 norm of torch.nn.utils.clip_grad_norm_).
double cpu_grad_norm_squared(const float *grad, size_t n);
// clip_grad_norm_'s coefficient: min(1, max_norm / (norm + 1e-6)).
float cpu_clip_coef(double norm, float max_norm);

// Causal attention with GQA over variable-length sequences packed in T = cu_seqlens[n_seqs]
// positions: query t of head h sees the keys [cu_seqlens[s], t] of its own sequence s, of kv
// head h / (n_heads / n_kv_heads), scaled by 1/sqrt(head_dim). q, out (T, n_heads, head_dim);
// k, v (T, n_kv_heads, head_dim); cu_seqlens (n_seqs + 1) ascending from 0. lse (T, n_heads)
// receives the natural log of each query's softmax denominator, sum_j exp(q.k_j / sqrt(hd)),
// which the backward uses to rebuild the probabilities (as the kernel does). Returns -1 when a
// temporary row (T floats) cannot be allocated, else 0.
int cpu_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                          const int32_t *cu_seqlens, int n_seqs, int n_heads, int n_kv_heads, int head_dim);
// Given dout (T, n_heads, head_dim) and the forward's out and lse, write dq (T, n_heads,
// head_dim) and dk, dv (T, n_kv_heads, head_dim), each kv head's gradients summed over the query
// heads of its group. Uses D = rowsum(dout * out) as the flash backward does. Allocates
// nothing; returns 0.
int cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                           const float *v, const float *out, const float *lse, const int32_t *cu_seqlens,
                           int n_seqs, int n_heads, int n_kv_heads, int head_dim);

// ---- decode (generation) twins of kernels/gemv.cu and kernels/decode_attention.cu ----

// y (batch, out) = x (batch, in) W^T for W (out, in) row-major, plus, when lora_A is not NULL,
// the unmerged LoRA term lora_scale * (x A^T) B^T for A (rank, in) and B (out, rank), rank <= 256.
// Sums in float in order of k; the LoRA term is added to the product's sum unrounded.
void cpu_gemv(float *y, const float *x, const float *W, int batch, int out, int in, const float *lora_A,
              const float *lora_B, int rank, float lora_scale);

// Attention of one new query per sequence over its KV cache: out (batch, n_heads, head_dim) =
// softmax(q k^T * scale) v over positions [0, lens[b]) of sequence b; q (batch, n_heads,
// head_dim); k_cache, v_cache (batch, n_kv_heads, max_seq, head_dim) (the layout of
// kernels/decode_attention.cuh); query head h reads kv head h / (n_heads / n_kv_heads). A
// sequence of length 0 gives a zero row. Allocates nothing.
void cpu_decode_attention(float *out, const float *q, const float *k_cache, const float *v_cache,
                          const int32_t *lens, int batch, int n_heads, int n_kv_heads, int head_dim, int max_seq,
                          float scale);

#ifdef __cplusplus
}
#endif

#endif
