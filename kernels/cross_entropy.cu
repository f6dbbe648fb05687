// Fused output projection + cross-entropy. Tokens go in blocks of Tb rows (the workspace is
// sized by Tb, not T); per block, the vocabulary in chunks of n entries (the last one shorter):
//   pass 1: logits (Tb, n) fp32 = hidden . weight[v0:v0+n]^T   (cuBLAS, bf16 in, fp32 out)
//           ce_chunk_stats: running max and sum of exp per token; the target's logit
//   ce_finish: loss = lse - logit[target]
//   pass 2: ce_chunk_grad: dlogits (Tb, n) bf16 = grad_scale * (softmax - onehot), written over
//           the logits it is computed from (row t starts where logits row t does: ld 2n), then
//           d(hidden) += dlogits . weight[v0:v0+n]            (cuBLAS)
// With one vocabulary chunk, pass 2 reuses pass 1's logits and the d(hidden) product writes
// bf16 directly: two products of 2*T*V*C flops. With several, pass 2 recomputes each chunk's
// logits (three products) and accumulates d(hidden) in fp32 (beta = 1), then rounds it once.
// cuBLAS is column-major: a row-major (R, K) matrix is its column-major (K, R) transpose, which
// fixes the op flags below.
#include "cross_entropy.cuh"
#include "cuda_check.cuh"

#define CE_THREADS 256
#define CE_GRAD_ITEMS 8   // values a thread holds between the reads and the writes of ce_chunk_grad

static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

// One block per token row of the chunk: a per-thread online (max, sum) in one read of the
// row, merged across the block and then with the running values of earlier chunks.
__global__ void ce_chunk_stats(const float *logits, int n, int v0, const int32_t *targets, float *run_max,
                               float *run_sum, float *target_logit, int first)
{
    int t = blockIdx.x, y = targets[t];
    if (y < 0)
        return;  // untrained: the whole block leaves together
    const float *row = logits + (size_t)t * n;
    float m = -INFINITY, s = 0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float z = row[j];
        if (z > m) {
            s = s * __expf(m - z) + 1.0f;
            m = z;
        } else {
            s += __expf(z - m);
        }
    }
    float chunk_max = block_max(m);
    float chunk_sum = block_sum(m == -INFINITY ? 0.0f : s * __expf(m - chunk_max));
    if (threadIdx.x == 0) {
        float old_max = first ? -INFINITY : run_max[t], old_sum = first ? 0.0f : run_sum[t];
        float new_max = fmaxf(old_max, chunk_max);
        run_sum[t] = old_sum * __expf(old_max - new_max) + chunk_sum * __expf(chunk_max - new_max);
        run_max[t] = new_max;
        if (y >= v0 && y < v0 + n)
            target_logit[t] = row[y - v0];
    }
}

// losses[t] = lse - logit[target]; lse is left in run_max for pass 2.
__global__ void ce_finish(float *losses, float *run_max, const float *run_sum, const float *target_logit,
                          const int32_t *targets, int T)
{
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T)
        return;
    if (targets[t] < 0) {
        losses[t] = 0;
        return;
    }
    float lse = run_max[t] + logf(run_sum[t]);
    run_max[t] = lse;
    losses[t] = lse - target_logit[t];
}

// dlogits = grad_scale * (exp(logit - lse) - [v == target]) as bf16, 0 for untrained rows,
// written in place: row t's bf16 values over the first half of its fp32 logits (ld 2n). The row
// goes in tiles of CE_THREADS * CE_GRAD_ITEMS: a tile's values are read, the block meets, then
// written; a tile's bf16 bytes lie below the end of its own fp32 bytes, so a write never reaches
// a value not yet read.
__global__ void ce_chunk_grad(float *logits, int n, int v0, const int32_t *targets, const float *lse,
                              float grad_scale)
{
    int t = blockIdx.x, y = targets[t];
    const float *row = logits + (size_t)t * n;
    __nv_bfloat16 *drow = (__nv_bfloat16 *)(logits + (size_t)t * n);
    float l = y < 0 ? 0.0f : lse[t];
    for (int j0 = 0; j0 < n; j0 += CE_THREADS * CE_GRAD_ITEMS) {
        float g[CE_GRAD_ITEMS];
#pragma unroll
        for (int i = 0; i < CE_GRAD_ITEMS; i++) {
            int j = j0 + i * CE_THREADS + threadIdx.x;
            g[i] = j >= n || y < 0 ? 0.0f : grad_scale * (__expf(row[j] - l) - (v0 + j == y ? 1.0f : 0.0f));
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < CE_GRAD_ITEMS; i++) {
            int j = j0 + i * CE_THREADS + threadIdx.x;
            if (j < n)
                drow[j] = __float2bfloat16(g[i]);
        }
    }
}

__global__ void f32_to_bf16(__nv_bfloat16 *out, const float *in, size_t n)
{
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        out[i] = __float2bfloat16(in[i]);
}

// Tb = min(T, token_chunk), n = min(V, vocab_chunk): the sizes of one block's buffers.
static void block_dims(int T, int V, int token_chunk, int vocab_chunk, int *tb, int *n)
{
    *tb = T < token_chunk ? T : token_chunk;
    *n = V < vocab_chunk ? V : vocab_chunk;
}

extern "C" size_t cuda_cross_entropy_workspace_bytes(int T, int C, int V, int token_chunk, int vocab_chunk)
{
    int tb, n;
    block_dims(T, V, token_chunk, vocab_chunk, &tb, &n);
    return align256((size_t)tb * n * 4) + (n < V ? align256((size_t)tb * C * 4) : 0) + 3 * align256((size_t)tb * 4);
}

