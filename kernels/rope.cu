// RoPE: one thread per (token, PAIRS consecutive rotation pairs, ROPE_HEADS heads). cos/sin of a
// (token, pair) are the same for every head, so a thread computes them once and applies them to
// ROPE_HEADS heads (blockIdx.y picks the group of heads). PAIRS = 4 moves 8 bytes per access (when
// head_dim % 8 == 0), else 1. Memory-bound: T * n_heads * head_dim * 2 bytes read and written;
// sincosf in full precision (angles reach 8192 rad and more, where the fast intrinsic is off by
// far more than bf16 rounding).
#include "cuda_check.cuh"
#include "rope.cuh"

#define ROPE_HEADS 8  // heads per thread

template <int PAIRS> struct BfVec;  // PAIRS bf16 moved as one access
template <> struct BfVec<4> {
    uint2 raw;
    __device__ void load(const __nv_bfloat16 *p) { raw = *reinterpret_cast<const uint2 *>(p); }
    __device__ void store(__nv_bfloat16 *p) const { *reinterpret_cast<uint2 *>(p) = raw; }
    __device__ float get(int k) const { return __bfloat162float(reinterpret_cast<const __nv_bfloat16 *>(&raw)[k]); }
    __device__ void set(int k, float v) { reinterpret_cast<__nv_bfloat16 *>(&raw)[k] = __float2bfloat16(v); }
};
template <> struct BfVec<1> {
    __nv_bfloat16 raw;
    __device__ void load(const __nv_bfloat16 *p) { raw = *p; }
    __device__ void store(__nv_bfloat16 *p) const { *p = raw; }
    __device__ float get(int) const { return __bfloat162float(raw); }
    __device__ void set(int, float v) { raw = __float2bfloat16(v); }
};

template <int PAIRS>
__global__ void rope_kernel(__nv_bfloat16 *x, const int32_t *pos, const float *inv_freq, int T, int n_heads,
                            int head_dim, float sign)
{
    int half = head_dim / 2, groups = half / PAIRS;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * groups)
        return;
    int i = (int)(idx % groups) * PAIRS, t = (int)(idx / groups);
    float p = (float)pos[t], c[PAIRS], s[PAIRS];
#pragma unroll
    for (int k = 0; k < PAIRS; k++) {
        sincosf(p * inv_freq[i + k], &s[k], &c[k]);
        s[k] *= sign;
    }
    int h0 = blockIdx.y * ROPE_HEADS, h1 = min(h0 + ROPE_HEADS, n_heads);
    __nv_bfloat16 *xt = x + (size_t)t * n_heads * head_dim + i;
#pragma unroll 4
    for (int h = h0; h < h1; h++) {
        __nv_bfloat16 *xh = xt + (size_t)h * head_dim;
        BfVec<PAIRS> a, b;
        a.load(xh);
        b.load(xh + half);
#pragma unroll
        for (int k = 0; k < PAIRS; k++) {
            float x1 = a.get(k), x2 = b.get(k);
            a.set(k, x1 * c[k] - x2 * s[k]);
            b.set(k, x2 * c[k] + x1 * s[k]);
        }
        a.store(xh);
        b.store(xh + half);
    }
}

static int rope_launch(bf16_t *x, const int32_t *pos, const float *inv_freq, int T, int n_heads, int head_dim,
                       float sign, GpuStream stream, Err *err)
{
    SHAPE_CHECK(T >= 0 && n_heads > 0 && head_dim > 0 && head_dim % 2 == 0, err,
                "rope: bad shape T=%d n_heads=%d head_dim=%d (head_dim must be even)", T, n_heads, head_dim);
    SHAPE_CHECK(x && pos && inv_freq, err, "rope: NULL pointer");
    if (T == 0)
        return 0;
    cudaStream_t s = (cudaStream_t)stream;
    int threads = 128;
    unsigned head_groups = ceil_div(n_heads, ROPE_HEADS);
    if (head_dim % 8 == 0 && ((uintptr_t)x & 7) == 0) {
        size_t n = (size_t)T * (head_dim / 8);
        rope_kernel<4><<<dim3(ceil_div(n, threads), head_groups), threads, 0, s>>>(x, pos, inv_freq, T, n_heads,
                                                                                    head_dim, sign);
    } else {
        size_t n = (size_t)T * (head_dim / 2);
        rope_kernel<1><<<dim3(ceil_div(n, threads), head_groups), threads, 0, s>>>(x, pos, inv_freq, T, n_heads,
                                                                                    head_dim, sign);
    }
    LAUNCH_CHECK(err);
    return 0;
}

extern "C" int cuda_rope_forward(bf16_t *x, const int32_t *pos, const float *inv_freq, int T, int n_heads,
                                 int head_dim, GpuStream stream, Err *err)
{
    return rope_launch(x, pos, inv_freq, T, n_heads, head_dim, 1.0f, stream, err);
}

extern "C" int cuda_rope_backward(bf16_t *dx, const int32_t *pos, const float *inv_freq, int T, int n_heads,
                                  int head_dim, GpuStream stream, Err *err)
{
    return rope_launch(dx, pos, inv_freq, T, n_heads, head_dim, -1.0f, stream, err);
}
