// defines: cuda_upload_tensor_bf16, cuda_f32_to_bf16, CudaTensorUpload, cuda_upload_tensors_bf16
//          (kernels/weights.cu)
// Model tensors to the device as bf16, as every GPU engine stores base weights. The destination
// is allocated by the caller, so tensors can be stacked into one buffer (q, k and v rows one
// after another: a (QD + 2 KD, D) matrix) by passing an offset pointer.
#ifndef WEIGHTS_CUH
#define WEIGHTS_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
#include "safetensors.h"

// dst (numel(t) bf16, device) <- t: BF16 copied as is, F32 and F16 rounded to nearest even.
// Synchronous with respect to the host: t's memory may be unmapped when this returns.
int cuda_upload_tensor_bf16(bf16_t *dst, const Tensor *t, GpuStream stream, Err *err);

// Many tensors in one pipeline, for a whole model: host threads copy the tensors' bytes from
// their memory map into pinned staging buffers (4 x 64 MiB; the map's pages fault in from the
// page cache), and each buffer's cudaMemcpyAsync overlaps the filling of the next (one event per
// buffer). F32 and F16 travel raw and are rounded to bf16 (nearest even) by a kernel on the
// device. Synchronous with respect to the host, as cuda_upload_tensor_bf16. Falls back to
// cuda_upload_tensor_bf16 per tensor when pinned memory cannot be had.
// With ld > 0, src is taken as a dense (numel / cols, cols) matrix and its rows land ld >= cols
// elements apart in dst (the columns between are not written): the training engine's base
// weights, which keep spare columns and rows for LoRA (engine_cuda.cu).
typedef struct {
    bf16_t *dst;           // (numel(src)) device, or (numel / cols) rows ld apart
    const Tensor *src;     // F32, F16 or BF16
    int64_t cols, ld;      // 0, 0: dense
} CudaTensorUpload;
int cuda_upload_tensors_bf16(const CudaTensorUpload *jobs, int n_jobs, GpuStream stream, Err *err);

// out[i] = bf16(in[i]) for n device floats, on stream.
int cuda_f32_to_bf16(bf16_t *out, const float *in, size_t n, GpuStream stream, Err *err);
KERNELS_EXTERN_C_END

#endif
