// Generation on one GPU (kernels/gen_cuda.cuh): weights as bf16 in four stacked matrices per
// layer, a per-slot KV cache, prefill through cuBLAS and flash attention, decode steps of one row
// through cuda_gemv_row (decode_one_row), of several rows through cuBLAS (decode_body), both with
// one decode-attention kernel a layer, optionally replayed as CUDA graphs.
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
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

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

// Decode products of steps of several rows (and of one row where decode_one_row does not apply)
// on cuBLAS from this many rows on. Measured on an H200, Llama-3-8B shapes, whole decode steps in
// graphs: cuBLAS everywhere 5.20 ms at batch 1 and 5.28 ms at batch 4, the tensor-core GEMV
// kernels 5.74 and 6.10 ms, so cuBLAS from batch 1. (One row: decode_one_row, 4.04 ms.)
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

struct CudaGen {
    ModelConfig c;
    CudaGenConfig cfg;
    int QD, KD, rows;                // rows = R
    int group_in[G_COUNT], group_out[G_COUNT];
    int lora_rank[G_COUNT];          // rank_g, 0 without an unmerged adapter on the group
    float lora_scale;
    int split_attention;             // decode attention by cuda_decode_attention (hd 64/128, <= 8 q per kv head)
    int row_path;                    // one-row decode steps by cuda_gemv_row (cfg.row_kernels, model shapes)
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
// rotation is rope_pair's (fp32 sincosf of (float)pos * inv_freq, one bf16 rounding).
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
            float sn, cs, r1, r2;
            sincosf((float)p * inv_freq[i], &sn, &cs);
            rope_pair(__bfloat162float(row[col]), __bfloat162float(row[col + half]), cs, sn, &r1, &r2);
            __nv_bfloat16 a = __float2bfloat16(r1), b = __float2bfloat16(r2);
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

// y (rows, out) = x (rows, in) W^T [+ the adapter] for group gi of layer l. With add_to_y the
// result is added to y (the residual stream): cuBLAS through beta = 1, the GEMV in its epilogue
// (cuda_gemv_ex's residual), or through g->tmp and an add kernel when cfg.unfused_residual asks.
static int product(CudaGen *g, int l, int gi, bf16_t *y, const bf16_t *x, int rows, int add_to_y, bool cublas,
                   Err *err)
{
    const GenLayer *L = &g->layers[l];
    int in = g->group_in[gi], out = g->group_out[gi], rank = g->lora_rank[gi];
    if (cublas || in % 8) {   // the GEMV needs whole 16-byte loads of x's rows
        if (gemm_nt(g, rows, out, in, 1.0f, x, L->w[gi], add_to_y ? 1.0f : 0.0f, y, CUDA_R_16BF, err) < 0)
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
    g->row_path = cfg->row_kernels >= 0 && g->split_attention && max_rank == 0 && D % 8 == 0 && F % 8 == 0 &&
                  QD % 8 == 0;
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
        if (cudaMemset(g->attn_ws, 0, aws) != cudaSuccess) {   // its counters start at zero
            err_set(err, "cuda gen: clearing the attention workspace failed");
            goto fail;
        }
        if (cublasSetWorkspace(g->blas, g->blas_ws, CUBLAS_WORKSPACE_BYTES) != CUBLAS_STATUS_SUCCESS) {
            err_set(err, "cuda gen: cublasSetWorkspace failed");
            goto fail;
        }
    }
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
    jobs->push_back(CudaTensorUpload{dst, t, 0, 0});
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
        if (cuda_rmsnorm_forward(g->xn, D, NULL, g->rstd, g->x, ly->attn_norm, T, D, c->norm_eps, s, err) < 0 ||
            product(g, l, G_QKV, g->qkv, g->xn, T, 0, true, err) < 0)
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
        if (rc < 0 || product(g, l, G_O, g->x, g->att, T, 1, true, err) < 0 ||
            cuda_rmsnorm_forward(g->xn, D, NULL, g->rstd, g->x, ly->ffn_norm, T, D, c->norm_eps, s, err) < 0 ||
            product(g, l, G_GU, g->gu, g->xn, T, 0, true, err) < 0)
            return -1;
        swiglu_stacked_kernel<<<ceil_div((size_t)T * F, 256), 256, 0, s>>>(g->act, g->gu, T, F);
        LAUNCH_CHECK(err);
        if (product(g, l, G_DOWN, g->x, g->act, T, 1, true, err) < 0)
            return -1;
    }
    gather_rows_kernel<<<n, 256, 0, s>>>(g->x_last, g->x, g->d_last, D);
    LAUNCH_CHECK(err);
    if (cuda_rmsnorm_forward(g->xn_last, D, NULL, g->rstd, g->x_last, g->final_norm, n, D, c->norm_eps, s, err) < 0 ||
        gemm_nt(g, n, c->vocab_size, D, 1.0f, g->xn_last, g->lm_head, 0.0f, g->logits, CUDA_R_32F, err) < 0)
        return -1;
    for (int i = 0; i < n; i++)
        g->pos[slots[i]] = cu[i + 1] - cu[i];
    return 0;
}

