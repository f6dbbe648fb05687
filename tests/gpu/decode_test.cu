// The decode kernels (kernels/gemv.cu, kernels/decode_attention.cu) against their CPU twins
// (lib/cpu_ops.c: cpu_gemv, cpu_decode_attention) on fresh random inputs of awkward sizes:
// k not a multiple of the 32-wide k step, rows not a multiple of the 16-row tile, every batch
// width (1..64 and a batch over 64 done in two passes), split-K forced on and off, LoRA ranks
// that are not multiples of 16, GQA groups of 1, 3, 4 and 8, sequences of length 0 and ones
// ending mid-split. Outputs are poisoned with NaN before each launch, and the KV cache past
// each sequence's length holds NaN, so an unwritten output or a read past the end fails.
// Error measure: ||gpu - cpu|| / ||cpu|| (L2), the CPU twin fed the same bf16-rounded inputs.
//   decode_test            TAP correctness tests (prove runs it through tests/gpu/decode.t)
//   decode_test --bench    table at Llama-3-8B shapes: copy bandwidth, our GEMV (launch shape
//                          variants), cuBLAS, decode attention (medians of CUDA-event timings)
// GPU_TEST_SEED=N repeats a run's inputs; by default the seed comes from the clock and is printed.
#include <cublas_v2.h>

#include "cpu_ops.h"
#include "decode_attention.cuh"
#include "gemv.cuh"
#include "harness.cuh"

static void *dev_zeros(size_t bytes)
{
    void *p;
    HOST_CUDA(cudaMalloc(&p, bytes ? bytes : 1));
    HOST_CUDA(cudaMemset(p, 0, bytes ? bytes : 1));
    return p;
}
static const double TOL_F32 = 1e-4;   // fp32 sums in another order (tensor-core adds)

// One GEMV case: bf16 output, fp32 output, and (when rank > 0) with LoRA; each forced ksplit.
static void test_gemv(int batch, int out, int in, int rank, std::vector<int> ksplits)
{
    Bf16Tensor x((size_t)batch * in), w((size_t)out * in, 0.05f), A((size_t)(rank ? rank : 1) * in, 0.05f),
        B((size_t)out * (rank ? rank : 1), 0.05f);
    const float scale = rank ? 32.0f / rank : 0.0f;
    GemvLora lora = {A.dev, B.dev, rank, scale};
    std::vector<float> want((size_t)batch * out);
    cpu_gemv(want.data(), x.value.data(), w.value.data(), batch, out, in, rank ? A.value.data() : NULL,
             B.value.data(), rank, scale);
    size_t ws_bytes = cuda_gemv_workspace_bytes(batch, out, in, rank);
    // forced ksplits need room for ksplit partial tiles of up to 8 columns
    size_t tiles = (out + 15) / 16, forced = 0;
    for (int ks : ksplits)
        forced = std::max(forced, (size_t)ks * tiles * 8 * 128 * 4 + 65536 + tiles * 4);
    size_t ws_size = std::max(ws_bytes, forced);
    void *ws = dev_zeros(ws_size);
    bf16_t *y = dev_alloc<bf16_t>((size_t)batch * out);
    float *y32 = dev_alloc<float>((size_t)batch * out);
    char what[160];
    const GemvLora *lp = rank ? &lora : NULL;

    LAUNCHED(cuda_gemv(y, NULL, x.dev, w.dev, batch, out, in, lp, ws, ws_bytes, NULL, E));
    snprintf(what, sizeof what, "gemv batch=%d out=%d in=%d rank=%d bf16 out (workspace %zu B)", batch, out, in,
             rank, ws_bytes);
    std::vector<float> first = download_bf16(y, (size_t)batch * out);
    check(what, first, want, TOL_BF16);
    LAUNCHED(cuda_gemv(NULL, y32, x.dev, w.dev, batch, out, in, lp, ws, ws_bytes, NULL, E));
    check("  same, fp32 out", download_f32(y32, (size_t)batch * out), want, TOL_F32);
    // a second call on the same workspace (split-K counters left at zero) gives the same bits
    HOST_CUDA(cudaMemset(y, 0xff, (size_t)batch * out * 2));
    LAUNCHED(cuda_gemv(y, NULL, x.dev, w.dev, batch, out, in, lp, ws, ws_bytes, NULL, E));
    std::vector<float> again = download_bf16(y, (size_t)batch * out);
    ok(memcmp(first.data(), again.data(), first.size() * 4) == 0, "  same, repeated: identical bits");
    for (int ks : ksplits) {
        GemvTuning tune = {0, 0, ks, 0};
        HOST_CUDA(cudaMemset(y32, 0xff, (size_t)batch * out * 4));
        LAUNCHED(cuda_gemv_tuned(NULL, y32, x.dev, w.dev, batch, out, in, lp, ws, ws_size, &tune, NULL, E));
        snprintf(what, sizeof what, "  same, ksplit %d forced, fp32 out", ks);
        check(what, download_f32(y32, (size_t)batch * out), want, TOL_F32);
    }
    if (rank) {  // the adapter's term matters: without it the result is off
        LAUNCHED(cuda_gemv(NULL, y32, x.dev, w.dev, batch, out, in, NULL, ws, ws_bytes, NULL, E));
        double e = rel_l2(download_f32(y32, (size_t)batch * out).data(), want.data(), want.size());
        ok(e > 1e-2, "  without the adapter the result differs (relative error %.2e)", e);
    }
    cudaFree(ws);
    cudaFree(y);
    cudaFree(y32);
}

