// The float32 CPU reference engine: forward and backward of a Llama model with LoRA, in plain
// loops (OpenMP over independent rows). It reads top to bottom in the order a step runs:
// weights, activations, the layer kernels (each forward with its backward), then the model.
//
// Shapes: N = B*T positions of a micro-batch (flattened row-major), D = dim, Hq/Hkv = query and
// key-value heads, hd = head_dim, F = hidden_dim (MLP width), V = vocab, r = LoRA rank.
#include "cpu_ops.h"
#include "engine.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// ---- weights as float32 ---------------------------------------------------------------------

typedef struct {
    const float *attn_norm;           // (D)
    const float *proj[PROJ_COUNT];    // W (out, in), see model_proj_dims
    const float *ffn_norm;            // (D)
} LayerF32;

// Per layer activations kept for the backward pass.
typedef struct {
    float *x_in;      // (N, D)      residual stream entering the layer
    float *xn1;       // (N, D)      input_layernorm(x_in)
    float *rstd1;     // (N)         1 / rms of x_in
    float *q;         // (N, Hq*hd)  after RoPE
    float *k;         // (N, Hkv*hd) after RoPE
    float *v;         // (N, Hkv*hd)
    float *attn;      // (N, Hq*hd)  attention output before o_proj
    float *x_mid;     // (N, D)      residual after attention
    float *xn2;       // (N, D)      post_attention_layernorm(x_mid)
    float *rstd2;     // (N)
    float *gate;      // (N, F)
    float *up;        // (N, F)
    float *act;       // (N, F)      silu(gate) * up, the input of down_proj
    float *lora_u[PROJ_COUNT];     // (N, r)   A (dropout(x)), for targeted projections
    float *lora_keep[PROJ_COUNT];  // (N, in)  dropout multipliers 0 or 1/(1-p); NULL without dropout
} LayerActs;

struct Engine {
    const Model *model;
    ModelConfig c;
    int max_B, max_T;
    const float *embed;        // (V, D)
    const float *final_norm;   // (D)
    const float *lm_head;      // (V, D)
    LayerF32 *layers;          // (n_layers)
    float **owned;             // converted weights we allocated
    int n_owned;
    float *inv_freq;           // (hd/2)

    // Activations for up to max_B*max_T positions.
    LayerActs *acts;           // (n_layers)
    float *x_final;            // (N, D) residual after the last layer
    float *xnf;                // (N, D) final norm output
    float *rstdf;              // (N)
    float *rope_cos, *rope_sin;// (N, hd/2)
    int *seq_start;            // (N) first position of each position's sequence (attention window)
    double *position_loss;     // (N) -log p(target) per position, 0 where untrained
    // LoRA activation capacity (grown when a larger rank or dropout is seen).
    int lora_rank_cap, lora_dropout_cap;
    unsigned lora_targets_cap;
    // Backward scratch.
    float *d_x;                // (N, D)   gradient of the residual stream
    float *d_xn;               // (N, D)   gradient of a norm's output
    float *d_q;                // (N, Hq*hd)
    float *d_k, *d_v;          // (N, Hkv*hd)
    float *d_attn;             // (N, Hq*hd)
    float *d_gate, *d_up, *d_act;  // (N, F)
    float *d_u;                // (N, r) LoRA scratch
    float *d_lora_x;           // (N, max in) LoRA scratch: dropped inputs, then their gradient
};

static float *f32_weight(Engine *e, const Tensor *t, Err *err)
{
    if (t->dtype == DTYPE_F32 && ((uintptr_t)t->data & 3) == 0)
        return (float *)t->data;   // used in place from the map, never copied
    int64_t n = tensor_numel(t);
    float *p = malloc((size_t)n * sizeof *p);
    float **grown = realloc(e->owned, (e->n_owned + 1) * sizeof *grown);
    if (!p || !grown) {
        free(p);
        if (grown)
            e->owned = grown;
        err_set(err, "out of memory converting weights to float32");
        return NULL;
    }
    e->owned = grown;
    e->owned[e->n_owned++] = p;
    tensor_to_f32(t, 0, n, p);
    return p;
}

void engine_free(Engine *e)
{
    if (!e)
        return;
    for (int i = 0; i < e->n_owned; i++)
        free(e->owned[i]);
    free(e->owned);
    if (e->acts)
        for (int l = 0; l < e->c.n_layers; l++) {
            LayerActs *a = &e->acts[l];
            float *bufs[] = {a->x_in, a->xn1, a->rstd1, a->q, a->k, a->v, a->attn, a->x_mid,
                             a->xn2, a->rstd2, a->gate, a->up, a->act};
            for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
                free(bufs[i]);
            for (int p = 0; p < PROJ_COUNT; p++) {
                free(a->lora_u[p]);
                free(a->lora_keep[p]);
            }
        }
    float *bufs[] = {e->x_final, e->xnf, e->rstdf, e->rope_cos, e->rope_sin, e->d_x, e->d_xn,
                     e->d_q, e->d_k, e->d_v, e->d_attn, e->d_gate, e->d_up, e->d_act, e->d_u,
                     e->d_lora_x, e->inv_freq};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        free(bufs[i]);
    free(e->seq_start);
    free(e->position_loss);
    free(e->acts);
    free(e->layers);
    free(e);
}

