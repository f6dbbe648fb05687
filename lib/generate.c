#define _GNU_SOURCE   // memmem
#include "generate.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_ops.h"
#include "utf8_stream.h"

// The output text of a generation, grown as tokens arrive.
typedef struct {
    char *buf;
    size_t len, cap;
} Text;

// One Linear layer y = W x (+ scale * B (A x) when the adapter is kept unmerged).
typedef struct {
    int in, out;
    const float *w;     // (out, in) row-major: into the model's map, or `owned`
    float *owned;       // a float32 copy (converted, merged or realigned); NULL when mapped
    const float *A;     // (rank, in)  unmerged LoRA, else NULL
    const float *B;     // (out, rank)
} Linear;

struct Generator {
    const Model *model;
    ModelConfig c;
    int kv_dim;                  // n_kv_heads * head_dim
    int q_dim;                   // n_heads * head_dim
    Linear *proj;                // (n_layers, PROJ_COUNT)
    float *attn_norm;            // (n_layers, dim)
    float *ffn_norm;             // (n_layers, dim)
    float *final_norm;           // (dim)
    Linear lm_head;              // (vocab, dim)
    int rank;                    // unmerged adapter's rank, 0 when none or merged
    float scale;                 // unmerged adapter's scale
    float *lora_owned;           // the unmerged adapter's A and B, copied
    float *inv_freq;             // (head_dim / 2)

    size_t pos;                  // positions in the cache
    size_t cache_cap;            // positions the cache holds
    float **k_cache, **v_cache;  // (n_layers) -> (cache_cap, kv_dim)

    size_t act_cap;              // tokens the activation buffers hold
    float *x;                    // (T, dim) the residual stream
    float *xb;                   // (T, dim) normed input of a sublayer
    float *q;                    // (T, q_dim)
    float *k, *v;                // (T, kv_dim)
    float *att;                  // (T, q_dim) attention output before o_proj
    float *h1, *h2;              // (T, hidden_dim) gate and up
    float *delta;                // (T, max(dim, hidden_dim, q_dim)) a projection's output
    float *lora_tmp;             // (T, rank) A x
    float *rstd;                 // (T) RMSNorm's scale (the shared kernel reports it)
    int32_t *positions;          // (T) the positions of the tokens in flight
    int n_threads;
    float *scores;               // (n_threads, cache_cap) attention weights of one query head
    float *logits;               // (vocab)
};

// ---- kernels: the products here; RMSNorm, RoPE and SwiGLU are the trainer's (lib/cpu_ops.h) --

// x (in) . w (in): eight partial sums, so the compiler can vectorise and rounding stays small.
static float dot(const float *x, const float *w, int n)
{
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++)
            acc[j] += x[i + j] * w[i + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++)
        s += x[i] * w[i];
    return s;
}

// Below this many multiply-adds a parallel region costs more than it saves (and on a busy
// machine waiting threads make it far worse): tiny models run on one thread.
#define PARALLEL_MIN_WORK (1L << 18)

// out (T, n_out) = x (T, n_in) W^T, W (n_out, n_in).
static void matmul(float *out, const float *x, const float *w, int T, int n_in, int n_out)
{
#pragma omp parallel for schedule(static) if ((long)T * n_in * n_out >= PARALLEL_MIN_WORK)
    for (int o = 0; o < n_out; o++)
        for (int t = 0; t < T; t++)
            out[(size_t)t * n_out + o] = dot(x + (size_t)t * n_in, w + (size_t)o * n_in, n_in);
}

// out (T, l->out) = l applied to x (T, l->in); tmp (T, rank) scratch for the unmerged adapter.
static void linear_forward(const Generator *g, const Linear *l, float *out, const float *x, int T)
{
    matmul(out, x, l->w, T, l->in, l->out);
    if (!l->A)
        return;
    matmul(g->lora_tmp, x, l->A, T, l->in, g->rank);
    // y += scale * (B (A x)), PEFT's order: lora_B(lora_A(x)) * scaling.
#pragma omp parallel for schedule(static) if ((long)T * g->rank * l->out >= PARALLEL_MIN_WORK)
    for (int o = 0; o < l->out; o++)
        for (int t = 0; t < T; t++)
            out[(size_t)t * l->out + o] +=
                dot(g->lora_tmp + (size_t)t * g->rank, l->B + (size_t)o * g->rank, g->rank) * g->scale;
}

