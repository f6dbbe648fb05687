// Decode GEMV on the tensor cores: y (batch, out) = x (batch, in) W^T, W (out, in) bf16.
//
// Why tensor cores for a matrix-vector product: one mma.sync.m16n8k16 takes a 16 x 16 tile of W
// as its A operand exactly as W lies in memory (row-major, rows = outputs), and up to 8 rows of x
// as its B operand ("col" layout = x's rows contiguous along k). So one instruction does what
// 256 FMAs would, the conversion from bf16 is free, and batches up to 64 cost no more loads of
// W than batch 1. The sum over k does not care in which order k is visited, so each lane loads
// 16 contiguous bytes (8 k values) of its row of W and of its row of x, and the same k
// permutation is used for both operands: lane (g = lane / 4, t = lane % 4) holds W rows g and
// g + 8, k = 8t .. 8t + 7 of a 32-wide k step, which feeds two mma's (k 8t..8t+3, then
// 8t+4..8t+7, standing for the fragment's k = 2t, 2t+1, 2t+8, 2t+9).
//
// Work split: a block of WARPS warps owns one 16-row tile of W (and a k range when split-K is
// on); warp w takes k steps w*U .. w*U+U-1, then the next WARPS*U steps, so that a block streams
// one contiguous stretch of each row at a time with U 16-byte loads per row in flight per lane.
// Warps' partial tiles are summed in shared memory. Tall-skinny shapes (few tiles: 4096 -> 1024,
// the LoRA down-projection) split k over ksplit blocks per tile: each writes its fp32 partial
// tile to the workspace, and the last block to finish (a counter per tile) adds them in order
// 0..ksplit-1, so results are deterministic, then resets the counter.
//
// Epilogue: optional LoRA up-projection scale * u B^T, u = x A^T (batch, rank) fp32 made by a
// first pass of this same kernel over A with fp32 output; then bf16 or fp32 output.
#include "cuda_check.cuh"
#include "gemv.cuh"

namespace {

constexpr int TILE_ROWS = 16;   // rows of W per tile: the mma's M
constexpr int K_STEP = 32;      // k per warp step: 4 lanes x 8 values
constexpr int MAX_BATCH = 64;   // rows of x per pass: 8 mma columns x 8
constexpr int MAX_KSPLIT = 32;
// Weight loads ask L2 for 256-byte blocks: measured on an H200 at batch 1 (NOTES.md), lm_head
// 276 -> 255 us, gate/up 36.0 -> 34.2 us, down 36.4 -> 33.8 us; small shapes unchanged.
constexpr bool DEFAULT_PREFETCH = true;
// Split-K until the grid has about this many warps: measured on an H200 (NOTES.md), batch 1:
// ~4096 warps (31 a multiprocessor) with 2 loads of each row in flight beat fewer warps with
// more loads each. A constant rather than the device's count so that the workspace size does
// not depend on the device.
constexpr int TARGET_WARPS = 4096;
// Split-K counters: a fixed region at the start of the workspace, so that calls of any shape
// (with or without an adapter) share one workspace without overwriting each other's counters.
constexpr int COUNTER_SLOTS = 4096;  // tiles (of 16 rows) that may be split: out <= 65536

// 16 bytes of W, read once: not kept in L1 (x is, and is read by every warp of the block).
// PREFETCH: also ask L2 to fetch the whole 256-byte block around it (the other warps of the
// block read the rest of it next).
template <bool PREFETCH> __device__ __forceinline__ uint4 load_weights(const __nv_bfloat16 *p)
{
    uint4 r;
    if (PREFETCH)
        asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
            : "l"(p));
    else
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
            : "l"(p));
    return r;
}

