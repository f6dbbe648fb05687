// Flash-style causal GQA attention over packed variable-length sequences, forward and backward
// (FlashAttention-2's schedule). bf16 tiles in shared memory, tensor cores through
// mma.sync.m16n8k16 (bf16 in, fp32 accumulate), online softmax in fp32 registers; on Hopper, for
// head_dim 128, the default (version 5) runs forward and backward through wgmma and TMA instead
// (their sections below).
//
// Tiles (version 3): a forward block of 4 warps owns 2 x 64 queries, a backward block of 8 warps
// 128 keys; each warp owns 16 rows at a time, the rows of its mma fragments; K, V tiles visited
// by the forward and query tiles visited by the backward are TILE = 64 rows. Tiles start at any
// position (not aligned to a sequence), and a tile may straddle sequences: every score is masked by
// "same sequence and causal", using the first position of each query's sequence, found by a
// binary search in cu_seqlens. A tile visits only the keys (forward) or queries (backward) its
// rows can reach, so work is about sum(len^2)/2 per head plus tile edges.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, c = lane % 4):
//   A (16 x 16, row major): a0 (g, 2c..2c+1), a1 (g+8, 2c..), a2 (g, 2c+8..), a3 (g+8, 2c+8..)
//   B (16 x 8, k x n):      b0 (k 2c..2c+1, n g), b1 (k 2c+8.., n g)
//   C (16 x 8, fp32):       c0, c1 (g, 2c..2c+1), c2, c3 (g+8, 2c..2c+1)
// Two C tiles side by side are, rounded to bf16, the A fragment of the next product (P V, dS Q):
// the probabilities never leave registers. B operands whose k runs along a row of shared
// memory load by ldmatrix; those whose k runs down a column (V and dO as k = keys/queries) with
// ldmatrix.trans.
#include <cuda.h>  // CUtensorMap; the encoder comes from the runtime (cudaGetDriverEntryPointByVersion)

#include "attention.cuh"
#include "cuda_check.cuh"

namespace {

constexpr int TILE = 64;      // rows per block: queries (forward), keys (backward)
constexpr int THREADS = 128;  // 4 warps x 16 rows
constexpr int PAD = 8;        // bf16 per smem row beyond head_dim: rows 16 bytes apart in banks
constexpr float LOG2E = 1.4426950408889634f;

__device__ inline uint32_t pack_bf16(float lo, float hi)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}
// Two C tiles side by side (columns [0, 8) and [8, 16) of 16 rows), rounded to bf16, as the A
// fragment of the next product
__device__ inline void a_from_c(uint32_t a[4], const float (&lo)[4], const float (&hi)[4])
{
    a[0] = pack_bf16(lo[0], lo[1]);
    a[1] = pack_bf16(lo[2], lo[3]);
    a[2] = pack_bf16(hi[0], hi[1]);
    a[3] = pack_bf16(hi[2], hi[3]);
}

// c (16 x 8) += a (16 x 16) b (16 x 8)
__device__ inline void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// B fragments of two n-tiles from a row-major (k, n) smem matrix m with leading dimension ld:
// r0, r1 = b0, b1 of columns [n0, n0+8), r2, r3 of [n0+8, n0+16), k rows [k0, k0+16).
__device__ inline void load_b_trans(uint32_t r[4], const __nv_bfloat16 *m, int ld, int k0, int n0)
{
    int lane = threadIdx.x % 32;
    const __nv_bfloat16 *row = m + (size_t)(k0 + (lane & 15)) * ld + n0 + (lane >> 4) * 8;
    uint32_t addr = (uint32_t)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// Index of the sequence holding position t: the largest s with cu[s] <= t.
__device__ inline int sequence_of(const int32_t *cu, int n_seqs, int t)
{
    int lo = 0, hi = n_seqs - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (cu[mid] <= t)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

// Rows [row0, row0 + ROWS) of head h of x (T, H, D) into smem (ROWS, D + PAD) as cp.async copies
// (16 bytes each; rows outside [0, T) zero-filled by the copy itself, as a masked probability of
// 0 times garbage could still make a NaN), so that the next tile loads while this one is computed
// on. The caller commits.
template <int D, int ROWS = TILE, int NTHREADS = THREADS>
__device__ inline void load_tile_async(__nv_bfloat16 *s, const __nv_bfloat16 *x, int row0, int T, int H, int h)
{
    constexpr int CHUNKS = D / 8;
    for (int i = threadIdx.x; i < ROWS * CHUNKS; i += NTHREADS) {
        int r = i / CHUNKS, c = i % CHUNKS, t = row0 + r;
        const __nv_bfloat16 *src = t < T ? x + ((size_t)t * H + h) * D + c * 8 : x;
        uint32_t dst = (uint32_t)__cvta_generic_to_shared(s + r * (D + PAD) + c * 8);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(t < T ? 16 : 0));
    }
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// 4 bytes, zero-filled where !valid
__device__ inline void cp_async4(void *dst, const void *src, bool valid)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"((uint32_t)__cvta_generic_to_shared(dst)),
                 "l"(src), "r"(valid ? 4 : 0));
}
// wait until at most `pending` committed groups are still in flight
template <int pending> __device__ inline void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(pending)); }

// The end of a backward block: this thread's dK (times scale) and dV, C fragments of its two
// keys ka, kb (rows, 8-column n-tiles over head_dim D), added into the fp32 accumulators
// (T, Hkv, D), dV's after dK's; the query heads of a kv head add into the same rows.
template <int D>
__device__ inline void add_dkv(float *dkv_acc, const float (&dk)[D / 8][4], const float (&dv)[D / 8][4], int ka,
                               int kb, int T, int Hkv, int kvh, float scale)
{
    int c = threadIdx.x % 4;
    size_t n_kv = (size_t)T * Hkv * D;
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
        int col = 8 * i + 2 * c;
        if (ka < T) {
            size_t at = ((size_t)ka * Hkv + kvh) * D + col;
            atomicAdd(reinterpret_cast<float2 *>(dkv_acc + at), make_float2(dk[i][0] * scale, dk[i][1] * scale));
            atomicAdd(reinterpret_cast<float2 *>(dkv_acc + n_kv + at), make_float2(dv[i][0], dv[i][1]));
        }
        if (kb < T) {
            size_t at = ((size_t)kb * Hkv + kvh) * D + col;
            atomicAdd(reinterpret_cast<float2 *>(dkv_acc + at), make_float2(dk[i][2] * scale, dk[i][3] * scale));
            atomicAdd(reinterpret_cast<float2 *>(dkv_acc + n_kv + at), make_float2(dv[i][2], dv[i][3]));
        }
    }
}

// The forward's end for a warp's 16 rows (this thread's rows ta, tb): the quad sums the
// denominators, the rows of out (T, Hq, D) are O / sum rounded to bf16, lse the natural-log
// log-sum-exp (max and sum in log2 units). Rows at or past T are not written.
template <int D>
__device__ inline void store_rows(__nv_bfloat16 *out, float *lse, const float (&o)[D / 8][4], float max_a, float max_b,
                                  float sum_a, float sum_b, int ta, int tb, int T, int Hq, int h)
{
    int c = threadIdx.x % 4;
    sum_a += __shfl_xor_sync(0xffffffffu, sum_a, 1);
    sum_a += __shfl_xor_sync(0xffffffffu, sum_a, 2);
    sum_b += __shfl_xor_sync(0xffffffffu, sum_b, 1);
    sum_b += __shfl_xor_sync(0xffffffffu, sum_b, 2);
    float inv_a = 1.0f / sum_a, inv_b = 1.0f / sum_b;
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
        int d = i * 8 + 2 * c;
        if (ta < T)
            *reinterpret_cast<uint32_t *>(out + ((size_t)ta * Hq + h) * D + d) =
                pack_bf16(o[i][0] * inv_a, o[i][1] * inv_a);
        if (tb < T)
            *reinterpret_cast<uint32_t *>(out + ((size_t)tb * Hq + h) * D + d) =
                pack_bf16(o[i][2] * inv_b, o[i][3] * inv_b);
    }
    if (c == 0 && ta < T)
        lse[(size_t)ta * Hq + h] = (max_a + log2f(sum_a)) / LOG2E;
    if (c == 0 && tb < T)
        lse[(size_t)tb * Hq + h] = (max_b + log2f(sum_b)) / LOG2E;
}

// ---- version 3 ------------------------------------------------------------------------------------
// ldmatrix.x4 gives a thread 4 registers of fragments in one instruction where 32-bit shared
// loads take 4 (A) or 2 (B of one n-tile); with 8-12 warps a multiprocessor and little else to
// hide latency behind, the instruction count is what the first kernels (versions 1, 2) were bound by.

