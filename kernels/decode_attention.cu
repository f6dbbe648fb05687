// Decode attention (one query per sequence, GQA) as flash-decoding in ONE kernel: the positions
// of each (sequence, kv head) are cut into splits of `chunk` positions, one block each, so that
// even a batch of 1 with 8 kv heads fills the GPU (the number of splits is planned from max_len,
// about one wave of blocks; each sequence's actual length is spread over them in chunks of at
// least 64); the last block of a (sequence, kv head) to finish (an atomic counter) merges the
// splits' partial softmax results. A batch-1 decode step
// runs this once a layer and is latency-bound, so what counts is launches and memory round
// trips: the first version had a second kernel for the merge (and generation a third before it
// for RoPE and the cache store, which the `_rope` entry point now does inside), and read keys
// and values in two passes with block-wide softmax reductions between them.
//
// One block (8 warps) per (split, kv head, sequence) serves all G = n_heads / n_kv_heads query
// heads of that kv head, so each key and value is read once for G heads. A key is head_dim / 8
// lanes reading 16 bytes each (128: 16 lanes, two keys a warp; 64: 8 lanes, four keys a warp).
// One pass with an online softmax: a lane loads LIF keys and their values at once, scores them
// and folds them into a running (max, sum, unnormalised output); key slots and warps are merged
// at the end in a fixed order.
//
// Splits that hold no position (past the sequence's end) return at once and take no part: the
// merge counts `used` = ceil(len / chunk) splits, which every block of the sequence computes
// alike. One used split writes its normalised output directly (no partials, no counter). The
// merge adds the splits in order 0..used-1: results are deterministic and do not depend on which
// block finished last.
#include "cuda_check.cuh"
#include "decode_attention.cuh"