// c (16 x 8, fp32) += a (16 x 16, bf16, row) * b (16 x 8, bf16, col)
__device__ __forceinline__ void mma_bf16(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

struct GemvArgs {
    const __nv_bfloat16 *W;  // (out, in)
    const __nv_bfloat16 *x;  // (batch, in)
    __nv_bfloat16 *y;        // (batch, out), or NULL
    float *y_f32;            // (batch, out), or NULL
    int out, in, batch;
    const __nv_bfloat16 *lora_B;  // (out, rank) or NULL
    const float *lora_u;          // (batch, rank): x A^T
    int rank;
    float scale;
    float *partials;  // (ksplit, tiles, NT * 128) when ksplit > 1
    int *counters;    // (tiles)
    int ksplit;
    const __nv_bfloat16 *residual;  // (batch, out) added before the rounding, or NULL; may be y itself
    int pdl;                        // launched as a programmatic dependent launch (see launch())
};

// NT: mma columns of 8 batch rows (batch <= 8 NT); U: k steps per warp pass; WARPS per block.
template <int NT, int U, int WARPS, bool PREFETCH>
__global__ void __launch_bounds__(WARPS * 32) gemv_kernel(GemvArgs a)
{
    __shared__ float partial[WARPS][NT * 128];
    __shared__ int is_last;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int tile = blockIdx.x, ks = blockIdx.y;
    // rows past `out` and batch rows past `batch` re-read a valid row: harmless, never written
    const int row0 = min(tile * TILE_ROWS + g, a.out - 1), row1 = min(tile * TILE_ROWS + g + 8, a.out - 1);
    const __nv_bfloat16 *w0 = a.W + (size_t)row0 * a.in + t * 8, *w1 = a.W + (size_t)row1 * a.in + t * 8;
    const __nv_bfloat16 *xs[NT];
#pragma unroll
    for (int n = 0; n < NT; n++)
        xs[n] = a.x + (size_t)min(n * 8 + g, a.batch - 1) * a.in + t * 8;

    const int ksteps = (a.in + K_STEP - 1) / K_STEP;
    const int s_begin = (int)((long)ks * ksteps / a.ksplit), s_end = (int)((long)(ks + 1) * ksteps / a.ksplit);
    if (a.pdl) {
        // Launched while the previous kernel may still run: the weights are never written by
        // anyone, so ask L2 for this warp's first ones now, then wait for the previous grid (and
        // its memory) before reading x, u, the counters or the partials.
#pragma unroll
        for (int u = 0; u < U; u++)
            if (s_begin + warp * U + u < s_end) {
                asm volatile("prefetch.global.L2 [%0];" ::"l"(w0 + (size_t)(s_begin + warp * U + u) * K_STEP));
                asm volatile("prefetch.global.L2 [%0];" ::"l"(w1 + (size_t)(s_begin + warp * U + u) * K_STEP));
            }
        asm volatile("griddepcontrol.wait;" ::: "memory");
    }
    float acc[NT][4] = {};
    for (int s0 = s_begin + warp * U; s0 < s_end; s0 += WARPS * U) {
        uint4 wa[U], wb[U], xv[NT][U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int k = (s0 + u) * K_STEP + t * 8;
            bool in_range = s0 + u < s_end && k < a.in;  // in % 8 == 0: all 8 values or none
            wa[u] = in_range ? load_weights<PREFETCH>(w0 + (size_t)(s0 + u) * K_STEP) : make_uint4(0, 0, 0, 0);
            wb[u] = in_range ? load_weights<PREFETCH>(w1 + (size_t)(s0 + u) * K_STEP) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int n = 0; n < NT; n++)
                xv[n][u] = in_range ? __ldg(reinterpret_cast<const uint4 *>(xs[n] + (size_t)(s0 + u) * K_STEP))
                                    : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int n = 0; n < NT; n++) {
                mma_bf16(acc[n], wa[u].x, wb[u].x, wa[u].y, wb[u].y, xv[n][u].x, xv[n][u].y);
                mma_bf16(acc[n], wa[u].z, wb[u].z, wa[u].w, wb[u].w, xv[n][u].z, xv[n][u].w);
            }
    }

    // element e = n * 128 + c * 32 + lane of a tile: W row g + 8 * (c / 2), batch row
    // n * 8 + 2t + c % 2 (the mma's C fragment)
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
        for (int c = 0; c < 4; c++)
            partial[warp][n * 128 + c * 32 + lane] = acc[n][c];
    __syncthreads();
    // each thread owns elements threadIdx.x + i * THREADS of the tile (compile-time i: registers)
    constexpr int THREADS = WARPS * 32, PER = (NT * 128 + THREADS - 1) / THREADS;
    const int tiles = gridDim.x;
    float sum[PER];
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int e = threadIdx.x + i * THREADS;
        float v = 0;
        if (e < NT * 128)
#pragma unroll
            for (int w = 0; w < WARPS; w++)
                v += partial[w][e];
        sum[i] = v;
    }
    if (a.ksplit > 1) {
        float *mine = a.partials + ((size_t)ks * tiles + tile) * NT * 128;
#pragma unroll
        for (int i = 0; i < PER; i++)
            if (threadIdx.x + i * THREADS < NT * 128)
                mine[threadIdx.x + i * THREADS] = sum[i];
        __threadfence();  // partials visible device-wide before the counter says so
        __syncthreads();
        if (threadIdx.x == 0) {
            int done = atomicAdd(&a.counters[tile], 1);
            is_last = done == a.ksplit - 1;
        }
        __syncthreads();
        if (!is_last)
            return;
        __threadfence();
#pragma unroll
        for (int i = 0; i < PER; i++) {
            int e = threadIdx.x + i * THREADS;
            float v = 0;
            if (e < NT * 128)
                for (int j = 0; j < a.ksplit; j++)  // fixed order: deterministic
                    v += __ldcg(a.partials + ((size_t)j * tiles + tile) * NT * 128 + e);
            sum[i] = v;
        }
        if (threadIdx.x == 0)
            a.counters[tile] = 0;  // ready for the next call
    }
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int e = threadIdx.x + i * THREADS;
        if (e >= NT * 128)
            continue;
        float v = sum[i];
        int n = e / 128, c = (e / 32) % 4, l = e % 32;
        int row = tile * TILE_ROWS + l / 4 + 8 * (c / 2), b = n * 8 + 2 * (l % 4) + c % 2;
        if (row >= a.out || b >= a.batch)
            continue;
        if (a.lora_B) {
            const float *u = a.lora_u + (size_t)b * a.rank;
            const __nv_bfloat16 *lb = a.lora_B + (size_t)row * a.rank;
            float d = 0;
            for (int j = 0; j < a.rank; j++)
                d += u[j] * __bfloat162float(lb[j]);
            v += a.scale * d;
        }
        if (a.residual)  // read before the write below, by this thread only: y may alias it
            v += __bfloat162float(a.residual[(size_t)b * a.out + row]);
        if (a.y)
            a.y[(size_t)b * a.out + row] = __float2bfloat16(v);
        else
            a.y_f32[(size_t)b * a.out + row] = v;
    }
}