static int max_proj_in(const ModelConfig *c)
{
    int m = c->dim > c->hidden_dim ? c->dim : c->hidden_dim;
    return m > c->n_heads * c->head_dim ? m : c->n_heads * c->head_dim;
}

Engine *engine_cpu_create(const Model *m, int max_batch, int max_seq, Err *err)
{
    if (max_batch < 1 || max_seq < 1)
        return err_set(err, "engine: batch %d x %d must be at least 1 x 1", max_batch, max_seq), NULL;
    Engine *e = calloc(1, sizeof *e);
    if (!e)
        return err_set(err, "out of memory"), NULL;
    e->model = m;
    e->c = m->config;
    e->max_B = max_batch;
    e->max_T = max_seq;
    const ModelConfig *c = &e->c;
    size_t N = (size_t)max_batch * max_seq, D = c->dim, F = c->hidden_dim;
    size_t QD = (size_t)c->n_heads * c->head_dim, KD = (size_t)c->n_kv_heads * c->head_dim;
    e->layers = calloc(c->n_layers, sizeof *e->layers);
    e->acts = calloc(c->n_layers, sizeof *e->acts);
    if (!e->layers || !e->acts)
        goto oom;
    if (!(e->embed = f32_weight(e, &m->weights.embed, err)) ||
        !(e->final_norm = f32_weight(e, &m->weights.final_norm, err)))
        goto fail;
    e->lm_head = c->tie_embeddings ? e->embed : f32_weight(e, &m->weights.lm_head, err);
    if (!e->lm_head)
        goto fail;
    for (int l = 0; l < c->n_layers; l++) {
        const LayerWeights *w = &m->weights.layers[l];
        LayerF32 *L = &e->layers[l];
        if (!(L->attn_norm = f32_weight(e, &w->attn_norm, err)) || !(L->ffn_norm = f32_weight(e, &w->ffn_norm, err)))
            goto fail;
        for (int p = 0; p < PROJ_COUNT; p++)
            if (!(L->proj[p] = f32_weight(e, &w->proj[p], err)))
                goto fail;
        LayerActs *a = &e->acts[l];
        a->x_in = malloc(N * D * sizeof(float));
        a->xn1 = malloc(N * D * sizeof(float));
        a->rstd1 = malloc(N * sizeof(float));
        a->q = malloc(N * QD * sizeof(float));
        a->k = malloc(N * KD * sizeof(float));
        a->v = malloc(N * KD * sizeof(float));
        a->attn = malloc(N * QD * sizeof(float));
        a->x_mid = malloc(N * D * sizeof(float));
        a->xn2 = malloc(N * D * sizeof(float));
        a->rstd2 = malloc(N * sizeof(float));
        a->gate = malloc(N * F * sizeof(float));
        a->up = malloc(N * F * sizeof(float));
        a->act = malloc(N * F * sizeof(float));
        if (!a->x_in || !a->xn1 || !a->rstd1 || !a->q || !a->k || !a->v || !a->attn || !a->x_mid ||
            !a->xn2 || !a->rstd2 || !a->gate || !a->up || !a->act)
            goto oom;
    }
    e->inv_freq = malloc(c->head_dim / 2 * sizeof(float));
    e->x_final = malloc(N * D * sizeof(float));
    e->xnf = malloc(N * D * sizeof(float));
    e->rstdf = malloc(N * sizeof(float));
    e->rope_cos = malloc(N * c->head_dim / 2 * sizeof(float));
    e->rope_sin = malloc(N * c->head_dim / 2 * sizeof(float));
    e->seq_start = malloc(N * sizeof(int));
    e->position_loss = malloc(N * sizeof(double));
    e->d_x = malloc(N * D * sizeof(float));
    e->d_xn = malloc(N * D * sizeof(float));
    e->d_q = malloc(N * QD * sizeof(float));
    e->d_k = malloc(N * KD * sizeof(float));
    e->d_v = malloc(N * KD * sizeof(float));
    e->d_attn = malloc(N * QD * sizeof(float));
    e->d_gate = malloc(N * F * sizeof(float));
    e->d_up = malloc(N * F * sizeof(float));
    e->d_act = malloc(N * F * sizeof(float));
    e->d_lora_x = malloc(N * max_proj_in(c) * sizeof(float));
    if (!e->inv_freq || !e->x_final || !e->xnf || !e->rstdf || !e->rope_cos || !e->rope_sin ||
        !e->seq_start || !e->position_loss || !e->d_x || !e->d_xn || !e->d_q || !e->d_k || !e->d_v || !e->d_attn ||
        !e->d_gate || !e->d_up || !e->d_act || !e->d_lora_x)
        goto oom;
    rope_inv_freq(c, e->inv_freq);
    return e;
oom:
    err_set(err, "out of memory for a %d x %d micro-batch", max_batch, max_seq);
fail:
    engine_free(e);
    return NULL;
}