// cuda_gemv_row (one row, RMSNorm folded in or not, SwiGLU of stacked rows or a residual) against
// the CPU: the input made as cuda_rmsnorm_forward makes it (1/rms in double, one bf16 rounding of
// each value), cpu_gemv, then the residual (one rounding) or SwiGLU of the bf16-rounded gate and
// up; the fp32 output without either; PDL and plain launches bit-identical.
static void test_gemv_row(int out, int in, bool norm, bool swiglu)
{
    int rows = swiglu ? 2 * out : out;
    Bf16Tensor x(in), w((size_t)rows * in, 0.05f), nw(in, 0.1f, 1.0f), res(out);
    std::vector<float> input(in);
    double ss = 0;
    for (int k = 0; k < in; k++)
        ss += (double)x.value[k] * x.value[k];
    float r = (float)(1.0 / sqrt(ss / in + 1e-5));
    for (int k = 0; k < in; k++)
        input[k] = norm ? bf16_float(bf16_bits(nw.value[k] * (x.value[k] * r))) : x.value[k];
    std::vector<float> prod(rows), want(out);
    cpu_gemv(prod.data(), input.data(), w.value.data(), 1, rows, in, NULL, NULL, 0, 0.0f);
    for (int i = 0; i < out; i++) {
        if (swiglu) {
            float g = bf16_float(bf16_bits(prod[i])), u = bf16_float(bf16_bits(prod[out + i]));
            want[i] = g / (1.0f + expf(-g)) * u;
        } else {
            want[i] = prod[i] + res.value[i];
        }
    }
    const bf16_t *nwp = norm ? nw.dev : NULL;
    bf16_t *y = dev_alloc<bf16_t>(out);
    float *y32 = dev_alloc<float>(rows);
    HOST_CUDA(cudaMemcpy(y, res.dev, (size_t)out * 2, cudaMemcpyDeviceToDevice));
    LAUNCHED(cuda_gemv_row(y, NULL, swiglu ? NULL : y, x.dev, w.dev, out, in, nwp, 1e-5f, swiglu, 1, NULL, E));
    char what[160];
    snprintf(what, sizeof what, "gemv row out=%d in=%d%s, bf16 out %s (PDL launch)", out, in,
             norm ? ", RMSNorm" : "", swiglu ? "= SwiGLU of gate|up" : "+= residual");
    std::vector<float> got = download_bf16(y, out);
    check(what, got, want, TOL_BF16);
    LAUNCHED(cuda_gemv_row(NULL, y32, NULL, x.dev, w.dev, rows, in, nwp, 1e-5f, 0, 1, NULL, E));
    std::vector<float> got32 = download_f32(y32, rows);
    check("  the product alone, fp32 out", got32, prod, norm ? 1e-3 : TOL_F32);  // 1/rms: float vs double
    HOST_CUDA(cudaMemset(y32, 0xff, (size_t)rows * 4));
    LAUNCHED(cuda_gemv_row(NULL, y32, NULL, x.dev, w.dev, rows, in, nwp, 1e-5f, 0, 0, NULL, E));
    std::vector<float> plain = download_f32(y32, rows);
    ok(!memcmp(plain.data(), got32.data(), (size_t)rows * 4), "  same, plain launch: identical bits");
    cudaFree(y);
    cudaFree(y32);
}

static void test_gemv_row_errors(void)
{
    Err err;
    void *p = (void *)(uintptr_t)4096;
    const bf16_t *b = (const bf16_t *)p;
    int rc = cuda_gemv_row((bf16_t *)p, NULL, NULL, b, b, 64, 12, NULL, 0, 0, 0, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "in=12"), "gemv row rejects in = 12: %s", rc == -1 ? err.msg : "accepted");
    rc = cuda_gemv_row((bf16_t *)p, NULL, NULL, b, b, 64, 16, b + 1, 0, 0, 0, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "norm weight"), "gemv row rejects a misaligned norm weight: %s",
       rc == -1 ? err.msg : "accepted");
    rc = cuda_gemv_row(NULL, (float *)p, b, b, b, 64, 16, NULL, 0, 0, 0, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "residual"), "gemv row rejects a residual with fp32 output: %s",
       rc == -1 ? err.msg : "accepted");
    rc = cuda_gemv_row((bf16_t *)p, NULL, b, b + 4096, b, 64, 16, NULL, 0, 1, 0, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "swiglu"), "gemv row rejects SwiGLU with a residual: %s",
       rc == -1 ? err.msg : "accepted");
    rc = cuda_gemv_row((bf16_t *)p, NULL, NULL, b + 8, b, 64, 16, NULL, 0, 0, 0, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "overlaps"), "gemv row rejects y over x: %s", rc == -1 ? err.msg : "accepted");
}

