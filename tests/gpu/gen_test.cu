// The GPU generation engine (kernels/gen_cuda.cu) against the CPU Generator (lib/generate.c):
//   - random Llamas in memory: head_dim 64 with GQA (split-KV decode attention, flash prefill),
//     head_dim 128, and head_dim 12 with an MLP width not a multiple of 8 (the plain attention
//     kernels, cuBLAS for the down product); each without an adapter, with a random adapter merged,
//     and unmerged; each with the decode products on cuBLAS (the default) and on the GEMV kernels. Three slots of different prompt lengths are prefilled, then 20 decode steps
//     run with a row made inactive for a while and its slot restarted by a new prefill while the
//     others keep decoding. Every logits row (prefill and decode) is compared with a CPU Generator
//     that runs that sequence alone.
//     Tolerance: relative L2 per row <= 5e-2 (measured on an H200, seeds 1-7: worst row 2.7e-2, on
//     the dim-48 model with a merged adapter; typical 0.6e-2 to 2e-2). The CPU computes in fp32 from the same bf16
//     weights; the GPU rounds every activation to bf16 (2^-9 relative each), about ten roundings
//     in a row per layer, and a merged adapter is one more bf16 rounding of every weight. A bug
//     (a wrong position, slot, head or cache row) gives errors of order 1.
//   - the same scenario with CUDA graphs (and PDL GEMV launches) on and off: bit-identical logits;
//     and with RoPE + cache store as a kernel of its own: bit-identical too;
//   - each slot of the batched run against the same sequence run alone in slot 0 (n = 1);
//   - the errors: a full slot, ids out of range, n > max_batch, prefill over max_prefill;
//   - stories260K ($TESTDATA/stories260K/hf, skipped when absent): 200 greedy tokens from BOS,
//     GPU ids (host argmax of the GPU logits) against the CPU Generator's.
//   gen_test            TAP tests (tests/gpu/gen_engine.t runs it)
//   gen_test --bench    single products GEMV vs cuBLAS, then Llama-3-8B shapes with random
//                       weights made on the device: decode tokens/s at batch 1, 4, 16, 64 (graphs
//                       on/off, GEMV or cuBLAS, PDL, fused residual), bandwidth, time to first
//                       token of a 2048-token prompt.
#include <chrono>
#include <functional>
#include <string>

#include <cublas_v2.h>

#include "gemv.cuh"
#include "gen_cuda.cuh"   // adapter.h and model.h inside extern "C"
extern "C" {
#include "generate.h"
}
#include "harness.cuh"
#include "random_model.cuh"

static void die(const char *what, const Err *err)
{
    fprintf(stderr, "%s: %s: %s\n", harness_prog, what, err->msg);
    exit(1);
}

// A random adapter on q, v, o, gate, down (k and up left out: untargeted blocks of a stacked
// group must stay exact), rank 8, B of standard deviation 0.5/sqrt(rank) so it visibly moves the
// logits.
static Adapter *random_adapter(const ModelConfig *c)
{
    AdapterConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.rank = 8;
    cfg.alpha = 16;
    cfg.modules = (1u << ADAPTER_Q) | (1u << ADAPTER_V) | (1u << ADAPTER_O) | (1u << ADAPTER_GATE) |
                  (1u << ADAPTER_DOWN);
    int in[ADAPTER_NMODULES], out[ADAPTER_NMODULES];
    for (int p = 0; p < PROJ_COUNT; p++)
        model_proj_dims(c, (Proj)p, &in[p], &out[p]);
    Err err;
    Adapter *a = adapter_alloc(&cfg, c->n_layers, in, out, &err);
    if (!a)
        die("adapter_alloc", &err);
    for (int l = 0; l < c->n_layers; l++)
        for (int p = 0; p < PROJ_COUNT; p++) {
            float *A = adapter_A(a, l, (AdapterModule)p), *B = adapter_B(a, l, (AdapterModule)p);
            if (!A)
                continue;
            for (int i = 0; i < cfg.rank * in[p]; i++)
                A[i] = normal() / sqrtf((float)in[p]);
            for (int i = 0; i < out[p] * cfg.rank; i++)
                B[i] = 0.5f * normal() / sqrtf((float)cfg.rank);
        }
    return a;
}

static std::vector<uint32_t> random_ids(int n, int vocab)
{
    std::vector<uint32_t> ids(n);
    for (uint32_t &id : ids)
        id = (uint32_t)(uniform() * vocab);
    return ids;
}

static const double TOL_LOGITS = 5e-2;

