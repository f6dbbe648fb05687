// The CPU twins of the CUDA kernels (lib/cpu_ops.c) against PyTorch / transformers goldens
// written by tests/golden/make_ops_goldens.py into tests/fixtures/ops/ (float64 references of
// float32 inputs, so the tolerance is float32 rounding). RoPE's inverse frequencies come from
// model.h's rope_inv_freq and are checked against transformers' for default, linear and llama3.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops.h"
#include "model.h"
#include "tap.h"
#ifdef HAVE_CUDA
// the launchers' headers are plain C; their argument checks run before any CUDA call, so they
// are tested here, on machines without a GPU too (tests/gpu/ tests the kernels themselves)
#include "../../kernels/adamw.cuh"
#include "../../kernels/attention.cuh"
#include "../../kernels/cross_entropy.cuh"
#include "../../kernels/decode_attention.cuh"
#include "../../kernels/embedding.cuh"
#include "../../kernels/gemv.cuh"
#include "../../kernels/rmsnorm.cuh"
#include "../../kernels/rope.cuh"
#include "../../kernels/swiglu.cuh"
#endif

#define OPS_DIR "tests/fixtures/ops"

typedef struct {
    char name[32];
    int is_int;      // 0 float32, 1 int32
    uint32_t count;
    void *data;
} GoldenTensor;

typedef struct {
    GoldenTensor t[16];
    int n;
} Golden;

static uint32_t read_u32(FILE *f, int *bad)
{
    unsigned char b[4];
    if (fread(b, 1, 4, f) != 4) {
        *bad = 1;
        return 0;
    }
    return b[0] | b[1] << 8 | b[2] << 16 | (uint32_t)b[3] << 24;
}

// Reads OPS_DIR/<op>.bin (format in make_ops_goldens.py); 0 on success.
static int golden_load(Golden *g, const char *op)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s.bin", OPS_DIR, op);
    memset(g, 0, sizeof *g);
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    int bad = 0, c;
    while (!bad && (c = fgetc(f)) != EOF) {
        ungetc(c, f);
        if (g->n == 16)
            break;
        GoldenTensor *t = &g->t[g->n];
        uint32_t len = read_u32(f, &bad);
        if (bad || len >= sizeof t->name || fread(t->name, 1, len, f) != len)
            break;
        t->is_int = (int)read_u32(f, &bad);
        t->count = read_u32(f, &bad);
        if (bad || t->count > (1u << 24) || !(t->data = malloc((size_t)t->count * 4 + 4)) ||
            fread(t->data, 4, t->count, f) != t->count)
            break;
        g->n++;
    }
    int complete = feof(f) && !ferror(f);
    fclose(f);
    return complete ? 0 : -1;
}

static void golden_free(Golden *g)
{
    for (int i = 0; i < g->n; i++)
        free(g->t[i].data);
}

// The named tensor, which must hold exactly `count` elements; NULL (and a failed test) otherwise.
static void *tensor(Golden *g, const char *name, uint32_t count)
{
    for (int i = 0; i < g->n; i++)
        if (!strcmp(g->t[i].name, name)) {
            if (g->t[i].count != count) {
                ok(0, "golden tensor %s has %u elements, expected %u", name, g->t[i].count, count);
                return NULL;
            }
            return g->t[i].data;
        }
    ok(0, "golden tensor %s is missing", name);
    return NULL;
}

// max |got - want| / (max |want| + tiny): a relative error, robust to single small entries.
static double rel_err(const float *got, const float *want, size_t n)
{
    double max_diff = 0, max_ref = 1e-30;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        if (!(d <= max_diff))  // also catches NaN
            max_diff = d;
        if (fabs(want[i]) > max_ref)
            max_ref = fabs(want[i]);
    }
    return max_diff / max_ref;
}

static void check_close(const char *what, const float *got, const float *want, size_t n, double tol)
{
    double e = rel_err(got, want, n);
    if (!ok(e <= tol, "%s matches PyTorch (relative error %.2e <= %.0e)", what, e, tol))
        printf("#   first values: got %g want %g\n", got[0], want[0]);
}

static void test_embedding(void)
{
    Golden g;
    if (golden_load(&g, "embedding") < 0) {
        ok(0, "read %s/embedding.bin", OPS_DIR);
        return;
    }
    int V = 11, C = 7, T = 9;
    const float *table = tensor(&g, "table", V * C), *want = tensor(&g, "out", T * C);
    const int32_t *ids = tensor(&g, "ids", T);
    if (table && want && ids) {
        float out[9 * 7];
        cpu_embedding_forward(out, ids, table, T, C);
        check_close("embedding forward", out, want, T * C, 0);
    }
    golden_free(&g);
}

