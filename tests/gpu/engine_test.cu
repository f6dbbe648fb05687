// The CUDA training step (kernels/engine_cuda.cu) against the CPU reference engine
// (lib/engine_cpu.c): the summed loss and every LoRA gradient tensor of one micro-batch of packed
// documents (several per row, positions restarting, some targets untrained), on
//   - a random Llama in memory with GQA and head_dim 64 (the flash attention kernels),
//   - tests/fixtures/golden/tiny (head_dim 24: the plain attention kernels, llama3 RoPE),
//   - stories260K from $TESTDATA/stories260K/hf when present (head_dim 8, 5 kv of 8 heads).
// Base weights are bf16 in the model, so both engines see the same values; the CPU engine computes
// in float32, the GPU in bf16 with fp32 accumulation. Tolerances (relative L2, no NaN): loss 1e-2;
// all LoRA gradients together 4e-2, each tensor 1e-1 (a bug gives errors of order 1). Measured on
// an H200 (seeds 1 and 7): all gradients 1.0e-2 to 2.7e-2, the worst tensor 2.3e-2 to 5.8e-2
// (stories260K, a small q_proj A). Why not tighter: the peer's own bf16 path
// (transformers + PEFT in bf16 against the same model in fp32, same bf16-rounded weights, random
// LoRA, summed loss) is off by as much: golden/tiny 1.7e-2 over all gradients and 2.1e-2 on layer 0
// q_proj A; stories260K 1.0e-2 over all and 3.5e-2 on layer 0 q_proj A (with lora_B ~ 0.05/sqrt(r);
// with lora_B ~ 0.5/sqrt(r) that trained model is ill-conditioned in bf16: 55% for the peer).
//   engine_test            TAP tests (prove runs it through tests/gpu/engine.t)
//   engine_test --bench    step times: the random model at 1 x 256 and a dim-1024, 4-layer model
//                          at 1 x 2048 (and 2 x 2048, 8 x 512)
#include <chrono>

#include "engine_cuda.cuh"
#include "harness.cuh"

// A random Llama held in memory: bf16 tensors and the Model that views them.
struct RandomModel {
    Model m;
    std::vector<std::vector<uint16_t>> store;
    std::vector<LayerWeights> layers;

    Tensor tensor(int64_t rows, int64_t cols, float scale, float offset)
    {
        size_t n = (size_t)rows * (cols ? cols : 1);
        std::vector<uint16_t> bits(n);
        for (size_t i = 0; i < n; i++)
            bits[i] = bf16_bits(offset + scale * normal());
        store.push_back(std::move(bits));
        Tensor t;
        memset(&t, 0, sizeof t);
        t.dtype = DTYPE_BF16;
        t.ndim = cols ? 2 : 1;
        t.shape[0] = rows;
        t.shape[1] = cols;
        t.data = store.back().data();
        return t;
    }

    RandomModel(int dim, int hidden, int n_layers, int n_heads, int n_kv_heads, int vocab)
    {
        memset(&m, 0, sizeof m);
        ModelConfig *c = &m.config;
        snprintf(c->model_type, sizeof c->model_type, "llama");
        c->dim = dim;
        c->hidden_dim = hidden;
        c->n_layers = n_layers;
        c->n_heads = n_heads;
        c->n_kv_heads = n_kv_heads;
        c->head_dim = dim / n_heads;
        c->vocab_size = vocab;
        c->max_seq_len = 8192;
        c->norm_eps = 1e-5f;
        c->rope_theta = 10000.0f;
        c->rope_type = ROPE_DEFAULT;
        c->rope_factor = 1.0f;
        c->bos_id = -1;
        store.reserve(4 + (size_t)n_layers * 9);
        layers.resize(n_layers);
        m.weights.embed = tensor(vocab, dim, 1.0f, 0.0f);
        for (int l = 0; l < n_layers; l++) {
            layers[l].attn_norm = tensor(dim, 0, 0.1f, 1.0f);
            layers[l].ffn_norm = tensor(dim, 0, 0.1f, 1.0f);
            for (int p = 0; p < PROJ_COUNT; p++) {
                int in, out;
                model_proj_dims(c, (Proj)p, &in, &out);
                layers[l].proj[p] = tensor(out, in, 1.0f / sqrtf((float)in), 0.0f);
            }
        }
        m.weights.layers = layers.data();
        m.weights.final_norm = tensor(dim, 0, 0.1f, 1.0f);
        m.weights.lm_head = tensor(vocab, dim, 1.0f / sqrtf((float)dim), 0.0f);
    }
};