// ---- prompts ----------------------------------------------------------------------------

long prompt_from_record(const Record *rec, PromptPiece **pieces, size_t *cap, Err *err)
{
    if (rec->kind != REC_TEXT)
        return err_set(err, "a tokens record; prompts are text records");
    size_t end = rec->nseg;
    while (end > 0 && (rec->seg[end - 1].flags & REC_TRAINED))
        end--;
    if (end > *cap) {
        PromptPiece *p = realloc(*pieces, end * sizeof *p);
        if (!p)
            return err_set(err, "out of memory");
        *pieces = p;
        *cap = end;
    }
    for (size_t i = 0; i < end; i++) {
        const RecSegment *seg = &rec->seg[i];
        (*pieces)[i] = (PromptPiece){seg->text, seg->len, !!(seg->flags & REC_SPECIAL),
                                     !!(seg->flags & REC_EOS)};
    }
    return (long)end;
}

static int ids_reserve(uint32_t **ids, size_t *cap, size_t need, Err *err)
{
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap : 16;
    while (c < need)
        c *= 2;
    uint32_t *p = realloc(*ids, c * sizeof *p);
    if (!p)
        return err_set(err, "out of memory");
    *ids = p;
    *cap = c;
    return 0;
}

long prompt_encode(const Tokenizer *tok, const PromptPiece *pieces, size_t n_pieces, int add_bos,
                   int64_t bos_id, int64_t eos_id, uint32_t **ids, size_t *cap, Err *err)
{
    size_t n = 0;
    int with_bos = add_bos && bos_id >= 0;
    if (with_bos) {
        if (ids_reserve(ids, cap, 1, err) < 0)
            return -1;
        (*ids)[n++] = (uint32_t)bos_id;
    }
    for (size_t i = 0; i < n_pieces; i++) {
        size_t before = n;
        long got = tokenizer_encode(tok, pieces[i].text, pieces[i].len, pieces[i].special, ids,
                                    cap, n, NULL, err);
        if (got < 0)
            return -1;
        n = (size_t)got;
        // The text's own BOS right after ours: keep one.
        if (with_bos && before == 1 && n > 1 && (*ids)[1] == (uint32_t)bos_id) {
            memmove(*ids + 1, *ids + 2, (n - 2) * sizeof **ids);
            n--;
        }
        if (pieces[i].eos_after && eos_id >= 0) {
            if (ids_reserve(ids, cap, n + 1, err) < 0)
                return -1;
            (*ids)[n++] = (uint32_t)eos_id;
        }
    }
    return (long)n;
}

// ---- construction -----------------------------------------------------------------------

// A float32 view of t: the mapped bytes themselves when they are aligned float32, else a copy.
static int tensor_f32(const Tensor *t, const float **view, float **owned, Err *err, const char *what)
{
    int64_t n = tensor_numel(t);
    *owned = NULL;
    if (t->dtype == DTYPE_F32 && (uintptr_t)t->data % sizeof(float) == 0) {
        *view = t->data;
        return 0;
    }
    if (t->dtype == DTYPE_OTHER)
        return err_set(err, "%s: unsupported dtype", what);
    *owned = malloc((size_t)n * sizeof(float));
    if (!*owned)
        return err_set(err, "%s: out of memory for %lld floats", what, (long long)n);
    tensor_to_f32(t, 0, n, *owned);
    *view = *owned;
    return 0;
}

static float *vector_f32(const Tensor *t, int n, float *dst)
{
    tensor_to_f32(t, 0, n, dst);
    return dst;
}