static void test_rmsnorm(void)
{
    Golden g;
    if (golden_load(&g, "rmsnorm") < 0) {
        ok(0, "read %s/rmsnorm.bin", OPS_DIR);
        return;
    }
    enum { T = 5, C = 13 };
    const float *x = tensor(&g, "x", T * C), *w = tensor(&g, "weight", C), *dout = tensor(&g, "dout", T * C);
    const float *want = tensor(&g, "out", T * C), *want_dx = tensor(&g, "dx", T * C),
                *want_dw = tensor(&g, "dweight", C);
    if (x && w && dout && want && want_dx && want_dw) {
        float out[T * C], rstd[T], dx[T * C], dw[C];
        cpu_rmsnorm_forward(out, rstd, x, w, T, C, 1e-5f);
        check_close("rmsnorm forward", out, want, T * C, 1e-6);
        // dweight accumulates: start from 1 and subtract it again
        for (int i = 0; i < C; i++)
            dw[i] = 1.0f;
        cpu_rmsnorm_backward(dx, dw, dout, x, w, rstd, T, C);
        for (int i = 0; i < C; i++)
            dw[i] -= 1.0f;
        check_close("rmsnorm backward dx", dx, want_dx, T * C, 1e-5);
        check_close("rmsnorm backward dweight (accumulated)", dw, want_dw, C, 1e-5);
        cpu_rmsnorm_backward(dx, NULL, dout, x, w, rstd, T, C);
        check_close("rmsnorm backward without dweight", dx, want_dx, T * C, 1e-5);
    }
    golden_free(&g);
}

static void test_rope(const char *op)
{
    Golden g;
    if (golden_load(&g, op) < 0) {
        ok(0, "read %s/%s.bin", OPS_DIR, op);
        return;
    }
    const int32_t *dims = tensor(&g, "dims", 3);
    const float *theta = tensor(&g, "theta", 1), *scaling = tensor(&g, "scaling", 5);
    if (!dims || !theta || !scaling) {
        golden_free(&g);
        return;
    }
    int T = dims[0], H = dims[1], D = dims[2];
    size_t n = (size_t)T * H * D;
    const float *inv_freq = tensor(&g, "inv_freq", D / 2), *x = tensor(&g, "x", n), *dout = tensor(&g, "dout", n),
                *want = tensor(&g, "out", n), *want_dx = tensor(&g, "dx", n);
    const int32_t *pos = tensor(&g, "pos", T);
    if (inv_freq && x && dout && want && want_dx && pos) {
        ModelConfig c;
        memset(&c, 0, sizeof c);
        c.head_dim = D;
        c.rope_theta = theta[0];
        c.rope_type = scaling[0] == 2 ? ROPE_LLAMA3 : scaling[0] == 1 ? ROPE_LINEAR : ROPE_DEFAULT;
        c.rope_factor = scaling[0] ? scaling[1] : 1;
        c.rope_low_freq_factor = scaling[2];
        c.rope_high_freq_factor = scaling[3];
        c.rope_original_max_pos = (int)scaling[4];
        c.max_seq_len = 8192;
        float *ours = malloc(D / 2 * sizeof(float)), *out = malloc(n * sizeof(float)),
              *dx = malloc(n * sizeof(float));
        rope_inv_freq(&c, ours);
        check_close(op, ours, inv_freq, D / 2, 1e-6);
        cpu_rope_forward(out, x, pos, inv_freq, T, H, D);
        check_close("rope forward", out, want, n, 2e-6);
        cpu_rope_backward(dx, dout, pos, inv_freq, T, H, D);
        check_close("rope backward", dx, want_dx, n, 2e-6);
        memcpy(out, x, n * sizeof(float));
        cpu_rope_forward(out, out, pos, inv_freq, T, H, D);
        check_close("rope forward in place", out, want, n, 2e-6);
        free(ours);
        free(out);
        free(dx);
    }
    golden_free(&g);
}

static void test_swiglu(void)
{
    Golden g;
    if (golden_load(&g, "swiglu") < 0) {
        ok(0, "read %s/swiglu.bin", OPS_DIR);
        return;
    }
    enum { N = 37 };
    const float *gate = tensor(&g, "gate", N), *up = tensor(&g, "up", N), *dout = tensor(&g, "dout", N),
                *want = tensor(&g, "out", N), *want_dg = tensor(&g, "dgate", N), *want_du = tensor(&g, "dup", N);
    if (gate && up && dout && want && want_dg && want_du) {
        float out[N], dg[N], du[N];
        cpu_swiglu_forward(out, gate, up, N);
        check_close("swiglu forward", out, want, N, 1e-6);
        cpu_swiglu_backward(dg, du, dout, gate, up, N);
        check_close("swiglu backward dgate", dg, want_dg, N, 1e-6);
        check_close("swiglu backward dup", du, want_du, N, 1e-6);
    }
    golden_free(&g);
}