namespace {

constexpr int WARPS = 8;
constexpr int THREADS = WARPS * 32;
constexpr int MAX_CHUNK = 512;       // positions per split
// Splits are chosen so that the grid is about one wave: one 8-warp block a multiprocessor of an
// H200 (a constant, not the device's count, so that the workspace size does not depend on the
// device). Blocks past the first wave only wait for a place, which at batch 1 with a long cache
// (4096 positions: 64 splits of 64 before) cost more than a block walking more keys.
constexpr int TARGET_BLOCKS = 132;
constexpr int MAX_GROUP = 8;
constexpr float LOG2E = 1.4426950408889634f;

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

// Workspace: [counters (batch, n_kv_heads) int, padded to 256 bytes][partials (batch, n_heads,
// splits, head_dim + 2) fp32]
size_t counter_bytes(int batch, int n_kv_heads) { return ((size_t)batch * n_kv_heads * 4 + 255) / 256 * 256; }

struct Args {
    __nv_bfloat16 *out;           // (batch, n_heads, HD)
    const __nv_bfloat16 *q;       // row b's n_heads query heads start at q + b * row_stride
    const __nv_bfloat16 *new_k;   // ROPE: row b's new keys (before RoPE) at new_k + b * row_stride
    const __nv_bfloat16 *new_v;   // ROPE: its values
    size_t row_stride;
    __nv_bfloat16 *k_cache, *v_cache;   // (batch, n_kv_heads, max_seq, HD); written only by ROPE
    const int32_t *lens, *pos;          // (batch); pos only with ROPE
    const float *inv_freq;              // (HD / 2), ROPE only
    int n_heads, n_kv_heads, max_seq, max_len;
    float scale;
    float *partials;
    int *counters;
};

// grid (splits, n_kv_heads, batch), THREADS threads.
template <int HD, int GMAX, bool ROPE>
__global__ void __launch_bounds__(THREADS) decode_attention_kernel(Args a)
{
    constexpr int LPK = HD / 8, KPW = 32 / LPK, KPB = WARPS * KPW;  // lanes a key, keys a warp, a block
    constexpr int HALF = HD / 2;
    static_assert(THREADS % HD == 0, "a thread's dims are threadIdx.x % HD in every head");
    constexpr int LIF = GMAX <= 4 ? 4 : 2;  // keys (and values) a lane loads at once
    __shared__ float acc_shared[WARPS][GMAX][HD];
    __shared__ float ml_shared[WARPS][GMAX][2];
    __shared__ float q_shared[GMAX][HD];
    __shared__ int is_last;
    const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, splits = gridDim.x;
    const int G = a.n_heads / a.n_kv_heads;
    // The grid's splits (planned for max_len) share this sequence's actual length: chunks of at
    // least 64 positions, as few splits as that gives (a short sequence in a long cache keeps
    // the parallelism a short cache would give it). Every block of the sequence computes the same.
    const int len = min((int)a.lens[b], a.max_len);
    const int chunk = max(64, ((len + splits - 1) / splits + 63) / 64 * 64);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, slot = lane / LPK, sub = lane % LPK;
    const size_t head_base = ((size_t)b * a.n_kv_heads + kvh) * a.max_seq;
    const int p_new = ROPE ? a.pos[b] : 0;
    // A programmatic dependent launch (pdl) may run this part while the kernel before it (the one
    // that makes q, k and v) still runs: lens, pos and the cache's older positions are inputs of
    // the whole step, so they may be read before griddepcontrol.wait; q and the new k, v only after.
    // (Without pdl the wait and the trigger do nothing.)
    asm volatile("griddepcontrol.launch_dependents;");
    const bool stores = ROPE && a.lens[b] > p_new && split == min(p_new / chunk, splits - 1);
    // ROPE: the angle of this thread's rotation pair, the same for q's heads and k (threads
    // cover dims threadIdx.x % HD, as THREADS is a multiple of HD)
    float rot_s = 0.0f, rot_c = 1.0f;
    if (ROPE)
        sincosf((float)p_new * a.inv_freq[threadIdx.x % HD % HALF], &rot_s, &rot_c);

    // ROPE: the new token's key (rotated) and value into the cache at p_new, by the block whose
    // split holds p_new (the last split when p_new is past max_len). The barrier makes the stores
    // visible to this block's loads below; no other block reads that position.
    if (stores) {
        asm volatile("griddepcontrol.wait;" ::: "memory");
        const __nv_bfloat16 *kr = a.new_k + b * a.row_stride + (size_t)kvh * HD;
        const __nv_bfloat16 *vr = a.new_v + b * a.row_stride + (size_t)kvh * HD;
        __nv_bfloat16 *kc = a.k_cache + (head_base + p_new) * HD, *vc = a.v_cache + (head_base + p_new) * HD;
        for (int i = threadIdx.x; i < HALF; i += THREADS) {
            float r1, r2;
            rope_pair(__bfloat162float(kr[i]), __bfloat162float(kr[i + HALF]), rot_c, rot_s, &r1, &r2);
            kc[i] = __float2bfloat16(r1);
            kc[i + HALF] = __float2bfloat16(r2);
        }
        for (int d = threadIdx.x; d < HD; d += THREADS)
            vc[d] = vr[d];
        __syncthreads();
    }

    const int p0 = split * chunk, n = min(chunk, len - p0);
    const int used = (len + chunk - 1) / chunk;
    __nv_bfloat16 *out = a.out + ((size_t)b * a.n_heads + kvh * G) * HD;
    if (len <= 0) {  // an empty sequence: a zero row, written by split 0
        asm volatile("griddepcontrol.wait;" ::: "memory");
        if (split == 0)
            for (int e = threadIdx.x; e < G * HD; e += THREADS)
                out[e] = __float2bfloat16(0.0f);
        return;
    }
    if (n <= 0)  // past the sequence's end: takes no part
        return;

    const __nv_bfloat16 *keys = a.k_cache + (head_base + p0) * HD + sub * 8;
    const __nv_bfloat16 *values = a.v_cache + (head_base + p0) * HD + sub * 8;
    // Keys slot, slot + KPB, ... of the warp's stride, LIF at a time, with their values; the first
    // ones are asked for now, before q is made, and each round asks for the next round's before
    // using its own (the loop bound is uniform over the warp: the shuffles below need every lane;
    // keys past n load nothing and score -inf).
    uint4 kraw[LIF], vraw[LIF], knext[LIF], vnext[LIF];
    auto load_keys = [&](int base, uint4 (&kd)[LIF], uint4 (&vd)[LIF]) {
#pragma unroll
        for (int i = 0; i < LIF; i++) {
            int p = base + i * KPB + slot;
            kd[i] = p < n ? *reinterpret_cast<const uint4 *>(keys + (size_t)p * HD) : make_uint4(0, 0, 0, 0);
            vd[i] = p < n ? *reinterpret_cast<const uint4 *>(values + (size_t)p * HD) : make_uint4(0, 0, 0, 0);
        }
    };
    int base = warp * KPW;
    if (base < n)
        load_keys(base, kraw, vraw);
    if (!stores)
        asm volatile("griddepcontrol.wait;" ::: "memory");

    // the G query heads, scaled (ROPE: rotated first, with rope_pair and one bf16 rounding); every
    // load of a thread first, then the arithmetic
    {
        constexpr int QPT = (GMAX * HD + THREADS - 1) / THREADS;  // q values a thread makes
        const __nv_bfloat16 *qrow = a.q + b * a.row_stride + (size_t)kvh * G * HD;
        float x1[QPT], x2[QPT];
#pragma unroll
        for (int j = 0; j < QPT; j++) {
            int e = threadIdx.x + j * THREADS, g = e / HD, d = e % HD;
            x1[j] = x2[j] = 0.0f;
            if (e < G * HD) {
                if (ROPE) {
                    const __nv_bfloat16 *qh = qrow + (size_t)g * HD + d % HALF;
                    x1[j] = __bfloat162float(qh[0]);
                    x2[j] = __bfloat162float(qh[HALF]);
                } else {
                    x1[j] = __bfloat162float(qrow[e]);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < QPT; j++) {
            int e = threadIdx.x + j * THREADS, g = e / HD, d = e % HD;
            if (e >= G * HD)
                break;
            float v = x1[j];
            if (ROPE) {
                float r1, r2;
                rope_pair(x1[j], x2[j], rot_c, rot_s, &r1, &r2);
                v = __bfloat162float(__float2bfloat16(d < HALF ? r1 : r2));
            }
            q_shared[g][d] = v * (a.scale * LOG2E);  // scores in base 2: exp2f below
        }
    }
    __syncthreads();
    float qf[GMAX][8];
#pragma unroll
    for (int g = 0; g < GMAX; g++)
#pragma unroll
        for (int k = 0; k < 8; k++)
            qf[g][k] = g < G ? q_shared[g][sub * 8 + k] : 0.0f;

    // One pass with an online softmax: each key slot (LPK lanes) keeps a running max m, sum l and
    // unnormalised output acc (its lane's 8 dims) per query head.
    float m[GMAX], l[GMAX], acc[GMAX][8];
#pragma unroll
    for (int g = 0; g < GMAX; g++) {
        m[g] = -INFINITY, l[g] = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; k++)
            acc[g][k] = 0.0f;
    }
    for (; base < n; base += KPB * LIF) {
        const bool more = base + KPB * LIF < n;
        if (more)
            load_keys(base + KPB * LIF, knext, vnext);
        float sc[LIF][GMAX];
#pragma unroll
        for (int i = 0; i < LIF; i++) {
            bool valid = base + i * KPB + slot < n;
            float kf[8];
            unpack_bf16x8(kf, kraw[i]);
#pragma unroll
            for (int g = 0; g < GMAX; g++) {
                sc[i][g] = -INFINITY;
                if (g >= G)  // uniform over the block
                    continue;
                float d = 0;
#pragma unroll
                for (int k = 0; k < 8; k++)
                    d += qf[g][k] * kf[k];
#pragma unroll
                for (int o = LPK / 2; o > 0; o >>= 1)
                    d += __shfl_xor_sync(0xffffffffu, d, o);
                if (valid)
                    sc[i][g] = d;
            }
        }
        // the running max, rescaling and weights per head; then each value unpacked once for all heads
#pragma unroll
        for (int g = 0; g < GMAX; g++) {
            if (g >= G)
                break;
            float mn = m[g];
#pragma unroll
            for (int i = 0; i < LIF; i++)
                mn = fmaxf(mn, sc[i][g]);
            float c = mn == -INFINITY ? 1.0f : exp2f(m[g] - mn);  // 0 on the first keys (m = -inf)
            l[g] *= c;
#pragma unroll
            for (int k = 0; k < 8; k++)
                acc[g][k] *= c;
#pragma unroll
            for (int i = 0; i < LIF; i++) {
                sc[i][g] = mn == -INFINITY ? 0.0f : exp2f(sc[i][g] - mn);  // no key of this slot yet: 0
                l[g] += sc[i][g];
            }
            m[g] = mn;
        }
#pragma unroll
        for (int i = 0; i < LIF; i++) {
            float vf[8];
            unpack_bf16x8(vf, vraw[i]);
#pragma unroll
            for (int g = 0; g < GMAX; g++)
                if (g < G)
#pragma unroll
                    for (int k = 0; k < 8; k++)
                        acc[g][k] += sc[i][g] * vf[k];
        }
        if (more)
#pragma unroll
            for (int i = 0; i < LIF; i++)
                kraw[i] = knext[i], vraw[i] = vnext[i];
    }
    // merge the key slots of the warp (lanes with the same dims, `sub`), then the warps, in a fixed order
#pragma unroll
    for (int o = LPK; o < 32; o <<= 1)
#pragma unroll
        for (int g = 0; g < GMAX; g++) {
            float mo = __shfl_xor_sync(0xffffffffu, m[g], o), lo = __shfl_xor_sync(0xffffffffu, l[g], o);
            float mn = fmaxf(m[g], mo);
            float c1 = mn == -INFINITY ? 0.0f : exp2f(m[g] - mn), c2 = mn == -INFINITY ? 0.0f : exp2f(mo - mn);
            l[g] = l[g] * c1 + lo * c2;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                float ao = __shfl_xor_sync(0xffffffffu, acc[g][k], o);
                acc[g][k] = acc[g][k] * c1 + ao * c2;
            }
            m[g] = mn;
        }
    if (slot == 0) {
#pragma unroll
        for (int g = 0; g < GMAX; g++)
            if (g < G) {
#pragma unroll
                for (int k = 0; k < 8; k++)
                    acc_shared[warp][g][sub * 8 + k] = acc[g][k];
                if (sub == 0)
                    ml_shared[warp][g][0] = m[g], ml_shared[warp][g][1] = l[g];
            }
    }
    __syncthreads();
    // the block's result per head g: max M, sum L, unnormalised output (thread e's dim)
    auto block_result = [&](int g, int d, float *M, float *L) {
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; w++)
            mx = fmaxf(mx, ml_shared[w][g][0]);
        float v = 0, s = 0;
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            float c = ml_shared[w][g][0] == -INFINITY ? 0.0f : exp2f(ml_shared[w][g][0] - mx);
            v += c * acc_shared[w][g][d];
            s += c * ml_shared[w][g][1];
        }
        *M = mx, *L = s;
        return v;
    };

    if (used == 1) {  // the only split: normalise and write
        for (int e = threadIdx.x; e < G * HD; e += THREADS) {
            float M, L, v = block_result(e / HD, e % HD, &M, &L);
            out[e] = __float2bfloat16(v / L);
        }
        return;
    }

    // partials (batch, n_heads, splits, HD + 2): HD unnormalised outputs, then the max and the sum
    float *part = a.partials + (((size_t)b * a.n_heads + kvh * G) * splits + split) * (HD + 2);
    const size_t head_stride = (size_t)splits * (HD + 2);  // next query head's partial
    for (int e = threadIdx.x; e < G * HD; e += THREADS) {
        int g = e / HD, d = e % HD;
        float M, L, v = block_result(g, d, &M, &L);
        part[g * head_stride + d] = v;
        if (d == 0)
            part[g * head_stride + HD] = M, part[g * head_stride + HD + 1] = L;
    }
    // The block's partials, then the counter: the barrier orders every thread's stores before
    // thread 0's release at device scope; its acquire and the second barrier order the last
    // block's reads of the others' partials after their releases.
    __syncthreads();
    int *counter = a.counters + (size_t)b * a.n_kv_heads + kvh;
    if (threadIdx.x == 0) {
        int done;
        asm volatile("atom.add.acq_rel.gpu.s32 %0, [%1], 1;" : "=r"(done) : "l"(counter) : "memory");
        is_last = done == used - 1;
    }
    __syncthreads();
    if (!is_last)
        return;
    // merge the used splits of the G heads, in split order, as an online softmax over splits (the
    // loads of all of a thread's heads for one split are issued together)
    const float *first = a.partials + ((size_t)b * a.n_heads + kvh * G) * head_stride;
    constexpr int MPT = (GMAX * HD + THREADS - 1) / THREADS;  // outputs a thread merges
    float M[MPT], num[MPT], den[MPT];
