// Decode attention (one query per sequence, GQA) as flash-decoding: the positions of each
// (sequence, kv head) are cut into splits of `chunk` positions, one block each, so that even a
// batch of 1 with 8 kv heads fills the GPU; a second kernel merges the splits' partial softmax
// results (max m, sum l, unnormalised output) per query head.
//
// Partial kernel: one block (4 warps) per (split, kv head, sequence) serves all G = n_heads /
// n_kv_heads query heads of that kv head, so each key and value is read once for G heads.
// A key is head_dim / 8 lanes reading 16 bytes each (128: 16 lanes, two keys a warp; 64: 8 lanes,
// four keys a warp). Pass 1 writes the G scores of every position of the split to shared
// memory; the softmax of the split is then taken there (block max and sum); pass 2 reads the
// values and accumulates the weighted sum. K and V are each read once: the kernel is bound by
// the cache's bandwidth.
#include "cuda_check.cuh"
#include "decode_attention.cuh"

namespace {

constexpr int WARPS = 4;
constexpr int MAX_CHUNK = 512;       // positions per split: G * chunk floats of shared scores
constexpr int TARGET_BLOCKS = 528;   // 4 per multiprocessor of an H200
constexpr int MAX_GROUP = 8;
constexpr int LOADS_IN_FLIGHT = 4;   // keys (or values) a lane loads before using the first

struct Plan {
    int chunk, splits;
};
Plan plan_splits(int batch, int n_kv_heads, int max_len)
{
    int want = max(1, (TARGET_BLOCKS + batch * n_kv_heads - 1) / (batch * n_kv_heads));
    int chunk = (max_len + want - 1) / want;
    chunk = min(MAX_CHUNK, max(64, (chunk + 63) / 64 * 64));
    Plan p = {chunk, max(1, (max_len + chunk - 1) / chunk)};
    return p;
}

__device__ inline void bf16x8_to_float(float f[8], uint4 raw)
{
    const __nv_bfloat162 *pairs = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        float2 v = __bfloat1622float2(pairs[k]);
        f[2 * k] = v.x;
        f[2 * k + 1] = v.y;
    }
}

