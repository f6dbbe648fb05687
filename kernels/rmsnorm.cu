// RMSNorm forward and backward, one block per row. Memory-bound: the forward reads x (2 bytes an
// element) twice (the second read hits L1/L2: a 4096-wide row is 8 KB) and writes out once; the
// backward reads x, dout twice and writes dx. The output rows (out, dx) may be longer than C
// (ld >= C: spare columns that the products use, engine_cuda.cu), left untouched. The forward can
// also write a copy of x as it reads it (the residual stream's next buffer, engine_cuda.cu). Rows are walked 8 bf16 (16 bytes) per access when
// C % 8 == 0 and the pointers are aligned, else one element at a time (VEC = 1).
#include "cuda_check.cuh"
#include "rmsnorm.cuh"

#define ROW_THREADS 256

template <int VEC>
__device__ inline void load_vec(float *v, const __nv_bfloat16 *p)
{
    if (VEC == 8)
        load_bf16x8(v, p);
    else
        v[0] = __bfloat162float(*p);
}

template <int VEC>
__device__ inline void store_vec(__nv_bfloat16 *p, const float *v)
{
    if (VEC == 8)
        store_bf16x8(p, v);
    else
        *p = __float2bfloat16(v[0]);
}

template <int VEC>
__global__ void rmsnorm_forward_kernel(__nv_bfloat16 *out, int ld_out, __nv_bfloat16 *copy, float *rstd,
                                       const __nv_bfloat16 *x, const __nv_bfloat16 *weight, int C, float eps)
{
    const __nv_bfloat16 *xr = x + (size_t)blockIdx.x * C;
    __nv_bfloat16 *outr = out + (size_t)blockIdx.x * ld_out;
    __nv_bfloat16 *copyr = copy ? copy + (size_t)blockIdx.x * C : NULL;
    float xv[VEC], wv[VEC], sum_sq = 0;
    for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC) {
        load_vec<VEC>(xv, xr + i);
#pragma unroll
        for (int k = 0; k < VEC; k++)
            sum_sq += xv[k] * xv[k];
    }
    float r = rsqrtf(block_sum(sum_sq) / C + eps);
    for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC) {
        load_vec<VEC>(xv, xr + i);
        load_vec<VEC>(wv, weight + i);
        if (copyr)
            store_vec<VEC>(copyr + i, xv);
#pragma unroll
        for (int k = 0; k < VEC; k++)
            xv[k] = wv[k] * (xv[k] * r);
        store_vec<VEC>(outr + i, xv);
    }
    if (threadIdx.x == 0)
        rstd[blockIdx.x] = r;
}

// Rows blockIdx.x, blockIdx.x + gridDim.x, ...; each thread owns the same columns in every row,
// so the block's dweight partial sums (dynamic shared memory, C floats) need no atomics until the
// one atomicAdd per column at the end.
template <int VEC>
__global__ void rmsnorm_backward_kernel(__nv_bfloat16 *dx, int ld_dx, float *dweight, const __nv_bfloat16 *dout,
                                        const __nv_bfloat16 *x, const __nv_bfloat16 *weight, const float *rstd,
                                        int T, int C, int accumulate)
{
    extern __shared__ float dweight_partial[];  // (C) when dweight != NULL
    if (dweight)
        for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC)
            for (int k = 0; k < VEC; k++)
                dweight_partial[i + k] = 0;
    float xv[VEC], dyv[VEC], wv[VEC], dxv[VEC];
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
        const __nv_bfloat16 *xr = x + (size_t)t * C, *dyr = dout + (size_t)t * C;
        __nv_bfloat16 *dxr = dx + (size_t)t * ld_dx;
        float r = rstd[t], dot = 0;
        for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC) {
            load_vec<VEC>(xv, xr + i);
            load_vec<VEC>(dyv, dyr + i);
            load_vec<VEC>(wv, weight + i);
#pragma unroll
            for (int k = 0; k < VEC; k++)
                dot += wv[k] * dyv[k] * xv[k];
        }
        float scale = r * r * r * block_sum(dot) / C;
        for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC) {
            load_vec<VEC>(xv, xr + i);
            load_vec<VEC>(dyv, dyr + i);
            load_vec<VEC>(wv, weight + i);
            if (accumulate)
                load_vec<VEC>(dxv, dxr + i);
#pragma unroll
            for (int k = 0; k < VEC; k++) {
                float g = r * wv[k] * dyv[k] - scale * xv[k];
                dxv[k] = accumulate ? dxv[k] + g : g;
                if (dweight)
                    dweight_partial[i + k] += dyv[k] * xv[k] * r;
            }
            store_vec<VEC>(dxr + i, dxv);
        }
    }
    if (dweight)
        for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC)
            for (int k = 0; k < VEC; k++)
                atomicAdd(dweight + i + k, dweight_partial[i + k]);
}

