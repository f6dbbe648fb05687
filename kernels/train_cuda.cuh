// defines: CudaTrainer, cuda_trainer_create, cuda_trainer_free, cuda_trainer_upload,
//          cuda_trainer_download, cuda_trainer_micro_batch, cuda_trainer_zero_grad,
//          cuda_trainer_step, cuda_trainer_device_bytes, cuda_trainer_engine (kernels/train_cuda.cu)
// The GPU side of lora-train's loop (lib/train_engine.h): the CUDA engine (engine_cuda.cuh)
// plus the AdamW moments m, v as flat fp32 device buffers (lib/lora.h layout), so a whole
// optimizer step stays on the device. The host copies (lora->params, AdamW m/v) are written
// only by cuda_trainer_download, for checkpoints and the final adapter.
#ifndef TRAIN_CUDA_CUH
#define TRAIN_CUDA_CUH

#include "adamw.cuh"
#include "common.cuh"
#include "engine_cuda.cuh"

KERNELS_EXTERN_C_BEGIN
#include "engine.h"

typedef struct CudaTrainer CudaTrainer;

// NULL with a message (no device, out of memory, dropout > 0: see cuda_engine_create); opt as
// there (NULL: defaults).
CudaTrainer *cuda_trainer_create(const Model *m, const LoraConfig *lc, int max_batch, int max_seq,
                                 const CudaEngineOptions *opt, Err *err);
// The engine inside (for its recompute mode and load statistics).
CudaEngine *cuda_trainer_engine(CudaTrainer *t);
void cuda_trainer_free(CudaTrainer *t);
// Device <- host: LoRA parameters and the AdamW moments m, v (n_params each).
int cuda_trainer_upload(CudaTrainer *t, const Lora *lora, const float *m, const float *v, Err *err);
// Host <- device: lora->params and m, v.
int cuda_trainer_download(CudaTrainer *t, Lora *lora, float *m, float *v, Err *err);
// As engine_train_micro_batch without dropout: the gradient of the summed loss is added to the
// device gradients.
int cuda_trainer_micro_batch(CudaTrainer *t, const EngineBatch *b, double *loss_sum, long *n_trained, Err *err);
int cuda_trainer_zero_grad(CudaTrainer *t, Err *err);
// The optimizer step: gradients *= grad_scale (1 / trained tokens, as a float like the CPU
// loop), global L2 norm, clip to hp->max_norm and AdamW, all on the device; *grad_norm (the
// norm before clipping) is the one value that comes back.
int cuda_trainer_step(CudaTrainer *t, float grad_scale, const AdamWStep *hp, double *grad_norm, Err *err);
// Device bytes allocated (engine, moments): every buffer is allocated at create time, so this
// is the peak of the run's own buffers.
size_t cuda_trainer_device_bytes(const CudaTrainer *t);
KERNELS_EXTERN_C_END

#endif
