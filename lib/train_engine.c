#include "train_engine.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef HAVE_CUDA
#include "../kernels/train_cuda.cuh"
#include "cuda_device.h"
#endif

struct TrainEngine {
    Device device;
    Engine *cpu;
#ifdef HAVE_CUDA
    CudaTrainer *cuda;
#endif
    char description[400];
};

int train_recompute_parse(const char *name, TrainRecompute *r, Err *err)
{
    if (!strcmp(name, "auto"))
        *r = TRAIN_RECOMPUTE_AUTO;
    else if (!strcmp(name, "none"))
        *r = TRAIN_RECOMPUTE_NONE;
    else if (!strcmp(name, "mlp"))
        *r = TRAIN_RECOMPUTE_MLP;
    else if (!strcmp(name, "layer"))
        *r = TRAIN_RECOMPUTE_LAYER;
    else
        return err_set(err, "'%s' is not none, mlp, layer or auto", name);
    return 0;
}

TrainEngine *train_engine_create(Device d, const Model *m, const LoraConfig *lc, int max_batch, int max_seq,
                                 TrainRecompute rc, size_t memory_limit, Err *err)
{
    d = device_resolve(d);
    if (device_check(d, "training", err) < 0)
        return NULL;
#ifndef HAVE_CUDA
    (void)lc, (void)rc, (void)memory_limit;
#endif
    TrainEngine *e = calloc(1, sizeof *e);
    if (!e) {
        err_set(err, "out of memory");
        return NULL;
    }
    e->device = d;
    if (d == DEVICE_CPU) {
        e->cpu = engine_cpu_create(m, max_batch, max_seq, err);
        snprintf(e->description, sizeof e->description, "cpu (%d threads)", omp_get_max_threads());
        if (!e->cpu) {
            free(e);
            return NULL;
        }
        return e;
    }
#ifdef HAVE_CUDA
    char name[128] = "";
    size_t total = 0;
    cuda_device_info(name, sizeof name, &total, NULL, NULL);
    if (lc->dropout > 0) {
        err_set(err, "--device cuda: LoRA dropout %g is not supported on the GPU yet (use --dropout 0 or --device cpu)",
                lc->dropout);
        free(e);
        return NULL;
    }
    CudaEngineOptions opt = {.recompute = rc == TRAIN_RECOMPUTE_NONE    ? CUDA_RECOMPUTE_NONE
                                          : rc == TRAIN_RECOMPUTE_MLP   ? CUDA_RECOMPUTE_MLP
                                          : rc == TRAIN_RECOMPUTE_LAYER ? CUDA_RECOMPUTE_LAYER
                                                                        : CUDA_RECOMPUTE_AUTO,
                             .memory_limit = memory_limit};
    e->cuda = cuda_trainer_create(m, lc, max_batch, max_seq, &opt, err);
    if (!e->cuda) {
        free(e);
        return NULL;
    }
    CudaEngine *engine = cuda_trainer_engine(e->cuda);
    size_t weight_bytes;
    double load_s;
    cuda_engine_load_stats(engine, &weight_bytes, &load_s);
    char plan[96];
    cuda_engine_describe_plan(engine, plan, sizeof plan);
    snprintf(e->description, sizeof e->description,
             "cuda: %s (%.0f GiB); recompute %s%s, %.3f GiB of buffers; weights %.2f GiB loaded in %.2f s (%.1f GB/s)",
             name, total / 1073741824.0, plan,
             rc == TRAIN_RECOMPUTE_AUTO ? " (auto)" : "", cuda_trainer_device_bytes(e->cuda) / 1073741824.0,
             weight_bytes / 1073741824.0, load_s, load_s > 0 ? weight_bytes / load_s / 1e9 : 0.0);
#endif
    return e;
}

void train_engine_free(TrainEngine *e)
{
    if (!e)
        return;
    if (e->cpu)
        engine_free(e->cpu);
#ifdef HAVE_CUDA
    cuda_trainer_free(e->cuda);
#endif
    free(e);
}

int train_engine_upload(TrainEngine *e, const Lora *lora, const AdamW *opt, Err *err)
{
#ifdef HAVE_CUDA
    if (e->cuda)
        return cuda_trainer_upload(e->cuda, lora, opt->m, opt->v, err);
#endif
    (void)e, (void)lora, (void)opt, (void)err;
    return 0;
}

int train_engine_download(TrainEngine *e, Lora *lora, AdamW *opt, Err *err)
{
#ifdef HAVE_CUDA
    if (e->cuda)
        return cuda_trainer_download(e->cuda, lora, opt->m, opt->v, err);
#endif
    (void)e, (void)lora, (void)opt, (void)err;
    return 0;
}

int train_engine_zero_grad(TrainEngine *e, Lora *lora, Err *err)
{
#ifdef HAVE_CUDA
    if (e->cuda)
        return cuda_trainer_zero_grad(e->cuda, err);
#endif
    (void)e, (void)err;
    lora_zero_grad(lora);
    return 0;
}

int train_engine_micro_batch(TrainEngine *e, Lora *lora, const EngineBatch *b, Rng *rng, double *loss_sum,
                             long *n_trained, Err *err)
{
#ifdef HAVE_CUDA
    if (e->cuda)
        return cuda_trainer_micro_batch(e->cuda, b, loss_sum, n_trained, err);
#endif
    return engine_train_micro_batch(e->cpu, lora, b, rng, loss_sum, n_trained, err);
}

int train_engine_eval_micro_batch(TrainEngine *e, const Lora *lora, const EngineBatch *b, double *loss_sum,
                                  long *n_trained, Err *err)
{
#ifdef HAVE_CUDA
    if (e->cuda)
        return cuda_trainer_micro_batch(e->cuda, b, loss_sum, n_trained, err);
#endif
    return engine_eval_micro_batch(e->cpu, lora, b, loss_sum, n_trained, err);
}

int train_engine_step(TrainEngine *e, Lora *lora, AdamW *opt, long n_trained, double max_grad_norm, float lr,
                      double *grad_norm, Err *err)
{
    // Gradients so far are of the summed loss; the step's loss is the mean over its tokens.
    float inv = n_trained > 0 ? (float)(1.0 / (double)n_trained) : 1.0f;
#ifdef HAVE_CUDA
    if (e->cuda) {
        const AdamWConfig *c = &opt->config;
        AdamWStep hp = {.lr = lr, .beta1 = c->beta1, .beta2 = c->beta2, .eps = c->eps,
                        .weight_decay = c->weight_decay, .step = opt->step + 1, .max_norm = max_grad_norm};
        if (cuda_trainer_step(e->cuda, inv, &hp, grad_norm, err) < 0)
            return -1;
        opt->step++;
        return 0;
    }
#endif
    (void)e, (void)err;
    if (inv != 1.0f)
        for (size_t i = 0; i < lora->n_params; i++)
            lora->grads[i] *= inv;
    *grad_norm = clip_grad_norm(lora->grads, lora->n_params, max_grad_norm);
    adamw_step(opt, lora->params, lora->grads, lr);
    return 0;
}

const char *train_engine_describe(const TrainEngine *e) { return e->description; }

size_t train_engine_device_bytes(const TrainEngine *e)
{
#ifdef HAVE_CUDA
    if (e->cuda)
        return cuda_trainer_device_bytes(e->cuda);
#endif
    (void)e;
    return 0;
}
