// Embedding gather: one block per token copies its row, 16 bytes per thread per step when the
// rows allow it (C % 8 == 0 and aligned pointers), 2 bytes otherwise. Pure data movement:
// T * C * 2 bytes read and written.
#include "cuda_check.cuh"
#include "embedding.cuh"

template <int VEC>  // bf16 elements moved per access: 8 (one uint4) or 1
__global__ void embedding_forward_kernel(__nv_bfloat16 *out, const int32_t *ids, const __nv_bfloat16 *table,
                                         int C, int V, int *bad_id)
{
    int t = blockIdx.x;
    int id = ids[t];
    __nv_bfloat16 *dst = out + (size_t)t * C;
    bool valid = id >= 0 && id < V;
    if (!valid && threadIdx.x == 0 && bad_id)
        *bad_id = 1;
    const __nv_bfloat16 *src = table + (size_t)(valid ? id : 0) * C;
    for (int i = threadIdx.x * VEC; i < C; i += blockDim.x * VEC) {
        if (VEC == 8) {
            uint4 v = valid ? *reinterpret_cast<const uint4 *>(src + i) : make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4 *>(dst + i) = v;
        } else {
            dst[i] = valid ? src[i] : __float2bfloat16(0.0f);
        }
    }
}

extern "C" int cuda_embedding_forward(bf16_t *out, const int32_t *ids, const bf16_t *table, int T, int C,
                                      int V, int *bad_id, GpuStream stream, Err *err)
{
    SHAPE_CHECK(T >= 0 && C > 0 && V > 0, err, "embedding: bad shape T=%d C=%d V=%d", T, C, V);
    SHAPE_CHECK(out && ids && table, err, "embedding: NULL pointer");
    if (T == 0)
        return 0;
    cudaStream_t s = (cudaStream_t)stream;
    if (C % 8 == 0 && is_aligned16(out) && is_aligned16(table)) {
        int threads = C / 8 < 256 ? ((C / 8 + 31) / 32) * 32 : 256;
        embedding_forward_kernel<8><<<T, threads, 0, s>>>(out, ids, table, C, V, bad_id);
    } else {
        embedding_forward_kernel<1><<<T, 256, 0, s>>>(out, ids, table, C, V, bad_id);
    }
    LAUNCH_CHECK(err);
    return 0;
}
