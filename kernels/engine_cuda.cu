// The CUDA training step (kernels/engine_cuda.cuh): the CPU reference's forward and backward
// (lib/engine_cpu.c) with bf16 storage and fp32 accumulation. It reads in the order a step
// runs: device state, weights, the products, attention for odd head sizes, then the model.
//
// Shapes: N = B*T positions (flattened row-major), D = dim, Hq/Hkv = query and key-value heads,
// hd = head_dim, QD = Hq*hd, KD = Hkv*hd, F = hidden_dim, V = vocab, r = LoRA rank.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "attention.cuh"
#include "cross_entropy.cuh"
#include "cuda_check.cuh"
#include "embedding.cuh"
#include "engine_cuda.cuh"
#include "rmsnorm.cuh"
#include "rope.cuh"
#include "swiglu.cuh"
#include "weights.cuh"

// Cross-entropy: blocks of tokens over the whole vocabulary (two products; kernels/NOTES.md), as
// many tokens a block as keep its fp32 logits within CE_BLOCK_BYTES (-D to try others): 512 MiB,
// 1024 tokens at V 128256.
#ifndef CE_BLOCK_BYTES
#define CE_BLOCK_BYTES ((size_t)1 << 29)
#endif

// LoRA folded into the base products (kernels/NOTES.md, "Issue 6, part 4"). A targeted
// projection's y = x W^T + s (x A^T) B^T and, backward, dx = dy W + du A (du = s dy B) each
// become ONE product by giving the input x spare columns that hold u = x A^T and the gradient dy
// spare columns that hold du, and storing the weight with spare columns and rows:
//     W' = [[W, s B, 0], [A, 0, 0]]      ((out + out_spare) x (in + in_spare), bf16)
//     y = [x | u] W'[0:out, :]^T         dx = [dy | du] W'[:, 0:in]
// Projections that read the same x share its spare columns (q, k, v on xn1; gate, up on xn2; down
// on act), each its own r of them, zeros in the others' places in W'; the same for dy (o and down
// both take the residual gradient d_x; gate and up have a dy each). o's input (attention's output)
// and q, k, v's dy (attention's gradients) have no spare columns: there LoRA's u and du are
// separate products, added with a read-modify-write, as before. Spare widths are rounded up to
// 8 columns (16-byte rows); the padding columns hold zeros, in W' and in the buffers.
enum { GROUP_XN1, GROUP_XN2, GROUP_ACT, IN_GROUPS };              // inputs with spare columns
enum { GROUP_DX, GROUP_DGATE, GROUP_DUP, OUT_GROUPS };            // gradients with spare columns
static const int IN_GROUP[PROJ_COUNT] = {GROUP_XN1, GROUP_XN1, GROUP_XN1, -1, GROUP_XN2, GROUP_XN2, GROUP_ACT};
static const int OUT_GROUP[PROJ_COUNT] = {-1, -1, -1, GROUP_DX, GROUP_DGATE, GROUP_DUP, GROUP_DX};

typedef struct {
    int in_spare, out_spare;         // spare columns of the input / of dy (0: not folded on that side)
    int u_col, du_col;               // this projection's u / du among them; -1: not there
    int ldw;                         // row stride of W' = in + in_spare
} ProjFold;

// One bf16 copy of the LoRA parameters into the folded places (lora_fold_kernel).
typedef struct {
    const float *src;                // (rows, cols) dense fp32, in the flat parameters
    bf16_t *dst;                     // rows ld apart
    int rows, cols, ld;
    float scale;
} FoldCopy;

typedef struct {
    bf16_t *attn_norm;               // (D)
    bf16_t *proj[PROJ_COUNT];        // W' (out + out_spare, ldw): W (out, in) top left, see model_proj_dims
    bf16_t *ffn_norm;                // (D)
    bf16_t *a_stack[IN_GROUPS];      // (in_spare, in): the group's A one after another, for u = x A^T
} LayerDev;

// Per layer activations kept for the backward pass (bf16 unless said). A layer that recomputes
// (its mode CUDA_RECOMPUTE_LAYER) owns only x_in; every other pointer is into one set that the
// recomputing layers share (alloc_buffers). With CUDA_RECOMPUTE_MLP it also owns q, k, v, attn, lse, x_mid and o's
// lora_u; with CUDA_RECOMPUTE_NONE everything.
typedef struct {
    bf16_t *x_in;                    // (N, D)  residual stream entering the layer
    bf16_t *xn1;                     // (N, D + spare): normed input, then the q, k, v LoRA u
    float *rstd1;                    // (N)
    bf16_t *q;                       // (N, QD) after RoPE
    bf16_t *k, *v;                   // (N, KD) k after RoPE
    bf16_t *attn;                    // (N, QD) attention output
    float *lse;                      // (N, Hq) log-sum-exp of each query's scores
    bf16_t *x_mid;                   // (N, D)
    bf16_t *xn2;                     // (N, D + spare), then the gate, up LoRA u
    float *rstd2;                    // (N)
    bf16_t *gate, *up;               // (N, F)
    bf16_t *act;                     // (N, F + spare), then the down LoRA u
    bf16_t *lora_u[PROJ_COUNT];      // (N, r) A x for targeted projections whose input has no spare columns
} LayerActs;

struct CudaEngine {
    ModelConfig c;
    LoraConfig lc;
    float scale;                     // LoRA scale
    int max_B, max_T;
    CudaRecompute *layer_mode;       // (n_layers) NONE, MLP or LAYER, from the bottom up (plan_layers)
    int last_shared;                 // the highest layer that uses the shared set; -1: none does
    bool dry_run;                    // planning: dev_alloc only counts bytes
    int last_N;                      // positions of the last micro-batch
    size_t weight_bytes;             // base weights on the device
    double load_seconds;             // their upload
    cudaStream_t stream;             // a blocking stream: the synchronous copies (weights, LoRA) order with it
    cublasHandle_t blas;
    // The LoRA weight-gradient products (dB, dA), which nothing in the step reads, run on a second
    // stream of lower priority, beside the products of the main one; side_done[p]: projection p's
    // last ones. NULL side: all on the main stream (CudaEngineOptions.one_stream, and profiling).
    cudaStream_t side;
    cublasHandle_t blas_side;
    cudaEvent_t fork, side_done[PROJ_COUNT];
    std::vector<void *> *allocs;     // every cudaMalloc, freed together
    size_t device_bytes;

    bf16_t *embed, *lm_head, *final_norm;   // (V, D), (V, D) (= embed when tied), (D)
    LayerDev *layers;                // (n_layers) host array of device pointers
    LayerActs *acts;                 // (n_layers)
    bf16_t *x_final, *xnf;           // (N, D)
    float *rstdf;                    // (N)
    float *inv_freq;                 // (hd/2)

    // LoRA: flat fp32 parameters and gradients (lib/lora.h layout), a bf16 copy for products.
    size_t n_params;
    float *params, *grads;
    bf16_t *params_bf16;
    long *off_A, *off_B;             // (n_layers * PROJ_COUNT) offsets into the flat arrays; -1: untargeted
    ProjFold fold[PROJ_COUNT];
    int ld_in[IN_GROUPS], ld_out[OUT_GROUPS];   // row strides of xn1, xn2, act and of d_x, d_gate = d_up
    FoldCopy *fold_copies;           // device (n_fold_copies)
    int n_fold_copies;

    // The batch on the device, and host staging.
    int32_t *tokens, *targets, *positions, *cu_seqlens, *seq_start;   // (N), cu_seqlens (N + 1)
    int32_t *host_cu, *host_seq_start;                                // (N + 1), (N)
    float *losses, *host_losses;     // (N)

    // Backward scratch.
    bf16_t *d_x;                     // (N, D + spare), then the o and down LoRA du
    bf16_t *d_xn;                    // (N, D)
    bf16_t *d_q, *d_attn;            // (N, QD)
    bf16_t *d_k, *d_v;               // (N, KD)
    bf16_t *d_gate, *d_up;           // (N, F + spare), then the gate / up LoRA du
    bf16_t *d_act;                   // (N, F)
    bf16_t *d_u;                     // (N, xn1's spare) du of q, k, v, as their u in xn1
    float *d_k32, *d_v32;            // (N, KD) fp32 sums of the plain attention backward
    void *attn_ws, *ce_ws;
    size_t attn_ws_bytes, ce_ws_bytes;
    int ce_token_chunk, ce_vocab_chunk;

    struct Profile *prof;            // cuda_engine_profile; NULL: off
    bool recomputing;                // a layer's forward is being rerun (profile labels)
};

// ---- profile (benchmarks only) ----------------------------------------------------------------

