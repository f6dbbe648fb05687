// Generation on one GPU (kernels/gen_cuda.cuh): weights as bf16 in four stacked matrices per
// layer, a per-slot KV cache, prefill through cuBLAS and flash attention, decode steps through
// cuBLAS (or the GEMV kernels) and split-KV decode attention, optionally replayed as CUDA graphs.
// With cfg.lt_autotune the decode products go through cublasLtMatmul with algorithms timed per
// shape and row count (see "cuBLASLt with tuned algorithms" below).
//
// Shapes: D = dim, Hq/Hkv = query and key-value heads, hd = head_dim, QD = Hq*hd, KD = Hkv*hd,
// F = hidden_dim, V = vocab, r = LoRA rank, S = max_batch slots, C = capacity (tokens per slot),
// P = max_prefill, R = max(P, S) rows of the activation buffers.
//
// Each layer's products are four "groups", each one matrix (out, in):
//   QKV  (QD + 2 KD, D)  rows of q_proj, then k_proj, then v_proj
//   O    (D, QD)
//   GU   (2F, D)         rows of gate_proj, then up_proj
//   DOWN (D, F)
// so a decode step runs four GEMVs per layer. An unmerged adapter is stacked the same way: the
// group's A is its targeted modules' A one under another (rank_g = r * targeted modules, in) and
// its B is block diagonal (out, rank_g), zero outside each module's block, so one GemvLora (or
// one pair of cuBLAS products) serves the group and exact zeros add nothing to the other rows.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <mutex>
#include <vector>

#include "attention.cuh"
#include "cuda_check.cuh"
#include "decode_attention.cuh"
#include "embedding.cuh"
#include "gemv.cuh"
#include "gen_cuda.cuh"
#include "rmsnorm.cuh"
#include "weights.cuh"

enum { G_QKV, G_O, G_GU, G_DOWN, G_COUNT };

// The modules of each group in stacking order (-1 ends a list).
static const int group_modules[G_COUNT][4] = {
    {PROJ_Q, PROJ_K, PROJ_V, -1}, {PROJ_O, -1, -1, -1}, {PROJ_GATE, PROJ_UP, -1, -1}, {PROJ_DOWN, -1, -1, -1}};

// Decode products on cuBLAS from this many rows on. Measured on an H200, Llama-3-8B shapes, whole
// decode steps in graphs: cuBLAS everywhere 5.20 ms at batch 1 and 5.28 ms at batch 4, the GEMV
// kernels 5.74 and 6.10 ms (any product moved to the GEMV costs ~17 us a layer in the step, though
// the GEMV wins alone in a loop with its weights partly in L2), so cuBLAS from batch 1.
#define DEFAULT_CUBLAS_MIN_BATCH 1
#define CUBLAS_WORKSPACE_BYTES (32u << 20)
#define PLAIN_DECODE_MAX_LEN 12000    // the plain decode attention keeps a slot's scores in shared memory (< 48 KiB)

typedef struct {
    bf16_t *attn_norm, *ffn_norm;    // (D)
    bf16_t *w[G_COUNT];              // stacked weights, see above
    bf16_t *lora_A[G_COUNT];         // (rank_g, in) unmerged adapter, NULL when the group has none
    bf16_t *lora_B[G_COUNT];         // (out, rank_g) block diagonal
    bf16_t *k_cache, *v_cache;       // (S, Hkv, C, hd)
} GenLayer;

// cfg.lt_autotune: the products of a decode step as cuBLASLt sees them (column-major), y (rows,
// out) = x (rows, in) W^T as D (out, rows) = op(A) B with A = W stored (in, out) ld in and op T,
// B = x stored (in, rows) ld in, C = D = y (out, rows) ld out. `which` numbers them: a group, or
// G_COUNT for lm_head.
#define LT_PRODUCTS (G_COUNT + 1)
#define LT_MAX_CANDIDATES 16
#define LT_ROUNDS 2                   // every candidate timed this many times (interleaved), best kept
#define LT_SPLIT_SOURCES 4            // the heuristic's first candidates also tried split along K ...
#define LT_SPLIT_MAX_ROWS 16          // ... for steps of at most this many rows

// One product at one row count: its layouts (fixed, so a captured graph's call stays valid) and
// the algorithm chosen for it.
typedef struct {
    int tuned;
    int use_lt;                      // 1: cublasLtMatmul with algo; 0: cublasGemmEx (as fast, or no algo)
    cublasLtMatrixLayout_t x_layout, y_layout;
    cublasLtMatmulAlgo_t algo;
    CudaGenLtChoice info;
} LtPlan;

struct CudaGen {
    ModelConfig c;
    CudaGenConfig cfg;
    int QD, KD, rows;                // rows = R
    int group_in[G_COUNT], group_out[G_COUNT];
    int lora_rank[G_COUNT];          // rank_g, 0 without an unmerged adapter on the group
    float lora_scale;
    int split_attention;             // decode attention by cuda_decode_attention (hd 64/128, <= 8 q per kv head)
    cudaStream_t stream;
    cublasHandle_t blas;
    std::vector<void *> *allocs;
    size_t device_bytes;

    bf16_t *embed, *lm_head, *final_norm;
    GenLayer *layers;                // (n_layers) host array
    float *inv_freq;                 // (hd / 2)

    // Activations, R rows unless said.
    bf16_t *x, *xn, *tmp;            // (R, D)
    float *rstd;                     // (R)
    bf16_t *qkv;                     // (R, QD + 2 KD)
    bf16_t *q, *att;                 // (R, QD)
    bf16_t *k, *v;                   // (P, KD) prefill's roped keys and values for flash attention
    float *lse;                      // (P, Hq)
    bf16_t *gu, *act;                // (R, 2F), (R, F)
    bf16_t *lora_u;                  // (R, max rank_g)
    bf16_t *x_last, *xn_last;        // (S, D) prefill's last tokens
    float *logits;                   // (S, V)

    // Prefill inputs on the device and their host staging.
    int32_t *d_tokens, *d_pos, *d_slot, *d_seq_start;   // (P)
    int32_t *d_cu, *d_last;                             // (S + 1), (S)
    int32_t *h_tokens, *h_pos, *h_slot, *h_seq_start, *h_cu, *h_last;
    // Decode inputs: ids, active, pos, lens, each (S) int32, one copy from pinned memory.
    int32_t *d_step, *h_step;
    cudaEvent_t step_copied;         // the last step's copy has read h_step
    int step_pending;

    void *gemv_ws, *attn_ws, *blas_ws;
    size_t gemv_ws_bytes, attn_ws_bytes;

    int *pos;                        // (S) host: positions each slot holds
    cudaGraphExec_t *graphs;         // (S + 1) by n, NULL until first used

    // cfg.lt_autotune only (else NULL): cuBLASLt handle, the one operation (op T, op N, fp32
    // compute), the weights' layouts by product, plans (S + 1, LT_PRODUCTS) by row count, and
    // whether row count n has been tuned (S + 1).
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t lt_op;
    cublasLtMatrixLayout_t lt_w[LT_PRODUCTS];
    LtPlan *lt_plans;
    int *lt_tuned;
    uint32_t lt_align;               // bytes every buffer of a decode product is aligned to (<= 256)
};

static int dev_alloc(CudaGen *g, void **p, size_t bytes, Err *err)
{
    *p = NULL;
    cudaError_t st = cudaMalloc(p, bytes ? bytes : 16);
    if (st != cudaSuccess) {
        *p = NULL;
        return err_set(err, "cuda gen: cannot allocate %.1f MiB on the device (%.1f MiB held): %s",
                       bytes / 1048576.0, g->device_bytes / 1048576.0, cudaGetErrorString(st));
    }
    g->allocs->push_back(*p);
    g->device_bytes += bytes;
    return 0;
}
#define ALLOC(ptr, count)                                                                         \
    do {                                                                                          \
        if (dev_alloc(g, (void **)&(ptr), (size_t)(count) * sizeof *(ptr), err) < 0)              \
            goto fail;                                                                            \
    } while (0)

void cuda_gen_free(CudaGen *g)
{
    if (!g)
        return;
    if (g->graphs)
        for (int n = 0; n <= g->cfg.max_batch; n++)
            if (g->graphs[n])
                cudaGraphExecDestroy(g->graphs[n]);
    free(g->graphs);
    if (g->lt_plans)
        for (size_t i = 0; i < (size_t)(g->cfg.max_batch + 1) * LT_PRODUCTS; i++) {
            if (g->lt_plans[i].x_layout)
                cublasLtMatrixLayoutDestroy(g->lt_plans[i].x_layout);
            if (g->lt_plans[i].y_layout)
                cublasLtMatrixLayoutDestroy(g->lt_plans[i].y_layout);
        }
    free(g->lt_plans);
    free(g->lt_tuned);
    for (int w = 0; w < LT_PRODUCTS; w++)
        if (g->lt_w[w])
            cublasLtMatrixLayoutDestroy(g->lt_w[w]);
    if (g->lt_op)
        cublasLtMatmulDescDestroy(g->lt_op);
    if (g->lt)
        cublasLtDestroy(g->lt);
    if (g->allocs)
        for (void *p : *g->allocs)
            cudaFree(p);
    delete g->allocs;
    if (g->h_step)
        cudaFreeHost(g->h_step);
    if (g->step_copied)
        cudaEventDestroy(g->step_copied);
    if (g->blas)
        cublasDestroy(g->blas);
    if (g->stream)
        cudaStreamDestroy(g->stream);
    free(g->layers);
    free(g->h_tokens);
    free(g->h_pos);
    free(g->h_slot);
    free(g->h_seq_start);
    free(g->h_cu);
    free(g->h_last);
    free(g->pos);
    free(g);
}

