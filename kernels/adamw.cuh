// defines: AdamWStep, cuda_grad_norm_squared, cuda_adamw_step (kernels/adamw.cu; CPU twins
//          cpu_grad_norm_squared, cpu_clip_coef, cpu_adamw_step)
#ifndef ADAMW_CUH
#define ADAMW_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
// torch.optim.AdamW hyperparameters of one step; doubles because torch derives its float32
// coefficients (1 - beta2, 1 - lr * weight_decay, the bias corrections) in Python floats.
typedef struct {
    double lr, beta1, beta2, eps, weight_decay;
    long step;          // this update's number, 1 for the first
    double max_norm;    // clip_grad_norm_'s max_norm; <= 0: no clipping
} AdamWStep;

// *norm_sq (one double on the device) += sum of grad[i]^2 over n fp32 gradients. Zero it first
// (cudaMemsetAsync); call once per gradient buffer to get the global norm over all of them.
int cuda_grad_norm_squared(double *norm_sq, const float *grad, size_t n, GpuStream stream, Err *err);

// One AdamW step over n fp32 master parameters with fp32 gradients and state m, v, with
// torch.nn.utils.clip_grad_norm_ folded in: each gradient is multiplied by
// min(1, max_norm / (sqrt(*norm_sq) + 1e-6)), read on the device (no host synchronisation).
// norm_sq may be NULL when hp->max_norm <= 0.
int cuda_adamw_step(float *param, const float *grad, float *m, float *v, size_t n, const AdamWStep *hp,
                    const double *norm_sq, GpuStream stream, Err *err);
KERNELS_EXTERN_C_END

#endif
