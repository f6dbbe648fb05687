// defines: Rng, rng_seed, rng_next, rng_uniform, LoraConfig, Lora, LoraProj, lora_scale,
//          lora_parse_targets, lora_create, lora_free, lora_init, lora_zero_grad, lora_proj
// LoRA parameters with PEFT semantics: for a targeted projection W (out, in) the layer computes
//   y = W x + scale * B (A dropout(x)),   A (rank, in), B (out, rank), float32,
//   scale = alpha / rank, or alpha / sqrt(rank) with rsLoRA.
// Initialisation as PEFT's "default": B = 0, A ~ kaiming_uniform_(a = sqrt(5)), i.e. uniform on
// [-1/sqrt(in), 1/sqrt(in)] (gain sqrt(2 / (1 + 5)), bound gain * sqrt(3 / fan_in)), drawn from
// our Rng below (the same law as torch, not the same numbers).
//
// All parameters live in one contiguous array (and their gradients in another of the same
// layout), so the optimizer, clipping and checkpoints see one flat vector:
//   for layer 0..n_layers-1, for each targeted projection in Proj order (q,k,v,o,gate,up,down):
//     A (rank, in) row-major, then B (out, rank) row-major.
// That is also the order of PEFT's named_parameters().
#ifndef LORA_H
#define LORA_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"
#include "model.h"

// The random generator of the trainer (initialisation and dropout): xoshiro256** seeded by
// four splitmix64 outputs of the seed. rng_uniform returns (next >> 40) * 2^-24, a float in
// [0, 1) with 24 exact bits. The state is 32 bytes, saved in checkpoints as is.
typedef struct {
    uint64_t s[4];
} Rng;

void rng_seed(Rng *r, uint64_t seed);
uint64_t rng_next(Rng *r);
float rng_uniform(Rng *r);

typedef struct {
    int rank;           // r >= 1
    float alpha;        // lora_alpha
    float dropout;      // probability in [0, 1): dropout on A's input in training
    int use_rslora;     // scale alpha / sqrt(r)
    unsigned targets;   // bit mask of 1u << Proj
} LoraConfig;

float lora_scale(const LoraConfig *c);
// "q,k,v,o,gate,up,down", PEFT names ("q_proj") or "all"; -1 naming an unknown module.
int lora_parse_targets(const char *list, unsigned *mask, Err *err);

typedef struct {
    int in, out;        // W's features: A is (rank, in), B is (out, rank)
    float *A;           // (rank, in)   into Lora.params; NULL when not targeted
    float *B;           // (out, rank)
    float *dA;          // (rank, in)   into Lora.grads
    float *dB;          // (out, rank)
} LoraProj;

typedef struct {
    LoraConfig config;
    float scale;        // lora_scale(&config)
    int n_layers;
    LoraProj *proj;     // (n_layers, PROJ_COUNT), see lora_proj
    size_t n_params;
    float *params;      // (n_params) all A and B, layout above
    float *grads;       // (n_params) same layout; engines ACCUMULATE into it
} Lora;

static inline LoraProj *lora_proj(const Lora *l, int layer, Proj p)
{
    return &l->proj[(size_t)layer * PROJ_COUNT + p];
}

// Parameters (zero) and gradients (zero) for every targeted projection of the model. NULL on
// a bad config (rank < 1, dropout outside [0, 1), no targets) with a message.
Lora *lora_create(const ModelConfig *mc, const LoraConfig *c, Err *err);
void lora_free(Lora *l);
// PEFT default init: A Kaiming-uniform from rng (layer by layer, projection by projection,
// A row-major), B zero.
void lora_init(Lora *l, Rng *rng);
void lora_zero_grad(Lora *l);

#endif
