// kernels/attention.cu against its CPU twin (lib/cpu_ops.c: cpu_attention_forward/backward) on
// random inputs packed as several documents of awkward lengths (1, not multiples of the 64-row
// tile, one longer than many tiles), with outputs poisoned with NaN before each launch.
// Error measure: ||gpu - cpu|| / ||cpu|| (L2), the CPU twin fed the same bf16-rounded inputs.
//   attention_test          TAP correctness tests (prove runs it through tests/gpu/attention.t)
//   attention_test --bench  forward / backward timings at Llama-3-8B attention shapes (32 query
//                           heads, 8 kv heads, head_dim 128) as TFLOP/s; compare with
//                           tests/gpu/bench_attention_torch.py run on the same machine
// GPU_TEST_SEED=N repeats a run's inputs; by default the seed comes from the clock and is printed.
#include "attention.cuh"
#include "cpu_ops.h"
#include "harness.cuh"

// harness check() of one output of a case: `what` names the case, `name` the output
static void check(const char *what, const char *name, const std::vector<float> &got, const std::vector<float> &want,
                  double tol)
{
    char label[128];
    snprintf(label, sizeof label, "%s %s", what, name);
    check(label, got, want, tol);
}

// Outputs: one bf16 rounding of an fp32 result, plus the probabilities rounded to bf16 before
// P V (as every flash kernel does). Gradients: dS rounded to bf16 before two more products.
static const double TOL_OUT = 8e-3, TOL_LSE = 1e-5, TOL_GRAD = 2e-2;

static void test_attention(std::vector<int> doc_lengths, int Hq, int Hkv, int hd)
{
    int version = cuda_attention_set_version(ATTENTION_FIRST_VERSION);  // read the current ones back
    cuda_attention_set_version(version);
    int hpb = cuda_attention_set_heads_per_block(0);
    cuda_attention_set_heads_per_block(hpb);
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
    size_t ws_bytes = cuda_attention_backward_workspace_bytes(T, Hq, Hkv, hd);
    void *d_ws = dev_alloc<char>(ws_bytes);

    char what[128], blocks[48] = "";
    if (hpb)
        snprintf(blocks, sizeof blocks, " (backward: %d query heads a block)", hpb);
    snprintf(what, sizeof what, "attention v%d%s T=%d docs=%d heads %d/%d hd=%d", version, blocks, T, n_seqs, Hq, Hkv,
             hd);
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
    size_t ws = cuda_attention_backward_workspace_bytes(8, 4, 4, 64);
    rejects(cuda_attention_backward(p, p, p, p, p, p, p, p, f, cu, 1, 8, 4, 4, 64, p, ws - 1, NULL, &err), err,
            "workspace", "a short workspace");
    rejects(cuda_attention_backward(p, p, p, p, p, p, p, p, NULL, cu, 1, 8, 4, 4, 64, p, ws, NULL, &err), err,
            "NULL", "a missing lse");
}