int batch_columns(int batch) { return batch <= 8 ? 1 : batch <= 16 ? 2 : batch <= 32 ? 4 : 8; }
int default_unroll(int) { return 2; }
int default_warps(int) { return 8; }
int max_unroll(int nt) { return nt == 1 ? 8 : nt == 2 ? 4 : 2; }

int default_ksplit(int tiles, int in, int warps)
{
    if ((long)tiles * warps >= TARGET_WARPS || tiles > COUNTER_SLOTS)
        return 1;
    int ksteps = (in + K_STEP - 1) / K_STEP;
    int ks = (TARGET_WARPS + tiles * warps - 1) / (tiles * warps);
    ks = min(ks, max(1, ksteps / warps));  // every warp of a block gets a step
    return min(ks, MAX_KSPLIT);
}

size_t round256(size_t n) { return (n + 255) / 256 * 256; }

// Workspace layout: [counters (COUNTER_SLOTS) int][u (batch rows, rank) fp32][partials]
struct WorkspacePlan {
    size_t u_bytes, counter_bytes, partial_bytes;
};
WorkspacePlan plan_workspace(int batch, int out, int rank, int ksplit_main, int ksplit_lora)
{
    int rows = min(batch, MAX_BATCH), nt = batch_columns(rows);
    int tiles = (out + TILE_ROWS - 1) / TILE_ROWS, lora_tiles = (rank + TILE_ROWS - 1) / TILE_ROWS;
    WorkspacePlan p;
    p.u_bytes = rank > 0 ? round256((size_t)rows * rank * 4) : 0;
    p.counter_bytes = (size_t)COUNTER_SLOTS * 4;
    size_t main_partials = ksplit_main > 1 ? (size_t)ksplit_main * tiles * nt * 128 * 4 : 0;
    size_t lora_partials = rank > 0 && ksplit_lora > 1 ? (size_t)ksplit_lora * lora_tiles * nt * 128 * 4 : 0;
    p.partial_bytes = round256(max(main_partials, lora_partials));
    return p;
}