// 4 8x8 bf16 matrices from shared memory; lane l gives the address of row l % 8 of matrix l / 8
__device__ inline void ldsm_x4(uint32_t r[4], const __nv_bfloat16 *p)
{
    uint32_t addr = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// A fragment of rows [r0, r0+16), columns [k0, k0+16) of a row-major smem matrix
__device__ inline void load_a_ldsm(uint32_t a[4], const __nv_bfloat16 *m, int ld, int r0, int k0)
{
    int lane = threadIdx.x % 32;
    ldsm_x4(a, m + (size_t)(r0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
}
// B fragments of two n-tiles from an smem matrix whose rows are n and columns k (K, Q, dO as
// the right operand of a product with their rows): r0, r1 = b0, b1 of rows [n0, n0+8), r2, r3
// of [n0+8, n0+16), k columns [k0, k0+16)
__device__ inline void load_b_ldsm(uint32_t r[4], const __nv_bfloat16 *m, int ld, int n0, int k0)
{
    int lane = threadIdx.x % 32;
    ldsm_x4(r, m + (size_t)(n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
}

// Store 4 8x8 bf16 matrices transposed: r[j] holds matrix j in the fragment layout (lane l: row
// l / 4, columns 2 (l % 4) ..+1); lane l gives the address where column l % 8 of matrix l / 8
// goes, as a row of 8 contiguous values.
__device__ inline void stsm_x4_trans(__nv_bfloat16 *p, const uint32_t r[4])
{
    uint32_t addr = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(addr), "r"(r[0]),
                 "r"(r[1]), "r"(r[2]), "r"(r[3])
                 : "memory");
}
// 2^x in one MUFU instruction (subnormal results flush to 0: probabilities that small are 0)
__device__ inline float fast_exp2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// One step of the online softmax for a thread's two rows (a: g, b: g + 8) of a tile of raw
// scores s (NT n-tiles, masked ones -inf), given the maxima of those raw scores in the thread's
// columns: the rows' running maxima (log2 units, over the quad) move up, s becomes
// exp2(s * scale_log2 - max), the sums are rescaled and grow, and rescale_a, rescale_b are what
// the output rows must be multiplied by. A row with no key yet keeps max -inf and subtracts 0
// instead (exp2 then gives 0, not NaN). (Versions 3 and 4's forwards.)
template <int NT>
__device__ inline void softmax_step(float (&s)[NT][4], float tile_max_a, float tile_max_b, float scale_log2,
                                    float &max_a, float &max_b, float &sum_a, float &sum_b, float &rescale_a,
                                    float &rescale_b)
{
    tile_max_a = fmaxf(max_a, tile_max_a * scale_log2);
    tile_max_b = fmaxf(max_b, tile_max_b * scale_log2);
    tile_max_a = fmaxf(tile_max_a, __shfl_xor_sync(0xffffffffu, tile_max_a, 1));
    tile_max_a = fmaxf(tile_max_a, __shfl_xor_sync(0xffffffffu, tile_max_a, 2));
    tile_max_b = fmaxf(tile_max_b, __shfl_xor_sync(0xffffffffu, tile_max_b, 1));
    tile_max_b = fmaxf(tile_max_b, __shfl_xor_sync(0xffffffffu, tile_max_b, 2));
    float base_a = tile_max_a == -INFINITY ? 0.0f : tile_max_a;
    float base_b = tile_max_b == -INFINITY ? 0.0f : tile_max_b;
    rescale_a = fast_exp2(max_a - base_a), rescale_b = fast_exp2(max_b - base_b);
    max_a = tile_max_a;
    max_b = tile_max_b;
    float tile_sum_a = 0.0f, tile_sum_b = 0.0f;
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            s[nt][e] = fast_exp2(fmaf(s[nt][e], scale_log2, -base_a));
            s[nt][2 + e] = fast_exp2(fmaf(s[nt][2 + e], scale_log2, -base_b));
            tile_sum_a += s[nt][e];
            tile_sum_b += s[nt][2 + e];
        }
    sum_a = sum_a * rescale_a + tile_sum_a;
    sum_b = sum_b * rescale_b + tile_sum_b;
}

// The forward of version 3: a block of 4 warps owns MT * 64 queries; warp w's m-tile m holds rows
// m * 64 + w * 16 + [0, 16), so each K and V fragment loaded serves both m-tiles. Q stays in
// shared memory (its fragments are reloaded per 16 columns: one ldmatrix per m-tile). The next
// K, V tile is copied while this one is computed on (registers, not shared memory, set how many
// blocks a multiprocessor holds: 2). Scores stay raw; the scale goes into the exponent's fma,
// computed by ex2.approx; the output's rescaling is skipped where it would multiply by exactly 1
// (no row of the warp found a larger score); whole tiles inside every row's sequence and causal
// window skip the masks. Grid (heads, query tiles), last tile first, as version 4's.
constexpr int FAST_MT = 2, FAST_STAGES = 2;
template <int D> constexpr size_t forward_fast_smem_bytes() { return (FAST_MT + 2 * FAST_STAGES) * TILE * (D + PAD) * 2; }

template <int D>
__global__ void __launch_bounds__(THREADS, 1) attention_forward_fast_kernel(
    __nv_bfloat16 *out, float *lse, const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v,
    const int32_t *cu, int n_seqs, int T, int Hq, int Hkv, float scale_log2)
{
    constexpr int MT = FAST_MT, STAGES = FAST_STAGES, LD = D + PAD, QT = TILE * MT;
    extern __shared__ __align__(16) unsigned char smem[];
    __nv_bfloat16 *sQ = reinterpret_cast<__nv_bfloat16 *>(smem), *sKV = sQ + QT * LD;
    __shared__ int seq_first[QT];

    int q0 = (gridDim.y - 1 - blockIdx.y) * QT, h = blockIdx.x, kvh = h / (Hq / Hkv);
    for (int i = threadIdx.x; i < QT; i += THREADS)
        seq_first[i] = cu[sequence_of(cu, n_seqs, min(q0 + i, T - 1))];
    load_tile_async<D, QT>(sQ, q, q0, T, Hq, h);
    cp_async_commit();

    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    float o[MT][D / 8][4], max_a[MT], max_b[MT], sum_a[MT], sum_b[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) {
#pragma unroll
        for (int i = 0; i < D / 8; i++)
            o[m][i][0] = o[m][i][1] = o[m][i][2] = o[m][i][3] = 0.0f;
        max_a[m] = max_b[m] = -INFINITY;
        sum_a[m] = sum_b[m] = 0.0f;
    }
    __syncthreads();  // seq_first
    int key_first = seq_first[0], key_last = min(q0 + QT, T) - 1;
    int n_tiles = (key_last - key_first) / TILE + 1;
    auto issue = [&](int it) {
        __nv_bfloat16 *buf = sKV + (it % STAGES) * 2 * TILE * LD;
        load_tile_async<D>(buf, k, key_first + it * TILE, T, Hkv, kvh);
        load_tile_async<D>(buf + TILE * LD, v, key_first + it * TILE, T, Hkv, kvh);
        cp_async_commit();
    };
    issue(0);
    for (int it = 0; it < n_tiles; it++) {
        int k0 = key_first + it * TILE;
        if (it + 1 < n_tiles) {
            issue(it + 1);  // its buffer was last read in iteration it - 1, before its closing barrier
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // this tile (and, the first time, Q) has landed for every thread
        const __nv_bfloat16 *sK = sKV + (it % STAGES) * 2 * TILE * LD, *sV = sK + TILE * LD;

        float s[MT][TILE / 8][4];
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int nt = 0; nt < TILE / 8; nt++)
                s[m][nt][0] = s[m][nt][1] = s[m][nt][2] = s[m][nt][3] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < D / 16; kc++) {
            uint32_t qa[MT][4];
#pragma unroll
            for (int m = 0; m < MT; m++)
                load_a_ldsm(qa[m], sQ, LD, m * TILE + warp * 16, kc * 16);
#pragma unroll
            for (int np = 0; np < TILE / 16; np++) {
                uint32_t b[4];
                load_b_ldsm(b, sK, LD, np * 16, kc * 16);
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    mma_bf16(s[m][2 * np], qa[m], b[0], b[1]);
                    mma_bf16(s[m][2 * np + 1], qa[m], b[2], b[3]);
                }
            }
        }
        uint32_t p[MT][TILE / 16][4];  // probabilities as the A fragments of P V
#pragma unroll
        for (int m = 0; m < MT; m++) {
            int row_a = m * TILE + warp * 16 + g, row_b = row_a + 8;
            int ta = q0 + row_a, tb = q0 + row_b, first_a = seq_first[row_a], first_b = seq_first[row_b];
            // the maxima of the raw scores, then scaled into max_a's log2 units
            float tile_max_a = -INFINITY, tile_max_b = -INFINITY;
            // no mask where every key of the tile is in every row's sequence and before it
            bool full = k0 + TILE - 1 <= q0 + m * TILE + warp * 16 && seq_first[m * TILE + warp * 16 + 15] <= k0;
#pragma unroll
            for (int nt = 0; nt < TILE / 8; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int j = k0 + nt * 8 + 2 * c + e;
                    bool in_a = full || (j <= ta && j >= first_a), in_b = full || (j <= tb && j >= first_b);
                    s[m][nt][e] = in_a ? s[m][nt][e] : -INFINITY;
                    s[m][nt][2 + e] = in_b ? s[m][nt][2 + e] : -INFINITY;
                    tile_max_a = fmaxf(tile_max_a, s[m][nt][e]);
                    tile_max_b = fmaxf(tile_max_b, s[m][nt][2 + e]);
                }
            float rescale_a, rescale_b;
            softmax_step<TILE / 8>(s[m], tile_max_a, tile_max_b, scale_log2, max_a[m], max_b[m], sum_a[m], sum_b[m],
                                   rescale_a, rescale_b);
            if (__any_sync(0xffffffffu, rescale_a != 1.0f || rescale_b != 1.0f)) {
#pragma unroll
                for (int i = 0; i < D / 8; i++) {
                    o[m][i][0] *= rescale_a, o[m][i][1] *= rescale_a;
                    o[m][i][2] *= rescale_b, o[m][i][3] *= rescale_b;
                }
            }
#pragma unroll
            for (int kc = 0; kc < TILE / 16; kc++) {
                a_from_c(p[m][kc], s[m][2 * kc], s[m][2 * kc + 1]);
            }
        }
#pragma unroll
        for (int kc = 0; kc < TILE / 16; kc++)
#pragma unroll
            for (int np = 0; np < D / 16; np++) {
                uint32_t b[4];
                load_b_trans(b, sV, LD, kc * 16, np * 16);
#pragma unroll
                for (int m = 0; m < MT; m++) {
                    mma_bf16(o[m][2 * np], p[m][kc], b[0], b[1]);
                    mma_bf16(o[m][2 * np + 1], p[m][kc], b[2], b[3]);
                }
            }
        __syncthreads();  // every warp is done with K and V before they are refilled
    }
#pragma unroll
    for (int m = 0; m < MT; m++) {
        int ta = q0 + m * TILE + warp * 16 + g;
        store_rows<D>(out, lse, o[m], max_a[m], max_b[m], sum_a[m], sum_b[m], ta, ta + 8, T, Hq, h);
    }
}

// ---- version 4's forward: Hopper's warpgroup products (wgmma) and copies (TMA), sm_90a only ------
// A block of 2 warpgroups owns 128 queries of one head (64 each: the M of one wgmma), head_dim
// 128. Q and each 128-key K, V tile sit in shared memory in the tensor cores' 128-byte swizzled
// layout: a tile is two 64-column halves, each 128 rows of 128 bytes, and the 16-byte piece j of
// row r is stored at piece j ^ (r % 8) (so that the 8 rows a product reads at once hit every
// bank); every half starts on 1024 bytes. TMA writes exactly that layout (one instruction a half
// tile, rows past T zero-filled). S = Q K^T reads both operands from shared memory (K-major);
// O += P V takes P from registers (the score accumulators, rounded to bf16, are already an A
// fragment) and V MN-major. The rows' masks, maxima and sums are version 3's. Compiled only for
// sm_90a (the wgmma instructions exist nowhere else): elsewhere the kernel is empty and the
// launcher is never chosen (attention_sm90_ok). kernels/NOTES.md ("Issue 6, part 5") has
// what each part bought.
constexpr int H_BM = 128, H_D = 128, H_THREADS = 256, H_STAGES = 3;
constexpr uint32_t H_HALF = 128 * 128;       // bytes of one 64-column half of a 128-row tile
constexpr uint32_t H_TILE = 2 * H_HALF;      // a 128 x 128 bf16 tile
// alignment slack, Q, the K and V stages, seq_first, 7 mbarriers (version 4)
constexpr size_t forward_sm90_smem_bytes() { return 1024 + (1 + 2 * H_STAGES) * H_TILE + H_BM * 4 + 7 * 8; }

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ATTENTION_SM90_BUILT 1
#endif
// 1 in the sm_90a image, where the kernels below have their bodies; 0 in any other (an image for
// plain sm_90 or compute_90 has them empty): attention_sm90_ok reads it
#ifdef ATTENTION_SM90_BUILT
__device__ int attention_sm90_image = 1;
#else
__device__ int attention_sm90_image = 0;
#endif

#ifdef ATTENTION_SM90_BUILT
constexpr int H_BN = 128;  // keys per tile
// A shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride byte
// offsets (PTX ISA, "Matrix Descriptor Format")
__device__ inline uint64_t sw128_desc(uint32_t addr, uint32_t lead, uint32_t stride)
{
    return (uint64_t)((addr & 0x3FFFF) >> 4) | (uint64_t)((lead >> 4) & 0x3FFF) << 16 |
           (uint64_t)((stride >> 4) & 0x3FFF) << 32 | 1ull << 62;
}
__device__ inline void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ inline void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int pending> __device__ inline void wgmma_wait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(pending) : "memory");
}
// keeps the compiler from moving accesses of an accumulator across a wgmma fence or wait
template <int N> __device__ inline void pin(float (&d)[N][4])
{
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
            asm volatile("" : "+f"(d[i][j])::"memory");
}
// An fp32 accumulator of a warpgroup product, d[n / 8][4] a thread, as asm operands %0.. and as
// the register list the instruction names: 64 x 128 (64 registers) and 64 x 64 (32)
#define WG_ACC64_NAMES                                                                 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"           \
    " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31," \
    " %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47," \
    " %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
