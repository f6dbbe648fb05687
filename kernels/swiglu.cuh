// defines: cuda_swiglu_forward, cuda_swiglu_backward (kernels/swiglu.cu; CPU twins
//          cpu_swiglu_forward, cpu_swiglu_backward)
#ifndef SWIGLU_CUH
#define SWIGLU_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
// out (n) = silu(gate) * up, elementwise in fp32, rounded once to bf16; n = tokens * the MLP's
// intermediate size. out may alias gate or up.
int cuda_swiglu_forward(bf16_t *out, const bf16_t *gate, const bf16_t *up, size_t n, GpuStream stream, Err *err);
// dgate, dup (n) from dout (n); dgate may alias gate and dup may alias up (each element is read
// before it is written, by the same thread), so the backward can overwrite its inputs.
int cuda_swiglu_backward(bf16_t *dgate, bf16_t *dup, const bf16_t *dout, const bf16_t *gate, const bf16_t *up,
                         size_t n, GpuStream stream, Err *err);
KERNELS_EXTERN_C_END

#endif