static void adapter_dims(const ModelConfig *c, int in[ADAPTER_NMODULES], int out[ADAPTER_NMODULES])
{
    for (int p = 0; p < PROJ_COUNT; p++)
        model_proj_dims(c, (Proj)p, &in[p], &out[p]);
}

Generator *generator_new(const Model *m, const Adapter *a, int merge_adapter, Err *err)
{
    const ModelConfig *c = &m->config;
    Generator *g = calloc(1, sizeof *g);
    if (!g) {
        err_set(err, "out of memory");
        return NULL;
    }
    g->model = m;
    g->c = *c;
    g->kv_dim = c->n_kv_heads * c->head_dim;
    g->q_dim = c->n_heads * c->head_dim;
    if (a) {
        int in[ADAPTER_NMODULES], out[ADAPTER_NMODULES];
        adapter_dims(c, in, out);
        if (adapter_check_shapes(a, c->n_layers, in, out, err) < 0)
            goto fail;
    }
    g->proj = calloc((size_t)c->n_layers * PROJ_COUNT, sizeof *g->proj);
    g->attn_norm = malloc((size_t)c->n_layers * c->dim * sizeof(float));
    g->ffn_norm = malloc((size_t)c->n_layers * c->dim * sizeof(float));
    g->final_norm = malloc((size_t)c->dim * sizeof(float));
    g->inv_freq = malloc((size_t)(c->head_dim / 2) * sizeof(float));
    g->logits = malloc((size_t)c->vocab_size * sizeof(float));
    g->k_cache = calloc((size_t)c->n_layers, sizeof *g->k_cache);
    g->v_cache = calloc((size_t)c->n_layers, sizeof *g->v_cache);
#ifdef _OPENMP
    // Parallel regions here are short and many (several per token): on a machine busy with
    // other work, a fixed team spins at every barrier waiting for a descheduled thread and runs
    // many times slower than one thread (measured: 117 s against 17 s). Dynamic teams size
    // themselves to the idle cores. OMP_DYNAMIC in the environment still decides.
    if (!getenv("OMP_DYNAMIC"))
        omp_set_dynamic(1);
    g->n_threads = omp_get_max_threads();
#else
    g->n_threads = 1;
#endif
    if (!g->proj || !g->attn_norm || !g->ffn_norm || !g->final_norm || !g->inv_freq ||
        !g->logits || !g->k_cache || !g->v_cache) {
        err_set(err, "out of memory");
        goto fail;
    }
    rope_inv_freq(c, g->inv_freq);
    vector_f32(&m->weights.final_norm, c->dim, g->final_norm);
    if (tensor_f32(&m->weights.lm_head, &g->lm_head.w, &g->lm_head.owned, err, "lm_head") < 0)
        goto fail;
    g->lm_head.in = c->dim;
    g->lm_head.out = c->vocab_size;

    int unmerged = a && !merge_adapter;
    if (unmerged) {
        // Keep our own copy of A and B so that the caller may free the adapter.
        size_t total = 0;
        for (int l = 0; l < c->n_layers; l++)
            for (int p = 0; p < PROJ_COUNT; p++)
                if (adapter_A(a, l, (AdapterModule)p))
                    total += (size_t)a->cfg.rank * (a->in_dim[p] + a->out_dim[p]);
        g->lora_owned = malloc((total ? total : 1) * sizeof(float));
        if (!g->lora_owned) {
            err_set(err, "out of memory for the adapter");
            goto fail;
        }
        g->rank = a->cfg.rank;
        g->scale = adapter_scale(&a->cfg);
    }
    float *lora_next = g->lora_owned;

    for (int l = 0; l < c->n_layers; l++) {
        const LayerWeights *lw = &m->weights.layers[l];
        vector_f32(&lw->attn_norm, c->dim, g->attn_norm + (size_t)l * c->dim);
        vector_f32(&lw->ffn_norm, c->dim, g->ffn_norm + (size_t)l * c->dim);
        for (int p = 0; p < PROJ_COUNT; p++) {
            Linear *lin = &g->proj[(size_t)l * PROJ_COUNT + p];
            model_proj_dims(c, (Proj)p, &lin->in, &lin->out);
            const float *A = a ? adapter_A(a, l, (AdapterModule)p) : NULL;
            const float *B = a ? adapter_B(a, l, (AdapterModule)p) : NULL;
            char what[64];
            snprintf(what, sizeof what, "layers.%d.%s", l, proj_module_path((Proj)p));
            if (A && merge_adapter) {
                // W' = W + scale * B A into a float32 copy.
                size_t n = (size_t)lin->in * lin->out;
                lin->owned = malloc(n * sizeof(float));
                if (!lin->owned) {
                    err_set(err, "%s: out of memory", what);
                    goto fail;
                }
                tensor_to_f32(&lw->proj[p], 0, (int64_t)n, lin->owned);
                float scale = adapter_scale(&a->cfg);
                int r = a->cfg.rank;
#pragma omp parallel for schedule(static) if ((long)r * n >= PARALLEL_MIN_WORK)
                for (int o = 0; o < lin->out; o++)
                    for (int i = 0; i < lin->in; i++) {
                        float s = 0.0f;
                        for (int k = 0; k < r; k++)
                            s += B[(size_t)o * r + k] * A[(size_t)k * lin->in + i];
                        lin->owned[(size_t)o * lin->in + i] += s * scale;
                    }
                lin->w = lin->owned;
                continue;
            }
            if (tensor_f32(&lw->proj[p], &lin->w, &lin->owned, err, what) < 0)
                goto fail;
            if (A && unmerged) {
                size_t na = (size_t)g->rank * lin->in, nb = (size_t)lin->out * g->rank;
                memcpy(lora_next, A, na * sizeof(float));
                memcpy(lora_next + na, B, nb * sizeof(float));
                lin->A = lora_next;
                lin->B = lora_next + na;
                lora_next += na + nb;
            }
        }
    }
    return g;
fail:
    generator_free(g);
    return NULL;
}

