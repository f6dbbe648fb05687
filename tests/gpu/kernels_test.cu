// Every kernel of kernels/ against its CPU twin (lib/cpu_ops.c) on fresh random inputs of
// awkward sizes (not multiples of any tile or vector width, and both the vector and the scalar
// paths), with outputs poisoned with NaN before each launch so that an unwritten element fails.
// Error measure: ||gpu - cpu|| / ||cpu|| (L2), the CPU twin fed the same bf16-rounded inputs.
//   kernels_test            TAP correctness tests (prove runs it through tests/gpu/kernels.t)
//   kernels_test --bench    timing table at Llama-3-8B shapes (medians of CUDA-event timings)
// GPU_TEST_SEED=N repeats a run's inputs; by default the seed comes from the clock and is printed.
#include <cublas_v2.h>

#include "adamw.cuh"
#include "cpu_ops.h"
#include "cross_entropy.cuh"
#include "embedding.cuh"
#include "harness.cuh"
#include "rmsnorm.cuh"
#include "rope.cuh"
#include "swiglu.cuh"

// n host values in a new device buffer
template <typename T> static T *dev_copy(const T *host, size_t n)
{
    T *p = dev_alloc<T>(n);
    HOST_CUDA(cudaMemcpy(p, host, n * sizeof(T), cudaMemcpyHostToDevice));
    return p;
}

static void test_embedding(int T, int C, int V)
{
    Bf16Tensor table((size_t)V * C);
    std::vector<int32_t> ids(T);
    for (int t = 0; t < T; t++)
        ids[t] = (int32_t)(uniform() * V);
    int32_t *d_ids = dev_copy(ids.data(), T);
    bf16_t *d_out = dev_alloc<bf16_t>((size_t)T * C);
    int *d_bad = dev_copy(std::vector<int>(1, 0).data(), 1);
    LAUNCHED(cuda_embedding_forward(d_out, d_ids, table.dev, T, C, V, d_bad, NULL, E));
    std::vector<float> want((size_t)T * C);
    cpu_embedding_forward(want.data(), ids.data(), table.value.data(), T, C);
    char what[96];
    snprintf(what, sizeof what, "embedding T=%d C=%d V=%d", T, C, V);
    check(what, download_bf16(d_out, (size_t)T * C), want, 0);
    int bad = -1;
    HOST_CUDA(cudaMemcpy(&bad, d_bad, sizeof bad, cudaMemcpyDeviceToHost));
    is_int(bad, 0, "embedding: valid ids leave the bad-id flag clear");
    // an id out of range: a zero row and the flag set
    ids[T / 2] = V;
    HOST_CUDA(cudaMemcpy(d_ids, ids.data(), T * sizeof(int32_t), cudaMemcpyHostToDevice));
    LAUNCHED(cuda_embedding_forward(d_out, d_ids, table.dev, T, C, V, d_bad, NULL, E));
    std::vector<float> out = download_bf16(d_out, (size_t)T * C);
    HOST_CUDA(cudaMemcpy(&bad, d_bad, sizeof bad, cudaMemcpyDeviceToHost));
    bool zero_row = true;
    for (int i = 0; i < C; i++)
        zero_row = zero_row && out[(size_t)(T / 2) * C + i] == 0.0f;
    ok(bad == 1 && zero_row, "embedding: id %d >= V gives a zero row and sets the flag", V);
    cudaFree(d_ids);
    cudaFree(d_out);
    cudaFree(d_bad);
}

// Rows of a (rows, ld) bf16 device array: the first cols of each row, as floats, and whether every
// spare column (cols .. ld - 1) still holds the 0xffff pattern it was filled with.
static std::vector<float> download_rows(const bf16_t *dev, int rows, int cols, int ld, bool *spare_kept)
{
    std::vector<uint16_t> bits((size_t)rows * ld);
    HOST_CUDA(cudaDeviceSynchronize());
    HOST_CUDA(cudaMemcpy(bits.data(), dev, bits.size() * 2, cudaMemcpyDeviceToHost));
    std::vector<float> out((size_t)rows * cols);
    *spare_kept = true;
    for (int t = 0; t < rows; t++) {
        for (int j = 0; j < cols; j++)
            out[(size_t)t * cols + j] = bf16_float(bits[(size_t)t * ld + j]);
        for (int j = cols; j < ld; j++)
            *spare_kept = *spare_kept && bits[(size_t)t * ld + j] == 0xffff;
    }
    return out;
}