// Every (warps, unroll, L2 prefetch) a batch allows, on one shape.
static void test_gemv_variants(int batch, int out, int in)
{
    Bf16Tensor x((size_t)batch * in), w((size_t)out * in, 0.05f);
    std::vector<float> want((size_t)batch * out);
    cpu_gemv(want.data(), x.value.data(), w.value.data(), batch, out, in, NULL, NULL, 0, 0);
    size_t ws_size = (size_t)32 * ((out + 15) / 16) * 8 * 128 * 4 + 65536;
    void *ws = dev_zeros(ws_size);
    float *y32 = dev_alloc<float>((size_t)batch * out);
    int max_unroll = batch <= 8 ? 8 : batch <= 16 ? 4 : 2;
    double worst = 0;
    int n = 0;
    for (int warps = 4; warps <= 8; warps *= 2)
        for (int unroll = 1; unroll <= max_unroll; unroll *= 2)
            for (int prefetch = 0; prefetch < 2; prefetch++) {
                GemvTuning tune = {warps, unroll, 0, prefetch};
                HOST_CUDA(cudaMemset(y32, 0xff, (size_t)batch * out * 4));
                LAUNCHED(
                    cuda_gemv_tuned(NULL, y32, x.dev, w.dev, batch, out, in, NULL, ws, ws_size, &tune, NULL, E));
                worst = std::max(worst, rel_l2(download_f32(y32, want.size()).data(), want.data(), want.size()));
                n++;
            }
    ok(worst <= TOL_F32, "gemv batch=%d out=%d in=%d: all %d launch shapes within %.0e (worst %.2e)", batch, out,
       in, n, TOL_F32, worst);
    cudaFree(ws);
    cudaFree(y32);
}

static void test_gemv_errors(void)
{
    Bf16Tensor x(64), w(64 * 16);
    size_t ws_bytes = cuda_gemv_workspace_bytes(1, 64, 16, 0);
    void *ws = dev_zeros(ws_bytes);
    bf16_t *y = dev_alloc<bf16_t>(64);
    Err err;
    int rc = cuda_gemv(y, NULL, x.dev, w.dev, 1, 64, 12, NULL, ws, ws_bytes, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "gemv.cu:") && strstr(err.msg, "in=12"), "gemv rejects in=12: %s",
       rc == -1 ? err.msg : "accepted");
    rc = cuda_gemv(y, NULL, x.dev + 1, w.dev, 1, 64, 16, NULL, ws, ws_bytes, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "aligned"), "gemv rejects a misaligned x: %s", rc == -1 ? err.msg : "accepted");
    rc = cuda_gemv(y, NULL, x.dev, w.dev, 1, 64, 16, NULL, ws, 0, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "workspace"), "gemv rejects a short workspace: %s",
       rc == -1 ? err.msg : "accepted");
    GemvLora lora = {w.dev, w.dev, 0, 1.0f};
    rc = cuda_gemv(y, NULL, x.dev, w.dev, 1, 64, 16, &lora, ws, ws_bytes, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "rank=0"), "gemv rejects LoRA rank 0: %s", rc == -1 ? err.msg : "accepted");
    cudaFree(ws);
    cudaFree(y);
}

// One decode-attention case; lens[b] <= max_len <= max_seq.
static void test_decode_attention(int n_heads, int n_kv, int head_dim, int max_seq, int max_len,
                                  std::vector<int32_t> lens)
{
    int batch = (int)lens.size();
    size_t cache_n = (size_t)batch * n_kv * max_seq * head_dim, q_n = (size_t)batch * n_heads * head_dim;
    Bf16Tensor q(q_n), k(cache_n), v(cache_n);
    // past each sequence's end: NaN (never read)
    for (int b = 0; b < batch; b++)
        for (int j = 0; j < n_kv; j++)
            for (int p = lens[b]; p < max_seq; p++)
                for (int d = 0; d < head_dim; d++) {
                    size_t i = (((size_t)b * n_kv + j) * max_seq + p) * head_dim + d;
                    k.bits[i] = v.bits[i] = 0x7fc0;
                }
    k.upload();
    v.upload();
    const float scale = 1.0f / sqrtf((float)head_dim);
    std::vector<float> want(q_n);
    cpu_decode_attention(want.data(), q.value.data(), k.value.data(), v.value.data(), lens.data(), batch, n_heads,
                         n_kv, head_dim, max_seq, scale);
    int32_t *d_lens;
    HOST_CUDA(cudaMalloc(&d_lens, batch * sizeof(int32_t)));
    HOST_CUDA(cudaMemcpy(d_lens, lens.data(), batch * sizeof(int32_t), cudaMemcpyHostToDevice));
    size_t ws_bytes = cuda_decode_attention_workspace_bytes(batch, n_heads, n_kv, head_dim, max_len);
    void *ws = dev_zeros(ws_bytes);   // the split counters start at zero
    bf16_t *out = dev_alloc<bf16_t>(q_n);
    LAUNCHED(cuda_decode_attention(out, q.dev, k.dev, v.dev, d_lens, batch, n_heads, n_kv, head_dim, max_seq, max_len,
                                   scale, ws, ws_bytes, NULL, E));
    char what[200], lens_s[64] = "";
    for (int b = 0; b < batch && b < 6; b++)
        snprintf(lens_s + strlen(lens_s), sizeof lens_s - strlen(lens_s), "%s%d", b ? "," : "", lens[b]);
    snprintf(what, sizeof what, "decode attention heads %d/%d x %d, max_seq %d, max_len %d, lens %s%s", n_heads, n_kv,
             head_dim, max_seq, max_len, lens_s, batch > 6 ? ",..." : "");
    std::vector<float> got = download_bf16(out, q_n);
    check(what, got, want, TOL_BF16);
    bool zero_rows = true;
    for (int b = 0; b < batch; b++)
        for (size_t i = 0; lens[b] == 0 && i < (size_t)n_heads * head_dim; i++)
            zero_rows = zero_rows && got[(size_t)b * n_heads * head_dim + i] == 0.0f;
    ok(zero_rows, "  sequences of length 0 give zero rows");
    cudaFree(d_lens);
    cudaFree(ws);
    cudaFree(out);
}