static void free_activations(Generator *g)
{
    free(g->x);
    free(g->xb);
    free(g->q);
    free(g->k);
    free(g->v);
    free(g->att);
    free(g->h1);
    free(g->h2);
    free(g->delta);
    free(g->lora_tmp);
    free(g->rstd);
    free(g->positions);
}

void generator_free(Generator *g)
{
    if (!g)
        return;
    if (g->proj)
        for (size_t i = 0; i < (size_t)g->c.n_layers * PROJ_COUNT; i++)
            free(g->proj[i].owned);
    free(g->proj);
    free(g->lm_head.owned);
    free(g->attn_norm);
    free(g->ffn_norm);
    free(g->final_norm);
    free(g->inv_freq);
    free(g->logits);
    free(g->lora_owned);
    for (int l = 0; g->k_cache && l < g->c.n_layers; l++)
        free(g->k_cache[l]);
    for (int l = 0; g->v_cache && l < g->c.n_layers; l++)
        free(g->v_cache[l]);
    free(g->k_cache);
    free(g->v_cache);
    free(g->scores);
    free_activations(g);
    free(g);
}

void generator_reset(Generator *g)
{
    g->pos = 0;
}

size_t generator_position(const Generator *g)
{
    return g->pos;
}

static int grow(float **p, size_t n, Err *err)
{
    float *q = realloc(*p, (n ? n : 1) * sizeof(float));
    if (!q)
        return err_set(err, "out of memory (%zu floats)", n);
    *p = q;
    return 0;
}