// dx rows ld apart (ld > C: the engine's spare columns for LoRA, left untouched).
static void test_rmsnorm(int T, int C, int ld)
{
    const float eps = 1e-5f;
    Bf16Tensor x((size_t)T * C, 2.0f), w(C, 0.1f, 1.0f), dout((size_t)T * C), dx_prior((size_t)T * C);
    bf16_t *d_out = dev_alloc<bf16_t>((size_t)T * ld), *d_dx = dev_alloc<bf16_t>((size_t)T * ld);
    HOST_CUDA(cudaMemset(d_out, 0xff, (size_t)T * ld * 2));
    HOST_CUDA(cudaMemset(d_dx, 0xff, (size_t)T * ld * 2));
    bool kept = false;
    float *d_rstd = dev_alloc<float>(T);
    std::vector<float> dw_prior(C);
    for (int i = 0; i < C; i++)
        dw_prior[i] = normal();
    float *d_dw = dev_copy(dw_prior.data(), C);
    char what[96];

    bf16_t *d_copy = dev_alloc<bf16_t>((size_t)T * C);
    LAUNCHED(cuda_rmsnorm_forward(d_out, ld, d_copy, d_rstd, x.dev, w.dev, T, C, eps, NULL, E));
    std::vector<float> want((size_t)T * C), rstd(T);
    cpu_rmsnorm_forward(want.data(), rstd.data(), x.value.data(), w.value.data(), T, C, eps);
    snprintf(what, sizeof what, "rmsnorm forward T=%d C=%d ld=%d", T, C, ld);
    check(what, download_rows(d_out, T, C, ld, &kept), want, TOL_BF16);
    ok(kept, "rmsnorm forward leaves the spare columns alone (ld %d)", ld);
    check("rmsnorm forward's copy of x (exact)", download_bf16(d_copy, (size_t)T * C), x.value, 0);
    cudaFree(d_copy);
    check("rmsnorm forward rstd (fp32)", download_f32(d_rstd, T), rstd, 1e-5);

    // backward from the GPU's rstd; dweight accumulates onto dw_prior
    LAUNCHED(cuda_rmsnorm_backward(d_dx, ld, d_dw, dout.dev, x.dev, w.dev, d_rstd, T, C, 0, NULL, E));
    std::vector<float> want_dx((size_t)T * C), want_dw = dw_prior;
    cpu_rmsnorm_backward(want_dx.data(), want_dw.data(), dout.value.data(), x.value.data(), w.value.data(),
                         rstd.data(), T, C);
    snprintf(what, sizeof what, "rmsnorm backward dx T=%d C=%d ld=%d", T, C, ld);
    check(what, download_rows(d_dx, T, C, ld, &kept), want_dx, TOL_BF16);
    ok(kept, "rmsnorm backward leaves the spare columns alone (ld %d)", ld);
    check("rmsnorm backward dweight, accumulated (fp32)", download_f32(d_dw, C), want_dw, 1e-4);

    // accumulate into a dx that already holds a gradient; no dweight
    HOST_CUDA(cudaMemcpy2D(d_dx, ld * 2, dx_prior.dev, C * 2, C * 2, T, cudaMemcpyDeviceToDevice));
    LAUNCHED(cuda_rmsnorm_backward(d_dx, ld, NULL, dout.dev, x.dev, w.dev, d_rstd, T, C, 1, NULL, E));
    for (size_t i = 0; i < want_dx.size(); i++)
        want_dx[i] += dx_prior.value[i];
    check("rmsnorm backward accumulating into dx", download_rows(d_dx, T, C, ld, &kept), want_dx, TOL_BF16);
    ok(kept, "rmsnorm backward accumulating leaves the spare columns alone (ld %d)", ld);
    cudaFree(d_out);
    cudaFree(d_dx);
    cudaFree(d_rstd);
    cudaFree(d_dw);
}

