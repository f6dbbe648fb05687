// The optimizer half of a CUDA training step: scale, global norm, clip + AdamW
// (kernels/adamw.cu), on the engine's stream; one double comes back per step.
#include <cuda_runtime.h>
#include <stdlib.h>

#include "cuda_check.cuh"
#include "engine_cuda.cuh"
#include "train_cuda.cuh"

struct CudaTrainer {
    CudaEngine *engine;
    float *params, *grads;   // the engine's (n)
    float *m, *v;            // (n) AdamW exp_avg, exp_avg_sq
    double *norm_sq;         // (1)
    size_t n;
    cudaStream_t stream;
};

__global__ void scale_kernel(float *x, size_t n, float s)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] *= s;
}

extern "C" void cuda_trainer_free(CudaTrainer *t)
{
    if (!t)
        return;
    cudaFree(t->m);
    cudaFree(t->v);
    cudaFree(t->norm_sq);
    cuda_engine_free(t->engine);
    free(t);
}

extern "C" CudaEngine *cuda_trainer_engine(CudaTrainer *t) { return t->engine; }

extern "C" CudaTrainer *cuda_trainer_create(const Model *m, const LoraConfig *lc, int max_batch, int max_seq,
                                            const CudaEngineOptions *opt, Err *err)
{
    CudaTrainer *t = (CudaTrainer *)calloc(1, sizeof *t);
    if (!t) {
        err_set(err, "out of memory");
        return NULL;
    }
    t->engine = cuda_engine_create(m, lc, max_batch, max_seq, opt, err);
    if (!t->engine) {
        free(t);
        return NULL;
    }
    GpuStream stream;
    cuda_engine_lora_buffers(t->engine, &t->params, &t->grads, &t->n, &stream);
    t->stream = (cudaStream_t)stream;
    size_t bytes = (t->n ? t->n : 1) * sizeof(float);
    cudaError_t ce = cudaMalloc(&t->m, bytes);
    if (ce == cudaSuccess)
        ce = cudaMalloc(&t->v, bytes);
    if (ce == cudaSuccess)
        ce = cudaMalloc(&t->norm_sq, sizeof(double));
    if (ce != cudaSuccess) {
        err_set(err, "cuda trainer: AdamW state of %zu parameters: %s", t->n, cudaGetErrorString(ce));
        cuda_trainer_free(t);
        return NULL;
    }
    return t;
}

extern "C" int cuda_trainer_upload(CudaTrainer *t, const Lora *lora, const float *m, const float *v, Err *err)
{
    if (cuda_engine_upload_lora(t->engine, lora, err) < 0)
        return -1;
    CUDA_CHECK(cudaMemcpy(t->m, m, t->n * 4, cudaMemcpyHostToDevice), err);
    CUDA_CHECK(cudaMemcpy(t->v, v, t->n * 4, cudaMemcpyHostToDevice), err);
    return 0;
}

extern "C" int cuda_trainer_download(CudaTrainer *t, Lora *lora, float *m, float *v, Err *err)
{
    if (lora->n_params != t->n)
        return err_set(err, "cuda trainer: %zu parameters asked for, the device has %zu", lora->n_params, t->n);
    CUDA_CHECK(cudaStreamSynchronize(t->stream), err);
    CUDA_CHECK(cudaMemcpy(lora->params, t->params, t->n * 4, cudaMemcpyDeviceToHost), err);
    CUDA_CHECK(cudaMemcpy(m, t->m, t->n * 4, cudaMemcpyDeviceToHost), err);
    CUDA_CHECK(cudaMemcpy(v, t->v, t->n * 4, cudaMemcpyDeviceToHost), err);
    return 0;
}

extern "C" int cuda_trainer_micro_batch(CudaTrainer *t, const EngineBatch *b, double *loss_sum, long *n_trained,
                                        Err *err)
{
    return cuda_engine_train_micro_batch(t->engine, b, loss_sum, n_trained, err);
}

extern "C" int cuda_trainer_zero_grad(CudaTrainer *t, Err *err) { return cuda_engine_zero_grad(t->engine, err); }

extern "C" int cuda_trainer_step(CudaTrainer *t, float grad_scale, const AdamWStep *hp, double *grad_norm, Err *err)
{
    if (t->n == 0) {
        *grad_norm = 0;
        return 0;
    }
    if (grad_scale != 1.0f) {
        size_t blocks = (t->n + 255) / 256;
        scale_kernel<<<(unsigned)(blocks < 4096 ? blocks : 4096), 256, 0, t->stream>>>(t->grads, t->n, grad_scale);
        LAUNCH_CHECK(err);
    }
    CUDA_CHECK(cudaMemsetAsync(t->norm_sq, 0, sizeof(double), t->stream), err);
    if (cuda_grad_norm_squared(t->norm_sq, t->grads, t->n, t->stream, err) < 0 ||
        cuda_adamw_step(t->params, t->grads, t->m, t->v, t->n, hp, t->norm_sq, t->stream, err) < 0)
        return -1;
    double norm_sq;
    CUDA_CHECK(cudaMemcpyAsync(&norm_sq, t->norm_sq, sizeof norm_sq, cudaMemcpyDeviceToHost, t->stream), err);
    CUDA_CHECK(cudaStreamSynchronize(t->stream), err);
    *grad_norm = sqrt(norm_sq);
    return 0;
}

extern "C" size_t cuda_trainer_device_bytes(const CudaTrainer *t)
{
    return cuda_engine_device_bytes(t->engine) + 2 * t->n * sizeof(float) + sizeof(double);
}