// An event after every operation of a step; the time between two events is charged to the label
// of the second. Sums by label over the profiled steps.
struct Profile {
    std::vector<cudaEvent_t> events;      // a pool, grown between steps only
    std::vector<std::string> labels;      // labels[i]: the operation that ends at events[i + 1]
    size_t used;                          // events recorded this step
    std::map<std::string, double> ms;     // summed over steps
    int steps;
};

// Marks the end of an operation (p >= 0: of projection p, whose name is appended).
// Returns 0, to sit in the || chains of the step.
static int tick(CudaEngine *e, const char *what, int p = -1)
{
    Profile *f = e->prof;
    if (!f)
        return 0;
    if (f->used == f->events.size()) {   // the first step of a shape grows the pool
        cudaEvent_t ev;
        if (cudaEventCreate(&ev) != cudaSuccess)
            return 0;
        f->events.push_back(ev);
    }
    cudaEventRecord(f->events[f->used], e->stream);
    if (f->used > 0) {
        std::string label = e->recomputing ? std::string("recompute ") + what : std::string(what);
        if (p >= 0)
            label += std::string(" ") + proj_name((Proj)p);
        if (f->labels.size() < f->used)
            f->labels.resize(f->used);
        f->labels[f->used - 1] = label;
    }
    f->used++;
    return 0;
}

// After a step's synchronisation: add its intervals to the sums.
static void profile_collect(CudaEngine *e)
{
    Profile *f = e->prof;
    if (!f)
        return;
    for (size_t i = 1; i < f->used; i++) {
        float ms = 0;
        cudaEventElapsedTime(&ms, f->events[i - 1], f->events[i]);
        f->ms[f->labels[i - 1]] += ms;
    }
    f->used = 0;
    f->steps++;
}

int cuda_engine_profile(CudaEngine *e, int on, Err *err)
{
    if (!on) {
        if (e->prof)
            for (cudaEvent_t ev : e->prof->events)
                cudaEventDestroy(ev);
        delete e->prof;
        e->prof = NULL;
        return 0;
    }
    if (!e->prof)
        e->prof = new Profile();
    e->prof->used = 0;
    e->prof->ms.clear();
    e->prof->steps = 0;
    (void)err;
    return 0;
}

void cuda_engine_profile_report(CudaEngine *e, FILE *out)
{
    Profile *f = e->prof;
    if (!f || !f->steps)
        return;
    std::vector<std::pair<double, std::string>> rows;
    std::map<std::string, double> groups;    // by the label's first word
    double total = 0;
    for (auto &kv : f->ms) {
        double ms = kv.second / f->steps;
        rows.push_back({ms, kv.first});
        groups[kv.first.substr(0, kv.first.find(' '))] += ms;
        total += ms;
    }
    std::sort(rows.rbegin(), rows.rend());
    fprintf(out, "# profile: %.2f ms a step (%d steps), by group\n", total, f->steps);
    for (auto &g : groups)
        fprintf(out, "#   %-12s %8.2f ms %5.1f%%\n", g.first.c_str(), g.second, 100 * g.second / total);
    fprintf(out, "# by operation\n");
    for (auto &r : rows)
        fprintf(out, "#   %-28s %8.3f ms %5.1f%%\n", r.second.c_str(), r.first, 100 * r.first / total);
}

// zero: clear the buffer too (once, at create).
static int dev_alloc(CudaEngine *e, void **p, size_t bytes, Err *err, bool zero = false)
{
    *p = NULL;
    if (e->dry_run) {
        e->device_bytes += bytes;
        return 0;
    }
    CUDA_CHECK(cudaMalloc(p, bytes ? bytes : 16), err);
    e->allocs->push_back(*p);
    e->device_bytes += bytes;
    if (zero)
        CUDA_CHECK(cudaMemset(*p, 0, bytes), err);
    return 0;
}
#define ALLOC(ptr, count)                                                                         \
    do {                                                                                          \
        if (dev_alloc(e, (void **)&(ptr), (size_t)(count) * sizeof *(ptr), err) < 0)              \
            goto fail;                                                                            \
    } while (0)
// Buffers with LoRA spare columns that no product writes before the folded products read them
// (padding; another projection's du before its backward; the A stacks' padding rows): they are
// read against zeros of W' and must be finite, so they start as zeros.
#define ALLOC_ZERO(ptr, count)                                                                    \
    do {                                                                                          \
        if (dev_alloc(e, (void **)&(ptr), (size_t)(count) * sizeof *(ptr), err, true) < 0)        \
            goto fail;                                                                            \
    } while (0)

void cuda_engine_free(CudaEngine *e)
{
    if (!e)
        return;
    cuda_engine_profile(e, 0, NULL);
    if (e->allocs)
        for (void *p : *e->allocs)
            cudaFree(p);
    delete e->allocs;
    if (e->blas)
        cublasDestroy(e->blas);
    if (e->blas_side)
        cublasDestroy(e->blas_side);
    if (e->fork)
        cudaEventDestroy(e->fork);
    for (cudaEvent_t ev : e->side_done)
        if (ev)
            cudaEventDestroy(ev);
    if (e->side)
        cudaStreamDestroy(e->side);
    if (e->stream)
        cudaStreamDestroy(e->stream);
    free(e->layers);
    free(e->acts);
    free(e->layer_mode);
    free(e->off_A);
    free(e->off_B);
    free(e->host_cu);
    free(e->host_seq_start);
    free(e->host_losses);
    free(e);
}

size_t cuda_engine_device_bytes(const CudaEngine *e) { return e->device_bytes; }

CudaRecompute cuda_engine_recompute(const CudaEngine *e) { return e->layer_mode[0]; }

int cuda_engine_layers_in(const CudaEngine *e, CudaRecompute r)
{
    int n = 0;
    for (int l = 0; l < e->c.n_layers; l++)
        n += e->layer_mode[l] == r;
    return n;
}

void cuda_engine_describe_plan(const CudaEngine *e, char *buf, size_t size)
{
    CudaRecompute first = e->layer_mode[0];
    int at = snprintf(buf, size, "%s", cuda_recompute_name(first)), others = 0;
    for (CudaRecompute r : {CUDA_RECOMPUTE_NONE, CUDA_RECOMPUTE_MLP, CUDA_RECOMPUTE_LAYER}) {
        int n = cuda_engine_layers_in(e, r);
        if (r == first || !n || at < 0 || (size_t)at >= size)
            continue;
        at += snprintf(buf + at, size - at, "%s%s in %d", others++ ? ", " : " (", cuda_recompute_name(r), n);
    }
    if (others && at >= 0 && (size_t)at < size)
        snprintf(buf + at, size - at, " of %d layers)", e->c.n_layers);
}

const char *cuda_recompute_name(CudaRecompute r)
{
    switch (r) {
    case CUDA_RECOMPUTE_NONE: return "none";
    case CUDA_RECOMPUTE_MLP: return "mlp";
    case CUDA_RECOMPUTE_LAYER: return "layer";
    default: return "auto";
    }
}

void cuda_engine_load_stats(const CudaEngine *e, size_t *weight_bytes, double *seconds)
{
    *weight_bytes = e->weight_bytes;
    *seconds = e->load_seconds;
}

void cuda_engine_lora_buffers(CudaEngine *e, float **params, float **grads, size_t *n_params, GpuStream *stream)
{
    *params = e->params;
    *grads = e->grads;
    *n_params = e->n_params;
    *stream = e->stream;
}

// ---- LoRA folding ---------------------------------------------------------------------------

static int round8(int n) { return (n + 7) / 8 * 8; }

// Spare columns and places of u and du for every projection (the same in every layer).
static void plan_fold(CudaEngine *e)
{
    int r = e->lc.rank, n_in[IN_GROUPS] = {0}, n_out[OUT_GROUPS] = {0};
    for (int p = 0; p < PROJ_COUNT; p++) {
        ProjFold *f = &e->fold[p];
        f->u_col = f->du_col = -1;
        if (!(e->lc.targets & (1u << p)))
            continue;
        if (IN_GROUP[p] >= 0)
            f->u_col = r * n_in[IN_GROUP[p]]++;
        if (OUT_GROUP[p] >= 0)
            f->du_col = r * n_out[OUT_GROUP[p]]++;
    }
    int ins[3] = {e->c.dim, e->c.dim, e->c.hidden_dim}, outs[3] = {e->c.dim, e->c.hidden_dim, e->c.hidden_dim};
    for (int p = 0; p < PROJ_COUNT; p++) {
        ProjFold *f = &e->fold[p];
        int in, out;
        model_proj_dims(&e->c, (Proj)p, &in, &out);
        f->in_spare = IN_GROUP[p] >= 0 ? round8(r * n_in[IN_GROUP[p]]) : 0;
        f->out_spare = OUT_GROUP[p] >= 0 ? round8(r * n_out[OUT_GROUP[p]]) : 0;
        f->ldw = in + f->in_spare;
    }
    for (int g = 0; g < IN_GROUPS; g++)
        e->ld_in[g] = ins[g] + round8(r * n_in[g]);
    // d_gate and d_up go through one SwiGLU backward: one row stride for both.
    int gu = round8(r * (n_out[GROUP_DGATE] > n_out[GROUP_DUP] ? n_out[GROUP_DGATE] : n_out[GROUP_DUP]));
    e->ld_out[GROUP_DX] = outs[GROUP_DX] + round8(r * n_out[GROUP_DX]);
    e->ld_out[GROUP_DGATE] = e->ld_out[GROUP_DUP] = outs[GROUP_DGATE] + gu;
}