// llama3-scaled inverse frequencies (factor 8, low 1, high 4, original context 8192), as
// transformers computes them; the unit test checks model.c's copy of this against transformers.
static std::vector<float> llama3_inv_freq(int head_dim, double theta)
{
    std::vector<float> f(head_dim / 2);
    const double factor = 8, lo = 1, hi = 4, orig = 8192, pi = 3.14159265358979323846;
    for (int i = 0; i < head_dim / 2; i++) {
        float base = (float)(1.0 / pow(theta, (double)(2 * i) / head_dim));
        double wavelen = 2 * pi / base;
        if (wavelen < orig / hi) {
            f[i] = base;
        } else if (wavelen > orig / lo) {
            f[i] = (float)(base / factor);
        } else {
            double smooth = (orig / wavelen - lo) / (hi - lo);
            f[i] = (float)((1 - smooth) * base / factor + smooth * base);
        }
    }
    return f;
}

static void test_rope(int T, int n_heads, int head_dim)
{
    size_t n = (size_t)T * n_heads * head_dim;
    Bf16Tensor x(n), dout(n);
    std::vector<int32_t> pos(T);
    // documents of random lengths packed in one row: positions restart; one long one reaches 8k
    for (int t = 0, p = 0; t < T; t++) {
        pos[t] = p;
        p = uniform() < 0.01 ? 0 : p + 1 + (t < 50 ? 160 : 0);
    }
    std::vector<float> inv_freq = llama3_inv_freq(head_dim, 500000.0);
    int32_t *d_pos = dev_copy(pos.data(), T);
    float *d_freq = dev_copy(inv_freq.data(), inv_freq.size());
    bf16_t *d_x = dev_alloc<bf16_t>(n);
    HOST_CUDA(cudaMemcpy(d_x, x.dev, n * 2, cudaMemcpyDeviceToDevice));
    LAUNCHED(cuda_rope_forward(d_x, d_pos, d_freq, T, n_heads, head_dim, NULL, E));
    std::vector<float> want(n);
    cpu_rope_forward(want.data(), x.value.data(), pos.data(), inv_freq.data(), T, n_heads, head_dim);
    char what[96];
    snprintf(what, sizeof what, "rope forward T=%d heads=%d head_dim=%d (max pos %d)", T, n_heads, head_dim,
             *std::max_element(pos.begin(), pos.end()));
    check(what, download_bf16(d_x, n), want, TOL_BF16);

    HOST_CUDA(cudaMemcpy(d_x, dout.dev, n * 2, cudaMemcpyDeviceToDevice));
    LAUNCHED(cuda_rope_backward(d_x, d_pos, d_freq, T, n_heads, head_dim, NULL, E));
    cpu_rope_backward(want.data(), dout.value.data(), pos.data(), inv_freq.data(), T, n_heads, head_dim);
    check("rope backward", download_bf16(d_x, n), want, TOL_BF16);
    cudaFree(d_pos);
    cudaFree(d_freq);
    cudaFree(d_x);
}