// What one scenario does, fixed in advance so that it can be replayed exactly (graphs on and
// off, one sequence alone).
struct Scenario {
    std::vector<uint32_t> prompt[3], restart;    // slot 1 restarts with `restart` at step 12
    uint32_t step_ids[20][3];
    Scenario(int vocab)
    {
        static const int lens[3] = {5, 13, 1};
        for (int s = 0; s < 3; s++)
            prompt[s] = random_ids(lens[s], vocab);
        restart = random_ids(7, vocab);
        for (int t = 0; t < 20; t++)
            for (int s = 0; s < 3; s++)
                step_ids[t][s] = random_ids(1, vocab)[0];
    }
    // Row 1 is inactive in steps 8..11; a new prompt restarts slot 1 before step 12.
    static bool active(int step, int row) { return !(row == 1 && step >= 8 && step < 12); }
};

// The logits rows the scenario produces, in order; `only` >= 0 runs that slot's sequence alone
// (in slot 0, n = 1). Each output is tagged with (step, row): step -1 is the first prefill, 12 +
// 100 the restart's prefill.
struct Output {
    int step, row;
    std::vector<float> logits;
};

// other: the decode step's other arrangement, which must give the same bits: RoPE and the cache
// store as their own kernel before cuda_decode_attention (instead of cuda_decode_attention_rope),
static std::vector<Output> run_gpu(const Model *m, const Adapter *a, int merge, int graphs, int gemv,
                                   const Scenario &sc, int only, int other = 0, int row_kernels = 0)
{
    const ModelConfig *c = &m->config;
    CudaGenConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_batch = 4, cfg.capacity = 64, cfg.max_prefill = 32, cfg.merge_adapter = merge, cfg.use_graphs = graphs;
    cfg.cublas_min_batch = gemv ? 64 : 1;   // decode products: the GEMV kernels, or cuBLAS
    cfg.gemv_pdl = graphs;                   // PDL changes no arithmetic: the graph test covers it
    cfg.unfused_attention = other;
    cfg.row_kernels = row_kernels;
    Err err;
    CudaGen *g = cuda_gen_create(m, a, &cfg, &err);
    if (!g)
        die("cuda_gen_create", &err);
    size_t V = c->vocab_size;
    std::vector<Output> outs;
    auto grab = [&](int step, int row, int gpu_row) {
        std::vector<float> all = download_f32(cuda_gen_logits(g), (size_t)(gpu_row + 1) * V);
        outs.push_back({step, row, std::vector<float>(all.begin() + (size_t)gpu_row * V, all.end())});
    };
    // Prefill: all three prompts in one call (slots 2, 0, 1 in that order: rows differ from slots).
    {
        std::vector<int> slots, cu{0};
        std::vector<uint32_t> ids;
        int order[3] = {2, 0, 1};
        for (int k = 0; k < 3; k++) {
            int s = order[k];
            if (only >= 0 && s != only)
                continue;
            slots.push_back(only >= 0 ? 0 : s);
            ids.insert(ids.end(), sc.prompt[s].begin(), sc.prompt[s].end());
            cu.push_back((int)ids.size());
        }
        LAUNCHED(cuda_gen_prefill(g, slots.data(), ids.data(), cu.data(), (int)slots.size(), E));
        int k2 = 0;
        for (int k = 0; k < 3; k++)
            if (only < 0 || order[k] == only)
                grab(-1, order[k], k2++);
    }
    for (int step = 0; step < 20; step++) {
        if (step == 12 && (only < 0 || only == 1)) {
            int slot = only >= 0 ? 0 : 1, cu[2] = {0, (int)sc.restart.size()};
            LAUNCHED(cuda_gen_prefill(g, &slot, sc.restart.data(), cu, 1, E));
            grab(112, 1, 0);
        }
        uint32_t ids[3];
        uint8_t act[3];
        int n = only >= 0 ? 1 : 3;
        for (int r = 0; r < n; r++) {
            int s = only >= 0 ? only : r;
            ids[r] = sc.step_ids[step][s];
            act[r] = Scenario::active(step, s);
        }
        LAUNCHED(cuda_gen_decode(g, ids, act, n, E));
        for (int r = 0; r < n; r++)
            if (act[r])
                grab(step, only >= 0 ? only : r, r);
    }
    int expect1 = (int)sc.restart.size() + 8;   // after the restart: steps 12..19
    if (only < 0)
        ok(cuda_gen_position(g, 0) == 5 + 20 && cuda_gen_position(g, 1) == expect1 &&
               cuda_gen_position(g, 2) == 1 + 20,
           "positions after the scenario: %d %d %d (want 25 %d 21)", cuda_gen_position(g, 0),
           cuda_gen_position(g, 1), cuda_gen_position(g, 2), expect1);
    cuda_gen_free(g);
    return outs;
}