#define WG_ACC32_NAMES                                                       \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15," \
    " %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
#define WG_ACC_ROW(d, i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define WG_ACC32(d)                                                                             \
    WG_ACC_ROW(d, 0), WG_ACC_ROW(d, 1), WG_ACC_ROW(d, 2), WG_ACC_ROW(d, 3), WG_ACC_ROW(d, 4),   \
        WG_ACC_ROW(d, 5), WG_ACC_ROW(d, 6), WG_ACC_ROW(d, 7)
#define WG_ACC64(d)                                                                             \
    WG_ACC32(d), WG_ACC_ROW(d, 8), WG_ACC_ROW(d, 9), WG_ACC_ROW(d, 10), WG_ACC_ROW(d, 11),      \
        WG_ACC_ROW(d, 12), WG_ACC_ROW(d, 13), WG_ACC_ROW(d, 14), WG_ACC_ROW(d, 15)
// d (64 x 128 fp32, this warpgroup's) += a (64 x 16) b (16 x 128), a and b by shared-memory
// descriptors, both K-major; accumulate 0: d = a b
__device__ inline void wgmma_ss(float (&d)[16][4], uint64_t a, uint64_t b, int accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
                 WG_ACC64_NAMES
                 "%64, %65, p, 1, 1, 0, 0;\n}\n"
                 : WG_ACC64(d)
                 : "l"(a), "l"(b), "r"(accumulate));
}
// d += a b, a in registers (4 x 2 bf16 a thread: an mma.m16n8k16 A fragment of this warp's 16
// rows), b by descriptor, MN-major (rows are k, contiguous along n)
__device__ inline void wgmma_rs_mn(float (&d)[16][4], const uint32_t (&a)[4], uint64_t b)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
                 WG_ACC64_NAMES
                 "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : WG_ACC64(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}