#pragma unroll
    for (int j = 0; j < MPT; j++)
        M[j] = -INFINITY, num[j] = den[j] = 0.0f;
    for (int sp = 0; sp < used; sp++) {
        float ms[MPT], ls[MPT], vs[MPT];
#pragma unroll
        for (int j = 0; j < MPT; j++) {
            int e = threadIdx.x + j * THREADS;
            const float *ps = first + (e / HD) * head_stride + (size_t)sp * (HD + 2);
            bool mine = e < G * HD;
            ms[j] = mine ? __ldcg(ps + HD) : 0.0f;
            ls[j] = mine ? __ldcg(ps + HD + 1) : 0.0f;
            vs[j] = mine ? __ldcg(ps + e % HD) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < MPT; j++) {
            float mn = fmaxf(M[j], ms[j]), c = exp2f(M[j] - mn), w = exp2f(ms[j] - mn);
            num[j] = num[j] * c + w * vs[j];
            den[j] = den[j] * c + w * ls[j];
            M[j] = mn;
        }
    }
#pragma unroll
    for (int j = 0; j < MPT; j++) {
        int e = threadIdx.x + j * THREADS;
        if (e < G * HD)
            out[e] = __float2bfloat16(num[j] / den[j]);
    }
    if (threadIdx.x == 0)
        *counter = 0;  // ready for the next call
}