float *cuda_gen_logits(CudaGen *g) { return g->logits; }
GpuStream cuda_gen_stream(CudaGen *g) { return g->stream; }
size_t cuda_gen_device_bytes(const CudaGen *g) { return g->device_bytes; }
int cuda_gen_max_batch(const CudaGen *g) { return g->cfg.max_batch; }
int cuda_gen_capacity(const CudaGen *g) { return g->cfg.capacity; }
int cuda_gen_position(const CudaGen *g, int slot)
{
    return slot >= 0 && slot < g->cfg.max_batch ? g->pos[slot] : -1;
}

// ---- kernels ----------------------------------------------------------------------------------

// W (out, in) bf16 <- bf16(W + scale * B A), B (out, r) and A (r, in) fp32: the adapter merged with
// one rounding. Grid (ceil(in / 256), out): a block shares one row of B.
__global__ void merge_lora_kernel(__nv_bfloat16 *W, const float *A, const float *B, int out, int in, int r,
                                  float scale)
{
    int o = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= in)
        return;
    float s = 0.0f;
    for (int k = 0; k < r; k++)
        s += B[(size_t)o * r + k] * A[(size_t)k * in + i];
    size_t at = (size_t)o * in + i;
    W[at] = __float2bfloat16(__bfloat162float(W[at]) + s * scale);
}

// n values offset + scale * U(-sqrt 3, sqrt 3) (standard deviation `scale`) from a counter hash.
__global__ void fill_random_kernel(__nv_bfloat16 *p, size_t n, uint64_t seed, float scale, float offset)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    float u = (float)(z >> 40) * (1.0f / 16777216.0f);   // [0, 1)
    p[i] = __float2bfloat16(offset + scale * 1.7320508f * (2.0f * u - 1.0f));
}

// From qkv (T, QD + 2 KD) rows: q (T, QD) rotated, k rotated, v as is; k and v stored in slot's
// cache at position pos[t] (rows with active[t] == 0 store nothing), and also into k_out, v_out
// (T, KD) when given (prefill's flash attention reads them). slot NULL: row t is slot t. The
// rotation is rope.cu's (fp32 sincosf of (float)pos * inv_freq, one bf16 rounding).
__global__ void qkv_rope_store_kernel(__nv_bfloat16 *q_out, __nv_bfloat16 *k_out, __nv_bfloat16 *v_out,
                                      __nv_bfloat16 *k_cache, __nv_bfloat16 *v_cache, const __nv_bfloat16 *qkv,
                                      const int32_t *pos, const int32_t *slot, const int32_t *active,
                                      const float *inv_freq, int n_heads, int n_kv_heads, int head_dim, int capacity)
{
    int t = blockIdx.x, half = head_dim / 2;
    int QD = n_heads * head_dim, KD = n_kv_heads * head_dim;
    bool store = !active || active[t];
    int p = pos[t], s = slot ? slot[t] : t;
    const __nv_bfloat16 *row = qkv + (size_t)t * (QD + 2 * KD);
    int n_rot = (n_heads + n_kv_heads) * half, n_all = n_rot + KD;
    for (int idx = threadIdx.x; idx < n_all; idx += blockDim.x) {
        if (idx < n_rot) {
            int h = idx / half, i = idx % half;
            bool is_q = h < n_heads;
            int col = h * head_dim + i;   // k heads follow q heads in the row
            float sn, cs;
            sincosf((float)p * inv_freq[i], &sn, &cs);
            float x1 = __bfloat162float(row[col]), x2 = __bfloat162float(row[col + half]);
            __nv_bfloat16 a = __float2bfloat16(x1 * cs - x2 * sn), b = __float2bfloat16(x2 * cs + x1 * sn);
            if (is_q) {
                q_out[(size_t)t * QD + col] = a;
                q_out[(size_t)t * QD + col + half] = b;
            } else {
                int j = h - n_heads, kcol = j * head_dim + i;
                if (k_out) {
                    k_out[(size_t)t * KD + kcol] = a;
                    k_out[(size_t)t * KD + kcol + half] = b;
                }
                if (store) {
                    size_t at = (((size_t)s * n_kv_heads + j) * capacity + p) * head_dim + i;
                    k_cache[at] = a;
                    k_cache[at + half] = b;
                }
            }
        } else {
            int e = idx - n_rot, j = e / head_dim, d = e % head_dim;
            __nv_bfloat16 val = row[QD + KD + e];
            if (v_out)
                v_out[(size_t)t * KD + e] = val;
            if (store)
                v_cache[(((size_t)s * n_kv_heads + j) * capacity + p) * head_dim + d] = val;
        }
    }
}

// act (T, F) = silu(gate) * up from gu (T, 2F) rows [gate | up]; swiglu.cu's arithmetic.
__global__ void swiglu_stacked_kernel(__nv_bfloat16 *act, const __nv_bfloat16 *gu, int T, int F)
{
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)T * F)
        return;
    size_t t = idx / F, i = idx % F;
    float gt = __bfloat162float(gu[t * 2 * F + i]), up = __bfloat162float(gu[t * 2 * F + F + i]);
    act[idx] = __float2bfloat16(gt / (1.0f + expf(-gt)) * up);
}

// x (n) += y (n), bf16 storage, fp32 sum.
__global__ void add_kernel(__nv_bfloat16 *x, const __nv_bfloat16 *y, size_t n)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        x[i] = __float2bfloat16(__bfloat162float(x[i]) + __bfloat162float(y[i]));
}

// out (n, D) = x rows idx[0..n).
__global__ void gather_rows_kernel(__nv_bfloat16 *out, const __nv_bfloat16 *x, const int32_t *idx, int D)
{
    const __nv_bfloat16 *src = x + (size_t)idx[blockIdx.x] * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        out[(size_t)blockIdx.x * D + i] = src[i];
}

// Decode attention for any head_dim <= 128 (the tiny models): one block of 128 threads per (row,
// query head), fp32, the row's scores in shared memory (lens[b] floats). As the CPU twin: scores
// q.k / sqrt(hd), max-subtracted exp, weights / sum applied to v. lens 0 gives zeros.
__global__ void decode_attention_plain_kernel(__nv_bfloat16 *out, const __nv_bfloat16 *q,
                                              const __nv_bfloat16 *k_cache, const __nv_bfloat16 *v_cache,
                                              const int32_t *lens, int n_heads, int n_kv_heads, int head_dim,
                                              int capacity, float scale)
{
    extern __shared__ float scores[];
    __shared__ float qs[128];
    int h = blockIdx.x, b = blockIdx.y, len = lens[b];
    int j = h / (n_heads / n_kv_heads);
    const __nv_bfloat16 *qh = q + ((size_t)b * n_heads + h) * head_dim;
    const __nv_bfloat16 *kh = k_cache + ((size_t)b * n_kv_heads + j) * capacity * head_dim;
    const __nv_bfloat16 *vh = v_cache + ((size_t)b * n_kv_heads + j) * capacity * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x)
        qs[d] = __bfloat162float(qh[d]);
    __syncthreads();
    float m = -INFINITY;
    for (int p = threadIdx.x; p < len; p += blockDim.x) {
        float s = 0.0f;
        for (int d = 0; d < head_dim; d++)
            s += qs[d] * __bfloat162float(kh[(size_t)p * head_dim + d]);
        scores[p] = s * scale;
        m = fmaxf(m, scores[p]);
    }
    m = block_max(m);
    float sum = 0.0f;
    for (int p = threadIdx.x; p < len; p += blockDim.x) {
        scores[p] = expf(scores[p] - m);
        sum += scores[p];
    }
    sum = block_sum(sum);   // its barriers also publish scores[]
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int p = 0; p < len; p++)
            acc += scores[p] * __bfloat162float(vh[(size_t)p * head_dim + d]);
        out[((size_t)b * n_heads + h) * head_dim + d] = __float2bfloat16(len > 0 ? acc / sum : 0.0f);
    }
}

// Keeps the GPU busy for ns nanoseconds (one thread), so that the launches queued behind it run back
// to back: a timing after it measures the device, not the host's launch rate.
__global__ void spin_kernel(uint64_t ns)
{
    uint64_t t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}

// ---- products ---------------------------------------------------------------------------------