static void test_cross_entropy(void)
{
    Golden g;
    if (golden_load(&g, "cross_entropy") < 0) {
        ok(0, "read %s/cross_entropy.bin", OPS_DIR);
        return;
    }
    const int32_t *dims = tensor(&g, "dims", 3);
    if (!dims) {
        golden_free(&g);
        return;
    }
    int T = dims[0], C = dims[1], V = dims[2];
    const float *h = tensor(&g, "hidden", T * C), *w = tensor(&g, "weight", V * C),
                *want = tensor(&g, "losses", T), *want_dh = tensor(&g, "dhidden", T * C);
    const int32_t *targets = tensor(&g, "targets", T);
    if (h && w && want && want_dh && targets) {
        float *losses = malloc(T * sizeof(float)), *dh = malloc((size_t)T * C * sizeof(float));
        int expect_trained = 0;
        for (int t = 0; t < T; t++)
            expect_trained += targets[t] >= 0;
        // chunk sizes: one token-wide, not dividing V, exactly V, larger than V
        int chunks[] = {1, 16, V, V + 5};
        for (int i = 0; i < 4; i++) {
            int trained = cpu_fused_cross_entropy(losses, dh, h, w, targets, T, C, V, chunks[i],
                                                  1.0f / expect_trained);
            is_int(trained, expect_trained, "cross-entropy counts trained positions (chunk %d)", chunks[i]);
            char what[64];
            snprintf(what, sizeof what, "cross-entropy losses (chunk %d)", chunks[i]);
            check_close(what, losses, want, T, 2e-6);
            snprintf(what, sizeof what, "cross-entropy dhidden (chunk %d)", chunks[i]);
            check_close(what, dh, want_dh, (size_t)T * C, 1e-5);
        }
        int32_t *bad = malloc(T * sizeof(int32_t));
        memcpy(bad, targets, T * sizeof(int32_t));
        bad[0] = V;
        is_int(cpu_fused_cross_entropy(losses, NULL, h, w, bad, T, C, V, 16, 1), -1,
               "cross-entropy rejects a target >= vocab size");
        is_int(cpu_fused_cross_entropy(losses, NULL, h, w, targets, T, C, V, 0, 1), -1,
               "cross-entropy rejects a chunk of 0");
        free(bad);
        free(losses);
        free(dh);
    }
    golden_free(&g);
}

static void test_adamw(void)
{
    Golden g;
    if (golden_load(&g, "adamw") < 0) {
        ok(0, "read %s/adamw.bin", OPS_DIR);
        return;
    }
    enum { N = 29, STEPS = 3 };
    const float *config = tensor(&g, "config", 3), *p0 = tensor(&g, "param0", N),
                *grads = tensor(&g, "grads", STEPS * N), *norms = tensor(&g, "norms", STEPS),
                *want_p = tensor(&g, "param", N), *want_m = tensor(&g, "exp_avg", N),
                *want_v = tensor(&g, "exp_avg_sq", N);
    if (config && p0 && grads && norms && want_p && want_m && want_v) {
        float p[N], m[N] = {0}, v[N] = {0}, got_norms[STEPS];
        memcpy(p, p0, sizeof p);
        for (int s = 0; s < STEPS; s++) {
            double norm = sqrt(cpu_grad_norm_squared(grads + s * N, N));
            got_norms[s] = (float)norm;
            cpu_adamw_step(p, grads + s * N, m, v, N, s + 1, config[0], 0.9, 0.999, 1e-8, config[1],
                           cpu_clip_coef(norm, config[2]));
        }
        check_close("gradient L2 norms", got_norms, norms, STEPS, 1e-6);
        int clipped = 0;
        for (int s = 0; s < STEPS; s++)
            clipped += norms[s] > config[2];
        ok(clipped > 0 && clipped < STEPS, "the goldens clip some steps and not others (%d of %d)", clipped, STEPS);
        check_close("adamw params after 3 clipped steps", p, want_p, N, 1e-6);
        check_close("adamw exp_avg", m, want_m, N, 1e-6);
        check_close("adamw exp_avg_sq", v, want_v, N, 1e-6);
    }
    ok(cpu_clip_coef(0.5, 1.0f) == 1.0f, "clip coefficient is 1 under the max norm");
    golden_free(&g);
}

// ---- attention: the twin against a naive double-precision softmax(Q K^T / sqrt(hd)) V built
// per sequence in the test, and its backward against central finite differences of that.

// out (T, Hq, hd) and lse (T, Hq) in double, each sequence's (len, len) score matrix in full.
static void naive_attention(double *out, double *lse, const double *q, const double *k, const double *v,
                            const int32_t *cu, int n_seqs, int Hq, int Hkv, int hd)
{
    for (int s = 0; s < n_seqs; s++) {
        int first = cu[s], len = cu[s + 1] - cu[s];
        double *scores = malloc((size_t)len * len * sizeof *scores);
        for (int h = 0; h < Hq; h++) {
            int kvh = h / (Hq / Hkv);
            for (int i = 0; i < len; i++) {
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= i; j++) {
                    double dot = 0;
                    for (int d = 0; d < hd; d++)
                        dot += q[((size_t)(first + i) * Hq + h) * hd + d] * k[((size_t)(first + j) * Hkv + kvh) * hd + d];
                    scores[i * len + j] = dot / sqrt((double)hd);
                    if (scores[i * len + j] > mx)
                        mx = scores[i * len + j];
                }
                for (int j = 0; j <= i; j++)
                    sum += exp(scores[i * len + j] - mx);
                lse[(size_t)(first + i) * Hq + h] = mx + log(sum);
                for (int d = 0; d < hd; d++) {
                    double o = 0;
                    for (int j = 0; j <= i; j++)
                        o += exp(scores[i * len + j] - mx) / sum * v[((size_t)(first + j) * Hkv + kvh) * hd + d];
                    out[((size_t)(first + i) * Hq + h) * hd + d] = o;
                }
            }
        }
        free(scores);
    }
}

