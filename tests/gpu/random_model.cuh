// defines: RandomModel (the GPU tests that need a model: engine_test, gen_test)
// A random Llama held in memory: bf16 tensors drawn with harness.cuh's normal() (or a cheaper
// generator for the big benchmark models) and the Model (lib/model.h) that views them.
// Norm weights are 1 + 0.1 N, projections N / sqrt(in), the embedding N. Include after
// harness.cuh and a header that brings lib/model.h in.
#ifndef GPU_TEST_RANDOM_MODEL_CUH
#define GPU_TEST_RANDOM_MODEL_CUH

#include <math.h>
#include <stdio.h>
#include <string.h>

#include <vector>

struct RandomModel {
    Model m;
    std::vector<std::vector<uint16_t>> store;
    std::vector<LayerWeights> layers;
    float (*draw)(void);

    Tensor tensor(int64_t rows, int64_t cols, float scale, float offset)
    {
        size_t n = (size_t)rows * (cols ? cols : 1);
        std::vector<uint16_t> bits(n);
        for (size_t i = 0; i < n; i++)
            bits[i] = bf16_bits(offset + scale * draw());
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

    // head_dim 0: dim / n_heads. max_seq: max_position_embeddings.
    RandomModel(int dim, int hidden, int n_layers, int n_heads, int n_kv_heads, int head_dim, int vocab, int max_seq,
                float (*gen)(void) = normal)
        : draw(gen)
    {
        memset(&m, 0, sizeof m);
        ModelConfig *c = &m.config;
        snprintf(c->model_type, sizeof c->model_type, "llama");
        c->dim = dim;
        c->hidden_dim = hidden;
        c->n_layers = n_layers;
        c->n_heads = n_heads;
        c->n_kv_heads = n_kv_heads;
        c->head_dim = head_dim ? head_dim : dim / n_heads;
        c->vocab_size = vocab;
        c->max_seq_len = max_seq;
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

#endif