// Row-major C (M, N) = alpha A (M, K) B^T + beta C, B stored (N, K); bf16 in, fp32 compute, C bf16
// or fp32 (c_type).
static int gemm_nt(CudaGen *g, int M, int N, int K, float alpha, const bf16_t *A, const bf16_t *B, float beta,
                   void *C, cudaDataType c_type, Err *err)
{
    CUBLAS_CHECK(cublasGemmEx(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, B, CUDA_R_16BF, K, A, CUDA_R_16BF,
                              K, &beta, C, c_type, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 err);
    return 0;
}

// Product `which` (a group, or G_COUNT for lm_head) of a decode step of `rows` rows by cuBLAS?
static bool use_cublas(const CudaGen *g, int rows, int which)
{
    int min_batch = g->cfg.cublas_min_batch > 0 ? g->cfg.cublas_min_batch : DEFAULT_CUBLAS_MIN_BATCH;
    int mask = g->cfg.gemv_products ? g->cfg.gemv_products : 31;
    return rows >= min_batch || !(mask & (1 << which));
}

enum { PATH_GEMV, PATH_CUBLAS, PATH_LT };

// How product `which` of a decode step of `rows` rows runs: the GEMV kernels (which need whole
// 16-byte loads of x's rows), cublasGemmEx, or cublasLtMatmul with a tuned algorithm.
static int decode_path(const CudaGen *g, int rows, int which)
{
    int in = which == G_COUNT ? g->c.dim : g->group_in[which];
    if (!use_cublas(g, rows, which) && in % 8 == 0)
        return PATH_GEMV;
    return g->cfg.lt_autotune ? PATH_LT : PATH_CUBLAS;
}

// ---- cuBLASLt with tuned algorithms (cfg.lt_autotune) -------------------------------------------

static const char *const lt_product_names[LT_PRODUCTS] = {"qkv", "o", "gate|up", "down", "lm_head"};

// Tuning results shared by every engine of the process: two engines alike (graphs on and off,
// the tests' twins) run the same kernels, so give the same bits, and each shape is tuned once.
// algo is the fastest cuBLASLt candidate (valid when info.lt_us >= 0); each engine decides from
// info's times whether to use it (cfg.lt_autotune 2 always does).
struct LtCacheEntry {
    int device, out, in, rows, f32_out, add;
    uint32_t align;
    cublasLtMatmulAlgo_t algo;
    CudaGenLtChoice info;
};
static std::mutex lt_cache_lock;
static std::vector<LtCacheEntry> lt_cache;

static bool lt_same_key(const LtCacheEntry &a, const LtCacheEntry &b)
{
    return a.device == b.device && a.out == b.out && a.in == b.in && a.rows == b.rows && a.f32_out == b.f32_out &&
           a.add == b.add && a.align == b.align;
}

// *e's choice from the cache: true when found.
static bool lt_cache_find(LtCacheEntry *e)
{
    std::lock_guard<std::mutex> hold(lt_cache_lock);
    for (const LtCacheEntry &c : lt_cache)
        if (lt_same_key(c, *e)) {
            *e = c;
            return true;
        }
    return false;
}

// Keep *e's choice, unless another engine kept one for the same key meanwhile: then *e becomes that
// one (the first choice wins, so engines alike still agree).
static void lt_cache_keep(LtCacheEntry *e)
{
    std::lock_guard<std::mutex> hold(lt_cache_lock);
    for (const LtCacheEntry &c : lt_cache)
        if (lt_same_key(c, *e)) {
            *e = c;
            return;
        }
    lt_cache.push_back(*e);
}

// One decode product's dimensions and buffers. x: the step's input (rows, in); scratch: where
// tuning may write (rows, out), a buffer the step overwrites anyway (o and down add into the
// residual stream g->x in the step, so their tuning adds into g->tmp instead).
typedef struct {
    int in, out, n_weights, f32_out, add;
    const bf16_t *x;
    void *scratch;
} LtShape;

static LtShape lt_shape(const CudaGen *g, int which)
{
    LtShape s;
    bool head = which == G_COUNT;
    s.in = head ? g->c.dim : g->group_in[which];
    s.out = head ? g->c.vocab_size : g->group_out[which];
    s.n_weights = head ? 1 : g->c.n_layers;
    s.f32_out = head;
    s.add = which == G_O || which == G_DOWN;
    s.x = which == G_O ? g->att : which == G_DOWN ? g->act : g->xn;
    s.scratch = which == G_QKV ? (void *)g->qkv
                : which == G_GU ? (void *)g->gu
                : head          ? (void *)g->logits
                                : (void *)g->tmp;
    return s;
}

static const bf16_t *lt_weight(const CudaGen *g, int which, int layer)
{
    return which == G_COUNT ? g->lm_head : g->layers[layer].w[which];
}

static LtPlan *lt_plan(const CudaGen *g, int rows, int which)
{
    return &g->lt_plans[(size_t)rows * LT_PRODUCTS + which];
}

// y = x W^T (+ beta y) through cuBLASLt with `algo`, on the engine's cuBLAS workspace (a fixed
// pointer, so the call can be captured).
static cublasStatus_t lt_matmul(CudaGen *g, int which, const LtPlan *p, const cublasLtMatmulAlgo_t *algo,
                                const bf16_t *W, const bf16_t *x, void *y, float beta)
{
    float alpha = 1.0f;
    return cublasLtMatmul(g->lt, g->lt_op, &alpha, W, g->lt_w[which], x, p->x_layout, &beta, y, p->y_layout, y,
                          p->y_layout, algo, g->blas_ws, CUBLAS_WORKSPACE_BYTES, g->stream);
}

// The operation, the weights' layouts, the plan tables and the buffers' alignment (after every
// allocation of gen_alloc).
static int lt_init(CudaGen *g, Err *err)
{
    int S = g->cfg.max_batch;
    CUBLAS_CHECK(cublasLtCreate(&g->lt), err);
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&g->lt_op, CUBLAS_COMPUTE_32F, CUDA_R_32F), err);
    cublasOperation_t op_w = CUBLAS_OP_T, op_x = CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(g->lt_op, CUBLASLT_MATMUL_DESC_TRANSA, &op_w, sizeof op_w), err);
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(g->lt_op, CUBLASLT_MATMUL_DESC_TRANSB, &op_x, sizeof op_x), err);
    for (int w = 0; w < LT_PRODUCTS; w++) {
        LtShape s = lt_shape(g, w);
        CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&g->lt_w[w], CUDA_R_16BF, (uint64_t)s.in, (uint64_t)s.out, s.in), err);
    }
    g->lt_plans = (LtPlan *)calloc((size_t)(S + 1) * LT_PRODUCTS, sizeof(LtPlan));
    g->lt_tuned = (int *)calloc(S + 1, sizeof(int));
    if (!g->lt_plans || !g->lt_tuned)
        return err_set(err, "out of memory");
    // The heuristic assumes 256-byte aligned A, B, C, D unless told less: say what holds for every
    // pointer a decode product gets (rows 0.. of whole allocations: cudaMalloc's alignment).
    uintptr_t bits = (uintptr_t)g->lm_head | (uintptr_t)g->xn | (uintptr_t)g->att | (uintptr_t)g->act |
                     (uintptr_t)g->qkv | (uintptr_t)g->gu | (uintptr_t)g->x | (uintptr_t)g->tmp |
                     (uintptr_t)g->logits;
    for (int l = 0; l < g->c.n_layers; l++)
        for (int gi = 0; gi < G_COUNT; gi++)
            bits |= (uintptr_t)g->layers[l].w[gi];
    uint32_t align = 256;
    while (align > 2 && (bits & (align - 1)))
        align >>= 1;
    g->lt_align = align;
    return 0;
}

