// defines: TrainEngine, train_engine_create,
//          train_engine_free, train_engine_upload, train_engine_zero_grad, train_engine_micro_batch,
//          train_engine_eval_micro_batch, train_engine_step, train_engine_download,
//          train_engine_describe, train_engine_device_bytes, TrainRecompute,
//          train_recompute_parse
// Where lib/trainer.c's one loop computes: the float32 CPU engine (lib/engine.h) with the host
// optimizer (lib/optim.h), or the CUDA engine with the optimizer on the device
// (kernels/train_cuda.cuh, built with HAVE_CUDA). The loop calls the same functions for both:
//   upload once after setup (the host LoRA parameters and AdamW moments, fresh or resumed),
//   per step: zero_grad, micro_batch x accum, step (divide by the step's trained tokens, global
//   norm, clip, AdamW), and download before a checkpoint or the final adapter.
// On the CPU, upload and download do nothing: the host arrays are the engine's.
#ifndef TRAIN_ENGINE_H
#define TRAIN_ENGINE_H

#include <stddef.h>

#include "device.h"
#include "engine.h"
#include "err.h"
#include "lora.h"
#include "optim.h"

// Activation recomputation on CUDA (kernels/engine_cuda.cuh): NONE keeps every layer's
// activations, LAYER keeps each layer's input and recomputes its forward before its backward,
// MLP keeps the attention half's activations too and recomputes only the MLP half (and the
// norms), AUTO picks the fastest plan that fits the device's free memory with a margin (and the
// memory limit, when there is one): NONE, or the top layers NONE and the others MLP, or all MLP,
// or some MLP and the others LAYER, or all LAYER. No effect on the CPU.
typedef enum { TRAIN_RECOMPUTE_AUTO = 0, TRAIN_RECOMPUTE_NONE, TRAIN_RECOMPUTE_LAYER, TRAIN_RECOMPUTE_MLP } TrainRecompute;
// "auto", "none", "mlp", "layer"; -1 naming the bad value.
int train_recompute_parse(const char *name, TrainRecompute *r, Err *err);

typedef struct TrainEngine TrainEngine;

// An engine on device d (CPU or CUDA, not AUTO) for model m, LoRA config lc and micro-batches of
// up to max_batch rows of max_seq tokens, recomputing as rc says (CUDA only) within memory_limit
// bytes of device buffers (CUDA only; 0: none): AUTO then takes the fastest plan that fits,
// mixing the modes layer by layer. CUDA: -1 with a clear message in a build without CUDA, without
// a GPU, with LoRA dropout > 0, or when no plan fits the limit.
TrainEngine *train_engine_create(Device d, const Model *m, const LoraConfig *lc, int max_batch, int max_seq,
                                 TrainRecompute rc, size_t memory_limit, Err *err);
void train_engine_free(TrainEngine *e);
// Device <- lora->params and opt's moments.
int train_engine_upload(TrainEngine *e, const Lora *lora, const AdamW *opt, Err *err);
int train_engine_zero_grad(TrainEngine *e, Lora *lora, Err *err);
// As engine_train_micro_batch (rng draws the CPU's dropout masks).
int train_engine_micro_batch(TrainEngine *e, Lora *lora, const EngineBatch *b, Rng *rng, double *loss_sum,
                             long *n_trained, Err *err);
// The validation loss of a micro-batch (CUDA: a training pass whose gradients the next
// zero_grad discards; call it between steps only).
int train_engine_eval_micro_batch(TrainEngine *e, const Lora *lora, const EngineBatch *b, double *loss_sum,
                                  long *n_trained, Err *err);
// One optimizer step: gradients /= n_trained (when > 0), *grad_norm = their global L2 norm,
// clipped to max_grad_norm (<= 0: not), AdamW at learning rate lr (opt->step counts it).
int train_engine_step(TrainEngine *e, Lora *lora, AdamW *opt, long n_trained, double max_grad_norm, float lr,
                      double *grad_norm, Err *err);
// Host <- device: lora->params, opt->m, opt->v (for checkpoints and the adapter).
int train_engine_download(TrainEngine *e, Lora *lora, AdamW *opt, Err *err);
// "cpu (N threads)", or "cuda: NAME (TOTAL GiB); recompute MODE[ (auto)], X GiB of buffers;
// weights Y GiB loaded in S s (R GB/s)", for the progress display.
const char *train_engine_describe(const TrainEngine *e);
// Device memory the run's buffers take (all allocated at create); 0 on the CPU.
size_t train_engine_device_bytes(const TrainEngine *e);

#endif