// A micro-batch of B rows of T tokens packed with documents of random lengths (positions restart
// at each), a fifth of the targets untrained.
struct Batch {
    std::vector<int32_t> tokens, targets, positions, cu;
    EngineBatch b;
    Batch(int B, int T, int V)
    {
        int N = B * T;
        tokens.resize(N), targets.resize(N), positions.resize(N);
        cu.push_back(0);
        for (int row = 0; row < B; row++) {
            int t = 0;
            while (t < T) {
                int len = 1 + (int)(uniform() * (T / 2));
                if (len > T - t)
                    len = T - t;
                for (int i = 0; i < len; i++)
                    positions[row * T + t + i] = i;
                t += len;
                cu.push_back(row * T + t);
            }
        }
        for (int n = 0; n < N; n++) {
            tokens[n] = (int32_t)(uniform() * V);
            targets[n] = uniform() < 0.2 ? LORA_IGNORE_TARGET : (int32_t)(uniform() * V);
        }
        b.B = B, b.T = T, b.tokens = tokens.data(), b.targets = targets.data(), b.positions = positions.data();
        b.cu_seqlens = cu.data(), b.n_seqs = (int)cu.size() - 1;
    }
};

// LoRA on all seven projections with random A and B (B = 0 would leave dA zero, testing nothing).
// B's entries have standard deviation b_scale / sqrt(rank).
static Lora *random_lora(const ModelConfig *c, int rank, float alpha, float b_scale)
{
    LoraConfig lc;
    memset(&lc, 0, sizeof lc);
    lc.rank = rank, lc.alpha = alpha, lc.dropout = 0, lc.targets = (1u << PROJ_COUNT) - 1;
    Err err;
    Lora *lora = lora_create(c, &lc, &err);
    if (!lora) {
        fprintf(stderr, "%s: %s\n", harness_prog, err.msg);
        exit(1);
    }
    for (int l = 0; l < c->n_layers; l++)
        for (int p = 0; p < PROJ_COUNT; p++) {
            LoraProj *lp = lora_proj(lora, l, (Proj)p);
            for (size_t i = 0; i < (size_t)rank * lp->in; i++)
                lp->A[i] = normal() / sqrtf((float)lp->in);
            for (size_t i = 0; i < (size_t)lp->out * rank; i++)
                lp->B[i] = b_scale * normal() / sqrtf((float)rank);
        }
    return lora;
}