static int ensure_capacity(Generator *g, size_t T, Err *err)
{
    const ModelConfig *c = &g->c;
    size_t need = g->pos + T;
    if (need > g->cache_cap) {
        size_t cap = g->cache_cap ? g->cache_cap : 64;
        while (cap < need)
            cap *= 2;
        for (int l = 0; l < c->n_layers; l++)
            if (grow(&g->k_cache[l], cap * g->kv_dim, err) < 0 ||
                grow(&g->v_cache[l], cap * g->kv_dim, err) < 0)
                return -1;
        if (grow(&g->scores, cap * (size_t)g->n_threads, err) < 0)
            return -1;
        g->cache_cap = cap;
    }
    if (T > g->act_cap) {
        size_t widest = (size_t)c->dim;
        if ((size_t)c->hidden_dim > widest)
            widest = c->hidden_dim;
        if ((size_t)g->q_dim > widest)
            widest = g->q_dim;
        if (grow(&g->x, T * c->dim, err) < 0 || grow(&g->xb, T * c->dim, err) < 0 ||
            grow(&g->q, T * g->q_dim, err) < 0 || grow(&g->k, T * g->kv_dim, err) < 0 ||
            grow(&g->v, T * g->kv_dim, err) < 0 || grow(&g->att, T * g->q_dim, err) < 0 ||
            grow(&g->h1, T * c->hidden_dim, err) < 0 || grow(&g->h2, T * c->hidden_dim, err) < 0 ||
            grow(&g->delta, T * widest, err) < 0 ||
            grow(&g->lora_tmp, T * (size_t)(g->rank ? g->rank : 1), err) < 0 ||
            grow(&g->rstd, T, err) < 0)
            return -1;
        int32_t *pos = realloc(g->positions, T * sizeof *pos);
        if (!pos)
            return err_set(err, "out of memory");
        g->positions = pos;
        g->act_cap = T;
    }
    return 0;
}

// ---- the forward pass -------------------------------------------------------------------

// Causal attention of the T new queries (at positions pos0 .. pos0+T-1) over the cache.
static void attention(Generator *g, int layer, size_t pos0, int T)
{
    const ModelConfig *c = &g->c;
    int hd = c->head_dim, group = c->n_heads / c->n_kv_heads;
    const float *kc = g->k_cache[layer], *vc = g->v_cache[layer];
    float inv_sqrt = 1.0f / sqrtf((float)hd);
    long work = (long)T * c->n_heads * (long)(pos0 + T) * hd * 2;
#pragma omp parallel for collapse(2) schedule(static) if (work >= PARALLEL_MIN_WORK)
    for (int t = 0; t < T; t++)
        for (int h = 0; h < c->n_heads; h++) {
#ifdef _OPENMP
            float *sc = g->scores + (size_t)omp_get_thread_num() * g->cache_cap;
#else
            float *sc = g->scores;
#endif
            size_t qpos = pos0 + t;
            size_t first = 0;
            if (c->sliding_window > 0 && qpos + 1 > (size_t)c->sliding_window)
                first = qpos + 1 - c->sliding_window;
            const float *q = g->q + (size_t)t * g->q_dim + (size_t)h * hd;
            int kvh = h / group;
            float max = -INFINITY;
            for (size_t p = first; p <= qpos; p++) {
                sc[p] = dot(q, kc + p * g->kv_dim + (size_t)kvh * hd, hd) * inv_sqrt;
                if (sc[p] > max)
                    max = sc[p];
            }
            float sum = 0.0f;
            for (size_t p = first; p <= qpos; p++) {
                sc[p] = expf(sc[p] - max);
                sum += sc[p];
            }
            float *out = g->att + (size_t)t * g->q_dim + (size_t)h * hd;
            for (int i = 0; i < hd; i++)
                out[i] = 0.0f;
            for (size_t p = first; p <= qpos; p++) {
                float w = sc[p] / sum;
                const float *v = vc + p * g->kv_dim + (size_t)kvh * hd;
                for (int i = 0; i < hd; i++)
                    out[i] += w * v[i];
            }
        }
}