// ---- benchmark: Llama-3-8B attention (32 query heads, 8 kv heads, head_dim 128) -----------------

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
        size_t ws_bytes = cuda_attention_backward_workspace_bytes(T, Hq, Hkv, hd);
        void *ws = dev_alloc<char>(ws_bytes);
        double flops = 4.0 * hd * Hq * s.n_docs * (double)s.doc_len * s.doc_len / 2;
        std::vector<float> first_out, first_dq;
        for (int version = ATTENTION_FIRST_VERSION; version <= ATTENTION_VERSIONS; version++) {
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
            // at these sizes there is no CPU twin to compare with: the versions agree to bf16
            // rounding (out) and fp32 rounding (dq, added in any order); nothing may be NaN
            std::vector<float> got_out = download_bf16(out, nq), got_dq = download_bf16(dq, nq);
            size_t bad = 0;
            for (size_t i = 0; i < nq; i++)
                bad += !isfinite(got_out[i]) || !isfinite(got_dq[i]);
            char same[96] = "";
            if (version == ATTENTION_FIRST_VERSION) {
                first_out = got_out, first_dq = got_dq;
            } else {
                char out_diff[32] = "identical to";
                if (got_out != first_out)
                    snprintf(out_diff, sizeof out_diff, "%.1e from", rel_l2(got_out.data(), first_out.data(), nq));
                snprintf(same, sizeof same, "  out %s v%d's, dq %.1e from v%d's", out_diff, ATTENTION_FIRST_VERSION,
                         rel_l2(got_dq.data(), first_dq.data(), first_dq.size()), ATTENTION_FIRST_VERSION);
            }
            printf("%-10s v%d %12.1f %9.0f %12.1f %9.0f%s%s\n", s.name, version, fwd, flops / fwd / 1e6, bwd,
                   2.5 * flops / bwd / 1e6, bad ? "  NaN in out or dq" : "", same);
        }
        // version 5's backward with each number of query heads a block (cuda_attention_set_heads_per_block)
        for (int hpb : {1, 2, 4}) {
            int was = cuda_attention_set_heads_per_block(hpb);
            double bwd = median_us(
                [&] {
                    LAUNCHED(cuda_attention_backward(dq, dk, dv, dout.dev, q.dev, k.dev, v.dev, out, lse, d_cu, s.n_docs, T,
                                                     Hq, Hkv, hd, ws, ws_bytes, NULL, E));
                },
                reps);
            cuda_attention_set_heads_per_block(was);
            printf("%-10s v%d %12s %9s %12.1f %9.0f  %d query heads a backward block\n", s.name, ATTENTION_VERSIONS, "",
                   "", bwd, 2.5 * flops / bwd / 1e6, hpb);
        }
        cudaFree(d_cu), cudaFree(out), cudaFree(dq), cudaFree(dk), cudaFree(dv), cudaFree(lse), cudaFree(ws);
    }
    return 0;
}

int main(int argc, char **argv)
{
    HarnessMode mode = harness_start(argc, argv);
    if (mode != HARNESS_TESTS)
        return mode == HARNESS_BENCH ? bench() : 0;
    for (int version = ATTENTION_FIRST_VERSION; version <= ATTENTION_VERSIONS; version++) {
        cuda_attention_set_version(version);
        test_attention({1, 37, 200, 1, 65, 129, 3, 90}, 6, 2, 64);  // GQA 3:1, tiles straddle documents
        test_attention({1100}, 4, 1, 128);                          // one document over 18 tiles, MQA
        test_attention({63, 64, 65, 1, 1, 300}, 8, 8, 128);         // lengths at the tile edges, MHA
        test_attention({1}, 4, 2, 64);                              // T = 1
        test_attention({1, 1, 1, 1, 1}, 8, 2, 128);                 // only one-token documents
        test_attention({5, 700, 11}, 4, 2, 64);
        test_attention({130, 257, 640}, 8, 2, 128);  // whole tiles inside documents, and tiles across them
    }
    // version 5's backward with fewer query heads a block than the kv head has (dk, dv through
    // the fp32 accumulators; the default for documents of over 4096 positions on average)
    for (int hpb : {1, 2}) {
        cuda_attention_set_heads_per_block(hpb);
        test_attention({1100}, 4, 1, 128);
        test_attention({130, 257, 640}, 8, 2, 128);
    }
    cuda_attention_set_heads_per_block(0);
    test_attention({4200}, 4, 2, 128);  // one document of over 4096 positions: one query head a block
    ok(cuda_attention_set_version(ATTENTION_VERSIONS + 1) == -1 &&
           cuda_attention_set_version(ATTENTION_FIRST_VERSION - 1) == -1 &&
           cuda_attention_set_version(ATTENTION_VERSIONS) == ATTENTION_VERSIONS,
       "attention: an unknown kernel version is refused and changes nothing");
    test_shape_errors();
    return done_testing();
}