// Microseconds per product for candidate `algo` (NULL: cublasGemmEx): one untimed call, then
// reps calls timed by events, each on the next layer's weights (*turn rotates through all calls,
// so a weight is read again only after the other layers' weights, far more than L2 holds, went
// through: it comes from HBM, as in a step). The timed calls queue behind a spin kernel, so they
// run back to back as in a graph. -1: the candidate does not run; -2 with err set: a CUDA failure.
static double lt_time(CudaGen *g, int which, int rows, const LtPlan *p, const cublasLtMatmulAlgo_t *algo, int reps,
                      int *turn, cudaEvent_t e0, cudaEvent_t e1, Err *err)
{
    LtShape s = lt_shape(g, which);
    float alpha = 1.0f, beta = s.add ? 1.0f : 0.0f;
    auto call = [&]() -> cublasStatus_t {
        const bf16_t *W = lt_weight(g, which, *turn % s.n_weights);
        ++*turn;
        if (algo)
            return lt_matmul(g, which, p, algo, W, s.x, s.scratch, beta);
        return cublasGemmEx(g->blas, CUBLAS_OP_T, CUBLAS_OP_N, s.out, rows, s.in, &alpha, W, CUDA_R_16BF, s.in, s.x,
                            CUDA_R_16BF, s.in, &beta, s.scratch, s.f32_out ? CUDA_R_32F : CUDA_R_16BF, s.out,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    };
    if (call() != CUBLAS_STATUS_SUCCESS)
        return -1;
    // 40 us a call is far more than a launch takes on the host.
    spin_kernel<<<1, 1, 0, g->stream>>>(50000u + 40000u * (uint64_t)reps);
    cudaError_t st = cudaGetLastError();
    if (st == cudaSuccess)
        st = cudaEventRecord(e0, g->stream);
    for (int i = 0; i < reps && st == cudaSuccess; i++)
        if (call() != CUBLAS_STATUS_SUCCESS)
            return -1;
    float ms = 0.0f;
    if (st == cudaSuccess)
        st = cudaEventRecord(e1, g->stream);
    if (st == cudaSuccess)
        st = cudaEventSynchronize(e1);
    if (st == cudaSuccess)
        st = cudaEventElapsedTime(&ms, e0, e1);
    if (st != cudaSuccess) {
        err_set(err, "cuda gen: timing %s (%d rows): %s", lt_product_names[which], rows, cudaGetErrorString(st));
        return -2;
    }
    return ms * 1e3 / reps;
}

// One configuration value of algo (every one read here is 4 bytes), -1 when unreadable.
static int lt_algo_attr(const cublasLtMatmulAlgo_t *algo, cublasLtMatmulAlgoConfigAttributes_t attr)
{
    uint32_t v = 0;
    size_t written = 0;
    return cublasLtMatmulAlgoConfigGetAttribute(algo, attr, &v, sizeof v, &written) == CUBLAS_STATUS_SUCCESS
               ? (int)v
               : -1;
}

// Split-K variants of the first candidates that run unsplit, appended to *cand: the same algorithm
// with K cut in 2, 4, 8, 16 parts, reduced in fp32 in the workspace (or another scheme it offers),
// each accepted by cublasLtMatmulAlgoCheck within the workspace. At a few rows a product of few
// output tiles (o and down: 4096 outputs) otherwise leaves most SMs without a tile.
static void lt_add_splits(CudaGen *g, int which, const LtPlan *p, std::vector<cublasLtMatmulHeuristicResult_t> *cand)
{
    static const int32_t splits[] = {2, 4, 8, 16};
    size_t n_heuristic = cand->size();
    for (size_t i = 0; i < n_heuristic && i < LT_SPLIT_SOURCES; i++) {
        cublasLtMatmulHeuristicResult_t base = (*cand)[i];
        int32_t support = 0, splitk = 0;
        uint32_t mask = 0;
        size_t written = 0;
        if (base.state != CUBLAS_STATUS_SUCCESS ||
            cublasLtMatmulAlgoCapGetAttribute(&base.algo, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &support, sizeof support,
                                              &written) != CUBLAS_STATUS_SUCCESS ||
            !support ||
            cublasLtMatmulAlgoCapGetAttribute(&base.algo, CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK, &mask, sizeof mask,
                                              &written) != CUBLAS_STATUS_SUCCESS ||
            cublasLtMatmulAlgoConfigGetAttribute(&base.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof splitk,
                                                 &written) != CUBLAS_STATUS_SUCCESS ||
            splitk != 1)
            continue;
        uint32_t scheme = mask & CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE  ? CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE
                          : mask & CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE ? CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE
                          : mask & CUBLASLT_REDUCTION_SCHEME_INPLACE     ? CUBLASLT_REDUCTION_SCHEME_INPLACE
                                                                         : CUBLASLT_REDUCTION_SCHEME_NONE;
        if (scheme == CUBLASLT_REDUCTION_SCHEME_NONE)
            continue;
        for (int32_t k : splits) {
            cublasLtMatmulHeuristicResult_t r = base, check;
            memset(&check, 0, sizeof check);
            if (cublasLtMatmulAlgoConfigSetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &k, sizeof k) !=
                    CUBLAS_STATUS_SUCCESS ||
                cublasLtMatmulAlgoConfigSetAttribute(&r.algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme,
                                                     sizeof scheme) != CUBLAS_STATUS_SUCCESS ||
                cublasLtMatmulAlgoCheck(g->lt, g->lt_op, g->lt_w[which], p->x_layout, p->y_layout, p->y_layout, &r.algo,
                                        &check) != CUBLAS_STATUS_SUCCESS ||
                check.workspaceSize > CUBLAS_WORKSPACE_BYTES)
                continue;
            r.workspaceSize = check.workspaceSize;
            bool seen = false;   // the heuristic may have offered this configuration already
            for (const cublasLtMatmulHeuristicResult_t &c : *cand)
                seen = seen || !memcmp(&c.algo, &r.algo, sizeof r.algo);
            if (!seen)
                cand->push_back(r);
        }
    }
}

// Ask the heuristic for candidates for product `which` at `rows` rows (and split-K variants of
// them at few rows), time them and cublasGemmEx: p->algo the fastest candidate, p->info every
// time (use_lt left to lt_tune).
static int lt_tune_product(CudaGen *g, int rows, int which, LtPlan *p, Err *err)
{
    LtShape s = lt_shape(g, which);
    std::vector<cublasLtMatmulHeuristicResult_t> cand;
    {
        cublasLtMatmulHeuristicResult_t found_algos[LT_MAX_CANDIDATES];
        memset(found_algos, 0, sizeof found_algos);
        int found = 0;
        cublasLtMatmulPreference_t pref = NULL;
        CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref), err);
        uint64_t ws = CUBLAS_WORKSPACE_BYTES;
        uint32_t align = g->lt_align;
        const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
        cublasStatus_t st =
            cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
        for (int i = 0; i < 4 && st == CUBLAS_STATUS_SUCCESS; i++)
            st = cublasLtMatmulPreferenceSetAttribute(pref, align_attr[i], &align, sizeof align);
        if (st == CUBLAS_STATUS_SUCCESS) {
            st = cublasLtMatmulAlgoGetHeuristic(g->lt, g->lt_op, g->lt_w[which], p->x_layout, p->y_layout,
                                                p->y_layout, pref, LT_MAX_CANDIDATES, found_algos, &found);
            if (st == CUBLAS_STATUS_NOT_SUPPORTED)   // no cuBLASLt algorithm: cublasGemmEx stays
                st = CUBLAS_STATUS_SUCCESS, found = 0;
        }
        cublasLtMatmulPreferenceDestroy(pref);
        if (st != CUBLAS_STATUS_SUCCESS)
            return err_set(err, "cuda gen: cuBLASLt heuristic for %s (%d x %d, %d rows): %s", lt_product_names[which],
                           s.out, s.in, rows, cublasGetStatusString(st));
        for (int i = 0; i < found && i < LT_MAX_CANDIDATES; i++)
            if (found_algos[i].state == CUBLAS_STATUS_SUCCESS)
                cand.push_back(found_algos[i]);
        if (rows <= LT_SPLIT_MAX_ROWS)
            lt_add_splits(g, which, p, &cand);
    }
    int found = (int)cand.size();
    cudaEvent_t e0 = NULL, e1 = NULL;
    if (cudaEventCreate(&e0) != cudaSuccess || cudaEventCreate(&e1) != cudaSuccess) {
        if (e0)
            cudaEventDestroy(e0);
        return err_set(err, "cuda gen: cannot create timing events");
    }
    // [0] is cublasGemmEx, [1 + i] candidate i; < 0: not run or failed.
    std::vector<double> best(1 + found, -1.0);
    std::vector<bool> dead(1 + found, false);
    int reps = s.n_weights < 4 ? 4 : s.n_weights > 16 ? 16 : s.n_weights, turn = 0, rc = 0;
    for (int round = 0; round < LT_ROUNDS && rc == 0; round++)
        for (int i = 0; i <= found && rc == 0; i++) {
            if (dead[i])
                continue;
            double us = lt_time(g, which, rows, p, i ? &cand[i - 1].algo : NULL, reps, &turn, e0, e1, err);
            if (us == -2.0) {
                rc = -1;
            } else if (us < 0) {   // a candidate that does not run is out for good
                cudaGetLastError();
                dead[i] = true, best[i] = -1.0;
            } else if (best[i] < 0 || us < best[i]) {
                best[i] = us;
            }
        }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    if (rc < 0)
        return -1;
    if (dead[0] || best[0] < 0)
        return err_set(err, "cuda gen: cublasGemmEx fails on %s (%d x %d, %d rows)", lt_product_names[which], s.out,
                       s.in, rows);
    int pick = -1, live = 0;
    for (int i = 1; i <= found; i++)
        if (!dead[i] && best[i] >= 0) {
            live++;
            if (pick < 0 || best[i] < best[pick + 1])
                pick = i - 1;
        }
    CudaGenLtChoice *info = &p->info;
    memset(info, 0, sizeof *info);
    info->product = lt_product_names[which];
    info->out = s.out, info->in = s.in, info->rows = rows, info->candidates = live;
    info->gemmex_us = best[0];
    info->lt_us = pick >= 0 ? best[pick + 1] : -1.0;
    info->algo_id = info->tile_id = info->splitk = info->reduction = info->stages = -1;
    if (pick >= 0) {
        p->algo = cand[pick].algo;
        info->workspace = cand[pick].workspaceSize;
        info->algo_id = lt_algo_attr(&p->algo, CUBLASLT_ALGO_CONFIG_ID);
        info->tile_id = lt_algo_attr(&p->algo, CUBLASLT_ALGO_CONFIG_TILE_ID);
        info->splitk = lt_algo_attr(&p->algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM);
        info->reduction = lt_algo_attr(&p->algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME);
        info->stages = lt_algo_attr(&p->algo, CUBLASLT_ALGO_CONFIG_STAGES_ID);
    }
    return 0;
}