// cuda_decode_attention_rope: for each active row the new token's k (rotated) and v land in the
// cache at pos[b] and q (rotated) attends over [0, pos[b] + 1): against the CPU's rope, cache
// store and attention. Inactive rows (lens == pos) store nothing (their slot stays NaN). Called
// twice on one workspace: the same bits (its split counters are back at zero after a call).
static void test_decode_attention_rope(int n_heads, int n_kv, int head_dim, int max_seq, int max_len,
                                       std::vector<int32_t> pos, std::vector<int> active)
{
    int batch = (int)pos.size(), QD = n_heads * head_dim, KD = n_kv * head_dim, W = QD + 2 * KD;
    size_t cache_n = (size_t)batch * n_kv * max_seq * head_dim, q_n = (size_t)batch * QD;
    Bf16Tensor qkv((size_t)batch * W), k(cache_n), v(cache_n);
    std::vector<int32_t> lens(batch);
    for (int b = 0; b < batch; b++) {
        lens[b] = pos[b] + active[b];
        for (int j = 0; j < n_kv; j++)  // from the new position on: NaN (written, or never read)
            for (int p = pos[b]; p < max_seq; p++)
                for (int d = 0; d < head_dim; d++) {
                    size_t i = (((size_t)b * n_kv + j) * max_seq + p) * head_dim + d;
                    k.bits[i] = v.bits[i] = 0x7fc0;
                    k.value[i] = v.value[i] = NAN;
                }
    }
    k.upload();
    v.upload();
    std::vector<float> inv_freq(head_dim / 2);
    for (int i = 0; i < head_dim / 2; i++)
        inv_freq[i] = powf(500000.0f, -2.0f * i / head_dim);
    // the CPU: rotate q and k (bf16 rounding, as the GPU stores them), store k and v, attend
    std::vector<float> q(q_n), kn((size_t)batch * KD), vn((size_t)batch * KD);
    for (int b = 0; b < batch; b++)
        for (int e = 0; e < W; e++) {
            float x = qkv.value[(size_t)b * W + e];
            if (e < QD)
                q[(size_t)b * QD + e] = x;
            else if (e < QD + KD)
                kn[(size_t)b * KD + e - QD] = x;
            else
                vn[(size_t)b * KD + e - QD - KD] = x;
        }
    cpu_rope_forward(q.data(), q.data(), pos.data(), inv_freq.data(), batch, n_heads, head_dim);
    cpu_rope_forward(kn.data(), kn.data(), pos.data(), inv_freq.data(), batch, n_kv, head_dim);
    for (float &x : q)
        x = bf16_float(bf16_bits(x));
    for (float &x : kn)
        x = bf16_float(bf16_bits(x));
    std::vector<float> kc = k.value, vc = v.value;
    for (int b = 0; b < batch; b++)
        for (int e = 0; active[b] && e < KD; e++) {
            size_t at = (((size_t)b * n_kv + e / head_dim) * max_seq + pos[b]) * head_dim + e % head_dim;
            kc[at] = kn[(size_t)b * KD + e];
            vc[at] = vn[(size_t)b * KD + e];
        }
    const float scale = 1.0f / sqrtf((float)head_dim);
    std::vector<float> want(q_n);
    cpu_decode_attention(want.data(), q.data(), kc.data(), vc.data(), lens.data(), batch, n_heads, n_kv, head_dim,
                         max_seq, scale);

    int32_t *d_pos = dev_alloc<int32_t>(batch), *d_lens = dev_alloc<int32_t>(batch);
    float *d_freq = dev_alloc<float>(head_dim / 2);
    HOST_CUDA(cudaMemcpy(d_pos, pos.data(), batch * 4, cudaMemcpyHostToDevice));
    HOST_CUDA(cudaMemcpy(d_lens, lens.data(), batch * 4, cudaMemcpyHostToDevice));
    HOST_CUDA(cudaMemcpy(d_freq, inv_freq.data(), inv_freq.size() * 4, cudaMemcpyHostToDevice));
    size_t ws_bytes = cuda_decode_attention_workspace_bytes(batch, n_heads, n_kv, head_dim, max_len);
    void *ws = dev_zeros(ws_bytes);
    bf16_t *out = dev_alloc<bf16_t>(q_n);
    LAUNCHED(cuda_decode_attention_rope(out, qkv.dev, k.dev, v.dev, d_pos, d_lens, d_freq, batch, n_heads, n_kv,
                                        head_dim, max_seq, max_len, scale, ws, ws_bytes, 0, NULL, E));
    std::vector<float> got = download_bf16(out, q_n);
    char what[200], pos_s[64] = "";
    for (int b = 0; b < batch && b < 6; b++)
        snprintf(pos_s + strlen(pos_s), sizeof pos_s - strlen(pos_s), "%s%d%s", b ? "," : "", pos[b],
                 active[b] ? "" : "(off)");
    snprintf(what, sizeof what, "decode attention + RoPE + cache store, heads %d/%d x %d, max_len %d, pos %s",
             n_heads, n_kv, head_dim, max_len, pos_s);
    check(what, got, want, TOL_BF16);
    HOST_CUDA(cudaMemset(out, 0xff, q_n * 2));
    LAUNCHED(cuda_decode_attention_rope(out, qkv.dev, k.dev, v.dev, d_pos, d_lens, d_freq, batch, n_heads, n_kv,
                                        head_dim, max_seq, max_len, scale, ws, ws_bytes, 0, NULL, E));
    std::vector<float> again = download_bf16(out, q_n);
    ok(!memcmp(again.data(), got.data(), q_n * sizeof(float)), "  a second call on the same workspace: same bits");
    // the cache entries at pos: written (rotated k within a bf16 step of the CPU's, v exact) or untouched
    std::vector<float> kg = download_bf16(k.dev, cache_n), vg = download_bf16(v.dev, cache_n);
    int bad = 0;
    for (int b = 0; b < batch; b++)
        for (int e = 0; e < KD; e++) {
            size_t at = (((size_t)b * n_kv + e / head_dim) * max_seq + pos[b]) * head_dim + e % head_dim;
            if (active[b])
                bad += !(fabsf(kg[at] - kc[at]) <= 1.0f / 128 * fabsf(kc[at]) + 1e-6f) || vg[at] != vc[at];
            else
                bad += !std::isnan(kg[at]) || !std::isnan(vg[at]);
        }
    ok(bad == 0, "  cache at pos: active rows hold the rotated k and the v, inactive rows untouched (%d wrong)", bad);
    cudaFree(d_pos), cudaFree(d_lens), cudaFree(d_freq), cudaFree(ws), cudaFree(out);
}