float *generator_forward(Generator *g, const uint32_t *ids, size_t n, Err *err)
{
    const ModelConfig *c = &g->c;
    if (n == 0) {
        err_set(err, "forward: no tokens");
        return NULL;
    }
    for (size_t t = 0; t < n; t++)
        if (ids[t] >= (uint32_t)c->vocab_size) {
            err_set(err, "token id %u is out of the vocabulary (%d)", ids[t], c->vocab_size);
            return NULL;
        }
    if (ensure_capacity(g, n, err) < 0)
        return NULL;
    int T = (int)n, dim = c->dim;
    size_t pos0 = g->pos;

    for (int t = 0; t < T; t++) {
        tensor_to_f32(&g->model->weights.embed, (int64_t)ids[t] * dim, dim, g->x + (size_t)t * dim);
        g->positions[t] = (int32_t)(pos0 + t);
    }

    for (int l = 0; l < c->n_layers; l++) {
        const Linear *P = &g->proj[(size_t)l * PROJ_COUNT];
        cpu_rmsnorm_forward(g->xb, g->rstd, g->x, g->attn_norm + (size_t)l * dim, T, dim, c->norm_eps);
        linear_forward(g, &P[PROJ_Q], g->q, g->xb, T);
        linear_forward(g, &P[PROJ_K], g->k, g->xb, T);
        linear_forward(g, &P[PROJ_V], g->v, g->xb, T);
        cpu_rope_forward(g->q, g->q, g->positions, g->inv_freq, T, c->n_heads, c->head_dim);
        cpu_rope_forward(g->k, g->k, g->positions, g->inv_freq, T, c->n_kv_heads, c->head_dim);
        memcpy(g->k_cache[l] + pos0 * g->kv_dim, g->k, (size_t)T * g->kv_dim * sizeof(float));
        memcpy(g->v_cache[l] + pos0 * g->kv_dim, g->v, (size_t)T * g->kv_dim * sizeof(float));
        attention(g, l, pos0, T);
        linear_forward(g, &P[PROJ_O], g->delta, g->att, T);
        for (size_t i = 0; i < (size_t)T * dim; i++)
            g->x[i] += g->delta[i];

        cpu_rmsnorm_forward(g->xb, g->rstd, g->x, g->ffn_norm + (size_t)l * dim, T, dim, c->norm_eps);
        linear_forward(g, &P[PROJ_GATE], g->h1, g->xb, T);
        linear_forward(g, &P[PROJ_UP], g->h2, g->xb, T);
        cpu_swiglu_forward(g->h1, g->h1, g->h2, (size_t)T * c->hidden_dim);
        linear_forward(g, &P[PROJ_DOWN], g->delta, g->h1, T);
        for (size_t i = 0; i < (size_t)T * dim; i++)
            g->x[i] += g->delta[i];
    }
    g->pos += n;

    // Only the last position's logits are needed.
    float *last = g->x + (size_t)(T - 1) * dim;
    cpu_rmsnorm_forward(g->xb, g->rstd, last, g->final_norm, 1, dim, c->norm_eps);
    matmul(g->logits, g->xb, g->lm_head.w, 1, dim, c->vocab_size);
    return g->logits;
}

// ---- the generation loop ----------------------------------------------------------------

const char *gen_stop_name(GenStop s)
{
    switch (s) {
    case GEN_STOP_EOS: return "eos";
    case GEN_STOP_LENGTH: return "length";
    case GEN_STOP_STRING: return "stop-string";
    }
    return "?";
}

static int text_reserve(Text *t, size_t more, Err *err)
{
    if (t->len + more + 1 <= t->cap)
        return 0;
    size_t cap = t->cap ? t->cap : 256;
    while (cap < t->len + more + 1)
        cap *= 2;
    char *b = realloc(t->buf, cap);
    if (!b)
        return err_set(err, "out of memory");
    t->buf = b;
    t->cap = cap;
    return 0;
}

// The longest k < strlen(stop) such that text ends with the first k bytes of stop: bytes that
// may yet become a stop string and so must not be printed.
static size_t stop_prefix_at_end(const char *text, size_t len, const char *stop)
{
    size_t sl = strlen(stop);
    for (size_t k = sl - 1; k > 0; k--)
        if (k <= len && memcmp(text + len - k, stop, k) == 0)
            return k;
    return 0;
}