// Plans for every product of a step of `rows` rows that runs on cuBLAS: from the process's cache
// or tuned now. Called before the step's first run (never inside a capture); tuning writes only
// scratch buffers (see LtShape), on the engine's stream.
static int lt_tune(CudaGen *g, int rows, Err *err)
{
    if (g->lt_tuned[rows])
        return 0;
    int device = 0;
    CUDA_CHECK(cudaGetDevice(&device), err);
    for (int which = 0; which < LT_PRODUCTS; which++) {
        if (decode_path(g, rows, which) != PATH_LT)
            continue;
        LtPlan *p = lt_plan(g, rows, which);
        LtShape s = lt_shape(g, which);
        if (!p->x_layout)
            CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->x_layout, CUDA_R_16BF, (uint64_t)s.in, (uint64_t)rows, s.in),
                         err);
        if (!p->y_layout)
            CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->y_layout, s.f32_out ? CUDA_R_32F : CUDA_R_16BF, (uint64_t)s.out,
                                                    (uint64_t)rows, s.out),
                         err);
        LtCacheEntry e;
        memset(&e, 0, sizeof e);
        e.device = device, e.out = s.out, e.in = s.in, e.rows = rows, e.f32_out = s.f32_out, e.add = s.add;
        e.align = g->lt_align;
        if (!lt_cache_find(&e)) {
            if (lt_tune_product(g, rows, which, p, err) < 0)
                return -1;
            e.algo = p->algo, e.info = p->info;
            lt_cache_keep(&e);
        }
        p->algo = e.algo, p->info = e.info;
        p->use_lt = e.info.lt_us >= 0 && (g->cfg.lt_autotune == 2 || e.info.lt_us < e.info.gemmex_us);
        p->info.use_lt = p->use_lt;
        p->tuned = 1;
    }
    g->lt_tuned[rows] = 1;
    return 0;
}

int cuda_gen_lt_choices(const CudaGen *g, int rows, CudaGenLtChoice out[5])
{
    if (!g->lt_tuned || rows < 1 || rows > g->cfg.max_batch || !g->lt_tuned[rows])
        return 0;
    int k = 0;
    for (int which = 0; which < LT_PRODUCTS; which++) {
        const LtPlan *p = lt_plan(g, rows, which);
        if (p->tuned)
            out[k++] = p->info;
    }
    return k;
}

// The base product y = x W^T + beta y of `which` by `path` (PATH_CUBLAS or PATH_LT): a tuned
// cuBLASLt plan when there is one that beat cublasGemmEx, else cublasGemmEx.
static int base_product(CudaGen *g, int path, int rows, int which, const bf16_t *W, const bf16_t *x, void *y,
                        float beta, Err *err)
{
    const LtPlan *p = path == PATH_LT && g->lt_plans ? lt_plan(g, rows, which) : NULL;
    if (p && p->tuned && p->use_lt) {
        CUBLAS_CHECK(lt_matmul(g, which, p, &p->algo, W, x, y, beta), err);
        return 0;
    }
    bool head = which == G_COUNT;
    int in = head ? g->c.dim : g->group_in[which], out = head ? g->c.vocab_size : g->group_out[which];
    return gemm_nt(g, rows, out, in, 1.0f, x, W, beta, y, head ? CUDA_R_32F : CUDA_R_16BF, err);
}

// y (rows, out) = x (rows, in) W^T [+ the adapter] for group gi of layer l. With add_to_y the
// result is added to y (the residual stream): cuBLAS through beta = 1, the GEMV in its epilogue
// (cuda_gemv_ex's residual), or through g->tmp and an add kernel when cfg.unfused_residual asks.
// path: PATH_GEMV, PATH_CUBLAS or PATH_LT (decode_path; prefill: PATH_CUBLAS).
static int product(CudaGen *g, int l, int gi, bf16_t *y, const bf16_t *x, int rows, int add_to_y, int path, Err *err)
{
    const GenLayer *L = &g->layers[l];
    int in = g->group_in[gi], out = g->group_out[gi], rank = g->lora_rank[gi];
    if (path != PATH_GEMV || in % 8) {   // the GEMV needs whole 16-byte loads of x's rows
        if (base_product(g, path == PATH_GEMV ? PATH_CUBLAS : path, rows, gi, L->w[gi], x, y, add_to_y ? 1.0f : 0.0f,
                         err) < 0)
            return -1;
        if (rank && (gemm_nt(g, rows, rank, in, 1.0f, x, L->lora_A[gi], 0.0f, g->lora_u, CUDA_R_16BF, err) < 0 ||
                     gemm_nt(g, rows, out, rank, g->lora_scale, g->lora_u, L->lora_B[gi], 1.0f, y, CUDA_R_16BF,
                             err) < 0))
            return -1;
        return 0;
    }
    GemvLora lora = {L->lora_A[gi], L->lora_B[gi], rank, g->lora_scale};
    bool fused = add_to_y && !g->cfg.unfused_residual;
    bf16_t *dst = add_to_y && !fused ? g->tmp : y;
    if (cuda_gemv_ex(dst, NULL, fused ? y : NULL, x, L->w[gi], rows, out, in, rank ? &lora : NULL, g->gemv_ws,
                     g->gemv_ws_bytes, NULL, g->cfg.gemv_pdl != 0, g->stream, err) < 0)
        return -1;
    if (fused)
        return 0;
    if (add_to_y) {
        size_t n = (size_t)rows * out;
        add_kernel<<<ceil_div(n, 256), 256, 0, g->stream>>>(y, g->tmp, n);
        LAUNCH_CHECK(err);
    }
    return 0;
}

// ---- creation ---------------------------------------------------------------------------------

static int check_config(const ModelConfig *c, const CudaGenConfig *cfg, Err *err)
{
    if (cfg->max_batch < 1 || cfg->capacity < 1 || cfg->max_prefill < 1)
        return err_set(err, "cuda gen: max_batch %d, capacity %d and max_prefill %d must each be at least 1",
                       cfg->max_batch, cfg->capacity, cfg->max_prefill);
    if (c->max_seq_len > 0 && cfg->capacity > c->max_seq_len)
        return err_set(err, "cuda gen: capacity %d exceeds the model's context (%d)", cfg->capacity, c->max_seq_len);
    if (c->sliding_window > 0 && c->sliding_window < cfg->capacity)
        return err_set(err, "cuda gen: a sliding window (%d) shorter than the capacity (%d) is not supported",
                       c->sliding_window, cfg->capacity);
    if (c->head_dim % 2 || c->head_dim > ATTENTION_PLAIN_MAX_HEAD_DIM || c->head_dim < 2)
        return err_set(err, "cuda gen: head_dim %d is not supported (even, at most %d)", c->head_dim,
                       ATTENTION_PLAIN_MAX_HEAD_DIM);
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        cudaGetLastError();
        return err_set(err, "cuda gen: no CUDA device");
    }
    return 0;
}