// (rows, cols) with the outputs' rows ld apart.
static void test_swiglu(int rows, int cols, int ld)
{
    size_t n = (size_t)rows * cols, nl = (size_t)rows * ld;
    Bf16Tensor gate(n, 3.0f), up(n), dout(n);
    bf16_t *d_out = dev_alloc<bf16_t>(nl), *d_dg = dev_alloc<bf16_t>(nl), *d_du = dev_alloc<bf16_t>(nl);
    for (bf16_t *d : {d_out, d_dg, d_du})
        HOST_CUDA(cudaMemset(d, 0xff, nl * 2));
    bool kept_out = false, kept_dg = false, kept_du = false;
    LAUNCHED(cuda_swiglu_forward(d_out, ld, gate.dev, up.dev, rows, cols, NULL, E));
    std::vector<float> want(n), want_dg(n), want_du(n);
    cpu_swiglu_forward(want.data(), gate.value.data(), up.value.data(), n);
    char what[96];
    snprintf(what, sizeof what, "swiglu forward %d x %d, ld %d", rows, cols, ld);
    check(what, download_rows(d_out, rows, cols, ld, &kept_out), want, TOL_BF16);
    LAUNCHED(cuda_swiglu_backward(d_dg, d_du, ld, dout.dev, gate.dev, up.dev, rows, cols, NULL, E));
    cpu_swiglu_backward(want_dg.data(), want_du.data(), dout.value.data(), gate.value.data(), up.value.data(), n);
    check("swiglu backward dgate", download_rows(d_dg, rows, cols, ld, &kept_dg), want_dg, TOL_BF16);
    check("swiglu backward dup", download_rows(d_du, rows, cols, ld, &kept_du), want_du, TOL_BF16);
    ok(kept_out && kept_dg && kept_du, "swiglu forward and backward leave the spare columns alone (ld %d)", ld);
    if (ld == cols) {   // in place over its inputs, as a trainer short of memory would call it
        HOST_CUDA(cudaMemcpy(d_dg, gate.dev, n * 2, cudaMemcpyDeviceToDevice));
        HOST_CUDA(cudaMemcpy(d_du, up.dev, n * 2, cudaMemcpyDeviceToDevice));
        LAUNCHED(cuda_swiglu_backward(d_dg, d_du, cols, dout.dev, d_dg, d_du, rows, cols, NULL, E));
        check("swiglu backward in place, dgate", download_bf16(d_dg, n), want_dg, TOL_BF16);
    }
    cudaFree(d_out);
    cudaFree(d_dg);
    cudaFree(d_du);
}

// One set of inputs, the CPU twin once, then each (token_chunk, vocab_chunk) split on the GPU:
// several token blocks with the last one short, several vocabulary chunks with the last one
// short (the recomputing path), one chunk of the whole vocabulary (the two-product path).
static void test_cross_entropy(cublasHandle_t blas, int T, int C, int V, std::vector<std::pair<int, int>> splits)
{
    Bf16Tensor hidden((size_t)T * C), weight((size_t)V * C, 0.05f);
    std::vector<int32_t> targets(T);
    for (int t = 0; t < T; t++)
        targets[t] = uniform() < 0.3 ? -100 : (int32_t)(uniform() * V);
    targets[T - 1] = V - 1;  // in the short last chunk
    int trained = 0;
    for (int t = 0; t < T; t++)
        trained += targets[t] >= 0;
    float scale = 1.0f / trained;
    std::vector<float> want((size_t)T), want_dh((size_t)T * C);
    int cpu_trained = cpu_fused_cross_entropy(want.data(), want_dh.data(), hidden.value.data(), weight.value.data(),
                                              targets.data(), T, C, V, 1000, scale);
    is_int(cpu_trained, trained, "cross-entropy CPU twin counts %d trained positions", trained);
    int32_t *d_targets = dev_copy(targets.data(), T);
    for (auto split : splits) {
        int token_chunk = split.first, vocab_chunk = split.second;
        float *d_losses = dev_alloc<float>(T), *d_losses2 = dev_alloc<float>(T);
        bf16_t *d_dh = dev_alloc<bf16_t>((size_t)T * C);
        size_t ws = cuda_cross_entropy_workspace_bytes(T, C, V, token_chunk, vocab_chunk);
        void *d_ws;
        HOST_CUDA(cudaMalloc(&d_ws, ws));
        HOST_CUDA(cudaMemset(d_ws, 0xff, ws));
        LAUNCHED(cuda_fused_cross_entropy(d_losses, d_dh, hidden.dev, weight.dev, d_targets, T, C, V, token_chunk,
                                          vocab_chunk, scale, d_ws, ws, blas, NULL, E));
        LAUNCHED(cuda_fused_cross_entropy(d_losses2, NULL, hidden.dev, weight.dev, d_targets, T, C, V, token_chunk,
                                          vocab_chunk, scale, d_ws, ws, blas, NULL, E));
        char what[128];
        snprintf(what, sizeof what, "cross-entropy losses T=%d C=%d V=%d, token chunk %d, vocab chunk %d", T, C, V,
                 token_chunk, vocab_chunk);
        std::vector<float> losses = download_f32(d_losses, T);
        check(what, losses, want, 1e-4);
        check("cross-entropy losses without the backward pass", download_f32(d_losses2, T), want, 1e-4);
        bool untrained_zero = true;
        for (int t = 0; t < T; t++)
            untrained_zero = untrained_zero && (targets[t] >= 0 || losses[t] == 0.0f);
        ok(untrained_zero, "cross-entropy: untrained positions have loss 0");
        check("cross-entropy dhidden (bf16 dlogits)", download_bf16(d_dh, (size_t)T * C), want_dh, 1.5e-2);
        Err err;
        int rc = cuda_fused_cross_entropy(d_losses, d_dh, hidden.dev, weight.dev, d_targets, T, C, V, token_chunk,
                                          vocab_chunk, scale, d_ws, ws - 1, blas, NULL, &err);
        ok(rc == -1 && strstr(err.msg, "cross_entropy.cu:") && strstr(err.msg, "workspace"),
           "cross-entropy rejects a short workspace naming file and line: %s", rc == -1 ? err.msg : "accepted");
        cudaFree(d_losses);
        cudaFree(d_losses2);
        cudaFree(d_dh);
        cudaFree(d_ws);
    }
    cudaFree(d_targets);
}

