// defines: bf16_t, GpuStream, GpuBlas, KERNELS_EXTERN_C_BEGIN/END
// What the launchers' C-callable headers (kernels/*.cuh) share. They are plain C so that lib/
// and tools/ include them without CUDA's headers: a bf16 is 2 bytes (__nv_bfloat16 inside .cu
// files), a stream is a cudaStream_t and a BLAS handle a cublasHandle_t, passed as void *
// (NULL stream = the default stream). Every launcher checks shapes and the launch and returns 0,
// or -1 with a message "file:line: what" in *err (lib/err.h).
#ifndef KERNELS_COMMON_CUH
#define KERNELS_COMMON_CUH

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
typedef __nv_bfloat16 bf16_t;
#else
typedef uint16_t bf16_t;  // same size and alignment as __nv_bfloat16
#endif
typedef void *GpuStream;  // cudaStream_t
typedef void *GpuBlas;    // cublasHandle_t

#ifdef __cplusplus
#define KERNELS_EXTERN_C_BEGIN extern "C" {
#define KERNELS_EXTERN_C_END }
#else
#define KERNELS_EXTERN_C_BEGIN
#define KERNELS_EXTERN_C_END
#endif

#endif