// Everything but the weights' values: buffers, stream, handles. lora_r, lora_targets: the
// unmerged adapter's rank and modules (0, 0 when none or merged).
static CudaGen *gen_alloc(const ModelConfig *c, const CudaGenConfig *cfg, int lora_r, unsigned lora_targets,
                          float lora_scale, Err *err)
{
    if (check_config(c, cfg, err) < 0)
        return NULL;
    CudaGen *g = (CudaGen *)calloc(1, sizeof *g);
    if (!g)
        return err_set(err, "out of memory"), (CudaGen *)NULL;
    g->allocs = new std::vector<void *>();
    g->c = *c;
    g->cfg = *cfg;
    int S = cfg->max_batch, Cap = cfg->capacity, P = cfg->max_prefill, L = c->n_layers;
    size_t D = c->dim, F = c->hidden_dim, V = c->vocab_size, hd = c->head_dim;
    g->QD = c->n_heads * c->head_dim;
    g->KD = c->n_kv_heads * c->head_dim;
    g->rows = P > S ? P : S;
    size_t R = g->rows, QD = g->QD, KD = g->KD;
    g->group_in[G_QKV] = (int)D, g->group_out[G_QKV] = (int)(QD + 2 * KD);
    g->group_in[G_O] = (int)QD, g->group_out[G_O] = (int)D;
    g->group_in[G_GU] = (int)D, g->group_out[G_GU] = (int)(2 * F);
    g->group_in[G_DOWN] = (int)F, g->group_out[G_DOWN] = (int)D;
    g->lora_scale = lora_scale;
    int max_rank = 0;
    for (int gi = 0; gi < G_COUNT; gi++) {
        for (int k = 0; group_modules[gi][k] >= 0; k++)
            if (lora_targets & (1u << group_modules[gi][k]))
                g->lora_rank[gi] += lora_r;
        if (g->lora_rank[gi] > 256) {
            err_set(err, "cuda gen: an unmerged adapter of rank %d stacks to rank %d on one product (at most 256); "
                    "merge it instead", lora_r, g->lora_rank[gi]);
            goto fail;
        }
        if (g->lora_rank[gi] > max_rank)
            max_rank = g->lora_rank[gi];
    }
    g->split_attention = (hd == 64 || hd == 128) && c->n_heads / c->n_kv_heads <= 8;
    if (!g->split_attention && Cap > PLAIN_DECODE_MAX_LEN) {
        err_set(err, "cuda gen: capacity %d exceeds %d for head_dim %d with %d query heads per kv head", Cap,
                PLAIN_DECODE_MAX_LEN, c->head_dim, c->n_heads / c->n_kv_heads);
        goto fail;
    }
    if (cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking) != cudaSuccess ||
        cublasCreate(&g->blas) != CUBLAS_STATUS_SUCCESS || cublasSetStream(g->blas, g->stream) != CUBLAS_STATUS_SUCCESS ||
        cudaEventCreateWithFlags(&g->step_copied, cudaEventDisableTiming) != cudaSuccess) {
        err_set(err, "cuda gen: cannot create a stream, an event and a cuBLAS handle");
        goto fail;
    }
    g->layers = (GenLayer *)calloc(L, sizeof *g->layers);
    g->h_tokens = (int32_t *)malloc(P * sizeof(int32_t));
    g->h_pos = (int32_t *)malloc(P * sizeof(int32_t));
    g->h_slot = (int32_t *)malloc(P * sizeof(int32_t));
    g->h_seq_start = (int32_t *)malloc(P * sizeof(int32_t));
    g->h_cu = (int32_t *)malloc((S + 1) * sizeof(int32_t));
    g->h_last = (int32_t *)malloc(S * sizeof(int32_t));
    g->pos = (int *)calloc(S, sizeof(int));
    g->graphs = (cudaGraphExec_t *)calloc(S + 1, sizeof(cudaGraphExec_t));
    if (!g->layers || !g->h_tokens || !g->h_pos || !g->h_slot || !g->h_seq_start || !g->h_cu || !g->h_last ||
        !g->pos || !g->graphs) {
        err_set(err, "out of memory");
        goto fail;
    }
    if (cudaMallocHost(&g->h_step, 4 * S * sizeof(int32_t)) != cudaSuccess) {
        g->h_step = NULL;
        err_set(err, "cuda gen: cannot allocate pinned host memory");
        goto fail;
    }

    ALLOC(g->embed, V * D);
    ALLOC(g->final_norm, D);
    if (c->tie_embeddings)
        g->lm_head = g->embed;
    else
        ALLOC(g->lm_head, V * D);
    for (int l = 0; l < L; l++) {
        GenLayer *ly = &g->layers[l];
        ALLOC(ly->attn_norm, D);
        ALLOC(ly->ffn_norm, D);
        for (int gi = 0; gi < G_COUNT; gi++) {
            ALLOC(ly->w[gi], (size_t)g->group_out[gi] * g->group_in[gi]);
            if (g->lora_rank[gi]) {
                ALLOC(ly->lora_A[gi], (size_t)g->lora_rank[gi] * g->group_in[gi]);
                ALLOC(ly->lora_B[gi], (size_t)g->group_out[gi] * g->lora_rank[gi]);
            }
        }
        ALLOC(ly->k_cache, (size_t)S * KD * Cap);
        ALLOC(ly->v_cache, (size_t)S * KD * Cap);
    }
    ALLOC(g->inv_freq, hd / 2);
    {
        std::vector<float> inv_freq(hd / 2);
        rope_inv_freq(c, inv_freq.data());
        if (cudaMemcpy(g->inv_freq, inv_freq.data(), inv_freq.size() * 4, cudaMemcpyHostToDevice) != cudaSuccess) {
            err_set(err, "cuda gen: copying RoPE frequencies failed");
            goto fail;
        }
    }
    ALLOC(g->x, R * D);
    ALLOC(g->xn, R * D);
    ALLOC(g->tmp, R * D);
    ALLOC(g->rstd, R);
    ALLOC(g->qkv, R * (QD + 2 * KD));
    ALLOC(g->q, R * QD);
    ALLOC(g->att, R * QD);
    ALLOC(g->k, (size_t)P * KD);
    ALLOC(g->v, (size_t)P * KD);
    ALLOC(g->lse, (size_t)P * c->n_heads);
    ALLOC(g->gu, R * 2 * F);
    ALLOC(g->act, R * F);
    ALLOC(g->lora_u, R * (max_rank ? max_rank : 1));
    ALLOC(g->x_last, (size_t)S * D);
    ALLOC(g->xn_last, (size_t)S * D);
    ALLOC(g->logits, (size_t)S * V);
    ALLOC(g->d_tokens, P);
    ALLOC(g->d_pos, P);
    ALLOC(g->d_slot, P);
    ALLOC(g->d_seq_start, P);
    ALLOC(g->d_cu, S + 1);
    ALLOC(g->d_last, S);
    ALLOC(g->d_step, 4 * S);
    {
        // Workspaces for the largest of every product and batch (GEMV: batches below the cuBLAS
        // threshold only, but sizing for all up to 64 costs little).
        size_t ws = 0;
        int top = S < 64 ? S : 64;
        for (int b = 1; b <= top; b++) {
            for (int gi = 0; gi < G_COUNT; gi++) {
                size_t need = cuda_gemv_workspace_bytes(b, g->group_out[gi], g->group_in[gi], g->lora_rank[gi]);
                ws = need > ws ? need : ws;
            }
            size_t need = cuda_gemv_workspace_bytes(b, (int)V, (int)D, 0);
            ws = need > ws ? need : ws;
        }
        g->gemv_ws_bytes = ws;
        if (dev_alloc(g, &g->gemv_ws, ws, err) < 0 || cudaMemset(g->gemv_ws, 0, ws) != cudaSuccess) {
            err_set(err, "cuda gen: GEMV workspace of %zu bytes", ws);
            goto fail;
        }
        size_t aws = 16;
        if (g->split_attention)
            for (int b = 1; b <= S; b++) {
                size_t need = cuda_decode_attention_workspace_bytes(b, c->n_heads, c->n_kv_heads, c->head_dim, Cap);
                aws = need > aws ? need : aws;
            }
        g->attn_ws_bytes = aws;
        if (dev_alloc(g, &g->attn_ws, aws, err) < 0 || dev_alloc(g, &g->blas_ws, CUBLAS_WORKSPACE_BYTES, err) < 0)
            goto fail;
        if (cublasSetWorkspace(g->blas, g->blas_ws, CUBLAS_WORKSPACE_BYTES) != CUBLAS_STATUS_SUCCESS) {
            err_set(err, "cuda gen: cublasSetWorkspace failed");
            goto fail;
        }
    }
    if (cfg->lt_autotune && lt_init(g, err) < 0)
        goto fail;
    return g;
fail:
    cuda_gen_free(g);
    return NULL;
}

// Queue t for the batched upload (kernels/weights.cuh) into dst, after checking its size.
static int upload(std::vector<CudaTensorUpload> *jobs, bf16_t *dst, const Tensor *t, int64_t numel, const char *what,
                  Err *err)
{
    if (tensor_numel(t) != numel)
        return err_set(err, "cuda gen: %s has %lld values, %lld expected", what, (long long)tensor_numel(t),
                       (long long)numel);
    jobs->push_back(CudaTensorUpload{dst, t});
    return 0;
}

// fp32 host (n) to bf16 device, through a host conversion.
static int upload_f32_as_bf16(bf16_t *dst, const float *src, size_t n, Err *err)
{
    std::vector<uint16_t> bits(n);
    for (size_t i = 0; i < n; i++) {
        __nv_bfloat16 b = __float2bfloat16(src[i]);
        memcpy(&bits[i], &b, 2);
    }
    CUDA_CHECK(cudaMemcpy(dst, bits.data(), n * 2, cudaMemcpyHostToDevice), err);
    return 0;
}

// The adapter into the stacked weights: merged (W += scale B A on the device in fp32, one bf16
// rounding) or unmerged (A stacked, B block diagonal, as bf16).
static int load_adapter(CudaGen *g, const Adapter *a, int merge, Err *err)
{
    const ModelConfig *c = &g->c;
    float scale = adapter_scale(&a->cfg);
    int r = a->cfg.rank;
    if (merge) {
        size_t max_a = 0, max_b = 0;
        for (int p = 0; p < PROJ_COUNT; p++) {
            int in, out;
            model_proj_dims(c, (Proj)p, &in, &out);
            max_a = (size_t)r * in > max_a ? (size_t)r * in : max_a;
            max_b = (size_t)r * out > max_b ? (size_t)r * out : max_b;
        }
        float *dA = NULL, *dB = NULL;
        CUDA_CHECK(cudaMalloc(&dA, max_a * 4), err);
        if (cudaMalloc(&dB, max_b * 4) != cudaSuccess) {
            cudaFree(dA);
            return err_set(err, "cuda gen: no device memory to merge the adapter (%zu bytes)", max_b * 4);
        }
        int rc = 0;
        for (int l = 0; l < c->n_layers && rc == 0; l++)
            for (int gi = 0; gi < G_COUNT && rc == 0; gi++) {
                int row0 = 0;
                for (int k = 0; group_modules[gi][k] >= 0 && rc == 0; k++) {
                    int p = group_modules[gi][k], in, out;
                    model_proj_dims(c, (Proj)p, &in, &out);
                    const float *A = adapter_A(a, l, (AdapterModule)p), *B = adapter_B(a, l, (AdapterModule)p);
                    if (A) {
                        bf16_t *W = g->layers[l].w[gi] + (size_t)row0 * in;
                        if (cudaMemcpy(dA, A, (size_t)r * in * 4, cudaMemcpyHostToDevice) != cudaSuccess ||
                            cudaMemcpy(dB, B, (size_t)out * r * 4, cudaMemcpyHostToDevice) != cudaSuccess) {
                            rc = err_set(err, "cuda gen: copying the adapter of layer %d %s failed", l,
                                         proj_name((Proj)p));
                            break;
                        }
                        merge_lora_kernel<<<dim3(ceil_div(in, 256), out), 256, 0, g->stream>>>(W, dA, dB, out, in, r,
                                                                                               scale);
                        if (cudaGetLastError() != cudaSuccess || cudaStreamSynchronize(g->stream) != cudaSuccess)
                            rc = err_set(err, "cuda gen: merging the adapter of layer %d %s failed", l,
                                         proj_name((Proj)p));
                    }
                    row0 += out;
                }
            }
        cudaFree(dA);
        cudaFree(dB);
        return rc;
    }
    g->lora_scale = scale;
    for (int l = 0; l < c->n_layers; l++)
        for (int gi = 0; gi < G_COUNT; gi++) {
            int rank = g->lora_rank[gi], in = g->group_in[gi], out_g = g->group_out[gi];
            if (!rank)
                continue;
            std::vector<float> A((size_t)rank * in, 0.0f), B((size_t)out_g * rank, 0.0f);
            int row0 = 0, col0 = 0;
            for (int k = 0; group_modules[gi][k] >= 0; k++) {
                int p = group_modules[gi][k], pin, out;
                model_proj_dims(c, (Proj)p, &pin, &out);
                const float *Am = adapter_A(a, l, (AdapterModule)p), *Bm = adapter_B(a, l, (AdapterModule)p);
                if (Am) {
                    memcpy(&A[(size_t)col0 * in], Am, (size_t)r * in * 4);
                    for (int o = 0; o < out; o++)
                        memcpy(&B[(size_t)(row0 + o) * rank + col0], Bm + (size_t)o * r, (size_t)r * 4);
                    col0 += r;
                }
                row0 += out;
            }
            if (upload_f32_as_bf16(g->layers[l].lora_A[gi], A.data(), A.size(), err) < 0 ||
                upload_f32_as_bf16(g->layers[l].lora_B[gi], B.data(), B.size(), err) < 0)
                return -1;
        }
    return 0;
}