// ---- TMA, mbarriers, named barriers (versions 4 and 5) ----
__device__ inline void mbar_init(uint32_t bar, int count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// arrive, announcing `bytes` of copies that will complete on this barrier's current phase
__device__ inline void mbar_expect(uint32_t bar, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ inline void mbar_arrive(uint32_t bar)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// (thread 0, before the block's first barrier) `once` for a one-off copy, and per stage a full
// barrier (the issuing thread's arrival and its copies' bytes) and an empty one (one arrival a
// warp), 8 bytes apart
__device__ inline void init_barriers(uint32_t once, uint32_t full, uint32_t empty, int stages)
{
    mbar_init(once, 1);
    for (int i = 0; i < stages; i++) {
        mbar_init(full + 8 * i, 1);
        mbar_init(empty + 8 * i, 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
}
// wait until the phase with this parity (0 or 1) has completed
__device__ inline void mbar_wait(uint32_t bar, uint32_t parity)
{
    uint32_t done = 0;
    while (!done)
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
}
// the box of map (head_map: rows x 64 columns) at row, column col of head h of its (T, H, 128)
// tensor into shared memory at dst (128-byte swizzled, 1024-aligned), completing on bar; rows
// past T arrive as zeros
__device__ inline void tma_load(uint32_t dst, const CUtensorMap *map, int col, int h, int row, uint32_t bar)
{
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
                 "[%5];\n" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(h), "r"(row), "r"(bar)
                 : "memory");
}
// a 128 x 128 tile: its two 64-column halves
__device__ inline void tma_tile(uint32_t dst, const CUtensorMap *map, int h, int row, uint32_t bar)
{
    tma_load(dst, map, 0, h, row, bar);
    tma_load(dst + H_HALF, map, 64, h, row, bar);
}
// named barriers 1 and 2: a warpgroup waits for the other's arrival (256 threads in all)
__device__ inline void named_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ inline void named_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }
// d (64 x 64 fp32, this warpgroup's) += a (64 x 16) b (16 x 64), both by descriptor; TA, TB:
// a M-major, b N-major (else K-major); accumulate 0: d = a b
template <int TA, int TB>
__device__ inline void wgmma64_ss(float (&d)[8][4], uint64_t a, uint64_t b, int accumulate)
{
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 WG_ACC32_NAMES
                 "%32, %33, p, 1, 1, %35, %36;\n}\n"
                 : WG_ACC32(d)
                 : "l"(a), "l"(b), "r"(accumulate), "n"(TA), "n"(TB));
}
// n bytes (a multiple of 16, both addresses 16-aligned) from global src to shared dst, completing on bar
__device__ inline void bulk_load(uint32_t dst, const void *src, uint32_t n, uint32_t bar)
{
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
                 "l"(src), "r"(n), "r"(bar)
                 : "memory");
}
// the box of map (tensor_map: 64 rows x 32 fp32 columns, 128-byte swizzled) at src added into
// rows row.., column col of head h of its (T, H, 128) tensor; a bulk group (commit, wait)
__device__ inline void tma_reduce_add(uint32_t src, const CUtensorMap *map, int col, int h, int row)
{
    asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3}], [%4];\n" ::"l"(
                     reinterpret_cast<uint64_t>(map)),
                 "r"(col), "r"(h), "r"(row), "r"(src)
                 : "memory");
}
__device__ inline void sts32(uint32_t addr, uint32_t v)
{
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
#endif

// Version 4's forward. The two warpgroups take turns on the tensor cores (FlashAttention-3's
// ping-pong, by two named barriers): warpgroup 0 issues its products of a tile (S_j = Q K_j^T and
// the previous tile's O += P_{j-1} V_{j-1}), then warpgroup 1 its, then warpgroup 0 its next, ...,
// so that one's softmax runs while the other's products do. Nothing is block-wide inside the
// loop: stage i (of 3) is full when full[i] completes (its copies landed) and free when empty[i]
// does (each of the 8 warps has waited for the products that read it). Thread 128 (in warpgroup
// 1, the one behind) issues every copy: Q, the first three tiles, and tile j + 2 once stage
// (j - 1) % 3 is free. Each warpgroup also issues S_j before waiting for P_{j-1} V_{j-1}, and
// masks S_j while that runs (ptxas places the rest of the softmax after the second wait: it
// reuses P's registers). Grid (heads, query tiles): blocks start in x-fastest order, so the
// query tiles go last to first across all heads, longest (most keys) first, and the short ones
// fill the end (heads outer, as before, left every head's long tiles of the last heads for the
// end: NOTES, issue 6 part 7).
__global__ void __launch_bounds__(H_THREADS, 1) attention_forward_tma_kernel(
    const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
    const __grid_constant__ CUtensorMap map_v, __nv_bfloat16 *out, float *lse, const int32_t *cu, int n_seqs, int T,
    int Hq, int Hkv, float scale_log2)
{
#ifdef ATTENTION_SM90_BUILT
    extern __shared__ __align__(16) unsigned char smem[];
    uint32_t raw = (uint32_t)__cvta_generic_to_shared(smem), pad = ((raw + 1023) & ~1023u) - raw;
    uint32_t sQ = raw + pad, sKV = sQ + H_TILE;  // stage i: K at sKV + 2 i H_TILE, V after it
    int *seq_first = reinterpret_cast<int *>(smem + pad + (1 + 2 * H_STAGES) * H_TILE);
    uint32_t bars = sKV + 2 * H_STAGES * H_TILE + H_BM * 4;  // q, full[3], empty[3]: 8 bytes each
    uint32_t bar_q = bars, bar_full = bars + 8, bar_empty = bars + 32;

    int q0 = (gridDim.y - 1 - blockIdx.y) * H_BM, h = blockIdx.x, kvh = h / (Hq / Hkv);
    bool producer = threadIdx.x == 128;
    if (threadIdx.x == 0)
        init_barriers(bar_q, bar_full, bar_empty, H_STAGES);
    for (int i = threadIdx.x; i < H_BM; i += H_THREADS)
        seq_first[i] = cu[sequence_of(cu, n_seqs, min(q0 + i, T - 1))];
    __syncthreads();  // barriers initialised, seq_first
    int key_first = seq_first[0], key_last = min(q0 + H_BM, T) - 1;
    int n_tiles = (key_last - key_first) / H_BN + 1;
    auto issue = [&](int j) {  // tile j into stage j % 3 (the producer thread only)
        uint32_t stage = sKV + (j % H_STAGES) * 2 * H_TILE, full = bar_full + 8 * (j % H_STAGES);
        mbar_expect(full, 2 * H_TILE);
        tma_tile(stage, &map_k, kvh, key_first + j * H_BN, full);
        tma_tile(stage + H_TILE, &map_v, kvh, key_first + j * H_BN, full);
    };
    if (producer) {
        mbar_expect(bar_q, H_TILE);
        tma_tile(sQ, &map_q, h, q0, bar_q);
        for (int j = 0; j < H_STAGES && j < n_tiles; j++)
            issue(j);
    }

    int wg = threadIdx.x / 128, warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    int row0 = wg * 64 + warp * 16;  // this warp's first row in the block
    int ta = q0 + row0 + g, tb = ta + 8, first_a = seq_first[row0 + g], first_b = seq_first[row0 + g + 8];
    int last_first = seq_first[row0 + 15];
    float o[16][4], s[16][4], max_a = -INFINITY, max_b = -INFINITY, sum_a = 0.0f, sum_b = 0.0f;
    uint32_t p[8][4];  // P of the previous tile, the A fragments of P V
#pragma unroll
    for (int i = 0; i < 16; i++)
        o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    auto q_desc = [&](int ks) { return sw128_desc(sQ + (ks / 4) * H_HALF + wg * 64 * 128 + (ks % 4) * 32, 16, 1024); };
    auto v_desc = [&](uint32_t sV, int kc) { return sw128_desc(sV + kc * 16 * 128, H_HALF, 1024); };
    int my_turn = 1 + wg, other_turn = 2 - wg;  // named barrier ids
    if (wg == 1)
        named_arrive(other_turn);  // warpgroup 0 goes first
    mbar_wait(bar_q, 0);

    for (int it = 0; it < n_tiles; it++) {
        uint32_t sK = sKV + (it % H_STAGES) * 2 * H_TILE;
        uint32_t sV_prev = sKV + ((it + H_STAGES - 1) % H_STAGES) * 2 * H_TILE + H_TILE;
        mbar_wait(bar_full + 8 * (it % H_STAGES), (it / H_STAGES) & 1);
        named_sync(my_turn);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < H_D / 16; ks++)
            wgmma_ss(s, q_desc(ks), sw128_desc(sK + (ks / 4) * H_HALF + (ks % 4) * 32, 16, 1024), ks > 0);
        wgmma_commit();
        if (it > 0) {
#pragma unroll
            for (int kc = 0; kc < H_BN / 16; kc++)
                wgmma_rs_mn(o, p[kc], v_desc(sV_prev, kc));
        }
        wgmma_commit();
        named_arrive(other_turn);
        wgmma_wait<1>();
        pin(s);
        int k0 = key_first + it * H_BN;
        if (!(k0 + H_BN - 1 <= q0 + row0 && last_first <= k0)) {  // a tile some key of which is masked
#pragma unroll
            for (int nt = 0; nt < H_BN / 8; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int j = k0 + nt * 8 + 2 * c + e;
                    if (j > ta || j < first_a)
                        s[nt][e] = -INFINITY;
                    if (j > tb || j < first_b)
                        s[nt][2 + e] = -INFINITY;
                }
        }
        float tile_max_a = -INFINITY, tile_max_b = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < H_BN / 8; nt++) {
            tile_max_a = fmaxf(tile_max_a, fmaxf(s[nt][0], s[nt][1]));
            tile_max_b = fmaxf(tile_max_b, fmaxf(s[nt][2], s[nt][3]));
        }
        float rescale_a, rescale_b;
        softmax_step<H_BN / 8>(s, tile_max_a, tile_max_b, scale_log2, max_a, max_b, sum_a, sum_b, rescale_a, rescale_b);
        wgmma_wait<0>();  // the previous tile's P V has landed in O (and p is free)
        pin(o);
        if (it > 0) {  // this warp is done with the previous tile's stage
            int stage = (it - 1) % H_STAGES;
            if (lane == 0)
                mbar_arrive(bar_empty + 8 * stage);
            if (producer && it + 2 < n_tiles) {
                mbar_wait(bar_empty + 8 * stage, ((it - 1) / H_STAGES) & 1);
                issue(it + 2);
            }
        }
        if (__any_sync(0xffffffffu, rescale_a != 1.0f || rescale_b != 1.0f)) {
#pragma unroll
            for (int i = 0; i < 16; i++) {
                o[i][0] *= rescale_a, o[i][1] *= rescale_a;
                o[i][2] *= rescale_b, o[i][3] *= rescale_b;
            }
        }
#pragma unroll
        for (int kc = 0; kc < H_BN / 16; kc++)
            a_from_c(p[kc], s[2 * kc], s[2 * kc + 1]);
    }
    uint32_t sV_last = sKV + ((n_tiles - 1) % H_STAGES) * 2 * H_TILE + H_TILE;
    named_sync(my_turn);
    wgmma_fence();
#pragma unroll
    for (int kc = 0; kc < H_BN / 16; kc++)
        wgmma_rs_mn(o, p[kc], v_desc(sV_last, kc));
    wgmma_commit();
    if (wg == 0)
        named_arrive(other_turn);  // warpgroup 1's last turn; its own last arrival would have no taker
    wgmma_wait<0>();
    pin(o);
    store_rows<H_D>(out, lse, o, max_a, max_b, sum_a, sum_b, ta, tb, T, Hq, h);
#endif
}

// ---- version 5's backward: wgmma products and TMA copies, sm_90a only ----------------------
// One block of 2 warpgroups per (128-key tile, hpb query heads of one kv head), head_dim 128;
// warpgroup w owns keys [64 w, 64 w + 64) of the tile. The block walks the query tiles of its
// heads one head after another. With every head of the kv head (hpb = Hq / Hkv), it writes dK
// and dV whole; with fewer, it adds them into fp32 accumulators with atomics. Blocks of one
// query head each load K and V four times as often (at 4:1 GQA) and pay their start and end on
// a few query tiles, but keep fewer key tiles in flight: at 1 x 8192 the walk over all four
// heads thrashes L2 (NOTES, issue 6 part 7; cuda_attention_set_heads_per_block). K and V stay
// in shared memory (TMA, 128-byte swizzled as in the forward); the query tiles (64 queries: Q,
// dO, their log-sum-exps in log2 units, deltas and sequence starts, the last three from the
// transposed, padded copies attention_backward_stats_kernel makes) stream through two stages. Per query tile, each warpgroup computes with its own 64 keys
// S^T = K Q^T and dP^T = V dO^T (64 x 64, both operands from shared memory), P^T and
// dS^T = P^T (dP^T - delta) in registers, then dV += P^T dO and dK += dS^T Q with P^T and dS^T as
// register A fragments; dS^T also goes to shared memory (rows = keys, 128 bytes of queries each,
// swizzled: the M-major A operand of the next product) and, once both warpgroups' halves are
// there, each warpgroup computes 64 of dQ's 128 columns, dS K over all 128 keys, writes them to
// shared memory (fp32, 128-byte swizzled) and one of its threads adds them into the fp32 dq
// accumulator with two TMA reductions (cp.reduce.async.bulk.tensor), which read that buffer
// while the next tile is computed (with per-thread atomics there the backward took 8-32% longer:
// NOTES, issue 6 part 6).
// dK, dV stay in registers (fp32) over every query tile of the block's heads.
constexpr int B_BQ = 64, B_STAGES = 2;
constexpr uint32_t B_QHALF = 64 * 128, B_QTILE = 2 * B_QHALF;  // a 64 x 128 bf16 tile and its halves
constexpr uint32_t B_STAGE = 2 * B_QTILE + 3 * 256 + 1280;     // Q, dO, lse, delta, starts; 1024-aligned
constexpr uint32_t B_DS = 128 * 128;                           // dS^T: 128 keys x 64 queries bf16
constexpr uint32_t B_DQ = 64 * 64 * 4;                         // a warpgroup's dQ: 64 queries x 64 columns fp32
constexpr size_t backward_sm90_smem_bytes()
{
    return 1024 + 2 * H_TILE + B_STAGES * B_STAGE + 2 * B_DS + 2 * B_DQ + 5 * 8;
}
// positions of version 5's transposed statistics: T rounded up to whole query tiles
constexpr size_t stats_positions(size_t T) { return (T + B_BQ - 1) / B_BQ * B_BQ; }