// blockIdx.y: which copy; the blocks along x stride over its elements.
__global__ void lora_fold_kernel(const FoldCopy *copies)
{
    FoldCopy c = copies[blockIdx.y];
    size_t n = (size_t)c.rows * c.cols;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        size_t row = i / c.cols;
        c.dst[row * c.ld + (i - row * c.cols)] = __float2bfloat16(c.scale * c.src[i]);
    }
}

// The copies of every layer's A and B into W' (s B beside W, A below it) and into the A stacks.
static int build_fold_copies(CudaEngine *e, Err *err)
{
    std::vector<FoldCopy> copies;
    int r = e->lc.rank;
    for (int l = 0; l < e->c.n_layers; l++)
        for (int p = 0; p < PROJ_COUNT; p++) {
            long oa = e->off_A[(size_t)l * PROJ_COUNT + p], ob = e->off_B[(size_t)l * PROJ_COUNT + p];
            const ProjFold *f = &e->fold[p];
            if (oa < 0)
                continue;
            int in, out;
            model_proj_dims(&e->c, (Proj)p, &in, &out);
            bf16_t *w = e->layers[l].proj[p];
            if (f->u_col >= 0) {
                copies.push_back({e->params + ob, w + in + f->u_col, out, r, f->ldw, e->scale});
                copies.push_back({e->params + oa, e->layers[l].a_stack[IN_GROUP[p]] + (size_t)f->u_col * in, r, in,
                                  in, 1.0f});
            }
            if (f->du_col >= 0)
                copies.push_back({e->params + oa, w + (size_t)(out + f->du_col) * f->ldw, r, in, f->ldw, 1.0f});
        }
    e->n_fold_copies = (int)copies.size();
    if (copies.empty())
        return 0;
    if (dev_alloc(e, (void **)&e->fold_copies, copies.size() * sizeof(FoldCopy), err) < 0)
        return -1;
    CUDA_CHECK(cudaMemcpy(e->fold_copies, copies.data(), copies.size() * sizeof(FoldCopy), cudaMemcpyHostToDevice),
               err);
    return 0;
}

// The bf16 parameters of this step: the flat copy (unfolded products) and the folded places.
static int cast_lora(CudaEngine *e, Err *err)
{
    if (cuda_f32_to_bf16(e->params_bf16, e->params, e->n_params, e->stream, err) < 0)
        return -1;
    if (e->n_fold_copies) {
        lora_fold_kernel<<<dim3(32, e->n_fold_copies), 256, 0, e->stream>>>(e->fold_copies);
        LAUNCH_CHECK(err);
    }
    return tick(e, "lora cast");
}

// ---- weights --------------------------------------------------------------------------------

// Allocates out for t and queues it for the one batched upload (kernels/weights.cuh). With
// spare_rows or ld > cols (a projection's W'), the buffer is (rows + spare_rows, ld), zeroed, and t
// lands in its top left.
static int plan_weight(CudaEngine *e, std::vector<CudaTensorUpload> *jobs, bf16_t **out, const Tensor *t, Err *err,
                       int64_t cols = 0, int64_t ld = 0, int64_t spare_rows = 0)
{
    size_t n = (size_t)tensor_numel(t);
    bool padded = ld > cols || spare_rows > 0;
    size_t bytes = padded ? (size_t)(n / cols + spare_rows) * ld * 2 : n * 2;
    if (dev_alloc(e, (void **)out, bytes, err) < 0)
        return -1;
    if (padded)
        CUDA_CHECK(cudaMemsetAsync(*out, 0, bytes, e->stream), err);
    CudaTensorUpload job = {*out, t, padded ? cols : 0, padded ? ld : 0};
    jobs->push_back(job);
    e->weight_bytes += n * 2;
    return 0;
}

static int upload_weights(CudaEngine *e, const Model *m, Err *err)
{
    std::vector<CudaTensorUpload> jobs;
    if (plan_weight(e, &jobs, &e->embed, &m->weights.embed, err) < 0 ||
        plan_weight(e, &jobs, &e->final_norm, &m->weights.final_norm, err) < 0)
        return -1;
    if (e->c.tie_embeddings)
        e->lm_head = e->embed;
    else if (plan_weight(e, &jobs, &e->lm_head, &m->weights.lm_head, err) < 0)
        return -1;
    for (int l = 0; l < e->c.n_layers; l++) {
        const LayerWeights *w = &m->weights.layers[l];
        if (plan_weight(e, &jobs, &e->layers[l].attn_norm, &w->attn_norm, err) < 0 ||
            plan_weight(e, &jobs, &e->layers[l].ffn_norm, &w->ffn_norm, err) < 0)
            return -1;
        for (int p = 0; p < PROJ_COUNT; p++) {
            int in, out;
            model_proj_dims(&e->c, (Proj)p, &in, &out);
            if (plan_weight(e, &jobs, &e->layers[l].proj[p], &w->proj[p], err, in, e->fold[p].ldw,
                            e->fold[p].out_spare) < 0)
                return -1;
        }
    }
    auto t0 = std::chrono::steady_clock::now();
    if (cuda_upload_tensors_bf16(jobs.data(), (int)jobs.size(), e->stream, err) < 0)
        return -1;
    e->load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return 0;
}

// Activation buffers of a's attention half (q, k, v, attn, lse, x_mid, o's lora_u) and of the
// rest (the norms' outputs and rstd, gate, up, act, the MLP's lora_u), as asked.
static int alloc_acts(CudaEngine *e, LayerActs *a, bool attention_half, bool rest, Err *err)
{
    const ModelConfig *c = &e->c;
    size_t N = (size_t)e->max_B * e->max_T, D = c->dim, F = c->hidden_dim;
    size_t QD = (size_t)c->n_heads * c->head_dim, KD = (size_t)c->n_kv_heads * c->head_dim;
    if (attention_half) {
        ALLOC(a->q, N * QD);
        ALLOC(a->k, N * KD);
        ALLOC(a->v, N * KD);
        ALLOC(a->attn, N * QD);
        ALLOC(a->lse, N * c->n_heads);
        ALLOC(a->x_mid, N * D);
    }
    if (rest) {
        ALLOC(a->xn1, N * e->ld_in[GROUP_XN1]);
        ALLOC(a->rstd1, N);
        ALLOC(a->xn2, N * e->ld_in[GROUP_XN2]);
        ALLOC(a->rstd2, N);
        ALLOC(a->gate, N * F);
        ALLOC(a->up, N * F);
        ALLOC(a->act, N * e->ld_in[GROUP_ACT]);
    }
    for (int p = 0; p < PROJ_COUNT; p++)
        if ((p <= PROJ_O ? attention_half : rest) && (e->lc.targets & (1u << p)) && e->fold[p].u_col < 0)
            ALLOC(a->lora_u[p], N * e->lc.rank);
    return 0;
fail:
    return -1;
}