// grid (splits, n_kv_heads, batch), WARPS * 32 threads, G * chunk floats of dynamic shared memory.
// partials (batch, n_heads, splits, HD + 2): HD unnormalised outputs, then the max and the sum.
template <int HD, int GMAX>
__global__ void __launch_bounds__(WARPS * 32)
    decode_attention_partial(float *partials, const __nv_bfloat16 *q, const __nv_bfloat16 *k_cache,
                             const __nv_bfloat16 *v_cache, const int32_t *lens, int n_heads, int n_kv_heads,
                             int max_seq, int max_len, int chunk, float scale)
{
    constexpr int LPK = HD / 8, KPW = 32 / LPK, KPB = WARPS * KPW;  // lanes a key, keys a warp, a block
    extern __shared__ float scores[];                               // (G, chunk)
    __shared__ float acc_shared[WARPS][GMAX][HD];
    const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, splits = gridDim.x;
    const int G = n_heads / n_kv_heads;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, slot = lane / LPK, sub = lane % LPK;
    const int len = min((int)lens[b], max_len), p0 = split * chunk, n = min(chunk, len - p0);
    float *part = partials + (((size_t)b * n_heads + kvh * G) * splits + split) * (HD + 2);
    const size_t head_stride = (size_t)splits * (HD + 2);  // next query head's partial
    if (n <= 0) {  // this split lies past the sequence's end: an empty partial
        if (threadIdx.x < G) {
            part[threadIdx.x * head_stride + HD] = -INFINITY;
            part[threadIdx.x * head_stride + HD + 1] = 0.0f;
        }
        return;
    }
    float qf[GMAX][8];
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        if (g < G) {
            uint4 raw = *reinterpret_cast<const uint4 *>(q + ((size_t)b * n_heads + kvh * G + g) * HD + sub * 8);
            bf16x8_to_float(qf[g], raw);
#pragma unroll
            for (int k = 0; k < 8; k++)
                qf[g][k] *= scale;
        }
    }
    const size_t head_base = ((size_t)b * n_kv_heads + kvh) * max_seq;
    const __nv_bfloat16 *keys = k_cache + (head_base + p0) * HD + sub * 8;
    const __nv_bfloat16 *values = v_cache + (head_base + p0) * HD + sub * 8;

    // pass 1: scores (G, n) into shared memory. The loop bound is uniform over the warp (the
    // shuffles need every lane); positions past n load nothing and store nothing.
    for (int base = warp * KPW; base < n; base += KPB * LOADS_IN_FLIGHT) {
        uint4 raw[LOADS_IN_FLIGHT];
#pragma unroll
        for (int i = 0; i < LOADS_IN_FLIGHT; i++) {
            int p = base + i * KPB + slot;
            raw[i] = p < n ? *reinterpret_cast<const uint4 *>(keys + (size_t)p * HD) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int i = 0; i < LOADS_IN_FLIGHT; i++) {
            int p = base + i * KPB + slot;
            float kf[8];
            bf16x8_to_float(kf, raw[i]);
#pragma unroll
            for (int g = 0; g < GMAX; g++) {
                if (g >= G)
                    break;
                float d = 0;
#pragma unroll
                for (int k = 0; k < 8; k++)
                    d += qf[g][k] * kf[k];
#pragma unroll
                for (int o = LPK / 2; o > 0; o >>= 1)
                    d += __shfl_xor_sync(0xffffffffu, d, o);
                if (sub == 0 && p < n)
                    scores[g * chunk + p] = d;
            }
        }
    }
    __syncthreads();

    // softmax of this split, per query head: m = max, scores -> exp(s - m), l = sum
    float m[GMAX], l[GMAX];
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        if (g >= G)
            break;
        float local = -INFINITY;
        for (int p = threadIdx.x; p < n; p += WARPS * 32)
            local = fmaxf(local, scores[g * chunk + p]);
        m[g] = block_max(local);
        float sum = 0;
        for (int p = threadIdx.x; p < n; p += WARPS * 32) {
            float e = expf(scores[g * chunk + p] - m[g]);
            scores[g * chunk + p] = e;
            sum += e;
        }
        l[g] = block_sum(sum);
    }
    __syncthreads();

    // pass 2: acc (G, HD) = sum over positions of weight * value
    float acc[GMAX][8] = {};
    for (int base = warp * KPW; base < n; base += KPB * LOADS_IN_FLIGHT) {
        uint4 raw[LOADS_IN_FLIGHT];
#pragma unroll
        for (int i = 0; i < LOADS_IN_FLIGHT; i++) {
            int p = base + i * KPB + slot;
            raw[i] = p < n ? *reinterpret_cast<const uint4 *>(values + (size_t)p * HD) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int i = 0; i < LOADS_IN_FLIGHT; i++) {
            int p = base + i * KPB + slot;
            if (p >= n)
                continue;
            float vf[8];
            bf16x8_to_float(vf, raw[i]);
#pragma unroll
            for (int g = 0; g < GMAX; g++) {
                if (g >= G)
                    break;
                float w = scores[g * chunk + p];
#pragma unroll
                for (int k = 0; k < 8; k++)
                    acc[g][k] += w * vf[k];
            }
        }
    }
    // lanes of the same dims (sub) in different key slots, then the warps
#pragma unroll
    for (int g = 0; g < GMAX; g++)
#pragma unroll
        for (int k = 0; k < 8; k++)
#pragma unroll
            for (int o = LPK; o < 32; o <<= 1)
                acc[g][k] += __shfl_xor_sync(0xffffffffu, acc[g][k], o);
    if (slot == 0) {
#pragma unroll
        for (int g = 0; g < GMAX; g++)
            if (g < G)
#pragma unroll
                for (int k = 0; k < 8; k++)
                    acc_shared[warp][g][sub * 8 + k] = acc[g][k];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < G * HD; e += WARPS * 32) {
        int g = e / HD, d = e % HD;
        float v = 0;
#pragma unroll
        for (int w = 0; w < WARPS; w++)
            v += acc_shared[w][g][d];
        part[g * head_stride + d] = v;
    }
    if (threadIdx.x == 0) {
#pragma unroll
        for (int g = 0; g < GMAX; g++)
            if (g < G) {
                part[g * head_stride + HD] = m[g];
                part[g * head_stride + HD + 1] = l[g];
            }
    }
}

// grid (n_heads, batch), head_dim threads: merges the splits of one query head.
__global__ void decode_attention_combine(__nv_bfloat16 *out, const float *partials, int n_heads, int head_dim,
                                         int splits)
{
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    const float *part = partials + ((size_t)b * n_heads + h) * splits * (head_dim + 2);
    float M = -INFINITY;
    for (int s = 0; s < splits; s++)
        M = fmaxf(M, part[s * (head_dim + 2) + head_dim]);
    float num = 0, den = 0;
    for (int s = 0; s < splits; s++) {
        const float *ps = part + s * (head_dim + 2);
        if (ps[head_dim + 1] == 0.0f)  // empty split: its outputs were never written
            continue;
        float w = expf(ps[head_dim] - M);
        num += w * ps[d];
        den += w * ps[head_dim + 1];
    }
    out[((size_t)b * n_heads + h) * head_dim + d] = __float2bfloat16(den > 0 ? num / den : 0.0f);
}