static int is_stop_id(const GenLimits *lim, uint32_t id)
{
    for (size_t i = 0; i < lim->n_stop_ids; i++)
        if (lim->stop_ids[i] == id)
            return 1;
    return 0;
}

// Whether the tokenizer's decoder drops the leading space of the text's first token (the
// SentencePiece convention): ask it about this one token.
static int decoder_strips_space(const Tokenizer *tok, uint32_t id, const char *bytes, size_t n)
{
    if (n == 0 || bytes[0] != ' ')
        return 0;
    char *out = NULL;
    size_t cap = 0;
    long len = tokenizer_decode(tok, &id, 1, 1, &out, &cap, 0, NULL);
    int strips = len >= 0 && (size_t)len + 1 == n && memcmp(out, bytes + 1, n - 1) == 0;
    free(out);
    return strips;
}

static int prompt_has_text(const Tokenizer *tok, const uint32_t *prompt, size_t n, Err *err)
{
    char *out = NULL;
    size_t cap = 0;
    long len = tokenizer_decode(tok, prompt, n, 1, &out, &cap, 0, err);
    free(out);
    return len < 0 ? -1 : len > 0;
}

struct GenSeq {
    const Tokenizer *tok;
    const GenLimits *lim;
    size_t max_stop;             // longest stop string
    uint32_t *hist;              // (n_hist) prompt then output ids
    size_t n_hist, hist_cap, n_prompt;
    Text text;                   // the output so far
    Utf8Stream u8;
    size_t emitted;              // bytes of text already handed to emit
    int first_piece;             // the next text may lose its leading space to the decoder
    GenStop stop;
};

GenSeq *gen_seq_new(const Tokenizer *tok, const GenLimits *lim, Err *err)
{
    GenSeq *s = calloc(1, sizeof *s);
    if (!s)
        return err_set(err, "out of memory"), (GenSeq *)NULL;
    s->tok = tok;
    s->lim = lim;
    for (size_t i = 0; i < lim->n_stop_strings; i++)
        if (strlen(lim->stop_strings[i]) > s->max_stop)
            s->max_stop = strlen(lim->stop_strings[i]);
    return s;
}

void gen_seq_free(GenSeq *s)
{
    if (!s)
        return;
    free(s->hist);
    free(s->text.buf);
    free(s);
}

int gen_seq_begin(GenSeq *s, const uint32_t *prompt, size_t n, Err *err)
{
    if (n == 0)
        return err_set(err, "empty prompt (no BOS and no text)");
    int has_text = prompt_has_text(s->tok, prompt, n, err);
    if (has_text < 0)
        return -1;
    if (ids_reserve(&s->hist, &s->hist_cap, n + (size_t)s->lim->max_new_tokens + 1, err) < 0)
        return -1;
    memcpy(s->hist, prompt, n * sizeof *prompt);
    s->n_hist = s->n_prompt = n;
    s->text.len = 0;
    memset(&s->u8, 0, sizeof s->u8);
    s->emitted = 0;
    s->first_piece = !has_text;
    s->stop = GEN_STOP_LENGTH;
    return 0;
}

const uint32_t *gen_seq_history(const GenSeq *s, size_t *n)
{
    *n = s->n_hist;
    return s->hist;
}

size_t gen_seq_new_tokens(const GenSeq *s) { return s->n_hist - s->n_prompt; }