// Room for LoRA activations of this rank and these targets (and dropout multipliers when
// dropout is on); grown when a later LoRA needs more.
static int ensure_lora_buffers(Engine *e, const Lora *lora, Err *err)
{
    int r = lora->config.rank, dropout = lora->config.dropout > 0;
    unsigned targets = lora->config.targets;
    if (r <= e->lora_rank_cap && dropout <= e->lora_dropout_cap && !(targets & ~e->lora_targets_cap))
        return 0;
    r = r > e->lora_rank_cap ? r : e->lora_rank_cap;
    dropout |= e->lora_dropout_cap;
    targets |= e->lora_targets_cap;
    size_t N = (size_t)e->max_B * e->max_T;
    for (int l = 0; l < e->c.n_layers; l++)
        for (int p = 0; p < PROJ_COUNT; p++) {
            LayerActs *a = &e->acts[l];
            free(a->lora_u[p]);
            free(a->lora_keep[p]);
            a->lora_u[p] = a->lora_keep[p] = NULL;
            if (!(targets & (1u << p)))
                continue;
            int in, out;
            model_proj_dims(&e->c, p, &in, &out);
            a->lora_u[p] = malloc(N * r * sizeof(float));
            a->lora_keep[p] = dropout ? malloc(N * in * sizeof(float)) : NULL;
            if (!a->lora_u[p] || (dropout && !a->lora_keep[p]))
                return err_set(err, "out of memory for LoRA activations");
        }
    free(e->d_u);
    if (!(e->d_u = malloc(N * r * sizeof(float))))
        return err_set(err, "out of memory for LoRA activations");
    e->lora_rank_cap = r;
    e->lora_dropout_cap = dropout;
    e->lora_targets_cap = targets;
    return 0;
}

// ---- kernels ----------------------------------------------------------------------------------

// Threads only for loops with enough work (multiply-adds): a barrier costs little on an idle
// machine but a descheduled thread makes every barrier slow on a busy one, and tiny models
// (stories260K: dim 64) are mostly small loops.
static inline int worth_threads(double work) { return work > 4e6; }

static inline float dot(const float *a, const float *b, int n)
{
    // Eight partial sums in a fixed order: more accurate than one running sum, vectorizable,
    // and the same result at every optimisation level and thread count (an `omp simd`
    // reduction would depend on the vector width the compiler picks).
    float s[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++)
            s[k] += a[i + k] * b[i + k];
    float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++)
        t += a[i] * b[i];
    return t;
}

// y (n) += g * x (n)
static inline void axpy(float *restrict y, float g, const float *restrict x, int n)
{
    #pragma omp simd
    for (int i = 0; i < n; i++)
        y[i] += g * x[i];
}

// out (N, O) = in (N, I) @ W^T, W (O, I).
static void matmul_forward(float *out, const float *in, const float *W, int N, int I, int O)
{
    #pragma omp parallel for if (worth_threads((double)N * I * O)) collapse(2) schedule(static)
    for (int n = 0; n < N; n++)
        for (int o = 0; o < O; o++)
            out[(size_t)n * O + o] = dot(in + (size_t)n * I, W + (size_t)o * I, I);
}

// d_in (N, I) (+)= d_out (N, O) @ W, W (O, I). accumulate: add instead of overwrite.
static void matmul_backward_input(float *d_in, const float *d_out, const float *W, int N, int I, int O,
                                  int accumulate)
{
    #pragma omp parallel for if (worth_threads((double)N * I * O)) schedule(static)
    for (int n = 0; n < N; n++) {
        float *di = d_in + (size_t)n * I;
        if (!accumulate)
            memset(di, 0, (size_t)I * sizeof *di);
        const float *dout = d_out + (size_t)n * O;
        for (int o = 0; o < O; o++) {
            float g = dout[o];
            if (g == 0)
                continue;
            axpy(di, g, W + (size_t)o * I, I);
        }
    }
}

// d_x (N, D) += the gradient through y = w * x * rstd given d_y. It accumulates into the residual
// gradient, where cpu_rmsnorm_backward (the kernel twin) overwrites, so it stays here.
static void rmsnorm_backward(float *d_x, const float *d_y, const float *x, const float *w,
                             const float *rstd, int N, int D)
{
    #pragma omp parallel for if (worth_threads((double)N * D * 6)) schedule(static)
    for (int n = 0; n < N; n++) {
        const float *xi = x + (size_t)n * D, *dy = d_y + (size_t)n * D;
        float r = rstd[n], proj = 0;
        for (int i = 0; i < D; i++)
            proj += dy[i] * w[i] * xi[i] * r;
        proj /= D;
        for (int i = 0; i < D; i++)
            d_x[(size_t)n * D + i] += r * (dy[i] * w[i] - xi[i] * r * proj);
    }
}