CudaGen *cuda_gen_create(const Model *m, const Adapter *a, const CudaGenConfig *cfg, Err *err)
{
    const ModelConfig *c = &m->config;
    if (a) {
        int in[ADAPTER_NMODULES], out[ADAPTER_NMODULES];
        for (int p = 0; p < PROJ_COUNT; p++)
            model_proj_dims(c, (Proj)p, &in[p], &out[p]);
        if (adapter_check_shapes(a, c->n_layers, in, out, err) < 0)
            return NULL;
    }
    int unmerged = a && !cfg->merge_adapter;
    CudaGen *g = gen_alloc(c, cfg, unmerged ? a->cfg.rank : 0, unmerged ? a->cfg.modules : 0,
                           a ? adapter_scale(&a->cfg) : 0.0f, err);
    if (!g)
        return NULL;
    size_t D = c->dim, V = c->vocab_size;
    {
        // Every base tensor in one pipelined upload (pinned staging, host threads, overlapped copies).
        std::vector<CudaTensorUpload> jobs;
        if (upload(&jobs, g->embed, &m->weights.embed, (int64_t)(V * D), "embed_tokens", err) < 0 ||
            upload(&jobs, g->final_norm, &m->weights.final_norm, (int64_t)D, "norm", err) < 0 ||
            (!c->tie_embeddings &&
             upload(&jobs, g->lm_head, &m->weights.lm_head, (int64_t)(V * D), "lm_head", err) < 0))
            goto fail;
        for (int l = 0; l < c->n_layers; l++) {
            const LayerWeights *w = &m->weights.layers[l];
            GenLayer *ly = &g->layers[l];
            if (upload(&jobs, ly->attn_norm, &w->attn_norm, (int64_t)D, "input_layernorm", err) < 0 ||
                upload(&jobs, ly->ffn_norm, &w->ffn_norm, (int64_t)D, "post_attention_layernorm", err) < 0)
                goto fail;
            for (int gi = 0; gi < G_COUNT; gi++) {
                size_t row0 = 0;
                for (int k = 0; group_modules[gi][k] >= 0; k++) {
                    int p = group_modules[gi][k], in, out;
                    model_proj_dims(c, (Proj)p, &in, &out);
                    if (upload(&jobs, ly->w[gi] + row0 * in, &w->proj[p], (int64_t)in * out, proj_name((Proj)p),
                               err) < 0)
                        goto fail;
                    row0 += out;
                }
            }
        }
        if (cuda_upload_tensors_bf16(jobs.data(), (int)jobs.size(), g->stream, err) < 0)
            goto fail;
    }
    if (a && load_adapter(g, a, cfg->merge_adapter, err) < 0)
        goto fail;
    return g;
fail:
    cuda_gen_free(g);
    return NULL;
}

CudaGen *cuda_gen_create_random(const ModelConfig *c, const CudaGenConfig *cfg, uint64_t seed, Err *err)
{
    CudaGen *g = gen_alloc(c, cfg, 0, 0, 0.0f, err);
    if (!g)
        return NULL;
    size_t D = c->dim, V = c->vocab_size;
    uint64_t stream_no = 0;
    auto fill = [&](bf16_t *p, size_t n, float scale, float offset) -> int {
        fill_random_kernel<<<ceil_div(n, 256), 256, 0, g->stream>>>(p, n, seed * 1000003u + ++stream_no, scale,
                                                                     offset);
        LAUNCH_CHECK(err);
        return 0;
    };
    if (fill(g->embed, V * D, 1.0f, 0.0f) < 0 || fill(g->final_norm, D, 0.1f, 1.0f) < 0 ||
        (!c->tie_embeddings && fill(g->lm_head, V * D, 1.0f / sqrtf((float)D), 0.0f) < 0))
        goto fail;
    for (int l = 0; l < c->n_layers; l++) {
        GenLayer *ly = &g->layers[l];
        if (fill(ly->attn_norm, D, 0.1f, 1.0f) < 0 || fill(ly->ffn_norm, D, 0.1f, 1.0f) < 0)
            goto fail;
        for (int gi = 0; gi < G_COUNT; gi++)
            if (fill(ly->w[gi], (size_t)g->group_out[gi] * g->group_in[gi], 1.0f / sqrtf((float)g->group_in[gi]),
                     0.0f) < 0)
                goto fail;
    }
    if (cudaStreamSynchronize(g->stream) != cudaSuccess) {
        err_set(err, "cuda gen: filling random weights failed");
        goto fail;
    }
    return g;
fail:
    cuda_gen_free(g);
    return NULL;
}

// ---- prefill ----------------------------------------------------------------------------------

int cuda_gen_prefill(CudaGen *g, const int *slots, const uint32_t *ids, const int *cu, int n, Err *err)
{
    const ModelConfig *c = &g->c;
    int S = g->cfg.max_batch;
    if (n < 1 || n > S)
        return err_set(err, "cuda gen: prefill of %d prompts (1 to max_batch %d)", n, S);
    if (cu[0] != 0)
        return err_set(err, "cuda gen: prefill offsets must start at 0 (got %d)", cu[0]);
    if (cu[n] > g->cfg.max_prefill)
        return err_set(err, "cuda gen: prefill of %d tokens exceeds max_prefill %d", cu[n], g->cfg.max_prefill);
    for (int i = 0; i < n; i++) {
        int len = cu[i + 1] - cu[i];
        if (slots[i] < 0 || slots[i] >= S)
            return err_set(err, "cuda gen: prompt %d: slot %d outside 0..%d", i, slots[i], S - 1);
        for (int j = 0; j < i; j++)
            if (slots[j] == slots[i])
                return err_set(err, "cuda gen: prompts %d and %d both go to slot %d", j, i, slots[i]);
        if (len < 1 || len > g->cfg.capacity)
            return err_set(err, "cuda gen: prompt %d has %d tokens (1 to capacity %d)", i, len, g->cfg.capacity);
        for (int t = cu[i]; t < cu[i + 1]; t++) {
            if (ids[t] >= (uint32_t)c->vocab_size)
                return err_set(err, "cuda gen: prompt %d token %d: id %u is outside the vocabulary (%d)", i,
                               t - cu[i], ids[t], c->vocab_size);
            g->h_tokens[t] = (int32_t)ids[t];
            g->h_pos[t] = t - cu[i];
            g->h_slot[t] = slots[i];
            g->h_seq_start[t] = cu[i];
        }
        g->h_cu[i] = cu[i];
        g->h_last[i] = cu[i + 1] - 1;
    }
    g->h_cu[n] = cu[n];
    int T = cu[n], D = c->dim, F = c->hidden_dim;
    cudaStream_t s = g->stream;
    size_t b4 = (size_t)T * 4;
    CUDA_CHECK(cudaMemcpyAsync(g->d_tokens, g->h_tokens, b4, cudaMemcpyHostToDevice, s), err);
    CUDA_CHECK(cudaMemcpyAsync(g->d_pos, g->h_pos, b4, cudaMemcpyHostToDevice, s), err);
    CUDA_CHECK(cudaMemcpyAsync(g->d_slot, g->h_slot, b4, cudaMemcpyHostToDevice, s), err);
    CUDA_CHECK(cudaMemcpyAsync(g->d_seq_start, g->h_seq_start, b4, cudaMemcpyHostToDevice, s), err);
    CUDA_CHECK(cudaMemcpyAsync(g->d_cu, g->h_cu, (n + 1) * 4, cudaMemcpyHostToDevice, s), err);
    CUDA_CHECK(cudaMemcpyAsync(g->d_last, g->h_last, n * 4, cudaMemcpyHostToDevice, s), err);

    if (cuda_embedding_forward(g->x, g->d_tokens, g->embed, T, D, c->vocab_size, NULL, s, err) < 0)
        return -1;
    for (int l = 0; l < c->n_layers; l++) {
        GenLayer *ly = &g->layers[l];
        if (cuda_rmsnorm_forward(g->xn, g->rstd, g->x, ly->attn_norm, T, D, c->norm_eps, s, err) < 0 ||
            product(g, l, G_QKV, g->qkv, g->xn, T, 0, PATH_CUBLAS, err) < 0)
            return -1;
        qkv_rope_store_kernel<<<T, 128, 0, s>>>(g->q, g->k, g->v, ly->k_cache, ly->v_cache, g->qkv, g->d_pos,
                                                g->d_slot, NULL, g->inv_freq, c->n_heads, c->n_kv_heads, c->head_dim,
                                                g->cfg.capacity);
        LAUNCH_CHECK(err);
        int rc = c->head_dim == 64 || c->head_dim == 128
                     ? cuda_attention_forward(g->att, g->lse, g->q, g->k, g->v, g->d_cu, n, T, c->n_heads,
                                              c->n_kv_heads, c->head_dim, s, err)
                     : cuda_attention_forward_plain(g->att, g->lse, g->q, g->k, g->v, g->d_seq_start, T, c->n_heads,
                                                    c->n_kv_heads, c->head_dim, s, err);
        if (rc < 0 || product(g, l, G_O, g->x, g->att, T, 1, PATH_CUBLAS, err) < 0 ||
            cuda_rmsnorm_forward(g->xn, g->rstd, g->x, ly->ffn_norm, T, D, c->norm_eps, s, err) < 0 ||
            product(g, l, G_GU, g->gu, g->xn, T, 0, PATH_CUBLAS, err) < 0)
            return -1;
        swiglu_stacked_kernel<<<ceil_div((size_t)T * F, 256), 256, 0, s>>>(g->act, g->gu, T, F);
        LAUNCH_CHECK(err);
        if (product(g, l, G_DOWN, g->x, g->act, T, 1, PATH_CUBLAS, err) < 0)
            return -1;
    }
    gather_rows_kernel<<<n, 256, 0, s>>>(g->x_last, g->x, g->d_last, D);
    LAUNCH_CHECK(err);
    if (cuda_rmsnorm_forward(g->xn_last, g->rstd, g->x_last, g->final_norm, n, D, c->norm_eps, s, err) < 0 ||
        gemm_nt(g, n, c->vocab_size, D, 1.0f, g->xn_last, g->lm_head, 0.0f, g->logits, CUDA_R_32F, err) < 0)
        return -1;
    for (int i = 0; i < n; i++)
        g->pos[slots[i]] = cu[i + 1] - cu[i];
    return 0;
}

