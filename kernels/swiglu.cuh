// defines: cuda_swiglu_forward, cuda_swiglu_backward (kernels/swiglu.cu; CPU twins
//          cpu_swiglu_forward, cpu_swiglu_backward)
#ifndef SWIGLU_CUH
#define SWIGLU_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
// out (rows, cols) = silu(gate) * up, elementwise in fp32, rounded once to bf16; rows = tokens,
// cols = the MLP's intermediate size; gate and up dense (rows, cols), out's rows ld_out >= cols
// apart (the spare columns left as they are). out may alias gate or up when ld_out = cols.
int cuda_swiglu_forward(bf16_t *out, int ld_out, const bf16_t *gate, const bf16_t *up, int rows, int cols,
                        GpuStream stream, Err *err);
// dgate, dup (rows, cols), rows ld_d >= cols apart, from dense dout, gate, up (rows, cols). With
// ld_d = cols, dgate may alias gate and dup may alias up (each element is read before it is
// written, by the same thread), so the backward can overwrite its inputs.
int cuda_swiglu_backward(bf16_t *dgate, bf16_t *dup, int ld_d, const bf16_t *dout, const bf16_t *gate,
                         const bf16_t *up, int rows, int cols, GpuStream stream, Err *err);
KERNELS_EXTERN_C_END

#endif
