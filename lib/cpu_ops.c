// The CPU twins of kernels/*.cu: float32 and plain loops, written for reading, not speed.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"

void cpu_embedding_forward(float *out, const int32_t *ids, const float *table, int T, int C)
{
    for (int t = 0; t < T; t++)
        memcpy(out + (size_t)t * C, table + (size_t)ids[t] * C, (size_t)C * sizeof(float));
}

void cpu_rmsnorm_forward(float *out, float *rstd, const float *x, const float *weight, int T, int C,
                         float eps)
{
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * C;
        float *ot = out + (size_t)t * C;
        float sum_sq = 0;
        for (int i = 0; i < C; i++)
            sum_sq += xt[i] * xt[i];
        float r = 1.0f / sqrtf(sum_sq / C + eps);
        for (int i = 0; i < C; i++)
            ot[i] = weight[i] * (xt[i] * r);
        rstd[t] = r;
    }
}

// y = w * x * r with r = (mean(x^2) + eps)^-1/2, so dr/dx_i = -r^3 x_i / C and
// dx = r * (w * dy) - x * r^3 / C * sum_j(w_j dy_j x_j).
void cpu_rmsnorm_backward(float *dx, float *dweight, const float *dout, const float *x,
                          const float *weight, const float *rstd, int T, int C)
{
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * C, *dyt = dout + (size_t)t * C;
        float *dxt = dx + (size_t)t * C;
        float r = rstd[t], dot = 0;
        for (int i = 0; i < C; i++)
            dot += weight[i] * dyt[i] * xt[i];
        float k = r * r * r * dot / C;
        for (int i = 0; i < C; i++)
            dxt[i] = r * weight[i] * dyt[i] - k * xt[i];
        if (dweight)
            for (int i = 0; i < C; i++)
                dweight[i] += dyt[i] * xt[i] * r;
    }
}

// sign +1 rotates by +angle (forward), -1 by -angle (backward).
static void rope_rotate(float *out, const float *x, const int32_t *pos, const float *inv_freq, int T,
                        int n_heads, int head_dim, float sign)
{
    int half = head_dim / 2;
    for (int t = 0; t < T; t++)
        for (int h = 0; h < n_heads; h++) {
            size_t base = ((size_t)t * n_heads + h) * head_dim;
            for (int i = 0; i < half; i++) {
                float angle = (float)pos[t] * inv_freq[i];
                float c = cosf(angle), s = sign * sinf(angle);
                float x1 = x[base + i], x2 = x[base + i + half];
                out[base + i] = x1 * c - x2 * s;
                out[base + i + half] = x2 * c + x1 * s;
            }
        }
}

void cpu_rope_forward(float *out, const float *x, const int32_t *pos, const float *inv_freq, int T,
                      int n_heads, int head_dim)
{
    rope_rotate(out, x, pos, inv_freq, T, n_heads, head_dim, 1.0f);
}

void cpu_rope_backward(float *dx, const float *dout, const int32_t *pos, const float *inv_freq, int T,
                       int n_heads, int head_dim)
{
    rope_rotate(dx, dout, pos, inv_freq, T, n_heads, head_dim, -1.0f);
}

static float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

void cpu_swiglu_forward(float *out, const float *gate, const float *up, size_t n)
{
    for (size_t i = 0; i < n; i++)
        out[i] = gate[i] * sigmoidf(gate[i]) * up[i];
}

// d silu(g)/dg = sig(g) * (1 + g * (1 - sig(g))).
void cpu_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                         size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float s = sigmoidf(gate[i]);
        dup[i] = dout[i] * gate[i] * s;
        dgate[i] = dout[i] * up[i] * s * (1.0f + gate[i] * (1.0f - s));
    }
}