// cos/sin of every (position, frequency) pair: (N, hd/2), angle (float)pos * inv_freq as
// transformers computes it in float32.
static void rope_tables(Engine *e, const int32_t *pos, int N)
{
    int half = e->c.head_dim / 2;
    for (int n = 0; n < N; n++)
        for (int i = 0; i < half; i++) {
            float angle = (float)pos[n] * e->inv_freq[i];
            e->rope_cos[(size_t)n * half + i] = cosf(angle);
            e->rope_sin[(size_t)n * half + i] = sinf(angle);
        }
}

// Rotate-half RoPE on x (N, H, hd) in place: pairs (i, i + hd/2). inverse: rotate by -angle
// (the backward pass of a rotation is its transpose).
static void rope_apply(const Engine *e, float *x, int N, int H, int inverse)
{
    int hd = e->c.head_dim, half = hd / 2;
    float sgn = inverse ? -1.0f : 1.0f;
    #pragma omp parallel for if (worth_threads((double)N * H * hd * 4)) schedule(static)
    for (int n = 0; n < N; n++)
        for (int h = 0; h < H; h++) {
            float *v = x + ((size_t)n * H + h) * hd;
            const float *cs = e->rope_cos + (size_t)n * half, *sn = e->rope_sin + (size_t)n * half;
            for (int i = 0; i < half; i++) {
                float a = v[i], b = v[i + half], s = sgn * sn[i];
                v[i] = a * cs[i] - b * s;
                v[i + half] = b * cs[i] + a * s;
            }
        }
}

// The keys a query at flattened position n sees: [first, n] of its own sequence, cut to the
// sliding window (Mistral) when there is one.
static inline int attn_first_key(const Engine *e, int n)
{
    int first = e->seq_start[n];
    if (e->c.sliding_window > 0 && n - e->c.sliding_window + 1 > first)
        first = n - e->c.sliding_window + 1;
    return first;
}

// Softmax probabilities of query (n, h) over its keys [first, n] into p.
static void attn_probs(const Engine *e, const float *q, const float *k, int n, int h, int first, float *p)
{
    int hd = e->c.head_dim, Hq = e->c.n_heads, Hkv = e->c.n_kv_heads, kvh = h / (Hq / Hkv);
    float scale = 1.0f / sqrtf((float)hd), mx = -INFINITY, sum = 0;
    const float *qi = q + ((size_t)n * Hq + h) * hd;
    for (int j = first; j <= n; j++) {
        p[j - first] = dot(qi, k + ((size_t)j * Hkv + kvh) * hd, hd) * scale;
        if (p[j - first] > mx)
            mx = p[j - first];
    }
    for (int j = first; j <= n; j++) {
        p[j - first] = expf(p[j - first] - mx);
        sum += p[j - first];
    }
    for (int j = first; j <= n; j++)
        p[j - first] /= sum;
}

// out (N, Hq*hd): causal attention within each sequence, GQA (query head h reads kv head
// h / (Hq/Hkv)).
static void attention_forward(const Engine *e, float *out, const float *q, const float *k, const float *v, int N)
{
    int hd = e->c.head_dim, Hq = e->c.n_heads, Hkv = e->c.n_kv_heads, T = e->max_T;
    #pragma omp parallel if (worth_threads((double)N * e->max_T * Hq * hd))
    {
        float *p = malloc((size_t)T * sizeof *p);
        #pragma omp for collapse(2) schedule(static)
        for (int n = 0; n < N; n++)
            for (int h = 0; h < Hq; h++) {
                int first = attn_first_key(e, n), kvh = h / (Hq / Hkv);
                attn_probs(e, q, k, n, h, first, p);
                float *o = out + ((size_t)n * Hq + h) * hd;
                memset(o, 0, hd * sizeof *o);
                for (int j = first; j <= n; j++)
                    axpy(o, p[j - first], v + ((size_t)j * Hkv + kvh) * hd, hd);
            }
        free(p);
    }
}

// Given d_out (N, Hq*hd), write d_q (N, Hq*hd), d_k and d_v (N, Hkv*hd) (all post-RoPE). The
// probabilities are recomputed rather than stored. Threads split by (row, kv head) so that
// the keys and values one thread accumulates into are its own.
static void attention_backward(const Engine *e, float *d_q, float *d_k, float *d_v, const float *d_out,
                               const float *q, const float *k, const float *v, int B, int T)
{
    int hd = e->c.head_dim, Hq = e->c.n_heads, Hkv = e->c.n_kv_heads, group = Hq / Hkv;
    float scale = 1.0f / sqrtf((float)hd);
    memset(d_k, 0, (size_t)B * T * Hkv * hd * sizeof *d_k);
    memset(d_v, 0, (size_t)B * T * Hkv * hd * sizeof *d_v);
    #pragma omp parallel if (worth_threads((double)B * T * T * Hq * hd * 2))
    {
        float *p = malloc((size_t)e->max_T * sizeof *p), *dp = malloc((size_t)e->max_T * sizeof *dp);
        #pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; b++)
            for (int kvh = 0; kvh < Hkv; kvh++)
                for (int n = b * T; n < (b + 1) * T; n++)
                    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
                        int first = attn_first_key(e, n);
                        attn_probs(e, q, k, n, h, first, p);
                        const float *dout = d_out + ((size_t)n * Hq + h) * hd;
                        const float *qi = q + ((size_t)n * Hq + h) * hd;
                        float *dqi = d_q + ((size_t)n * Hq + h) * hd;
                        float sum_pdp = 0;
                        for (int j = first; j <= n; j++) {
                            const float *vj = v + ((size_t)j * Hkv + kvh) * hd;
                            float *dvj = d_v + ((size_t)j * Hkv + kvh) * hd;
                            axpy(dvj, p[j - first], dout, hd);
                            dp[j - first] = dot(dout, vj, hd);
                            sum_pdp += p[j - first] * dp[j - first];
                        }
                        memset(dqi, 0, hd * sizeof *dqi);
                        for (int j = first; j <= n; j++) {
                            float ds = p[j - first] * (dp[j - first] - sum_pdp) * scale;
                            const float *kj = k + ((size_t)j * Hkv + kvh) * hd;
                            float *dkj = d_k + ((size_t)j * Hkv + kvh) * hd;
                            axpy(dqi, ds, kj, hd);
                            axpy(dkj, ds, qi, hd);
                        }
                    }
        free(p);
        free(dp);
    }
}