template <int HD, int GMAX, bool ROPE> void launch_one(dim3 grid, int pdl, cudaStream_t s, const Args &a)
{
    launch_kernel(decode_attention_kernel<HD, GMAX, ROPE>, grid, dim3(THREADS), 0, s, pdl != 0, a);
}

template <int HD, bool ROPE> bool launch_group(int G, dim3 grid, int pdl, cudaStream_t s, const Args &a)
{
    if (G == 1)
        launch_one<HD, 1, ROPE>(grid, pdl, s, a);
    else if (G == 2)
        launch_one<HD, 2, ROPE>(grid, pdl, s, a);
    else if (G <= 4)
        launch_one<HD, 4, ROPE>(grid, pdl, s, a);
    else if (G <= 8)
        launch_one<HD, 8, ROPE>(grid, pdl, s, a);
    else
        return false;
    return true;
}

int launch(Args a, int batch, int head_dim, bool rope, const void *workspace, size_t workspace_bytes, int pdl,
           GpuStream stream, Err *err)
{
    SHAPE_CHECK(head_dim == 64 || head_dim == 128, err, "decode attention: head_dim=%d (64 or 128)", head_dim);
    SHAPE_CHECK(batch >= 1 && a.n_kv_heads >= 1 && a.n_heads >= a.n_kv_heads && a.n_heads % a.n_kv_heads == 0,
                err, "decode attention: batch=%d n_heads=%d n_kv_heads=%d (n_heads a multiple of n_kv_heads)",
                batch, a.n_heads, a.n_kv_heads);
    SHAPE_CHECK(a.n_heads / a.n_kv_heads <= MAX_GROUP, err,
                "decode attention: %d query heads per kv head (at most %d)", a.n_heads / a.n_kv_heads, MAX_GROUP);
    SHAPE_CHECK(a.max_len >= 0 && a.max_len <= a.max_seq, err, "decode attention: max_len=%d outside 0..max_seq=%d",
                a.max_len, a.max_seq);
    SHAPE_CHECK(is_aligned16(a.q) && is_aligned16(a.k_cache) && is_aligned16(a.v_cache) && a.row_stride % 8 == 0,
                err, "decode attention: q and the caches must be 16-byte aligned");
    size_t need = cuda_decode_attention_workspace_bytes(batch, a.n_heads, a.n_kv_heads, head_dim, a.max_len);
    SHAPE_CHECK(workspace_bytes >= need, err, "decode attention: workspace of %zu bytes, %zu needed",
                workspace_bytes, need);
    Plan p = plan_splits(batch, a.n_kv_heads, a.max_len);
    a.counters = (int *)workspace;
    a.partials = (float *)((char *)workspace + counter_bytes(batch, a.n_kv_heads));
    int G = a.n_heads / a.n_kv_heads;
    dim3 grid(p.splits, a.n_kv_heads, batch);
    cudaStream_t s = (cudaStream_t)stream;
    if (head_dim == 64)
        rope ? launch_group<64, true>(G, grid, pdl, s, a) : launch_group<64, false>(G, grid, pdl, s, a);
    else
        rope ? launch_group<128, true>(G, grid, pdl, s, a) : launch_group<128, false>(G, grid, pdl, s, a);
    LAUNCH_CHECK(err);
    return 0;
}

}  // namespace