static void test_adamw(size_t n)
{
    const int steps = 3;
    std::vector<float> p(n), m(n, 0), v(n, 0);
    for (size_t i = 0; i < n; i++)
        p[i] = 0.02f * normal();
    float *d_p = dev_copy(p.data(), n), *d_m = dev_copy(m.data(), n), *d_v = dev_copy(v.data(), n);
    float *d_g = dev_alloc<float>(n);
    double *d_norm = dev_alloc<double>(1);
    AdamWStep hp = {2e-4, 0.9, 0.999, 1e-8, 0.01, 0, 1.0};
    std::vector<float> g(n), gpu_norms, cpu_norms;
    for (int s = 1; s <= steps; s++) {
        // norms about 3, 0.3, 3 (n = 1e6): step 2 is under max_norm 1, the others are clipped
        float gscale = (s == 2 ? 3e-4f : 3e-3f) * 1000.0f / sqrtf((float)n);
        for (size_t i = 0; i < n; i++)
            g[i] = gscale * normal();
        HOST_CUDA(cudaMemcpy(d_g, g.data(), n * 4, cudaMemcpyHostToDevice));
        HOST_CUDA(cudaMemset(d_norm, 0, sizeof(double)));
        // two calls over halves: the norm is global over buffers
        LAUNCHED(cuda_grad_norm_squared(d_norm, d_g, n / 2, NULL, E));
        LAUNCHED(cuda_grad_norm_squared(d_norm, d_g + n / 2, n - n / 2, NULL, E));
        hp.step = s;
        LAUNCHED(cuda_adamw_step(d_p, d_g, d_m, d_v, n, &hp, d_norm, NULL, E));
        double norm_sq;
        HOST_CUDA(cudaMemcpy(&norm_sq, d_norm, sizeof norm_sq, cudaMemcpyDeviceToHost));
        gpu_norms.push_back((float)sqrt(norm_sq));
        double cpu_norm = sqrt(cpu_grad_norm_squared(g.data(), n));
        cpu_norms.push_back((float)cpu_norm);
        cpu_adamw_step(p.data(), g.data(), m.data(), v.data(), n, s, hp.lr, hp.beta1, hp.beta2, hp.eps,
                       hp.weight_decay, cpu_clip_coef(cpu_norm, (float)hp.max_norm));
    }
    ok(cpu_norms[0] > 1 && cpu_norms[1] < 1, "adamw test clips step 1 (norm %.3f) and not step 2 (norm %.3f)",
       cpu_norms[0], cpu_norms[1]);
    check("global gradient norm over two buffers", gpu_norms, cpu_norms, 1e-6);
    char what[96];
    snprintf(what, sizeof what, "adamw params after %d clipped steps, n=%zu", steps, n);
    check(what, download_f32(d_p, n), p, 1e-6);
    check("adamw exp_avg", download_f32(d_m, n), m, 1e-6);
    check("adamw exp_avg_sq", download_f32(d_v, n), v, 1e-5);
    Err err;
    hp.step = 0;
    int rc = cuda_adamw_step(d_p, d_g, d_m, d_v, n, &hp, d_norm, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "adamw.cu:"), "adamw rejects step 0: %s", rc == -1 ? err.msg : "accepted");
    cudaFree(d_p);
    cudaFree(d_m);
    cudaFree(d_v);
    cudaFree(d_g);
    cudaFree(d_norm);
}