// ---- LoRA on one projection -------------------------------------------------------------------

// y (N, out) += scale * B (A (keep * x)); keeps u = A (keep * x) (N, r). keep (N, in) holds
// the dropout multipliers (0 or 1/(1-p)), drawn here from rng; NULL: no dropout.
static void lora_forward(float *y, float *u, float *keep, const float *x, const LoraProj *lp, int r,
                         float scale, float dropout, Rng *rng, int N)
{
    int in = lp->in, out = lp->out;
    if (keep) {
        // Drawn in a fixed order (position-major) so a seed gives the same masks on any
        // number of threads.
        float kept = 1.0f / (1.0f - dropout);
        for (size_t i = 0; i < (size_t)N * in; i++)
            keep[i] = rng_uniform(rng) < dropout ? 0.0f : kept;
    }
    #pragma omp parallel for if (worth_threads((double)N * r * (in + out))) schedule(static)
    for (int n = 0; n < N; n++) {
        const float *xi = x + (size_t)n * in;
        float *un = u + (size_t)n * r;
        for (int j = 0; j < r; j++) {
            const float *a = lp->A + (size_t)j * in;
            if (keep) {
                const float *kp = keep + (size_t)n * in;
                float s = 0;
                for (int i = 0; i < in; i++)
                    s += a[i] * (xi[i] * kp[i]);
                un[j] = s;
            } else {
                un[j] = dot(a, xi, in);
            }
        }
        float *yn = y + (size_t)n * out;
        for (int o = 0; o < out; o++)
            yn[o] += scale * dot(lp->B + (size_t)o * r, un, r);
    }
}

// Given d_y (N, out): dB += scale d_y^T u, du = scale d_y B, dA += du^T (keep * x), and
// d_x (N, in) += (du A) * keep when d_x is not NULL. d_u (N, r) and x_kept (N, in) are
// scratch. Every loop runs along rows (axpy) and each thread owns the rows it writes.
static void lora_backward(float *d_x, float *d_u, float *x_kept, const float *d_y, const float *u,
                          const float *keep, const float *x, const LoraProj *lp, int r, float scale, int N)
{
    int in = lp->in, out = lp->out;
    #pragma omp parallel for if (worth_threads((double)N * r * out)) schedule(static)
    for (int n = 0; n < N; n++) {
        float *du = d_u + (size_t)n * r;
        memset(du, 0, r * sizeof *du);
        for (int o = 0; o < out; o++)
            axpy(du, scale * d_y[(size_t)n * out + o], lp->B + (size_t)o * r, r);
    }
    #pragma omp parallel for if (worth_threads((double)N * r * out)) schedule(static)
    for (int o = 0; o < out; o++)
        for (int n = 0; n < N; n++)
            axpy(lp->dB + (size_t)o * r, scale * d_y[(size_t)n * out + o], u + (size_t)n * r, r);
    const float *xs = x;   // the input A saw
    if (keep) {
        for (size_t i = 0; i < (size_t)N * in; i++)
            x_kept[i] = x[i] * keep[i];
        xs = x_kept;
    }
    #pragma omp parallel for if (worth_threads((double)N * r * in)) schedule(static)
    for (int j = 0; j < r; j++)
        for (int n = 0; n < N; n++)
            axpy(lp->dA + (size_t)j * in, d_u[(size_t)n * r + j], xs + (size_t)n * in, in);
    if (!d_x)
        return;
    #pragma omp parallel for if (worth_threads((double)N * r * in)) schedule(static)
    for (int n = 0; n < N; n++) {
        float *dx = d_x + (size_t)n * in;
        if (keep) {   // (du A) * keep: the dropped inputs get no gradient
            float *row = x_kept + (size_t)n * in;   // reused as scratch: xs is no longer needed
            memset(row, 0, in * sizeof *row);
            for (int j = 0; j < r; j++)
                axpy(row, d_u[(size_t)n * r + j], lp->A + (size_t)j * in, in);
            for (int i = 0; i < in; i++)
                dx[i] += row[i] * keep[(size_t)n * in + i];
        } else {
            for (int j = 0; j < r; j++)
                axpy(dx, d_u[(size_t)n * r + j], lp->A + (size_t)j * in, in);
        }
    }
}