// Every buffer but the base weights: RoPE table, LoRA, activations (per e->layer_mode), batch,
// scratch. Under dry_run only e->device_bytes moves.
static int alloc_buffers(CudaEngine *e, Err *err)
{
    const ModelConfig *c = &e->c;
    size_t N = (size_t)e->max_B * e->max_T, D = c->dim, F = c->hidden_dim, V = c->vocab_size;
    size_t QD = (size_t)c->n_heads * c->head_dim, KD = (size_t)c->n_kv_heads * c->head_dim;
    int L = c->n_layers;
    ALLOC(e->inv_freq, c->head_dim / 2);
    ALLOC(e->params, e->n_params);
    ALLOC(e->grads, e->n_params);
    ALLOC(e->params_bf16, e->n_params);
    for (int l = 0; l < L; l++)
        for (int g = 0; g < IN_GROUPS; g++) {
            size_t in = g == GROUP_ACT ? F : D, spare = e->ld_in[g] - in;
            if (spare)
                ALLOC_ZERO(e->layers[l].a_stack[g], spare * in);
        }
    // The shared set: all a layer's activations when some layer recomputes whole (LAYER), else
    // those of the MLP half and the attention norm (MLP); none when no layer recomputes.
    {
        bool any_layer = false, any_shared = false;
        for (int l = 0; l < L; l++) {
            any_layer = any_layer || e->layer_mode[l] == CUDA_RECOMPUTE_LAYER;
            any_shared = any_shared || e->layer_mode[l] != CUDA_RECOMPUTE_NONE;
        }
        LayerActs shared = {};
        if (any_shared && alloc_acts(e, &shared, any_layer, true, err) < 0)
            goto fail;
        for (int l = 0; l < L; l++) {
            // Each layer owns x_in; with MLP also what its attention half made; with NONE all. The
            // rest is the shared set's, which the backward makes again before the layer's turn.
            LayerActs *a = &e->acts[l];
            CudaRecompute mode = e->layer_mode[l];
            *a = mode == CUDA_RECOMPUTE_NONE ? LayerActs{} : shared;
            ALLOC(a->x_in, N * D);
            if (alloc_acts(e, a, mode != CUDA_RECOMPUTE_LAYER, mode == CUDA_RECOMPUTE_NONE, err) < 0)
                goto fail;
        }
    }
    ALLOC(e->x_final, N * D);
    ALLOC(e->xnf, N * D);
    ALLOC(e->rstdf, N);
    ALLOC(e->tokens, N);
    ALLOC(e->targets, N);
    ALLOC(e->positions, N);
    ALLOC(e->cu_seqlens, N + 1);
    ALLOC(e->seq_start, N);
    ALLOC(e->losses, N);
    ALLOC_ZERO(e->d_x, N * e->ld_out[GROUP_DX]);
    ALLOC(e->d_xn, N * D);
    ALLOC(e->d_q, N * QD);
    ALLOC(e->d_attn, N * QD);
    ALLOC(e->d_k, N * KD);
    ALLOC(e->d_v, N * KD);
    ALLOC_ZERO(e->d_gate, N * e->ld_out[GROUP_DGATE]);
    ALLOC_ZERO(e->d_up, N * e->ld_out[GROUP_DUP]);
    ALLOC(e->d_act, N * F);
    ALLOC_ZERO(e->d_u, N * (e->ld_in[GROUP_XN1] > (int)D ? e->ld_in[GROUP_XN1] - D : 8));
    if (c->head_dim == 64 || c->head_dim == 128) {
        e->attn_ws_bytes = cuda_attention_backward_workspace_bytes((int)N, c->n_heads, c->n_kv_heads, c->head_dim);
        if (dev_alloc(e, &e->attn_ws, e->attn_ws_bytes, err) < 0)
            goto fail;
    } else {
        ALLOC(e->d_k32, N * KD);
        ALLOC(e->d_v32, N * KD);
    }
    {
        size_t rows = CE_BLOCK_BYTES / (V * 4);
        rows = rows >= 256 ? rows / 256 * 256 : rows ? rows : 1;
        e->ce_token_chunk = (int)(N < rows ? N : rows);
        e->ce_vocab_chunk = (int)V;
    }
    e->ce_ws_bytes = cuda_cross_entropy_workspace_bytes((int)N, (int)D, (int)V, e->ce_token_chunk, e->ce_vocab_chunk);
    if (dev_alloc(e, &e->ce_ws, e->ce_ws_bytes, err) < 0)
        goto fail;
    return 0;
fail:
    return -1;
}

// Bytes of the base weights as bf16, without touching the device.
static size_t weights_bytes(const Model *m)
{
    const ModelConfig *c = &m->config;
    size_t n = tensor_numel(&m->weights.embed) + tensor_numel(&m->weights.final_norm);
    if (!c->tie_embeddings)
        n += tensor_numel(&m->weights.lm_head);
    for (int l = 0; l < c->n_layers; l++) {
        const LayerWeights *w = &m->weights.layers[l];
        n += tensor_numel(&w->attn_norm) + tensor_numel(&w->ffn_norm);
        for (int p = 0; p < PROJ_COUNT; p++)
            n += tensor_numel(&w->proj[p]);
    }
    return n * 2;
}

// The plan: the top n_none layers keep everything, the n_mlp below them recompute their MLP half,
// the rest recompute whole. (The backward meets the layers top down; the highest that shares the
// set still holds its own activations there and reruns nothing.)
static void plan_layers(CudaEngine *e, int n_none, int n_mlp)
{
    int L = e->c.n_layers;
    e->last_shared = -1;
    for (int l = 0; l < L; l++) {
        e->layer_mode[l] = l >= L - n_none           ? CUDA_RECOMPUTE_NONE
                           : l >= L - n_none - n_mlp ? CUDA_RECOMPUTE_MLP
                                                     : CUDA_RECOMPUTE_LAYER;
        if (e->layer_mode[l] != CUDA_RECOMPUTE_NONE)
            e->last_shared = l;
    }
}

// Plans (plan_layers) and counts the bytes alloc_buffers would take with that plan, plus the base
// weights'. The plan stays.
static int planned_bytes(CudaEngine *e, const Model *m, int n_none, int n_mlp, size_t *bytes, Err *err)
{
    plan_layers(e, n_none, n_mlp);
    e->dry_run = true;
    e->device_bytes = 0;
    int rc = alloc_buffers(e, err);
    *bytes = e->device_bytes + weights_bytes(m);
    e->dry_run = false;
    e->device_bytes = 0;
    return rc;
}

// The plan for the mode asked. AUTO: the fastest whose bytes, with the optimizer's (the AdamW
// moments: 8 a LoRA parameter), fit the memory limit when there is one, and the free device memory
// less a margin of 2 GiB. Plans from the least memory up, each one layer more: all LAYER, then
// one layer after another MLP (the attention half kept: ~6.5 us of rerun saved a MiB at
// Llama-3-8B), then one after another NONE (the MLP half: ~4 us a MiB); past every fitting plan,
// all LAYER (the allocation says what is missing). An explicit mode whose plan exceeds the limit
// is an error.
static int choose_recompute(CudaEngine *e, const Model *m, CudaRecompute asked, size_t limit, Err *err)
{
    int L = e->c.n_layers;
    size_t optimizer = e->n_params * 8 + 8, bytes = 0;
    if (asked != CUDA_RECOMPUTE_AUTO) {
        int n_none = asked == CUDA_RECOMPUTE_NONE ? L : 0, n_mlp = asked == CUDA_RECOMPUTE_MLP ? L : 0;
        if (planned_bytes(e, m, n_none, n_mlp, &bytes, err) < 0)
            return -1;
        if (limit && bytes + optimizer > limit)
            return err_set(err, "cuda engine: recompute %s needs %.2f GiB (%zu bytes), more than the memory limit of "
                           "%.2f GiB (%zu bytes)", cuda_recompute_name(asked), (bytes + optimizer) / 1073741824.0,
                           bytes + optimizer, limit / 1073741824.0, limit);
        return 0;
    }
    size_t free_bytes = 0, total_bytes = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes), err);
    size_t budget = free_bytes > ((size_t)2 << 30) + optimizer ? free_bytes - ((size_t)2 << 30) - optimizer : 0;
    if (limit)
        budget = std::min(budget, limit > optimizer ? limit - optimizer : 0);
    for (int k = 2 * L; k >= 0; k--) {
        int n_none = std::max(0, k - L), n_mlp = std::min(k, L) - n_none;
        if (planned_bytes(e, m, n_none, n_mlp, &bytes, err) < 0)
            return -1;
        if (bytes <= budget)
            return 0;
    }
    if (limit)   // the loop's last plan, all LAYER, stays otherwise
        return err_set(err, "cuda engine: no plan fits the memory limit of %.2f GiB (%zu bytes): the smallest "
                       "(recompute layer) needs %.2f GiB (%zu bytes)", limit / 1073741824.0, limit,
                       (bytes + optimizer) / 1073741824.0, bytes + optimizer);
    return 0;
}

static int f32_to_bf16(CudaEngine *e, bf16_t *out, const float *in, size_t n, Err *err)
{
    return cuda_f32_to_bf16(out, in, n, e->stream, err);
}

