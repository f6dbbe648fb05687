// defines: cuda_rope_forward, cuda_rope_backward (kernels/rope.cu; CPU twins cpu_rope_forward,
//          cpu_rope_backward)
#ifndef ROPE_CUH
#define ROPE_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
// RoPE of HF Llama (rotate-half), in place on x (T, n_heads, head_dim) bf16 (q or k): pair
// (i, i + head_dim/2) of every head rotates by the angle (float)pos[t] * inv_freq[i], with
// cos/sin in fp32. pos (T) int32: per-token position ids, restarting at 0 for each document
// of a packed row. inv_freq (head_dim/2) fp32 on the device, rope scaling (llama3, linear)
// already applied (model.h: rope_inv_freq). head_dim must be even.
int cuda_rope_forward(bf16_t *x, const int32_t *pos, const float *inv_freq, int T, int n_heads, int head_dim,
                      GpuStream stream, Err *err);
// The backward is the rotation by the opposite angle, in place on dx (T, n_heads, head_dim).
int cuda_rope_backward(bf16_t *dx, const int32_t *pos, const float *inv_freq, int T, int n_heads,
                       int head_dim, GpuStream stream, Err *err);
KERNELS_EXTERN_C_END

#endif