// The CPU Generator's logits for the same outputs.
static std::vector<Output> run_cpu(const Model *m, const Adapter *a, int merge, const Scenario &sc)
{
    const ModelConfig *c = &m->config;
    Err err;
    Generator *gen[3];
    for (int s = 0; s < 3; s++)
        if (!(gen[s] = generator_new(m, a, merge, &err)))
            die("generator_new", &err);
    size_t V = c->vocab_size;
    std::vector<Output> outs;
    auto fwd = [&](int s, const uint32_t *ids, size_t n, int step) {
        float *lg = generator_forward(gen[s], ids, n, &err);
        if (!lg)
            die("generator_forward", &err);
        outs.push_back({step, s, std::vector<float>(lg, lg + V)});
    };
    int order[3] = {2, 0, 1};
    for (int k = 0; k < 3; k++)
        fwd(order[k], sc.prompt[order[k]].data(), sc.prompt[order[k]].size(), -1);
    for (int step = 0; step < 20; step++) {
        if (step == 12) {
            generator_reset(gen[1]);
            fwd(1, sc.restart.data(), sc.restart.size(), 112);
        }
        for (int s = 0; s < 3; s++)
            if (Scenario::active(step, s))
                fwd(s, &sc.step_ids[step][s], 1, step);
    }
    for (int s = 0; s < 3; s++)
        generator_free(gen[s]);
    return outs;
}

static bool same_bits(const std::vector<float> &x, const std::vector<float> &y)
{
    return x.size() == y.size() && !memcmp(x.data(), y.data(), x.size() * sizeof(float));
}

static void compare_case(const char *name, const Model *m, const Adapter *a, int merge, int gemv)
{
    Scenario sc(m->config.vocab_size);
    std::vector<Output> cpu = run_cpu(m, a, merge, sc);
    std::vector<Output> plain = run_gpu(m, a, merge, 0, gemv, sc, -1);
    std::vector<Output> graph = run_gpu(m, a, merge, 1, gemv, sc, -1);
    is_int(plain.size(), cpu.size(), "%s: %zu logits rows from the GPU, as many as the CPU's", name, plain.size());
    if (plain.size() != cpu.size() || graph.size() != cpu.size())
        return;
    double worst_prefill = 0, worst_decode = 0;
    int bad = 0;
    for (size_t i = 0; i < cpu.size(); i++) {
        if (plain[i].step != cpu[i].step || plain[i].row != cpu[i].row) {
            bad++;
            continue;
        }
        double e = rel_l2(plain[i].logits.data(), cpu[i].logits.data(), cpu[i].logits.size());
        double &w = cpu[i].step == -1 || cpu[i].step == 112 ? worst_prefill : worst_decode;
        if (!(e <= w))
            w = e;
        if (!(e <= TOL_LOGITS)) {
            if (bad < 3)
                printf("#   %s: step %d row %d: relative L2 error %.2e\n", name, cpu[i].step, cpu[i].row, e);
            bad++;
        }
    }
    ok(worst_prefill <= TOL_LOGITS, "%s: prefill logits (4 prompts, 3 slots) against the CPU: worst row %.2e <= %.0e",
       name, worst_prefill, TOL_LOGITS);
    ok(worst_decode <= TOL_LOGITS && bad == 0,
       "%s: 20 decode steps x 3 rows (one paused, restarted) against the CPU: worst row %.2e <= %.0e, %d bad", name,
       worst_decode, TOL_LOGITS, bad);
    int differ = 0;
    for (size_t i = 0; i < plain.size(); i++)
        differ += !same_bits(plain[i].logits, graph[i].logits);
    ok(differ == 0, "%s: CUDA graphs (with PDL GEMVs) and plain launches give bit-identical logits (%d of %zu rows differ)", name, differ,
       plain.size());
    std::vector<Output> other = run_gpu(m, a, merge, 1, gemv, sc, -1, 1);
    differ = other.size() == graph.size() ? 0 : -1;
    for (size_t i = 0; differ >= 0 && i < graph.size(); i++)
        differ += !same_bits(other[i].logits, graph[i].logits);
    ok(differ == 0, "%s: RoPE and cache store in their own kernel: bit-identical logits (%d rows "
       "differ)", name, differ);
    printf("# TABLE %-26s prefill %.2e decode %.2e (CPU fp32 vs GPU, relative L2, worst row)\n", name, worst_prefill,
           worst_decode);

    // Each slot alone (slot 0, n = 1) against its row in the batched run.
    // (one row: the row kernels of cuda_gemv_row where the model allows, with PDL)
    int n_identical = 0, n_rows = 0, pdl_differ = 0;
    double worst_alone = 0, worst_alone_cpu = 0;
    for (int s = 0; s < 3; s++) {
        std::vector<Output> alone = run_gpu(m, a, merge, 1, gemv, sc, s);
        if (s == 0) {  // PDL changes no arithmetic
            std::vector<Output> no_pdl = run_gpu(m, a, merge, 1, gemv, sc, s, 0, 1);
            pdl_differ = no_pdl.size() == alone.size() ? 0 : -1;
            for (size_t i = 0; pdl_differ >= 0 && i < alone.size(); i++)
                pdl_differ += !same_bits(no_pdl[i].logits, alone[i].logits);
        }
        size_t k = 0;
        for (size_t i = 0; i < plain.size(); i++) {
            const Output &o = plain[i];
            if (o.row != s)
                continue;
            while (k < alone.size() && alone[k].step != o.step)
                k++;
            if (k == alone.size())
                break;
            n_rows++;
            bool same = same_bits(o.logits, alone[k].logits);
            n_identical += same;
            if (!same)
                printf("#   %s: slot %d %s %d: bits differ from the run alone\n", name, s,
                       o.step < 0 || o.step == 112 ? "prefill" : "decode step", o.step < 0 ? 0 : o.step % 100);
            double e = rel_l2(o.logits.data(), alone[k].logits.data(), o.logits.size());
            worst_alone = e > worst_alone || !(e == e) ? e : worst_alone;
            e = rel_l2(alone[k].logits.data(), cpu[i].logits.data(), o.logits.size());
            worst_alone_cpu = e > worst_alone_cpu || !(e == e) ? e : worst_alone_cpu;
        }
    }
    ok(worst_alone_cpu <= TOL_LOGITS, "%s: each slot alone (one-row steps) against the CPU: worst row %.2e <= %.0e",
       name, worst_alone_cpu, TOL_LOGITS);
    ok(pdl_differ == 0, "%s: one-row steps with and without PDL: bit-identical (%d rows differ)", name, pdl_differ);
    ok(n_rows == (int)plain.size() && worst_alone <= TOL_LOGITS,
       "%s: each slot batched equals that sequence alone: %d of %d rows bit-identical, worst %.2e", name,
       n_identical, n_rows, worst_alone);
    if (n_identical != n_rows)
        printf("#   %s: rows whose bits depend on n: cuBLAS picks its kernel (so the summation order) by the\n"
               "#   row count: the prefill's lm_head over the prompts' last tokens, decode products on cuBLAS\n", name);
}