// A projection's forward: y = W x (+ LoRA when lora targets it).
static void proj_forward(Engine *e, const Lora *lora, Rng *rng, int layer, Proj p, float *y,
                         const float *x, int N, int train)
{
    int in, out;
    model_proj_dims(&e->c, p, &in, &out);
    matmul_forward(y, x, e->layers[layer].proj[p], N, in, out);
    const LoraProj *lp = lora ? lora_proj(lora, layer, p) : NULL;
    if (!lp || !lp->A)
        return;
    LayerActs *a = &e->acts[layer];
    float *keep = train && lora->config.dropout > 0 ? a->lora_keep[p] : NULL;
    lora_forward(y, a->lora_u[p], keep, x, lp, lora->config.rank, lora->scale, lora->config.dropout, rng, N);
}

// A projection's backward: d_x (N, in) (+)= W^T d_y plus LoRA's part; LoRA gradients
// accumulate. d_x NULL: only the LoRA parameter gradients are wanted.
static void proj_backward(Engine *e, Lora *lora, int layer, Proj p, float *d_x, const float *d_y,
                          const float *x, int N, int accumulate)
{
    int in, out;
    model_proj_dims(&e->c, p, &in, &out);
    if (d_x)
        matmul_backward_input(d_x, d_y, e->layers[layer].proj[p], N, in, out, accumulate);
    const LoraProj *lp = lora_proj(lora, layer, p);
    if (!lp->A)
        return;
    LayerActs *a = &e->acts[layer];
    float *keep = lora->config.dropout > 0 ? a->lora_keep[p] : NULL;
    lora_backward(d_x, e->d_u, e->d_lora_x, d_y, a->lora_u[p], keep, x, lp, lora->config.rank, lora->scale, N);
}

// ---- the model ----------------------------------------------------------------------------------

// Check a batch and fill seq_start and the RoPE tables.
static int prepare_batch(Engine *e, const EngineBatch *b, Err *err)
{
    if (b->B < 1 || b->T < 1 || b->B > e->max_B || b->T > e->max_T)
        return err_set(err, "engine: batch %d x %d exceeds the engine's %d x %d", b->B, b->T, e->max_B, e->max_T);
    int N = b->B * b->T;
    for (int n = 0; n < N; n++) {
        if (b->tokens[n] < 0 || b->tokens[n] >= e->c.vocab_size)
            return err_set(err, "engine: token %d at row %d position %d is outside the vocabulary (%d)",
                           b->tokens[n], n / b->T, n % b->T, e->c.vocab_size);
        if (b->targets && b->targets[n] != LORA_IGNORE_TARGET &&
            (b->targets[n] < 0 || b->targets[n] >= e->c.vocab_size))
            return err_set(err, "engine: target %d at row %d position %d is outside the vocabulary (%d)",
                           b->targets[n], n / b->T, n % b->T, e->c.vocab_size);
        if (b->positions[n] < 0)
            return err_set(err, "engine: negative position id at row %d position %d", n / b->T, n % b->T);
    }
    if (!b->cu_seqlens) {
        for (int n = 0; n < N; n++)
            e->seq_start[n] = n - n % b->T;
    } else {
        if (b->n_seqs < 1 || b->cu_seqlens[0] != 0 || b->cu_seqlens[b->n_seqs] != N)
            return err_set(err, "engine: cu_seqlens must run from 0 to B*T = %d", N);
        for (int s = 0; s < b->n_seqs; s++) {
            int lo = b->cu_seqlens[s], hi = b->cu_seqlens[s + 1];
            if (hi < lo || (hi > lo && lo / b->T != (hi - 1) / b->T))
                return err_set(err, "engine: sequence %d [%d, %d) is reversed or crosses a row end", s, lo, hi);
            for (int n = lo; n < hi; n++)
                e->seq_start[n] = lo;
        }
    }
    rope_tables(e, b->positions, N);
    return 0;
}