extern "C" size_t cuda_decode_attention_workspace_bytes(int batch, int n_heads, int n_kv_heads, int head_dim,
                                                        int max_len)
{
    if (batch < 1 || n_heads < 1 || n_kv_heads < 1 || head_dim < 1 || max_len < 0)
        return 0;
    Plan p = plan_splits(batch, n_kv_heads, max_len);
    return counter_bytes(batch, n_kv_heads) + (size_t)batch * n_heads * p.splits * (head_dim + 2) * sizeof(float);
}

extern "C" int cuda_decode_attention(bf16_t *out, const bf16_t *q, const bf16_t *k_cache, const bf16_t *v_cache,
                                     const int32_t *lens, int batch, int n_heads, int n_kv_heads, int head_dim,
                                     int max_seq, int max_len, float scale, void *workspace, size_t workspace_bytes,
                                     GpuStream stream, Err *err)
{
    SHAPE_CHECK(out && q && k_cache && v_cache && lens && workspace, err, "decode attention: NULL pointer");
    Args a = {};
    a.out = out, a.q = q, a.row_stride = (size_t)n_heads * head_dim;
    a.k_cache = (__nv_bfloat16 *)k_cache, a.v_cache = (__nv_bfloat16 *)v_cache;  // read only without RoPE
    a.lens = lens, a.n_heads = n_heads, a.n_kv_heads = n_kv_heads, a.max_seq = max_seq, a.max_len = max_len;
    a.scale = scale;
    return launch(a, batch, head_dim, false, workspace, workspace_bytes, 0, stream, err);
}