static void test_errors(const Model *m)
{
    const ModelConfig *c = &m->config;
    CudaGenConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_batch = 2, cfg.capacity = 8, cfg.max_prefill = 10, cfg.merge_adapter = 1, cfg.use_graphs = 1;
    Err err;
    CudaGen *g = cuda_gen_create(m, NULL, &cfg, &err);
    ok(g != NULL, "engine of 2 slots x 8 tokens created (%zu device bytes)", g ? cuda_gen_device_bytes(g) : 0);
    if (!g)
        return;
    std::vector<uint32_t> ids = random_ids(12, c->vocab_size);
    int slots[3] = {0, 1, 0}, cu[4] = {0, 6, 8, 9};
    ok(cuda_gen_prefill(g, slots, ids.data(), cu, 3, &err) < 0 && strstr(err.msg, "max_batch"),
       "prefill of 3 prompts on 2 slots refused: %s", err.msg);
    ok(cuda_gen_prefill(g, slots, ids.data(), cu + 1, 1, &err) < 0, "prefill offsets not from 0 refused: %s",
       err.msg);
    int cu_dup[3] = {0, 2, 4};
    ok(cuda_gen_prefill(g, slots + 1, ids.data(), cu_dup, 2, &err) == 0, "slots 1 and 0 prefilled");
    int dup[2] = {1, 1};
    ok(cuda_gen_prefill(g, dup, ids.data(), cu_dup, 2, &err) < 0 && strstr(err.msg, "slot"),
       "two prompts for one slot refused: %s", err.msg);
    int cu_long[2] = {0, 9};
    ok(cuda_gen_prefill(g, slots, ids.data(), cu_long, 1, &err) < 0 && strstr(err.msg, "capacity"),
       "a prompt over the capacity refused: %s", err.msg);
    int two[2] = {0, 1}, cu_big[3] = {0, 6, 12};
    ok(cuda_gen_prefill(g, two, ids.data(), cu_big, 2, &err) < 0 && strstr(err.msg, "max_prefill"),
       "prefill over max_prefill refused: %s", err.msg);
    int slot_bad = 2, cu1[2] = {0, 1};
    ok(cuda_gen_prefill(g, &slot_bad, ids.data(), cu1, 1, &err) < 0 && strstr(err.msg, "slot"),
       "slot outside 0..max_batch-1 refused: %s", err.msg);
    uint32_t oob = (uint32_t)c->vocab_size;
    ok(cuda_gen_prefill(g, two, &oob, cu1, 1, &err) < 0 && strstr(err.msg, "vocabulary"),
       "prefill id outside the vocabulary refused: %s", err.msg);
    uint32_t step[3] = {1, 2, 3};
    uint8_t act[3] = {1, 1, 1};
    ok(cuda_gen_decode(g, step, act, 3, &err) < 0 && strstr(err.msg, "max_batch"), "decode of 3 rows on 2 slots "
       "refused: %s", err.msg);
    uint32_t step_bad[2] = {1, oob};
    ok(cuda_gen_decode(g, step_bad, act, 2, &err) < 0 && strstr(err.msg, "vocabulary"),
       "decode id outside the vocabulary refused: %s", err.msg);
    uint8_t act_one[2] = {1, 0};
    ok(cuda_gen_decode(g, step_bad, act_one, 2, &err) == 0, "an inactive row's id is not checked");
    // Slot 0 holds 3 positions now (2 + 1): 5 more fill it to 8, the next is refused.
    int fails = 0;
    for (int i = 0; i < 5; i++)
        fails += cuda_gen_decode(g, step, act_one, 2, &err) < 0;
    ok(fails == 0 && cuda_gen_position(g, 0) == 8 && cuda_gen_position(g, 1) == 2,
       "decode fills slot 0 to its capacity (positions %d %d)", cuda_gen_position(g, 0), cuda_gen_position(g, 1));
    ok(cuda_gen_decode(g, step, act_one, 2, &err) < 0 && strstr(err.msg, "full"), "a full slot refused: %s",
       err.msg);
    ok(cuda_gen_position(g, 0) == 8, "a refused step changes no position");
    cuda_gen_free(g);
    cfg.capacity = c->max_seq_len + 1;
    ok(!cuda_gen_create(m, NULL, &cfg, &err) && strstr(err.msg, "context"), "capacity over the context refused: %s",
       err.msg);
}

