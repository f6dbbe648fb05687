// defines: cuda_rmsnorm_forward, cuda_rmsnorm_backward (kernels/rmsnorm.cu; CPU twins
//          cpu_rmsnorm_forward, cpu_rmsnorm_backward)
#ifndef RMSNORM_CUH
#define RMSNORM_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
// HF LlamaRMSNorm: out (T, C) = weight * (x * rsqrt(mean(x^2) + eps)), computed in fp32 and
// rounded once to bf16. x (T, C), weight (C) bf16; rstd (T) fp32 is kept for the backward pass.
int cuda_rmsnorm_forward(bf16_t *out, float *rstd, const bf16_t *x, const bf16_t *weight, int T, int C,
                         float eps, GpuStream stream, Err *err);
// dx (T, C) bf16 from dout (T, C); with accumulate set, dx += the gradient (the residual stream
// already holds the gradient from above). dweight (C) fp32 is ADDED to and may be NULL (frozen
// norms, the LoRA case). dx may alias dout only without accumulate.
int cuda_rmsnorm_backward(bf16_t *dx, float *dweight, const bf16_t *dout, const bf16_t *x, const bf16_t *weight,
                          const float *rstd, int T, int C, int accumulate, GpuStream stream, Err *err);
KERNELS_EXTERN_C_END

#endif