int gen_seq_push(GenSeq *s, uint32_t id, GenEmit emit, void *ctx, Err *err)
{
    const GenLimits *lim = s->lim;
    if (ids_reserve(&s->hist, &s->hist_cap, s->n_hist + 1, err) < 0)
        return -1;
    s->hist[s->n_hist++] = id;
    if (is_stop_id(lim, id)) {
        s->stop = GEN_STOP_EOS;
        return 1;
    }
    if (tokenizer_is_special(s->tok, id))
        return 0;
    size_t nb = 0;
    const char *bytes = tokenizer_token_bytes(s->tok, id, &nb);
    if (!bytes)
        return err_set(err, "token id %u has no text in the tokenizer", id);
    if (nb == 0)
        return 0;
    if (s->first_piece) {
        if (decoder_strips_space(s->tok, id, bytes, nb)) {
            bytes++;
            nb--;
        }
        s->first_piece = 0;
    }
    Text *text = &s->text;
    if (text_reserve(text, 3 * (nb + 4), err) < 0)
        return -1;
    size_t old = text->len;
    text->len += utf8_stream_feed(&s->u8, bytes, nb, text->buf + text->len);

    // A stop string anywhere in the new bytes (or straddling into them) ends the output before it.
    size_t from = old >= s->max_stop ? old - s->max_stop + 1 : 0, cut = SIZE_MAX;
    for (size_t i = 0; i < lim->n_stop_strings; i++) {
        const char *hit = memmem(text->buf + from, text->len - from, lim->stop_strings[i],
                                 strlen(lim->stop_strings[i]));
        if (hit && (size_t)(hit - text->buf) < cut)
            cut = (size_t)(hit - text->buf);
    }
    if (cut != SIZE_MAX) {
        text->len = cut;
        s->u8.nheld = 0;
        s->stop = GEN_STOP_STRING;
        return 1;
    }
    size_t hold = 0;
    for (size_t i = 0; i < lim->n_stop_strings; i++) {
        size_t k = stop_prefix_at_end(text->buf, text->len, lim->stop_strings[i]);
        if (k > hold)
            hold = k;
    }
    if (text->len - hold > s->emitted) {
        if (emit && emit(ctx, text->buf + s->emitted, text->len - hold - s->emitted) < 0)
            return err_set(err, "output refused");
        s->emitted = text->len - hold;
    }
    return 0;
}

int gen_seq_end(GenSeq *s, GenEmit emit, void *ctx, GenResult *res, Err *err)
{
    Text *text = &s->text;
    // The end: bytes held for UTF-8 become U+FFFD, bytes held for a stop prefix are text.
    if (text_reserve(text, 12, err) < 0)
        return -1;
    text->len += utf8_stream_finish(&s->u8, text->buf + text->len);
    if (text->len > s->emitted && emit && emit(ctx, text->buf + s->emitted, text->len - s->emitted) < 0)
        return err_set(err, "output refused");
    s->emitted = text->len;
    text->buf[text->len] = '\0';
    res->stop = s->stop;
    res->n_tokens = gen_seq_new_tokens(s);
    res->text = text->buf;
    res->len = text->len;
    return 0;
}

int generate(Generator *g, GenSeq *seq, Sampler *s, const uint32_t *prompt, size_t n_prompt, uint64_t stream,
             GenEmit emit, void *ctx, GenResult *res, Err *err)
{
    const ModelConfig *c = &g->c;
    size_t max_ctx = c->max_seq_len > 0 ? (size_t)c->max_seq_len : SIZE_MAX;
    if (n_prompt > max_ctx)
        return err_set(err, "prompt of %zu tokens is longer than the model's context of %zu", n_prompt, max_ctx);
    if (gen_seq_begin(seq, prompt, n_prompt, err) < 0)
        return -1;
    generator_reset(g);
    float *logits = generator_forward(g, prompt, n_prompt, err);
    if (!logits)
        return -1;
    for (;;) {
        size_t n_new = gen_seq_new_tokens(seq), n_hist;
        if (n_new >= (size_t)seq->lim->max_new_tokens || n_prompt + n_new >= max_ctx)
            break;
        const uint32_t *hist = gen_seq_history(seq, &n_hist);
        if (n_new > 0 && !(logits = generator_forward(g, &hist[n_hist - 1], 1, err)))
            return -1;
        uint32_t id = sampler_pick(s, logits, hist, n_hist, stream, n_new);
        int rc = gen_seq_push(seq, id, emit, ctx, err);
        if (rc < 0)
            return -1;
        if (rc == 1)
            break;
    }
    return gen_seq_end(seq, emit, ctx, res, err);
}