extern "C" int cuda_decode_attention_rope(bf16_t *out, const bf16_t *qkv, bf16_t *k_cache, bf16_t *v_cache,
                                          const int32_t *pos, const int32_t *lens, const float *inv_freq, int batch,
                                          int n_heads, int n_kv_heads, int head_dim, int max_seq, int max_len,
                                          float scale, void *workspace, size_t workspace_bytes, int pdl,
                                          GpuStream stream, Err *err)
{
    SHAPE_CHECK(out && qkv && k_cache && v_cache && pos && lens && inv_freq && workspace, err,
                "decode attention: NULL pointer");
    size_t QD = (size_t)n_heads * head_dim, KD = (size_t)n_kv_heads * head_dim;
    Args a = {};
    a.out = out, a.q = qkv, a.new_k = qkv + QD, a.new_v = qkv + QD + KD, a.row_stride = QD + 2 * KD;
    a.k_cache = k_cache, a.v_cache = v_cache, a.lens = lens, a.pos = pos, a.inv_freq = inv_freq;
    a.n_heads = n_heads, a.n_kv_heads = n_kv_heads, a.max_seq = max_seq, a.max_len = max_len, a.scale = scale;
    return launch(a, batch, head_dim, true, workspace, workspace_bytes, pdl, stream, err);
}
