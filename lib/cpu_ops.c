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