template <int NT, int U, int WARPS> void launch(bool prefetch, const GemvArgs &a, int tiles, cudaStream_t s)
{
    // with a.pdl it may start before the previous kernel in the stream ends (it waits inside)
    launch_kernel(prefetch ? gemv_kernel<NT, U, WARPS, true> : gemv_kernel<NT, U, WARPS, false>, dim3(tiles, a.ksplit),
                  dim3(WARPS * 32), 0, s, a.pdl != 0, a);
}

template <int NT, int U>
bool launch_warps(int warps, bool prefetch, const GemvArgs &a, int tiles, cudaStream_t s)
{
    if (warps == 4)
        launch<NT, U, 4>(prefetch, a, tiles, s);
    else if (warps == 8)
        launch<NT, U, 8>(prefetch, a, tiles, s);
    else
        return false;
    return true;
}

template <int NT>
bool launch_unroll(int unroll, int warps, bool prefetch, const GemvArgs &a, int tiles, cudaStream_t s)
{
    switch (unroll) {
    case 1: return launch_warps<NT, 1>(warps, prefetch, a, tiles, s);
    case 2: return launch_warps<NT, 2>(warps, prefetch, a, tiles, s);
    case 4: return NT <= 2 && launch_warps<NT, NT <= 2 ? 4 : 1>(warps, prefetch, a, tiles, s);
    case 8: return NT == 1 && launch_warps<NT, NT == 1 ? 8 : 1>(warps, prefetch, a, tiles, s);
    }
    return false;
}

bool launch_any(int nt, int unroll, int warps, bool prefetch, const GemvArgs &a, int tiles, cudaStream_t s)
{
    switch (nt) {
    case 1: return launch_unroll<1>(unroll, warps, prefetch, a, tiles, s);
    case 2: return launch_unroll<2>(unroll, warps, prefetch, a, tiles, s);
    case 4: return launch_unroll<4>(unroll, warps, prefetch, a, tiles, s);
    case 8: return launch_unroll<8>(unroll, warps, prefetch, a, tiles, s);
    }
    return false;
}

}  // namespace

extern "C" size_t cuda_gemv_workspace_bytes(int batch, int out, int in, int lora_rank)
{
    if (batch < 1 || out < 1 || in < 1 || lora_rank < 0)
        return 0;
    int nt = batch_columns(min(batch, MAX_BATCH)), warps = default_warps(nt);
    int ks_main = default_ksplit((out + TILE_ROWS - 1) / TILE_ROWS, in, warps);
    int ks_lora = lora_rank > 0 ? default_ksplit((lora_rank + TILE_ROWS - 1) / TILE_ROWS, in, warps) : 1;
    WorkspacePlan p = plan_workspace(batch, out, lora_rank, ks_main, ks_lora);
    return p.u_bytes + p.counter_bytes + p.partial_bytes;
}

