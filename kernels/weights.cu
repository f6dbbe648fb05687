// Model tensors to the device as bf16 (kernels/weights.cuh).
#include <cuda_runtime.h>
#include <string.h>

#include <vector>

#include "cuda_check.cuh"
#include "weights.cuh"

static uint16_t host_bf16_bits(float f)  // round to nearest even, as __float2bfloat16
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

int cuda_upload_tensor_bf16(bf16_t *dst, const Tensor *t, GpuStream stream, Err *err)
{
    cudaStream_t s = (cudaStream_t)stream;
    int64_t n = tensor_numel(t);
    if (t->dtype == DTYPE_BF16) {
        CUDA_CHECK(cudaMemcpyAsync(dst, t->data, (size_t)n * 2, cudaMemcpyHostToDevice, s), err);
        CUDA_CHECK(cudaStreamSynchronize(s), err);
        return 0;
    }
    const int64_t chunk = 1 << 20;
    std::vector<float> f32((size_t)(n < chunk ? n : chunk));
    std::vector<uint16_t> bits(f32.size());
    for (int64_t first = 0; first < n; first += chunk) {
        int64_t cnt = n - first < chunk ? n - first : chunk;
        tensor_to_f32(t, first, cnt, f32.data());
        for (int64_t i = 0; i < cnt; i++)
            bits[i] = host_bf16_bits(f32[i]);
        CUDA_CHECK(cudaMemcpyAsync(dst + first, bits.data(), (size_t)cnt * 2, cudaMemcpyHostToDevice, s), err);
        CUDA_CHECK(cudaStreamSynchronize(s), err);
    }
    return 0;
}

__global__ void f32_to_bf16_kernel(__nv_bfloat16 *out, const float *in, size_t n)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[i] = __float2bfloat16(in[i]);
}

int cuda_f32_to_bf16(bf16_t *out, const float *in, size_t n, GpuStream stream, Err *err)
{
    if (n == 0)
        return 0;
    f32_to_bf16_kernel<<<ceil_div(n, 256), 256, 0, (cudaStream_t)stream>>>(out, in, n);
    LAUNCH_CHECK(err);
    return 0;
}