CudaEngine *cuda_engine_create(const Model *m, const LoraConfig *lc, int max_batch, int max_seq,
                               const CudaEngineOptions *opt, Err *err)
{
    CudaRecompute asked = opt ? opt->recompute : CUDA_RECOMPUTE_AUTO;
    if (asked != CUDA_RECOMPUTE_AUTO && asked != CUDA_RECOMPUTE_NONE && asked != CUDA_RECOMPUTE_MLP &&
        asked != CUDA_RECOMPUTE_LAYER)
        return err_set(err, "cuda engine: unknown recompute mode %d", (int)asked), (CudaEngine *)NULL;
    const ModelConfig *c = &m->config;
    if (max_batch < 1 || max_seq < 1)
        return err_set(err, "cuda engine: batch %d x %d must be at least 1 x 1", max_batch, max_seq), (CudaEngine *)NULL;
    if (lc->dropout > 0)
        return err_set(err, "cuda engine: LoRA dropout %g is not supported on the GPU yet (use 0)", lc->dropout),
               (CudaEngine *)NULL;
    if (c->sliding_window > 0 && c->sliding_window < max_seq)
        return err_set(err, "cuda engine: a sliding window (%d) shorter than the sequence (%d) is not supported",
                       c->sliding_window, max_seq),
               (CudaEngine *)NULL;
    if (c->head_dim != 64 && c->head_dim != 128 && (c->head_dim > ATTENTION_PLAIN_MAX_HEAD_DIM || c->head_dim % 2))
        return err_set(err, "cuda engine: head_dim %d is not supported", c->head_dim), (CudaEngine *)NULL;
    if (lc->rank < 1 || !lc->targets)
        return err_set(err, "cuda engine: LoRA rank %d, targets 0x%x", lc->rank, lc->targets), (CudaEngine *)NULL;
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        cudaGetLastError();
        return err_set(err, "cuda engine: no CUDA device"), (CudaEngine *)NULL;
    }

    CudaEngine *e = (CudaEngine *)calloc(1, sizeof *e);
    if (!e)
        return err_set(err, "out of memory"), (CudaEngine *)NULL;
    e->allocs = new std::vector<void *>();
    e->c = *c;
    e->lc = *lc;
    e->scale = lora_scale(lc);
    e->max_B = max_batch;
    e->max_T = max_seq;
    size_t N = (size_t)max_batch * max_seq;
    int L = c->n_layers, r = lc->rank;
    {
        int least = 0, greatest = 0;
        bool ok = cudaDeviceGetStreamPriorityRange(&least, &greatest) == cudaSuccess &&
                  cudaStreamCreateWithPriority(&e->stream, cudaStreamDefault, greatest) == cudaSuccess &&
                  cublasCreate(&e->blas) == CUBLAS_STATUS_SUCCESS &&
                  cublasSetStream(e->blas, e->stream) == CUBLAS_STATUS_SUCCESS;
        if (ok && !(opt && opt->one_stream)) {
            ok = cudaStreamCreateWithPriority(&e->side, cudaStreamDefault, least) == cudaSuccess &&
                 cublasCreate(&e->blas_side) == CUBLAS_STATUS_SUCCESS &&
                 cublasSetStream(e->blas_side, e->side) == CUBLAS_STATUS_SUCCESS &&
                 cudaEventCreateWithFlags(&e->fork, cudaEventDisableTiming) == cudaSuccess;
            for (cudaEvent_t &ev : e->side_done)
                ok = ok && cudaEventCreateWithFlags(&ev, cudaEventDisableTiming) == cudaSuccess;
        }
        if (!ok) {
            err_set(err, "cuda engine: cannot create the streams and cuBLAS handles");
            goto fail;
        }
    }
    e->layers = (LayerDev *)calloc(L, sizeof *e->layers);
    e->acts = (LayerActs *)calloc(L, sizeof *e->acts);
    e->layer_mode = (CudaRecompute *)calloc(L, sizeof *e->layer_mode);
    e->off_A = (long *)malloc((size_t)L * PROJ_COUNT * sizeof *e->off_A);
    e->off_B = (long *)malloc((size_t)L * PROJ_COUNT * sizeof *e->off_B);
    e->host_cu = (int32_t *)malloc((N + 1) * sizeof(int32_t));
    e->host_seq_start = (int32_t *)malloc(N * sizeof(int32_t));
    e->host_losses = (float *)malloc(N * sizeof(float));
    if (!e->layers || !e->acts || !e->layer_mode || !e->off_A || !e->off_B || !e->host_cu || !e->host_seq_start ||
        !e->host_losses) {
        err_set(err, "out of memory");
        goto fail;
    }

    // LoRA layout of lib/lora.h: layer by layer, targeted projections in Proj order, A then B.
    e->n_params = 0;
    for (int l = 0; l < L; l++)
        for (int p = 0; p < PROJ_COUNT; p++) {
            size_t i = (size_t)l * PROJ_COUNT + p;
            e->off_A[i] = e->off_B[i] = -1;
            if (!(lc->targets & (1u << p)))
                continue;
            int in, out;
            model_proj_dims(c, (Proj)p, &in, &out);
            e->off_A[i] = (long)e->n_params;
            e->off_B[i] = (long)(e->n_params + (size_t)r * in);
            e->n_params += (size_t)r * (in + out);
        }

    // Plan, then base weights (bf16, frozen) and every other buffer.
    plan_fold(e);
    if (choose_recompute(e, m, asked, opt ? opt->memory_limit : 0, err) < 0 || upload_weights(e, m, err) < 0 ||
        alloc_buffers(e, err) < 0 || build_fold_copies(e, err) < 0)
        goto fail;
    {
        std::vector<float> inv_freq(c->head_dim / 2);
        rope_inv_freq(c, inv_freq.data());
        if (cudaMemcpy(e->inv_freq, inv_freq.data(), inv_freq.size() * 4, cudaMemcpyHostToDevice) != cudaSuccess) {
            err_set(err, "cuda engine: copying RoPE frequencies failed");
            goto fail;
        }
    }
    if (cudaMemset(e->params, 0, e->n_params * 4) != cudaSuccess ||
        cudaMemset(e->grads, 0, e->n_params * 4) != cudaSuccess) {
        err_set(err, "cuda engine: clearing LoRA buffers failed");
        goto fail;
    }
    return e;
fail:
    cuda_engine_free(e);
    return NULL;
}

int cuda_engine_upload_lora(CudaEngine *e, const Lora *lora, Err *err)
{
    if (lora->n_params != e->n_params || lora->config.rank != e->lc.rank || lora->config.targets != e->lc.targets)
        return err_set(err, "cuda engine: LoRA of %zu parameters (rank %d, targets 0x%x), the engine's %zu (rank %d, "
                       "targets 0x%x)", lora->n_params, lora->config.rank, lora->config.targets, e->n_params,
                       e->lc.rank, e->lc.targets);
    CUDA_CHECK(cudaMemcpy(e->params, lora->params, e->n_params * 4, cudaMemcpyHostToDevice), err);
    return 0;
}

int cuda_engine_zero_grad(CudaEngine *e, Err *err)
{
    CUDA_CHECK(cudaMemsetAsync(e->grads, 0, e->n_params * 4, e->stream), err);
    return 0;
}

int cuda_engine_download_grads(CudaEngine *e, float *grads, size_t n_params, Err *err)
{
    if (n_params != e->n_params)
        return err_set(err, "cuda engine: %zu gradients asked for, the engine has %zu", n_params, e->n_params);
    CUDA_CHECK(cudaStreamSynchronize(e->stream), err);
    CUDA_CHECK(cudaMemcpy(grads, e->grads, n_params * 4, cudaMemcpyDeviceToHost), err);
    return 0;
}

// ---- products -------------------------------------------------------------------------------