// logits (T, n) row-major is (n x T) column-major = op_T(W_chunk) * hidden, where the weight
// rows (n, C) row-major are a column-major (C x n) matrix and hidden (T, C) a (C x T) one.
static int chunk_logits(cublasHandle_t h, float *logits, const bf16_t *hidden, const bf16_t *weight_chunk, int T,
                        int C, int n, Err *err)
{
    const float one = 1.0f, zero = 0.0f;
    CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, T, C, &one, weight_chunk, CUDA_R_16BF, C, hidden,
                              CUDA_R_16BF, C, &zero, logits, CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 err);
    return 0;
}

// dh (T, C) row-major = (C x T) column-major (+)= W_chunk (C x n) * dlogits (n x T), dlogits at
// ld 2n (in place over the logits); dh is fp32 (accumulating, beta = 1) or bf16 (the only chunk,
// beta = 0).
static int chunk_dhidden(cublasHandle_t h, void *dh, cudaDataType dh_type, float beta, const bf16_t *weight_chunk,
                         const __nv_bfloat16 *dlogits, int T, int C, int n, Err *err)
{
    const float one = 1.0f;
    CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, C, T, n, &one, weight_chunk, CUDA_R_16BF, C, dlogits,
                              CUDA_R_16BF, 2 * n, &beta, dh, dh_type, C, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 err);
    return 0;
}

extern "C" int cuda_fused_cross_entropy(float *losses, bf16_t *dhidden, const bf16_t *hidden, const bf16_t *weight,
                                        const int32_t *targets, int T, int C, int V, int token_chunk, int vocab_chunk,
                                        float grad_scale, void *workspace, size_t workspace_bytes, GpuBlas blas,
                                        GpuStream stream, Err *err)
{
    SHAPE_CHECK(T >= 0 && C > 0 && V > 0 && token_chunk > 0 && vocab_chunk > 0, err,
                "cross-entropy: bad shape T=%d C=%d V=%d token_chunk=%d vocab_chunk=%d", T, C, V, token_chunk,
                vocab_chunk);
    SHAPE_CHECK(losses && hidden && weight && targets && workspace && blas, err, "cross-entropy: NULL pointer");
    size_t need = cuda_cross_entropy_workspace_bytes(T, C, V, token_chunk, vocab_chunk);
    SHAPE_CHECK(workspace_bytes >= need, err, "cross-entropy: workspace of %zu bytes, needs %zu", workspace_bytes,
                need);
    if (T == 0)
        return 0;
    cudaStream_t s = (cudaStream_t)stream;
    cublasHandle_t h = (cublasHandle_t)blas;
    CUBLAS_CHECK(cublasSetStream(h, s), err);
    int tb_max, n_max;
    block_dims(T, V, token_chunk, vocab_chunk, &tb_max, &n_max);
    bool one_chunk = n_max == V;
    char *w = (char *)workspace;
    float *logits = (float *)w;                    // (Tb, n) of the current chunk, then its bf16 gradient
    w += align256((size_t)tb_max * n_max * 4);
    const __nv_bfloat16 *dlogits = (const __nv_bfloat16 *)logits;
    float *dh = NULL;                              // (Tb, C), several chunks only
    if (!one_chunk) {
        dh = (float *)w;
        w += align256((size_t)tb_max * C * 4);
    }
    float *run_max = (float *)w;                   // (Tb); lse after ce_finish
    w += align256((size_t)tb_max * 4);
    float *run_sum = (float *)w;                   // (Tb)
    w += align256((size_t)tb_max * 4);
    float *target_logit = (float *)w;              // (Tb)

    for (int t0 = 0; t0 < T; t0 += tb_max) {
        int tb = T - t0 < tb_max ? T - t0 : tb_max;
        const bf16_t *hid = hidden + (size_t)t0 * C;
        const int32_t *tgt = targets + t0;
        for (int v0 = 0; v0 < V; v0 += n_max) {
            int n = V - v0 < n_max ? V - v0 : n_max;
            if (chunk_logits(h, logits, hid, weight + (size_t)v0 * C, tb, C, n, err) < 0)
                return -1;
            ce_chunk_stats<<<tb, CE_THREADS, 0, s>>>(logits, n, v0, tgt, run_max, run_sum, target_logit, v0 == 0);
            LAUNCH_CHECK(err);
        }
        ce_finish<<<ceil_div(tb, 256), 256, 0, s>>>(losses + t0, run_max, run_sum, target_logit, tgt, tb);
        LAUNCH_CHECK(err);
        if (!dhidden)
            continue;
        for (int v0 = 0; v0 < V; v0 += n_max) {
            int n = V - v0 < n_max ? V - v0 : n_max;
            const bf16_t *wc = weight + (size_t)v0 * C;
            if (!one_chunk && chunk_logits(h, logits, hid, wc, tb, C, n, err) < 0)
                return -1;
            ce_chunk_grad<<<tb, CE_THREADS, 0, s>>>(logits, n, v0, tgt, run_max, grad_scale);
            LAUNCH_CHECK(err);
            int rc = one_chunk
                         ? chunk_dhidden(h, dhidden + (size_t)t0 * C, CUDA_R_16BF, 0.0f, wc, dlogits, tb, C, n, err)
                         : chunk_dhidden(h, dh, CUDA_R_32F, v0 == 0 ? 0.0f : 1.0f, wc, dlogits, tb, C, n, err);
            if (rc < 0)
                return -1;
        }
        if (!one_chunk) {
            size_t m = (size_t)tb * C;
            f32_to_bf16<<<ceil_div(m, 256), 256, 0, s>>>(dhidden + (size_t)t0 * C, dh, m);
            LAUNCH_CHECK(err);
        }
    }
    return 0;
}
