// Plain attention for head sizes the flash kernels do not take (kernels/attention.cuh):
// one thread per (query, head), fp32, for the tiny test models (head_dim 4, 8, 24, ...).
#include <cuda_runtime.h>
#include <math.h>

#include "attention.cuh"
#include "cuda_check.cuh"

// One thread per (query n, head h): online softmax over keys [seq_start[n], n], fp32.
__global__ void naive_attention_forward_kernel(__nv_bfloat16 *out, float *lse, const __nv_bfloat16 *q,
                                               const __nv_bfloat16 *k, const __nv_bfloat16 *v,
                                               const int32_t *seq_start, int N, int Hq, int Hkv, int hd, float scale)
{
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * Hq)
        return;
    int n = idx / Hq, h = idx % Hq, kvh = h / (Hq / Hkv);
    float qi[ATTENTION_PLAIN_MAX_HEAD_DIM], acc[ATTENTION_PLAIN_MAX_HEAD_DIM];
    for (int i = 0; i < hd; i++) {
        qi[i] = __bfloat162float(q[(size_t)idx * hd + i]);
        acc[i] = 0;
    }
    float mx = -INFINITY, sum = 0;
    for (int j = seq_start[n]; j <= n; j++) {
        const __nv_bfloat16 *kj = k + ((size_t)j * Hkv + kvh) * hd, *vj = v + ((size_t)j * Hkv + kvh) * hd;
        float s = 0;
        for (int i = 0; i < hd; i++)
            s += qi[i] * __bfloat162float(kj[i]);
        s *= scale;
        float new_mx = fmaxf(mx, s), corr = expf(mx - new_mx), w = expf(s - new_mx);
        sum = sum * corr + w;
        for (int i = 0; i < hd; i++)
            acc[i] = acc[i] * corr + w * __bfloat162float(vj[i]);
        mx = new_mx;
    }
    for (int i = 0; i < hd; i++)
        out[(size_t)idx * hd + i] = __float2bfloat16(acc[i] / sum);
    lse[idx] = mx + logf(sum);
}

// One thread per (query, head): p_j = exp(s_j - lse), dp_j = dout . v_j, ds_j = p_j (dp_j -
// dout . out) scale; dq = sum ds_j k_j; dk_j += ds_j q and dv_j += p_j dout by fp32 atomics.
__global__ void naive_attention_backward_kernel(__nv_bfloat16 *dq, float *dk, float *dv, const __nv_bfloat16 *dout,
                                                const __nv_bfloat16 *q, const __nv_bfloat16 *k,
                                                const __nv_bfloat16 *v, const __nv_bfloat16 *out, const float *lse,
                                                const int32_t *seq_start, int N, int Hq, int Hkv, int hd, float scale)
{
    int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * Hq)
        return;
    int n = idx / Hq, h = idx % Hq, kvh = h / (Hq / Hkv);
    float qi[ATTENTION_PLAIN_MAX_HEAD_DIM], doi[ATTENTION_PLAIN_MAX_HEAD_DIM], dqi[ATTENTION_PLAIN_MAX_HEAD_DIM];
    float delta = 0;
    for (int i = 0; i < hd; i++) {
        qi[i] = __bfloat162float(q[(size_t)idx * hd + i]);
        doi[i] = __bfloat162float(dout[(size_t)idx * hd + i]);
        delta += doi[i] * __bfloat162float(out[(size_t)idx * hd + i]);
        dqi[i] = 0;
    }
    float l = lse[idx];
    for (int j = seq_start[n]; j <= n; j++) {
        size_t kv = ((size_t)j * Hkv + kvh) * hd;
        float s = 0, dp = 0;
        for (int i = 0; i < hd; i++) {
            s += qi[i] * __bfloat162float(k[kv + i]);
            dp += doi[i] * __bfloat162float(v[kv + i]);
        }
        float p = expf(s * scale - l), ds = p * (dp - delta) * scale;
        for (int i = 0; i < hd; i++) {
            dqi[i] += ds * __bfloat162float(k[kv + i]);
            atomicAdd(&dk[kv + i], ds * qi[i]);
            atomicAdd(&dv[kv + i], p * doi[i]);
        }
    }
    for (int i = 0; i < hd; i++)
        dq[(size_t)idx * hd + i] = __float2bfloat16(dqi[i]);
}

// The launchers' shared argument checks.
static int check_shapes(int T, int n_heads, int n_kv_heads, int head_dim, Err *err)
{
    SHAPE_CHECK(T >= 0 && n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0, err,
                "plain attention: %d query heads, %d kv heads", n_heads, n_kv_heads);
    SHAPE_CHECK(head_dim > 0 && head_dim <= ATTENTION_PLAIN_MAX_HEAD_DIM, err,
                "plain attention: head_dim %d not in 1..%d", head_dim, ATTENTION_PLAIN_MAX_HEAD_DIM);
    return 0;
}

int cuda_attention_forward_plain(bf16_t *out, float *lse, const bf16_t *q, const bf16_t *k, const bf16_t *v,
                                 const int32_t *seq_start, int T, int n_heads, int n_kv_heads, int head_dim,
                                 GpuStream stream, Err *err)
{
    if (check_shapes(T, n_heads, n_kv_heads, head_dim, err) < 0)
        return -1;
    if (T == 0)
        return 0;
    naive_attention_forward_kernel<<<ceil_div((size_t)T * n_heads, 128), 128, 0, (cudaStream_t)stream>>>(
        out, lse, q, k, v, seq_start, T, n_heads, n_kv_heads, head_dim, 1.0f / sqrtf((float)head_dim));
    LAUNCH_CHECK(err);
    return 0;
}

int cuda_attention_backward_plain(bf16_t *dq, float *dk, float *dv, const bf16_t *dout, const bf16_t *q,
                                  const bf16_t *k, const bf16_t *v, const bf16_t *out, const float *lse,
                                  const int32_t *seq_start, int T, int n_heads, int n_kv_heads, int head_dim,
                                  GpuStream stream, Err *err)
{
    if (check_shapes(T, n_heads, n_kv_heads, head_dim, err) < 0)
        return -1;
    if (T == 0)
        return 0;
    naive_attention_backward_kernel<<<ceil_div((size_t)T * n_heads, 128), 128, 0, (cudaStream_t)stream>>>(
        dq, dk, dv, dout, q, k, v, out, lse, seq_start, T, n_heads, n_kv_heads, head_dim,
        1.0f / sqrtf((float)head_dim));
    LAUNCH_CHECK(err);
    return 0;
}