// Row-major C (M, N) = alpha op(A) op(B) + beta C with bf16 A, B and fp32 accumulation (on h's
// stream; NULL: the main one's handle); C is
// bf16 (c_type CUDA_R_16BF) or fp32 (CUDA_R_32F). A is (M, K), or stored (K, M) when ta; B is
// (K, N), or stored (N, K) when tb; lda, ldb, ldc: the row strides of A, B, C as stored. cuBLAS is
// column-major, so it computes C^T = op(B)^T op(A)^T.
static int gemm(CudaEngine *e, bool ta, bool tb, int M, int N, int K, float alpha, const bf16_t *A, int lda,
                const bf16_t *B, int ldb, float beta, void *C, int ldc, cudaDataType c_type, Err *err,
                cublasHandle_t h = NULL)
{
    CUBLAS_CHECK(cublasGemmEx(h ? h : e->blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                              &alpha, B, CUDA_R_16BF, ldb, A, CUDA_R_16BF, lda, &beta, C, c_type, ldc,
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 err);
    return 0;
}

// u of every targeted projection that reads x (input group g, first member p): x's spare
// columns = x[:, 0:in] A_stack^T, one product. Nothing when the group has no spare columns.
static int group_u(CudaEngine *e, int l, int p, bf16_t *x, int N, Err *err)
{
    const ProjFold *f = &e->fold[p];
    if (!f->in_spare)
        return 0;
    int in, out;
    model_proj_dims(&e->c, (Proj)p, &in, &out);
    if (gemm(e, false, true, N, f->in_spare, in, 1.0f, x, f->ldw, e->layers[l].a_stack[IN_GROUP[p]], in, 0.0f,
             x + in, f->ldw, CUDA_R_16BF, err) < 0)
        return -1;
    return tick(e, "lora fwd u=xA", p);
}

// y (N, out) = x W^T + beta y, plus scale * (x A^T) B^T when LoRA targets it: one product over
// [x | u] when x has spare columns (group_u filled them), else u = x A^T into lora_u (kept for
// the backward) and y += s u B^T.
static int proj_forward(CudaEngine *e, int l, int p, bf16_t *y, const bf16_t *x, int N, float beta, Err *err)
{
    int in, out;
    model_proj_dims(&e->c, (Proj)p, &in, &out);
    const ProjFold *f = &e->fold[p];
    if (gemm(e, false, true, N, out, f->ldw, 1.0f, x, f->ldw, e->layers[l].proj[p], f->ldw, beta, y, out,
             CUDA_R_16BF, err) < 0 || tick(e, "W fwd", p) < 0)
        return -1;
    long oa = e->off_A[(size_t)l * PROJ_COUNT + p], ob = e->off_B[(size_t)l * PROJ_COUNT + p];
    if (oa < 0 || f->u_col >= 0)
        return 0;
    int r = e->lc.rank;
    bf16_t *u = e->acts[l].lora_u[p];
    if (gemm(e, false, true, N, r, in, 1.0f, x, in, e->params_bf16 + oa, in, 0.0f, u, r, CUDA_R_16BF, err) < 0 ||
        tick(e, "lora fwd u=xA", p) < 0 ||
        gemm(e, false, true, N, out, r, e->scale, u, r, e->params_bf16 + ob, r, 1.0f, y, out, CUDA_R_16BF, err) < 0)
        return -1;
    return tick(e, "lora fwd y+=uB", p);
}

// Whether the LoRA weight-gradient products go to the side stream (not while profiling: the
// profile's events time the main stream).
static bool side_stream(const CudaEngine *e) { return e->side && !e->prof; }
static const unsigned ALL_PROJ = (1u << PROJ_COUNT) - 1;

// The main stream waits for the side stream's work of the projections in mask (1 << p each):
// before it writes what that work reads.
static int join_side(CudaEngine *e, unsigned mask, Err *err)
{
    if (!side_stream(e))
        return 0;
    for (int p = 0; p < PROJ_COUNT; p++)
        if (mask & (1u << p))
            CUDA_CHECK(cudaStreamWaitEvent(e->stream, e->side_done[p], 0), err);
    return 0;
}

// Backward of projection p from d_y (N, out; rows ld_dy apart, spare columns after out when
// folded): du = s d_y B (into d_y's spare columns when folded, else d_u), dB += s d_y^T u,
// dA += du^T x (dA, dB accumulate in fp32; on the side stream, see side_stream); then, when d_x
// is not NULL, d_x (N, in) (+)= [d_y | du] W' (one product), or d_y W with du A left to
// group_dx (q, k, v).
static int proj_backward(CudaEngine *e, int l, int p, bf16_t *d_x, bf16_t *d_y, int ld_dy, const bf16_t *x, int N,
                         int accumulate, Err *err)
{
    int in, out, r = e->lc.rank;
    model_proj_dims(&e->c, (Proj)p, &in, &out);
    const ProjFold *f = &e->fold[p];
    const bf16_t *w = e->layers[l].proj[p];
    long oa = e->off_A[(size_t)l * PROJ_COUNT + p], ob = e->off_B[(size_t)l * PROJ_COUNT + p];
    if (oa >= 0) {
        // Every targeted projection has spare columns on one side at least (the groups above): du
        // in d_y's, or (q, k, v) in d_u beside the other members', for group_dx.
        bf16_t *du = f->du_col >= 0 ? d_y + out + f->du_col : e->d_u + f->u_col;
        int ld_du = f->du_col >= 0 ? ld_dy : f->in_spare;
        const bf16_t *u = f->u_col >= 0 ? x + in + f->u_col : e->acts[l].lora_u[p];
        int ld_u = f->u_col >= 0 ? f->ldw : r;
        // du on the main stream (the input-gradient product reads it); dB and dA on the side one
        cublasHandle_t h = side_stream(e) ? e->blas_side : NULL;
        if (gemm(e, false, false, N, r, out, e->scale, d_y, ld_dy, e->params_bf16 + ob, r, 0.0f, du, ld_du,
                 CUDA_R_16BF, err) < 0 || tick(e, "lora bwd du", p) < 0)
            return -1;
        if (h) {
            CUDA_CHECK(cudaEventRecord(e->fork, e->stream), err);
            CUDA_CHECK(cudaStreamWaitEvent(e->side, e->fork, 0), err);
        }
        if (gemm(e, true, false, out, r, N, e->scale, d_y, ld_dy, u, ld_u, 1.0f, e->grads + ob, r, CUDA_R_32F,
                 err, h) < 0 || tick(e, "lora bwd dB", p) < 0 ||
            gemm(e, true, false, r, in, N, 1.0f, du, ld_du, x, f->ldw, 1.0f, e->grads + oa, in, CUDA_R_32F, err,
                 h) < 0 || tick(e, "lora bwd dA", p) < 0)
            return -1;
        if (h)
            CUDA_CHECK(cudaEventRecord(e->side_done[p], e->side), err);
    }
    if (!d_x)
        return 0;
    if (gemm(e, false, false, N, in, out + f->out_spare, 1.0f, d_y, ld_dy, w, f->ldw, accumulate ? 1.0f : 0.0f, d_x,
             in, CUDA_R_16BF, err) < 0)
        return -1;
    return tick(e, "W bwd dx", p);
}

// d_x += du A for the projections of input group p whose dy has no spare columns (q, k, v: their
// du sit side by side in d_u as their u do in xn1's spare columns): one product with the A stack.
static int group_dx(CudaEngine *e, int l, int p, bf16_t *d_x, int N, Err *err)
{
    const ProjFold *f = &e->fold[p];
    if (!f->in_spare || !d_x || f->out_spare)
        return 0;
    int in, out;
    model_proj_dims(&e->c, (Proj)p, &in, &out);
    if (gemm(e, false, false, N, in, f->in_spare, 1.0f, e->d_u, f->in_spare, e->layers[l].a_stack[IN_GROUP[p]], in,
             1.0f, d_x, in, CUDA_R_16BF, err) < 0)
        return -1;
    return tick(e, "lora bwd dx+=duA", p);
}

static int attention_forward(CudaEngine *e, LayerActs *a, int N, int n_seqs, Err *err)
{
    const ModelConfig *c = &e->c;
    if (c->head_dim == 64 || c->head_dim == 128)
        return cuda_attention_forward(a->attn, a->lse, a->q, a->k, a->v, e->cu_seqlens, n_seqs, N, c->n_heads,
                                      c->n_kv_heads, c->head_dim, e->stream, err);
    return cuda_attention_forward_plain(a->attn, a->lse, a->q, a->k, a->v, e->seq_start, N, c->n_heads,
                                        c->n_kv_heads, c->head_dim, e->stream, err);
}

static int attention_backward(CudaEngine *e, LayerActs *a, int N, int n_seqs, Err *err)
{
    const ModelConfig *c = &e->c;
    if (c->head_dim == 64 || c->head_dim == 128)
        return cuda_attention_backward(e->d_q, e->d_k, e->d_v, e->d_attn, a->q, a->k, a->v, a->attn, a->lse,
                                       e->cu_seqlens, n_seqs, N, c->n_heads, c->n_kv_heads, c->head_dim, e->attn_ws,
                                       e->attn_ws_bytes, e->stream, err);
    size_t nkv = (size_t)N * c->n_kv_heads * c->head_dim;
    CUDA_CHECK(cudaMemsetAsync(e->d_k32, 0, nkv * 4, e->stream), err);
    CUDA_CHECK(cudaMemsetAsync(e->d_v32, 0, nkv * 4, e->stream), err);
    if (cuda_attention_backward_plain(e->d_q, e->d_k32, e->d_v32, e->d_attn, a->q, a->k, a->v, a->attn, a->lse,
                                      e->seq_start, N, c->n_heads, c->n_kv_heads, c->head_dim, e->stream, err) < 0)
        return -1;
    if (f32_to_bf16(e, e->d_k, e->d_k32, nkv, err) < 0 || f32_to_bf16(e, e->d_v, e->d_v32, nkv, err) < 0)
        return -1;
    return 0;
}

// ---- the model --------------------------------------------------------------------------------

// Check the batch as the CPU engine does, build cu_seqlens (one per row when NULL) and each
// position's sequence start, and copy the batch to the device. Returns the number of sequences.
static int prepare_batch(CudaEngine *e, const EngineBatch *b, long *n_trained, Err *err)
{
    if (b->B < 1 || b->T < 1 || b->B > e->max_B || b->T > e->max_T)
        return err_set(err, "engine: batch %d x %d exceeds the engine's %d x %d", b->B, b->T, e->max_B, e->max_T);
    if (!b->targets)
        return err_set(err, "engine: a training batch needs targets");
    int N = b->B * b->T;
    long count = 0;
    for (int n = 0; n < N; n++) {
        if (b->tokens[n] < 0 || b->tokens[n] >= e->c.vocab_size)
            return err_set(err, "engine: token %d at row %d position %d is outside the vocabulary (%d)", b->tokens[n],
                           n / b->T, n % b->T, e->c.vocab_size);
        if (b->targets[n] != LORA_IGNORE_TARGET && (b->targets[n] < 0 || b->targets[n] >= e->c.vocab_size))
            return err_set(err, "engine: target %d at row %d position %d is outside the vocabulary (%d)",
                           b->targets[n], n / b->T, n % b->T, e->c.vocab_size);
        if (b->positions[n] < 0)
            return err_set(err, "engine: negative position id at row %d position %d", n / b->T, n % b->T);
        count += b->targets[n] != LORA_IGNORE_TARGET;
    }
    int n_seqs;
    if (!b->cu_seqlens) {
        n_seqs = b->B;
        for (int s = 0; s <= b->B; s++)
            e->host_cu[s] = s * b->T;
    } else {
        n_seqs = b->n_seqs;
        if (n_seqs < 1 || n_seqs > N || b->cu_seqlens[0] != 0 || b->cu_seqlens[n_seqs] != N)
            return err_set(err, "engine: cu_seqlens must run from 0 to B*T = %d", N);
        for (int s = 0; s <= n_seqs; s++)
            e->host_cu[s] = b->cu_seqlens[s];
    }
    for (int s = 0; s < n_seqs; s++) {
        int lo = e->host_cu[s], hi = e->host_cu[s + 1];
        if (hi < lo || (hi > lo && lo / b->T != (hi - 1) / b->T))
            return err_set(err, "engine: sequence %d [%d, %d) is reversed or crosses a row end", s, lo, hi);
        for (int n = lo; n < hi; n++)
            e->host_seq_start[n] = lo;
    }
    size_t bytes = (size_t)N * 4;
    CUDA_CHECK(cudaMemcpyAsync(e->tokens, b->tokens, bytes, cudaMemcpyHostToDevice, e->stream), err);
    CUDA_CHECK(cudaMemcpyAsync(e->targets, b->targets, bytes, cudaMemcpyHostToDevice, e->stream), err);
    CUDA_CHECK(cudaMemcpyAsync(e->positions, b->positions, bytes, cudaMemcpyHostToDevice, e->stream), err);
    CUDA_CHECK(cudaMemcpyAsync(e->cu_seqlens, e->host_cu, (n_seqs + 1) * 4, cudaMemcpyHostToDevice, e->stream), err);
    CUDA_CHECK(cudaMemcpyAsync(e->seq_start, e->host_seq_start, bytes, cudaMemcpyHostToDevice, e->stream), err);
    *n_trained = count;
    return n_seqs;
}

// xn1 = the attention norm of acts[l].x_in (copy: x_in's copy for the residual, or NULL) and the
// q, k, v LoRA u in its spare columns.
static int attention_norm(CudaEngine *e, int l, int N, bf16_t *copy, Err *err)
{
    const ModelConfig *c = &e->c;
    LayerActs *a = &e->acts[l];
    if (cuda_rmsnorm_forward(a->xn1, e->ld_in[GROUP_XN1], copy, a->rstd1, a->x_in, e->layers[l].attn_norm, N, c->dim,
                             c->norm_eps, e->stream, err) < 0 ||
        tick(e, "other norm fwd") < 0)
        return -1;
    return group_u(e, l, PROJ_Q, a->xn1, N, err);
}

// The MLP half of layer l from acts[l].x_mid: xn2 and the gate, up LoRA u, gate, up, act and the
// down LoRA u; then, unless recomputing (before the layer's backward, which reads no more), the
// layer's output x_mid + down(act) into the next layer's x_in or x_final.
static int mlp_half(CudaEngine *e, int l, int N, bool recomputing, Err *err)
{
    const ModelConfig *c = &e->c;
    LayerActs *a = &e->acts[l];
    bf16_t *x_out = recomputing ? NULL : l + 1 < c->n_layers ? e->acts[l + 1].x_in : e->x_final;
    if (cuda_rmsnorm_forward(a->xn2, e->ld_in[GROUP_XN2], x_out, a->rstd2, a->x_mid, e->layers[l].ffn_norm, N, c->dim,
                             c->norm_eps, e->stream, err) < 0 ||
        tick(e, "other norm fwd") < 0 || group_u(e, l, PROJ_GATE, a->xn2, N, err) < 0 ||
        proj_forward(e, l, PROJ_GATE, a->gate, a->xn2, N, 0, err) < 0 ||
        proj_forward(e, l, PROJ_UP, a->up, a->xn2, N, 0, err) < 0 ||
        cuda_swiglu_forward(a->act, e->ld_in[GROUP_ACT], a->gate, a->up, N, c->hidden_dim, e->stream, err) < 0 ||
        tick(e, "other swiglu fwd") < 0 || group_u(e, l, PROJ_DOWN, a->act, N, err) < 0)
        return -1;
    return recomputing ? 0 : proj_forward(e, l, PROJ_DOWN, x_out, a->act, N, 1, err);
}

// Layer l's forward from acts[l].x_in. The residual adds ride on the products' beta = 1, into
// copies of the stream that the norms make as they read it. Recomputing (LAYER, before the
// layer's backward) it stops at what the backward reads (mlp_half).
static int layer_forward(CudaEngine *e, int l, int N, int n_seqs, bool recomputing, Err *err)
{
    const ModelConfig *c = &e->c;
    LayerActs *a = &e->acts[l];
    e->recomputing = recomputing;
    if (attention_norm(e, l, N, a->x_mid, err) < 0 || proj_forward(e, l, PROJ_Q, a->q, a->xn1, N, 0, err) < 0 ||
        proj_forward(e, l, PROJ_K, a->k, a->xn1, N, 0, err) < 0 ||
        proj_forward(e, l, PROJ_V, a->v, a->xn1, N, 0, err) < 0 ||
        cuda_rope_forward(a->q, e->positions, e->inv_freq, N, c->n_heads, c->head_dim, e->stream, err) < 0 ||
        cuda_rope_forward(a->k, e->positions, e->inv_freq, N, c->n_kv_heads, c->head_dim, e->stream, err) < 0 ||
        tick(e, "other rope fwd") < 0 || attention_forward(e, a, N, n_seqs, err) < 0 || tick(e, "attn fwd") < 0 ||
        proj_forward(e, l, PROJ_O, a->x_mid, a->attn, N, 1, err) < 0 || mlp_half(e, l, N, recomputing, err) < 0)
        return -1;
    e->recomputing = false;
    return 0;
}

static int forward_layers(CudaEngine *e, int N, int n_seqs, Err *err)
{
    const ModelConfig *c = &e->c;
    if (cuda_embedding_forward(e->acts[0].x_in, e->tokens, e->embed, N, c->dim, c->vocab_size, NULL, e->stream,
                               err) < 0 || tick(e, "other embedding") < 0)
        return -1;
    for (int l = 0; l < c->n_layers; l++)
        if (layer_forward(e, l, N, n_seqs, false, err) < 0)
            return -1;
    if (cuda_rmsnorm_forward(e->xnf, c->dim, NULL, e->rstdf, e->x_final, e->final_norm, N, c->dim, c->norm_eps, e->stream,
                             err) < 0)
        return -1;
    return tick(e, "other norm fwd");
}

static int backward_layers(CudaEngine *e, int N, int n_seqs, Err *err)
{
    const ModelConfig *c = &e->c;
    int D = c->dim, F = c->hidden_dim;
    // d_xn holds d(final norm output); the residual stream's gradient starts as its backward.
    int ld_dx = e->ld_out[GROUP_DX], ld_dgu = e->ld_out[GROUP_DGATE];
    if (cuda_rmsnorm_backward(e->d_x, ld_dx, NULL, e->d_xn, e->x_final, e->final_norm, e->rstdf, N, D, 0, e->stream,
                              err) < 0 ||
        tick(e, "other norm bwd") < 0)
        return -1;
    for (int l = c->n_layers - 1; l >= 0; l--) {
        LayerActs *a = &e->acts[l];
        const LayerDev *w = &e->layers[l];
        int need_input_grad = l > 0;   // every layer holds LoRA parameters (lora_create)
        // The shared set still holds the activations of the highest layer that uses it from the
        // forward (the loss touches none of them); the others' are made again here, after the
        // side stream's work of layer l + 1 has read what they overwrite.
        CudaRecompute mode = e->layer_mode[l];
        bool again = mode != CUDA_RECOMPUTE_NONE && l != e->last_shared;
        if (again && join_side(e, ALL_PROJ, err) < 0)
            return -1;
        if (again && mode == CUDA_RECOMPUTE_LAYER && layer_forward(e, l, N, n_seqs, true, err) < 0)
            return -1;
        if (again && mode == CUDA_RECOMPUTE_MLP) {
            e->recomputing = true;
            int rc = mlp_half(e, l, N, true, err);
            e->recomputing = false;
            if (rc < 0)
                return -1;
        }
        // Each join below: the side stream's reads (of layer l + 1's gradients, or of d_x) are
        // done before the main stream writes over them.
        if (proj_backward(e, l, PROJ_DOWN, e->d_act, e->d_x, ld_dx, a->act, N, 0, err) < 0 ||
            join_side(e, 1u << PROJ_GATE | 1u << PROJ_UP, err) < 0 ||
            cuda_swiglu_backward(e->d_gate, e->d_up, ld_dgu, e->d_act, a->gate, a->up, N, F, e->stream, err) < 0 ||
            tick(e, "other swiglu bwd") < 0 ||
            proj_backward(e, l, PROJ_GATE, e->d_xn, e->d_gate, ld_dgu, a->xn2, N, 0, err) < 0 ||
            proj_backward(e, l, PROJ_UP, e->d_xn, e->d_up, ld_dgu, a->xn2, N, 1, err) < 0 ||
            join_side(e, 1u << PROJ_DOWN, err) < 0 ||
            cuda_rmsnorm_backward(e->d_x, ld_dx, NULL, e->d_xn, a->x_mid, w->ffn_norm, a->rstd2, N, D, 1, e->stream,
                                  err) < 0 ||
            tick(e, "other norm bwd") < 0 ||
            proj_backward(e, l, PROJ_O, e->d_attn, e->d_x, ld_dx, a->attn, N, 0, err) < 0 ||
            join_side(e, 1u << PROJ_Q | 1u << PROJ_K | 1u << PROJ_V, err) < 0 ||
            attention_backward(e, a, N, n_seqs, err) < 0 || tick(e, "attn bwd") < 0 ||
            cuda_rope_backward(e->d_q, e->positions, e->inv_freq, N, c->n_heads, c->head_dim, e->stream, err) < 0 ||
            cuda_rope_backward(e->d_k, e->positions, e->inv_freq, N, c->n_kv_heads, c->head_dim, e->stream, err) < 0 ||
            tick(e, "other rope bwd") < 0)
            return -1;
        if (again && mode == CUDA_RECOMPUTE_MLP) {   // xn1 and its u, for q, k, v's backward
            e->recomputing = true;
            int rc = attention_norm(e, l, N, NULL, err);
            e->recomputing = false;
            if (rc < 0)
                return -1;
        }
        bf16_t *d_xn1 = need_input_grad ? e->d_xn : NULL;
        int QD = c->n_heads * c->head_dim, KD = c->n_kv_heads * c->head_dim;
        if (proj_backward(e, l, PROJ_Q, d_xn1, e->d_q, QD, a->xn1, N, 0, err) < 0 ||
            proj_backward(e, l, PROJ_K, d_xn1, e->d_k, KD, a->xn1, N, 1, err) < 0 ||
            proj_backward(e, l, PROJ_V, d_xn1, e->d_v, KD, a->xn1, N, 1, err) < 0 ||
            group_dx(e, l, PROJ_Q, d_xn1, N, err) < 0)
            return -1;
        if (need_input_grad &&
            (join_side(e, 1u << PROJ_O, err) < 0 ||
             cuda_rmsnorm_backward(e->d_x, ld_dx, NULL, e->d_xn, a->x_in, w->attn_norm, a->rstd1, N, D, 1, e->stream,
                                   err) < 0 ||
             tick(e, "other norm bwd") < 0))
            return -1;
    }
    return join_side(e, ALL_PROJ, err);   // the gradients are whole when the main stream is done
}

int cuda_engine_train_micro_batch(CudaEngine *e, const EngineBatch *b, double *loss_sum, long *n_trained, Err *err)
{
    int n_seqs = prepare_batch(e, b, n_trained, err);
    if (n_seqs < 0)
        return -1;
    int N = b->B * b->T;
    e->last_N = N;
    const ModelConfig *c = &e->c;
    if (e->prof)
        e->prof->used = 0;
    tick(e, "start");
    if (cast_lora(e, err) < 0 || forward_layers(e, N, n_seqs, err) < 0)
        return -1;
    // Loss and d(final norm output) (grad_scale 1: the gradient of the SUM).
    if (cuda_fused_cross_entropy(e->losses, e->d_xn, e->xnf, e->lm_head, e->targets, N, c->dim, c->vocab_size,
                                 e->ce_token_chunk, e->ce_vocab_chunk, 1.0f, e->ce_ws, e->ce_ws_bytes, e->blas,
                                 e->stream, err) < 0 || tick(e, "lm_head+loss") < 0)
        return -1;
    if (*n_trained > 0 && backward_layers(e, N, n_seqs, err) < 0)
        return -1;
    CUDA_CHECK(cudaMemcpyAsync(e->host_losses, e->losses, (size_t)N * 4, cudaMemcpyDeviceToHost, e->stream), err);
    CUDA_CHECK(cudaStreamSynchronize(e->stream), err);
    profile_collect(e);
    double total = 0;   // in position order, as the CPU engine sums
    for (int n = 0; n < N; n++)
        if (b->targets[n] != LORA_IGNORE_TARGET)
            total += e->host_losses[n];
    *loss_sum = total;
    return 0;
}

// FNV-1a, 64 bits, over n bytes.
static uint64_t fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = (const unsigned char *)p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

int cuda_engine_activation_digest(CudaEngine *e, int layer, uint64_t *digest, Err *err)
{
    const ModelConfig *c = &e->c;
    if (layer < 0 || layer >= c->n_layers)
        return err_set(err, "cuda engine: layer %d of %d", layer, c->n_layers);
    size_t N = (size_t)e->last_N, D = c->dim, F = c->hidden_dim;
    size_t QD = (size_t)c->n_heads * c->head_dim, KD = (size_t)c->n_kv_heads * c->head_dim;
    const LayerActs *a = &e->acts[layer];
    struct {
        const void *p;
        size_t bytes;
    } parts[13 + PROJ_COUNT] = {
        {a->xn1, N * e->ld_in[GROUP_XN1] * 2}, {a->rstd1, N * 4},  {a->q, N * QD * 2},   {a->k, N * KD * 2},
        {a->v, N * KD * 2}, {a->attn, N * QD * 2}, {a->lse, N * c->n_heads * 4}, {a->x_mid, N * D * 2},
        {a->xn2, N * e->ld_in[GROUP_XN2] * 2}, {a->rstd2, N * 4},   {a->gate, N * F * 2}, {a->up, N * F * 2},
        {a->act, N * e->ld_in[GROUP_ACT] * 2},
    };
    for (int p = 0; p < PROJ_COUNT; p++) {
        parts[13 + p].p = a->lora_u[p];
        parts[13 + p].bytes = a->lora_u[p] ? N * e->lc.rank * 2 : 0;
    }
    CUDA_CHECK(cudaStreamSynchronize(e->stream), err);
    uint64_t h = 0xcbf29ce484222325ull;
    std::vector<unsigned char> host;
    for (auto &part : parts) {
        if (!part.bytes)
            continue;
        host.resize(part.bytes);
        CUDA_CHECK(cudaMemcpy(host.data(), part.p, part.bytes, cudaMemcpyDeviceToHost), err);
        h = fnv1a(h, host.data(), part.bytes);
    }
    *digest = h;
    return 0;
}