template <int HD>
bool launch_partial(int G, dim3 grid, size_t shared, cudaStream_t s, float *partials, const __nv_bfloat16 *q,
                    const __nv_bfloat16 *k, const __nv_bfloat16 *v, const int32_t *lens, int n_heads, int n_kv,
                    int max_seq, int max_len, int chunk, float scale)
{
#define DECODE_PARTIAL(GMAX)                                                                                     \
    decode_attention_partial<HD, GMAX><<<grid, WARPS * 32, shared, s>>>(partials, q, k, v, lens, n_heads, n_kv, \
                                                                        max_seq, max_len, chunk, scale)
    if (G == 1)
        DECODE_PARTIAL(1);
    else if (G == 2)
        DECODE_PARTIAL(2);
    else if (G <= 4)
        DECODE_PARTIAL(4);
    else if (G <= 8)
        DECODE_PARTIAL(8);
    else
        return false;
#undef DECODE_PARTIAL
    return true;
}

}  // namespace

extern "C" size_t cuda_decode_attention_workspace_bytes(int batch, int n_heads, int n_kv_heads, int head_dim,
                                                        int max_len)
{
    if (batch < 1 || n_heads < 1 || n_kv_heads < 1 || head_dim < 1 || max_len < 0)
        return 0;
    Plan p = plan_splits(batch, n_kv_heads, max_len);
    return (size_t)batch * n_heads * p.splits * (head_dim + 2) * sizeof(float);
}

extern "C" int cuda_decode_attention(bf16_t *out, const bf16_t *q, const bf16_t *k_cache, const bf16_t *v_cache,
                                     const int32_t *lens, int batch, int n_heads, int n_kv_heads, int head_dim,
                                     int max_seq, int max_len, float scale, float *workspace, size_t workspace_bytes,
                                     GpuStream stream, Err *err)
{
    SHAPE_CHECK(out && q && k_cache && v_cache && lens && workspace, err, "decode attention: NULL pointer");
    SHAPE_CHECK(head_dim == 64 || head_dim == 128, err, "decode attention: head_dim=%d (64 or 128)", head_dim);
    SHAPE_CHECK(batch >= 1 && n_kv_heads >= 1 && n_heads >= n_kv_heads && n_heads % n_kv_heads == 0, err,
                "decode attention: batch=%d n_heads=%d n_kv_heads=%d (n_heads a multiple of n_kv_heads)", batch,
                n_heads, n_kv_heads);
    SHAPE_CHECK(n_heads / n_kv_heads <= MAX_GROUP, err, "decode attention: %d query heads per kv head (at most %d)",
                n_heads / n_kv_heads, MAX_GROUP);
    SHAPE_CHECK(max_len >= 0 && max_len <= max_seq, err, "decode attention: max_len=%d outside 0..max_seq=%d",
                max_len, max_seq);
    SHAPE_CHECK(is_aligned16(q) && is_aligned16(k_cache) && is_aligned16(v_cache), err,
                "decode attention: q and the caches must be 16-byte aligned");
    size_t need = cuda_decode_attention_workspace_bytes(batch, n_heads, n_kv_heads, head_dim, max_len);
    SHAPE_CHECK(workspace_bytes >= need, err, "decode attention: workspace of %zu bytes, %zu needed",
                workspace_bytes, need);
    Plan p = plan_splits(batch, n_kv_heads, max_len);
    int G = n_heads / n_kv_heads;
    dim3 grid(p.splits, n_kv_heads, batch);
    size_t shared = (size_t)G * p.chunk * sizeof(float);
    cudaStream_t s = (cudaStream_t)stream;
    if (head_dim == 64)
        launch_partial<64>(G, grid, shared, s, workspace, q, k_cache, v_cache, lens, n_heads, n_kv_heads, max_seq,
                           max_len, p.chunk, scale);
    else
        launch_partial<128>(G, grid, shared, s, workspace, q, k_cache, v_cache, lens, n_heads, n_kv_heads, max_seq,
                            max_len, p.chunk, scale);
    LAUNCH_CHECK(err);
    decode_attention_combine<<<dim3(n_heads, batch), head_dim, 0, s>>>(out, workspace, n_heads, head_dim, p.splits);
    LAUNCH_CHECK(err);
    return 0;
}