extern "C" int cuda_gemv_ex(bf16_t *y, float *y_f32, const bf16_t *residual, const bf16_t *x, const bf16_t *W,
                            int batch, int out, int in, const GemvLora *lora, void *workspace,
                            size_t workspace_bytes, const GemvTuning *tuning, int pdl, GpuStream stream, Err *err)
{
    SHAPE_CHECK(x && W && workspace, err, "gemv: NULL pointer");
    SHAPE_CHECK((y != NULL) != (y_f32 != NULL), err, "gemv: give exactly one of the bf16 and fp32 outputs");
    SHAPE_CHECK(batch >= 1 && out >= 1 && in >= 1, err, "gemv: batch=%d out=%d in=%d: each must be >= 1", batch,
                out, in);
    SHAPE_CHECK(in % 8 == 0, err, "gemv: in=%d is not a multiple of 8 (16-byte loads of bf16 rows)", in);
    SHAPE_CHECK(is_aligned16(x) && is_aligned16(W), err, "gemv: x and W must be 16-byte aligned");
    int rank = lora ? lora->rank : 0;
    if (lora) {
        SHAPE_CHECK(lora->A && lora->B, err, "gemv: LoRA with a NULL A or B");
        SHAPE_CHECK(rank >= 1 && rank <= 256, err, "gemv: LoRA rank=%d outside 1..256", rank);
        SHAPE_CHECK(is_aligned16(lora->A), err, "gemv: LoRA A must be 16-byte aligned");
    }
    const void *y_any = y ? (const void *)y : (const void *)y_f32;
    size_t y_bytes = (size_t)batch * out * (y ? 2 : 4), x_bytes = (size_t)batch * in * 2;
    SHAPE_CHECK((const char *)y_any + y_bytes <= (const char *)x || (const char *)x + x_bytes <= (const char *)y_any,
                err, "gemv: y overlaps x");

    int nt_full = batch_columns(min(batch, MAX_BATCH));
    int warps = tuning && tuning->warps_per_block ? tuning->warps_per_block : default_warps(nt_full);
    int unroll = tuning && tuning->unroll ? tuning->unroll : default_unroll(nt_full);
    SHAPE_CHECK(warps == 4 || warps == 8, err, "gemv: warps_per_block=%d (4 or 8)", warps);
    SHAPE_CHECK((unroll == 1 || unroll == 2 || unroll == 4 || unroll == 8) && unroll <= max_unroll(nt_full), err,
                "gemv: unroll=%d not available for batch %d", unroll, batch);
    int tiles = (out + TILE_ROWS - 1) / TILE_ROWS, lora_tiles = (rank + TILE_ROWS - 1) / TILE_ROWS;
    int ks_main = tuning && tuning->ksplit ? tuning->ksplit : default_ksplit(tiles, in, warps);
    int ks_lora = rank > 0 ? default_ksplit(lora_tiles, in, warps) : 1;
    SHAPE_CHECK(ks_main >= 1 && ks_main <= MAX_KSPLIT, err, "gemv: ksplit=%d outside 1..%d", ks_main, MAX_KSPLIT);
    SHAPE_CHECK(ks_main == 1 || tiles <= COUNTER_SLOTS, err, "gemv: split-K over out=%d rows (at most %d)", out,
                COUNTER_SLOTS * TILE_ROWS);
    bool prefetch = tuning ? tuning->l2_prefetch != 0 : DEFAULT_PREFETCH;
    WorkspacePlan plan = plan_workspace(batch, out, rank, ks_main, ks_lora);
    size_t need = plan.u_bytes + plan.counter_bytes + plan.partial_bytes;
    SHAPE_CHECK(workspace_bytes >= need, err, "gemv: workspace of %zu bytes, %zu needed", workspace_bytes, need);
    char *ws = (char *)workspace;
    int *counters = (int *)ws;
    float *u = (float *)(ws + plan.counter_bytes);
    float *partials = (float *)(ws + plan.u_bytes + plan.counter_bytes);
    cudaStream_t s = (cudaStream_t)stream;

    for (int b0 = 0; b0 < batch; b0 += MAX_BATCH) {
        int rows = min(batch - b0, MAX_BATCH), nt = batch_columns(rows);
        int chunk_unroll = min(unroll, max_unroll(nt));
        const __nv_bfloat16 *xb = x + (size_t)b0 * in;
        if (rank > 0) {  // u (rows, rank) = x A^T in fp32
            GemvArgs d = {lora->A, xb, NULL, u, rank, in, rows, NULL, NULL, 0, 0.0f, partials, counters, ks_lora, NULL, pdl};
            SHAPE_CHECK(launch_any(nt, chunk_unroll, warps, prefetch, d, lora_tiles, s), err, "gemv: no kernel for this shape");
            LAUNCH_CHECK(err);
        }
        GemvArgs m = {W,        xb,   y ? y + (size_t)b0 * out : NULL, y_f32 ? y_f32 + (size_t)b0 * out : NULL,
                      out,      in,   rows,                            rank > 0 ? lora->B : NULL,
                      u,        rank, rank > 0 ? lora->scale : 0.0f,   partials,
                      counters, ks_main, residual ? residual + (size_t)b0 * out : NULL, pdl};
        SHAPE_CHECK(launch_any(nt, chunk_unroll, warps, prefetch, m, tiles, s), err, "gemv: no kernel for this shape");
        LAUNCH_CHECK(err);
    }
    return 0;
}