static int argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

// stories260K: greedy from BOS on both engines.
static void test_stories(void)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/stories260K/hf", tap_testdata());
    Err err;
    Model *m = model_load(dir, &err);
    if (!m) {
        ok(1, "# SKIP stories260K not found (%s)", err.msg);
        return;
    }
    const ModelConfig *c = &m->config;
    const int N = 200;
    Generator *cpu = generator_new(m, NULL, 1, &err);
    if (!cpu)
        die("generator_new", &err);
    CudaGenConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_batch = 1, cfg.capacity = N + 1, cfg.max_prefill = 16, cfg.merge_adapter = 1, cfg.use_graphs = 1;
    CudaGen *g = cuda_gen_create(m, NULL, &cfg, &err);
    if (!g)
        die("cuda_gen_create", &err);
    uint32_t bos = c->bos_id >= 0 ? (uint32_t)c->bos_id : 1;
    int cu[2] = {0, 1}, slot = 0;
    LAUNCHED(cuda_gen_prefill(g, &slot, &bos, cu, 1, E));
    const float *cl = generator_forward(cpu, &bos, 1, &err);
    uint32_t cpu_tok = 0, gpu_tok = 0;
    int diverged = -1;
    double worst = 0;
    for (int i = 0; i < N; i++) {
        std::vector<float> gl = download_f32(cuda_gen_logits(g), c->vocab_size);
        double e = rel_l2(gl.data(), cl, c->vocab_size);
        worst = e > worst || !(e == e) ? e : worst;
        cpu_tok = (uint32_t)argmax(cl, c->vocab_size);
        gpu_tok = (uint32_t)argmax(gl.data(), c->vocab_size);
        if (cpu_tok != gpu_tok) {
            diverged = i;
            printf("# stories260K: token %d differs: CPU %u (CPU logit %.5f, GPU %.5f), GPU %u (CPU logit %.5f, "
                   "GPU %.5f)\n",
                   i, cpu_tok, cl[cpu_tok], gl[cpu_tok], gpu_tok, cl[gpu_tok], gl[gpu_tok]);
            ok(cl[cpu_tok] - cl[gpu_tok] < 0.05f * (fabsf(cl[cpu_tok]) + 1),
               "stories260K: the divergence at token %d is a near-tie on the CPU (gap %.4f)", i,
               cl[cpu_tok] - cl[gpu_tok]);
            break;
        }
        if (i + 1 == N)
            break;
        uint8_t act = 1;
        LAUNCHED(cuda_gen_decode(g, &cpu_tok, &act, 1, E));
        if (!(cl = generator_forward(cpu, &cpu_tok, 1, &err)))
            die("generator_forward", &err);
    }
    ok(diverged < 0 || diverged >= 50, "stories260K: greedy GPU ids equal the CPU's for %d of %d tokens",
       diverged < 0 ? N : diverged, N);
    ok(worst <= TOL_LOGITS, "stories260K: logits along the greedy path, worst row %.2e <= %.0e", worst, TOL_LOGITS);
    cuda_gen_free(g);
    generator_free(cpu);
    model_free(m);
}