// max |got - want| / max |want|
static double max_rel_f64(const float *got, const double *want, size_t n)
{
    double max_diff = 0, max_ref = 1e-30;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(got[i] - want[i]);
        if (!(d <= max_diff))
            max_diff = d;
        if (fabs(want[i]) > max_ref)
            max_ref = fabs(want[i]);
    }
    return max_diff / max_ref;
}

static uint64_t attn_rng = 0x243f6a8885a308d3ull;
static float attn_random(void)  // uniform in [-1, 1)
{
    attn_rng = attn_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((attn_rng >> 40) / 8388608.0 - 1.0);
}

static void test_attention(const int *lengths, int n_seqs, int Hq, int Hkv, int hd)
{
    int32_t cu[16] = {0};
    for (int s = 0; s < n_seqs; s++)
        cu[s + 1] = cu[s] + lengths[s];
    int T = cu[n_seqs];
    size_t nq = (size_t)T * Hq * hd, nkv = (size_t)T * Hkv * hd, n_all = nq + 2 * nkv;
    // inputs q | k | v in one buffer so the finite differences walk them with one index
    float *x = malloc(n_all * sizeof *x), *dout = malloc(nq * sizeof *dout);
    double *xd = malloc(n_all * sizeof *xd), *out_ref = malloc(nq * sizeof *out_ref),
           *lse_ref = malloc((size_t)T * Hq * sizeof *lse_ref), *grad_ref = malloc(n_all * sizeof *grad_ref);
    float *out = malloc(nq * sizeof *out), *lse = malloc((size_t)T * Hq * sizeof *lse),
          *grad = malloc(n_all * sizeof *grad);
    for (size_t i = 0; i < n_all; i++) {
        x[i] = 2.0f * attn_random();  // scores of a few units: a peaked softmax, not a uniform one
        xd[i] = x[i];
    }
    for (size_t i = 0; i < nq; i++)
        dout[i] = attn_random();
    char what[96];
    snprintf(what, sizeof what, "attention twin T=%d, %d sequences, heads %d/%d, hd %d", T, n_seqs, Hq, Hkv, hd);

    ok(cpu_attention_forward(out, lse, x, x + nq, x + nq + nkv, cu, n_seqs, Hq, Hkv, hd) == 0, "%s: forward runs", what);
    naive_attention(out_ref, lse_ref, xd, xd + nq, xd + nq + nkv, cu, n_seqs, Hq, Hkv, hd);
    double e = max_rel_f64(out, out_ref, nq);
    ok(e <= 1e-5, "%s: out = naive softmax(QK^T/sqrt(hd))V (relative error %.1e <= 1e-5)", what, e);
    e = max_rel_f64(lse, lse_ref, (size_t)T * Hq);
    ok(e <= 1e-5, "%s: lse = log of the softmax denominator (relative error %.1e <= 1e-5)", what, e);

    // L = sum(dout * out): dL/dx by central differences of the double reference, step 1e-4
    double *out_plus = malloc(nq * sizeof *out_plus), *out_minus = malloc(nq * sizeof *out_minus);
    for (size_t i = 0; i < n_all; i++) {
        double keep = xd[i], loss_plus = 0, loss_minus = 0;
        xd[i] = keep + 1e-4;
        naive_attention(out_plus, lse_ref, xd, xd + nq, xd + nq + nkv, cu, n_seqs, Hq, Hkv, hd);
        xd[i] = keep - 1e-4;
        naive_attention(out_minus, lse_ref, xd, xd + nq, xd + nq + nkv, cu, n_seqs, Hq, Hkv, hd);
        xd[i] = keep;
        for (size_t j = 0; j < nq; j++) {
            loss_plus += dout[j] * out_plus[j];
            loss_minus += dout[j] * out_minus[j];
        }
        grad_ref[i] = (loss_plus - loss_minus) / 2e-4;
    }
    ok(cpu_attention_backward(grad, grad + nq, grad + nq + nkv, dout, x, x + nq, x + nq + nkv, out, lse, cu, n_seqs,
                              Hq, Hkv, hd) == 0,
       "%s: backward runs", what);
    const char *names[3] = {"dq", "dk", "dv"};
    size_t offsets[3] = {0, nq, nq + nkv}, counts[3] = {nq, nkv, nkv};
    for (int t = 0; t < 3; t++) {
        e = max_rel_f64(grad + offsets[t], grad_ref + offsets[t], counts[t]);
        ok(e <= 1e-4, "%s: %s = finite differences of sum(dout * out) (relative error %.1e <= 1e-4)", what, names[t], e);
    }
    free(x), free(dout), free(xd), free(out_ref), free(lse_ref), free(grad_ref), free(out), free(lse), free(grad);
    free(out_plus), free(out_minus);
}

// ---- decode twins (cpu_gemv, cpu_decode_attention) ----