extern "C" int cuda_gemv_tuned(bf16_t *y, float *y_f32, const bf16_t *x, const bf16_t *W, int batch, int out,
                               int in, const GemvLora *lora, void *workspace, size_t workspace_bytes,
                               const GemvTuning *tuning, GpuStream stream, Err *err)
{
    return cuda_gemv_ex(y, y_f32, NULL, x, W, batch, out, in, lora, workspace, workspace_bytes, tuning, 0, stream, err);
}

extern "C" int cuda_gemv(bf16_t *y, float *y_f32, const bf16_t *x, const bf16_t *W, int batch, int out, int in,
                         const GemvLora *lora, void *workspace, size_t workspace_bytes, GpuStream stream, Err *err)
{
    return cuda_gemv_ex(y, y_f32, NULL, x, W, batch, out, in, lora, workspace, workspace_bytes, NULL, 0, stream, err);
}

namespace {

// ---- one row: cuda_gemv_row -------------------------------------------------------------------
//
// A decode step of one sequence reads every weight once for one row of x: nothing for tensor
// cores to reuse, and the products of a layer (8 to 235 MB) are small enough that a launch's ramp
// and tail, and the small kernels between them, cost as much as the bytes. So: blocks of ROW_WARPS
// warps that stay resident and walk the output rows (a warp a row at a time, every lane loading
// ROW_LOADS 16-byte pieces of it at once), plain fp32 FMAs and a warp sum; no split-K, no second
// kernel. Each block first puts the row of x as the product sees it in shared memory, RMSNorm
// applied when asked (1/rms from a block sum: the kernel before it need not exist); with swiglu a
// warp computes gate row i and up row i together and writes silu(gate) * up, so the SwiGLU kernel
// is gone too; the residual add is in the epilogue. A decode layer is then four of these and the
// attention kernel. pdl: a programmatic dependent launch, whose blocks may start while the
// previous kernel finishes, load their first weights (which no kernel writes), and only then wait
// (griddepcontrol.wait) before reading x; each block lets the next kernel launch as soon as it runs.
constexpr int ROW_WARPS = 8;   // warps a block
constexpr int ROW_LOADS = 16;  // 16-byte pieces of a row a lane has in flight (a whole 4096-wide row a warp)

struct RowArgs {
    const __nv_bfloat16 *W, *x, *residual, *norm_weight;
    __nv_bfloat16 *y;
    float *y_f32;
    int out, in, swiglu;
    float eps;
};

// NR rows of W (row0, row0 + row_step for NR = 2) against x in shared memory: acc[r] over the
// pieces of this lane. w holds round 0's pieces already (loaded before x was ready).
template <int NR>
__device__ inline void row_dot(float acc[NR], uint4 (&w)[NR][ROW_LOADS / NR], const uint4 *const rows[NR],
                               const uint4 *xs, int pieces, int lane)
{
    constexpr int NL = ROW_LOADS / NR;
    for (int c0 = 0; c0 < pieces; c0 += 32 * NL) {
        if (c0 > 0)
#pragma unroll
            for (int r = 0; r < NR; r++)
#pragma unroll
                for (int i = 0; i < NL; i++) {
                    int c = c0 + lane + i * 32;
                    w[r][i] = c < pieces ? load_weights<false>(reinterpret_cast<const __nv_bfloat16 *>(rows[r] + c))
                                         : make_uint4(0, 0, 0, 0);
                }
#pragma unroll
        for (int i = 0; i < NL; i++) {
            int c = c0 + lane + i * 32;
            if (c >= pieces)
                break;
            float xf[8];
            unpack_bf16x8(xf, xs[c]);
#pragma unroll
            for (int r = 0; r < NR; r++) {
                float wf[8];
                unpack_bf16x8(wf, w[r][i]);
#pragma unroll
                for (int k = 0; k < 8; k++)
                    acc[r] += wf[k] * xf[k];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < NR; r++)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
}

// NR = 1: row task t is row t; NR = 2 (swiglu): task t is rows t (gate) and out + t (up).
template <int NR, bool NORM, bool PDL>
__global__ void __launch_bounds__(ROW_WARPS * 32) gemv_row_kernel(RowArgs a)
{
    constexpr int NL = ROW_LOADS / NR;
    extern __shared__ uint4 xs[];  // (in / 8): x as the product sees it, bf16
    __shared__ float red[ROW_WARPS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, pieces = a.in / 8;
    const int stride = gridDim.x * ROW_WARPS;
    int task = blockIdx.x * ROW_WARPS + warp;
    if (PDL)
        asm volatile("griddepcontrol.launch_dependents;");
    uint4 w[NR][NL];
    const uint4 *rows[NR];
    auto start_task = [&](int t) {  // round 0 of task t's rows
#pragma unroll
        for (int r = 0; r < NR; r++) {
            rows[r] = reinterpret_cast<const uint4 *>(a.W + (size_t)(t + r * a.out) * a.in);
#pragma unroll
            for (int i = 0; i < NL; i++) {
                int c = lane + i * 32;
                w[r][i] = c < pieces ? load_weights<false>(reinterpret_cast<const __nv_bfloat16 *>(rows[r] + c))
                                     : make_uint4(0, 0, 0, 0);
            }
        }
    };
    if (task < a.out)
        start_task(task);
    if (PDL)
        asm volatile("griddepcontrol.wait;" ::: "memory");

    // x into shared memory (RMSNorm: rmsnorm.cu's arithmetic, bf16(w * (x * r)))
    const uint4 *xg = reinterpret_cast<const uint4 *>(a.x);
    float ss = 0.0f;
    for (int c = threadIdx.x; c < pieces; c += ROW_WARPS * 32) {
        uint4 v = __ldcg(xg + c);
        xs[c] = v;
        if (NORM) {
            float f[8];
            unpack_bf16x8(f, v);
#pragma unroll
            for (int k = 0; k < 8; k++)
                ss += f[k] * f[k];
        }
    }
    if (NORM) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0)
            red[warp] = ss;
        __syncthreads();
        ss = 0.0f;
#pragma unroll
        for (int k = 0; k < ROW_WARPS; k++)
            ss += red[k];
        const float r = rsqrtf(ss / a.in + a.eps);
        const uint4 *nw = reinterpret_cast<const uint4 *>(a.norm_weight);
        for (int c = threadIdx.x; c < pieces; c += ROW_WARPS * 32) {
            float f[8], g[8];
            unpack_bf16x8(f, xs[c]);
            unpack_bf16x8(g, __ldg(nw + c));
#pragma unroll
            for (int k = 0; k < 8; k++)
                f[k] = g[k] * (f[k] * r);
            uint4 o;
            __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&o);
#pragma unroll
            for (int k = 0; k < 4; k++)
                h[k] = __floats2bfloat162_rn(f[2 * k], f[2 * k + 1]);
            xs[c] = o;
        }
    }
    __syncthreads();

    for (; task < a.out; task += stride) {
        float acc[NR] = {};
        row_dot<NR>(acc, w, rows, xs, pieces, lane);
        if (lane == 0) {
            if (NR == 2) {  // swiglu.cu's arithmetic on the bf16-rounded gate and up
                float gt = __bfloat162float(__float2bfloat16(acc[0])), up = __bfloat162float(__float2bfloat16(acc[NR - 1]));
                a.y[task] = __float2bfloat16(gt / (1.0f + expf(-gt)) * up);
            } else if (a.y_f32) {
                a.y_f32[task] = acc[0];
            } else {
                float v = acc[0];
                if (a.residual)  // read before the write, by this lane only: y may alias it
                    v += __bfloat162float(a.residual[task]);
                a.y[task] = __float2bfloat16(v);
            }
        }
        if (task + stride < a.out)
            start_task(task + stride);
    }
}

template <int NR, bool NORM> int launch_row(const RowArgs &a, int pdl, cudaStream_t s, Err *err)
{
    // as many blocks as stay resident (each walks rows)
    size_t shared = (size_t)a.in * 2;
    void (*k)(RowArgs) = pdl ? gemv_row_kernel<NR, NORM, true> : gemv_row_kernel<NR, NORM, false>;
    if (shared > 48 * 1024)
        CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared), err);
    int dev, sms, fit = 0;
    CUDA_CHECK(cudaGetDevice(&dev), err);
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), err);
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, k, ROW_WARPS * 32, shared), err);
    fit = fit > 0 ? fit : 1;
    int tasks_blocks = (a.out + ROW_WARPS - 1) / ROW_WARPS;
    int blocks = tasks_blocks < fit * sms ? tasks_blocks : fit * sms;
    CUDA_CHECK(launch_kernel(k, dim3(blocks), dim3(ROW_WARPS * 32), shared, s, pdl != 0, a), err);
    return 0;
}

}  // namespace