// Forward through every layer; leaves the final norm output in e->xnf and keeps activations.
static void forward_layers(Engine *e, const Lora *lora, Rng *rng, const int32_t *tokens, int N, int train)
{
    const ModelConfig *c = &e->c;
    int D = c->dim, F = c->hidden_dim;
    for (int n = 0; n < N; n++)
        memcpy(e->acts[0].x_in + (size_t)n * D, e->embed + (size_t)tokens[n] * D, D * sizeof(float));
    for (int l = 0; l < c->n_layers; l++) {
        LayerActs *a = &e->acts[l];
        const LayerF32 *w = &e->layers[l];
        cpu_rmsnorm_forward(a->xn1, a->rstd1, a->x_in, w->attn_norm, N, D, c->norm_eps);
        proj_forward(e, lora, rng, l, PROJ_Q, a->q, a->xn1, N, train);
        proj_forward(e, lora, rng, l, PROJ_K, a->k, a->xn1, N, train);
        proj_forward(e, lora, rng, l, PROJ_V, a->v, a->xn1, N, train);
        rope_apply(e, a->q, N, c->n_heads, 0);
        rope_apply(e, a->k, N, c->n_kv_heads, 0);
        attention_forward(e, a->attn, a->q, a->k, a->v, N);
        proj_forward(e, lora, rng, l, PROJ_O, a->x_mid, a->attn, N, train);
        for (size_t i = 0; i < (size_t)N * D; i++)
            a->x_mid[i] += a->x_in[i];
        cpu_rmsnorm_forward(a->xn2, a->rstd2, a->x_mid, w->ffn_norm, N, D, c->norm_eps);
        proj_forward(e, lora, rng, l, PROJ_GATE, a->gate, a->xn2, N, train);
        proj_forward(e, lora, rng, l, PROJ_UP, a->up, a->xn2, N, train);
        cpu_swiglu_forward(a->act, a->gate, a->up, (size_t)N * F);
        float *x_out = l + 1 < c->n_layers ? e->acts[l + 1].x_in : e->x_final;
        proj_forward(e, lora, rng, l, PROJ_DOWN, x_out, a->act, N, train);
        for (size_t i = 0; i < (size_t)N * D; i++)
            x_out[i] += a->x_mid[i];
    }
    cpu_rmsnorm_forward(e->xnf, e->rstdf, e->x_final, e->final_norm, N, D, c->norm_eps);
}

// Cross-entropy over the trained targets. With d_xnf (N, D) not NULL, also writes the gradient
// of the summed loss w.r.t. the final norm output (zero at untrained positions).
static double loss_and_grad(Engine *e, const int32_t *targets, int N, float *d_xnf, long *n_trained)
{
    int D = e->c.dim, V = e->c.vocab_size;
    #pragma omp parallel if (worth_threads((double)N * V * D * 2))
    {
        float *logits = malloc((size_t)V * sizeof *logits);
        #pragma omp for schedule(dynamic, 4)
        for (int n = 0; n < N; n++) {
            float *dx = d_xnf ? d_xnf + (size_t)n * D : NULL;
            if (dx)
                memset(dx, 0, D * sizeof *dx);
            int t = targets[n];
            e->position_loss[n] = 0;
            if (t == LORA_IGNORE_TARGET)
                continue;
            const float *x = e->xnf + (size_t)n * D;
            float mx = -INFINITY;
            for (int v = 0; v < V; v++) {
                logits[v] = dot(x, e->lm_head + (size_t)v * D, D);
                if (logits[v] > mx)
                    mx = logits[v];
            }
            double sum = 0;
            for (int v = 0; v < V; v++)
                sum += exp((double)(logits[v] - mx));
            e->position_loss[n] = log(sum) + mx - logits[t];
            if (!dx)
                continue;
            // d loss / d logits = softmax - onehot(t); back through lm_head into (D).
            for (int v = 0; v < V; v++) {
                float g = (float)(exp((double)(logits[v] - mx)) / sum) - (v == t);
                axpy(dx, g, e->lm_head + (size_t)v * D, D);
            }
        }
        free(logits);
    }
    // Summed in position order, so the loss does not depend on how threads split the rows.
    double total = 0;
    long count = 0;
    for (int n = 0; n < N; n++) {
        total += e->position_loss[n];
        count += targets[n] != LORA_IGNORE_TARGET;
    }
    *n_trained = count;
    return total;
}

// Backward from d_xnf (in e->d_xn) through every layer, accumulating LoRA gradients.
static void backward_layers(Engine *e, Lora *lora, int B, int T)
{
    const ModelConfig *c = &e->c;
    int N = B * T, D = c->dim, F = c->hidden_dim;
    // The residual stream's gradient starts as the final norm's backward.
    memset(e->d_x, 0, (size_t)N * D * sizeof(float));
    rmsnorm_backward(e->d_x, e->d_xn, e->x_final, e->final_norm, e->rstdf, N, D);
    // The lowest layer that has LoRA parameters: below it nothing needs a gradient.
    int lowest = c->n_layers;
    for (int l = 0; l < c->n_layers && lowest == c->n_layers; l++)
        for (int p = 0; p < PROJ_COUNT; p++)
            if (lora_proj(lora, l, p)->A)
                lowest = l;
    for (int l = c->n_layers - 1; l >= lowest; l--) {
        LayerActs *a = &e->acts[l];
        const LayerF32 *w = &e->layers[l];
        int need_input_grad = l > lowest;
        // MLP: x_out = x_mid + down(silu(gate(xn2)) * up(xn2)); d_x is d x_out.
        proj_backward(e, lora, l, PROJ_DOWN, e->d_act, e->d_x, a->act, N, 0);
        cpu_swiglu_backward(e->d_gate, e->d_up, e->d_act, a->gate, a->up, (size_t)N * F);
        proj_backward(e, lora, l, PROJ_GATE, e->d_xn, e->d_gate, a->xn2, N, 0);
        proj_backward(e, lora, l, PROJ_UP, e->d_xn, e->d_up, a->xn2, N, 1);
        rmsnorm_backward(e->d_x, e->d_xn, a->x_mid, w->ffn_norm, a->rstd2, N, D);   // d_x is now d x_mid
        // Attention: x_mid = x_in + o(attention(rope(q(xn1)), rope(k(xn1)), v(xn1))).
        proj_backward(e, lora, l, PROJ_O, e->d_attn, e->d_x, a->attn, N, 0);
        attention_backward(e, e->d_q, e->d_k, e->d_v, e->d_attn, a->q, a->k, a->v, B, T);
        rope_apply(e, e->d_q, N, c->n_heads, 1);
        rope_apply(e, e->d_k, N, c->n_kv_heads, 1);
        float *d_xn1 = need_input_grad ? e->d_xn : NULL;
        proj_backward(e, lora, l, PROJ_Q, d_xn1, e->d_q, a->xn1, N, 0);
        proj_backward(e, lora, l, PROJ_K, d_xn1, e->d_k, a->xn1, N, 1);
        proj_backward(e, lora, l, PROJ_V, d_xn1, e->d_v, a->xn1, N, 1);
        if (need_input_grad)
            rmsnorm_backward(e->d_x, e->d_xn, a->x_in, w->attn_norm, a->rstd1, N, D);   // d x_in
    }
}