static void test_shape_errors(void)
{
    Err err;
    int rc = cuda_rope_forward((bf16_t *)16, (const int32_t *)16, (const float *)16, 4, 2, 7, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "rope.cu:") && strstr(err.msg, "head_dim=7"),
       "rope rejects an odd head_dim naming file and line: %s", rc == -1 ? err.msg : "accepted");
    rc = cuda_rmsnorm_forward(NULL, 8, NULL, NULL, NULL, NULL, 4, 8, 1e-5f, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "rmsnorm.cu:"), "rmsnorm rejects NULL pointers: %s",
       rc == -1 ? err.msg : "accepted");
    rc = cuda_embedding_forward((bf16_t *)16, (const int32_t *)16, (const bf16_t *)16, 4, 0, 10, NULL, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "C=0"), "embedding rejects C=0: %s", rc == -1 ? err.msg : "accepted");
}

// ---- benchmark: Llama-3-8B shapes, micro-batch 2 x 2048 -----------------------------------------

// Times one launcher call (its Err argument spelled E) and prints its row.
#define TIMED(name, reps, bytes, flops, ...)                                                                       \
    row(name, median_us([&] { LAUNCHED(__VA_ARGS__); }, reps), bytes, flops)

static void row(const char *name, double us, double bytes, double flops)
{
    printf("%-34s %10.1f", name, us);
    if (bytes > 0)
        printf(" %9.0f GB/s", bytes / us / 1e3);
    if (flops > 0)
        printf(" %7.0f TFLOP/s", flops / us / 1e6);
    printf("\n");
}