static void test_decode_attention_errors(void)
{
    Err err;
    void *p = (void *)(uintptr_t)4096;
    const bf16_t *b = (const bf16_t *)p;
    int rc = cuda_decode_attention((bf16_t *)p, b, b, b, (const int32_t *)p, 1, 32, 8, 96, 100, 10, 1, (float *)p,
                                   1 << 20, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "decode_attention.cu:") && strstr(err.msg, "head_dim=96"),
       "decode attention rejects head_dim 96: %s", rc == -1 ? err.msg : "accepted");
    rc = cuda_decode_attention((bf16_t *)p, b, b, b, (const int32_t *)p, 1, 32, 3, 128, 100, 10, 1, (float *)p,
                               1 << 20, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "multiple"), "decode attention rejects 32 heads over 3 kv heads: %s",
       rc == -1 ? err.msg : "accepted");
    rc = cuda_decode_attention((bf16_t *)p, b, b, b, (const int32_t *)p, 1, 32, 2, 128, 100, 10, 1, (float *)p,
                               1 << 20, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "at most 8"), "decode attention rejects 16 query heads per kv head: %s",
       rc == -1 ? err.msg : "accepted");
    rc = cuda_decode_attention((bf16_t *)p, b, b, b, (const int32_t *)p, 1, 32, 8, 128, 100, 101, 1, (float *)p,
                               1 << 20, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "max_len=101"), "decode attention rejects max_len > max_seq: %s",
       rc == -1 ? err.msg : "accepted");
    rc = cuda_decode_attention((bf16_t *)p, b, b, b, (const int32_t *)p, 1, 32, 8, 128, 100, 100, 1, (float *)p, 16,
                               NULL, &err);
    ok(rc == -1 && strstr(err.msg, "workspace"), "decode attention rejects a short workspace: %s",
       rc == -1 ? err.msg : "accepted");
    rc = cuda_decode_attention_rope((bf16_t *)p, b, (bf16_t *)p, (bf16_t *)p, NULL, (const int32_t *)p,
                                    (const float *)p, 1, 32, 8, 128, 100, 100, 1, p, 1 << 20, 0, NULL, &err);
    ok(rc == -1 && strstr(err.msg, "NULL"), "decode attention with RoPE rejects a NULL pos: %s",
       rc == -1 ? err.msg : "accepted");
    rc = cuda_decode_attention_rope((bf16_t *)p, b, (bf16_t *)p, (bf16_t *)p, (const int32_t *)p,
                                    (const int32_t *)p, (const float *)p, 1, 32, 8, 80, 100, 100, 1, p, 1 << 20, 0, NULL,
                                    &err);
    ok(rc == -1 && strstr(err.msg, "head_dim=80"), "decode attention with RoPE rejects head_dim 80: %s",
       rc == -1 ? err.msg : "accepted");
}