int engine_train_micro_batch(Engine *e, Lora *lora, const EngineBatch *b, Rng *rng,
                             double *loss_sum, long *n_trained, Err *err)
{
    if (lora->config.dropout > 0 && !rng)
        return err_set(err, "engine: LoRA dropout needs a random generator");
    if (lora->n_layers != e->c.n_layers)
        return err_set(err, "engine: LoRA has %d layers, the model %d", lora->n_layers, e->c.n_layers);
    if (prepare_batch(e, b, err) < 0 || ensure_lora_buffers(e, lora, err) < 0)
        return -1;
    int N = b->B * b->T;
    forward_layers(e, lora, rng, b->tokens, N, 1);
    *loss_sum = loss_and_grad(e, b->targets, N, e->d_xn, n_trained);
    if (*n_trained > 0)
        backward_layers(e, lora, b->B, b->T);
    return 0;
}

int engine_eval_micro_batch(Engine *e, const Lora *lora, const EngineBatch *b,
                            double *loss_sum, long *n_trained, Err *err)
{
    if (lora && lora->n_layers != e->c.n_layers)
        return err_set(err, "engine: LoRA has %d layers, the model %d", lora->n_layers, e->c.n_layers);
    if (prepare_batch(e, b, err) < 0 || (lora && ensure_lora_buffers(e, lora, err) < 0))
        return -1;
    int N = b->B * b->T;
    forward_layers(e, lora, NULL, b->tokens, N, 0);
    *loss_sum = loss_and_grad(e, b->targets, N, NULL, n_trained);
    return 0;
}

int engine_logits(Engine *e, const Lora *lora, const int32_t *tokens, int T, float *logits, Err *err)
{
    if (T < 1 || T > e->max_B * e->max_T)
        return err_set(err, "engine: %d tokens exceed the engine's capacity of %d", T, e->max_B * e->max_T);
    if (lora && lora->n_layers != e->c.n_layers)
        return err_set(err, "engine: LoRA has %d layers, the model %d", lora->n_layers, e->c.n_layers);
    int32_t *pos = malloc((size_t)T * sizeof *pos);
    if (!pos)
        return err_set(err, "out of memory");
    for (int t = 0; t < T; t++)
        pos[t] = t;
    // One row of T: the engine holds max_B*max_T positions, so a long row fits as long as the
    // total does (seq_start comes from cu_seqlens, not from max_T).
    int32_t cu[2] = {0, T};
    EngineBatch b = {.B = 1, .T = T, .tokens = tokens, .positions = pos, .cu_seqlens = cu, .n_seqs = 1};
    // LoRA buffers first, sized for the engine's full capacity (not for this one row).
    if (lora && ensure_lora_buffers(e, lora, err) < 0) {
        free(pos);
        return -1;
    }
    int saved_T = e->max_T, saved_B = e->max_B;
    if (T > e->max_T) {   // reinterpret the buffers as one long row
        e->max_T = T;
        e->max_B = 1;
    }
    int rc = prepare_batch(e, &b, err);
    if (rc == 0) {
        forward_layers(e, lora, NULL, tokens, T, 0);
        int D = e->c.dim, V = e->c.vocab_size;
        #pragma omp parallel for if (worth_threads((double)T * V * D)) collapse(2) schedule(static)
        for (int t = 0; t < T; t++)
            for (int v = 0; v < V; v++)
                logits[(size_t)t * V + v] = dot(e->xnf + (size_t)t * D, e->lm_head + (size_t)v * D, D);
    }
    e->max_T = saved_T;
    e->max_B = saved_B;
    free(pos);
    return rc;
}