int cpu_fused_cross_entropy(float *losses, float *dhidden, const float *hidden, const float *weight,
                            const int32_t *targets, int T, int C, int V, int vocab_chunk, float grad_scale)
{
    if (vocab_chunk < 1)
        return -1;
    for (int t = 0; t < T; t++)
        if (targets[t] >= V)
            return -1;
    float *logits = malloc((size_t)vocab_chunk * sizeof(float));  // one chunk of one row
    if (!logits)
        return -1;
    int trained = 0;
    for (int t = 0; t < T; t++) {
        const float *h = hidden + (size_t)t * C;
        float *dh = dhidden ? dhidden + (size_t)t * C : NULL;
        if (dh)
            memset(dh, 0, (size_t)C * sizeof(float));
        losses[t] = 0;
        int y = targets[t];
        if (y < 0)
            continue;
        trained++;
        // pass 1: running max and sum of exp(logit - max) over the chunks
        float run_max = -INFINITY, run_sum = 0, target_logit = 0;
        for (int v0 = 0; v0 < V; v0 += vocab_chunk) {
            int n = V - v0 < vocab_chunk ? V - v0 : vocab_chunk;
            float chunk_max = -INFINITY;
            for (int j = 0; j < n; j++) {
                const float *w = weight + (size_t)(v0 + j) * C;
                float z = 0;
                for (int i = 0; i < C; i++)
                    z += h[i] * w[i];
                logits[j] = z;
                if (z > chunk_max)
                    chunk_max = z;
                if (v0 + j == y)
                    target_logit = z;
            }
            float new_max = fmaxf(run_max, chunk_max), chunk_sum = 0;
            for (int j = 0; j < n; j++)
                chunk_sum += expf(logits[j] - new_max);
            run_sum = run_sum * expf(run_max - new_max) + chunk_sum;
            run_max = new_max;
        }
        float lse = run_max + logf(run_sum);
        losses[t] = lse - target_logit;
        if (!dh)
            continue;
        // pass 2: d loss / d logit_v = softmax_v - [v == y]; dh += that * weight[v]
        for (int v = 0; v < V; v++) {
            const float *w = weight + (size_t)v * C;
            float z = 0;
            for (int i = 0; i < C; i++)
                z += h[i] * w[i];
            float g = grad_scale * (expf(z - lse) - (v == y ? 1.0f : 0.0f));
            for (int i = 0; i < C; i++)
                dh[i] += g * w[i];
        }
    }
    free(logits);
    return trained;
}

void cpu_adamw_step(float *param, const float *grad, float *m, float *v, size_t n, long step, double lr,
                    double beta1, double beta2, double eps, double weight_decay, float grad_scale)
{
    // torch derives these in Python floats (double) and applies them as float32 scalars
    double bias1 = 1.0 - pow(beta1, (double)step), bias2 = 1.0 - pow(beta2, (double)step);
    float decay = (float)(1.0 - lr * weight_decay), one_minus_b1 = (float)(1.0 - beta1),
          b2 = (float)beta2, one_minus_b2 = (float)(1.0 - beta2), step_size = (float)(lr / bias1),
          bias2_sqrt = (float)sqrt(bias2), epsf = (float)eps;
    for (size_t i = 0; i < n; i++) {
        float g = grad[i] * grad_scale;
        param[i] *= decay;
        m[i] += (g - m[i]) * one_minus_b1;
        v[i] = v[i] * b2 + one_minus_b2 * g * g;
        param[i] -= step_size * m[i] / (sqrtf(v[i]) / bias2_sqrt + epsf);
    }
}

double cpu_grad_norm_squared(const float *grad, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)grad[i] * grad[i];
    return s;
}

float cpu_clip_coef(double norm, float max_norm)
{
    float coef = (float)(max_norm / (norm + 1e-6));
    return coef < 1.0f ? coef : 1.0f;
}

static float dot_f32(const float *a, const float *b, int n)
{
    float s = 0;
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

int cpu_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                          const int32_t *cu_seqlens, int n_seqs, int n_heads, int n_kv_heads, int head_dim)
{
    int T = cu_seqlens[n_seqs], group = n_heads / n_kv_heads;
    float scale = 1.0f / sqrtf((float)head_dim);
    float *p = malloc((size_t)(T > 0 ? T : 1) * sizeof *p);  // (keys) of one query
    if (!p)
        return -1;
    for (int s = 0; s < n_seqs; s++)
        for (int t = cu_seqlens[s]; t < cu_seqlens[s + 1]; t++)
            for (int h = 0; h < n_heads; h++) {
                int first = cu_seqlens[s], kvh = h / group;
                const float *qt = q + ((size_t)t * n_heads + h) * head_dim;
                float mx = -INFINITY, sum = 0;
                for (int j = first; j <= t; j++) {
                    p[j - first] = dot_f32(qt, k + ((size_t)j * n_kv_heads + kvh) * head_dim, head_dim) * scale;
                    mx = fmaxf(mx, p[j - first]);
                }
                for (int j = first; j <= t; j++) {
                    p[j - first] = expf(p[j - first] - mx);
                    sum += p[j - first];
                }
                float *o = out + ((size_t)t * n_heads + h) * head_dim;
                memset(o, 0, (size_t)head_dim * sizeof *o);
                for (int j = first; j <= t; j++) {
                    const float *vj = v + ((size_t)j * n_kv_heads + kvh) * head_dim;
                    for (int d = 0; d < head_dim; d++)
                        o[d] += p[j - first] / sum * vj[d];
                }
                lse[(size_t)t * n_heads + h] = mx + logf(sum);
            }
    free(p);
    return 0;
}

int cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *q, const float *k,
                           const float *v, const float *out, const float *lse, const int32_t *cu_seqlens,
                           int n_seqs, int n_heads, int n_kv_heads, int head_dim)
{
    int T = cu_seqlens[n_seqs], group = n_heads / n_kv_heads;
    float scale = 1.0f / sqrtf((float)head_dim);
    memset(dq, 0, (size_t)T * n_heads * head_dim * sizeof *dq);
    memset(dk, 0, (size_t)T * n_kv_heads * head_dim * sizeof *dk);
    memset(dv, 0, (size_t)T * n_kv_heads * head_dim * sizeof *dv);
    for (int s = 0; s < n_seqs; s++)
        for (int t = cu_seqlens[s]; t < cu_seqlens[s + 1]; t++)
            for (int h = 0; h < n_heads; h++) {
                int kvh = h / group;
                size_t row = (size_t)t * n_heads + h;
                const float *qt = q + row * head_dim, *dot_ = dout + row * head_dim;
                float *dqt = dq + row * head_dim;
                // D = rowsum(dout * out) = sum_j p_j * (dout . v_j): the softmax backward's mean
                float delta = dot_f32(dot_, out + row * head_dim, head_dim);
                for (int j = cu_seqlens[s]; j <= t; j++) {
                    size_t kv_row = ((size_t)j * n_kv_heads + kvh) * head_dim;
                    float p = expf(dot_f32(qt, k + kv_row, head_dim) * scale - lse[row]);
                    float dp = dot_f32(dot_, v + kv_row, head_dim);
                    float ds = p * (dp - delta) * scale;
                    for (int d = 0; d < head_dim; d++) {
                        dv[kv_row + d] += p * dot_[d];
                        dqt[d] += ds * k[kv_row + d];
                        dk[kv_row + d] += ds * qt[d];
                    }
                }
            }
    return 0;
}

// ---- decode (generation) twins of kernels/gemv.cu and kernels/decode_attention.cu ----

void cpu_gemv(float *y, const float *x, const float *W, int batch, int out, int in, const float *lora_A,
              const float *lora_B, int rank, float lora_scale)
{
    for (int b = 0; b < batch; b++) {
        const float *xb = x + (size_t)b * in;
        float down[256];  // x A^T of this row (rank <= 256, as the kernel requires)
        for (int j = 0; lora_A && j < rank; j++) {
            float s = 0;
            for (int k = 0; k < in; k++)
                s += xb[k] * lora_A[(size_t)j * in + k];
            down[j] = s;
        }
        for (int o = 0; o < out; o++) {
            const float *w = W + (size_t)o * in;
            float s = 0;
            for (int k = 0; k < in; k++)
                s += xb[k] * w[k];
            if (lora_A) {
                float d = 0;
                for (int j = 0; j < rank; j++)
                    d += down[j] * lora_B[(size_t)o * rank + j];
                s += lora_scale * d;
            }
            y[(size_t)b * out + o] = s;
        }
    }
}

void cpu_decode_attention(float *out, const float *q, const float *k_cache, const float *v_cache,
                          const int32_t *lens, int batch, int n_heads, int n_kv_heads, int head_dim, int max_seq,
                          float scale)
{
    int group = n_heads / n_kv_heads;
    for (int b = 0; b < batch; b++)
        for (int h = 0; h < n_heads; h++) {
            const float *qh = q + ((size_t)b * n_heads + h) * head_dim;
            size_t head_base = ((size_t)b * n_kv_heads + h / group) * max_seq;
            float *o = out + ((size_t)b * n_heads + h) * head_dim;
            for (int d = 0; d < head_dim; d++)
                o[d] = 0;
            // two passes: the max for a stable softmax, then the weights and the weighted sum
            float m = -INFINITY, l = 0;
            for (int p = 0; p < lens[b]; p++) {
                const float *k = k_cache + (head_base + p) * head_dim;
                float s = 0;
                for (int d = 0; d < head_dim; d++)
                    s += qh[d] * k[d];
                m = fmaxf(m, s * scale);
            }
            for (int p = 0; p < lens[b]; p++) {
                const float *k = k_cache + (head_base + p) * head_dim, *v = v_cache + (head_base + p) * head_dim;
                float s = 0;
                for (int d = 0; d < head_dim; d++)
                    s += qh[d] * k[d];
                float w = expf(s * scale - m);
                l += w;
                for (int d = 0; d < head_dim; d++)
                    o[d] += w * v[d];
            }
            for (int d = 0; d < head_dim && l > 0; d++)
                o[d] /= l;
        }
}
