// defines: CUDA_CHECK, CUBLAS_CHECK, SHAPE_CHECK, LAUNCH_CHECK, ceil_div, block_sum, block_max,
//          unpack_bf16x8, load_bf16x8, store_bf16x8, is_aligned16, rope_pair, launch_kernel
// For .cu files only: error checks that name file and line (into an Err, since the library
// never prints; the tool prints it on stderr), and the device helpers the kernels share.
#ifndef CUDA_CHECK_CUH
#define CUDA_CHECK_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common.cuh"

// In a launcher returning int: on failure fill *err with "file:line: call: reason", return -1.
#define CUDA_CHECK(call, err)                                                                     \
    do {                                                                                          \
        cudaError_t status_ = (call);                                                             \
        if (status_ != cudaSuccess)                                                               \
            return err_set((err), "%s:%d: %s: %s", __FILE__, __LINE__, #call,                     \
                           cudaGetErrorString(status_));                                          \
    } while (0)
#define CUBLAS_CHECK(call, err)                                                                   \
    do {                                                                                          \
        cublasStatus_t status_ = (call);                                                          \
        if (status_ != CUBLAS_STATUS_SUCCESS)                                                     \
            return err_set((err), "%s:%d: %s: %s", __FILE__, __LINE__, #call,                     \
                           cublasGetStatusString(status_));                                       \
    } while (0)
// After a kernel launch: a bad configuration shows up here (not the kernel's own faults,
// which surface at the next synchronising call).
#define LAUNCH_CHECK(err) CUDA_CHECK(cudaGetLastError(), err)
// A launcher's argument check: "file:line: " then the caller's printf-style message.
#define SHAPE_CHECK(cond, err, fmt, ...)                                                          \
    do {                                                                                          \
        if (!(cond))                                                                              \
            return err_set((err), "%s:%d: " fmt, __FILE__, __LINE__, ##__VA_ARGS__);              \
    } while (0)

static inline unsigned ceil_div(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }
static inline bool is_aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the sum.
// Uses 33 floats of shared memory; safe to call repeatedly.
__device__ inline float block_sum(float v)
{
    __shared__ float partial[33];
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
    __syncthreads();  // a previous call may still be reading partial[]
    if (lane == 0)
        partial[warp] = v;
    __syncthreads();
    v = lane < n_warps ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ inline float block_max(float v)
{
    __shared__ float partial[33];
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
    __syncthreads();
    if (lane == 0)
        partial[warp] = v;
    __syncthreads();
    v = lane < n_warps ? partial[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// 8 bf16 held in 16 bytes (a vector load's result) as floats.
__device__ inline void unpack_bf16x8(float out[8], uint4 raw)
{
    const __nv_bfloat162 *pairs = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float2 f = __bfloat1622float2(pairs[k]);
        out[2 * k] = f.x;
        out[2 * k + 1] = f.y;
    }
}

// 8 bf16 = 16 bytes: one vector load or store (p 16-byte aligned).
__device__ inline void load_bf16x8(float out[8], const __nv_bfloat16 *p)
{
    unpack_bf16x8(out, *reinterpret_cast<const uint4 *>(p));
}

// One RoPE rotation pair (x1 = element i, x2 = element i + head_dim / 2 of a head) by the
// angle whose cosine and sine are c and s. The generation kernels (gen_cuda.cu's prefill,
// decode_attention.cu) share this one definition, and its multiply-adds are spelled out so that
// the compiler cannot fuse them differently in different kernels: their roundings agree bit for bit.
__device__ inline void rope_pair(float x1, float x2, float c, float s, float *a, float *b)
{
    *a = __fmaf_rn(x1, c, __fmul_rn(-x2, s));
    *b = __fmaf_rn(x2, c, __fmul_rn(x1, s));
}

__device__ inline void store_bf16x8(__nv_bfloat16 *p, const float in[8])
{
    uint4 raw;
    __nv_bfloat162 *pairs = reinterpret_cast<__nv_bfloat162 *>(&raw);
#pragma unroll
    for (int k = 0; k < 4; k++)
        pairs[k] = __floats2bfloat162_rn(in[2 * k], in[2 * k + 1]);
    *reinterpret_cast<uint4 *>(p) = raw;
}

// kernel<<<grid, block, shared, s>>>(args...), as a programmatic dependent launch when pdl: the
// kernel may then start before the previous one in the stream ends, and must run
// griddepcontrol.wait before it reads anything that kernel writes (or writes anything it reads).
template <typename... Params, typename... Args>
static inline cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared,
                                        cudaStream_t s, bool pdl, Args... args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = shared;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, args...);
}

#endif