static bool vectorizable(int C, int ld, const void *a, const void *b, const void *c, const void *d)
{
    return C % 8 == 0 && ld % 8 == 0 && is_aligned16(a) && is_aligned16(b) && is_aligned16(c) &&
           (!d || is_aligned16(d));
}

extern "C" int cuda_rmsnorm_forward(bf16_t *out, int ld_out, bf16_t *copy, float *rstd, const bf16_t *x,
                                    const bf16_t *weight, int T, int C, float eps, GpuStream stream, Err *err)
{
    SHAPE_CHECK(T >= 0 && C > 0 && ld_out >= C, err, "rmsnorm forward: bad shape T=%d C=%d ld_out=%d", T, C, ld_out);
    SHAPE_CHECK(out && rstd && x && weight, err, "rmsnorm forward: NULL pointer");
    if (T == 0)
        return 0;
    cudaStream_t s = (cudaStream_t)stream;
    SHAPE_CHECK(copy != x && copy != out, err, "rmsnorm forward: the copy aliases x or out");
    if (vectorizable(C, ld_out, out, x, weight, copy))
        rmsnorm_forward_kernel<8><<<T, ROW_THREADS, 0, s>>>(out, ld_out, copy, rstd, x, weight, C, eps);
    else
        rmsnorm_forward_kernel<1><<<T, ROW_THREADS, 0, s>>>(out, ld_out, copy, rstd, x, weight, C, eps);
    LAUNCH_CHECK(err);
    return 0;
}

extern "C" int cuda_rmsnorm_backward(bf16_t *dx, int ld_dx, float *dweight, const bf16_t *dout, const bf16_t *x,
                                     const bf16_t *weight, const float *rstd, int T, int C, int accumulate,
                                     GpuStream stream, Err *err)
{
    SHAPE_CHECK(T >= 0 && C > 0 && ld_dx >= C, err, "rmsnorm backward: bad shape T=%d C=%d ld_dx=%d", T, C, ld_dx);
    SHAPE_CHECK(dx && dout && x && weight && rstd, err, "rmsnorm backward: NULL pointer");
    SHAPE_CHECK(!(accumulate && dx == dout), err, "rmsnorm backward: dx aliases dout while accumulating");
    if (T == 0)
        return 0;
    cudaStream_t s = (cudaStream_t)stream;
    size_t shared = dweight ? (size_t)C * sizeof(float) : 0;
    int device, sms;
    CUDA_CHECK(cudaGetDevice(&device), err);
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), err);
    // With dweight, every block ends with C atomicAdds on the same C addresses: one block of 1024
    // threads per SM keeps that contention 4x below 4 blocks of 256 (measured 149 us against 36 us
    // without dweight at 4096 x 4096 before this change; NOTES.md).
    int threads = dweight ? 1024 : ROW_THREADS, per_sm = dweight ? 1 : 4;
    int blocks = T < per_sm * sms ? T : per_sm * sms;
    if (vectorizable(C, ld_dx, dx, dout, x, weight)) {
        if (shared > 48 * 1024)
            CUDA_CHECK(cudaFuncSetAttribute(rmsnorm_backward_kernel<8>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)shared), err);
        rmsnorm_backward_kernel<8><<<blocks, threads, shared, s>>>(dx, ld_dx, dweight, dout, x, weight, rstd, T,
                                                                      C, accumulate);
    } else {
        if (shared > 48 * 1024)
            CUDA_CHECK(cudaFuncSetAttribute(rmsnorm_backward_kernel<1>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)shared), err);
        rmsnorm_backward_kernel<1><<<blocks, threads, shared, s>>>(dx, ld_dx, dweight, dout, x, weight, rstd, T,
                                                                      C, accumulate);
    }
    LAUNCH_CHECK(err);
    return 0;
}
