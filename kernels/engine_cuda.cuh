// defines: CudaEngine, cuda_engine_create, cuda_engine_free, cuda_engine_upload_lora,
//          cuda_engine_train_micro_batch, cuda_engine_zero_grad, cuda_engine_download_grads,
//          cuda_engine_device_bytes, cuda_engine_lora_buffers, CudaRecompute, CudaEngineOptions,
//          cuda_engine_recompute, cuda_engine_layers_in, cuda_engine_describe_plan, cuda_recompute_name, cuda_engine_load_stats,
//          cuda_engine_activation_digest, cuda_engine_profile, cuda_engine_profile_report
//          (kernels/engine_cuda.cu; CPU twin lib/engine_cpu.c)
// The CUDA training step: forward and backward of a Llama model with LoRA on one GPU, with the
// semantics of the CPU reference (lib/engine.h): LoRA scale, per-document causal attention via
// cu_seqlens, loss = SUM of -log p over the trained targets, LoRA gradients ACCUMULATED.
//
// Storage: base weights bf16 on the device (uploaded once from the safetensors map through the
// pinned, overlapped pipeline of weights.cuh; F32 and F16 rounded on the device), frozen;
// activations bf16; LoRA parameters and gradients fp32 in the flat layout of lib/lora.h (one
// device array each), a bf16 copy of the parameters made per step for the products. Products
// through cuBLAS (bf16 in, fp32 accumulate; LoRA gradients accumulate in fp32 straight from the
// product). LoRA is folded into the base products: each projection's weight is stored with s B
// beside it and A below it, its input with spare columns for u = x A^T and its output gradient
// with spare columns for du, so that the forward and the input gradient are one product each
// (engine_cuda.cu, "LoRA folding"; kernels/NOTES.md, issue 6 part 4). Attention: the flash kernels (kernels/attention.cuh) for
// head_dim 64 or 128, a plain per-query kernel (fp32) for other head sizes (tiny test models).
//
// Memory: with recomputation off every layer keeps its activations for the backward; per layer
// (CUDA_RECOMPUTE_LAYER) only each layer's input x_in (N, D) is kept, plus ONE layer's set of
// activations that the backward refills by rerunning that layer's forward (products, LoRA u,
// RoPE, attention with its lse, SwiGLU) just before its backward. In between
// (CUDA_RECOMPUTE_MLP) each layer also keeps what its attention half made (q, k, v, the attention
// output and lse, x_mid: 28 KB a position at Llama-3-8B), and the backward reruns only the norms,
// the gate and up products and SwiGLU: the attention products and attention itself are not
// rerun. A plan may mix the modes layer by layer (AUTO within a memory limit: the top layers
// NONE, the next MLP, the rest LAYER). The forward is deterministic, so the recomputed
// activations are bit for bit the ones the forward made.
//
// Streams: the LoRA weight-gradient products (dB, dA) run on a second stream of lower priority
// beside the main one's products; events order them against every later write of what they read.
//
// Not yet: LoRA dropout (refused: the CPU draws its masks from the trainer's Rng), Mistral's
// sliding window (refused), the optimizer step on the device.
#ifndef ENGINE_CUDA_CUH
#define ENGINE_CUDA_CUH

#include "common.cuh"

KERNELS_EXTERN_C_BEGIN
#include "engine.h"

typedef struct CudaEngine CudaEngine;

// AUTO: the first of NONE, MLP whose plan plus a margin (2 GiB and the AdamW moments, 8 bytes a
// LoRA parameter) fits in the device's free memory at create time, else LAYER.
typedef enum { CUDA_RECOMPUTE_AUTO = 0, CUDA_RECOMPUTE_NONE, CUDA_RECOMPUTE_LAYER, CUDA_RECOMPUTE_MLP } CudaRecompute;
const char *cuda_recompute_name(CudaRecompute r);   // "auto", "none", "mlp", "layer"