__global__ void __launch_bounds__(H_THREADS, 1) attention_backward_tma_kernel(
    const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_do,
    const __grid_constant__ CUtensorMap map_k, const __grid_constant__ CUtensorMap map_v,
    const __grid_constant__ CUtensorMap map_dq, __nv_bfloat16 *dk_out, __nv_bfloat16 *dv_out, float *dkv_acc,
    const float *lse_t, const float *delta_t, const int32_t *starts, const int32_t *cu, int n_seqs, int T, int Tpad,
    int Hq, int Hkv, int hpb, float scale_log2, float scale)
{
#ifdef ATTENTION_SM90_BUILT
    extern __shared__ __align__(16) unsigned char smem[];
    uint32_t raw = (uint32_t)__cvta_generic_to_shared(smem), pad = ((raw + 1023) & ~1023u) - raw;
    uint32_t base = raw + pad, sK = base, sV = base + H_TILE, stages = base + 2 * H_TILE;
    uint32_t sdS0 = stages + B_STAGES * B_STAGE, sdq0 = sdS0 + 2 * B_DS, bars = sdq0 + 2 * B_DQ;
    uint32_t bar_kv = bars, bar_full = bars + 8, bar_empty = bars + 8 + 8 * B_STAGES;
    auto generic = [&](uint32_t a) { return smem + pad + (a - base); };

    int h0 = blockIdx.x * hpb, kvh = h0 / (Hq / Hkv), k0 = blockIdx.y * 128;
    // the queries that see a key of the tile: [k0, the end of its last key's sequence); step j
    // is query tile j % n_q of head h0 + j / n_q
    int q_end = cu[sequence_of(cu, n_seqs, min(k0 + 127, T - 1)) + 1];
    int n_q = (q_end - k0 + B_BQ - 1) / B_BQ, n_steps = n_q * hpb;
    if (threadIdx.x == 0)
        init_barriers(bar_kv, bar_full, bar_empty, B_STAGES);
    __syncthreads();
    auto issue = [&](int j) {  // step j's query tile into stage j % B_STAGES (thread 0 only)
        uint32_t s = stages + (j % B_STAGES) * B_STAGE, full = bar_full + 8 * (j % B_STAGES);
        int h = h0 + j / n_q, qs = k0 + j % n_q * B_BQ;
        mbar_expect(full, 2 * B_QTILE + 3 * 256);
        tma_load(s, &map_q, 0, h, qs, full);
        tma_load(s + B_QHALF, &map_q, 64, h, qs, full);
        tma_load(s + B_QTILE, &map_do, 0, h, qs, full);
        tma_load(s + B_QTILE + B_QHALF, &map_do, 64, h, qs, full);
        bulk_load(s + 2 * B_QTILE, lse_t + (size_t)h * Tpad + qs, 256, full);
        bulk_load(s + 2 * B_QTILE + 256, delta_t + (size_t)h * Tpad + qs, 256, full);
        bulk_load(s + 2 * B_QTILE + 512, starts + qs, 256, full);
    };
    if (threadIdx.x == 0) {
        mbar_expect(bar_kv, 2 * H_TILE);
        tma_tile(sK, &map_k, kvh, k0, bar_kv);
        tma_tile(sV, &map_v, kvh, k0, bar_kv);
        for (int j = 0; j < B_STAGES && j < n_steps; j++)
            issue(j);
    }

    int wg = threadIdx.x / 128, warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    int row = wg * 64 + warp * 16 + g;  // this thread's keys in the tile: row, row + 8
    int ka = k0 + row, kb = ka + 8, key_warp = k0 + wg * 64 + warp * 16;
    float dk[16][4], dv[16][4];
#pragma unroll
    for (int i = 0; i < 16; i++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            dk[i][e] = dv[i][e] = 0.0f;
    // A: this warpgroup's 64 keys of K (or V), hd columns [16 ks, 16 ks + 16)
    auto key_desc = [&](uint32_t sX, int ks) {
        return sw128_desc(sX + (ks / 4) * H_HALF + wg * 64 * 128 + (ks % 4) * 32, 16, 1024);
    };
    // B, K-major: the 64 queries of a Q (or dO) tile, hd columns [16 ks, 16 ks + 16)
    auto query_desc = [&](uint32_t sX, int ks) { return sw128_desc(sX + (ks / 4) * B_QHALF + (ks % 4) * 32, 16, 1024); };
    // B, N-major: queries [16 kc, 16 kc + 16) of a Q (or dO) tile, all 128 hd columns
    auto query_mn_desc = [&](uint32_t sX, int kc) { return sw128_desc(sX + kc * 16 * 128, B_QHALF, 1024); };
    mbar_wait(bar_kv, 0);

    for (int j = 0; j < n_steps; j++) {
        int st = j % B_STAGES, h = h0 + j / n_q, qs = k0 + j % n_q * B_BQ;
        uint32_t s = stages + st * B_STAGE, sdS = sdS0 + (j & 1) * B_DS;
        const float *s_lse = reinterpret_cast<const float *>(generic(s + 2 * B_QTILE)), *s_delta = s_lse + 64;
        const int32_t *s_start = reinterpret_cast<const int32_t *>(s_lse + 128);
        mbar_wait(bar_full + 8 * st, (j / B_STAGES) & 1);
        float sT[8][4], dpT[8][4];
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < H_D / 16; ks++)
            wgmma64_ss<0, 0>(sT, key_desc(sK, ks), query_desc(s, ks), ks > 0);
#pragma unroll
        for (int ks = 0; ks < H_D / 16; ks++)
            wgmma64_ss<0, 0>(dpT, key_desc(sV, ks), query_desc(s + B_QTILE, ks), ks > 0);
        wgmma_commit();
        wgmma_wait<0>();
        pin(sT);
        pin(dpT);
        // P^T, dS^T: rows keys ka, kb; columns queries qs + 8 i + 2 c + e. Whole tiles inside
        // every query's sequence and causal window, and before T, skip the mask.
        bool full = qs + B_BQ - 1 < T && key_warp + 15 <= qs && s_start[B_BQ - 1] <= key_warp;
#pragma unroll
        for (int i = 0; i < 8; i++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int col = 8 * i + 2 * c + e, t = qs + col;
                float l = s_lse[col], dl = s_delta[col];
                float pa = fast_exp2(fmaf(sT[i][e], scale_log2, -l)), pb = fast_exp2(fmaf(sT[i][2 + e], scale_log2, -l));
                if (!full) {
                    int first = s_start[col];
                    pa = ka <= t && ka >= first && t < T ? pa : 0.0f;
                    pb = kb <= t && kb >= first && t < T ? pb : 0.0f;
                }
                sT[i][e] = pa;
                sT[i][2 + e] = pb;
                dpT[i][e] = pa * (dpT[i][e] - dl);
                dpT[i][2 + e] = pb * (dpT[i][2 + e] - dl);
            }
        uint32_t pA[4][4], dsA[4][4];  // A fragments, k = queries [16 kc, 16 kc + 16)
#pragma unroll
        for (int kc = 0; kc < 4; kc++) {
            a_from_c(pA[kc], sT[2 * kc], sT[2 * kc + 1]);
            a_from_c(dsA[kc], dpT[2 * kc], dpT[2 * kc + 1]);
        }
        wgmma_fence();
#pragma unroll
        for (int kc = 0; kc < 4; kc++)
            wgmma_rs_mn(dv, pA[kc], query_mn_desc(s + B_QTILE, kc));
#pragma unroll
        for (int kc = 0; kc < 4; kc++)
            wgmma_rs_mn(dk, dsA[kc], query_mn_desc(s, kc));
        wgmma_commit();
        // dS^T into shared memory: row `row` (and row + 8), queries 8 i + 2 c, swizzled
#pragma unroll
        for (int kc = 0; kc < 4; kc++)
#pragma unroll
            for (int half = 0; half < 2; half++) {
                int i = 2 * kc + half;
                sts32(sdS + row * 128 + ((i ^ g) * 16) + 4 * c, dsA[kc][2 * half]);
                sts32(sdS + (row + 8) * 128 + ((i ^ g) * 16) + 4 * c, dsA[kc][2 * half + 1]);
            }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the tensor cores read them next
        if (threadIdx.x % 128 == 0)  // the last tile's dQ reductions have read this warpgroup's sdq
            asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
        named_sync(1);  // both warpgroups' dS^T are in place, and sdq free
        float dq[8][4];
        wgmma_fence();
#pragma unroll
        for (int kc = 0; kc < 8; kc++)  // dQ (queries x this warpgroup's 64 hd columns) = dS K, 16 keys a product
            wgmma64_ss<1, 1>(dq, sw128_desc(sdS + kc * 16 * 128, 16, 1024),
                             sw128_desc(sK + wg * H_HALF + kc * 16 * 128, 16, 1024), kc > 0);
        wgmma_commit();
        wgmma_wait<0>();
        pin(dq);
        pin(dv);
        pin(dk);
        if (lane == 0)  // this warp is done with the stage
            mbar_arrive(bar_empty + 8 * st);
        if (threadIdx.x == 0 && j + B_STAGES < n_steps) {
            mbar_wait(bar_empty + 8 * st, (j / B_STAGES) & 1);
            issue(j + B_STAGES);
        }
        // dQ into shared memory (two 32-column halves of 64 rows x 128 bytes, 128-byte swizzled),
        // then one thread adds them into dq_acc with two TMA reductions (rows past T are dropped)
        uint32_t sdq = sdq0 + wg * B_DQ;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int r = warp * 16 + g;
            uint32_t at = sdq + (i / 4) * (B_DQ / 2) + (((2 * (i % 4) + c / 2) ^ g) * 16) + 8 * (c % 2);
            asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(at + r * 128), "f"(dq[i][0] * scale),
                         "f"(dq[i][1] * scale)
                         : "memory");
            asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(at + (r + 8) * 128), "f"(dq[i][2] * scale),
                         "f"(dq[i][3] * scale)
                         : "memory");
        }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        asm volatile("bar.sync %0, 128;\n" ::"r"(2 + wg) : "memory");
        if (threadIdx.x % 128 == 0) {
            tma_reduce_add(sdq, &map_dq, wg * 64, h, qs);
            tma_reduce_add(sdq + B_DQ / 2, &map_dq, wg * 64 + 32, h, qs);
            asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
        }
    }
    if (threadIdx.x % 128 == 0)  // the reductions done before the block ends
        asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    if (hpb < Hq / Hkv) {  // other blocks add into the same rows
        add_dkv<H_D>(dkv_acc, dk, dv, ka, kb, T, Hkv, kvh, scale);
        return;
    }