static int bench(void)
{
    const int T = 4096, C = 4096, F = 14336, H = 32, KV = 8, D = 128, V = 128256, reps = 30;
    const size_t n_lora = 41943040;  // r=16 on q,k,v,o,gate,up,down of 32 layers
    cublasHandle_t blas;
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "%s: cublasCreate failed\n", harness_prog);
        return 1;
    }
    cudaDeviceProp prop;
    HOST_CUDA(cudaGetDeviceProperties(&prop, 0));
    printf("# %s, %d SMs; T=%d C=%d F=%d heads %d/%d x %d, V=%d, LoRA params %zu\n", prop.name,
           prop.multiProcessorCount, T, C, F, H, KV, D, V, n_lora);
    printf("%-34s %10s %14s %15s\n", "kernel", "median us", "bandwidth", "rate");
    Bf16Tensor x((size_t)T * C), w(C, 0.1f, 1.0f), dout((size_t)T * C), table((size_t)V * C, 0.05f);
    bf16_t *out = dev_alloc<bf16_t>((size_t)T * C), *dx = dev_alloc<bf16_t>((size_t)T * C);
    float *rstd = dev_alloc<float>(T);
    std::vector<int32_t> ids(T), pos(T), targets(T);
    for (int t = 0; t < T; t++) {
        ids[t] = (int32_t)(uniform() * V);
        pos[t] = t % 2048;
        targets[t] = (int32_t)(uniform() * V);
    }
    int32_t *d_ids = dev_copy(ids.data(), T), *d_pos = dev_copy(pos.data(), T),
            *d_targets = dev_copy(targets.data(), T);
    double tc2 = (double)T * C * 2;

    TIMED("embedding forward", reps, 2 * tc2, 0,
          cuda_embedding_forward(out, d_ids, table.dev, T, C, V, NULL, NULL, E));
    TIMED("rmsnorm forward", reps, 2 * tc2, 0, cuda_rmsnorm_forward(out, C, NULL, rstd, x.dev, w.dev, T, C, 1e-5f, NULL, E));
    // the same launches on pointers one element off 16-byte alignment take the scalar path:
    // what the 16-byte accesses buy
    TIMED("rmsnorm forward, scalar path", reps, 2 * tc2, 0,
          cuda_rmsnorm_forward(out + 1, C, NULL, rstd, x.dev + 1, w.dev, T, C, 1e-5f, NULL, E));
    TIMED("embedding forward, scalar path", reps, 2 * tc2, 0,
          cuda_embedding_forward(out + 1, d_ids, table.dev, T, C, V, NULL, NULL, E));
    TIMED("rmsnorm backward (no dweight)", reps, 3 * tc2, 0,
          cuda_rmsnorm_backward(dx, C, NULL, dout.dev, x.dev, w.dev, rstd, T, C, 0, NULL, E));
    float *dw = dev_alloc<float>(C);
    TIMED("rmsnorm backward (+dweight, +=dx)", reps, 4 * tc2, 0,
          cuda_rmsnorm_backward(dx, C, dw, dout.dev, x.dev, w.dev, rstd, T, C, 1, NULL, E));
    std::vector<float> inv_freq = llama3_inv_freq(D, 500000.0);
    float *d_freq = dev_copy(inv_freq.data(), inv_freq.size());
    TIMED("rope forward q (32 heads)", reps, 2 * tc2, 0, cuda_rope_forward(out, d_pos, d_freq, T, H, D, NULL, E));
    TIMED("rope forward k (8 heads)", reps, 2 * tc2 / 4, 0,
          cuda_rope_forward(out, d_pos, d_freq, T, KV, D, NULL, E));
    TIMED("rope backward q", reps, 2 * tc2, 0, cuda_rope_backward(out, d_pos, d_freq, T, H, D, NULL, E));
    {
        size_t n = (size_t)T * F;
        Bf16Tensor gate(n, 3.0f), up(n), dy(n);
        bf16_t *o = dev_alloc<bf16_t>(n), *dg = dev_alloc<bf16_t>(n), *du = dev_alloc<bf16_t>(n);
        TIMED("swiglu forward", reps, 6.0 * n, 0, cuda_swiglu_forward(o, F, gate.dev, up.dev, T, F, NULL, E));
        TIMED("swiglu forward, scalar path", reps, 6.0 * n, 0,
              cuda_swiglu_forward(o + 1, F, gate.dev + 1, up.dev + 1, T, F, NULL, E));
        TIMED("swiglu backward", reps, 10.0 * n, 0,
              cuda_swiglu_backward(dg, du, F, dy.dev, gate.dev, up.dev, T, F, NULL, E));
        cudaFree(o), cudaFree(dg), cudaFree(du);
    }
    {
        float *losses = dev_alloc<float>(T);
        double flop = 2.0 * T * (double)V * C;
        // (token_chunk, vocab_chunk): the vocabulary-chunked path (3 products) and token blocks
        // over the whole vocabulary (2 products)
        const int splits[][2] = {{T, 8192}, {T, 32768}, {1024, V}, {2048, V}, {512, V}};
        for (auto &sp : splits) {
            size_t ws = cuda_cross_entropy_workspace_bytes(T, C, V, sp[0], sp[1]);
            void *d_ws;
            HOST_CUDA(cudaMalloc(&d_ws, ws));
            bool one = sp[1] >= V;
            char name[96];
            snprintf(name, sizeof name, "CE loss, tokens %d x vocab %d", sp[0], sp[1]);
            TIMED(name, 10, 0, flop,
                  cuda_fused_cross_entropy(losses, NULL, x.dev, table.dev, d_targets, T, C, V, sp[0], sp[1],
                                           1.0f / T, d_ws, ws, blas, NULL, E));
            snprintf(name, sizeof name, "CE loss+dh, tokens %d x vocab %d", sp[0], sp[1]);
            TIMED(name, 10, 0, (one ? 2 : 3) * flop,
                  cuda_fused_cross_entropy(losses, dx, x.dev, table.dev, d_targets, T, C, V, sp[0], sp[1], 1.0f / T,
                                           d_ws, ws, blas, NULL, E));
            printf("#   workspace %.0f MiB\n", ws / 1048576.0);
            cudaFree(d_ws);
        }
        // the logits product alone over the whole vocabulary, 1024 tokens at a time, for comparison
        float *lg;
        HOST_CUDA(cudaMalloc(&lg, (size_t)1024 * V * 4));
        row("  logits product alone (x1)", median_us([&] {
            const float one = 1.0f, zero = 0.0f;
            for (int t0 = 0; t0 < T; t0 += 1024)
                cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, V, 1024, C, &one, table.dev, CUDA_R_16BF, C,
                             x.dev + (size_t)t0 * C, CUDA_R_16BF, C, &zero, lg, CUDA_R_32F, V, CUBLAS_COMPUTE_32F,
                             CUBLAS_GEMM_DEFAULT);
        }, 10), 0, flop);
        cudaFree(lg);
        printf("# full fp32 logits would be %.0f MiB\n", 4.0 * T * V / 1048576.0);
        cudaFree(losses);
    }
    {
        float *p = dev_alloc<float>(n_lora), *g = dev_alloc<float>(n_lora), *m = dev_alloc<float>(n_lora),
              *v = dev_alloc<float>(n_lora);
        HOST_CUDA(cudaMemset(p, 0, n_lora * 4));
        HOST_CUDA(cudaMemset(m, 0, n_lora * 4));
        HOST_CUDA(cudaMemset(v, 0, n_lora * 4));
        std::vector<float> hg(n_lora);
        for (size_t i = 0; i < n_lora; i++)
            hg[i] = 1e-3f * normal();
        HOST_CUDA(cudaMemcpy(g, hg.data(), n_lora * 4, cudaMemcpyHostToDevice));
        double *norm = dev_alloc<double>(1);
        AdamWStep hp = {2e-4, 0.9, 0.999, 1e-8, 0.01, 1, 1.0};
        row("grad norm (all LoRA params)",
            median_us(
                [&] {
                    HOST_CUDA(cudaMemsetAsync(norm, 0, 8));
                    LAUNCHED(cuda_grad_norm_squared(norm, g, n_lora, NULL, E));
                },
                reps),
            4.0 * n_lora, 0);
        TIMED("adamw step + clip (all LoRA)", reps, 28.0 * n_lora, 0,
              cuda_adamw_step(p, g, m, v, n_lora, &hp, norm, NULL, E));
        cudaFree(p), cudaFree(g), cudaFree(m), cudaFree(v), cudaFree(norm);
    }
    HOST_CUDA(cudaDeviceSynchronize());
    cublasDestroy(blas);
    return 0;
}

