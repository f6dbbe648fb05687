// defines: cuda_rmsnorm_forward, cuda_rmsnorm_backward (kernels/rmsnorm.cu; CPU twins
//          cpu_rmsnorm_forward, cpu_rmsnorm_backward)
#ifndef RMSNORM_CUH
#define RMSNORM_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
// HF LlamaRMSNorm: out (T, C) = weight * (x * rsqrt(mean(x^2) + eps)), computed in fp32 and
// rounded once to bf16. x (T, C), weight (C) bf16; rstd (T) fp32 is kept for the backward pass.
// out's rows are ld_out >= C apart; columns C .. ld_out - 1 are left as they are. copy (T, C),
// unless NULL, receives x unchanged (one read of x instead of a separate copy's).
int cuda_rmsnorm_forward(bf16_t *out, int ld_out, bf16_t *copy, float *rstd, const bf16_t *x, const bf16_t *weight,
                         int T, int C, float eps, GpuStream stream, Err *err);
// dx (T, C) bf16, rows ld_dx >= C apart (the spare columns left as they are), from dout (T, C);
// with accumulate set, dx += the gradient (the residual stream already holds the gradient from
// above). dweight (C) fp32 is ADDED to and may be NULL (frozen norms, the LoRA case). dx may
// alias dout only without accumulate (and with ld_dx = C).
int cuda_rmsnorm_backward(bf16_t *dx, int ld_dx, float *dweight, const bf16_t *dout, const bf16_t *x,
                          const bf16_t *weight, const float *rstd, int T, int C, int accumulate, GpuStream stream,
                          Err *err);
KERNELS_EXTERN_C_END

#endif