#pragma unroll
    for (int i = 0; i < H_D / 8; i++) {
        int col = 8 * i + 2 * c;
        if (ka < T) {
            size_t at = ((size_t)ka * Hkv + kvh) * H_D + col;
            *reinterpret_cast<uint32_t *>(dk_out + at) = pack_bf16(dk[i][0] * scale, dk[i][1] * scale);
            *reinterpret_cast<uint32_t *>(dv_out + at) = pack_bf16(dv[i][0], dv[i][1]);
        }
        if (kb < T) {
            size_t at = ((size_t)kb * Hkv + kvh) * H_D + col;
            *reinterpret_cast<uint32_t *>(dk_out + at) = pack_bf16(dk[i][2] * scale, dk[i][3] * scale);
            *reinterpret_cast<uint32_t *>(dv_out + at) = pack_bf16(dv[i][2], dv[i][3]);
        }
    }
#endif
}

// lse (natural log) and delta (T, Hq) into lse_t (log2 units) and delta_t (Hq, Tpad), and the
// sequence starts into a copy padded to Tpad: positions past T get lse +inf (their P is 0),
// delta 0, start T
__global__ void attention_backward_stats_kernel(float *lse_t, float *delta_t, int32_t *starts_pad, const float *lse,
                                                const float *delta, const int32_t *starts, int T, int Tpad, int Hq)
{
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)Hq * Tpad)
        return;
    int h = (int)(i / Tpad), t = (int)(i % Tpad);
    lse_t[i] = t < T ? lse[(size_t)t * Hq + h] * LOG2E : INFINITY;
    delta_t[i] = t < T ? delta[(size_t)t * Hq + h] : 0.0f;
    if (h == 0)
        starts_pad[t] = t < T ? starts[t] : T;
}

// delta[t, h] = rowsum(dout * out) in fp32, and the dq accumulator's row zeroed (and, when
// dkv_acc is given, the fp32 dk and dv accumulators' rows (t, h) for h < Hkv; when seq_start
// is, the first position of t's sequence). One warp per (token, head) row.
template <int D>
__global__ void attention_backward_prepare_kernel(float *delta, float *dq_acc, float *dkv_acc, int32_t *seq_start,
                                                  const __nv_bfloat16 *dout, const __nv_bfloat16 *out, long rows,
                                                  int Hq, int Hkv, const int32_t *cu, int n_seqs)
{
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows)
        return;
    float sum = 0.0f;
    for (int d = lane * 2; d < D; d += 64) {
        float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(dout + row * D + d));
        float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(out + row * D + d));
        sum += a.x * b.x + a.y * b.y;
        *reinterpret_cast<float2 *>(dq_acc + row * D + d) = make_float2(0.0f, 0.0f);
    }
    long t = row / Hq;
    int h = (int)(row % Hq);
    if (h == 0 && lane == 0)
        seq_start[t] = cu[sequence_of(cu, n_seqs, (int)t)];
    if (dkv_acc && h < Hkv) {
        size_t n_kv = (size_t)(rows / Hq) * Hkv * D, at = ((size_t)t * Hkv + h) * D;
        for (int d = lane * 2; d < D; d += 64) {
            *reinterpret_cast<float2 *>(dkv_acc + at + d) = make_float2(0.0f, 0.0f);
            *reinterpret_cast<float2 *>(dkv_acc + n_kv + at + d) = make_float2(0.0f, 0.0f);
        }
    }
    for (int o = 16; o > 0; o >>= 1)
        sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0)
        delta[row] = sum;
}

// Version 3's backward: K, V tiles of KT = 128 keys, then two sets of (Q, dO) tiles, then dS
// (queries, keys)
constexpr int BWD_KW = 8, BWD_STAGES = 2;  // warps (of 16 keys each) a block; query tiles in flight
template <int D> constexpr size_t backward_smem_bytes()
{
    return (2 * 16 * BWD_KW + 2 * BWD_STAGES * TILE) * (D + PAD) * 2 + TILE * (16 * BWD_KW + PAD) * 2;
}

// grid (Hq, key tiles of 128 keys), 256 threads: 8 warps of 16 keys each. Each block holds its
// keys' dK, dV for one query head in registers over all query tiles and adds them into fp32
// accumulators at the end (one block per query head: 4x the blocks at 4:1 GQA, so far less of
// the machine idles at the end of the grid), and adds its share of dQ = dS K into the fp32
// accumulator with atomics: one per element of a (64 queries, head_dim) tile per block and step.
// The next query tile's Q and dO copies are in flight during this one, with its lse, delta and
// sequence starts (from the prepare kernel), so no warp waits on a global load before the step's
// barrier. Every fragment through ldmatrix, dS stored by stmatrix, masks only on tiles that need
// them, the exponent as one fma into ex2.approx.
template <int D>
__global__ void __launch_bounds__(32 * BWD_KW) attention_backward_kernel(
    float *dq_acc, float *dkv_acc, const int32_t *seq_start, const __nv_bfloat16 *q, const __nv_bfloat16 *k,
    const __nv_bfloat16 *v, const __nv_bfloat16 *dout, const float *lse, const float *delta, const int32_t *cu,
    int n_seqs, int T, int Hq, int Hkv, float scale)
{
    constexpr int KW = BWD_KW, STAGES = BWD_STAGES;
    constexpr int KT = 16 * KW, NTHREADS = 32 * KW, LD = D + PAD, LDS = KT + PAD;
    extern __shared__ __align__(16) unsigned char smem[];
    __nv_bfloat16 *sK = reinterpret_cast<__nv_bfloat16 *>(smem), *sV = sK + KT * LD, *sQdO = sV + KT * LD,
                  *sdS = sQdO + STAGES * 2 * TILE * LD;
    __shared__ float lse_buf[STAGES][TILE], delta_buf[STAGES][TILE];  // lse in log2 units
    __shared__ int first_buf[STAGES][TILE];  // first position of each query's sequence

    int h = blockIdx.x, k0 = blockIdx.y * KT, kvh = h / (Hq / Hkv);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    int key_a = k0 + warp * 16 + g, key_b = key_a + 8;
    int key_last = min(k0 + KT, T) - 1, query_end = cu[sequence_of(cu, n_seqs, key_last) + 1];
    int n_steps = (query_end - k0 + TILE - 1) / TILE;  // query tiles
    load_tile_async<D, KT, NTHREADS>(sK, k, k0, T, Hkv, kvh);
    load_tile_async<D, KT, NTHREADS>(sV, v, k0, T, Hkv, kvh);
    auto issue = [&](int step) {  // query tile `step`
        int q0 = k0 + step * TILE, buf = step % STAGES;
        load_tile_async<D, TILE, NTHREADS>(sQdO + buf * 2 * TILE * LD, q, q0, T, Hq, h);
        load_tile_async<D, TILE, NTHREADS>(sQdO + (buf * 2 + 1) * TILE * LD, dout, q0, T, Hq, h);
        if (threadIdx.x < TILE) {  // raw copies: lse in natural-log units
            int t = q0 + threadIdx.x;
            bool in = t < T;
            size_t at = in ? (size_t)t * Hq + h : 0;
            cp_async4(&lse_buf[buf][threadIdx.x], lse + at, in);
            cp_async4(&delta_buf[buf][threadIdx.x], delta + at, in);
            cp_async4(&first_buf[buf][threadIdx.x], seq_start + (in ? t : 0), in);
        }
        cp_async_commit();
    };

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            dk_acc[i][e] = dv_acc[i][e] = 0.0f;

    issue(0);  // one group with K and V
    for (int step = 0; step < n_steps; step++) {
        int q0 = k0 + step * TILE, buf = step % STAGES;
        if (step + 1 < n_steps) {
            issue(step + 1);  // its buffers were last read in step - 1, before its closing barrier
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // this step's tiles have landed for every thread
        const __nv_bfloat16 *sQ = sQdO + buf * 2 * TILE * LD, *sdO = sQ + TILE * LD;
        const float *q_lse = lse_buf[buf], *q_delta = delta_buf[buf];
        const int *q_first = first_buf[buf];

        // S^T = K Q^T and dP^T = V dO^T: 16 keys x 64 queries per warp
        float p[TILE / 8][4], dp[TILE / 8][4];
#pragma unroll
        for (int nt = 0; nt < TILE / 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                p[nt][e] = dp[nt][e] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < D / 16; kc++) {
            uint32_t ka[4], va[4];
            load_a_ldsm(ka, sK, LD, warp * 16, kc * 16);
            load_a_ldsm(va, sV, LD, warp * 16, kc * 16);
#pragma unroll
            for (int np = 0; np < TILE / 16; np++) {
                uint32_t bq[4], bo[4];
                load_b_ldsm(bq, sQ, LD, np * 16, kc * 16);
                load_b_ldsm(bo, sdO, LD, np * 16, kc * 16);
                mma_bf16(p[2 * np], ka, bq[0], bq[1]);
                mma_bf16(p[2 * np + 1], ka, bq[2], bq[3]);
                mma_bf16(dp[2 * np], va, bo[0], bo[1]);
                mma_bf16(dp[2 * np + 1], va, bo[2], bo[3]);
            }
        }
        // P^T from the saved lse; dS^T = P^T (dP^T - delta), both 16 keys x 64 queries. Masks
        // only where this warp's 16 keys and the 64 queries are not all "same sequence, causal"
        // (warp-uniform test); the exponent as one fma into ex2.approx; lse copied raw
        // (natural-log units), rows past T zero-filled and masked by t < T
        bool full = q0 >= k0 + warp * 16 + 15 && q0 + TILE <= T && q_first[TILE - 1] <= k0 + warp * 16;
        float scale_log2 = scale * LOG2E;
#pragma unroll
        for (int nt = 0; nt < TILE / 8; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int col = nt * 8 + 2 * c + e;
                float l = q_lse[col] * LOG2E, dl = q_delta[col];
                float pa = fast_exp2(fmaf(p[nt][e], scale_log2, -l));
                float pb = fast_exp2(fmaf(p[nt][2 + e], scale_log2, -l));
                if (!full) {
                    int t = q0 + col, first = q_first[col];
                    pa = (t < T && t >= key_a && first <= key_a) ? pa : 0.0f;
                    pb = (t < T && t >= key_b && first <= key_b) ? pb : 0.0f;
                }
                p[nt][e] = pa;
                p[nt][2 + e] = pb;
                dp[nt][e] = pa * (dp[nt][e] - dl);
                dp[nt][2 + e] = pb * (dp[nt][2 + e] - dl);
            }
        // dV += P^T dO and dK += dS^T Q (scale applied at the end), k = the 64 queries
#pragma unroll
        for (int kc = 0; kc < TILE / 16; kc++) {
            uint32_t pa[4], sa[4];
            a_from_c(pa, p[2 * kc], p[2 * kc + 1]);
            a_from_c(sa, dp[2 * kc], dp[2 * kc + 1]);
            // dS^T into sdS transposed by stmatrix, 4 8x8 blocks at a time; lane l gives row
            // l % 8 of block l / 8 = (queries 16 kc + 8 (l / 16) + l % 8, keys warp * 16 + 8 ((l / 8) % 2) ...)
            stsm_x4_trans(sdS + (size_t)(kc * 16 + (lane >> 4) * 8 + (lane & 7)) * LDS + warp * 16 + ((lane >> 3) & 1) * 8,
                          sa);
#pragma unroll
            for (int np = 0; np < D / 16; np++) {
                uint32_t b[4];
                load_b_trans(b, sdO, LD, kc * 16, np * 16);
                mma_bf16(dv_acc[2 * np], pa, b[0], b[1]);
                mma_bf16(dv_acc[2 * np + 1], pa, b[2], b[3]);
                load_b_trans(b, sQ, LD, kc * 16, np * 16);
                mma_bf16(dk_acc[2 * np], sa, b[0], b[1]);
                mma_bf16(dk_acc[2 * np + 1], sa, b[2], b[3]);
            }
        }
        __syncthreads();  // sdS complete
        // dQ += dS K into the fp32 accumulator: warp w takes queries (w % 4) * 16 + [0, 16) and
        // 1 / (KW / 4) of head_dim's 16-column slices, summing over all KT keys
        constexpr int SLICES = D / 16 / (KW / 4);
        int qa = q0 + (warp % 4) * 16 + g, qb = qa + 8, np0 = (warp / 4) * SLICES;
#pragma unroll
        for (int np = np0; np < np0 + SLICES; np++) {
            float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
            for (int kc = 0; kc < KT / 16; kc++) {
                uint32_t a[4], b[4];
                load_a_ldsm(a, sdS, LDS, (warp % 4) * 16, kc * 16);
                load_b_trans(b, sK, LD, kc * 16, np * 16);
                mma_bf16(acc[0], a, b[0], b[1]);
                mma_bf16(acc[1], a, b[2], b[3]);
            }
#pragma unroll
            for (int half = 0; half < 2; half++) {
                int d = np * 16 + half * 8 + 2 * c;
                if (qa < T)
                    atomicAdd(reinterpret_cast<float2 *>(dq_acc + ((size_t)qa * Hq + h) * D + d),
                              make_float2(acc[half][0] * scale, acc[half][1] * scale));
                if (qb < T)
                    atomicAdd(reinterpret_cast<float2 *>(dq_acc + ((size_t)qb * Hq + h) * D + d),
                              make_float2(acc[half][2] * scale, acc[half][3] * scale));
            }
        }
        __syncthreads();  // dS, Q and dO buffers are consumed before they are refilled
    }
    add_dkv<D>(dkv_acc, dk_acc, dv_acc, key_a, key_b, T, Hkv, kvh, scale);
}

// dq = dq_acc rounded to bf16, 8 values a thread (n a multiple of 8: head_dim is)
__global__ void attention_dq_convert_kernel(__nv_bfloat16 *dq, const float *dq_acc, size_t n)
{
    size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= n)
        return;
    float4 lo = *reinterpret_cast<const float4 *>(dq_acc + i), hi = *reinterpret_cast<const float4 *>(dq_acc + i + 4);
    float vals[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    store_bf16x8(dq + i, vals);
}

// Version 3's forward (128-query blocks)
template <int D>
int forward_launch(bf16_t *out, float *lse, const bf16_t *q, const bf16_t *k, const bf16_t *v, const int32_t *cu,
                   int n_seqs, int T, int Hq, int Hkv, cudaStream_t stream, Err *err)
{
    auto kernel = attention_forward_fast_kernel<D>;
    size_t smem = forward_fast_smem_bytes<D>();
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), err);
    dim3 grid(Hq, ceil_div(T, TILE * FAST_MT));
    CUDA_CHECK(launch_kernel(kernel, grid, dim3(THREADS), smem, stream, false, out, lse, q, k, v, cu, n_seqs, T, Hq,
                             Hkv, LOG2E / sqrtf((float)D)),
               err);
    return 0;
}