static float uniform_pm1(uint64_t *state)  // splitmix64 -> [-1, 1)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return (float)((double)((z ^ (z >> 31)) >> 11) / 4503599627370496.0 - 1.0);
}

// cpu_gemv against a double-precision dot product; its unmerged LoRA term against the same
// product with the adapter merged into W (W + scale * B A, what PEFT's merge does); a row of a
// batch against the same row alone.
static void test_gemv_twin(void)
{
    enum { BATCH = 3, OUT = 11, IN = 37, RANK = 5 };
    uint64_t rng = 7;
    float x[BATCH * IN], W[OUT * IN], A[RANK * IN], B[OUT * RANK], merged[OUT * IN];
    float y[BATCH * OUT], y_lora[BATCH * OUT], y_merged[BATCH * OUT], y_row[OUT], want[BATCH * OUT];
    const float scale = 2.0f;
    for (int i = 0; i < BATCH * IN; i++)
        x[i] = uniform_pm1(&rng);
    for (int i = 0; i < OUT * IN; i++)
        W[i] = uniform_pm1(&rng);
    for (int i = 0; i < RANK * IN; i++)
        A[i] = uniform_pm1(&rng);
    for (int i = 0; i < OUT * RANK; i++)
        B[i] = uniform_pm1(&rng);
    for (int b = 0; b < BATCH; b++)
        for (int o = 0; o < OUT; o++) {
            double s = 0;
            for (int k = 0; k < IN; k++)
                s += (double)x[b * IN + k] * W[o * IN + k];
            want[b * OUT + o] = (float)s;
        }
    cpu_gemv(y, x, W, BATCH, OUT, IN, NULL, NULL, 0, 0.0f);
    ok(rel_err(y, want, BATCH * OUT) < 1e-6, "gemv twin equals a double-precision product (%.1e)",
       rel_err(y, want, BATCH * OUT));
    for (int o = 0; o < OUT; o++)
        for (int k = 0; k < IN; k++) {
            double d = 0;
            for (int j = 0; j < RANK; j++)
                d += (double)B[o * RANK + j] * A[j * IN + k];
            merged[o * IN + k] = (float)(W[o * IN + k] + scale * d);
        }
    cpu_gemv(y_lora, x, W, BATCH, OUT, IN, A, B, RANK, scale);
    cpu_gemv(y_merged, x, merged, BATCH, OUT, IN, NULL, NULL, 0, 0.0f);
    ok(rel_err(y_lora, y_merged, BATCH * OUT) < 1e-5, "gemv twin: unmerged LoRA equals the merged weights (%.1e)",
       rel_err(y_lora, y_merged, BATCH * OUT));
    ok(rel_err(y_lora, y, BATCH * OUT) > 1e-2, "gemv twin: the adapter changes the result");
    cpu_gemv(y_row, x + 2 * IN, W, 1, OUT, IN, A, B, RANK, scale);
    ok(memcmp(y_row, y_lora + 2 * OUT, sizeof y_row) == 0, "gemv twin: a batch row equals the row alone");
}

// The decode step is the last query of causal attention: cpu_decode_attention over a cache
// must equal the last row of each sequence in cpu_attention_forward (checked against PyTorch
// above) on the same q, k, v. Cache slots past each sequence's end hold NaN: never read.
static void test_decode_attention_twin(void)
{
    enum { H = 6, KV = 2, HD = 8, MAX_SEQ = 16, NSEQ = 3 };
    const int lens[NSEQ] = {9, 1, 16};
    int cu[NSEQ + 1] = {0};
    for (int s = 0; s < NSEQ; s++)
        cu[s + 1] = cu[s] + lens[s];
    const int T = cu[NSEQ];
    uint64_t rng = 11;
    float q[26 * H * HD], k[26 * KV * HD], v[26 * KV * HD], prefill[26 * H * HD], lse[26 * H];
    float kc[NSEQ * KV * MAX_SEQ * HD], vc[NSEQ * KV * MAX_SEQ * HD], q_last[NSEQ * H * HD], dec[NSEQ * H * HD];
    float want[NSEQ * H * HD];
    for (int i = 0; i < T * H * HD; i++)
        q[i] = 2 * uniform_pm1(&rng);
    for (int i = 0; i < T * KV * HD; i++) {
        k[i] = 2 * uniform_pm1(&rng);
        v[i] = uniform_pm1(&rng);
    }
    ok(cpu_attention_forward(prefill, lse, q, k, v, cu, NSEQ, H, KV, HD) == 0, "prefill attention runs");
    for (size_t i = 0; i < sizeof kc / sizeof kc[0]; i++)
        kc[i] = vc[i] = NAN;
    for (int s = 0; s < NSEQ; s++) {
        for (int p = 0; p < lens[s]; p++)
            for (int j = 0; j < KV; j++)
                for (int d = 0; d < HD; d++) {
                    size_t slot = (((size_t)s * KV + j) * MAX_SEQ + p) * HD + d;
                    kc[slot] = k[((size_t)(cu[s] + p) * KV + j) * HD + d];
                    vc[slot] = v[((size_t)(cu[s] + p) * KV + j) * HD + d];
                }
        int last = cu[s + 1] - 1;
        memcpy(q_last + (size_t)s * H * HD, q + (size_t)last * H * HD, H * HD * sizeof(float));
        memcpy(want + (size_t)s * H * HD, prefill + (size_t)last * H * HD, H * HD * sizeof(float));
    }
    cpu_decode_attention(dec, q_last, kc, vc, lens, NSEQ, H, KV, HD, MAX_SEQ, 1.0f / sqrtf((float)HD));
    double e = rel_err(dec, want, NSEQ * H * HD);
    ok(e < 1e-6, "decode attention twin equals the last query of causal prefill attention (%.1e)", e);
    const int empty[1] = {0};
    cpu_decode_attention(dec, q_last, kc, vc, empty, 1, H, KV, HD, MAX_SEQ, 1.0f);
    int zero = 1;
    for (int i = 0; i < H * HD; i++)
        zero = zero && dec[i] == 0.0f;
    ok(zero, "decode attention twin: a sequence of length 0 gives a zero row");
}

