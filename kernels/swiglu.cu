// SwiGLU forward and backward: elementwise over (rows, cols), memory-bound (forward 6 bytes an
// element, backward 10), 8 elements (16 bytes) per thread when cols and the outputs' row stride
// are multiples of 8 and the pointers are aligned. Thread i handles elements i*VEC .. of the
// dense (rows, cols) index; the outputs' rows are ld apart.
#include "cuda_check.cuh"
#include "swiglu.cuh"

__device__ inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <int VEC>
__device__ inline void load_n(float *v, const __nv_bfloat16 *p)
{
    if (VEC == 8)
        load_bf16x8(v, p);
    else
        v[0] = __bfloat162float(*p);
}

template <int VEC>
__device__ inline void store_n(__nv_bfloat16 *p, const float *v)
{
    if (VEC == 8)
        store_bf16x8(p, v);
    else
        *p = __float2bfloat16(v[0]);
}

// Offset in a (rows, cols) array of row stride ld of dense element i.
__device__ inline size_t strided(size_t i, unsigned cols, unsigned ld)
{
    size_t row = i / cols;
    return row * ld + (i - row * cols);
}

template <int VEC>
__global__ void swiglu_forward_kernel(__nv_bfloat16 *out, unsigned ld, const __nv_bfloat16 *gate,
                                      const __nv_bfloat16 *up, size_t n, unsigned cols)
{
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (i >= n)
        return;
    float g[VEC], u[VEC];
    load_n<VEC>(g, gate + i);
    load_n<VEC>(u, up + i);
#pragma unroll
    for (int k = 0; k < VEC; k++)
        g[k] = g[k] * sigmoid(g[k]) * u[k];
    store_n<VEC>(out + (ld == cols ? i : strided(i, cols, ld)), g);
}

// d silu(g)/dg = sig(g) * (1 + g * (1 - sig(g)))
template <int VEC>
__global__ void swiglu_backward_kernel(__nv_bfloat16 *dgate, __nv_bfloat16 *dup, unsigned ld,
                                       const __nv_bfloat16 *dout, const __nv_bfloat16 *gate,
                                       const __nv_bfloat16 *up, size_t n, unsigned cols)
{
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    if (i >= n)
        return;
    float g[VEC], u[VEC], dy[VEC], dg[VEC], du[VEC];
    load_n<VEC>(g, gate + i);
    load_n<VEC>(u, up + i);
    load_n<VEC>(dy, dout + i);
#pragma unroll
    for (int k = 0; k < VEC; k++) {
        float s = sigmoid(g[k]);
        du[k] = dy[k] * g[k] * s;
        dg[k] = dy[k] * u[k] * s * (1.0f + g[k] * (1.0f - s));
    }
    size_t o = ld == cols ? i : strided(i, cols, ld);
    store_n<VEC>(dgate + o, dg);
    store_n<VEC>(dup + o, du);
}

extern "C" int cuda_swiglu_forward(bf16_t *out, int ld_out, const bf16_t *gate, const bf16_t *up, int rows, int cols,
                                   GpuStream stream, Err *err)
{
    SHAPE_CHECK(rows >= 0 && cols > 0 && ld_out >= cols, err, "swiglu forward: bad shape rows=%d cols=%d ld_out=%d",
                rows, cols, ld_out);
    SHAPE_CHECK(out && gate && up, err, "swiglu forward: NULL pointer");
    SHAPE_CHECK(ld_out == cols || (out != gate && out != up), err,
                "swiglu forward: out aliases an input with ld_out %d != cols %d", ld_out, cols);
    size_t n = (size_t)rows * cols;
    if (n == 0)
        return 0;
    cudaStream_t s = (cudaStream_t)stream;
    int threads = 256;
    if (cols % 8 == 0 && ld_out % 8 == 0 && is_aligned16(out) && is_aligned16(gate) && is_aligned16(up))
        swiglu_forward_kernel<8><<<ceil_div(n / 8, threads), threads, 0, s>>>(out, ld_out, gate, up, n, cols);
    else
        swiglu_forward_kernel<1><<<ceil_div(n, threads), threads, 0, s>>>(out, ld_out, gate, up, n, cols);
    LAUNCH_CHECK(err);
    return 0;
}

extern "C" int cuda_swiglu_backward(bf16_t *dgate, bf16_t *dup, int ld_d, const bf16_t *dout, const bf16_t *gate,
                                    const bf16_t *up, int rows, int cols, GpuStream stream, Err *err)
{
    SHAPE_CHECK(rows >= 0 && cols > 0 && ld_d >= cols, err, "swiglu backward: bad shape rows=%d cols=%d ld_d=%d",
                rows, cols, ld_d);
    SHAPE_CHECK(dgate && dup && dout && gate && up, err, "swiglu backward: NULL pointer");
    SHAPE_CHECK(dgate != dup, err, "swiglu backward: dgate and dup are the same buffer");
    SHAPE_CHECK(ld_d == cols || (dgate != gate && dup != up), err,
                "swiglu backward: dgate or dup aliases its input with ld_d %d != cols %d", ld_d, cols);
    size_t n = (size_t)rows * cols;
    if (n == 0)
        return 0;
    cudaStream_t s = (cudaStream_t)stream;
    int threads = 256;
    if (cols % 8 == 0 && ld_d % 8 == 0 && is_aligned16(dgate) && is_aligned16(dup) && is_aligned16(dout) &&
        is_aligned16(gate) && is_aligned16(up))
        swiglu_backward_kernel<8><<<ceil_div(n / 8, threads), threads, 0, s>>>(dgate, dup, ld_d, dout, gate, up, n,
                                                                              cols);
    else
        swiglu_backward_kernel<1><<<ceil_div(n, threads), threads, 0, s>>>(dgate, dup, ld_d, dout, gate, up, n,
                                                                          cols);
    LAUNCH_CHECK(err);
    return 0;
}
