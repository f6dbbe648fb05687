// kernels/attention.cu against its CPU twin (lib/cpu_ops.c: cpu_attention_forward/backward) on
// random inputs packed as several documents of awkward lengths (1, not multiples of the 64-row
// tile, one longer than many tiles), with outputs poisoned with NaN before each launch.
// Error measure: ||gpu - cpu|| / ||cpu|| (L2), the CPU twin fed the same bf16-rounded inputs.
//   attention_test          TAP correctness tests (prove runs it through tests/gpu/attention.t)
//   attention_test --bench  forward / backward timings at Llama-3-8B attention shapes (32 query
//                           heads, 8 kv heads, head_dim 128) as TFLOP/s; compare with
//                           tests/gpu/bench_attention_torch.py run on the same machine
// GPU_TEST_SEED=N repeats a run's inputs; by default the seed comes from the clock and is printed.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <vector>

#include "attention.cuh"
#include "cpu_ops.h"
#include "tap.h"

// Test-harness failures (allocation, copies) end the program: the launchers' own errors are tested.
#define HOST_CUDA(call)                                                                           \
    do {                                                                                          \
        cudaError_t status_ = (call);                                                             \
        if (status_ != cudaSuccess) {                                                             \
            fprintf(stderr, "attention_test: %s:%d: %s: %s\n", __FILE__, __LINE__, #call,         \
                    cudaGetErrorString(status_));                                                 \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)
#define LAUNCHED(call)                                                                            \
    do {                                                                                          \
        Err err_;                                                                                 \
        if ((call) < 0) {                                                                         \
            fprintf(stderr, "attention_test: %s:%d: %s\n", __FILE__, __LINE__, err_.msg);         \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)
#define E (&err_)

static uint64_t rng_state;
static double uniform(void)  // splitmix64, [0, 1)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return (double)((z ^ (z >> 31)) >> 11) / 9007199254740992.0;
}
static float normal(void)
{
    double u = uniform() + 1e-12, v = uniform();
    return (float)(sqrt(-2 * log(u)) * cos(6.283185307179586 * v));
}
static uint16_t bf16_bits(float f)  // round to nearest even, as __float2bfloat16
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}
static float bf16_float(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// A random tensor kept twice: bf16 on the device, its exact float value for the CPU twin.
struct Bf16Tensor {
    std::vector<uint16_t> bits;
    std::vector<float> value;
    bf16_t *dev = NULL;
    explicit Bf16Tensor(size_t n, float scale = 1.0f) : bits(n), value(n)
    {
        for (size_t i = 0; i < n; i++) {
            bits[i] = bf16_bits(scale * normal());
            value[i] = bf16_float(bits[i]);
        }
        HOST_CUDA(cudaMalloc(&dev, n * 2 + 16));
        HOST_CUDA(cudaMemcpy(dev, bits.data(), n * 2, cudaMemcpyHostToDevice));
    }
    ~Bf16Tensor() { cudaFree(dev); }
};
template <typename T> static T *dev_alloc(size_t n)
{
    T *p;
    HOST_CUDA(cudaMalloc(&p, n * sizeof(T) + 16));
    HOST_CUDA(cudaMemset(p, 0xff, n * sizeof(T)));  // NaN in bf16 and fp32: unwritten shows
    return p;
}
static std::vector<float> download_bf16(const bf16_t *dev, size_t n)
{
    std::vector<uint16_t> bits(n);
    HOST_CUDA(cudaDeviceSynchronize());
    HOST_CUDA(cudaMemcpy(bits.data(), dev, n * 2, cudaMemcpyDeviceToHost));
    std::vector<float> out(n);
    for (size_t i = 0; i < n; i++)
        out[i] = bf16_float(bits[i]);
    return out;
}
static std::vector<float> download_f32(const float *dev, size_t n)
{
    std::vector<float> out(n);
    HOST_CUDA(cudaDeviceSynchronize());
    HOST_CUDA(cudaMemcpy(out.data(), dev, n * 4, cudaMemcpyDeviceToHost));
    return out;
}
static double rel_l2(const std::vector<float> &got, const std::vector<float> &want)
{
    double diff = 0, ref = 0;
    for (size_t i = 0; i < want.size(); i++) {
        if (!isfinite(got[i]))
            return INFINITY;
        double d = (double)got[i] - want[i];
        diff += d * d;
        ref += (double)want[i] * want[i];
    }
    return sqrt(diff / (ref > 0 ? ref : 1e-300));
}
static void check(const char *what, const char *name, const std::vector<float> &got, const std::vector<float> &want,
                  double tol)
{
    double e = rel_l2(got, want);
    ok(e <= tol, "%s %s: relative L2 error %.2e <= %.0e, no NaN (%zu values)", what, name, e, tol, want.size());
}

// Outputs: one bf16 rounding of an fp32 result, plus the probabilities rounded to bf16 before
// P V (as every flash kernel does). Gradients: dS rounded to bf16 before two more products.
static const double TOL_OUT = 8e-3, TOL_LSE = 1e-5, TOL_GRAD = 2e-2;

static void test_attention(std::vector<int> doc_lengths, int Hq, int Hkv, int hd)
{
    int version = cuda_attention_set_version(1);  // read the current one back
    cuda_attention_set_version(version);
    std::vector<int32_t> cu(1, 0);
    for (int len : doc_lengths)
        cu.push_back(cu.back() + len);
    int T = cu.back(), n_seqs = (int)doc_lengths.size();
    size_t nq = (size_t)T * Hq * hd, nkv = (size_t)T * Hkv * hd;
    // q scaled up so that the softmax is far from uniform (scores of a few units)
    Bf16Tensor q(nq, 2.0f), k(nkv), v(nkv), dout(nq);
    int32_t *d_cu;
    HOST_CUDA(cudaMalloc(&d_cu, cu.size() * 4));
    HOST_CUDA(cudaMemcpy(d_cu, cu.data(), cu.size() * 4, cudaMemcpyHostToDevice));
    bf16_t *d_out = dev_alloc<bf16_t>(nq), *d_dq = dev_alloc<bf16_t>(nq), *d_dk = dev_alloc<bf16_t>(nkv),
           *d_dv = dev_alloc<bf16_t>(nkv);
    float *d_lse = dev_alloc<float>((size_t)T * Hq);
    size_t ws_bytes = cuda_attention_backward_workspace_bytes(T, Hq, hd);
    void *d_ws = dev_alloc<char>(ws_bytes);

    char what[96];
    snprintf(what, sizeof what, "attention v%d T=%d docs=%d heads %d/%d hd=%d", version, T, n_seqs, Hq, Hkv, hd);
    LAUNCHED(cuda_attention_forward(d_out, d_lse, q.dev, k.dev, v.dev, d_cu, n_seqs, T, Hq, Hkv, hd, NULL, E));
    LAUNCHED(cuda_attention_backward(d_dq, d_dk, d_dv, dout.dev, q.dev, k.dev, v.dev, d_out, d_lse, d_cu, n_seqs, T,
                                     Hq, Hkv, hd, d_ws, ws_bytes, NULL, E));
    std::vector<float> out(nq), lse((size_t)T * Hq), dq(nq), dk(nkv), dv(nkv);
    ok(cpu_attention_forward(out.data(), lse.data(), q.value.data(), k.value.data(), v.value.data(), cu.data(),
                             n_seqs, Hq, Hkv, hd) == 0,
       "%s: CPU forward", what);
    cpu_attention_backward(dq.data(), dk.data(), dv.data(), dout.value.data(), q.value.data(), k.value.data(),
                           v.value.data(), out.data(), lse.data(), cu.data(), n_seqs, Hq, Hkv, hd);
    check(what, "out", download_bf16(d_out, nq), out, TOL_OUT);
    check(what, "lse", download_f32(d_lse, (size_t)T * Hq), lse, TOL_LSE);
    if (n_seqs == T) {
        // every query sees only itself: the softmax of one score is 1 whatever the score, so dq
        // and dk are exactly 0 (the CPU's too); a relative error to 0 means nothing, bound it
        float worst = 0;
        for (float x : download_bf16(d_dq, nq))
            worst = isfinite(x) && isfinite(worst) ? fmaxf(worst, fabsf(x)) : NAN;
        for (float x : download_bf16(d_dk, nkv))
            worst = isfinite(x) && isfinite(worst) ? fmaxf(worst, fabsf(x)) : NAN;
        ok(worst <= 1e-3f, "%s dq, dk: documents of one token give |dq|, |dk| = %.1e <= 1e-3", what, worst);
    } else {
        check(what, "dq", download_bf16(d_dq, nq), dq, TOL_GRAD);
        check(what, "dk", download_bf16(d_dk, nkv), dk, TOL_GRAD);
    }
    check(what, "dv", download_bf16(d_dv, nkv), dv, TOL_GRAD);
    cudaFree(d_cu), cudaFree(d_out), cudaFree(d_dq), cudaFree(d_dk), cudaFree(d_dv), cudaFree(d_lse), cudaFree(d_ws);
}

static void rejects(int rc, const Err &err, const char *needle, const char *what)
{
    ok(rc == -1 && strstr(err.msg, "attention.cu:") && strstr(err.msg, needle), "attention rejects %s: %s", what,
       rc == -1 ? err.msg : "accepted");
}

static void test_shape_errors(void)
{
    Err err;
    bf16_t *p = (bf16_t *)16;
    float *f = (float *)16;
    const int32_t *cu = (const int32_t *)16;
    rejects(cuda_attention_forward(p, f, p, p, p, cu, 1, 8, 4, 4, 96, NULL, &err), err, "head_dim=96",
            "head_dim 96");
    rejects(cuda_attention_forward(p, f, p, p, p, cu, 1, 8, 6, 4, 64, NULL, &err), err, "n_heads=6",
            "6 query heads over 4 kv heads");
    rejects(cuda_attention_forward(p, f, p, p, p, cu, 9, 8, 4, 4, 64, NULL, &err), err, "n_seqs=9",
            "more sequences than positions");
    rejects(cuda_attention_forward(p, f, (bf16_t *)18, p, p, cu, 1, 8, 4, 4, 64, NULL, &err), err, "aligned",
            "a misaligned q");
    size_t ws = cuda_attention_backward_workspace_bytes(8, 4, 64);
    rejects(cuda_attention_backward(p, p, p, p, p, p, p, p, f, cu, 1, 8, 4, 4, 64, p, ws - 1, NULL, &err), err,
            "workspace", "a short workspace");
    rejects(cuda_attention_backward(p, p, p, p, p, p, p, p, NULL, cu, 1, 8, 4, 4, 64, p, ws, NULL, &err), err,
            "NULL", "a missing lse");
}

// ---- benchmark: Llama-3-8B attention (32 query heads, 8 kv heads, head_dim 128) -----------------

template <typename F> static double median_us(F fn, int reps)
{
    cudaEvent_t start, stop;
    HOST_CUDA(cudaEventCreate(&start));
    HOST_CUDA(cudaEventCreate(&stop));
    for (int i = 0; i < 3; i++)
        fn();
    std::vector<float> ms(reps);
    for (int i = 0; i < reps; i++) {
        HOST_CUDA(cudaEventRecord(start));
        fn();
        HOST_CUDA(cudaEventRecord(stop));
        HOST_CUDA(cudaEventSynchronize(stop));
        HOST_CUDA(cudaEventElapsedTime(&ms[i], start, stop));
    }
    std::sort(ms.begin(), ms.end());
    cudaEventDestroy(start), cudaEventDestroy(stop);
    return ms[reps / 2] * 1000.0;
}

static int bench(void)
{
    const int Hq = 32, Hkv = 8, hd = 128, reps = 20;
    struct Shape {
        const char *name;
        int n_docs, doc_len;
    } shapes[] = {{"2 x 2048", 2, 2048}, {"1 x 8192", 1, 8192}, {"8 x 512", 8, 512}};
    cudaDeviceProp prop;
    HOST_CUDA(cudaGetDeviceProperties(&prop, 0));
    printf("# %s, %d SMs; heads %d/%d x %d; causal FLOPs: forward 4 * hd * Hq * sum(len^2)/2, backward 2.5x\n",
           prop.name, prop.multiProcessorCount, Hq, Hkv, hd);
    printf("%-13s %12s %9s %12s %9s\n", "shape", "forward us", "TFLOP/s", "backward us", "TFLOP/s");
    for (const Shape &s : shapes) {
        int T = s.n_docs * s.doc_len;
        std::vector<int32_t> cu(1, 0);
        for (int i = 0; i < s.n_docs; i++)
            cu.push_back(cu.back() + s.doc_len);
        size_t nq = (size_t)T * Hq * hd, nkv = (size_t)T * Hkv * hd;
        Bf16Tensor q(nq), k(nkv), v(nkv), dout(nq);
        int32_t *d_cu;
        HOST_CUDA(cudaMalloc(&d_cu, cu.size() * 4));
        HOST_CUDA(cudaMemcpy(d_cu, cu.data(), cu.size() * 4, cudaMemcpyHostToDevice));
        bf16_t *out = dev_alloc<bf16_t>(nq), *dq = dev_alloc<bf16_t>(nq), *dk = dev_alloc<bf16_t>(nkv),
               *dv = dev_alloc<bf16_t>(nkv);
        float *lse = dev_alloc<float>((size_t)T * Hq);
        size_t ws_bytes = cuda_attention_backward_workspace_bytes(T, Hq, hd);
        void *ws = dev_alloc<char>(ws_bytes);
        double flops = 4.0 * hd * Hq * s.n_docs * (double)s.doc_len * s.doc_len / 2;
        std::vector<float> first_out, first_dq;
        for (int version = 1; version <= 3; version++) {
            cuda_attention_set_version(version);
            double fwd = median_us(
                [&] { LAUNCHED(cuda_attention_forward(out, lse, q.dev, k.dev, v.dev, d_cu, s.n_docs, T, Hq, Hkv, hd, NULL, E)); },
                reps);
            double bwd = median_us(
                [&] {
                    LAUNCHED(cuda_attention_backward(dq, dk, dv, dout.dev, q.dev, k.dev, v.dev, out, lse, d_cu, s.n_docs, T,
                                                     Hq, Hkv, hd, ws, ws_bytes, NULL, E));
                },
                reps);
            // at these sizes there is no CPU twin to compare with: the versions' outputs must agree
            // bit for bit (same arithmetic in the same order); dq only to fp32 rounding (its
            // atomics add in any order); nothing may be NaN
            std::vector<float> got_out = download_bf16(out, nq), got_dq = download_bf16(dq, nq);
            size_t bad = 0;
            for (size_t i = 0; i < nq; i++)
                bad += !isfinite(got_out[i]) || !isfinite(got_dq[i]);
            char same[64] = "";
            if (version == 1)
                first_out = got_out, first_dq = got_dq;
            else
                snprintf(same, sizeof same, "  out %s v1's, dq %.1e from v1's",
                         got_out == first_out ? "identical to" : "DIFFERS from", rel_l2(got_dq, first_dq));
            printf("%-10s v%d %12.1f %9.0f %12.1f %9.0f%s%s\n", s.name, version, fwd, flops / fwd / 1e6, bwd,
                   2.5 * flops / bwd / 1e6, bad ? "  NaN in out or dq" : "", same);
        }
        cudaFree(d_cu), cudaFree(out), cudaFree(dq), cudaFree(dk), cudaFree(dv), cudaFree(lse), cudaFree(ws);
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *seed_env = getenv("GPU_TEST_SEED");
    uint64_t seed = seed_env ? strtoull(seed_env, NULL, 10) : (uint64_t)time(NULL);
    rng_state = seed;
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    if (argc > 1 && !strcmp(argv[1], "--bench"))
        return bench();
    printf("# GPU_TEST_SEED=%llu\n", (unsigned long long)seed);
    for (int version = 1; version <= 3; version++) {
        cuda_attention_set_version(version);
        test_attention({1, 37, 200, 1, 65, 129, 3, 90}, 6, 2, 64);  // GQA 3:1, tiles straddle documents
        test_attention({1100}, 4, 1, 128);                          // one document over 18 tiles, MQA
        test_attention({63, 64, 65, 1, 1, 300}, 8, 8, 128);         // lengths at the tile edges, MHA
        test_attention({1}, 4, 2, 64);                              // T = 1
        test_attention({1, 1, 1, 1, 1}, 8, 2, 128);                 // only one-token documents
        test_attention({5, 700, 11}, 4, 2, 64);
    }
    ok(cuda_attention_set_version(4) == -1 && cuda_attention_set_version(3) == 3,
       "attention: an unknown kernel version is refused and changes nothing");
    test_shape_errors();
    return done_testing();
}