// ---- bench ------------------------------------------------------------------------------------

static double now_s(void)
{
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static ModelConfig llama3_8b(void)
{
    ModelConfig c;
    memset(&c, 0, sizeof c);
    snprintf(c.model_type, sizeof c.model_type, "llama");
    c.dim = 4096, c.hidden_dim = 14336, c.n_layers = 32, c.n_heads = 32, c.n_kv_heads = 8, c.head_dim = 128;
    c.vocab_size = 128256, c.max_seq_len = 8192, c.norm_eps = 1e-5f, c.rope_theta = 500000.0f;
    c.rope_type = ROPE_DEFAULT, c.rope_factor = 1.0f, c.bos_id = -1;
    return c;
}

static double weight_bytes(const ModelConfig *c)
{
    double QD = c->n_heads * c->head_dim, KD = c->n_kv_heads * c->head_dim, D = c->dim, F = c->hidden_dim;
    return 2.0 * (c->n_layers * (D * (QD + 2 * KD) + QD * D + 3 * D * F) + (double)c->vocab_size * D);
}

// batch prompts of prompt_len, then steps decode steps; prints a table row.
// label says what `tweak` changes in the default configuration (graphs, cuBLAS products).
static void bench_decode(const ModelConfig *c, int batch, int prompt_len, int steps, const char *label,
                         std::function<void(CudaGenConfig &)> tweak = nullptr)
{
    CudaGenConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_batch = batch, cfg.capacity = prompt_len + steps, cfg.max_prefill = 2048, cfg.merge_adapter = 1;
    cfg.use_graphs = 1;
    if (tweak)
        tweak(cfg);
    Err err;
    CudaGen *g = cuda_gen_create_random(c, &cfg, 7, &err);
    if (!g)
        die("cuda_gen_create_random", &err);
    cudaStream_t s = (cudaStream_t)cuda_gen_stream(g);
    std::vector<uint32_t> ids = random_ids(prompt_len * batch, c->vocab_size);
    int per_call = 2048 / prompt_len < batch ? 2048 / prompt_len : batch;
    for (int first = 0; first < batch; first += per_call) {
        int n = batch - first < per_call ? batch - first : per_call;
        std::vector<int> slots(n), cu(n + 1);
        for (int i = 0; i < n; i++)
            slots[i] = first + i, cu[i] = i * prompt_len;
        cu[n] = n * prompt_len;
        LAUNCHED(cuda_gen_prefill(g, slots.data(), ids.data() + (size_t)first * prompt_len, cu.data(), n, E));
    }
    HOST_CUDA(cudaStreamSynchronize(s));
    std::vector<uint32_t> step_ids = random_ids(batch, c->vocab_size);
    std::vector<uint8_t> act(batch, 1);
    // The first step captures the graph: not timed.
    LAUNCHED(cuda_gen_decode(g, step_ids.data(), act.data(), batch, E));
    HOST_CUDA(cudaStreamSynchronize(s));
    double t0 = now_s();
    for (int i = 1; i < steps; i++)
        LAUNCHED(cuda_gen_decode(g, step_ids.data(), act.data(), batch, E));
    HOST_CUDA(cudaStreamSynchronize(s));
    double dt = (now_s() - t0) / (steps - 1);
    std::vector<float> lg = download_f32(cuda_gen_logits(g), c->vocab_size);
    bool finite = true;
    for (float v : lg)
        finite = finite && isfinite(v);
    double avg_len = prompt_len + steps / 2.0;
    double kv = 2.0 * 2 * c->n_layers * c->n_kv_heads * c->head_dim * avg_len * batch;
    double bytes = weight_bytes(c) + kv;
    printf("decode  batch %2d  %-40s  step %7.3f ms  %8.1f tokens/s  %6.2f TB/s (weights %.2f GB + KV %.2f GB)  "
           "device %.1f GiB  %s\n",
           batch, label, dt * 1e3, batch / dt, bytes / dt / 1e12, weight_bytes(c) / 1e9, kv / 1e9,
           cuda_gen_device_bytes(g) / 1073741824.0, finite ? "finite" : "NaN/inf!");
    cuda_gen_free(g);
}

static void bench_prefill(const ModelConfig *c, int len)
{
    CudaGenConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_batch = 1, cfg.capacity = len + 1, cfg.max_prefill = len, cfg.merge_adapter = 1, cfg.use_graphs = 1;
    Err err;
    CudaGen *g = cuda_gen_create_random(c, &cfg, 7, &err);
    if (!g)
        die("cuda_gen_create_random", &err);
    cudaStream_t s = (cudaStream_t)cuda_gen_stream(g);
    std::vector<uint32_t> ids = random_ids(len, c->vocab_size);
    int slot = 0, cu[2] = {0, len};
    std::vector<double> ms;
    for (int i = 0; i < 5; i++) {
        HOST_CUDA(cudaStreamSynchronize(s));
        double t0 = now_s();
        LAUNCHED(cuda_gen_prefill(g, &slot, ids.data(), cu, 1, E));
        HOST_CUDA(cudaStreamSynchronize(s));
        ms.push_back((now_s() - t0) * 1e3);
    }
    std::sort(ms.begin(), ms.end());
    double flops = 2.0 * len * weight_bytes(c) / 2 - 2.0 * (len - 1) * c->vocab_size * c->dim;
    printf("prefill 1 x %d tokens: time to first token %.2f ms (median of 5), %.0f tokens/s, %.0f TFLOP/s (products)\n",
           len, ms[2], len / (ms[2] * 1e-3), flops / (ms[2] * 1e-3) / 1e12);
    cuda_gen_free(g);
}

// One product y = x W^T at Llama-3-8B shapes, the GEMV kernel against cuBLAS (zero weights:
// the time does not depend on the values).
static void bench_products(void)
{
    struct {
        const char *name;
        int out, in, f32;
    } shapes[] = {{"qkv", 6144, 4096, 0}, {"o", 4096, 4096, 0}, {"gate|up", 28672, 4096, 0},
                  {"down", 4096, 14336, 0}, {"lm_head", 128256, 4096, 1}};
    cublasHandle_t blas;
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS)
        return;
    void *ws_blas;
    HOST_CUDA(cudaMalloc(&ws_blas, 32u << 20));
    cublasSetWorkspace(blas, ws_blas, 32u << 20);
    for (auto &sh : shapes) {
        bf16_t *W, *x;
        void *y;
        HOST_CUDA(cudaMalloc(&W, (size_t)sh.out * sh.in * 2));
        HOST_CUDA(cudaMemset(W, 0, (size_t)sh.out * sh.in * 2));
        HOST_CUDA(cudaMalloc(&x, (size_t)64 * sh.in * 2));
        HOST_CUDA(cudaMemset(x, 0, (size_t)64 * sh.in * 2));
        HOST_CUDA(cudaMalloc(&y, (size_t)64 * sh.out * 4));
        size_t wsb = cuda_gemv_workspace_bytes(64, sh.out, sh.in, 0);
        void *ws;
        HOST_CUDA(cudaMalloc(&ws, wsb));
        HOST_CUDA(cudaMemset(ws, 0, wsb));
        for (int batch : {1, 4, 16, 64}) {
            double us_gemv = median_us([&] {
                LAUNCHED(cuda_gemv(sh.f32 ? NULL : (bf16_t *)y, sh.f32 ? (float *)y : NULL, x, W, batch, sh.out, sh.in,
                                   NULL, ws, wsb, NULL, E));
            }, 20);
            float one = 1.0f, zero = 0.0f;
            double us_blas = median_us([&] {
                cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, sh.out, batch, sh.in, &one, W, CUDA_R_16BF, sh.in, x,
                             CUDA_R_16BF, sh.in, &zero, y, sh.f32 ? CUDA_R_32F : CUDA_R_16BF, sh.out,
                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
            }, 20);
            double gb = (double)sh.out * sh.in * 2 / 1e9;
            printf("product %-8s (%6d x %5d) batch %2d: GEMV %8.1f us (%.2f TB/s)  cuBLAS %8.1f us (%.2f TB/s)\n",
                   sh.name, sh.out, sh.in, batch, us_gemv, gb / us_gemv * 1e3, us_blas,
                   gb / us_blas * 1e3);
        }
        cudaFree(W), cudaFree(x), cudaFree(y), cudaFree(ws);
    }
    cudaFree(ws_blas);
    cublasDestroy(blas);
}