extern "C" int cuda_gemv_row(bf16_t *y, float *y_f32, const bf16_t *residual, const bf16_t *x, const bf16_t *W,
                             int out, int in, const bf16_t *norm_weight, float eps, int swiglu, int pdl,
                             GpuStream stream, Err *err)
{
    SHAPE_CHECK(x && W, err, "gemv row: NULL pointer");
    SHAPE_CHECK((y != NULL) != (y_f32 != NULL), err, "gemv row: give exactly one of the bf16 and fp32 outputs");
    SHAPE_CHECK(out >= 1 && in >= 8 && in % 8 == 0 && in <= 65536, err,
                "gemv row: out=%d in=%d (in a multiple of 8, at most 65536)", out, in);
    SHAPE_CHECK(is_aligned16(x) && is_aligned16(W), err, "gemv row: x and W must be 16-byte aligned");
    SHAPE_CHECK(!(y_f32 && residual), err, "gemv row: a residual goes with the bf16 output only");
    SHAPE_CHECK(!swiglu || (y && !residual), err, "gemv row: swiglu writes a bf16 output without a residual");
    SHAPE_CHECK(!norm_weight || is_aligned16(norm_weight), err, "gemv row: the norm weight must be 16-byte aligned");
    const char *yb = y ? (const char *)y : (const char *)y_f32;
    size_t y_bytes = (size_t)out * (y ? 2 : 4), x_bytes = (size_t)in * 2;
    SHAPE_CHECK(yb + y_bytes <= (const char *)x || (const char *)x + x_bytes <= yb, err, "gemv row: y overlaps x");
    RowArgs a = {W, x, residual, norm_weight, y, y_f32, out, in, swiglu, eps};
    cudaStream_t s = (cudaStream_t)stream;
    if (swiglu)
        return norm_weight ? launch_row<2, true>(a, pdl, s, err) : launch_row<2, false>(a, pdl, s, err);
    return norm_weight ? launch_row<1, true>(a, pdl, s, err) : launch_row<1, false>(a, pdl, s, err);
}