#ifdef HAVE_CUDA
// rc must be -1 and the message must name the kernel's file and line and contain `what`.
static void rejects(int rc, const Err *err, const char *file, const char *what, const char *name)
{
    int named = rc == -1 && strstr(err->msg, file) && strstr(err->msg, ".cu:") && strstr(err->msg, what);
    if (!ok(named, "launcher rejects %s", name))
        printf("#   rc %d, message '%s'\n", rc, rc == -1 ? err->msg : "");
}

// Launchers' argument checks. The pointers are never dereferenced: each check fails first.
static void test_launcher_arguments(void)
{
    Err err;
    void *p = (void *)(uintptr_t)4096;  // non-NULL, never read
    void *q = (char *)p + 64;          // another such buffer
    rejects(cuda_embedding_forward(p, p, p, 4, 0, 10, NULL, NULL, &err), &err, "embedding", "C=0",
            "an embedding of width 0");
    rejects(cuda_embedding_forward(p, p, p, 4, 8, 0, NULL, NULL, &err), &err, "embedding", "V=0",
            "an embedding table of 0 rows");
    rejects(cuda_embedding_forward(NULL, p, p, 4, 8, 10, NULL, NULL, &err), &err, "embedding", "NULL",
            "a NULL embedding output");
    rejects(cuda_rmsnorm_forward(p, 8, NULL, p, p, p, -1, 8, 1e-5f, NULL, &err), &err, "rmsnorm", "T=-1",
            "a negative token count");
    rejects(cuda_rmsnorm_forward(p, 8, NULL, NULL, p, p, 4, 8, 1e-5f, NULL, &err), &err, "rmsnorm", "NULL",
            "rmsnorm without rstd");
    rejects(cuda_rmsnorm_forward(p, 7, NULL, p, p, p, 4, 8, 1e-5f, NULL, &err), &err, "rmsnorm", "ld_out=7",
            "an rmsnorm output row stride shorter than a row");
    rejects(cuda_rmsnorm_forward(p, 8, q, p, q, p, 4, 8, 1e-5f, NULL, &err), &err,
            "rmsnorm", "copy aliases", "an rmsnorm forward copying x over itself");
    rejects(cuda_rmsnorm_backward(p, 8, NULL, p, p, p, p, 4, 0, 0, NULL, &err), &err, "rmsnorm", "C=0",
            "an rmsnorm backward of width 0");
    rejects(cuda_rmsnorm_backward(p, 4, NULL, p, p, p, p, 4, 8, 0, NULL, &err), &err, "rmsnorm", "ld_dx=4",
            "an rmsnorm backward dx row stride shorter than a row");
    rejects(cuda_rmsnorm_backward(p, 8, NULL, p, p, p, p, 4, 8, 1, NULL, &err), &err, "rmsnorm", "aliases",
            "rmsnorm backward accumulating into its own dout");
    rejects(cuda_rope_forward(p, p, p, 4, 2, 7, NULL, &err), &err, "rope", "head_dim=7", "an odd head_dim");
    rejects(cuda_rope_backward(p, p, p, 4, 0, 8, NULL, &err), &err, "rope", "n_heads=0", "rope over 0 heads");
    rejects(cuda_rope_forward(p, NULL, p, 4, 2, 8, NULL, &err), &err, "rope", "NULL", "rope without positions");
    rejects(cuda_swiglu_forward(p, 8, NULL, p, 1, 8, NULL, &err), &err, "swiglu", "NULL", "swiglu without a gate");
    rejects(cuda_swiglu_forward(p, 6, p, p, 1, 8, NULL, &err), &err, "swiglu", "ld_out=6",
            "a swiglu output row stride shorter than a row");
    rejects(cuda_swiglu_forward(p, 10, p, q, 2, 8, NULL, &err), &err, "swiglu", "aliases",
            "swiglu forward over its own gate with spare columns");
    rejects(cuda_swiglu_backward(p, p, 8, p, p, p, 1, 8, NULL, &err), &err, "swiglu", "same buffer",
            "swiglu backward with dgate and dup in one buffer");
    rejects(cuda_swiglu_backward(p, q, 10, p, p, q, 2, 8, NULL, &err), &err, "swiglu",
            "aliases", "swiglu backward over its own inputs with spare columns");
    size_t ws = cuda_cross_entropy_workspace_bytes(6, 8, 50, 4, 16);
    rejects(cuda_fused_cross_entropy(p, p, p, p, p, 6, 8, 50, 4, 0, 1, p, ws, p, NULL, &err), &err,
            "cross_entropy", "vocab_chunk=0", "a vocabulary chunk of 0");
    rejects(cuda_fused_cross_entropy(p, p, p, p, p, 6, 8, 50, 0, 16, 1, p, ws, p, NULL, &err), &err,
            "cross_entropy", "token_chunk=0", "a token chunk of 0");
    rejects(cuda_fused_cross_entropy(p, p, p, p, p, 6, 8, 50, 4, 16, 1, p, ws - 1, p, NULL, &err), &err,
            "cross_entropy", "workspace", "a workspace one byte short");
    rejects(cuda_fused_cross_entropy(p, p, p, p, p, 6, 8, 50, 4, 16, 1, p, ws, NULL, NULL, &err), &err,
            "cross_entropy", "NULL", "cross-entropy without a cuBLAS handle");
    AdamWStep hp = {2e-4, 0.9, 0.999, 1e-8, 0.01, 0, 1.0};
    rejects(cuda_adamw_step(p, p, p, p, 8, &hp, p, NULL, &err), &err, "adamw", "step 0", "AdamW step 0");
    hp.step = 1;
    rejects(cuda_adamw_step(p, p, p, p, 8, &hp, NULL, NULL, &err), &err, "adamw", "gradient norm",
            "clipping without the gradient norm");
    rejects(cuda_grad_norm_squared(NULL, p, 8, NULL, &err), &err, "adamw", "NULL", "a NULL norm accumulator");
    // the workspace formula: one block and one chunk of a small problem, by hand
    is_int(cuda_cross_entropy_workspace_bytes(6, 8, 50, 4, 16), 256 + 256 + 3 * 256,
           "cross-entropy workspace: logits (gradients in place), fp32 d(hidden), 3 stats, 256-byte aligned");
    is_int(cuda_cross_entropy_workspace_bytes(6, 8, 50, 4, 64), 1024 + 3 * 256,
           "cross-entropy workspace without d(hidden) when one chunk covers the vocabulary");
}