// ---- decode -----------------------------------------------------------------------------------

// A decode step of one row (row 0) in five kernels a layer: cuda_gemv_row with RMSNorm folded
// into q|k|v and gate|up, SwiGLU into gate|up's output, the residual adds into o and down; the
// attention kernel rotates q and k and stores k and v. With PDL each kernel loads its weights while the one before finishes.
static int decode_one_row(CudaGen *g, Err *err)
{
    const ModelConfig *c = &g->c;
    int S = g->cfg.max_batch, D = c->dim, F = c->hidden_dim, Cap = g->cfg.capacity;
    const int32_t *d_ids = g->d_step, *d_pos = g->d_step + 2 * S, *d_lens = g->d_step + 3 * S;
    cudaStream_t s = g->stream;
    float scale = 1.0f / sqrtf((float)c->head_dim), eps = c->norm_eps;
    int pdl = g->cfg.row_kernels == 0;
    if (cuda_embedding_forward(g->x, d_ids, g->embed, 1, D, c->vocab_size, NULL, s, err) < 0)
        return -1;
    for (int l = 0; l < c->n_layers; l++) {
        GenLayer *ly = &g->layers[l];
        if (cuda_gemv_row(g->qkv, NULL, NULL, g->x, ly->w[G_QKV], g->group_out[G_QKV], D, ly->attn_norm, eps, 0, pdl,
                          s, err) < 0 ||
            (!(g->cfg.bench_skip & 1) &&
             cuda_decode_attention_rope(g->att, g->qkv, ly->k_cache, ly->v_cache, d_pos, d_lens, g->inv_freq, 1,
                                        c->n_heads, c->n_kv_heads, c->head_dim, Cap, Cap, scale, g->attn_ws,
                                        g->attn_ws_bytes, pdl, s, err) < 0) ||
            cuda_gemv_row(g->x, NULL, g->x, g->att, ly->w[G_O], D, g->QD, NULL, eps, 0, pdl, s, err) < 0 ||
            cuda_gemv_row(g->act, NULL, NULL, g->x, ly->w[G_GU], F, D, ly->ffn_norm, eps, 1, pdl, s, err) < 0 ||
            cuda_gemv_row(g->x, NULL, g->x, g->act, ly->w[G_DOWN], D, F, NULL, eps, 0, pdl, s, err) < 0)
            return -1;
    }
    return cuda_gemv_row(NULL, g->logits, NULL, g->x, g->lm_head, c->vocab_size, D, g->final_norm, eps, 0, pdl, s,
                         err);
}