// ---- benchmark ----------------------------------------------------------------------------------

// Median over `reps` timings of `inner` back-to-back calls of fn(i) (after a warm-up), in
// microseconds per call. Back-to-back: a decode step runs its products one after another.
template <typename F> static double median_per_call_us(F fn, int reps = 15, int inner = 20)
{
    Timer tm;
    for (int i = 0; i < inner; i++)
        fn(i);
    std::vector<float> ms(reps);
    for (int r = 0; r < reps; r++) {
        HOST_CUDA(cudaEventRecord(tm.start));
        for (int i = 0; i < inner; i++)
            fn(i);
        HOST_CUDA(cudaEventRecord(tm.stop));
        HOST_CUDA(cudaEventSynchronize(tm.stop));
        HOST_CUDA(cudaEventElapsedTime(&ms[r], tm.start, tm.stop));
    }
    std::sort(ms.begin(), ms.end());
    return ms[reps / 2] * 1000.0 / inner;
}

// Several copies of a weight matrix, so that consecutive calls read different memory and none
// is served from the 50 MB L2 (each call then reads its weights from HBM, as a decode step does).
struct WeightSet {
    std::vector<bf16_t *> copies;
    WeightSet(int out, int in)
    {
        size_t bytes = (size_t)out * in * 2;
        int n = (int)std::max<size_t>(2, std::min<size_t>(16, (512u << 20) / bytes + 1));
        std::vector<uint16_t> host((size_t)out * in), pattern((size_t)1 << 20);
        for (auto &b : pattern)  // random values, tiled: the time does not depend on them
            b = bf16_bits(0.02f * normal());
        for (size_t i = 0; i < host.size(); i++)
            host[i] = pattern[i % pattern.size()];
        for (int c = 0; c < n; c++) {
            bf16_t *p;
            HOST_CUDA(cudaMalloc(&p, bytes));
            HOST_CUDA(cudaMemcpy(p, host.data(), bytes, cudaMemcpyHostToDevice));
            copies.push_back(p);
        }
    }
    bf16_t *at(int i) const { return copies[i % copies.size()]; }
    ~WeightSet()
    {
        for (auto p : copies)
            cudaFree(p);
    }
};

