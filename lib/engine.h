// defines: EngineBatch, Engine, engine_cpu_create, engine_free, engine_train_micro_batch,
//          engine_eval_micro_batch, engine_logits, LORA_IGNORE_TARGET
// One training step's compute behind a small interface: the float32 CPU reference
// (lib/engine_cpu.c, plain loops + OpenMP, the ground truth for tests) now, a CUDA engine
// later behind the same calls.
//
// The model: Llama blocks (RMSNorm, q/k/v/o with RoPE in the rotate-half convention and GQA,
// causal attention restricted to each packed sequence, SwiGLU MLP), final RMSNorm, lm_head,
// with LoRA (lib/lora.h) on any subset of the seven projections. Base weights are frozen; only
// LoRA gradients are computed.
//
// Loss and gradients: the engine returns the SUM of -log p(target) over the trained targets of
// a micro-batch and ACCUMULATES the gradient of that sum into lora->grads. The trainer sums
// over the micro-batches of one optimizer step and divides both by the total number of trained
// targets of the step (so the loss is the mean over all trained tokens of the accumulated batch,
// not a mean of per-micro-batch means), then clips and steps (lib/optim.h).
#ifndef ENGINE_H
#define ENGINE_H

#include <stdint.h>

#include "err.h"
#include "lora.h"
#include "model.h"

#define LORA_IGNORE_TARGET (-100)   // a position whose target is not trained

// A micro-batch of B rows of T tokens, flattened row-major to B*T positions (the fields of
// DatasetBatch in lib/dataset.h fit directly).
typedef struct {
    int B, T;
    const int32_t *tokens;      // (B, T) input ids
    const int32_t *targets;     // (B, T) id to predict at each position, or LORA_IGNORE_TARGET
    const int32_t *positions;   // (B, T) position ids, 0 at each document start (RoPE angle)
    const int32_t *cu_seqlens;  // (n_seqs + 1) boundaries over the B*T positions: cu_seqlens[0]
                                // = 0, cu_seqlens[n_seqs] = B*T, every row end a boundary. A
                                // query attends to the keys of its own sequence at or before it.
                                // NULL: each row is one sequence.
    int n_seqs;
} EngineBatch;

typedef struct Engine Engine;

// An engine for model m (which must outlive it) and micro-batches of up to max_batch rows of
// max_seq tokens (max_seq <= the model's max_position_embeddings is not required; RoPE just
// goes on). Non-float32 weights are converted once here (the CPU engine computes in float32).
Engine *engine_cpu_create(const Model *m, int max_batch, int max_seq, Err *err);
void engine_free(Engine *e);

// Forward and backward of one micro-batch with dropout on LoRA inputs drawn from rng (dropout
// 0 draws nothing; rng may then be NULL). The draws: layer by layer, each targeted projection
// in forward order (q, k, v, o, gate, up, down), one rng_uniform per input element (B*T*in,
// position-major), dropped when < dropout. Results do not depend on the number of threads. *loss_sum: sum over trained targets of -log p;
// *n_trained: their count. Gradients of loss_sum are added to lora->grads. -1 on a bad batch
// (token or target out of range, B or T over the engine's capacity, bad cu_seqlens).
int engine_train_micro_batch(Engine *e, Lora *lora, const EngineBatch *b, Rng *rng,
                             double *loss_sum, long *n_trained, Err *err);

// The same loss without backward or dropout (validation). lora may be NULL (the base model).
int engine_eval_micro_batch(Engine *e, const Lora *lora, const EngineBatch *b,
                            double *loss_sum, long *n_trained, Err *err);

// Logits of one sequence: tokens (T) at positions 0..T-1, one document; logits (T, vocab).
// lora may be NULL. T <= max_batch * max_seq (a long row uses the whole batch's buffers).
int engine_logits(Engine *e, const Lora *lora, const int32_t *tokens, int T, float *logits,
                  Err *err);

#endif