static int bench(void)
{
    bench_products();
    ModelConfig c = llama3_8b();
    printf("# Llama-3-8B shapes, random bf16 weights (%.2f GB read per decode step)\n", weight_bytes(&c) / 1e9);
    int dev = 0;
    cudaDeviceProp prop;
    if (cudaGetDevice(&dev) == cudaSuccess && cudaGetDeviceProperties(&prop, dev) == cudaSuccess)
        printf("# %s: %d multiprocessors, L2 %.0f MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize / 1e6);
    typedef std::function<void(CudaGenConfig &)> Tweak;
    if (getenv("GEN_TEST_PROFILE")) {  // a few plain-launch steps for a profiler (tests/gpu/session.sh ncu-gen)
        bench_decode(&c, 1, 128, 3, "no graphs, row kernels", [](CudaGenConfig &f) { f.use_graphs = 0, f.row_kernels = 1; });
        bench_decode(&c, 1, 128, 3, "no graphs, cuBLAS", [](CudaGenConfig &f) { f.use_graphs = 0, f.row_kernels = -1; });
        return 0;
    }
    const Tweak gemv = [](CudaGenConfig &f) { f.cublas_min_batch = 65; };
    bench_decode(&c, 1, 128, 256, "graphs, row kernels, PDL (default)");
    bench_decode(&c, 1, 128, 256, "no graphs", [](CudaGenConfig &f) { f.use_graphs = 0; });
    bench_decode(&c, 1, 128, 256, "row kernels without PDL", [](CudaGenConfig &f) { f.row_kernels = 1; });
    bench_decode(&c, 1, 128, 256, "cuBLAS as batches", [](CudaGenConfig &f) { f.row_kernels = -1; });
    bench_decode(&c, 1, 128, 256, "cuBLAS, old RoPE + attention kernels", [](CudaGenConfig &f) { f.row_kernels = -1, f.unfused_attention = 1; });
    // where the step goes: leave stages out (garbage results, time only)
    bench_decode(&c, 1, 128, 256, "row kernels, skip attention", [](CudaGenConfig &f) { f.bench_skip = 1; });
    bench_decode(&c, 1, 128, 256, "cuBLAS, products only", [](CudaGenConfig &f) { f.row_kernels = -1, f.bench_skip = 7; });
    bench_decode(&c, 1, 128, 256, "capacity 4096 (lora-gen's default)", [](CudaGenConfig &f) { f.capacity = 4096; });
    bench_decode(&c, 1, 2048, 256, "graphs, row kernels, PDL (default)");
    bench_decode(&c, 1, 2048, 256, "cuBLAS as batches", [](CudaGenConfig &f) { f.row_kernels = -1; });
    bench_decode(&c, 4, 128, 256, "graphs, cuBLAS (default)");
    bench_decode(&c, 4, 128, 256, "GEMV", gemv);
    bench_prefill(&c, 2048);
    bench_decode(&c, 16, 128, 256, "graphs, cuBLAS (default)");
    bench_decode(&c, 64, 128, 256, "graphs, cuBLAS (default)");
    bench_decode(&c, 64, 128, 256, "RoPE kernel + 2-kernel attention (old)", [](CudaGenConfig &f) { f.unfused_attention = 1; });
    bench_decode(&c, 1, 128, 256, "graphs, row kernels, PDL (default), again");
    return 0;
}

int main(int argc, char **argv)
{
    HarnessMode mode = harness_start(argc, argv);
    if (mode == HARNESS_SKIP)
        return 0;
    if (mode == HARNESS_BENCH)
        return bench();
    struct {
        const char *name;
        int dim, hidden, layers, heads, kv_heads, head_dim, vocab;
    } models[] = {
        {"hd64 GQA", 256, 512, 2, 4, 2, 64, 300},
        {"hd128", 256, 384, 2, 2, 1, 128, 260},
        {"hd12 plain", 48, 100, 2, 4, 2, 12, 200},
    };
    for (auto &mc : models) {
        RandomModel rm(mc.dim, mc.hidden, mc.layers, mc.heads, mc.kv_heads, mc.head_dim, mc.vocab, 4096);
        Adapter *a = random_adapter(&rm.m.config);
        char name[96];
        for (int gemv = 0; gemv < 2; gemv++) {
            const char *path = gemv ? "GEMV" : "cuBLAS";
            snprintf(name, sizeof name, "%s, %s, no adapter", mc.name, path);
            compare_case(name, &rm.m, NULL, 1, gemv);
            snprintf(name, sizeof name, "%s, %s, adapter merged", mc.name, path);
            compare_case(name, &rm.m, a, 1, gemv);
            snprintf(name, sizeof name, "%s, %s, adapter unmerged", mc.name, path);
            compare_case(name, &rm.m, a, 0, gemv);
        }
        if (mc.head_dim == 64)
            test_errors(&rm.m);
        adapter_free(a);
    }
    test_stories();
    return done_testing();
}