int main(int argc, char **argv)
{
    HarnessMode mode = harness_start(argc, argv);
    if (mode != HARNESS_TESTS)
        return mode == HARNESS_BENCH ? bench() : 0;
    cublasHandle_t blas;
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "%s: cublasCreate failed\n", harness_prog);
        return 1;
    }
    test_embedding(1037, 776, 3001);  // vector path
    test_embedding(331, 77, 1001);    // scalar path
    test_rmsnorm(1037, 776, 776);
    test_rmsnorm(331, 77, 77);
    test_rmsnorm(67, 13000, 13000);   // dweight partials above 48 KB of shared memory
    test_rmsnorm(333, 776, 776 + 48); // spare columns (the engine's folded LoRA), vector path
    test_rmsnorm(77, 776, 781);       // odd row stride: scalar path
    test_rope(1037, 11, 128);         // four pairs a thread, two groups of heads (8 + 3)
    test_rope(333, 3, 72);            // four pairs a thread, 9 groups of pairs a head
    test_rope(333, 3, 70);            // head_dim % 8 != 0: one pair a thread
    test_swiglu(1037, 776, 776);
    test_swiglu(1037, 777, 777);
    test_swiglu(333, 776, 776 + 16);  // spare columns, vector path
    test_swiglu(77, 777, 790);        // spare columns, scalar path
    test_cross_entropy(blas, 301, 520, 5003, {{128, 1024}, {100, 1 << 30}, {4096, 5003}});
    test_cross_entropy(blas, 77, 136, 999, {{4096, 4096}, {77, 998}});
    test_adamw(1000003);
    test_shape_errors();
    cublasDestroy(blas);
    return done_testing();
}