// memory_limit: bytes (0: none) that the engine's buffers and the optimizer's (8 bytes a LoRA
// parameter) must fit: AUTO takes the fastest plan within it, mixing modes layer by layer (the
// top layers NONE, then MLP, then LAYER); an explicit mode that exceeds it is an error.
// one_stream: every product on one stream (tests, benchmarks); else the LoRA weight-gradient
// products run on a second stream beside the others (same results bit for bit).
typedef struct {
    CudaRecompute recompute;
    int one_stream;
    size_t memory_limit;
} CudaEngineOptions;

// An engine for model m (the map may be freed after this returns: weights are copied) and LoRA
// config lc, for micro-batches of up to max_batch rows of max_seq tokens; opt NULL: defaults
// (recompute AUTO). All device buffers are allocated here; a step allocates nothing. NULL with
// a message on a bad shape, no device or out of device memory.
CudaEngine *cuda_engine_create(const Model *m, const LoraConfig *lc, int max_batch, int max_seq,
                               const CudaEngineOptions *opt, Err *err);
// The mode in use (NONE, MLP or LAYER: AUTO resolved at create), layer 0's when the plan mixes
// them; how many layers use mode r.
CudaRecompute cuda_engine_recompute(const CudaEngine *e);
int cuda_engine_layers_in(const CudaEngine *e, CudaRecompute r);
// The plan in words, into buf (truncated to size): layer 0's mode, then the layers of any other,
// e.g. "mlp" or "mlp (none in 2 of 32 layers)".
void cuda_engine_describe_plan(const CudaEngine *e, char *buf, size_t size);
// Base weights uploaded at create: bytes on the device (bf16) and wall seconds it took.
void cuda_engine_load_stats(const CudaEngine *e, size_t *weight_bytes, double *seconds);
// For tests: a 64-bit FNV-1a digest of layer l's kept activations (all but x_in) over the last
// micro-batch's positions, as the buffers hold them now. With LAYER (MLP: all but the attention
// half's) the buffers are shared: after a training step they hold layer 0's activations as the
// backward recomputed them.
int cuda_engine_activation_digest(CudaEngine *e, int layer, uint64_t *digest, Err *err);
void cuda_engine_free(CudaEngine *e);
// For benchmarks: on != 0 records a CUDA event after every operation of the following steps
// (a few microseconds each) and sums the time between events by operation; on = 0 stops.
// The report prints the sums per step, by group (the label's first word) and by operation, to out
// as '#' lines, largest first.
int cuda_engine_profile(CudaEngine *e, int on, Err *err);
void cuda_engine_profile_report(CudaEngine *e, FILE *out);

// Copies lora->params (host fp32, lib/lora.h layout; lora built for the same model and config)
// to the device parameters.
int cuda_engine_upload_lora(CudaEngine *e, const Lora *lora, Err *err);

// As engine_train_micro_batch (lib/engine.h) without dropout: *loss_sum, *n_trained; the
// gradient of loss_sum is added to the device gradients. Synchronises (the loss comes back).
int cuda_engine_train_micro_batch(CudaEngine *e, const EngineBatch *b, double *loss_sum, long *n_trained,
                                  Err *err);

int cuda_engine_zero_grad(CudaEngine *e, Err *err);
// grads (n_params) host fp32 <- the device gradients, lib/lora.h layout.
int cuda_engine_download_grads(CudaEngine *e, float *grads, size_t n_params, Err *err);
// Device bytes the engine allocated (weights, activations, scratch).
size_t cuda_engine_device_bytes(const CudaEngine *e);
// The device's flat fp32 LoRA parameters and gradients (n_params each) and the engine's stream,
// for an optimizer that steps them in place (kernels/train_cuda.cu).
void cuda_engine_lora_buffers(CudaEngine *e, float **params, float **grads, size_t *n_params, GpuStream *stream);
KERNELS_EXTERN_C_END

#endif