// The tensor-map encoder of the driver (cuTensorMapEncodeTiled), found once through the runtime
typedef CUresult (*EncodeTiledFn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *, const cuuint64_t *,
                                  const cuuint64_t *, const cuuint32_t *, const cuuint32_t *, CUtensorMapInterleave,
                                  CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// A TMA map of x (T, H, 128), bf16 (f32: fp32), whose box is `rows` rows (positions) x 128 bytes
// of columns of one head (64 bf16, 32 fp32), 128-byte swizzled: the layout the products read
int head_map(CUtensorMap *map, const void *x, int T, int H, int rows, Err *err, bool f32 = false)
{
    static EncodeTiledFn encode = nullptr;
    if (!encode) {
        void *fn = nullptr;
        cudaDriverEntryPointQueryResult found;
        CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found),
                   err);
        SHAPE_CHECK(found == cudaDriverEntryPointSuccess && fn, err, "attention: the driver has no cuTensorMapEncodeTiled");
        encode = (EncodeTiledFn)fn;
    }
    cuuint64_t esize = f32 ? 4 : 2;
    cuuint64_t dims[3] = {(cuuint64_t)H_D, (cuuint64_t)H, (cuuint64_t)T}, strides[2] = {H_D * esize, H * H_D * esize};
    cuuint32_t box[3] = {(cuuint32_t)(128 / esize), 1, (cuuint32_t)rows}, step[3] = {1, 1, 1};
    CUresult rc = encode(map, f32 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, (void *)x,
                         dims, strides, box, step,
                         CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                         CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    SHAPE_CHECK(rc == CUDA_SUCCESS, err, "attention: cuTensorMapEncodeTiled failed (%d)", (int)rc);
    return 0;
}

// Version 4's forward (head_dim 128 on an sm_90 device; attention_sm90_ok says when)
int forward_sm90_launch(bf16_t *out, float *lse, const bf16_t *q, const bf16_t *k, const bf16_t *v,
                        const int32_t *cu, int n_seqs, int T, int Hq, int Hkv, cudaStream_t stream, Err *err)
{
    size_t smem = forward_sm90_smem_bytes();
    dim3 grid(Hq, ceil_div(T, H_BM));
    float scale_log2 = LOG2E / sqrtf((float)H_D);
    CUtensorMap map_q, map_k, map_v;
    if (head_map(&map_q, q, T, Hq, 128, err) || head_map(&map_k, k, T, Hkv, 128, err) ||
        head_map(&map_v, v, T, Hkv, 128, err))
        return -1;
    CUDA_CHECK(
        cudaFuncSetAttribute(attention_forward_tma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
        err);
    attention_forward_tma_kernel<<<grid, H_THREADS, smem, stream>>>(map_q, map_k, map_v, out, lse, cu, n_seqs, T, Hq,
                                                                    Hkv, scale_log2);
    LAUNCH_CHECK(err);
    return 0;
}

// Before every backward: delta, the dq accumulator (and dk, dv's when given) zeroed, each position's sequence start
template <int D>
int backward_prepare(float *delta, float *dq_acc, float *dkv_acc, int32_t *seq_start, const bf16_t *dout,
                     const bf16_t *out, const int32_t *cu, int n_seqs, int T, int Hq, int Hkv, cudaStream_t stream,
                     Err *err)
{
    long rows = (long)T * Hq;
    attention_backward_prepare_kernel<D><<<ceil_div((size_t)rows * 32, 256), 256, 0, stream>>>(
        delta, dq_acc, dkv_acc, seq_start, dout, out, rows, Hq, Hkv, cu, n_seqs);
    LAUNCH_CHECK(err);
    return 0;
}

// After it: dq, and (dkv_acc given) dk and dv, rounded to bf16 from the fp32 accumulators
int backward_convert(bf16_t *dq, bf16_t *dk, bf16_t *dv, const float *dq_acc, const float *dkv_acc, int T, int Hq,
                     int Hkv, int D, cudaStream_t stream, Err *err)
{
    size_t n = (size_t)T * Hq * D, n_kv = (size_t)T * Hkv * D;
    attention_dq_convert_kernel<<<ceil_div(n / 8, 256), 256, 0, stream>>>(dq, dq_acc, n);
    LAUNCH_CHECK(err);
    if (!dkv_acc)
        return 0;
    attention_dq_convert_kernel<<<ceil_div(n_kv / 8, 256), 256, 0, stream>>>(dk, dkv_acc, n_kv);
    LAUNCH_CHECK(err);
    attention_dq_convert_kernel<<<ceil_div(n_kv / 8, 256), 256, 0, stream>>>(dv, dkv_acc + n_kv, n_kv);
    LAUNCH_CHECK(err);
    return 0;
}

int heads_per_block = 0;  // cuda_attention_set_heads_per_block: 0 chooses

// Version 5's backward (head_dim 128 on an sm_90 device)
int backward_sm90_launch(bf16_t *dq, bf16_t *dk, bf16_t *dv, const bf16_t *dout, const bf16_t *q, const bf16_t *k,
                         const bf16_t *v, const bf16_t *out, const float *lse, const int32_t *cu, int n_seqs, int T,
                         int Hq, int Hkv, float *dq_acc, float *dkv_acc, float *delta, int32_t *seq_start,
                         float *lse_t, float *delta_t, int32_t *starts_pad, cudaStream_t stream, Err *err)
{
    int Tpad = (int)stats_positions(T), group = Hq / Hkv;
    int hpb = heads_per_block > 0 && group % heads_per_block == 0 ? heads_per_block : T / n_seqs <= 4096 ? group : 1;
    if (hpb == group)  // dk, dv are written whole by the one block of their kv head and key tile
        dkv_acc = nullptr;
    if (backward_prepare<H_D>(delta, dq_acc, dkv_acc, seq_start, dout, out, cu, n_seqs, T, Hq, Hkv, stream, err))
        return -1;
    attention_backward_stats_kernel<<<ceil_div((size_t)Hq * Tpad, 256), 256, 0, stream>>>(lse_t, delta_t, starts_pad,
                                                                                        lse, delta, seq_start, T, Tpad, Hq);
    LAUNCH_CHECK(err);
    CUtensorMap map_q, map_do, map_k, map_v, map_dq;
    if (head_map(&map_q, q, T, Hq, B_BQ, err) || head_map(&map_do, dout, T, Hq, B_BQ, err) ||
        head_map(&map_k, k, T, Hkv, 128, err) || head_map(&map_v, v, T, Hkv, 128, err) ||
        head_map(&map_dq, dq_acc, T, Hq, B_BQ, err, true))
        return -1;
    size_t smem = backward_sm90_smem_bytes();
    CUDA_CHECK(
        cudaFuncSetAttribute(attention_backward_tma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
        err);
    attention_backward_tma_kernel<<<dim3(Hq / hpb, ceil_div(T, 128)), H_THREADS, smem, stream>>>(
        map_q, map_do, map_k, map_v, map_dq, dk, dv, dkv_acc, lse_t, delta_t, starts_pad, cu, n_seqs, T, Tpad, Hq,
        Hkv, hpb, LOG2E / sqrtf((float)H_D), 1.0f / sqrtf((float)H_D));
    LAUNCH_CHECK(err);
    return backward_convert(dq, dk, dv, dq_acc, dkv_acc, T, Hq, Hkv, H_D, stream, err);
}

// Whether the current device runs the sm_90a image of this file (compute capability 9.0
// exactly: sm_90a code runs nowhere else; a build for plain sm_90 has none); asked once a device
bool attention_sm90_ok(void)
{
    static signed char known[64];  // 0 not asked yet, 1 yes, -1 no
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64)
        return false;
    if (!known[dev]) {
        int major = 0, minor = 0, image = 0;
        bool yes = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                   cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
                   major == 9 && minor == 0 &&
                   cudaMemcpyFromSymbol(&image, attention_sm90_image, sizeof image) == cudaSuccess && image == 1;
        known[dev] = yes ? 1 : -1;
    }
    return known[dev] == 1;
}

// Version 3's backward
template <int D>
int backward_launch(bf16_t *dq, bf16_t *dk, bf16_t *dv, const bf16_t *dout, const bf16_t *q, const bf16_t *k,
                    const bf16_t *v, const bf16_t *out, const float *lse, const int32_t *cu, int n_seqs, int T,
                    int Hq, int Hkv, float *dq_acc, float *dkv_acc, float *delta, int32_t *seq_start,
                    cudaStream_t stream, Err *err)
{
    if (backward_prepare<D>(delta, dq_acc, dkv_acc, seq_start, dout, out, cu, n_seqs, T, Hq, Hkv, stream, err))
        return -1;
    size_t smem = backward_smem_bytes<D>();
    auto kernel = attention_backward_kernel<D>;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), err);
    kernel<<<dim3(Hq, ceil_div(T, 16 * BWD_KW)), 32 * BWD_KW, smem, stream>>>(
        dq_acc, dkv_acc, seq_start, q, k, v, dout, lse, delta, cu, n_seqs, T, Hq, Hkv, 1.0f / sqrtf((float)D));
    LAUNCH_CHECK(err);
    return backward_convert(dq, dk, dv, dq_acc, dkv_acc, T, Hq, Hkv, D, stream, err);
}

