// defines: ModelConfig, RopeType, Proj, LayerWeights, ModelWeights, Model, proj_name,
//          proj_module_path, model_config_parse, model_config_load, model_load, model_free,
//          model_proj_dims, rope_inv_freq
// A Hugging Face Llama-family model directory: config.json (+ generation_config.json for the
// EOS ids) and the weights, model.safetensors or shards listed by model.safetensors.index.json.
// Supported: model_type "llama" (Llama 1/2/3/3.1/3.2, TinyLlama, ...) and "mistral": GQA,
// explicit head_dim, rope_theta, rope scaling of type default/llama3/linear given as
// `rope_scaling` or the newer `rope_parameters`, tied or untied embeddings, silu MLP, no biases.
// Anything else is refused with a message naming config.json and the field.
// Weights stay in the files' memory maps as typed Tensor views (lib/safetensors.h): an engine
// converts what it needs (the CPU engine to float32, a CUDA engine to bf16 on the device;
// 4-bit NF4 weights would be one more DType behind the same views).
#ifndef MODEL_H
#define MODEL_H

#include <stdint.h>

#include "err.h"
#include "safetensors.h"

typedef enum { ROPE_DEFAULT, ROPE_LINEAR, ROPE_LLAMA3 } RopeType;

#define MODEL_MAX_EOS 8

typedef struct {
    char model_type[16];        // "llama" or "mistral"
    int dim;                    // hidden_size
    int hidden_dim;             // intermediate_size (the MLP's width)
    int n_layers;               // num_hidden_layers
    int n_heads;                // num_attention_heads
    int n_kv_heads;             // num_key_value_heads (GQA: n_heads % n_kv_heads == 0)
    int head_dim;               // head_dim, default dim / n_heads
    int vocab_size;
    int max_seq_len;            // max_position_embeddings
    int sliding_window;         // Mistral: a query sees at most this many keys (itself included); 0 = off
    float norm_eps;             // rms_norm_eps
    float rope_theta;
    RopeType rope_type;
    float rope_factor;          // linear and llama3: factor
    float rope_low_freq_factor; // llama3
    float rope_high_freq_factor;// llama3
    int rope_original_max_pos;  // llama3: original_max_position_embeddings
    int tie_embeddings;         // lm_head is the embedding matrix
    int64_t bos_id;             // -1 when none
    int n_eos;                  // EOS ids: config.json's, then generation_config.json's (deduplicated)
    int64_t eos_ids[MODEL_MAX_EOS];
} ModelConfig;

// The seven Linear layers of a block, in the order of a block's modules (the same order as
// AdapterModule in lib/adapter.h). LoRA may target any subset.
typedef enum { PROJ_Q, PROJ_K, PROJ_V, PROJ_O, PROJ_GATE, PROJ_UP, PROJ_DOWN, PROJ_COUNT } Proj;

const char *proj_name(Proj p);          // "q_proj", ..., "down_proj"
const char *proj_module_path(Proj p);   // "self_attn.q_proj", ..., "mlp.down_proj"
// Input and output features of a projection: W is (out, in).
void model_proj_dims(const ModelConfig *c, Proj p, int *in, int *out);

typedef struct {
    Tensor attn_norm;           // (dim)  input_layernorm
    Tensor proj[PROJ_COUNT];    // q (n_heads*head_dim, dim), k and v (n_kv_heads*head_dim, dim),
                                // o (dim, n_heads*head_dim), gate and up (hidden_dim, dim),
                                // down (dim, hidden_dim)
    Tensor ffn_norm;            // (dim)  post_attention_layernorm
} LayerWeights;

typedef struct {
    Tensor embed;               // (vocab_size, dim)
    LayerWeights *layers;       // (n_layers)
    Tensor final_norm;          // (dim)
    Tensor lm_head;             // (vocab_size, dim); a copy of the embed view when tied
} ModelWeights;

typedef struct {
    char *dir;
    ModelConfig config;
    ModelWeights weights;
    int n_files;
    SafeTensors **files;        // (n_files) the maps the views point into
} Model;

// Parse config.json text (name is used in messages). generation_config may be NULL; its
// eos_token_id (int or list) adds to the config's.
int model_config_parse(const char *config_json, const char *generation_json, const char *name,
                       ModelConfig *c, Err *err);
// Read DIR/config.json and DIR/generation_config.json (optional).
int model_config_load(const char *dir, ModelConfig *c, Err *err);

// Load config and map every weight, checking each tensor's dtype (F32/F16/BF16) and shape
// against the config. Missing or unexpected model tensors are errors naming file and tensor.
Model *model_load(const char *dir, Err *err);
void model_free(Model *m);

// RoPE inverse frequencies as transformers computes them in float32 (including llama3 and
// linear scaling): inv_freq (head_dim / 2). The angle of pair i at position p is
// (float)p * inv_freq[i], rotating (x[i], x[i + head_dim/2]) (the rotate-half convention).
void rope_inv_freq(const ModelConfig *c, float *inv_freq);

#endif