static int bench(void)
{
    cudaDeviceProp prop;
    HOST_CUDA(cudaGetDeviceProperties(&prop, 0));
    cublasHandle_t blas;
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "%s: cublasCreate failed\n", harness_prog);
        return 1;
    }
    printf("# %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
    double copy_gbs;
    {
        size_t bytes = (size_t)1 << 30;
        void *a, *b;
        HOST_CUDA(cudaMalloc(&a, bytes));
        HOST_CUDA(cudaMalloc(&b, bytes));
        HOST_CUDA(cudaMemset(a, 1, bytes));
        double us = median_per_call_us(
            [&](int) { HOST_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); }, 9, 3);
        copy_gbs = 2.0 * bytes / us / 1e3;
        printf("# ceiling: cudaMemcpy device to device, 1 GiB: %.0f GB/s (read + write)\n", copy_gbs);
        cudaFree(a);
        cudaFree(b);
    }
    const int shapes[][2] = {{4096, 4096}, {1024, 4096}, {14336, 4096}, {4096, 14336}, {128256, 4096}};
    const char *names[] = {"q/o 4096->4096", "k/v 4096->1024", "gate/up 4096->14336", "down 14336->4096",
                           "lm_head 4096->128256"};
    const int per_token[] = {2, 2, 2, 1, 0};  // per layer (32 layers); lm_head once
    size_t ws_size = (size_t)256 << 20;
    void *ws = dev_zeros(ws_size);
    bf16_t *y;
    float *y32;
    HOST_CUDA(cudaMalloc(&y, (size_t)64 * 128256 * 2));
    HOST_CUDA(cudaMalloc(&y32, (size_t)64 * 128256 * 4));
    Bf16Tensor xs((size_t)64 * 14336), lora_a((size_t)16 * 14336, 0.02f), lora_b((size_t)128256 * 16, 0.02f);
    printf("\n%-22s %5s %-22s %9s %9s %7s\n", "shape (in->out)", "batch", "kernel", "us/call", "GB/s", "of copy");
    double token_us_ours = 0, token_us_cublas = 0;
    for (int s = 0; s < 5; s++) {
        int out = shapes[s][0], in = shapes[s][1];
        WeightSet w(out, in);
        double bytes = (double)out * in * 2;
        auto report = [&](int batch, const char *kernel, double us) {
            printf("%-22s %5d %-22s %9.2f %9.0f %6.1f%%\n", names[s], batch, kernel, us, bytes / us / 1e3,
                   100.0 * bytes / us / 1e3 / copy_gbs);
            fflush(stdout);
        };
        // our default launch, then the variants
        for (int batch : {1, 2, 8, 16, 32, 64}) {
            double us = median_per_call_us([&](int i) {
                LAUNCHED(cuda_gemv(y, NULL, xs.dev, w.at(i), batch, out, in, NULL, ws, ws_size, NULL, E));
            });
            report(batch, "ours (default)", us);
            if (batch == 1)
                token_us_ours += us * (s == 4 ? 1 : 32 * per_token[s]);
            const float one = 1.0f, zero = 0.0f;
            double cb = median_per_call_us([&](int i) {
                cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, out, batch, in, &one, w.at(i), CUDA_R_16BF, in, xs.dev,
                             CUDA_R_16BF, in, &zero, y, CUDA_R_16BF, out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
            });
            report(batch, "cublasGemmEx", cb);
            if (batch == 1)
                token_us_cublas += cb * (s == 4 ? 1 : 32 * per_token[s]);
        }
        if (s == 4) {
            double us = median_per_call_us([&](int i) {
                LAUNCHED(cuda_gemv(NULL, y32, xs.dev, w.at(i), 1, out, in, NULL, ws, ws_size, NULL, E));
            });
            report(1, "ours, fp32 logits", us);
        }
        // launch shapes: {warps, unroll, ksplit (0: default), L2 256-byte prefetch}
        const int variants[][4] = {{8, 2, 0, 1}, {4, 2, 0, 0}, {4, 2, 0, 1}, {8, 4, 0, 0}, {8, 4, 0, 1},
                                   {8, 2, 1, 0}, {8, 2, 2, 0}, {8, 2, 4, 0}, {8, 2, 8, 0}};
        for (auto &v : variants) {
            if (s == 4 && v[2] > 1)
                continue;
            GemvTuning tune = {v[0], v[1], v[2], v[3]};
            double us = median_per_call_us([&](int i) {
                LAUNCHED(cuda_gemv_tuned(y, NULL, xs.dev, w.at(i), 1, out, in, NULL, ws, ws_size, &tune, NULL, E));
            });
            char label[40];
            snprintf(label, sizeof label, "w%d u%d ks%d%s", v[0], v[1], v[2], v[3] ? " L2pf" : "");
            report(1, label, us);
        }
        if (s != 4) {
            GemvLora lora = {lora_a.dev, lora_b.dev, 16, 2.0f};
            for (int batch : {1, 64}) {
                double us = median_per_call_us([&](int i) {
                    LAUNCHED(cuda_gemv(y, NULL, xs.dev, w.at(i), batch, out, in, &lora, ws, ws_size, NULL, E));
                });
                report(batch, "ours + LoRA r16", us);
            }
        }
    }
    double weight_bytes = 0;
    for (int s = 0; s < 5; s++)
        weight_bytes += (double)shapes[s][0] * shapes[s][1] * 2 * (s == 4 ? 1 : 32 * per_token[s]);
    printf("\n# one decode token's products at batch 1 (7 per layer x 32 + lm_head, %.2f GB): ours %.0f us "
           "(%.0f GB/s, %.0f tokens/s if nothing else ran), cuBLAS %.0f us (%.0f tokens/s)\n",
           weight_bytes / 1e9, token_us_ours, weight_bytes / token_us_ours / 1e3, 1e6 / token_us_ours,
           token_us_cublas, 1e6 / token_us_cublas);

    // decode attention at Llama-3-8B heads: 32 query heads over 8 kv heads of 128
    printf("\n%-44s %9s %9s %7s\n", "decode attention (32/8 heads x 128)", "us/call", "GB/s", "of copy");
    for (auto cfg : std::vector<std::pair<int, int>>{{1, 512}, {1, 2048}, {1, 8192}, {1, 32768}, {16, 2048},
                                                      {64, 2048}, {64, 512}}) {
        int batch = cfg.first, len = cfg.second, H = 32, KV = 8, D = 128;
        size_t cache_n = (size_t)batch * KV * len * D;
        bf16_t *k, *v, *q, *o;
        HOST_CUDA(cudaMalloc(&k, cache_n * 2));
        HOST_CUDA(cudaMalloc(&v, cache_n * 2));
        HOST_CUDA(cudaMemset(k, 0x3c, cache_n * 2));  // small finite bf16 values
        HOST_CUDA(cudaMemset(v, 0x3c, cache_n * 2));
        HOST_CUDA(cudaMalloc(&q, (size_t)batch * H * D * 2));
        HOST_CUDA(cudaMemset(q, 0x3c, (size_t)batch * H * D * 2));
        HOST_CUDA(cudaMalloc(&o, (size_t)batch * H * D * 2));
        std::vector<int32_t> lens(batch, len);
        int32_t *d_lens;
        HOST_CUDA(cudaMalloc(&d_lens, batch * 4));
        HOST_CUDA(cudaMemcpy(d_lens, lens.data(), batch * 4, cudaMemcpyHostToDevice));
        size_t wsb = cuda_decode_attention_workspace_bytes(batch, H, KV, D, len);
        void *aws = dev_zeros(wsb);
        double us = median_per_call_us([&](int) {
            LAUNCHED(cuda_decode_attention(o, q, k, v, d_lens, batch, H, KV, D, len, len, 0.088f, aws, wsb, NULL, E));
        });
        double bytes = 2.0 * cache_n * 2;
        char label[64];
        snprintf(label, sizeof label, "batch %d, length %d (KV %.0f MB)", batch, len, bytes / 1e6);
        printf("%-44s %9.2f %9.0f %6.1f%%\n", label, us, bytes / us / 1e3, 100.0 * bytes / us / 1e3 / copy_gbs);
        fflush(stdout);
        cudaFree(k), cudaFree(v), cudaFree(q), cudaFree(o), cudaFree(d_lens), cudaFree(aws);
    }
    HOST_CUDA(cudaDeviceSynchronize());
    cudaFree(ws), cudaFree(y), cudaFree(y32);
    cublasDestroy(blas);
    return 0;
}