// Which kernel version the launchers run (cuda_attention_set_version; kernels/NOTES.md has
// each one's timings): 3, the mma.sync kernels (ldmatrix fragments, 128-query forward blocks,
// one backward block per (128-key tile, query head)); 4, version 3's backward and, for head_dim
// 128 on an sm_90 device, the wgmma/TMA forward; 5, the fastest measured: there, the wgmma/TMA
// backward too (elsewhere, and for head_dim 64, versions 4 and 5 run version 3's kernels).
// Versions 1 and 2, the first kernels, are gone (NOTES: rerun them from commit c0520f5).
int attention_version = 5;

}  // namespace

extern "C" int cuda_attention_forward(bf16_t *out, float *lse, const bf16_t *q, const bf16_t *k, const bf16_t *v,
                                      const int32_t *cu_seqlens, int n_seqs, int T, int n_heads, int n_kv_heads,
                                      int head_dim, GpuStream stream, Err *err)
{
    SHAPE_CHECK(T > 0 && n_seqs > 0 && n_seqs <= T, err, "attention: T=%d, n_seqs=%d (need 1 <= n_seqs <= T)", T,
                n_seqs);
    SHAPE_CHECK(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0, err,
                "attention: n_heads=%d is not a positive multiple of n_kv_heads=%d", n_heads, n_kv_heads);
    SHAPE_CHECK(head_dim == 64 || head_dim == 128, err, "attention: head_dim=%d (64 or 128 supported)", head_dim);
    SHAPE_CHECK(out && lse && q && k && v && cu_seqlens, err, "attention forward: NULL pointer");
    SHAPE_CHECK(is_aligned16(out) && is_aligned16(q) && is_aligned16(k) && is_aligned16(v), err,
                "attention forward: q, k, v, out must be 16-byte aligned");
    cudaStream_t s = (cudaStream_t)stream;
    if (attention_version >= 4 && head_dim == 128 && attention_sm90_ok())
        return forward_sm90_launch(out, lse, q, k, v, cu_seqlens, n_seqs, T, n_heads,
                                   n_kv_heads, s, err);
    auto launch = head_dim == 64 ? forward_launch<64> : forward_launch<128>;
    return launch(out, lse, q, k, v, cu_seqlens, n_seqs, T, n_heads, n_kv_heads, s, err);
}

extern "C" size_t cuda_attention_backward_workspace_bytes(int T, int n_heads, int n_kv_heads, int head_dim)
{
    size_t t = T > 0 ? T : 0, hq = n_heads > 0 ? n_heads : 0, hkv = n_kv_heads > 0 ? n_kv_heads : 0;
    size_t d = head_dim > 0 ? head_dim : 0;
    size_t tpad = stats_positions(t);
    // dq accumulator, dk and dv accumulators, delta, each position's sequence start; then (version
    // 5) lse and delta transposed to (heads, tpad), the starts padded to tpad
    return (t * hq * d * 4 + 15) / 16 * 16 + (2 * t * hkv * d * 4 + 15) / 16 * 16 + (t * hq * 4 + 15) / 16 * 16 +
           (t * 4 + 15) / 16 * 16 + 2 * hq * tpad * 4 + tpad * 4;
}

extern "C" int cuda_attention_backward(bf16_t *dq, bf16_t *dk, bf16_t *dv, const bf16_t *dout, const bf16_t *q,
                                       const bf16_t *k, const bf16_t *v, const bf16_t *out, const float *lse,
                                       const int32_t *cu_seqlens, int n_seqs, int T, int n_heads, int n_kv_heads,
                                       int head_dim, void *workspace, size_t workspace_bytes, GpuStream stream,
                                       Err *err)
{
    SHAPE_CHECK(T > 0 && n_seqs > 0 && n_seqs <= T, err, "attention: T=%d, n_seqs=%d (need 1 <= n_seqs <= T)", T,
                n_seqs);
    SHAPE_CHECK(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0, err,
                "attention: n_heads=%d is not a positive multiple of n_kv_heads=%d", n_heads, n_kv_heads);
    SHAPE_CHECK(head_dim == 64 || head_dim == 128, err, "attention: head_dim=%d (64 or 128 supported)", head_dim);
    SHAPE_CHECK(dq && dk && dv && dout && q && k && v && out && lse && cu_seqlens && workspace, err,
                "attention backward: NULL pointer");
    SHAPE_CHECK(is_aligned16(dq) && is_aligned16(dout) && is_aligned16(q) && is_aligned16(k) && is_aligned16(v) &&
                    is_aligned16(out) && is_aligned16(workspace),
                err, "attention backward: tensors and workspace must be 16-byte aligned");
    size_t need = cuda_attention_backward_workspace_bytes(T, n_heads, n_kv_heads, head_dim);
    SHAPE_CHECK(workspace_bytes >= need, err, "attention backward: workspace of %zu bytes, need %zu",
                workspace_bytes, need);
    float *dq_acc = (float *)workspace;
    float *dkv_acc = (float *)((char *)workspace + ((size_t)T * n_heads * head_dim * 4 + 15) / 16 * 16);
    float *delta = (float *)((char *)dkv_acc + ((size_t)2 * T * n_kv_heads * head_dim * 4 + 15) / 16 * 16);
    int32_t *seq_start = (int32_t *)((char *)delta + ((size_t)T * n_heads * 4 + 15) / 16 * 16);
    cudaStream_t s = (cudaStream_t)stream;
    if (attention_version == 5 && head_dim == 128 && attention_sm90_ok()) {
        size_t tpad = stats_positions(T);
        float *lse_t = (float *)((char *)seq_start + ((size_t)T * 4 + 15) / 16 * 16), *delta_t = lse_t + n_heads * tpad;
        int32_t *starts_pad = (int32_t *)(delta_t + n_heads * tpad);
        return backward_sm90_launch(dq, dk, dv, dout, q, k, v, out, lse, cu_seqlens, n_seqs, T, n_heads, n_kv_heads,
                                    dq_acc, dkv_acc, delta, seq_start, lse_t, delta_t, starts_pad, s, err);
    }
    auto launch = head_dim == 64 ? backward_launch<64> : backward_launch<128>;
    return launch(dq, dk, dv, dout, q, k, v, out, lse, cu_seqlens, n_seqs, T, n_heads, n_kv_heads, dq_acc, dkv_acc,
                  delta, seq_start, s, err);
}

extern "C" int cuda_attention_set_heads_per_block(int n)
{
    int previous = heads_per_block;
    heads_per_block = n > 0 ? n : 0;
    return previous;
}

extern "C" int cuda_attention_set_version(int version)
{
    if (version < ATTENTION_FIRST_VERSION || version > ATTENTION_VERSIONS)
        return -1;
    int previous = attention_version;
    attention_version = version;
    return previous;
}