// The launches of one decode step over rows 0..n-1, reading ids, active, pos and lens from
// g->d_step: the same whether captured or run directly.
static int decode_body(CudaGen *g, int n, Err *err)
{
    if (n == 1 && g->row_path)
        return decode_one_row(g, err);
    const ModelConfig *c = &g->c;
    int S = g->cfg.max_batch, D = c->dim, F = c->hidden_dim, Cap = g->cfg.capacity;
    const int32_t *d_ids = g->d_step, *d_active = g->d_step + S, *d_pos = g->d_step + 2 * S,
                  *d_lens = g->d_step + 3 * S;
    cudaStream_t s = g->stream;
    float scale = 1.0f / sqrtf((float)c->head_dim);
    int skip = g->cfg.bench_skip;
    bool attention = !(skip & 1), norms = !(skip & 2), swiglu = !(skip & 4), products = !(skip & 8);
    if (cuda_embedding_forward(g->x, d_ids, g->embed, n, D, c->vocab_size, NULL, s, err) < 0)
        return -1;
    for (int l = 0; l < c->n_layers; l++) {
        GenLayer *ly = &g->layers[l];
        if ((norms && cuda_rmsnorm_forward(g->xn, D, NULL, g->rstd, g->x, ly->attn_norm, n, D, c->norm_eps, s, err) < 0) ||
            (products && product(g, l, G_QKV, g->qkv, g->xn, n, 0, use_cublas(g, n, G_QKV), err) < 0))
            return -1;
        if (!attention) {
        } else if (g->split_attention && !g->cfg.unfused_attention) {
            if (cuda_decode_attention_rope(g->att, g->qkv, ly->k_cache, ly->v_cache, d_pos, d_lens, g->inv_freq, n,
                                           c->n_heads, c->n_kv_heads, c->head_dim, Cap, Cap, scale, g->attn_ws,
                                           g->attn_ws_bytes, 0, s, err) < 0)
                return -1;
        } else {
            qkv_rope_store_kernel<<<n, 128, 0, s>>>(g->q, NULL, NULL, ly->k_cache, ly->v_cache, g->qkv, d_pos, NULL,
                                                    d_active, g->inv_freq, c->n_heads, c->n_kv_heads, c->head_dim,
                                                    Cap);
            LAUNCH_CHECK(err);
            if (g->split_attention) {
                if (cuda_decode_attention(g->att, g->q, ly->k_cache, ly->v_cache, d_lens, n, c->n_heads,
                                          c->n_kv_heads, c->head_dim, Cap, Cap, scale, g->attn_ws, g->attn_ws_bytes,
                                          s, err) < 0)
                    return -1;
            } else {
                decode_attention_plain_kernel<<<dim3(c->n_heads, n), 128, (size_t)Cap * 4, s>>>(
                    g->att, g->q, ly->k_cache, ly->v_cache, d_lens, c->n_heads, c->n_kv_heads, c->head_dim, Cap,
                    scale);
                LAUNCH_CHECK(err);
            }
        }
        if ((products && product(g, l, G_O, g->x, g->att, n, 1, use_cublas(g, n, G_O), err) < 0) ||
            (norms && cuda_rmsnorm_forward(g->xn, D, NULL, g->rstd, g->x, ly->ffn_norm, n, D, c->norm_eps, s, err) < 0) ||
            (products && product(g, l, G_GU, g->gu, g->xn, n, 0, use_cublas(g, n, G_GU), err) < 0))
            return -1;
        if (swiglu) {
            swiglu_stacked_kernel<<<ceil_div((size_t)n * F, 256), 256, 0, s>>>(g->act, g->gu, n, F);
            LAUNCH_CHECK(err);
        }
        if (products && product(g, l, G_DOWN, g->x, g->act, n, 1, use_cublas(g, n, G_DOWN), err) < 0)
            return -1;
    }
    if (norms && cuda_rmsnorm_forward(g->xn, D, NULL, g->rstd, g->x, g->final_norm, n, D, c->norm_eps, s, err) < 0)
        return -1;
    if (!products)
        return 0;
    if (use_cublas(g, n, G_COUNT) || D % 8)
        return gemm_nt(g, n, c->vocab_size, D, 1.0f, g->xn, g->lm_head, 0.0f, g->logits, CUDA_R_32F, err);
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