// ---- decode -----------------------------------------------------------------------------------

// The launches of one decode step over rows 0..n-1, reading ids, active, pos and lens from
// g->d_step: the same whether captured or run directly.
static int decode_body(CudaGen *g, int n, Err *err)
{
    const ModelConfig *c = &g->c;
    int S = g->cfg.max_batch, D = c->dim, F = c->hidden_dim, Cap = g->cfg.capacity;
    const int32_t *d_ids = g->d_step, *d_active = g->d_step + S, *d_pos = g->d_step + 2 * S,
                  *d_lens = g->d_step + 3 * S;
    cudaStream_t s = g->stream;
    float scale = 1.0f / sqrtf((float)c->head_dim);
    if (cuda_embedding_forward(g->x, d_ids, g->embed, n, D, c->vocab_size, NULL, s, err) < 0)
        return -1;
    for (int l = 0; l < c->n_layers; l++) {
        GenLayer *ly = &g->layers[l];
        if (cuda_rmsnorm_forward(g->xn, g->rstd, g->x, ly->attn_norm, n, D, c->norm_eps, s, err) < 0 ||
            product(g, l, G_QKV, g->qkv, g->xn, n, 0, decode_path(g, n, G_QKV), err) < 0)
            return -1;
        qkv_rope_store_kernel<<<n, 128, 0, s>>>(g->q, NULL, NULL, ly->k_cache, ly->v_cache, g->qkv, d_pos, NULL,
                                                d_active, g->inv_freq, c->n_heads, c->n_kv_heads, c->head_dim, Cap);
        LAUNCH_CHECK(err);
        if (g->split_attention) {
            if (cuda_decode_attention(g->att, g->q, ly->k_cache, ly->v_cache, d_lens, n, c->n_heads, c->n_kv_heads,
                                      c->head_dim, Cap, Cap, scale, (float *)g->attn_ws, g->attn_ws_bytes, s, err) < 0)
                return -1;
        } else {
            decode_attention_plain_kernel<<<dim3(c->n_heads, n), 128, (size_t)Cap * 4, s>>>(
                g->att, g->q, ly->k_cache, ly->v_cache, d_lens, c->n_heads, c->n_kv_heads, c->head_dim, Cap, scale);
            LAUNCH_CHECK(err);
        }
        if (product(g, l, G_O, g->x, g->att, n, 1, decode_path(g, n, G_O), err) < 0 ||
            cuda_rmsnorm_forward(g->xn, g->rstd, g->x, ly->ffn_norm, n, D, c->norm_eps, s, err) < 0 ||
            product(g, l, G_GU, g->gu, g->xn, n, 0, decode_path(g, n, G_GU), err) < 0)
            return -1;
        swiglu_stacked_kernel<<<ceil_div((size_t)n * F, 256), 256, 0, s>>>(g->act, g->gu, n, F);
        LAUNCH_CHECK(err);
        if (product(g, l, G_DOWN, g->x, g->act, n, 1, decode_path(g, n, G_DOWN), err) < 0)
            return -1;
    }
    if (cuda_rmsnorm_forward(g->xn, g->rstd, g->x, g->final_norm, n, D, c->norm_eps, s, err) < 0)
        return -1;
    int head_path = decode_path(g, n, G_COUNT);
    if (head_path != PATH_GEMV)
        return base_product(g, head_path, n, G_COUNT, g->lm_head, g->xn, g->logits, 0.0f, err);
    return cuda_gemv_ex(NULL, g->logits, NULL, g->xn, g->lm_head, n, c->vocab_size, D, NULL, g->gemv_ws,
                        g->gemv_ws_bytes, NULL, g->cfg.gemv_pdl != 0, s, err);
}

static int capture(CudaGen *g, int n, Err *err)
{
    cudaGraph_t graph = NULL;
    CUDA_CHECK(cudaStreamBeginCapture(g->stream, cudaStreamCaptureModeThreadLocal), err);
    int rc = decode_body(g, n, err);
    cudaError_t st = cudaStreamEndCapture(g->stream, &graph);
    if (rc < 0) {
        if (graph)
            cudaGraphDestroy(graph);
        cudaGetLastError();
        return -1;
    }
    if (st != cudaSuccess)
        return err_set(err, "cuda gen: capturing the decode step of %d rows: %s", n, cudaGetErrorString(st));
    st = cudaGraphInstantiate(&g->graphs[n], graph, 0);
    cudaGraphDestroy(graph);
    if (st != cudaSuccess) {
        g->graphs[n] = NULL;
        return err_set(err, "cuda gen: instantiating the decode graph of %d rows: %s", n, cudaGetErrorString(st));
    }
    return 0;
}

int cuda_gen_decode(CudaGen *g, const uint32_t *ids, const uint8_t *active, int n, Err *err)
{
    int S = g->cfg.max_batch;
    if (n < 1 || n > S)
        return err_set(err, "cuda gen: decode step of %d rows (1 to max_batch %d)", n, S);
    for (int b = 0; b < n; b++)
        if (active[b]) {
            if (ids[b] >= (uint32_t)g->c.vocab_size)
                return err_set(err, "cuda gen: row %d: id %u is outside the vocabulary (%d)", b, ids[b],
                               g->c.vocab_size);
            if (g->pos[b] >= g->cfg.capacity)
                return err_set(err, "cuda gen: slot %d is full (capacity %d tokens)", b, g->cfg.capacity);
        }
    // The first step of n rows with lt_autotune tunes its products first (outside any capture; only
    // scratch buffers are written, in stream order).
    if (g->cfg.lt_autotune && lt_tune(g, n, err) < 0)
        return -1;
    // h_step is read by the previous step's copy until that copy is done.
    if (g->step_pending)
        CUDA_CHECK(cudaEventSynchronize(g->step_copied), err);
    int32_t *h_ids = g->h_step, *h_active = h_ids + S, *h_pos = h_ids + 2 * S, *h_lens = h_ids + 3 * S;
    for (int b = 0; b < n; b++) {
        h_active[b] = active[b] != 0;
        h_ids[b] = active[b] ? (int32_t)ids[b] : 0;
        h_pos[b] = g->pos[b];
        h_lens[b] = g->pos[b] + h_active[b];
    }
    // The four arrays are copied whole (their offsets are fixed in the graph).
    CUDA_CHECK(cudaMemcpyAsync(g->d_step, g->h_step, 4 * S * sizeof(int32_t), cudaMemcpyHostToDevice, g->stream), err);
    CUDA_CHECK(cudaEventRecord(g->step_copied, g->stream), err);
    g->step_pending = 1;
    if (g->cfg.use_graphs) {
        // The first step of n rows runs directly once before its capture, so that cuBLAS and
        // lazily loaded kernels do their one-time set-up outside the capture. Running it twice is
        // harmless: the step writes the same cache entries and logits again, positions advance below.
        if (!g->graphs[n] && (decode_body(g, n, err) < 0 || capture(g, n, err) < 0))
            return -1;
        CUDA_CHECK(cudaGraphLaunch(g->graphs[n], g->stream), err);
    } else if (decode_body(g, n, err) < 0) {
        return -1;
    }
    for (int b = 0; b < n; b++)
        g->pos[b] += active[b] != 0;
    return 0;
}