static double seconds_since(std::chrono::steady_clock::time_point t0)
{
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One micro-batch through both engines; every LoRA tensor's gradient compared.
static const double TOL_LOSS = 1e-2, TOL_GRADS_ALL = 4e-2, TOL_GRAD_TENSOR = 1e-1;

static void compare_engines(const char *name, const Model *m, int B, int T, int rank, float b_scale)
{
    const ModelConfig *c = &m->config;
    Batch batch(B, T, c->vocab_size);
    Lora *lora = random_lora(c, rank, 2.0f * rank, b_scale);
    Err err;

    Engine *cpu = engine_cpu_create(m, B, T, &err);
    if (!cpu) {
        fprintf(stderr, "%s: %s\n", harness_prog, err.msg);
        exit(1);
    }
    double cpu_loss = 0;
    long cpu_trained = 0;
    auto t0 = std::chrono::steady_clock::now();
    LAUNCHED(engine_train_micro_batch(cpu, lora, &batch.b, NULL, &cpu_loss, &cpu_trained, E));
    double cpu_s = seconds_since(t0);
    std::vector<float> cpu_grads(lora->grads, lora->grads + lora->n_params);

    CudaEngine *gpu = cuda_engine_create(m, &lora->config, B, T, &err);
    if (!gpu) {
        fprintf(stderr, "%s: %s\n", harness_prog, err.msg);
        exit(1);
    }
    LAUNCHED(cuda_engine_upload_lora(gpu, lora, E));
    LAUNCHED(cuda_engine_zero_grad(gpu, E));
    double gpu_loss = 0;
    long gpu_trained = 0;
    LAUNCHED(cuda_engine_train_micro_batch(gpu, &batch.b, &gpu_loss, &gpu_trained, E));
    std::vector<float> gpu_grads(lora->n_params);
    LAUNCHED(cuda_engine_download_grads(gpu, gpu_grads.data(), gpu_grads.size(), E));

    printf("# %s: %d x %d, %d documents, %ld trained targets; CPU step %.3f s\n", name, B, T, batch.b.n_seqs,
           cpu_trained, cpu_s);
    is_int(gpu_trained, cpu_trained, "%s: trained-target count", name);
    double loss_err = fabs(gpu_loss - cpu_loss) / fabs(cpu_loss);
    ok(isfinite(gpu_loss) && loss_err < TOL_LOSS, "%s: loss sum GPU %.6f CPU %.6f, relative error %.2e < %.0e",
       name, gpu_loss, cpu_loss, loss_err, TOL_LOSS);
    // Every tensor in its own test; the table line gives the worst.
    double worst = 0;
    const char *worst_name = "";
    static char worst_buf[64];
    for (int l = 0; l < c->n_layers; l++)
        for (int p = 0; p < PROJ_COUNT; p++) {
            LoraProj *lp = lora_proj(lora, l, (Proj)p);
            struct {
                const char *ab;
                const float *dev_base;
                size_t n;
            } parts[2] = {{"A", lp->dA, (size_t)rank * lp->in}, {"B", lp->dB, (size_t)lp->out * rank}};
            for (auto &part : parts) {
                size_t off = (size_t)(part.dev_base - lora->grads);
                double e = rel_l2(gpu_grads.data() + off, cpu_grads.data() + off, part.n);
                ok(e < TOL_GRAD_TENSOR, "%s: layer %d %s lora_%s grad, relative L2 error %.2e < %.0e", name, l,
                   proj_name((Proj)p), part.ab, e, TOL_GRAD_TENSOR);
                if (!(e <= worst)) {
                    worst = e;
                    snprintf(worst_buf, sizeof worst_buf, "layer %d %s %s", l, proj_name((Proj)p), part.ab);
                    worst_name = worst_buf;
                }
            }
        }
    double all = rel_l2(gpu_grads.data(), cpu_grads.data(), cpu_grads.size());
    ok(all < TOL_GRADS_ALL, "%s: all %zu LoRA gradients, relative L2 error %.2e < %.0e", name, cpu_grads.size(),
       all, TOL_GRADS_ALL);

    // Gradients accumulate: a second call adds the same again (up to the order of the attention
    // kernels' fp32 atomics).
    double first_loss = gpu_loss;
    LAUNCHED(cuda_engine_train_micro_batch(gpu, &batch.b, &gpu_loss, &gpu_trained, E));
    std::vector<float> twice(lora->n_params);
    LAUNCHED(cuda_engine_download_grads(gpu, twice.data(), twice.size(), E));
    for (float &g : gpu_grads)
        g *= 2;
    double acc = rel_l2(twice.data(), gpu_grads.data(), gpu_grads.size());
    ok(acc < 5e-3 && fabs(gpu_loss - first_loss) <= 1e-4 * fabs(first_loss),
       "%s: a second micro-batch accumulates (2x the first gradients within %.2e) with the same loss", name, acc);

    // A micro-batch with no trained target: loss 0, gradients untouched.
    std::vector<int32_t> saved = batch.targets;
    for (int32_t &t : batch.targets)
        t = LORA_IGNORE_TARGET;
    LAUNCHED(cuda_engine_train_micro_batch(gpu, &batch.b, &gpu_loss, &gpu_trained, E));
    std::vector<float> after(lora->n_params);
    LAUNCHED(cuda_engine_download_grads(gpu, after.data(), after.size(), E));
    ok(gpu_loss == 0 && gpu_trained == 0 && !memcmp(after.data(), twice.data(), after.size() * sizeof(float)),
       "%s: no trained target: loss %g, %ld trained, gradients unchanged", name, gpu_loss, gpu_trained);
    batch.targets = saved;
    batch.b.targets = batch.targets.data();

    // Step time (median of 5 after the two above).
    std::vector<double> ms;
    for (int i = 0; i < 5; i++) {
        auto t1 = std::chrono::steady_clock::now();
        LAUNCHED(cuda_engine_train_micro_batch(gpu, &batch.b, &gpu_loss, &gpu_trained, E));
        ms.push_back(seconds_since(t1) * 1e3);
    }
    std::sort(ms.begin(), ms.end());
    printf("# TABLE %-14s %2dx%-5d loss_cpu %12.4f loss_gpu %12.4f rel %.1e | grads all %.1e worst %.1e (%s) | "
           "gpu step %.2f ms, cpu step %.0f ms\n",
           name, B, T, cpu_loss, gpu_loss, loss_err, all, worst, worst_name, ms[2], cpu_s * 1e3);
    cuda_engine_free(gpu);
    engine_free(cpu);
    lora_free(lora);
}

// What the engine refuses: a token outside the vocabulary, a batch over its capacity, dropout.
static void test_rejects(const Model *m)
{
    const ModelConfig *c = &m->config;
    Lora *lora = random_lora(c, 4, 8, 0.5f);
    Err err;
    CudaEngine *gpu = cuda_engine_create(m, &lora->config, 1, 32, &err);
    ok(gpu != NULL, "engine for 1 x 32 created");
    if (!gpu)
        return;
    LAUNCHED(cuda_engine_upload_lora(gpu, lora, E));
    double loss;
    long n;
    Batch big(2, 32, c->vocab_size);
    ok(cuda_engine_train_micro_batch(gpu, &big.b, &loss, &n, &err) < 0 && strstr(err.msg, "exceeds"),
       "a 2 x 32 batch on a 1 x 32 engine is refused: %s", err.msg);
    Batch bad(1, 32, c->vocab_size);
    bad.tokens[5] = c->vocab_size;
    ok(cuda_engine_train_micro_batch(gpu, &bad.b, &loss, &n, &err) < 0 && strstr(err.msg, "outside the vocabulary"),
       "a token outside the vocabulary is refused: %s", err.msg);
    Batch crossing(1, 32, c->vocab_size);
    crossing.cu[1] = 40;
    ok(cuda_engine_train_micro_batch(gpu, &crossing.b, &loss, &n, &err) < 0,
       "bad cu_seqlens are refused: %s", err.msg);
    cuda_engine_free(gpu);
    LoraConfig with_dropout = lora->config;
    with_dropout.dropout = 0.1f;
    ok(!cuda_engine_create(m, &with_dropout, 1, 32, &err) && strstr(err.msg, "dropout"),
       "LoRA dropout is refused for now: %s", err.msg);
    lora_free(lora);
}

// Step time of the CUDA engine alone (the CPU reference is too slow at these sizes).
static void bench_case(const char *name, const Model *m, int B, int T, int rank)
{
    const ModelConfig *c = &m->config;
    Batch batch(B, T, c->vocab_size);
    Lora *lora = random_lora(c, rank, rank, 0.05f);
    Err err;
    CudaEngine *gpu = cuda_engine_create(m, &lora->config, B, T, &err);
    if (!gpu) {
        fprintf(stderr, "%s: %s\n", harness_prog, err.msg);
        exit(1);
    }
    LAUNCHED(cuda_engine_upload_lora(gpu, lora, E));
    double loss = 0;
    long n = 0;
    for (int i = 0; i < 2; i++)
        LAUNCHED(cuda_engine_train_micro_batch(gpu, &batch.b, &loss, &n, E));
    std::vector<double> ms;
    for (int i = 0; i < 7; i++) {
        auto t0 = std::chrono::steady_clock::now();
        LAUNCHED(cuda_engine_train_micro_batch(gpu, &batch.b, &loss, &n, E));
        ms.push_back(seconds_since(t0) * 1e3);
    }
    std::sort(ms.begin(), ms.end());
    std::vector<float> grads(lora->n_params);
    LAUNCHED(cuda_engine_download_grads(gpu, grads.data(), grads.size(), E));
    bool finite = isfinite(loss);
    for (float g : grads)
        finite = finite && isfinite(g);
    // Product work of a step: forward and input-gradient products of every projection and of
    // lm_head (2 flops a multiply-add, twice); attention and LoRA left out.
    double proj_params = (double)c->n_layers * c->dim *
                         (2.0 * c->n_heads * c->head_dim + 2.0 * c->n_kv_heads * c->head_dim + 3.0 * c->hidden_dim);
    double flops = 4.0 * B * T * (proj_params + (double)c->vocab_size * c->dim);
    printf("%-22s %2d x %-5d step %8.2f ms  %9.0f tokens/s  %6.1f TFLOP/s (products)  loss/token %.3f  "
           "device %.2f GiB  %s\n",
           name, B, T, ms[3], B * T / (ms[3] * 1e-3), flops / (ms[3] * 1e-3) / 1e12, loss / (n ? n : 1),
           cuda_engine_device_bytes(gpu) / 1073741824.0, finite ? "finite" : "NaN/inf!");
    cuda_engine_free(gpu);
    lora_free(lora);
}

static int bench(void)
{
    RandomModel small(256, 688, 2, 4, 2, 512);
    bench_case("random dim 256", &small.m, 1, 256, 8);
    RandomModel big(1024, 2816, 4, 16, 4, 32000);
    bench_case("random dim 1024 L4", &big.m, 1, 256, 16);
    bench_case("random dim 1024 L4", &big.m, 1, 2048, 16);
    bench_case("random dim 1024 L4", &big.m, 2, 2048, 16);
    bench_case("random dim 1024 L4", &big.m, 8, 512, 16);
    return 0;
}

int main(int argc, char **argv)
{
    HarnessMode mode = harness_start(argc, argv);
    if (mode != HARNESS_TESTS)
        return mode == HARNESS_BENCH ? bench() : 0;
    // GQA (4 query heads on 2 kv heads), head_dim 64: the flash attention path.
    RandomModel random_model(256, 688, 2, 4, 2, 512);
    compare_engines("random hd64", &random_model.m, 2, 128, 8, 0.5f);
    compare_engines("random hd64 1x256", &random_model.m, 1, 256, 8, 0.5f);
    test_rejects(&random_model.m);

    Err err;
    Model *tiny = model_load("tests/fixtures/golden/tiny", &err);
    ok(tiny != NULL, "tests/fixtures/golden/tiny loads%s%s", tiny ? "" : ": ", tiny ? "" : err.msg);
    if (tiny) {
        compare_engines("golden/tiny", tiny, 2, 64, 4, 0.5f);
        model_free(tiny);
    }
    const char *testdata = getenv("TESTDATA");
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/stories260K/hf", testdata ? testdata : "");
    Model *stories = testdata ? model_load(dir, &err) : NULL;
    if (!stories) {
        printf("ok %d # SKIP stories260K: %s\n", ++tap_n, testdata ? err.msg : "TESTDATA not set");
    } else {
        compare_engines("stories260K", stories, 2, 256, 8, 0.05f);
        model_free(stories);
    }
    return done_testing();
}