int main(int argc, char **argv)
{
    HarnessMode mode = harness_start(argc, argv);
    if (mode != HARNESS_TESTS)
        return mode == HARNESS_BENCH ? bench() : 0;
    // (batch, out, in, LoRA rank, forced ksplits)
    test_gemv(1, 1037, 776, 0, {1, 3, 32});    // k tail (776 = 24 steps of 32 + 8), row tail
    test_gemv(1, 4096, 4096, 16, {1, 5});      // a Llama shape with its adapter
    test_gemv(3, 333, 520, 7, {2});            // rank 7: a partial LoRA tile
    test_gemv(9, 100, 136, 0, {1, 4});         // two mma columns
    test_gemv(17, 77, 264, 3, {1});            // four columns
    test_gemv(33, 50, 4096, 16, {1, 8});       // eight columns, split-K over long rows
    test_gemv(64, 1000, 512, 0, {});           // a full 64-row pass
    test_gemv(100, 257, 128, 20, {1, 2});      // batch over 64: two passes
    test_gemv(2, 20, 8, 1, {1});               // the smallest k: one lane of four has data
    test_gemv_variants(1, 1037, 776);
    test_gemv_variants(5, 130, 4104);
    test_gemv_variants(16, 300, 520);
    test_gemv_variants(64, 64, 256);
    test_gemv_errors();
    test_gemv_row(1037, 776, false, false);    // row and piece tails, few rows a block
    test_gemv_row(4096, 4096, true, false);    // q|k|v-like with RMSNorm: one round of loads
    test_gemv_row(333, 14336, false, false);   // down-like: four rounds
    test_gemv_row(5, 8, true, false);          // one piece
    test_gemv_row(14336, 4096, true, true);    // gate|up with SwiGLU: blocks walk several rows
    test_gemv_row(77, 2056, false, true);
    test_gemv_row(50000, 64, true, false);     // more rows than resident warps, short rows
    test_gemv_row_errors();
    // (n_heads, n_kv_heads, head_dim, max_seq, max_len, lens)
    test_decode_attention(32, 8, 128, 2100, 2049, {2049});             // Llama-3-8B heads
    test_decode_attention(12, 4, 64, 700, 700, {1, 513, 700});         // head_dim 64, G 3
    test_decode_attention(8, 8, 128, 100, 37, {0, 37});                // G 1, an empty sequence
    test_decode_attention(16, 2, 128, 20000, 19999, {19999});          // G 8, many splits
    test_decode_attention(4, 2, 64, 3000, 3000, {2999, 64, 1000, 5, 2048});  // splits of 64 exactly
    test_decode_attention(32, 8, 64, 300, 300, std::vector<int32_t>(40, 257));  // batch 40
    // (n_heads, n_kv_heads, head_dim, max_seq, max_len, pos, active)
    test_decode_attention_rope(32, 8, 128, 300, 300, {17, 250, 0}, {1, 1, 1});    // 1 and 4 splits used, length 1
    test_decode_attention_rope(12, 4, 64, 700, 600, {511, 64, 3}, {1, 0, 1});     // an inactive row, G 3
    test_decode_attention_rope(16, 2, 128, 5000, 5000, {4321}, {1});              // G 8, many splits
    test_decode_attention_rope(32, 8, 64, 300, 300, std::vector<int32_t>(40, 130), std::vector<int>(40, 1));
    test_decode_attention_errors();
    return done_testing();
}