// The attention launchers' argument checks (kernels/attention.cu).
static void test_attention_launcher_arguments(void)
{
    Err err;
    void *p = (void *)(uintptr_t)4096;  // non-NULL, 16-byte aligned, never read
    rejects(cuda_attention_forward(p, p, p, p, p, p, 1, 8, 4, 4, 96, NULL, &err), &err, "attention", "head_dim=96",
            "attention with head_dim 96");
    rejects(cuda_attention_forward(p, p, p, p, p, p, 1, 8, 6, 4, 64, NULL, &err), &err, "attention", "n_heads=6",
            "6 query heads over 4 kv heads");
    rejects(cuda_attention_forward(p, p, p, p, p, p, 0, 8, 4, 4, 64, NULL, &err), &err, "attention", "n_seqs=0",
            "attention over no sequence");
    rejects(cuda_attention_forward(p, p, (void *)((char *)p + 2), p, p, p, 1, 8, 4, 4, 64, NULL, &err), &err, "attention",
            "aligned", "a misaligned q");
    size_t ws = cuda_attention_backward_workspace_bytes(8, 4, 2, 64);
    // T = 8 rounds up to 64 positions for version 5's transposed lse and D (H, 64) and padded starts
    is_int(ws, 8 * 4 * 64 * 4 + 2 * 8 * 2 * 64 * 4 + 8 * 4 * 4 + 8 * 4 + 2 * 4 * 64 * 4 + 64 * 4,
           "attention backward workspace: fp32 dq (T, H, hd), dk and dv (T, Hkv, hd), D (T, H), sequence starts (T), "
           "lse and D transposed (H, T to 64), starts padded");
    rejects(cuda_attention_backward(p, p, p, p, p, p, p, p, p, p, 1, 8, 4, 4, 64, p, ws - 1, NULL, &err), &err,
            "attention", "workspace", "a short attention workspace");
    rejects(cuda_attention_backward(p, p, p, p, p, p, p, p, NULL, p, 1, 8, 4, 4, 64, p, ws, NULL, &err), &err,
            "attention", "NULL", "attention backward without lse");
    ok(cuda_attention_set_version(ATTENTION_VERSIONS + 1) == -1 &&
           cuda_attention_set_version(ATTENTION_FIRST_VERSION - 1) == -1,
       "attention: an unknown kernel version is refused");
}
static void test_decode_launcher_arguments(void)
{
    Err err;
    void *p = (void *)(uintptr_t)4096;  // non-NULL, 16-byte aligned, never read
    void *xp = (void *)(uintptr_t)(1u << 30);  // an x that y does not overlap
    size_t ws = cuda_gemv_workspace_bytes(1, 1024, 4096, 16);
    GemvLora lora = {p, p, 16, 2.0f}, bad_rank = {p, p, 300, 2.0f};
    rejects(cuda_gemv(p, NULL, xp, p, 1, 1024, 12, NULL, p, ws, NULL, &err), &err, "gemv", "in=12",
            "a GEMV whose rows are not 16-byte multiples");
    rejects(cuda_gemv(p, p, xp, p, 1, 1024, 4096, NULL, p, ws, NULL, &err), &err, "gemv", "exactly one",
            "a GEMV with both outputs");
    rejects(cuda_gemv(p, NULL, NULL, p, 1, 1024, 4096, NULL, p, ws, NULL, &err), &err, "gemv", "NULL",
            "a GEMV without x");
    rejects(cuda_gemv(p, NULL, xp, p, 0, 1024, 4096, NULL, p, ws, NULL, &err), &err, "gemv", "batch=0",
            "a GEMV of batch 0");
    rejects(cuda_gemv(p, NULL, xp, p, 1, 1024, 4096, &bad_rank, p, ws, NULL, &err), &err, "gemv", "rank=300",
            "LoRA rank 300");
    rejects(cuda_gemv(p, NULL, xp, p, 1, 1024, 4096, &lora, p, ws - 1, NULL, &err), &err, "gemv", "workspace",
            "a GEMV workspace one byte short");
    rejects(cuda_gemv((bf16_t *)p + 1, NULL, (bf16_t *)p + 8, p, 1, 1024, 4096, NULL, p, ws, NULL, &err), &err,
            "gemv", "overlaps", "a GEMV output over its input");
    GemvTuning tune = {6, 0, 0, 0};
    rejects(cuda_gemv_tuned(p, NULL, xp, p, 1, 1024, 4096, NULL, p, ws, &tune, NULL, &err), &err, "gemv",
            "warps_per_block=6", "6 warps a block");
    ok(cuda_gemv_workspace_bytes(1, 1024, 4096, 16) > cuda_gemv_workspace_bytes(1, 1024, 4096, 0),
       "a GEMV with an adapter needs more workspace");
    const bf16_t *b = p;
    size_t aws = cuda_decode_attention_workspace_bytes(2, 32, 8, 128, 100);
    rejects(cuda_decode_attention(p, b, b, b, p, 2, 32, 8, 96, 100, 100, 1, p, aws, NULL, &err), &err,
            "decode_attention", "head_dim=96", "decode attention over head_dim 96");
    rejects(cuda_decode_attention(p, b, b, b, p, 2, 32, 3, 128, 100, 100, 1, p, aws, NULL, &err), &err,
            "decode_attention", "multiple", "32 query heads over 3 kv heads");
    rejects(cuda_decode_attention(p, b, b, b, p, 2, 32, 2, 128, 100, 100, 1, p, aws, NULL, &err), &err,
            "decode_attention", "at most 8", "16 query heads a kv head");
    rejects(cuda_decode_attention(p, b, b, b, p, 2, 32, 8, 128, 100, 101, 1, p, aws, NULL, &err), &err,
            "decode_attention", "max_len=101", "max_len beyond the cache");
    rejects(cuda_decode_attention(p, b, b, b, p, 2, 32, 8, 128, 100, 100, 1, p, aws - 1, NULL, &err), &err,
            "decode_attention", "workspace", "a decode-attention workspace one byte short");
    rejects(cuda_decode_attention(p, b, b, b, NULL, 2, 32, 8, 128, 100, 100, 1, p, aws, NULL, &err), &err,
            "decode_attention", "NULL", "decode attention without lengths");
    const float *fp = (const float *)p;
    rejects(cuda_decode_attention_rope(p, b, p, p, p, p, fp, 2, 32, 8, 128, 100, 100, 1, p, aws - 1, 0, NULL, &err),
            &err, "decode_attention", "workspace", "a RoPE decode-attention workspace one byte short");
    rejects(cuda_decode_attention_rope(p, b, p, p, NULL, p, fp, 2, 32, 8, 128, 100, 100, 1, p, aws, 0, NULL, &err),
            &err, "decode_attention", "NULL", "RoPE decode attention without positions");
    rejects(cuda_decode_attention_rope(p, b, p, p, p, p, fp, 2, 32, 8, 64, 100, 101, 1, p, aws, 0, NULL, &err), &err,
            "decode_attention", "max_len=101", "RoPE decode attention with max_len beyond the cache");
}
#endif

int main(void)
{
    test_embedding();
    test_rmsnorm();
    test_rope("rope_default");
    test_rope("rope_linear");
    test_rope("rope_llama3");
    test_swiglu();
    test_cross_entropy();
    test_adamw();
    test_attention((const int[]){3, 1, 6}, 3, 4, 2, 8);   // GQA 2:1, a one-token document
    test_attention((const int[]){9}, 1, 2, 1, 16);        // one sequence, MQA
    test_gemv_twin();
    test_decode_attention_twin();
#ifdef HAVE_CUDA
    test_launcher_arguments();
    test_attention_launcher_arguments();
    test_decode_launcher_arguments();
#endif
    return done_testing();
}
